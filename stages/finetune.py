"""FineTuning: a short masked training loop through Accelerate. Pruned weights stay exactly zero after every
optimizer step (their gradients are zeroed before the step and the mask is re-applied after it)."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from podar.engine.context import RunContext
from podar.engine.data import calibration_windows, load_text, resolve_data_dir, tokenize_text
from podar.schemas.errors import StageError
from podar.schemas.records import StageResult

STAGE = "fine_tuning"


def _steps_this_round(ctx: RunContext) -> int:
    """Steps until the next pruning round, or the configured steps after the last one."""
    schedule = ctx.config.schedule
    steps = schedule.pruning_steps()
    r = ctx.state.round_index
    if r + 1 < len(steps):
        return steps[r + 1] - steps[r]
    return ctx.config.finetune.steps


def run(ctx: RunContext) -> StageResult:
    ft = ctx.config.finetune
    n_steps = _steps_this_round(ctx)
    if not ft.enabled or n_steps == 0:
        ctx.state.step += n_steps if ft.enabled else 0
        return StageResult(stage=STAGE, metrics={"skipped": True, "steps": 0},
                           notes=["fine-tuning disabled (finetune.enabled: false)"] if not ft.enabled else [])
    st = ctx.state
    model = ctx.model
    masks = {name: st.masks[name] for name in st.targets if name in st.masks}
    text = load_text(ft.dataset, resolve_data_dir(ctx.config.data_dir), field="finetune.dataset")
    ids = tokenize_text(ctx.tokenizer, text)
    windows = calibration_windows(ids, n_steps * ft.batch_size, ft.sequence_length, ft.seed + st.round_index,
                                  name=ft.dataset, field="finetune")  # (steps·B, T)

    if ft.train == "pruned_layers":
        params = [m.weight for m in st.targets.values()]
    else:
        params = [p for p in model.parameters() if p.is_floating_point()]
    flags = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    accelerator = ctx.accelerator
    optimizer = torch.optim.AdamW(params, lr=ft.learning_rate, weight_decay=ft.weight_decay)
    losses: list[float] = []
    pruned_max_abs: list[float] = []  # max |w| over pruned positions after each step: must stay 0.0
    try:
        model.train()
        prepared, optimizer = accelerator.prepare(model, optimizer)
        device_masks = {name: m.to(accelerator.device) for name, m in masks.items()}
        for step in tqdm(range(n_steps), desc="fine-tuning", disable=not ctx.progress, leave=False):
            ctx.check_cancelled()
            batch = windows[step * ft.batch_size:(step + 1) * ft.batch_size].to(accelerator.device)  # (B, T)
            loss = prepared(input_ids=batch, labels=batch, use_cache=False).loss
            if not torch.isfinite(loss):
                raise StageError(f"fine-tuning loss is not finite at step {st.step + step} ({loss.item()})",
                                 stage="Fine-tuning")
            accelerator.backward(loss)
            for name, mask in device_masks.items():
                grad = st.targets[name].weight.grad
                if grad is not None:
                    grad.masked_fill_(~mask, 0.0)
            if ft.max_grad_norm is not None:
                accelerator.clip_grad_norm_(params, ft.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            leaked = 0.0
            with torch.no_grad():
                for name, mask in device_masks.items():
                    weight = st.targets[name].weight
                    weight.masked_fill_(~mask, 0.0)
                    pruned_values = weight.masked_select(~mask)
                    if pruned_values.numel():
                        leaked = max(leaked, float(pruned_values.abs().max()))
            if leaked != 0.0:
                raise StageError(f"pruned weights are not zero after step {st.step + step} (max |w| {leaked})",
                                 stage="Fine-tuning")
            losses.append(float(loss.detach()))
            pruned_max_abs.append(leaked)
        ctx.model = accelerator.unwrap_model(prepared)
    finally:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
            p.grad = None
        accelerator.free_memory()
    for name, mask in masks.items():
        w = st.targets[name].weight.detach()
        if int((w[~mask.to(w.device)] != 0).sum()):
            raise StageError(f"layer '{name}': pruned weights became non-zero during fine-tuning",
                             stage="Fine-tuning", layer=name)
    st.step += n_steps
    record = ctx.store.save_json(f"artifacts/finetune/round{st.round_index:03d}_losses.json",
                                 {"losses": losses, "first_step": st.step - n_steps,
                                  "pruned_max_abs_after_step": pruned_max_abs}, stage=STAGE, kind="statistics")
    ctx.add_artifact(record)
    trained = {name: p for name, p in model.named_parameters() if any(p is q for q in params)}
    ctx.add_artifact(ctx.store.save_tensors(f"artifacts/weights/finetune_round{st.round_index:03d}.safetensors",
                                            trained, stage=STAGE, kind="weights"))
    return StageResult(stage=STAGE, metrics={"skipped": False, "steps": n_steps, "first_loss": losses[0],
                                             "last_loss": losses[-1], "trained": ft.train})
