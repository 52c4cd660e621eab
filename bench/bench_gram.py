"""Time of SparseGPT's Σ x xᵀ update (``add_stats``) on SmolLM2-135M's input widths, one calibration batch
(4 windows of 512 tokens), for the upper triangle by recursive halving at several leaf widths, against the
row bands of 256 it replaced and the full product. Prints one table (best of REPEATS, milliseconds per update).

    python bench/bench_gram.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from podar.stages import sequential

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_of  # noqa: E402

REPEATS = 7
WIDTHS = [576, 1536]  # q/k/v, o and gate/up inputs; down_proj's input
LEAVES = [64, 128, 256]


def _bands(h: torch.Tensor, x: torch.Tensor, rows: int = 256) -> None:
    for r0 in range(0, h.shape[0], rows):
        r1 = min(r0 + rows, h.shape[0])
        h[r0:r1, r0:].addmm_(x[:, r0:r1].t(), x[:, r0:])


def _best_ms(fn) -> float:
    return best_of(fn, REPEATS) * 1e3


def _row(width: int) -> list[float]:
    x = torch.randn(4 * 512, width)  # (tokens, in)
    h = torch.zeros(width, width)
    times = [_best_ms(lambda: h.addmm_(x.t(), x)), _best_ms(lambda: _bands(h, x))]
    saved = sequential._GRAM_LEAF
    try:
        for leaf in LEAVES:
            sequential._GRAM_LEAF = leaf
            times.append(_best_ms(lambda: sequential._add_upper_gram(h, x, 0, width)))
    finally:
        sequential._GRAM_LEAF = saved
    return times


def main() -> None:
    torch.manual_seed(0)
    cols = ["full product", "bands of 256"] + [f"halving, leaf {leaf}" for leaf in LEAVES]
    print("| in | " + " | ".join(cols) + " |\n|" + " --- |" * (len(cols) + 1))
    for width in WIDTHS:
        print(f"| {width} | " + " | ".join(f"{t:.2f}" for t in _row(width)) + " |")
    print(f"\nms per update of one batch; podar uses leaf {sequential._GRAM_LEAF}")


if __name__ == "__main__":
    main()
