"""Evaluating: perplexity of the dense and the pruned model on the same windows; the quality gates decide.

The dense baseline runs with the dense weights swapped back in (restored on any exit) and is cached in the run
folder (``artifacts/dense_baseline.json``) keyed by the model fingerprint, the text's sha256 and the protocol, so a
resumed or repeated run does not pay for it again.
"""

from __future__ import annotations

import hashlib
import json

from podar.engine.context import RunContext
from podar.engine.data import eval_windows, load_text, resolve_data_dir, text_sha256, tokenize_text
from podar.schemas.records import StageResult

from .common import swapped_weights
from .perplexity import perplexity

STAGE = "evaluating"
BASELINE = "artifacts/dense_baseline.json"


def evaluation_windows(ctx: RunContext):
    """(windows (n, T) int64, text sha256) of the evaluation text, cached in the run state."""
    cached = ctx.state.extras.get("eval_windows")
    if cached is not None:
        return cached
    ev = ctx.config.evaluation
    text = load_text(ev.dataset, resolve_data_dir(ctx.config.data_dir), field="evaluation.dataset")
    ids = tokenize_text(ctx.tokenizer, text)
    windows = eval_windows(ids, ev.sequence_length, ev.max_windows, name=ev.dataset)
    ctx.state.extras["eval_windows"] = (windows, text_sha256(text))
    return ctx.state.extras["eval_windows"]


def _baseline_key(ctx: RunContext, text_sha: str, n_windows: int) -> str:
    ev = ctx.config.evaluation
    parts = [ctx.state.extras.get("model_fingerprint", ""), text_sha, str(ev.sequence_length), str(n_windows),
             "ppl-v1"]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def dense_baseline(ctx: RunContext, windows, text_sha: str) -> tuple[float, bool]:
    """(dense perplexity, reused from cache)."""
    key = _baseline_key(ctx, text_sha, windows.shape[0])
    path = ctx.store.artifact_path(BASELINE)
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
            if cached.get("key") == key:
                return float(cached["ppl"]), True
        except (OSError, ValueError, KeyError):
            pass
    ev = ctx.config.evaluation
    with swapped_weights(ctx.state.targets, ctx.state.dense_weights):
        result = perplexity(ctx.model, windows, batch_size=ev.batch_size, device=ctx.device,
                            progress=ctx.progress, desc="eval dense", text_name=ev.dataset)
    record = ctx.store.save_json(BASELINE, {"key": key, "ppl": result.ppl, "n_windows": result.n_windows,
                                            "seq_len": result.seq_len, "dataset": ev.dataset, "text_sha256": text_sha},
                                 stage=STAGE, kind="statistics")
    ctx.add_artifact(record)
    return result.ppl, False


def run(ctx: RunContext) -> StageResult:
    ev = ctx.config.evaluation
    if not ev.enabled:
        return StageResult(stage=STAGE, metrics={"skipped": True}, outcome="gate_passed",
                           notes=["evaluation disabled: no quality gate was applied"])
    windows, text_sha = evaluation_windows(ctx)
    dense_ppl, reused = dense_baseline(ctx, windows, text_sha)
    pruned = perplexity(ctx.model, windows, batch_size=ev.batch_size, device=ctx.device, progress=ctx.progress,
                        desc="eval pruned", text_name=ev.dataset)
    increase_pct = (pruned.ppl / dense_ppl - 1.0) * 100.0
    n_zero = sum(int((m.weight == 0).sum()) for m in ctx.state.targets.values())
    n_total = sum(m.weight.numel() for m in ctx.state.targets.values())
    gates = ev.gates
    failures = []
    if gates.max_perplexity_increase_pct is not None and increase_pct > gates.max_perplexity_increase_pct:
        failures.append(f"perplexity on '{ev.dataset}' rose {increase_pct:.1f}% ({dense_ppl:.2f} → {pruned.ppl:.2f}), "
                        f"above the gate max_perplexity_increase_pct={gates.max_perplexity_increase_pct:g}")
    if gates.max_perplexity is not None and pruned.ppl > gates.max_perplexity:
        failures.append(f"perplexity on '{ev.dataset}' is {pruned.ppl:.2f}, above the gate "
                        f"max_perplexity={gates.max_perplexity:g}")
    outcome = "gate_failed" if failures and gates.on_fail == "fail" else "gate_passed"
    if failures:
        ctx.log.warning("quality_gate_failed", failures=failures, on_fail=gates.on_fail)
    return StageResult(
        stage=STAGE,
        metrics={"dense_ppl": dense_ppl, "pruned_ppl": pruned.ppl, "ppl_increase_pct": increase_pct,
                 "windows": pruned.n_windows, "seq_len": pruned.seq_len, "dataset": ev.dataset,
                 "gates_failed": len(failures), "dense_baseline_reused": reused,
                 "pruned_layers_sparsity": n_zero / n_total, "pruned_layers": len(ctx.state.targets)},
        outcome=outcome,
        notes=failures,
    )
