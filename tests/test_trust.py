"""The run folder as a trust boundary (issue 19): one test per case found by trying podar as a careless or
hostile colleague would. Audit detects every edit, deletion, reorder or append, tells a live or killed run from a
tampered one, and with a key detects a fully recomputed chain; resume reads only what the manifest recorded,
inside the folder; faults give messages, not tracebacks."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from helpers import make_tiny_config
from safetensors import safe_open
from safetensors.torch import save_file
from structlog.testing import capture_logs

from podar import CheckpointError, ConfigError, DataError, ModelLoadError, Pipeline, PruningConfig, PruningStage
from podar.cli import main
from podar.engine import faults
from podar.engine.audit import KEY_ENV, line_sha, mac_of
from podar.engine.store import RunStore, sha256_file


def run_cli(args, env=None, timeout=300):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "podar.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, corpus):
    """A Complete magnitude run of the tiny model (copied by each test that edits it)."""
    run_dir = tmp_path_factory.mktemp("done") / "run"
    assert Pipeline(make_tiny_config(corpus), run_dir=run_dir, progress=False).run().ok
    return run_dir


@pytest.fixture
def done(finished, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    return copy


def audit(run_dir, *extra):
    return main(["audit", str(run_dir), *extra])


def lines(run_dir):
    return (run_dir / "audit.jsonl").read_text().splitlines()


def write_lines(run_dir, rows):
    (run_dir / "audit.jsonl").write_text("\n".join(rows) + "\n")


def rechain(rows, start, key=None):
    """Recompute prev_sha256 (and MACs, with a key) from line ``start`` on: what a forger would do."""
    out = list(rows[:start])
    for row in rows[start:]:
        rec = json.loads(row)
        rec["prev_sha256"] = line_sha(out[-1]) if out else rec["prev_sha256"]
        if key is not None:
            rec["mac"] = mac_of(rec, key)
        out.append(json.dumps(rec, sort_keys=True))
    return out


def edit_manifest(run_dir, change):
    path = run_dir / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))


# ---------------------------------------------------------------- audit


def test_a_complete_run_audits_ok_and_its_head_is_printed(done, capsys):
    assert audit(done) == 0
    out = capsys.readouterr().out
    assert "audit OK" in out and "manifest matches the log" in out
    head = line_sha(lines(done)[-1])
    assert f"head sha256: {head}" in out
    assert audit(done, "--expect-head", head) == 0


def test_an_edit_of_the_last_record_is_detected(done, capsys):
    rows = lines(done)
    rec = json.loads(rows[-1])
    rec["duration_s"] = 0.001  # a field nothing else in the log depends on
    rows[-1] = json.dumps(rec, sort_keys=True)
    write_lines(done, rows)
    assert audit(done) == 4
    assert "head" in capsys.readouterr().err


def test_a_middle_record_edited_with_the_chain_recomputed_after_it_is_detected(done, capsys):
    rows = lines(done)
    rec = json.loads(rows[2])
    rec["duration_s"] = 0.001
    rows[2] = json.dumps(rec, sort_keys=True)
    write_lines(done, rechain(rows, 3))
    assert audit(done) == 4
    capsys.readouterr()
    # the forger also moves the manifest's head: the record no longer matches the manifest's result
    edit_manifest(done, lambda m: m.update(audit_head_sha256=line_sha(lines(done)[-1])))
    assert audit(done) == 4
    assert "seq 2" in capsys.readouterr().err


def test_changed_metrics_with_the_chain_and_head_recomputed_are_detected(done, capsys):
    rows = lines(done)
    i = next(i for i, r in enumerate(rows) if json.loads(r)["trigger"] == "evaluated")
    rec = json.loads(rows[i])
    rec["metrics"]["pruned_ppl"] = 1.01
    rows[i] = json.dumps(rec, sort_keys=True)
    rows = rechain(rows, i + 1)
    write_lines(done, rows)
    edit_manifest(done, lambda m: m.update(audit_head_sha256=line_sha(rows[-1])))
    assert audit(done) == 4
    assert "pruned_ppl" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["resumed", "note"])
def test_a_forged_record_appended_is_detected(done, capsys, kind):
    rows = lines(done)
    last = json.loads(rows[-1])
    forged = {**last, "event": kind, "seq": last["seq"] + 1, "trigger": "resume", "source": "complete",
              "dest": "idle", "prev_sha256": line_sha(rows[-1]), "metrics": {"note": "all good"}}
    write_lines(done, rows + [json.dumps(forged, sort_keys=True)])
    assert audit(done) == 4
    err = capsys.readouterr().err
    assert "seq 6" in err or "line 7" in err


def test_an_edited_manifest_metric_is_detected(done, capsys):
    def change(m):
        ev = next(r for r in m["results"] if r["stage"] == "evaluating")
        ev["metrics"]["pruned_ppl"] = 1.01

    edit_manifest(done, change)
    assert audit(done) == 4
    assert "Evaluating" in capsys.readouterr().err


def _forge_everything(run_dir, key):
    """What a forger who can rewrite the whole folder does: a stage's duration changed in the manifest and in its
    record, the result's digest, the chain, the head, the MACs (under the forger's own key) and the report all
    recomputed."""
    from podar.engine.audit import checkpoint_digest
    from podar.engine.store import manifest_mac
    from podar.schemas.records import RunManifest

    manifest = RunManifest.model_validate_json((run_dir / "manifest.json").read_text())
    manifest.results[0].duration_s = 0.5
    rows = lines(run_dir)
    rec = json.loads(rows[1])
    rec["duration_s"] = 0.5
    rec["result_sha256"] = checkpoint_digest(manifest.results[0], manifest.artifacts)
    rows[1] = json.dumps(rec, sort_keys=True)
    rows = rechain(rows, 1, key=key)
    write_lines(run_dir, rows)
    manifest.audit_head_sha256 = line_sha(rows[-1])
    manifest.mac = None
    manifest.mac = manifest_mac(manifest, key)
    (run_dir / "manifest.json").write_text(manifest.model_dump_json(indent=2))
    from podar.engine.report import write_report

    write_report(run_dir)  # and the report drawn again from the forged manifest


def test_with_a_key_a_fully_recomputed_chain_is_detected(tiny_config, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(KEY_ENV, "a secret kept elsewhere")
    run_dir = tmp_path / "run"
    assert Pipeline(tiny_config, run_dir=run_dir, progress=False).run().ok
    assert audit(run_dir) == 0
    assert "MACs valid" in capsys.readouterr().out
    head = line_sha(lines(run_dir)[-1])
    _forge_everything(run_dir, b"the forger's own key")
    assert audit(run_dir) == 4
    assert "MAC does not match" in capsys.readouterr().err
    monkeypatch.delenv(KEY_ENV)  # without the key: the limit of a hash chain, said in a note ...
    assert audit(run_dir) == 0
    assert "set PODAR_AUDIT_KEY to check them" in capsys.readouterr().err
    assert audit(run_dir, "--expect-head", head) == 4  # ... and closed by the head kept elsewhere
    assert "no line of this log" in capsys.readouterr().err


def test_a_run_killed_mid_stage_audits_as_interrupted_not_tampered(tiny_config, tmp_path, capsys):
    cfg = tiny_config.with_method("wanda")
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    proc = run_cli(["run", str(path), "--run-dir", str(tmp_path / "run"), "--no-progress"],
                   env={faults.ENV: "kill@write:artifact#2"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert audit(tmp_path / "run") == 5
    captured = capsys.readouterr()
    assert "run in progress or interrupted" in captured.out and "after the last checkpoint" in captured.err
    assert Pipeline.resume(tmp_path / "run", progress=False).run().ok
    assert audit(tmp_path / "run") == 0


def test_a_live_run_audits_as_in_progress(tiny_config, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(tiny_config.to_yaml())
    proc = subprocess.Popen([sys.executable, "-m", "podar.cli", "run", str(path), "--run-dir", str(tmp_path / "run"),
                             "--no-progress"], env={**os.environ, faults.ENV: "sleep@after:pruning#1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            if (tmp_path / "run" / "manifest.json").exists() and any(
                    r.stage == "pruning" for r in RunStore(tmp_path / "run").read_manifest().results):
                break
            time.sleep(0.1)
        assert audit(tmp_path / "run") == 5
        assert "locked by a live process" in capsys.readouterr().err
    finally:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------- resume reads only what it recorded


def _interrupted(tiny_config, tmp_path, method="wanda", fault="kill@after:pruning#1"):
    cfg = tiny_config.with_method(method).with_calibration(tiny_config.calibration.model_copy(update={"walk": "site"}))
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    run_dir = tmp_path / "run"
    proc = run_cli(["run", str(path), "--run-dir", str(run_dir), "--no-progress"], env={faults.ENV: fault})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    return cfg, run_dir


def test_resume_ignores_an_unrecorded_dense_reference_part_and_names_it(tiny_config, tmp_path):
    cfg, run_dir = _interrupted(tiny_config, tmp_path)
    part = run_dir / "artifacts/dense_reference/part-00000.safetensors"
    with safe_open(str(part), framework="pt") as f:
        first = next(iter(f.keys()))
        zeroed = {first: torch.zeros_like(f.get_tensor(first))}
    save_file(zeroed, str(part.with_name("part-00001.safetensors")))  # an extra part with a zeroed layer
    with capture_logs() as logs:
        pipe = Pipeline.resume(run_dir, progress=False)
        assert pipe.run().ok
    warned = [e for e in logs if e["event"] == "unrecorded_files_ignored"]
    assert warned and "artifacts/dense_reference/part-00001.safetensors" in warned[0]["files"]
    assert float(pipe.context.state.dense_weights[first].abs().sum()) > 0  # the recorded part, not the forged one
    reference = Pipeline(cfg, run_dir=tmp_path / "ref", progress=False).run()
    assert reference.ok
    assert sha256_file(run_dir / "export/model.safetensors") == sha256_file(tmp_path / "ref/export/model.safetensors")


def test_resume_refuses_a_record_path_leaving_the_folder(tiny_config, tmp_path):
    _cfg, run_dir = _interrupted(tiny_config, tmp_path)
    outside = tmp_path / "outside.safetensors"
    shutil.copy(run_dir / "artifacts/masks/round000_group000.safetensors", outside)

    def change(m):
        rec = m["artifacts"].pop("artifacts/masks/round000_group000.safetensors")
        rec["path"] = "../outside.safetensors"
        m["artifacts"]["../outside.safetensors"] = rec

    edit_manifest(run_dir, change)
    with pytest.raises(CheckpointError, match=r"'\.\./outside\.safetensors' is not a plain path inside the run"):
        Pipeline.resume(run_dir, progress=False).run()


def test_resume_refuses_a_symlinked_audit_log_and_writes_nothing_outside(tiny_config, tmp_path):
    _cfg, run_dir = _interrupted(tiny_config, tmp_path)
    elsewhere = tmp_path / "elsewhere.jsonl"
    shutil.move(run_dir / "audit.jsonl", elsewhere)
    (run_dir / "audit.jsonl").symlink_to(elsewhere)
    before = elsewhere.read_bytes()
    with pytest.raises(CheckpointError, match="symbolic link"):
        Pipeline.resume(run_dir, progress=False).run()
    assert elsewhere.read_bytes() == before


def test_resume_refuses_a_forged_legal_transition_appended_to_an_interrupted_run(tiny_config, tmp_path):
    _cfg, run_dir = _interrupted(tiny_config, tmp_path, fault="kill@after:pruning#2")
    rows = lines(run_dir)
    last = json.loads(rows[-1])
    # a legal move out of the manifest's state, but not the one the run makes next (more groups remain)
    forged = {**last, "seq": last["seq"] + 1, "trigger": "pruned", "source": "pruning", "dest": "fine_tuning",
              "prev_sha256": line_sha(rows[-1]), "result_sha256": None}
    if last["dest"] != "pruning":  # the killed run already recorded its next move: forge from where it stands
        pytest.skip("the kill left a move beyond the checkpoint")
    write_lines(run_dir, rows + [json.dumps(forged, sort_keys=True)])
    with pytest.raises(CheckpointError, match="not the run's next move"):
        Pipeline.resume(run_dir, progress=False).run()
    assert audit(run_dir) == 4


def test_an_unreadable_lock_of_a_live_holder_is_not_taken_over(tiny_config, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lock = run_dir / "run.lock"
    lock.write_bytes(b"\x00garbage")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(lock)!r}, os.O_RDWR)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('locked', flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CheckpointError, match="locked by a live process whose details cannot be read"):
            Pipeline(tiny_config, run_dir=run_dir, progress=False).run()
        assert lock.read_bytes() == b"\x00garbage"  # not rewritten
    finally:
        holder.kill()
        holder.wait()
    with capture_logs() as logs:  # the holder is gone: its lock is stale now
        assert Pipeline(tiny_config, run_dir=run_dir, progress=False).run().ok
    assert any(e["event"] == "stale_lock_taken_over" and e["previous"] == {"unreadable": True} for e in logs)


# ---------------------------------------------------------------- faults get messages


def test_a_read_only_run_folder_is_a_message(tiny_config, tmp_path, monkeypatch):
    from podar.engine import store

    real = os.open

    def read_only(path, flags, *args):
        if str(path).endswith("run.lock"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real(path, flags, *args)

    monkeypatch.setattr(store.os, "open", read_only)
    with pytest.raises(CheckpointError, match="cannot create the lock .*Read-only file system.*writable --run-dir"):
        Pipeline(tiny_config, run_dir=tmp_path / "run", progress=False).run()


def test_a_full_disk_before_the_first_checkpoint_is_a_message(tiny_config, tmp_path, monkeypatch):
    from safetensors import SafetensorError

    from podar.stages import targets

    def full(*_args, **_kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(targets, "save_file", full)
    with pytest.raises(CheckpointError, match="could not write the dense reference.*disk full"):
        Pipeline(tiny_config, run_dir=tmp_path / "run", progress=False).run()
    assert not (tmp_path / "run" / "run.lock").exists()


def test_a_text_that_is_not_utf8_names_the_file(tiny_config, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 ".encode("latin-1") * 2000)
    cfg = tiny_config.with_method("wanda").with_calibration(
        tiny_config.calibration.model_copy(update={"dataset": str(bad)}))
    with pytest.raises(DataError, match=r"calibration\.dataset: '.*latin1\.txt' is not UTF-8"):
        Pipeline(cfg, run_dir=tmp_path / "run", progress=False).run()


def test_an_empty_calibration_text_names_the_field(tiny_config, tmp_path):
    blank = tmp_path / "blank.txt"
    blank.write_text("   \n\n")
    cfg = tiny_config.with_method("wanda").with_calibration(
        tiny_config.calibration.model_copy(update={"dataset": str(blank)}))
    with pytest.raises(DataError, match=r"calibration\.dataset: the text is empty"):
        Pipeline(cfg, run_dir=tmp_path / "run", progress=False).run()


def test_a_tiny_model_whose_heads_do_not_divide_it_is_a_config_error():
    with pytest.raises(ConfigError, match=r"model\.tiny\.hidden_size=60 is not divisible by num_attention_heads=8"):
        PruningConfig.from_dict({"model": {"kind": "tiny", "tiny": {"hidden_size": 60, "num_attention_heads": 8}}})


def test_a_model_path_that_does_not_exist_is_podars_message(tiny_config, tmp_path):
    cfg = tiny_config.with_model(tiny_config.model.model_copy(update={"kind": "hf", "name": str(tmp_path / "nope")}))
    with pytest.raises(ModelLoadError, match=r"model\.name '.*nope' \(kind hf\) is not a folder that exists"):
        Pipeline(cfg, run_dir=tmp_path / "run", progress=False).run()


def test_a_sequence_longer_than_the_models_positions_is_refused_before_work(tiny_config, tmp_path):
    cfg = tiny_config.with_evaluation(tiny_config.evaluation.model_copy(update={"sequence_length": 1024}))
    with pytest.raises(ConfigError, match=r"evaluation\.sequence_length=1024 is longer than the model's 512"):
        Pipeline(cfg, run_dir=tmp_path / "run", progress=False).run()
    assert not (tmp_path / "run" / "manifest.json").exists()


def test_a_shard_size_that_is_not_a_size_fails_validation():
    with pytest.raises(ConfigError, match=r"export\.max_shard_size.*'lots' is not a size"):
        PruningConfig.from_dict({"export": {"max_shard_size": "lots"}})


def test_sigterm_ends_failed_terminated_releases_the_lock_and_resumes(tiny_config, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(tiny_config.to_yaml())
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "podar.cli", "run", str(path), "--run-dir", str(run_dir),
                             "--no-progress"], env={**os.environ, faults.ENV: "sleep@after:pruning#1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(600):
        if run_dir.joinpath("manifest.json").exists() and any(
                r.stage == "pruning" for r in RunStore(run_dir).read_manifest().results):
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-2000:]
    manifest = RunStore(run_dir).read_manifest()
    assert manifest.state == PruningStage.FAILED.value and manifest.failure.reason == "terminated"
    assert not (run_dir / "run.lock").exists()
    assert Pipeline.resume(run_dir, progress=False).run().ok
    assert main(["audit", str(run_dir)]) == 0


def test_the_lock_names_its_holder_and_host(tiny_config, tmp_path):
    run_dir = tmp_path / "run"
    pipe = Pipeline(tiny_config, run_dir=run_dir, progress=False)
    pipe.step()
    try:
        holder = json.loads((run_dir / "run.lock").read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(CheckpointError, match=f"locked by pid {os.getpid()}"):
            Pipeline.resume(run_dir, progress=False).run()
    finally:
        pipe.run()
