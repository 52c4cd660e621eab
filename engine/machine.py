"""The state machine: the legal moves of a run, what each does to the loop counters, and nothing else.

Declarative: states, ordered moves with named conditions and named effects. It is drawn by ``mermaid()``, it is
what the audit replays a log against, and the runner takes its next move from it (``next_move``: the first
forward move out of the state whose conditions hold). The runner binds stage handlers to the states' on-enter
hooks; this module knows no handler.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from transitions import Machine, MachineError

from podar.schemas.errors import TransitionError
from podar.schemas.records import Counters
from podar.schemas.stage import PruningStage

__all__ = [
    "PruningStage",
    "Move",
    "MOVES",
    "RESUMABLE",
    "VOLATILE",
    "CONDITIONS",
    "EFFECTS",
    "build_machine",
    "next_move",
    "apply_effects",
    "legal_moves",
    "is_legal",
    "move_for",
    "fire",
    "mermaid",
]

S = PruningStage


@dataclass(frozen=True)
class Move:
    """One legal transition. ``conditions`` / ``unless`` name predicates of the run (CONDITIONS); ``effects`` name
    changes of the loop counters made as the move happens (EFFECTS). ``kind``: a forward move of the flow, the
    move into Failed, or a resumed run's move out of Idle."""

    trigger: str
    source: PruningStage
    dest: PruningStage
    conditions: tuple[str, ...] = ()
    unless: tuple[str, ...] = ()
    effects: tuple[str, ...] = ()
    kind: Literal["forward", "fail", "resume"] = "forward"


# The predicates a move may be guarded by. The runner answers each (a bool per name); the machine knows names.
CONDITIONS: dict[str, str] = {
    "needs_calibration": "the method needs activation statistics (not magnitude)",
    "more_layer_groups": "sequential calibration has layer groups left to prune in this round",
    "more_pruning_rounds": "the schedule has pruning rounds left (gradual / cubic)",
    "gate_passed": "every quality gate passed, or failures are set to warn",
    "more_finetune_steps": "fine-tuning has steps left in this round (it checkpoints every few steps)",
    "more_evaluation": "Evaluating checkpointed the dense model's task results; the pruned model's come next",
}


def _next_layer_group(c: Counters) -> None:
    c.group_index += 1


def _next_pruning_round(c: Counters) -> None:
    c.round_index += 1
    c.group_index = 0


# What a move does to the loop counters, by name.
EFFECTS: dict[str, Callable[[Counters], None]] = {
    "next_layer_group": _next_layer_group,
    "next_pruning_round": _next_pruning_round,
}

_ACTIVE = [s for s in PruningStage if s.is_active()]

MOVES: tuple[Move, ...] = (
    Move("start", S.IDLE, S.CALIBRATING, conditions=("needs_calibration",)),
    Move("start", S.IDLE, S.COMPUTING_IMPORTANCE, unless=("needs_calibration",)),
    Move("calibrated", S.CALIBRATING, S.COMPUTING_IMPORTANCE),
    Move("scored", S.COMPUTING_IMPORTANCE, S.PRUNING),
    # sequential mode: the next layer group is calibrated on the already-pruned blocks
    Move("next_group", S.PRUNING, S.CALIBRATING, conditions=("more_layer_groups",), effects=("next_layer_group",)),
    Move("pruned", S.PRUNING, S.FINE_TUNING, unless=("more_layer_groups",)),
    # fine-tuning is checkpointed every few steps: the next interval of the same round
    Move("next_interval", S.FINE_TUNING, S.FINE_TUNING, conditions=("more_finetune_steps",)),
    # gradual schedules: after fine-tuning, another pruning round
    Move("next_round", S.FINE_TUNING, S.CALIBRATING, conditions=("more_pruning_rounds", "needs_calibration"),
         unless=("more_finetune_steps",), effects=("next_pruning_round",)),
    Move("next_round", S.FINE_TUNING, S.COMPUTING_IMPORTANCE, conditions=("more_pruning_rounds",),
         unless=("needs_calibration", "more_finetune_steps"), effects=("next_pruning_round",)),
    Move("finetuned", S.FINE_TUNING, S.EVALUATING, unless=("more_pruning_rounds", "more_finetune_steps")),
    # task evaluation: the dense model's results are checkpointed first (a resume does not compute them again)
    Move("next_part", S.EVALUATING, S.EVALUATING, conditions=("more_evaluation",)),
    Move("evaluated", S.EVALUATING, S.EXPORTING, conditions=("gate_passed",), unless=("more_evaluation",)),
    Move("evaluated", S.EVALUATING, S.FAILED, unless=("gate_passed", "more_evaluation")),
    Move("exported", S.EXPORTING, S.COMPLETE),
    *(Move("fail", s, S.FAILED, kind="fail") for s in [S.IDLE, *_ACTIVE]),
    # resume after a failure or a crash: a resumed run starts at Idle and moves to the stage to redo
    *(Move(f"resume_{s.value}", S.IDLE, s, kind="resume")
      for s in (S.CALIBRATING, S.COMPUTING_IMPORTANCE, S.FINE_TUNING, S.EVALUATING, S.EXPORTING)),
)

RESUMABLE: tuple[PruningStage, ...] = tuple(m.dest for m in MOVES if m.kind == "resume")

# Stages whose results live in memory only (statistics, scores): a checkpoint after them is no place to resume
# from; a resumed run redoes the layer group from its start.
VOLATILE: frozenset[PruningStage] = frozenset({S.CALIBRATING, S.COMPUTING_IMPORTANCE})


def _holds(move: Move, condition: Callable[[str], bool]) -> bool:
    return all(condition(c) for c in move.conditions) and not any(condition(u) for u in move.unless)


def next_move(state: PruningStage, condition: Callable[[str], bool]) -> Move:
    """The move the flow takes out of ``state``: the first forward move from it whose conditions hold."""
    for move in MOVES:
        if move.kind == "forward" and move.source is state and _holds(move, condition):
            return move
    raise TransitionError(f"no move out of '{state.display_name()}' has its conditions met")


def apply_effects(move: Move, counters: Counters) -> Counters:
    """``counters`` changed as ``move`` changes them (in place; returned for chaining)."""
    for name in move.effects:
        EFFECTS[name](counters)
    return counters


def move_for(trigger: str, source: str, dest: str) -> Move | None:
    """The move (trigger, source, dest) names, or None when it is not legal."""
    for move in MOVES:
        if (move.trigger, move.source.value, move.dest.value) == (trigger, source, dest):
            return move
    return None


def legal_moves() -> set[tuple[str, str, str]]:
    """Every (trigger, source, dest) the machine allows, as state names."""
    return {(m.trigger, m.source.value, m.dest.value) for m in MOVES}


def is_legal(trigger: str, source: str, dest: str) -> bool:
    return move_for(trigger, source, dest) is not None


def build_machine(
    model: Any,
    *,
    condition: Callable[[str], bool],
    initial: PruningStage = PruningStage.IDLE,
    on_enter: Callable[[Any], None] | None = None,
    before: Callable[[Any], None] | None = None,
    counters: Callable[[], Counters] | None = None,
) -> Machine:
    """A transitions Machine over ``model`` holding exactly MOVES.

    ``condition(name)`` answers a named predicate. Each move's callbacks, in order: its effects on
    ``counters()``, then ``before(event)`` (the audit record); then the destination's ``on_enter(event)`` (the
    stage hook, every state but Idle). ``auto_transitions`` is off, and callbacks are callables, not strings.
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

    def _effects(move: Move) -> Callable[[Any], None]:
        def apply(event: Any = None) -> None:
            if counters is not None:
                apply_effects(move, counters())

        return apply

    machine = Machine(model=model, states=states, initial=initial.value, auto_transitions=False, send_event=True,
                      ignore_invalid_triggers=False, model_attribute="state")
    for move in MOVES:
        conds = [_guard(c, True) for c in move.conditions] + [_guard(c, False) for c in move.unless]
        callbacks = [_effects(move)] if move.effects else []
        if before is not None:
            callbacks.append(before)
        machine.add_transition(move.trigger, move.source.value, move.dest.value, conditions=conds or None,
                               before=callbacks or None)
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
        lines.append(f'    state "{stage.display_name()}" as {stage.value}')
    lines.append(f"    [*] --> {PruningStage.IDLE.value}")
    for move in MOVES:
        guard = [*move.conditions, *(f"not {u}" for u in move.unless)]
        label = move.trigger + (f" [{' and '.join(guard)}]" if guard else "")
        lines.append(f"    {move.source.value} --> {move.dest.value}: {label}")
    lines.append(f"    {PruningStage.COMPLETE.value} --> [*]")
    lines.append(f"    {PruningStage.FAILED.value} --> [*]")
    return "\n".join(lines)
