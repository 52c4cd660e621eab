"""podar: a pruning pipeline for neural networks (LLMs first), driven by an explicit state machine.

The public API, in one place::

    from podar import Pipeline, PruningConfig, SparsityPatternConfig
    result = Pipeline(PruningConfig().with_method("wanda"), run_dir="runs/x").run()
"""

from podar.engine.audit import AuditSummary, verify_audit
from podar.engine.distributed import end_processes
from podar.engine.machine import mermaid
from podar.engine.models import load_model, tiny_llama
from podar.engine.runner import Runner
from podar.engine.store import RunStore
from podar.schemas import (
    AllocationConfig,
    AuditError,
    AuditEvent,
    CalibrationConfig,
    CheckpointError,
    ConfigError,
    Cubic,
    DataError,
    DSnoTConfig,
    EvaluationConfig,
    ExportConfig,
    FailureInfo,
    FineTuneConfig,
    Gradual,
    MagnitudeParams,
    MethodParams,
    ModelLoadError,
    ModelSourceConfig,
    OneShot,
    PermutationConfig,
    PodarError,
    PruneMethod,
    PruningConfig,
    PruningStage,
    QualityGateError,
    QualityGates,
    ReconstructionConfig,
    RIAParams,
    RunManifest,
    RuntimeConfig,
    SparseGPTParams,
    SparsityPatternConfig,
    StageError,
    StageResult,
    StructureConfig,
    TinyModelConfig,
    TransitionError,
    WandaParams,
)
from podar.stages.export_io import load_pretrained
from podar.stages.methods import LayerStats, Pruned, PruneSpec, PruningMethod, register_method
from podar.stages.perplexity import PerplexityResult, perplexity
from podar.stages.quality import TextMetrics, evaluate

from ._resume import run_masks
from .pipeline import Pipeline, PipelineResult

__version__ = "0.2.0"

__all__ = [
    "Pipeline", "PipelineResult", "run_masks", "PruningStage", "Runner", "RunStore", "mermaid", "verify_audit",
    "AuditSummary", "end_processes",
    "load_model", "load_pretrained", "tiny_llama", "perplexity", "PerplexityResult", "evaluate", "TextMetrics",
    "PruningConfig", "PruneMethod", "SparsityPatternConfig", "OneShot", "Gradual", "Cubic", "CalibrationConfig",
    "RuntimeConfig", "FineTuneConfig", "EvaluationConfig", "QualityGates", "ExportConfig", "ModelSourceConfig",
    "AllocationConfig", "ReconstructionConfig", "DSnoTConfig", "StructureConfig",
    "PermutationConfig", "TinyModelConfig", "MethodParams",
    "MagnitudeParams", "WandaParams",
    "SparseGPTParams", "RIAParams",
    "PruningMethod", "LayerStats", "PruneSpec", "Pruned", "register_method",
    "StageResult", "AuditEvent", "RunManifest", "FailureInfo",
    "PodarError", "ConfigError", "DataError", "ModelLoadError", "StageError", "QualityGateError",
    "CheckpointError", "TransitionError", "AuditError",
    "__version__",
]
