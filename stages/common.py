"""Helpers the stage handlers share: weight swaps, adopting checkpointed weights, bit-packed masks."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from podar.engine.compute import while_running
from podar.engine.runtime import Runtime
from podar.schemas.errors import CheckpointError

from .bitpack import pack_bits, unpack_bits

__all__ = ["adopt_weights", "apply_mask", "swapped_weights", "dense_model", "PackedMasks", "input_groups", "owners"]


def adopt_weights(artifact: str, tensors: Mapping[str, torch.Tensor], params: Mapping[str, nn.Parameter]) -> None:
    """Make each tensor of a weights checkpoint (``artifact``: its path, for errors) the data of the parameter of
    the same name. A tensor loaded from safetensors is mapped from the file (copy-on-write): with the parameter's
    device and dtype it becomes the parameter without a copy. Raises CheckpointError naming the artifact and the
    parameter when a shape differs."""
    for name, tensor in tensors.items():
        target = params[name]
        if tensor.shape != target.shape:
            raise CheckpointError(f"artifact '{artifact}' holds '{name}' as {tuple(tensor.shape)}, the model's is "
                                  f"{tuple(target.shape)}: not this run's model")
        target.data = tensor.to(target.device, target.dtype)


@contextmanager
def swapped_weights(modules: dict[str, nn.Linear], weights: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """While open, each module computes with ``weights[name]`` (e.g. the dense reference) instead of its own
    weight: read when its forward starts, dropped when it ends (one layer's copy at a time; the module's own,
    possibly file-mapped, weight is never written). Reads of ``module.weight`` outside a forward see its own."""
    def dense(name: str, module: nn.Module) -> dict[str, torch.Tensor]:
        return {"weight": weights[name].to(module.weight.device, module.weight.dtype)}

    with while_running(modules, dense):
        yield


@contextmanager
def dense_model(ctx: Any) -> Iterator[nn.Module]:
    """The dense model to compute a reference with (evaluation, the distillation teacher): the run's model with the
    dense weights swapped in (masks), or — after structured pruning, where the pruned model has fewer blocks,
    channels or heads — the dense copy kept before they were removed (``state.dense_model``)."""
    st = ctx.state
    if st.dense_model is not None:
        yield st.dense_model
        return
    with swapped_weights(st.targets, st.dense_weights):
        yield ctx.model


class PackedMasks(MutableMapping[str, torch.Tensor]):
    """Masks by module name, kept bit-packed (8 weights per byte); reads give (out, in) bool, True = kept."""

    def __init__(self) -> None:
        self._packed: dict[str, tuple[torch.Tensor, int]] = {}

    def __setitem__(self, name: str, mask: torch.Tensor) -> None:
        self._packed[name] = (pack_bits(mask.detach().cpu().bool()), mask.shape[1])

    def __getitem__(self, name: str) -> torch.Tensor:
        packed, cols = self._packed[name]
        return unpack_bits(packed, cols)

    def __delitem__(self, name: str) -> None:
        del self._packed[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._packed)

    def __len__(self) -> int:
        return len(self._packed)


@torch.no_grad()
def apply_mask(module: nn.Module, mask: torch.Tensor, runtime: Runtime, ranges: list[tuple[int, int]] | None = None
               ) -> int:
    """Zero the pruned weights (+0.0 exactly); mask: (out, in) bool, True = kept.

    The masked weight is a new tensor, not written into the old storage: a weight mapped from the model's file
    would have each of its pages faulted in and copied, and those private copies stay resident for as long as
    the file's mapping lives. The old storage's file pages are advised out instead (``runtime.replace``).
    Returns the bytes advised out (0 for a weight in anonymous or device memory, or where switched off).
    """
    w = module.weight
    return runtime.replace(w, w.data.masked_fill(~mask.to(w.device), 0.0), ranges)


def input_groups(names: list[str], stats: Mapping[str, object]) -> list[list[str]]:
    """``names`` grouped by the statistics record they share (layers that read one input), in order; a layer
    without statistics is a group of its own."""
    groups: dict[int, list[str]] = {}
    for name in names:
        groups.setdefault(id(stats.get(name, name)), []).append(name)
    return list(groups.values())


def owners(groups: list[list[str]], targets: Mapping[str, nn.Module], world: int) -> dict[str, int]:
    """The process that solves each input group (by its first name): the costliest groups first, each to the
    process with the least cost so far (cost: rows × inputs², a solve's work). The same on every process."""
    load = [0] * world
    out: dict[str, int] = {}
    cost = {g[0]: sum(targets[n].weight.shape[0] for n in g) * targets[g[0]].weight.shape[1] ** 2 for g in groups}
    for leader in sorted(cost, key=lambda k: (-cost[k], list(cost).index(k))):
        rank = min(range(world), key=lambda r: (load[r], r))
        out[leader] = rank
        load[rank] += cost[leader]
    return out
