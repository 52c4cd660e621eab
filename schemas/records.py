"""Records a run writes: stage results, audit events, the run manifest. JSON only, never pickle."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "MANIFEST_SCHEMA_VERSION",
    "ArtifactRecord",
    "FailureInfo",
    "StageResult",
    "HistoryEntry",
    "AuditEvent",
    "RunManifest",
]

MANIFEST_SCHEMA_VERSION = 1

Scalar = float | int | str | bool | None


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ArtifactRecord(_Record):
    """One file in the run folder: path relative to the run folder, sha256 of its bytes, size in bytes."""

    path: str
    sha256: str
    bytes: int = Field(ge=0)
    stage: str
    kind: str = Field(description="what it holds: masks, statistics, weights, export, report")


class FailureInfo(_Record):
    """Why a run ended in Failed."""

    type: str
    message: str
    stage: str
    layer: str | None = None
    reason: str = Field(default="error", description="'error', 'quality_gate', 'interrupted' or 'cancelled'")


class StageResult(_Record):
    """What a stage handler returns: metrics (plain scalars), per-layer metrics and produced artifacts.

    ``outcome`` lets the runner choose among the legal moves out of the stage (e.g. the quality gate);
    handlers never fire transitions themselves.
    """

    stage: str
    metrics: dict[str, Scalar] = Field(default_factory=dict)
    layer_metrics: dict[str, dict[str, Scalar]] = Field(default_factory=dict)
    artifacts: list[str] = Field(default_factory=list, description="artifact paths (relative to the run folder)")
    outcome: str | None = None
    duration_s: float = 0.0
    progress: dict[str, Scalar] = Field(
        default_factory=dict, description="loop counters when the stage finished (round, group, step)")
    checkpoint_s: float = Field(default=0.0, description="seconds spent writing this stage's artifacts")
    checkpoint_bytes: int = Field(default=0, description="bytes of this stage's artifacts")
    notes: list[str] = Field(default_factory=list)

    def summary(self, limit: int = 8) -> dict[str, Scalar]:
        """The first ``limit`` scalar metrics, for the audit line."""
        return dict(list(self.metrics.items())[:limit])


class HistoryEntry(_Record):
    """One transition as the manifest keeps it (the audit log holds the full record)."""

    seq: int = Field(ge=0)
    trigger: str
    source: str
    dest: str
    at: str = Field(description="UTC ISO-8601 timestamp")


class AuditEvent(_Record):
    """One line of ``audit.jsonl``: a transition of the machine, hash-chained to the previous line."""

    event: str = "transition"
    run_id: str
    seq: int = Field(ge=0)
    trigger: str
    source: str
    dest: str
    at: str = Field(description="UTC ISO-8601 timestamp")
    duration_s: float | None = Field(default=None, description="wall time of the stage just finished, seconds")
    metrics: dict[str, Scalar] = Field(default_factory=dict)
    error: FailureInfo | None = None
    prev_sha256: str = Field(description="sha256 of the previous line's bytes; the first line chains to the run id")


class RunManifest(_Record):
    """``RUN_DIR/manifest.json``: the last complete checkpoint of a run."""

    schema_version: int = MANIFEST_SCHEMA_VERSION
    run_id: str
    created_at: str
    updated_at: str
    config: dict[str, Any]
    config_sha256: str
    state: str
    history: list[HistoryEntry] = Field(default_factory=list)
    artifacts: dict[str, ArtifactRecord] = Field(default_factory=dict)
    results: list[StageResult] = Field(default_factory=list)
    progress: dict[str, Scalar] = Field(
        default_factory=dict, description="loop counters: pruning round, layer group, fine-tuning step"
    )
    versions: dict[str, str] = Field(default_factory=dict)
    world_size: int = Field(default=1, ge=1)
    model_fingerprint: str | None = None
    data_sha256: dict[str, str] = Field(default_factory=dict, description="sha256 of each input text, by role")
    resumes: list[dict[str, Scalar]] = Field(default_factory=list, description="each resumption: when, from where")
    failure: FailureInfo | None = None
    audit_head_sha256: str | None = Field(default=None, description="sha256 of the last audit line")
