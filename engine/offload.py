"""Models larger than the device: the decoder blocks stay on the CPU and go to the device one at a time
(``runtime.offload``).

Everything outside the block list (embeddings, final norm, head) is moved to the device once. Each block gets a
forward pre-hook that gives its parameters and buffers device copies while its forward runs, and a forward hook
that gives the CPU tensors back when it ends (the copies are dropped: nothing is written during a forward), so any
forward of the model — a calibration pass, evaluation, the export's check — holds one block's weights on the
device at a time. The layers being scored and pruned are *held*: their tensors become device copies from the
group's calibration to the end of its pruning (the per-forward moves skip them), and on ``release`` their data,
pruned or updated, becomes CPU tensors again — the weights are written where they live.

Moves always copy (also to the CPU), so the same code runs, and is tested, on a machine without a GPU.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["BlockOffload", "tensor_bytes"]


def _own_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The parameters and buffers of ``module`` and its submodules (shared tensors once)."""
    return list({id(t): t for t in itertools.chain(module.parameters(), module.buffers())}.values())


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of the parameters and buffers of ``module`` (shared tensors once)."""
    return sum(t.numel() * t.element_size() for t in _own_tensors(module))


class BlockOffload:
    """The offloading of one model (see the module docstring): ``install`` it, then ``hold`` and ``release`` the
    layers being pruned. The hooks stay for the model's life: it keeps computing on the device after the run."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.inside: set[int] = set()  # ids of the blocks' tensors (the offloaded ones)
        self.held: dict[int, torch.Tensor] = {}  # id → tensor whose data is a device copy until released
        self.onloaded: list[int] = []  # indices of the blocks whose forward is running now (what tests check)
        self.peak_onloaded = 0
        self._pending: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def install(self, model: nn.Module, layers: nn.ModuleList) -> None:
        """Move every tensor of ``model`` outside ``layers`` to the device (blocks stay where they are), and hook
        each block to compute on the device."""
        self.inside = {id(t) for t in _own_tensors(layers)}
        for t in _own_tensors(model):
            if id(t) not in self.inside:
                t.data = t.data.to(self.device, copy=True)
        for index, block in enumerate(layers):
            block.register_forward_pre_hook(lambda m, _args, index=index: self._onload(index, m))
            block.register_forward_hook(lambda m, _args, _out, index=index: self._offload(index, m), always_call=True)

    def _onload(self, index: int, block: nn.Module) -> None:
        saved = []
        for t in _own_tensors(block):
            if id(t) not in self.held:
                saved.append((t, t.data))
                t.data = t.data.to(self.device, copy=True)
        self._pending[id(block)] = saved
        self.onloaded.append(index)
        self.peak_onloaded = max(self.peak_onloaded, len(self.onloaded))

    def _offload(self, index: int, block: nn.Module) -> None:
        for t, data in reversed(self._pending.pop(id(block), [])):
            t.data = data
        if index in self.onloaded:
            self.onloaded.remove(index)

    def hold(self, modules: Iterable[nn.Module]) -> None:
        """The blocks' tensors among those of ``modules`` become device copies until ``release`` (no-op for those
        held already, and for tensors outside the blocks, which live on the device)."""
        for module in modules:
            for t in _own_tensors(module):
                if id(t) in self.inside and id(t) not in self.held:
                    t.data = t.data.to(self.device, copy=True)
                    self.held[id(t)] = t

    def release(self) -> None:
        """Every held tensor's data, as it is now, becomes a CPU tensor again."""
        for t in self.held.values():
            t.data = t.data.to("cpu", copy=True)
        self.held.clear()
