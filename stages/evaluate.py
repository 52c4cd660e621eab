"""Evaluating: the pruned model against the dense one on every evaluation text; the quality gates decide.

Per text, for a causal LM: perplexity (dense and pruned), mean KL(dense ‖ pruned) per token and top-1 agreement,
on the same windows (``stages.quality``). For a model without a language-model head (an encoder), where perplexity
does not apply: the fidelity of its last hidden states to the dense model's on the same windows (per-token
cosine, relative MSE, cosine of the mean-pooled embeddings). The dense reference runs with the dense weights
swapped back in (restored on any exit) and is checkpointed (``baseline``) with the model fingerprint, the text's
sha256 and the protocol, so an auditor can check the dense side of every gate.

With ``evaluation.tasks`` (``stages.tasks``: lm-evaluation-harness), Evaluating runs in two parts: first the dense
model's task results, checkpointed (``task_baseline``) so a resumed run reads them back; then everything else —
the texts, the pruned model's tasks, every gate.
"""

from __future__ import annotations

import json
import re

import torch

from podar.engine.context import RunContext
from podar.engine.data import eval_windows, load_text, resolve_data_dir, text_sha256, tokenize_text
from podar.engine.distributed import together
from podar.engine.versions import package_version
from podar.schemas.config import QualityGates
from podar.schemas.errors import CheckpointError, DataError
from podar.schemas.records import StageResult, TaskEvaluation, TextEvaluation
from podar.schemas.stage import PruningStage

from . import tasks as task_eval
from .common import dense_model
from .quality import (
    Fidelity,
    TextMetrics,
    compare_to_reference,
    dense_reference,
    fidelity,
    hidden_states,
    reference_metrics,
)

STAGE = PruningStage.EVALUATING
PROTOCOL = "ppl+kl-v2"


def evaluation_windows(ctx: RunContext, dataset: str | None = None) -> tuple[torch.Tensor, str]:
    """(windows (n, T) int64, text sha256) of an evaluation text (default: the primary), cached in the run state."""
    ev = ctx.config.evaluation
    dataset = dataset or ev.dataset
    cache = ctx.state.eval_windows
    if dataset not in cache:
        text = load_text(dataset, resolve_data_dir(ctx.config.data_dir), field="evaluation.dataset")
        windows = eval_windows(tokenize_text(ctx.tokenizer, text), ev.sequence_length, ev.max_windows, name=dataset)
        cache[dataset] = (windows, text_sha256(text))
    return cache[dataset]


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")[-60:] or "text"


def my_windows(ctx: RunContext, windows: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """The windows (n, T) this process evaluates (every ``world``-th) and their indices."""
    if windows.shape[0] < ctx.dist.world:
        raise DataError(f"evaluation: {windows.shape[0]} window(s) for {ctx.dist.world} processes; each needs one "
                        "(raise evaluation.max_windows, or use a longer text)")
    index = ctx.dist.shares(windows.shape[0])
    return (windows, index) if ctx.dist.world == 1 else (windows[index], index)


def dense_baseline(ctx: RunContext, dataset: str, windows: torch.Tensor, text_sha: str, index: list[int],
                   n_windows: int) -> dict[str, torch.Tensor]:
    """The dense reference of this process's ``windows`` (``stages.quality.dense_reference``); all processes'
    together checkpointed (windows ``index`` of ``n_windows``)."""
    ev = ctx.config.evaluation

    def reference() -> dict[str, torch.Tensor]:
        ctx.runtime.settle(ctx.model)  # the pruned weights are not read by the dense pass: their mapped pages go
        with dense_model(ctx) as model:
            return dense_reference(model, windows, top_k=ev.kl_top_k, batch_size=ev.batch_size,
                                   device=ctx.device, progress=ctx.progress, text=dataset,
                                   after_batch=ctx.runtime.trim, release=ctx.runtime.releaser())

    ref = together(ctx.dist, reference)
    ctx.runtime.settle(ctx.model)  # the dense weights were copies, freed: their heap pages go back
    stored = {"nll": ref["nll"], "topk_ids": ref["topk_ids"].int(), "topk_logp": ref["topk_logp"]}
    stored = {k: ctx.dist.gather_rows(v, index, n_windows) for k, v in stored.items()}
    ctx.save_tensors("baseline", stored, name=_slug(dataset), group=False, metadata={
        "dataset": dataset, "text_sha256": text_sha, "model_fingerprint": ctx.state.model_fingerprint,
        "sequence_length": str(ev.sequence_length), "windows": str(windows.shape[0]), "kl_top_k": str(ev.kl_top_k),
        "protocol": PROTOCOL})
    return ref


def check_gates(dataset: str, gates: QualityGates, dense: TextMetrics, pruned: TextMetrics) -> list[str]:
    """The failed gates of one text, each with the measured value, the limit and the text named."""
    failures = []
    increase = (pruned.ppl / dense.ppl - 1.0) * 100.0
    if gates.max_perplexity_increase_pct is not None and increase > gates.max_perplexity_increase_pct:
        failures.append(f"'{dataset}': perplexity rose {increase:.1f}% ({dense.ppl:.2f} → {pruned.ppl:.2f}), above "
                        f"max_perplexity_increase_pct={gates.max_perplexity_increase_pct:g}")
    if gates.max_perplexity is not None and pruned.ppl > gates.max_perplexity:
        failures.append(f"'{dataset}': perplexity {pruned.ppl:.2f} is above max_perplexity={gates.max_perplexity:g}")
    if gates.max_kl is not None and pruned.kl_mean is not None and pruned.kl_mean > gates.max_kl:
        failures.append(f"'{dataset}': mean KL {pruned.kl_mean:.4f} nats is above max_kl={gates.max_kl:g}")
    if (gates.min_top1_agreement is not None and pruned.top1_agreement is not None
            and pruned.top1_agreement < gates.min_top1_agreement):
        failures.append(f"'{dataset}': top-1 agreement {pruned.top1_agreement:.4f} is below "
                        f"min_top1_agreement={gates.min_top1_agreement:g}")
    return failures


def check_fidelity_gates(dataset: str, gates: QualityGates, f: Fidelity) -> list[str]:
    """The failed hidden-state gates of one text (models without a language-model head)."""
    failures = []
    if gates.min_hidden_cosine is not None and f.hidden_cosine < gates.min_hidden_cosine:
        failures.append(f"'{dataset}': hidden-state cosine {f.hidden_cosine:.4f} is below min_hidden_cosine="
                        f"{gates.min_hidden_cosine:g}")
    if gates.max_hidden_rel_mse is not None and f.hidden_rel_mse > gates.max_hidden_rel_mse:
        failures.append(f"'{dataset}': hidden-state relative MSE {f.hidden_rel_mse:.4f} is above max_hidden_rel_mse="
                        f"{gates.max_hidden_rel_mse:g}")
    if gates.min_embedding_cosine is not None and f.embedding_cosine < gates.min_embedding_cosine:
        failures.append(f"'{dataset}': embedding cosine {f.embedding_cosine:.4f} is below min_embedding_cosine="
                        f"{gates.min_embedding_cosine:g}")
    return failures


def evaluate_fidelity(ctx: RunContext, dataset: str) -> TextEvaluation:
    """A model without a language-model head: its last hidden states against the dense model's."""
    ev = ctx.config.evaluation
    every, text_sha = evaluation_windows(ctx, dataset)
    windows, index = my_windows(ctx, every)
    kwargs = dict(batch_size=ev.batch_size, device=ctx.device, progress=ctx.progress, text=dataset,
                  check=ctx.check_cancelled)
    with dense_model(ctx) as model:
        dense = hidden_states(model, windows, **kwargs)
    embedding = ctx.dist.gather_rows(dense.mean(dim=1), index, every.shape[0])
    ctx.save_tensors("baseline", {"embedding": embedding}, name=_slug(dataset), group=False, metadata={
        "dataset": dataset, "text_sha256": text_sha, "model_fingerprint": ctx.state.model_fingerprint,
        "sequence_length": str(ev.sequence_length), "windows": str(windows.shape[0]), "protocol": "hidden-v1"})
    f = fidelity(dense, hidden_states(ctx.model, windows, **kwargs), ctx.dist)
    gates = ev.gates_for(dataset)
    return TextEvaluation(dataset=dataset, windows=f.n_windows, seq_len=f.seq_len, hidden_cosine=f.hidden_cosine,
                          hidden_rel_mse=f.hidden_rel_mse, embedding_cosine=f.embedding_cosine,
                          gate_failures=check_fidelity_gates(dataset, gates, f), on_fail=gates.on_fail)


def evaluate_text(ctx: RunContext, dataset: str) -> TextEvaluation:
    """Dense and pruned metrics of one text, and its failed gates."""
    ev = ctx.config.evaluation
    every, text_sha = evaluation_windows(ctx, dataset)
    windows, index = my_windows(ctx, every)
    ref = dense_baseline(ctx, dataset, windows, text_sha, index, every.shape[0])
    local = together(ctx.dist, lambda: compare_to_reference(ctx.model, windows, ref, batch_size=ev.batch_size,
                                                            device=ctx.device, progress=ctx.progress, text=dataset,
                                                            check=ctx.check_cancelled, after_batch=ctx.runtime.trim,
                                                            release=ctx.runtime.releaser()))
    dense = reference_metrics(ref, windows.shape[1]).summed(ctx.dist)
    pruned = local.summed(ctx.dist)
    gates = ev.gates_for(dataset)
    return TextEvaluation(dataset=dataset, windows=pruned.n_windows, seq_len=pruned.seq_len, dense_ppl=dense.ppl,
                          pruned_ppl=pruned.ppl, ppl_increase_pct=(pruned.ppl / dense.ppl - 1.0) * 100.0,
                          kl_mean=pruned.kl_mean, top1_agreement=pruned.top1_agreement,
                          gate_failures=check_gates(dataset, gates, dense, pruned),
                          on_fail=gates.on_fail)


TASK_BASELINE_KIND = "task_baseline"  # the dense model's lm-eval results (JSON in the safetensors metadata)


def dense_tasks(ctx: RunContext) -> StageResult:
    """The first part of Evaluating with tasks: the dense model's results, checkpointed."""
    st, opts = ctx.state, ctx.config.evaluation.tasks

    def work() -> dict:
        with dense_model(ctx) as model:
            return task_eval.run_tasks(model, ctx.tokenizer, st.task_specs, opts, progress=ctx.progress)

    results = task_eval.on_main(ctx, work)
    st.task_baseline = results
    metadata = {"results": json.dumps(results, sort_keys=True), "model_fingerprint": st.model_fingerprint,
                "tasks_sha256": task_eval.specs_sha256(st.task_specs, opts), "protocol": task_eval.PROTOCOL,
                "lm_eval": package_version("lm_eval")}
    ctx.save_tensors(TASK_BASELINE_KIND, {"tasks": torch.tensor([len(results)])}, name="dense", group=False,
                     metadata=metadata)
    scores = task_eval.task_scores(results, opts.metric)
    return StageResult(stage=STAGE.value, metrics={"part": "dense_tasks", **{
        f"task.{name}.dense_{opts.metric}": s.value for name, s in scores.items()}})


def restore_task_baseline(ctx: RunContext, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """A resumed run's dense task results from their checkpoint. Results of other tasks or settings (changed on
    resume) are not adopted: Evaluating computes them again. CheckpointError when they are another model's."""
    st = ctx.state
    if metadata.get("model_fingerprint") != st.model_fingerprint:
        raise CheckpointError("the checkpointed dense task results are of another model than this run's")
    if metadata.get("tasks_sha256") != task_eval.specs_sha256(st.task_specs, ctx.config.evaluation.tasks):
        ctx.log.info("task_baseline_not_adopted", reason="the tasks or their settings changed on resume")
        st.task_baseline = None
        return
    st.task_baseline = json.loads(metadata["results"])


def pruned_tasks(ctx: RunContext) -> list[TaskEvaluation]:
    """The pruned model's task results against the checkpointed dense ones, and their gates."""
    st, opts = ctx.state, ctx.config.evaluation.tasks
    assert st.task_baseline is not None
    results = task_eval.on_main(ctx, lambda: task_eval.run_tasks(ctx.model, ctx.tokenizer, st.task_specs, opts,
                                                                 progress=ctx.progress))
    return task_eval.compare(st.task_specs, opts, st.task_baseline, results)


def run(ctx: RunContext) -> StageResult:
    ev = ctx.config.evaluation
    if not ev.enabled:
        return StageResult(stage=STAGE.value, metrics={"skipped": True}, outcome="gate_passed",
                           notes=["evaluation disabled: no quality gate was applied"])
    if ctx.state.task_specs and ctx.state.task_baseline is None:
        return dense_tasks(ctx)
    one = evaluate_text if ctx.state.task == "causal-lm" else evaluate_fidelity
    texts = [one(ctx, dataset) for dataset in ev.datasets()]
    tasks = pruned_tasks(ctx) if ctx.state.task_specs else []
    metrics: dict = {"dataset": texts[0].dataset}
    for i, t in enumerate(texts):
        prefix = "" if i == 0 else f"{t.dataset}."
        values = t.model_dump(exclude={"dataset", "gate_failures", "on_fail"}, exclude_none=True)
        metrics.update({f"{prefix}{k}": v for k, v in values.items()})
        metrics[f"{prefix}gates_failed"] = len(t.gate_failures)
    for t in tasks:
        key = f"task.{t.task}."
        metrics.update({f"{key}dense_{t.metric}": t.dense, f"{key}{t.metric}": t.pruned,
                        f"{key}drop_points": t.drop_points, f"{key}gates_failed": len(t.gate_failures)})
    n_zero = sum(int((m.weight == 0).sum()) for m in ctx.state.targets.values())
    n_total = sum(m.weight.numel() for m in ctx.state.targets.values())
    failures = [f for t in [*texts, *tasks] for f in t.gate_failures]
    fail_hard = any(t.gate_failures and t.on_fail == "fail" for t in [*texts, *tasks])
    metrics.update({"pruned_layers_sparsity": n_zero / n_total, "pruned_layers": len(ctx.state.targets),
                    "texts": len(texts), "gates_failed_total": len(failures)})
    if failures:
        ctx.log.warning("quality_gate_failed", failures=failures, outcome="fail" if fail_hard else "warn")
    return StageResult(stage=STAGE.value, metrics=metrics, texts=texts, tasks=tasks, notes=failures,
                       outcome="gate_failed" if fail_hard else "gate_passed")
