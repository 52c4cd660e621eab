"""Pruning time and peak memory of podar and llm-compressor measured in interleaved pairs.

This machine's speed drifts by 10–20% over minutes, so one run of each tool can put a ratio on either side of a
target. Here each pair runs podar, then llm-compressor, on the same case (the bench's model and calibration
windows, no evaluation), ``--pairs`` times; the table gives every pair's time ratio and their median, and
each tool's median time and largest peak resident memory. Writes bench/results/timing.json and .md
(``--out NAME``: bench/results/NAME.json and .md).

    python bench/bench_time.py --cases sparsegpt:unstructured sparsegpt:2:4 --pairs 3
    python bench/bench_time.py --cases wanda:unstructured wanda:2:4 --pairs 3 --out timing-wanda
    python bench/bench_time.py --cases wanda:unstructured wanda:2:4 --dtype bfloat16 --out timing-wanda-bf16
    python bench/bench_time.py --cases wanda:unstructured wanda:2:4 --podar-compute-dtype bfloat16 \
        --out timing-wanda-compute-bf16

``--dtype bfloat16`` loads the same dense model in bfloat16 for both tools (their forwards run in it).
``--podar-compute-dtype bfloat16`` keeps both tools' model in ``--dtype`` and sets podar's
``runtime.compute_dtype`` (its calibration forwards in bf16, its weights in the model's dtype); llm-compressor
has no such setting and computes in the model's dtype.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from bench_methods import ensure_llmc_venv, run_json  # noqa: E402

CASES = ["wanda:unstructured", "wanda:2:4", "sparsegpt:unstructured", "sparsegpt:2:4"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", nargs="*", default=CASES)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="the dtype both tools load the dense model in")
    ap.add_argument("--podar-compute-dtype", default="model", choices=["auto", "model", "float32", "bfloat16"],
                    help="podar's runtime.compute_dtype (llm-compressor computes in --dtype)")
    ap.add_argument("--out", default="timing", help="file name (no suffix) of the .json and .md in bench/results/")
    args = ap.parse_args()
    if not args.out or Path(args.out).name != args.out or args.out.startswith("."):
        ap.error(f"--out must be a plain file name without a folder, got {args.out!r}")
    if args.pairs < 1:
        ap.error(f"--pairs must be at least 1, got {args.pairs}")
    bad = [c for c in args.cases if c not in CASES]
    if bad:
        ap.error(f"--cases: unknown {bad}; choose from {CASES}")
    common.prepare()
    py = ensure_llmc_venv()
    rows = []
    for case in args.cases:
        method, pattern = case.split(":", 1)
        runs: list[tuple[dict, dict]] = []
        for i in range(args.pairs):
            p = run_json([sys.executable, str(common.ROOT / "podar_one.py"), "--method", method, "--pattern",
                          pattern, "--run-dir", str(common.CACHE / f"time-{method}-{pattern.replace(':', '')}"),
                          "--time-only", "--dtype", args.dtype, "--compute-dtype", args.podar_compute_dtype])
            out = common.CACHE / f"time-llmc-{method}-{pattern.replace(':', '')}.safetensors"
            c = run_json([str(py), str(common.ROOT / "llmc_one.py"), "--method", method, "--pattern", pattern,
                          "--model", str(common.MODEL_DIR), "--calibration", str(common.calib_path()),
                          "--out", str(out), "--batch-size", "1", "--dtype", args.dtype])
            out.unlink(missing_ok=True)
            runs.append((p, c))
            print(json.dumps({"case": case, "pair": i, "podar_s": p["prune_s"], "llmc_s": c["prune_s"],
                              "podar_mb": p["peak_rss_mb"], "llmc_mb": c["peak_rss_mb"]}), flush=True)
        rows.append({"method": method, "pattern": pattern, "dtype": args.dtype,
                     "podar_compute_dtype": args.podar_compute_dtype,
                     "podar_s": [p["prune_s"] for p, _ in runs], "llmc_s": [c["prune_s"] for _, c in runs],
                     "podar_mb": [p["peak_rss_mb"] for p, _ in runs], "llmc_mb": [c["peak_rss_mb"] for _, c in runs]})
    table = render(rows)
    print(table)
    common.RESULTS.mkdir(exist_ok=True)
    (common.RESULTS / f"{args.out}.json").write_text(json.dumps(rows, indent=2))
    (common.RESULTS / f"{args.out}.md").write_text(table + "\n")


def render(rows: list[dict]) -> str:
    out = ["| method | pattern | dtype | podar compute dtype | podar time, each pair (s) | llm-c time, each pair (s) | "
           "time ratio, each pair | median ratio | podar median / llm-c median (s) | "
           "largest peak RSS podar / llm-c (MB) |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ratios = [p / c for p, c in zip(r["podar_s"], r["llmc_s"], strict=True)]
        out.append(
            f"| {r['method']} | {r['pattern']} | {r.get('dtype', 'float32')} | "
            f"{r.get('podar_compute_dtype', 'model')} | "
            f"{', '.join(f'{t:.1f}' for t in r['podar_s'])} | "
            f"{', '.join(f'{t:.1f}' for t in r['llmc_s'])} | {', '.join(f'{x:.2f}×' for x in ratios)} | "
            f"**{statistics.median(ratios):.2f}×** | {statistics.median(r['podar_s']):.1f} / "
            f"{statistics.median(r['llmc_s']):.1f} | {max(r['podar_mb']):.0f} / {max(r['llmc_mb']):.0f} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
