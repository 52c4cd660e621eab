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

# name → (joint quantization, export fields). The cases without joint quantization export the one pruned model.
CASES = {
    "pruned": (False, {"format": "dense"}),
    "pruned+w8a16": (False, {"format": "dense", "quantization": "w8a16"}),
    "pruned+w4a16": (False, {"format": "dense", "quantization": "w4a16", "group_size": 64}),
    "gguf-f16": (False, {"format": "gguf", "gguf_type": "f16"}),
    "gguf-q8_0": (False, {"format": "gguf", "gguf_type": "q8_0"}),
    "gguf-q4_0": (False, {"format": "gguf", "gguf_type": "q4_0"}),
    "joint-w4a16": (True, {"format": "dense", "quantization": "w4a16", "group_size": 64}),
    "joint-w8a16": (True, {"format": "dense", "quantization": "w8a16"}),
}


def _export_ppl(folder: Path, gguf: bool) -> float:
    from transformers import AutoModelForCausalLM

    from podar import perplexity

    kwargs = {"gguf_file": "model.gguf"} if gguf else {}
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kwargs).eval()
    with torch.no_grad():
        return perplexity(model, common.eval_ids()).ppl


def _prune(pattern: str, joint: bool, export: dict, run_dir: Path):
    """A SparseGPT 50% run to Complete (no evaluation stage: the perplexity is measured on the export)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from podar import EvaluationConfig, ExportConfig, Pipeline

    model = AutoModelForCausalLM.from_pretrained(str(common.MODEL_DIR), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(common.MODEL_DIR))
    cfg = common.podar_config("sparsegpt", pattern, export=ExportConfig(dtype="float16", **export))
    cfg = cfg.model_copy(update={"evaluation": EvaluationConfig(enabled=False)})
    if joint:
        cfg = cfg.with_method({"name": "sparsegpt", "joint_quantization": True})
    shutil.rmtree(run_dir, ignore_errors=True)
    started = time.perf_counter()
    pipe = Pipeline(type(cfg).model_validate(cfg.model_dump()), run_dir=run_dir, model=model, tokenizer=tok,
                    progress=False)
    result = pipe.run()
    if not result.ok:
        raise RuntimeError(f"{run_dir.name}: {result.failure}")
    return pipe, result, time.perf_counter() - started


def _write(pipe, export: dict, folder: Path) -> dict:
    """The pruned model of ``pipe`` written as ``export`` (the export stage's own writers and check)."""
    from podar import ExportConfig
    from podar.stages.export import _write as write_export
    from podar.stages.export import verify_export

    ctx = pipe.context
    cfg = ctx.config.model_copy(update={"export": ExportConfig(dtype="float16", **export)})
    ctx.config = cfg
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    sizes = write_export(ctx, folder, torch.float16)
    sizes.update(verify_export(ctx, folder, torch.float16))  # every tensor as the export stage checks it
    sizes["weight_bytes"] = sum(f.stat().st_size for f in folder.iterdir() if f.suffix in (".safetensors", ".gguf"))
    return sizes


def run_cases(names: list[str], pattern: str, work: Path):
    """One row per case: the pruned model's exports, then the joint runs."""
    plain = [n for n in names if not CASES[n][0]]
    if plain:
        pipe, _result, seconds = _prune(pattern, False, {"format": "dense"}, work / "pruned")
        for name in plain:
            export = CASES[name][1]
            sizes = _write(pipe, export, work / name)
            yield {"case": name, "pattern": pattern, "run_s": seconds, "format": export["format"],
                   "quantization": export.get("quantization") or export.get("gguf_type", "none"), **sizes,
                   "export_ppl": _export_ppl(work / name, export["format"] == "gguf")}
            shutil.rmtree(work / name, ignore_errors=True)
        del pipe
    for name in (n for n in names if CASES[n][0]):
        export = CASES[name][1]
        _pipe, result, seconds = _prune(pattern, True, export, work / name)
        ex = result.metrics["exporting"]
        yield {"case": name, "pattern": pattern, "run_s": seconds, "format": export["format"],
               "quantization": export["quantization"],
               **{k: ex.get(k) for k in ("weight_bytes", "pruned_layers_bytes", "pruned_layers_dense_fp16_bytes",
                                         "pruned_layers_ratio_vs_fp16", "tensors_checked")},
               "export_ppl": _export_ppl(work / name / "export", False)}
        shutil.rmtree(work / name, ignore_errors=True)


def write_md(rows: list[dict], path: Path) -> None:
    lines = ["| case | pattern | export | pruned layers / dense fp16 | weight file MB | ppl as exported |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['pattern']} | {r['format']} {r['quantization']} | "
                     f"{r['pruned_layers_ratio_vs_fp16']:.3f} | {r['weight_bytes'] / 1e6:.1f} | "
                     f"{r['export_ppl']:.3f} |")
    lines.append("\n`python bench/bench_quant.py`; ppl as exported: the export read with "
                 "AutoModelForCausalLM.from_pretrained (GGUF: its GGUF loader), 32 windows of 512 tokens of "
                 "WikiText-2 test")
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
    for row in run_cases(args.cases, args.pattern, work):
        rows.append(row)
        print(json.dumps(rows[-1]), flush=True)
        (common.RESULTS / f"{args.out}.json").write_text(json.dumps(rows, indent=2))  # after every case
        write_md(rows, common.RESULTS / f"{args.out}.md")


if __name__ == "__main__":
    main()
