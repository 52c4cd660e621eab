"""Calibrating: activation statistics of the current layer group's targets (Wanda: Σx², SparseGPT: ΣxxT).

Sequential (default, Llama-style decoders): at the first group of a pruning round, the calibration samples run
through the embeddings once and the first block's inputs are cached; each group's statistics come from its
blocks run on inputs produced by the already-pruned blocks before it (the Pruning stage propagates them).
Other models, or ``calibration.sequential: false``: one dense pass of the whole model collects every target's
statistics at once (logged).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from tqdm.auto import tqdm

from podar.engine.context import RunContext
from podar.engine.data import calibration_windows, load_text, resolve_data_dir, text_sha256, tokenize_text
from podar.schemas.errors import StageError
from podar.schemas.records import StageResult

from .common import active_targets
from .sequential import (
    capture_first_block_inputs,
    collect_stats,
    decoder_layers,
    execution_order,
    run_block,
    skipped_module,
)

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


def run(ctx: RunContext) -> StageResult:
    cfg, st = ctx.config, ctx.state
    kind = "wanda" if cfg.method.value == "wanda" else "sparsegpt"
    samples = calibration_samples(ctx)
    model = ctx.model
    targets = active_targets(ctx)
    block_groups = st.extras.get("block_groups")
    forwards = 0
    with torch.no_grad():
        if block_groups:  # sequential
            layers = decoder_layers(model)
            assert layers is not None
            if st.group_index == 0 or "block_inputs" not in st.extras:
                # first group of a round, or a resumed run: embeddings once, then the (pruned) blocks before
                inputs = capture_first_block_inputs(model, samples, cfg.calibration.batch_size, ctx.device)
                for earlier in block_groups[: st.group_index]:
                    for b in earlier:
                        inputs = run_block(layers[b], inputs)
                        forwards += len(inputs.hidden)
                st.extras["block_inputs"] = inputs
            inputs = st.extras["block_inputs"]
            group_blocks = block_groups[st.group_index]
            last_block = layers[group_blocks[-1]]
            in_last = {n: m for n, m in targets.items() if any(m is x for x in last_block.modules())}
            order = execution_order(last_block, in_last, inputs.hidden[0], inputs.kwargs[0]) if in_last else []
            # the last Linear of the last block feeds no other target: its product is skipped in this pass
            skip = skipped_module(in_last[order[-1]]) if order else nullcontext()
            with collect_stats(targets, kind) as stats, skip:
                chain = list(inputs.hidden)  # later blocks of a multi-block group see the unpruned earlier ones
                for b in group_blocks:
                    ctx.check_cancelled()
                    for i, kw in enumerate(inputs.kwargs):
                        out = layers[b](chain[i], **kw)
                        forwards += 1
                        if b != group_blocks[-1]:
                            chain[i] = out[0] if isinstance(out, tuple) else out
        else:
            ctx.log.info("calibration_one_pass", reason="no Llama-style decoder stack or sequential disabled",
                         layers=len(targets))
            with collect_stats(targets, kind) as stats:
                for start in tqdm(range(0, samples.shape[0], cfg.calibration.batch_size), desc="calibrating",
                                  disable=not ctx.progress, leave=False):
                    ctx.check_cancelled()
                    model(input_ids=samples[start:start + cfg.calibration.batch_size].to(ctx.device),
                          use_cache=False)
                    forwards += 1
    for name, entry in stats.items():
        if entry["n_samples"] == 0:
            raise StageError(f"layer '{name}' received no input during calibration (is it used in forward?)",
                             stage="Calibrating", layer=name)
    st.stats = stats
    n_groups = len(block_groups) if block_groups else 1
    st.more_layer_groups = st.group_index + 1 < n_groups
    return StageResult(
        stage=STAGE,
        metrics={"group": st.group_index, "groups": n_groups, "layers": len(targets),
                 "samples": int(samples.shape[0]), "tokens_per_sample": int(samples.shape[1]),
                 "block_forwards": forwards},
    )
