"""Exporting: the pruned model written in the configured format, reloaded and checked before it counts.

Written into the store's staging folder and moved into place only after the check passes: reloaded with
podar's own loader (``load_pretrained``), every tensor equal to the in-memory one (bit-exact, or exactly the
quantize-dequantize result of ``quantize.py`` for W8A16 / W4A16), and the logits of a few evaluation windows
close. Every file's sha256 and size go into the manifest; the pruned layers' bytes are compared with dense
float16.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from podar.engine.compute import computing_in
from podar.engine.context import RunContext
from podar.engine.models import DTYPES, strip_quantizer
from podar.schemas.config import ExportConfig, parse_size
from podar.schemas.errors import StageError
from podar.schemas.records import StageResult
from podar.schemas.stage import PruningStage

from .evaluate import evaluation_windows
from .export_gguf import GGUF_FILE, gguf_roundtrip, write_gguf
from .export_io import load_pretrained, roundtrip_weight, write_compressed, write_meta
from .quality import final_hidden
from .quantize import WeightQuant
from .targets import restore_conv1d

STAGE = PruningStage.EXPORTING
# Largest |logit difference| allowed between the in-memory and the reloaded model, relative to max |logit|:
# exact same-dtype weights leave only float noise; float16 / bfloat16 / integer rounding of weights moves logits.
_LOGIT_RTOL = {"exact": 1e-4, torch.float16: 5e-2, torch.bfloat16: 1e-1, "w8a16": 2.5e-1, "w4a16": 5e-1,
               "f16": 5e-2, "q8_0": 2.5e-1, "q4_0": 5e-1}


Expected = Callable[[str, torch.Tensor, bool], torch.Tensor]  # (name, in-memory tensor, pruned?) → as reloaded


def _expected(cfg: ExportConfig, dtype: torch.dtype, scales: dict[str, torch.Tensor]) -> Expected:
    """What each tensor reads back as from an export of ``cfg`` (``scales``: joint quantization's grids)."""
    if cfg.format == "gguf":
        return lambda name, t, pruned: gguf_roundtrip(t, pruned, cfg.gguf_type)
    quant = WeightQuant.named(cfg.quantization, cfg.group_size)
    return lambda name, t, pruned: (roundtrip_weight(t, quant, dtype, scales.get(name[: -len(".weight")])) if pruned
                                    else t.detach().to(dtype) if t.is_floating_point() else t.detach())


def _compare_tensors(ctx: RunContext, reloaded: torch.nn.Module, expected_of: Expected) -> int:
    """Every tensor of the model against the reloaded one, bit for bit; StageError naming the first that differs."""
    targets = {f"{name}.weight" for name in ctx.state.targets}
    got = reloaded.state_dict()
    checked = 0
    for name, tensor in ctx.model.state_dict().items():
        if name not in got:
            raise StageError(f"tensor '{name}' is missing from the reloaded export", stage=STAGE.display_name(),
                             layer=name)
        expected = expected_of(name, tensor, name in targets)
        expected = expected.float() if expected.is_floating_point() else expected
        other = got[name]
        if other.shape != expected.shape or not torch.equal(other.to(expected.dtype).cpu(), expected.cpu()):
            raise StageError(f"tensor '{name}' differs after reload (shape {tuple(other.shape)} vs "
                             f"{tuple(expected.shape)})", stage=STAGE.display_name(), layer=name)
        checked += 1
    return checked


def _logit_tolerance(model_dtype: torch.dtype, dtype: torch.dtype, cfg: ExportConfig) -> float:
    """The coarser of the export's dtype (its rounding of the weights) and the in-memory model's (a bfloat16
    model's own logits carry bfloat16 rounding of every operation); float32 adds no rounding."""
    if cfg.format == "gguf":
        return _LOGIT_RTOL[cfg.gguf_type]
    if cfg.quantization != "none":
        return _LOGIT_RTOL[cfg.quantization]
    return max(_LOGIT_RTOL["exact"] if d == torch.float32 else _LOGIT_RTOL.get(d, 1e-1) for d in {model_dtype, dtype})


def _outputs(ctx: RunContext, model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """What the model computes for ``batch``, in float32: logits, or the last hidden states without an LM head."""
    if ctx.state.task == "causal-lm":
        return model(input_ids=batch, use_cache=False).logits.float()
    return final_hidden(model, batch).float()


@torch.no_grad()
def verify_export(ctx: RunContext, folder: Path, dtype: torch.dtype) -> dict[str, float]:
    """Reload ``folder`` (in its stored dtype, mapped from its files where no decompression is needed) and compare
    every tensor bit for bit, then the logits of ``export.verify_windows`` evaluation windows, computed in
    float32 one module at a time. Raises StageError naming the tensor."""
    try:
        reloaded = load_pretrained(folder)
    except Exception as e:
        raise StageError(f"the export in '{folder}' does not reload: {e}", stage=STAGE.display_name()) from e
    cfg = ctx.config.export
    expected = _expected(cfg, dtype, ctx.state.quant_scales)
    metrics: dict[str, float] = {"tensors_checked": float(_compare_tensors(ctx, reloaded, expected))}
    n = ctx.config.export.verify_windows
    if n and ctx.config.evaluation.enabled:
        batch = evaluation_windows(ctx)[0][:n]
        ref = _outputs(ctx, ctx.model, batch.to(ctx.device)).cpu()
        with computing_in(reloaded, torch.float32):
            new = _outputs(ctx, reloaded, batch)
        diff = float((ref - new).abs().max())
        scale = max(float(ref.abs().max()), 1.0)
        rtol = _logit_tolerance(ctx.model.dtype, dtype, cfg)
        if not diff <= rtol * scale:
            raise StageError(f"logits of the reloaded export differ by {diff:.3g} (> {rtol * scale:.3g}) on {n} "
                             "window(s)", stage=STAGE.display_name())
        metrics["logits_max_abs_diff"] = diff
    del reloaded
    return metrics


def _write(ctx: RunContext, staging: Path, dtype: torch.dtype) -> dict[str, Any]:
    """Write the export into ``staging``; the pruned layers' bytes against dense float16."""
    cfg, model, targets = ctx.config.export, ctx.model, set(ctx.state.targets)
    if cfg.format == "gguf":
        sizes = write_gguf(model, ctx.tokenizer, staging, targets=targets, gguf_type=cfg.gguf_type)
        write_meta(staging, [GGUF_FILE], format="gguf", gguf_file=GGUF_FILE, gguf_type=cfg.gguf_type,
                   targets=sorted(targets))
        return {**sizes, "pruned_layers_ratio_vs_fp16": sizes["pruned_layers_bytes"]
                / max(sizes["pruned_layers_dense_fp16_bytes"], 1), "shards": 1}
    summary = write_compressed(model, staging, fmt=cfg.format, quant=WeightQuant.named(cfg.quantization,
                                                                                        cfg.group_size),
                               targets=targets, dtype=dtype, max_shard_bytes=parse_size(cfg.max_shard_size),
                               tokenizer=ctx.tokenizer, sparsity=ctx.config.target_sparsity,
                               structure=ctx.config.pattern.label(), scales=ctx.state.quant_scales)
    return {"pruned_layers_bytes": summary.target_bytes,
            "pruned_layers_dense_fp16_bytes": summary.target_dense_fp16_bytes,
            "pruned_layers_ratio_vs_fp16": summary.target_ratio,
            "shards": sum(1 for f in summary.files if f.endswith(".safetensors"))}


def run(ctx: RunContext) -> StageResult:
    cfg, store = ctx.config.export, ctx.store
    model = ctx.model
    strip_quantizer(model)
    restore_conv1d(model, ctx.state.converted)  # the layout the model's own class loads (GPT-2's Conv1D)
    ctx.state.converted = []
    dtype = model.dtype if cfg.dtype == "auto" else DTYPES[cfg.dtype]
    if not store.is_main:  # one process writes and checks the export (the runner's agreement waits for it)
        return StageResult(stage=STAGE.value, metrics={"format": cfg.format, "written_by_main_process": True})
    staging = store.begin_export()
    metrics = _write(ctx, staging, dtype)
    metrics.update(verify_export(ctx, staging, dtype))
    records = store.finish_export(staging, stage=STAGE.value)
    for record in records:
        ctx.adopt_artifact(record)
    return StageResult(stage=STAGE.value, metrics={
        "format": cfg.format, "quantization": cfg.gguf_type if cfg.format == "gguf" else cfg.quantization,
        "dtype": str(dtype).replace("torch.", ""), "bytes": sum(r.bytes for r in records),
        "weight_bytes": sum(r.bytes for r in records if r.path.endswith((".safetensors", ".gguf"))),
        **metrics, "path": str(store.export_dir)})
