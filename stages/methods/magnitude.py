"""Magnitude pruning: score |W|, no calibration; masks per layer by default (the comparison group of ``scope``)."""

from __future__ import annotations

from typing import Any

import torch

from podar.schemas.methods import MagnitudeParams, MethodParams

from .base import LayerStats, PruningMethod

__all__ = ["Magnitude", "magnitude_score"]


def magnitude_score(weight: torch.Tensor) -> torch.Tensor:
    """score: (out, in) fp32 = |W|."""
    return weight.detach().float().abs()


class Magnitude(PruningMethod):
    name = "magnitude"
    params_type = MagnitudeParams
    keeps_scores = False  # |W| is recomputed layer by layer in Pruning: every layer's score is never alive at once

    def score(self, weight: torch.Tensor, stats: LayerStats | None, prepared: Any, params: MethodParams
              ) -> torch.Tensor:
        return magnitude_score(weight)
