"""The ``podar`` command: run, status, audit, graph, schema. The only place podar configures structlog."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import structlog

__all__ = ["main", "configure_logging"]

INDICATOR = {"done": "✅", "current": "🟢", "not_reached": "⚪", "failed": "❌"}


def configure_logging(json_lines: bool = False, level: str = "info") -> None:
    """Readable console logs (or JSON lines) on stderr. Called by the CLI, never on import."""
    renderer = structlog.processors.JSONRenderer() if json_lines else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def _cmd_run(args: argparse.Namespace) -> int:
    from podar import Pipeline

    configure_logging(args.log_json)
    pipeline = Pipeline(args.config, run_dir=args.run_dir, progress=not args.no_progress)
    return _drive(pipeline)


def _cmd_resume(args: argparse.Namespace) -> int:
    from podar import Pipeline

    configure_logging(args.log_json)
    pipeline = Pipeline.resume(args.run_dir, config=args.config, allow_config_change=args.allow_config_change,
                               allow_model_change=args.allow_model_change, allow_data_change=args.allow_data_change,
                               progress=not args.no_progress)
    return _drive(pipeline)


def _drive(pipeline) -> int:
    started = time.perf_counter()
    try:
        result = pipeline.run()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    elapsed = time.perf_counter() - started
    ev = result.metrics.get("evaluating", {})
    print(f"run {result.run_id}: {result.stage.display} in {elapsed:.1f} s — folder {result.run_dir}")
    if "dense_ppl" in ev:
        print(f"perplexity ({ev['dataset']}, {ev['windows']} windows × {ev['seq_len']} tokens): "
              f"dense {ev['dense_ppl']:.2f} → pruned {ev['pruned_ppl']:.2f} ({ev['ppl_increase_pct']:+.1f}%); "
              f"KL {ev['kl_mean']:.4f} nats/token, top-1 agreement {ev['top1_agreement']:.4f}")
    pr = result.metrics.get("pruning", {})
    if pr:
        print(f"sparsity: target {pr['target_sparsity']:.3f}, achieved {pr['achieved_sparsity']:.4f} "
              f"over {pr['layers_pruned']} layers ({pr['pattern']}, {pr['scope']})")
    ex = result.metrics.get("exporting", {})
    if ex:
        quant = "" if ex.get("quantization", "none") == "none" else f" + {ex['quantization']}"
        print(f"export: {ex['path']} ({ex['format']}{quant}, {ex['dtype']}, {ex['bytes'] / 1e6:.1f} MB on disk; "
              f"pruned layers {ex['pruned_layers_bytes'] / 1e6:.1f} MB = {ex['pruned_layers_ratio_vs_fp16']:.3f}× "
              "their dense float16 size)")
    if result.failure is not None:
        f = result.failure
        print(f"FAILED in {f.stage}: {f.type}: {f.message}" + (f" [layer {f.layer}]" if f.layer else ""),
              file=sys.stderr)
        return 130 if f.reason == "interrupted" else 1
    return 0


def stage_rows(manifest) -> list[tuple[str, str, str]]:
    """(indicator, display name, note) per stage, from a manifest."""
    from podar.engine.machine import PruningStage

    left = {h.source for h in manifest.history}
    current = manifest.state
    from podar.schemas.methods import parse_method

    needs_calibration = parse_method(manifest.config.get("method", "magnitude")).needs_calibration
    rows = []
    for stage in PruningStage:
        if stage in (PruningStage.FAILED,) and current != stage.value:
            continue
        note = ""
        if stage.value == current:
            if stage is PruningStage.FAILED:
                ind = INDICATOR["failed"]
                if manifest.failure:
                    note = f"{manifest.failure.type} in {manifest.failure.stage}: {manifest.failure.message}"
            elif stage is PruningStage.COMPLETE:
                ind = INDICATOR["done"]
            else:
                ind = INDICATOR["current"]
        elif stage.value in left:
            ind = INDICATOR["done"]
        else:
            ind = INDICATOR["not_reached"]
            if stage is PruningStage.CALIBRATING and not needs_calibration:
                note = "skipped (the method needs no calibration)"
        rows.append((ind, stage.display, note))
    return rows


def _cmd_status(args: argparse.Namespace) -> int:
    from podar.engine.audit import records_after, tail_problem
    from podar.engine.store import RunStore
    from podar.schemas.errors import AuditError
    from podar.schemas.records import HistoryEntry

    store = RunStore(args.run_dir)
    manifest = store.read_manifest()
    written_state = manifest.state
    try:  # a stage at work is in the audit log only until its checkpoint: show it as current
        tail = records_after(store.audit_path, manifest.run_id, manifest.audit_head_sha256)
        problem = tail_problem(manifest, tail)
    except (AuditError, OSError, ValueError) as e:
        tail, problem = [], str(e)
    if problem is not None:
        print(f"warning: the audit log does not match the manifest ({problem}); run `podar audit`", file=sys.stderr)
    else:
        for r in tail:
            if r.get("event") == "transition":
                manifest.history.append(HistoryEntry(seq=r["seq"], trigger=r["trigger"], source=r["source"],
                                                     dest=r["dest"], at=r["at"], interrupted=True))
            manifest.state = r["dest"]
    print(f"run {manifest.run_id} — state {manifest.state} — updated {manifest.updated_at}"
          + (f" (audit log; last checkpoint at {written_state})" if manifest.state != written_state else ""))
    for ind, name, note in stage_rows(manifest):
        print(f"  {ind} {name}" + (f"  ({note})" if note else ""))
    for r in manifest.results:
        if r.stage == "evaluating" and "dense_ppl" in r.metrics:
            print(f"  perplexity: dense {r.metrics['dense_ppl']:.2f} → pruned {r.metrics['pruned_ppl']:.2f}")
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    from podar.engine.audit import verify_audit
    from podar.engine.machine import PruningStage
    from podar.engine.store import RunStore
    from podar.schemas.errors import PodarError

    store = RunStore(args.run_dir)
    try:
        manifest = store.read_manifest()
        summary = verify_audit(store.audit_path, manifest.run_id, manifest.history)
    except PodarError as e:
        print(f"audit FAILED: {e}", file=sys.stderr)
        return 2
    print(f"audit OK: run {summary.run_id}, {summary.records} records, chain intact, every move legal")
    for source, duration in summary.stages:
        d = "" if duration is None else f"{duration:9.2f} s"
        print(f"  {PruningStage(source).display:<22}{d}")
    print(f"outcome: {PruningStage(summary.final_state).display}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from podar.engine.report import write_report

    report = write_report(args.run_dir)
    print(f"wrote {args.run_dir / 'report.json'}, {args.run_dir / 'report.md'} and {len(report.plots)} plot(s)")
    print((args.run_dir / "report.md").read_text())
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from podar.engine.report import compare_runs

    print(compare_runs(args.run_dirs))
    return 0


def _cmd_graph(_args: argparse.Namespace) -> int:
    from podar.engine.machine import mermaid

    print(mermaid())
    return 0


def _cmd_schema(_args: argparse.Namespace) -> int:
    from podar.schemas.config import PruningConfig

    print(json.dumps(PruningConfig.json_schema(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="podar", description="Prune neural networks through a state machine.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run a pruning config to Complete or Failed")
    p.add_argument("config", type=Path, help="YAML or JSON PruningConfig")
    p.add_argument("--run-dir", type=Path, default=None, help="run folder (default runs/<run id>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--log-json", action="store_true", help="JSON log lines instead of the console rendering")
    p.set_defaults(func=_cmd_run)
    p = sub.add_parser("resume", help="continue a failed or interrupted run from its last checkpoint")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--config", type=Path, default=None, help="a config to use instead of the run's own")
    p.add_argument("--allow-config-change", action="store_true", help="accept a config that differs from the run's")
    p.add_argument("--allow-model-change", action="store_true", help="accept a model whose weights hash differs")
    p.add_argument("--allow-data-change", action="store_true", help="accept texts whose sha256 differs")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--log-json", action="store_true")
    p.set_defaults(func=_cmd_resume)
    p = sub.add_parser("status", help="where a run stands")
    p.add_argument("run_dir", type=Path)
    p.set_defaults(func=_cmd_status)
    p = sub.add_parser("audit", help="verify a run's audit log (hash chain, legal moves, manifest)")
    p.add_argument("run_dir", type=Path)
    p.set_defaults(func=_cmd_audit)
    p = sub.add_parser("report", help="rebuild report.json, report.md and the plots from a run folder")
    p.add_argument("run_dir", type=Path)
    p.set_defaults(func=_cmd_report)
    p = sub.add_parser("compare", help="several runs side by side")
    p.add_argument("run_dirs", type=Path, nargs="+")
    p.set_defaults(func=_cmd_compare)
    p = sub.add_parser("graph", help="print the state machine as a mermaid diagram")
    p.set_defaults(func=_cmd_graph)
    p = sub.add_parser("schema", help="print the JSON Schema of PruningConfig")
    p.set_defaults(func=_cmd_schema)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from podar.schemas.errors import PodarError

    try:
        return args.func(args)
    except PodarError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
