"""Calibration forwards in another floating dtype than the model's weights (``runtime.compute_dtype``).

The weights that are scored, pruned, checkpointed and exported stay in the model's dtype. Only the forwards that
produce calibration inputs and statistics see a cast copy: the cached block inputs are held in the compute dtype,
and each decoder block, while it runs, has its floating parameters swapped for copies in that dtype (one block at
a time, so the copies cost one block's weights); the originals come back untouched when the block is left.
Statistics are still summed in float32 (by each method's ``accumulate``).

On CPUs with native bfloat16 dot products (AVX-512 BF16, AMX) bf16 products run about twice as fast as float32;
the price is bf16 rounding of every activation the statistics are taken from (docs/calibration.md).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from .models import DTYPES

__all__ = ["model_dtype", "resolve_compute_dtype", "resolve_autocast", "cast_floating", "cast_module", "BlockView",
           "compute_blocks", "while_running", "computing_in"]


def model_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's first floating parameter (None when it has none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo), read once per process; empty where there is no such file."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return frozenset(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return frozenset()


def native_bf16(device: torch.device) -> bool:
    """True where bf16 products run natively: a CUDA device that supports bf16, or a CPU whose flags (Linux
    /proc/cpuinfo) include AVX-512 BF16 or AMX BF16. Elsewhere PyTorch emulates bf16 (not faster)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    return not _cpu_flags().isdisjoint({"avx512_bf16", "amx_bf16"})


def resolve_compute_dtype(name: str, model: nn.Module) -> torch.dtype | None:
    """The dtype calibration forwards must be cast to, or None when they run in the model's own dtype.

    ``name``: 'model', a key of ``engine.models.DTYPES``, or 'native_bfloat16' (``PruningConfig.
    compute_dtype_request``: bf16 for a float32 model on a device with native bf16, else the model's dtype)."""
    if name in ("model", "auto"):  # 'auto' unresolved (no method to resolve it by): the model's own
        return None
    if name == "native_bfloat16":
        param = next((p for p in model.parameters() if p.is_floating_point()), None)
        if param is None or param.dtype != torch.float32 or not native_bf16(param.device):
            return None
        return torch.bfloat16
    dtype = DTYPES[name]
    return None if model_dtype(model) in (dtype, None) else dtype


def resolve_autocast(name: str, model: nn.Module, device: torch.device) -> torch.dtype | None:
    """The dtype fine-tuning's forwards and backwards autocast to (``finetune.autocast``), or None: 'off', a model
    whose weights are not float32 (already in a narrower dtype), and 'auto' where ``device`` has no native bf16."""
    if name == "off" or model_dtype(model) != torch.float32:
        return None
    if name == "auto" and not native_bf16(device):
        return None
    return torch.bfloat16


def cast_floating(value: Any, dtype: torch.dtype | None) -> Any:
    """``value`` with every floating tensor in it (also inside tuples, lists and dicts) cast to ``dtype``;
    integer and boolean tensors and anything else unchanged. ``dtype`` None: ``value`` itself."""
    if dtype is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, tuple):
        return tuple(cast_floating(v, dtype) for v in value)
    if isinstance(value, list):
        return [cast_floating(v, dtype) for v in value]
    if isinstance(value, dict):
        return {k: cast_floating(v, dtype) for k, v in value.items()}
    return value


@contextmanager
def cast_module(module: nn.Module, dtype: torch.dtype | None) -> Iterator[nn.Module]:
    """While open, the floating parameters and buffers of ``module`` hold copies cast to ``dtype``; on exit each
    gets its original tensor back (the same storage, never written: the copies are dropped). None: no change."""
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        if dtype is not None:
            for t in itertools.chain(module.parameters(), module.buffers()):
                if t.is_floating_point() and t.dtype != dtype:
                    saved.append((t, t.data))
                    t.data = t.data.to(dtype)
        yield module
    finally:
        for t, data in reversed(saved):
            t.data = data


class BlockView:
    """Indexable like the decoder's block list: ``view[b]`` is block ``b`` with its weights cast to the compute
    dtype for as long as it is the block in use (the block cast before it gets its own weights back first).
    With ``dtype`` None it is the block list itself. Use it inside ``compute_blocks`` only, which restores the
    last block on exit, and change no weight while it is open."""

    def __init__(self, layers: nn.ModuleList, dtype: torch.dtype | None) -> None:
        self.layers, self.dtype = layers, dtype
        self._index: int | None = None
        self._stack = ExitStack()

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, index: int) -> nn.Module:
        if self.dtype is not None and index != self._index:
            self.close()
            self._stack.enter_context(cast_module(self.layers[index], self.dtype))
            self._index = index
        return self.layers[index]

    def close(self) -> None:
        """Give the block in use its own weights back."""
        self._stack.close()
        self._index = None


@contextmanager
def compute_blocks(layers: nn.ModuleList, dtype: torch.dtype | None) -> Iterator[BlockView]:
    """A ``BlockView`` of ``layers`` in ``dtype`` while open; every block holds its own weights again on exit."""
    view = BlockView(layers, dtype)
    try:
        yield view
    finally:
        view.close()


Replacement = Callable[[str, nn.Module], Mapping[str, torch.Tensor]]  # (name, module) → tensor by its own name


@contextmanager
def while_running(modules: Mapping[str, nn.Module], replace: Replacement) -> Iterator[None]:
    """While open, each module of ``modules`` computes with the tensors ``replace(name, module)`` returns (keyed
    by the module's own parameter or buffer names) instead of its own: swapped in when its forward starts and
    given back when it ends, so only the running module's replacements exist at a time and no stored tensor is
    written. Outside its forward a module shows its own tensors. Everything is given back on exit."""
    pending: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    handles = []

    def swap_in(name: str, module: nn.Module) -> None:
        own = {**module._parameters, **module._buffers}
        saved = []
        for key, tensor in replace(name, module).items():
            target = own[key]
            saved.append((target, target.data))
            target.data = tensor
        pending.setdefault(id(module), []).extend(saved)

    def swap_out(module: nn.Module) -> None:
        for target, data in reversed(pending.pop(id(module), [])):
            target.data = data

    try:
        for name, module in modules.items():
            handles.append(module.register_forward_pre_hook(lambda m, _args, name=name: swap_in(name, m)))
            handles.append(module.register_forward_hook(lambda m, _args, _out: swap_out(m), always_call=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module in modules.values():
            swap_out(module)


@contextmanager
def computing_in(model: nn.Module, dtype: torch.dtype) -> Iterator[nn.Module]:
    """While open, every module of ``model`` computes with its floating parameters and buffers cast to ``dtype``,
    one module at a time (a float16 model computes as a float32 one without a float32 copy of it). An embedding
    (``nn.Embedding`` or a subclass; no ``max_norm``) casts only the rows its input looks up: a 262k-token
    vocabulary's table is never cast whole, and its output is the same as the whole cast table's."""
    rows = {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Embedding) and m.max_norm is None and m.weight.is_floating_point()
            and m.weight.dtype != dtype}

    def cast(name: str, module: nn.Module) -> dict[str, torch.Tensor]:
        own = {**module._parameters, **module._buffers}
        return {k: t.data.to(dtype) for k, t in own.items()
                if t is not None and t.is_floating_point() and t.dtype != dtype
                and not (name in rows and k == "weight")}

    owners = {name: m for name, m in model.named_modules()
              if any(t is not None for t in itertools.chain(m._parameters.values(), m._buffers.values()))}
    with while_running(owners, cast), _looked_up_rows(rows, dtype):
        yield model


@contextmanager
def _looked_up_rows(embeddings: Mapping[str, nn.Embedding], dtype: torch.dtype) -> Iterator[None]:
    """While open, each embedding's forward sees a table of the rows its ids (any shape) name, cast to ``dtype``,
    and the ids renumbered into it (``padding_idx`` set aside: it only shapes gradients); all given back after."""
    saved: dict[int, tuple[torch.Tensor, int | None]] = {}

    def before(module: nn.Embedding, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        ids = args[0] if args else kwargs["input"]
        used, inverse = torch.unique(ids, return_inverse=True)  # used (U,), inverse: ids' shape, into used
        saved[id(module)] = (module.weight.data, module.padding_idx)
        module.weight.data = module.weight.data[used].to(dtype)  # (U, C)
        module.padding_idx = None
        return ((inverse, *args[1:]), kwargs) if args else (args, {**kwargs, "input": inverse})

    def after(module: nn.Embedding, _args: Any, _out: Any) -> None:
        if id(module) in saved:
            module.weight.data, module.padding_idx = saved.pop(id(module))

    handles = []
    try:
        for module in embeddings.values():
            handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
            handles.append(module.register_forward_hook(after, always_call=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module in embeddings.values():
            after(module, None, None)
