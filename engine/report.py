"""The run report: ``report.json`` (schema ``RunReport``), ``report.md`` and PNG plots, built from the run folder
alone (manifest and artifacts), so ``podar report RUN_DIR`` can rebuild it at any time."""

from __future__ import annotations

from pathlib import Path

from podar.schemas.config import PruningConfig
from podar.schemas.records import RunManifest, StageResult, structure_result
from podar.schemas.report import LayerReport, RunReport
from podar.schemas.schedule import OneShot

from .machine import PruningStage
from .store import RunStore, atomic_write_bytes

__all__ = ["build_report", "write_report", "report_files", "compare_runs", "pruning_summary"]

PRUNING_STAGES = (PruningStage.CALIBRATING.value, PruningStage.COMPUTING_IMPORTANCE.value, PruningStage.PRUNING.value)


def _layers(m: RunManifest) -> list[LayerReport]:
    """The last pruning result of every layer (a gradual schedule prunes a layer once per round)."""
    layers: dict[str, LayerReport] = {}
    for r in m.results:
        if r.stage == PruningStage.PRUNING.value:
            for name, lm in r.layer_metrics.items():
                layers[name] = LayerReport(name=name, sparsity=float(lm.get("sparsity") or 0.0),
                                           reconstruction_error=lm.get("reconstruction_error"),
                                           round=r.progress.round_index, group=r.progress.group_index)
    return list(layers.values())


def build_report(run_dir: str | Path) -> RunReport:
    """The report of a run, from its manifest's records alone (stage results and artifacts)."""
    store = RunStore(run_dir)
    m = store.read_manifest()
    cfg = PruningConfig.from_dict(m.config, source=str(store.manifest_path))
    durations: dict[str, float] = {}
    for r in m.results:
        durations[r.stage] = durations.get(r.stage, 0.0) + r.duration_s
    by_stage = {r.stage: r for r in m.results}  # the last result of each stage
    exported = by_stage.get(PruningStage.EXPORTING.value)
    export_bytes = None if exported is None else sum(m.artifacts[a].bytes for a in exported.artifacts
                                                     if a in m.artifacts)
    evaluated = by_stage.get(PruningStage.EVALUATING.value)
    tuned = [r for r in m.results if r.stage == PruningStage.FINE_TUNING.value]
    losses = [x for r in tuned for x in r.series.get("loss", [])]
    validation = [(int(s), loss, kl) for r in tuned for s, loss, kl in
                  zip(r.series.get("val_step", []), r.series.get("val_loss", []), r.series.get("val_kl", []),
                      strict=True)]
    layers = _layers(m)
    pruned = structure_result(m.results)
    structure = None
    if pruned is not None:
        structure = {k: v for k, v in pruned.metrics.items() if k not in ("pattern", "round", "group")}
    points: list[tuple[int, float]] = []
    if not isinstance(cfg.schedule, OneShot):
        points = [(s, cfg.schedule.sparsity_at_step(s)) for s in cfg.schedule.pruning_steps()]
    return RunReport(
        run_id=m.run_id, state=m.state, created_at=m.created_at, updated_at=m.updated_at, method=cfg.method.name,
        pattern=cfg.pattern.label(), target_sparsity=cfg.target_sparsity, scope=cfg.resolved_scope(),
        schedule=cfg.schedule.kind, model=f"{cfg.model.kind}:{cfg.model.name}", failure=m.failure,
        achieved_sparsity=_achieved(m), layers=layers, texts=[] if evaluated is None else list(evaluated.texts),
        tasks=[] if evaluated is None else list(evaluated.tasks),
        stage_durations_s=durations, pruning_time_s=sum(durations.get(s, 0.0) for s in PRUNING_STAGES),
        total_time_s=sum(durations.values()), schedule_points=points, finetune_losses=losses,
        finetune_validation=validation, structure=structure,
        export_format=cfg.export.format if export_bytes is not None else None, export_bytes=export_bytes,
    )


def pruning_summary(results: list[StageResult]) -> tuple[int, float | None]:
    """(pruned layers, zeros / weights over all of them) from each layer's last pruning result — the whole run's,
    over every layer group and round."""
    last: dict[str, dict] = {}
    for r in results:
        if r.stage == PruningStage.PRUNING.value:
            last.update(r.layer_metrics)
    numel = sum(int(lm.get("numel") or 0) for lm in last.values())
    if not numel:
        return len(last), None
    return len(last), sum(float(lm.get("sparsity") or 0.0) * int(lm.get("numel") or 0) for lm in last.values()) / numel


def _achieved(m: RunManifest) -> float | None:
    return pruning_summary(m.results)[1]


def _layer_bars(report: RunReport, save) -> None:
    """Per-layer sparsity and reconstruction error, colored by the kind of layer (q_proj, up_proj, ...)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    names = [lay.name.replace("model.layers.", "L").replace("self_attn.", "").replace("mlp.", "")
             for lay in report.layers]
    kinds = [lay.name.rsplit(".", 1)[-1] for lay in report.layers]
    palette = ["#4477aa", "#ee6677", "#228833", "#ccbb44", "#66ccee", "#aa3377", "#bbbbbb"]
    kind_color = {k: palette[i % len(palette)] for i, k in enumerate(dict.fromkeys(kinds))}
    colors = [kind_color[k] for k in kinds]

    def bars(values: list[float], title: str, ylabel: str, xlabel: str):
        fig = Figure(figsize=(max(6, len(names) * 0.08), 3.4))
        ax = fig.add_subplot()
        ax.bar(range(len(names)), values, color=colors)
        ax.legend(handles=[Patch(color=c, label=k) for k, c in kind_color.items()], fontsize=7,
                  ncol=min(len(kind_color), 7), loc="upper center", bbox_to_anchor=(0.5, -0.28), frameon=False)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.set_xlabel(xlabel)
        return fig, ax

    fig, ax = bars([lay.sparsity for lay in report.layers], "Per-layer sparsity", "sparsity",
                   f"pruned layer (model order, {len(names)} layers)")
    ax.axhline(report.target_sparsity, color="#cc3311", lw=1, ls="--", label="target")
    ax.set_ylim(0, 1)
    save(fig, "layer_sparsity.png")
    errs = [lay.reconstruction_error for lay in report.layers]
    if any(e is not None for e in errs):
        fig, ax = bars([e or 0.0 for e in errs], "Per-layer reconstruction error on calibration inputs",
                       "‖WX − ŴX‖² / ‖WX‖²", "pruned layer (model order)")
        ax.set_yscale("log")
        save(fig, "layer_reconstruction_error.png")


def _task_bars(report: RunReport, save) -> None:
    """Dense and pruned figure of every task side by side, with lm-eval's standard errors."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(4.0, 1.2 * len(report.tasks) + 2), 3))
    ax = fig.add_subplot()
    x = list(range(len(report.tasks)))
    for shift, who, color in ((-0.2, "dense", "#888888"), (0.2, "pruned", "#1f77b4")):
        values = [getattr(t, who) for t in report.tasks]
        errors = [getattr(t, f"{who}_stderr") or 0.0 for t in report.tasks]
        ax.bar([i + shift for i in x], values, width=0.4, yerr=errors, capsize=3, label=who, color=color)
    ax.set_xticks(x, [t.task for t in report.tasks], rotation=20, ha="right")
    ax.set_ylabel(report.tasks[0].metric)
    ax.set_title("Tasks (lm-evaluation-harness)")
    ax.legend()
    save(fig, "tasks.png")


def _plots(report: RunReport, folder: Path) -> list[str]:
    """Write the PNG plots (matplotlib's object API: no global pyplot state). Returns names relative to the run."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    folder.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig: Figure, name: str) -> None:
        FigureCanvasAgg(fig)
        fig.tight_layout()
        fig.savefig(folder / name, dpi=100)
        written.append(f"plots/{name}")

    if report.layers:
        _layer_bars(report, save)
    if report.tasks:
        _task_bars(report, save)
    if report.schedule_points:
        fig = Figure(figsize=(5, 3))
        ax = fig.add_subplot()
        steps, values = zip(*report.schedule_points, strict=True)
        ax.step(steps, values, where="post", marker="o")
        ax.set_xlabel("fine-tuning step")
        ax.set_ylabel("target sparsity")
        ax.set_title(f"Sparsity schedule ({report.schedule})")
        save(fig, "sparsity_schedule.png")
    if report.finetune_losses:
        fig = Figure(figsize=(5, 3))
        ax = fig.add_subplot()
        ax.plot(range(1, len(report.finetune_losses) + 1), report.finetune_losses, marker=".", label="training")
        if report.finetune_validation:
            steps, values, _kl = zip(*report.finetune_validation, strict=True)
            ax.plot(steps, values, marker="o", label="validation (next-token loss)")
            ax.legend()
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title("Fine-tuning")
        save(fig, "finetune_loss.png")
    return written


def _num(value: float | None, fmt: str = "{:.4f}") -> str:
    return "—" if value is None else fmt.format(value)


def _text_table(r: RunReport) -> list[str]:
    """One row per evaluation text: perplexity, KL and top-1 for a causal LM; hidden-state fidelity otherwise."""
    if all(t.dense_ppl is None for t in r.texts):
        rows = ["| text | windows × tokens | hidden cosine | hidden relative MSE | embedding cosine | gates |",
                "| --- | --- | --- | --- | --- | --- |"]
        for t in r.texts:
            gate = "passed" if t.gates_passed else f"FAILED ({t.on_fail})"
            rows.append(f"| {t.dataset} | {t.windows} × {t.seq_len} | {_num(t.hidden_cosine)} | "
                        f"{_num(t.hidden_rel_mse)} | {_num(t.embedding_cosine)} | {gate} |")
        return rows
    rows = ["| text | windows × tokens | dense ppl | pruned ppl | Δ ppl | KL (nats/token) | top-1 agreement | gates |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for t in r.texts:
        gate = "passed" if t.gates_passed else f"FAILED ({t.on_fail})"
        rows.append(f"| {t.dataset} | {t.windows} × {t.seq_len} | {_num(t.dense_ppl, '{:.2f}')} | "
                    f"{_num(t.pruned_ppl, '{:.2f}')} | {_num(t.ppl_increase_pct, '{:+.1f}%')} | {_num(t.kl_mean)} | "
                    f"{_num(t.top1_agreement)} | {gate} |")
    return rows


def _markdown(r: RunReport) -> str:
    masks = f"{r.method}, {r.pattern}, target sparsity {r.target_sparsity:g} ({r.scope}), schedule {r.schedule}"
    what = masks if r.structure is None else (
        "structured pruning" + (f", then {masks}" if r.target_sparsity > 0 else ""))
    lines = [f"# podar run {r.run_id}", "", f"**{PruningStage(r.state).display}** — {what}, model `{r.model}`.", ""]
    if r.structure is not None:
        s = r.structure
        new = ", ".join(f"{k} {s[k]}" for k in ("num_hidden_layers", "hidden_size", "intermediate_size",
                                                 "num_attention_heads", "num_key_value_heads") if k in s)
        lines += [f"Parameters {int(s['parameters_before']):,} → {int(s['parameters_after']):,} "
                  f"({100 * float(s['parameters_removed_frac']):.1f}% removed); blocks kept {s.get('blocks_kept')}; "
                  f"{new}.", ""]
    if r.failure:
        lines += [f"Failed in {r.failure.stage}: {r.failure.type}: {r.failure.message}", ""]
    if r.achieved_sparsity is not None and (r.structure is None or r.target_sparsity > 0):
        lines += [f"Achieved sparsity over {len(r.layers)} pruned layers: {r.achieved_sparsity:.4f}.", ""]
    if r.texts:
        lines += _text_table(r) + [""]
        for t in r.texts:
            lines += [f"- gate: {f}" for f in t.gate_failures]
    if r.tasks:
        lines += ["| task | metric | examples | dense | pruned | drop (points) | gates |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for k in r.tasks:
            gate = "passed" if not k.gate_failures else f"FAILED ({k.on_fail})"
            lines.append(f"| {k.task} | {k.metric} | {k.examples} | {_num(k.dense)} ± {_num(k.dense_stderr)} "
                         f"| {_num(k.pruned)} ± {_num(k.pruned_stderr)} | {k.drop_points:+.2f} | {gate} |")
        lines += [""] + [f"- gate: {f}" for k in r.tasks for f in k.gate_failures]
    if r.finetune_validation:
        best = min(r.finetune_validation, key=lambda v: v[1])
        lines += [f"Fine-tuning: {len(r.finetune_losses)} steps, training loss {r.finetune_losses[0]:.4f} → "
                  f"{r.finetune_losses[-1]:.4f}; validation loss {r.finetune_validation[0][1]:.4f} → "
                  f"{r.finetune_validation[-1][1]:.4f} (best {best[1]:.4f} at step {best[0]}, KL to the dense model "
                  f"{best[2]:.4f}).", ""]
    lines += ["| stage | time (s) |", "| --- | --- |"]
    lines += [f"| {PruningStage(s).display_name()} | {d:.2f} |" for s, d in r.stage_durations_s.items()]
    lines += [f"| pruning (calibrating + importance + pruning) | {r.pruning_time_s:.2f} |", ""]
    if r.export_bytes is not None:
        lines += [f"Export: format `{r.export_format}`, {r.export_bytes / 1e6:.1f} MB.", ""]
    lines += [f"![{p}]({p})" for p in r.plots]
    worst = sorted((lay for lay in r.layers if lay.reconstruction_error is not None),
                   key=lambda lay: -(lay.reconstruction_error or 0.0))[:10]
    if worst:
        lines += ["", "Largest reconstruction errors:", "", "| layer | sparsity | error |", "| --- | --- | --- |"]
        lines += [f"| {lay.name} | {lay.sparsity:.4f} | {lay.reconstruction_error:.4g} |" for lay in worst]
    return "\n".join(lines) + "\n"


def write_report(run_dir: str | Path) -> RunReport:
    """Build the report from the run folder and write report.json, report.md and plots/*.png."""
    run_dir = Path(run_dir)
    report = build_report(run_dir)
    report.plots = _plots(report, run_dir / "plots")
    for name, text in report_files(report).items():
        atomic_write_bytes(run_dir / name, text.encode(), fault_point="write:report")
    return report


def report_files(report: RunReport) -> dict[str, str]:
    """The text of report.json and report.md (what ``write_report`` writes and ``podar audit`` compares)."""
    return {"report.json": report.model_dump_json(indent=2), "report.md": _markdown(report)}


def compare_runs(run_dirs: list[str | Path]) -> str:
    """Several runs side by side (method, pattern, sparsity, perplexity, KL, time) as a markdown table, and their
    task figures (pruned, the change in points, dense) when any run evaluated tasks."""
    rows = ["| run | state | method | pattern | sparsity | evaluation text | dense ppl | pruned ppl | KL | top-1 | "
            "pruning s | total s |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    texts = set()
    reports = [build_report(d) for d in run_dirs]
    for d, r in zip(run_dirs, reports, strict=True):
        t = r.texts[0] if r.texts else None
        text = "—" if t is None else f"{Path(t.dataset).name} ({t.windows} × {t.seq_len})"
        if t is not None:
            texts.add((t.dataset, t.windows, t.seq_len))

        def fmt(v, f="{:.2f}"):
            return "—" if v is None else f.format(v)

        rows.append(f"| {Path(d).name} | {r.state} | {r.method} | {r.pattern} | {fmt(r.achieved_sparsity, '{:.4f}')} "
                    f"| {text} | {fmt(t and t.dense_ppl)} | {fmt(t and t.pruned_ppl)} "
                    f"| {fmt(t and t.kl_mean, '{:.4f}')} "
                    f"| {fmt(t and t.top1_agreement, '{:.4f}')} | {r.pruning_time_s:.1f} | {r.total_time_s:.1f} |")
    if len(texts) > 1:
        rows += ["", f"Note: these runs were evaluated on {len(texts)} different texts or window counts; their "
                     "perplexities are not comparable."]
    names = list(dict.fromkeys(k.task for r in reports for k in r.tasks))
    if names:  # one column per task: pruned figure (drop in points)
        rows += ["", "| run | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
        for d, r in zip(run_dirs, reports, strict=True):
            by = {k.task: k for k in r.tasks}
            cells = [f"{by[n].pruned:.4f} ({-by[n].drop_points:+.2f}; dense {by[n].dense:.4f})" if n in by else "—"
                     for n in names]
            rows.append(f"| {Path(d).name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
