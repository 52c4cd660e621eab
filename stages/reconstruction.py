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

``stages.refine.Refined`` runs it after any method's ``prune``, on Σ x xᵀ collected next to the method's
statistics (or the method's own, SparseGPT's).
"""

from __future__ import annotations

import torch

from podar.schemas.errors import StageError

__all__ = ["refit_kept"]

_MAX_SYSTEM_ELEMENTS = 1 << 22  # float64 entries of the row systems solved at once (32 MiB; a few such alive)
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
        system.masked_fill_(~(valid[:, :, None] & valid[:, None, :]), 0.0)
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
    for attempt in range(_MAX_RETRIES + 1):
        rows = pending.nonzero().squeeze(1)
        diag[rows] = torch.where(valid[rows], base[rows] + damp[rows, None], 1.0)
        lower, info = torch.linalg.cholesky_ex(system if attempt == 0 else system[rows])  # first: every row
        ok = info == 0
        if bool(ok.all()):
            solution[rows] = torch.cholesky_solve(rhs[rows, :, None], lower)[..., 0] * valid[rows]
        elif ok.any():
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
