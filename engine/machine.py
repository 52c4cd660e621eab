"""The state machine: the legal moves of a run, and nothing else.

Declarative: states, ordered transitions with named conditions. It can be drawn (mermaid) and it is the single
source of truth that the audit replays a log against. The runner (``engine.runner``) binds stage handlers to the
states' on-enter hooks and fires the triggers; this module knows no handler.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from transitions import Machine, MachineError

from podar.schemas.errors import TransitionError

__all__ = [
    "PruningStage",
    "Move",
    "MOVES",
    "RESUMABLE",
    "CONDITIONS",
    "build_machine",
    "legal_moves",
    "is_legal",
    "mermaid",
]


class PruningStage(str, Enum):
    """The stages of a run. The value is the machine's state name; ``display`` the name people read."""

    IDLE = "idle"
    CALIBRATING = "calibrating"
    COMPUTING_IMPORTANCE = "computing_importance"
    PRUNING = "pruning"
    FINE_TUNING = "fine_tuning"
    EVALUATING = "evaluating"
    EXPORTING = "exporting"
    COMPLETE = "complete"
    FAILED = "failed"

    @property
    def display(self) -> str:
        return _DISPLAY[self]

    def is_active(self) -> bool:
        """True for the working stages, Calibrating through Exporting."""
        return self not in (PruningStage.IDLE, PruningStage.COMPLETE, PruningStage.FAILED)

    def is_terminal(self) -> bool:
        """True for Complete and Failed: no move leaves them."""
        return self in (PruningStage.COMPLETE, PruningStage.FAILED)

    @classmethod
    def from_display(cls, display: str) -> PruningStage:
        for stage, name in _DISPLAY.items():
            if name == display:
                return stage
        raise ValueError(f"no stage is displayed as {display!r}")


_DISPLAY = {
    PruningStage.IDLE: "Idle",
    PruningStage.CALIBRATING: "Calibrating",
    PruningStage.COMPUTING_IMPORTANCE: "Computing Importance",
    PruningStage.PRUNING: "Pruning",
    PruningStage.FINE_TUNING: "Fine-tuning",
    PruningStage.EVALUATING: "Evaluating",
    PruningStage.EXPORTING: "Exporting",
    PruningStage.COMPLETE: "Complete",
    PruningStage.FAILED: "Failed",
}

S = PruningStage


@dataclass(frozen=True)
class Move:
    """One legal transition. ``conditions`` / ``unless`` name predicates of the run (see CONDITIONS)."""

    trigger: str
    source: PruningStage
    dest: PruningStage
    conditions: tuple[str, ...] = ()
    unless: tuple[str, ...] = ()


# The predicates a transition may be guarded by. The runner supplies a value for each (a bool per name);
# the machine only knows the names.
CONDITIONS: dict[str, str] = {
    "needs_calibration": "the method needs activation statistics (not magnitude)",
    "more_layer_groups": "sequential calibration has decoder-block groups left to prune",
    "more_pruning_rounds": "the schedule has pruning rounds left (gradual / cubic)",
    "gate_passed": "every quality gate passed, or failures are set to warn",
}

_ACTIVE = [s for s in PruningStage if s.is_active()]

MOVES: tuple[Move, ...] = (
    Move("start", S.IDLE, S.CALIBRATING, conditions=("needs_calibration",)),
    Move("start", S.IDLE, S.COMPUTING_IMPORTANCE, unless=("needs_calibration",)),
    Move("calibrated", S.CALIBRATING, S.COMPUTING_IMPORTANCE),
    Move("scored", S.COMPUTING_IMPORTANCE, S.PRUNING),
    # sequential mode: the next layer group is calibrated on the already-pruned blocks
    Move("next_group", S.PRUNING, S.CALIBRATING, conditions=("more_layer_groups",)),
    Move("pruned", S.PRUNING, S.FINE_TUNING, unless=("more_layer_groups",)),
    # gradual schedules: after fine-tuning, another pruning round
    Move("next_round", S.FINE_TUNING, S.CALIBRATING, conditions=("more_pruning_rounds", "needs_calibration")),
    Move("next_round", S.FINE_TUNING, S.COMPUTING_IMPORTANCE, conditions=("more_pruning_rounds",),
         unless=("needs_calibration",)),
    Move("finetuned", S.FINE_TUNING, S.EVALUATING, unless=("more_pruning_rounds",)),
    Move("evaluated", S.EVALUATING, S.EXPORTING, conditions=("gate_passed",)),
    Move("evaluated", S.EVALUATING, S.FAILED, unless=("gate_passed",)),
    Move("exported", S.EXPORTING, S.COMPLETE),
    *(Move("fail", s, S.FAILED) for s in [S.IDLE, *_ACTIVE]),
    # resume after a failure or a crash: a resumed run starts at Idle and moves to the stage to redo
    *(Move(f"resume_{s.value}", S.IDLE, s) for s in (S.CALIBRATING, S.COMPUTING_IMPORTANCE, S.FINE_TUNING,
                                                     S.EVALUATING, S.EXPORTING)),
)

RESUMABLE: tuple[PruningStage, ...] = tuple(m.dest for m in MOVES if m.trigger.startswith("resume_"))


def legal_moves() -> set[tuple[str, str, str]]:
    """Every (trigger, source, dest) the machine allows, as state names."""
    return {(m.trigger, m.source.value, m.dest.value) for m in MOVES}


def is_legal(trigger: str, source: str, dest: str) -> bool:
    return (trigger, source, dest) in legal_moves()


def build_machine(
    model: Any,
    *,
    condition: Callable[[str], bool],
    initial: PruningStage = PruningStage.IDLE,
    on_enter: Callable[[Any], None] | None = None,
    before: Callable[[Any], None] | None = None,
) -> Machine:
    """A transitions Machine over ``model`` holding exactly MOVES.

    ``condition(name)`` answers a named predicate. ``on_enter(event)`` is attached to every state but Idle (the
    stage hook); ``before(event)`` runs before every state change (the audit record). ``auto_transitions`` is off,
    and callbacks are callables, not strings.
    """
    states = []
    for stage in PruningStage:
        spec: dict[str, Any] = {"name": stage.value}
        if on_enter is not None and stage is not PruningStage.IDLE:
            spec["on_enter"] = [on_enter]
        states.append(spec)

    def _guard(name: str, expected: bool) -> Callable[[Any], bool]:
        def check(event: Any = None) -> bool:
            return bool(condition(name)) is expected

        check.__name__ = f"{'' if expected else 'not_'}{name}"
        return check

    machine = Machine(
        model=model,
        states=states,
        initial=initial.value,
        auto_transitions=False,
        send_event=True,
        ignore_invalid_triggers=False,
        before_state_change=[before] if before is not None else None,
        model_attribute="state",
    )
    for move in MOVES:
        conds = [_guard(c, True) for c in move.conditions] + [_guard(c, False) for c in move.unless]
        machine.add_transition(move.trigger, move.source.value, move.dest.value, conditions=conds or None)
    return machine


def fire(model: Any, trigger: str) -> None:
    """Fire ``trigger`` on a model bound by ``build_machine``; an illegal move raises TransitionError."""
    state = getattr(model, "state", "?")
    try:
        ok = model.trigger(trigger)
    except (MachineError, AttributeError) as e:
        raise TransitionError(f"illegal move: trigger '{trigger}' from state '{state}' ({e})") from e
    if not ok:
        raise TransitionError(
            f"illegal move: trigger '{trigger}' from state '{state}': no transition's conditions hold"
        )


def mermaid() -> str:
    """The machine as a mermaid state diagram (the same text ``podar graph`` prints)."""
    lines = ["stateDiagram-v2"]
    for stage in PruningStage:
        lines.append(f'    state "{stage.display}" as {stage.value}')
    lines.append(f"    [*] --> {PruningStage.IDLE.value}")
    for move in MOVES:
        guard = [*move.conditions, *(f"not {u}" for u in move.unless)]
        label = move.trigger + (f" [{' and '.join(guard)}]" if guard else "")
        lines.append(f"    {move.source.value} --> {move.dest.value}: {label}")
    lines.append(f"    {PruningStage.COMPLETE.value} --> [*]")
    lines.append(f"    {PruningStage.FAILED.value} --> [*]")
    return "\n".join(lines)
