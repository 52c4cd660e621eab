"""FineTuning: recovering what pruning cost, through Accelerate, a checkpointed interval at a time.

Each entry into the stage trains ``finetune.checkpoint_every`` optimizer steps (fewer at the end of a round) and
checkpoints: the trained weights, the optimizer's state, the RNG state, the validation history and the best
weights so far. The machine moves FineTuning → FineTuning while steps are left, so a run killed anywhere in a
long fine-tune resumes from its last interval, to the same final weights as a run never interrupted.

Loss (``finetune.loss``): ``lm`` the next-token cross-entropy; ``kd`` the KL divergence from the dense model's
next-token distribution to the pruned model's at temperature T (scaled by T², Hinton et al.); ``kd+lm`` their
weighted sum. The teacher is the dense model computed on the fly: the same modules with their dense weights
swapped in for its forward, so no second model is held; after structured pruning, the dense copy kept before the
blocks, channels or heads went (``stages.common.dense_model``), and every remaining weight trains. With
``hidden_weight`` > 0 a hidden-state term joins the loss: every block's output against the output of the dense block
it was (after depth pruning, the kept blocks'), cosine or relative MSE (``hidden_state_loss``), as in layer-wise
distillation recipes (Sparse-Llama).

Learning rate: linear warm-up over ``warmup_fraction`` of the round's steps, then constant, linear or cosine decay
to ``min_lr_ratio`` × the peak at the round's last step (``lr_at``). Validation every ``eval_every`` steps and at
the round's end: perplexity and KL to the dense model on windows of a validation text (never the evaluation
text); with ``early_stopping_patience`` the round stops after that many validations without improvement, and the
best validated weights are kept. Forwards and backwards autocast to bfloat16 where the device computes it natively
(``finetune.autocast``: a CUDA GPU with bf16, a CPU with AVX-512 BF16 or AMX); the weights, their gradients and the
optimizer's state stay float32, and validation runs in float32; a resume is refused where it would resolve otherwise.
Pruned weights stay exactly zero after every step (their gradients are zeroed before the step and the mask
re-applied after it).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from podar.engine import faults
from podar.engine.compute import resolve_autocast
from podar.engine.context import RunContext
from podar.engine.data import calibration_windows, load_text, resolve_data_dir, tokenize_text
from podar.engine.models import dtype_name
from podar.schemas.config import FineTuneConfig
from podar.schemas.errors import CheckpointError, DataError, StageError
from podar.schemas.records import StageResult
from podar.schemas.stage import PruningStage

from .blocks import block_output, find_blocks
from .common import dense_model
from .quality import compare_to_reference, dense_reference, head_splits, kl_top_k, next_token_stats

STAGE = PruningStage.FINE_TUNING
STATE_KIND = "finetune_state"  # optimizer state, RNG, history: what the next interval continues from
BEST_KIND = "finetune_best"  # the best validated weights so far
CACHE_KIND = "teacher_topk"  # the dense teacher's top-k log-probs of a round's training windows
VALIDATION_SHARE = 0.1  # without a validation text: the training text's last 10% of tokens, never trained on
_VALIDATION_TOP_K = 256  # the dense model's top-k per position the validation KL is taken over (as Evaluating)


# ---------------------------------------------------------------- pure functions


def lr_at(step: int, total: int, *, peak: float, warmup: int, schedule: str, min_ratio: float) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of ``total``: linear warm-up to ``peak`` over the
    first ``warmup`` steps (step i gets peak·(i+1)/warmup), then ``schedule`` — constant, or linear or cosine
    decay from ``peak`` to ``min_ratio``·peak at the last step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    span = total - warmup - 1
    progress = 1.0 if span <= 0 else min((step - warmup) / span, 1.0)
    floor = peak * min_ratio
    if schedule == "linear":
        return floor + (peak - floor) * (1.0 - progress)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Scalar: T² · mean over positions of KL(softmax(teacher/T) ‖ softmax(student/T)), from logits (..., V) of the
    same positions (the teacher's carry no gradient)."""
    log_q = F.log_softmax(student.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher.detach().float() / temperature, dim=-1)
    per_position = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    return per_position.mean() * temperature**2


def hidden_state_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], kind: str) -> torch.Tensor:
    """Scalar: the mean over matched blocks of their outputs' distance, each (B, T, C) — ``cosine``: the mean over
    tokens of 1 − cos(h, h_dense); ``mse``: ‖h − h_dense‖² / ‖h_dense‖² over the block's tokens (the dense side
    carries no gradient)."""
    terms = []
    for h, t in zip(student, teacher, strict=True):
        h, t = h.float(), t.detach().float()
        if kind == "cosine":
            terms.append((1.0 - F.cosine_similarity(h, t, dim=-1, eps=1e-8)).mean())
        else:
            terms.append((h - t).square().sum() / t.square().sum().clamp_min(1e-12))
    return torch.stack(terms).mean()


def warmup_steps(ft: FineTuneConfig, n_steps: int) -> int:
    return round(ft.warmup_fraction * n_steps)


# ---------------------------------------------------------------- data


def mixture_counts(total: int, shares: list[float]) -> list[int]:
    """Windows per text: ``total`` split by ``shares`` (summing to 1), the largest remainders rounded up first (ties
    to the earlier text), so the counts add up to ``total``."""
    raw = [total * share for share in shares]
    counts = [math.floor(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[:total - sum(counts)]:
        counts[i] += 1
    return counts


def training_texts(ctx: RunContext, n_windows: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(training windows (n_windows, T) int64 drawn by the round's seed, validation windows (v, T) or None when
    ``eval_every`` is 0). Several training texts (``extra_datasets``): each gives its share of the windows
    (``dataset_weights``), drawn from it by its own seed, then shuffled together by the round's seed. Without
    ``validation_dataset`` each text's last ``VALIDATION_SHARE`` of tokens is held out for validation (its share of
    the validation windows) and the windows are drawn from the rest. DataError naming the field when a text is too
    short."""
    ft, st = ctx.config.finetune, ctx.state
    data_dir = resolve_data_dir(ctx.config.data_dir)
    sources = ft.sources()
    shares = [share for _, _, share in sources]
    texts = [tokenize_text(ctx.tokenizer, load_text(name, data_dir, field=f), field=f) for f, name, _ in sources]
    held: torch.Tensor | None = None
    if ft.eval_every:
        if ft.validation_dataset is None:
            parts = []
            for i, count in enumerate(mixture_counts(ft.validation_windows, shares)):
                cut = int(texts[i].numel() * (1.0 - VALIDATION_SHARE))
                texts[i], tail = texts[i][:cut], texts[i][cut:]
                source = f"the last {VALIDATION_SHARE:.0%} of {sources[i][0]} '{sources[i][1]}'"
                parts.append(_validation_windows(tail, count, ft, source))
            held = torch.cat(parts)
        else:
            held = tokenize_text(ctx.tokenizer, load_text(ft.validation_dataset, data_dir,
                                                          field="finetune.validation_dataset"),
                                 field="finetune.validation_dataset")
            held = _validation_windows(held, ft.validation_windows, ft,
                                       f"finetune.validation_dataset '{ft.validation_dataset}'")
    seed = ft.seed + st.round_index
    if len(texts) == 1:
        return calibration_windows(texts[0], n_windows, ft.sequence_length, seed, name=ft.dataset,
                                   field="finetune"), held
    drawn = [calibration_windows(ids, count, ft.sequence_length, seed + 7919 * i, name=sources[i][1],
                                 field="finetune")
             for i, (ids, count) in enumerate(zip(texts, mixture_counts(n_windows, shares), strict=True))]
    order = torch.randperm(n_windows, generator=torch.Generator().manual_seed(seed))
    return torch.cat(drawn)[order], held


def _validation_windows(ids: torch.Tensor, count: int, ft: FineTuneConfig, source: str) -> torch.Tensor:
    """The first ``count`` windows of ``ids`` (count, T); DataError naming ``source`` when it is too short."""
    need = count * ft.sequence_length
    if ids.numel() < need:
        raise DataError(f"{source} has {ids.numel()} tokens; {count} validation windows (of finetune."
                        f"validation_windows={ft.validation_windows}) × finetune.sequence_length={ft.sequence_length} "
                        f"need {need} (a longer text, fewer or shorter windows, or finetune.eval_every: 0)")
    return ids[:need].view(count, ft.sequence_length)


# ---------------------------------------------------------------- the training session of one round


@dataclass
class Session:
    """What one round of fine-tuning carries from interval to interval (checkpointed as ``STATE_KIND``)."""

    round_index: int
    step: int  # the run's fine-tuning step count (counters.step) this state is at
    optimizer: dict[str, torch.Tensor] = field(default_factory=dict)  # "exp_avg.<param>", "exp_avg_sq.<param>"
    adam_step: int = 0
    rng: torch.Tensor | None = None  # torch's CPU generator state
    best_loss: float | None = None
    best_step: int | None = None
    bad_validations: int = 0
    stopped_early: bool = False
    autocast: str = "off"  # the dtype the round's steps autocast to ('off': float32), as ``autocast_name`` gives it

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        tensors = dict(self.optimizer)
        if self.rng is not None:
            tensors["rng.torch"] = self.rng
        meta = {"round_index": self.round_index, "step": self.step, "adam_step": self.adam_step,
                "best_loss": self.best_loss, "best_step": self.best_step, "bad_validations": self.bad_validations,
                "stopped_early": self.stopped_early, "autocast": self.autocast}
        return tensors, {"session": json.dumps(meta, sort_keys=True)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Session:
        meta = json.loads(metadata["session"])
        return cls(round_index=meta["round_index"], step=meta["step"], adam_step=meta["adam_step"],
                   optimizer={k: v for k, v in tensors.items() if not k.startswith("rng.")},
                   rng=tensors.get("rng.torch"), best_loss=meta["best_loss"], best_step=meta["best_step"],
                   bad_validations=meta["bad_validations"], stopped_early=meta["stopped_early"],
                   autocast=meta.get("autocast", "off"))  # checkpoints from before autocast trained in float32


def _round_bounds(ctx: RunContext) -> tuple[int, int]:
    """(first, end) fine-tuning step of the current round (counters.step runs from first to end)."""
    cfg, r = ctx.config, ctx.state.round_index
    return (cfg.finetune_round_end(r - 1) if r else 0), cfg.finetune_round_end(r)


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


@contextmanager
def _block_outputs(model: torch.nn.Module, path: str | None, keep: list[int] | None = None
                   ) -> Iterator[list[torch.Tensor]]:
    """While open, the outputs (B, T, C) of ``model``'s blocks (those at ``keep``, in its order; all when None) are
    appended to the list yielded, one per block forward."""
    stack = find_blocks(model, path)
    if stack is None:
        raise StageError(f"finetune.hidden_weight: {type(model).__name__} has no stack of blocks whose outputs to "
                         "compare (name it in calibration.blocks)", stage=STAGE.display_name())
    outputs: list[torch.Tensor] = []
    handles = [stack.layers[i].register_forward_hook(lambda _m, _a, out: outputs.append(block_output(out)))
               for i in (range(len(stack.layers)) if keep is None else keep)]
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


def _teacher(ctx: RunContext, batch: torch.Tensor, hidden: bool) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """The dense model's logits (B, T, V) fp32 on ``batch`` — the model with its dense weights swapped in, or the
    dense copy after structured pruning — in eval mode, no gradient; with ``hidden`` the outputs of its blocks that
    match the pruned model's, in order (after depth pruning: the blocks kept)."""
    plan = ctx.state.structure_plan
    with torch.no_grad(), dense_model(ctx) as model:
        model.eval()
        try:
            with (_block_outputs(model, ctx.config.calibration.blocks, plan.blocks if plan is not None else None)
                  if hidden else nullcontext([])) as outputs:
                logits = model(input_ids=batch, use_cache=False).logits.float()
            return logits, list(outputs) if hidden else None
        finally:
            if model is ctx.model:
                model.train()


def kd_top_k_loss(student: torch.Tensor, ids: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """Scalar: mean over positions of KL(teacher ‖ student) at temperature 1 from the teacher's top-k tokens
    ``ids`` (..., k) and their log-probs ``logp`` (..., k), and the student's logits (..., V): over the k tokens
    plus one bucket holding the rest of the mass (``stages.quality.kl_top_k``; exact when k is the vocabulary)."""
    log_q = torch.gather(F.log_softmax(student.float(), dim=-1), -1, ids)
    return kl_top_k(logp.float(), log_q, whole=ids.shape[-1] >= student.shape[-1]).mean()


@torch.no_grad()
def teacher_cache(ctx: RunContext, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The dense model's top ``teacher_top_k`` next-token ids (n, T-1, k) int32 and log-probs (n, T-1, k) fp32 on
    every training window (n, T): computed once per round with the dense weights swapped in, a vocabulary chunk at
    a time, and checkpointed, so the steps that follow run no teacher."""
    ft = ctx.config.finetune
    ids, logp = [], []
    with dense_model(ctx) as model:
        split = head_splits(model, windows[:1, :8].to(ctx.device))
        for start in range(0, windows.shape[0], ft.batch_size):
            ctx.check_cancelled()
            stats = next_token_stats(model, windows[start:start + ft.batch_size].to(ctx.device), split=split,
                                     top_k=ft.teacher_top_k)
            ids.append(stats.top_ids.int())
            logp.append((stats.top_values.double() - stats.lse[..., None]).float())
    return {"ids": torch.cat(ids), "logp": torch.cat(logp)}


def autocast_dtype(ctx: RunContext) -> torch.dtype | None:
    """The dtype this run's training forwards autocast to (``finetune.autocast``), None when they run in float32."""
    return resolve_autocast(ctx.config.finetune.autocast, ctx.model, ctx.accelerator.device)


def autocast_name(ctx: RunContext) -> str:
    """``autocast_dtype`` as recorded: 'bfloat16', or 'off' for float32."""
    return dtype_name(autocast_dtype(ctx), none="off")


def _autocast(ctx: RunContext) -> AbstractContextManager[Any]:
    dtype = autocast_dtype(ctx)
    return nullcontext() if dtype is None else torch.autocast(ctx.accelerator.device.type, dtype=dtype)


def _loss(ctx: RunContext, prepared: torch.nn.Module, batch: torch.Tensor, cached: dict[str, torch.Tensor] | None
          ) -> tuple[torch.Tensor, float, float, float]:
    """(the loss to step on, its LM part, its KD part, its hidden-state part — 0.0 when not computed) on ``batch``
    (B, T); ``cached``: the teacher's top-k of these windows (ids, logp (B, T-1, k)) when it was computed ahead."""
    ft = ctx.config.finetune
    hidden = ft.hidden_weight > 0.0
    teacher = teacher_hidden = None
    if hidden or (ft.loss != "lm" and cached is None):
        with _autocast(ctx):
            teacher, teacher_hidden = _teacher(ctx, batch, hidden)
    with _autocast(ctx), (_block_outputs(ctx.model, ctx.config.calibration.blocks) if hidden else
                          nullcontext([])) as outputs:
        logits = prepared(input_ids=batch, use_cache=False).logits[:, :-1]  # (B, T-1, V)
    lm = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
    if ft.loss == "lm":
        loss, kd_value = lm, 0.0
    else:
        if cached is not None:
            kd = kd_top_k_loss(logits, cached["ids"].long().to(logits.device), cached["logp"].to(logits.device))
        else:
            assert teacher is not None
            kd = kd_loss(logits, teacher[:, :-1], ft.kd_temperature)
        loss = kd if ft.loss == "kd" else ft.kd_weight * kd + (1.0 - ft.kd_weight) * lm
        kd_value = float(kd.detach())
    hidden_value = 0.0
    if hidden:
        assert teacher_hidden is not None
        term = hidden_state_loss(list(outputs), teacher_hidden, ft.hidden_loss)
        loss = loss + ft.hidden_weight * term
        hidden_value = float(term.detach())
    return loss, float(lm.detach()), kd_value, hidden_value


def _validate(ctx: RunContext, windows: torch.Tensor, reference: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(mean next-token loss in nats, mean KL to the dense model) of the model on the validation windows."""
    m = compare_to_reference(ctx.model, windows, reference, device=ctx.device)
    return math.log(m.ppl), float(m.kl_mean or 0.0)


def _params(ctx: RunContext) -> dict[str, torch.nn.Parameter]:
    """The parameters trained, by name."""
    if ctx.config.finetune.train == "pruned_layers" and not ctx.config.structure.enabled:
        return {f"{name}.weight": m.weight for name, m in ctx.state.targets.items()}
    return {n: p for n, p in ctx.model.named_parameters() if p.is_floating_point()}


def _optimizer_state(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> tuple[dict[str, torch.Tensor], int]:
    tensors: dict[str, torch.Tensor] = {}
    step = 0
    for param, state in optimizer.state.items():
        name = names[id(param)]
        tensors[f"exp_avg.{name}"] = state["exp_avg"].detach().cpu()
        tensors[f"exp_avg_sq.{name}"] = state["exp_avg_sq"].detach().cpu()
        step = int(state["step"])
    return tensors, step


def _load_optimizer_state(optimizer: torch.optim.Optimizer, params: dict[str, torch.nn.Parameter],
                          session: Session) -> None:
    if not session.optimizer:
        return
    for name, p in params.items():
        if f"exp_avg.{name}" not in session.optimizer:
            raise CheckpointError(f"the fine-tuning checkpoint holds no optimizer state for '{name}'")
        optimizer.state[p] = {"step": torch.tensor(float(session.adam_step)),
                              "exp_avg": session.optimizer[f"exp_avg.{name}"].to(p.device).clone(),
                              "exp_avg_sq": session.optimizer[f"exp_avg_sq.{name}"].to(p.device).clone()}


def run(ctx: RunContext) -> StageResult:
    ft, st = ctx.config.finetune, ctx.state
    first, end = _round_bounds(ctx)
    if not ft.enabled or end == first:
        return StageResult(stage=STAGE.value, metrics={"skipped": True, "steps": 0},
                           notes=["fine-tuning disabled (finetune.enabled: false)"] if not ft.enabled else [])
    n_round = end - first
    done = st.counters.step - first  # steps of this round already trained (0 on its first interval)
    if not 0 <= done < n_round:
        raise CheckpointError(f"fine-tuning is at step {st.counters.step}, outside round {st.round_index}'s steps "
                              f"{first}..{end - 1}")
    session, now = st.finetune_session, autocast_name(ctx)
    if done == 0:
        session = Session(round_index=st.round_index, step=st.counters.step, autocast=now)
        st.finetune_best = None
    elif session is None or (session.round_index, session.step) != (st.round_index, st.counters.step):
        found = None if session is None else (session.round_index, session.step)
        raise CheckpointError(f"resuming fine-tuning at step {st.counters.step} (round {st.round_index}) needs the "
                              f"checkpoint written there; the run folder's last one is at {found}")
    elif session.autocast != now:
        raise CheckpointError(
            f"fine-tuning's first {done} steps of this round ran with autocast {session.autocast}, and "
            f"finetune.autocast '{ft.autocast}' resolves to {now} here ('auto' takes bfloat16 only where the device "
            "computes it natively): the steps left would train otherwise than a run never interrupted; resume on "
            f"such a device, or set finetune.autocast to {'off' if session.autocast == 'off' else 'bfloat16'} "
            f"(--set finetune.autocast=...)")
    micro = ft.batch_size * ft.grad_accumulation
    windows, validation = training_texts(ctx, n_round * micro)
    reference = None
    if validation is not None:
        reference = dense_reference_of(ctx, validation)
    cache = None
    if ft.loss != "lm" and ft.teacher == "cached":
        cache = _round_cache(ctx, windows, done)
    masks = {name: st.masks[name] for name in st.targets if name in st.masks}
    params = _params(ctx)
    n_steps = min(ft.checkpoint_every, n_round - done)
    try:
        with ctx.runtime.keep_freed_memory(), _training(ctx.model, list(params.values())):
            outcome = _train(ctx, session, windows, validation, reference, params, masks, done, n_steps, n_round,
                             cache)
    finally:
        ctx.accelerator.free_memory()
    for name, mask in masks.items():
        w = st.targets[name].weight.detach()
        if int((w[~mask.to(w.device)] != 0).sum()):
            raise StageError(f"layer '{name}': pruned weights became non-zero during fine-tuning",
                             stage=STAGE.display_name(), layer=name)
    return _checkpoint(ctx, session, outcome, params, first, done, n_round)


def _round_cache(ctx: RunContext, windows: torch.Tensor, done: int) -> dict[str, torch.Tensor]:
    """The round's ``teacher_cache``: computed and checkpointed on its first interval (``CACHE_KIND``), restored
    from the run folder after (CheckpointError when it is not there or not this round's)."""
    st = ctx.state
    if done == 0:
        cache = teacher_cache(ctx, windows)
        ctx.save_tensors(CACHE_KIND, cache, name=f"round{st.round_index:04d}", group=False,
                         metadata={"round_index": str(st.round_index), "windows": str(windows.shape[0])})
        st.teacher_cache = (st.round_index, cache)
        return cache
    if st.teacher_cache is None or st.teacher_cache[0] != st.round_index:
        raise CheckpointError(f"resuming fine-tuning at step {st.counters.step} needs round {st.round_index}'s "
                              "cached teacher logits; the run folder holds none")
    cache = st.teacher_cache[1]
    if cache["ids"].shape[0] != windows.shape[0]:
        raise CheckpointError(f"the cached teacher logits cover {cache['ids'].shape[0]} windows; this round trains "
                              f"on {windows.shape[0]}")
    return cache


def dense_reference_of(ctx: RunContext, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The dense model's reference (``stages.quality.dense_reference``) on the validation windows."""
    with dense_model(ctx) as model:
        return dense_reference(model, windows, top_k=_VALIDATION_TOP_K, device=ctx.device)


@dataclass
class _Outcome:
    losses: list[float] = field(default_factory=list)
    lm: list[float] = field(default_factory=list)
    kd: list[float] = field(default_factory=list)
    hidden: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    leaks: list[float] = field(default_factory=list)  # max |w| at pruned positions after each step (0.0)
    val_step: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_kl: list[float] = field(default_factory=list)
    trained: int = 0
    new_best: bool = False
    tokens_per_s: float = 0.0


def _accumulate(ctx: RunContext, prepared: torch.nn.Module, windows: torch.Tensor, i: int, step: int,
                cache: dict[str, torch.Tensor] | None = None) -> tuple[float, float, float, float]:
    """Forward and backward of optimizer step ``i``'s micro-batches (this process's share of each); the step's
    (loss, LM part, KD part, hidden-state part) here. ``step``: the run's step number, for messages; ``cache``:
    ``teacher_cache``."""
    ft, dist = ctx.config.finetune, ctx.dist
    micro = ft.batch_size * ft.grad_accumulation
    total = [0.0, 0.0, 0.0, 0.0]
    for a in range(ft.grad_accumulation):
        first = i * micro + a * ft.batch_size
        share = slice(first + dist.rank, first + ft.batch_size, dist.world)  # this process's windows
        batch = windows[share].to(ctx.accelerator.device)  # (B / world, T)
        cached = None if cache is None else {k: v[share] for k, v in cache.items()}
        loss, lm, kd, hidden = _loss(ctx, prepared, batch, cached)
        if dist.sum_floats([0.0 if torch.isfinite(loss) else 1.0])[0]:  # every process stops, or none
            raise StageError(f"fine-tuning loss is not finite at step {step} ({loss.item()} here)",
                             stage=STAGE.display_name())
        ctx.accelerator.backward(loss / ft.grad_accumulation)
        for k, value in enumerate((float(loss.detach()), lm, kd, hidden)):
            total[k] += value / ft.grad_accumulation
    return total[0], total[1], total[2], total[3]


def _apply(ctx: RunContext, optimizer: torch.optim.Optimizer, params: dict[str, torch.nn.Parameter],
           masks: dict[str, torch.Tensor], step: int) -> float:
    """The optimizer step with the pruned weights' gradients zeroed, then the masks re-applied; the largest |w| at a
    pruned position after it (0.0; StageError otherwise)."""
    ft, st = ctx.config.finetune, ctx.state
    for name, mask in masks.items():
        grad = st.targets[name].weight.grad
        if grad is not None:
            grad.masked_fill_(~mask, 0.0)
    if ft.max_grad_norm is not None:
        ctx.accelerator.clip_grad_norm_(list(params.values()), ft.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    leaked = _remask(masks, st.targets)
    if leaked != 0.0:
        raise StageError(f"pruned weights are not zero after step {step} (max |w| {leaked})",
                         stage=STAGE.display_name())
    return leaked


def adamw(params: list[torch.nn.Parameter], **kwargs: float) -> torch.optim.AdamW:
    """AdamW over ``params``: PyTorch's fused kernel where they all live on a CPU or CUDA device (one pass over each
    tensor: 0.054 s against the per-tensor loop's 0.30 s a step over 105M parameters on 2 cores,
    ``bench/bench_adamw.py``), its per-tensor loop elsewhere; the same update up to float rounding."""
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    return torch.optim.AdamW(params, fused=fused or None, **kwargs)


def _train(ctx: RunContext, session: Session, windows: torch.Tensor, validation: torch.Tensor | None,
           reference: dict[str, torch.Tensor] | None, params: dict[str, torch.nn.Parameter],
           masks: dict[str, torch.Tensor], done: int, n_steps: int, n_round: int,
           cache: dict[str, torch.Tensor] | None) -> _Outcome:
    """Steps ``done`` .. ``done + n_steps - 1`` of the round (of ``n_round``), validating on schedule."""
    ft, st, accelerator, dist = ctx.config.finetune, ctx.state, ctx.accelerator, ctx.dist
    names = {id(p): n for n, p in params.items()}
    optimizer = adamw(list(params.values()), lr=ft.learning_rate, weight_decay=ft.weight_decay)
    _load_optimizer_state(optimizer, params, session)
    if session.rng is not None:
        torch.set_rng_state(session.rng)
    prepared, optimizer = accelerator.prepare(ctx.model, optimizer)
    device_masks = {name: m.to(accelerator.device) for name, m in masks.items()}
    out = _Outcome()
    warm, tokens, busy = warmup_steps(ft, n_round), ft.tokens_per_step(), 0.0
    bar = ctx.bar(range(done, done + n_steps), "fine-tuning")
    for i in bar:
        ctx.check_cancelled()
        started, step = time.perf_counter(), st.counters.step + i - done  # the run's step number
        lr = lr_at(i, n_round, peak=ft.learning_rate, warmup=warm, schedule=ft.lr_schedule, min_ratio=ft.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        losses = _accumulate(ctx, prepared, windows, i, step, cache)
        out.leaks.append(_apply(ctx, optimizer, params, device_masks, step))
        mean = dist.sum_floats(list(losses))
        out.losses.append(mean[0] / dist.world)
        out.lm.append(mean[1] / dist.world)
        out.kd.append(mean[2] / dist.world)
        out.hidden.append(mean[3] / dist.world)
        out.lr.append(lr)
        out.trained += 1
        busy += time.perf_counter() - started
        bar.set_postfix(loss=f"{out.losses[-1]:.4f}", lr=f"{lr:.2e}", tok_s=f"{out.trained * tokens / busy:.0f}")
        faults.hit("step:fine_tuning")
        if validation is not None and reference is not None and ((i + 1) % ft.eval_every == 0 or i + 1 == n_round):
            if _validated(ctx, session, out, validation, reference, params, step + 1):
                break
    out.tokens_per_s = out.trained * tokens / max(busy, 1e-9)  # training steps only, validations not counted
    ctx.model = accelerator.unwrap_model(prepared)
    session.optimizer, session.adam_step = _optimizer_state(optimizer, names)
    session.rng = torch.get_rng_state()
    return out


def _validated(ctx: RunContext, session: Session, out: _Outcome, validation: torch.Tensor,
               reference: dict[str, torch.Tensor], params: dict[str, torch.nn.Parameter], step: int) -> bool:
    """Validate at ``step`` (the run's step count after it); keep the best weights; True when patience ran out."""
    ft = ctx.config.finetune
    ctx.model.eval()
    try:
        loss, kl = _validate(ctx, validation, reference)
    finally:
        ctx.model.train()
    out.val_step.append(float(step))
    out.val_loss.append(loss)
    out.val_kl.append(kl)
    ctx.log.info("finetune_validation", step=step, val_loss=round(loss, 5), val_kl=round(kl, 5))
    if session.best_loss is None or loss < session.best_loss:
        session.best_loss, session.best_step, session.bad_validations = loss, step, 0
        ctx.state.finetune_best = {n: p.detach().cpu().clone() for n, p in params.items()}
        out.new_best = True
        return False
    session.bad_validations += 1
    if ft.early_stopping_patience is not None and session.bad_validations >= ft.early_stopping_patience:
        session.stopped_early = True
        return True
    return False


def _checkpoint(ctx: RunContext, session: Session, out: _Outcome, params: dict[str, torch.nn.Parameter],
                first: int, done: int, n_round: int) -> StageResult:
    """Advance the counters, keep the best weights at the round's end, write the interval's artifacts."""
    ft, st = ctx.config.finetune, ctx.state
    start_step = st.counters.step
    finished = session.stopped_early or done + out.trained >= n_round
    st.counters.step = first + n_round if finished else start_step + out.trained  # early stop: the budget is over
    session.step = st.counters.step
    restored = False
    if finished and st.finetune_best is not None and session.best_step is not None \
            and session.best_step != start_step + out.trained:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(st.finetune_best[name].to(p.device))
        restored = True
    tag = f"step{session.step:08d}"
    ctx.save_tensors("weights", {n: p for n, p in params.items()}, name=tag, group=False)
    tensors, metadata = session.to_tensors()
    ctx.save_tensors(STATE_KIND, tensors, name=tag, group=False, metadata=metadata)
    if out.new_best and st.finetune_best is not None and not finished:
        ctx.save_tensors(BEST_KIND, st.finetune_best, name=tag, group=False)
    st.finetune_session = None if finished else session
    if finished:
        st.finetune_best = None
    series: dict[str, list[float]] = {"loss": out.losses, "lm_loss": out.lm, "lr": out.lr,
                                      "pruned_max_abs_after_step": out.leaks}
    if ft.loss != "lm":
        series["kd_loss"] = out.kd
    if ft.hidden_weight > 0.0:
        series["hidden_loss"] = out.hidden
    if out.val_step:
        series.update(val_step=out.val_step, val_loss=out.val_loss, val_kl=out.val_kl)
    metrics: dict[str, Any] = {
        "skipped": False, "steps": out.trained, "first_step": start_step, "round_steps": n_round,
        "first_loss": out.losses[0], "last_loss": out.losses[-1], "loss": ft.loss,
        "trained": "all" if ctx.config.structure.enabled else ft.train,
        "tokens_per_s": round(out.tokens_per_s, 1), "finished_round": finished,
        "autocast": session.autocast,
        "stopped_early": session.stopped_early}
    if session.best_step is not None:
        metrics.update(best_step=session.best_step, best_val_loss=session.best_loss, kept_best=restored)
    return StageResult(stage=STAGE.value, series=series, metrics=metrics)
