import json

import pytest

from podar import AuditError
from podar.engine.audit import AuditLog, chain_seed, read_audit, verify_audit
from podar.schemas.records import HistoryEntry

RUN = "run-123"
MOVES = [("start", "idle", "computing_importance"), ("scored", "computing_importance", "pruning"),
         ("pruned", "pruning", "fine_tuning"), ("finetuned", "fine_tuning", "evaluating"),
         ("evaluated", "evaluating", "exporting"), ("exported", "exporting", "complete")]


def write_log(path):
    log = AuditLog(path, RUN)
    for i, (t, s, d) in enumerate(MOVES):
        log.write(trigger=t, source=s, dest=d, at=f"2026-01-01T00:00:0{i}+00:00", duration_s=0.5 * i,
                  metrics={"x": i})
    return log


def test_record_fields_and_chain(tmp_path):
    path = tmp_path / "audit.jsonl"
    write_log(path)
    records = read_audit(path)
    assert len(records) == len(MOVES)
    first = records[0]
    for key in ("run_id", "seq", "trigger", "source", "dest", "at", "duration_s", "metrics", "prev_sha256", "event"):
        assert key in first
    assert first["run_id"] == RUN and first["seq"] == 0 and first["event"] == "transition"
    assert first["prev_sha256"] == chain_seed(RUN)
    assert records[1]["metrics"] == {"x": 1}
    summary = verify_audit(path, RUN)
    assert summary.final_state == "complete" and summary.records == len(MOVES)


def test_appending_continues_chain(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, RUN)
    log.write(trigger="start", source="idle", dest="computing_importance", at="t")
    log2 = AuditLog(path, RUN)
    assert log2.next_seq == 1 and log2.head_sha256 == log.head_sha256
    log2.write(trigger="scored", source="computing_importance", dest="pruning", at="t")
    verify_audit(path, RUN)


def _lines(path):
    return path.read_text().splitlines()


def test_edit_detected(tmp_path):
    path = tmp_path / "audit.jsonl"
    write_log(path)
    lines = _lines(path)
    rec = json.loads(lines[2])
    rec["duration_s"] = 99.0
    lines[2] = json.dumps(rec, sort_keys=True)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(AuditError, match="line 4 .*hash chain broken"):
        verify_audit(path, RUN)


def test_removed_line_detected(tmp_path):
    path = tmp_path / "audit.jsonl"
    write_log(path)
    lines = _lines(path)
    del lines[1]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(AuditError, match="line 2"):
        verify_audit(path, RUN)


def test_reordered_lines_detected(tmp_path):
    path = tmp_path / "audit.jsonl"
    write_log(path)
    lines = _lines(path)
    lines[1], lines[2] = lines[2], lines[1]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(AuditError, match="line 2"):
        verify_audit(path, RUN)


def test_illegal_move_detected_even_with_valid_chain(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, RUN)
    log.write(trigger="start", source="idle", dest="computing_importance", at="t")
    log.write(trigger="exported", source="computing_importance", dest="complete", at="t")
    with pytest.raises(AuditError, match="line 2 .*illegal move"):
        verify_audit(path, RUN)


def test_history_mismatch_detected(tmp_path):
    path = tmp_path / "audit.jsonl"
    write_log(path)
    history = [HistoryEntry(seq=i, trigger=t, source=s, dest=d, at=f"2026-01-01T00:00:0{i}+00:00")
               for i, (t, s, d) in enumerate(MOVES)]
    verify_audit(path, RUN, history)
    with pytest.raises(AuditError, match="history holds"):
        verify_audit(path, RUN, history[:-1])
    history[2] = history[2].model_copy(update={"at": "2026-01-01T00:00:09+00:00"})  # an edited timestamp
    with pytest.raises(AuditError, match="seq 2: .*at 2026-01-01T00:00:02"):
        verify_audit(path, RUN, history)


def test_wrong_run_id_detected(tmp_path):
    path = tmp_path / "audit.jsonl"
    write_log(path)
    with pytest.raises(AuditError, match="line 1"):
        verify_audit(path, "another-run")
