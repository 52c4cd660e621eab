"""Calibrating: activation statistics of the current layer group's targets (Wanda: Σx², SparseGPT: ΣxxT).

Sequential (default, Llama-style decoders): at the first group of a pruning round, the calibration samples run
through the embeddings once and the first block's inputs are cached; each group's statistics come from its
blocks run on inputs produced by the already-pruned blocks before it (the Pruning stage propagates them).
With ``calibration.granularity: sublayer`` a group is one site of a block (q/k/v, o, gate/up, down; see
``sublayer.py``) and the walk through the block is shared by calibration and propagation.
Other models, or ``calibration.sequential: false``: one dense pass of the whole model collects every target's
statistics at once (logged).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from tqdm.auto import tqdm

from podar.engine.context import RunContext
from podar.engine.data import calibration_windows, load_text, resolve_data_dir, text_sha256, tokenize_text
from podar.schemas.config import PruneMethod
from podar.schemas.errors import StageError
from podar.schemas.records import StageResult

from .common import active_targets
from .compute import block_forwards, cast_module, compute_blocks, model_dtype, resolve_compute_dtype
from .sequential import (
    add_stats,
    capture_first_block_inputs,
    collect_stats,
    decoder_layers,
    execution_order,
    finish_stats,
    group_targets_by_block,
    new_stat_entry,
    run_block,
    skipped_module,
)
from .sublayer import SITE_NAMES, SublayerCursor, check_block, group_targets_by_site

STAGE = "calibrating"


def calibration_samples(ctx: RunContext) -> torch.Tensor:
    """samples: (N, T) int64, cached in the run state (tokenized once per run)."""
    cached = ctx.state.extras.get("calibration_samples")
    if cached is not None:
        return cached
    cal = ctx.config.calibration
    text = load_text(cal.dataset, resolve_data_dir(ctx.config.data_dir), field="calibration.dataset")
    ids = tokenize_text(ctx.tokenizer, text)
    samples = calibration_windows(ids, cal.num_samples, cal.sequence_length, cal.seed, name=cal.dataset)
    ctx.state.extras.setdefault("data_sha256", {})["calibration"] = text_sha256(text)
    ctx.state.extras["calibration_samples"] = samples
    return samples


def plan_sequential(ctx: RunContext) -> None:
    """Split the targets into sequential layer groups (``state.layer_groups``), by block or by site; nothing for
    one-pass calibration. Sub-layer granularity falls back to blocks, with a logged reason, when a block is not
    Llama-style or walking it site by site does not reproduce its forward."""
    cfg, st = ctx.config, ctx.state
    layers = decoder_layers(ctx.model)
    dtype = resolve_compute_dtype(cfg.calibration.compute_dtype, ctx.model)
    if dtype is not None:
        fields = {"dtype": str(dtype).removeprefix("torch."),
                  "model_dtype": str(model_dtype(ctx.model)).removeprefix("torch.")}
        if cfg.method is PruneMethod.SPARSEGPT:  # its update solves on these activations' Σ x xᵀ
            ctx.log.warning("calibration_compute_dtype", **fields,
                            note="SparseGPT with half-precision forwards measured worse perplexity at 2:4 than "
                                 "with float32 ones (README, 'Calibration in bfloat16')")
        else:
            ctx.log.info("calibration_compute_dtype", **fields)
    if not cfg.calibration.sequential or layers is None:
        return
    # by block first: it rejects targets outside the decoder blocks, and it is the fallback of the site walk
    block_groups, name_groups = group_targets_by_block(ctx.model, st.targets, cfg.calibration.blocks_per_group)
    if cfg.resolved_granularity() == "sublayer":
        plan = group_targets_by_site(layers, st.targets)
        reason = None
        if plan is None:
            reason = ("a decoder block is not Llama-style (input_layernorm, self_attn with o_proj, "
                      "post_attention_layernorm, mlp with down_proj)")
        else:
            # in the dtype the walk will compute in
            probe = capture_first_block_inputs(ctx.model, calibration_samples(ctx)[:1], 1, ctx.device, dtype)
            with torch.no_grad(), compute_blocks(layers, dtype) as view:
                scale = float(probe.hidden[0].abs().max()) + 1.0
                diff = check_block(view[0], probe.hidden[0], probe.kwargs[0])
            if not diff <= 1e-5 * scale:
                reason = f"walking block 0 site by site differs from its forward by {diff:.3g}"
        if reason is None:
            assert plan is not None
            st.layer_groups = plan[1]
            st.extras["site_groups"] = plan[0]
            ctx.log.info("calibration_plan", granularity="sublayer", groups=len(plan[0]), blocks=len(layers))
            return
        ctx.log.warning("sublayer_fallback", reason=reason, granularity="block")
    st.layer_groups = name_groups
    st.extras["block_groups"] = block_groups
    ctx.log.info("calibration_plan", granularity="block", groups=len(block_groups), blocks=len(layers))


def _site_stats(ctx: RunContext, kind: str, samples: torch.Tensor) -> tuple[dict, dict]:
    """Statistics of the current site group on the walk's inputs; the walk is rebuilt (embeddings, then the
    pruned sites before this one) at the start of a round or after a resume."""
    cfg, st = ctx.config, ctx.state
    layers = decoder_layers(ctx.model)
    assert layers is not None
    block, site = st.extras["site_groups"][st.group_index]
    dtype = resolve_compute_dtype(cfg.calibration.compute_dtype, ctx.model)
    cursor = st.extras.get("cursor")
    if st.group_index == 0 or cursor is None:
        cursor = SublayerCursor.start(capture_first_block_inputs(ctx.model, samples, cfg.calibration.batch_size,
                                                                 ctx.device, dtype))
        st.extras["cursor"] = cursor
    before = cursor.site_passes
    entry = None
    with block_forwards(ctx.model, layers, cfg.calibration) as view:
        cursor.advance_to(view, block, site, before_step=ctx.check_cancelled)
        for x in cursor.site_inputs(view):
            ctx.check_cancelled()
            if entry is None:
                entry = new_stat_entry(kind, x.shape[-1], x.device)
            add_stats(entry, x, kind)
    assert entry is not None
    names = st.layer_groups[st.group_index]
    metrics = {"block": block, "site": SITE_NAMES[site], "replayed_site_passes": cursor.site_passes - before}
    return {n: entry for n in names}, metrics


def run(ctx: RunContext) -> StageResult:
    cfg, st = ctx.config, ctx.state
    kind = "wanda" if cfg.method.value == "wanda" else "sparsegpt"
    samples = calibration_samples(ctx)
    model = ctx.model
    targets = active_targets(ctx)
    block_groups = st.extras.get("block_groups")
    dtype = resolve_compute_dtype(cfg.calibration.compute_dtype, model)
    forwards = 0
    extra: dict = {}
    with torch.no_grad():
        if st.extras.get("site_groups"):  # sequential, site by site
            stats, extra = _site_stats(ctx, kind, samples)
        elif block_groups:  # sequential, block by block
            layers = decoder_layers(model)
            assert layers is not None
            if st.group_index == 0 or "block_inputs" not in st.extras:
                # first group of a round, or a resumed run: embeddings once, then the (pruned) blocks before
                inputs = capture_first_block_inputs(model, samples, cfg.calibration.batch_size, ctx.device, dtype)
                with block_forwards(model, layers, cfg.calibration) as view:
                    for earlier in block_groups[: st.group_index]:
                        for b in earlier:
                            inputs = run_block(view[b], inputs, in_place=True)
                            forwards += len(inputs.hidden)
                st.extras["block_inputs"] = inputs
            inputs = st.extras["block_inputs"]
            group_blocks = block_groups[st.group_index]
            last_block = layers[group_blocks[-1]]
            in_last = {n: m for n, m in targets.items() if any(m is x for x in last_block.modules())}
            with block_forwards(model, layers, cfg.calibration) as view:
                order = (execution_order(view[group_blocks[-1]], in_last, inputs.hidden[0], inputs.kwargs[0])
                         if in_last else [])
                # the last Linear of the last block feeds no other target: its product is skipped in this pass
                skip = skipped_module(in_last[order[-1]]) if order else nullcontext()
                with collect_stats(targets, kind) as stats, skip:
                    chain = list(inputs.hidden)  # later blocks of a multi-block group see the unpruned earlier ones
                    for b in group_blocks:
                        ctx.check_cancelled()
                        for i, kw in enumerate(inputs.kwargs):
                            out = view[b](chain[i], **kw)
                            forwards += 1
                            if b != group_blocks[-1]:
                                chain[i] = out[0] if isinstance(out, tuple) else out
        else:
            ctx.log.info("calibration_one_pass", reason="no Llama-style decoder stack or sequential disabled",
                         layers=len(targets))
            with collect_stats(targets, kind) as stats, cast_module(model, dtype):
                for start in tqdm(range(0, samples.shape[0], cfg.calibration.batch_size), desc="calibrating",
                                  disable=not ctx.progress, leave=False):
                    ctx.check_cancelled()
                    model(input_ids=samples[start:start + cfg.calibration.batch_size].to(ctx.device),
                          use_cache=False)
                    forwards += 1
    finish_stats(stats)
    for name, entry in stats.items():
        if entry["n_samples"] == 0:
            raise StageError(f"layer '{name}' received no input during calibration (is it used in forward?)",
                             stage="Calibrating", layer=name)
    st.stats = stats
    n_groups = len(st.layer_groups) or 1
    st.more_layer_groups = st.group_index + 1 < n_groups
    return StageResult(
        stage=STAGE,
        metrics={"group": st.group_index, "groups": n_groups, "layers": len(targets),
                 "samples": int(samples.shape[0]), "tokens_per_sample": int(samples.shape[1]),
                 "block_forwards": forwards, **extra},
    )
