"""The run context handed to every stage handler: model, config, accelerator, store, logger, run state."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator

from podar.schemas.config import PruningConfig
from podar.schemas.errors import PodarError
from podar.schemas.records import ArtifactRecord, StageResult

from .store import RunStore

__all__ = ["RunContext", "RunState", "Handler", "Cancelled", "DenseSnapshot"]


class Cancelled(PodarError):
    """Raised inside a handler when the run was cancelled (``Pipeline.cancel()``) or interrupted."""

    def __init__(self, reason: str = "cancelled") -> None:
        super().__init__(f"run {reason}")
        self.reason = reason


@dataclass
class RunState:
    """Values the stages hand each other during one run (in memory; what a resume needs is checkpointed).

    Tensors are keyed by module name (e.g. ``model.layers.0.mlp.up_proj``).
    """

    targets: dict[str, torch.nn.Module] = field(default_factory=dict)  # pruned Linear modules
    # (out, in) weights before pruning, by module name: a mapping read from disk on demand (DenseSnapshot)
    dense_weights: Mapping[str, torch.Tensor] = field(default_factory=dict)
    scores: dict[str, torch.Tensor] = field(default_factory=dict)  # (out, in) fp32 importance
    # (out, in) bool, True = kept; the pipeline hands in a bit-packed store (stages.common.PackedMasks)
    masks: MutableMapping[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)  # calibration statistics of the current group
    layer_groups: list[list[str]] = field(default_factory=list)  # sequential mode: names per group
    group_index: int = 0  # sequential mode: the group being calibrated/pruned
    more_layer_groups: bool = False
    round_index: int = 0  # schedule: pruning round (0-based)
    step: int = 0  # fine-tuning optimizer steps done
    extras: dict[str, Any] = field(default_factory=dict)  # stage-private caches (e.g. sequential inputs)


class DenseSnapshot(Mapping[str, torch.Tensor]):
    """The pruned layers' weights before pruning, kept in safetensors files and read one tensor at a time, so
    the dense reference costs disk, not memory."""

    def __init__(self, paths: list[Any]) -> None:
        from safetensors import safe_open

        self._where: dict[str, Any] = {}
        for path in paths:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    self._where[name] = path

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self._where[name]), framework="pt") as f:
            return f.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


Handler = Callable[["RunContext"], StageResult]


@dataclass
class RunContext:
    """What a handler may touch. Handlers read and write ``state``, write artifacts through ``store`` and
    ``add_artifact``, log through ``log``, and never fire transitions."""

    config: PruningConfig
    model: torch.nn.Module
    tokenizer: Any
    accelerator: Accelerator
    store: RunStore
    log: Any  # a structlog BoundLogger (configured by the caller, never by podar)
    run_id: str
    state: RunState = field(default_factory=RunState)
    progress: bool = True
    cancel_event: threading.Event = field(default_factory=threading.Event)
    current_layer: str | None = None  # set by handlers while they work on a layer (named on failure)
    new_artifacts: dict[str, ArtifactRecord] = field(default_factory=dict)
    on_artifact: Callable[[ArtifactRecord], None] | None = None

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def check_cancelled(self) -> None:
        """Call in long loops: raises Cancelled once ``Pipeline.cancel()`` was called."""
        if self.cancel_event.is_set():
            raise Cancelled("cancelled")

    def add_artifact(self, record: ArtifactRecord) -> None:
        self.new_artifacts[record.path] = record
