"""What a run will cost, said before any work: the tokens and forward passes it plans, and an estimated time
from one timed forward of the first block (and of the LM head on a few positions).

The estimate scales the first block's time by the number of blocks, the block forwards each walk makes per sample
(the block walk two: statistics on the dense block, then the pruned block's outputs; the site walk one; one pass
one), and by tokens (linearly: attention's quadratic part is not modelled), and the head's time by positions.
Solvers (SparseGPT's), fine-tuning and the export are not in it. It is logged (``cost_estimate``), carried in
the audit log's first record and shown by ``podar status``.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from podar.engine.context import RunContext
from podar.stages.blocks import block_output, capture_first_block_inputs, find_blocks

__all__ = ["estimate_cost"]

_PASSES = {"block": 2, "site": 1, "one_pass": 1}  # block forwards per sample and block, by calibration walk
_HEAD_POSITIONS = 64  # positions the head is timed on


@torch.no_grad()
def _block_seconds(ctx: RunContext, stack: Any, tokens: int) -> float:
    """Seconds of one forward of block 0 on one window of ``tokens`` tokens (in the calibration's compute dtype)."""
    ids = torch.zeros(1, tokens, dtype=torch.int64)
    inputs = capture_first_block_inputs(ctx.model, stack, ids, 1, ctx.device, ctx.runtime)
    block, call = stack.layers[0], inputs.calls[0]
    with ctx.runtime.block_forwards(ctx.model, stack.layers) as view:
        block = view[0]
        started = time.perf_counter()
        block_output(block(inputs.hidden[0], *call.args, **call.kwargs))
        return time.perf_counter() - started


@torch.no_grad()
def _head_seconds_per_token(ctx: RunContext) -> float:
    head = ctx.model.get_output_embeddings() if hasattr(ctx.model, "get_output_embeddings") else None
    if head is None or not hasattr(head, "in_features"):
        return 0.0
    hidden = torch.zeros(1, _HEAD_POSITIONS, head.in_features, dtype=head.weight.dtype, device=head.weight.device)
    started = time.perf_counter()
    torch.nn.functional.linear(hidden, head.weight, head.bias)  # the head's product, not a forward of the model
    return (time.perf_counter() - started) / _HEAD_POSITIONS


def task_tokens(ctx: RunContext) -> tuple[int, list[str]]:
    """(tokens both models score on the tasks whose examples podar holds — the shipped ones —, the names of tasks
    it cannot count: lm-eval builds their requests when it runs). Few-shot examples multiply each context."""
    opts = ctx.config.evaluation.tasks
    counted, unknown = 0, []
    for spec in ctx.state.task_specs:  # resolved only when evaluation is enabled
        if spec.examples is None:
            unknown.append(spec.name)
            continue
        texts = [e["context"] + e["target"] for e in spec.examples[:opts.limit]]
        counted += sum(len(ids) for ids in ctx.tokenizer(texts)["input_ids"]) * (1 + opts.num_fewshot)
    return 2 * counted, unknown  # the dense and the pruned model


def estimate_cost(ctx: RunContext) -> dict[str, Any]:
    """The planned tokens and forward passes of calibration and evaluation (perplexity windows and the shipped
    tasks' examples), and their estimated seconds."""
    cfg, st = ctx.config, ctx.state
    stack = find_blocks(ctx.model, cfg.calibration.blocks)
    cal, ev = cfg.calibration, cfg.evaluation
    cost: dict[str, Any] = {"calibration_tokens": 0, "calibration_block_forwards": 0}
    n_eval = (ev.max_windows or 0) * len(ev.datasets()) if ev.enabled else 0
    cost["evaluation_tokens"] = 2 * n_eval * ev.sequence_length  # the dense and the pruned model
    tasks, uncounted = task_tokens(ctx)
    if tasks:
        cost["task_tokens"] = tasks
    notes = [f"task(s) {uncounted} not counted (lm-eval builds their requests)"] if uncounted else []
    if stack is None:
        cost["note"] = "; ".join(["no block stack: no time estimate", *notes])
        return cost
    blocks = len(stack.layers)
    walk = getattr(st.walk, "kind", None)
    n = int(st.calibration_samples.shape[0]) if st.calibration_samples is not None else cal.num_samples
    if walk is not None:
        cost["calibration_tokens"] = n * cal.sequence_length
        cost["calibration_block_forwards"] = n * blocks * _PASSES[walk]
    if cfg.allocation.kind == "owl":  # OWL's dense pass of the blocks, once per pruning round
        cost["calibration_tokens"] = n * cal.sequence_length
        cost["calibration_block_forwards"] += n * blocks * cfg.schedule.num_pruning_steps()
    tokens = cal.sequence_length if cfg.needs_samples else min(ev.sequence_length, 512)
    block_s = _block_seconds(ctx, stack, tokens)
    per_token = block_s / tokens
    head = _head_seconds_per_token(ctx) if st.task == "causal-lm" else 0.0
    cost["block0_ms"] = round(block_s * 1e3, 2)
    cost["block0_tokens"] = tokens
    cost["est_calibration_s"] = round(cost["calibration_block_forwards"] * cal.sequence_length * per_token, 1)
    cost["est_evaluation_s"] = round((cost["evaluation_tokens"] + tasks) * (blocks * per_token + head), 1)
    if n_eval and ev.max_windows is None:
        notes.insert(0, "evaluation.max_windows is None: every window of the text, not counted here")
    if notes:
        cost["note"] = "; ".join(notes)
    return cost
