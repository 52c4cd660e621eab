"""ComputingImportance: a score per weight of every active target (magnitude, Wanda, SparseGPT saliency)."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from podar.engine.context import RunContext
from podar.schemas.config import PruneMethod
from podar.schemas.errors import StageError
from podar.schemas.records import StageResult

from .common import active_targets
from .scores import magnitude_score, score_stats, wanda_score
from .sparsegpt import sparsegpt_saliency

STAGE = "computing_importance"


def _check_finite(tensor: torch.Tensor, layer: str, what: str) -> None:
    bad = (~torch.isfinite(tensor)).sum().item()
    if bad:
        raise StageError(
            f"layer '{layer}': {what} has {bad} non-finite value(s) (NaN/Inf); the model or its calibration "
            "statistics are corrupt", stage="Computing Importance", layer=layer,
        )


def run(ctx: RunContext) -> StageResult:
    cfg = ctx.config
    targets = active_targets(ctx)
    layer_metrics: dict[str, dict] = {}
    ctx.state.scores.clear()
    for name, module in tqdm(targets.items(), desc="importance", disable=not ctx.progress, leave=False):
        ctx.check_cancelled()
        ctx.current_layer = name
        weight = module.weight.detach()
        _check_finite(weight, name, "the weight")
        if cfg.method is PruneMethod.MAGNITUDE:
            score = magnitude_score(weight)
        else:
            stats = ctx.state.stats.get(name)
            if stats is None:
                raise StageError(f"layer '{name}': no calibration statistics were collected (was it ever run?)",
                                 stage="Computing Importance", layer=name)
            if cfg.method is PruneMethod.WANDA:
                _check_finite(stats["sq_norm_sum"], name, "the calibration statistic Σx²")
                score = wanda_score(weight, stats["sq_norm_sum"], stats["n_samples"])
            else:
                _check_finite(stats["hessian_sum"], name, "the calibration Hessian ΣxxT")
                score, hinv, damp_used, retries = sparsegpt_saliency(
                    weight, stats["hessian_sum"], stats["n_samples"], cfg.calibration.dampening_frac,
                    on_retry=lambda frac, n=name: ctx.log.warning("cholesky_retry", layer=n, dampening_frac=frac),
                    layer=name,
                )
                stats["hinv_upper"] = hinv
                layer_metrics.setdefault(name, {}).update({"dampening_frac": damp_used, "cholesky_retries": retries})
        _check_finite(score, name, "the importance score")
        ctx.state.scores[name] = score
        layer_metrics.setdefault(name, {}).update(score_stats(score))
    ctx.current_layer = None
    return StageResult(
        stage=STAGE,
        metrics={"method": cfg.method.value, "layers_scored": len(targets), "group": ctx.state.group_index},
        layer_metrics=layer_metrics,
    )
