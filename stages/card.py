"""The export's model card (``README.md``): the base model, what was removed or masked, what fine-tuning did, and
the figures Evaluating measured — read from the run's own checkpointed results, so a resumed run writes the same card.
"""

from __future__ import annotations

from typing import Any

from podar.schemas.config import PruningConfig
from podar.schemas.records import StageResult, structure_result

__all__ = ["model_card"]


def _what(cfg: PruningConfig, structure: StageResult | None) -> list[str]:
    s = cfg.structure
    if s.enabled:
        m = structure.metrics if structure is not None else {}
        lines = ["Structured pruning (the same dimensions in every layer; an ordinary model of its family):"]
        if s.depth:
            blocks = str(m.get("blocks_kept", ""))
            lines.append(f"- blocks: {m.get('num_hidden_layers', '?')} kept (dense indices {blocks}), ranked by "
                         f"block influence ({s.depth_mode})")
        if s.mlp:
            lines.append(f"- MLP intermediate channels: {m.get('intermediate_size', '?')} kept per layer, ranked by "
                         "activation norms")
        if s.heads:
            lines.append(f"- attention heads: {m.get('num_attention_heads', '?')} query and "
                         f"{m.get('num_key_value_heads', '?')} key/value heads kept per layer ({s.heads_unit})")
        if s.hidden:
            lines.append(f"- hidden (embedding) channels: {m.get('hidden_size', '?')} kept, the same in the embedding, "
                         "every layer and the head, ranked by the norms' output norms")
        if s.bias_compensation:
            lines.append("- the mean output of the removed channels and heads on the calibration text added to the "
                         "bias of the layer they fed (FLAP's bias compensation)")
        if "parameters_before" in m:
            lines.append(f"- parameters: {int(m['parameters_before']):,} → {int(m['parameters_after']):,} "
                         f"({100 * float(m['parameters_removed_frac']):.1f}% removed)")
        if cfg.target_sparsity > 0:
            lines += ["", "Then, on what remains:", "", *_masks(cfg)]
        return lines
    return _masks(cfg)


def _masks(cfg: PruningConfig) -> list[str]:
    shared = (f", shared among the blocks by OWL (M={cfg.allocation.owl_m:g}, λ={cfg.allocation.owl_lambda:g})"
              if cfg.allocation.kind == "owl" else "")
    refit = (", the masks refined by DSnoT's swaps" if cfg.dsnot.enabled else "") + (
        ", the kept weights then refit by least squares on the calibration inputs" if cfg.reconstruction.enabled
        else "")
    return [f"Masked pruning: {cfg.method.name}, {cfg.target_sparsity:.0%} of the pruned layers' weights zero{shared}, "
            f"pattern {cfg.pattern.label()}{refit} (the weights are stored dense unless the export format says "
            "otherwise)."]


def _texts(cfg: PruningConfig) -> str:
    """The fine-tuning texts, with their shares of the windows when there are several."""
    sources = cfg.finetune.sources()
    if len(sources) == 1:
        return sources[0][1]
    return ", ".join(f"{name} ({share:.0%})" for _, name, share in sources)


def model_card(cfg: PruningConfig, results: list[StageResult], *, fingerprint: str, version: str,
               export: dict[str, Any]) -> str:
    """The card's Markdown text, from the run's config and its stage results so far (nothing of the run's identity
    or of switches that change no weight: two runs that prune alike write the same card)."""
    structure = structure_result(results)
    tuned = [r for r in results if r.stage == "fine_tuning" and not r.metrics.get("skipped")]
    evaluating = next((r for r in reversed(results) if r.stage == "evaluating"), None)
    base = {"memory": "a model passed in memory", "tiny": f"a tiny random {cfg.model.tiny.arch} model"}.get(
        cfg.model.kind, cfg.model.name)
    front = [f"base_model: {base}"] if cfg.model.kind in ("hf", "builtin") else []
    lines = ["---", *front, "library_name: transformers", "tags:", "- podar", "- pruned",
             *(["- structured-pruning"] if cfg.structure.enabled else []),
             *(["- sparse"] if not cfg.structure.enabled or cfg.target_sparsity > 0 else []), "---", "",
             f"# {base}, pruned by podar", "", *_what(cfg, structure), ""]
    if tuned:
        steps = sum(int(r.metrics.get("steps", 0)) for r in tuned)
        ft = cfg.finetune
        lines += [f"Fine-tuned {steps} steps after pruning: loss {ft.loss} (the dense model as teacher where KD), "
                  f"peak learning rate {ft.learning_rate:g}, {ft.lr_schedule} schedule, {ft.sequence_length}-token "
                  f"windows of {_texts(cfg)}.", ""]
    if evaluating is not None and evaluating.texts:
        lines += ["Measured by podar's Evaluating stage against the dense model on the same windows:", "",
                  "| text | windows × tokens | dense perplexity | pruned perplexity | KL (nats/token) |",
                  "| --- | --- | --- | --- | --- |"]
        for t in evaluating.texts:
            def f(x: float | None) -> str:
                return "—" if x is None else f"{x:.4g}"
            lines.append(f"| {t.dataset} | {t.windows} × {t.seq_len} | {f(t.dense_ppl)} | {f(t.pruned_ppl)} "
                         f"| {f(t.kl_mean)} |")
        lines.append("")
    if evaluating is not None and evaluating.tasks:
        lines += ["Tasks (lm-evaluation-harness, in podar's Evaluating stage; `podar_lastword` is podar's own "
                  "offline check, not a standard benchmark):", "",
                  "| task | metric | examples | dense | pruned |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {k.task} | {k.metric} | {k.examples} | {k.dense:.4f} | {k.pruned:.4f} |"
                  for k in evaluating.tasks]
        lines.append("")
    lines += [f"Export: {export.get('format')}, {export.get('dtype')}, quantization {export.get('quantization')}.",
              "", f"podar {version}; the dense weights' fingerprint `{fingerprint[:16]}…`. The run folder's config and "
              "audit log record every step.", ""]
    return "\n".join(lines)
