"""Task accuracy through lm-evaluation-harness: the dense and the pruned model on the same tasks, and their gates.

lm-eval (PyPI ``lm-eval``, the optional extra ``podar[eval]``) runs the tasks on the models in memory (its HFLM
wrapper around the run's model, so a masked or structurally pruned model is evaluated as it is, with no export in
between). Tasks are lm-eval's registered ones (their datasets come from the hub: online), local task YAML files or
folders (offline with ``dataset_path: json`` and ``data_files``), or ``podar_lastword``, which ships with podar:
the last word of WikiText-2 test paragraphs, LAMBADA-style (the word must be the greedy continuation of the
paragraph before it, every token of it). It is podar's own check, not a standard benchmark.

The dense model's results are checkpointed first (``task_baseline``); a resumed run reads them back. On several
processes the main one runs lm-eval and hands the results to the others (lm-eval's scoring of a model handed in
memory is single-process); the figures are those of one process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import re
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from podar.engine.data import load_text
from podar.engine.distributed import together
from podar.engine.versions import package_version
from podar.schemas.config import TaskEvaluationConfig, TaskGates
from podar.schemas.errors import ConfigError, StageError
from podar.schemas.records import TaskEvaluation

__all__ = [
    "SHIPPED_TASK",
    "TaskSpec",
    "TaskScore",
    "lastword_examples",
    "require_lm_eval",
    "resolve_tasks",
    "run_tasks",
    "task_scores",
    "check_task_gates",
]

SHIPPED_TASK = "podar_lastword"
EXTRA = "pip install 'podar[eval]'"
PROTOCOL = "lm-eval-v1"
_LASTWORD = re.compile(r"^[a-z]{3,}$")  # a lower-case word of 3+ letters: no name, number or markup as the target


@dataclass(frozen=True)
class TaskSpec:
    """One task as lm-eval is handed it: ``spec`` (a registered name, a YAML path, or a task config dict),
    ``name`` (its lm-eval name: the results' key), ``include`` (a folder to index first, or None), ``sha256`` (of
    its definition and local data; a registered task: its name and the lm-eval version)."""

    entry: str
    name: str
    spec: Any
    include: str | None
    sha256: str
    examples: list[dict[str, str]] | None = None  # the shipped task's examples (written to a JSONL file per run)


@dataclass(frozen=True)
class TaskScore:
    """One model's figure on one task."""

    value: float
    stderr: float | None
    examples: int


def require_lm_eval(field: str = "evaluation.tasks.names") -> str:
    """lm-eval's version; ConfigError naming the extra when it is not installed."""
    try:
        from importlib.metadata import version

        import lm_eval  # noqa: F401

        return version("lm_eval")
    except ImportError as e:
        raise ConfigError(f"{field} names tasks, and task evaluation needs lm-evaluation-harness, which is not "
                          f"installed: {EXTRA}") from e
    return package_version("lm_eval")


def lastword_examples(text: str, *, max_context_words: int = 96, min_context_words: int = 16
                      ) -> list[dict[str, str]]:
    """The shipped task's examples from WikiText-2-formatted ``text`` (words and punctuation separated by spaces,
    ``=`` headings): per paragraph, its last sentence-final lower-case word (3+ letters) is the ``target`` (with
    its leading space) and the words before it the ``context``, cut to at most ``max_context_words`` starting at a
    sentence; paragraphs whose context would be under ``min_context_words`` are skipped. Deterministic."""
    out = []
    for line in text.split("\n"):
        words = line.strip().split(" ")
        if len(words) < 2 or words[0] == "=":
            continue
        ends = [i for i in range(1, len(words)) if words[i] == "." and _LASTWORD.match(words[i - 1])]
        if not ends:
            continue
        target = ends[-1] - 1
        context = words[:target]
        if len(context) > max_context_words:
            starts = [j + 1 for j in range(len(context) - max_context_words, len(context)) if context[j] == "."]
            if not starts:
                continue
            context = context[starts[0]:]
        if len(context) < min_context_words:
            continue
        out.append({"context": " ".join(context), "target": " " + words[target]})
    return out


def _shipped_config(data_file: str) -> dict[str, Any]:
    """lm-eval's task config of ``podar_lastword`` reading its examples from ``data_file`` (JSON lines)."""
    return {"task": SHIPPED_TASK, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": data_file}},
            "test_split": "test", "output_type": "loglikelihood", "doc_to_text": "{{context}}",
            "doc_to_target": "{{target}}", "target_delimiter": "",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False}],
            "metadata": {"version": 1.0}}


def _sha(parts: Sequence[bytes]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(hashlib.sha256(p).digest())
    return h.hexdigest()


def _files_sha(paths: Sequence[Path], base: Path) -> str:
    return _sha([str(p.relative_to(base)).encode() + b"\0" + p.read_bytes() for p in sorted(paths)])


def resolve_tasks(opts: TaskEvaluationConfig, data_dir: Path | None) -> list[TaskSpec]:
    """The tasks ``opts.names`` names, each checked to exist, before any work. ConfigError naming the entry (and
    the extra, when lm-eval is not installed)."""
    if not opts.names:
        return []
    version = require_lm_eval()
    from lm_eval.tasks import TaskManager

    specs: list[TaskSpec] = []
    registered: list[str] = []
    for entry in opts.names:
        field = f"evaluation.tasks.names entry '{entry}'"
        if entry == SHIPPED_TASK:
            text = load_text("wikitext2", data_dir, field="evaluation.tasks (podar_lastword reads wikitext2)")
            examples = lastword_examples(text)
            body = "".join(json.dumps(e, sort_keys=True) + "\n" for e in examples).encode()
            specs.append(TaskSpec(entry, SHIPPED_TASK, None, None, _sha([PROTOCOL.encode(), body]), examples))
            continue
        path = Path(entry).expanduser()
        if entry.endswith((".yaml", ".yml")) or path.exists():
            if not path.exists():
                raise ConfigError(f"{field}: no such file or folder")
            folder = path if path.is_dir() else path.parent
            index = TaskManager(include_path=str(folder), include_defaults=False).task_index
            found = sorted(n for n, e in index.items() if e.yaml_path is not None
                           and (path.is_dir() or Path(e.yaml_path).resolve() == path.resolve())
                           and getattr(e.kind, "name", "") in ("TASK", "PY_TASK"))
            if not found:
                raise ConfigError(f"{field}: no lm-eval task is defined there (a YAML file with a 'task:' key)")
            files = [p for p in folder.rglob("*") if p.is_file()] if path.is_dir() else [path]
            sha = _files_sha(files, folder)
            specs += [TaskSpec(entry, name, name, str(folder), sha) for name in found]
            continue
        registered.append(entry)
        specs.append(TaskSpec(entry, entry, entry, None, _sha([f"lm-eval {version} {entry}".encode()])))
    if registered:
        known = set(TaskManager().all_tasks)
        unknown = [r for r in registered if r not in known]
        if unknown:
            raise ConfigError(f"evaluation.tasks.names: {unknown} are not lm-eval tasks (lm-eval {version}), "
                              f"not '{SHIPPED_TASK}', and not a YAML file or folder")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"evaluation.tasks.names: a task is named twice once resolved: {names}")
    unknown_gates = set(opts.gates_per_task) - set(names)
    if unknown_gates:
        raise ConfigError(f"evaluation.tasks.gates_per_task names {sorted(unknown_gates)}, which are not evaluated "
                          f"(the tasks: {names})")
    return specs


@contextlib.contextmanager
def _isolated() -> Iterator[None]:
    """lm-eval seeds Python's, NumPy's and torch's generators, logs (its warnings about a model handed in memory
    are expected here) and shows the datasets library's bars: all undone on exit, so the run's own random streams,
    logs and bars are what they were. Its bootstrapped standard errors run in this process (``DISABLE_MULTIPROC``):
    a process pool would fork the whole run, model included, and its workers would take the run's signal handlers."""
    import datasets
    import numpy as np

    py, npy = random.getstate(), np.random.get_state()
    quiet = logging.getLogger("lm-eval"), logging.getLogger("lm_eval")
    levels = [q.level for q in quiet]
    bars = datasets.is_progress_bar_enabled()
    multiproc = os.environ.get("DISABLE_MULTIPROC")
    try:
        os.environ["DISABLE_MULTIPROC"] = "1"
        for q in quiet:
            q.setLevel(logging.ERROR)
        datasets.disable_progress_bars()
        # lm-eval prints; podar's stdout is its own
        with contextlib.redirect_stdout(sys.stderr), torch.random.fork_rng(devices=[]):
            yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        for q, level in zip(quiet, levels, strict=True):
            q.setLevel(level)
        if bars:
            datasets.enable_progress_bars()
        if multiproc is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = multiproc


def run_tasks(model: torch.nn.Module, tokenizer: Any, specs: Sequence[TaskSpec], opts: TaskEvaluationConfig, *,
              progress: bool = False) -> dict[str, dict[str, Any]]:
    """lm-eval's results of ``model`` on ``specs``: task name → its metrics (lm-eval's ``results`` entry, with
    ``n`` the examples scored). Fixed seeds (lm-eval's defaults), zero- or ``num_fewshot``-shot, the first
    ``limit`` examples."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    class _Model(HFLM):  # the run's progress setting for lm-eval's bars too
        def loglikelihood(self, requests, disable_tqdm: bool = False):  # noqa: ANN001
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not progress)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):  # noqa: ANN001
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or not progress)

        def generate_until(self, requests, disable_tqdm: bool = False):  # noqa: ANN001
            return super().generate_until(requests, disable_tqdm=disable_tqdm or not progress)

    was_training = model.training
    with tempfile.TemporaryDirectory(prefix="podar-tasks-") as tmp, _isolated():
        tasks: list[Any] = []
        for s in specs:
            if s.examples is not None:
                data = Path(tmp) / f"{s.name}.jsonl"
                data.write_text("".join(json.dumps(e) + "\n" for e in s.examples), encoding="utf-8")
                tasks.append(_shipped_config(str(data)))
            else:
                tasks.append(s.spec)
        includes = sorted({s.include for s in specs if s.include})
        manager = TaskManager(include_path=includes or None,
                              include_defaults=any(s.include is None and s.examples is None for s in specs))
        lm = _Model(pretrained=model.eval(), tokenizer=tokenizer, batch_size=opts.batch_size)
        out = simple_evaluate(lm, tasks=tasks, num_fewshot=opts.num_fewshot, limit=opts.limit, task_manager=manager,
                              log_samples=False, bootstrap_iters=1000)
    model.train(was_training)
    results: dict[str, dict[str, Any]] = {}
    for s in specs:
        if s.name not in out["results"]:
            raise StageError(f"task '{s.name}': lm-eval returned no result for it", stage="Evaluating")
        entry = {k: v for k, v in out["results"][s.name].items() if isinstance(v, int | float | str)}
        n = out.get("n-samples", {}).get(s.name, {})
        entry["n"] = int(n.get("effective", n.get("original", 0))) if isinstance(n, dict) else 0
        results[s.name] = entry
    return results


def task_scores(results: dict[str, dict[str, Any]], metric: str) -> dict[str, TaskScore]:
    """``metric`` of every task in lm-eval's ``results`` (its first filter: 'acc,none'). StageError naming the
    task and the metrics it has when ``metric`` is not among them."""
    out = {}
    for task, entry in results.items():
        keys = [k for k in entry if k.split(",")[0] == metric and not k.startswith(f"{metric}_stderr")]
        if not keys:
            have = sorted({k.split(",")[0] for k in entry if "," in k and "_stderr" not in k})
            raise StageError(f"task '{task}' has no metric '{metric}' (evaluation.tasks.metric); it reports {have}",
                             stage="Evaluating")
        key = sorted(keys)[0]
        stderr = entry.get(key.replace(metric, f"{metric}_stderr", 1))
        out[task] = TaskScore(value=float(entry[key]),
                              stderr=float(stderr) if isinstance(stderr, int | float) and math.isfinite(stderr)
                              else None, examples=int(entry.get("n", 0)))
    return out


def check_task_gates(task: str, metric: str, gates: TaskGates, dense: TaskScore, pruned: TaskScore) -> list[str]:
    """The failed gates of one task, each naming the task, both figures and the limit."""
    failures = []
    drop = (dense.value - pruned.value) * 100.0
    if gates.max_accuracy_drop is not None and drop > gates.max_accuracy_drop:
        failures.append(f"task '{task}': {metric} fell {drop:.2f} points ({dense.value:.4f} → {pruned.value:.4f}), "
                        f"above max_accuracy_drop={gates.max_accuracy_drop:g}")
    if gates.min_accuracy is not None and pruned.value < gates.min_accuracy:
        failures.append(f"task '{task}': {metric} {pruned.value:.4f} is below min_accuracy={gates.min_accuracy:g} "
                        f"(dense {dense.value:.4f})")
    return failures


def compare(specs: Sequence[TaskSpec], opts: TaskEvaluationConfig, dense: dict[str, dict[str, Any]],
            pruned: dict[str, dict[str, Any]]) -> list[TaskEvaluation]:
    """One record per task: the metric dense and pruned, the drop in points, the failed gates."""
    d, p = task_scores(dense, opts.metric), task_scores(pruned, opts.metric)
    out = []
    for s in specs:
        gates = opts.gates_for(s.name)
        out.append(TaskEvaluation(
            task=s.name, metric=opts.metric, examples=p[s.name].examples, dense=d[s.name].value,
            pruned=p[s.name].value, dense_stderr=d[s.name].stderr, pruned_stderr=p[s.name].stderr,
            drop_points=(d[s.name].value - p[s.name].value) * 100.0,
            gate_failures=check_task_gates(s.name, opts.metric, gates, d[s.name], p[s.name]), on_fail=gates.on_fail))
    return out


def on_main(ctx: Any, work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``work`` run by the main process only, its (JSON) result handed to every process; an error on the main
    process raised on all."""
    local = together(ctx.dist, lambda: json.dumps(work()) if ctx.dist.is_main else None)
    return json.loads(ctx.dist.broadcast_text(local))


def specs_sha256(specs: Sequence[TaskSpec], opts: TaskEvaluationConfig) -> str:
    """sha256 of what the task results depend on besides the model: the tasks and the protocol's settings."""
    settings = {"num_fewshot": opts.num_fewshot, "limit": opts.limit, "protocol": PROTOCOL}
    return _sha([json.dumps(settings, sort_keys=True).encode(), *(f"{s.name}:{s.sha256}".encode() for s in specs)])
