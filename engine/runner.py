"""The runner: binds stage handlers to the machine's on-enter hooks, checkpoints each result, writes the audit
record of every move, and fires the next move after the hook returns (so nothing nests).

Order of one step: the machine's next move (``machine.next_move``: the first forward move whose conditions
hold; ``fail`` after a handler raised; ``resume_<stage>`` once after a resume) → its effects on the counters →
the audit line (the move is durable from here) → the destination's handler → the result is checkpointed
(artifacts recorded, the resume point, the manifest written last). A move into Complete or Failed has no
handler: its audit callback writes the manifest itself. While a handler runs, the manifest still shows the
previous state and the audit log holds the move in progress.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

from podar.schemas.errors import CheckpointError, StageError
from podar.schemas.records import (
    AuditEvent,
    ExpectedMove,
    FailureInfo,
    HistoryEntry,
    ResumePoint,
    RunManifest,
    StageResult,
)

from . import faults
from .audit import AuditLog, checkpoint_digest
from .context import Cancelled, Handler, RunContext, Terminated
from .distributed import together
from .machine import VOLATILE, Move, PruningStage, apply_effects, build_machine, fire, next_move
from .store import utc_now

__all__ = ["Runner", "TransitionListener", "first_resume_point", "expected"]

TransitionListener = Callable[[AuditEvent], None]


def first_resume_point(condition: Callable[[str], bool]) -> ResumePoint:
    """Where a run that finished no stage starts: the first move out of Idle, counters at zero."""
    move = next_move(PruningStage.IDLE, condition)
    return ResumePoint(dest=move.dest.value, note="nothing finished: starting from the beginning")


def expected(move: Move) -> ExpectedMove:
    return ExpectedMove(trigger=move.trigger, source=move.source.value, dest=move.dest.value)


class Runner:
    """Drives one run. ``state`` is the machine's state name (transitions' model attribute)."""

    state: str

    def __init__(self, ctx: RunContext, handlers: Mapping[PruningStage, Handler], manifest: RunManifest,
                 audit: AuditLog, *, initial: PruningStage = PruningStage.IDLE) -> None:
        missing = [s.display_name() for s in PruningStage if s.is_active() and s not in handlers]
        if missing:
            raise ValueError(f"no handler for stage(s): {', '.join(missing)}")
        self.ctx = ctx
        self.handlers = dict(handlers)
        self.manifest = manifest
        self.audit = audit
        self.listeners: list[TransitionListener] = []
        self.last_result: StageResult | None = None
        self._confirmed = False  # whether a move's audit record already carries last_result's digest
        self.failure: FailureInfo | None = None
        self._pending_failure: FailureInfo | None = None
        self._last_event: AuditEvent | None = None
        self.resume_target: PruningStage | None = None  # set by Pipeline.resume: the stage to redo
        self.machine = build_machine(self, condition=self.condition, initial=initial, on_enter=self._on_enter,
                                     before=self._before, counters=lambda: self.ctx.state.counters)

    # ------------------------------------------------------------ what the machine asks
    @property
    def stage(self) -> PruningStage:
        return PruningStage(self.state)

    def condition(self, name: str) -> bool:
        cfg, st = self.ctx.config, self.ctx.state
        if name == "needs_calibration":
            return cfg.needs_calibration
        if name == "more_layer_groups":
            return st.more_layer_groups
        if name == "more_pruning_rounds":
            return st.round_index + 1 < cfg.schedule.num_pruning_steps()
        if name == "more_finetune_steps":
            return st.counters.step < cfg.finetune_round_end(st.round_index)
        if name == "more_evaluation":
            r = self.last_result
            return r is not None and r.stage == PruningStage.EVALUATING.value and r.metrics.get("part") == "dense_tasks"
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
        if stage.is_terminal():
            raise StageError(f"the run is already {stage.display_name()}; nothing to do", stage=stage.display_name())
        return next_move(stage, self.condition).trigger

    # ------------------------------------------------------------ driving
    def step(self) -> PruningStage:
        """Advance exactly one transition (running the new state's handler). Returns the new stage."""
        ctx = self.ctx
        if ctx.cancel_event.is_set() and self._pending_failure is None and not self.stage.is_terminal():
            self._pending_failure = self._failure_from(Cancelled(ctx.cancel_reason), self.stage)
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
    def _failure_of(self, trigger: str, source: str, dest: str, finished: StageResult | None) -> FailureInfo | None:
        if not (trigger == "fail" or dest == PruningStage.FAILED.value):
            return None
        error = self._pending_failure
        if error is None and finished is not None and finished.outcome == "gate_failed":
            error = FailureInfo(type="QualityGateError", message="; ".join(finished.notes) or "a quality gate failed",
                                stage=PruningStage(source).display_name(), reason="quality_gate")
        return error

    def _before(self, event: Any) -> None:
        """Audit line for the move about to happen (durable before the next stage starts); the manifest too when
        the destination is terminal (otherwise the checkpoint after the handler writes it)."""
        trigger = event.event.name
        source, dest = event.transition.source, event.transition.dest
        if trigger.startswith("resume_"):
            self.resume_target = None
        # the result this move confirms: the source stage's, once (a stage that moves to itself — Fine-tuning's
        # intervals — and then fails must not confirm its previous interval twice)
        finished = (self.last_result if self.last_result and self.last_result.stage == source and not self._confirmed
                    else None)
        error = self._failure_of(trigger, source, dest, finished)
        if error is not None:
            self.failure = error
        m = self.manifest
        digest = None
        if finished is not None:
            digest = checkpoint_digest(finished, m.artifacts)
        elif trigger == "start":  # the inputs and the dense reference, as the first manifest recorded them
            digest = checkpoint_digest(None, m.artifacts, m)
        record = self.audit.write(
            trigger=trigger, source=source, dest=dest, at=utc_now(),
            duration_s=None if finished is None else round(finished.duration_s, 6),
            metrics=finished.summary() if finished is not None else self._plan_metrics(trigger), error=error,
            config_sha256=m.config_sha256,
            result_sha256=digest,
        )
        self._last_event = record
        self._confirmed = self._confirmed or finished is not None
        m.history.append(HistoryEntry(seq=record.seq, trigger=trigger, source=source, dest=dest, at=record.at))
        m.state = dest
        m.audit_head_sha256 = self.audit.head_sha256
        m.progress = self.ctx.state.counters.model_copy()
        if error is not None:
            m.failure = error
        if PruningStage(dest).is_terminal():  # no handler and no checkpoint follow: this is the move's record
            m.expected_move = None
            if dest == PruningStage.COMPLETE.value:
                m.resume_point = None  # nothing left to resume; a Failed run keeps its point
            together(self.ctx.dist, self._write_manifest)
        self.ctx.log.info("transition", trigger=trigger, source=PruningStage(source).display_name(),
                          dest=PruningStage(dest).display_name(), duration_s=record.duration_s,
                          **({"error": error.message} if error else {}))

    def _plan_metrics(self, trigger: str) -> dict[str, Any]:
        """What the move out of Idle carries: the run's planned work and estimated time (``podar status``)."""
        if trigger != "start":
            return {}
        return {k: v for k, v in self.ctx.state.cost.items() if isinstance(v, int | float | str)}

    def _on_enter(self, event: Any) -> None:
        stage = PruningStage(event.state.name)
        if stage.is_terminal():
            self._pending_failure = None
            return
        ctx = self.ctx
        ctx.new_artifacts.clear()
        ctx.current_layer = None
        ctx.stage = stage
        written_s, written_b = ctx.store.write_seconds, ctx.store.write_bytes
        ctx.runtime.trim()  # what the stage before freed goes back to the OS before this one allocates
        started = time.perf_counter()
        result, failure = None, None
        try:
            result = self.handlers[stage](ctx)
        except (Exception, KeyboardInterrupt) as e:  # routed to `fail` exactly once, by the next step
            failure = self._failure_from(e, stage)
        failure = self._agreed(failure, stage)
        if failure is not None:
            self._pending_failure = failure
            ctx.log.error("stage_failed", stage=stage.display_name(), error=failure.message, layer=failure.layer,
                          error_type=failure.type)
            return
        assert result is not None
        result.duration_s = time.perf_counter() - started
        result.stage = stage.value
        self.last_result = result
        self._confirmed = False
        together(ctx.dist, lambda: self._checkpoint(result, written_s, written_b))
        ctx.log.info("stage_done", stage=stage.display_name(), duration_s=round(result.duration_s, 3),
                     **result.summary())

    def _agreed(self, failure: FailureInfo | None, stage: PruningStage) -> FailureInfo | None:
        """The stage's failure as every process sees it: when one failed, all take the move into Failed, with
        that process's message (so no process goes on alone). One process: its own."""
        dist = self.ctx.dist
        if dist.world == 1:
            return failure
        first = dist.first_failure(None if failure is None else failure.message)
        if first is None:
            return None
        if failure is not None and first[0] == dist.rank:
            return failure
        return FailureInfo(type="ProcessFailed", message=f"process {first[0]} of {dist.world}: {first[1]}",
                           stage=stage.display_name(), reason="error")

    def record_resume(self, from_state: str, target: PruningStage, note: str, dangling: str | None = None) -> None:
        """Append the ``resumed`` audit record (the run restarts at Idle) and note it in the manifest; the next
        move is ``resume_<target>``. ``dangling``: the digest of a last result no record confirmed (the process
        died between its checkpoint and the next move), confirmed by this record."""
        metrics = {"note": note, "world_size": self.ctx.dist.world}
        record = self.audit.write(event="resumed", trigger="resume", source=from_state,
                                  dest=PruningStage.IDLE.value, at=utc_now(), metrics=metrics,
                                  config_sha256=self.manifest.config_sha256, result_sha256=dangling)
        m = self.manifest
        m.resumes.append({"at": record.at, "from_state": from_state, "seq": record.seq, **metrics})
        m.state = PruningStage.IDLE.value
        m.failure = None
        m.audit_head_sha256 = self.audit.head_sha256
        m.expected_move = ExpectedMove(trigger=f"resume_{target.value}", source=PruningStage.IDLE.value,
                                       dest=target.value)
        self.resume_target = target
        self._write_manifest()

    def check_resume_point(self, result: StageResult) -> None:
        """CheckpointError when ``result`` (the last checkpoint, which no record confirms yet) names another resume
        point or next move than its stage and counters give (the manifest was edited after the checkpoint)."""
        stage = PruningStage(result.stage)
        if stage in VOLATILE:
            return  # it keeps the point of the checkpoint before it, which the log confirms (the audit checks)
        saved, last = self.ctx.state.counters, self.last_result
        self.ctx.state.counters, self.last_result = result.progress.model_copy(), result
        try:
            point, move = self._resume_point_after(stage), expected(next_move(stage, self.condition))
        finally:
            self.ctx.state.counters, self.last_result = saved, last
        if (result.resume_point, result.next_move) != (point, move):
            raise CheckpointError(f"the last checkpoint ({stage.display_name()}) names resume point "
                                  f"{result.resume_point} and next move {result.next_move}; its stage and counters "
                                  f"give {point} and {move}: the manifest was edited")

    # ------------------------------------------------------------ helpers
    def _resume_point_after(self, stage: PruningStage) -> ResumePoint:
        """Where a resume continues once ``stage``'s result is checkpointed: the move the flow takes next, with its
        effects on the counters; the same stage again when that move ends the run (redo, the same bytes); the
        point before when the stage's result lives in memory only."""
        counters = self.ctx.state.counters
        if stage in VOLATILE and self.manifest.resume_point is not None:
            return self.manifest.resume_point
        move: Move = next_move(stage, self.condition)
        if move.dest.is_terminal():
            return ResumePoint(dest=stage.value, counters=counters.model_copy(),
                               note=f"{stage.display_name()} done but not confirmed: {stage.display_name()} again")
        after = apply_effects(move, counters.model_copy())
        return ResumePoint(dest=move.dest.value, counters=after,
                           note=f"after {stage.display_name()}: {move.dest.display_name()}, round {after.round_index}"
                                f", group {after.group_index}")

    def _checkpoint(self, result: StageResult, written_s: float, written_b: int) -> None:
        m = self.manifest
        store = self.ctx.store
        for rel, record in self.ctx.new_artifacts.items():
            m.artifacts[rel] = record
        result.artifacts = sorted(set(result.artifacts) | set(self.ctx.new_artifacts))
        result.progress = self.ctx.state.counters.model_copy()
        # the cost of this checkpoint's artifacts (the manifest write that follows is not included)
        result.checkpoint_s = store.write_seconds - written_s
        result.checkpoint_bytes = store.write_bytes - written_b
        stage = PruningStage(result.stage)
        # where a resume continues and the next move, carried in the result: the log's digest of it covers them
        result.resume_point = self._resume_point_after(stage)
        result.next_move = expected(next_move(stage, self.condition))
        m.results.append(result)
        m.progress = result.progress
        m.resume_point = result.resume_point
        m.expected_move = result.next_move
        self._write_manifest()
        faults.hit(f"after:{result.stage}")

    def _write_manifest(self) -> None:
        self.manifest.updated_at = utc_now()
        self.ctx.store.write_manifest(self.manifest)

    def _failure_from(self, error: BaseException, stage: PruningStage) -> FailureInfo:
        layer = getattr(error, "layer", None) or self.ctx.current_layer
        if isinstance(error, Terminated):
            reason, message = "terminated", "terminated (SIGTERM)"
        elif isinstance(error, KeyboardInterrupt):
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
        return FailureInfo(type=type(error).__name__, message=message, stage=stage.display_name(), layer=layer,
                           reason=reason)
