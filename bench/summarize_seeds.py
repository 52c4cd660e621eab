"""Perplexity of podar and llm-compressor over several calibration draws: one row per case and seed, then the
mean ratio. Reads bench/results/results.json (seed 0) and bench/results/results-seed<N>.json
(``bench_methods.py --seed N``).

A single draw of 64 windows is a noisy measure at 2:4: float rounding alone (e.g. batching the calibration
forwards by 4 instead of 1) changes which of two near-equal weights a 2:4 group keeps, the changes compound
block after block, and the perplexity moves by a few percent. The mean over draws is what compares the tools.

    python bench/summarize_seeds.py
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def load() -> dict[tuple[str, str, int], dict[str, dict]]:
    """{(method, pattern, seed): {tool: row}}"""
    out: dict[tuple[str, str, int], dict[str, dict]] = {}
    for path in sorted((ROOT / "results").glob("results*.json")):
        m = re.fullmatch(r"results(?:-seed(\d+))?\.json", path.name)
        if not m:
            continue
        seed = int(m.group(1) or 0)
        for r in json.loads(path.read_text()):
            out.setdefault((r["method"], r["pattern"], int(r.get("seed", seed))), {})[r["tool"]] = r
    return out


def main() -> None:
    rows = load()
    print("| method | pattern | seed | podar ppl | llm-c ppl | ratio |\n| --- | --- | --- | --- | --- | --- |")
    ratios: dict[tuple[str, str], list[float]] = {}
    for (method, pattern, seed), tools in sorted(rows.items()):
        p, c = tools.get("podar"), tools.get("llm-compressor")
        if not (p and c):
            continue
        ratio = p["ppl"] / c["ppl"]
        ratios.setdefault((method, pattern), []).append(ratio)
        print(f"| {method} | {pattern} | {seed} | {p['ppl']:.2f} | {c['ppl']:.2f} | {ratio:.3f} |")
    print("\n| method | pattern | seeds | mean ratio | min | max |\n| --- | --- | --- | --- | --- | --- |")
    for (method, pattern), rs in ratios.items():
        print(f"| {method} | {pattern} | {len(rs)} | {sum(rs) / len(rs):.3f} | {min(rs):.3f} | {max(rs):.3f} |")


if __name__ == "__main__":
    main()
