"""Export formats: round trips on odd shapes, a tiny model end to end in every format, refusal of damaged
files, sharding, and compressed-tensors 0.14 reading what podar writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from podar import CheckpointError, ExportConfig, Pipeline, PruningConfig, SparsityPatternConfig, load_pretrained
from podar.stages.export_io import roundtrip_weight
from podar.stages.sparse_formats import (
    bitmask_compress,
    bitmask_decompress,
    dequantize_int8,
    quantize_int8,
    sparse24_compress,
    sparse24_decompress,
)


def sparse_matrix(rows, cols, density=0.5, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w[torch.rand(rows, cols, generator=g) > density] = 0
    w[0] = 0  # an all-zero row
    w[-1] = torch.randn(cols, generator=g).abs() + 0.1  # a fully dense row
    return w.to(dtype)


def two_four(rows, cols, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    keep = torch.zeros(rows, cols // 4, 4, dtype=torch.bool)
    idx = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(rows * cols // 4)]).view(rows, cols // 4, 2)
    keep.scatter_(2, idx, True)
    w = w * keep.view(rows, cols)
    w[0] = 0  # an all-zero row: its groups keep zeros
    w[1, 0:4] = torch.tensor([0.0, 1.0, 0.0, 0.0])  # a group with a single non-zero
    return w.to(dtype)


@pytest.mark.parametrize("shape", [(7, 13), (5, 8), (3, 1), (9, 37)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_bitmask_round_trip_odd_shapes(shape, dtype):
    w = sparse_matrix(*shape, dtype=dtype)
    c = bitmask_compress(w)
    assert c["bitmask"].shape == (shape[0], (shape[1] + 7) // 8) and c["bitmask"].dtype == torch.uint8
    assert c["compressed"].numel() == int((w != 0).sum()) and c["compressed"].dtype == dtype
    assert c["row_offsets"][0] == 0 and c["shape"].tolist() == list(shape)
    out = bitmask_decompress(c["shape"], c["compressed"], c["bitmask"], c["row_offsets"])
    assert out.dtype == dtype and torch.equal(out, w)


@pytest.mark.parametrize("shape", [(6, 12), (3, 20), (5, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sparse24_round_trip(shape, dtype):
    w = two_four(*shape, dtype=dtype)
    c = sparse24_compress(w)
    assert c["compressed"].shape == (shape[0], shape[1] // 2) and c["shape"].shape == (2, 1)
    assert torch.equal(sparse24_decompress(c["shape"], c["compressed"], c["bitmask"]), w)


def test_sparse24_refuses_non_24():
    w = torch.ones(2, 8)
    with pytest.raises(ValueError, match="not 2:4"):
        sparse24_compress(w)
    with pytest.raises(ValueError, match="divisible by 4"):
        sparse24_compress(torch.zeros(2, 6))


@pytest.mark.parametrize("shape", [(7, 13), (4, 16)])
def test_int8_symmetric_per_channel(shape):
    w = sparse_matrix(*shape)
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (shape[0], 1)
    assert torch.equal(q == 0, (w == 0) | (q == 0)) and (q[w == 0] == 0).all()  # zeros stay zeros
    assert int(q.abs().max()) <= 127 and scale[0, 0] == 1.0  # the all-zero row
    back = dequantize_int8(q, scale)
    assert ((back - w).abs() <= scale / 2 + 1e-7).all()
    # combined with sparse compression: the int8 values survive the bitmask round trip exactly
    c = bitmask_compress(q)
    assert torch.equal(bitmask_decompress(c["shape"], c["compressed"], c["bitmask"], c["row_offsets"]), q)


def test_corrupt_bitmask_data_refused():
    w = sparse_matrix(4, 10)
    c = bitmask_compress(w)
    with pytest.raises(ValueError, match="values for"):
        bitmask_decompress(c["shape"], c["compressed"][:-1], c["bitmask"], c["row_offsets"])
    with pytest.raises(ValueError, match="row_offsets"):
        bitmask_decompress(c["shape"], c["compressed"], c["bitmask"], c["row_offsets"] + 1)


CASES = [("dense", "none", "unstructured"), ("dense", "int8", "unstructured"),
         ("sparse-bitmask", "none", "unstructured"), ("sparse-bitmask", "int8", "unstructured"),
         ("sparse-24-bitmask", "none", "2:4"), ("sparse-24-bitmask", "int8", "2:4"),
         ("sparse-bitmask", "none", "2:4")]


@pytest.mark.parametrize("fmt,quant,pattern", CASES)
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_tiny_model_end_to_end_every_format(tiny_config, tmp_path, fmt, quant, pattern, dtype):
    cfg = tiny_config.with_pattern(SparsityPatternConfig.nm_2_4()) if pattern == "2:4" else tiny_config
    cfg = cfg.with_export(ExportConfig(format=fmt, quantization=quant, dtype=dtype))
    p = Pipeline(cfg, run_dir=tmp_path / "r", progress=False)
    result = p.run()
    assert result.ok, result.failure
    ex = result.metrics["exporting"]
    assert ex["format"] == fmt and ex["tensors_checked"] > 0
    model = p.context.model
    reloaded = load_pretrained(tmp_path / "r" / "export", dtype=torch.float32)
    targets = set(p.context.state.targets)
    torch_dtype = getattr(torch, dtype)
    for name, tensor in model.state_dict().items():
        module = name.rsplit(".", 1)[0]
        want = roundtrip_weight(tensor, quant == "int8", torch_dtype) if module in targets else tensor.to(torch_dtype)
        assert torch.equal(reloaded.state_dict()[name], want.float()), name
    meta = json.loads((tmp_path / "r" / "export" / "podar_export.json").read_text())
    assert meta["format"] == fmt and meta["quantization"] == quant
    config = json.loads((tmp_path / "r" / "export" / "config.json").read_text())
    if fmt != "dense":
        assert config["quantization_config"]["sparsity_config"]["format"] == fmt
    # exact bytes of the pruned layers as written
    values_bytes = 1 if quant == "int8" else torch.tensor([], dtype=torch_dtype).element_size()
    expected = 0
    for name in targets:
        w = model.get_submodule(name).weight
        rows, cols = w.shape
        if fmt == "dense":
            expected += rows * cols * values_bytes
        elif fmt == "sparse-bitmask":
            nnz = int((roundtrip_weight(w, quant == "int8", torch_dtype) != 0).sum())
            expected += nnz * values_bytes + rows * ((cols + 7) // 8) + rows * 8 + 2 * 8
        else:
            expected += rows * cols // 2 * values_bytes + rows * ((cols + 7) // 8) + 2 * 8
        if quant == "int8":
            expected += rows * torch.tensor([], dtype=torch_dtype).element_size()
    assert ex["pruned_layers_bytes"] == expected


def test_plain_transformers_loads_dense_export(tiny_config, tmp_path):
    from transformers import AutoModelForCausalLM

    assert Pipeline(tiny_config, run_dir=tmp_path / "r", progress=False).run().ok
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "r" / "export"))


def test_sparse24_export_needs_24_pattern():
    with pytest.raises(ValidationError, match="needs pattern 2:4"):
        PruningConfig(export=ExportConfig(format="sparse-24-bitmask"))


@pytest.fixture
def exported(tiny_config, tmp_path):
    cfg = tiny_config.with_export(ExportConfig(format="sparse-bitmask", dtype="float16", max_shard_size="40KB"))
    assert Pipeline(cfg, run_dir=tmp_path / "r", progress=False).run().ok
    return tmp_path / "r" / "export"


def test_sharded_with_index(exported):
    shards = sorted(exported.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2
    index = json.loads((exported / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert any(k.endswith(".bitmask") for k in index["weight_map"])
    load_pretrained(exported)


def test_corrupted_file_refused_naming_it(exported):
    shard = sorted(exported.glob("model-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x55
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"'{shard}' does not match its sha256"):
        load_pretrained(exported)


def test_truncated_file_refused_naming_it(exported):
    shard = sorted(exported.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=str(shard)):
        load_pretrained(exported)
    # without the sha256 check, safetensors itself refuses the truncated file, still naming it
    with pytest.raises(CheckpointError, match=f"'{shard}' is corrupt or truncated"):
        load_pretrained(exported, verify=False)


def test_missing_file_refused(exported):
    shard = sorted(exported.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_pretrained(exported)


# ---------------------------------------------------------------- compressed-tensors interoperability

CT_VERSION = "0.14.0"


@pytest.fixture(scope="session")
def compressed_tensors():
    """compressed-tensors 0.14 in a folder of its own (--no-deps: it pins transformers<5, which podar's
    environment does not have; its decompressors do not need it). Skipped only when it cannot be installed."""
    target = Path.home() / ".cache" / "podar" / f"compressed-tensors-{CT_VERSION}"
    if not (target / "compressed_tensors").is_dir():
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
                               str(target), f"compressed-tensors=={CT_VERSION}", "loguru"], capture_output=True)
        if proc.returncode != 0:
            pytest.skip(f"compressed-tensors {CT_VERSION} cannot be installed: {proc.stderr.decode()[-300:]}")
    sys.path.insert(0, str(target))
    try:
        import compressed_tensors
    finally:
        sys.path.remove(str(target))
    assert compressed_tensors.__version__.startswith(CT_VERSION)
    return compressed_tensors


@pytest.mark.parametrize("fmt,pattern", [("sparse-bitmask", "unstructured"), ("sparse-24-bitmask", "2:4")])
def test_compressed_tensors_reads_podar_files(compressed_tensors, tiny_config, tmp_path, fmt, pattern):
    from compressed_tensors.compressors import BitmaskCompressor, Sparse24BitMaskCompressor
    from compressed_tensors.config import SparsityCompressionConfig

    cfg = tiny_config.with_pattern(SparsityPatternConfig.nm_2_4()) if pattern == "2:4" else tiny_config
    cfg = cfg.with_export(ExportConfig(format=fmt, dtype="float16"))
    p = Pipeline(cfg, run_dir=tmp_path / "r", progress=False)
    assert p.run().ok
    export = tmp_path / "r" / "export"
    cls = BitmaskCompressor if fmt == "sparse-bitmask" else Sparse24BitMaskCompressor
    compressor = cls(config=SparsityCompressionConfig.load_from_registry(fmt, sparsity_structure=pattern))
    decompressed = dict(compressor.decompress(str(export)))
    model = p.context.model
    targets = p.context.state.targets
    assert targets
    for name, module in targets.items():
        got = decompressed[f"{name}.weight"]
        assert torch.equal(got, module.weight.detach().half()), name
    # the other tensors pass through unchanged
    assert torch.equal(decompressed["model.norm.weight"], model.model.norm.weight.detach().half())
