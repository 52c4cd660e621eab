"""Perplexity by the Wanda/SparseGPT protocol: windows of ``seq_len`` tokens, token NLL averaged, exp."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from podar.schemas.errors import StageError

from .quality import head_splits, next_token_stats, nll_of

__all__ = ["PerplexityResult", "window_nll", "perplexity"]


@dataclass(frozen=True)
class PerplexityResult:
    """ppl = exp(nll_sum / n_tokens); ``n_windows`` windows of ``seq_len`` tokens each."""

    ppl: float
    nll_sum: float
    n_tokens: int
    n_windows: int
    seq_len: int


@torch.no_grad()
def window_nll(model: torch.nn.Module, windows: torch.Tensor, *, batch_size: int = 1,
               device: torch.device | str = "cpu", progress: bool = False, desc: str = "eval",
               text_name: str = "text") -> torch.Tensor:
    """nll: (n_windows,) fp64 — per window, the summed NLL of tokens 1..T-1 given the ones before (fp32 math).

    Raises StageError naming ``text_name`` and the window when a window's NLL is not finite.
    """
    n, _t = windows.shape
    out = torch.empty(n, dtype=torch.float64)
    split = head_splits(model, windows[:1, :8].to(device))
    for start in tqdm(range(0, n, batch_size), desc=desc, disable=None if progress else True, leave=False):
        batch = windows[start:start + batch_size].to(device)  # (B, T)
        sums = nll_of(next_token_stats(model, batch, split=split))  # (B,), the vocabulary a chunk at a time
        bad = (~torch.isfinite(sums)).nonzero()
        if bad.numel():
            w = start + int(bad[0])
            raise StageError(f"evaluation of '{text_name}' produced a non-finite loss in window {w}",
                             stage="Evaluating")
        out[start:start + batch.shape[0]] = sums
    return out


def perplexity(model: torch.nn.Module, windows: torch.Tensor, **kwargs) -> PerplexityResult:
    """Perplexity over every window: exp(Σ NLL / Σ predicted tokens)."""
    nll = window_nll(model, windows, **kwargs)
    n, t = windows.shape
    n_tokens = n * (t - 1)
    total = float(nll.sum())
    return PerplexityResult(ppl=math.exp(total / n_tokens), nll_sum=total, n_tokens=n_tokens, n_windows=n, seq_len=t)
