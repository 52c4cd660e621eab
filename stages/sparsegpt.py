"""SparseGPT (Frantar & Alistarh 2023): the dampened inverse-Hessian factor and the OBS column solver. Pure.

Math (fp32 throughout):
- H = (2/N) Σ x xᵀ over every calibration token, N = calibration sequences (the reference's normaliser).
- Dead inputs (diag H = 0) get H_jj = 1 and their weights are zeroed.
- Dampening: H + λ I with λ = frac · mean(diag H); if Cholesky fails, frac is doubled (a bounded number of times).
- U = upper Cholesky factor of H⁻¹. Saliency of w_ij = w_ij² / U_jj².
- Columns are processed in blocks of ``block_size``: the mask of a block is chosen at the block start (the
  lowest-saliency fraction of the block's weights, unstructured) or at each group start (N:M); each column's
  pruning error is spread over the remaining columns of the block (OBS update), then the block's error over
  the columns after it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from podar.schemas.errors import StageError

__all__ = ["hessian_from_sum", "inverse_hessian_factor", "sparsegpt_saliency", "sparsegpt_prune"]

MAX_DAMPENING_RETRIES = 8  # frac doubles each retry: 0.01 → 2.56 at most


def hessian_from_sum(hessian_sum: torch.Tensor, n_samples: int) -> torch.Tensor:
    """H: (in, in) fp32 = (2/N) · Σ x xᵀ, from the sum Σ x xᵀ and N calibration sequences."""
    return hessian_sum.float() * (2.0 / n_samples)


def inverse_hessian_factor(
    hessian: torch.Tensor, dampening_frac: float, *, layer: str = "?",
    on_retry: Callable[[float], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """(U, dead, frac_used, retries): U (in, in) fp32 upper Cholesky factor of (H + λI)⁻¹ with dead inputs fixed.

    ``dead``: (in,) bool, inputs never active during calibration. Raises StageError naming ``layer`` when the
    factorization fails after MAX_DAMPENING_RETRIES doublings of the dampening (never falls back silently).
    """
    h = hessian.float().clone()  # (in, in)
    dead = torch.diag(h) == 0  # (in,)
    h[dead, dead] = 1.0
    mean_diag = torch.mean(torch.diag(h)).item()
    frac = dampening_frac
    idx = torch.arange(h.shape[0], device=h.device)
    for retry in range(MAX_DAMPENING_RETRIES + 1):
        damped = h.clone()
        damped[idx, idx] += frac * mean_diag
        lower, info = torch.linalg.cholesky_ex(damped)
        if info.item() == 0:
            inv = torch.cholesky_inverse(lower)  # (in, in) = (H + λI)⁻¹
            upper, info2 = torch.linalg.cholesky_ex(inv, upper=True)
            if info2.item() == 0 and torch.isfinite(upper).all():
                return upper, dead, frac, retry
        if retry == MAX_DAMPENING_RETRIES:
            break
        frac *= 2.0
        if on_retry is not None:
            on_retry(frac)
    raise StageError(
        f"layer '{layer}': Cholesky factorization of the dampened Hessian failed even at dampening "
        f"{frac:g}·mean(diag H) after {MAX_DAMPENING_RETRIES} retries; the calibration statistics are "
        "degenerate (more or more varied calibration samples, or a larger calibration.dampening_frac)",
        stage="Computing Importance", layer=layer,
    )


def sparsegpt_saliency(weight: torch.Tensor, hinv_upper: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """saliency: (out, in) fp32 = w² / U_jj² for the unmodified weight; dead: (in,) bool inputs (score 0)."""
    w = weight.detach().float().clone()
    w[:, dead] = 0.0
    return w.pow(2) / torch.diag(hinv_upper).pow(2)[None, :]  # (out, in)


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor, hinv_upper: torch.Tensor, sparsity_frac: float, *, dead: torch.Tensor | None = None,
    n: int | None = None, m: int | None = None, block_size: int = 128, prior_mask: torch.Tensor | None = None,
    row_segments: list[tuple[int, int]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W', keep, loss): W' (out, in) fp32 pruned and OBS-updated, keep (out, in) bool, loss (out,) fp64 = the OBS
    error per row / 2.

    Unstructured when ``n``/``m`` are None: per column block, the floor(s · rows · block) lowest saliencies are
    pruned, compared within each of ``row_segments`` (default: all rows as one). Several layers that share an
    input (hence H) are solved together by stacking their rows, one segment per layer: rows are independent
    given H, so the result equals solving each layer alone. N:M: at every group start, the m−n lowest saliencies
    of the group are pruned in each row.
    ``prior_mask`` (out, in) bool: weights already pruned stay pruned (gradual rounds). ``dead`` (in,) bool:
    inputs never active in calibration (their weights are zeroed, as in the reference).
    """
    w = weight.detach().float().clone()  # (out, in)
    out_f, in_f = w.shape
    if dead is not None:
        w[:, dead] = 0.0
    prune = torch.zeros_like(w, dtype=torch.bool)  # True = pruned
    loss = torch.zeros(out_f, dtype=torch.float64, device=w.device)
    nm = n is not None and m is not None
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        count = i2 - i1
        w1 = w[:, i1:i2].clone()  # (out, count)
        err1 = torch.zeros_like(w1)
        u1 = hinv_upper[i1:i2, i1:i2]  # (count, count)
        d1 = torch.diag(u1)  # (count,)
        prune1 = torch.zeros_like(w1, dtype=torch.bool)
        if not nm:
            sal = w1.pow(2) / d1.pow(2)[None, :]  # (out, count)
            if prior_mask is not None:
                sal = sal.masked_fill(~prior_mask[:, i1:i2], -1.0)
            for r0, r1 in row_segments or [(0, out_f)]:
                seg = sal[r0:r1]  # (rows of one layer, count)
                k = int(seg.numel() * sparsity_frac)
                if k > 0:
                    order = torch.sort(seg.reshape(-1), stable=True).indices[:k]
                    prune1[r0:r1].view(-1)[order] = True
        for i in range(count):
            if nm and i % m == 0:  # type: ignore[operator]
                sal = w1[:, i:i + m].pow(2) / d1[i:i + m].pow(2)[None, :]  # (out, m)
                if prior_mask is not None:
                    sal = sal.masked_fill(~prior_mask[:, i1 + i:i1 + i + m], -1.0)
                low = torch.sort(sal, dim=1, stable=True).indices[:, : m - n]  # type: ignore[operator]
                prune1.scatter_(1, i + low, True)
            col = w1[:, i]  # (out,)
            q = col.masked_fill(prune1[:, i], 0.0)
            d = u1[i, i]
            loss += ((col - q).double() ** 2 / float(d) ** 2) / 2
            e = (col - q) / d  # (out,)
            w1[:, i:] -= e[:, None] * u1[i, i:][None, :]  # OBS update of the rest of the block
            w1[:, i] = q
            err1[:, i] = e
        w[:, i1:i2] = w1
        prune[:, i1:i2] = prune1
        w[:, i2:] -= err1 @ hinv_upper[i1:i2, i2:]  # (out, count) @ (count, in−i2)
    w.masked_fill_(prune, 0.0)
    return w, ~prune, loss
