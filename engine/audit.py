"""The audit log: ``RUN_DIR/audit.jsonl``, one JSON object per transition (and per resumption), hash-chained.

Written through a structlog logger of its own (``structlog.wrap_logger``), so nothing is configured
process-wide. Each line carries ``prev_sha256``, the sha256 of the previous line's bytes (the first line chains
to the sha256 of the run id), so an edited, removed or reordered line breaks the chain; the manifest keeps the
sha256 of the last line it confirmed (``audit_head_sha256``), so an edit of the last line shows too. Each move
out of a stage carries ``result_sha256``, the digest of the stage's checkpointed result and its artifacts'
records, and ``config_sha256``, the config it ran with: the manifest's records can be checked against the log.

A hash chain is only as strong as the folder it sits in: whoever can rewrite the whole folder can recompute it.
Two things close that: with ``PODAR_AUDIT_KEY`` set, every record (and the manifest) carries an HMAC-SHA256 under
that key, which a rewrite without the key cannot forge; and the head's sha256, handed to subscribers and printed
by ``podar run``, can be kept elsewhere and checked later (``podar audit RUN --expect-head SHA``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from podar.schemas.errors import AuditError, CheckpointError
from podar.schemas.records import ArtifactRecord, AuditEvent, ExpectedMove, HistoryEntry, RunManifest, StageResult

from .machine import PruningStage, is_legal

__all__ = ["KEY_ENV", "AuditLog", "AuditSummary", "audit_key", "chain_seed", "canonical", "mac_of",
           "checkpoint_digest", "compare_history", "verify_audit", "read_audit", "records_after", "tail_problem",
           "line_sha"]

KEY_ENV = "PODAR_AUDIT_KEY"


def audit_key() -> bytes | None:
    """The HMAC key from ``$PODAR_AUDIT_KEY`` (UTF-8), read when a run or an audit starts; None when unset."""
    value = os.environ.get(KEY_ENV)
    return value.encode() if value else None


def chain_seed(run_id: str) -> str:
    """The ``prev_sha256`` of the first record: sha256 of the run id's UTF-8 bytes."""
    return hashlib.sha256(run_id.encode()).hexdigest()


def line_sha(line: str) -> str:
    return hashlib.sha256(line.encode()).hexdigest()


def canonical(value: Any) -> str:
    """The canonical JSON of a value (sorted keys, no spaces): what digests and MACs are computed over."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def mac_of(record: Mapping[str, Any], key: bytes) -> str:
    """HMAC-SHA256 under ``key`` of a record's canonical JSON without its ``mac`` field."""
    body = {k: v for k, v in record.items() if k != "mac"}
    return hmac.new(key, canonical(body).encode(), hashlib.sha256).hexdigest()


def checkpoint_digest(result: StageResult | None, artifacts: Mapping[str, ArtifactRecord],
                      manifest: RunManifest | None = None) -> str:
    """sha256 of a checkpoint: a stage's result with the records of its artifacts; without a result (the move
    out of Idle), the run's inputs as the manifest first recorded them and the artifacts written before any
    stage (the dense reference), with the run's identity (when it was created, by which library versions, on how
    many processes, the model's description)."""
    if result is not None:
        # a result without task evaluations digests as before they existed (runs of podar 0.2 still audit)
        body: dict[str, Any] = {"result": result.model_dump(mode="json", exclude=None if result.tasks else {"tasks"}),
                                "artifacts": {p: artifacts[p].model_dump(mode="json") for p in result.artifacts
                                              if p in artifacts}}
    else:
        assert manifest is not None
        body = {"model_fingerprint": manifest.model_fingerprint, "data_sha256": manifest.data_sha256,
                "dense_reference_files": manifest.dense_reference_files, "created_at": manifest.created_at,
                "versions": manifest.versions, "world_size": manifest.world_size, "model_info": manifest.model_info,
                "artifacts": {p: r.model_dump(mode="json") for p, r in artifacts.items() if r.stage == "idle"}}
        if manifest.compute_dtype is not None:  # runs before it was recorded digest as they did
            body["compute_dtype"] = manifest.compute_dtype
    return hashlib.sha256(canonical(body).encode()).hexdigest()


class _DurableFileLogger:
    """structlog logger that appends each rendered line to a file and fsyncs it; never through a symbolic link."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.last_line: str | None = None

    def msg(self, line: str) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            kind = "a symbolic link" if self.path.is_symlink() else "not writable"
            raise CheckpointError(f"audit log '{self.path}' is {kind} ({e.strerror}); a run folder holds plain "
                                  "files only") from e
        with os.fdopen(fd, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.last_line = line

    info = msg


class AuditLog:
    """Appends records; continues the chain of an existing file. ``key``: records carry an HMAC under it."""

    def __init__(self, path: str | Path, run_id: str, *, key: bytes | None = None, writer: bool = True) -> None:
        self.path = Path(path)
        self.run_id = run_id
        self.key = key
        self.writer = writer  # False on the processes that do not write the run folder: records are made, not kept
        self._sink = _DurableFileLogger(self.path)
        self.head_sha256 = chain_seed(run_id)
        self.next_seq = 0
        self.repaired: str | None = None
        if self.path.exists() and writer:
            self._continue()
        processors: list[Any] = [self._add_chain]
        if key is not None:
            processors.append(self._add_mac)
        processors.append(structlog.processors.JSONRenderer(sort_keys=True))
        self._logger = structlog.wrap_logger(self._sink, processors=processors, wrapper_class=structlog.BoundLogger)

    def _continue(self) -> None:
        if self.path.is_symlink():
            raise CheckpointError(f"audit log '{self.path}' is a symbolic link; a run folder holds plain files only")
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
            self.head_sha256 = line_sha(last_line)
            self.next_seq = records[-1]["seq"] + 1

    def _add_chain(self, _logger: Any, _name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        event_dict["prev_sha256"] = self.head_sha256
        return event_dict

    def _add_mac(self, _logger: Any, _name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        assert self.key is not None
        event_dict["mac"] = mac_of(event_dict, self.key)
        return event_dict

    def write(self, **fields: Any) -> AuditEvent:
        """Validate and append one record; returns it. ``seq``, ``prev_sha256`` (and ``mac``) are filled here."""
        event = fields.pop("event", "transition")
        record = AuditEvent(event=event, run_id=self.run_id, seq=self.next_seq, prev_sha256=self.head_sha256,
                            **fields)
        if not self.writer:
            self.next_seq += 1
            return record
        payload = record.model_dump(mode="json", exclude={"prev_sha256", "event", "mac"})
        self._logger.info(event, **payload)
        assert self._sink.last_line is not None
        self.head_sha256 = line_sha(self._sink.last_line)
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
            records.append(_parse(number, line))
    return records


@dataclass
class AuditSummary:
    """The chain of an audit log, replayed: its records, final state, and each stage's duration."""

    run_id: str
    records: int
    final_state: str
    stages: list[tuple[str, float | None]] = field(default_factory=list)
    outcome: str = ""
    head_sha256: str = ""
    line_shas: list[str] = field(default_factory=list)  # sha256 of each line, in order
    parsed: list[dict[str, Any]] = field(default_factory=list)  # each record, in order
    macs_checked: bool = False


def _parse(number: int, line: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise AuditError(f"line {number}: not valid JSON ({e})") from e
    if not isinstance(record, dict):
        raise AuditError(f"line {number}: not a JSON object")
    return record


def _replay(record: dict[str, Any], state: str, where: str) -> str:
    """The state after ``record``, replayed against the machine from ``state``; AuditError when it is not legal."""
    kind = record.get("event")
    if kind == "resumed":
        if record.get("source") != state:
            raise AuditError(f"{where}: resumed from '{record.get('source')}' but the run was in '{state}'")
        if state == PruningStage.COMPLETE.value:
            raise AuditError(f"{where}: a 'resumed' record after the run was Complete (no run resumes then)")
        return PruningStage.IDLE.value
    if kind != "transition":
        raise AuditError(f"{where}: record type '{kind}' is not one podar writes (transition, resumed)")
    trigger, source, dest = record.get("trigger"), record.get("source"), record.get("dest")
    if source != state:
        raise AuditError(f"{where}: move starts from '{source}' but the run was in '{state}'")
    if not is_legal(str(trigger), str(source), str(dest)):
        raise AuditError(f"{where}: illegal move '{trigger}' from '{source}' to '{dest}'")
    return str(dest)


def _check_record(record: dict[str, Any], number: int, expected_prev: str, run_id: str, key: bytes | None) -> str:
    """Where the record sits, after checking its link, fields, run, sequence number and MAC."""
    where = f"line {number} (seq {record.get('seq')})"
    if record.get("prev_sha256") != expected_prev:
        raise AuditError(f"{where}: hash chain broken — prev_sha256 does not match line {number - 1}: that line was "
                         "edited, or a line was removed or reordered here")
    try:
        AuditEvent.model_validate(record)
    except ValueError as e:
        raise AuditError(f"{where}: not a podar audit record ({str(e).splitlines()[0]})") from e
    if record.get("run_id") != run_id:
        raise AuditError(f"{where}: run_id {record.get('run_id')!r} is not this run's {run_id!r}")
    if record.get("seq") != number - 1:
        raise AuditError(f"{where}: sequence number {record.get('seq')} out of order, expected {number - 1}")
    if key is not None:
        if not record.get("mac"):
            raise AuditError(f"{where}: carries no MAC, but PODAR_AUDIT_KEY is set (written without the key, or "
                             "rewritten)")
        if not hmac.compare_digest(str(record["mac"]), mac_of(record, key)):
            raise AuditError(f"{where}: MAC does not match under PODAR_AUDIT_KEY: the record was forged or changed")
    return where


def compare_history(history: list[HistoryEntry], transitions: list[dict[str, Any]]) -> None:
    if len(history) != len(transitions):
        raise AuditError(f"the manifest's history holds {len(history)} moves, the audit log {len(transitions)}")
    for entry, record in zip(history, transitions, strict=True):
        mine = (entry.seq, entry.trigger, entry.source, entry.dest, entry.at)
        theirs = (record["seq"], record["trigger"], record["source"], record["dest"], record["at"])
        if mine != theirs:
            raise AuditError(f"seq {record['seq']}: the audit log says {record['trigger']} {record['source']}→"
                             f"{record['dest']} at {record['at']}, the manifest's history {entry.trigger} "
                             f"{entry.source}→{entry.dest} at {entry.at} (seq {entry.seq})")


def verify_audit(path: str | Path, run_id: str, history: Iterable[HistoryEntry] | None = None, *,
                 key: bytes | None = None) -> AuditSummary:
    """Check the hash chain, every record's fields (and MAC, with ``key``), replay every move against the
    machine, and, given the manifest's history, compare it move for move. Raises AuditError naming the first bad
    record (1-based line number and seq)."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        raise AuditError(f"audit log '{path}' does not exist as a plain file")
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln]
    expected_prev = chain_seed(run_id)
    summary = AuditSummary(run_id=run_id, records=len(lines), final_state=PruningStage.IDLE.value,
                           macs_checked=key is not None)
    transitions: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        record = _parse(number, line)
        where = _check_record(record, number, expected_prev, run_id, key)
        expected_prev = line_sha(line)
        summary.final_state = _replay(record, summary.final_state, where)
        if record["event"] == "transition":
            summary.stages.append((str(record["source"]), record.get("duration_s")))
            transitions.append(record)
        summary.line_shas.append(expected_prev)
        summary.parsed.append(record)
    if history is not None:
        compare_history(list(history), transitions)
    summary.head_sha256 = expected_prev
    summary.outcome = summary.final_state
    return summary


def records_after(path: str | Path, run_id: str, head_sha256: str | None) -> list[dict[str, Any]]:
    """The records after the line whose sha256 is ``head_sha256`` (the manifest's head): what the audit log holds
    that no manifest write confirmed yet. All records when the head is the chain seed. AuditError when no line has
    that sha256 (the log was cut or rewritten before the head)."""
    lines = [ln for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln]
    if head_sha256 in (None, chain_seed(run_id)):
        return [_parse(i + 1, ln) for i, ln in enumerate(lines)]
    for i, line in enumerate(lines):
        if line_sha(line) == head_sha256:
            return [_parse(j + 1, ln) for j, ln in enumerate(lines) if j > i]
    raise AuditError(f"no line of the audit log has the manifest's head sha256 {str(head_sha256)[:16]}…: lines the "
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
            if point is None or state == PruningStage.COMPLETE.value:
                return f"{where}: a 'resumed' record, but the run has nothing to resume"
            expected = ExpectedMove(trigger=f"resume_{point.dest}", source="idle", dest=point.dest)
            state = PruningStage.IDLE.value
            continue
        if kind != "transition":
            return f"{where}: a '{kind}' record, which no run writes"
        move = (record.get("trigger"), source, record.get("dest"))
        if move[0] != "fail" and (expected is None or move != (expected.trigger, expected.source, expected.dest)):
            want = "no move" if expected is None else f"{expected.trigger} {expected.source}→{expected.dest}"
            return f"{where}: move {move[0]} {move[1]}→{move[2]} is not the run's next move ({want})"
        state, expected = str(move[2]), None
    return None
