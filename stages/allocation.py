"""Sparsity allocation: how a pruning round's sparsity is shared among the blocks.

``uniform``: every layer at the round's sparsity. ``owl`` (Yin et al. 2024, "Outlier Weighed Layerwise
Sparsity"): each block's outlier ratio — the share of its Wanda scores |W_ij|·‖x_j‖₂ (dense inputs) above M times
the block's mean score — sets its sparsity: the ratios are scaled to [0, 2λ], and a block keeps that much more of
its weights, re-centred so that the pruned layers' weights, counted, average to the round's sparsity (the
reference subtracts the plain mean, the same when every block has the same size). Targets outside the blocks keep
the round's sparsity.

The pure functions take tensors; ``owl_allocation`` runs the dense pass over the calibration samples, block by
block like the calibration walks (one forward per block and batch, the head never run).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from podar.engine.context import RunContext
from podar.schemas.stage import PruningStage

from .blocks import block_output, capture_first_block_inputs, find_blocks
from .methods.wanda import Wanda, wanda_score
from .walks import collect_stats, local_batches, reduce_in_batch_order, require_inputs

__all__ = ["Allocation", "outlier_ratio", "owl_sparsities", "owl_allocation", "ALLOCATION_KIND"]

ALLOCATION_KIND = "allocation"  # the artifact that records a round's per-layer sparsity (restored on resume)


@dataclass(frozen=True)
class Allocation:
    """A round's per-layer target sparsity, and (OWL) each block's outlier ratio and sparsity."""

    round_index: int
    layer_sparsity: dict[str, float]
    block_outlier_ratio: list[float]
    block_sparsity: list[float]
    lambda_used: float

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        names = list(self.layer_sparsity)
        tensors = {"layer_sparsity": torch.tensor([self.layer_sparsity[n] for n in names], dtype=torch.float64),
                   "block_outlier_ratio": torch.tensor(self.block_outlier_ratio, dtype=torch.float64),
                   "block_sparsity": torch.tensor(self.block_sparsity, dtype=torch.float64)}
        return tensors, {"names": json.dumps(names), "round_index": str(self.round_index),
                         "lambda_used": repr(self.lambda_used)}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> Allocation:
        names = json.loads(metadata["names"])
        return cls(round_index=int(metadata["round_index"]),
                   layer_sparsity=dict(zip(names, tensors["layer_sparsity"].tolist(), strict=True)),
                   block_outlier_ratio=tensors["block_outlier_ratio"].tolist(),
                   block_sparsity=tensors["block_sparsity"].tolist(), lambda_used=float(metadata["lambda_used"]))


def outlier_ratio(scores: Sequence[torch.Tensor], m: float) -> float:
    """The share of all entries of ``scores`` (one block's layers, each (out, in)) above ``m`` × their joint mean.

    Accumulated in float64: the mean over every entry of the block, then the count above the threshold.
    """
    total = sum(float(s.double().sum()) for s in scores)
    count = sum(s.numel() for s in scores)
    if count == 0:
        raise ValueError("outlier_ratio needs at least one score")
    threshold = m * total / count
    return sum(int((s.double() > threshold).sum()) for s in scores) / count


def owl_sparsities(ratios: torch.Tensor, sizes: torch.Tensor, target: float, lam: float) -> torch.Tensor:
    """sparsity: (blocks,) float64, each block's target.

    ``ratios``: (blocks,) outlier ratios; ``sizes``: (blocks,) the weights each block prunes from. The ratios are
    scaled to [0, 2λ] (all equal: 0), a block's sparsity is ``target`` minus its scaled ratio plus their mean
    weighted by ``sizes`` — so Σ sizes·sparsity = target·Σ sizes, and every sparsity lies in target ± 2λ.
    """
    r = ratios.double()
    w = sizes.double()
    span = float(r.max() - r.min())
    scaled = (r - r.min()) * (2 * lam / span) if span > 0 else torch.zeros_like(r)
    return target - (scaled - (scaled * w).sum() / w.sum())


def _lambda_for(target: float, lam: float) -> float:
    """λ at most target/2 and (1 − target)/2 (less a little): every block's sparsity stays in [0, 1)."""
    return min(lam, target / 2, (1.0 - target) / 2 * 0.99)


@torch.no_grad()
def owl_allocation(ctx: RunContext, target: float) -> Allocation:
    """OWL's per-layer sparsity of this round: a dense pass of the calibration samples through the blocks of the
    model as it is, one block at a time (its weights paged in, and out, as the walks do; no head), Wanda's
    statistics added in batch order over every process's batches, then each block's outlier ratio."""
    cfg, st, dist = ctx.config, ctx.state, ctx.dist
    alloc, stage = cfg.allocation, PruningStage.PRUNING.display_name()
    stack = find_blocks(ctx.model, cfg.calibration.blocks)
    assert stack is not None, "a model without a block stack is refused before any work (podar._setup)"
    owner, _outside = stack.owner_of(st.targets)
    assert st.calibration_samples is not None
    size = cfg.calibration.batch_size
    batch_ids, n_batches, mine = local_batches(st.calibration_samples, size, dist)
    inputs = capture_first_block_inputs(ctx.model, stack, mine, size, ctx.device, ctx.runtime)
    method = Wanda()
    ratios, sizes, blocks = [], [], []
    ranges = ctx.runtime.file_ranges()
    with ctx.runtime.block_forwards(ctx.model, stack.layers) as view:
        for b in range(len(stack.layers)):
            names = [n for n in st.targets if owner.get(n) == b]
            by_batch = []
            for i, call in enumerate(inputs.calls):  # one record per batch: added in batch order below
                ctx.check_cancelled()
                with collect_stats({n: st.targets[n] for n in names}, method) as stats:
                    out = view[b](inputs.hidden[i], *call.args, **call.kwargs)
                inputs.hidden[i] = block_output(out)
                by_batch.append(stats)
            if names:
                stats = reduce_in_batch_order(by_batch, batch_ids, n_batches, method, dist)
                require_inputs(stats, names, "in OWL's dense pass", stage)
                scores = [wanda_score(st.targets[n].weight.detach(), stats[n].sq_norm_sum, stats[n].n_samples)
                          for n in names]
                ratios.append(outlier_ratio(scores, alloc.owl_m))
                sizes.append(sum(s.numel() for s in scores))
                blocks.append(b)
                del scores, stats
            # the block is read whole: its pages mapped from the model's file may go
            ctx.runtime.page_out([p.detach() for p in stack.layers[b].parameters()], ranges)
    del inputs
    lam = _lambda_for(target, alloc.owl_lambda)
    per_block = owl_sparsities(torch.tensor(ratios, dtype=torch.float64), torch.tensor(sizes, dtype=torch.float64),
                               target, lam).tolist()
    by_block = dict(zip(blocks, per_block, strict=True))
    layer = {n: by_block[owner[n]] if n in owner else target for n in st.targets}
    return Allocation(round_index=st.round_index, layer_sparsity=layer, block_outlier_ratio=ratios,
                      block_sparsity=per_block, lambda_used=lam)
