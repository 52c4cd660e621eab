"""Importance scores. Pure: tensor in, tensor out. Higher score = more important (kept first)."""

from __future__ import annotations

import torch

__all__ = ["magnitude_score", "wanda_score", "score_stats"]


def magnitude_score(weight: torch.Tensor) -> torch.Tensor:
    """score: (out, in) fp32 = |W|."""
    return weight.detach().float().abs()


def wanda_score(weight: torch.Tensor, sq_norm_sum: torch.Tensor, n_samples: int) -> torch.Tensor:
    """score: (out, in) fp32 = |W_ij| · sqrt(Σ‖x_j‖² / n_samples) (Sun et al. 2023).

    ``sq_norm_sum``: (in,) fp32, the sum over every calibration token of x_j²; ``n_samples``: calibration
    sequences seen (the reference's normaliser; it does not change the per-row ranking).
    """
    if n_samples < 1:
        raise ValueError("wanda_score needs statistics from at least one calibration sample")
    act_norm = torch.sqrt(sq_norm_sum.float() / n_samples)  # (in,)
    return weight.detach().float().abs() * act_norm[None, :]  # (out, in)


def score_stats(score: torch.Tensor) -> dict[str, float]:
    """min, max, mean, std of a score tensor as Python floats (fp64 accumulation)."""
    s = score.detach().double()
    return {
        "score_min": float(s.min()),
        "score_max": float(s.max()),
        "score_mean": float(s.mean()),
        "score_std": float(s.std()) if s.numel() > 1 else 0.0,
    }
