"""Wanda (Sun et al. 2023): score |W_ij| · ‖x_j‖₂, compared within each output row; N:M by the top n of each
group of m inputs. All of Wanda's math is here; masks from scores are ``stages.masks``.

Statistics, per layer: Σ over every calibration token of x_j², in fp32 whatever the dtype of the forwards, and
the number of calibration sequences (the reference's normaliser; it does not change the per-row ranking).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from podar.schemas.methods import MethodParams, WandaParams

from .base import LayerStats, PruningMethod

__all__ = ["Wanda", "WandaStats", "wanda_score"]


@dataclass
class WandaStats(LayerStats):
    """sq_norm_sum: (in,) fp32 = Σ over tokens of x_j²; n_samples: sequences seen."""

    sq_norm_sum: torch.Tensor = None  # type: ignore[assignment]


def wanda_score(weight: torch.Tensor, sq_norm_sum: torch.Tensor, n_samples: int) -> torch.Tensor:
    """score: (out, in) fp32 = |W_ij| · sqrt(Σ‖x_j‖² / n_samples).

    ``sq_norm_sum``: (in,) fp32, the sum over every calibration token of x_j²; ``n_samples``: calibration
    sequences seen.
    """
    if n_samples < 1:
        raise ValueError("wanda_score needs statistics from at least one calibration sample")
    act_norm = torch.sqrt(sq_norm_sum.float() / n_samples)  # (in,)
    return weight.detach().float().abs() * act_norm[None, :]  # (out, in)


class Wanda(PruningMethod):
    name = "wanda"
    params_type = WandaParams

    def new_stats(self, in_features: int, device: torch.device) -> WandaStats:
        return WandaStats(sq_norm_sum=torch.zeros(in_features, dtype=torch.float32, device=device))

    def accumulate(self, stats: LayerStats, x: torch.Tensor) -> None:
        assert isinstance(stats, WandaStats)
        flat = x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, in)
        stats.sq_norm_sum += flat.pow(2).sum(dim=0)
        stats.n_samples += x.shape[0] if x.dim() == 3 else 1

    def score(self, weight: torch.Tensor, stats: LayerStats | None, prepared: Any, params: MethodParams
              ) -> torch.Tensor:
        assert isinstance(stats, WandaStats)
        return wanda_score(weight, stats.sq_norm_sum, stats.n_samples)
