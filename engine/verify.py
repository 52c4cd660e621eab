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
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from podar.schemas.errors import AuditError, PodarError
from podar.schemas.records import MANIFEST_SCHEMA_VERSION, Counters, ExpectedMove, ResumePoint, RunManifest

from .audit import AuditSummary, canonical, checkpoint_digest, compare_history, tail_problem, verify_audit
from .machine import VOLATILE, PruningStage, apply_effects, move_for
from .store import RunStore, manifest_mac, sha256_file

__all__ = ["AuditReport", "RunPosition", "audit_run", "consumed_results", "derive_position"]


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
    if manifest.schema_version != MANIFEST_SCHEMA_VERSION:
        raise AuditError(f"the manifest has schema {manifest.schema_version}; this podar audits schema "
                         f"{MANIFEST_SCHEMA_VERSION} (audit it with the podar that wrote it)")
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


def _check_results(manifest: RunManifest, records: list[dict[str, Any]], notes: list[str]) -> bool:
    """Every stage result in the manifest has the digest its record carries, in order. True when the last result
    is confirmed by no record yet: the run was checkpointed in the stage it is in, and is at work or was killed
    before its next move."""
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
    if i == len(results) - 1 and results[-1].stage == manifest.state:
        notes.append(f"the last result ({PruningStage(results[-1].stage).display_name()}) is checkpointed but no "
                     "record confirms it yet: the run is at work there, or was killed before its next move")
        return True
    if i != len(results):
        raise AuditError(f"the manifest holds {len(results)} stage results, the log confirms {i}")
    return False


@dataclass
class RunPosition:
    """Where a run stands, as its verified records give it: the loop counters, the point a resume continues from,
    and the move it makes next."""

    progress: Counters
    resume_point: ResumePoint | None
    expected_move: ExpectedMove | None


def _first_point(dest: str) -> ResumePoint:
    return ResumePoint(dest=dest, note="nothing finished: starting from the beginning")


def derive_position(manifest: RunManifest, confirmed: list[dict[str, Any]]) -> RunPosition:
    """The counters, resume point and next move replayed from the records the manifest confirmed and the stage
    results they confirm (each carries the point and move computed when it was checkpointed, so the log's digest
    covers them); a last result no record confirms yet (a run killed right after its checkpoint) gives its own.
    Before the first record: the first point the manifest names, when it is one the machine allows."""
    results, i = manifest.results, 0
    counters = Counters()
    point: ResumePoint | None = None
    move: ExpectedMove | None = None
    for record in confirmed:
        if record.get("result_sha256") and record.get("trigger") != "start":
            result = results[i]
            i += 1
            if PruningStage(result.stage) in VOLATILE and point is not None and result.resume_point != point:
                raise AuditError(f"seq {record['seq']}: the result of {PruningStage(result.stage).display_name()} "
                                 "names another resume point than the checkpoint before it (it keeps that one)")
            counters, point, move = result.progress.model_copy(), result.resume_point, result.next_move
        if record["event"] == "resumed":
            if point is None:
                raise AuditError(f"seq {record['seq']}: a resumed record, but no checkpoint gives a point to resume")
            move = ExpectedMove(trigger=f"resume_{point.dest}", source="idle", dest=point.dest)
            continue
        step = move_for(record["trigger"], record["source"], record["dest"])
        assert step is not None  # the chain replay has checked every move
        if step.kind == "resume" and point is not None:
            counters = point.counters.model_copy()
        counters = apply_effects(step, counters.model_copy())
        if record["trigger"] == "start":
            point = _first_point(record["dest"])
        if step.dest.is_terminal():
            move = None
            if step.dest is PruningStage.COMPLETE:
                point = None
    if i < len(results):  # the last result, checkpointed but not confirmed by a record yet
        last = results[-1]
        _check_unconfirmed(last, counters, point)
        return RunPosition(last.progress.model_copy(), last.resume_point, last.next_move)
    if not confirmed:  # the first checkpoint: Idle, nothing done
        first = manifest.resume_point
        if first is None or first.dest not in (PruningStage.CALIBRATING.value,
                                               PruningStage.COMPUTING_IMPORTANCE.value):
            raise AuditError("the manifest's first resume point is not a stage a run starts with")
        return RunPosition(Counters(), _first_point(first.dest),
                           ExpectedMove(trigger="start", source="idle", dest=first.dest))
    return RunPosition(counters, point, move)


def _check_unconfirmed(result: Any, counters: Counters, point: ResumePoint | None) -> None:
    """A result no record confirms yet holds what its stage leaves from where the log put the run: the counters
    the log gives (Fine-tuning adds its steps), and a next move and resume point that follow from them (the
    resume, which knows the model's layer groups, checks the move's conditions too)."""
    stage = PruningStage(result.stage)
    where = f"the last result ({stage.display_name()}, no record confirms it yet)"
    done = result.progress
    if (done.round_index, done.group_index) != (counters.round_index, counters.group_index) or (
            done.step != counters.step and not (stage is PruningStage.FINE_TUNING and done.step > counters.step)):
        raise AuditError(f"{where} holds counters {done.model_dump()}, the log leaves the run at "
                         f"{counters.model_dump()}: the manifest was edited")
    if stage in VOLATILE:
        if result.resume_point != point:
            raise AuditError(f"{where} names another resume point than the checkpoint before it: the manifest was "
                             "edited")
        return
    nxt = result.next_move
    move = None if nxt is None else move_for(nxt.trigger, nxt.source, nxt.dest)
    if move is None or move.kind != "forward" or move.source is not stage:
        raise AuditError(f"{where} names a next move that is no forward move out of its stage: the manifest was "
                         "edited")
    if move.dest.is_terminal():
        want = (stage.value, done)
    else:
        want = (move.dest.value, apply_effects(move, done.model_copy()))
    rp = result.resume_point
    if rp is None or (rp.dest, rp.counters) != want:
        raise AuditError(f"{where} names a resume point that does not follow from its next move and counters: the "
                         "manifest was edited")


def _check_position(manifest: RunManifest, position: RunPosition) -> None:
    """The manifest's counters, resume point and next move are the ones its verified records give."""
    for name, derived in (("resume_point", position.resume_point), ("expected_move", position.expected_move),
                          ("progress", position.progress)):
        written = getattr(manifest, name)
        if written != derived:
            def show(v: Any) -> str:
                return "none" if v is None else v.model_dump_json()

            raise AuditError(f"the manifest's {name} ({show(written)}) is not the one its verified records give "
                             f"({show(derived)}): the manifest was edited")


def _check_resumes(manifest: RunManifest, confirmed: list[dict[str, Any]]) -> None:
    """The manifest's list of resumptions is the log's ``resumed`` records, field for field."""
    logged = [{"at": r["at"], "from_state": r["source"], "seq": r["seq"], **(r.get("metrics") or {})}
              for r in confirmed if r["event"] == "resumed"]
    if manifest.resumes != logged:
        raise AuditError(f"the manifest lists {len(manifest.resumes)} resumption(s) that are not the log's "
                         f"{len(logged)} resumed record(s): the manifest was edited")


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


def _check_artifact_owners(manifest: RunManifest) -> None:
    """Every artifact record belongs to a stage result (whose digest the log holds) or to the run's start."""
    owned = {a for r in manifest.results for a in r.artifacts}
    stray = [p for p, r in manifest.artifacts.items() if p not in owned and r.stage != "idle"]
    if stray:
        raise AuditError(f"the manifest records artifact(s) no stage result names ({', '.join(stray[:3])}): the "
                         "manifest was edited")


def check_derived_files(store: RunStore, manifest: RunManifest) -> list[str]:
    """config.yaml, report.json and report.md as podar writes them from the verified manifest (AuditError when one
    differs); the notes name what no digest covers (the plots, ``updated_at``)."""
    from podar.schemas.config import config_yaml

    from .report import build_report, report_files

    expected: dict[str, str] = {"config.yaml": config_yaml(manifest.config)}
    written_report = store.run_dir / "report.json"
    if written_report.is_file():
        try:
            plots = json.loads(written_report.read_text(encoding="utf-8")).get("plots", [])
        except (ValueError, AttributeError) as e:
            raise AuditError(f"'report.json' is not the report podar writes ({e})") from e
        report = build_report(store.run_dir)
        report.plots = [p for p in plots if isinstance(p, str)]
        expected.update(report_files(report))
    for name, text in expected.items():
        path = store.run_dir / name
        if path.is_file() and path.read_bytes() != text.encode():
            raise AuditError(f"'{name}' is not what podar writes from the verified manifest: it was edited "
                             f"(`podar report {store.run_dir}` writes the report again)")
    notes = ["manifest.updated_at (the time of the last write) is not covered by the log"]
    if (store.run_dir / "plots").is_dir():
        notes.append("plots/*.png are drawn from the verified records but not checked byte for byte (`podar report` "
                     "redraws them)")
    return notes


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
    match, also a value in the manifest or log that podar never writes (an unknown stage name, a wrong type)."""
    try:
        return _audit(run_dir, key, expect_head, check_files)
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        if isinstance(e, PodarError):
            raise
        raise AuditError(f"the run folder holds a value podar never writes ({type(e).__name__}: {e}): it was "
                         "edited") from e


def _audit(run_dir: str | Path, key: bytes | None, expect_head: str | None, check_files: bool) -> AuditReport:
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
    unconfirmed = _check_results(manifest, summary.parsed, notes)
    at_rest = not tail and not live and not unconfirmed
    _check_outcome(manifest, confirmed)
    _check_position(manifest, derive_position(manifest, confirmed))
    _check_resumes(manifest, confirmed)
    _check_artifact_owners(manifest)
    files, unrecorded = _check_files(store, manifest) if check_files else (0, [])
    if check_files:
        notes.extend(check_derived_files(store, manifest))
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
