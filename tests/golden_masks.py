"""Masks and pruned weights of every method × pattern × walk on the tiny model, as digests.

``tests/data/golden_masks.json`` holds the digests the code before the redesign of issue 17 produced, one set per
CPU family (``cpu_family``: SparseGPT's near-tie decisions and updates round differently on different CPUs; written
by ``python tests/golden_masks.py --write`` with that code installed, which replaces this CPU's set only);
``tests/test_golden_masks.py`` checks that the current code produces the very same masks, bit for bit, and
weights up to float rounding. The configs are written in the pre-redesign form (``method: wanda``,
``calibration.dampening_frac``), which must keep loading.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

GOLDEN = Path(__file__).resolve().parent / "data" / "golden_masks.json"


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), or '' where it cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")


def cpu_family(name: str | None = None) -> str:
    """The key of this CPU's digest set: 'amd-epyc', 'intel-xeon', or the model name as a slug."""
    name = cpu_name() if name is None else name
    if "AMD EPYC" in name:
        return "amd-epyc"
    if "Intel" in name and "Xeon" in name:
        return "intel-xeon"
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-") or "unknown"


def load_golden() -> dict[str, dict[str, dict[str, str]]]:
    """Digest sets by CPU family."""
    return json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}

_UNSTRUCTURED = {"kind": "unstructured"}
_24 = {"kind": "nm", "n": 2, "m": 4}
_48 = {"kind": "nm", "n": 4, "m": 8}

# name → (config changes over the base config)
CASES: dict[str, dict[str, Any]] = {
    "magnitude-unstructured": {"method": "magnitude"},
    "magnitude-per_row": {"method": "magnitude", "scope": "per_row"},
    "magnitude-global": {"method": "magnitude", "scope": "global"},
    "magnitude-2:4": {"method": "magnitude", "pattern": _24},
    "magnitude-4:8": {"method": "magnitude", "pattern": _48},
    "magnitude-block": {"method": "magnitude", "pattern": {"kind": "block", "block_height": 4, "block_width": 8}},
    "magnitude-row": {"method": "magnitude", "pattern": {"kind": "row"}},
    "magnitude-column": {"method": "magnitude", "pattern": {"kind": "column"}},
    "wanda-block-unstructured": {"method": "wanda", "calibration": {"granularity": "block"}},
    "wanda-block-2:4": {"method": "wanda", "pattern": _24, "calibration": {"granularity": "block"}},
    "wanda-sublayer-unstructured": {"method": "wanda", "calibration": {"granularity": "sublayer"}},
    "wanda-sublayer-2:4": {"method": "wanda", "pattern": _24, "calibration": {"granularity": "sublayer"}},
    "wanda-onepass-unstructured": {"method": "wanda", "calibration": {"sequential": False}},
    "wanda-per_layer": {"method": "wanda", "scope": "per_layer"},
    "wanda-global": {"method": "wanda", "scope": "global"},
    "wanda-column": {"method": "wanda", "pattern": {"kind": "column"}},
    "wanda-two-blocks-per-group": {"method": "wanda", "calibration": {"granularity": "block", "blocks_per_group": 2}},
    "wanda-batch2": {"method": "wanda", "pattern": _24, "calibration": {"batch_size": 2}},
    "wanda-bf16": {"method": "wanda", "pattern": _24, "calibration": {"compute_dtype": "bfloat16"}},
    "sparsegpt-block-unstructured": {"method": "sparsegpt", "calibration": {"granularity": "block"}},
    "sparsegpt-block-2:4": {"method": "sparsegpt", "pattern": _24, "calibration": {"granularity": "block"}},
    "sparsegpt-sublayer-unstructured": {"method": "sparsegpt", "calibration": {"granularity": "sublayer"}},
    "sparsegpt-sublayer-2:4": {"method": "sparsegpt", "pattern": _24, "calibration": {"granularity": "sublayer"}},
    "sparsegpt-sublayer-4:8": {"method": "sparsegpt", "pattern": _48},
    "sparsegpt-onepass-unstructured": {"method": "sparsegpt", "calibration": {"sequential": False}},
    "sparsegpt-blocksize32": {"method": "sparsegpt", "calibration": {"sparsegpt_block_size": 32,
                                                                     "dampening_frac": 0.05}},
    "sparsegpt-bf16": {"method": "sparsegpt", "calibration": {"compute_dtype": "bfloat16"}},
    "magnitude-gradual": {"method": "magnitude", "target_sparsity": 0.6,
                          "schedule": {"kind": "gradual", "start_step": 0, "end_step": 2, "initial_sparsity": 0.2,
                                       "final_sparsity": 0.6, "frequency": 1}},
    "wanda-gradual": {"method": "wanda", "target_sparsity": 0.6,
                      "schedule": {"kind": "gradual", "start_step": 0, "end_step": 2, "initial_sparsity": 0.2,
                                   "final_sparsity": 0.6, "frequency": 1}},
    "sparsegpt-cubic": {"method": "sparsegpt", "target_sparsity": 0.6,
                        "schedule": {"kind": "cubic", "start_step": 0, "end_step": 2, "final_sparsity": 0.6,
                                     "frequency": 1}},
}


def corpus_text() -> str:
    """The tests' corpus (the same seeded text as ``conftest.corpus``)."""
    rng = random.Random(0)
    words = ("the model prunes weights of every layer while the calibration text flows through blocks and "
             "a mask keeps what matters most for the next token in each sentence of this small corpus").split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(8, 20))) + " ." for _ in range(400)]
    return "\n".join(lines)


def case_config(name: str, corpus: Path) -> dict[str, Any]:
    """The config of case ``name`` as a plain mapping (the pre-redesign field names)."""
    changes = CASES[name]
    base: dict[str, Any] = {
        "model": {"kind": "tiny", "tiny": {"num_hidden_layers": 2}},
        "calibration": {"num_samples": 4, "sequence_length": 64, "dataset": str(corpus)},
        "finetune": {"enabled": bool(changes.get("schedule")), "steps": 1, "sequence_length": 32,
                     "dataset": str(corpus)},
        "evaluation": {"enabled": False},
        "export": {"format": "dense", "dtype": "float32", "verify_windows": 0},
    }
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    # the digests' arithmetic: float32 forwards unless a case asks otherwise (the default became 'auto' later)
    base["calibration"].setdefault("compute_dtype", "model")
    from podar import FineTuneConfig

    if "loss" in FineTuneConfig.model_fields:  # code after issue 29: its fine-tuning as the digests' code ran it
        base["finetune"].update(loss="lm", lr_schedule="constant", warmup_fraction=0.0, eval_every=0)
    if "autocast" in FineTuneConfig.model_fields:  # float32 training, as the digests' code ran it (bf16 came later)
        base["finetune"]["autocast"] = "off"
    return base


def digests(run_dir: Path) -> dict[str, str]:
    """sha256 of every mask (bit-packed, by layer name), and float64 moments of the exported pruned weights (sum,
    sum of |w|, sum of w²: float rounding of the weight updates differs between CPUs, so no digest of their
    bytes; the masks are the same on every machine)."""
    import torch
    from safetensors.torch import load_file

    from podar import run_masks
    from podar.stages.bitpack import pack_bits

    masks = run_masks(run_dir)
    mask_digest = hashlib.sha256()
    for name in sorted(masks):
        mask_digest.update(name.encode())
        mask_digest.update(pack_bits(masks[name]).numpy().tobytes())
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted((run_dir / "export").glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    w = torch.cat([tensors[f"{name}.weight"].double().flatten() for name in sorted(masks)])
    return {"masks": mask_digest.hexdigest(), "layers": str(len(masks)), "weights_sum": repr(float(w.sum())),
            "weights_abs": repr(float(w.abs().sum())), "weights_sq": repr(float((w * w).sum()))}


def run_case(name: str, workdir: Path) -> dict[str, str]:
    from podar import Pipeline

    corpus = workdir / "corpus.txt"
    if not corpus.is_file():
        corpus.write_text(corpus_text())
    run_dir = workdir / name.replace(":", "_")
    result = Pipeline(case_config(name, corpus), run_dir=run_dir, progress=False).run()
    if not result.ok:
        raise RuntimeError(f"case {name} ended {result.stage}: {result.failure}")
    return digests(run_dir)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--write", action="store_true", help=f"write this CPU's set of {GOLDEN} from the installed code")
    ap.add_argument("--cases", nargs="*", default=list(CASES))
    args = ap.parse_args()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases:
            out[name] = run_case(name, Path(tmp))
            print(name, out[name], file=sys.stderr)
    if args.write:
        GOLDEN.parent.mkdir(exist_ok=True)
        sets = load_golden()
        sets[cpu_family()] = out
        GOLDEN.write_text(json.dumps(sets, indent=2, sort_keys=True) + "\n")
    else:
        print(json.dumps(out, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
