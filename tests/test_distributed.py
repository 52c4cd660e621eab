"""Several processes (issue 22): two CPU processes (torchrun, gloo) give the masks of one process — bit for bit
for magnitude and Wanda, equal on these models for SparseGPT (whose Σ x xᵀ sums are added over processes) —
with one writer; a two-process run killed mid-calibration resumes (with two processes) to the same export."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import make_tiny_config
from safetensors.torch import load_file

from podar import Pipeline, run_masks
from podar.engine import faults
from podar.engine.store import RunStore, sha256_file

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="torchrun with gloo on Linux")


def torchrun(args, nproc=2, env=None, timeout=300):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(29500 + os.getpid() % 1000), "-m", "podar.cli", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def config(corpus, tmp_path, method, walk="auto", **changes):
    cfg = make_tiny_config(corpus).with_method(method)
    cfg = cfg.with_calibration(cfg.calibration.model_copy(update={"walk": walk, "num_samples": 6, **changes}))
    path = tmp_path / f"{method}-{walk}.yaml"
    path.write_text(cfg.to_yaml())
    return cfg, path


def one_and_two_with_equal_masks(cfg, tmp_path):
    """Run ``cfg`` on one process (tmp_path/one) and on two (tmp_path/two); assert both finish with equal masks."""
    path = tmp_path / "two.yaml"
    path.write_text(cfg.to_yaml())
    assert Pipeline(cfg, run_dir=tmp_path / "one", progress=False).run().ok
    proc = torchrun(["run", str(path), "--run-dir", str(tmp_path / "two"), "--no-progress"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert masks_equal(tmp_path / "one", tmp_path / "two")


def masks_equal(a, b):
    ma, mb = run_masks(a), run_masks(b)
    return sorted(ma) == sorted(mb) and all(torch.equal(ma[k], mb[k]) for k in ma)


@pytest.mark.parametrize(("method", "walk"), [("magnitude", "auto"), ("wanda", "block"), ("wanda", "site"),
                                              ("wanda", "one_pass"), ("sparsegpt", "site"), ("sparsegpt", "block")])
def test_two_processes_give_the_masks_of_one(corpus, tmp_path, method, walk):
    cfg, path = config(corpus, tmp_path, method, walk)
    assert Pipeline(cfg, run_dir=tmp_path / "one", progress=False).run().ok
    proc = torchrun(["run", str(path), "--run-dir", str(tmp_path / "two"), "--no-progress"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert masks_equal(tmp_path / "one", tmp_path / "two")
    manifest = RunStore(tmp_path / "two").read_manifest()
    assert manifest.world_size == 2 and manifest.state == "complete"
    assert proc.stdout.count("Complete in") == 1  # one process reports; one wrote the folder
    if method != "sparsegpt":  # the same weights, so the same export bytes
        assert sha256_file(tmp_path / "one/export/model.safetensors") == sha256_file(
            tmp_path / "two/export/model.safetensors")


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_two_processes_give_the_owl_allocation_and_masks_of_one(corpus, tmp_path, method):
    """OWL's dense pass adds each process's statistics in batch order: the same per-block sparsity, the same
    masks (magnitude reads calibration samples for it only)."""
    cfg, _ = config(corpus, tmp_path, method)
    one_and_two_with_equal_masks(cfg.with_overrides({"allocation.kind": "owl", "allocation.owl_m": 3.0,
                                                     "target_sparsity": 0.6}), tmp_path)
    one, two = (RunStore(tmp_path / d) for d in ("one", "two"))
    allocations = [[store.load_tensors(r) for r in store.read_manifest().artifacts.values()
                    if r.kind == "allocation"] for store in (one, two)]
    assert len(allocations[0]) == 1 and torch.equal(allocations[0][0]["block_sparsity"],
                                                    allocations[1][0]["block_sparsity"])
    assert len(set(allocations[0][0]["block_sparsity"].tolist())) == 2  # the tiny model's two blocks differ


@pytest.mark.parametrize(("method", "walk", "dsnot"), [("wanda", "block", False), ("wanda", "site", True),
                                                       ("sparsegpt", "site", True),
                                                       ("magnitude", "auto", True)])
def test_two_processes_refine_like_one(corpus, tmp_path, method, walk, dsnot):
    """DSnoT and the refit: the method's and DSnoT's statistics added in batch order (the masks of one process,
    bit for bit), Σ x xᵀ added as one sum per process (the refit weights of one process up to rounding)."""
    cfg, _ = config(corpus, tmp_path, method, walk)
    one_and_two_with_equal_masks(cfg.with_overrides({"reconstruction.enabled": True, "dsnot.enabled": dsnot,
                                                     "dsnot.update_threshold": 0.0, "target_sparsity": 0.6}), tmp_path)
    mine, theirs = (load_file(tmp_path / d / "export/model.safetensors") for d in ("one", "two"))
    assert sorted(mine) == sorted(theirs)
    masked = {f"{n}.weight" for n in run_masks(tmp_path / "one")}
    assert masked <= set(mine)
    for name in masked:
        a, b = mine[name].float(), theirs[name].float()
        # rounding of Σ x xᵀ (~1e-7) amplified by the conditioning of the row systems: measured ≤ 2.1e-5 of max|W|
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-4 * float(a.abs().max())), name


# (max |Δw|, loss rel., ‖w_one − w_two‖ / ‖w_one − w_untrained‖): float32 only rounds the gradient sums (measured
# 6.7e-7, 2.1e-6); under bfloat16 autocast each process's bf16 products of its own window differ from one process's
# of both, which Adam's normalised steps carry into the weights (measured 1.0e-3, 1.2%, where 4 steps at lr 1e-3
# move a weight by up to 4e-3)
DDP_ATOL = {"off": (2e-6, 1e-4, 1e-4), "bfloat16": (2e-3, 5e-3, 0.05)}


@pytest.mark.parametrize("autocast", ["off", "bfloat16"])
def test_fine_tuning_under_ddp_gives_the_weights_of_one_process(corpus, tmp_path, autocast):
    """Distillation with the teacher on the fly, two checkpointed intervals, validation: two processes (one
    window each of every step's two) train to the weights of one process (two windows a step), up to rounding —
    float32's, or bfloat16's under autocast."""
    from podar import load_pretrained

    cfg, _ = config(corpus, tmp_path, "wanda")
    cfg = cfg.with_finetune(cfg.finetune.model_copy(update={
        "enabled": True, "steps": 4, "batch_size": 2, "learning_rate": 1e-3, "checkpoint_every": 2, "eval_every": 2,
        "loss": "kd+lm", "autocast": autocast}))
    atol, loss_rel, rel = DDP_ATOL[autocast]
    path = tmp_path / "ft.yaml"
    path.write_text(cfg.to_yaml())
    proc = torchrun(["run", str(path), "--run-dir", str(tmp_path / "two"), "--no-progress"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = RunStore(tmp_path / "two").read_manifest()
    parts = [r for r in manifest.results if r.stage == "fine_tuning"]
    assert [r.metrics["steps"] for r in parts] == [2, 2]
    assert all(r.series["pruned_max_abs_after_step"] == [0.0, 0.0] for r in parts)
    assert Pipeline(cfg, run_dir=tmp_path / "one", progress=False).run().ok
    one = RunStore(tmp_path / "one").read_manifest()
    one_loss = [x for r in one.results if r.stage == "fine_tuning" for x in r.series["loss"]]
    two_loss = [x for r in parts for x in r.series["loss"]]
    assert two_loss == pytest.approx(one_loss, rel=loss_rel)
    assert {r.metrics["autocast"] for r in parts} == {autocast if autocast == "off" else "bfloat16"}
    a, b = load_pretrained(tmp_path / "one" / "export"), load_pretrained(tmp_path / "two" / "export")
    untrained = Pipeline(cfg.with_finetune(cfg.finetune.model_copy(update={"enabled": False})),
                         run_dir=tmp_path / "none", progress=False)
    assert untrained.run().ok
    c = load_pretrained(tmp_path / "none" / "export")
    name = "model.layers.0.mlp.up_proj.weight"
    assert float((a.state_dict()[name] - c.state_dict()[name]).abs().max()) > 1e-4  # it trained
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    apart = math.sqrt(sum(float((sa[k] - sb[k]).square().sum()) for k in sa))
    moved = math.sqrt(sum(float((sa[k] - sc[k]).square().sum()) for k in sa))
    assert apart <= rel * moved  # what one process and two disagree on: a small part of what training moved
    for key, value in sa.items():
        assert torch.allclose(value, sb[key], rtol=0, atol=atol), key


def test_a_two_process_run_killed_mid_calibration_resumes_to_the_same_export(corpus, tmp_path):
    _cfg, path = config(corpus, tmp_path, "wanda", "site")
    ref = torchrun(["run", str(path), "--run-dir", str(tmp_path / "ref"), "--no-progress"])
    assert ref.returncode == 0, ref.stderr[-3000:]
    killed = torchrun(["run", str(path), "--run-dir", str(tmp_path / "run"), "--no-progress"],
                      env={faults.ENV: "kill@after:calibrating#3"})
    assert killed.returncode != 0
    from podar.cli import main

    # issue 27, item 11: resumed on one process, the work left would split otherwise — refused, nothing written
    before = (tmp_path / "run/audit.jsonl").read_bytes()
    assert main(["resume", str(tmp_path / "run"), "--no-progress"]) == 3
    assert (tmp_path / "run/audit.jsonl").read_bytes() == before
    shutil.copytree(tmp_path / "run", tmp_path / "one")  # on purpose, on one process: recorded, audited
    assert main(["resume", str(tmp_path / "one"), "--no-progress", "--allow-world-change"]) == 0
    assert RunStore(tmp_path / "one").read_manifest().resumes[-1]["world_size"] == 1
    assert main(["audit", str(tmp_path / "one")]) == 0
    resumed = torchrun(["resume", str(tmp_path / "run"), "--no-progress"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sha256_file(tmp_path / "run/export/model.safetensors") == sha256_file(
        tmp_path / "ref/export/model.safetensors")
    assert main(["audit", str(tmp_path / "run")]) == 0
    assert RunStore(tmp_path / "run").read_manifest().resumes[-1]["world_size"] == 2


def test_a_launcher_whose_world_size_accelerate_does_not_see_is_refused(tiny_config, tmp_path, monkeypatch):
    from podar import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "2")  # as `accelerate launch --cpu --num_processes 2` leaves one process
    with pytest.raises(ConfigError, match="Accelerate sees 1 process.*WORLD_SIZE is 2"):
        Pipeline(tiny_config, run_dir=tmp_path / "run", progress=False).run()
    assert not (tmp_path / "run" / "run.lock").exists()


def test_a_refusal_before_work_stops_every_process(corpus, tmp_path):
    """A config two processes cannot run (fine-tuning windows that do not split): every process stops, with the
    message, and the lock is released."""
    cfg, path = config(corpus, tmp_path, "wanda")
    bad = cfg.with_finetune(cfg.finetune.model_copy(update={"enabled": True, "batch_size": 3}))
    path.write_text(bad.to_yaml())
    proc = torchrun(["run", str(path), "--run-dir", str(tmp_path / "run"), "--no-progress"])
    assert proc.returncode != 0 and "does not split over 2 processes" in proc.stderr
    assert not (tmp_path / "run" / "run.lock").exists()


def test_a_failure_on_the_writing_process_fails_every_process_and_resumes(corpus, tmp_path):
    """A full disk on the process that writes (only it writes artifacts): the other does not wait for it forever;
    the run is Failed, its lock released, and two processes resume it to Complete."""
    _cfg, path = config(corpus, tmp_path, "wanda", "site")
    proc = torchrun(["run", str(path), "--run-dir", str(tmp_path / "run"), "--no-progress"],
                    env={faults.ENV: "enospc@write:artifact#2"}, timeout=240)
    assert proc.returncode == 1, proc.stderr[-3000:]
    manifest = RunStore(tmp_path / "run").read_manifest()
    assert manifest.state == "failed" and "No space left" in manifest.failure.message
    assert not (tmp_path / "run" / "run.lock").exists()
    resumed = torchrun(["resume", str(tmp_path / "run"), "--no-progress"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
