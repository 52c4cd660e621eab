"""Writing and reading compressed model folders (sparse-bitmask, sparse-24-bitmask, optional int8).

A folder holds ``config.json`` (the model's config plus a compressed-tensors style ``quantization_config`` that
describes the format), safetensors shards (``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` with
``model.safetensors.index.json``), the tokenizer files, and ``podar_export.json`` (format, targets, sha256 of
every weight file). Shards are written one at a time while walking the state dict, so at most one shard of
compressed tensors exists beside the model (never two full copies).

``load_pretrained(path)`` returns a ready transformers model with the weights decompressed and dequantized.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from podar.engine.store import sha256_file
from podar.schemas.errors import CheckpointError

from .sparse_formats import (
    bitmask_compress,
    bitmask_decompress,
    dequantize_int8,
    quantize_int8,
    sparse24_compress,
    sparse24_decompress,
)

__all__ = ["ExportSummary", "write_compressed", "load_pretrained", "roundtrip_weight", "PODAR_META"]

PODAR_META = "podar_export.json"
FORMATS = ("dense", "sparse-bitmask", "sparse-24-bitmask")
@dataclass
class ExportSummary:
    """What was written: files (name → bytes), and the pruned layers' bytes against dense float16."""

    files: dict[str, int] = field(default_factory=dict)
    target_bytes: int = 0  # bytes of the pruned layers' tensors as written (values, masks, offsets, scales)
    target_dense_fp16_bytes: int = 0  # the same layers stored dense in float16
    total_bytes: int = 0

    @property
    def target_ratio(self) -> float:
        return self.target_bytes / self.target_dense_fp16_bytes if self.target_dense_fp16_bytes else 0.0


def _compress(prefix: str, weight: torch.Tensor, fmt: str, quantize: bool, dtype: torch.dtype
              ) -> dict[str, torch.Tensor]:
    """The tensors that store one pruned Linear weight (R, C) under ``prefix`` (the module name)."""
    scale = None
    if quantize:
        values, scale = quantize_int8(weight)
    else:
        values = weight.detach().to(dtype)
    if fmt == "dense":
        out = {f"{prefix}.weight": values.contiguous()}
    elif fmt == "sparse-bitmask":
        out = {f"{prefix}.{k}": v for k, v in bitmask_compress(values).items()}
    elif fmt == "sparse-24-bitmask":
        try:
            out = {f"{prefix}.{k}": v for k, v in sparse24_compress(values).items()}
        except ValueError as e:
            raise CheckpointError(f"layer '{prefix}' cannot be written as sparse-24-bitmask: {e}") from e
    else:
        raise ValueError(f"unknown export format {fmt!r}; one of {FORMATS}")
    if scale is not None:
        out[f"{prefix}.weight_scale"] = scale.to(dtype if dtype.is_floating_point else torch.float32)
    return out


def roundtrip_weight(weight: torch.Tensor, quantize: bool, dtype: torch.dtype) -> torch.Tensor:
    """What a pruned Linear weight reads back as: cast to ``dtype``, or int8 quantize-dequantize into ``dtype``."""
    if quantize:
        q, scale = quantize_int8(weight)
        return dequantize_int8(q, scale.to(dtype).float(), dtype)
    return weight.detach().to(dtype)


def _quantization_config(fmt: str, quantize: bool, targets: Iterable[str], sparsity: float, structure: str
                         ) -> dict[str, Any]:
    targets = sorted(targets)
    cfg: dict[str, Any] = {
        "quant_method": "compressed-tensors",
        "format": "int-quantized" if quantize else "dense",
        "quantization_status": "compressed",
        "sparsity_config": None,
        "config_groups": {},
        "ignore": [],
    }
    if fmt != "dense":
        cfg["sparsity_config"] = {"format": fmt, "global_sparsity": sparsity, "sparsity_structure": structure,
                                  "targets": targets, "ignore": [], "registry_requires_subclass": False}
    if quantize:
        cfg["config_groups"] = {"group_0": {"targets": targets, "weights": {
            "num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False}}}
    return cfg


class _ShardWriter:
    """Writes tensors into safetensors shards of at most ``max_bytes`` (the pieces of one weight stay together),
    one shard in memory at a time; ``close`` names them and writes the index."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder, self.max_bytes = folder, max_bytes
        self.current: dict[str, torch.Tensor] = {}
        self.current_bytes = 0
        self.shards: list[tuple[str, list[str]]] = []  # (temporary file name, tensor names)

    def add(self, pieces: dict[str, torch.Tensor]) -> None:
        nbytes = sum(v.numel() * v.element_size() for v in pieces.values())
        if self.current and self.current_bytes + nbytes > self.max_bytes:
            self._flush()
        for k, v in pieces.items():
            self.current[k] = v.contiguous().cpu()
        self.current_bytes += nbytes

    def _flush(self) -> None:
        if not self.current:
            return
        tmp_name = f".shard-{len(self.shards):05d}.safetensors"
        save_file(self.current, str(self.folder / tmp_name), metadata={"format": "pt"})
        self.shards.append((tmp_name, list(self.current)))
        self.current, self.current_bytes = {}, 0

    def close(self) -> list[str]:
        """The final shard names (``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` + index)."""
        self._flush()
        n = len(self.shards)
        weight_map, final_names = {}, []
        for i, (tmp_name, names) in enumerate(self.shards):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.folder / tmp_name, self.folder / final)
            final_names.append(final)
            weight_map.update({k: final for k in names})
        if n > 1:
            total = sum((self.folder / f).stat().st_size for f in final_names)
            (self.folder / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True))
        return final_names


def _export_config(model: torch.nn.Module, fmt: str, quantize: bool, targets: set[str], dtype: torch.dtype,
                   sparsity: float, structure: str) -> dict[str, Any]:
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    config["dtype"] = str(dtype).replace("torch.", "")
    config["torch_dtype"] = config["dtype"]
    if fmt != "dense" or quantize:
        config["quantization_config"] = _quantization_config(fmt, quantize, targets, sparsity, structure)
    return config


@torch.no_grad()
def write_compressed(model: torch.nn.Module, folder: str | Path, *, fmt: str, quantize: bool, targets: set[str],
                     dtype: torch.dtype, max_shard_bytes: int, tokenizer: Any = None, sparsity: float = 0.0,
                     structure: str = "unstructured") -> ExportSummary:
    """Write ``model`` into ``folder`` with the ``targets`` (module names) compressed; returns the summary."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    summary = ExportSummary()
    shards = _ShardWriter(folder, max_shard_bytes)
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if tensor.numel() and key in seen:  # tied to a tensor already written (lm_head ↔ embeddings)
            continue
        seen.add(key)
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        if module is not None and module in targets:
            pieces = _compress(module, tensor, fmt, quantize, dtype)
            summary.target_bytes += sum(v.numel() * v.element_size() for v in pieces.values())
            summary.target_dense_fp16_bytes += tensor.numel() * 2
        else:
            pieces = {name: tensor.detach().to(dtype) if tensor.is_floating_point() else tensor.detach()}
        shards.add(pieces)
    final_names = shards.close()
    config = _export_config(model, fmt, quantize, targets, dtype, sparsity, structure)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    files = {f: sha256_file(folder / f) for f in final_names}
    meta = {"format": fmt, "quantization": "int8" if quantize else "none", "dtype": config["dtype"],
            "targets": sorted(targets), "files": files, "writer": "podar"}
    (folder / PODAR_META).write_text(json.dumps(meta, indent=2, sort_keys=True))
    for path in sorted(folder.iterdir()):
        if path.is_file():
            summary.files[path.name] = path.stat().st_size
    summary.total_bytes = sum(summary.files.values())
    return summary


def _read_shard(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"export file '{path}' is corrupt or truncated and cannot be read: {e}") from e


def _decompress_all(tensors: dict[str, torch.Tensor], fmt: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    pieces = (".shape", ".compressed", ".bitmask", ".row_offsets")
    prefixes = set() if fmt == "dense" else {k.rsplit(".", 1)[0] for k in tensors if k.endswith(pieces)}
    for prefix in prefixes:
        try:
            if fmt == "sparse-bitmask":
                w = bitmask_decompress(tensors[f"{prefix}.shape"], tensors[f"{prefix}.compressed"],
                                       tensors[f"{prefix}.bitmask"], tensors[f"{prefix}.row_offsets"])
            else:
                w = sparse24_decompress(tensors[f"{prefix}.shape"], tensors[f"{prefix}.compressed"],
                                        tensors[f"{prefix}.bitmask"])
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"tensor '{prefix}' in the export is incomplete or inconsistent: {e}") from e
        out[f"{prefix}.weight"] = w
    for k, v in tensors.items():
        base = k.rsplit(".", 1)[0]
        if base in prefixes or k.endswith(".weight_scale"):
            continue
        out[k] = v
    for k in [k for k in tensors if k.endswith(".weight_scale")]:
        prefix = k[: -len(".weight_scale")]
        weight_key = f"{prefix}.weight"
        q = out[weight_key]
        if q.dtype != torch.int8:
            raise CheckpointError(f"tensor '{weight_key}' has a weight_scale but is {q.dtype}, not int8")
        scale = tensors[k]
        out[weight_key] = dequantize_int8(q, scale.float(), scale.dtype)  # in the export's dtype, as written
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in out.items()}


def load_pretrained(path: str | Path, *, dtype: torch.dtype | None = None, verify: bool = True) -> Any:
    """A transformers model of the exported class (a causal LM, an encoder, ...) from a folder podar exported (any
    format), decompressed and dequantized.

    Verifies every weight file against the sha256 in ``podar_export.json`` (refusing a changed, corrupted or
    truncated file by name). A plain ``save_pretrained`` folder loads through transformers as usual.
    """
    from transformers import AutoConfig

    from podar.engine.models import auto_class_for

    folder = Path(path)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"'{folder}' holds no config.json: not a model folder")
    meta_path = folder / PODAR_META
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
    if meta is not None and verify:
        for name, sha in meta["files"].items():
            file = folder / name
            if not file.is_file():
                raise CheckpointError(f"export file '{file}' is missing")
            if sha256_file(file) != sha:
                raise CheckpointError(f"export file '{file}' does not match its sha256 in {PODAR_META}: it was "
                                      "changed, corrupted or truncated")
    raw = json.loads(config_path.read_text())
    qc = raw.get("quantization_config") or {}
    config = AutoConfig.from_pretrained(str(folder))
    auto = auto_class_for(config)
    if qc.get("quant_method") != "compressed-tensors":
        try:
            return auto.from_pretrained(str(folder), dtype=dtype).eval()
        except Exception as e:
            raise CheckpointError(f"'{folder}' does not load with transformers: {e}") from e
    sparsity = qc.get("sparsity_config") or {}
    fmt = sparsity.get("format", "dense")
    dtype = dtype or getattr(torch, raw.get("dtype") or raw.get("torch_dtype") or "float32")
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = auto.from_config(config, dtype=dtype)
    files = sorted(meta["files"]) if meta else sorted(p.name for p in folder.glob("*.safetensors"))
    expected = set(model.state_dict())
    loaded: set[str] = set()
    for name in files:
        state = _decompress_all(_read_shard(folder / name), fmt, dtype)
        unknown = sorted(set(state) - expected)
        if unknown:
            raise CheckpointError(f"export file '{folder / name}' holds '{unknown[0]}', which the model has not")
        model.load_state_dict(state, strict=False)
        loaded |= set(state)
    model.tie_weights()
    tied = {n for n in expected - loaded if n.endswith("lm_head.weight") and getattr(config, "tie_word_embeddings",
                                                                                       False)}
    missing = sorted(expected - loaded - tied)
    if missing:
        raise CheckpointError(
            f"tensor '{missing[0]}' is missing from the export in '{folder}' ({len(missing)} missing)")
    return model.eval()
