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
from .quality import final_hidden, head_splits, logits_at, next_token_logits
from .quantize import WeightQuant
from .targets import restore_conv1d

STAGE = PruningStage.EXPORTING
_VERIFY_TOP_K = 64  # the export's logits are compared with the in-memory model's on its 64 largest per position
_FLOAT16_MAX = float(torch.finfo(torch.float16).max)  # 65504: beyond it float16 holds only inf
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
    ranges = ctx.runtime.file_ranges()
    for name, tensor in ctx.model.state_dict().items():
        if name not in got:
            raise StageError(f"tensor '{name}' is missing from the reloaded export", stage=STAGE.display_name(),
                             layer=name)
        expected = expected_of(name, tensor, name in targets)  # in the dtype the export stores it in
        other = got[name]
        if other.dtype != expected.dtype:  # compared exactly in the wider of the two, never a float32 copy of both
            wide = torch.promote_types(other.dtype, expected.dtype)
            other, expected = other.to(wide), expected.to(wide)
        if other.shape != expected.shape or not torch.equal(other.cpu(), expected.cpu()):
            raise StageError(f"tensor '{name}' differs after reload (shape {tuple(other.shape)} vs "
                             f"{tuple(expected.shape)})", stage=STAGE.display_name(), layer=name)
        ctx.runtime.page_out([tensor, got[name]], ranges)  # both read whole: their mapped pages may go now
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


def _top_logits(model: torch.nn.Module, batch: torch.Tensor, split: bool
                ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(ids (B, T-1, k) int64, logits (B, T-1, k) fp32, max |logit|): the model's k largest next-token logits at
    every position, computed a chunk of positions at a time."""
    b, t = batch.shape
    ids = values = None
    scale = 0.0
    for where, logits in next_token_logits(model, batch, split=split):
        top = torch.topk(logits, min(_VERIFY_TOP_K, logits.shape[-1]), dim=-1)
        if ids is None or values is None:
            k = top.indices.shape[-1]
            ids = torch.empty(b, t - 1, k, dtype=torch.int64)
            values = torch.empty(b, t - 1, k, dtype=torch.float32)
        ids[:, where], values[:, where] = top.indices.cpu(), top.values.cpu()
        scale = max(scale, float(logits.abs().max()))
    assert ids is not None and values is not None
    return ids, values, scale


def compare_outputs(ctx: RunContext, ref: torch.nn.Module, other: torch.nn.Module, batch: torch.Tensor,
                    between: Callable[[], None] | None = None) -> tuple[float, float, int]:
    """(max |other − ref|, max |ref|, non-finite values of ``other``) on ``batch``. A causal LM is compared on the
    reference's ``_VERIFY_TOP_K`` largest logits at every position (and every logit of ``other`` must be finite),
    computed a chunk of positions at a time, one model after the other: ``between()`` runs once ``ref``'s part is
    taken (to let its weights' pages go). Other models: their last hidden states, whole."""
    if ctx.state.task != "causal-lm":
        a = final_hidden(ref, batch).float().cpu()
        if between is not None:
            between()
        b = final_hidden(other, batch.to(next(other.parameters()).device)).float().cpu()
        finite = torch.isfinite(b)
        diff = float((a - b).abs()[finite].max()) if bool(finite.any()) else 0.0
        return diff, float(a.abs().max()), int((~finite).sum())
    probe = batch[:1, :8]
    ids, values, scale = _top_logits(ref, batch, head_splits(ref, probe))
    if between is not None:
        between()
    batch = batch.to(next(other.parameters()).device)
    split = head_splits(other, probe.to(batch.device))
    bad = 0
    for _where, logits in next_token_logits(other, batch, split=split):  # as the tools that load it compute
        bad += int((~torch.isfinite(logits)).sum())
    diff = 0.0
    with computing_in(other, torch.float32):  # its stored weights, computed without rounding of its own
        for where, got in logits_at(other, batch, ids, split=split):
            gap = (got.cpu() - values[:, where]).abs()
            diff = max(diff, float(gap[torch.isfinite(gap)].max()) if bool(torch.isfinite(gap).any()) else 0.0)
    return diff, scale, bad


@torch.no_grad()
def check_float16_range(ctx: RunContext, batch: torch.Tensor) -> float:
    """The largest |activation| of the in-memory model on ``batch`` (every module's floating outputs); StageError
    before anything is written when it is beyond float16's range: a float16 export would compute inf and NaN."""
    peak: list[Any] = [0.0, ""]

    def hook(name: str) -> Callable[..., None]:
        def record(_module: torch.nn.Module, _args: Any, out: Any) -> None:
            for t in out if isinstance(out, tuple) else (out,):
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
                    value = float(t.detach().abs().amax())
                    if not value <= peak[0]:  # NaN counts as out of range
                        peak[0], peak[1] = value, name

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in ctx.model.named_modules() if n]
    try:
        batch = batch.to(ctx.device)
        if ctx.state.task == "causal-lm":
            for _ in next_token_logits(ctx.model, batch, split=head_splits(ctx.model, batch[:1, :8])):
                pass
        else:
            final_hidden(ctx.model, batch)
    finally:
        for h in handles:
            h.remove()
    if not peak[0] <= _FLOAT16_MAX:
        raise StageError(f"the model's activations reach {peak[0]:.4g} in '{peak[1]}' on the verification window(s), "
                         f"beyond float16's largest value ({_FLOAT16_MAX:g}): a float16 export would compute inf and "
                         "NaN there; export as bfloat16 (export.dtype: bfloat16, float32's range) or float32",
                         stage=STAGE.display_name(), layer=peak[1])
    return peak[0]


@torch.no_grad()
def verify_export(ctx: RunContext, folder: Path, dtype: torch.dtype) -> dict[str, float]:
    """Reload ``folder`` (in its stored dtype, mapped from its files where no decompression is needed) and compare
    every tensor bit for bit, then the logits of ``export.verify_windows`` evaluation windows: computed in the dtype
    the export is stored in, as the tools that load it compute, every one finite; computed in float32 one module at
    a time, within the dtype's tolerance of the in-memory model's on its largest logits. Raises StageError naming
    the tensor, or the dtype and what to export in instead."""
    try:
        reloaded = load_pretrained(folder)
    except Exception as e:
        raise StageError(f"the export in '{folder}' does not reload: {e}", stage=STAGE.display_name()) from e
    cfg = ctx.config.export
    expected = _expected(cfg, dtype, ctx.state.quant_scales)
    metrics: dict[str, float] = {"tensors_checked": float(_compare_tensors(ctx, reloaded, expected))}
    n = ctx.config.export.verify_windows
    if n and ctx.config.evaluation.enabled:
        batch = evaluation_windows(ctx)[0][:n].to(ctx.device)
        stored = next(t.dtype for t in reloaded.parameters() if t.is_floating_point())
        diff, scale, bad = compare_outputs(ctx, ctx.model, reloaded, batch, between=lambda: _let_go(ctx, ctx.model))
        rtol = _logit_tolerance(ctx.model.dtype, stored, cfg)
        scale = max(scale, 1.0)
        name = str(stored).replace("torch.", "")
        if bad:
            raise StageError(f"the export computes {bad} non-finite value(s) in its own dtype ({name}) on {n} "
                             "window(s): it would give NaN or inf in every tool that loads it; export as bfloat16 "
                             "or float32 (export.dtype)", stage=STAGE.display_name())
        if not diff <= rtol * scale:
            raise StageError(f"logits of the reloaded export ({name} weights, computed in float32) differ by "
                             f"{diff:.3g} (> {rtol * scale:.3g}) on {n} window(s)", stage=STAGE.display_name())
        metrics.update(logits_max_abs_diff=diff)
    del reloaded
    return metrics


def _let_go(ctx: RunContext, model: torch.nn.Module) -> None:
    """Advise the pages of ``model``'s weights that are mapped from files out (read whole by a step that is over:
    the kernel reads them again when needed), so the in-memory model and the export are not resident together."""
    ctx.runtime.page_out(list(model.state_dict().values()), ctx.runtime.file_ranges())


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
    checked: dict[str, Any] = {}
    n = cfg.verify_windows
    if dtype == torch.float16 and n and ctx.config.evaluation.enabled:  # before anything is written
        checked["max_abs_activation"] = check_float16_range(ctx, evaluation_windows(ctx)[0][:n])
    staging = store.begin_export()
    metrics = {**checked, **_write(ctx, staging, dtype)}
    _let_go(ctx, model)  # read whole by the writer
    metrics.update(verify_export(ctx, staging, dtype))
    records = store.finish_export(staging, stage=STAGE.value)
    for record in records:
        ctx.adopt_artifact(record)
    return StageResult(stage=STAGE.value, metrics={
        "format": cfg.format, "quantization": cfg.gguf_type if cfg.format == "gguf" else cfg.quantization,
        "dtype": str(dtype).replace("torch.", ""), "bytes": sum(r.bytes for r in records),
        "weight_bytes": sum(r.bytes for r in records if r.path.endswith((".safetensors", ".gguf"))),
        **metrics, "path": str(store.export_dir)})
