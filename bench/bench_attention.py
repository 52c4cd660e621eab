"""Does PyTorch's CPU SDPA skip the masked half of causal attention? Times one SmolLM2-sized call
(4 windows × 9 heads × 512 tokens × 64) with and without ``is_causal``, interleaved, best of 5.

    python bench/bench_attention.py
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F


def main() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(4, 9, 512, 64) for _ in range(3))
    best = {True: float("inf"), False: float("inf")}
    for _ in range(5):
        for causal in (True, False):
            t0 = time.perf_counter()
            for _ in range(5):
                F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            best[causal] = min(best[causal], (time.perf_counter() - t0) / 5)
    print(f"causal {best[True] * 1e3:.1f} ms, full {best[False] * 1e3:.1f} ms, ratio {best[True] / best[False]:.2f}")


if __name__ == "__main__":
    main()
