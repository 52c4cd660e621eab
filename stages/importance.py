"""ComputingImportance: the method's score of every weight of the current layer group (and, once per input that
several layers share, the method's preparation, e.g. SparseGPT's inverse-Hessian factor)."""

from __future__ import annotations

from typing import Any

import torch

from podar.engine.context import RunContext
from podar.engine.distributed import together
from podar.schemas.errors import StageError
from podar.schemas.records import StageResult
from podar.schemas.stage import PruningStage

from . import structure
from .common import input_groups, owners

STAGE = PruningStage.COMPUTING_IMPORTANCE


def check_finite(tensor: torch.Tensor, layer: str, what: str) -> None:
    """Raise naming ``layer`` when ``tensor`` holds NaN/Inf. One reduction when all is well: any NaN or Inf makes
    the sum non-finite; only then are the bad entries counted (a sum that merely overflowed has none)."""
    if bool(torch.isfinite(tensor.sum())):
        return
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        raise StageError(f"layer '{layer}': {what} has {bad} non-finite value(s) (NaN/Inf); the model or its "
                         "calibration statistics are corrupt", stage=STAGE.display_name(), layer=layer)


def score_stats(score: torch.Tensor) -> dict[str, float]:
    """min, max, mean, std of a score tensor as Python floats (fp64 accumulation)."""
    s = score.detach().double()
    return {"score_min": float(s.min()), "score_max": float(s.max()), "score_mean": float(s.mean()),
            "score_std": float(s.std()) if s.numel() > 1 else 0.0}


def _prepared(ctx: RunContext, name: str, stats: Any, done: dict[int, Any]) -> Any:
    """The method's preparation for the input ``name`` reads, made once per shared statistics record."""
    if stats is None:
        return ctx.method.prepare(None, ctx.config.method, layer=name)
    if id(stats) not in done:
        for part, value in stats.parts().items():
            if isinstance(value, torch.Tensor):
                check_finite(value, name, f"the calibration statistic {part}")
        done[id(stats)] = ctx.method.prepare(
            stats, ctx.config.method, layer=name,
            on_retry=lambda frac, n=name: ctx.log.warning("cholesky_retry", layer=n, dampening_frac=frac))
    return done[id(stats)]


@torch.no_grad()
def _mine(ctx: RunContext, targets: dict[str, Any]) -> list[str]:
    """The layers this process scores: all, or on several processes for a method that solves each input group on
    one of them (``solve_on_owner``), those of the groups it owns (``state.owners``, for Pruning too)."""
    st, dist = ctx.state, ctx.dist
    groups = input_groups(list(targets), st.stats)
    if dist.world == 1 or not ctx.method.solve_on_owner:
        st.owners = {}
        return list(targets)
    st.owners = owners(groups, targets, dist.world)
    return [n for g in groups if st.owners[g[0]] == dist.rank for n in g]


def run(ctx: RunContext) -> StageResult:
    cfg, st, method = ctx.config, ctx.state, ctx.method
    if structure.structure_group(ctx):  # which blocks, channels and heads stay
        return StageResult(stage=STAGE.value, metrics={"method": "structure", **structure.rank(ctx)})
    targets = st.group_targets()
    keep = method.keeps_scores or cfg.resolved_scope() == "global"
    layer_metrics: dict[str, dict] = {}
    st.scores.clear()
    st.prepared.clear()
    done: dict[int, Any] = {}

    def score_mine() -> None:
        for name in ctx.bar(_mine(ctx, targets), "importance"):
            ctx.check_cancelled()
            ctx.current_layer = name
            weight = targets[name].weight.detach()
            check_finite(weight, name, "the weight")
            stats = st.stats.get(name)
            if method.needs_calibration and stats is None:
                raise StageError(f"layer '{name}': no calibration statistics were collected (was it ever run?)",
                                 stage=STAGE.display_name(), layer=name)
            prepared = st.prepared[name] = _prepared(ctx, name, stats, done)
            score = method.score(weight, stats, prepared, cfg.method)
            check_finite(score, name, "the importance score")
            if keep:  # else recomputed in Pruning, layer by layer, so every layer's score is never alive at once
                st.scores[name] = score
            layer_metrics[name] = {**method.describe(prepared), **score_stats(score)}
        ctx.current_layer = None

    together(ctx.dist, score_mine)  # a process that fails stops the others too, before they wait for it
    merged = ctx.dist.merged(layer_metrics)
    return StageResult(stage=STAGE.value, layer_metrics={n: merged[n] for n in targets if n in merged},
                       metrics={"method": method.name, "layers_scored": len(targets), "group": st.group_index})
