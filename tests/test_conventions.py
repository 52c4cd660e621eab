"""A new user's first hour (issue 18): the command line's conventions, each tried as a user would."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from podar import ConfigError, Pipeline, PruningConfig, PruningStage, __version__
from podar.cli import EXIT, main
from podar.engine import faults
from podar.engine.store import RunStore


def cli(*args, cwd=None, env=None, stdin=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "podar.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"podar {__version__}"


def test_help_documents_the_exit_codes():
    out = cli("--help").stdout
    for code, meaning in [("0", "done"), ("1", "Failed"), ("2", "usage"), ("3", "refused"), ("4", "does not verify"),
                          ("5", "at work"), ("130", "Ctrl-C"), ("143", "SIGTERM")]:
        assert any(line.strip().startswith(code) and meaning in line for line in out.splitlines()), code


@pytest.mark.parametrize("stage", list(PruningStage))
def test_every_stage_has_a_display_name(stage):
    assert stage.display_name() == stage.display and stage.display_name()[0].isupper()
    assert PruningStage.from_display(stage.display_name()) is stage


def test_set_overrides_by_dotted_path(config_file, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["run", str(config_file), "--set", "method=wanda", "--set", "calibration.num_samples=3",
                 "--set", "pattern.kind=nm", "--set", "pattern.n=2", "--set", "pattern.m=4",
                 "--run-dir", str(run_dir), "--no-progress"])
    assert code == EXIT["ok"], capsys.readouterr().err[-2000:]
    cfg = PruningConfig.from_dict(RunStore(run_dir).read_manifest().config)
    assert cfg.method.name == "wanda" and cfg.calibration.num_samples == 3 and cfg.pattern.label() == "2:4"
    assert cfg.target_sparsity == 0.5


@pytest.mark.parametrize(("item", "message"), [("calibration.nums=3", "'calibration.nums' names no config field"),
                                               ("target_sparsity=2", "target_sparsity"),
                                               ("method=nope", "method 'nope' is unknown"),
                                               ("model.tiny.hidden_size.x=1", "is not a config section")])
def test_a_bad_set_names_the_path_or_value(config_file, tmp_path, capsys, item, message):
    assert main(["run", str(config_file), "--set", item, "--run-dir", str(tmp_path / "r")]) == EXIT["error"]
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_set_without_a_value_is_a_usage_error(config_file, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", str(config_file), "--set", "method"])
    assert e.value.code == EXIT["usage"] and "PATH=VALUE" in capsys.readouterr().err


def test_a_run_without_a_config_file(tiny_config, tmp_path, corpus):
    """The common case: model, method, sparsity and pattern on the command line (the tiny model through --set)."""
    from podar.engine.models import tiny_model

    model, tok = tiny_model(tiny_config.model.tiny)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    sets = ["calibration.num_samples=4", "calibration.sequence_length=64", f"calibration.dataset={corpus}",
            f"evaluation.dataset={corpus}", "evaluation.sequence_length=64", "evaluation.max_windows=2",
            "evaluation.gates.max_perplexity_increase_pct=null"]
    proc = cli("run", "--model", str(folder), "--method", "wanda", "--sparsity", "0.5", "--pattern", "2:4",
               "--run-dir", str(tmp_path / "run"), *[a for s in sets for a in ("--set", s)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "achieved 0.5000 over 14 layers (2:4, per_row)" in proc.stdout
    cfg = PruningConfig.from_dict(RunStore(tmp_path / "run").read_manifest().config)
    assert cfg.model.kind == "hf" and cfg.model.name == str(folder) and cfg.method.name == "wanda"


def test_progress_is_quiet_off_a_terminal_and_results_go_to_stdout(config_file, tmp_path):
    proc = cli("run", str(config_file), "--run-dir", str(tmp_path / "run"))  # no --no-progress; stderr a pipe
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "it/s]" not in proc.stderr and "%|" not in proc.stderr  # no tqdm bar
    assert "Complete in" in proc.stdout and "Complete in" not in proc.stderr
    assert "transition" in proc.stderr and "transition" not in proc.stdout  # logs on stderr


def test_status_warns_on_stderr_and_survives_a_closed_pipe(config_file, tmp_path):
    run_dir = tmp_path / "run"
    assert cli("run", str(config_file), "--run-dir", str(run_dir), "--no-progress").returncode == 0
    with open(run_dir / "audit.jsonl", "a") as f:  # a record the manifest does not confirm: a warning
        f.write(json.dumps({"event": "note", "seq": 99, "source": "complete"}) + "\n")
    proc = cli("status", str(run_dir))
    assert proc.returncode == 0 and "warning" in proc.stderr and "warning" not in proc.stdout
    head = subprocess.run(f"{sys.executable} -m podar.cli status {run_dir} | head -1", shell=True,
                          capture_output=True, text=True)
    assert "Traceback" not in head.stderr and "BrokenPipe" not in head.stderr and head.stdout.startswith("run ")


def test_exit_codes_tell_a_usage_error_from_a_failed_run(config_file, tiny_config, tmp_path):
    assert cli("run", "--no-such-flag").returncode == EXIT["usage"]
    assert cli("run", str(tmp_path / "missing.yaml")).returncode == EXIT["error"]
    strict = tiny_config.with_evaluation(tiny_config.evaluation.model_copy(update={
        "gates": tiny_config.evaluation.gates.model_copy(update={"max_perplexity": 1.01})}))
    path = tmp_path / "strict.yaml"
    path.write_text(strict.to_yaml())
    failed = cli("run", str(path), "--run-dir", str(tmp_path / "failed"), "--no-progress")
    assert failed.returncode == EXIT["failed"] and "FAILED in Evaluating" in failed.stderr
    interrupted = cli("run", str(config_file), "--run-dir", str(tmp_path / "int"), "--no-progress",
                      env={faults.ENV: "interrupt@after:pruning#1"})
    assert interrupted.returncode == EXIT["interrupted"]


def test_the_summary_counts_every_layer_group(tiny_config, tmp_path, capsys):
    cfg = tiny_config.with_method("sparsegpt")  # site by site: 8 groups of 1 to 3 layers
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert main(["run", str(path), "--run-dir", str(tmp_path / "run"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "over 14 layers" in out and "audit head sha256:" in out


def test_exported_weights_are_readable_by_others(config_file, tmp_path):
    run_dir = tmp_path / "run"
    assert Pipeline(PruningConfig.from_file(config_file), run_dir=run_dir, progress=False).run().ok
    for path in (run_dir / "export").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path.name
    for path in (run_dir / "artifacts").rglob("*.safetensors"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


@pytest.mark.parametrize("text", ["", "# only a comment\n", "{}\n"])
def test_an_empty_config_file_is_an_error(tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="is empty"):
        PruningConfig.from_file(path)
    assert main(["run", str(path), "--run-dir", str(tmp_path / "r")]) == EXIT["error"]


def test_relative_dataset_paths_resolve_against_the_config_and_resume_from_elsewhere(tiny_config, tmp_path, corpus):
    folder = tmp_path / "project"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "text.txt").write_text(corpus.read_text())
    cfg = tiny_config.model_dump(mode="json")
    for section in ("calibration", "evaluation", "finetune"):
        cfg[section]["dataset"] = "data/text.txt"
    cfg["method"] = "wanda"
    import yaml

    (folder / "run.yaml").write_text(yaml.safe_dump(cfg))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = cli("run", str(folder / "run.yaml"), "--run-dir", str(tmp_path / "run"), "--no-progress", cwd=elsewhere,
               env={faults.ENV: "interrupt@after:pruning#1"})
    assert proc.returncode == EXIT["interrupted"], proc.stderr[-2000:]
    recorded = RunStore(tmp_path / "run").read_manifest().config["calibration"]["dataset"]
    assert recorded == str((folder / "data" / "text.txt").resolve())
    other = tmp_path / "third"
    other.mkdir()
    resumed = cli("resume", str(tmp_path / "run"), "--no-progress", cwd=other)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
