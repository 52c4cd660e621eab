"""Accelerate wiring and every call between processes, in one place. Each call is a no-op on one process.

A run on N processes (``torchrun --nproc_per_node N podar run ...`` or ``accelerate launch``) runs the same stages
on every rank: each rank takes every N-th calibration batch, evaluation batch and fine-tuning share; statistics
are added up as sums and counts (never means); the main rank alone takes the lock and writes the run folder.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Literal, TypeVar

import torch
from accelerate import Accelerator

from podar.schemas.errors import ConfigError, PodarError

T = TypeVar("T")

__all__ = ["make_accelerator", "world_size", "is_main_process", "reduce_sum", "Dist", "together", "end_processes"]


def make_accelerator(device: Literal["auto", "cpu", "cuda"] = "auto", *, timeout_s: int = 1800) -> Accelerator:
    """An Accelerator for ``device``; checks the process count against the launcher's WORLD_SIZE.

    ``cuda`` without a GPU is a ConfigError; ``auto`` picks CUDA when available. Without ``cpu=True``, CPU ranks
    launched by torchrun each believe they are alone, so on CPU ``cpu=True`` is always passed.
    """
    from accelerate.utils import InitProcessGroupKwargs

    has_cuda = torch.cuda.is_available()
    if device == "cuda" and not has_cuda:
        raise ConfigError("config 'device' is 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    use_cpu = device == "cpu" or not has_cuda
    group = InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s))  # a rank that died does not hang the rest
    accelerator = Accelerator(cpu=use_cpu, kwargs_handlers=[group])
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != expected:
        raise ConfigError(
            f"Accelerate sees {accelerator.num_processes} process(es) but the launcher's WORLD_SIZE is {expected}; "
            "launch with torchrun --nproc_per_node N, or accelerate launch --multi_gpu --num_processes N, so every "
            "rank joins the process group")
    return accelerator


def end_processes(wait: bool = True) -> None:
    """Leave the process group once this process's last collective call is done (``destroy_process_group``).

    Without it gloo's worker threads are torn down during interpreter exit, and a rank can abort ("terminate
    called without an active exception", SIGABRT) after a run that completed. ``wait``: a barrier first, so no
    rank closes its connections while another is still in its last collective call (which aborts that one the
    same way); pass False on a process that failed alone, which must not wait for the others. A no-op on one
    process.
    """
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        try:
            if wait:
                td.barrier()
        finally:
            td.destroy_process_group()


def world_size(accelerator: Accelerator | None) -> int:
    return 1 if accelerator is None else accelerator.num_processes


def is_main_process(accelerator: Accelerator | None) -> bool:
    return accelerator is None or accelerator.is_main_process


def reduce_sum(tensor: torch.Tensor, accelerator: Accelerator | None) -> torch.Tensor:
    """Sum ``tensor`` over processes; the input is never mutated (cloned before the all-reduce)."""
    return Dist(accelerator).sum(tensor)


class Dist:
    """The process group of a run. ``rank`` and ``world`` are 0 and 1 on one process, where every call returns
    its input (or does nothing)."""

    def __init__(self, accelerator: Accelerator | None = None) -> None:
        self.accelerator = accelerator
        self.world = world_size(accelerator)
        self.rank = 0 if accelerator is None else accelerator.process_index
        self.is_main = self.rank == 0

    def _group(self):
        import torch.distributed as td

        return td

    def shares(self, n: int) -> list[int]:
        """The indices of ``n`` items (batches, windows) this rank takes: every ``world``-th, from its rank."""
        return list(range(self.rank, n, self.world))

    def owner(self, index: int) -> int:
        """The rank that takes item ``index`` in ``shares``."""
        return index % self.world

    def barrier(self) -> None:
        if self.world > 1:
            self.accelerator.wait_for_everyone()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Elementwise sum over ranks (a new tensor; the input is never mutated). Sums, not means: a mean over
        processes divides by the process count, not the sample count."""
        if self.world == 1:
            return tensor
        out = tensor.detach().clone()
        self._group().all_reduce(out)
        return out

    def sum_floats(self, values: Sequence[float]) -> list[float]:
        """Float64 sums over ranks of a fixed-length list of numbers."""
        if self.world == 1:
            return list(values)
        return self.sum(torch.tensor(list(values), dtype=torch.float64)).tolist()

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """``tensor`` of rank ``src`` on every rank (the other ranks pass one of the same shape and dtype)."""
        if self.world == 1:
            return tensor
        out = tensor.detach().contiguous().clone()
        self._group().broadcast(out, src=src)
        return out

    def broadcast_text(self, text: str | None, src: int = 0) -> str:
        """A string of rank ``src`` on every rank (UTF-8 bytes in two broadcasts: length, then bytes)."""
        if self.world == 1:
            return text or ""
        data = (text or "").encode() if self.rank == src else b""
        size = self.broadcast(torch.tensor([len(data)], dtype=torch.int64), src)
        buf = torch.zeros(int(size.item()), dtype=torch.uint8)
        if self.rank == src and data:
            buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return bytes(self.broadcast(buf, src).tolist()).decode()

    def first_failure(self, message: str | None) -> tuple[int, str] | None:
        """(rank, message) of the lowest rank that failed (``message`` set), on every rank; None when none did."""
        if self.world == 1:
            return None if message is None else (0, message)
        flags = torch.zeros(self.world, dtype=torch.int64)
        flags[self.rank] = 1 if message is not None else 0
        flags = self.sum(flags)
        failed = [r for r in range(self.world) if flags[r] > 0]
        if not failed:
            return None
        return failed[0], self.broadcast_text(message, src=failed[0])

    def merged(self, local: dict) -> dict:
        """The union of every process's JSON-able dict (each process's entries, in rank order)."""
        if self.world == 1:
            return local
        import json

        out: dict = {}
        for r in range(self.world):
            out.update(json.loads(self.broadcast_text(json.dumps(local) if r == self.rank else None, src=r)))
        return out

    def gather_rows(self, tensor: torch.Tensor, index: Sequence[int], n: int) -> torch.Tensor:
        """The rows of all ranks in their global order: ``tensor`` (len(index), ...) holds rows ``index`` of this
        rank; the result is (n, ...) on every rank (rows summed into zeros: each row comes from one rank)."""
        if self.world == 1:
            return tensor
        out = torch.zeros((n, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        out[list(index)] = tensor
        return self.sum(out)


def together(dist: Dist, step: Callable[[], T]) -> T:
    """Run ``step`` on every process; when it raised on any, raise on all (its own error where it raised, one
    naming the process elsewhere), so no process waits forever for one that stopped. A no-op wrapper on one."""
    if dist.world == 1:
        return step()
    error: Exception | None = None
    value: T | None = None
    try:
        value = step()
    except Exception as e:  # noqa: BLE001 (re-raised below, on every process)
        error = e
    failure = dist.first_failure(None if error is None else (str(error) or type(error).__name__))
    if error is not None:
        raise error
    if failure is not None:
        raise PodarError(f"process {failure[0]} of {dist.world} stopped: {failure[1]}")
    return value  # type: ignore[return-value]
