"""Pruning: masks from the scores (or SparseGPT's OBS solver), applied to the weights, verified per layer.

Every weight change leaves a record: the packed masks of the group are written as a safetensors artifact, and
in sequential mode the pruned group's inputs are propagated to the next group with the per-layer reconstruction
error ‖WX − ŴX‖² / ‖WX‖² measured on the way.
"""

from __future__ import annotations

import itertools
import json
from contextlib import nullcontext

import torch
from tqdm.auto import tqdm

from podar.engine.context import RunContext
from podar.engine.memory import file_backed_ranges, release_free_memory
from podar.schemas.config import PruneMethod
from podar.schemas.errors import CheckpointError, StageError
from podar.schemas.records import ArtifactRecord, StageResult

from .bitpack import pack_bits
from .common import active_targets, adopt_weights, apply_mask, expected_pruned, replace_data
from .compute import block_forwards
from .masks import global_unstructured_masks, pattern_mask
from .scores import magnitude_score
from .sequential import BlockInputs, decoder_layers, reconstruction_hooks, run_block
from .sparsegpt import gram_errors, sparsegpt_prune

STAGE = "pruning"


def _masks_from_scores(ctx: RunContext, sparsity: float) -> dict[str, torch.Tensor]:
    cfg, st = ctx.config, ctx.state
    p = cfg.pattern
    scope = cfg.resolved_scope()
    targets = active_targets(ctx)

    def score_of(name: str) -> torch.Tensor:
        score = st.scores.pop(name, None)  # one layer's score alive at a time
        if score is None:  # magnitude keeps no scores (ComputingImportance checked them): |W| again
            if cfg.method is not PruneMethod.MAGNITUDE:
                raise StageError(f"layer '{name}': no importance score", stage="Pruning", layer=name)
            score = magnitude_score(targets[name].weight.detach())
        prior = st.masks.get(name)
        # weights pruned in an earlier round stay pruned: they go first
        return score if prior is None else score.masked_fill(~prior.to(score.device), float("-inf"))

    if scope == "global":
        return global_unstructured_masks({n: score_of(n) for n in targets}, sparsity)
    masks = {}
    for name in targets:
        ctx.current_layer = name
        masks[name] = pattern_mask(score_of(name), kind=p.kind, sparsity_frac=sparsity, scope=scope, n=p.n,
                                   m=p.m, block_height=p.block_height, block_width=p.block_width)
    return masks


def _sparsegpt(ctx: RunContext, sparsity: float, layer_metrics: dict) -> dict[str, torch.Tensor]:
    """OBS-prune the active targets; layers that share an input (one H) are solved together, rows stacked."""
    cfg, st = ctx.config, ctx.state
    targets = active_targets(ctx)
    groups: dict[int, list[str]] = {}
    for name in targets:
        groups.setdefault(id(st.stats[name]), []).append(name)
    masks = {}
    for names in groups.values():
        ctx.check_cancelled()
        ctx.current_layer = names[0]
        stats = st.stats[names[0]]
        weights = [targets[n].weight for n in names]
        bounds = [0]
        for w in weights:
            bounds.append(bounds[-1] + w.shape[0])
        priors = [st.masks.get(n) for n in names]
        prior = None
        if any(p is not None for p in priors):
            prior = torch.cat([p if p is not None else torch.ones_like(w, dtype=torch.bool)
                               for p, w in zip(priors, weights, strict=True)])
        before = torch.cat([w.detach() for w in weights])  # (Σ out, in) the weights as calibrated
        new_w, keep, loss = sparsegpt_prune(
            before, stats["hinv_upper"], sparsity, dead=stats["dead"],
            n=cfg.pattern.n, m=cfg.pattern.m, block_size=cfg.calibration.sparsegpt_block_size, prior_mask=prior,
            row_segments=list(zip(bounds[:-1], bounds[1:], strict=True)),
        )
        # ‖WX − ŴX‖² / ‖WX‖² on every calibration token of these inputs, from Σ x xᵀ (no forward needed)
        err, ref = gram_errors(before, new_w, stats["hessian_sum"])
        ranges = file_backed_ranges()
        for name, w, r0, r1 in zip(names, weights, bounds[:-1], bounds[1:], strict=True):
            # the solver's rows become the weight (a view of new_w when the dtypes agree)
            replace_data(w, new_w[r0:r1].to(w.dtype), ranges)
            masks[name] = keep[r0:r1]
            ref_sum = float(ref[r0:r1].sum())
            layer_metrics.setdefault(name, {}).update(
                {"obs_loss": float(loss[r0:r1].sum()),
                 "reconstruction_error": float(err[r0:r1].sum()) / ref_sum if ref_sum > 0 else 0.0})
    return masks


def _map_from_checkpoint(ctx: RunContext, targets: dict, record: ArtifactRecord) -> None:
    """Let the group's weights be the checkpoint just written, mapped from its file (copy-on-write), instead of
    the solver's copies in memory. Calibration does not read them again (the walk has gone past them): their
    pages stay on disk until evaluation or export reads them, so the run's resident memory does not grow by the
    pruned weights, group after group. CPU weights on the process that writes the run folder only."""
    if not ctx.store.is_main or any(m.weight.device.type != "cpu" for m in targets.values()):
        return
    try:
        mapped = ctx.store.load_tensors(record, verify=False)  # just written and hashed from the file
    except CheckpointError as e:  # e.g. a file system that cannot map files: the weights stay in memory
        ctx.log.warning("weights_not_mapped", artifact=record.path, reason=str(e))
        return
    for name, module in targets.items():  # written from these very weights: the same dtype, so no copy is made
        if mapped[name].dtype != module.weight.dtype:
            raise StageError(f"layer '{name}': the weights checkpoint '{record.path}' holds {mapped[name].dtype}, "
                             f"the layer {module.weight.dtype}", stage="Pruning", layer=name)
    adopt_weights(record.path, mapped, {n: m.weight for n, m in targets.items()})


def _expected(ctx: RunContext, shape: tuple[int, int], sparsity: float) -> int:
    cfg = ctx.config
    if cfg.method is PruneMethod.SPARSEGPT and cfg.pattern.kind == "unstructured":
        out_f, in_f = shape
        bs = cfg.calibration.sparsegpt_block_size
        return sum(int(out_f * (min(i + bs, in_f) - i) * sparsity) for i in range(0, in_f, bs))
    return expected_pruned(shape, cfg.pattern, cfg.resolved_scope(), sparsity)


def _propagate(ctx: RunContext, targets: dict, layer_metrics: dict) -> int:
    """Sequential modes: carry the calibration inputs past the group just pruned (its blocks, or its site), with
    its weights as they are now. Returns the block forwards made (site passes count as one each).

    Wanda and magnitude measure each layer's reconstruction error on the way, on the first
    ``calibration.reconstruction_samples`` windows (SparseGPT measured it on all of them from Σ x xᵀ). After the
    round's last group nothing downstream needs the outputs: only the windows the measurement reads are run, and
    the cached inputs are dropped."""
    cfg, st = ctx.config, ctx.state
    block_groups, site_groups = st.extras.get("block_groups"), st.extras.get("site_groups")
    cursor, inputs = st.extras.get("cursor"), st.extras.get("block_inputs")
    if not ((site_groups and cursor is not None) or (block_groups and inputs is not None)):
        return 0
    layers = decoder_layers(ctx.model)
    assert layers is not None
    measure = cfg.method is not PruneMethod.SPARSEGPT
    n_measured = cfg.calibration.reconstruction_samples if measure else 0
    last = not st.more_layer_groups
    forwards = 0
    if not site_groups or cursor.site in (0, 2):  # passes that allocate activations
        release_free_memory()  # what scoring and mask selection freed, before the activations grow
    dense = {n: st.dense_weights[n] for n in targets} if measure else {}  # this group's dense weights only
    hooks = reconstruction_hooks(targets, dense, n_measured) if measure else nullcontext({})
    with hooks as acc, block_forwards(ctx.model, layers, cfg.calibration) as blocks:
        if site_groups:
            if cursor.position != tuple(site_groups[st.group_index]):
                raise StageError(f"the site walk stands at {cursor.position}, not at the pruned group's "
                                 f"{tuple(site_groups[st.group_index])}", stage="Pruning")
            n_batches = _batches_covering([b - a for a, b in cursor.batches], n_measured) if last else None
            if n_batches != 0:
                cursor.step(blocks, max_batches=n_batches)
                forwards += 1
        else:
            if last:
                k = _batches_covering([h.shape[0] for h in inputs.hidden], n_measured)
                inputs = BlockInputs(kwargs=inputs.kwargs[:k], hidden=inputs.hidden[:k])
            for b in tqdm(block_groups[st.group_index], desc="propagate", disable=not ctx.progress, leave=False):
                inputs = run_block(blocks[b], inputs, in_place=True)
                forwards += len(inputs.hidden)
            st.extras["block_inputs"] = inputs
    if site_groups and cursor.site in (1, 3):  # the pass just made freed its per-batch temporaries
        release_free_memory()  # give them back before the next site's statistics and factorization
    for name, (err, ref, n_seen) in acc.items():
        if n_seen:
            layer_metrics[name]["reconstruction_error"] = err / ref if ref > 0 else 0.0
    if last:  # nothing downstream needs them: free the cached activations
        st.extras.pop("cursor", None)
        st.extras.pop("block_inputs", None)
    return forwards


def _batches_covering(sizes: list[int], n_samples: int) -> int:
    """How many of the leading batches (``sizes``: samples per batch, in order) hold the first ``n_samples``."""
    if n_samples <= 0:
        return 0
    for i, end in enumerate(itertools.accumulate(sizes)):
        if end >= n_samples:
            return i + 1
    return len(sizes)


def run(ctx: RunContext) -> StageResult:
    cfg, st = ctx.config, ctx.state
    sparsity = cfg.sparsity_at_round(st.round_index)
    targets = active_targets(ctx)
    layer_metrics: dict[str, dict] = {}
    if cfg.method is PruneMethod.SPARSEGPT:
        masks = _sparsegpt(ctx, sparsity, layer_metrics)
    else:
        masks = _masks_from_scores(ctx, sparsity)
        ranges = file_backed_ranges()
        for name, mask in masks.items():
            apply_mask(targets[name], mask, ranges)

    # verify: exact pruned count per layer (global: in total), pruned weights exactly zero
    total_pruned = total_expected = total = 0
    for name, module in targets.items():
        ctx.current_layer = name
        mask = masks[name]
        weight = module.weight.detach()
        pruned = int((~mask).sum())
        expected = _expected(ctx, tuple(weight.shape), sparsity)
        total_pruned, total_expected, total = total_pruned + pruned, total_expected + expected, total + mask.numel()
        if cfg.resolved_scope() != "global" and pruned != expected:
            raise StageError(
                f"layer '{name}': pruned {pruned} weights, the target {sparsity:.4f} ({cfg.pattern.label()}) "
                f"needs exactly {expected}", stage="Pruning", layer=name)
        nonzero_pruned = int((weight[~mask.to(weight.device)] != 0).sum())
        if nonzero_pruned:
            raise StageError(f"layer '{name}': {nonzero_pruned} pruned weights are not zero after pruning",
                             stage="Pruning", layer=name)
        zeros = int((weight == 0).sum())
        layer_metrics.setdefault(name, {}).update(
            {"sparsity": zeros / weight.numel(), "mask_sparsity": pruned / mask.numel(), "pruned": pruned,
             "numel": mask.numel()})
    if cfg.resolved_scope() == "global" and total_pruned != total_expected:
        raise StageError(f"global mask pruned {total_pruned} weights, the target needs {total_expected}",
                         stage="Pruning")
    ctx.current_layer = None
    st.masks.update({n: m.cpu() for n, m in masks.items()})

    rel = f"artifacts/masks/round{st.round_index:03d}_group{st.group_index:03d}.safetensors"
    record = ctx.store.save_tensors(
        rel, {n: pack_bits(m.cpu()) for n, m in masks.items()}, stage=STAGE, kind="masks",
        metadata={"format": "packbits-rowmajor-lsb", "shapes": json.dumps({n: list(m.shape) for n, m in masks.items()}),
                  "sparsity": f"{sparsity:.6f}", "pattern": cfg.pattern.label()},
    )
    ctx.add_artifact(record)
    weights_record = None
    on_cpu = all(m.weight.device.type == "cpu" for m in targets.values())
    if cfg.method is PruneMethod.SPARSEGPT or (cfg.method.requires_calibration() and on_cpu):
        # SparseGPT's OBS update changed the kept weights too: they must be recorded. Wanda's are the dense ones
        # masked (the masks alone restore them), written only where the run can then map them from this file
        # (below) instead of keeping them in memory, group after group, until evaluation reads them: CPU weights.
        wrel = f"artifacts/weights/round{st.round_index:03d}_group{st.group_index:03d}.safetensors"
        weights_record = ctx.store.save_tensors(wrel, {n: m.weight for n, m in targets.items()}, stage=STAGE,
                                                kind="weights")
        ctx.add_artifact(weights_record)

    forwards = _propagate(ctx, targets, layer_metrics)
    if weights_record is not None:
        _map_from_checkpoint(ctx, targets, weights_record)
    st.scores.clear()
    st.stats = {}
    errors = [m["reconstruction_error"] for m in layer_metrics.values() if "reconstruction_error" in m]
    return StageResult(
        stage=STAGE,
        metrics={"target_sparsity": sparsity, "achieved_sparsity": total_pruned / max(total, 1),
                 "layers_pruned": len(targets), "round": st.round_index, "group": st.group_index,
                 "pattern": cfg.pattern.label(), "scope": cfg.resolved_scope(),
                 "mean_reconstruction_error": (sum(errors) / len(errors)) if errors else None,
                 "block_forwards": forwards},
        layer_metrics=layer_metrics,
    )
