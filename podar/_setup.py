"""Everything a run needs, loaded and checked before any work: model, tokenizer, targets, texts, the calibration
walk, the weights' fingerprint and the dense reference."""

from __future__ import annotations

import importlib.metadata
from typing import Any

from safetensors import SafetensorError

from podar.engine.context import DenseSnapshot, RunContext, RunState
from podar.engine.data import (
    calibration_windows,
    check_tokenizer_fits,
    load_text,
    resolve_data_dir,
    text_sha256,
    tokenize_text,
)
from podar.engine.distributed import make_accelerator
from podar.engine.models import load_model, model_task, weights_fingerprint
from podar.engine.runtime import Runtime
from podar.engine.store import RunStore
from podar.schemas.config import PruningConfig
from podar.schemas.errors import CheckpointError, ConfigError, DataError
from podar.schemas.records import ArtifactRecord
from podar.stages.common import PackedMasks
from podar.stages.methods import get_method
from podar.stages.targets import linearize_conv1d, resolve_targets, snapshot_weights
from podar.stages.walks import plan_walk

__all__ = ["build_context", "library_versions", "dense_reference_records"]

_VERSIONED = ("podar", "torch", "transformers", "accelerate", "safetensors", "transitions", "pydantic", "structlog")


def library_versions() -> dict[str, str]:
    out = {}
    for name in _VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _check_lengths(cfg: PruningConfig, model: Any) -> None:
    """Every window fits in the model's positions (a longer one would run, silently wrong, or fail late)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(limit, int) or limit <= 0:
        return
    for name, used, value in (("calibration.sequence_length", cfg.needs_calibration, cfg.calibration.sequence_length),
                              ("evaluation.sequence_length", cfg.evaluation.enabled, cfg.evaluation.sequence_length),
                              ("finetune.sequence_length", cfg.finetune.enabled, cfg.finetune.sequence_length)):
        if used and value > limit:
            raise ConfigError(f"{name}={value} is longer than the model's {limit} positions "
                              f"(config.max_position_embeddings); use at most {limit}")


def _load(cfg: PruningConfig, model: Any, tokenizer: Any) -> tuple[Any, Any]:
    if model is None:
        model, tokenizer = load_model(cfg.model)
    _check_lengths(cfg, model)
    task = model_task(model)
    if cfg.finetune.enabled and task != "causal-lm":
        raise ConfigError(f"finetune.enabled: masked fine-tuning trains on next-token loss, which a {task} model "
                          f"({type(model).__name__}) does not have; set finetune.enabled: false")
    needs_text = cfg.needs_calibration or cfg.evaluation.enabled or cfg.finetune.enabled
    if tokenizer is None and needs_text:
        raise ConfigError("a model was passed without a tokenizer; calibration, evaluation and fine-tuning need one: "
                          "Pipeline(config, model=model, tokenizer=tokenizer)")
    if tokenizer is not None:
        check_tokenizer_fits(tokenizer, model)
    return model, tokenizer


def _texts(ctx: RunContext) -> None:
    """Calibration samples tokenized; the other texts present, not obviously too short, and hashed."""
    cfg, st = ctx.config, ctx.state
    data_dir = resolve_data_dir(cfg.data_dir)
    if cfg.needs_calibration:
        cal = cfg.calibration
        text = load_text(cal.dataset, data_dir, field="calibration.dataset")
        ids = tokenize_text(ctx.tokenizer, text, field="calibration.dataset")
        st.calibration_samples = calibration_windows(ids, cal.num_samples, cal.sequence_length, cal.seed,
                                                     name=cal.dataset)
        st.data_sha256["calibration"] = text_sha256(text)
    if cfg.evaluation.enabled:  # tokenized when Evaluating runs
        for i, dataset in enumerate(cfg.evaluation.datasets()):
            text = load_text(dataset, data_dir, field="evaluation.dataset")
            if len(text) < cfg.evaluation.sequence_length:
                raise DataError(f"evaluation text '{dataset}' has {len(text)} characters, fewer than one window of "
                                f"evaluation.sequence_length={cfg.evaluation.sequence_length} tokens")
            st.data_sha256["evaluation" if i == 0 else f"evaluation:{dataset}"] = text_sha256(text)
    if cfg.finetune.enabled:
        st.data_sha256["finetune"] = text_sha256(load_text(cfg.finetune.dataset, data_dir, field="finetune.dataset"))


def _plan(ctx: RunContext) -> None:
    """The layer groups: the calibration walk's, or one group of every target without calibration."""
    cfg, st, log = ctx.config, ctx.state, ctx.log
    if not cfg.needs_calibration:
        st.layer_groups = [list(st.targets)]
        return
    dtype = ctx.runtime.compute_dtype(ctx.model)
    if dtype is not None:
        fields = {"dtype": str(dtype).removeprefix("torch."),
                  "model_dtype": str(ctx.runtime.model_dtype(ctx.model)).removeprefix("torch.")}
        note = ctx.method.half_precision_note
        (log.warning if note else log.info)("calibration_compute_dtype", **fields, **({"note": note} if note else {}))
    walk = cfg.resolved_walk()
    assert st.calibration_samples is not None
    plan = plan_walk(ctx.model, st.targets, walk, blocks_path=cfg.calibration.blocks,
                     blocks_per_group=cfg.calibration.blocks_per_group, samples=st.calibration_samples,
                     batch_size=cfg.calibration.batch_size, device=ctx.device, runtime=ctx.runtime,
                     progress=ctx.progress)
    if plan.reason is not None:
        log.warning("calibration_walk_fallback", asked=walk, walk=plan.walk.kind, reason=plan.reason)
    st.walk = plan.walk
    st.layer_groups = [g.names for g in plan.walk.groups]
    log.info("calibration_plan", walk=plan.walk.kind, groups=len(plan.walk.groups), blocks=plan.blocks_path)


def dense_reference_records(recorded: dict[str, ArtifactRecord]) -> list[ArtifactRecord]:
    """The dense reference's parts among a manifest's artifacts, in order."""
    return sorted((r for r in recorded.values() if r.stage == "idle" and r.kind == "weights"), key=lambda r: r.path)


def _dense_reference(ctx: RunContext, recorded: dict[str, ArtifactRecord] | None) -> None:
    """The fingerprint of every weight, and the pruned layers' weights before pruning on disk (a resumed run uses
    the parts its manifest recorded). Pages mapped from the model's file are let go after each is read."""
    st, store, runtime = ctx.state, ctx.store, ctx.runtime
    ranges = runtime.file_ranges()
    st.model_fingerprint = weights_fingerprint(ctx.model, after_each=lambda t: runtime.page_out([t], ranges))
    if recorded is not None:
        paths = [store.artifact_path(r.path) for r in dense_reference_records(recorded)]
    else:
        try:
            paths = snapshot_weights(st.targets, store.dense_reference_dir,
                                     after_part=lambda ws: runtime.page_out(ws, ranges))
        except (OSError, SafetensorError) as e:
            raise CheckpointError(f"could not write the dense reference to '{store.dense_reference_dir}': {e} "
                                  "(is the disk full?); free space or choose another --run-dir") from e
    st.dense_weights = DenseSnapshot(paths)


def build_context(cfg: PruningConfig, store: RunStore, model: Any, tokenizer: Any, *, log: Any, run_id: str,
                  progress: bool, recorded: dict[str, ArtifactRecord] | None = None) -> RunContext:
    """The run context, every input checked; ``recorded``: a resumed run's manifest artifacts."""
    accelerator = make_accelerator(cfg.device)
    store.is_main = accelerator.is_main_process
    model, tokenizer = _load(cfg, model, tokenizer)
    converted = linearize_conv1d(model)  # GPT-2's Conv1D as nn.Linear: every target an (out, in) weight
    targets, notes = resolve_targets(model, cfg)
    model.to(accelerator.device)
    model.eval()
    ctx = RunContext(config=cfg, model=model, tokenizer=tokenizer, accelerator=accelerator, store=store, log=log,
                     run_id=run_id, method=get_method(cfg.method.name), runtime=Runtime(cfg.runtime),
                     state=RunState(targets=targets, masks=PackedMasks(), task=model_task(model),
                                    converted=converted), progress=progress)
    if converted:
        log.info("conv1d_as_linear", layers=len(converted), note="restored to Conv1D for the export")
    _texts(ctx)
    _plan(ctx)
    _dense_reference(ctx, recorded)
    log.info("targets_resolved", n_pruned=len(targets), pruned=list(targets), skipped=notes,
             groups=len(ctx.state.layer_groups))
    return ctx
