"""Exporting: the pruned model written in the configured format, reloaded and checked before it counts.

Written into the store's staging folder and moved into place only after the check passes: reloaded with
podar's own loader (``load_pretrained``), every tensor equal to the in-memory one (bit-exact, or exactly the
quantize-dequantize result of ``quantize.py`` for W8A16 / W4A16), and the logits of a few evaluation windows
close. Every file's sha256 and size go into the manifest; the pruned layers' bytes are compared with dense
float16.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from podar.engine.compute import computing_in
from podar.engine.context import RunContext
from podar.engine.models import DTYPES, strip_quantizer
from podar.engine.versions import package_version
from podar.schemas.config import ExportConfig, parse_size
from podar.schemas.errors import StageError
from podar.schemas.records import StageResult
from podar.schemas.stage import PruningStage

from .blocks import find_blocks
from .card import model_card
from .evaluate import evaluation_windows
from .export_gguf import GGUF_FILE, gguf_roundtrip, write_gguf
from .export_io import load_pretrained, roundtrip_weight, write_compressed, write_meta
from .permutation import fold_permutations
from .quality import final_hidden, head_splits, next_token_stats
from .quantize import WeightQuant
from .structure import WIDTH_FAMILIES
from .targets import restore_conv1d

STAGE = PruningStage.EXPORTING
_VERIFY_TOP_K = 64  # the export's logits are compared with the in-memory model's on its 64 largest per position
_COMPARE_BYTES = 32 << 20  # a tensor not pruned is compared with its reloaded copy 32 MiB of rows at a time
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


def _compare_tensors(ctx: RunContext, reloaded: torch.nn.Module, expected_of: Expected, *, by_rows: bool) -> int:
    """Every tensor of the model against the reloaded one, bit for bit; StageError naming the first that differs.
    With ``by_rows`` (a format that stores each tensor not pruned as a plain cast, row for row), a large tensor is
    compared ``_COMPARE_BYTES`` of rows at a time, each part's mapped pages let go once compared."""
    targets = {f"{name}.weight" for name in ctx.state.targets}
    got = reloaded.state_dict()
    checked = 0
    ranges = ctx.runtime.file_ranges()
    for name, tensor in ctx.model.state_dict().items():
        if name not in got:
            raise StageError(f"tensor '{name}' is missing from the reloaded export", stage=STAGE.display_name(),
                             layer=name)
        other = got[name]
        pruned = name in targets
        parts = [(tensor, other)]
        if by_rows and not pruned and tensor.dim() and tensor.numel() and other.shape == tensor.shape:
            step = max(1, _COMPARE_BYTES // tensor[:1].nbytes)
            parts = [(tensor[i:i + step], other[i:i + step]) for i in range(0, tensor.shape[0], step)]
        for mine, theirs in parts:
            expected = expected_of(name, mine, pruned)  # in the dtype the export stores it in
            same = theirs
            if same.dtype != expected.dtype:  # compared exactly in the wider of the two, never a float32 copy of both
                wide = torch.promote_types(same.dtype, expected.dtype)
                same, expected = same.to(wide), expected.to(wide)
            if same.shape != expected.shape or not torch.equal(same.cpu(), expected.cpu()):
                raise StageError(f"tensor '{name}' differs after reload (shape {tuple(other.shape)} vs "
                                 f"{tuple(tensor.shape)})", stage=STAGE.display_name(), layer=name)
            del expected, same
            ctx.runtime.page_out([mine, theirs], ranges)  # both read whole: their mapped pages may go now
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


@dataclass
class Reference:
    """The in-memory model's side of the export check, from one pass over the verification windows (B, T): its
    ``_VERIFY_TOP_K`` largest next-token logits at every position, ``ids`` and ``values`` (B, T-1, k) int64 / fp32
    (a causal LM), or its last hidden states ``hidden`` (B, T, C) fp32 (other models); ``scale`` the largest
    |logit| (or |hidden|); ``peak`` the largest |activation| of any module and ``peak_module`` its name."""

    batch: torch.Tensor
    ids: torch.Tensor | None = None
    values: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    scale: float = 0.0
    peak: float = 0.0
    peak_module: str = ""


@torch.no_grad()
def reference_pass(ctx: RunContext, model: torch.nn.Module, batch: torch.Tensor) -> Reference:
    """``Reference`` of ``model`` on ``batch`` (B, T): one forward, a chunk of positions at a time, every module's
    floating outputs watched for the largest |activation| (NaN counts as out of range)."""
    ref = Reference(batch=batch)

    def hook(name: str) -> Callable[..., None]:
        def record(_module: torch.nn.Module, _args: Any, out: Any) -> None:
            for t in out if isinstance(out, tuple) else (out,):
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
                    value = float(t.detach().abs().amax())
                    if not value <= ref.peak:
                        ref.peak, ref.peak_module = value, name

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        batch = batch.to(next(model.parameters()).device)
        if ctx.state.task != "causal-lm":
            ref.hidden = final_hidden(model, batch).float().cpu()
            ref.scale = float(ref.hidden.abs().max())
            return ref
        release = ctx.runtime.releaser()
        stats = next_token_stats(model, batch, split=head_splits(model, batch[:1, :8], release), top_k=_VERIFY_TOP_K,
                                 release=release)
        ref.ids, ref.values, ref.scale = stats.top_ids, stats.top_values, stats.max_abs
        if not stats.max_abs <= ref.peak:  # the head's logits (a split head is applied outside its module)
            head = model.get_output_embeddings()
            ref.peak = stats.max_abs
            ref.peak_module = next((n for n, m in model.named_modules() if m is head), "the logits")
    finally:
        for h in handles:
            h.remove()
    return ref


def check_float16_range(ref: Reference) -> None:
    """StageError before anything is written when the in-memory model's activations go beyond float16's range:
    a float16 export would compute inf and NaN."""
    if not ref.peak <= _FLOAT16_MAX:
        raise StageError(f"the model's activations reach {ref.peak:.4g} in '{ref.peak_module}' on the verification "
                         f"window(s), beyond float16's largest value ({_FLOAT16_MAX:g}): a float16 export would "
                         "compute inf and NaN there; export as bfloat16 (export.dtype: bfloat16, float32's range) or "
                         "float32", stage=STAGE.display_name(), layer=ref.peak_module)


@torch.no_grad()
def compare_outputs(ctx: RunContext, ref: Reference, other: torch.nn.Module) -> tuple[float, float, int]:
    """(max |other − ref|, max |ref|, non-finite values of ``other``) on the reference's windows. A causal LM is
    compared on the reference's ``_VERIFY_TOP_K`` largest logits at every position (and every logit of ``other``,
    computed in its own dtype, must be finite), a chunk of positions at a time; other models on their last hidden
    states, whole."""
    batch = ref.batch.to(next(other.parameters()).device)
    if ref.hidden is not None:
        b = final_hidden(other, batch).float().cpu()
        finite = torch.isfinite(b)
        diff = float((ref.hidden - b).abs()[finite].max()) if bool(finite.any()) else 0.0
        return diff, ref.scale, int((~finite).sum())
    assert ref.ids is not None and ref.values is not None
    release = ctx.runtime.releaser()
    split = head_splits(other, batch[:1, :8], release)
    bad = next_token_stats(other, batch, split=split, release=release).nonfinite  # in its own dtype
    ctx.runtime.settle(other)
    with computing_in(other, torch.float32):  # its stored weights, computed without rounding of its own
        got = next_token_stats(other, batch, split=split, ids=ref.ids, release=release).at  # (B, T-1, k)
    gap = (got - ref.values).abs()
    finite = torch.isfinite(gap)
    return (float(gap[finite].max()) if bool(finite.any()) else 0.0), ref.scale, bad


@torch.no_grad()
def verify_export(ctx: RunContext, folder: Path, dtype: torch.dtype, reference: Reference | None = None
                  ) -> dict[str, float]:
    """Reload ``folder`` (in its stored dtype, mapped from its files where no decompression is needed) and compare
    every tensor bit for bit, then the logits of ``export.verify_windows`` evaluation windows: computed in the dtype
    the export is stored in, as the tools that load it compute, every one finite; computed in float32 one module at
    a time, within the dtype's tolerance of the in-memory model's (``reference``, taken here when not given) on its
    largest logits. Raises StageError naming the tensor, or the dtype and what to export in instead."""
    n = ctx.config.export.verify_windows
    if reference is None and n and ctx.config.evaluation.enabled:
        reference = reference_pass(ctx, ctx.model, evaluation_windows(ctx)[0][:n])
        ctx.runtime.settle(ctx.model)
    try:
        reloaded = load_pretrained(folder)
    except Exception as e:
        raise StageError(f"the export in '{folder}' does not reload: {e}", stage=STAGE.display_name()) from e
    cfg = ctx.config.export
    expected = _expected(cfg, dtype, ctx.state.quant_scales)
    by_rows = cfg.format != "gguf"
    metrics: dict[str, float] = {"tensors_checked": float(_compare_tensors(ctx, reloaded, expected,
                                                                            by_rows=by_rows))}
    if reference is not None:
        stored = next(t.dtype for t in reloaded.parameters() if t.is_floating_point())
        diff, scale, bad = compare_outputs(ctx, reference, reloaded)
        rtol = _logit_tolerance(ctx.model.dtype, stored, cfg)
        scale = max(scale, 1.0)
        name = str(stored).replace("torch.", "")
        windows = reference.batch.shape[0]
        if bad:
            raise StageError(f"the export computes {bad} non-finite value(s) in its own dtype ({name}) on {windows} "
                             "window(s): it would give NaN or inf in every tool that loads it; export as bfloat16 "
                             "or float32 (export.dtype)", stage=STAGE.display_name())
        if not diff <= rtol * scale:
            raise StageError(f"logits of the reloaded export ({name} weights, computed in float32) differ by "
                             f"{diff:.3g} (> {rtol * scale:.3g}) on {windows} window(s)", stage=STAGE.display_name())
        metrics.update(logits_max_abs_diff=diff)
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
                               structure=ctx.config.pattern.label(), scales=ctx.state.quant_scales,
                               release=ctx.runtime.releaser())
    return {"pruned_layers_bytes": summary.target_bytes,
            "pruned_layers_dense_fp16_bytes": summary.target_dense_fp16_bytes,
            "pruned_layers_ratio_vs_fp16": summary.target_ratio,
            "shards": sum(1 for f in summary.files if f.endswith(".safetensors"))}


def fold(ctx: RunContext) -> None:
    """The N:M masks' input orders (``stages.permutation``) folded into the model and its masks: every pruned
    layer N:M in its own layout, the same function."""
    st = ctx.state
    if not st.permutations:
        return
    stack = find_blocks(ctx.model, ctx.config.calibration.blocks)
    family = WIDTH_FAMILIES.get(getattr(ctx.model.config, "model_type", ""))
    assert stack is not None and family is not None, "checked before any work (podar._setup)"
    ranges = ctx.runtime.file_ranges()
    done = fold_permutations(stack, family, st.permutations, st.permutation_spaces, st.masks,
                             lambda param, new: ctx.runtime.replace(param, new, ranges))
    ctx.log.info("permutations_folded", layers=len(done))
    st.permutations = {}


def run(ctx: RunContext) -> StageResult:
    cfg, store = ctx.config.export, ctx.store
    model = ctx.model
    strip_quantizer(model)
    dtype = model.dtype if cfg.dtype == "auto" else DTYPES[cfg.dtype]
    if not store.is_main:  # one process writes and checks the export (the runner's agreement waits for it)
        return StageResult(stage=STAGE.value, metrics={"format": cfg.format, "written_by_main_process": True})
    ctx.runtime.settle(ctx.model)  # what Evaluating left resident
    checked: dict[str, Any] = {}
    reference = None
    n = cfg.verify_windows
    if n and ctx.config.evaluation.enabled:  # one pass, before anything is written
        reference = reference_pass(ctx, model, evaluation_windows(ctx)[0][:n])
        checked["max_abs_activation"] = reference.peak
        if dtype == torch.float16:
            check_float16_range(reference)
        ctx.runtime.settle(ctx.model)
    # after the reference pass: the export is checked against the model as it was evaluated, so a fold or a
    # layout change that altered the function fails the check
    fold(ctx)
    restore_conv1d(model, ctx.state.converted)  # the layout the model's own class loads (GPT-2's Conv1D)
    ctx.state.converted = []
    staging = store.begin_export()
    metrics = {**checked, **_write(ctx, staging, dtype)}
    written = {"format": cfg.format, "quantization": cfg.gguf_type if cfg.format == "gguf" else cfg.quantization,
               "dtype": str(dtype).replace("torch.", "")}
    (staging / "README.md").write_text(model_card(ctx.config, store.read_manifest().results,
                                                  fingerprint=ctx.state.model_fingerprint,
                                                  version=package_version("podar"), export=written))
    ctx.runtime.settle(ctx.model)  # read whole by the writer
    metrics.update(verify_export(ctx, staging, dtype, reference))
    records = store.finish_export(staging, stage=STAGE.value)
    for record in records:
        ctx.adopt_artifact(record)
    return StageResult(stage=STAGE.value, metrics={
        **written, "bytes": sum(r.bytes for r in records),
        "weight_bytes": sum(r.bytes for r in records if r.path.endswith((".safetensors", ".gguf"))),
        **metrics, "path": str(store.export_dir)})
