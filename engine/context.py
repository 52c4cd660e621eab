"""The run context handed to every stage handler: model, config, accelerator, store, logger, run state."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from podar.schemas.config import PruningConfig
from podar.schemas.errors import PodarError
from podar.schemas.records import ArtifactRecord, Counters, StageResult
from podar.schemas.stage import PruningStage

from .distributed import Dist, together
from .runtime import Runtime
from .store import ArtifactKey, RunStore

__all__ = ["RunContext", "RunState", "Handler", "Cancelled", "Terminated", "DenseReference"]


class Cancelled(PodarError):
    """Raised inside a handler when the run was cancelled (``Pipeline.cancel()``) or terminated."""

    def __init__(self, reason: str = "cancelled") -> None:
        super().__init__(f"run {reason}")
        self.reason = reason


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process stands (the CLI's handler) and handled as Ctrl-C is: the run ends in
    Failed with reason ``terminated``, its lock released, resumable."""

    reason = "terminated"


@dataclass
class RunState:
    """Values the stages hand each other during one run (in memory; what a resume needs is checkpointed).

    Tensors and records are keyed by module name (e.g. ``model.layers.0.mlp.up_proj``).
    """

    targets: dict[str, torch.nn.Module] = field(default_factory=dict)  # pruned Linear modules
    # (out, in) weights before pruning, by module name: a mapping read from disk on demand (DenseReference)
    dense_weights: Mapping[str, torch.Tensor] = field(default_factory=dict)
    # (out, in) bool, True = kept; the pipeline hands in a bit-packed store (stages.common.PackedMasks)
    masks: MutableMapping[str, torch.Tensor] = field(default_factory=dict)
    counters: Counters = field(default_factory=Counters)
    layer_groups: list[list[str]] = field(default_factory=list)  # target names per layer group, in order
    walk: Any = None  # the calibration walk (stages.walks.CalibrationWalk); None without calibration
    walk_offset: int = 0  # the run's group index of the walk's first group (1 when structure's group comes first)
    stats: dict[str, Any] = field(default_factory=dict)  # the current group's statistics (methods' LayerStats)
    prepared: dict[str, Any] = field(default_factory=dict)  # the current group's shared per-input work
    owners: dict[str, int] = field(default_factory=dict)  # several processes: input group (first name) → solver
    scores: dict[str, torch.Tensor] = field(default_factory=dict)  # (out, in) fp32 importance, when kept
    # joint quantization: (out, groups) the scales of each pruned layer's grid, which the export writes it on
    quant_scales: dict[str, torch.Tensor] = field(default_factory=dict)
    calibration_samples: torch.Tensor | None = None  # (N, T) int64
    eval_windows: dict[str, tuple[torch.Tensor, str]] = field(default_factory=dict)  # text → (windows, sha256)
    model_fingerprint: str = ""
    data_sha256: dict[str, str] = field(default_factory=dict)  # role → sha256 of the text
    task: str = "causal-lm"  # what the model computes: causal-lm, masked-lm or encoder (engine.models.model_task)
    converted: list[str] = field(default_factory=list)  # Conv1D layers run as nn.Linear (restored for the export)
    cost: dict[str, Any] = field(default_factory=dict)  # the run's planned work and estimated time (podar._cost)
    # fine-tuning between its checkpointed intervals: the session (optimizer state, RNG, validation history) the
    # next interval continues (stages.finetune.Session) and the best validated weights of the round so far
    finetune_session: Any = None
    finetune_best: dict[str, torch.Tensor] | None = None
    teacher_cache: tuple[int, dict[str, torch.Tensor]] | None = None  # (round, the teacher's top-k of its windows)
    # structured pruning (stages.structure): the summed statistics, the plan applied, and the dense model kept as
    # the reference evaluation and distillation compare with (its blocks, channels and heads are all there)
    structure_sums: Any = None
    structure_plan: Any = None
    dense_model: Any = None
    # task evaluation (stages.tasks): the tasks the config names, resolved; the dense model's results once known
    task_specs: list[Any] = field(default_factory=list)
    task_baseline: dict[str, Any] | None = None
    allocation: Any = None  # the round's per-layer sparsity (stages.allocation.Allocation); None: uniform
    # N:M channel permutation (stages.permutation): which layers' input orders fold into other layers, and the
    # orders chosen (folded into the model at export)
    permutation_spaces: dict[str, Any] = field(default_factory=dict)
    permutations: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def group_index(self) -> int:
        return self.counters.group_index

    @property
    def round_index(self) -> int:
        return self.counters.round_index

    @property
    def more_layer_groups(self) -> bool:
        return self.counters.group_index + 1 < len(self.layer_groups)

    def group_targets(self) -> dict[str, torch.nn.Module]:
        """The targets of the current layer group (all of them when there is one group)."""
        if not self.layer_groups:
            return dict(self.targets)
        return {n: self.targets[n] for n in self.layer_groups[self.counters.group_index]}


class DenseReference(Mapping[str, torch.Tensor]):
    """The pruned layers' weights before pruning, (out, in), read one tensor at a time from safetensors files, so
    the dense reference costs disk (or nothing), not memory: the model's own files when it was loaded from them
    (no copy), else parts the run wrote. ``entries``: name → (file, tensor key, stored transposed)."""

    def __init__(self, entries: Mapping[str, tuple[Any, str, bool]]) -> None:
        self._entries = dict(entries)

    @classmethod
    def of_parts(cls, paths: list[Any]) -> DenseReference:
        """The reference in part files whose keys are the layer names."""
        from safetensors import safe_open

        entries = {}
        for path in paths:
            with safe_open(str(path), framework="pt") as f:
                entries.update({name: (path, name, False) for name in f.keys()})
        return cls(entries)

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        path, key, transposed = self._entries[name]
        with safe_open(str(path), framework="pt") as f:
            tensor = f.get_tensor(key)
        return tensor.t().contiguous() if transposed else tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def paths(self) -> list[Any]:
        """The files read, in order."""
        return list(dict.fromkeys(e[0] for e in self._entries.values()))

    def merged(self, other: DenseReference) -> DenseReference:
        return DenseReference({**self._entries, **other._entries})



Handler = Callable[["RunContext"], StageResult]


@dataclass
class RunContext:
    """What a handler may touch. Handlers read and write ``state``, write artifacts through ``save_tensors``
    (the store decides where), log through ``log``, and never fire transitions."""

    config: PruningConfig
    model: torch.nn.Module
    tokenizer: Any
    accelerator: Accelerator
    store: RunStore
    log: Any  # a structlog BoundLogger (configured by the caller, never by podar)
    run_id: str
    method: Any = None  # the config's method (stages.methods.PruningMethod)
    dist: Dist = field(default_factory=Dist)  # the process group (one process: every call a no-op)
    runtime: Runtime = field(default_factory=Runtime)
    state: RunState = field(default_factory=RunState)
    progress: bool = True
    cancel_event: threading.Event = field(default_factory=threading.Event)
    cancel_reason: str = "cancelled"
    stage: PruningStage = PruningStage.IDLE  # the stage whose handler runs (set by the runner)
    current_layer: str | None = None  # set by handlers while they work on a layer (named on failure)
    new_artifacts: dict[str, ArtifactRecord] = field(default_factory=dict)
    recorded: Mapping[str, ArtifactRecord] = field(default_factory=dict)  # the manifest's artifacts (read only)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def bar(self, iterable: Any, desc: str) -> Any:
        """``iterable`` with a progress bar on stderr, when progress is on and stderr is a terminal."""
        return tqdm(iterable, desc=desc[:40], leave=False, disable=None if self.progress else True)

    def check_cancelled(self) -> None:
        """Call in long loops: raises Cancelled once the run was cancelled (``Pipeline.cancel()``, SIGTERM)."""
        if self.cancel_event.is_set():
            raise Cancelled(self.cancel_reason)

    def artifact_key(self, kind: str, name: str | None = None, *, group: bool = True) -> ArtifactKey:
        c = self.state.counters
        return ArtifactKey(stage=self.stage.value, kind=kind, round=c.round_index,
                           group=c.group_index if group else None, name=name)

    def save_tensors(self, kind: str, tensors: Mapping[str, torch.Tensor], *, name: str | None = None,
                     group: bool = True, metadata: Mapping[str, str] | None = None) -> ArtifactRecord:
        """Checkpoint ``tensors`` as this stage's artifact of ``kind`` (for this round and layer group). On several
        processes only the main one writes, and they all learn whether it could (``together``)."""
        key = self.artifact_key(kind, name, group=group)
        record = together(self.dist, lambda: self.store.save_tensors(key, tensors, metadata=metadata))
        self.new_artifacts[record.path] = record
        return record

    def adopt_artifact(self, record: ArtifactRecord) -> None:
        """Count an artifact already on disk (e.g. a reused cache) as this stage's."""
        self.new_artifacts[record.path] = record
