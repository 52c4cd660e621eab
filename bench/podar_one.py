"""One podar run for the benchmark (a subprocess, so its peak memory is its own). Prints one JSON line."""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", required=True)
    ap.add_argument("--pattern", required=True, choices=["unstructured", "2:4"])
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--batch-size", type=int, default=4, help="calibration windows per forward pass")
    ap.add_argument("--seed", type=int, default=common.SEED, help="calibration windows' seed")
    ap.add_argument("--walk", default="auto", choices=["auto", "block", "site"], help="calibration.walk")
    ap.add_argument("--chunked-attention", default="on", choices=["on", "off"],
                    help="runtime.chunked_attention")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="the dtype the dense model is loaded in (its forwards run in it; statistics stay fp32)")
    ap.add_argument("--compute-dtype", default="model", choices=["auto", "model", "float32", "bfloat16"],
                    help="runtime.compute_dtype: the dtype of the calibration forwards (the weights keep the "
                         "model's)")
    ap.add_argument("--export-format", default="dense")
    ap.add_argument("--quantization", default="none")
    ap.add_argument("--time-only", action="store_true",
                    help="stop after pruning: time, stage times and peak memory only (no evaluation, no export)")
    ap.add_argument("--profile", type=Path, default=None,
                    help="profile the pruning with cProfile: write the stats to this file and print the 30 "
                         "functions with the most own time to stderr (times are inflated by the profiler)")
    args = ap.parse_args()
    if args.profile is not None and not args.profile.parent.is_dir():
        ap.error(f"--profile: folder '{args.profile.parent}' does not exist")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from podar import ExportConfig, Pipeline, PruningStage

    common.prepare(args.seed)  # the dense model folder and token windows, on a fresh checkout
    torch.set_num_threads(torch.get_num_threads())
    model = AutoModelForCausalLM.from_pretrained(str(common.MODEL_DIR), dtype=getattr(torch, args.dtype)).eval()
    tok = AutoTokenizer.from_pretrained(str(common.MODEL_DIR))
    cfg = common.podar_config(
        args.method, args.pattern, seed=args.seed, batch_size=args.batch_size, walk=args.walk,
        chunked_attention=args.chunked_attention == "on", compute_dtype=args.compute_dtype,
        export=ExportConfig(format=args.export_format, quantization=args.quantization, dtype="float16",
                            verify_windows=2))
    run_dir = Path(args.run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    profiler = cProfile.Profile() if args.profile else None
    started = time.perf_counter()
    if profiler:
        profiler.enable()
    pipe = Pipeline(cfg, run_dir=run_dir, model=model, tokenizer=tok, progress=False)
    while pipe.stage is not PruningStage.FINE_TUNING and not pipe.stage.is_terminal():
        pipe.step()
    prune_s = time.perf_counter() - started
    if profiler:
        profiler.disable()
        profiler.dump_stats(str(args.profile))
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(30)
    peak_after_prune = common.peak_rss_mb()
    # the same samples and windows as llm-compressor gets
    ctx = pipe.context
    if args.method != "magnitude":
        assert torch.equal(ctx.state.calibration_samples, common.calibration_ids(args.seed))
    stage_s = {}
    for r in pipe.results:
        stage_s[r.stage] = stage_s.get(r.stage, 0.0) + r.duration_s
    if args.time_only:
        print(json.dumps({"tool": "podar", "method": args.method, "pattern": args.pattern, "seed": args.seed,
                          "batch_size": args.batch_size, "walk": args.walk, "dtype": args.dtype,
                          "compute_dtype": args.compute_dtype, "prune_s": prune_s,
                          "stage_s": stage_s, "peak_rss_mb": peak_after_prune}))
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    result = pipe.run()
    assert torch.equal(ctx.state.eval_windows["wikitext2"][0], common.eval_ids())
    ev = result.metrics["evaluating"]
    ex = result.metrics.get("exporting", {})
    print(json.dumps({
        "tool": "podar", "method": args.method, "pattern": args.pattern, "batch_size": args.batch_size,
        "walk": args.walk, "seed": args.seed, "dtype": args.dtype, "compute_dtype": args.compute_dtype,
        "prune_s": prune_s,
        "stage_s": stage_s, "peak_rss_mb": peak_after_prune,
        "ppl": ev["pruned_ppl"], "dense_ppl": ev["dense_ppl"], "sparsity": ev["pruned_layers_sparsity"],
        "ok": result.ok, "kl": ev.get("kl_mean"), "top1": ev.get("top1_agreement"),
        "export": {k: ex.get(k) for k in ("format", "quantization", "dtype", "weight_bytes", "pruned_layers_bytes",
                                          "pruned_layers_dense_fp16_bytes", "pruned_layers_ratio_vs_fp16")},
    }))
    shutil.rmtree(run_dir / "export", ignore_errors=True)


if __name__ == "__main__":
    main()
