"""The library entry point: ``Pipeline(config, run_dir=..., model=None, tokenizer=None).run()``.

Composes the three packages: validates the config against the model before any work, prepares the run folder
(lock, manifest, audit log), and hands the stage handler table to the engine's runner.
"""

from __future__ import annotations

import importlib.metadata
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import structlog

from podar.engine.audit import AuditLog
from podar.engine.context import RunContext, RunState
from podar.engine.data import check_tokenizer_fits
from podar.engine.distributed import make_accelerator, world_size
from podar.engine.machine import PruningStage
from podar.engine.models import load_model, weights_fingerprint
from podar.engine.runner import Runner, TransitionListener
from podar.engine.store import RunStore, atomic_write_bytes, utc_now
from podar.schemas.config import PruningConfig
from podar.schemas.errors import CheckpointError, ConfigError
from podar.schemas.records import FailureInfo, HistoryEntry, RunManifest, StageResult
from podar.stages import HANDLERS
from podar.stages.calibrate import calibration_samples
from podar.stages.evaluate import evaluation_windows
from podar.stages.sequential import decoder_layers, group_targets_by_block
from podar.stages.targets import resolve_targets, snapshot_weights

__all__ = ["Pipeline", "PipelineResult", "library_versions"]

_VERSIONED = ("podar", "torch", "transformers", "accelerate", "safetensors", "transitions", "pydantic", "structlog")


def library_versions() -> dict[str, str]:
    out = {}
    for name in _VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


@dataclass
class PipelineResult:
    """How a run ended: its final stage, every stage's metrics, and the failure when there is one."""

    stage: PruningStage
    run_id: str
    run_dir: Path
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage value → metrics of its last visit
    failure: FailureInfo | None = None

    @property
    def ok(self) -> bool:
        return self.stage is PruningStage.COMPLETE

    @property
    def export_dir(self) -> Path | None:
        path = self.run_dir / "export"
        return path if self.ok and path.is_dir() else None


class Pipeline:
    """One pruning run over a model, driven by the state machine.

    ``config``: a PruningConfig, a mapping, or a path to a YAML/JSON file. ``model``/``tokenizer``: an already
    loaded model (orchestration code) instead of ``config.model``. ``run_dir``: the run folder (default
    ``runs/<run id>``). Nothing happens until ``run()`` or ``step()``.
    """

    def __init__(
        self,
        config: PruningConfig | Mapping[str, Any] | str | Path,
        run_dir: str | Path | None = None,
        model: Any = None,
        tokenizer: Any = None,
        *,
        progress: bool = True,
        logger: Any = None,
    ) -> None:
        if isinstance(config, PruningConfig):
            self.config = config
        elif isinstance(config, Mapping):
            self.config = PruningConfig.from_dict(config)
        else:
            self.config = PruningConfig.from_file(config)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        self.run_id = f"{stamp}-{self.config.method.value}-{uuid.uuid4().hex[:8]}"
        self.run_dir = Path(run_dir) if run_dir is not None else Path("runs") / self.run_id
        self._model = model
        self._tokenizer = tokenizer
        self._progress = progress
        self._log = (logger or structlog.get_logger("podar")).bind(run_id=self.run_id)
        self._listeners: list[TransitionListener] = []
        self._runner: Runner | None = None
        self._store: RunStore | None = None

    # ------------------------------------------------------------ public surface
    @property
    def stage(self) -> PruningStage:
        return PruningStage.IDLE if self._runner is None else self._runner.stage

    @property
    def history(self) -> list[HistoryEntry]:
        return [] if self._runner is None else list(self._runner.manifest.history)

    @property
    def results(self) -> list[StageResult]:
        return [] if self._runner is None else list(self._runner.manifest.results)

    def subscribe(self, callback: TransitionListener) -> None:
        """Call ``callback(audit_event)`` after each transition, once its audit line and manifest are on disk."""
        self._listeners.append(callback)
        if self._runner is not None:
            self._runner.listeners.append(callback)

    def cancel(self) -> None:
        """Ask the run to stop (thread-safe): it ends in Failed with reason 'cancelled' at the next check."""
        if self._runner is not None:
            self._runner.ctx.cancel_event.set()
        else:
            self._cancel_early = True

    def step(self) -> PruningStage:
        """Advance exactly one transition (preparing the run on the first call). Returns the new stage."""
        runner = self._ensure_runner()
        try:
            stage = runner.step()
        except BaseException:
            self._release()
            raise
        if stage.is_terminal():
            self._release()
        return stage

    def run(self) -> PipelineResult:
        """Drive the machine to Complete or Failed and return the result."""
        runner = self._ensure_runner()
        try:
            runner.run()
        finally:
            self._release()
        return self.result()

    def result(self) -> PipelineResult:
        runner = self._ensure_runner()
        metrics: dict[str, dict[str, Any]] = {}
        for r in runner.manifest.results:
            metrics[r.stage] = dict(r.metrics)
        return PipelineResult(stage=runner.stage, run_id=self.run_id, run_dir=self.run_dir, metrics=metrics,
                              failure=runner.failure)

    # ------------------------------------------------------------ preparation (before any work)
    def _ensure_runner(self) -> Runner:
        if self._runner is None:
            self._runner = self._prepare()
            if getattr(self, "_cancel_early", False):
                self._runner.ctx.cancel_event.set()
        return self._runner

    def _release(self) -> None:
        if self._store is not None:
            self._store.lock.release()

    def _prepare(self) -> Runner:
        store = RunStore(self.run_dir)
        if store.has_manifest():
            raise CheckpointError(
                f"run folder '{store.run_dir}' already holds a run ({store.manifest_path.name}); choose a new "
                "--run-dir, or resume it")
        store.prepare()
        store.lock.acquire()
        self._store = store
        try:
            return self._prepare_locked(store)
        except BaseException:
            store.lock.release()
            raise

    def _prepare_locked(self, store: RunStore) -> Runner:
        cfg = self.config
        log = self._log
        if store.lock.took_over is not None:
            log.warning("stale_lock_taken_over", previous=store.lock.took_over)
        accelerator = make_accelerator(cfg.device)
        store.is_main = accelerator.is_main_process
        if self._model is None:
            model, tokenizer = load_model(cfg.model)
            self._model, self._tokenizer = model, tokenizer
        model, tokenizer = self._model, self._tokenizer
        needs_text = cfg.method.requires_calibration() or cfg.evaluation.enabled or cfg.finetune.enabled
        if tokenizer is None and needs_text:
            raise ConfigError("a model was passed without a tokenizer; calibration, evaluation and fine-tuning "
                              "need one: Pipeline(config, model=model, tokenizer=tokenizer)")
        if tokenizer is not None:
            check_tokenizer_fits(tokenizer, model)
        targets, notes = resolve_targets(model, cfg)
        model.to(accelerator.device)
        model.eval()

        state = RunState(targets=targets)
        ctx = RunContext(config=cfg, model=model, tokenizer=tokenizer, accelerator=accelerator, store=store,
                         log=log, run_id=self.run_id, state=state, progress=self._progress)
        # data checks before any work: the texts exist and are long enough
        if cfg.method.requires_calibration():
            calibration_samples(ctx)
            if cfg.calibration.sequential and decoder_layers(model) is not None:
                block_groups, name_groups = group_targets_by_block(model, targets, cfg.calibration.blocks_per_group)
                state.layer_groups = name_groups
                state.extras["block_groups"] = block_groups
        if cfg.evaluation.enabled:
            evaluation_windows(ctx)
        fingerprint = weights_fingerprint(model)
        state.extras["model_fingerprint"] = fingerprint
        state.dense_weights = snapshot_weights(targets)
        log.info("targets_resolved", pruned=len(targets), skipped=notes,
                 groups=len(state.layer_groups) or 1, first=list(targets)[:3])

        now = utc_now()
        manifest = RunManifest(
            run_id=self.run_id, created_at=now, updated_at=now, config=cfg.model_dump(mode="json"),
            config_sha256=cfg.sha256(), state=PruningStage.IDLE.value, versions=library_versions(),
            world_size=world_size(accelerator), model_fingerprint=fingerprint,
        )
        audit = AuditLog(store.audit_path, self.run_id)
        runner = Runner(ctx, HANDLERS, manifest, audit)
        runner.listeners.extend(self._listeners)
        store.write_manifest(manifest)
        atomic_write_bytes(store.run_dir / "config.yaml", cfg.to_yaml().encode())
        return runner
