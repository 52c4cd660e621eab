"""Pruning schedules: one shot, or rounds of increasing sparsity between fine-tuning steps (gradual, cubic)."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, model_validator

from .base import Frozen
from .errors import ConfigError

__all__ = ["Sparsity", "Step", "OneShot", "Gradual", "Cubic", "PruningSchedule"]


Sparsity = Annotated[float, Field(ge=0.0, lt=1.0, description="fraction of zero weights, in [0, 1)")]
Step = Annotated[int, Field(ge=0, description="fine-tuning optimizer step, >= 0")]


class _Schedule(Frozen):
    """Shared behaviour of the schedules; each subclass defines ``pruning_steps()`` (the steps with a pruning
    round, ascending) and ``sparsity_at_step(step)``."""

    def should_prune(self, step: int) -> bool:
        """True when a pruning round happens at ``step``."""
        return step in self.pruning_steps()

    def num_pruning_steps(self) -> int:
        """How many pruning rounds the schedule makes."""
        return len(self.pruning_steps())

    def is_complete(self, step: int) -> bool:
        """True once the last pruning round is at or before ``step``."""
        return step >= self.pruning_steps()[-1]

    @property
    def final_sparsity_value(self) -> float | None:
        return getattr(self, "final_sparsity", None)


class OneShot(_Schedule):
    """Prune once, at ``step``, to the config's target sparsity."""

    kind: Literal["one_shot"] = "one_shot"
    step: Step = 0
    sparsity: Sparsity | None = Field(
        default=None, description="filled from PruningConfig.target_sparsity; leave unset"
    )

    def pruning_steps(self) -> list[int]:
        return [self.step]

    def sparsity_at_step(self, step: int) -> float:
        if self.sparsity is None:
            raise ConfigError("OneShot.sparsity is unset: use it inside a PruningConfig, which fills it")
        return self.sparsity if step >= self.step else 0.0


class _Ramp(_Schedule):
    start_step: Step
    end_step: Step
    frequency: int = Field(default=1, ge=1, description="steps between pruning rounds, >= 1")

    @model_validator(mode="after")
    def _check_range(self) -> _Ramp:
        if self.end_step <= self.start_step:
            raise ValueError(
                f"schedule needs end_step > start_step; got start_step={self.start_step}, end_step={self.end_step}"
            )
        return self

    def pruning_steps(self) -> list[int]:
        steps = list(range(self.start_step, self.end_step + 1, self.frequency))
        if steps[-1] != self.end_step:
            steps.append(self.end_step)
        return steps

    def _progress(self, step: int) -> float:
        """Fraction of the ramp done at ``step``, clamped to [0, 1]."""
        return min(max((step - self.start_step) / (self.end_step - self.start_step), 0.0), 1.0)


class Gradual(_Ramp):
    """Linear ramp from ``initial_sparsity`` at ``start_step`` to ``final_sparsity`` at ``end_step``."""

    kind: Literal["gradual"] = "gradual"
    initial_sparsity: Sparsity = 0.0
    final_sparsity: Sparsity
    frequency: int = Field(ge=1, description="steps between pruning rounds, >= 1")

    @model_validator(mode="after")
    def _check_sparsities(self) -> Gradual:
        if self.initial_sparsity > self.final_sparsity:
            raise ValueError(
                f"schedule needs initial_sparsity <= final_sparsity; got {self.initial_sparsity} > "
                f"{self.final_sparsity}"
            )
        return self

    def sparsity_at_step(self, step: int) -> float:
        if step < self.start_step:
            return 0.0
        t = self._progress(step)
        return self.initial_sparsity + (self.final_sparsity - self.initial_sparsity) * t


class Cubic(_Ramp):
    """Zhu & Gupta (2017): s(t) = s_f · (1 − (1 − (t − start)/(end − start))³) on [start, end]."""

    kind: Literal["cubic"] = "cubic"
    final_sparsity: Sparsity

    def sparsity_at_step(self, step: int) -> float:
        if step < self.start_step:
            return 0.0
        t = self._progress(step)
        return self.final_sparsity * (1.0 - (1.0 - t) ** 3)


PruningSchedule = Annotated[Union[OneShot, Gradual, Cubic], Field(discriminator="kind")]
