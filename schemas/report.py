"""The run report (``RUN_DIR/report.json``): what a person reads after a run, rebuilt from the run folder."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from .records import FailureInfo, TaskEvaluation, TextEvaluation

__all__ = ["REPORT_SCHEMA_VERSION", "LayerReport", "TextReport", "RunReport"]

REPORT_SCHEMA_VERSION = 1


class _Report(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LayerReport(_Report):
    """One pruned layer: achieved sparsity (zeros / weights) and relative reconstruction error on calibration
    inputs, ‖WX − ŴX‖² / ‖WX‖² (None when no calibration inputs were used, e.g. magnitude)."""

    name: str
    sparsity: float = Field(ge=0.0, le=1.0)
    reconstruction_error: float | None = None
    round: int = 0
    group: int = 0


TextReport = TextEvaluation  # one evaluation text, as the Evaluating stage recorded it


class RunReport(_Report):
    schema_version: int = REPORT_SCHEMA_VERSION
    run_id: str
    state: str
    created_at: str
    updated_at: str
    method: str
    pattern: str
    target_sparsity: float
    scope: str
    schedule: str
    model: str
    failure: FailureInfo | None = None
    achieved_sparsity: float | None = Field(default=None, description="zeros / weights over all pruned layers")
    layers: list[LayerReport] = Field(default_factory=list)
    texts: list[TextReport] = Field(default_factory=list)
    tasks: list[TaskEvaluation] = Field(default_factory=list, description="lm-eval tasks, dense against pruned")
    stage_durations_s: dict[str, float] = Field(default_factory=dict, description="summed over visits, seconds")
    pruning_time_s: float = Field(default=0.0, description="Calibrating + Computing Importance + Pruning, seconds")
    total_time_s: float = 0.0
    schedule_points: list[tuple[int, float]] = Field(default_factory=list, description="(step, sparsity) per round")
    finetune_losses: list[float] = Field(default_factory=list)
    finetune_validation: list[tuple[int, float, float]] = Field(
        default_factory=list, description="(step, validation loss in nats/token, KL to the dense model) per validation")
    structure: dict[str, int | float | str] | None = Field(
        default=None, description="structured pruning: parameters before and after, the new config values")
    export_format: str | None = None
    export_bytes: int | None = None
    plots: list[str] = Field(default_factory=list, description="PNG files, relative to the run folder")
