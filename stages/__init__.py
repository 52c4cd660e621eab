"""podar.stages: one handler per stage, and the pure tensor math they call.

``HANDLERS`` is the one table keyed by stage that the pipeline hands to the engine's runner.
"""

from podar.engine.machine import PruningStage

from . import calibrate, evaluate, export, finetune, importance, pruning
from .bitpack import pack_bits, unpack_bits
from .masks import (
    block_mask,
    column_mask,
    global_unstructured_masks,
    n_pruned,
    nm_mask,
    pattern_mask,
    row_mask,
    unstructured_mask,
)
from .perplexity import PerplexityResult, perplexity, window_nll
from .scores import magnitude_score, score_stats, wanda_score
from .sparsegpt import hessian_from_sum, inverse_hessian_factor, sparsegpt_prune, sparsegpt_saliency
from .targets import resolve_targets, snapshot_weights

HANDLERS = {
    PruningStage.CALIBRATING: calibrate.run,
    PruningStage.COMPUTING_IMPORTANCE: importance.run,
    PruningStage.PRUNING: pruning.run,
    PruningStage.FINE_TUNING: finetune.run,
    PruningStage.EVALUATING: evaluate.run,
    PruningStage.EXPORTING: export.run,
}

__all__ = [
    "HANDLERS",
    "pack_bits", "unpack_bits",
    "block_mask", "column_mask", "global_unstructured_masks", "n_pruned", "nm_mask", "pattern_mask", "row_mask",
    "unstructured_mask",
    "PerplexityResult", "perplexity", "window_nll",
    "magnitude_score", "score_stats", "wanda_score",
    "hessian_from_sum", "inverse_hessian_factor", "sparsegpt_prune", "sparsegpt_saliency",
    "resolve_targets", "snapshot_weights",
]
