"""Pruning and quantizing SmolLM2-135M (issue 20): SparseGPT 50% (unstructured, or 2:4) exported dense in float16,
then W8A16, W4A16 (prune, then quantize), SparseGPT with joint W4A16 / W8A16 quantization, and the GGUF types.
W4A16 in groups of 64 columns: SmolLM2's width, 576, is not a multiple of 128 (vLLM's kernels need the group to
divide every layer's width).

Each export is read back the way users read it — ``AutoModelForCausalLM.from_pretrained`` (the GGUF through
transformers' GGUF loader) — and its perplexity measured on the bench's WikiText-2 test windows (32 × 512, the
same as bench_methods). Writes bench/results/quant.json and quant.md.

    python bench/bench_quant.py [--cases NAME ...] [--pattern unstructured|2:4]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

# name → (joint quantization, export fields)
CASES = {
    "pruned": (False, {"format": "dense"}),
    "pruned+w8a16": (False, {"format": "dense", "quantization": "w8a16"}),
    "pruned+w4a16": (False, {"format": "dense", "quantization": "w4a16", "group_size": 64}),
    "joint-w8a16": (True, {"format": "dense", "quantization": "w8a16"}),
    "joint-w4a16": (True, {"format": "dense", "quantization": "w4a16", "group_size": 64}),
    "gguf-f16": (False, {"format": "gguf", "gguf_type": "f16"}),
    "gguf-q8_0": (False, {"format": "gguf", "gguf_type": "q8_0"}),
    "gguf-q4_0": (False, {"format": "gguf", "gguf_type": "q4_0"}),
}


def _export_ppl(folder: Path, gguf: bool) -> float:
    from transformers import AutoModelForCausalLM

    from podar import perplexity

    kwargs = {"gguf_file": "model.gguf"} if gguf else {}
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kwargs).eval()
    with torch.no_grad():
        return perplexity(model, common.eval_ids()).ppl


def run_case(name: str, pattern: str, work: Path) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from podar import ExportConfig, Pipeline

    joint, export = CASES[name]
    model = AutoModelForCausalLM.from_pretrained(str(common.MODEL_DIR), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(common.MODEL_DIR))
    cfg = common.podar_config("sparsegpt", pattern, export=ExportConfig(dtype="float16", **export))
    if joint:
        cfg = cfg.with_method({"name": "sparsegpt", "joint_quantization": True})
    run_dir = work / name
    shutil.rmtree(run_dir, ignore_errors=True)
    started = time.perf_counter()
    result = Pipeline(cfg, run_dir=run_dir, model=model, tokenizer=tok, progress=False).run()
    seconds = time.perf_counter() - started
    if not result.ok:
        raise RuntimeError(f"{name}: {result.failure}")
    ex, ev = result.metrics["exporting"], result.metrics["evaluating"]
    out = {"case": name, "pattern": pattern, "run_s": seconds, "dense_ppl": ev["dense_ppl"],
           "in_memory_ppl": ev["pruned_ppl"], "export_ppl": _export_ppl(run_dir / "export", export["format"] == "gguf"),
           **{k: ex.get(k) for k in ("format", "quantization", "weight_bytes", "pruned_layers_bytes",
                                     "pruned_layers_dense_fp16_bytes", "pruned_layers_ratio_vs_fp16",
                                     "logits_max_abs_diff")}}
    shutil.rmtree(run_dir, ignore_errors=True)
    return out


def write_md(rows: list[dict], path: Path) -> None:
    lines = ["| case | pattern | export | pruned layers / dense fp16 | weight file MB | ppl as exported | "
             "ppl in memory |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['pattern']} | {r['format']} {r['quantization']} | "
                     f"{r['pruned_layers_ratio_vs_fp16']:.3f} | {r['weight_bytes'] / 1e6:.1f} | "
                     f"{r['export_ppl']:.3f} | {r['in_memory_ppl']:.3f} |")
    lines.append(f"\ndense ppl {rows[0]['dense_ppl']:.3f}; `python bench/bench_quant.py` "
                 "(ppl as exported: the export read with AutoModelForCausalLM.from_pretrained)")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    ap.add_argument("--pattern", default="unstructured", choices=["unstructured", "2:4"])
    ap.add_argument("--out", default="quant")
    args = ap.parse_args()
    common.prepare()
    work = common.CACHE / "bench_quant"
    rows = []
    common.RESULTS.mkdir(exist_ok=True)
    for name in args.cases:
        rows.append(run_case(name, args.pattern, work))
        print(json.dumps(rows[-1]), flush=True)
        (common.RESULTS / f"{args.out}.json").write_text(json.dumps(rows, indent=2))  # after every case
        write_md(rows, common.RESULTS / f"{args.out}.md")


if __name__ == "__main__":
    main()
