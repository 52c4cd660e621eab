"""Resident-memory helpers: which mappings count as file-backed, and paging out a file-mapped tensor (its
resident pages go, its data stays) while anonymous memory is never advised."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from podar.engine.memory import file_backed_ranges, page_out_file_backed, release_free_memory

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc and madvise")

MAPS = """\
55d0c0a00000-55d0c0a21000 r--p 00000000 08:01 1048601                    /usr/bin/python3.11
55d0c2b3d000-55d0c2d9e000 rw-p 00000000 00:00 0                          [heap]
7f1a2c000000-7f1a2c021000 rw-p 00000000 00:00 0
7f1a30400000-7f1a5052a000 rw-p 00000000 fe:00 5416436                    /data/model.safetensors
7ffd5b9f0000-7ffd5ba11000 rw-p 00000000 00:00 0                          [stack]
7ffd5bbe4000-7ffd5bbe6000 r-xp 00000000 00:00 0                          [vdso]
"""


def test_file_backed_ranges_keep_only_mappings_of_files():
    assert file_backed_ranges(MAPS) == [(0x55D0C0A00000, 0x55D0C0A21000), (0x7F1A30400000, 0x7F1A5052A000)]


def _rss_file_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile")


@linux
def test_page_out_drops_a_file_mapped_tensors_pages_and_keeps_its_data(tmp_path):
    values = np.random.default_rng(0).standard_normal(8 * 2**20 // 4).astype(np.float32)  # 8 MiB
    path = tmp_path / "weights.bin"
    values.tofile(path)
    mapped = torch.from_numpy(np.memmap(path, dtype=np.float32, mode="c"))  # private file mapping, as safetensors
    assert float(mapped.sum()) == pytest.approx(float(values.sum()), rel=1e-4)  # every page now resident
    resident = _rss_file_kib()
    advised = page_out_file_backed([mapped])
    if advised == 0:
        pytest.skip("this kernel does not support MADV_PAGEOUT")
    assert advised >= 7 * 2**20  # whole pages inside the tensor
    assert _rss_file_kib() < resident - 4 * 1024  # at least 4 MiB of its pages are gone
    assert torch.equal(mapped, torch.from_numpy(values))  # the data comes back unchanged


def test_page_out_leaves_anonymous_memory_alone():
    t = torch.randn(2**20)
    before = t.clone()
    assert page_out_file_backed([t]) == 0
    assert torch.equal(t, before)
    release_free_memory()  # callable anywhere; a no-op where unsupported


def test_fingerprint_hands_each_hashed_tensor_on():
    from podar import TinyModelConfig, tiny_llama
    from podar.engine.models import weights_fingerprint

    model, _tok = tiny_llama(TinyModelConfig())
    seen: list[torch.Tensor] = []
    assert weights_fingerprint(model, after_each=seen.append) == weights_fingerprint(model)
    assert len(seen) == len(model.state_dict())


@linux
def test_page_out_of_a_view_advises_only_the_views_pages(tmp_path):
    values = np.zeros(4 * 2**20 // 4, dtype=np.float32)  # 4 MiB file
    path = tmp_path / "weights.bin"
    values.tofile(path)
    mapped = torch.from_numpy(np.memmap(path, dtype=np.float32, mode="c"))
    half = mapped[: mapped.numel() // 2]  # a view over the first 2 MiB of the mapping
    advised = page_out_file_backed([half])
    if advised == 0:
        pytest.skip("this kernel does not support MADV_PAGEOUT")
    assert advised <= 2 * 2**20  # not the whole storage


@linux
def test_page_out_finds_the_tensors_ranges_among_many(tmp_path):
    """The ranges are searched by bisection: a tensor inside one range among many, or across two adjacent ones,
    is advised whole; ranges elsewhere are not touched."""
    values = np.ones(4 * 2**20 // 4, dtype=np.float32)  # 4 MiB file
    path = tmp_path / "weights.bin"
    values.tofile(path)
    mapped = torch.from_numpy(np.memmap(path, dtype=np.float32, mode="c"))
    lo = mapped.data_ptr()
    hi = lo + mapped.numel() * 4
    (start, end), = [(a, b) for a, b in file_backed_ranges() if a <= lo < b]
    page = 4096
    far_below = [(page * (i + 1), page * (i + 2)) for i in range(0, 200, 2)]  # unmapped, below every mapping
    mid = (lo + hi) // 2 // page * page
    whole = (hi // page * page) - (-(-lo // page) * page)  # bytes of the whole pages inside the tensor
    if page_out_file_backed([mapped]) == 0:
        pytest.skip("this kernel does not support MADV_PAGEOUT")
    for ranges in ([*far_below, (start, end)], [*far_below, (start, mid), (mid, end)]):
        assert page_out_file_backed([mapped], ranges) == whole
    assert float(mapped.sum()) == values.size


@linux
def test_apply_mask_leaves_a_file_mapped_weight_unwritten_and_pages_it_out(tmp_path):
    """Masking a weight mapped from a file makes a new tensor: writing into the mapping would copy each page into
    private memory that stays resident as long as the mapping lives (even once the layer's weight is replaced)."""
    from podar.engine.runtime import Runtime
    from podar.stages.common import apply_mask

    rng = np.random.default_rng(1)
    values = rng.standard_normal((1024, 2048)).astype(np.float32)  # 8 MiB
    path = tmp_path / "weight.bin"
    values.tofile(path)
    mapped = torch.from_numpy(np.memmap(path, dtype=np.float32, mode="c", shape=values.shape))
    layer = torch.nn.Linear(2048, 1024, bias=False)
    layer.weight.data = mapped
    assert float(mapped.sum()) == pytest.approx(float(values.sum()), rel=1e-4)  # every page resident
    resident = _rss_file_kib()
    mask = torch.from_numpy(rng.random(values.shape) < 0.5)
    advised = apply_mask(layer, mask, Runtime())
    if advised:  # (MADV_PAGEOUT: Linux ≥ 5.4) measured before anything reads the mapping again
        assert _rss_file_kib() < resident - 4 * 1024  # the old weight's file pages were advised out
    expected = torch.from_numpy(values).masked_fill(~mask, 0.0)
    assert torch.equal(layer.weight.detach(), expected)
    assert layer.weight.data_ptr() != mapped.data_ptr()
    assert torch.equal(mapped, torch.from_numpy(values))  # the mapping was not written


_FAULTS_SCRIPT = """
import json, resource, torch
from podar.engine.memory import freed_memory_kept

def faults(rounds):
    counts = []
    for _ in range(rounds):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(16 * 2**20)  # 64 MiB, written whole, freed at once
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return counts

fresh = faults(3)
with freed_memory_kept() as took:
    kept = faults(8)
with freed_memory_kept(enabled=False) as off:
    pass
print(json.dumps({"fresh": fresh, "kept": kept, "took": took, "off": off}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_kept_serves_a_repeated_large_allocation_without_page_faults():
    """A 64 MiB tensor allocated, written and freed again and again (in a fresh process, whose allocator no other
    test has shaped): by default every round faults its pages in anew (glibc mmaps and unmaps it); inside
    ``freed_memory_kept``, once the heap has grown to hold it (a round or two), the rounds reuse its pages."""
    import json
    import subprocess

    proc = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    if not seen["took"]:
        pytest.skip("glibc's mallopt is not available here")
    pages = 64 * 2**20 // 4096
    assert min(seen["fresh"]) > pages // 2, seen  # mmapped anew each time: every page faulted in
    assert max(seen["kept"][-4:]) < pages // 20, seen  # once the heap has grown, its pages are reused
    assert seen["off"] is False


def test_the_runtime_switch_turns_freed_memory_keeping_on_and_off():
    """Fine-tuning takes ``freed_memory_kept`` through ``Runtime.keep_freed_memory``: off in the config, nothing is
    changed; on, it takes effect wherever glibc's mallopt exists."""
    from podar.engine.memory import _libc
    from podar.engine.runtime import Runtime
    from podar.schemas.config import RuntimeConfig

    with Runtime(RuntimeConfig(keep_freed_memory=False)).keep_freed_memory() as took:
        assert took is False
    libc = _libc()
    with Runtime(RuntimeConfig()).keep_freed_memory() as took:
        assert took is (libc is not None and hasattr(libc, "mallopt"))
