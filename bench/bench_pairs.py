"""Two podar versions side by side, in interleaved pairs: time to the end of pruning and peak memory.

Each command is a ``bench/podar_one.py`` invocation prefix (its interpreter and script), e.g. the code before a
change in a worktree with its own environment against the current checkout:

    git worktree add /tmp/base <rev> && (cd /tmp/base && make install)
    python bench/bench_pairs.py --a "/tmp/base/.venv/bin/python /tmp/base/bench/podar_one.py" \\
        --b ".venv/bin/python bench/podar_one.py" --cases wanda:unstructured wanda:2:4 --pairs 2 --out NAME

Runs ``A``, then ``B``, on the same case, ``--pairs`` times, each with ``--time-only`` (no evaluation), so each
ratio compares two runs made minutes apart on this noisy machine. Writes bench/results/NAME.json and .md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def run_one(prefix: str, method: str, pattern: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [*shlex.split(prefix), "--method", method, "--pattern", pattern, "--time-only", "--run-dir",
               f"{tmp}/run"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('{"tool"')]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def with_setup(run: dict) -> dict[str, float]:
    """Seconds per stage of one run, with ``setup`` (loading, hashing, the dense reference: what the time to the
    end of pruning holds besides the stages)."""
    stages = dict(run.get("stage_s", {}))
    return {"setup": run["prune_s"] - sum(stages.values()), **stages}


def stage_table(rows: list[dict]) -> list[str]:
    """Median seconds per stage, A and B, per case."""
    lines = ["", "Median seconds per stage (setup: the time before the first stage):", "",
             "| method | pattern | stage | A | B | B − A |", "| --- | --- | --- | --- | --- | --- |"]
    for method, pattern in dict.fromkeys((r["method"], r["pattern"]) for r in rows):
        rs = [r for r in rows if r["method"] == method and r["pattern"] == pattern]
        for stage in dict.fromkeys(k for r in rs for k in (*r["a_stage_s"], *r["b_stage_s"])):
            a = statistics.median(r["a_stage_s"].get(stage, 0.0) for r in rs)
            b = statistics.median(r["b_stage_s"].get(stage, 0.0) for r in rs)
            lines.append(f"| {method} | {pattern} | {stage} | {a:.2f} | {b:.2f} | {b - a:+.2f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, help="the first version's podar_one.py command prefix")
    ap.add_argument("--b", required=True, help="the second version's podar_one.py command prefix")
    ap.add_argument("--cases", nargs="+", default=["wanda:unstructured", "wanda:2:4", "sparsegpt:unstructured",
                                                   "sparsegpt:2:4"])
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--out", required=True, help="results file name (bench/results/NAME.json and .md)")
    args = ap.parse_args()
    rows = []
    for case in args.cases:
        method, pattern = case.split(":", 1)
        for i in range(args.pairs):
            a, b = run_one(args.a, method, pattern), run_one(args.b, method, pattern)
            rows.append({"method": method, "pattern": pattern, "pair": i, "a_s": a["prune_s"], "b_s": b["prune_s"],
                         "a_peak_mb": a["peak_rss_mb"], "b_peak_mb": b["peak_rss_mb"],
                         "a_stage_s": with_setup(a), "b_stage_s": with_setup(b)})
            print(json.dumps(rows[-1]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"a": args.a, "b": args.b, "rows": rows}, indent=2))
    lines = [f"A: `{args.a}`", "", f"B: `{args.b}`", "",
             "| method | pattern | A time, each pair | B time, each pair | B/A, each pair | median B/A | "
             "peak A / B, each pair |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for case in args.cases:
        method, pattern = case.split(":", 1)
        rs = [r for r in rows if r["method"] == method and r["pattern"] == pattern]
        ratios = [r["b_s"] / r["a_s"] for r in rs]
        a_times = ", ".join(f"{r['a_s']:.1f} s" for r in rs)
        b_times = ", ".join(f"{r['b_s']:.1f} s" for r in rs)
        peaks = ", ".join(f"{r['a_peak_mb']:.0f} / {r['b_peak_mb']:.0f} MB" for r in rs)
        each = ", ".join(f"{x:.3f}" for x in ratios)
        lines.append(f"| {method} | {pattern} | {a_times} | {b_times} | {each} | {statistics.median(ratios):.3f} | "
                     f"{peaks} |")
    lines += stage_table(rows)
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
