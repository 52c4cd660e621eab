"""Masks from importance scores. Pure: tensor in, tensor out. A mask is (out, in) bool, True = weight kept.

Lower score = pruned first. Ties break by position (stable sort), so masks are deterministic.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "n_pruned",
    "unstructured_mask",
    "nm_mask",
    "block_mask",
    "row_mask",
    "column_mask",
    "global_unstructured_masks",
    "pattern_mask",
    "expected_pruned",
]


def n_pruned(count: int, sparsity_frac: float) -> int:
    """How many of ``count`` items a sparsity prunes: floor(count · sparsity), as the reference code does."""
    if not 0.0 <= sparsity_frac < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity_frac}")
    return int(math.floor(count * sparsity_frac + 1e-9))


def _lowest_k(score: torch.Tensor, k: int) -> torch.Tensor:
    """keep: same shape as ``score`` (last dim compared; per row when 2-D or more), False at the k lowest entries.

    Selection by the k-th smallest value (O(n), no sort); ties at that value go by position, first ones first —
    exactly what a stable sort's first k would pick.
    """
    keep = torch.ones_like(score, dtype=torch.bool)
    if k == 0:
        return keep
    if k >= score.shape[-1]:
        return ~keep
    kth = torch.kthvalue(score, k, dim=-1, keepdim=True).values  # (..., 1) the k-th smallest
    less = score < kth
    tied = score == kth
    need = k - less.sum(dim=-1, keepdim=True)  # (..., 1) how many tied entries to prune, by position
    prune = less | (tied & (torch.cumsum(tied, dim=-1) <= need))
    return ~prune


def unstructured_mask(score: torch.Tensor, sparsity_frac: float, scope: str) -> torch.Tensor:
    """mask: (out, in) bool. ``scope`` 'per_row' prunes floor(in·s) per output row (Wanda's comparison group);
    'per_layer' prunes floor(out·in·s) over the whole layer (magnitude)."""
    out_f, in_f = score.shape
    if scope == "per_row":
        return _lowest_k(score, n_pruned(in_f, sparsity_frac))
    if scope == "per_layer":
        flat = _lowest_k(score.reshape(-1), n_pruned(out_f * in_f, sparsity_frac))
        return flat.view(out_f, in_f)
    raise ValueError(f"unknown scope {scope!r} for an unstructured mask (per_row, per_layer)")


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """mask: (out, in) bool with exactly ``n`` kept in every group of ``m`` consecutive input weights."""
    out_f, in_f = score.shape
    if in_f % m:
        raise ValueError(f"in_features={in_f} is not divisible by m={m}")
    groups = score.reshape(out_f, in_f // m, m)  # (out, in/m, m)
    keep = _lowest_k(groups, m - n)  # prune the m-n lowest of each group
    return keep.reshape(out_f, in_f)


def block_mask(score: torch.Tensor, height: int, width: int, sparsity_frac: float) -> torch.Tensor:
    """mask: (out, in) bool; whole height×width blocks pruned by their summed score, floor(n_blocks·s) of them."""
    out_f, in_f = score.shape
    if out_f % height or in_f % width:
        raise ValueError(f"shape ({out_f}, {in_f}) is not divisible by the block ({height}, {width})")
    bh, bw = out_f // height, in_f // width
    block_score = score.reshape(bh, height, bw, width).sum(dim=(1, 3))  # (out/h, in/w)
    keep_blocks = _lowest_k(block_score.reshape(-1), n_pruned(bh * bw, sparsity_frac)).view(bh, bw)
    return keep_blocks[:, None, :, None].expand(bh, height, bw, width).reshape(out_f, in_f)


def row_mask(score: torch.Tensor, sparsity_frac: float) -> torch.Tensor:
    """mask: (out, in) bool; whole output rows pruned by their summed score, floor(out·s) of them."""
    out_f, in_f = score.shape
    keep_rows = _lowest_k(score.sum(dim=1), n_pruned(out_f, sparsity_frac))  # (out,)
    return keep_rows[:, None].expand(out_f, in_f).clone()


def column_mask(score: torch.Tensor, sparsity_frac: float) -> torch.Tensor:
    """mask: (out, in) bool; whole input columns pruned by their summed score, floor(in·s) of them."""
    out_f, in_f = score.shape
    keep_cols = _lowest_k(score.sum(dim=0), n_pruned(in_f, sparsity_frac))  # (in,)
    return keep_cols[None, :].expand(out_f, in_f).clone()


def global_unstructured_masks(scores: dict[str, torch.Tensor], sparsity_frac: float) -> dict[str, torch.Tensor]:
    """masks per layer; floor(total·s) lowest scores over all layers together (comparison group: global)."""
    names = list(scores)
    flat = torch.cat([scores[n].reshape(-1).float() for n in names])  # (total,)
    keep = _lowest_k(flat, n_pruned(flat.numel(), sparsity_frac))
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for name in names:
        numel = scores[name].numel()
        out[name] = keep[offset: offset + numel].view_as(scores[name])
        offset += numel
    return out


def pattern_mask(score: torch.Tensor, *, kind: str, sparsity_frac: float, scope: str, n: int | None = None,
                 m: int | None = None, block_height: int | None = None, block_width: int | None = None
                 ) -> torch.Tensor:
    """mask: (out, in) bool for one layer by pattern ``kind`` (unstructured, nm, block, row, column)."""
    if kind == "unstructured":
        return unstructured_mask(score, sparsity_frac, scope)
    if kind == "nm":
        assert n is not None and m is not None
        return nm_mask(score, n, m)
    if kind == "block":
        assert block_height is not None and block_width is not None
        return block_mask(score, block_height, block_width, sparsity_frac)
    if kind == "row":
        return row_mask(score, sparsity_frac)
    if kind == "column":
        return column_mask(score, sparsity_frac)
    raise ValueError(f"unknown pattern kind {kind!r}")


def expected_pruned(shape: tuple[int, int], kind: str, n: int | None, m: int | None, block_height: int | None,
                    block_width: int | None, scope: str, sparsity_frac: float) -> int:
    """How many weights of an (out, in) layer ``pattern_mask`` prunes at ``sparsity_frac`` (exact, per comparison
    group; 'global' counts as one layer)."""
    out_f, in_f = shape
    if kind == "nm":
        assert n is not None and m is not None
        return out_f * (in_f // m) * (m - n)
    if kind == "block":
        assert block_height is not None and block_width is not None
        n_blocks = (out_f // block_height) * (in_f // block_width)
        return n_pruned(n_blocks, sparsity_frac) * block_height * block_width
    if kind == "row":
        return n_pruned(out_f, sparsity_frac) * in_f
    if kind == "column":
        return n_pruned(in_f, sparsity_frac) * out_f
    if scope == "per_row":
        return out_f * n_pruned(in_f, sparsity_frac)
    return n_pruned(out_f * in_f, sparsity_frac)
