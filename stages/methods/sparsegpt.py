"""SparseGPT (Frantar & Alistarh 2023): all of its math — the statistics Σ x xᵀ, the dampened inverse-Hessian
factor, the saliency and the OBS column solver. Pure: tensors in, tensors out.

Math (fp32 throughout):
- H = (2/N) Σ x xᵀ over every calibration token, N = calibration sequences (the reference's normaliser).
- Dead inputs (diag H = 0) get H_jj = 1 and their weights are zeroed.
- Dampening: H + λ I with λ = frac · mean(diag H); if Cholesky fails, frac is doubled (a bounded number of times).
- U = upper Cholesky factor of H⁻¹ (Uᵀ U = H⁻¹), computed as J L⁻¹ J from the lower factor L of J H J (J reverses
  the order). Saliency of w_ij = w_ij² / U_jj².
- Columns are processed in blocks of ``block_size``: the mask of a block is chosen at the block start (the
  lowest-saliency fraction of the block's weights, unstructured) or at each group start (N:M); each column's
  pruning error is spread over the remaining columns of the block (OBS update), then the block's error over
  the columns after it. Inside a block the same sums are grouped once more: a column's error goes at once to
  the later columns of its sub-block (an N:M group, or 16 columns), the sub-block's errors to the rest of the
  block in one product.
- Joint quantization (the paper's 50% + 4-bit results; ``method.joint_quantization``): each kept weight is
  replaced by its value on the export's integer grid as its column is solved, and its rounding error spread by
  the same OBS update as a pruned weight's (e = (w − q) / U_ii, q = 0 where pruned). Scales follow
  ``stages/quantize.py``: per row from the row an unquantized solve gives (W8A16: GPTQ's scales from the weights
  before the solve clamp the kept weights the update grows), or per group of columns from their values when the
  group's first column is reached (W4A16; the group lies inside one OBS block).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from podar.schemas.errors import StageError
from podar.schemas.methods import MethodParams, SparseGPTParams

from ..masks import _lowest_k, expected_pruned
from ..permutation import unpermute_columns
from ..quantize import WeightQuant, weight_scale
from .base import LayerStats, Pruned, PruneSpec, PruningMethod, with_prior

__all__ = ["SparseGPT", "SparseGPTStats", "Factor", "add_upper_gram", "gram_errors", "mirror_upper", "hessian_from_sum",
           "inverse_hessian_factor", "sparsegpt_saliency", "sparsegpt_prune"]

_SUB_BLOCK = 16  # unstructured: columns whose errors are spread over the rest of the block in one product
MAX_DAMPENING_RETRIES = 8  # frac doubles each retry: 0.01 → 2.56 at most


def hessian_from_sum(hessian_sum: torch.Tensor, n_samples: int) -> torch.Tensor:
    """H: (in, in) fp32 = (2/N) · Σ x xᵀ, from the sum Σ x xᵀ and N calibration sequences."""
    return hessian_sum.float() * (2.0 / n_samples)


def gram_errors(dense: torch.Tensor, pruned: torch.Tensor, gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(err, ref): (out,) fp64 each, per output row ‖X(w − ŵ)‖² and ‖Xw‖² over every calibration token, from the
    Gram matrix alone: ‖Xv‖² = v Σxxᵀ vᵀ.

    dense, pruned: (out, in) the weight before and after pruning; gram: (in, in) Σ x xᵀ (symmetric, fp32, the
    calibration sum, not normalised). The relative reconstruction error of rows r0:r1 is err[r0:r1].sum() /
    ref[r0:r1].sum(). Inputs never active have zero rows/columns in ``gram`` and contribute nothing.
    """
    w = dense.float()
    delta = w - pruned.float()  # (out, in)
    g = gram.float()
    err = (delta @ g).mul_(delta).sum(dim=1, dtype=torch.float64)  # (out,)
    ref = (w @ g).mul_(w).sum(dim=1, dtype=torch.float64)  # (out,)
    return err, ref


class Factor(NamedTuple):
    """The inverse Hessian's factor shared by the layers that read one input."""

    hinv_upper: torch.Tensor  # (in, in) fp32 U, Uᵀ U = (H + λI)⁻¹
    dead: torch.Tensor  # (in,) bool: inputs never active in calibration
    dampening_frac: float  # the dampening that succeeded, fraction of mean diag(H)
    retries: int  # dampening doublings needed


def inverse_hessian_factor(
    hessian: torch.Tensor, dampening_frac: float, *, layer: str = "?",
    on_retry: Callable[[float], None] | None = None,
) -> Factor:
    """(U, dead, frac_used, retries): U (in, in) fp32 upper Cholesky factor of (H + λI)⁻¹ with dead inputs fixed.

    ``dead``: (in,) bool, inputs never active during calibration. Raises StageError naming ``layer`` when the
    factorization fails after MAX_DAMPENING_RETRIES doublings of the dampening (never falls back silently).
    """
    # reversed order (J H J, J the exchange matrix): if J (H + λI) J = L Lᵀ, then (H + λI)⁻¹ = Uᵀ U with
    # U = J L⁻¹ J upper triangular — one Cholesky and one triangular inverse instead of Cholesky, inverse from
    # the factor, and a second Cholesky
    h = hessian.float().flip(0, 1)  # (in, in) J H J (a copy)
    dead_reversed = torch.diag(h) == 0  # (in,) in J's order
    h[dead_reversed, dead_reversed] = 1.0
    dead = dead_reversed.flip(0)  # (in,) in the original order
    mean_diag = torch.mean(torch.diag(h)).item()
    frac = dampening_frac
    idx = torch.arange(h.shape[0], device=h.device)
    for retry in range(MAX_DAMPENING_RETRIES + 1):
        damped = h.clone()
        damped[idx, idx] += frac * mean_diag
        lower, info = torch.linalg.cholesky_ex(damped)
        del damped  # at most four (in, in) matrices alive at once: h, the factor, the identity, the inverse
        if info.item() == 0:
            eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
            upper = torch.linalg.solve_triangular(lower, eye, upper=False).flip(0, 1)  # J L⁻¹ J
            del lower, eye
            if torch.isfinite(upper).all():
                return Factor(upper, dead, frac, retry)
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


def _group_ranker(m: int, k: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, thr) for ``_lowest_in_groups``: C (m, m·m), thr (m, 1).

    rank_j, the number of entries of a group of m that come before entry j in a stable ascending order, is
    j + (C @ L)[j] with L[a, b] = [s_a < s_b] (flattened): of a pair a > b (a later), a comes first only when
    s_a < s_b, so L[a, b] adds one to rank_b and takes one from the b < a that would otherwise count towards
    rank_a. Entry j is among the k lowest when (C @ L)[j] < k − j = thr[j].
    """
    c = torch.zeros(m, m, m, dtype=dtype, device=device)  # [j, a, b]
    for a in range(m):
        for b in range(a):
            c[b, a, b] += 1.0
            c[a, a, b] -= 1.0
    thr = (k - torch.arange(m, dtype=dtype, device=device))[:, None]
    return c.view(m, m * m), thr


def _lowest_in_groups(sal: torch.Tensor, k: int,
                      ranker: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """prune: (m, out) bool, True at the k lowest of each column of sal (m, out); ties by position, as a stable
    sort's first k. m² comparisons and one (m, m²) @ (m², out) product, no sort (m is small: N:M groups).
    ``ranker``: ``_group_ranker(m, k, ...)`` when the caller keeps it across calls."""
    m = sal.shape[0]
    coef, thr = ranker if ranker is not None else _group_ranker(m, k, sal.dtype, sal.device)
    lower = (sal[:, None, :] < sal[None, :, :]).view(m * m, -1).to(sal.dtype)  # (m², out) [s_a < s_b]
    return (coef @ lower) < thr  # (m, out)


@dataclass
class _Grid:
    """Joint quantization's state: the scheme, the scales' dtype, and the scales (out, groups) fp32 found so far
    (per row: all at once before the solve; per group: each when its first column is reached)."""

    quant: WeightQuant
    dtype: torch.dtype
    scales: torch.Tensor

    def start_group(self, w1: torch.Tensor, col: int, g0: int) -> None:
        """At block column ``g0`` (global column ``col``): a group that starts here takes its scales from its
        columns as updated so far (w1 (count, out), the block transposed)."""
        g = self.quant.group_size
        if g is not None and col % g == 0:
            cols = w1[g0:g0 + g].t()  # (out, g)
            self.scales[:, col // g] = weight_scale(cols, WeightQuant(self.quant.bits), self.dtype)[:, 0].float()

    def snap(self, w: torch.Tensor, col: int) -> torch.Tensor:
        """w: (out,) column ``col`` on the grid (fp32)."""
        s = self.scales[:, col // self.quant.group_size if self.quant.group_size else 0]
        return torch.round(w / s).clamp_(self.quant.qmin, self.quant.qmax).mul_(s)


@dataclass(frozen=True)
class _BlockSpec:
    """What the solver of one column block needs besides the weights: sparsity, N:M, prior, row segments."""

    sparsity_frac: float
    n: int | None
    m: int | None
    prior_mask: torch.Tensor | None  # (out, in) bool, False = pruned in an earlier round
    row_segments: list[tuple[int, int]]
    ranker: tuple[torch.Tensor, torch.Tensor] | None  # ``_group_ranker`` of N:M, kept across blocks
    grid: _Grid | None = None  # joint quantization

    @property
    def nm(self) -> bool:
        return self.n is not None and self.m is not None


def _unstructured_scale(w1: torch.Tensor, inv_d: torch.Tensor, inv_d2: torch.Tensor, i1: int, i2: int,
                        spec: _BlockSpec) -> torch.Tensor:
    """scale1: (count, out) = 1/U_ii where the block's weight is pruned, 0 where kept; per row segment, the
    floor(s · rows · count) lowest saliencies w²/U_ii² of the block (ties by position, as a stable sort)."""
    count = i2 - i1
    scale1 = torch.zeros_like(w1)
    sal = w1.square().mul_(inv_d2[:, None])  # (count, out)
    if spec.prior_mask is not None:
        sal = sal.masked_fill(~spec.prior_mask[:, i1:i2].t(), -1.0)
    for r0, r1 in spec.row_segments:
        seg = sal[:, r0:r1].t().reshape(-1)  # (rows·count,) in W's row-major order
        k = int(seg.numel() * spec.sparsity_frac)
        if k > 0:  # the k lowest, ties by position (a stable sort's first k), without sorting
            scale1[:, r0:r1] = (~_lowest_k(seg, k)).view(r1 - r0, count).t()
    return scale1.mul_(inv_d[:, None])


def _solve_sub_block(w1: torch.Tensor, err1: torch.Tensor, scale1: torch.Tensor, u1: torch.Tensor, g0: int,
                     g1: int, grid: tuple[_Grid, int] | None = None) -> None:
    """OBS on columns g0:g1 of the block (in place): each column's error e = (w − q) / U_ii updates the
    sub-block's later columns; then the sub-block's errors update the block's later columns in one product.
    ``grid`` (joint quantization, and the block's first global column): kept weights become their grid values."""
    count = w1.shape[0]
    for i in range(g0, g1):
        if grid is None:  # e = (w − q) / U_ii, q the column after pruning: the pruned entries over U_ii, else 0
            e = torch.mul(w1[i], scale1[i], out=err1[i])  # (out,)
        else:  # q: 0 where pruned, the grid value where kept; the column becomes q
            q = grid[0].snap(w1[i], grid[1] + i).masked_fill_(scale1[i] != 0, 0.0)
            e = torch.mul(w1[i] - q, u1[i, i].reciprocal(), out=err1[i])
            w1[i] = q
        if i + 1 < g1:
            w1[i + 1:g1].addr_(u1[i, i + 1:g1], e, alpha=-1.0)  # OBS update of the sub-block's rest
    if g1 < count:  # (count − g1, g) @ (g, out): the sub-block's errors on the block's later columns
        w1[g1:].addmm_(u1[g0:g1, g1:].t(), err1[g0:g1], alpha=-1.0)


def _solve_block(w: torch.Tensor, hinv_upper: torch.Tensor, i1: int, i2: int, spec: _BlockSpec
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w1, err1, scale1), each (count, out): column block i1:i2 of w transposed and OBS-solved, its errors, and
    1/U_ii at its pruned entries (0 at kept ones)."""
    count = i2 - i1
    # the block transposed, (count, out): column i of W is the contiguous row i here
    w1 = w[:, i1:i2].t().contiguous()  # (count, out)
    err1 = torch.zeros_like(w1)  # (count, out)
    u1 = hinv_upper[i1:i2, i1:i2]  # (count, count)
    inv_d = torch.diag(u1).reciprocal()  # (count,) 1 / U_ii
    inv_d2 = inv_d.square()  # (count,)
    # (count, out): 1/U_ii where the weight is pruned, 0 where kept — the pruned entries' error factor
    scale1 = torch.zeros_like(w1) if spec.nm else _unstructured_scale(w1, inv_d, inv_d2, i1, i2, spec)
    # columns in sub-blocks of ``sub`` (N:M: one group): inside a sub-block each column's error updates only
    # the sub-block's later columns; the rest of the block gets the sub-block's errors in one product after
    # it (the same sums as column by column, regrouped)
    sub = spec.m if spec.nm else _SUB_BLOCK
    for g0 in range(0, count, sub):  # type: ignore[arg-type]
        g1 = min(g0 + sub, count)  # type: ignore[operator]
        if spec.nm:  # the group's mask, chosen on its weights as updated so far
            sal = w1[g0:g1].square().mul_(inv_d2[g0:g1, None])  # (m, out)
            if spec.prior_mask is not None:
                sal.masked_fill_(~spec.prior_mask[:, i1 + g0:i1 + g1].t(), -1.0)
            pruned = _lowest_in_groups(sal, spec.m - spec.n, spec.ranker)  # type: ignore[operator]
            torch.mul(pruned, inv_d[g0:g1, None], out=scale1[g0:g1])
        if spec.grid is not None:
            spec.grid.start_group(w1, i1 + g0, g0)
        _solve_sub_block(w1, err1, scale1, u1, g0, g1, None if spec.grid is None else (spec.grid, i1))
    return w1, err1, scale1


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor, hinv_upper: torch.Tensor, sparsity_frac: float, *, dead: torch.Tensor | None = None,
    n: int | None = None, m: int | None = None, block_size: int = 128, prior_mask: torch.Tensor | None = None,
    row_segments: list[tuple[int, int]] | None = None, quant: WeightQuant | None = None,
    quant_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(W', keep, loss, scales): W' (out, in) fp32 pruned and OBS-updated, keep (out, in) bool, loss (out,) fp64 =
    the OBS error per row / 2; scales (out, groups) fp32 (values of ``quant_dtype``) with ``quant``, else None.

    Unstructured when ``n``/``m`` are None: per column block, the floor(s · rows · block) lowest saliencies are
    pruned, compared within each of ``row_segments`` (default: all rows as one). Several layers that share an
    input (hence H) are solved together by stacking their rows, one segment per layer: rows are independent
    given H, so the result equals solving each layer alone. N:M: at every group start, the m−n lowest saliencies
    of the group are pruned in each row.
    ``prior_mask`` (out, in) bool: weights already pruned stay pruned (gradual rounds). ``dead`` (in,) bool:
    inputs never active in calibration (their weights are zeroed, as in the reference). ``quant``: joint
    quantization, W' on its grid (its group size must divide ``block_size`` and be a multiple of 16 / of m).
    """
    w = weight.detach().float().clone()  # (out, in)
    out_f, in_f = w.shape
    if dead is not None:
        w[:, dead] = 0.0
    grid = None
    if quant is not None:
        sub = m if n is not None and m is not None else _SUB_BLOCK
        g = quant.group_size
        if g is not None and (block_size % g or g % sub or in_f % g):  # type: ignore[operator]
            raise ValueError(f"joint quantization in groups of {g} needs the group to divide the OBS block "
                             f"({block_size}) and the layer width ({in_f}), and to be a multiple of {sub}")
        if g is None:  # one scale per row, from the row as an unquantized solve leaves it: the OBS update grows
            # kept weights, so the weights before the solve would clamp them at the row's old range
            plain = sparsegpt_prune(weight, hinv_upper, sparsity_frac, dead=dead, n=n, m=m, block_size=block_size,
                                    prior_mask=prior_mask, row_segments=row_segments)[0]
            scales = weight_scale(plain, quant, quant_dtype).float()
        else:
            scales = torch.ones(out_f, in_f // g, device=w.device)
        grid = _Grid(quant, quant_dtype, scales)
    prune = torch.zeros_like(w, dtype=torch.bool)  # True = pruned
    loss = torch.zeros(out_f, dtype=torch.float64, device=w.device)
    nm = n is not None and m is not None
    ranker = _group_ranker(m, m - n, w.dtype, w.device) if nm else None  # type: ignore[operator]
    spec = _BlockSpec(sparsity_frac, n, m, prior_mask, row_segments or [(0, out_f)], ranker, grid)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        w1, err1, scale1 = _solve_block(w, hinv_upper, i1, i2, spec)
        loss += err1.double().pow(2).sum(dim=0) / 2  # Σ (w − q)² / U_ii² / 2 per row
        prune1 = scale1 != 0  # (count, out) True = pruned (1/U_ii > 0)
        w1.masked_fill_(prune1, 0.0)  # exactly q where the update left rounding residue
        w[:, i1:i2] = w1.t()
        prune[:, i1:i2] = prune1.t()
        w[:, i2:] -= err1.t() @ hinv_upper[i1:i2, i2:]  # (out, count) @ (count, in−i2)
    return w, ~prune, loss, None if grid is None else grid.scales


# ---------------------------------------------------------------- statistics: Σ x xᵀ

_GRAM_LEAF = 128  # diagonal blocks at most this wide are summed whole (a square product)


def add_upper_gram(h: torch.Tensor, x: torch.Tensor, lo: int, hi: int) -> None:
    """h[lo:hi, lo:hi] upper triangle (and some entries below it, inside diagonal leaves) += x[:, lo:hi]ᵀ x[:, lo:hi].

    h (in, in) fp32, x (tokens, in) fp32. Halves recursively: the off-diagonal quarter is one product, the two
    diagonal halves recurse down to leaves of ``_GRAM_LEAF`` columns — about half the full product's work plus
    the leaves, in products large enough to run near the machine's peak (``bench/bench_gram.py``)."""
    if hi - lo <= _GRAM_LEAF:
        h[lo:hi, lo:hi].addmm_(x[:, lo:hi].t(), x[:, lo:hi])
        return
    mid = lo + ((hi - lo) // 2 + 31) // 32 * 32  # split on a multiple of 32 columns
    add_upper_gram(h, x, lo, mid)
    h[lo:mid, mid:hi].addmm_(x[:, lo:mid].t(), x[:, mid:hi])  # (mid−lo, hi−mid)
    add_upper_gram(h, x, mid, hi)


def mirror_upper(h: torch.Tensor) -> None:
    """h (in, in) made symmetric in place from its upper triangle (what ``add_upper_gram`` sums); idempotent."""
    h.copy_(torch.triu(h) + torch.triu(h, diagonal=1).t())


@dataclass
class SparseGPTStats(LayerStats):
    """gram_sum: (in, in) fp32 = Σ over tokens of x xᵀ (its upper triangle only while ``upper_only``);
    n_samples: sequences seen."""

    gram_sum: torch.Tensor = None  # type: ignore[assignment]
    upper_only: bool = field(default=False, init=False)


class SparseGPT(PruningMethod):
    name = "sparsegpt"
    params_type = SparseGPTParams
    changes_kept_weights = True
    exact_reduction = False  # Σ x xᵀ per batch would be (in, in) each: the processes' sums are added instead
    solve_on_owner = True
    half_precision_note = ("SparseGPT with half-precision forwards measured worse perplexity at 2:4 than with float32 "
                           "ones (docs/calibration.md): its update solves on these activations' Σ x xᵀ")

    def new_stats(self, in_features: int, device: torch.device) -> SparseGPTStats:
        return SparseGPTStats(gram_sum=torch.zeros(in_features, in_features, dtype=torch.float32, device=device))

    def accumulate(self, stats: LayerStats, x: torch.Tensor) -> None:
        """Σ x xᵀ is symmetric: only its upper triangle is summed (``add_upper_gram``); ``finish`` mirrors it."""
        assert isinstance(stats, SparseGPTStats)
        flat = x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, in)
        add_upper_gram(stats.gram_sum, flat, 0, stats.gram_sum.shape[0])
        stats.upper_only = True
        stats.n_samples += x.shape[0] if x.dim() == 3 else 1

    def finish(self, stats: LayerStats) -> None:
        assert isinstance(stats, SparseGPTStats)
        if stats.upper_only:
            mirror_upper(stats.gram_sum)
            stats.upper_only = False

    def gram(self, stats: LayerStats) -> torch.Tensor | None:
        assert isinstance(stats, SparseGPTStats)
        return stats.gram_sum

    def prepare(self, stats: LayerStats | None, params: MethodParams, *, layer: str,
                on_retry: Callable[[float], None] | None = None) -> Factor:
        assert isinstance(stats, SparseGPTStats) and isinstance(params, SparseGPTParams)
        return inverse_hessian_factor(hessian_from_sum(stats.gram_sum, stats.n_samples), params.dampening_frac,
                                      layer=layer, on_retry=on_retry)

    def describe(self, prepared: Any) -> dict[str, float | int]:
        return {"dampening_frac": prepared.dampening_frac, "cholesky_retries": prepared.retries}

    def score(self, weight: torch.Tensor, stats: LayerStats | None, prepared: Any, params: MethodParams
              ) -> torch.Tensor:
        return sparsegpt_saliency(weight, prepared.hinv_upper, prepared.dead)

    def expected_pruned(self, shape: tuple[int, int], spec: PruneSpec, params: MethodParams) -> int:
        """Unstructured: floor(s · out · block) per OBS column block; N:M as the pattern says."""
        if spec.kind != "unstructured":
            return expected_pruned(shape, spec.kind, spec.n, spec.m, spec.block_height, spec.block_width,
                                   spec.scope, spec.sparsity_frac)
        assert isinstance(params, SparseGPTParams)
        out_f, in_f = shape
        bs = params.block_size
        return sum(int(out_f * (min(i + bs, in_f) - i) * spec.sparsity_frac) for i in range(0, in_f, bs))

    def prune(self, weights: Sequence[torch.Tensor], scores: Sequence[torch.Tensor], priors: Sequence[torch.Tensor |
              None], spec: PruneSpec, stats: LayerStats | None, prepared: Any, params: MethodParams
              ) -> list[Pruned]:
        """The layers reading one input share H: solved together, rows stacked (one segment per layer); each
        layer's reconstruction error ‖WX − ŴX‖² / ‖WX‖² on every calibration token comes from Σ x xᵀ."""
        assert isinstance(stats, SparseGPTStats) and isinstance(params, SparseGPTParams)
        bounds = [0]
        for w in weights:
            bounds.append(bounds[-1] + w.shape[0])
        prior = None
        if any(p is not None for p in priors):
            prior = torch.cat([p if p is not None else torch.ones_like(w, dtype=torch.bool)
                               for p, w in zip(priors, weights, strict=True)])
        before = torch.cat([w.detach() for w in weights])  # (Σ out, in) the weights as calibrated
        perm, permuted = None, {}
        factor = prepared
        if spec.permute is not None:  # one layer reads this input (down, o): its columns swept in the found order
            assert len(weights) == 1
            perm, permuted = spec.order(with_prior(scores[0], priors[0]))
            perm = perm.to(before.device)
            factor = inverse_hessian_factor(hessian_from_sum(stats.gram_sum[perm][:, perm], stats.n_samples),
                                            params.dampening_frac, layer=f"{perm.numel()}-column permuted input")
            before_p = before[:, perm]
            prior = prior[:, perm] if prior is not None else None
        else:
            before_p = before
        new_w, keep, loss, scales = sparsegpt_prune(
            before_p, factor.hinv_upper, spec.sparsity_frac, dead=factor.dead, n=spec.n, m=spec.m,
            block_size=params.block_size, prior_mask=prior, row_segments=list(zip(bounds[:-1], bounds[1:],
                                                                                  strict=True)),
            quant=spec.quant, quant_dtype=spec.quant_dtype)
        if perm is not None:  # back to the given column order
            new_w, keep = unpermute_columns(new_w, perm), unpermute_columns(keep, perm)
        err, ref = gram_errors(before, new_w, stats.gram_sum)
        out = []
        for w, r0, r1 in zip(weights, bounds[:-1], bounds[1:], strict=True):
            ref_sum = float(ref[r0:r1].sum())
            out.append(Pruned(mask=keep[r0:r1], weight=new_w[r0:r1].to(w.dtype), perm=None if perm is None else
                              perm.cpu(), scale=None if scales is None else scales[r0:r1].to(spec.quant_dtype),
                              metrics={"obs_loss": float(loss[r0:r1].sum()), **permuted,
                                       "reconstruction_error": float(err[r0:r1].sum()) / ref_sum if ref_sum > 0
                                       else 0.0}))
        return out
