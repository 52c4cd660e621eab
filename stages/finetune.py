"""FineTuning: a short masked training loop through Accelerate. Pruned weights stay exactly zero after every
optimizer step (their gradients are zeroed before the step and the mask is re-applied after it)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from podar.engine.context import RunContext
from podar.engine.data import calibration_windows, load_text, resolve_data_dir, tokenize_text
from podar.schemas.errors import StageError
from podar.schemas.records import StageResult
from podar.schemas.stage import PruningStage

STAGE = PruningStage.FINE_TUNING


def _steps_this_round(ctx: RunContext) -> int:
    """Steps until the next pruning round, or the configured steps after the last one."""
    steps = ctx.config.schedule.pruning_steps()
    r = ctx.state.round_index
    if r + 1 < len(steps):
        return steps[r + 1] - steps[r]
    return ctx.config.finetune.steps


@contextmanager
def _training(model: torch.nn.Module, params: list[torch.nn.Parameter]) -> Iterator[None]:
    """While open, only ``params`` require gradients and the model is in train mode; restored on any exit."""
    flags = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        model.train()
        yield
    finally:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
            p.grad = None


@torch.no_grad()
def _remask(masks: dict[str, torch.Tensor], targets: dict[str, torch.nn.Module]) -> float:
    """Zero the pruned weights again; the largest |w| found at a pruned position first (0.0 when none leaked)."""
    leaked = 0.0
    for name, mask in masks.items():
        weight = targets[name].weight
        weight.masked_fill_(~mask, 0.0)
        pruned_values = weight.masked_select(~mask)
        if pruned_values.numel():
            leaked = max(leaked, float(pruned_values.abs().max()))
    return leaked


def _train(ctx: RunContext, windows: torch.Tensor, params: list[torch.nn.Parameter], masks: dict[str, torch.Tensor],
           n_steps: int) -> tuple[list[float], list[float]]:
    """(losses, max |w| at pruned positions after each step) of ``n_steps`` masked steps."""
    ft, st, accelerator = ctx.config.finetune, ctx.state, ctx.accelerator
    optimizer = torch.optim.AdamW(params, lr=ft.learning_rate, weight_decay=ft.weight_decay)
    prepared, optimizer = accelerator.prepare(ctx.model, optimizer)
    device_masks = {name: m.to(accelerator.device) for name, m in masks.items()}
    losses: list[float] = []
    leaks: list[float] = []
    dist = ctx.dist
    for step in ctx.bar(range(n_steps), "fine-tuning"):
        ctx.check_cancelled()
        batch = windows[step * ft.batch_size:(step + 1) * ft.batch_size]  # (B, T), the step's global batch
        batch = batch[dist.rank::dist.world].to(accelerator.device)  # this process's share (all on one process)
        loss = prepared(input_ids=batch, labels=batch, use_cache=False).loss
        if dist.sum_floats([0.0 if torch.isfinite(loss) else 1.0])[0]:  # every process stops, or none
            raise StageError(f"fine-tuning loss is not finite at step {st.counters.step + step} ({loss.item()} "
                             "here)", stage=STAGE.display_name())
        accelerator.backward(loss)
        for name, mask in device_masks.items():
            grad = st.targets[name].weight.grad
            if grad is not None:
                grad.masked_fill_(~mask, 0.0)
        if ft.max_grad_norm is not None:
            accelerator.clip_grad_norm_(params, ft.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        leaked = _remask(device_masks, st.targets)
        if leaked != 0.0:
            raise StageError(f"pruned weights are not zero after step {st.counters.step + step} (max |w| {leaked})",
                             stage=STAGE.display_name())
        losses.append(dist.sum_floats([float(loss.detach())])[0] / dist.world)  # the mean over the global batch
        leaks.append(leaked)
    ctx.model = accelerator.unwrap_model(prepared)
    return losses, leaks


def run(ctx: RunContext) -> StageResult:
    ft, st = ctx.config.finetune, ctx.state
    n_steps = _steps_this_round(ctx)
    if not ft.enabled or n_steps == 0:
        st.counters.step += n_steps if ft.enabled else 0
        return StageResult(stage=STAGE.value, metrics={"skipped": True, "steps": 0},
                           notes=["fine-tuning disabled (finetune.enabled: false)"] if not ft.enabled else [])
    masks = {name: st.masks[name] for name in st.targets if name in st.masks}
    text = load_text(ft.dataset, resolve_data_dir(ctx.config.data_dir), field="finetune.dataset")
    windows = calibration_windows(tokenize_text(ctx.tokenizer, text), n_steps * ft.batch_size, ft.sequence_length,
                                  ft.seed + st.round_index, name=ft.dataset, field="finetune")  # (steps·B, T)
    if ft.train == "pruned_layers":
        params = [m.weight for m in st.targets.values()]
    else:
        params = [p for p in ctx.model.parameters() if p.is_floating_point()]
    try:
        with _training(ctx.model, params):
            losses, leaks = _train(ctx, windows, params, masks, n_steps)
    finally:
        ctx.accelerator.free_memory()
    for name, mask in masks.items():
        w = st.targets[name].weight.detach()
        if int((w[~mask.to(w.device)] != 0).sum()):
            raise StageError(f"layer '{name}': pruned weights became non-zero during fine-tuning",
                             stage=STAGE.display_name(), layer=name)
    first_step = st.counters.step
    st.counters.step += n_steps
    trained = {name: p for name, p in ctx.model.named_parameters() if any(p is q for q in params)}
    ctx.save_tensors("weights", trained, group=False)
    return StageResult(stage=STAGE.value, series={"loss": losses, "pruned_max_abs_after_step": leaks},
                       metrics={"skipped": False, "steps": n_steps, "first_step": first_step,
                                "first_loss": losses[0], "last_loss": losses[-1], "trained": ft.train})
