"""podar.schemas: pydantic models for configs and run records, and the stages' names. Imports nothing else of
podar."""

from .config import (
    AllocationConfig,
    CalibrationConfig,
    DSnoTConfig,
    EvaluationConfig,
    ExportConfig,
    FineTuneConfig,
    ModelSourceConfig,
    PermutationConfig,
    PruningConfig,
    QualityGates,
    ReconstructionConfig,
    RuntimeConfig,
    StructureConfig,
    TinyModelConfig,
    parse_size,
)
from .datasets import NAMED_DATASETS, NamedDataset
from .errors import (
    AuditError,
    CheckpointError,
    ConfigError,
    DataError,
    ModelLoadError,
    PodarError,
    QualityGateError,
    StageError,
    TransitionError,
)
from .methods import (
    MagnitudeParams,
    MethodParams,
    PruneMethod,
    RIAParams,
    SparseGPTParams,
    WandaParams,
    known_methods,
    method_params_type,
    parse_method,
    register_method_params,
)
from .pattern import SparsityPatternConfig
from .records import (
    MANIFEST_SCHEMA_VERSION,
    ArtifactRecord,
    AuditEvent,
    Counters,
    ExpectedMove,
    FailureInfo,
    HistoryEntry,
    ResumePoint,
    RunManifest,
    StageResult,
    TextEvaluation,
)
from .schedule import Cubic, Gradual, OneShot, PruningSchedule
from .stage import PruningStage

__all__ = [
    "CalibrationConfig", "EvaluationConfig", "ExportConfig", "FineTuneConfig", "ModelSourceConfig", "PruningConfig",
    "QualityGates", "RuntimeConfig", "AllocationConfig", "ReconstructionConfig", "DSnoTConfig", "StructureConfig",
    "PermutationConfig",
    "TinyModelConfig", "parse_size",
    "NAMED_DATASETS", "NamedDataset",
    "AuditError", "CheckpointError", "ConfigError", "DataError", "ModelLoadError", "PodarError", "QualityGateError",
    "StageError", "TransitionError",
    "MagnitudeParams", "MethodParams", "PruneMethod", "SparseGPTParams", "WandaParams", "RIAParams", "known_methods",
    "method_params_type", "parse_method", "register_method_params",
    "SparsityPatternConfig",
    "MANIFEST_SCHEMA_VERSION", "ArtifactRecord", "AuditEvent", "Counters", "ExpectedMove", "FailureInfo",
    "HistoryEntry", "ResumePoint", "RunManifest", "StageResult", "TextEvaluation",
    "Cubic", "Gradual", "OneShot", "PruningSchedule",
    "PruningStage",
]
