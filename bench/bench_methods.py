"""podar against llm-compressor on SmolLM2-135M: magnitude, Wanda, SparseGPT at 50% unstructured and 2:4.

Same model folder, same 64 calibration windows of 512 tokens (WikiText-2 validation), same 32 evaluation windows
of 512 tokens (WikiText-2 raw test), perplexity by podar's evaluator for both. Each run is its own process
(peak resident memory, VmHWM, is per process, read right after pruning). llm-compressor runs in its own
virtual environment (.venv-llmc, created here with torch==2.13.0), at its default calibration batch size.
Prints one table; writes bench/results/results.json and results.md.

    make bench                                 # everything
    python bench/bench_methods.py --only podar --cases wanda:unstructured
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ROOT = common.ROOT.parent
LLMC_VENV = ROOT / ".venv-llmc"
# the export each podar case writes (float16), so one bench run also measures every format's size
EXPORTS = {"magnitude:unstructured": ("sparse-bitmask", "none"), "magnitude:2:4": ("sparse-24-bitmask", "int8"),
           "wanda:unstructured": ("sparse-bitmask", "int8"), "wanda:2:4": ("sparse-24-bitmask", "none"),
           "sparsegpt:unstructured": ("dense", "none"), "sparsegpt:2:4": ("sparse-bitmask", "none")}
CASES = ["magnitude:unstructured", "magnitude:2:4", "wanda:unstructured", "wanda:2:4", "sparsegpt:unstructured",
         "sparsegpt:2:4"]


def ensure_llmc_venv() -> Path:
    py = LLMC_VENV / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(LLMC_VENV)], check=True)
    check = subprocess.run([str(py), "-c", "import llmcompressor, datasets"], capture_output=True)
    if check.returncode != 0:
        subprocess.run([str(py), "-m", "pip", "install", "--quiet", "torch==2.13.0", "llmcompressor==0.14.0.1"],
                       check=True)
    return py


def run_json(cmd: list[str]) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def eval_weights(path: Path) -> tuple[float, float]:
    """(perplexity, sparsity of the pruned Linear layers) of the dense model with ``path``'s weights loaded."""
    from podar.stages.perplexity import perplexity

    model, sparsity = common.dense_with_weights(path)
    return perplexity(model, common.eval_ids()).ppl, sparsity


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["podar", "llm-compressor"], default=None)
    ap.add_argument("--cases", nargs="*", default=CASES)
    ap.add_argument("--batch-size", type=int, default=4, help="podar's calibration windows per forward pass")
    ap.add_argument("--walk", default="auto", choices=["auto", "block", "site"],
                    help="podar's calibration walk (calibration.walk)")
    ap.add_argument("--llmc-batch-size", type=int, default=1,
                    help="llm-compressor's calibration batch size (its default, 1, is its fastest and best here)")
    ap.add_argument("--seed", type=int, default=common.SEED,
                    help="calibration windows' seed; other than 0, results go to results-seed<N>.json/.md")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of bench/results/results.json that this invocation does not re-measure")
    args = ap.parse_args()
    common.prepare(args.seed)
    stem = "results" if args.seed == common.SEED else f"results-seed{args.seed}"
    rows = []
    for case in args.cases:
        method, pattern = case.split(":", 1)
        if args.only in (None, "podar"):
            fmt, quant = EXPORTS.get(case, ("dense", "none"))
            r = run_json([sys.executable, str(common.ROOT / "podar_one.py"), "--method", method, "--pattern", pattern,
                          "--run-dir", str(common.CACHE / f"run-{method}-{pattern.replace(':', '')}"),
                          "--export-format", fmt, "--quantization", quant, "--batch-size", str(args.batch_size),
                          "--walk", args.walk, "--seed", str(args.seed)])
            rows.append(r)
            print(json.dumps(r), flush=True)
        if args.only in (None, "llm-compressor") and method != "magnitude":
            py = ensure_llmc_venv()
            out = common.CACHE / f"llmc-{method}-{pattern.replace(':', '')}.safetensors"
            r = run_json([str(py), str(common.ROOT / "llmc_one.py"), "--method", method, "--pattern", pattern,
                          "--model", str(common.MODEL_DIR), "--calibration", str(common.calib_path(args.seed)),
                          "--out", str(out),
                          "--batch-size", str(args.llmc_batch_size)])
            r["ppl"], r["sparsity"] = eval_weights(out)
            r["seed"] = args.seed
            out.unlink()
            rows.append(r)
            print(json.dumps(r), flush=True)
    if args.merge and (common.RESULTS / f"{stem}.json").is_file():
        fresh = {(r["tool"], r["method"], r["pattern"]) for r in rows}
        old = json.loads((common.RESULTS / f"{stem}.json").read_text())
        kept = [r for r in old if (r["tool"], r["method"], r["pattern"]) not in fresh]
        order = {c: i for i, c in enumerate(CASES)}
        rows = sorted(kept + rows, key=lambda r: (order.get(f"{r['method']}:{r['pattern']}", 99), r["tool"] != "podar"))
    table = render(rows) + "\n\n" + render_exports(rows)
    print(table)
    common.RESULTS.mkdir(exist_ok=True)
    (common.RESULTS / f"{stem}.json").write_text(json.dumps(rows, indent=2))
    (common.RESULTS / f"{stem}.md").write_text(table + "\n")


def render_exports(rows: list[dict]) -> str:
    out = ["| run | export format | int8 | pruned layers on disk (MB) | dense float16 (MB) | ratio |",
           "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ex = r.get("export") or {}
        if r["tool"] != "podar" or not ex.get("format"):
            continue
        out.append(f"| {r['method']} {r['pattern']} | {ex['format']} | {ex['quantization']} | "
                   f"{ex['pruned_layers_bytes'] / 1e6:.1f} | {ex['pruned_layers_dense_fp16_bytes'] / 1e6:.1f} | "
                   f"{ex['pruned_layers_ratio_vs_fp16']:.3f}× |")
    return "\n".join(out)


def render(rows: list[dict]) -> str:
    by = {(r["tool"], r["method"], r["pattern"]): r for r in rows}
    header = ["method", "pattern", "podar time (s)", "llm-c time (s)", "time ratio", "podar peak RSS (MB)",
              "llm-c peak RSS (MB)", "podar ppl", "llm-c ppl", "ppl ratio"]
    out = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    seen = []
    for r in rows:
        key = (r["method"], r["pattern"])
        if key in seen:
            continue
        seen.append(key)
        p = by.get(("podar", *key), {})
        c = by.get(("llm-compressor", *key), {})

        def f(d, k, fmt="{:.1f}"):
            return fmt.format(d[k]) if k in d else "—"

        cells = [key[0], key[1], f(p, "prune_s"), f(c, "prune_s"),
                 f"{p['prune_s'] / c['prune_s']:.2f}×" if p and c else "—",
                 f(p, "peak_rss_mb", "{:.0f}"), f(c, "peak_rss_mb", "{:.0f}"), f(p, "ppl", "{:.2f}"),
                 f(c, "ppl", "{:.2f}"), f"{p['ppl'] / c['ppl']:.3f}" if p and c else "—"]
        out.append("| " + " | ".join(cells) + " |")
    dense = next((r["dense_ppl"] for r in rows if "dense_ppl" in r), None)
    if dense:
        out.append(f"\nDense perplexity: {dense:.2f}.")
    return "\n".join(out)


if __name__ == "__main__":
    main()
