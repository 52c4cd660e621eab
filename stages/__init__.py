"""podar.stages: one handler per stage, the pruning methods, the calibration walks, and the pure tensor math.

``HANDLERS`` is the one table keyed by stage that the pipeline hands to the engine's runner.
"""

from podar.schemas.stage import PruningStage

from . import calibrate, evaluate, export, finetune, importance, pruning
from .bitpack import pack_bits, unpack_bits
from .masks import (
    block_mask,
    column_mask,
    expected_pruned,
    global_unstructured_masks,
    n_pruned,
    nm_mask,
    pattern_mask,
    row_mask,
    unstructured_mask,
)
from .methods import LayerStats, Pruned, PruneSpec, PruningMethod, get_method, register_method, registered_methods
from .perplexity import PerplexityResult, perplexity, window_nll
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
    "block_mask", "column_mask", "expected_pruned", "global_unstructured_masks", "n_pruned", "nm_mask",
    "pattern_mask", "row_mask", "unstructured_mask",
    "LayerStats", "PruneSpec", "Pruned", "PruningMethod", "get_method", "register_method", "registered_methods",
    "PerplexityResult", "perplexity", "window_nll",
    "resolve_targets", "snapshot_weights",
]
