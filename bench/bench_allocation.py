"""OWL's outlier-weighted layerwise sparsity and the least-squares refit of the kept weights (issue 31) against
the uniform allocation, on SmolLM2-135M.

Each run is a subprocess (its peak memory its own): the bench's calibration windows of a seed (64 × 512 tokens of
WikiText-2 validation, those llm-compressor gets in bench_methods.py), the method at the sparsity, then perplexity
on WikiText-2 test and on a text of another domain (``bench/other_text.py``), 32 windows of 512 tokens each.
Settings are run interleaved: uniform then OWL for each (method, sparsity, seed), so their times compare.

    python bench/bench_allocation.py [--methods wanda sparsegpt magnitude] [--sparsities 0.6 0.7]
                                     [--seeds 0 1 2] [--owl-m 5] [--owl-lambda 0.08]
                                     [--allocations uniform owl uniform+dsnot uniform+refit owl+dsnot+refit
                                     uniform+perm uniform+perm+refit llm-compressor ...] [--out allocation]

Writes bench/results/NAME.json and .md after every run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402

OTHER = HERE / "data" / "stdlib-docstrings.txt"


def evaluation():
    from podar import EvaluationConfig, QualityGates

    return EvaluationConfig(dataset="wikitext2", extra_datasets=(str(OTHER),), sequence_length=common.SEQ_LEN,
                            max_windows=common.EVAL_WINDOWS, gates=QualityGates(max_perplexity_increase_pct=None))


def one_llmc(args: argparse.Namespace) -> None:
    """llm-compressor (its own environment, bench/llmc_one.py) on the same calibration windows; its pruned weights
    evaluated by podar's Evaluating on the same windows as podar's runs (a run that prunes nothing more)."""
    from bench_methods import ensure_llmc_venv, run_json
    from transformers import AutoTokenizer

    from podar import Pipeline

    out = Path(args.run_dir).parent / "llmc.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [str(ensure_llmc_venv()), str(HERE / "llmc_one.py"), "--method", args.method, "--pattern", args.pattern,
           "--sparsity", str(args.sparsity), "--model", str(common.MODEL_DIR), "--calibration",
           str(common.calib_path(args.seed)), "--out", str(out), "--batch-size", "1"]
    llmc = run_json(cmd)
    model, sparsity = common.dense_with_weights(out)
    out.unlink()
    dense = common.podar_config("magnitude", "unstructured", seed=args.seed)
    cfg = dense.with_overrides({"target_sparsity": 0.0}).with_evaluation(evaluation())
    result = Pipeline(cfg, Path(args.run_dir), model=model, tokenizer=AutoTokenizer.from_pretrained(
        str(common.MODEL_DIR)), progress=False).run()
    if not result.ok:
        raise SystemExit(f"evaluation failed: {result.failure}")
    ev = result.metrics["evaluating"]
    print(json.dumps({
        "method": args.method, "sparsity": args.sparsity if args.pattern == "unstructured" else args.pattern,
        "seed": args.seed, "allocation": "llm-compressor", "prune_s": round(llmc["prune_s"], 1),
        "peak_rss_mb": round(llmc["peak_rss_mb"]), "stage_s": {},
        "ppl_wikitext2": ev["pruned_ppl"], "dense_ppl_wikitext2": None, "ppl_other": ev[f"{OTHER}.pruned_ppl"],
        "dense_ppl_other": None, "achieved_sparsity": sparsity, "block_sparsity": None}))
    common.tidy_run(Path(args.run_dir))


def one(args: argparse.Namespace) -> None:
    """One run in this process; prints one JSON line."""
    import torch

    from podar import Pipeline, PruningStage

    common.prepare(args.seed)
    if args.allocation == "llm-compressor":
        one_llmc(args)
        return
    cfg = common.podar_config(args.method, args.pattern, seed=args.seed, walk=args.walk)
    kind, extras = args.allocation.split("+")[0], args.allocation.split("+")[1:]
    refit, dsnot, perm = "refit" in extras, "dsnot" in extras, "perm" in extras
    overrides = {"allocation.kind": kind, "reconstruction.enabled": refit, "dsnot.enabled": dsnot,
                 "reconstruction.dampening_frac": args.refit_dampening, "permutation.enabled": perm}
    if args.pattern == "unstructured":
        overrides["target_sparsity"] = args.sparsity
    if kind == "owl":
        overrides.update({"allocation.owl_m": args.owl_m, "allocation.owl_lambda": args.owl_lambda})
    cfg = cfg.with_overrides(overrides).with_evaluation(evaluation())
    run_dir = Path(args.run_dir)
    started = time.perf_counter()
    pipe = Pipeline(cfg, run_dir=run_dir, progress=False)
    while pipe.stage is not PruningStage.FINE_TUNING and not pipe.stage.is_terminal():
        pipe.step()
    prune_s = time.perf_counter() - started
    peak = common.peak_rss_mb()
    if args.method != "magnitude" or kind == "owl" or extras:
        assert torch.equal(pipe.context.state.calibration_samples, common.calibration_ids(args.seed))
    result = pipe.run()
    if not result.ok:
        raise SystemExit(f"run failed: {result.failure}")
    ev = result.metrics["evaluating"]
    stage_s: dict[str, float] = {}
    for r in result.results:
        stage_s[r.stage] = round(stage_s.get(r.stage, 0.0) + r.duration_s, 1)
    alloc = pipe.context.state.allocation
    print(json.dumps({
        "method": args.method, "sparsity": args.sparsity if args.pattern == "unstructured" else args.pattern,
        "seed": args.seed,
        "allocation": ("uniform" if kind == "uniform" else f"owl M={args.owl_m:g} λ={args.owl_lambda:g}")
        + (" + permutation" if perm else "") + (" + DSnoT" if dsnot else "") + (" + refit" if refit else "")
        + (f" (λ={args.refit_dampening:g})" if refit and args.refit_dampening != 0.01 else "")
        + (f" ({args.walk} walk)" if args.walk != "auto" else ""),
        "prune_s": round(prune_s, 1), "peak_rss_mb": round(peak), "stage_s": stage_s,
        "ppl_wikitext2": ev["pruned_ppl"], "dense_ppl_wikitext2": ev["dense_ppl"],
        "ppl_other": ev[f"{OTHER}.pruned_ppl"], "dense_ppl_other": ev[f"{OTHER}.dense_ppl"],
        "achieved_sparsity": ev["pruned_layers_sparsity"],
        "block_sparsity": None if alloc is None else [round(s, 4) for s in alloc.block_sparsity],
    }))
    common.tidy_run(run_dir)


def table(rows: list[dict]) -> str:
    lines = ["| method | sparsity | allocation | seeds | WikiText-2 ppl (mean) | other-domain ppl (mean) | "
             "WikiText-2 vs uniform | other vs uniform | prune time (s) | time vs uniform | peak RSS (MB) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["sparsity"], r["allocation"]), []).append(r)
    for (method, sparsity, allocation), rs in groups.items():
        base = groups.get((method, sparsity, "uniform"), [])
        seeds = sorted(r["seed"] for r in rs)
        wt = statistics.mean(r["ppl_wikitext2"] for r in rs)
        ot = statistics.mean(r["ppl_other"] for r in rs)
        t = statistics.mean(r["prune_s"] for r in rs)
        peak = max(r["peak_rss_mb"] for r in rs)
        rel = ["—", "—", "—"]
        same = [b for b in base if b["seed"] in seeds]
        if allocation != "uniform" and sorted(b["seed"] for b in same) != seeds:
            same = []  # compared only over the same draws
        shared = any(r.get("shared_cpu") for r in rs + same)  # run beside other work: its seconds are no figure
        if allocation != "uniform" and same:
            rel = [f"{wt / statistics.mean(b['ppl_wikitext2'] for b in same):.3f}×",
                   f"{ot / statistics.mean(b['ppl_other'] for b in same):.3f}×",
                   "—" if shared else f"{t / statistics.mean(b['prune_s'] for b in same):.2f}×"]
        seconds = "— (shared CPU)" if shared else f"{t:.1f}"
        lines.append(f"| {method} | {sparsity} | {allocation} | {','.join(map(str, seeds))} | {wt:.2f} | {ot:.2f} | "
                     f"{rel[0]} | {rel[1]} | {seconds} | {rel[2]} | {peak} |")
    if rows:
        dense = next(r for r in rows if r["dense_ppl_wikitext2"] is not None)
        lines.append(f"\nDense perplexity: WikiText-2 {dense['dense_ppl_wikitext2']:.2f}, other domain "
                     f"{dense['dense_ppl_other']:.2f}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", default="wanda")
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--pattern", default="unstructured", choices=["unstructured", "2:4"],
                    help="2:4: the sparsity is the pattern's, allocation uniform only")
    ap.add_argument("--allocation", default="uniform")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run-dir", default="/tmp/podar-bench-allocation/run")
    ap.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt", "magnitude"])
    ap.add_argument("--sparsities", nargs="+", default=["0.6", "0.7"], help="fractions, or 2:4")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--owl-m", type=float, default=5.0)
    ap.add_argument("--owl-lambda", type=float, default=0.08)
    ap.add_argument("--allocations", nargs="+", default=["uniform", "owl"],
                    choices=[f"{a}{p}{x}" for a in ("uniform", "owl") for p in ("", "+perm")
                             for x in ("", "+dsnot", "+refit", "+dsnot+refit")] + ["llm-compressor"],
                    help="+dsnot: with dsnot.enabled; +refit: with reconstruction.enabled (the least-squares refit of "
                         "the kept weights); +perm: permutation.enabled (2:4); llm-compressor: its plain method on "
                         "the same windows")
    ap.add_argument("--refit-dampening", type=float, default=0.01, help="reconstruction.dampening_frac")
    ap.add_argument("--walk", default="auto", choices=["auto", "block", "site"], help="calibration.walk")
    ap.add_argument("--out", default="allocation")
    ap.add_argument("--append", action="store_true", help="add to the rows already in bench/results/OUT.json")
    args = ap.parse_args()
    if args.one:
        one(args)
        return
    out_json, out_md = common.RESULTS / f"{args.out}.json", common.RESULTS / f"{args.out}.md"
    rows: list[dict] = json.loads(out_json.read_text())["rows"] if args.append and out_json.is_file() else []
    for method in args.methods:
        for sparsity in args.sparsities:
            for seed in args.seeds if method != "magnitude" else args.seeds[:1]:
                for allocation in args.allocations:
                    pattern = "2:4" if sparsity == "2:4" else "unstructured"
                    if (pattern == "2:4" and allocation.startswith("owl")) or (
                            pattern != "2:4" and "perm" in allocation) or (
                            allocation == "llm-compressor" and method not in ("wanda", "sparsegpt")):
                        continue  # OWL shares an unstructured sparsity only
                    cmd = [sys.executable, __file__, "--one", "--method", method, "--pattern", pattern,
                           "--sparsity", "0.5" if pattern == "2:4" else str(sparsity),
                           "--allocation", allocation, "--seed", str(seed), "--owl-m", str(args.owl_m),
                           "--owl-lambda", str(args.owl_lambda), "--run-dir", args.run_dir, "--walk", args.walk,
                           "--refit-dampening", str(args.refit_dampening)]
                    proc = subprocess.run(cmd, capture_output=True, text=True)
                    if proc.returncode != 0:
                        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
                    row = json.loads(proc.stdout.strip().splitlines()[-1])
                    print(json.dumps(row), flush=True)
                    rows.append(row)
                    out_json.write_text(json.dumps({"rows": rows}, indent=1))
                    out_md.write_text("# Sparsity allocation (OWL vs uniform) and the refit\n\n"
                                      "`python bench/bench_allocation.py "
                                      "[--methods ...] [--sparsities ...] [--seeds ...] [--owl-m M] [--owl-lambda λ] "
                                      f"[--allocations ...] --append --out {args.out}`\n\n" + table(rows))


if __name__ == "__main__":
    main()
