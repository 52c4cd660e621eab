"""podar.engine: the state machine, the runner, the run folder, the audit log, Accelerate wiring, loading.

Knows nothing of any method's math; the handler table is handed to the runner by ``podar.pipeline``.
"""

from .audit import AuditLog, AuditSummary, chain_seed, read_audit, verify_audit
from .context import Cancelled, Handler, RunContext, RunState
from .data import (
    NAMED_DATASETS,
    calibration_windows,
    check_tokenizer_fits,
    eval_windows,
    load_text,
    resolve_data_dir,
    text_sha256,
    tokenize_text,
)
from .distributed import is_main_process, make_accelerator, reduce_sum, world_size
from .machine import CONDITIONS, MOVES, Move, PruningStage, build_machine, fire, is_legal, legal_moves, mermaid
from .models import builtin_gguf_path, load_model, strip_quantizer, tiny_llama, weights_fingerprint
from .runner import Runner, TransitionListener
from .store import RunLock, RunStore, atomic_write_bytes, sha256_file, utc_now
from .tokenizer import BYTE_VOCAB_SIZE, byte_tokenizer

__all__ = [
    "AuditLog", "AuditSummary", "chain_seed", "read_audit", "verify_audit",
    "Cancelled", "Handler", "RunContext", "RunState",
    "NAMED_DATASETS", "calibration_windows", "check_tokenizer_fits", "eval_windows", "load_text",
    "resolve_data_dir", "text_sha256", "tokenize_text",
    "is_main_process", "make_accelerator", "reduce_sum", "world_size",
    "CONDITIONS", "MOVES", "Move", "PruningStage", "build_machine", "fire", "is_legal", "legal_moves", "mermaid",
    "builtin_gguf_path", "load_model", "strip_quantizer", "tiny_llama", "weights_fingerprint",
    "Runner", "TransitionListener",
    "RunLock", "RunStore", "atomic_write_bytes", "sha256_file", "utc_now",
    "BYTE_VOCAB_SIZE", "byte_tokenizer",
]
