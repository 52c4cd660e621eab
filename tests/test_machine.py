import pytest

from podar import PruningStage, TransitionError, mermaid
from podar.engine.machine import MOVES, build_machine, fire, legal_moves

S = PruningStage


class Model:
    state: str


def make(initial=S.IDLE, **conds):
    values = {"needs_calibration": False, "more_layer_groups": False, "more_pruning_rounds": False,
              "gate_passed": True, "more_finetune_steps": False, "more_evaluation": False, **conds}
    m = Model()
    build_machine(m, condition=lambda name: values[name], initial=initial)
    return m


def test_display_names_exact():
    assert [s.display for s in S] == ["Idle", "Calibrating", "Computing Importance", "Pruning", "Fine-tuning",
                                      "Evaluating", "Exporting", "Complete", "Failed"]
    assert S.from_display("Computing Importance") is S.COMPUTING_IMPORTANCE


def test_active_and_terminal():
    active = [s for s in S if s.is_active()]
    assert active == [S.CALIBRATING, S.COMPUTING_IMPORTANCE, S.PRUNING, S.FINE_TUNING, S.EVALUATING, S.EXPORTING]
    assert [s for s in S if s.is_terminal()] == [S.COMPLETE, S.FAILED]


def test_magnitude_skips_calibration():
    m = make(needs_calibration=False)
    fire(m, "start")
    assert m.state == S.COMPUTING_IMPORTANCE.value


def test_calibration_methods_start_calibrating():
    m = make(needs_calibration=True)
    fire(m, "start")
    assert m.state == S.CALIBRATING.value


# (initial, trigger, conditions, expected destination) for every legal move
CASES = [
    (S.CALIBRATING, "calibrated", {}, S.COMPUTING_IMPORTANCE),
    (S.COMPUTING_IMPORTANCE, "scored", {}, S.PRUNING),
    (S.PRUNING, "next_group", {"more_layer_groups": True}, S.CALIBRATING),
    (S.PRUNING, "pruned", {}, S.FINE_TUNING),
    (S.FINE_TUNING, "next_interval", {"more_finetune_steps": True}, S.FINE_TUNING),
    (S.FINE_TUNING, "next_round", {"more_pruning_rounds": True, "needs_calibration": True}, S.CALIBRATING),
    (S.FINE_TUNING, "next_round", {"more_pruning_rounds": True}, S.COMPUTING_IMPORTANCE),
    (S.FINE_TUNING, "finetuned", {}, S.EVALUATING),
    (S.EVALUATING, "next_part", {"more_evaluation": True}, S.EVALUATING),
    (S.EVALUATING, "evaluated", {"gate_passed": True}, S.EXPORTING),
    (S.EVALUATING, "evaluated", {"gate_passed": False}, S.FAILED),
    (S.EXPORTING, "exported", {}, S.COMPLETE),
]


@pytest.mark.parametrize("initial,trigger,conds,dest", CASES)
def test_each_legal_move(initial, trigger, conds, dest):
    m = make(initial, **conds)
    fire(m, trigger)
    assert m.state == dest.value


@pytest.mark.parametrize("stage", [s for s in S if not s.is_terminal()])
def test_fail_from_every_non_final_state(stage):
    m = make(stage)
    fire(m, "fail")
    assert m.state == S.FAILED.value


@pytest.mark.parametrize("stage", [S.COMPLETE, S.FAILED])
def test_nothing_leaves_final_states(stage):
    m = make(stage)
    for trigger in {mv.trigger for mv in MOVES}:
        with pytest.raises(TransitionError):
            fire(m, trigger)
    assert m.state == stage.value


def test_illegal_moves_raise():
    m = make(S.IDLE)
    with pytest.raises(TransitionError, match="illegal move"):
        fire(m, "exported")
    m = make(S.PRUNING, more_layer_groups=True)
    with pytest.raises(TransitionError):
        fire(m, "pruned")  # guarded: groups remain
    assert m.state == S.PRUNING.value
    with pytest.raises(TransitionError):
        fire(m, "to_complete")  # auto transitions are off


def test_every_move_covered_and_nothing_else():
    covered = {(t, i.value, d.value) for i, t, _c, d in CASES}
    covered |= {("start", "idle", "calibrating"), ("start", "idle", "computing_importance")}
    covered |= {("fail", s.value, "failed") for s in S if not s.is_terminal()}
    covered |= {(f"resume_{s.value}", "idle", s.value) for s in RESUME_TARGETS}
    assert covered == legal_moves()


RESUME_TARGETS = [S.CALIBRATING, S.COMPUTING_IMPORTANCE, S.FINE_TUNING, S.EVALUATING, S.EXPORTING]


@pytest.mark.parametrize("stage", RESUME_TARGETS)
def test_resume_moves_from_idle(stage):
    m = make(S.IDLE)
    fire(m, f"resume_{stage.value}")
    assert m.state == stage.value
    m = make(S.PRUNING)
    with pytest.raises(TransitionError):
        fire(m, f"resume_{stage.value}")


def test_mermaid_lists_every_move():
    text = mermaid()
    assert text.startswith("stateDiagram-v2")
    for mv in MOVES:
        assert f"{mv.source.value} --> {mv.dest.value}: {mv.trigger}" in text
    assert 'state "Computing Importance" as computing_importance' in text
