"""The run folder's integrity, second pass (issue 27): what resume trusts is what the audit verifies, and no user
file is lost. One test per case found by trying podar as a careless or hostile user would, and a property-style
sweep that edits every manifest field and every file of a killed and of a finished run in turn: either the audit
fails, or resume's result is the uninterrupted run's."""

from __future__ import annotations

import copy
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import yaml
from helpers import make_tiny_config

from podar import CheckpointError, ConfigError, Pipeline, PruningConfig, PruningStage
from podar.cli import main
from podar.engine import faults
from podar.engine.store import sha256_file
from podar.stages import HANDLERS


def run_cli(args, env=None, cwd=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "podar.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def export_hashes(run_dir):
    export = run_dir / "export"
    return {str(p.relative_to(export)): sha256_file(p) for p in sorted(export.rglob("*")) if p.is_file()}


def folder_hashes(folder):
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def wanda_config(corpus):
    """Wanda, sub-layer sequential (eight layer groups): the resume point and counters matter."""
    return make_tiny_config(corpus).with_method("wanda")


@pytest.fixture(scope="module")
def config_path(wanda_config, tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "wanda.yaml"
    path.write_text(wanda_config.to_yaml())
    return path


@pytest.fixture(scope="module")
def finished(wanda_config, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    assert Pipeline(wanda_config, run_dir=run_dir, progress=False).run().ok
    return run_dir


@pytest.fixture(scope="module")
def killed(config_path, tmp_path_factory):
    """SIGKILLed right after the first layer group's Pruning was checkpointed (no record confirms it yet)."""
    run_dir = tmp_path_factory.mktemp("killed") / "run"
    proc = run_cli(["run", str(config_path), "--run-dir", str(run_dir), "--no-progress"],
                   env={faults.ENV: "kill@after:pruning#1"})
    assert proc.returncode == -9, proc.stderr[-2000:]
    return run_dir


@pytest.fixture
def killed_copy(killed, tmp_path):
    shutil.copytree(killed, tmp_path / "run")
    return tmp_path / "run"


def edit_manifest(run_dir, change):
    path = run_dir / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))


def resumed_export(run_dir):
    """The export hashes of the run resumed to its end, or None when resume refuses or does not complete."""
    try:
        result = Pipeline.resume(run_dir, progress=False).run()
    except CheckpointError:
        return None
    return export_hashes(run_dir) if result.ok else None


# ---------------------------------------------------------------- 1: the resume point


@pytest.mark.parametrize("edit", ["dest", "dest_everywhere", "group_index"])
def test_an_edited_resume_point_is_caught_by_audit_and_resume(killed_copy, edit, capsys):
    def change(m):
        points = [m["resume_point"]] + ([m["results"][-1]["resume_point"]] if edit != "dest" else [])
        for p in points:
            if edit == "group_index":
                p["counters"]["group_index"] = 20
            else:
                p["dest"] = "exporting"

    edit_manifest(killed_copy, change)
    assert main(["audit", str(killed_copy)]) == 4
    assert "the manifest was edited" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="edited"):
        Pipeline.resume(killed_copy, progress=False).run()
    assert not (killed_copy / "export").exists()


def test_a_killed_run_resumes_to_the_uninterrupted_export_and_audits_ok(killed_copy, finished, capsys):
    assert main(["audit", str(killed_copy)]) == 5  # killed between a checkpoint and its next move: in progress
    assert "no record confirms it yet" in capsys.readouterr().err
    assert resumed_export(killed_copy) == export_hashes(finished)
    assert main(["audit", str(killed_copy)]) == 0


# ---------------------------------------------------------------- the property: every field, every file


def _leaves(value, path=()):
    """(path, leaf) of every scalar in a JSON value (dicts and lists walked)."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _leaves(v, (*path, i))
    else:
        yield path, value


def _changed(leaf):
    if isinstance(leaf, bool):
        return not leaf
    if isinstance(leaf, int):
        return leaf + 1
    if isinstance(leaf, float):
        return leaf * 1.5 + 0.25
    if isinstance(leaf, str):
        return leaf + "x"
    return "edited"  # None


def manifest_edits(data):
    """(label, edited manifest) for every leaf of every field (big maps: their first and last entries), and each
    non-empty list with its last element dropped."""
    seen = set()
    for path, leaf in _leaves(data):
        # sample wide maps (artifacts, per-layer metrics, history) by their shape: one edit per distinct key path
        shape = tuple("#" if isinstance(p, int) or (len(path) > 2 and i == 2 and path[0] != "config") else p
                      for i, p in enumerate(path))
        if shape in seen:
            continue
        seen.add(shape)
        edited = copy.deepcopy(data)
        node = edited
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = _changed(leaf)
        yield "/".join(map(str, path)), edited
    for key, value in data.items():
        if isinstance(value, list) and value:
            edited = copy.deepcopy(data)
            edited[key] = value[:-1]
            yield f"{key}[:-1]", edited


NOT_COVERED = {"updated_at", "mac"}  # the time of the last write; a MAC is checked only with PODAR_AUDIT_KEY


def _sweep(run_dir, tmp_path, reference):
    """Every manifest edit and every file edit of ``run_dir``: audit fails, or resume refuses or gives the
    reference's export (``reference`` None: the run is Complete, resume refuses, and its export is unchanged)."""
    data = json.loads((run_dir / "manifest.json").read_text())
    passed = []
    cases = list(manifest_edits(data))
    files = [p.relative_to(run_dir) for p in sorted(run_dir.rglob("*")) if p.is_file() and p.name != "run.lock"]
    for label, edited in [*cases, *[(f"file:{f}", None) for f in files]]:
        work = tmp_path / "sweep"
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(run_dir, work)
        if edited is not None:
            (work / "manifest.json").write_text(json.dumps(edited, indent=2))
        else:
            with open(work / label[5:], "ab") as f:
                f.write(b"x")
        if main(["audit", str(work)]) in (0, 5):
            passed.append(label)
            outcome = resumed_export(work)
            if reference is not None:  # refused, or the uninterrupted run's export: never another one
                assert outcome in (None, reference), f"{label}: audit passed and resume gave another export"
            else:
                assert outcome is None and export_hashes(work) == export_hashes(run_dir), label
    return cases, passed


def test_every_manifest_field_and_file_of_a_killed_run_fails_the_audit_or_changes_nothing(killed, finished,
                                                                                           tmp_path, capsys):
    cases, passed = _sweep(killed, tmp_path, export_hashes(finished))
    capsys.readouterr()
    assert len(cases) > 150  # every field, down to the leaves
    # beyond what no digest covers, only the last result passes: no record confirms it yet (the audit says so),
    # and what resume reads of it is checked against the position the log gives (the sweep saw the export equal)
    last = f"results/{len(json.loads((killed / 'manifest.json').read_text())['results']) - 1}/"
    assert {p for p in passed if not p.startswith(last)} <= NOT_COVERED, passed


def test_every_manifest_field_and_file_of_a_finished_run_fails_the_audit(finished, tmp_path, capsys):
    cases, passed = _sweep(finished, tmp_path, None)
    capsys.readouterr()
    assert len(cases) > 200
    plots = {f"file:{p.relative_to(finished)}" for p in (finished / "plots").glob("*.png")}
    assert set(passed) - plots <= NOT_COVERED, passed  # the plots: named unverified by the audit


def test_audit_names_what_it_cannot_verify(finished, capsys):
    assert main(["audit", str(finished)]) == 0
    err = capsys.readouterr().err
    assert "updated_at" in err and "plots/*.png" in err


@pytest.mark.parametrize("field,value", [("world_size", 2), ("created_at", "2020-01-01T00:00:00+00:00"),
                                         ("versions", {"torch": "0.0"}), ("model_info", {"class": "Other"}),
                                         ("compute_dtype", "bfloat16"),
                                         ("progress", {"round_index": 0, "group_index": 3, "step": 0})])
def test_identity_fields_edited_without_a_key_fail_the_audit(finished, tmp_path, field, value, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    edit_manifest(run_dir, lambda m: m.__setitem__(field, value))
    assert main(["audit", str(run_dir)]) == 4
    capsys.readouterr()


@pytest.mark.parametrize("name", ["report.md", "report.json", "config.yaml"])
def test_edited_report_or_config_copy_fails_the_audit(finished, tmp_path, name, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    path = run_dir / name
    path.write_text(path.read_text().replace("0.5", "0.3"))
    assert main(["audit", str(run_dir)]) == 4
    assert f"'{name}' is not what podar writes" in capsys.readouterr().err


# ---------------------------------------------------------------- 2: non-ASCII


def test_a_non_ascii_data_path_runs_audits_and_resumes(corpus, tmp_path, capsys):
    folder = tmp_path / "daten-ü-é"
    folder.mkdir()
    shutil.copy(corpus, folder / "körper.txt")
    cfg = make_tiny_config(folder / "körper.txt").with_method("wanda")
    assert cfg.sha256() == PruningConfig.from_dict(json.loads(json.dumps(cfg.model_dump(mode="json")))).sha256()
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    run_dir = tmp_path / "läufe" / "run"
    proc = run_cli(["run", str(path), "--run-dir", str(run_dir), "--no-progress"],
                   env={faults.ENV: "kill@after:pruning#2"})
    assert proc.returncode == -9
    assert main(["audit", str(run_dir)]) == 5
    assert main(["resume", str(run_dir), "--no-progress"]) == 0
    assert main(["audit", str(run_dir)]) == 0
    capsys.readouterr()


# ---------------------------------------------------------------- 3, 4: folders podar did not create


def test_a_folder_holding_other_files_is_refused_and_left_untouched(wanda_config, tmp_path):
    run_dir = tmp_path / "mine"
    (run_dir / "export").mkdir(parents=True)
    for name in ("config.yaml", "report.md", "report.json", "export/model.safetensors", "export/README"):
        (run_dir / name).write_text(f"the user's own {name}")
    before = folder_hashes(run_dir)
    with pytest.raises(CheckpointError, match="not empty and holds no podar run.*never writes over"):
        Pipeline(wanda_config, run_dir=run_dir, progress=False).run()
    assert folder_hashes(run_dir) == before
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "export", "report.json", "report.md"]


@pytest.mark.parametrize("log", ["another run", "not podar"])
def test_a_folder_holding_an_audit_log_but_no_manifest_is_refused(finished, tmp_path, log, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    text = (finished / "audit.jsonl").read_text() if log == "another run" else '{"hello": 1}\n'
    (run_dir / "audit.jsonl").write_text(text)
    cfg = tmp_path / "c.yaml"
    cfg.write_text((finished / "config.yaml").read_text())
    assert main(["run", str(cfg), "--run-dir", str(run_dir), "--no-progress"]) == 3
    assert "not empty and holds no podar run (audit.jsonl)" in capsys.readouterr().err
    assert (run_dir / "audit.jsonl").read_text() == text and sorted(os.listdir(run_dir)) == ["audit.jsonl"]


def test_an_empty_folder_and_one_left_before_the_first_checkpoint_are_used(wanda_config, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert Pipeline(wanda_config, run_dir=empty, progress=False).run().ok
    left = tmp_path / "left"
    (left / "artifacts" / "dense_reference").mkdir(parents=True)
    (left / "run.lock").write_text(json.dumps({"pid": 2**22 + 1, "host": socket.gethostname(), "since": "x"}))
    assert Pipeline(wanda_config, run_dir=left, progress=False).run().ok


# ---------------------------------------------------------------- 5, 6, 7: bad configs, before any work


def test_an_empty_set_value_is_a_usage_error(config_path, tmp_path, capsys):
    assert main_code(["run", str(config_path), "--set", "target_sparsity=", "--run-dir", str(tmp_path / "r")]) == 2
    assert "'target_sparsity' has no value" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    with pytest.raises(ConfigError, match="target_sparsity has no value"):
        PruningConfig().with_overrides({"target_sparsity": None})


def main_code(argv):
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def test_null_and_duplicate_keys_in_yaml_are_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: wanda\ntarget_sparsity: null\n")
    with pytest.raises(ConfigError, match="target_sparsity"):
        PruningConfig.from_file(path)
    path.write_text("method: wanda\ntarget_sparsity: 0.3\ncalibration:\n  num_samples: 4\n  num_samples: 8\n")
    with pytest.raises(ConfigError, match=r"key 'num_samples' appears twice \(first at line 4\)"):
        PruningConfig.from_file(path)
    assert yaml.safe_load("a: 1\na: 2\n") == {"a": 2}  # what yaml alone would have done


@pytest.mark.parametrize("field", ["targets", "ignore"])
def test_an_invalid_regex_is_a_config_error_before_any_folder(config_path, tmp_path, field, capsys):
    run_dir = tmp_path / "r"
    assert main(["run", str(config_path), "--set", f"{field}=['re:(unclosed']", "--run-dir", str(run_dir)]) == 3
    assert f"{field}[0] 're:(unclosed' is not a valid regular expression" in capsys.readouterr().err
    assert not run_dir.exists()


def test_calibration_larger_than_memory_is_refused_before_work(config_path, tmp_path, capsys):
    run_dir = tmp_path / "r"
    assert main(["run", str(config_path), "--set", "calibration.num_samples=10000000", "--set",
                 "calibration.sequence_length=256", "--run-dir", str(run_dir), "--no-progress"]) == 3
    err = capsys.readouterr().err
    assert "calibration.num_samples=10000000" in err and "GiB available: use at most" in err
    assert not (run_dir / "manifest.json").exists()


# ---------------------------------------------------------------- 8 (and issue 28, item 4): changes on resume


def test_a_gate_failed_run_resumes_with_relaxed_gates_without_recomputing_masks(wanda_config, tmp_path,
                                                                                 monkeypatch, capsys):
    strict = wanda_config.with_evaluation(wanda_config.evaluation.model_copy(update={
        "gates": wanda_config.evaluation.gates.model_copy(update={"max_perplexity": 1.0001})}))
    run_dir = tmp_path / "run"
    result = Pipeline(strict, run_dir=run_dir, progress=False).run()
    assert result.stage is PruningStage.FAILED and result.failure.reason == "quality_gate"
    masks = folder_hashes(run_dir / "artifacts" / "masks")
    with pytest.raises(CheckpointError, match="failed its quality gate.*--set evaluation.gates"):
        Pipeline.resume(run_dir, progress=False)
    with pytest.raises(CheckpointError, match="'target_sparsity' shapes Pruning"):
        Pipeline.resume(run_dir, overrides={"evaluation.gates.on_fail": "warn", "target_sparsity": 0.6},
                        progress=False)

    def no_pruning(ctx):
        raise AssertionError("the masks are recorded: nothing is pruned again")

    for stage in (PruningStage.CALIBRATING, PruningStage.COMPUTING_IMPORTANCE, PruningStage.PRUNING):
        monkeypatch.setitem(HANDLERS, stage, no_pruning)
    assert main(["resume", str(run_dir), "--set", "evaluation.gates.max_perplexity=null", "--no-progress"]) == 0
    assert folder_hashes(run_dir / "artifacts" / "masks") == masks
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert "config changed (evaluation.gates.max_perplexity" in manifest["resumes"][-1]["note"]
    records = [json.loads(x) for x in (run_dir / "audit.jsonl").read_text().splitlines()]
    assert [r["dest"] for r in records[-4:]] == ["idle", "evaluating", "exporting", "complete"]
    assert records[-3]["trigger"] == "resume_evaluating"
    assert main(["audit", str(run_dir)]) == 0
    capsys.readouterr()


# ---------------------------------------------------------------- 10, 12: paths and messages


def test_a_name_longer_than_the_file_system_allows_is_a_message(config_path, tmp_path, capsys):
    long_dir = str(tmp_path / ("x" * 300))
    for argv in (["run", str(config_path), "--run-dir", long_dir], ["status", long_dir], ["audit", long_dir],
                 ["resume", long_dir]):
        assert main(argv) == 3, argv
        assert "bytes long; a file system allows 255 bytes per name" in capsys.readouterr().err


def test_status_marks_the_stage_that_failed(tmp_path, wanda_config, monkeypatch, capsys):
    def boom(ctx):
        raise RuntimeError("boom")

    monkeypatch.setitem(HANDLERS, PruningStage.EVALUATING, boom)
    run_dir = tmp_path / "run"
    assert Pipeline(wanda_config, run_dir=run_dir, progress=False).run().stage is PruningStage.FAILED
    assert main(["status", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "❌ Evaluating  (failed here)" in out and "✅ Evaluating" not in out and "✅ Fine-tuning" in out


def test_compare_names_the_evaluation_text_and_warns_when_they_differ(finished, tmp_path, wanda_config, corpus,
                                                                       capsys):
    other = tmp_path / "other.txt"
    other.write_text(corpus.read_text()[::-1])
    cfg = wanda_config.with_evaluation(wanda_config.evaluation.model_copy(update={"dataset": str(other)}))
    assert Pipeline(cfg, run_dir=tmp_path / "b", progress=False).run().ok
    assert main(["compare", str(finished), str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "corpus.txt (4 × 64)" in out and "other.txt (4 × 64)" in out and "not comparable" in out


def test_a_model_path_that_is_a_file_and_a_config_that_is_a_folder_are_messages(tmp_path, capsys):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"not a folder")
    assert main(["run", "--model", str(weights), "--method", "magnitude", "--run-dir", str(tmp_path / "r")]) == 3
    err = capsys.readouterr().err
    assert "is a file; give the folder that holds its config.json" in err and "weights_only" not in err
    assert main(["run", str(tmp_path), "--run-dir", str(tmp_path / "r2")]) == 3
    assert "is a folder; give the YAML or JSON file inside it" in capsys.readouterr().err


def test_the_gguf_conversion_bar_follows_no_progress():
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    from podar.engine.models import _gguf_progress

    original = gguf_utils.tqdm
    with _gguf_progress(False):
        assert gguf_utils.tqdm(range(3)).disable
    with _gguf_progress(True):
        assert gguf_utils.tqdm is original
    assert gguf_utils.tqdm is original


def test_equal_artifacts_have_equal_bytes_whatever_order_safetensors_writes_metadata_in(tmp_path):
    """safetensors writes its metadata map in hash order (it differs call to call): a stage redone on resume would
    otherwise rewrite an artifact with other bytes, and the earlier result's digest in the log would break."""
    import torch
    from safetensors import safe_open

    from podar.engine.store import ArtifactKey, RunStore

    store = RunStore(tmp_path / "run")
    store.prepare()
    meta = {f"key{i}": f"välue {i}" for i in range(8)}
    tensors = {"nll": torch.arange(6.0).view(2, 3), "ids": torch.arange(4, dtype=torch.int32)}
    digests = {store.save_tensors(ArtifactKey("evaluating", "baseline", name=f"x{i}"), tensors,
                                  metadata=meta).sha256 for i in range(6)}
    assert len(digests) == 1
    with safe_open(str(store.run_dir / ArtifactKey("evaluating", "baseline", name="x0").relpath()), "pt") as f:
        assert f.metadata() == meta and torch.equal(f.get_tensor("nll"), tensors["nll"])
