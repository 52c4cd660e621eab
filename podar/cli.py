"""The ``podar`` command. The only place podar configures structlog or installs a signal handler."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import structlog

__all__ = ["main", "configure_logging", "EXIT"]

INDICATOR = {"done": "✅", "current": "🟢", "not_reached": "⚪", "failed": "❌"}

# exit codes: what a script calling podar can tell apart
EXIT = {
    "ok": 0,  # the command did what it was asked: a run ended Complete, an audit verified a run at rest
    "failed": 1,  # a run ended Failed (a stage error or a quality gate); resumable
    "usage": 2,  # the command line is wrong (argparse's own code)
    "error": 3,  # podar refused before or outside a run: a bad config, data, model or run folder
    "audit_failed": 4,  # podar audit: the run folder does not verify (edited, forged or incomplete)
    "in_progress": 5,  # podar audit: verified up to its last checkpoint; the run is at work, or was killed
    "interrupted": 130,  # Ctrl-C (the run ended Failed, reason interrupted; resumable)
    "terminated": 143,  # SIGTERM (the run ended Failed, reason terminated; resumable)
    "broken_pipe": 141,  # stdout was closed early (podar status RUN | head)
}

EPILOG = """exit codes:
  0    done: the run ended Complete, the audit verified a run at rest
  1    the run ended Failed (a stage error or a quality gate); `podar resume` continues it
  2    usage error (the command line)
  3    podar refused: a bad config, data, model or run folder (the message names it)
  4    podar audit: the run folder does not verify
  5    podar audit: verified up to the last checkpoint; the run is at work or was killed there
  130  interrupted (Ctrl-C): the run is Failed (reason interrupted) and resumable
  143  terminated (SIGTERM): the run is Failed (reason terminated) and resumable
"""


def configure_logging(json_lines: bool = False, level: str = "info") -> None:
    """Readable console logs (or JSON lines) on stderr. Called by the CLI, never on import."""
    renderer = structlog.processors.JSONRenderer() if json_lines else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.processors.TimeStamper(fmt="iso", utc=True),
                    renderer],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def _on_sigterm(_signum: int, _frame: Any) -> None:
    from podar.engine.context import Terminated

    raise Terminated


def _parse_value(text: str) -> Any:
    """A --set value as YAML reads it (numbers, booleans, null, lists); anything else stays a string."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config changes of the command line: --set PATH=VALUE, then the shortcuts (--model, --method, ...)."""
    out: dict[str, Any] = {}
    for item in args.set or []:
        path, sep, value = item.partition("=")
        if not sep or not path.strip():
            raise SystemExit(_usage(f"--set needs PATH=VALUE (e.g. calibration.num_samples=32), got {item!r}"))
        if not value.strip():
            raise SystemExit(_usage(f"--set {item!r}: '{path.strip()}' has no value; give one (a YAML value; "
                                    "write null to unset a field that may be unset)"))
        out[path.strip()] = _parse_value(value)
    if getattr(args, "model", None):
        out["model.kind"] = "gguf" if args.model.endswith(".gguf") else "hf"
        out["model.name"] = args.model
    if getattr(args, "method", None):
        out["method"] = args.method
    if getattr(args, "pattern", None):
        out.update(_pattern_overrides(args.pattern))
    if getattr(args, "sparsity", None) is not None:
        out["target_sparsity"] = args.sparsity
    return out


def _pattern_overrides(text: str) -> dict[str, Any]:
    if ":" in text:
        n, _, m = text.partition(":")
        if not (n.isdigit() and m.isdigit()):
            raise SystemExit(_usage(f"--pattern N:M needs two integers (e.g. 2:4), got {text!r}"))
        return {"pattern.kind": "nm", "pattern.n": int(n), "pattern.m": int(m)}
    return {"pattern.kind": text}


def _usage(message: str) -> int:
    print(f"podar: error: {message}", file=sys.stderr)
    return EXIT["usage"]


def _config(args: argparse.Namespace):
    from podar import PruningConfig

    if args.config is None and getattr(args, "model", None) and not getattr(args, "method", None) and not any(
            item.partition("=")[0].strip().split(".")[0] == "method" for item in args.set or []):
        raise SystemExit(_usage("--model without a config needs --method (magnitude, wanda, ria or sparsegpt): podar "
                                "does not choose one for you"))
    base = PruningConfig.from_file(args.config) if args.config is not None else PruningConfig()
    overrides = _overrides(args)
    if not overrides:
        return base
    return base.with_overrides(overrides, source="the command line").with_resolved_paths([Path.cwd()])


def _cmd_run(args: argparse.Namespace) -> int:
    from podar import Pipeline

    configure_logging(args.log_json)
    _quiet_progress(args.no_progress)
    return _drive(Pipeline(_config(args), run_dir=args.run_dir, progress=not args.no_progress))


def _cmd_resume(args: argparse.Namespace) -> int:
    from podar import Pipeline

    configure_logging(args.log_json)
    _quiet_progress(args.no_progress)
    pipeline = Pipeline.resume(args.run_dir, config=args.config, overrides=_overrides(args),
                               allow_config_change=args.allow_config_change,
                               allow_model_change=args.allow_model_change, allow_data_change=args.allow_data_change,
                               allow_world_change=args.allow_world_change, progress=not args.no_progress)
    return _drive(pipeline)


def _summary(result: Any, elapsed: float) -> list[str]:
    lines = [f"run {result.run_id}: {result.stage.display_name()} in {elapsed:.1f} s — folder {result.run_dir}"]
    ev = result.metrics.get("evaluating", {})
    if "dense_ppl" in ev:
        lines.append(f"perplexity ({ev['dataset']}, {ev['windows']} windows × {ev['seq_len']} tokens): dense "
                     f"{ev['dense_ppl']:.2f} → pruned {ev['pruned_ppl']:.2f} ({ev['ppl_increase_pct']:+.1f}%); KL "
                     f"{ev['kl_mean']:.4f} nats/token, top-1 agreement {ev['top1_agreement']:.4f}")
    if "hidden_cosine" in ev:
        lines.append(f"fidelity ({ev['dataset']}, {ev['windows']} windows × {ev['seq_len']} tokens): hidden-state "
                     f"cosine {ev['hidden_cosine']:.4f}, relative MSE {ev['hidden_rel_mse']:.4f}, embedding cosine "
                     f"{ev['embedding_cosine']:.4f}")
    evaluated = next((r for r in reversed(result.results) if r.stage == "evaluating"), None)
    for k in evaluated.tasks if evaluated is not None else []:  # lm-evaluation-harness: dense and pruned
        lines.append(f"task {k.task}: {k.metric} dense {k.dense:.4f} → pruned {k.pruned:.4f} "
                     f"({-k.drop_points:+.2f} points)")
    pr = result.metrics.get("pruning", {})
    if pr and result.achieved_sparsity is not None:
        lines.append(f"sparsity: target {pr['target_sparsity']:.3f}, achieved {result.achieved_sparsity:.4f} over "
                     f"{result.pruned_layers} layers ({pr['pattern']}, {pr['scope']})")
    ex = result.metrics.get("exporting", {})
    if ex:
        quant = "" if ex.get("quantization", "none") == "none" else f" + {ex['quantization']}"
        lines.append(f"export: {ex['path']} ({ex['format']}{quant}, {ex['dtype']}, {ex['bytes'] / 1e6:.1f} MB on "
                     f"disk; pruned layers {ex['pruned_layers_bytes'] / 1e6:.1f} MB = "
                     f"{ex['pruned_layers_ratio_vs_fp16']:.3f}× their dense float16 size)")
    lines.append(f"audit head sha256: {result.audit_head_sha256} (check later: podar audit {result.run_dir} "
                 f"--expect-head {result.audit_head_sha256})")
    return lines


def _quiet_progress(no_progress: bool) -> None:
    """transformers' own progress bars (loading weights) follow podar's: off with --no-progress or off a terminal."""
    if no_progress or not sys.stderr.isatty():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _drive(pipeline: Any) -> int:
    started = time.perf_counter()
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        result = pipeline.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if result.main_process:  # the other processes of a multi-process run print nothing
        for line in _summary(result, time.perf_counter() - started):
            print(line)
    if result.failure is None:
        return EXIT["ok"]
    f = result.failure
    if result.main_process:
        print(f"FAILED in {f.stage}: {f.type}: {f.message}" + (f" [layer {f.layer}]" if f.layer else ""),
              file=sys.stderr)
    return {"interrupted": EXIT["interrupted"], "terminated": EXIT["terminated"]}.get(f.reason, EXIT["failed"])


def stage_rows(manifest: Any) -> list[tuple[str, str, str]]:
    """(indicator, display name, note) per stage, from a manifest."""
    from podar.engine.machine import PruningStage
    from podar.schemas.config import PruningConfig

    needs_calibration = PruningConfig.from_dict(manifest.config, source="the run's manifest").needs_calibration
    left = {h.source for h in manifest.history}
    current = manifest.state
    failed_in = next((h.source for h in reversed(manifest.history) if h.dest == PruningStage.FAILED.value), None) \
        if current == PruningStage.FAILED.value else None
    rows = []
    for stage in PruningStage:
        if stage is PruningStage.FAILED and current != stage.value:
            continue
        note, ind = "", INDICATOR["not_reached"]
        if stage.value == failed_in:
            gate = manifest.failure is not None and manifest.failure.reason == "quality_gate"
            ind, note = INDICATOR["failed"], "a quality gate failed" if gate else "failed here"
        elif stage.value == current:
            ind = {PruningStage.FAILED: INDICATOR["failed"], PruningStage.COMPLETE: INDICATOR["done"]}.get(
                stage, INDICATOR["current"])
            if stage is PruningStage.FAILED and manifest.failure:
                note = f"{manifest.failure.type} in {manifest.failure.stage}: {manifest.failure.message}"
        elif stage.value in left:
            ind = INDICATOR["done"]
        elif stage is PruningStage.CALIBRATING and not needs_calibration:
            note = "skipped (the method needs no calibration)"
        rows.append((ind, stage.display_name(), note))
    return rows


def _with_tail(store: Any, manifest: Any) -> Any:
    """The manifest with the moves the audit log holds beyond it, when they are what a live or killed run leaves
    (a stage at work is in the log only until its checkpoint); a warning on stderr otherwise."""
    from podar.engine.audit import records_after, tail_problem
    from podar.schemas.errors import AuditError
    from podar.schemas.records import HistoryEntry

    try:
        tail = records_after(store.audit_path, manifest.run_id, manifest.audit_head_sha256)
        problem = tail_problem(manifest, tail)
    except (AuditError, OSError, ValueError) as e:
        tail, problem = [], str(e)
    if problem is not None:
        print(f"warning: the audit log does not match the manifest ({problem}); run `podar audit`", file=sys.stderr)
        return manifest
    for r in tail:
        if r.get("event") == "transition":
            manifest.history.append(HistoryEntry(seq=r["seq"], trigger=r["trigger"], source=r["source"],
                                                 dest=r["dest"], at=r["at"], interrupted=True))
        manifest.state = r["dest"]
    return manifest


def _planned_cost(store: Any) -> str | None:
    """The run's planned work and estimated time, as its first audit record carries them."""
    from podar.engine.audit import read_audit
    from podar.schemas.errors import AuditError

    try:
        first = next((r for r in read_audit(store.audit_path) if r.get("trigger") == "start"), None)
    except (AuditError, OSError):
        return None
    m = (first or {}).get("metrics") or {}
    if "evaluation_tokens" not in m:
        return None
    text = (f"{m['calibration_tokens']:,} calibration tokens ({m['calibration_block_forwards']:,} block forwards), "
            f"{m['evaluation_tokens']:,} evaluation tokens"
            + (f" and {m['task_tokens']:,} task tokens" if "task_tokens" in m else ""))
    if "est_calibration_s" in m:
        text += (f"; estimated calibration {m['est_calibration_s']:.0f} s, evaluation {m['est_evaluation_s']:.0f} s "
                 f"(from block 0: {m['block0_ms']:.1f} ms for {m['block0_tokens']} tokens; solvers, fine-tuning and "
                 "the export not included)")
    return text + (f"; {m['note']}" if "note" in m else "")


def _cmd_status(args: argparse.Namespace) -> int:
    from podar.engine.store import RunStore

    store = RunStore(args.run_dir)
    manifest = store.read_manifest()
    written_state = manifest.state
    manifest = _with_tail(store, manifest)
    print(f"run {manifest.run_id} — state {manifest.state} — updated {manifest.updated_at}"
          + (f" (audit log; last checkpoint at {written_state})" if manifest.state != written_state else ""))
    for ind, name, note in stage_rows(manifest):
        print(f"  {ind} {name}" + (f"  ({note})" if note else ""))
    plan = _planned_cost(store)
    if plan:
        print(f"  plan: {plan}")
    for r in manifest.results:
        if r.stage == "evaluating" and "dense_ppl" in r.metrics:
            print(f"  perplexity: dense {r.metrics['dense_ppl']:.2f} → pruned {r.metrics['pruned_ppl']:.2f}")
    return EXIT["ok"]


def _cmd_audit(args: argparse.Namespace) -> int:
    from podar.engine.audit import audit_key
    from podar.engine.machine import PruningStage
    from podar.engine.verify import audit_run
    from podar.schemas.errors import AuditError

    try:
        report = audit_run(args.run_dir, key=audit_key(), expect_head=args.expect_head,
                           check_files=not args.skip_files)
    except AuditError as e:
        print(f"audit FAILED: {e}", file=sys.stderr)
        return EXIT["audit_failed"]
    head = "run in progress or interrupted" if report.verdict == "in_progress" else "audit OK"
    checks = "chain intact, every move legal, manifest matches the log" + (", MACs valid" if report.macs_checked
                                                                          else "")
    print(f"{head}: run {report.run_id}, {report.records} records, {checks}, {report.files_checked} files checked")
    for source, duration in report.stages:
        d = "" if duration is None else f"{duration:9.2f} s"
        print(f"  {PruningStage(source).display_name():<22}{d}")
    print(f"outcome: {PruningStage(report.state).display_name()}")
    print(f"head sha256: {report.head_sha256}")
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)
    return EXIT["ok"] if report.verdict == "ok" else EXIT["in_progress"]


def _cmd_report(args: argparse.Namespace) -> int:
    from podar.engine.report import write_report

    report = write_report(args.run_dir)
    print(f"wrote {args.run_dir / 'report.json'}, {args.run_dir / 'report.md'} and {len(report.plots)} plot(s)")
    print((args.run_dir / "report.md").read_text())
    return EXIT["ok"]


def _cmd_compare(args: argparse.Namespace) -> int:
    from podar.engine.report import compare_runs

    print(compare_runs(args.run_dirs))
    return EXIT["ok"]


def _cmd_graph(_args: argparse.Namespace) -> int:
    from podar.engine.machine import mermaid

    print(mermaid())
    return EXIT["ok"]


def _cmd_schema(_args: argparse.Namespace) -> int:
    from podar.schemas.config import PruningConfig

    print(json.dumps(PruningConfig.json_schema(), indent=2))
    return EXIT["ok"]


def _add_run(sub: Any) -> None:
    p = sub.add_parser("run", help="run a pruning config to Complete or Failed", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Run a config file, or the built-in defaults, with changes from the command line.")
    p.add_argument("config", type=Path, nargs="?", default=None, help="YAML or JSON PruningConfig (optional)")
    p.add_argument("--set", action="append", metavar="PATH=VALUE",
                   help="change one config field by dotted path, e.g. --set calibration.num_samples=32 (repeatable)")
    p.add_argument("--model", help="a Hugging Face id, a save_pretrained folder, or a .gguf file")
    p.add_argument("--method", help="pruning method: magnitude, wanda, ria, sparsegpt (or a registered plugin); "
                                    "required with --model when no config names one")
    p.add_argument("--sparsity", type=float, help="target sparsity, a fraction in [0, 1)")
    p.add_argument("--pattern", help="unstructured, N:M (e.g. 2:4), block, row or column")
    p.add_argument("--run-dir", type=Path, default=None, help="run folder (default runs/<run id>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (off anyway when not a terminal)")
    p.add_argument("--log-json", action="store_true", help="JSON log lines on stderr instead of the console form")
    p.set_defaults(func=_cmd_run)


def _add_resume(sub: Any) -> None:
    p = sub.add_parser("resume", help="continue a failed or interrupted run from its last checkpoint", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--config", type=Path, default=None, help="a config to use instead of the run's own")
    p.add_argument("--allow-config-change", action="store_true", help="accept a config that differs from the run's")
    p.add_argument("--allow-model-change", action="store_true", help="accept a model whose weights hash differs")
    p.add_argument("--allow-data-change", action="store_true", help="accept texts whose sha256 differs")
    p.add_argument("--allow-world-change", action="store_true",
                   help="accept another number of processes than the run ran on (recorded in the audit log)")
    p.add_argument("--set", action="append", metavar="PATH=VALUE",
                   help="change one field of the run's config (e.g. --set evaluation.gates.on_fail=warn); refused "
                        "when the stage it shapes is already done")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--log-json", action="store_true", help="JSON log lines on stderr")
    p.set_defaults(func=_cmd_resume)


def _add_inspection(sub: Any) -> None:
    p = sub.add_parser("status", help="where a run stands")
    p.add_argument("run_dir", type=Path)
    p.set_defaults(func=_cmd_status)
    p = sub.add_parser("audit", help="verify a run folder: log, manifest and files (exit 4 tampered, 5 in progress)",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--expect-head", metavar="SHA256", help="the head sha256 kept from the run (podar run prints it)")
    p.add_argument("--skip-files", action="store_true", help="do not re-hash the artifact files")
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


def build_parser() -> argparse.ArgumentParser:
    from podar import __version__

    parser = argparse.ArgumentParser(prog="podar", description="Prune neural networks through a state machine.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"podar {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run(sub)
    _add_resume(sub)
    _add_inspection(sub)
    return parser


def _dispatch(args: argparse.Namespace) -> int:
    from podar.engine.context import Terminated
    from podar.schemas.errors import PodarError

    try:
        return args.func(args)
    except PodarError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT["error"]
    except Terminated:
        print("terminated", file=sys.stderr)
        return EXIT["terminated"]
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT["interrupted"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code = EXIT["error"]
    try:
        code = _dispatch(args)
        sys.stdout.flush()
        return code
    except BrokenPipeError:  # the reader went away (podar status RUN | head): no traceback
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = EXIT["broken_pipe"]
        return code
    finally:
        if "torch.distributed" in sys.modules:  # a run under torchrun / accelerate launch: leave its group
            from podar.engine.distributed import end_processes

            end_processes(wait=code == 0)


if __name__ == "__main__":
    sys.exit(main())
