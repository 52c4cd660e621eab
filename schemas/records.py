"""Records a run writes: stage results, audit events, the run manifest. JSON only, never pickle."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .stage import PruningStage

__all__ = [
    "MANIFEST_SCHEMA_VERSION",
    "Counters",
    "ResumePoint",
    "ExpectedMove",
    "TextEvaluation",
    "TaskEvaluation",
    "ArtifactRecord",
    "FailureInfo",
    "StageResult",
    "STRUCTURE_PATTERN",
    "structure_result",
    "HistoryEntry",
    "AuditEvent",
    "RunManifest",
]

MANIFEST_SCHEMA_VERSION = 3

Scalar = float | int | str | bool | None


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Counters(_Record):
    """The loop counters of a run: where it stands in the schedule, the layer groups and fine-tuning."""

    round_index: int = Field(default=0, ge=0, description="pruning round of the schedule, 0-based")
    group_index: int = Field(default=0, ge=0, description="sequential layer group of the round, 0-based")
    step: int = Field(default=0, ge=0, description="fine-tuning optimizer steps done")


class ResumePoint(_Record):
    """Where a resumed run goes from the last checkpoint: the stage to enter and the counters it starts with."""

    dest: str = Field(description="the stage a resume moves to from Idle")
    counters: Counters = Field(default_factory=Counters)
    note: str = ""


class ExpectedMove(_Record):
    """The move the run makes next from its last checkpoint (what an interrupted run's audit log may hold
    beyond the manifest)."""

    trigger: str
    source: str
    dest: str


class TextEvaluation(_Record):
    """One evaluation text: every metric dense and pruned, and its gate outcome."""

    dataset: str
    windows: int = Field(ge=0)
    seq_len: int = Field(ge=0)
    dense_ppl: float | None = Field(default=None, description="causal LMs: perplexity of the dense model")
    pruned_ppl: float | None = None
    ppl_increase_pct: float | None = None
    kl_mean: float | None = Field(default=None, description="mean KL(dense ‖ pruned) per token, nats")
    top1_agreement: float | None = None
    hidden_cosine: float | None = Field(default=None, description="encoders: mean per-token cosine of the last "
                                                                  "hidden states, pruned against dense")
    hidden_rel_mse: float | None = Field(default=None, description="encoders: ‖H_pruned − H_dense‖² / ‖H_dense‖²")
    embedding_cosine: float | None = Field(default=None, description="encoders: mean cosine of mean-pooled "
                                                                     "embeddings")
    gate_failures: list[str] = Field(default_factory=list)
    on_fail: str = "fail"

    @property
    def gates_passed(self) -> bool:
        return not self.gate_failures


class TaskEvaluation(_Record):
    """One lm-evaluation-harness task: its metric for the dense and the pruned model, and its gate outcome."""

    task: str
    metric: str = Field(description="the metric compared (acc: share of examples right, 0–1)")
    examples: int = Field(ge=0, description="examples scored")
    dense: float
    pruned: float
    dense_stderr: float | None = Field(default=None, description="lm-eval's standard error of the dense figure")
    pruned_stderr: float | None = None
    drop_points: float = Field(description="(dense − pruned) × 100: accuracy points lost")
    gate_failures: list[str] = Field(default_factory=list)
    on_fail: str = "fail"


class ArtifactRecord(_Record):
    """One file in the run folder: path relative to the run folder, sha256 of its bytes, size in bytes, and the
    stage, round and layer group that wrote it."""

    path: str
    sha256: str
    bytes: int = Field(ge=0)
    stage: str
    kind: str = Field(description="what it holds: masks, weights, baseline, export")
    round: int | None = None
    group: int | None = None


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
    progress: Counters = Field(default_factory=Counters, description="loop counters when the stage finished")
    series: dict[str, list[float]] = Field(default_factory=dict, description="per-step values (fine-tuning)")
    texts: list[TextEvaluation] = Field(default_factory=list, description="per evaluation text (Evaluating)")
    tasks: list[TaskEvaluation] = Field(default_factory=list, description="per lm-eval task (Evaluating)")
    checkpoint_s: float = Field(default=0.0, description="seconds spent writing this stage's artifacts")
    checkpoint_bytes: int = Field(default=0, description="bytes of this stage's artifacts")
    notes: list[str] = Field(default_factory=list)
    resume_point: ResumePoint | None = Field(default=None, description="where a resume continues from this "
                                                                       "checkpoint (covered by its digest)")
    next_move: ExpectedMove | None = Field(default=None, description="the move the run makes next from it")

    def summary(self, limit: int = 8) -> dict[str, Scalar]:
        """The first ``limit`` scalar metrics, for the audit line."""
        return dict(list(self.metrics.items())[:limit])


STRUCTURE_PATTERN = "structure"  # the ``pattern`` metric of the structure group's Pruning result


def structure_result(results: list[StageResult]) -> StageResult | None:
    """The Pruning result of the run's structure group (the plan's figures: blocks and widths kept, parameters
    before and after), or None before that group ran and in a run without ``structure``."""
    return next((r for r in results if r.stage == PruningStage.PRUNING.value
                 and r.metrics.get("pattern") == STRUCTURE_PATTERN), None)


class HistoryEntry(_Record):
    """One transition as the manifest keeps it (the audit log holds the full record)."""

    seq: int = Field(ge=0)
    trigger: str
    source: str
    dest: str
    at: str = Field(description="UTC ISO-8601 timestamp")
    interrupted: bool = Field(default=False, description="the process died in the stage it entered (no checkpoint)")


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
    config_sha256: str | None = Field(default=None, description="sha256 of the config the run moves with")
    result_sha256: str | None = Field(default=None, description="digest of the finished stage's checkpoint")
    prev_sha256: str = Field(description="sha256 of the previous line's bytes; the first line chains to the run id")
    mac: str | None = Field(default=None, description="HMAC-SHA256 under PODAR_AUDIT_KEY, when one was set")


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
    progress: Counters = Field(default_factory=Counters, description="loop counters at the last checkpoint")
    resume_point: ResumePoint | None = Field(default=None, description="where a resume continues")
    expected_move: ExpectedMove | None = Field(default=None, description="the next move from this checkpoint")
    versions: dict[str, str] = Field(default_factory=dict)
    world_size: int = Field(default=1, ge=1)
    model_fingerprint: str | None = None
    model_info: dict[str, str] = Field(default_factory=dict, description="the model's class, hub commit, path")
    compute_dtype: str | None = Field(
        default=None, description="the dtype the calibration forwards run in (runtime.compute_dtype as resolved)")
    dense_reference_files: dict[str, str] = Field(
        default_factory=dict, description="the model's own files the dense reference reads (not copied): sha256")
    data_sha256: dict[str, str] = Field(default_factory=dict, description="sha256 of each input text, by role")
    resumes: list[dict[str, Scalar]] = Field(default_factory=list, description="each resumption: when, from where")
    failure: FailureInfo | None = None
    audit_head_sha256: str | None = Field(default=None, description="sha256 of the last audit line")
    mac: str | None = Field(default=None, description="HMAC-SHA256 of this manifest under PODAR_AUDIT_KEY, if set")
