"""Writing and reading exported model folders: dense, dense + W8A16/W4A16 (compressed-tensors pack-quantized),
and podar's own sparse formats (sparse-bitmask, sparse-24-bitmask, optionally with W8A16 values).

A folder holds ``config.json``, safetensors shards (``model.safetensors``, or ``model-0000i-of-0000n.safetensors``
with ``model.safetensors.index.json``), the tokenizer files, and ``podar_export.json`` (format, quantization,
targets, sha256 of every weight file). Shards are written one at a time while walking the state dict, so at most
one shard of compressed tensors exists beside the model (never two full copies).

- dense and dense + W8A16/W4A16 load in transformers (4.57 and 5) and match vLLM's compressed-tensors WNA16
  scheme: the quantized Linears are written by compressed-tensors' own ``PackedQuantizationCompressor``, with a
  ``quantization_config`` that names the format per scheme and the compressed-tensors version.
- The sparse formats are podar's: compressed-tensors removed its sparse compressors (0.15, March 2026) and
  current transformers loads such a folder with the pruned Linears randomly initialised and no error. So their
  ``config.json`` names a model type no other tool knows (``podar-sparse-bitmask``, ``podar-sparse-24-bitmask``):
  transformers and vLLM refuse the folder instead of loading a wrong model, and ``podar.load_pretrained`` reads it.

``load_pretrained(path)`` returns a ready transformers model with the weights decompressed and dequantized.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from podar.engine.store import sha256_file
from podar.schemas.errors import CheckpointError

from .quantize import WeightQuant, dequantize, fake_quantize, quantize, weight_scale
from .sparse_formats import bitmask_compress, bitmask_decompress, sparse24_compress, sparse24_decompress

__all__ = ["ExportSummary", "write_compressed", "write_meta", "load_pretrained", "roundtrip_weight", "PODAR_META",
           "SPARSE_ARCHITECTURE"]

PODAR_META = "podar_export.json"
FORMATS = ("dense", "sparse-bitmask", "sparse-24-bitmask")
SPARSE_ARCHITECTURE = "PodarSparseExport"  # the architecture name of a sparse export: no tool but podar knows it
_PACKED = ("weight_packed", "weight_scale", "weight_shape")  # the tensors compressed-tensors writes per Linear


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


def _scheme(quant: WeightQuant, targets: list[str]) -> Any:
    """The compressed-tensors QuantizationScheme of ``quant`` (symmetric, static, weights only, pack-quantized)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(num_bits=quant.bits, type="int", symmetric=True, dynamic=False,
                            strategy="group" if quant.group_size else "channel", group_size=quant.group_size)
    return QuantizationScheme(targets=targets, weights=args, format="pack-quantized")


def _scale(prefix: str, weight: torch.Tensor, quant: WeightQuant, dtype: torch.dtype,
           recorded: torch.Tensor | None) -> torch.Tensor:
    """The layer's scales (R, G) in ``dtype``: the grid joint quantization put it on, or found from its values."""
    if recorded is not None:
        return recorded.to(dtype)
    try:
        return weight_scale(weight, quant, dtype)
    except ValueError as e:
        raise CheckpointError(f"layer '{prefix}' cannot be written as {quant.label}: {e} (export.group_size)") from e


def _pack_quantized(prefix: str, weight: torch.Tensor, quant: WeightQuant, dtype: torch.dtype,
                    recorded: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """{prefix.weight_packed, .weight_scale, .weight_shape} of weight (R, C), packed by compressed-tensors."""
    from compressed_tensors.compressors import PackedQuantizationCompressor

    scale = _scale(prefix, weight, quant, dtype, recorded)
    pieces = PackedQuantizationCompressor.compress({"weight": weight.detach().float(), "weight_scale": scale},
                                                   _scheme(quant, [prefix]))
    return {f"{prefix}.{k}": v.contiguous() for k, v in pieces.items()}


def _compress(prefix: str, weight: torch.Tensor, fmt: str, quant: WeightQuant | None, dtype: torch.dtype,
              recorded: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The tensors that store one pruned Linear weight (R, C) under ``prefix`` (the module name); ``recorded``:
    the scales joint quantization chose."""
    if fmt == "dense" and quant is not None:
        return _pack_quantized(prefix, weight, quant, dtype, recorded)
    scale = None
    if quant is not None:  # a sparse format with W8A16 values (podar's own layout)
        scale = _scale(prefix, weight, quant, dtype, recorded)
        values = quantize(weight, scale, quant)
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
        out[f"{prefix}.weight_scale"] = scale
    return out


def roundtrip_weight(weight: torch.Tensor, quant: WeightQuant | None, dtype: torch.dtype,
                     recorded: torch.Tensor | None = None) -> torch.Tensor:
    """What a pruned Linear weight reads back as: cast to ``dtype``, or quantize-dequantize into ``dtype`` (on the
    ``recorded`` scales of joint quantization when given)."""
    return weight.detach().to(dtype) if quant is None else fake_quantize(weight, quant, dtype, recorded)


def _quantization_config(model: torch.nn.Module, quant: WeightQuant, targets: set[str]) -> dict[str, Any]:
    """compressed-tensors' ``quantization_config`` for the quantized ``targets``; every other Linear is ignored
    by name (vLLM refuses a Linear that matches neither a target nor the ignore list)."""
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationConfig

    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    config = QuantizationConfig(config_groups={"group_0": _scheme(quant, sorted(targets))}, format="pack-quantized",
                                quantization_status="compressed", ignore=sorted(linears - set(targets)))
    return {"quant_method": "compressed-tensors", "version": compressed_tensors.__version__,
            **config.model_dump(exclude={"quant_method"}), "sparsity_config": {}, "transform_config": {}}


# safetensors' names of the dtypes an export holds
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}
_COPY_BYTES = 16 << 20  # the data is copied behind the header 16 MiB at a time


class _ShardWriter:
    """Writes tensors into safetensors shards of at most ``max_bytes`` (the pieces of one weight stay together),
    streaming: each tensor's bytes go to the shard's data file as it is added, and the shard is the header followed
    by that data (copied in chunks), so memory holds one tensor, never a shard; ``close`` names them and writes the
    index. The files are plain safetensors (header, 8-byte aligned with spaces, data in offset order)."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder, self.max_bytes = folder, max_bytes
        self.current: dict[str, dict[str, Any]] = {}  # name → dtype, shape, data_offsets in the current shard
        self.current_bytes = 0
        self._data: Any = None  # the current shard's data file, open for writing
        self.shards: list[tuple[str, list[str]]] = []  # (temporary file name, tensor names)

    def add(self, pieces: dict[str, torch.Tensor], *, dtype: torch.dtype | None = None,
            release: Callable[[torch.Tensor], None] | None = None) -> None:
        """Append ``pieces`` (name → tensor), each cast to ``dtype`` when given (floating tensors only), written
        ``_COPY_BYTES`` of the source at a time so no whole cast copy exists; ``release(part)`` is called with each
        part of a source tensor once it is written (to let its mapped pages go)."""
        def cast(v: torch.Tensor) -> torch.dtype:
            return dtype if dtype is not None and v.is_floating_point() else v.dtype

        nbytes = sum(v.numel() * cast(v).itemsize for v in pieces.values())
        if self.current and self.current_bytes + nbytes > self.max_bytes:
            self._flush()
        if self._data is None:
            self._data = open(self._data_path(), "wb")  # noqa: SIM115 — closed by _flush
        for k, v in pieces.items():
            v = v.detach()
            to = cast(v)
            size = v.numel() * to.itemsize
            self.current[k] = {"dtype": _ST_DTYPES[to], "shape": list(v.shape),
                               "data_offsets": [self.current_bytes, self.current_bytes + size]}
            rows = v.reshape(-1) if v.dim() < 2 else v.reshape(v.shape[0], -1)  # a view where v is contiguous
            step = max(1, _COPY_BYTES // max(rows[:1].numel() * v.element_size(), 1))
            for start in range(0, rows.shape[0] if size else 0, step):
                part = rows[start:start + step]
                data = part.to(device="cpu", dtype=to).contiguous()
                self._data.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
                del data
                if release is not None:
                    release(part)
            self.current_bytes += size

    def _data_path(self) -> Path:
        return self.folder / f".shard-{len(self.shards):05d}.data"

    def _flush(self) -> None:
        if not self.current:
            return
        self._data.close()
        self._data = None
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.current}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        tmp_name = f".shard-{len(self.shards):05d}.safetensors"
        with open(self.folder / tmp_name, "wb") as out, open(self._data_path(), "rb") as data:
            out.write(len(header).to_bytes(8, "little"))
            out.write(header)
            shutil.copyfileobj(data, out, _COPY_BYTES)
        self._data_path().unlink()
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


def _export_config(model: torch.nn.Module, fmt: str, quant: WeightQuant | None, targets: set[str],
                   dtype: torch.dtype, sparsity: float, structure: str) -> dict[str, Any]:
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    config["dtype"] = str(dtype).replace("torch.", "")
    config["torch_dtype"] = config["dtype"]
    if fmt != "dense":  # a model type and architecture no other tool knows: they refuse it, podar reads it
        config["podar_original"] = {"model_type": config["model_type"], "architectures": config["architectures"]}
        config["model_type"] = f"podar-{fmt}"
        config["architectures"] = [SPARSE_ARCHITECTURE]
        config["podar_sparsity"] = {"format": fmt, "global_sparsity": sparsity, "sparsity_structure": structure,
                                    "quantization": quant.label if quant else "none",
                                    "note": "a podar format: load with podar.load_pretrained"}
    elif quant is not None:
        config["quantization_config"] = _quantization_config(model, quant, targets)
    return config


@torch.no_grad()
def write_compressed(model: torch.nn.Module, folder: str | Path, *, fmt: str, quant: WeightQuant | None,
                     targets: set[str], dtype: torch.dtype, max_shard_bytes: int, tokenizer: Any = None,
                     sparsity: float = 0.0, structure: str = "unstructured",
                     scales: dict[str, torch.Tensor] | None = None,
                     release: Callable[[torch.Tensor], None] | None = None) -> ExportSummary:
    """Write ``model`` into ``folder`` with the ``targets`` (module names) compressed; returns the summary.
    ``scales``: the grids joint quantization put layers on, by module name; ``release(part)``: called with each
    part of an uncompressed tensor once written (the caller lets its mapped pages go)."""
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
            pieces = _compress(module, tensor, fmt, quant, dtype, (scales or {}).get(module))
            summary.target_bytes += sum(v.numel() * v.element_size() for v in pieces.values())
            summary.target_dense_fp16_bytes += tensor.numel() * 2
        else:
            shards.add({name: tensor}, dtype=dtype, release=release)  # cast a part at a time
            continue
        shards.add(pieces)
    final_names = shards.close()
    config = _export_config(model, fmt, quant, targets, dtype, sparsity, structure)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    write_meta(folder, final_names, format=fmt, quantization=quant.label if quant else "none",
               dtype=config["dtype"], group_size=quant.group_size if quant else None, targets=sorted(targets))
    for path in sorted(folder.iterdir()):
        if path.is_file():
            summary.files[path.name] = path.stat().st_size
    summary.total_bytes = sum(summary.files.values())
    return summary


def write_meta(folder: Path, weight_files: list[str], **fields: Any) -> None:
    """``podar_export.json``: what was written (format, quantization, ...) and the sha256 of every weight file."""
    meta = {**fields, "files": {f: sha256_file(folder / f) for f in weight_files}, "writer": "podar"}
    (folder / PODAR_META).write_text(json.dumps(meta, indent=2, sort_keys=True))


def _read_shard(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"export file '{path}' is corrupt or truncated and cannot be read: {e}") from e


def _sparse_weight(tensors: dict[str, torch.Tensor], prefix: str, fmt: str) -> torch.Tensor:
    if fmt == "sparse-bitmask":
        return bitmask_decompress(tensors[f"{prefix}.shape"], tensors[f"{prefix}.compressed"],
                                  tensors[f"{prefix}.bitmask"], tensors[f"{prefix}.row_offsets"])
    return sparse24_decompress(tensors[f"{prefix}.shape"], tensors[f"{prefix}.compressed"],
                               tensors[f"{prefix}.bitmask"])


def _weight(tensors: dict[str, torch.Tensor], prefix: str, fmt: str, quant: WeightQuant | None) -> torch.Tensor:
    """The weight of the Linear at ``prefix`` from its stored pieces: decompressed, then dequantized."""
    if f"{prefix}.weight_packed" in tensors:
        from compressed_tensors.compressors import PackedQuantizationCompressor

        if quant is None:
            raise ValueError("pack-quantized weights in an export without quantization")
        pieces = {k: tensors[f"{prefix}.{k}"] for k in _PACKED}
        return PackedQuantizationCompressor.decompress(pieces, _scheme(quant, [prefix]))["weight"]
    values = tensors[f"{prefix}.weight"] if fmt == "dense" else _sparse_weight(tensors, prefix, fmt)
    scale = tensors.get(f"{prefix}.weight_scale")
    if scale is None:
        return values
    if quant is None or values.dtype != torch.int8:
        raise ValueError(f"a weight_scale beside {values.dtype} values in an export quantized {quant}")
    return dequantize(values, scale, quant)  # in the export's dtype, as written


_PIECES = (".shape", ".compressed", ".bitmask", ".row_offsets", ".weight_packed", ".weight_scale", ".weight_shape")


def _decompress_all(tensors: dict[str, torch.Tensor], fmt: str, quant: WeightQuant | None, dtype: torch.dtype
                    ) -> dict[str, torch.Tensor]:
    prefixes = {k.rsplit(".", 1)[0] for k in tensors if k.endswith(_PIECES)}
    out: dict[str, torch.Tensor] = {}
    for prefix in prefixes:
        try:
            out[f"{prefix}.weight"] = _weight(tensors, prefix, fmt, quant)
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"tensor '{prefix}' in the export is incomplete or inconsistent: {e}") from e
    # everything else as stored: a compressed layer's bias too (only its weight's pieces were decompressed)
    out.update({k: v for k, v in tensors.items() if not (k.endswith(_PIECES) and k.rsplit(".", 1)[0] in prefixes)})
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in out.items()}


def _verify_files(folder: Path, meta: dict[str, Any]) -> None:
    for name, sha in meta["files"].items():
        file = folder / name
        if not file.is_file():
            raise CheckpointError(f"export file '{file}' is missing")
        if sha256_file(file) != sha:
            raise CheckpointError(f"export file '{file}' does not match its sha256 in {PODAR_META}: it was "
                                  "changed, corrupted or truncated")


def _model_config(folder: Path, raw: dict[str, Any]) -> Any:
    """The transformers config of an export; a sparse export's own model type is restored from ``podar_original``."""
    from transformers import AutoConfig

    original = raw.get("podar_original")
    if original is None:
        return AutoConfig.from_pretrained(str(folder))
    fields = {k: v for k, v in raw.items() if k not in ("podar_original", "podar_sparsity", "model_type")}
    fields["architectures"] = original["architectures"]
    return AutoConfig.for_model(original["model_type"], **fields)


def load_pretrained(path: str | Path, *, dtype: torch.dtype | None = None, verify: bool = True) -> Any:
    """A transformers model of the exported class (a causal LM, an encoder, ...) from a folder podar exported (any
    format), decompressed and dequantized.

    Verifies every weight file against the sha256 in ``podar_export.json`` (refusing a changed, corrupted or
    truncated file by name). A plain ``save_pretrained`` folder loads through transformers as usual.
    """
    from podar.engine.models import auto_class_for

    folder = Path(path)
    meta_path = folder / PODAR_META
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
    if meta is not None and verify:
        _verify_files(folder, meta)
    if meta is not None and meta["format"] == "gguf":  # through transformers' GGUF loader, as users read it
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=meta["gguf_file"], dtype=dtype).eval()
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"'{folder}' holds no config.json: not a model folder")
    raw = json.loads(config_path.read_text())
    config = _model_config(folder, raw)
    auto = auto_class_for(config)
    if meta is None:
        try:
            return auto.from_pretrained(str(folder), dtype=dtype).eval()
        except Exception as e:
            raise CheckpointError(f"'{folder}' does not load with transformers: {e}") from e
    fmt = meta["format"]
    name = {"int8": "w8a16"}.get(meta.get("quantization", "none"), meta.get("quantization", "none"))  # 0.2's int8
    quant = WeightQuant.named(name, meta.get("group_size") or 128)
    dtype = dtype or getattr(torch, raw.get("dtype") or raw.get("torch_dtype") or "float32")
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):  # parameters come from the files, no initialised copy
        model = auto.from_config(config, dtype=dtype)
    expected = set(model.state_dict())
    loaded: set[str] = set()
    for name in sorted(meta["files"]):
        state = _decompress_all(_read_shard(folder / name), fmt, quant, dtype)
        unknown = sorted(set(state) - expected)
        if unknown:
            raise CheckpointError(f"export file '{folder / name}' holds '{unknown[0]}', which the model has not")
        model.load_state_dict(state, strict=False, assign=True)  # a stored tensor in its own dtype stays mapped
        loaded |= set(state)
    model.tie_weights()
    tied = {n for n in expected - loaded if n.endswith("lm_head.weight") and getattr(config, "tie_word_embeddings",
                                                                                       False)}
    missing = sorted(expected - loaded - tied)
    if missing:
        raise CheckpointError(
            f"tensor '{missing[0]}' is missing from the export in '{folder}' ({len(missing)} missing)")
    return model.eval()
