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
from .sparsegpt import hessian_from_sum, inverse_hessian_factor, sparsegpt_saliency

STAGE = "computing_importance"


def _check_finite(tensor: torch.Tensor, layer: str, what: str) -> None:
    """Raise naming ``layer`` when ``tensor`` holds NaN/Inf. One reduction when all is well: any NaN or Inf makes
    the sum non-finite; only then are the bad entries counted (a sum that merely overflowed has none)."""
    if bool(torch.isfinite(tensor.sum())):
        return
    bad = int((~torch.isfinite(tensor)).sum())
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
                if "hinv_upper" not in stats:  # layers sharing an input share H, so its factor is computed once
                    stats["hinv_upper"], stats["dead"], stats["damp_used"], stats["retries"] = inverse_hessian_factor(
                        hessian_from_sum(stats["hessian_sum"], stats["n_samples"]), cfg.calibration.dampening_frac,
                        layer=name,
                        on_retry=lambda frac, n=name: ctx.log.warning("cholesky_retry", layer=n, dampening_frac=frac),
                    )
                score = sparsegpt_saliency(weight, stats["hinv_upper"], stats["dead"])
                layer_metrics.setdefault(name, {}).update(
                    {"dampening_frac": stats["damp_used"], "cholesky_retries": stats["retries"]})
        _check_finite(score, name, "the importance score")
        if cfg.method is not PruneMethod.MAGNITUDE or cfg.resolved_scope() == "global":
            ctx.state.scores[name] = score
        # else: |W| is recomputed layer by layer in Pruning, so every layer's score is never alive at once
        layer_metrics.setdefault(name, {}).update(score_stats(score))
    ctx.current_layer = None
    return StageResult(
        stage=STAGE,
        metrics={"method": cfg.method.value, "layers_scored": len(targets), "group": ctx.state.group_index},
        layer_metrics=layer_metrics,
    )
