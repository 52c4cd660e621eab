"""Auditing a run folder: the audit log against the machine, the manifest against the log, the files against
the manifest (``podar audit``).

Verdicts: ``ok`` — every check passed and the run is at rest (Complete, Failed, or stopped between stages with
its last checkpoint confirmed); ``in_progress`` — every check passed up to the last checkpoint, and what follows
is what a live or killed run leaves (its stage at work, a lock held by a live process). Anything else raises
AuditError naming what does not match. What a hash chain cannot show without a key is said in ``notes``.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from podar.schemas.errors import AuditError, PodarError
from podar.schemas.records import RunManifest

from .audit import AuditSummary, canonical, checkpoint_digest, compare_history, tail_problem, verify_audit
from .machine import PruningStage
from .store import RunStore, manifest_mac, sha256_file

__all__ = ["AuditReport", "audit_run", "consumed_results"]


@dataclass
class AuditReport:
    """What ``podar audit`` found."""

    run_id: str
    verdict: Literal["ok", "in_progress"]
    state: str  # the run's state as the log has it
    records: int
    head_sha256: str  # sha256 of the log's last line: keep it to check the log later (--expect-head)
    stages: list[tuple[str, float | None]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    macs_checked: bool = False
    files_checked: int = 0


def _check_manifest(manifest: RunManifest, key: bytes | None, notes: list[str]) -> None:
    if hashlib.sha256(canonical(manifest.config).encode()).hexdigest() != manifest.config_sha256:
        raise AuditError("the manifest's config does not match its config_sha256: the manifest was edited")
    if key is None:
        if manifest.mac:
            notes.append("the manifest and the records carry MACs: set PODAR_AUDIT_KEY to check them")
        else:
            notes.append("no PODAR_AUDIT_KEY: whoever can rewrite the whole folder could recompute the chain; "
                         "compare the head with one kept elsewhere (--expect-head)")
        return
    if not manifest.mac:
        raise AuditError("PODAR_AUDIT_KEY is set but the manifest carries no MAC: written without the key, or "
                         "rewritten")
    if not hmac.compare_digest(manifest.mac, manifest_mac(manifest, key)):
        raise AuditError("the manifest's MAC does not match under PODAR_AUDIT_KEY: the manifest was changed")


def _split_at_head(manifest: RunManifest, summary: AuditSummary) -> int:
    """Index of the line the manifest confirmed last (-1 when it confirmed none)."""
    head = manifest.audit_head_sha256
    if head is None or head == hashlib.sha256(manifest.run_id.encode()).hexdigest():
        return -1
    try:
        return summary.line_shas.index(head)
    except ValueError:
        raise AuditError(f"the manifest's audit head {head[:16]}… is no line of the log: the records it confirmed "
                         "were changed or removed") from None


def _check_expected_head(summary: AuditSummary, expect_head: str | None) -> None:
    if expect_head is None or expect_head == summary.head_sha256:
        return
    if expect_head in summary.line_shas:
        extra = len(summary.line_shas) - 1 - summary.line_shas.index(expect_head)
        raise AuditError(f"{extra} record(s) follow the head you kept ({expect_head[:16]}…): they were appended "
                         "after it")
    raise AuditError(f"the head you kept ({expect_head[:16]}…) is no line of this log: the log was rewritten")


def consumed_results(records: list[dict[str, Any]]) -> int:
    """How many stage results the records confirm (each move out of a stage, or a ``resumed`` record, carries the
    digest of the result checkpointed before it; the move out of Idle carries the run's inputs instead)."""
    return sum(1 for r in records if r.get("result_sha256") and r.get("trigger") != "start")


def _check_summary(record: dict[str, Any], result: Any, where: str, stage: str) -> None:
    """The record's copy of the result's first metrics and its duration, as the result holds them."""
    if record.get("event") != "transition":
        return
    summary = result.summary()
    changed = sorted(k for k in set(summary) | set(record.get("metrics") or {})
                     if summary.get(k) != (record.get("metrics") or {}).get(k))
    if changed:
        raise AuditError(f"{where}: the record's metrics of {stage} ({', '.join(changed)}) are not the manifest's: "
                         "the log was edited")
    if record.get("duration_s") != round(result.duration_s, 6):
        raise AuditError(f"{where}: the record's duration of {stage} ({record.get('duration_s')} s) is not the "
                         f"manifest's ({round(result.duration_s, 6)} s): the log was edited")


def _check_results(manifest: RunManifest, records: list[dict[str, Any]], at_rest: bool, notes: list[str]) -> None:
    """Every stage result in the manifest has the digest its record carries, in order."""
    results = manifest.results
    i = 0
    for record in records:
        digest = record.get("result_sha256")
        if not digest:
            continue
        where = f"seq {record['seq']}"
        if record.get("trigger") == "start":
            if digest != checkpoint_digest(None, manifest.artifacts, manifest):
                raise AuditError(f"{where}: the run's inputs or dense reference in the manifest differ from what "
                                 "the log recorded at the start (model or data hash, or an artifact, was edited)")
            continue
        if i >= len(results):
            raise AuditError(f"{where}: the log confirms a stage result the manifest does not hold")
        result = results[i]
        stage = PruningStage(result.stage).display_name()
        if digest != checkpoint_digest(result, manifest.artifacts):
            raise AuditError(f"{where}: the manifest's result of {stage} (#{i + 1}) is not what the log recorded: "
                             "the manifest was edited")
        _check_summary(record, result, where, stage)
        i += 1
    if i == len(results) - 1 and not at_rest:
        notes.append(f"the last result ({PruningStage(results[-1].stage).display_name()}) is checkpointed but no "
                     "record confirms it yet")
    elif i != len(results):
        raise AuditError(f"the manifest holds {len(results)} stage results, the log confirms {i}")


def _check_outcome(manifest: RunManifest, confirmed: list[dict[str, Any]]) -> None:
    transitions = [r for r in confirmed if r["event"] == "transition"]
    state = confirmed[-1]["dest"] if confirmed else PruningStage.IDLE.value
    if state != manifest.state:
        raise AuditError(f"the manifest says the run is {manifest.state}, the log says {state}")
    if manifest.state == PruningStage.FAILED.value:
        error = transitions[-1].get("error") if transitions else None
        if (manifest.failure is None) != (error is None) or (
                error is not None and manifest.failure.model_dump(mode="json") != error):
            raise AuditError("the manifest's failure is not the one the log recorded")
    if confirmed and confirmed[-1].get("config_sha256") not in (None, manifest.config_sha256):
        raise AuditError("the manifest's config is not the one the log's last record ran with")


def _check_files(store: RunStore, manifest: RunManifest) -> tuple[int, list[str]]:
    """Every recorded artifact a plain file with its sha256; no symbolic link in the folder. (checked, unrecorded)"""
    for path in store.run_dir.rglob("*"):
        if path.is_symlink():
            raise AuditError(f"'{path.relative_to(store.run_dir)}' is a symbolic link; a run folder holds plain files")
    for record in manifest.artifacts.values():
        path = store.artifact_path(record.path)
        if not path.is_file():
            raise AuditError(f"artifact '{record.path}' recorded in the manifest is missing")
        if sha256_file(path) != record.sha256:
            raise AuditError(f"artifact '{record.path}' does not have its recorded sha256: the file was changed")
    return len(manifest.artifacts), store.unrecorded_files(manifest)


def audit_run(run_dir: str | Path, *, key: bytes | None = None, expect_head: str | None = None,
              check_files: bool = True) -> AuditReport:
    """Audit the run in ``run_dir`` (see the module docstring); AuditError names the first thing that does not
    match."""
    store = RunStore(run_dir)
    try:
        manifest = store.read_manifest()
    except PodarError as e:
        raise AuditError(str(e)) from e
    notes: list[str] = []
    _check_manifest(manifest, key, notes)
    summary = verify_audit(store.audit_path, manifest.run_id, key=key)
    _check_expected_head(summary, expect_head)
    h = _split_at_head(manifest, summary)
    confirmed, tail = summary.parsed[: h + 1], summary.parsed[h + 1:]
    problem = tail_problem(manifest, tail)
    if problem is not None:
        raise AuditError(f"beyond the manifest's last checkpoint the log holds {problem}")
    compare_history(manifest.history, [r for r in confirmed if r["event"] == "transition"])
    live = store.lock.holder_alive()
    at_rest = not tail and not live
    _check_results(manifest, summary.parsed, at_rest, notes)
    _check_outcome(manifest, confirmed)
    files, unrecorded = _check_files(store, manifest) if check_files else (0, [])
    if unrecorded:
        notes.append(f"{len(unrecorded)} file(s) no record names (ignored by resume): {', '.join(unrecorded[:5])}")
    if tail:
        notes.append(f"{len(tail)} record(s) after the last checkpoint: the run is in "
                     f"{PruningStage(summary.final_state).display_name()} (at work, or killed there)")
    if live:
        notes.append(f"the run folder is locked by a live process ({live})")
    return AuditReport(run_id=manifest.run_id, verdict="ok" if at_rest else "in_progress",
                       state=summary.final_state, records=summary.records, head_sha256=summary.head_sha256,
                       stages=summary.stages, notes=notes, macs_checked=key is not None, files_checked=files)
