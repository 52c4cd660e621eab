"""podar: a pruning pipeline for neural networks (LLMs first), driven by an explicit state machine.

The public API, in one place::

    from podar import Pipeline, PruningConfig, PruneMethod, SparsityPatternConfig
    result = Pipeline(PruningConfig().with_method(PruneMethod.WANDA), run_dir="runs/x").run()
"""

from podar.engine.audit import AuditSummary, verify_audit
from podar.engine.machine import PruningStage, mermaid
from podar.engine.models import load_model, tiny_llama
from podar.engine.runner import Runner
from podar.engine.store import RunStore
from podar.schemas import (
    AuditError,
    AuditEvent,
    CalibrationConfig,
    CheckpointError,
    ConfigError,
    Cubic,
    DataError,
    EvaluationConfig,
    ExportConfig,
    FailureInfo,
    FineTuneConfig,
    Gradual,
    ModelLoadError,
    ModelSourceConfig,
    OneShot,
    PodarError,
    PruneMethod,
    PruningConfig,
    QualityGateError,
    QualityGates,
    RunManifest,
    SparsityPatternConfig,
    StageError,
    StageResult,
    TinyModelConfig,
    TransitionError,
)
from podar.stages.export_io import load_pretrained
from podar.stages.perplexity import PerplexityResult, perplexity
from podar.stages.quality import TextMetrics, evaluate

from .pipeline import Pipeline, PipelineResult, run_masks

__version__ = "0.1.0"

__all__ = [
    "Pipeline", "PipelineResult", "run_masks", "PruningStage", "Runner", "RunStore", "mermaid", "verify_audit",
    "AuditSummary",
    "load_model", "load_pretrained", "tiny_llama", "perplexity", "PerplexityResult", "evaluate", "TextMetrics",
    "PruningConfig", "PruneMethod", "SparsityPatternConfig", "OneShot", "Gradual", "Cubic", "CalibrationConfig",
    "FineTuneConfig", "EvaluationConfig", "QualityGates", "ExportConfig", "ModelSourceConfig", "TinyModelConfig",
    "StageResult", "AuditEvent", "RunManifest", "FailureInfo",
    "PodarError", "ConfigError", "DataError", "ModelLoadError", "StageError", "QualityGateError",
    "CheckpointError", "TransitionError", "AuditError",
    "__version__",
]
