"""The library entry point: ``Pipeline(config, run_dir=..., model=None, tokenizer=None).run()``.

Composes the three packages: validates the config against the model before any work (``podar._setup``),
prepares the run folder (lock, manifest, audit log), and hands the stage handler table to the engine's runner.
``Pipeline.resume`` continues a run from its folder (``podar._resume``).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from podar.engine.audit import AuditLog, audit_key
from podar.engine.context import DenseReference, RunContext
from podar.engine.distributed import Dist, make_accelerator, together
from podar.engine.logs import library_logger
from podar.engine.machine import next_move
from podar.engine.models import memory_model_name, model_info
from podar.engine.report import pruning_summary, write_report
from podar.engine.runner import Runner, TransitionListener, expected, first_resume_point
from podar.engine.store import RunStore, atomic_write_bytes, sha256_file, utc_now
from podar.schemas.config import PruningConfig
from podar.schemas.errors import CheckpointError
from podar.schemas.records import FailureInfo, HistoryEntry, RunManifest, StageResult
from podar.schemas.stage import PruningStage
from podar.stages import HANDLERS

from ._resume import (
    ResumeRequest,
    adopt_audit_tail,
    changed_fields,
    check_artifacts,
    check_config_change,
    check_inputs,
    compute_dtype_name,
    restore_checkpoints,
    resume_stage,
    resumed_reference,
    run_masks,
    saved_config,
)
from ._setup import fingerprint, library_versions, load_inputs, model_file_reference, write_dense_parts

__all__ = ["Pipeline", "PipelineResult", "library_versions", "run_masks"]


@dataclass
class PipelineResult:
    """How a run ended: its final stage, every stage's metrics, and the failure when there is one."""

    stage: PruningStage
    run_id: str
    run_dir: Path
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage value → metrics of its last visit
    failure: FailureInfo | None = None
    results: list[StageResult] = field(default_factory=list)  # every stage result, in order
    audit_head_sha256: str | None = None  # sha256 of the last audit line: keep it to check the log later
    main_process: bool = True  # False on the other processes of a multi-process run (they write nothing)

    @property
    def ok(self) -> bool:
        return self.stage is PruningStage.COMPLETE

    @property
    def export_dir(self) -> Path | None:
        path = self.run_dir / "export"
        return path if self.ok and path.is_dir() else None

    @property
    def pruned_layers(self) -> int:
        """Layers pruned over the whole run (every layer group and round)."""
        return pruning_summary(self.results)[0]

    @property
    def achieved_sparsity(self) -> float | None:
        """Zeros / weights over every pruned layer, at the end of the run's last pruning."""
        return pruning_summary(self.results)[1]


def _as_config(config: PruningConfig | Mapping[str, Any] | str | Path) -> PruningConfig:
    if isinstance(config, PruningConfig):
        return config.with_resolved_paths([Path.cwd()])
    if isinstance(config, Mapping):
        return PruningConfig.from_dict(config).with_resolved_paths([Path.cwd()])
    return PruningConfig.from_file(config)


class Pipeline:
    """One pruning run over a model, driven by the state machine.

    ``config``: a PruningConfig, a mapping, or a path to a YAML/JSON file. ``model``/``tokenizer``: an already
    loaded model (orchestration code) instead of ``config.model``. ``run_dir``: the run folder (default
    ``runs/<run id>``). Nothing happens until ``run()`` or ``step()``.
    """

    def __init__(self, config: PruningConfig | Mapping[str, Any] | str | Path, run_dir: str | Path | None = None,
                 model: Any = None, tokenizer: Any = None, *, progress: bool = True, logger: Any = None) -> None:
        self.config = _as_config(config)
        if model is not None:  # the model pruned is this one, not what config.model names: the run records it
            self.config = self.config.with_overrides({"model.kind": "memory", "model.name": memory_model_name(model)},
                                                     source="the model handed in")
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        kind = self.config.method.name
        if self.config.structure.enabled:
            kind = f"structure-{kind}" if self.config.target_sparsity > 0 else "structure"
        self.run_id = f"{stamp}-{kind}-{uuid.uuid4().hex[:8]}"
        self.run_dir = Path(run_dir) if run_dir is not None else Path("runs") / self.run_id
        self._model = model
        self._tokenizer = tokenizer
        self._progress = progress
        self._logger = logger
        self._log = (logger or library_logger()).bind(run_id=self.run_id)
        self._listeners: list[TransitionListener] = []
        self._runner: Runner | None = None
        self._store: RunStore | None = None
        self._resume: ResumeRequest | None = None
        self._cancel_reason: str | None = None

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

    @property
    def context(self) -> RunContext | None:
        """The run context once prepared (model, state, store): for orchestration and introspection."""
        return None if self._runner is None else self._runner.ctx

    def subscribe(self, callback: TransitionListener) -> None:
        """Call ``callback(audit_event)`` after each transition, once its audit line and manifest are on disk."""
        self._listeners.append(callback)
        if self._runner is not None:
            self._runner.listeners.append(callback)

    def cancel(self, reason: str = "cancelled") -> None:
        """Ask the run to stop (thread-safe): it ends in Failed with ``reason`` at the next check, resumable."""
        if self._runner is not None:
            self._runner.ctx.cancel_reason = reason
            self._runner.ctx.cancel_event.set()
        else:
            self._cancel_reason = reason

    def step(self) -> PruningStage:
        """Advance exactly one transition (preparing the run on the first call). Returns the new stage."""
        runner = self._ensure_runner()
        try:
            stage = runner.step()
        except BaseException:
            self._release()
            raise
        if stage.is_terminal():
            self._finish()
        return stage

    def run(self) -> PipelineResult:
        """Drive the machine to Complete or Failed, write the report, and return the result."""
        runner = self._ensure_runner()
        try:
            runner.run()
        except BaseException:
            self._release()
            raise
        self._finish()
        return self.result()

    def result(self) -> PipelineResult:
        runner = self._ensure_runner()
        metrics: dict[str, dict[str, Any]] = {}
        for r in runner.manifest.results:
            metrics[r.stage] = dict(r.metrics)
        return PipelineResult(stage=runner.stage, run_id=self.run_id, run_dir=self.run_dir, metrics=metrics,
                              failure=runner.failure, results=list(runner.manifest.results),
                              audit_head_sha256=runner.audit.head_sha256, main_process=runner.ctx.dist.is_main)

    # ------------------------------------------------------------ resume
    @classmethod
    def resume(cls, run_dir: str | Path, *, config: PruningConfig | Mapping[str, Any] | str | Path | None = None,
               overrides: Mapping[str, Any] | None = None, model: Any = None, tokenizer: Any = None,
               allow_config_change: bool = False, allow_model_change: bool = False, allow_data_change: bool = False,
               allow_world_change: bool = False, progress: bool = True, logger: Any = None) -> Pipeline:
        """A Pipeline that continues the run in ``run_dir`` from its last complete checkpoint.

        ``overrides``: dotted-path changes of the run's config (``{"evaluation.gates.on_fail": "warn"}``), taken as
        asked (no ``allow_config_change`` needed); ``config``: a whole config instead of the run's own. A changed
        field is refused when the stage it shapes has a result the resume keeps (it could no longer take effect);
        a changed quality gate lets a run that failed its gate evaluate again and export. Refuses (CheckpointError,
        saying what differs and how to override) a different model or data hash, another number of processes, an
        artifact whose sha256 does not match, or a missing artifact. ``run()`` then continues.
        """
        store = RunStore(run_dir)
        if not store.has_manifest():
            raise CheckpointError(
                f"'{store.manifest_path}' does not exist: the run in '{store.run_dir}' never wrote its first "
                "checkpoint, so there is nothing to resume; start it again with the same --run-dir")
        manifest = store.read_manifest()
        saved = saved_config(store, manifest)
        new = _as_config(saved if config is None else config)
        if overrides:
            new = new.with_overrides(overrides, source="the resume's overrides").with_resolved_paths([Path.cwd()])
        fields = changed_fields(saved, new)
        if fields and config is not None and not allow_config_change:
            raise CheckpointError(
                f"the config differs from the run's (fields: {', '.join(fields)}); resume with the run's own "
                "config, or pass allow_config_change=True (--allow-config-change)")
        check_config_change(fields, manifest)
        gates_changed = any(f.startswith("evaluation.") for f in fields)
        if manifest.failure is not None and manifest.failure.reason == "quality_gate" and not gates_changed:
            raise CheckpointError("the run failed its quality gate; resuming as it is would export a model the gate "
                                  "refused. Resume with changed gates to evaluate again on the recorded masks "
                                  "(podar resume RUN --set evaluation.gates.on_fail=warn, or a relaxed "
                                  "evaluation.gates.max_perplexity_increase_pct)")
        pipe = cls(new, run_dir=run_dir, model=model, tokenizer=tokenizer, progress=progress, logger=logger)
        pipe.run_id = manifest.run_id
        pipe._log = (logger or library_logger()).bind(run_id=manifest.run_id)
        pipe._resume = ResumeRequest(allow_model_change=allow_model_change, allow_data_change=allow_data_change,
                                     allow_world_change=allow_world_change, config_changes=tuple(fields))
        return pipe

    # ------------------------------------------------------------ preparation (before any work)
    def _ensure_runner(self) -> Runner:
        if self._runner is None:
            self._runner = self._prepare()
            if self._cancel_reason is not None:
                self.cancel(self._cancel_reason)
        return self._runner

    def _release(self) -> None:
        if self._store is not None:
            self._store.lock.release()

    def _finish(self) -> None:
        """Write report.json / report.md / plots (a failure here is logged, never changes the outcome)."""
        try:
            if self._store is not None and self._store.is_main:
                write_report(self._store.run_dir)
        except Exception as e:  # the run's outcome is already durable; the report can be rebuilt later
            self._log.warning("report_failed", error=str(e), hint="podar report RUN_DIR rebuilds it")
        finally:
            self._release()

    def _prepare(self) -> Runner:
        accelerator = make_accelerator(self.config.device)
        dist = Dist(accelerator)
        if dist.world > 1:  # every rank runs the main rank's run, in its folder
            self.run_id = dist.broadcast_text(self.run_id)
            self.run_dir = Path(dist.broadcast_text(str(self.run_dir)))
            self._log = (self._logger or library_logger()).bind(run_id=self.run_id, rank=dist.rank)
        store = RunStore(self.run_dir, key=audit_key(), is_main=dist.is_main)
        together(dist, lambda: self._claim(store) if dist.is_main else None)
        self._store = store
        try:
            if self._resume is not None:
                return self._resumed_runner(store, accelerator, dist)
            return self._fresh_runner(store, accelerator, dist)
        except BaseException:
            store.lock.release()
            raise

    def _claim(self, store: RunStore) -> None:
        """The main process's hold on the run folder: a new run in an empty one, or the lock of the run to resume."""
        if store.has_manifest() and self._resume is None:
            raise CheckpointError(f"run folder '{store.run_dir}' already holds a run ({store.manifest_path.name}); "
                                  "choose a new --run-dir, or resume it (podar resume)")
        foreign = [] if self._resume is not None else store.foreign_entries()
        if foreign:
            raise CheckpointError(f"run folder '{store.run_dir}' is not empty and holds no podar run "
                                  f"({', '.join(foreign[:5])}{' …' if len(foreign) > 5 else ''}): podar starts a run "
                                  "only in a new or empty folder, and never writes over files it did not write; "
                                  "choose another --run-dir")
        store.prepare()
        store.lock.acquire()
        if store.lock.took_over is not None:
            self._log.warning("stale_lock_taken_over", previous=store.lock.took_over)

    def _inputs(self, store: RunStore, accelerator: Any) -> RunContext:
        ctx = load_inputs(self.config, store, self._model, self._tokenizer, accelerator=accelerator, log=self._log,
                          run_id=self.run_id, progress=self._progress)
        fingerprint(ctx)
        return ctx

    def _dense_parts(self, ctx: RunContext, dist: Dist, files: DenseReference) -> DenseReference:
        """The dense reference: the model's own files where they hold the targets, parts the main process writes
        into the run folder for the rest (read by every process)."""
        store = ctx.store
        missing = [n for n in ctx.state.targets if n not in files]
        written = together(dist, lambda: write_dense_parts(ctx, missing) if dist.is_main and missing else [])
        names = json.loads(dist.broadcast_text(json.dumps([str(p.relative_to(store.run_dir)) for p in written])))
        return files.merged(DenseReference.of_parts([store.run_dir / n for n in names])) if names else files

    def _runner_for(self, ctx: RunContext, manifest: RunManifest, audit: AuditLog) -> Runner:
        ctx.recorded = manifest.artifacts
        runner = Runner(ctx, HANDLERS, manifest, audit)
        if ctx.dist.is_main:
            runner.listeners.extend(self._listeners)
        return runner

    def _fresh_runner(self, store: RunStore, accelerator: Any, dist: Dist) -> Runner:
        cfg = self.config
        ctx = together(dist, lambda: self._inputs(store, accelerator))
        files = model_file_reference(ctx)
        # structured pruning keeps a dense copy of the model instead (stages.structure.restructure)
        ctx.state.dense_weights = DenseReference({}) if cfg.structure.enabled else self._dense_parts(ctx, dist, files)
        now = utc_now()
        manifest = RunManifest(
            run_id=self.run_id, created_at=now, updated_at=now, config=cfg.model_dump(mode="json"),
            config_sha256=cfg.sha256(), state=PruningStage.IDLE.value, versions=library_versions(),
            world_size=dist.world, model_fingerprint=ctx.state.model_fingerprint, model_info=model_info(ctx.model),
            data_sha256=dict(ctx.state.data_sha256), compute_dtype=compute_dtype_name(ctx))
        for path in ctx.state.dense_weights.paths:
            if store.run_dir in path.parents:
                rel = str(path.relative_to(store.run_dir))
                manifest.artifacts[rel] = store.record(rel, stage="idle", kind="weights")
            elif dist.is_main:  # the model's own file: recorded by its sha256, not copied
                manifest.dense_reference_files[str(path)] = sha256_file(path)
        runner = self._runner_for(ctx, manifest, AuditLog(store.audit_path, self.run_id, key=store.key,
                                                          writer=dist.is_main))
        manifest.resume_point = first_resume_point(runner.condition)
        manifest.expected_move = expected(next_move(PruningStage.IDLE, runner.condition))
        def first_checkpoint() -> None:
            if dist.is_main:
                store.write_manifest(manifest)
                atomic_write_bytes(store.run_dir / "config.yaml", cfg.to_yaml().encode(), fault_point="write:config")

        together(dist, first_checkpoint)
        return runner

    def _warn_unrecorded(self, store: RunStore, manifest: RunManifest) -> None:
        """Refuse symbolic links in the run folder; name the files no record holds (a resume never reads them)."""
        links = sorted(str(p.relative_to(store.run_dir)) for p in store.run_dir.rglob("*") if p.is_symlink())
        if links:
            raise CheckpointError(f"the run folder holds symbolic links ({', '.join(links[:5])}); a run folder holds "
                                  "plain files only, so the run cannot be resumed from it")
        unrecorded = store.unrecorded_files(manifest)
        if unrecorded:
            self._log.warning("unrecorded_files_ignored", files=unrecorded[:20], count=len(unrecorded),
                              note="no record of the manifest names them: the resumed run does not read them")

    def _resumed_runner(self, store: RunStore, accelerator: Any, dist: Dist) -> Runner:
        assert self._resume is not None
        manifest, audit, from_state, dangling, ctx = together(dist, lambda: self._check_resumable(store, accelerator,
                                                                                                   dist))
        target, note, counters = resume_stage(manifest)
        restore_checkpoints(ctx, manifest)
        ctx.state.counters = counters.model_copy()
        config_changed = self.config.sha256() != manifest.config_sha256  # fields checked by check_config_change
        if config_changed:
            note += (f"; config changed ({', '.join(self._resume.config_changes)}; sha256 "
                     f"{manifest.config_sha256[:12]}… → {self.config.sha256()[:12]}…)")
            manifest.config = self.config.model_dump(mode="json")
            manifest.config_sha256 = self.config.sha256()
        runner = self._runner_for(ctx, manifest, audit)
        if dangling is not None:  # a result no record confirms: its resume point must be the one it implies
            runner.check_resume_point(manifest.results[-1])
        dist.barrier()  # every process has read the log before the main one appends to it

        def record() -> None:
            if dist.is_main:  # podar's derived files: the config copy follows the config; the report is redone
                for name in ("report.json", "report.md"):
                    (store.run_dir / name).unlink(missing_ok=True)
                if config_changed:
                    atomic_write_bytes(store.run_dir / "config.yaml", self.config.to_yaml().encode(),
                                       fault_point="write:config")
            runner.record_resume(from_state, target, note, dangling)

        together(dist, record)
        self._log.info("resumed", from_state=from_state, target=target.display_name(), note=note)
        return runner

    def _check_resumable(self, store: RunStore, accelerator: Any, dist: Dist) -> tuple:
        """Everything a resume checks before any work; (manifest, audit log, state, dangling digest, context)."""
        assert self._resume is not None
        manifest = store.read_manifest()  # re-read under the lock
        if manifest.state == PruningStage.COMPLETE.value:
            raise CheckpointError(f"run '{manifest.run_id}' is Complete; there is nothing to resume")
        ran_with = manifest.resumes[-1].get("world_size", manifest.world_size) if manifest.resumes else \
            manifest.world_size
        if ran_with != dist.world and not self._resume.allow_world_change:
            raise CheckpointError(
                f"the run ran on {ran_with} process(es) and is resumed on {dist.world}: the work left would be "
                f"split otherwise and its result can differ in rounding; resume with {ran_with} process(es), or "
                "pass allow_world_change=True (--allow-world-change) to record the change")
        check_artifacts(store, manifest)
        if dist.is_main:
            self._warn_unrecorded(store, manifest)
        audit = AuditLog(store.audit_path, manifest.run_id, key=store.key, writer=dist.is_main)
        if audit.repaired is not None:
            self._log.warning("audit_partial_line_dropped", line=audit.repaired[:200])
        from_state, dangling = adopt_audit_tail(store, manifest, audit)
        ctx = self._inputs(store, accelerator)
        check_inputs(ctx, manifest, self._resume)
        if not self.config.structure.enabled:
            ctx.state.dense_weights = resumed_reference(ctx, manifest, model_file_reference(ctx))
        return manifest, audit, from_state, dangling, ctx
