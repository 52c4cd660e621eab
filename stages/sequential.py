"""Block-by-block calibration for Llama-style decoders (``model.model.layers``), as the Wanda/SparseGPT reference
code does it, without exceptions for control flow: the decoder stack is swapped for a recorder for one pass of
embeddings, so the first block's inputs (and the keyword arguments every block gets) are captured; then each
block runs on its cached inputs.

The forwards compute in the model's dtype, or in ``calibration.compute_dtype`` (``compute.py``: the cached inputs
cast, each block's weights cast while it runs). Statistics are sums with a sample count, in fp32 whatever the
dtype of the forwards:
- Wanda: ``sq_norm_sum`` (in,) = Σ over tokens of x_j²
- SparseGPT: ``hessian_sum`` (in, in) = Σ over tokens of x xᵀ
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .compute import cast_floating

__all__ = [
    "BlockInputs",
    "decoder_layers",
    "capture_first_block_inputs",
    "run_block",
    "collect_stats",
    "replaced_forward",
    "skipped_module",
    "new_stat_entry",
    "add_stats",
    "finish_stats",
    "group_targets_by_block",
    "reconstruction_hooks",
]


@dataclass
class BlockInputs:
    """Cached inputs of the next block: hidden (B, T, C) per batch, and the keyword arguments blocks receive."""

    hidden: list[torch.Tensor] = field(default_factory=list)  # each (B, T, C)
    kwargs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def n_samples(self) -> int:
        return sum(h.shape[0] for h in self.hidden)


def decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The decoder block list of a Llama-style causal LM (``model.model.layers``), or None."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    return layers if isinstance(layers, nn.ModuleList) and len(layers) > 0 else None


class _Recorder(nn.Module):
    """Stands in for the decoder stack during one embedding pass: records the first block's inputs."""

    def __init__(self, template: nn.Module, sink: BlockInputs, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.sink, self.dtype = sink, dtype
        if hasattr(template, "attention_type"):
            self.attention_type = template.attention_type

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            raise TypeError("decoder block called with positional arguments beyond hidden_states; unsupported model")
        self.sink.hidden.append(cast_floating(hidden_states.detach(), self.dtype))
        self.sink.kwargs.append(
            {k: cast_floating(v, self.dtype) for k, v in kwargs.items() if k not in ("cache", "past_key_values")})
        return hidden_states


@contextmanager
def _swapped_layers(model: nn.Module, replacement: nn.ModuleList) -> Iterator[None]:
    inner = model.model  # type: ignore[attr-defined]
    original = inner.layers
    inner.layers = replacement
    try:
        yield
    finally:
        inner.layers = original


@torch.no_grad()
def capture_first_block_inputs(model: nn.Module, samples: torch.Tensor, batch_size: int,
                               device: torch.device, dtype: torch.dtype | None = None) -> BlockInputs:
    """Inputs of block 0 for samples (N, T) int64, in batches of ``batch_size`` (embeddings run once); with
    ``dtype``, the hidden states and floating keyword arguments (rotary cos/sin) are kept cast to it."""
    layers = decoder_layers(model)
    assert layers is not None
    sink = BlockInputs()
    recorder = nn.ModuleList([_Recorder(layers[0], sink, dtype)])
    with _swapped_layers(model, recorder):
        for start in range(0, samples.shape[0], batch_size):
            batch = samples[start:start + batch_size].to(device)  # (B, T)
            model.model(input_ids=batch, use_cache=False)  # type: ignore[attr-defined]
    return sink


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs, in_place: bool = False) -> BlockInputs:
    """Outputs of ``block`` on every cached batch: the next block's inputs. ``in_place``: each batch's output
    replaces its input in ``inputs`` as soon as it is computed (one set of activations alive, not two)."""
    out = inputs if in_place else BlockInputs(kwargs=inputs.kwargs, hidden=[None] * len(inputs.hidden))  # type: ignore[list-item]
    for i, kwargs in enumerate(inputs.kwargs):
        result = block(inputs.hidden[i], **kwargs)
        out.hidden[i] = (result[0] if isinstance(result, tuple) else result).detach()
    return out


def group_targets_by_block(model: nn.Module, targets: dict[str, nn.Module], blocks_per_group: int
                           ) -> tuple[list[list[int]], list[list[str]]]:
    """(block indices per group, target names per group) for the decoder stack; every target must lie inside."""
    layers = decoder_layers(model)
    assert layers is not None
    owner: dict[str, int] = {}
    module_block: dict[int, int] = {}
    for i, block in enumerate(layers):
        for m in block.modules():
            module_block[id(m)] = i
    outside = []
    for name, module in targets.items():
        if id(module) in module_block:
            owner[name] = module_block[id(module)]
        else:
            outside.append(name)
    if outside:
        from podar.schemas.errors import ConfigError

        raise ConfigError(
            f"sequential calibration covers decoder blocks only, but targets include {outside[:4]}; add them to "
            "'ignore' or set calibration.sequential: false"
        )
    block_groups: list[list[int]] = []
    name_groups: list[list[str]] = []
    for start in range(0, len(layers), blocks_per_group):
        blocks = list(range(start, min(start + blocks_per_group, len(layers))))
        names = [n for n in targets if owner[n] in blocks]
        if names:
            block_groups.append(blocks)
            name_groups.append(names)
    return block_groups, name_groups


def new_stat_entry(kind: str, in_features: int, device: torch.device) -> dict[str, Any]:
    """An empty accumulator: {'n_samples': 0, 'sq_norm_sum': (in,)} (wanda) or {'hessian_sum': (in, in)}, fp32."""
    if kind == "wanda":
        return {"n_samples": 0, "sq_norm_sum": torch.zeros(in_features, dtype=torch.float32, device=device)}
    return {"n_samples": 0, "hessian_sum": torch.zeros(in_features, in_features, dtype=torch.float32, device=device)}


_GRAM_LEAF = 128  # diagonal blocks at most this wide are summed whole (a square product)


def _add_upper_gram(h: torch.Tensor, x: torch.Tensor, lo: int, hi: int) -> None:
    """h[lo:hi, lo:hi] upper triangle (and some entries below it, inside diagonal leaves) += x[:, lo:hi]ᵀ x[:, lo:hi].

    h (in, in) fp32, x (tokens, in) fp32. Halves recursively: the off-diagonal quarter is one product, the two
    diagonal halves recurse down to leaves of ``_GRAM_LEAF`` columns — about half the full product's work plus
    the leaves, in products large enough to run near the machine's peak (``bench/bench_gram.py`` times it
    against the row bands of 256 it replaced and other leaf widths)."""
    if hi - lo <= _GRAM_LEAF:
        h[lo:hi, lo:hi].addmm_(x[:, lo:hi].t(), x[:, lo:hi])
        return
    mid = lo + ((hi - lo) // 2 + 31) // 32 * 32  # split on a multiple of 32 columns
    _add_upper_gram(h, x, lo, mid)
    h[lo:mid, mid:hi].addmm_(x[:, lo:mid].t(), x[:, mid:hi])  # (mid−lo, hi−mid)
    _add_upper_gram(h, x, mid, hi)


def add_stats(entry: dict[str, Any], x: torch.Tensor, kind: str) -> None:
    """Add the inputs x (B, T, in) or (tokens, in) to ``entry``; ``n_samples`` counts sequences (B).

    SparseGPT's Σ x xᵀ is symmetric, so only its upper triangle is summed (``_add_upper_gram``: a little over
    half the full product's work); ``finish_stats`` mirrors it once calibration is done.
    """
    n_seq = x.shape[0] if x.dim() == 3 else 1
    flat = x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, in)
    if kind == "wanda":
        entry["sq_norm_sum"] += flat.pow(2).sum(dim=0)
    else:
        h = entry["hessian_sum"]  # (in, in), upper triangle valid
        _add_upper_gram(h, flat, 0, h.shape[0])
        entry["upper_only"] = True
    entry["n_samples"] += n_seq


def finish_stats(stats: dict[str, dict[str, Any]]) -> None:
    """Make every accumulator whole after its last ``add_stats``: Σ x xᵀ mirrored from its upper triangle."""
    for entry in {id(e): e for e in stats.values()}.values():
        if entry.pop("upper_only", False):
            h = entry["hessian_sum"]
            h.copy_(torch.triu(h) + torch.triu(h, diagonal=1).t())


@contextmanager
def collect_stats(modules: dict[str, nn.Linear], kind: str) -> Iterator[dict[str, dict[str, Any]]]:
    """Forward hooks that add each module's input statistics into the yielded dict while the context is open.

    kind 'wanda': {'sq_norm_sum': (in,) fp32, 'n_samples': int}; kind 'sparsegpt': {'hessian_sum': (in, in)
    fp32, 'n_samples': int}. ``n_samples`` counts sequences (the batch dimension). Modules that receive the very
    same input tensor one after the other (q/k/v after one norm, gate/up after another) share one accumulator
    (the same dict object), so each statistic is computed once per input.
    """
    stats: dict[str, dict[str, Any]] = {}
    handles = []
    last: dict[str, Any] = {"x": None, "name": None}

    def make_hook(name: str):
        def hook(module: nn.Linear, args: tuple, _output: Any) -> None:
            x = args[0]
            if x is last["x"] and last["name"] in stats:
                leader = stats[last["name"]]
                if stats.get(name) is not leader:  # first time: alias the leader's accumulator
                    stats[name] = leader
                return
            last["x"], last["name"] = x, name
            entry = stats.get(name)
            if entry is None:
                entry = stats[name] = new_stat_entry(kind, module.in_features, module.weight.device)
            add_stats(entry, x, kind)

        return hook

    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(make_hook(name)))
        yield stats
    finally:
        for h in handles:
            h.remove()
        last.clear()
    finish_stats(stats)


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


def execution_order(block: nn.Module, modules: dict[str, nn.Linear], hidden: torch.Tensor,
                    kwargs: dict[str, Any]) -> list[str]:
    """Names of ``modules`` in the order a forward of ``block`` calls them (one sample is run)."""
    order: list[str] = []
    handles = [m.register_forward_pre_hook(lambda _m, _a, n=n: order.append(n)) for n, m in modules.items()]
    try:
        with torch.no_grad():
            block(hidden[:1], **_first_sample_kwargs(kwargs))
    finally:
        for h in handles:
            h.remove()
    return list(dict.fromkeys(order))


def _first_sample_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor) and v.dim() == 4 and v.shape[0] > 1:  # (B, 1, T, T) attention masks
            v = v[:1]
        out[k] = v
    return out


_RECON_CHUNK = 512  # tokens per product in reconstruction_hooks


@contextmanager
def reconstruction_hooks(modules: dict[str, nn.Linear], dense: dict[str, torch.Tensor], max_samples: int
                         ) -> Iterator[dict[str, list[float]]]:
    """While open, accumulate per module ‖X·(W − Ŵ)ᵀ‖² and ‖X·Wᵀ‖² on the first ``max_samples`` sequences.

    Yields {name: [err_sq_sum, ref_sq_sum, n_samples]}; the relative error is err/ref. ``dense``: (out, in).
    """
    acc: dict[str, list[float]] = {n: [0.0, 0.0, 0] for n in modules}
    handles = []

    def make_hook(name: str):
        def hook(module: nn.Linear, args: tuple, output: Any) -> None:
            entry = acc[name]
            if entry[2] >= max_samples:
                return
            x = args[0].detach()
            n_seq = x.shape[0] if x.dim() == 3 else 1
            x = x.reshape(-1, x.shape[-1])  # (tokens, in)
            out = output.detach().reshape(-1, output.shape[-1])  # XŴᵀ (+ bias)
            # W − Ŵ in the dtype the forward computes in (the model's, or calibration.compute_dtype): a mask's
            # difference is exact there (the removed weights, zeros elsewhere), so the product runs at that
            # dtype's speed and the error is not polluted by rounding the kept weights
            w = module.weight.detach()
            delta = dense[name].to(w.device, w.dtype) - w  # (out, in)
            bias = module.bias.detach().float() if module.bias is not None else None
            for t0 in range(0, x.shape[0], _RECON_CHUNK):  # in token chunks: small temporaries
                err = (x[t0:t0 + _RECON_CHUNK].to(w.dtype) @ delta.t()).float()  # (chunk, out) = XWᵀ − XŴᵀ
                pruned_out = out[t0:t0 + _RECON_CHUNK].float()
                if bias is not None:
                    pruned_out = pruned_out - bias
                entry[0] += float(err.pow(2).sum())
                entry[1] += float((pruned_out + err).pow(2).sum())  # ‖XWᵀ‖² without a second product
            entry[2] += n_seq

        return hook

    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(make_hook(name)))
        yield acc
    finally:
        for h in handles:
            h.remove()
