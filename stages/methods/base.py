"""The protocol a pruning method implements, in one file per method (``stages/methods/<name>.py``).

A method says, for one Linear layer at a time:

- ``new_stats`` / ``accumulate`` / ``finish``: the statistics it needs of the layer's inputs, a typed record of
  sums and counts (so processes can add theirs), and how a batch of inputs adds to them;
- ``prepare``: work done once per input that several layers share (q/k/v read the same x), e.g. a factorization;
- ``score``: the importance of every weight, (out, in) fp32, higher = kept;
- ``prune``: the masks and, for methods that update the kept weights, the new weights of the layers that share an
  input. The default chooses each mask from the scores by the pattern (``stages.masks``) and keeps the weights.

Everything here is pure: tensors in, tensors out; the stages move them to and from the model. A method is
registered by name (``stages.methods.register_method``); nothing outside the registry branches on the name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch

from podar.schemas.methods import MethodParams

from ..masks import expected_pruned, pattern_mask
from ..permutation import PermutationSpace, layer_permutation, unpermute_columns
from ..quantize import WeightQuant

__all__ = ["LayerStats", "PruneSpec", "Pruned", "PruningMethod", "with_prior"]

Scalar = float | int | str | bool | None


@dataclass
class LayerStats:
    """Base of a method's statistics: sums (tensors) and counts (ints) only, so that partial statistics of
    several processes add up to the statistics of all their samples. ``n_samples`` counts sequences."""

    n_samples: int = 0
    # parts added over processes as one sum per process even where the others are added batch by batch: the
    # records of one process's batches share these tensors (``share_summed``), too large for one per batch
    summed_parts: ClassVar[frozenset[str]] = frozenset()

    def parts(self) -> dict[str, torch.Tensor | int]:
        """The summable fields by name (what a reduction across processes adds up)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}

    def set_part(self, name: str, value: torch.Tensor | int) -> None:
        """Set the part ``name`` of ``parts()`` (a reduction's total)."""
        setattr(self, name, value)

    def share_summed(self, first: LayerStats) -> None:
        """This record (of a later batch of one process) accumulates its ``summed_parts`` into ``first``'s."""
        for name in self.summed_parts:
            setattr(self, name, getattr(first, name))


@dataclass(frozen=True)
class PruneSpec:
    """How much and in which pattern one pruning round prunes (from the config, resolved)."""

    sparsity_frac: float
    kind: str = "unstructured"
    scope: str = "per_row"
    n: int | None = None
    m: int | None = None
    block_height: int | None = None
    block_width: int | None = None
    quant: WeightQuant | None = None  # joint quantization (a method that supports it): the export's scheme
    quant_dtype: torch.dtype = torch.float32  # the export's dtype, which its scales take
    permute: PermutationSpace | None = None  # N:M: the input orders that fold into other layers (None: as given)
    permute_rounds: int = 2

    def mask(self, score: torch.Tensor) -> torch.Tensor:
        """mask: (out, in) bool, True = kept, from score (out, in) by this pattern and comparison group."""
        return pattern_mask(score, kind=self.kind, sparsity_frac=self.sparsity_frac, scope=self.scope, n=self.n,
                            m=self.m, block_height=self.block_height, block_width=self.block_width)

    def order(self, score: torch.Tensor) -> tuple[torch.Tensor, dict[str, Scalar]]:
        """(perm, metrics) with ``permute`` (N:M): perm (in,) int64 on score's device, the input order
        ``stages.permutation`` finds for score (out, in); metrics, the share of the score an N:M mask keeps in
        the given order and in that one."""
        assert self.permute is not None and self.n is not None and self.m is not None
        perm, before, after = layer_permutation(score, self.n, self.m, self.permute, self.permute_rounds)
        total = float(score.double().clamp_min(0.0).sum())
        return perm.to(score.device), {"score_kept_unpermuted": before / total if total else 0.0,
                                       "score_kept": after / total if total else 0.0}

    def masked(self, score: torch.Tensor) -> Pruned:
        """The layer's mask from score (out, in); with ``permute`` (N:M), chosen on the input columns in the order
        ``order`` finds (``Pruned.perm``): N:M in that order."""
        if self.permute is None:
            return Pruned(mask=self.mask(score))
        perm, metrics = self.order(score)
        return Pruned(mask=unpermute_columns(self.mask(score[:, perm]), perm), perm=perm.cpu(), metrics=metrics)


@dataclass
class Pruned:
    """One layer after pruning: its mask (out, in) bool, True = kept; the new weight (out, in) when the method
    changed kept weights (None: the old weight with the mask applied); per-layer metrics."""

    mask: torch.Tensor
    weight: torch.Tensor | None = None
    metrics: dict[str, Scalar] = field(default_factory=dict)
    scale: torch.Tensor | None = None  # joint quantization: (out, groups) the scales the weight's grid has
    perm: torch.Tensor | None = None  # (in,) int64: the input order the N:M mask is chosen in (PruneSpec.permute)


def with_prior(score: torch.Tensor, prior: torch.Tensor | None) -> torch.Tensor:
    """score (out, in) with the weights pruned in an earlier round (prior False) scored −inf: pruned first."""
    return score if prior is None else score.masked_fill(~prior.to(score.device), float("-inf"))


class PruningMethod(ABC):
    """A pruning method: its name, its parameters' type, and the pure functions of the module docstring."""

    name: ClassVar[str]
    params_type: ClassVar[type[MethodParams]]
    changes_kept_weights: ClassVar[bool] = False  # True: the new weights are checkpointed, not only the masks
    keeps_scores: ClassVar[bool] = True  # False: ``score`` is cheap, recomputed in Pruning instead of kept
    half_precision_note: ClassVar[str | None] = None  # a warning logged for bf16/fp16 calibration forwards
    # several processes add each batch's statistics in batch order (bit for bit one process's); False: each
    # process sums its own batches and the sums are added (equal up to rounding), for large statistics
    exact_reduction: ClassVar[bool] = True
    solve_on_owner: ClassVar[bool] = False  # several processes: each input group solved on one, then broadcast
    permutes_nm: ClassVar[bool] = True  # chooses N:M masks by ``PruneSpec.masked`` (so in a permuted order too)

    @property
    def needs_calibration(self) -> bool:
        return self.params_type.needs_calibration

    def new_stats(self, in_features: int, device: torch.device) -> LayerStats:
        """Empty statistics for a layer with ``in_features`` inputs."""
        raise TypeError(f"method {self.name} collects no calibration statistics")

    def accumulate(self, stats: LayerStats, x: torch.Tensor) -> None:
        """Add a batch of inputs x (B, T, in) (or (tokens, in): one sequence) to ``stats``."""
        raise TypeError(f"method {self.name} collects no calibration statistics")

    def finish(self, stats: LayerStats) -> None:
        """Make ``stats`` whole after the last ``accumulate`` (default: nothing to do)."""
        return None

    def gram(self, stats: LayerStats) -> torch.Tensor | None:
        """(in, in) Σ x xᵀ when the method's statistics hold it (after ``finish``), else None."""
        return None

    def prepare(self, stats: LayerStats | None, params: MethodParams, *, layer: str,
                on_retry: Callable[[float], None] | None = None) -> Any:
        """Work shared by the layers that read one input, done once (default: none)."""
        return None

    def describe(self, prepared: Any) -> dict[str, Scalar]:
        """Per-layer metrics of ``prepare``'s result (default: none)."""
        return {}

    @abstractmethod
    def score(self, weight: torch.Tensor, stats: LayerStats | None, prepared: Any, params: MethodParams
              ) -> torch.Tensor:
        """score: (out, in) fp32, higher = more important (kept first)."""

    def expected_pruned(self, shape: tuple[int, int], spec: PruneSpec, params: MethodParams) -> int:
        """How many weights of an (out, in) layer ``prune`` zeroes: exactly, checked after every round."""
        return expected_pruned(shape, spec.kind, spec.n, spec.m, spec.block_height, spec.block_width, spec.scope,
                               spec.sparsity_frac)

    def prune(self, weights: Sequence[torch.Tensor], scores: Sequence[torch.Tensor], priors: Sequence[torch.Tensor |
              None], spec: PruneSpec, stats: LayerStats | None, prepared: Any, params: MethodParams
              ) -> list[Pruned]:
        """Masks (and new weights) of the layers that share one input, in the order given."""
        return [spec.masked(with_prior(score, prior)) for score, prior in zip(scores, priors, strict=True)]
