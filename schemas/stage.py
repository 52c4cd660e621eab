"""The stages of a run: the state names of the machine (``engine.machine``) and the names people read."""

from __future__ import annotations

from enum import Enum

__all__ = ["PruningStage"]


class PruningStage(str, Enum):
    """A stage of a run. The value is the machine's state name; ``display_name()`` is the name people read."""

    IDLE = "idle"
    CALIBRATING = "calibrating"
    COMPUTING_IMPORTANCE = "computing_importance"
    PRUNING = "pruning"
    FINE_TUNING = "fine_tuning"
    EVALUATING = "evaluating"
    EXPORTING = "exporting"
    COMPLETE = "complete"
    FAILED = "failed"

    def display_name(self) -> str:
        """The stage as people read it: 'Computing Importance', 'Fine-tuning', ..."""
        return _DISPLAY[self]

    @property
    def display(self) -> str:
        """Alias of ``display_name()``."""
        return _DISPLAY[self]

    def is_active(self) -> bool:
        """True for the working stages, Calibrating through Exporting."""
        return self not in (PruningStage.IDLE, PruningStage.COMPLETE, PruningStage.FAILED)

    def is_terminal(self) -> bool:
        """True for Complete and Failed: no move leaves them."""
        return self in (PruningStage.COMPLETE, PruningStage.FAILED)

    @classmethod
    def from_display(cls, display: str) -> PruningStage:
        for stage, name in _DISPLAY.items():
            if name == display:
                return stage
        raise ValueError(f"no stage is displayed as {display!r}; known: {', '.join(_DISPLAY.values())}")


_DISPLAY = {
    PruningStage.IDLE: "Idle",
    PruningStage.CALIBRATING: "Calibrating",
    PruningStage.COMPUTING_IMPORTANCE: "Computing Importance",
    PruningStage.PRUNING: "Pruning",
    PruningStage.FINE_TUNING: "Fine-tuning",
    PruningStage.EVALUATING: "Evaluating",
    PruningStage.EXPORTING: "Exporting",
    PruningStage.COMPLETE: "Complete",
    PruningStage.FAILED: "Failed",
}
