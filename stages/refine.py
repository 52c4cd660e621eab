"""Refinement after a method's masks, for every method: DSnoT's mask swaps (``stages.dsnot``) and the
least-squares refit of the kept weights (``stages.reconstruction``), in that order, layer group by layer group.

``Refined`` wraps the configured method: its statistics, scores and masks are the method's; the statistics the
refinements need are collected next to the method's in the same calibration pass — Σ x_j and Σ x_j² per input
(DSnoT; added batch by batch like Wanda's) and Σ x xᵀ (the refit; SparseGPT's own is reused) — and the
refinements run after the method's ``prune``. The mask counts the method set (per row or per layer, N:M groups)
are kept, so Pruning's exact-count verification holds as for the method alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from podar.schemas.config import DSnoTConfig
from podar.schemas.methods import MethodParams

from .dsnot import dsnot_refine
from .methods.base import LayerStats, Pruned, PruneSpec, PruningMethod
from .methods.sparsegpt import add_upper_gram, gram_errors, mirror_upper
from .permutation import unpermute_columns
from .reconstruction import refit_kept

__all__ = ["Refined", "RefinedStats"]


@dataclass
class RefinedStats(LayerStats):
    """The method's own statistics (``inner``; None for a method without any), and what the refinements add:
    x_sum, x_sq_sum (in,) fp32 Σ x_j, Σ x_j² over tokens and ``tokens`` (DSnoT); gram_sum (in, in) fp32 Σ x xᵀ (its
    upper triangle only while ``upper_only``; None without the refit or when the method's statistics hold it).
    gram_sum is added over processes as one sum per process (a (in, in) record per batch would be too large)."""

    inner: LayerStats | None = None
    x_sum: torch.Tensor | None = None
    x_sq_sum: torch.Tensor | None = None
    tokens: int = 0
    gram_sum: torch.Tensor | None = None
    upper_only: bool = field(default=False, init=False)
    summed_parts: ClassVar[frozenset[str]] = frozenset({"gram_sum"})

    def parts(self) -> dict[str, torch.Tensor | int]:
        out: dict[str, torch.Tensor | int] = {"n_samples": self.n_samples, "tokens": self.tokens}
        for name in ("x_sum", "x_sq_sum", "gram_sum"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.inner is not None:
            out.update({f"inner.{k}": v for k, v in self.inner.parts().items()})
        return out

    def set_part(self, name: str, value: torch.Tensor | int) -> None:
        if name.startswith("inner."):
            assert self.inner is not None
            self.inner.set_part(name.removeprefix("inner."), value)
        else:
            setattr(self, name, value)


class Refined(PruningMethod):
    """``inner``'s statistics, scores and masks, then DSnoT (``dsnot``, None: off) and the refit (``refit_frac``:
    its dampening, None: off)."""

    def __init__(self, inner: PruningMethod, *, dsnot: DSnoTConfig | None = None, refit_frac: float | None = None
                 ) -> None:
        if dsnot is None and refit_frac is None:
            raise ValueError("Refined needs DSnoT or the refit")
        self.inner, self.dsnot, self.refit_frac = inner, dsnot, refit_frac
        self.name = inner.name  # type: ignore[misc]
        self.params_type = inner.params_type  # type: ignore[misc]
        self.keeps_scores = inner.keeps_scores  # type: ignore[misc]
        self.exact_reduction = inner.exact_reduction  # type: ignore[misc]
        self.permutes_nm = inner.permutes_nm  # type: ignore[misc]
        self.changes_kept_weights = refit_frac is not None or inner.changes_kept_weights  # type: ignore[misc]
        # several processes: a refit solves each input group on one process, then broadcasts it
        self.solve_on_owner = refit_frac is not None or inner.solve_on_owner  # type: ignore[misc]
        self.half_precision_note = inner.half_precision_note or (  # type: ignore[misc]
            "the refinements solve on these activations' statistics: float32 forwards give the statistics they "
            "were measured with")

    @property
    def needs_calibration(self) -> bool:
        return True  # the refinements' statistics, whatever the method needs

    def new_stats(self, in_features: int, device: torch.device) -> RefinedStats:
        inner = self.inner.new_stats(in_features, device) if self.inner.needs_calibration else None
        stats = RefinedStats(inner=inner)
        if self.dsnot is not None:
            stats.x_sum = torch.zeros(in_features, dtype=torch.float32, device=device)
            stats.x_sq_sum = torch.zeros(in_features, dtype=torch.float32, device=device)
        if self.refit_frac is not None and (inner is None or self.inner.gram(inner) is None):
            stats.gram_sum = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        return stats

    def accumulate(self, stats: LayerStats, x: torch.Tensor) -> None:
        assert isinstance(stats, RefinedStats)
        if stats.inner is not None:
            self.inner.accumulate(stats.inner, x)
        flat = x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, in)
        if stats.x_sum is not None and stats.x_sq_sum is not None:
            stats.x_sum += flat.sum(dim=0)
            stats.x_sq_sum += flat.pow(2).sum(dim=0)
            stats.tokens += flat.shape[0]
        if stats.gram_sum is not None:
            add_upper_gram(stats.gram_sum, flat, 0, stats.gram_sum.shape[0])
            stats.upper_only = True
        stats.n_samples += x.shape[0] if x.dim() == 3 else 1

    def finish(self, stats: LayerStats) -> None:
        """The method's finish; Σ x xᵀ mirrored from its upper triangle (idempotent: records of one process's
        batches share the tensor)."""
        assert isinstance(stats, RefinedStats)
        if stats.inner is not None:
            self.inner.finish(stats.inner)
        if stats.upper_only and stats.gram_sum is not None:
            mirror_upper(stats.gram_sum)
            stats.upper_only = False

    def gram(self, stats: LayerStats) -> torch.Tensor | None:
        assert isinstance(stats, RefinedStats)
        if stats.gram_sum is not None:
            return stats.gram_sum
        return None if stats.inner is None else self.inner.gram(stats.inner)

    def prepare(self, stats: LayerStats | None, params: MethodParams, *, layer: str,
                on_retry: Callable[[float], None] | None = None) -> Any:
        inner = stats.inner if isinstance(stats, RefinedStats) else None
        return self.inner.prepare(inner, params, layer=layer, on_retry=on_retry)

    def describe(self, prepared: Any) -> dict[str, Any]:
        return self.inner.describe(prepared)

    def score(self, weight: torch.Tensor, stats: LayerStats | None, prepared: Any, params: MethodParams
              ) -> torch.Tensor:
        inner = stats.inner if isinstance(stats, RefinedStats) else None
        return self.inner.score(weight, inner, prepared, params)

    def expected_pruned(self, shape: tuple[int, int], spec: PruneSpec, params: MethodParams) -> int:
        return self.inner.expected_pruned(shape, spec, params)

    def _dsnot(self, before: torch.Tensor, mask: torch.Tensor, stats: RefinedStats, prior: torch.Tensor | None,
               spec: PruneSpec, perm: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        """DSnoT's swaps; N:M inside each group of m, in the input order the mask was chosen in (``perm``)."""
        assert self.dsnot is not None and stats.x_sum is not None and stats.x_sq_sum is not None
        n = max(stats.tokens, 1)
        mean = stats.x_sum.double() / n
        var = (stats.x_sq_sum.double() / n - mean.pow(2)).clamp_min(0.0)
        sq = stats.x_sq_sum
        if perm is not None:  # the groups are those of the permuted order
            p = perm.to(before.device)
            before, mask, mean, var, sq = before[:, p], mask[:, p], mean[p], var[p], sq[p]
            prior = prior[:, p.to(prior.device)] if prior is not None else None
        keep, metrics = dsnot_refine(before, mask, mean, var, sq, prior=prior, max_cycles=self.dsnot.max_cycles,
                                     update_threshold=self.dsnot.update_threshold, var_power=self.dsnot.var_power,
                                     m=spec.m if spec.kind == "nm" else None)
        if perm is not None:
            keep = unpermute_columns(keep, perm)
        return keep, metrics

    def prune(self, weights: Sequence[torch.Tensor], scores: Sequence[torch.Tensor], priors: Sequence[torch.Tensor |
              None], spec: PruneSpec, stats: LayerStats | None, prepared: Any, params: MethodParams
              ) -> list[Pruned]:
        """The method's masks; DSnoT's swaps (weights pruned in an earlier round stay pruned); the refit of the
        kept weights on Σ x xᵀ, with the reconstruction error ‖WX − ŴX‖² / ‖WX‖² before and after it."""
        assert isinstance(stats, RefinedStats)
        inner = self.inner.prune(weights, scores, priors, spec, stats.inner, prepared, params)
        gram = self.gram(stats) if self.refit_frac is not None else None
        out = []
        for w, prior, result in zip(weights, priors, inner, strict=True):
            before = w.detach().float()
            mask, weight, metrics = result.mask, result.weight, dict(result.metrics)
            if self.dsnot is not None:  # a weight an earlier round pruned (prior False) is never regrown
                mask, swaps = self._dsnot(before, mask, stats, prior, spec, result.perm)
                weight = None  # the method's own update belongs to its own mask: the refit solves anew
                metrics.update(swaps)
            if gram is not None:
                masked = weight.float() if weight is not None else before * mask
                refit = refit_kept(before, mask, gram, self.refit_frac)  # type: ignore[arg-type]
                err_masked, ref = gram_errors(before, masked, gram)
                err_refit, _ = gram_errors(before, refit, gram)
                ref_sum = float(ref.sum())
                metrics["reconstruction_error_before_refit"] = float(err_masked.sum()) / ref_sum if ref_sum else 0.0
                metrics["reconstruction_error"] = float(err_refit.sum()) / ref_sum if ref_sum else 0.0
                weight = refit.to(w.dtype)
            out.append(Pruned(mask=mask, weight=weight, scale=result.scale, metrics=metrics, perm=result.perm))
        return out

