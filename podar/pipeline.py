"""The library entry point: ``Pipeline(config, run_dir=..., model=None, tokenizer=None).run()``.

Composes the three packages: validates the config against the model before any work, prepares the run folder
(lock, manifest, audit log), and hands the stage handler table to the engine's runner.
"""

from __future__ import annotations

import importlib.metadata
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import structlog
import torch
from safetensors import safe_open

from podar.engine.audit import AuditLog, read_audit, verify_audit
from podar.engine.context import DenseSnapshot, RunContext, RunState
from podar.engine.data import check_tokenizer_fits, load_text, resolve_data_dir, text_sha256
from podar.engine.distributed import make_accelerator, world_size
from podar.engine.machine import PruningStage
from podar.engine.memory import file_backed_ranges, page_out_file_backed
from podar.engine.models import load_model, weights_fingerprint
from podar.engine.report import write_report
from podar.engine.runner import Runner, TransitionListener
from podar.engine.store import RunStore, atomic_write_bytes, sha256_file, utc_now
from podar.schemas.config import PruningConfig
from podar.schemas.errors import AuditError, CheckpointError, ConfigError, DataError
from podar.schemas.records import FailureInfo, HistoryEntry, RunManifest, StageResult
from podar.stages import HANDLERS
from podar.stages.bitpack import unpack_bits
from podar.stages.calibrate import calibration_samples, plan_sequential
from podar.stages.common import PackedMasks, adopt_weights, apply_mask
from podar.stages.targets import resolve_targets, snapshot_weights

__all__ = ["Pipeline", "PipelineResult", "library_versions", "run_masks"]

DENSE_REFERENCE = "artifacts/dense_reference"  # folder: the pruned layers' weights before pruning, in parts
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
        self._resume: dict[str, Any] | None = None
        self._cancel_early = False

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

    def _finish(self) -> None:
        """Write report.json / report.md / plots (a failure here is logged, never changes the outcome)."""
        try:
            if self._store is not None and self._store.is_main:
                write_report(self._store.run_dir)
        except Exception as e:  # the run's outcome is already durable; the report can be rebuilt later
            self._log.warning("report_failed", error=str(e), hint="podar report RUN_DIR rebuilds it")
        finally:
            self._release()

    def result(self) -> PipelineResult:
        runner = self._ensure_runner()
        metrics: dict[str, dict[str, Any]] = {}
        for r in runner.manifest.results:
            metrics[r.stage] = dict(r.metrics)
        return PipelineResult(stage=runner.stage, run_id=self.run_id, run_dir=self.run_dir, metrics=metrics,
                              failure=runner.failure)

    # ------------------------------------------------------------ resume
    @classmethod
    def resume(
        cls,
        run_dir: str | Path,
        *,
        config: PruningConfig | Mapping[str, Any] | str | Path | None = None,
        model: Any = None,
        tokenizer: Any = None,
        allow_config_change: bool = False,
        allow_model_change: bool = False,
        allow_data_change: bool = False,
        progress: bool = True,
        logger: Any = None,
    ) -> Pipeline:
        """A Pipeline that continues the run in ``run_dir`` from its last complete checkpoint.

        Refuses (CheckpointError, saying what differs and how to override) a changed config, a different model
        or data hash, an artifact whose sha256 does not match, or a missing artifact. ``run()`` then continues.
        """
        store = RunStore(run_dir)
        if not store.has_manifest():
            raise CheckpointError(
                f"'{store.manifest_path}' does not exist: the run in '{store.run_dir}' never wrote its first "
                "checkpoint, so there is nothing to resume; start it again with the same --run-dir")
        manifest = store.read_manifest()
        saved = PruningConfig.from_dict(manifest.config, source=f"{store.manifest_path}")
        if config is None:
            config = saved
        pipe = cls(config, run_dir=run_dir, model=model, tokenizer=tokenizer, progress=progress, logger=logger)
        if pipe.config.sha256() != manifest.config_sha256 and not allow_config_change:
            old, new = saved.model_dump(mode="json"), pipe.config.model_dump(mode="json")
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise CheckpointError(
                f"the config differs from the run's (fields: {', '.join(changed) or 'canonical form'}); resume "
                "with the run's own config, or pass allow_config_change=True (--allow-config-change)")
        pipe.run_id = manifest.run_id
        pipe._log = (logger or structlog.get_logger("podar")).bind(run_id=manifest.run_id)
        pipe._resume = {"manifest": manifest, "allow_model_change": allow_model_change,
                        "allow_data_change": allow_data_change}
        return pipe

    # ------------------------------------------------------------ preparation (before any work)
    def _ensure_runner(self) -> Runner:
        if self._runner is None:
            self._runner = self._prepare()
            if self._cancel_early:
                self._runner.ctx.cancel_event.set()
        return self._runner

    def _release(self) -> None:
        if self._store is not None:
            self._store.lock.release()

    def _prepare(self) -> Runner:
        store = RunStore(self.run_dir)
        resuming = self._resume is not None
        if store.has_manifest() and not resuming:
            raise CheckpointError(
                f"run folder '{store.run_dir}' already holds a run ({store.manifest_path.name}); choose a new "
                "--run-dir, or resume it (podar resume)")
        store.prepare()
        store.lock.acquire()
        self._store = store
        try:
            if store.lock.took_over is not None:
                self._log.warning("stale_lock_taken_over", previous=store.lock.took_over)
            ctx = self._context(store)
            return self._resumed_runner(ctx) if resuming else self._fresh_runner(ctx)
        except BaseException:
            store.lock.release()
            raise

    def _context(self, store: RunStore) -> RunContext:
        """Load and check everything a run needs, before any work: model, tokenizer, targets, texts."""
        cfg = self.config
        log = self._log
        accelerator = make_accelerator(cfg.device)
        store.is_main = accelerator.is_main_process
        if self._model is None:
            self._model, self._tokenizer = load_model(cfg.model)
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

        state = RunState(targets=targets, masks=PackedMasks())
        ctx = RunContext(config=cfg, model=model, tokenizer=tokenizer, accelerator=accelerator, store=store,
                         log=log, run_id=self.run_id, state=state, progress=self._progress)
        data_sha = state.extras.setdefault("data_sha256", {})
        if cfg.method.requires_calibration():
            calibration_samples(ctx)
            plan_sequential(ctx)
        if cfg.evaluation.enabled:  # tokenized when Evaluating runs; here: present, and not obviously too short
            for i, dataset in enumerate(cfg.evaluation.datasets()):
                text = load_text(dataset, resolve_data_dir(cfg.data_dir), field="evaluation.dataset")
                if len(text) < cfg.evaluation.sequence_length:
                    raise DataError(
                        f"evaluation text '{dataset}' has {len(text)} characters, fewer than one window of "
                        f"evaluation.sequence_length={cfg.evaluation.sequence_length} tokens")
                data_sha["evaluation" if i == 0 else f"evaluation:{dataset}"] = text_sha256(text)
                del text
        if cfg.finetune.enabled:
            text = load_text(cfg.finetune.dataset, resolve_data_dir(cfg.data_dir), field="finetune.dataset")
            data_sha["finetune"] = text_sha256(text)
        # hashing and the dense reference read every weight at once: pages mapped from the model's file are let
        # go right after (calibration brings each block's back when it gets there), so they are not all resident
        ranges = file_backed_ranges()
        state.extras["model_fingerprint"] = weights_fingerprint(
            model, after_each=lambda t: page_out_file_backed([t], ranges))
        dense_dir = store.artifact_path(DENSE_REFERENCE)
        parts = sorted(dense_dir.glob("part-*.safetensors")) if self._resume is not None else []
        if not parts:  # the dense reference lives on disk, not in memory
            parts = snapshot_weights(targets, dense_dir, after_part=lambda ws: page_out_file_backed(ws, ranges))
        state.dense_weights = DenseSnapshot(parts)
        state.extras["dense_reference_parts"] = [str(p.relative_to(store.run_dir)) for p in parts]
        log.info("targets_resolved", n_pruned=len(targets), pruned=list(targets), skipped=notes,
                 groups=len(state.layer_groups) or 1)
        return ctx

    def _fresh_runner(self, ctx: RunContext) -> Runner:
        cfg, store = self.config, ctx.store
        now = utc_now()
        manifest = RunManifest(
            run_id=self.run_id, created_at=now, updated_at=now, config=cfg.model_dump(mode="json"),
            config_sha256=cfg.sha256(), state=PruningStage.IDLE.value, versions=library_versions(),
            world_size=world_size(ctx.accelerator), model_fingerprint=ctx.state.extras["model_fingerprint"],
            data_sha256=dict(ctx.state.extras["data_sha256"]),
        )
        for rel in ctx.state.extras["dense_reference_parts"]:
            manifest.artifacts[rel] = store.record(rel, stage="idle", kind="weights")
        audit = AuditLog(store.audit_path, self.run_id)
        runner = Runner(ctx, HANDLERS, manifest, audit)
        runner.listeners.extend(self._listeners)
        store.write_manifest(manifest)
        atomic_write_bytes(store.run_dir / "config.yaml", cfg.to_yaml().encode(), fault_point="write:config")
        return runner

    def _resumed_runner(self, ctx: RunContext) -> Runner:
        info = self._resume
        store = ctx.store
        manifest = store.read_manifest()  # re-read under the lock
        if manifest.state == PruningStage.COMPLETE.value:
            raise CheckpointError(f"run '{manifest.run_id}' is Complete; there is nothing to resume")
        fp = ctx.state.extras["model_fingerprint"]
        if fp != manifest.model_fingerprint and not info["allow_model_change"]:
            raise CheckpointError(
                f"the model's weights hash {fp[:16]}… differs from the run's {str(manifest.model_fingerprint)[:16]}…; "
                "load the same model, or pass allow_model_change=True (--allow-model-change)")
        for role, sha in ctx.state.extras["data_sha256"].items():
            old = manifest.data_sha256.get(role)
            if old is not None and old != sha and not info["allow_data_change"]:
                raise CheckpointError(
                    f"the {role} text's sha256 {sha[:16]}… differs from the run's {old[:16]}…; use the same data, or "
                    "pass allow_data_change=True (--allow-data-change)")
        for record in manifest.artifacts.values():  # every recorded artifact present and intact
            path = store.artifact_path(record.path)
            if not path.is_file():
                raise CheckpointError(f"artifact '{record.path}' recorded in the manifest is missing; the run "
                                      "cannot continue from this folder (start a new run)")
            actual = sha256_file(path)
            if actual != record.sha256:
                raise CheckpointError(f"artifact '{record.path}' has sha256 {actual[:16]}…, the manifest records "
                                      f"{record.sha256[:16]}…: it was changed or corrupted (start a new run)")
        audit = AuditLog(store.audit_path, manifest.run_id)
        if audit.repaired is not None:
            self._log.warning("audit_partial_line_dropped", line=audit.repaired[:200])
        reconcile_history(manifest, store.audit_path)
        target, note = restore_state(ctx, manifest)
        if self.config.sha256() != manifest.config_sha256:  # allowed by allow_config_change
            note += f"; config changed (sha256 {manifest.config_sha256[:12]}… → {self.config.sha256()[:12]}…)"
            manifest.config = self.config.model_dump(mode="json")
            manifest.config_sha256 = self.config.sha256()
        runner = Runner(ctx, HANDLERS, manifest, audit)
        runner.listeners.extend(self._listeners)
        runner.last_result = None
        runner.resume_target = target
        runner.record_resume(manifest.state, note)
        self._log.info("resumed", from_state=manifest.resumes[-1]["from_state"],
                       target=target.display if target else "Idle (start)", note=note)
        return runner


def reconcile_history(manifest: RunManifest, audit_path: Path) -> None:
    """Adopt transitions the audit log holds beyond the manifest's history (a crash between the two writes).

    The audit chain is verified first; a log shorter than the history is tampering and refused.
    """
    try:
        verify_audit(audit_path, manifest.run_id)
    except AuditError as e:
        raise CheckpointError(f"the audit log does not verify, so the run cannot be resumed: {e}") from e
    transitions = [r for r in read_audit(audit_path) if r.get("event") == "transition"]
    if len(transitions) < len(manifest.history):
        raise CheckpointError(f"the audit log holds {len(transitions)} moves but the manifest {len(manifest.history)}")
    for record in transitions[len(manifest.history):]:
        manifest.history.append(HistoryEntry(seq=record["seq"], trigger=record["trigger"], source=record["source"],
                                             dest=record["dest"], at=record["at"]))
        manifest.state = record["dest"]


def restore_state(ctx: RunContext, manifest: RunManifest) -> tuple[PruningStage | None, str]:
    """Replay the checkpointed results onto the freshly loaded model; return (stage to redo, note).

    Masks are re-applied (or SparseGPT's and fine-tuning's changed weights loaded) in order; the loop counters
    come from the last result. A stage that did not finish is redone from the start of its layer group / round.
    """
    cfg, st, store = ctx.config, ctx.state, ctx.store
    modules = dict(ctx.model.named_modules())
    params = dict(ctx.model.named_parameters())
    for result in manifest.results:
        records = [manifest.artifacts[a] for a in result.artifacts if a in manifest.artifacts]
        masks = [r for r in records if r.kind == "masks"]
        weights = [r for r in records if r.kind == "weights"]
        for record in masks:
            for name, mask in _mask_artifact(store, record).items():
                st.masks[name] = mask
                if not weights:
                    apply_mask(modules[name], mask)
        for record in weights:  # mapped from the checkpoint (copy-on-write) when device and dtype agree
            tensors = store.load_tensors(record)
            adopt_weights(record.path, tensors,
                          {n: modules[n].weight if n in modules else params[n] for n in tensors})
    needs_cal = cfg.method.requires_calibration()
    restart = PruningStage.CALIBRATING if needs_cal else PruningStage.COMPUTING_IMPORTANCE
    if not manifest.results:
        return None, "nothing finished: starting from the beginning"
    last = manifest.results[-1]
    prog = last.progress
    st.round_index = int(prog.get("round_index", 0) or 0)
    st.group_index = int(prog.get("group_index", 0) or 0)
    st.step = int(prog.get("step", 0) or 0)
    n_rounds = cfg.schedule.num_pruning_steps()
    if last.stage in (PruningStage.CALIBRATING.value, PruningStage.COMPUTING_IMPORTANCE.value):
        return restart, f"redo layer group {st.group_index} of round {st.round_index}"
    if last.stage == PruningStage.PRUNING.value:
        if prog.get("more_layer_groups"):
            st.group_index += 1
            return restart, f"continue with layer group {st.group_index} of round {st.round_index}"
        return PruningStage.FINE_TUNING, f"pruning round {st.round_index} done: fine-tuning next"
    if last.stage == PruningStage.FINE_TUNING.value:
        if st.round_index + 1 < n_rounds:
            st.round_index += 1
            st.group_index = 0
            return restart, f"continue with pruning round {st.round_index}"
        return PruningStage.EVALUATING, "pruning and fine-tuning done: evaluating next"
    if last.stage == PruningStage.EVALUATING.value:
        if last.outcome == "gate_failed":
            raise CheckpointError("the run failed its quality gate; resuming would export a model the gate refused "
                                  "(change the gates in a new run, or set on_fail: warn)")
        return PruningStage.EXPORTING, "evaluation done: exporting next"
    # the export finished but the run stopped before the move to Complete: export again (same bytes)
    return PruningStage.EXPORTING, "export done but not confirmed: exporting again"


def _mask_artifact(store: RunStore, record: Any) -> dict[str, torch.Tensor]:
    """The masks (out, in) bool, True = kept, of one mask artifact (its sha256 checked on load)."""
    shapes = json.loads(safetensors_metadata(store.artifact_path(record.path))["shapes"])
    return {name: unpack_bits(packed, shapes[name][1]) for name, packed in store.load_tensors(record).items()}


def run_masks(run_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every layer's mask (out, in) bool, True = kept, as a run folder recorded it (the latest per layer, in the
    order the masks were written). Reads only; each artifact's sha256 is checked against the manifest."""
    store = RunStore(run_dir)
    manifest = store.read_manifest()
    out: dict[str, torch.Tensor] = {}
    for result in manifest.results:
        for rel in result.artifacts:
            record = manifest.artifacts.get(rel)
            if record is not None and record.kind == "masks":
                out.update(_mask_artifact(store, record))
    return out


def safetensors_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})
