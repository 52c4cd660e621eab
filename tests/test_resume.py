"""Restart after failure: kill the process at every checkpoint boundary and inside writes, resume, and get
exactly the same export (sha256-equal) as a run never interrupted. Plus each refusal of resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch
from helpers import fail_once
from safetensors.torch import load_file
from structlog.testing import capture_logs

from podar import CheckpointError, Pipeline, PruningStage, TinyModelConfig, tiny_llama, verify_audit
from podar.cli import main
from podar.engine import faults
from podar.engine.audit import read_audit
from podar.engine.store import RunStore, sha256_file
from podar.stages import HANDLERS


@pytest.fixture
def resume_config(tiny_config):
    """Wanda (sub-layer sequential: eight layer groups over two blocks) with fine-tuning: every kind of
    checkpoint happens."""
    return tiny_config.with_method("wanda").with_finetune(
        tiny_config.finetune.model_copy(update={"enabled": True, "steps": 2})).with_calibration(
        tiny_config.calibration.model_copy(update={"granularity": "sublayer"}))


def export_hashes(run_dir):
    export = run_dir / "export"
    return {str(p.relative_to(export)): sha256_file(p) for p in sorted(export.rglob("*")) if p.is_file()}


@pytest.fixture
def reference(resume_config, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    assert Pipeline(resume_config, run_dir=run_dir, progress=False).run().ok
    return export_hashes(run_dir)


def run_cli(config_path, run_dir, fault):
    env = {**os.environ, faults.ENV: fault, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "podar.cli", "run", str(config_path), "--run-dir", str(run_dir),
                           "--no-progress"], env=env, capture_output=True, text=True, timeout=300)


def reference_and_killed(cfg, tmp_path, fault):
    """The run of ``cfg`` never interrupted (tmp_path/ref, its pipeline returned), and the same run from the
    command line killed by ``fault`` (tmp_path/run)."""
    ref = Pipeline(cfg, run_dir=tmp_path / "ref", progress=False)
    assert ref.run().ok
    config_path = tmp_path / "c.yaml"
    config_path.write_text(cfg.to_yaml())
    proc = run_cli(config_path, tmp_path / "run", fault)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    return ref


KILL_POINTS = [
    "kill@after:calibrating#1", "kill@after:computing_importance#1", "kill@after:pruning#1",  # layer group 0
    "kill@after:calibrating#2", "kill@after:pruning#2",  # inside Calibrating's loop, after group 1
    "kill@after:fine_tuning#1", "kill@after:evaluating#1", "kill@after:exporting#1",
    "kill@write:artifact#1", "kill@write:artifact#4",  # inside an artifact write (temp file not yet renamed)
    "kill@write:manifest#2", "kill@write:manifest#6", "kill@write:manifest#15",  # inside the manifest write
]


@pytest.mark.parametrize("compute_dtype", ["model", "bfloat16"])
@pytest.mark.parametrize("fault", ["kill@after:pruning#1", "kill@after:calibrating#2"])
def test_block_granularity_resumes_to_identical_export(fault, compute_dtype, resume_config, tmp_path):
    """The fixture walks blocks site by site; the reference block-by-block mode resumes just as exactly, also
    with bf16 calibration forwards (the resumed run replays the pruned blocks in bf16 as the first run did)."""
    cfg = resume_config.with_overrides({"calibration.walk": "block", "runtime.compute_dtype": compute_dtype})
    assert Pipeline(cfg, run_dir=tmp_path / "ref", progress=False).run().ok
    config_path = tmp_path / "c.yaml"
    config_path.write_text(cfg.to_yaml())
    proc = run_cli(config_path, tmp_path / "run", fault)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert Pipeline.resume(tmp_path / "run", progress=False).run().ok
    assert export_hashes(tmp_path / "run") == export_hashes(tmp_path / "ref")


def test_killed_before_first_manifest_is_rerun(resume_config, reference, tmp_path):
    config_path = tmp_path / "c.yaml"
    config_path.write_text(resume_config.to_yaml())
    run_dir = tmp_path / "run"
    assert run_cli(config_path, run_dir, "kill@write:manifest#1").returncode == -signal.SIGKILL
    with pytest.raises(CheckpointError, match="never wrote its first checkpoint.*start it again"):
        Pipeline.resume(run_dir, progress=False)
    assert Pipeline(resume_config, run_dir=run_dir, progress=False).run().ok  # the stale lock is taken over
    assert export_hashes(run_dir) == reference


@pytest.mark.parametrize("fault", KILL_POINTS)
def test_sigkill_then_resume_gives_identical_export(fault, resume_config, reference, tmp_path):
    config_path = tmp_path / "c.yaml"
    config_path.write_text(resume_config.to_yaml())
    run_dir = tmp_path / "run"
    proc = run_cli(config_path, run_dir, fault)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (run_dir / "run.lock").exists()  # the dead process left its lock behind
    with capture_logs() as logs:
        result = Pipeline.resume(run_dir, progress=False).run()
    assert result.ok, result.failure
    assert any(e["event"] == "stale_lock_taken_over" for e in logs)
    assert export_hashes(run_dir) == reference
    manifest = RunStore(run_dir).read_manifest()
    verify_audit(run_dir / "audit.jsonl", manifest.run_id, manifest.history)
    assert [r["event"] for r in read_audit(run_dir / "audit.jsonl")].count("resumed") == 1
    assert len(manifest.resumes) == 1


def test_ctrl_c_fails_interrupted_and_resumes(resume_config, reference, tmp_path, monkeypatch):
    monkeypatch.setenv(faults.ENV, "interrupt@after:pruning#1")
    faults.reset()
    run_dir = tmp_path / "run"
    result = Pipeline(resume_config, run_dir=run_dir, progress=False).run()
    assert result.stage is PruningStage.FAILED and result.failure.reason == "interrupted"
    monkeypatch.delenv(faults.ENV)
    assert Pipeline.resume(run_dir, progress=False).run().ok
    assert export_hashes(run_dir) == reference


def test_full_disk_fails_then_resumes(resume_config, reference, tmp_path, monkeypatch):
    monkeypatch.setenv(faults.ENV, "enospc@write:artifact#2")
    faults.reset()
    run_dir = tmp_path / "run"
    result = Pipeline(resume_config, run_dir=run_dir, progress=False).run()
    assert result.stage is PruningStage.FAILED
    assert result.failure.type == "OSError" and "No space left" in result.failure.message
    assert not [p for p in (run_dir / "artifacts").rglob("*.tmp")]  # the failed write left no temp file
    monkeypatch.delenv(faults.ENV)
    assert Pipeline.resume(run_dir, progress=False).run().ok
    assert export_hashes(run_dir) == reference


def test_raising_handler_then_resume(resume_config, reference, tmp_path, monkeypatch):
    calls = fail_once(monkeypatch, PruningStage.EVALUATING, on_call=1)
    run_dir = tmp_path / "run"
    assert Pipeline(resume_config, run_dir=run_dir, progress=False).run().stage is PruningStage.FAILED
    result = Pipeline.resume(run_dir, progress=False).run()
    assert result.ok and len(calls) == 2
    assert export_hashes(run_dir) == reference
    records = read_audit(run_dir / "audit.jsonl")
    resumed = [r for r in records if r["event"] == "resumed"]
    assert resumed[0]["source"] == "failed" and records[resumed[0]["seq"] + 1]["trigger"] == "resume_evaluating"


@pytest.fixture
def failed_run(resume_config, tmp_path, monkeypatch):
    """A run that failed in Fine-tuning (after both pruning groups were checkpointed)."""

    def boom(ctx):
        raise RuntimeError("boom")

    monkeypatch.setitem(HANDLERS, PruningStage.FINE_TUNING, boom)
    run_dir = tmp_path / "run"
    assert Pipeline(resume_config, run_dir=run_dir, progress=False).run().stage is PruningStage.FAILED
    monkeypatch.undo()
    return run_dir


def test_resume_refuses_changed_config(failed_run, resume_config):
    changed = resume_config.with_evaluation(resume_config.evaluation.model_copy(update={"max_windows": 3}))
    with pytest.raises(CheckpointError, match=r"config differs.*evaluation.max_windows.*allow_config_change"):
        Pipeline.resume(failed_run, config=changed, progress=False)
    result = Pipeline.resume(failed_run, config=changed, allow_config_change=True, progress=False).run()
    assert result.ok and result.metrics["evaluating"]["windows"] == 3
    manifest = RunStore(failed_run).read_manifest()
    assert manifest.config_sha256 == changed.sha256()
    assert "config changed (evaluation.max_windows" in str(manifest.resumes[-1]["note"])
    assert (failed_run / "config.yaml").read_text() == changed.to_yaml()  # the copy follows the config
    assert main(["audit", str(failed_run)]) == 0


def test_a_config_change_that_can_no_longer_take_effect_is_refused(failed_run, resume_config):
    """Issue 27, item 8: the masks are kept on resume, so a new target sparsity or ignore list would be recorded
    but never applied — refused even with allow_config_change, naming the field and the stage."""
    for changed in (resume_config.with_target_sparsity(0.6),
                    resume_config.with_targets(("Linear",), ignore=("re:.*lm_head", "re:.*v_proj"))):
        with pytest.raises(CheckpointError, match=r"config field .*'(target_sparsity|ignore)' shapes "
                                                  r"Pruning.*cannot take effect"):
            Pipeline.resume(failed_run, config=changed, allow_config_change=True, progress=False)
    with pytest.raises(CheckpointError, match="'calibration.num_samples' shapes Pruning"):
        Pipeline.resume(failed_run, overrides={"calibration.num_samples": 8}, progress=False)
    assert RunStore(failed_run).read_manifest().config_sha256 == resume_config.sha256()


def test_resume_refuses_different_model(failed_run):
    model, tok = tiny_llama(TinyModelConfig())
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] += 1.0
    with pytest.raises(CheckpointError, match="weights hash.*allow_model_change"):
        Pipeline.resume(failed_run, model=model, tokenizer=tok, progress=False).run()
    assert not (failed_run / "run.lock").exists()


def test_resume_refuses_changed_data(resume_config, tmp_path, corpus):
    copy = tmp_path / "corpus.txt"
    copy.write_text(corpus.read_text())
    cfg = resume_config.with_calibration(resume_config.calibration.model_copy(update={"dataset": str(copy)}))
    cfg = cfg.with_finetune(cfg.finetune.model_copy(update={"enabled": False}))
    run_dir = tmp_path / "run"
    os.environ[faults.ENV] = "interrupt@after:pruning#1"
    faults.reset()
    try:
        assert Pipeline(cfg, run_dir=run_dir, progress=False).run().stage is PruningStage.FAILED
    finally:
        del os.environ[faults.ENV]
    copy.write_text(corpus.read_text() + "\nan extra line changes the calibration text .")
    with pytest.raises(CheckpointError, match="calibration text's sha256.*allow_data_change"):
        Pipeline.resume(run_dir, progress=False).run()


def test_resume_refuses_corrupted_artifact_naming_it(failed_run):
    path = failed_run / "artifacts/masks/round000_group000.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"artifacts/masks/round000_group000\.safetensors.*sha256"):
        Pipeline.resume(failed_run, progress=False).run()


def test_resume_refuses_missing_artifact_naming_it(failed_run):
    (failed_run / "artifacts/masks/round000_group001.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"round000_group001\.safetensors.*missing"):
        Pipeline.resume(failed_run, progress=False).run()


def test_resume_refuses_tampered_audit(failed_run):
    audit = failed_run / "audit.jsonl"
    lines = audit.read_text().splitlines()
    del lines[1]
    audit.write_text("\n".join(lines) + "\n")
    with pytest.raises(CheckpointError, match="audit log does not verify"):
        Pipeline.resume(failed_run, progress=False).run()


def test_resume_refuses_complete_run(resume_config, tmp_path):
    run_dir = tmp_path / "run"
    assert Pipeline(resume_config, run_dir=run_dir, progress=False).run().ok
    with pytest.raises(CheckpointError, match="Complete; there is nothing to resume"):
        Pipeline.resume(run_dir, progress=False).run()


def test_resume_refuses_while_another_process_holds_the_lock(failed_run):
    import json
    import socket

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (failed_run / "run.lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(),
                                                         "since": "t"}))
        with pytest.raises(CheckpointError, match=f"locked by pid {holder.pid} on host {socket.gethostname()}"):
            Pipeline.resume(failed_run, progress=False).run()
    finally:
        holder.kill()
        holder.wait()
    # the holder is dead now: its lock is stale and taken over
    with capture_logs() as logs:
        assert Pipeline.resume(failed_run, progress=False).run().ok
    assert any(e["event"] == "stale_lock_taken_over" for e in logs)


def test_partial_audit_line_is_dropped_on_resume(failed_run):
    audit = failed_run / "audit.jsonl"
    with open(audit, "a") as f:
        f.write('{"run_id": "half a line')
    with capture_logs() as logs:
        assert Pipeline.resume(failed_run, progress=False).run().ok
    assert any(e["event"] == "audit_partial_line_dropped" for e in logs)
    manifest = RunStore(failed_run).read_manifest()
    verify_audit(audit, manifest.run_id, manifest.history)


def test_manifest_is_written_once_per_move(resume_config, tmp_path, monkeypatch):
    """The first manifest, one per checkpointed stage, and the move into Complete: no write before a handler."""
    writes = []
    original = RunStore.write_manifest

    def counting(self, manifest):
        writes.append(manifest.state)
        original(self, manifest)

    monkeypatch.setattr(RunStore, "write_manifest", counting)
    assert Pipeline(resume_config, run_dir=tmp_path / "run", progress=False).run().ok
    manifest = RunStore(tmp_path / "run").read_manifest()
    assert len(writes) == 1 + len(manifest.results) + 1
    assert writes[0] == PruningStage.IDLE.value and writes[-1] == PruningStage.COMPLETE.value
    assert len(manifest.history) == len(manifest.results) + 1  # every move but the last ran a handler


def test_status_shows_the_stage_at_work_from_the_audit_log(resume_config, tmp_path, capsys):
    from podar.cli import main

    config_path = tmp_path / "c.yaml"
    config_path.write_text(resume_config.to_yaml())
    run_dir = tmp_path / "run"
    assert run_cli(config_path, run_dir, "kill@write:artifact#4").returncode == -signal.SIGKILL
    written = RunStore(run_dir).read_manifest().state
    moves = [r for r in read_audit(run_dir / "audit.jsonl") if r.get("event") == "transition"]
    assert moves[-1]["dest"] != written  # killed inside a stage: its checkpoint was never written
    assert main(["status", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert f"state {moves[-1]['dest']}" in out and f"last checkpoint at {written}" in out
    assert f"🟢 {PruningStage(moves[-1]['dest']).display}" in out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="file mappings are read from /proc/self/maps")
def test_resume_maps_the_pruned_weights_and_exports_the_same(tiny_config, tmp_path):
    """A SparseGPT run killed inside its walk restores the pruned groups' OBS-updated weights from the weights
    checkpoints, mapped from the files, not copied, and ends with the same export as a run never interrupted."""
    from podar.engine.memory import file_backed_ranges

    cfg = tiny_config.with_method("sparsegpt").with_calibration(  # site by site: 8 groups on the tiny model
        tiny_config.calibration.model_copy(update={"walk": "site"}))
    assert Pipeline(cfg, run_dir=tmp_path / "ref", progress=False).run().ok
    config_path = tmp_path / "c.yaml"
    config_path.write_text(cfg.to_yaml())
    proc = run_cli(config_path, tmp_path / "run", "kill@after:pruning#3")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    pipe = Pipeline.resume(tmp_path / "run", progress=False)
    pipe.step()  # Idle → the stage to redo: the checkpointed groups' weights are restored by now
    restored = [r for r in RunStore(tmp_path / "run").read_manifest().artifacts.values()
                if r.kind == "weights" and r.stage == "pruning"]
    assert len(restored) == 3
    ranges = file_backed_ranges()
    modules = dict(pipe.context.model.named_modules())
    names = set().union(*(load_file(tmp_path / "run" / r.path).keys() for r in restored))
    for name in names:
        ptr = modules[name].weight.data_ptr()
        assert any(a <= ptr < b for a, b in ranges), f"{name} was copied, not mapped"
    assert pipe.run().ok
    assert export_hashes(tmp_path / "run") == export_hashes(tmp_path / "ref")


def test_wanda_records_masks_only_and_resumes_from_them(tiny_config, tmp_path):
    """Wanda changes no kept weight: its groups checkpoint their masks only (on every device); a run killed inside
    its walk applies them to the freshly loaded model and ends with the same export as a run never interrupted."""
    cfg = tiny_config.with_method("wanda").with_calibration(tiny_config.calibration.model_copy(update={"walk": "site"}))
    assert Pipeline(cfg, run_dir=tmp_path / "ref", progress=False).run().ok
    config_path = tmp_path / "c.yaml"
    config_path.write_text(cfg.to_yaml())
    proc = run_cli(config_path, tmp_path / "run", "kill@after:pruning#3")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    kinds = [r.kind for r in RunStore(tmp_path / "run").read_manifest().artifacts.values() if r.stage == "pruning"]
    assert kinds == ["masks"] * 3
    pipe = Pipeline.resume(tmp_path / "run", progress=False)
    pipe.step()
    dense = pipe.context.state.dense_weights
    for name, mask in pipe.context.state.masks.items():
        w = pipe.context.state.targets[name].weight.detach()
        assert torch.equal(w, dense[name].masked_fill(~mask, 0.0)), name
    assert pipe.run().ok
    assert export_hashes(tmp_path / "run") == export_hashes(tmp_path / "ref")


def test_masks_only_checkpoints_resume_to_identical_export(tiny_config, tmp_path):
    """Magnitude records its masks only (no weights): a resumed run applies them to the freshly loaded model and
    ends with the same export (fine-tuning included) as a run never interrupted."""
    cfg = tiny_config.with_method("magnitude").with_finetune(
        tiny_config.finetune.model_copy(update={"enabled": True, "steps": 2}))
    assert Pipeline(cfg, run_dir=tmp_path / "ref", progress=False).run().ok
    config_path = tmp_path / "c.yaml"
    config_path.write_text(cfg.to_yaml())
    proc = run_cli(config_path, tmp_path / "run", "kill@after:pruning#1")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    kinds = {r.kind for r in RunStore(tmp_path / "run").read_manifest().artifacts.values() if r.stage == "pruning"}
    assert kinds == {"masks"}
    assert Pipeline.resume(tmp_path / "run", progress=False).run().ok
    assert export_hashes(tmp_path / "run") == export_hashes(tmp_path / "ref")


def test_a_model_from_files_is_referenced_not_copied_and_resumes(tiny_config, tmp_path):
    """A model loaded from a save_pretrained folder: the dense reference reads the model's own safetensors file
    (recorded by sha256, no copy in the run folder); a run killed mid-walk resumes from it to the same export.
    A model changed in memory after loading is copied instead."""
    from podar import ModelSourceConfig
    from podar.engine.models import tiny_model

    model, tok = tiny_model(tiny_config.model.tiny)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    cfg = tiny_config.with_method("wanda").with_model(ModelSourceConfig(kind="hf", name=str(folder)))
    assert Pipeline(cfg, run_dir=tmp_path / "ref", progress=False).run().ok
    manifest = RunStore(tmp_path / "ref").read_manifest()
    assert list(manifest.dense_reference_files) == [str(folder / "model.safetensors")]
    assert manifest.dense_reference_files[str(folder / "model.safetensors")] == sha256_file(folder /
                                                                                           "model.safetensors")
    assert not [a for a in manifest.artifacts.values() if a.stage == "idle"]  # nothing copied
    config_path = tmp_path / "c.yaml"
    config_path.write_text(cfg.to_yaml())
    proc = run_cli(config_path, tmp_path / "run", "kill@after:pruning#1")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert Pipeline.resume(tmp_path / "run", progress=False).run().ok
    assert export_hashes(tmp_path / "run") == export_hashes(tmp_path / "ref")
    loaded, tok2 = __import__("podar").load_model(cfg.model)
    with torch.no_grad():
        loaded.model.layers[0].mlp.up_proj.weight.mul_(0.5)  # changed after loading: not what the file holds
    pipe = Pipeline(cfg, run_dir=tmp_path / "changed", model=loaded, tokenizer=tok2, progress=False)
    assert pipe.run().ok
    copied = [a for a in RunStore(tmp_path / "changed").read_manifest().artifacts.values() if a.stage == "idle"]
    parts = set().union(*(load_file(tmp_path / "changed" / a.path).keys() for a in copied))
    assert parts == {"model.layers.0.mlp.up_proj"}


def test_joint_quantization_resumes_on_its_recorded_grid(tiny_config, tmp_path):
    """SparseGPT with joint W4A16 quantization records each group's scales beside its weights; a run killed after
    the first group resumes with them, and exports the same bytes as a run never interrupted, every quantized
    weight on the grid its solve chose (the export's scales are the recorded ones, not found again)."""
    from podar import ExportConfig, load_pretrained
    from podar.stages.quantize import WeightQuant, dequantize, quantize

    walk = tiny_config.calibration.model_copy(update={"walk": "block"})
    cfg = tiny_config.with_export(ExportConfig(quantization="w4a16", group_size=32)).with_calibration(walk)
    cfg = cfg.with_method({"name": "sparsegpt", "joint_quantization": True})
    ref = reference_and_killed(cfg, tmp_path, "kill@after:pruning#1")
    kinds = sorted(r.kind for r in RunStore(tmp_path / "run").read_manifest().artifacts.values()
                   if r.stage == "pruning")
    assert kinds == ["masks", "scales", "weights"]
    assert Pipeline.resume(tmp_path / "run", progress=False).run().ok
    assert export_hashes(tmp_path / "run") == export_hashes(tmp_path / "ref")
    spec = WeightQuant(4, 32)
    reloaded = load_pretrained(tmp_path / "ref" / "export", dtype=torch.float32)
    for name, module in ref.context.state.targets.items():
        scale = ref.context.state.quant_scales[name]
        w = module.weight.detach()
        assert torch.equal(dequantize(quantize(w, scale, spec), scale, spec), w), name  # already on its grid
        assert torch.equal(reloaded.get_submodule(name).weight, w), name
