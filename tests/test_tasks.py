"""Task accuracy through lm-evaluation-harness (issue 32): the shipped offline task, a local task's accuracy against
a direct computation, gates passing and failing (naming the task), the dense results not recomputed on resume,
2 processes = 1, and the refusals (no extra, an encoder, an offloaded model, unknown tasks or gate names)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from helpers import export_hashes, killed_and_resumed, make_tiny_config

from podar import Pipeline, PruningConfig
from podar.schemas.config import TaskEvaluationConfig, TaskGates
from podar.schemas.errors import ConfigError
from podar.stages import tasks as task_eval

pytest.importorskip("lm_eval", reason="the optional extra podar[eval] (make install installs it)")


def with_tasks(cfg: PruningConfig, **tasks) -> PruningConfig:
    data = cfg.evaluation.model_dump()
    data["tasks"] = {"names": ["podar_lastword"], "limit": 6, "batch_size": 4, **tasks}
    return cfg.with_evaluation(type(cfg.evaluation).model_validate(data))


def test_lastword_examples_take_each_paragraphs_last_lower_case_word():
    words = " ".join(f"w{i}" for i in range(20))
    text = "\n".join([
        " = A heading = ",
        f" {words} . the cat sat on the mat . ",  # target 'mat', context up to 'the'
        f" {words} Paris . ",  # a capitalised last word: skipped
        " too short a paragraph . ",  # under 16 words of context: skipped
        f" {words} . {words} . then a dog ran home . "])  # cut at a sentence start within 30 words
    got = task_eval.lastword_examples(text, max_context_words=30)
    assert got == [{"context": f"{words} . the cat sat on the", "target": " mat"},
                   {"context": f"{words} . then a dog ran", "target": " home"}]
    from podar.engine.data import load_text

    shipped = task_eval.lastword_examples(load_text("wikitext2", None))
    assert len(shipped) > 1500 and all(e["target"][1:].isalpha() and e["target"][1:].islower() for e in shipped)
    assert all(16 <= len(e["context"].split()) <= 96 for e in shipped)


def test_tasks_config_takes_a_list_and_refuses_a_task_named_twice():
    assert TaskEvaluationConfig.model_validate(["podar_lastword"]).names == ("podar_lastword",)
    assert TaskEvaluationConfig.model_validate("podar_lastword").names == ("podar_lastword",)
    with pytest.raises(ValueError, match="lists a task twice"):
        TaskEvaluationConfig.model_validate(["a", "a"])


def test_gates_name_the_task_and_both_figures():
    dense, pruned = task_eval.TaskScore(0.62, 0.01, 100), task_eval.TaskScore(0.55, 0.01, 100)
    fails = task_eval.check_task_gates("arc_easy", "acc", TaskGates(max_accuracy_drop=5.0, min_accuracy=0.6),
                                       dense, pruned)
    assert len(fails) == 2
    assert "task 'arc_easy'" in fails[0] and "7.00 points" in fails[0] and "0.6200 → 0.5500" in fails[0]
    assert "below min_accuracy=0.6" in fails[1]
    assert task_eval.check_task_gates("t", "acc", TaskGates(max_accuracy_drop=7.5), dense, pruned) == []


def _local_task(tmp_path, model, n=12):
    """A task folder (YAML + JSON lines) whose targets are, for half of the examples, the tiny model's own greedy
    next byte (right) and otherwise another byte (wrong)."""
    from podar.engine.models import byte_tokenizer

    tok = byte_tokenizer()
    rng = torch.Generator().manual_seed(0)
    rows = []
    while len(rows) < n:
        context = "".join(chr(97 + int(c)) for c in torch.randint(0, 26, (int(torch.randint(8, 30, (1,),
                                                                                              generator=rng)),),
                                                                   generator=rng))
        ids = torch.tensor([tok(context)["input_ids"]])
        with torch.no_grad():
            best = int(model(input_ids=ids).logits[0, -1].argmax())
        target = tok.decode([best if len(rows) % 2 == 0 else best + 1])
        if tok(context + target)["input_ids"] == ids[0].tolist() + [best + len(rows) % 2] and target.strip():
            rows.append({"context": context, "target": target})
    folder = tmp_path / "task"
    folder.mkdir()
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "nextbyte.yaml").write_text(
        "task: nextbyte\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {folder / 'data.jsonl'}\ntest_split: test\noutput_type: loglikelihood\n"
        "doc_to_text: '{{context}}'\ndoc_to_target: '{{target}}'\ntarget_delimiter: ''\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n")
    return folder, rows, tok


def direct_accuracy(model, tok, rows) -> float:
    """The share of examples whose target bytes are the greedy continuation of their context (plain loop)."""
    right = 0
    for r in rows:
        ctx, full = tok(r["context"])["input_ids"], tok(r["context"] + r["target"])["input_ids"]
        cont = full[len(ctx):]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([full[:-1]])).logits[0]
        right += int(all(int(logits[len(ctx) - 1 + j].argmax()) == t for j, t in enumerate(cont)))
    return right / len(rows)


def test_a_local_task_scores_what_a_direct_computation_scores(tmp_path, monkeypatch):
    """lm-eval's accuracy of a local task equals a plain loop's; its bootstrapped standard error (perplexity) runs
    without forking the process (a pool's workers would inherit the model and the CLI's signal handlers)."""
    import multiprocessing

    from podar.engine.models import tiny_model
    from podar.schemas.config import TinyModelConfig

    model, _ = tiny_model(TinyModelConfig(), torch.float32)
    folder, rows, tok = _local_task(tmp_path, model)
    opts = TaskEvaluationConfig(names=(str(folder / "nextbyte.yaml"),), batch_size=3)
    specs = task_eval.resolve_tasks(opts, None)
    assert [s.name for s in specs] == ["nextbyte"]
    monkeypatch.setattr(multiprocessing, "Pool", lambda *a, **k: pytest.fail("lm-eval forked a process pool"))
    results = task_eval.run_tasks(model, tok, specs, opts)
    assert "perplexity,none" in results["nextbyte"]
    expected = direct_accuracy(model, tok, rows)
    assert 0.0 < expected < 1.0
    score = task_eval.task_scores(results, "acc")["nextbyte"]
    assert score.value == pytest.approx(expected) and score.examples == len(rows)
    folder_specs = task_eval.resolve_tasks(TaskEvaluationConfig(names=(str(folder),)), None)
    assert [s.name for s in folder_specs] == ["nextbyte"]  # a folder: every task defined in it
    with pytest.raises(Exception, match="no metric 'acc_norm'.*reports \\['acc', 'perplexity'\\]"):
        task_eval.task_scores(results, "acc_norm")


def test_the_shipped_task_runs_end_to_end_and_a_passing_gate_exports(corpus, tmp_path):
    cfg = with_tasks(make_tiny_config(corpus), gates={"max_accuracy_drop": 100.0})
    result = Pipeline(cfg, run_dir=tmp_path / "run", progress=False).run()
    assert result.ok, result.failure
    parts = [r for r in result.results if r.stage == "evaluating"]
    assert [p.metrics.get("part") for p in parts] == ["dense_tasks", None]
    (task,) = parts[-1].tasks
    assert task.task == "podar_lastword" and task.examples == 6 and task.gate_failures == []
    assert task.drop_points == pytest.approx((task.dense - task.pruned) * 100)
    report = (tmp_path / "run" / "report.md").read_text()
    assert f"| podar_lastword | acc | 6 | {task.dense:.4f} ± " in report
    assert (tmp_path / "run" / "plots" / "tasks.png").is_file()
    card = (tmp_path / "run" / "export" / "README.md").read_text()
    assert f"| podar_lastword | acc | 6 | {task.dense:.4f} | {task.pruned:.4f} |" in card
    from podar.engine.report import compare_runs

    table = compare_runs([tmp_path / "run"])
    assert "| run | podar_lastword |" in table and f"{task.pruned:.4f} ({-task.drop_points:+.2f}; dense" in table


def test_a_failing_task_gate_ends_in_failed_before_exporting_naming_the_task(corpus, tmp_path):
    cfg = with_tasks(make_tiny_config(corpus), gates={"min_accuracy": 0.99})
    result = Pipeline(cfg, run_dir=tmp_path / "run", progress=False).run()
    assert not result.ok and result.stage.value == "failed"
    assert "task 'podar_lastword'" in str(result.failure) and "min_accuracy=0.99" in str(result.failure)
    assert not (tmp_path / "run" / "export").exists()


def test_the_dense_results_are_not_recomputed_on_resume(corpus, tmp_path, monkeypatch):
    """Killed after the dense task results were checkpointed: the resumed run scores only the pruned model, and
    its export is the uninterrupted run's, file for file."""
    calls: list[int] = []
    original = task_eval.run_tasks

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    cfg = with_tasks(make_tiny_config(corpus))
    monkeypatch.setattr(task_eval, "run_tasks", counted)
    manifest = killed_and_resumed(cfg, tmp_path, "kill@after:evaluating#1")
    assert len(calls) == 3  # the uninterrupted run: dense and pruned; the resumed run: pruned only
    assert any(r.kind == "task_baseline" for r in manifest.artifacts.values())
    assert export_hashes(tmp_path / "run")


def test_a_config_naming_tasks_without_the_extra_is_refused_before_any_work(corpus, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'podar\[eval\]'"):
        Pipeline(with_tasks(make_tiny_config(corpus)), run_dir=tmp_path / "run", progress=False).run()
    assert not (tmp_path / "run" / "manifest.json").exists()


@pytest.mark.parametrize(("change", "message"), [
    ({"names": ["no_such_task_anywhere"]}, "are not lm-eval tasks"),
    ({"names": ["missing/task.yaml"]}, "no such file or folder"),
    ({"gates_per_task": {"other": {"min_accuracy": 0.1}}}, "gates_per_task names \\['other'\\]"),
])
def test_unknown_tasks_and_gate_names_are_refused_before_any_work(corpus, tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        Pipeline(with_tasks(make_tiny_config(corpus), **change), run_dir=tmp_path / "run", progress=False).run()
    assert not (tmp_path / "run" / "manifest.json").exists()


def test_an_encoder_or_an_offloaded_model_is_refused_with_the_reason(corpus, tmp_path):
    enc = with_tasks(make_tiny_config(corpus, arch="bert"))
    with pytest.raises(ConfigError, match="scores a causal LM's next-token predictions"):
        Pipeline(enc, run_dir=tmp_path / "enc", progress=False).run()
    cfg = with_tasks(make_tiny_config(corpus))
    cfg = cfg.with_runtime(cfg.runtime.model_copy(update={"offload": "blocks"}))
    with pytest.raises(ConfigError, match="evaluation.tasks: lm-evaluation-harness runs the whole model"):
        Pipeline(cfg, run_dir=tmp_path / "off", progress=False).run()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="torchrun with gloo on Linux")
def test_two_processes_give_the_task_results_of_one(corpus, tmp_path):
    from test_distributed import torchrun

    from podar.engine.store import RunStore

    cfg = with_tasks(make_tiny_config(corpus))
    path = tmp_path / "tasks.yaml"
    path.write_text(cfg.to_yaml())
    assert Pipeline(cfg, run_dir=tmp_path / "one", progress=False).run().ok
    proc = torchrun(["run", str(path), "--run-dir", str(tmp_path / "two"), "--no-progress"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (RunStore(tmp_path / d).read_manifest() for d in ("one", "two"))
    assert two.world_size == 2 and two.state == "complete"
    assert one.results[-2].tasks == two.results[-2].tasks and one.results[-2].tasks


def test_a_failed_task_gate_resumes_with_a_changed_gate_without_scoring_the_dense_model_again(
        corpus, tmp_path, monkeypatch):
    cfg = with_tasks(make_tiny_config(corpus), gates={"min_accuracy": 0.99})
    assert not Pipeline(cfg, run_dir=tmp_path / "run", progress=False).run().ok
    calls: list[int] = []
    original = task_eval.run_tasks
    monkeypatch.setattr(task_eval, "run_tasks", lambda *a, **k: calls.append(1) or original(*a, **k))
    resumed = Pipeline.resume(tmp_path / "run", overrides={"evaluation.tasks.gates.min_accuracy": None},
                              progress=False).run()
    assert resumed.ok, resumed.failure
    assert len(calls) == 1  # the pruned model only


def test_a_changed_task_limit_on_resume_scores_the_dense_model_again(corpus, tmp_path, monkeypatch):
    cfg = with_tasks(make_tiny_config(corpus), gates={"min_accuracy": 0.99})
    assert not Pipeline(cfg, run_dir=tmp_path / "run", progress=False).run().ok
    calls: list[int] = []
    original = task_eval.run_tasks
    monkeypatch.setattr(task_eval, "run_tasks", lambda *a, **k: calls.append(1) or original(*a, **k))
    resumed = Pipeline.resume(tmp_path / "run", overrides={"evaluation.tasks.limit": 4,
                                                           "evaluation.tasks.gates.min_accuracy": None},
                              progress=False).run()
    assert resumed.ok, resumed.failure
    assert len(calls) == 2  # the dense results of 6 examples are not those of 4: both models scored
    assert [t.examples for t in resumed.results[-2].tasks] == [4]


def test_the_command_line_prints_each_tasks_figures(corpus, tmp_path):
    import subprocess

    path = tmp_path / "tasks.yaml"
    path.write_text(with_tasks(make_tiny_config(corpus)).to_yaml())
    proc = subprocess.run([sys.executable, "-m", "podar.cli", "run", str(path), "--run-dir", str(tmp_path / "run"),
                           "--no-progress"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    task = json.loads((tmp_path / "run" / "report.json").read_text())["tasks"][0]
    assert (f"task podar_lastword: acc dense {task['dense']:.4f} → pruned {task['pruned']:.4f} "
            f"({-task['drop_points']:+.2f} points)") in proc.stdout
    assert "bootstrapping" not in proc.stdout and "Traceback" not in proc.stderr


def test_the_cost_estimate_counts_the_shipped_tasks_tokens(corpus, tmp_path):
    from podar._cost import task_tokens

    pipe = Pipeline(with_tasks(make_tiny_config(corpus), num_fewshot=1), run_dir=tmp_path / "run", progress=False)
    pipe.step()  # Idle → the first stage: inputs loaded, the cost estimated
    ctx = pipe.context
    examples = ctx.state.task_specs[0].examples[:6]
    direct = sum(len(ctx.tokenizer(e["context"] + e["target"])["input_ids"]) for e in examples)
    assert task_tokens(ctx) == (2 * 2 * direct, [])  # both models, each context with one example before it
    assert ctx.state.cost["task_tokens"] == 4 * direct
