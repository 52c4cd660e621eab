"""A pruning method in one file, as a plugin author writes it: score |W_ij| · (mean |x_j|)^power.

Registered by ``tests/test_methods.py`` with ``podar.register_method(ToyL1())``; a config then names it as
``method: {name: toy-l1, power: 2.0}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field

from podar import LayerStats, MethodParams, PruningMethod


class ToyL1Params(MethodParams):
    name: Literal["toy-l1"] = "toy-l1"
    power: float = Field(default=1.0, gt=0.0, description="exponent of the mean |x_j|, > 0")


@dataclass
class ToyL1Stats(LayerStats):
    """abs_sum: (in,) fp32 = Σ over tokens of |x_j|; n_tokens: tokens seen."""

    abs_sum: torch.Tensor = None  # type: ignore[assignment]
    n_tokens: int = 0


class ToyL1(PruningMethod):
    name = "toy-l1"
    params_type = ToyL1Params

    def new_stats(self, in_features: int, device: torch.device) -> ToyL1Stats:
        return ToyL1Stats(abs_sum=torch.zeros(in_features, dtype=torch.float32, device=device))

    def accumulate(self, stats: LayerStats, x: torch.Tensor) -> None:
        assert isinstance(stats, ToyL1Stats)
        flat = x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, in)
        stats.abs_sum += flat.abs().sum(dim=0)
        stats.n_tokens += flat.shape[0]
        stats.n_samples += x.shape[0] if x.dim() == 3 else 1

    def score(self, weight: torch.Tensor, stats: LayerStats | None, prepared: Any, params: Any) -> torch.Tensor:
        assert isinstance(stats, ToyL1Stats) and isinstance(params, ToyL1Params)
        mean_abs = stats.abs_sum / stats.n_tokens  # (in,)
        return weight.detach().float().abs() * mean_abs.pow(params.power)[None, :]  # (out, in)
