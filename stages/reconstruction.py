"""Reconstruction after masking: each layer's kept weights refit by least squares, masks held.

After a method chooses a layer group's masks (and SparseGPT its own update), every row's kept weights are solved so
that the layer's outputs on the calibration inputs match its outputs before pruning:

    min over ŵ with ŵ_j = 0 off the mask of  (ŵ − w)ᵀ H (ŵ − w) + λ ‖ŵ_S − w_S‖²,   H = Σ x xᵀ,

whose solution is (H_SS + λ I) ŵ_S = H_S: w + λ w_S, with S the row's kept inputs, w the row before pruning, and
λ = ``dampening_frac`` · mean(diag H) a ridge toward the row's own weights (inputs never active keep their
weights). The inputs are those the walk gives the group — the model pruned up to it — so attention and MLP are
refit separately, each on the inputs the pruned blocks before it produce. Rows are independent: solved in float64,
a batch of rows at a time, each row's system gathered from H by its kept columns (padding rows and columns set to
the identity, right-hand side zero).

``Reconstructed`` wraps any method: its statistics, scores and masks are the method's; Σ x xᵀ is added to the
statistics (or taken from the method's own, SparseGPT's), and the refit runs after the method's ``prune``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from podar.schemas.errors import StageError
from podar.schemas.methods import MethodParams

from .methods.base import LayerStats, Pruned, PruneSpec, PruningMethod
from .methods.sparsegpt import add_upper_gram, gram_errors

__all__ = ["Reconstructed", "ReconstructionStats", "refit_kept"]

_MAX_SYSTEM_ELEMENTS = 1 << 24  # float64 entries of the row systems solved at once (128 MiB)
_MAX_RETRIES = 8  # the dampening of rows whose system is not positive definite doubles, at most this often


def refit_kept(weight: torch.Tensor, keep: torch.Tensor, gram: torch.Tensor, dampening_frac: float, *,
               layer: str = "?") -> torch.Tensor:
    """W': (out, in) fp32, each row's kept weights refit by ridge least squares, exactly 0 where ``keep`` is False.

    weight: (out, in) the rows before pruning (the fit's target, w); keep: (out, in) bool, True = kept (S);
    gram: (in, in) Σ x xᵀ over the calibration tokens (symmetric). Row r solves (H_SS + λ I) ŵ_S = (H w)_S + λ w_S
    with λ = dampening_frac · mean(diag H), in float64. A row with no kept weight is 0. StageError naming
    ``layer`` when a row's system stays indefinite after the dampening doubled ``_MAX_RETRIES`` times.
    """
    h = gram.double()
    w = weight.double()
    out_f, in_f = w.shape
    result = torch.zeros(out_f, in_f, dtype=torch.float64, device=w.device)
    counts = keep.sum(dim=1)  # (out,)
    kmax = int(counts.max()) if out_f else 0
    if kmax == 0:
        return result.float()
    lam = dampening_frac * float(torch.diagonal(h).mean())
    if lam <= 0.0:  # no input was ever active: nothing to fit, the kept weights stay
        return (w * keep).float()
    target = w @ h  # (out, in): row r is (H w_r)ᵀ, H symmetric
    rows = max(1, _MAX_SYSTEM_ELEMENTS // (kmax * kmax))
    slots = torch.arange(kmax, device=w.device)
    for r0 in range(0, out_f, rows):
        r1 = min(r0 + rows, out_f)
        # each row's kept columns in ascending order, then padding (index 0, marked invalid)
        order = torch.argsort((~keep[r0:r1]).to(torch.uint8), dim=1, stable=True)[:, :kmax]  # (c, kmax)
        valid = slots[None, :] < counts[r0:r1, None]  # (c, kmax)
        idx = torch.where(valid, order, 0)
        system = h[idx[:, :, None], idx[:, None, :]]  # (c, kmax, kmax) H_SS per row
        system.mul_((valid[:, :, None] & valid[:, None, :]).double())
        rhs = (target[r0:r1].gather(1, idx) + lam * w[r0:r1].gather(1, idx)) * valid  # (c, kmax)
        damp = torch.full((r1 - r0,), lam, dtype=torch.float64, device=w.device)
        solution = _solve_rows(system, rhs, valid, damp, layer)  # (c, kmax), 0 at padding
        result[r0:r1].scatter_add_(1, idx, solution)  # padding adds 0 to column 0
    return result.float()


def _solve_rows(system: torch.Tensor, rhs: torch.Tensor, valid: torch.Tensor, damp: torch.Tensor, layer: str
                ) -> torch.Tensor:
    """solution (c, k): (system + diag(damp where valid, 1 where padding)) x = rhs per row, by Cholesky; rows whose
    factorization fails are retried with their dampening doubled."""
    diag = torch.diagonal(system, dim1=1, dim2=2)  # (c, k) a view
    base = diag.clone()
    pending = torch.ones(system.shape[0], dtype=torch.bool, device=system.device)
    solution = torch.zeros_like(rhs)
    for _ in range(_MAX_RETRIES + 1):
        rows = pending.nonzero().squeeze(1)
        diag[rows] = torch.where(valid[rows], base[rows] + damp[rows, None], 1.0)
        lower, info = torch.linalg.cholesky_ex(system[rows])
        ok = info == 0
        if ok.any():
            solved = torch.cholesky_solve(rhs[rows[ok], :, None], lower[ok])[..., 0]
            solution[rows[ok]] = solved * valid[rows[ok]]
        pending[rows[ok]] = False
        if not pending.any():
            return solution
        damp = torch.where(pending, damp * 2.0, damp)
    raise StageError(f"layer '{layer}': the least-squares refit of {int(pending.sum())} row(s) is not positive "
                     f"definite even with the dampening doubled {_MAX_RETRIES} times; the calibration statistics are "
                     "degenerate (more or more varied calibration samples, or a larger reconstruction.dampening_frac)",
                     stage="Pruning", layer=layer)


@dataclass
class ReconstructionStats(LayerStats):
    """The method's own statistics (``inner``; None for a method without any) and gram_sum: (in, in) fp32 Σ x xᵀ
    over tokens (its upper triangle only while ``upper_only``), None when the method's statistics hold it.
    gram_sum is added over processes as one sum per process (a (in, in) record per batch would be too large)."""

    inner: LayerStats | None = None
    gram_sum: torch.Tensor | None = None
    upper_only: bool = field(default=False, init=False)
    summed_parts: ClassVar[frozenset[str]] = frozenset({"gram_sum"})

    def parts(self) -> dict[str, torch.Tensor | int]:
        out: dict[str, torch.Tensor | int] = {"n_samples": self.n_samples}
        if self.gram_sum is not None:
            out["gram_sum"] = self.gram_sum
        if self.inner is not None:
            out.update({f"inner.{k}": v for k, v in self.inner.parts().items()})
        return out

    def set_part(self, name: str, value: torch.Tensor | int) -> None:
        if name.startswith("inner."):
            assert self.inner is not None
            self.inner.set_part(name.removeprefix("inner."), value)
        else:
            setattr(self, name, value)


class Reconstructed(PruningMethod):
    """``inner``'s statistics, scores and masks, then every layer's kept weights refit (``refit_kept``)."""

    changes_kept_weights = True
    solve_on_owner = True  # several processes: each input group refit on one, then broadcast

    def __init__(self, inner: PruningMethod, dampening_frac: float) -> None:
        self.inner, self.dampening_frac = inner, dampening_frac
        self.name = inner.name  # type: ignore[misc]
        self.params_type = inner.params_type  # type: ignore[misc]
        self.keeps_scores = inner.keeps_scores  # type: ignore[misc]
        self.exact_reduction = inner.exact_reduction  # type: ignore[misc]
        self.half_precision_note = inner.half_precision_note or (  # type: ignore[misc]
            "reconstruction solves on these activations' Σ x xᵀ: float32 forwards give the statistics it was "
            "measured with")

    @property
    def needs_calibration(self) -> bool:
        return True  # Σ x xᵀ, whatever the method needs

    def new_stats(self, in_features: int, device: torch.device) -> ReconstructionStats:
        inner = self.inner.new_stats(in_features, device) if self.inner.needs_calibration else None
        own = inner is None or self.inner.gram(inner) is None
        gram = torch.zeros(in_features, in_features, dtype=torch.float32, device=device) if own else None
        return ReconstructionStats(inner=inner, gram_sum=gram)

    def accumulate(self, stats: LayerStats, x: torch.Tensor) -> None:
        assert isinstance(stats, ReconstructionStats)
        if stats.inner is not None:
            self.inner.accumulate(stats.inner, x)
        if stats.gram_sum is not None:
            flat = x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, in)
            add_upper_gram(stats.gram_sum, flat, 0, stats.gram_sum.shape[0])
            stats.upper_only = True
        stats.n_samples += x.shape[0] if x.dim() == 3 else 1

    def finish(self, stats: LayerStats) -> None:
        """The method's finish; Σ x xᵀ mirrored from its upper triangle (idempotent: records of one process's
        batches share the tensor)."""
        assert isinstance(stats, ReconstructionStats)
        if stats.inner is not None:
            self.inner.finish(stats.inner)
        if stats.upper_only and stats.gram_sum is not None:
            h = stats.gram_sum
            h.copy_(torch.triu(h) + torch.triu(h, diagonal=1).t())
            stats.upper_only = False

    def gram(self, stats: LayerStats) -> torch.Tensor | None:
        assert isinstance(stats, ReconstructionStats)
        if stats.gram_sum is not None:
            return stats.gram_sum
        return None if stats.inner is None else self.inner.gram(stats.inner)

    def prepare(self, stats: LayerStats | None, params: MethodParams, *, layer: str,
                on_retry: Callable[[float], None] | None = None) -> Any:
        inner = stats.inner if isinstance(stats, ReconstructionStats) else None
        if inner is None and self.inner.needs_calibration:
            raise StageError(f"layer '{layer}': no statistics of the method", stage="Computing Importance",
                             layer=layer)
        return self.inner.prepare(inner, params, layer=layer, on_retry=on_retry)

    def describe(self, prepared: Any) -> dict[str, Any]:
        return self.inner.describe(prepared)

    def score(self, weight: torch.Tensor, stats: LayerStats | None, prepared: Any, params: MethodParams
              ) -> torch.Tensor:
        inner = stats.inner if isinstance(stats, ReconstructionStats) else None
        return self.inner.score(weight, inner, prepared, params)

    def expected_pruned(self, shape: tuple[int, int], spec: PruneSpec, params: MethodParams) -> int:
        return self.inner.expected_pruned(shape, spec, params)

    def prune(self, weights: Sequence[torch.Tensor], scores: Sequence[torch.Tensor], priors: Sequence[torch.Tensor |
              None], spec: PruneSpec, stats: LayerStats | None, prepared: Any, params: MethodParams
              ) -> list[Pruned]:
        """The method's masks, then each layer's kept weights refit on Σ x xᵀ; the reconstruction error
        ‖WX − ŴX‖² / ‖WX‖² before and after the refit (from Σ x xᵀ) in the metrics."""
        assert isinstance(stats, ReconstructionStats)
        gram = self.gram(stats)
        assert gram is not None
        inner = self.inner.prune(weights, scores, priors, spec, stats.inner, prepared, params)
        out = []
        for w, result in zip(weights, inner, strict=True):
            before = w.detach().float()
            masked = result.weight.float() if result.weight is not None else before * result.mask
            refit = refit_kept(before, result.mask, gram, self.dampening_frac)
            err_masked, ref = gram_errors(before, masked, gram)
            err_refit, _ = gram_errors(before, refit, gram)
            ref_sum = float(ref.sum())

            def rel(err: torch.Tensor, ref_sum: float = ref_sum) -> float:
                return float(err.sum()) / ref_sum if ref_sum > 0 else 0.0

            out.append(Pruned(mask=result.mask, weight=refit.to(w.dtype), scale=result.scale, metrics={
                **result.metrics, "reconstruction_error_before_refit": rel(err_masked),
                "reconstruction_error": rel(err_refit)}))
        return out
