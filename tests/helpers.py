"""Helpers the tests share (importable by name: tests/ is on the path)."""

from __future__ import annotations

from pathlib import Path

from podar import (
    CalibrationConfig,
    EvaluationConfig,
    FineTuneConfig,
    ModelSourceConfig,
    PruningConfig,
    QualityGates,
    TinyModelConfig,
)


def make_tiny_config(corpus: Path, **tiny: object) -> PruningConfig:
    """A config that runs end to end on a 2-block random model (Llama unless ``arch=``) in a few seconds."""
    return PruningConfig(
        model=ModelSourceConfig(kind="tiny", tiny=TinyModelConfig(**tiny)),
        calibration=CalibrationConfig(num_samples=4, sequence_length=64, dataset=str(corpus)),
        finetune=FineTuneConfig(enabled=False, steps=2, sequence_length=32, dataset=str(corpus)),
        evaluation=EvaluationConfig(dataset=str(corpus), sequence_length=64, max_windows=4,
                                    gates=QualityGates(max_perplexity_increase_pct=None)),
    )
