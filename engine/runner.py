"""The runner: binds stage handlers to the machine's on-enter hooks, checkpoints each result, writes the audit
record of every move, and fires the next trigger after the hook returns (so nothing nests).

Order of one step: choose the trigger → the machine checks conditions → ``_before`` appends the audit line (the
move is durable from here) → the destination's on-enter hook runs its handler → the result is checkpointed
(artifacts recorded, manifest written last, with the move's history entry). A move into a terminal state
(Complete, Failed) has no handler: ``_before`` writes the manifest itself. A handler that raises is recorded
once and the next step fires ``fail``. So the manifest is written once per move; while a handler runs it still
shows the previous state, and the audit log holds the move in progress (resume and ``podar status`` adopt it:
``reconcile_history``).
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

from podar.schemas.errors import StageError
from podar.schemas.records import AuditEvent, FailureInfo, HistoryEntry, RunManifest, StageResult

from . import faults
from .audit import AuditLog
from .context import Cancelled, Handler, RunContext
from .machine import PruningStage, build_machine, fire
from .store import utc_now

__all__ = ["Runner", "TransitionListener"]

TransitionListener = Callable[[AuditEvent], None]

# Triggers that leave a state when nothing failed; the runner picks among them by the run's counters.
_FORWARD: dict[PruningStage, str] = {
    PruningStage.IDLE: "start",
    PruningStage.CALIBRATING: "calibrated",
    PruningStage.COMPUTING_IMPORTANCE: "scored",
    PruningStage.EVALUATING: "evaluated",
    PruningStage.EXPORTING: "exported",
}


class Runner:
    """Drives one run. ``state`` is the machine's state name (transitions' model attribute)."""

    state: str

    def __init__(
        self,
        ctx: RunContext,
        handlers: Mapping[PruningStage, Handler],
        manifest: RunManifest,
        audit: AuditLog,
        *,
        initial: PruningStage = PruningStage.IDLE,
    ) -> None:
        missing = [s.display for s in PruningStage if s.is_active() and s not in handlers]
        if missing:
            raise ValueError(f"no handler for stage(s): {', '.join(missing)}")
        self.ctx = ctx
        self.handlers = dict(handlers)
        self.manifest = manifest
        self.audit = audit
        self.listeners: list[TransitionListener] = []
        self.last_result: StageResult | None = None
        self.failure: FailureInfo | None = None
        self._pending_failure: FailureInfo | None = None
        self._last_event: AuditEvent | None = None
        self.resume_target: PruningStage | None = None  # set by Pipeline.resume: the stage to redo
        self.machine = build_machine(
            self, condition=self.condition, initial=initial, on_enter=self._on_enter, before=self._before
        )

    # ------------------------------------------------------------ what the machine asks
    @property
    def stage(self) -> PruningStage:
        return PruningStage(self.state)

    def condition(self, name: str) -> bool:
        cfg, st = self.ctx.config, self.ctx.state
        if name == "needs_calibration":
            return cfg.method.requires_calibration()
        if name == "more_layer_groups":
            return st.more_layer_groups
        if name == "more_pruning_rounds":
            return st.round_index + 1 < cfg.schedule.num_pruning_steps()
        if name == "gate_passed":
            return self.last_result is None or self.last_result.outcome != "gate_failed"
        raise KeyError(f"unknown condition {name!r}")

    def next_trigger(self) -> str:
        """The trigger the next step fires."""
        if self._pending_failure is not None:
            return "fail"
        stage = self.stage
        if stage is PruningStage.IDLE and self.resume_target is not None:
            return f"resume_{self.resume_target.value}"
        if stage is PruningStage.PRUNING:
            return "next_group" if self.condition("more_layer_groups") else "pruned"
        if stage is PruningStage.FINE_TUNING:
            return "next_round" if self.condition("more_pruning_rounds") else "finetuned"
        if stage.is_terminal():
            raise StageError(f"the run is already {stage.display}; nothing to do", stage=stage.display)
        return _FORWARD[stage]

    # ------------------------------------------------------------ driving
    def step(self) -> PruningStage:
        """Advance exactly one transition (running the new state's handler). Returns the new stage."""
        if self.ctx.cancel_event.is_set() and self._pending_failure is None and not self.stage.is_terminal():
            self._pending_failure = self._failure_from(Cancelled("cancelled"), self.stage)
        try:
            fire(self, self.next_trigger())
        except KeyboardInterrupt as e:  # Ctrl-C outside a handler (e.g. during a checkpoint write)
            if self.stage.is_terminal():
                raise
            self._pending_failure = self._failure_from(e, self.stage)
            fire(self, "fail")
        event = self._last_event
        if event is not None:
            for listener in list(self.listeners):
                listener(event)
        return self.stage

    def run(self) -> PruningStage:
        """Step until Complete or Failed."""
        while not self.stage.is_terminal():
            self.step()
        return self.stage

    # ------------------------------------------------------------ callbacks
    def _before(self, event: Any) -> None:
        """Audit line for the move about to happen (durable before the next stage starts); the manifest too when
        the destination is terminal (otherwise the checkpoint after the handler writes it)."""
        trigger = event.event.name
        source, dest = event.transition.source, event.transition.dest
        st = self.ctx.state
        if trigger.startswith("resume_"):
            self.resume_target = None
        if trigger == "next_group":
            st.group_index += 1
        elif trigger == "next_round":
            st.round_index += 1
            st.group_index = 0
        finished = self.last_result if self.last_result and self.last_result.stage == source else None
        error = None
        if trigger == "fail" or (trigger == "evaluated" and dest == PruningStage.FAILED.value):
            error = self._pending_failure
            if error is None and finished is not None and finished.outcome == "gate_failed":
                error = FailureInfo(
                    type="QualityGateError", message="; ".join(finished.notes) or "a quality gate failed",
                    stage=PruningStage(source).display, reason="quality_gate",
                )
            self.failure = error
        record = self.audit.write(
            trigger=trigger, source=source, dest=dest, at=utc_now(),
            duration_s=None if finished is None else round(finished.duration_s, 6),
            metrics={} if finished is None else finished.summary(), error=error,
        )
        self._last_event = record
        m = self.manifest
        m.history.append(HistoryEntry(seq=record.seq, trigger=trigger, source=source, dest=dest, at=record.at))
        m.state = dest
        m.audit_head_sha256 = self.audit.head_sha256
        m.progress = self._progress()
        if error is not None:
            m.failure = error
        if PruningStage(dest).is_terminal():  # no handler and no checkpoint follow: this is the move's record
            self._write_manifest()
        self.ctx.log.info(
            "transition", trigger=trigger, source=PruningStage(source).display, dest=PruningStage(dest).display,
            duration_s=record.duration_s, **({"error": error.message} if error else {}),
        )

    def _on_enter(self, event: Any) -> None:
        stage = PruningStage(event.state.name)
        if stage.is_terminal():
            self._pending_failure = None
            return
        handler = self.handlers[stage]
        ctx = self.ctx
        ctx.new_artifacts.clear()
        ctx.current_layer = None
        written_s, written_b = ctx.store.write_seconds, ctx.store.write_bytes
        started = time.perf_counter()
        try:
            result = handler(ctx)
        except (Exception, KeyboardInterrupt) as e:  # routed to `fail` exactly once, by the next step
            self._pending_failure = self._failure_from(e, stage)
            ctx.log.error("stage_failed", stage=stage.display, error=self._pending_failure.message,
                          layer=self._pending_failure.layer, error_type=self._pending_failure.type)
            return
        result.duration_s = time.perf_counter() - started
        if result.stage != stage.value:
            result.stage = stage.value
        self.last_result = result
        self._checkpoint(result, written_s, written_b)
        ctx.log.info("stage_done", stage=stage.display, duration_s=round(result.duration_s, 3), **result.summary())

    def record_resume(self, from_state: str, note: str) -> None:
        """Append the ``resumed`` audit record (the run restarts at Idle) and note it in the manifest."""
        record = self.audit.write(event="resumed", trigger="resume", source=from_state,
                                  dest=PruningStage.IDLE.value, at=utc_now(), metrics={"note": note})
        self.manifest.resumes.append({"at": record.at, "from_state": from_state, "seq": record.seq, "note": note})
        self.manifest.state = PruningStage.IDLE.value
        self.manifest.failure = None
        self.manifest.audit_head_sha256 = self.audit.head_sha256
        self._write_manifest()

    # ------------------------------------------------------------ helpers
    def _checkpoint(self, result: StageResult, written_s: float, written_b: int) -> None:
        m = self.manifest
        store = self.ctx.store
        for rel, record in self.ctx.new_artifacts.items():
            m.artifacts[rel] = record
        result.artifacts = sorted(set(result.artifacts) | set(self.ctx.new_artifacts))
        result.progress = self._progress()
        # the cost of this checkpoint's artifacts (the manifest write that follows is not included)
        result.checkpoint_s = store.write_seconds - written_s
        result.checkpoint_bytes = store.write_bytes - written_b
        m.results.append(result)
        m.progress = self._progress()
        self._write_manifest()
        faults.hit(f"after:{result.stage}")

    def _progress(self) -> dict[str, Any]:
        st = self.ctx.state
        return {"round_index": st.round_index, "group_index": st.group_index, "step": st.step,
                "more_layer_groups": st.more_layer_groups}

    def _write_manifest(self) -> None:
        self.manifest.updated_at = utc_now()
        self.ctx.store.write_manifest(self.manifest)

    def _failure_from(self, error: BaseException, stage: PruningStage) -> FailureInfo:
        layer = getattr(error, "layer", None) or self.ctx.current_layer
        if isinstance(error, KeyboardInterrupt):
            reason, message = "interrupted", "interrupted (KeyboardInterrupt)"
        elif isinstance(error, Cancelled):
            reason, message = error.reason, str(error)
        else:
            reason = "error"
            message = str(error) or type(error).__name__
            tb = traceback.extract_tb(error.__traceback__)
            if tb and not isinstance(error, StageError):
                last = tb[-1]
                message += f" (at {last.filename.rsplit('/', 1)[-1]}:{last.lineno})"
        return FailureInfo(type=type(error).__name__, message=message, stage=stage.display, layer=layer,
                           reason=reason)
