"""Exporting: a ``save_pretrained``-compatible folder (safetensors), reloaded and checked before it counts.

Written into a temporary folder beside ``RUN_DIR/export`` and moved into place only after the reload check
passes: every tensor bit-exact, logits of a few evaluation windows equal within float tolerance. Every file's
sha256 and size go into the manifest.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from podar.engine.context import RunContext
from podar.engine.models import DTYPES, strip_quantizer
from podar.schemas.errors import StageError
from podar.schemas.records import StageResult

from .evaluate import evaluation_windows

STAGE = "exporting"
# Largest |logit difference| allowed between the in-memory and the reloaded model, relative to max |logit|.
_LOGIT_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def _export_state_dict(model: torch.nn.Module, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    if dtype is None:
        return sd
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}


def verify_export(ctx: RunContext, folder: Path, expected: dict[str, torch.Tensor], dtype: torch.dtype
                  ) -> dict[str, float]:
    """Reload ``folder`` with transformers, compare every tensor and the logits. Raises StageError naming the tensor."""
    from transformers import AutoModelForCausalLM

    try:
        reloaded = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).eval()
    except Exception as e:
        raise StageError(f"the export in '{folder}' does not reload with transformers: {e}", stage="Exporting") from e
    got = reloaded.state_dict()
    missing = sorted(set(expected) - set(got))
    if missing:
        raise StageError(f"tensor '{missing[0]}' is missing from the reloaded export ({len(missing)} missing)",
                         stage="Exporting", layer=missing[0])
    for name, tensor in expected.items():
        other = got[name]
        if other.shape != tensor.shape or other.dtype != tensor.dtype or not torch.equal(other, tensor.cpu()):
            raise StageError(f"tensor '{name}' differs after reload (shape {tuple(other.shape)} vs "
                             f"{tuple(tensor.shape)}, dtype {other.dtype} vs {tensor.dtype})", stage="Exporting",
                             layer=name)
    metrics: dict[str, float] = {"tensors_checked": float(len(expected))}
    n = ctx.config.export.verify_windows
    if n and ctx.config.evaluation.enabled:
        windows, _ = evaluation_windows(ctx)
        batch = windows[:n]
        with torch.no_grad():
            ref = ctx.model(input_ids=batch.to(ctx.device), use_cache=False).logits.float().cpu()
            new = reloaded(input_ids=batch, use_cache=False).logits.float()
        diff = float((ref - new).abs().max())
        scale = float(ref.abs().max())
        tol = _LOGIT_RTOL.get(dtype, 1e-2) * max(scale, 1.0)
        if ctx.model.dtype != dtype:
            tol = max(tol, _LOGIT_RTOL.get(dtype, 1e-2) * 4 * max(scale, 1.0))
        if not diff <= tol:
            raise StageError(f"logits of the reloaded export differ by {diff:.3g} (> {tol:.3g}) on {n} window(s)",
                             stage="Exporting")
        metrics["logits_max_abs_diff"] = diff
    del reloaded
    return metrics


def run(ctx: RunContext) -> StageResult:
    cfg = ctx.config.export
    store = ctx.store
    final = store.export_dir
    tmp = final.with_name(".export.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    dtype = None if cfg.dtype == "auto" else DTYPES[cfg.dtype]
    model = ctx.model
    strip_quantizer(model)
    expected = _export_state_dict(model, dtype)
    save_dtype = dtype or model.dtype
    if store.is_main:
        model.save_pretrained(str(tmp), state_dict=dict(expected), safe_serialization=True,
                              max_shard_size=cfg.max_shard_size)
        if ctx.tokenizer is not None:
            ctx.tokenizer.save_pretrained(str(tmp))
    if dtype is not None:
        import json

        cfg_path = tmp / "config.json"
        data = json.loads(cfg_path.read_text())
        data["dtype"] = cfg.dtype
        cfg_path.write_text(json.dumps(data, indent=2, sort_keys=True))
    metrics = verify_export(ctx, tmp, expected, save_dtype)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    total = 0
    weight_bytes = 0
    for path in sorted(final.rglob("*")):
        if path.is_file():
            rel = str(path.relative_to(store.run_dir))
            record = store.record(rel, stage=STAGE, kind="export")
            ctx.add_artifact(record)
            total += record.bytes
            if path.suffix == ".safetensors":
                weight_bytes += record.bytes
    return StageResult(
        stage=STAGE,
        metrics={"format": cfg.format, "dtype": str(save_dtype).replace("torch.", ""), "bytes": total,
                 "weight_bytes": weight_bytes, **metrics, "path": str(final)},
    )
