"""Task accuracy (issue 32) on SmolLM2-135M: the dense model against magnitude, Wanda and SparseGPT at 50% and 2:4,
on the shipped offline task ``podar_lastword`` (lm-evaluation-harness, zero-shot), through podar's Evaluating.

Per run: the task's accuracy dense and pruned with lm-eval's standard error, the drop in points, the perplexity on
WikiText-2 test (16 × 512 tokens) and the seconds Evaluating took (both models' tasks and perplexity).

    python bench/bench_tasks.py [--limit 500] [--runs magnitude-50 wanda-50 ...] [--out tasks]

Writes bench/results/NAME.json and .md after every run; run folders are removed unless --keep-runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402

RUNS = {  # name → (method, pattern)
    "magnitude-50": ("magnitude", "unstructured"),
    "wanda-50": ("wanda", "unstructured"),
    "sparsegpt-50": ("sparsegpt", "unstructured"),
    "wanda-2:4": ("wanda", "2:4"),
    "sparsegpt-2:4": ("sparsegpt", "2:4"),
}


def config(method: str, pattern: str, *, limit: int | None, windows: int, batch: int):
    from podar import CalibrationConfig, EvaluationConfig, PruningConfig, QualityGates, SparsityPatternConfig

    return PruningConfig(
        method=method, target_sparsity=0.5,
        pattern=SparsityPatternConfig.nm_2_4() if pattern == "2:4" else SparsityPatternConfig.unstructured(),
        calibration=CalibrationConfig(num_samples=64, sequence_length=512),
        evaluation=EvaluationConfig(dataset="wikitext2", sequence_length=512, max_windows=windows,
                                    gates=QualityGates(max_perplexity_increase_pct=None),
                                    tasks={"names": ["podar_lastword"], "limit": limit, "batch_size": batch}),
    )


def run_one(name: str, cfg, work: Path, keep: bool) -> dict:
    from podar import Pipeline

    started = time.perf_counter()
    result = Pipeline(cfg, run_dir=work / name, progress=False).run()
    if not result.ok:
        raise SystemExit(f"{name}: {result.failure}")
    parts = [r for r in result.results if r.stage == "evaluating"]
    (task,) = parts[-1].tasks
    ev = parts[-1].metrics
    row = {"run": name, "wall_s": round(time.perf_counter() - started, 1), "task": task.task,
           "examples": task.examples, "dense_acc": task.dense, "dense_stderr": task.dense_stderr,
           "acc": task.pruned, "stderr": task.pruned_stderr, "drop_points": round(task.drop_points, 2),
           "dense_ppl": ev["dense_ppl"], "ppl": ev["pruned_ppl"],
           "evaluating_s": round(sum(p.duration_s for p in parts), 1),
           "dense_tasks_s": round(parts[0].duration_s, 1)}
    if not keep:
        common.tidy_run(work / name)
    print(json.dumps(row), flush=True)
    return row


def write(rows: list[dict], args: argparse.Namespace) -> None:
    out = {"command": "python bench/bench_tasks.py " + " ".join(sys.argv[1:]),
           "args": vars(args) | {"work": str(args.work)}, "rows": rows}
    (common.RESULTS / f"{args.out}.json").write_text(json.dumps(out, indent=1))
    lines = ["| model | podar_lastword acc ± stderr | drop (points) | WikiText-2 ppl | Evaluating s |",
             "| --- | --- | --- | --- | --- |"]
    if rows:
        d = rows[0]
        lines.append(f"| dense | {d['dense_acc']:.4f} ± {d['dense_stderr']:.4f} | — | {d['dense_ppl']:.2f} | — |")
    for r in rows:
        lines.append(f"| {r['run']} | {r['acc']:.4f} ± {r['stderr']:.4f} | {r['drop_points']:+.2f} | {r['ppl']:.2f} "
                     f"| {r['evaluating_s']} |")
    n = rows[0]["examples"] if rows else 0
    (common.RESULTS / f"{args.out}.md").write_text(
        f"`{out['command']}`\n\nSmolLM2-135M-Instruct, {n} examples of podar_lastword (zero-shot, lm-eval "
        "0.4.13), perplexity on 16 × 512 tokens of WikiText-2 test.\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--limit", type=int, default=500, help="examples of the task (its first N)")
    ap.add_argument("--batch", type=int, default=8, help="lm-eval requests per forward pass")
    ap.add_argument("--windows", type=int, default=16, help="perplexity windows of 512 tokens")
    ap.add_argument("--work", type=Path, default=Path("/tmp/podar-tasks"))
    ap.add_argument("--out", default="tasks")
    ap.add_argument("--keep-runs", action="store_true", help="keep each run folder (default: removed after)")
    args = ap.parse_args()
    rows: list[dict] = []
    for name in args.runs:
        method, pattern = RUNS[name]
        rows.append(run_one(name, config(method, pattern, limit=args.limit, windows=args.windows, batch=args.batch),
                            args.work, args.keep_runs))
        write(rows, args)


if __name__ == "__main__":
    main()
