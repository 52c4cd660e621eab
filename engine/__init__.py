"""podar.engine: the state machine, the runner, the run folder, the audit log, Accelerate wiring, loading, and the
runtime switches.

Knows nothing of any method's math; the handler table is handed to the runner by ``podar.pipeline``.
"""

from .audit import AuditLog, AuditSummary, chain_seed, read_audit, verify_audit
from .context import Cancelled, Handler, RunContext, RunState
from .data import (
    calibration_windows,
    check_tokenizer_fits,
    eval_windows,
    load_text,
    resolve_data_dir,
    text_sha256,
    tokenize_text,
)
from .distributed import is_main_process, make_accelerator, reduce_sum, world_size
from .machine import (
    CONDITIONS,
    EFFECTS,
    MOVES,
    VOLATILE,
    Move,
    PruningStage,
    apply_effects,
    build_machine,
    fire,
    is_legal,
    legal_moves,
    mermaid,
    next_move,
)
from .models import builtin_gguf_path, load_model, strip_quantizer, tiny_llama, weights_fingerprint
from .runner import Runner, TransitionListener
from .runtime import Runtime
from .store import ArtifactKey, RunLock, RunStore, atomic_write_bytes, sha256_file, utc_now
from .tokenizer import BYTE_VOCAB_SIZE, byte_tokenizer

__all__ = [
    "AuditLog", "AuditSummary", "chain_seed", "read_audit", "verify_audit",
    "Cancelled", "Handler", "RunContext", "RunState",
    "calibration_windows", "check_tokenizer_fits", "eval_windows", "load_text", "resolve_data_dir", "text_sha256",
    "tokenize_text",
    "is_main_process", "make_accelerator", "reduce_sum", "world_size",
    "CONDITIONS", "EFFECTS", "MOVES", "VOLATILE", "Move", "PruningStage", "apply_effects", "build_machine", "fire",
    "is_legal", "legal_moves", "mermaid", "next_move",
    "builtin_gguf_path", "load_model", "strip_quantizer", "tiny_llama", "weights_fingerprint",
    "Runner", "TransitionListener", "Runtime",
    "ArtifactKey", "RunLock", "RunStore", "atomic_write_bytes", "sha256_file", "utc_now",
    "BYTE_VOCAB_SIZE", "byte_tokenizer",
]
