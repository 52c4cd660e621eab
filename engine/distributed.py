"""Accelerate wiring and the distributed calls, in one place. Every call is a no-op on one process."""

from __future__ import annotations

import os
from typing import Literal

import torch
from accelerate import Accelerator

from podar.schemas.errors import ConfigError

__all__ = ["make_accelerator", "is_main_process", "reduce_sum", "world_size"]


def make_accelerator(device: Literal["auto", "cpu", "cuda"] = "auto") -> Accelerator:
    """An Accelerator for ``device``; checks the process count against WORLD_SIZE.

    ``cuda`` without a GPU is a ConfigError; ``auto`` picks CUDA when available. Without ``cpu=True``, CPU ranks
    launched by torchrun each believe they are alone, so on CPU ``cpu=True`` is always passed.
    """
    has_cuda = torch.cuda.is_available()
    if device == "cuda" and not has_cuda:
        raise ConfigError("config 'device' is 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    use_cpu = device == "cpu" or not has_cuda
    accelerator = Accelerator(cpu=use_cpu)
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != expected:
        raise ConfigError(
            f"Accelerate sees {accelerator.num_processes} process(es) but WORLD_SIZE is {expected}; launch with "
            "torchrun or 'accelerate launch --multi_gpu' so every rank joins the process group"
        )
    return accelerator


def world_size(accelerator: Accelerator | None) -> int:
    return 1 if accelerator is None else accelerator.num_processes


def is_main_process(accelerator: Accelerator | None) -> bool:
    return accelerator is None or accelerator.is_main_process


def reduce_sum(tensor: torch.Tensor, accelerator: Accelerator | None) -> torch.Tensor:
    """Sum ``tensor`` over processes; the input is never mutated (cloned before the all-reduce).

    Sums (not means): a mean over processes divides by the process count, not the sample count, so statistics
    are reduced as sums with their sample counts and divided afterwards.
    """
    if accelerator is None or accelerator.num_processes == 1:
        return tensor
    return accelerator.reduce(tensor.clone(), reduction="sum")
