"""The audit log: ``RUN_DIR/audit.jsonl``, one JSON object per transition, hash-chained.

Written through a structlog logger of its own (``structlog.wrap_logger``), so nothing is configured
process-wide. Each line carries ``prev_sha256``, the sha256 of the previous line's bytes (the first line chains
to the sha256 of the run id), so an edited, removed or reordered line breaks the chain.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from podar.schemas.errors import AuditError
from podar.schemas.records import AuditEvent, ExpectedMove, HistoryEntry, RunManifest

from .machine import PruningStage, is_legal

__all__ = ["AuditLog", "AuditSummary", "chain_seed", "verify_audit", "read_audit", "records_after", "tail_problem"]


def chain_seed(run_id: str) -> str:
    """The ``prev_sha256`` of the first record: sha256 of the run id's UTF-8 bytes."""
    return hashlib.sha256(run_id.encode()).hexdigest()


def _line_sha(line: str) -> str:
    return hashlib.sha256(line.encode()).hexdigest()


class _DurableFileLogger:
    """structlog logger that appends each rendered line to a file and fsyncs it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.last_line: str | None = None

    def msg(self, line: str) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.last_line = line

    info = msg


class AuditLog:
    """Appends transition records; continues the chain of an existing file."""

    def __init__(self, path: str | Path, run_id: str) -> None:
        self.path = Path(path)
        self.run_id = run_id
        self._sink = _DurableFileLogger(self.path)
        self.head_sha256 = chain_seed(run_id)
        self.next_seq = 0
        self.repaired: str | None = None
        if self.path.exists():
            raw = self.path.read_bytes()
            if raw and not raw.endswith(b"\n"):  # a crash inside the last append: drop the partial line
                keep = raw[: raw.rfind(b"\n") + 1]
                self.repaired = raw[len(keep):].decode("utf-8", "replace")
                with open(self.path, "r+b") as f:
                    f.truncate(len(keep))
                    os.fsync(f.fileno())
            records = read_audit(self.path)
            if records:
                last_line = self.path.read_text(encoding="utf-8").splitlines()[-1]
                self.head_sha256 = _line_sha(last_line)
                self.next_seq = records[-1]["seq"] + 1
        self._logger = structlog.wrap_logger(
            self._sink,
            processors=[self._add_chain, structlog.processors.JSONRenderer(sort_keys=True)],
            wrapper_class=structlog.BoundLogger,
        )

    def _add_chain(self, _logger: Any, _name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        event_dict["prev_sha256"] = self.head_sha256
        return event_dict

    def write(self, **fields: Any) -> AuditEvent:
        """Validate and append one record; returns it. ``seq`` and ``prev_sha256`` are filled here."""
        event = fields.pop("event", "transition")
        record = AuditEvent(event=event, run_id=self.run_id, seq=self.next_seq, prev_sha256=self.head_sha256,
                            **fields)
        payload = record.model_dump(mode="json", exclude={"prev_sha256", "event"})
        self._logger.info(event, **payload)
        assert self._sink.last_line is not None
        self.head_sha256 = _line_sha(self._sink.last_line)
        self.next_seq += 1
        return record


def read_audit(path: str | Path) -> list[dict[str, Any]]:
    """Parse every line; raises AuditError naming the line that is not JSON."""
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            line = line.rstrip("\n")
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise AuditError(f"{path}: line {number} is not valid JSON ({e})") from e
    return records


@dataclass
class AuditSummary:
    """What ``podar audit`` reports."""

    run_id: str
    records: int
    final_state: str
    stages: list[tuple[str, float | None]] = field(default_factory=list)
    outcome: str = ""


def _parse(number: int, line: str) -> dict[str, Any]:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise AuditError(f"line {number}: not valid JSON ({e})") from e


def _replay(record: dict[str, Any], state: str, where: str) -> str:
    """The state after ``record``, replayed against the machine from ``state``; AuditError when it is not legal."""
    kind = record.get("event")
    if kind == "resumed":
        if record.get("source") != state:
            raise AuditError(f"{where}: resumed from '{record.get('source')}' but the run was in '{state}'")
        return PruningStage.IDLE.value
    trigger, source, dest = record.get("trigger"), record.get("source"), record.get("dest")
    if source != state:
        raise AuditError(f"{where}: move starts from '{source}' but the run was in '{state}'")
    if not is_legal(str(trigger), str(source), str(dest)):
        raise AuditError(f"{where}: illegal move '{trigger}' from '{source}' to '{dest}'")
    return str(dest)


def _compare_history(history: list[HistoryEntry], transitions: list[dict[str, Any]]) -> None:
    if len(history) != len(transitions):
        raise AuditError(f"the manifest's history holds {len(history)} moves, the audit log {len(transitions)}")
    for entry, record in zip(history, transitions, strict=True):
        if (entry.trigger, entry.source, entry.dest) != (record["trigger"], record["source"], record["dest"]):
            raise AuditError(f"seq {record['seq']}: audit says {record['trigger']} {record['source']}→"
                             f"{record['dest']}, the manifest says {entry.trigger} {entry.source}→{entry.dest}")


def verify_audit(path: str | Path, run_id: str, history: Iterable[HistoryEntry] | None = None) -> AuditSummary:
    """Check the hash chain, replay every move against the machine, and compare with the manifest history.

    Raises AuditError naming the first bad record (1-based line number and seq).
    """
    path = Path(path)
    if not path.is_file():
        raise AuditError(f"audit log '{path}' does not exist")
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln]
    expected_prev = chain_seed(run_id)
    state = PruningStage.IDLE.value
    stages: list[tuple[str, float | None]] = []
    transitions: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        record = _parse(number, line)
        where = f"line {number} (seq {record.get('seq')})"
        if record.get("prev_sha256") != expected_prev:
            raise AuditError(f"{where}: hash chain broken — prev_sha256 does not match line {number - 1}: that line "
                             "was edited, or a line was removed or reordered here")
        expected_prev = _line_sha(line)
        if record.get("run_id") != run_id:
            raise AuditError(f"{where}: run_id {record.get('run_id')!r} is not this run's {run_id!r}")
        if record.get("seq") != number - 1:
            raise AuditError(f"{where}: sequence number {record.get('seq')} out of order, expected {number - 1}")
        if record.get("event") not in ("transition", "resumed"):
            continue
        if record.get("event") == "transition":
            stages.append((str(record.get("source")), record.get("duration_s")))
            transitions.append(record)
        state = _replay(record, state, where)
    if history is not None:
        _compare_history(list(history), transitions)
    outcome = "complete" if state == PruningStage.COMPLETE.value else state
    return AuditSummary(run_id=run_id, records=len(lines), final_state=state, stages=stages, outcome=outcome)


def records_after(path: str | Path, run_id: str, head_sha256: str | None) -> list[dict[str, Any]]:
    """The records after the line whose sha256 is ``head_sha256`` (the manifest's head): what the audit log holds
    that no manifest write confirmed yet. All records when the head is the chain seed. AuditError when no line has
    that sha256 (the log was cut or rewritten before the head)."""
    lines = [ln for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln]
    if head_sha256 in (None, chain_seed(run_id)):
        return [json.loads(ln) for ln in lines]
    for i, line in enumerate(lines):
        if _line_sha(line) == head_sha256:
            return [json.loads(ln) for ln in lines[i + 1:]]
    raise AuditError(f"no line of the audit log has the manifest's head sha256 {head_sha256[:16]}…: lines the "
                     "manifest confirmed were changed or removed")


def tail_problem(manifest: RunManifest, tail: list[dict[str, Any]]) -> str | None:
    """Why the records beyond the manifest's head are not what an interrupted run leaves, or None when they are:
    the run's expected next move (its stage was at work when the process died), a ``fail`` move, a ``resumed``
    record from the state reached and its ``resume_<stage>`` move."""
    state, expected = manifest.state, manifest.expected_move
    for record in tail:
        kind, source = record.get("event"), record.get("source")
        where = f"seq {record.get('seq')}"
        if source != state:
            return f"{where}: {kind} from '{source}' while the run was in '{state}'"
        if kind == "resumed":
            point = manifest.resume_point
            expected = None if point is None else ExpectedMove(trigger=f"resume_{point.dest}", source="idle",
                                                               dest=point.dest)
            state = PruningStage.IDLE.value
            continue
        if kind != "transition":
            return f"{where}: a '{kind}' record no run writes after its last checkpoint"
        move = (record.get("trigger"), source, record.get("dest"))
        if move[0] != "fail" and (expected is None or move != (expected.trigger, expected.source, expected.dest)):
            want = "no move" if expected is None else f"{expected.trigger} {expected.source}→{expected.dest}"
            return f"{where}: move {move[0]} {move[1]}→{move[2]} is not the run's next move ({want})"
        state, expected = str(move[2]), None
    return None
