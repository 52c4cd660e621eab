"""The runtime tricks, behind one switchboard: each is one field of the config's ``runtime:`` section, and with
every switch off the stages run the plain reference path.

- ``chunked_attention``: the calibration forwards of single blocks compute causal attention in query chunks
  (``engine.attention``), skipping most of the masked half of the T × T products.
- ``compute_dtype``: calibration forwards in bf16/fp16 on a float32 model; each block's weights are cast while
  it runs, the weights that are pruned stay in the model's dtype (``engine.compute``).
- ``page_out_weights``: after a weight mapped from the model's safetensors file is read whole (hashing, the dense
  reference) or replaced (a mask, a solve), its file pages are advised out (``engine.memory``), so the run's
  resident memory holds what it works on, not the whole model.
- ``map_pruned_weights``: a pruned group's CPU weights become a file mapping — of the weights checkpoint when the
  method wrote one, else of a scratch file beside the run folder that is unlinked at once — so they stay on
  disk until evaluation or export reads them again.
- ``trim_memory``: freed heap pages go back to the OS between calibration passes (glibc ``malloc_trim``).
- ``keep_freed_memory``: during fine-tuning glibc keeps freed memory in its heap for the next step instead of
  serving each step fresh pages the kernel must fault in and zero (``engine.memory.freed_memory_kept``).
- ``offload``: a model larger than the device keeps its decoder blocks on the CPU; each goes to the device while
  its forward runs, and the layers being pruned stay there from their calibration to the end of their pruning
  (``engine.offload``). 'auto' offloads on a GPU when the weights exceed half its free memory.

None of them changes which files a run folder holds.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from podar.schemas.config import RuntimeConfig
from podar.schemas.errors import ConfigError

from .attention import chunked_causal_attention
from .compute import BlockView, cast_floating, cast_module, compute_blocks, model_dtype, resolve_compute_dtype
from .memory import file_backed_ranges, freed_memory_kept, page_out_file_backed, release_free_memory
from .offload import BlockOffload, tensor_bytes

__all__ = ["Runtime", "BlockView", "cast_floating", "model_dtype"]


class Runtime:
    """The switches of one run (``config.runtime``) and the calls the stages make through them."""

    def __init__(self, config: RuntimeConfig | None = None, compute_dtype: str | None = None) -> None:
        self.config = config or RuntimeConfig()
        # runtime.compute_dtype as the run resolved it (PruningConfig.compute_dtype_request); None: the config's
        self.compute_dtype_name = compute_dtype or self.config.compute_dtype
        self.offload: BlockOffload | None = None  # set by ``place`` when the blocks are offloaded

    # ------------------------------------------------------------ placement
    def place(self, model: nn.Module, device: torch.device, layers: nn.ModuleList | None) -> bool:
        """Put ``model`` on ``device``: whole, or with its blocks ``layers`` offloaded (``runtime.offload``).
        True when offloaded. Raises ConfigError when 'blocks' is asked of a model without a block list."""
        mode = self.config.offload
        if mode == "auto":
            free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
            mode = "blocks" if free is not None and layers is not None and tensor_bytes(model) > free / 2 else "off"
        if mode == "off":
            model.to(device)
            return False
        if layers is None:
            raise ConfigError("runtime.offload='blocks' needs the model's list of decoder blocks, and none was found; "
                             "name it with calibration.blocks (e.g. 'model.layers') or set runtime.offload: off")
        self.offload = BlockOffload(device)
        self.offload.install(model, layers)
        return True

    def hold(self, modules: list[nn.Module]) -> None:
        """Offloaded: the layers of ``modules`` stay on the device until ``release`` (no-op otherwise)."""
        if self.offload is not None:
            self.offload.hold(modules)

    def release(self) -> None:
        """Offloaded: the held layers' weights, as they are now, go back to the CPU (no-op otherwise)."""
        if self.offload is not None:
            self.offload.release()

    # ------------------------------------------------------------ forwards
    @staticmethod
    def model_dtype(model: nn.Module) -> torch.dtype | None:
        """The dtype of the model's first floating parameter."""
        return model_dtype(model)

    def compute_dtype(self, model: nn.Module) -> torch.dtype | None:
        """The dtype calibration forwards are cast to, or None when they run in the model's own."""
        return resolve_compute_dtype(self.compute_dtype_name, model)

    @contextmanager
    def block_forwards(self, model: nn.Module, layers: nn.ModuleList) -> Iterator[BlockView]:
        """The context of calibration forwards of single blocks: ``view[b]`` is block b, in the compute dtype
        while in use, with chunked causal attention. Never wrap a whole-model forward in it."""
        with ExitStack() as stack:
            if self.config.chunked_attention:
                stack.enter_context(chunked_causal_attention(model))
            yield stack.enter_context(compute_blocks(layers, self.compute_dtype(model)))

    @contextmanager
    def model_forwards(self, model: nn.Module) -> Iterator[nn.Module]:
        """The context of a whole-model calibration pass: the model's weights cast to the compute dtype."""
        with cast_module(model, self.compute_dtype(model)) as cast:
            yield cast

    # ------------------------------------------------------------ memory
    def file_ranges(self) -> list[tuple[int, int]]:
        """The file-backed mappings of this process (read once by callers that advise tensor by tensor)."""
        return file_backed_ranges() if self.config.page_out_weights else []

    def page_out(self, tensors: list[torch.Tensor], ranges: list[tuple[int, int]] | None = None) -> int:
        """Advise the file pages of ``tensors`` out; the bytes advised (0 when switched off)."""
        if not self.config.page_out_weights:
            return 0
        return page_out_file_backed(tensors, ranges)

    def replace(self, param: nn.Parameter, new: torch.Tensor, ranges: list[tuple[int, int]] | None = None) -> int:
        """Make ``new`` the parameter's data (no copy into the old storage, whose pages, when mapped from a file,
        would each be faulted in and copied) and advise the old storage's file pages out; the bytes advised."""
        old = param.data
        param.data = new
        return self.page_out([old], ranges)

    def releaser(self) -> Callable[[torch.Tensor], None]:
        """``release(part)``: advise the file pages of a part of a weight out once a pass has read it (the file
        mappings read once, now)."""
        ranges = self.file_ranges()

        def release(part: torch.Tensor) -> None:
            self.page_out([part], ranges)

        return release

    def settle(self, model: nn.Module) -> None:
        """Between two passes that each read the whole ``model``: the pages of its weights mapped from files
        advised out (the next pass reads back what it uses), the allocator's free pages returned to the OS."""
        self.page_out(list(model.state_dict().values()), self.file_ranges())
        self.trim()

    def trim(self) -> bool:
        """Return the allocator's free pages to the OS; True when something was released."""
        return release_free_memory() if self.config.trim_memory else False

    def keep_freed_memory(self) -> AbstractContextManager[bool]:
        """While open, freed memory stays in the allocator's heap for the next training step
        (``runtime.keep_freed_memory``; ``engine.memory.freed_memory_kept``); yields True when that took effect."""
        return freed_memory_kept(self.config.keep_freed_memory)

    def map_weights(self, params: Mapping[str, nn.Parameter], source: Path | None, scratch_dir: Path) -> bool:
        """Make the CPU ``params`` file mappings: of ``source`` (a safetensors file holding exactly these tensors,
        e.g. the checkpoint just written) or, without one, of a scratch file in ``scratch_dir`` that is unlinked
        once mapped. True when mapped; False when switched off or a tensor is not on the CPU."""
        if not self.config.map_pruned_weights or any(p.device.type != "cpu" for p in params.values()):
            return False
        scratch = None
        if source is None:
            scratch = scratch_dir / f".podar-scratch-{os.getpid()}.safetensors"
            save_file({n: p.detach().contiguous() for n, p in params.items()}, str(scratch))
            source = scratch
        try:
            mapped = load_file(str(source))
        finally:
            if scratch is not None:
                scratch.unlink(missing_ok=True)  # the mapping keeps the data until the tensors go
        for name, param in params.items():
            tensor = mapped[name]
            if tensor.shape != param.shape or tensor.dtype != param.dtype:
                raise ValueError(f"'{source.name}' holds '{name}' as {tensor.dtype} {tuple(tensor.shape)}, the layer "
                                 f"is {param.dtype} {tuple(param.shape)}")
            param.data = tensor
        return True

    def cast_inputs(self, value: object, model: nn.Module) -> object:
        """``value`` with its floating tensors in the compute dtype (the cached block inputs)."""
        return cast_floating(value, self.compute_dtype(model))
