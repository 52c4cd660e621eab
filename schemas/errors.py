"""podar's one error hierarchy.

Every error podar raises on purpose is a :class:`PodarError`. Messages name what was wrong (config field,
layer name, file), the value found, and the fix.
"""

from __future__ import annotations


class PodarError(Exception):
    """Base of every error podar raises on purpose."""


class ConfigError(PodarError, ValueError):
    """A configuration value is invalid, or does not fit the model it is applied to."""


class DataError(PodarError, ValueError):
    """Calibration or evaluation data is missing, too short, or does not fit the tokenizer/model."""


class ModelLoadError(PodarError):
    """A model or tokenizer could not be loaded from its source."""


class StageError(PodarError):
    """A stage could not do its job. Carries the stage and, when known, the layer."""

    def __init__(self, message: str, *, stage: str | None = None, layer: str | None = None) -> None:
        super().__init__(message)
        self.stage = stage
        self.layer = layer


class QualityGateError(StageError):
    """A quality gate of the Evaluating stage failed."""


class CheckpointError(PodarError):
    """A run folder, its manifest, an artifact or its lock is missing, corrupt, or does not match."""


class TransitionError(PodarError):
    """A move the state machine does not allow was asked for."""


class AuditError(PodarError):
    """An audit log fails verification (broken chain, illegal move, mismatch with the manifest)."""
