"""Time of podar's SparseGPT OBS solver on SmolLM2-135M's layer shapes (random weights, a realistic H).

Prints one row per (rows, columns, pattern) solve (the best of REPEATS) and the total per decoder block (the
four sites: q/k/v stacked, o, gate/up stacked, down), averaged over the two patterns.

    python bench/bench_obs.py
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import torch

from podar.stages.sparsegpt import hessian_from_sum, inverse_hessian_factor, sparsegpt_prune

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_of  # noqa: E402

REPEATS = 5
SITES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (stacked rows, inputs) of one SmolLM2 block


def main() -> None:
    torch.manual_seed(0)
    total = 0.0
    print("| rows | inputs | pattern | seconds |\n| --- | --- | --- | --- |")
    for rows, cols in SITES:
        x = torch.randn(4096, cols) * torch.linspace(0.2, 3, cols)  # (tokens, in), uneven input scales
        upper, dead, _frac, _retries = inverse_hessian_factor(hessian_from_sum(x.t() @ x, 8), 0.01)
        w = torch.randn(rows, cols)
        for n, m in [(None, None), (2, 4)]:
            dt = best_of(partial(sparsegpt_prune, w, upper, 0.5, dead=dead, n=n, m=m), REPEATS)
            total += dt
            print(f"| {rows} | {cols} | {'2:4' if n else 'unstructured'} | {dt:.3f} |")
    print(f"\nper block (mean of the two patterns): {total / 2:.3f} s")


if __name__ == "__main__":
    main()
