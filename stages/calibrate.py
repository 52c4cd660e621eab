"""Calibrating: the statistics of the current layer group's targets, collected by the run's calibration walk
(``stages.walks``) with the method's own accumulator (``stages.methods``)."""

from __future__ import annotations

import torch

from podar.engine.context import RunContext
from podar.schemas.records import StageResult
from podar.schemas.stage import PruningStage

from . import structure
from .walks import require_inputs

STAGE = PruningStage.CALIBRATING


@torch.no_grad()
def run(ctx: RunContext) -> StageResult:
    st = ctx.state
    if structure.structure_group(ctx):  # blocks, channels, heads: their statistics over the whole model
        samples = st.calibration_samples
        assert samples is not None
        metrics, per_block = structure.calibrate(ctx)
        return StageResult(stage=STAGE.value, layer_metrics=per_block, metrics={
            "samples": int(samples.shape[0]), "tokens_per_sample": int(samples.shape[1]), "walk": "structure",
            **metrics})
    index = st.group_index
    names = st.layer_groups[index]
    if st.walk is None:  # masks after structure by a method that reads no statistics
        return StageResult(stage=STAGE.value, metrics={"group": index, "groups": len(st.layer_groups),
                                                       "layers": len(names), "walk": "none"})
    # offloaded: the group's layers stay on the device through its scoring and pruning (Pruning releases them)
    ctx.runtime.hold([st.targets[n] for n in names])
    stats, metrics = st.walk.statistics(index - st.walk_offset, ctx.method, ctx.check_cancelled)
    require_inputs(stats, names, "during calibration", STAGE.display_name())
    st.stats = stats
    samples = st.calibration_samples
    assert samples is not None
    return StageResult(
        stage=STAGE.value,
        metrics={"group": index, "groups": len(st.layer_groups), "layers": len(names), "walk": st.walk.kind,
                 "samples": int(samples.shape[0]), "tokens_per_sample": int(samples.shape[1]), **metrics},
    )
