"""Which modules a run prunes: ``targets`` / ``ignore`` matching, tied-weight protection, shape checks."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from podar.schemas.config import PruningConfig
from podar.schemas.errors import ConfigError

__all__ = ["resolve_targets", "matches", "linearize_conv1d", "restore_conv1d"]


def matches(pattern: str, name: str, module: nn.Module) -> bool:
    """``re:<regex>`` full-matches the module name; otherwise an exact module name or class name."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return pattern == name or pattern == type(module).__name__


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


@torch.no_grad()
def linearize_conv1d(model: nn.Module) -> list[str]:
    """Replace every transformers ``Conv1D`` (GPT-2's attention and MLP: y = x·W + b, W (in, out)) by an
    ``nn.Linear`` computing the same with W transposed, so every prunable layer has an (out, in) weight. Returns
    the names replaced (``restore_conv1d`` puts them back, e.g. before an export that must keep the layout)."""
    names = []
    for name, module in list(model.named_modules()):
        if type(module).__name__ != "Conv1D" or not hasattr(module, "nf"):
            continue
        linear = nn.Linear(module.nx, module.nf, bias=module.bias is not None, device="meta")
        linear.weight = nn.Parameter(module.weight.detach().t().contiguous(),
                                     requires_grad=module.weight.requires_grad)
        if module.bias is not None:
            linear.bias = module.bias
        _set_module(model, name, linear)
        names.append(name)
    return names


@torch.no_grad()
def restore_conv1d(model: nn.Module, names: list[str]) -> None:
    """Turn the ``nn.Linear`` layers ``linearize_conv1d`` made back into transformers ``Conv1D`` (W (in, out))."""
    from transformers.pytorch_utils import Conv1D

    for name in names:
        linear = model.get_submodule(name)
        conv = Conv1D.__new__(Conv1D)
        nn.Module.__init__(conv)
        conv.nf, conv.nx = linear.out_features, linear.in_features
        conv.weight = nn.Parameter(linear.weight.detach().t().contiguous(),
                                   requires_grad=linear.weight.requires_grad)
        conv.bias = linear.bias if linear.bias is not None else nn.Parameter(torch.zeros(conv.nf))
        _set_module(model, name, conv)


def _tied_parameter_ids(model: nn.Module) -> set[int]:
    """ids of parameters reachable under more than one module (e.g. lm_head tied to the embeddings)."""
    seen: dict[int, int] = {}
    for _, module in model.named_modules():
        for _, p in module.named_parameters(recurse=False):
            seen[id(p)] = seen.get(id(p), 0) + 1
    return {pid for pid, count in seen.items() if count > 1}


def resolve_targets(model: nn.Module, config: PruningConfig) -> tuple[dict[str, nn.Linear], list[str]]:
    """(targets, notes): the Linear modules to prune, in model order, and why others were skipped.

    Rules: only ``nn.Linear`` (embeddings are never pruned); ``ignore`` wins over ``targets``; a Linear whose
    weight is tied to another module's is skipped unless ``targets`` names it exactly. Raises ConfigError when
    nothing matches, or when the pattern does not fit a target's shape (naming the layer).
    """
    tied = _tied_parameter_ids(model)
    selected: dict[str, nn.Linear] = {}
    notes: list[str] = []
    linear_names: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        linear_names.append(name)
        if not any(matches(p, name, module) for p in config.targets):
            continue
        if any(matches(p, name, module) for p in config.ignore):
            notes.append(f"{name}: skipped (ignore)")
            continue
        if id(module.weight) in tied and name not in config.targets:
            notes.append(f"{name}: skipped (weight tied to another module; name it exactly in targets to prune)")
            continue
        selected[name] = module
    if not selected:
        sample = ", ".join(linear_names[:6]) or "(the model has no Linear module)"
        raise ConfigError(
            f"targets {list(config.targets)} (minus ignore {list(config.ignore)}) matched no Linear module; "
            f"Linear modules look like: {sample}"
        )
    for name, module in selected.items():
        out_f, in_f = module.weight.shape
        config.pattern.check_layer(name, out_f, in_f)
    return selected, notes


SNAPSHOT_PART_BYTES = 16 * 2**20  # the dense reference is written in parts of at most 16 MiB (bounded memory)


@torch.no_grad()
def snapshot_weights(targets: dict[str, nn.Linear], folder: Path,
                     after_part: Callable[[list[torch.Tensor]], object] | None = None) -> list[Path]:
    """Write each target's weight (out, in), as it is before pruning, into safetensors parts in ``folder``.

    Parts hold at most SNAPSHOT_PART_BYTES each (one tensor alone may exceed it), so serializing never copies
    more than one part. Each part is written atomically; returns the part paths. ``after_part`` is called with
    the weights of each part once it is written.
    """
    folder.mkdir(parents=True, exist_ok=True)
    parts: list[Path] = []
    current: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        nonlocal current, size
        if current:
            path = folder / f"part-{len(parts):05d}.safetensors"
            tmp = path.with_name(f".{path.name}.tmp")
            save_file(current, str(tmp))
            os.chmod(tmp, 0o644)  # save_file makes 0600; a run folder is meant to be read by auditors
            os.replace(tmp, path)
            parts.append(path)
            if after_part is not None:
                after_part(list(current.values()))
        current, size = {}, 0

    for name, module in targets.items():
        w = module.weight.detach().cpu().contiguous()
        if current and size + w.numel() * w.element_size() > SNAPSHOT_PART_BYTES:
            flush()
        current[name] = w
        size += w.numel() * w.element_size()
    flush()
    return parts
