"""Pruning: the method's masks (and, for methods that update kept weights, new weights) applied to the current
layer group, verified per layer, and checkpointed; then the calibration walk moves past the group.

Every weight change leaves a record: the group's bit-packed masks, and the new weights where kept weights
changed. The reconstruction error ‖WX − ŴX‖² / ‖WX‖² of each layer comes from the method (SparseGPT: from
Σ x xᵀ) or is measured by the walk as it carries the inputs past the pruned group.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import torch

from podar.engine.context import RunContext
from podar.engine.distributed import together
from podar.engine.models import DTYPES
from podar.schemas.errors import StageError
from podar.schemas.records import STRUCTURE_PATTERN, ArtifactRecord, StageResult
from podar.schemas.stage import PruningStage

from . import structure
from .allocation import ALLOCATION_KIND, owl_allocation
from .bitpack import pack_bits
from .common import apply_mask, input_groups
from .masks import global_unstructured_masks
from .methods import Pruned, PruneSpec, with_prior
from .permutation import PERMUTATION_KIND
from .quantize import WeightQuant
from .walks import Advanced

STAGE = PruningStage.PRUNING


def prune_spec(ctx: RunContext) -> PruneSpec:
    """The pattern, comparison group and sparsity of this pruning round."""
    cfg = ctx.config
    p = cfg.pattern
    quant, quant_dtype = None, torch.float32
    if getattr(cfg.method, "joint_quantization", False):
        quant = WeightQuant.named(cfg.export.quantization, cfg.export.group_size)
        quant_dtype = ctx.model.dtype if cfg.export.dtype == "auto" else DTYPES[cfg.export.dtype]
    return PruneSpec(sparsity_frac=cfg.sparsity_at_round(ctx.state.round_index), kind=p.kind,
                     scope=cfg.resolved_scope(), n=p.n, m=p.m, block_height=p.block_height, block_width=p.block_width,
                     quant=quant, quant_dtype=quant_dtype)


def layer_specs(ctx: RunContext, names: list[str], spec: PruneSpec
                ) -> tuple[dict[str, PruneSpec], dict[str, str | float]]:
    """Each layer's spec: the round's, or with allocation.kind 'owl' its block's sparsity (computed at the round's
    first group, on the model as it is then, checkpointed); and the metrics that say which."""
    cfg, st = ctx.config, ctx.state
    if st.permutation_spaces:  # N:M: the layers whose input order folds into other layers choose one
        return {n: replace(spec, permute=st.permutation_spaces.get(n), permute_rounds=cfg.permutation.max_rounds)
                for n in names}, {}
    if cfg.allocation.kind == "uniform":
        return dict.fromkeys(names, spec), {}
    if st.allocation is None or st.allocation.round_index != st.round_index:
        allocation = owl_allocation(ctx, spec.sparsity_frac)
        tensors, metadata = allocation.to_tensors()
        ctx.save_tensors(ALLOCATION_KIND, tensors, metadata=metadata)
        st.allocation = allocation
        ctx.log.info("owl_allocation", round=st.round_index, lambda_used=allocation.lambda_used,
                     block_sparsity=[round(s, 4) for s in allocation.block_sparsity],
                     block_outlier_ratio=[round(r, 5) for r in allocation.block_outlier_ratio])
    layer = st.allocation.layer_sparsity
    return ({n: replace(spec, sparsity_frac=layer[n]) for n in names},
            {"allocation": "owl", "owl_lambda_used": st.allocation.lambda_used})


def _score(ctx: RunContext, name: str) -> torch.Tensor:
    """The layer's score from Computing Importance, or recomputed (methods whose score is cheap keep none)."""
    st = ctx.state
    score = st.scores.pop(name, None)  # one layer's score alive at a time
    if score is None:
        if ctx.method.keeps_scores:
            raise StageError(f"layer '{name}': no importance score", stage=STAGE.display_name(), layer=name)
        score = ctx.method.score(st.targets[name].weight.detach(), st.stats.get(name), st.prepared.get(name),
                                 ctx.config.method)
    return score


def _shared(ctx: RunContext, owner: int, names: list[str], targets: dict[str, Any],
            results: list[Pruned] | None, spec: PruneSpec, specs: dict[str, PruneSpec]) -> list[Pruned]:
    """The results the ``owner`` process solved, on every process: masks, new weights, scales, metrics."""
    dist, out = ctx.dist, []
    for i, name in enumerate(names):
        w = targets[name].weight
        mine = results[i] if results is not None else None
        mask = dist.broadcast(mine.mask.to(torch.uint8) if mine else torch.zeros(w.shape, dtype=torch.uint8), owner)
        weight = None
        if ctx.method.changes_kept_weights:
            weight = dist.broadcast(mine.weight if mine else torch.empty_like(w.detach()), owner)
        scale = None
        if spec.quant is not None:
            groups = w.shape[1] // spec.quant.group(w.shape[1])
            scale = dist.broadcast(mine.scale if mine else torch.empty(w.shape[0], groups, dtype=spec.quant_dtype,
                                                                          device=w.device), owner)
        perm = None
        if specs[name].permute is not None:  # the order the N:M mask was chosen in (-1: the method kept none)
            perm = dist.broadcast(mine.perm if mine and mine.perm is not None else torch.full(
                (w.shape[1],), -1, dtype=torch.int64), owner)
            perm = None if bool((perm < 0).any()) else perm
        metrics = json.loads(dist.broadcast_text(json.dumps(mine.metrics) if mine else None, owner))
        out.append(Pruned(mask=mask.bool(), weight=weight, metrics=metrics, scale=scale, perm=perm))
    return out


def _prune(ctx: RunContext, targets: dict[str, Any], spec: PruneSpec, specs: dict[str, PruneSpec]
           ) -> dict[str, Pruned]:
    st = ctx.state
    if spec.scope == "global":  # one comparison group over every layer: the masks from all scores at once
        scores = {n: with_prior(_score(ctx, n), st.masks.get(n)) for n in targets}
        return {n: Pruned(mask=m) for n, m in global_unstructured_masks(scores, spec.sparsity_frac).items()}
    out: dict[str, Pruned] = {}
    for names in input_groups(list(targets), st.stats):
        ctx.check_cancelled()
        ctx.current_layer = names[0]
        owner = st.owners.get(names[0], ctx.dist.rank)  # several processes: one solves, the others receive

        def solve(names: list[str] = names, owner: int = owner) -> list[Pruned] | None:
            if owner != ctx.dist.rank:
                return None
            # layers reading one input sit in one block: one spec (OWL's sparsity is per block)
            return ctx.method.prune([targets[n].weight for n in names], [_score(ctx, n) for n in names],
                                    [st.masks.get(n) for n in names], specs[names[0]], st.stats.get(names[0]),
                                    st.prepared.get(names[0]), ctx.config.method)

        results = together(ctx.dist, solve) if st.owners else solve()
        if st.owners:
            results = _shared(ctx, owner, names, targets, results, spec, specs)
        assert results is not None
        out.update(zip(names, results, strict=True))
    return out


@torch.no_grad()
def _apply(ctx: RunContext, targets: dict[str, Any], pruned: dict[str, Pruned]) -> None:
    """Each layer's new weight becomes its data: the solver's, or the old one masked (a new tensor: a weight mapped
    from the model's file is never written, and its file pages are let go)."""
    ranges = ctx.runtime.file_ranges()
    for name, result in pruned.items():
        if result.weight is None:
            apply_mask(targets[name], result.mask, ctx.runtime, ranges)
        else:
            ctx.runtime.replace(targets[name].weight, result.weight, ranges)


def _verify(ctx: RunContext, targets: dict[str, Any], pruned: dict[str, Pruned], spec: PruneSpec,
            specs: dict[str, PruneSpec]) -> tuple[dict[str, dict], int, int]:
    """Per-layer metrics; exact pruned counts (global: in total) and pruned weights exactly zero, else StageError."""
    layer_metrics: dict[str, dict] = {}
    total_pruned = total_expected = total = 0
    for name, module in targets.items():
        ctx.current_layer = name
        mask, weight = pruned[name].mask, module.weight.detach()
        n_pruned = int((~mask).sum())
        layer_spec = specs[name]
        expected = ctx.method.expected_pruned(tuple(weight.shape), layer_spec, ctx.config.method)
        total_pruned, total_expected, total = total_pruned + n_pruned, total_expected + expected, total + mask.numel()
        if spec.scope != "global" and n_pruned != expected:
            raise StageError(f"layer '{name}': pruned {n_pruned} weights, the target {layer_spec.sparsity_frac:.4f} "
                             f"({ctx.config.pattern.label()}) needs exactly {expected}", stage=STAGE.display_name(),
                             layer=name)
        perm = pruned[name].perm
        if perm is not None:  # N:M in the permuted order: exactly n kept in every group of m there
            kept = mask[:, perm.to(mask.device)].reshape(mask.shape[0], -1, layer_spec.m).sum(dim=-1)
            if not bool((kept == layer_spec.n).all()) or sorted(perm.tolist()) != list(range(mask.shape[1])):
                raise StageError(f"layer '{name}': the mask is not {ctx.config.pattern.label()} in the input order "
                                 "it was chosen in (or that order is not a permutation)", stage=STAGE.display_name(),
                                 layer=name)
        nonzero_pruned = int((weight[~mask.to(weight.device)] != 0).sum())
        if nonzero_pruned:
            raise StageError(f"layer '{name}': {nonzero_pruned} pruned weights are not zero after pruning",
                             stage=STAGE.display_name(), layer=name)
        layer_metrics[name] = {**pruned[name].metrics, "target_sparsity": layer_spec.sparsity_frac,
                               "sparsity": int((weight == 0).sum()) / weight.numel(),
                               "mask_sparsity": n_pruned / mask.numel(), "pruned": n_pruned, "numel": mask.numel()}
    if spec.scope == "global" and total_pruned != total_expected:
        raise StageError(f"global mask pruned {total_pruned} weights, the target needs {total_expected}",
                         stage=STAGE.display_name())
    ctx.current_layer = None
    return layer_metrics, total_pruned, total


def _checkpoint(ctx: RunContext, targets: dict[str, Any], pruned: dict[str, Pruned], spec: PruneSpec
                ) -> ArtifactRecord | None:
    """The group's masks, and its weights when the method changed kept ones; returns the weights' record."""
    masks = {n: r.mask.cpu() for n, r in pruned.items()}
    ctx.state.masks.update(masks)
    ctx.save_tensors("masks", {n: pack_bits(m) for n, m in masks.items()}, metadata={
        "format": "packbits-rowmajor-lsb", "shapes": json.dumps({n: list(m.shape) for n, m in masks.items()}),
        "sparsity": f"{spec.sparsity_frac:.6f}", "pattern": ctx.config.pattern.label()})
    perms = {n: r.perm.cpu() for n, r in pruned.items() if r.perm is not None}
    if perms:  # the input orders the N:M masks hold in, folded into the model at export
        ctx.state.permutations.update(perms)
        ctx.save_tensors(PERMUTATION_KIND, perms)
    if not ctx.method.changes_kept_weights:
        return None  # the masks alone restore the weights
    scales = {n: r.scale.cpu() for n, r in pruned.items() if r.scale is not None}
    if scales:  # joint quantization: the grid of the new weights, which the export writes them on
        ctx.state.quant_scales.update(scales)
        ctx.save_tensors("scales", scales)
    return ctx.save_tensors("weights", {n: m.weight for n, m in targets.items()})


def _advance(ctx: RunContext, pruned: dict[str, Pruned]) -> Advanced:
    """The walk moves past the pruned group, measuring the layers whose error the method did not give."""
    st = ctx.state
    if st.walk is None:
        return Advanced()
    dense = {n: st.dense_weights[n] for n, r in pruned.items() if "reconstruction_error" not in r.metrics}
    n_measured = ctx.config.calibration.reconstruction_samples if dense else 0
    return st.walk.advance(st.group_index - st.walk_offset, dense, n_measured, ctx.check_cancelled)


def _map(ctx: RunContext, targets: dict[str, Any], record: ArtifactRecord | None) -> None:
    """The group's weights as file mappings (of the checkpoint just written, or a scratch file): calibration does
    not read them again, so their pages stay on disk until evaluation or export reads them."""
    source = ctx.store.artifact_path(record.path) if record is not None and ctx.store.is_main else None
    try:
        ctx.runtime.map_weights({n: m.weight for n, m in targets.items()}, source, ctx.store.scratch_dir)
    except (OSError, ValueError, RuntimeError) as e:  # e.g. a file system that cannot map: they stay in memory
        ctx.log.warning("weights_not_mapped", artifact=None if record is None else record.path, reason=str(e))


def _structure(ctx: RunContext) -> StageResult:
    """Structured pruning: the plan checkpointed (what a resume re-applies), then the blocks, channels and heads
    removed from the model and the new config values written to it."""
    st = ctx.state
    plan = st.structure_plan
    before = structure.parameter_count(ctx.model)
    tensors, metadata = plan.to_tensors()
    ctx.save_tensors(structure.STRUCTURE_KIND, tensors, metadata=metadata)
    structure.restructure(ctx, plan)
    after = structure.parameter_count(ctx.model)
    st.structure_sums = None
    return StageResult(stage=STAGE.value, metrics={
        "pattern": STRUCTURE_PATTERN, "parameters_before": before, "parameters_after": after,
        "parameters_removed_frac": 1.0 - after / before, "blocks_kept": structure.indices_text(plan.blocks),
        **plan.config,
        "round": st.round_index, "group": st.group_index})


@torch.no_grad()
def run(ctx: RunContext) -> StageResult:
    st = ctx.state
    if structure.structure_group(ctx):
        return _structure(ctx)
    spec = prune_spec(ctx)
    targets = st.group_targets()
    specs, allocation_metrics = layer_specs(ctx, list(targets), spec)
    pruned = _prune(ctx, targets, spec, specs)
    _apply(ctx, targets, pruned)
    layer_metrics, total_pruned, total = _verify(ctx, targets, pruned, spec, specs)
    weights_record = _checkpoint(ctx, targets, pruned, spec)
    advanced = _advance(ctx, pruned)
    ctx.runtime.release()  # offloaded: the pruned weights back to the CPU, where they live
    for name, error in advanced.relative_errors().items():
        layer_metrics[name]["reconstruction_error"] = error
    _map(ctx, targets, weights_record)
    st.scores.clear()
    st.stats = {}
    st.prepared = {}
    st.owners = {}
    errors = [m["reconstruction_error"] for m in layer_metrics.values() if "reconstruction_error" in m]
    return StageResult(
        stage=STAGE.value, layer_metrics=layer_metrics,
        metrics={"target_sparsity": spec.sparsity_frac, "achieved_sparsity": total_pruned / max(total, 1),
                 "layers_pruned": len(targets), "round": st.round_index, "group": st.group_index,
                 "pattern": ctx.config.pattern.label(), "scope": spec.scope,
                 "mean_reconstruction_error": (sum(errors) / len(errors)) if errors else None,
                 "block_forwards": advanced.forwards, **allocation_metrics},
    )
