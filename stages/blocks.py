"""A model's stack of repeated blocks, and running the blocks one at a time on cached inputs.

- ``find_blocks``: the block list — a configured dotted path (``calibration.blocks``), or the ModuleList of
  same-class modules that holds the most parameters (``model.layers`` of Llama, ``transformer.h`` of GPT-2,
  ``model.decoder.layers`` of OPT, ``encoder.layer`` of BERT).
- ``capture_first_block_inputs``: the inputs every block receives, from one pass of the embeddings. The block list
  is swapped for a recorder that keeps each call's positional and keyword arguments (attention masks, position
  ids, rotary tables, encoder masks) and hands back the hidden states shaped like block 0's output — block 0
  runs once, on the first batch, to learn that shape. No exception stops a forward.
- ``run_block``: a block's outputs on every cached batch, the next block's inputs.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from podar.engine.runtime import Runtime
from podar.schemas.errors import ConfigError

__all__ = ["BlockStack", "BlockCall", "BlockInputs", "find_blocks", "capture_first_block_inputs", "run_block",
           "block_output", "execution_order", "replaced_forward", "skipped_module", "supported_kwargs"]


@dataclass(frozen=True)
class BlockStack:
    """The repeated blocks of a model: ``path`` (dotted, from the model) and the ModuleList itself."""

    path: str
    layers: nn.ModuleList

    def owner_of(self, modules: dict[str, nn.Module]) -> tuple[dict[str, int], list[str]]:
        """(block index by module name, names of the modules outside every block)."""
        where = {id(m): i for i, block in enumerate(self.layers) for m in block.modules()}
        inside = {n: where[id(m)] for n, m in modules.items() if id(m) in where}
        return inside, [n for n in modules if n not in inside]


def _resolve_path(model: nn.Module, path: str) -> Any:
    node: Any = model
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() and isinstance(node, nn.ModuleList) else getattr(node, part, None)
        if node is None:
            return None
    return node


def find_blocks(model: nn.Module, path: str | None = None) -> BlockStack | None:
    """The model's block stack (see the module docstring), or None when it has no list of same-class modules.
    A configured ``path`` that names no non-empty ModuleList is a ConfigError naming it."""
    if path is not None:
        node = _resolve_path(model, path)
        if not isinstance(node, nn.ModuleList) or len(node) == 0:
            found = "nothing" if node is None else type(node).__name__
            raise ConfigError(f"calibration.blocks '{path}' names {found}, not a non-empty ModuleList of the model "
                              f"({type(model).__name__}); e.g. 'model.layers' or 'transformer.h'")
        return BlockStack(path, node)
    best: tuple[int, int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        n_params = sum(p.numel() for p in module.parameters())
        key = (n_params, len(module))
        if n_params and (best is None or key > best[:2]):
            best = (*key, name, module)
    return None if best is None else BlockStack(best[2], best[3])


@dataclass
class BlockCall:
    """The arguments one batch's block call receives besides the hidden states."""

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class BlockInputs:
    """Cached inputs of the next block: hidden (B, T, C) per batch, and the other arguments of each batch's call."""

    hidden: list[torch.Tensor] = field(default_factory=list)  # each (B, T, C)
    calls: list[BlockCall] = field(default_factory=list)

    @property
    def n_samples(self) -> int:
        return sum(h.shape[0] for h in self.hidden)

    def head(self, n_batches: int) -> BlockInputs:
        """The first ``n_batches`` batches (the same tensors)."""
        return BlockInputs(hidden=self.hidden[:n_batches], calls=self.calls[:n_batches])


def block_output(result: Any) -> torch.Tensor:
    """The hidden states of a block's output (a tensor, or the first item of a tuple)."""
    return result[0] if isinstance(result, tuple) else result


def _is_cache(value: Any) -> bool:
    return type(value).__name__.endswith("Cache")


class _Recorder(nn.Module):
    """Stands in for the block list during the embedding passes (see the module docstring)."""

    def __init__(self, block0: nn.Module, sink: BlockInputs, runtime: Runtime, model: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_block0", block0)  # not a submodule: its parameters stay where they are
        object.__setattr__(self, "_model", model)
        self.sink, self.runtime = sink, runtime
        self.template: Any = None

    def __getattr__(self, name: str) -> Any:  # attributes the model's loop reads of a block (attention_type, ...)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_block0"], name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            hidden, rest = args[0], args[1:]
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        model = self.__dict__["_model"]
        hidden = self.runtime.cast_inputs(hidden.detach(), model)
        call = BlockCall(args=self.runtime.cast_inputs(tuple(None if _is_cache(a) else a for a in rest), model),
                         kwargs=self.runtime.cast_inputs({k: (None if _is_cache(v) else v) for k, v in kwargs.items()
                                                          if k != "past_key_values"}, model))
        self.sink.hidden.append(hidden)
        self.sink.calls.append(call)
        if self.template is None:  # block 0 once, as the walk runs it: the shape of a block's output
            block0 = self.__dict__["_block0"]
            with self.runtime.model_forwards(block0):
                self.template = block0(hidden, *call.args, **call.kwargs)
        if isinstance(self.template, tuple):
            return (hidden, *self.template[1:])
        return hidden


@contextmanager
def _swapped(model: nn.Module, path: str, replacement: nn.ModuleList) -> Iterator[None]:
    parent_path, _, attr = path.rpartition(".")
    parent = _resolve_path(model, parent_path) if parent_path else model
    original = getattr(parent, attr)
    setattr(parent, attr, replacement)
    try:
        yield
    finally:
        setattr(parent, attr, original)


def supported_kwargs(module: nn.Module, **kwargs: Any) -> dict[str, Any]:
    """The keyword arguments ``module.forward`` accepts (all of them when it takes ``**kwargs``)."""
    params = inspect.signature(module.forward).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def _trunk(model: nn.Module, stack: BlockStack) -> nn.Module:
    """The module whose forward runs the embeddings and the blocks without a task head (``base_model``)."""
    base = getattr(model, "base_model", model)
    return base if any(m is stack.layers for m in base.modules()) else model


@torch.no_grad()
def capture_first_block_inputs(model: nn.Module, stack: BlockStack, samples: torch.Tensor, batch_size: int,
                               device: torch.device, runtime: Runtime | None = None) -> BlockInputs:
    """Inputs of block 0 for samples (N, T) int64, in batches of ``batch_size`` (embeddings run once), kept in
    ``runtime``'s compute dtype (the hidden states and every floating argument)."""
    sink = BlockInputs()
    recorder = _Recorder(stack.layers[0], sink, runtime or Runtime(), model)
    trunk = _trunk(model, stack)
    with _swapped(model, stack.path, nn.ModuleList([recorder])):
        for start in range(0, samples.shape[0], batch_size):
            batch = samples[start:start + batch_size].to(device)  # (B, T)
            trunk(input_ids=batch, **supported_kwargs(trunk, use_cache=False))
    return sink


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs, in_place: bool = False) -> BlockInputs:
    """Outputs of ``block`` on every cached batch: the next block's inputs. ``in_place``: each batch's output
    replaces its input in ``inputs`` as soon as it is computed (one set of activations alive, not two)."""
    out = inputs if in_place else BlockInputs(calls=inputs.calls, hidden=[None] * len(inputs.hidden))  # type: ignore[list-item]
    for i, call in enumerate(inputs.calls):
        out.hidden[i] = block_output(block(inputs.hidden[i], *call.args, **call.kwargs)).detach()
    return out


def _first_sample(value: Any) -> Any:
    """A batch's argument cut to its first sample where it is a (B, 1, T, T) attention mask."""
    if isinstance(value, torch.Tensor) and value.dim() == 4 and value.shape[0] > 1:
        return value[:1]
    return value


def execution_order(block: nn.Module, modules: dict[str, nn.Module], hidden: torch.Tensor, call: BlockCall
                    ) -> list[str]:
    """Names of ``modules`` in the order a forward of ``block`` calls them (one sample is run)."""
    order: list[str] = []
    handles = [m.register_forward_pre_hook(lambda _m, _a, n=n: order.append(n)) for n, m in modules.items()]
    try:
        with torch.no_grad():
            block(hidden[:1], *(_first_sample(a) for a in call.args),
                  **{k: _first_sample(v) for k, v in call.kwargs.items()})
    finally:
        for h in handles:
            h.remove()
    return list(dict.fromkeys(order))


@contextmanager
def replaced_forward(module: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """While open, calling ``module`` runs ``forward`` instead of its own (its hooks still run); restored on exit."""
    module.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        del module.forward  # back to the class's forward


def skipped_module(module: nn.Linear):
    """While open, ``module`` returns zeros of its output shape without computing (its input hooks still run).

    For the statistics pass: the last Linear of a block feeds no other target, so its product is not needed.
    """
    return replaced_forward(module, lambda x: x.new_zeros(*x.shape[:-1], module.out_features))
