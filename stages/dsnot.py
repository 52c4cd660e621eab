"""DSnoT mask refinement (Zhang et al. 2024, "Dynamic Sparse No Training: Training-Free Fine-tuning for Sparse
LLMs"): after a method's mask, each row swaps pruned and kept weights, one pair per cycle, to drive the expected
error of its output toward zero, with no weight changed. Pure: tensors in, mask out.

For row r with D_j = W_rj · μ_j (μ_j the mean of input j over the calibration tokens), the expected error of the
sparse row's output is ε = Σ_{j pruned} D_j. While |ε| > ``update_threshold`` and for at most ``max_cycles`` cycles:

- regrow: of the weights pruned by the method and not yet regrown, the one with the largest D_j / var_j^p when
  ε > 0 (the smallest when ε ≤ 0), var_j the variance of input j and p = ``var_power`` — reviving it takes D_j
  from ε;
- prune: of the weights the method kept and not yet pruned here, among those whose D_j has the sign that moves ε
  toward zero (D_j > 0 when ε < 0, D_j < 0 when ε ≥ 0), the one with the lowest Wanda score |W_rj| · ‖x_j‖ —
  pruning it adds D_j to ε;
- ε += D_prune − D_regrow.

A row stops for good when |ε| ≤ the threshold, or when it has no candidate left on either side (the reference
would then take candidates of the other sign; here the row keeps its mask). Every row keeps its count of kept
weights, so the method's pattern counts (per row or per layer) hold.

N:M masks (``m`` given): a swap stays inside one group of m inputs, so every group keeps its n. The regrown weight
is the largest (ε > 0) or smallest (ε ≤ 0) D_j / var_j^p among the regrowable weights whose group still holds a
prune candidate of the right sign (ties: the lowest column), and the pruned one is that group's candidate with the
lowest Wanda score (ties: the lowest column); a row stops when no group has such a pair.
"""

from __future__ import annotations

import torch

__all__ = ["dsnot_refine"]


def _ordered(key: torch.Tensor, member: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, count): order (out, in) the columns of each row with ``member`` True first, ascending by key (ties
    by position), the others after; count (out,) the members per row."""
    filled = key.masked_fill(~member, float("inf"))
    return torch.sort(filled, dim=1, stable=True)[1], member.sum(dim=1)


@torch.no_grad()
def dsnot_refine(weight: torch.Tensor, keep: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                 sq_norm: torch.Tensor, *, prior: torch.Tensor | None = None, max_cycles: int = 50,
                 update_threshold: float = 0.1, var_power: float = 1.0, m: int | None = None
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    """(keep', metrics): keep' (out, in) bool the refined mask; metrics: swaps made, mean |ε| before and after.

    weight: (out, in) the weights before pruning; keep: (out, in) bool the method's mask (True = kept); mean, var,
    sq_norm: (in,) each input's mean, variance and sum of squares over the calibration tokens (float64 is used
    throughout); prior: (out, in) bool, False where an earlier pruning round pruned (never regrown); m: the N:M
    group size (swaps inside a group), None for an unstructured mask.
    """
    w = weight.double()
    out_f, _ = w.shape
    d = w * mean.double()[None, :]  # (out, in) each weight's contribution to the expected output
    pruned = ~keep
    err = (d * pruned).sum(dim=1)  # (out,)
    err_before = float(err.abs().mean())
    grow_key = d / var.double().clamp_min(torch.finfo(torch.float64).tiny).pow(var_power)[None, :]
    regrowable = pruned if prior is None else pruned & prior.to(pruned.device)
    wanda = w.abs() * sq_norm.double().sqrt()[None, :]
    if m is not None:
        new_keep, err, swaps = _within_groups(d, keep, grow_key, regrowable, wanda, err, m, max_cycles,
                                              update_threshold)
        return new_keep, {"dsnot_swaps": swaps, "dsnot_error_before": err_before,
                          "dsnot_error_after": float(err.abs().mean())}
    grow_order, grow_count = _ordered(grow_key, regrowable)  # ascending: the largest at grow_count − 1
    neg_order, neg_count = _ordered(wanda, keep & (d < 0))  # ascending Wanda score
    pos_order, pos_count = _ordered(wanda, keep & (d > 0))
    rows = torch.arange(out_f, device=w.device)
    lo = torch.zeros(out_f, dtype=torch.long, device=w.device)  # next smallest regrow candidate
    hi = grow_count - 1  # next largest
    neg_ptr = torch.zeros_like(lo)
    pos_ptr = torch.zeros_like(lo)
    active = err.abs() > update_threshold
    new_keep = keep.clone()
    swaps = 0
    for _ in range(max_cycles):
        up = err > 0
        have_grow = lo <= hi
        have_prune = torch.where(err < 0, pos_ptr < pos_count, neg_ptr < neg_count)
        active &= have_grow & have_prune
        if not bool(active.any()):
            break
        grow_slot = torch.where(up, hi, lo).clamp(0, w.shape[1] - 1)
        g = grow_order[rows, grow_slot]
        prune_from_pos = err < 0
        q = torch.where(prune_from_pos, pos_order[rows, pos_ptr.clamp(max=w.shape[1] - 1)],
                        neg_order[rows, neg_ptr.clamp(max=w.shape[1] - 1)])
        r = rows[active]
        new_keep[r, g[active]] = True
        new_keep[r, q[active]] = False
        err = torch.where(active, err + d[rows, q] - d[rows, g], err)
        hi = torch.where(active & up, hi - 1, hi)
        lo = torch.where(active & ~up, lo + 1, lo)
        pos_ptr = torch.where(active & prune_from_pos, pos_ptr + 1, pos_ptr)
        neg_ptr = torch.where(active & ~prune_from_pos, neg_ptr + 1, neg_ptr)
        swaps += int(active.sum())
        active &= err.abs() > update_threshold
    return new_keep, {"dsnot_swaps": swaps, "dsnot_error_before": err_before,
                      "dsnot_error_after": float(err.abs().mean())}


def _within_groups(d: torch.Tensor, keep: torch.Tensor, grow_key: torch.Tensor, regrowable: torch.Tensor,
                   wanda: torch.Tensor, err: torch.Tensor, m: int, max_cycles: int, update_threshold: float
                   ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(keep', ε', swaps): the N:M rule of the module docstring; every tensor (out, in) float64 / bool, ε (out,)."""
    out_f, in_f = d.shape
    n_groups = in_f // m
    rows = torch.arange(out_f, device=d.device)
    can_grow, can_prune, new_keep = regrowable.clone(), keep.clone(), keep.clone()
    active = err.abs() > update_threshold
    swaps = 0
    for _ in range(max_cycles):
        if not bool(active.any()):
            break
        up = err > 0
        partner = can_prune & torch.where((err < 0)[:, None], d > 0, d < 0)  # (out, in) the right sign
        has = partner.reshape(out_f, n_groups, m).any(dim=-1)  # (out, groups)
        eligible = can_grow & has.repeat_interleave(m, dim=1)
        active &= eligible.any(dim=1)
        if not bool(active.any()):
            break
        key = torch.where(up[:, None], grow_key, -grow_key).masked_fill(~eligible, float("-inf"))
        g = key.argmax(dim=1)  # (out,) first of the largest (ε > 0) or of the smallest (ε ≤ 0)
        group = g // m
        in_group = group[:, None] * m + torch.arange(m, device=d.device)[None, :]  # (out, m) its columns
        score = wanda.gather(1, in_group).masked_fill(~partner.gather(1, in_group), float("inf"))
        q = in_group[rows, score.argmin(dim=1)]  # (out,)
        r = rows[active]
        new_keep[r, g[r]] = True
        new_keep[r, q[r]] = False
        can_grow[r, g[r]] = False
        can_prune[r, q[r]] = False
        err = torch.where(active, err + d[rows, q] - d[rows, g], err)
        swaps += int(active.sum())
        active &= err.abs() > update_threshold
    return new_keep, err, swaps
