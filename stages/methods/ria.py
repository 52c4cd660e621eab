"""RIA, relative importance and activations (Zhang et al. 2024, "Plug-and-Play: An Efficient Post-training Pruning
Method for Large Language Models"): score (|W_ij| / Σ_k |W_kj| + |W_ij| / Σ_k |W_ik|) · (‖x_j‖₂)^a — a weight's
share of its input column's and of its output row's total magnitude, times the activation norm to the power a
(0.5 in the paper). Compared over the whole layer, as the reference does (scope 'auto'); N:M by the top n of each
group of m inputs. The statistics are Wanda's (Σ x_j² per input, in fp32).
"""

from __future__ import annotations

from typing import Any

import torch

from podar.schemas.methods import MethodParams, RIAParams

from .base import LayerStats
from .wanda import Wanda, WandaStats

__all__ = ["RIA", "ria_score"]


def ria_score(weight: torch.Tensor, sq_norm_sum: torch.Tensor, n_samples: int, a: float) -> torch.Tensor:
    """score: (out, in) fp32 = (|W_ij| / Σ_k |W_kj| + |W_ij| / Σ_k |W_ik|) · sqrt(Σ‖x_j‖² / n_samples)^a.

    ``weight``: (out, in); ``sq_norm_sum``: (in,) fp32, Σ over every calibration token of x_j²; ``n_samples``:
    calibration sequences seen. A column or row of zeros scores 0 (not NaN).
    """
    if n_samples < 1:
        raise ValueError("ria_score needs statistics from at least one calibration sample")
    w = weight.detach().float().abs()  # (out, in)
    col = w.sum(dim=0, keepdim=True)  # (1, in) Σ over the outputs each input feeds
    row = w.sum(dim=1, keepdim=True)  # (out, 1) Σ over the inputs of each output
    relative = w / col.clamp_min(torch.finfo(torch.float32).tiny) + w / row.clamp_min(torch.finfo(torch.float32).tiny)
    act = torch.sqrt(sq_norm_sum.float() / n_samples).pow(a)  # (in,)
    return relative * act[None, :]


class RIA(Wanda):
    name = "ria"
    params_type = RIAParams

    def score(self, weight: torch.Tensor, stats: LayerStats | None, prepared: Any, params: MethodParams
              ) -> torch.Tensor:
        assert isinstance(stats, WandaStats) and isinstance(params, RIAParams)
        return ria_score(weight, stats.sq_norm_sum, stats.n_samples, params.a)
