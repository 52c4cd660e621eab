"""FineTuning that recovers (issue 29): the distillation loss against float64, the learning-rate schedule, a
fine-tune killed at several steps resumed to the same weights, early stopping keeping the best weights, the
validation text's errors, the evaluation text refused as training text."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
from helpers import export_hashes, fail_once, killed_and_resumed
from safetensors.torch import load_file

from podar import Pipeline, PruningStage
from podar.engine import faults
from podar.engine.store import RunStore
from podar.schemas.errors import DataError, PodarError
from podar.stages.finetune import kd_loss, lr_at


def test_kd_loss_is_the_kl_divergence_in_float64():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 11, generator=g) * 3, torch.randn(2, 5, 11, generator=g) * 3
    for t in (1.0, 2.0, 0.5):
        p = torch.softmax(teacher.double() / t, dim=-1)
        log_q = torch.log_softmax(student.double() / t, dim=-1)
        want = float((p * (p.log() - log_q)).sum(-1).mean()) * t * t
        assert float(kd_loss(student, teacher, t)) == pytest.approx(want, rel=1e-5)
    assert float(kd_loss(teacher, teacher)) == pytest.approx(0.0, abs=1e-6)
    s = student.clone().requires_grad_(True)
    kd_loss(s, teacher).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()  # the teacher carries no gradient


def test_learning_rate_schedule_at_chosen_steps():
    kw = dict(peak=1e-3, warmup=4, min_ratio=0.1)
    assert [lr_at(i, 20, schedule="cosine", **kw) for i in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lr_at(4, 20, schedule="cosine", **kw) == pytest.approx(1e-3)  # decay starts at the peak
    assert lr_at(19, 20, schedule="cosine", **kw) == pytest.approx(1e-4)  # the last step at the floor
    mid = 4 + (20 - 4 - 1) / 2  # half way through the decay: cosine and linear agree at the mean
    assert lr_at(int(mid), 20, schedule="linear", **kw) == pytest.approx(1e-4 + 9e-4 * (1 - (int(mid) - 4) / 15))
    assert lr_at(19, 20, schedule="linear", **kw) == pytest.approx(1e-4)
    assert lr_at(12, 20, schedule="cosine", **kw) == pytest.approx(1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi * 8 / 15)))
    assert lr_at(15, 20, schedule="constant", **kw) == pytest.approx(1e-3)
    assert lr_at(0, 1, schedule="cosine", peak=1e-3, warmup=0, min_ratio=0.1) == pytest.approx(1e-4)


def ft_config(tiny_config, **update):
    base = {"enabled": True, "steps": 6, "checkpoint_every": 2, "eval_every": 2, "learning_rate": 1e-3,
            "loss": "kd+lm"}
    return tiny_config.with_method("wanda").with_finetune(tiny_config.finetune.model_copy(update={**base, **update}))


def test_fine_tuning_checkpoints_every_few_steps_and_reports_its_curves(tiny_config, tmp_path):
    result = Pipeline(ft_config(tiny_config), run_dir=tmp_path / "run", progress=False).run()
    assert result.ok, result.failure
    parts = [r for r in result.results if r.stage == "fine_tuning"]
    assert [r.metrics["first_step"] for r in parts] == [0, 2, 4] and [r.metrics["steps"] for r in parts] == [2, 2, 2]
    assert [x for r in parts for x in r.series["val_step"]] == [2.0, 4.0, 6.0]
    assert all(r.series["pruned_max_abs_after_step"] == [0.0, 0.0] for r in parts)
    lrs = [x for r in parts for x in r.series["lr"]]
    assert lrs[-1] == pytest.approx(1e-4) and max(lrs) == pytest.approx(1e-3)
    kinds = [RunStore(tmp_path / "run").read_manifest().artifacts[a].kind for r in parts for a in r.artifacts]
    assert kinds.count("finetune_state") == 3 and kinds.count("weights") == 3
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert [v[0] for v in report["finetune_validation"]] == [2, 4, 6] and len(report["finetune_losses"]) == 6
    assert "Fine-tuning: 6 steps" in (tmp_path / "run" / "report.md").read_text()
    assert (tmp_path / "run" / "plots" / "finetune_loss.png").is_file()


FT_KILLS = ["kill@step:fine_tuning#1", "kill@step:fine_tuning#3", "kill@after:fine_tuning#2",
            "kill@step:fine_tuning#6"]


@pytest.mark.parametrize("fault", FT_KILLS)
def test_a_fine_tune_killed_anywhere_resumes_to_the_same_weights(tiny_config, tmp_path, fault):
    manifest = killed_and_resumed(ft_config(tiny_config), tmp_path, fault)
    steps = [r.metrics["first_step"] for r in manifest.results if r.stage == "fine_tuning"]
    assert steps == [0, 2, 4]  # no interval trained twice, none skipped


def test_early_stopping_keeps_the_best_validated_weights(tiny_config, tmp_path, monkeypatch):
    """Validation losses scripted (best at step 2, then two worse): the round stops at step 4 of 8, the model
    ends with the weights it had at step 2, and the step counter stands at the budget's end."""
    from podar.stages import finetune

    scripted = iter([5.0, 4.0, 4.5, 4.6, 4.7])
    seen: list[dict[str, torch.Tensor]] = []

    def validate(ctx, windows, reference):
        seen.append({n: m.weight.detach().clone() for n, m in ctx.state.targets.items()})
        return next(scripted), 0.0

    monkeypatch.setattr(finetune, "_validate", validate)
    cfg = ft_config(tiny_config, steps=8, eval_every=1, early_stopping_patience=2, checkpoint_every=3)
    p = Pipeline(cfg, run_dir=tmp_path / "run", progress=False)
    result = p.run()
    assert result.ok, result.failure
    parts = [r for r in result.results if r.stage == "fine_tuning"]
    last = parts[-1].metrics
    assert [x for r in parts for x in r.series["val_loss"]] == [5.0, 4.0, 4.5, 4.6]
    assert last["stopped_early"] and last["kept_best"] and last["best_step"] == 2 and last["best_val_loss"] == 4.0
    assert sum(r.metrics["steps"] for r in parts) == 4
    assert not torch.equal(seen[1]["model.layers.0.mlp.up_proj"], seen[3]["model.layers.0.mlp.up_proj"])
    for name, module in p.context.state.targets.items():
        assert torch.equal(module.weight.detach(), seen[1][name]), name  # the weights validated at step 2
    assert RunStore(tmp_path / "run").read_manifest().progress.step == 8  # the budget is over


def test_a_missing_or_too_short_validation_text_is_refused_before_any_work(tiny_config, tmp_path):
    missing = ft_config(tiny_config, validation_dataset=str(tmp_path / "nope.txt"))
    with pytest.raises(PodarError, match="finetune.validation_dataset"):
        Pipeline(missing, run_dir=tmp_path / "a", progress=False).run()
    short = tmp_path / "short.txt"
    short.write_text("a few words only")
    with pytest.raises(DataError, match="finetune.validation_windows=4"):
        Pipeline(ft_config(tiny_config, validation_dataset=str(short)), run_dir=tmp_path / "b", progress=False).run()
    assert not (tmp_path / "b" / "manifest.json").exists()


def test_the_evaluation_text_is_refused_as_training_or_validation_text(tiny_config, tmp_path):
    evaluated = tiny_config.evaluation.dataset
    for field in ("dataset", "validation_dataset"):
        cfg = ft_config(tiny_config, **{field: evaluated})
        with pytest.raises(DataError, match=f"finetune.{field} .* is the evaluation text"):
            Pipeline(cfg, run_dir=tmp_path / field, progress=False).run()


def test_a_json_lines_text_trains_from_its_text_fields(tiny_config, tmp_path):
    import json

    from podar.engine.data import load_text

    source = tiny_config.finetune.dataset
    records = [{"text": line, "id": i} for i, line in enumerate(open(source).read().splitlines()) if line]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    assert load_text(str(path), None, field="finetune.dataset") == "\n\n".join(r["text"] for r in records)
    result = Pipeline(ft_config(tiny_config, dataset=str(path), steps=2), run_dir=tmp_path / "run",
                      progress=False).run()
    assert result.ok, result.failure
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(DataError, match="line 2 has no string field 'text'"):
        load_text(str(bad), None, field="finetune.dataset")
    bad.write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(DataError, match="line 2 is not JSON"):
        load_text(str(bad), None, field="finetune.dataset")


def test_kd_from_the_cached_top_k_is_the_kl_divergence():
    from podar.stages.finetune import kd_top_k_loss

    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(2, 5, 11, generator=g) * 3, torch.randn(2, 5, 11, generator=g) * 3
    logp = torch.log_softmax(teacher.double(), dim=-1)
    whole = kd_top_k_loss(student.double(), torch.arange(11).expand(2, 5, 11), logp)
    assert float(whole) == pytest.approx(float(kd_loss(student.double(), teacher.double())), rel=1e-9)
    top = torch.topk(logp, 4, dim=-1)
    coarse = float(kd_top_k_loss(student, top.indices, top.values.float()))
    assert 0.0 < coarse <= float(whole) + 1e-6  # the k tokens and one bucket: a lower bound


def test_a_cached_teacher_trains_resumes_and_needs_temperature_one(tiny_config, tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="kd_temperature=2 needs teacher: on_the_fly"):
        ft_config(tiny_config, teacher="cached", kd_temperature=2.0)
    cfg = ft_config(tiny_config, teacher="cached", teacher_top_k=16)
    assert Pipeline(cfg, run_dir=tmp_path / "ref", progress=False).run().ok
    kinds = [r.kind for r in RunStore(tmp_path / "ref").read_manifest().artifacts.values()]
    assert kinds.count("teacher_topk") == 1
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    env = {**os.environ, faults.ENV: "kill@step:fine_tuning#3", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "podar.cli", "run", str(path), "--run-dir", str(tmp_path / "run"),
                           "--no-progress"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert Pipeline.resume(tmp_path / "run", progress=False).run().ok
    assert export_hashes(tmp_path / "run") == export_hashes(tmp_path / "ref")
    on_the_fly = Pipeline(ft_config(tiny_config), run_dir=tmp_path / "fly", progress=False).run()
    assert on_the_fly.ok and export_hashes(tmp_path / "fly") != export_hashes(tmp_path / "ref")  # top-16 of 259


def test_cancel_in_the_middle_of_a_fine_tune_fails_and_resumes_to_the_same_weights(tiny_config, tmp_path,
                                                                                   monkeypatch):
    from podar.stages import finetune

    cfg = ft_config(tiny_config)
    assert Pipeline(cfg, run_dir=tmp_path / "ref", progress=False).run().ok
    pipe = Pipeline(cfg, run_dir=tmp_path / "run", progress=False)
    original, calls = finetune._apply, []

    def apply_then_cancel(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # inside the second interval
            pipe.cancel("operator stop")
        return original(*args, **kwargs)

    monkeypatch.setattr(finetune, "_apply", apply_then_cancel)
    result = pipe.run()
    assert result.stage.value == "failed" and result.failure.stage == "Fine-tuning"
    assert "operator stop" in result.failure.message
    monkeypatch.setattr(finetune, "_apply", original)
    assert Pipeline.resume(tmp_path / "run", progress=False).run().ok
    assert export_hashes(tmp_path / "run") == export_hashes(tmp_path / "ref")


# ---------------------------------------------------------------- several training texts, by weight


def test_mixture_counts_split_the_windows_by_largest_remainder():
    from podar.stages.finetune import mixture_counts

    assert mixture_counts(10, [0.5, 0.3, 0.2]) == [5, 3, 2]
    assert mixture_counts(7, [1 / 3, 1 / 3, 1 / 3]) == [3, 2, 2]  # ties to the earlier text
    assert mixture_counts(1, [0.25, 0.75]) == [0, 1]
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        w = torch.rand(4, generator=g, dtype=torch.float64) + 0.01
        shares = (w / w.sum()).tolist()
        total = int(torch.randint(0, 40, (1,), generator=g))
        counts = mixture_counts(total, shares)
        assert sum(counts) == total
        assert all(abs(c - total * s) < 1.0 for c, s in zip(counts, shares, strict=True))


def _other_text(tmp_path):
    """A text of words the corpus does not use, long enough for training and validation windows."""
    import random

    rng = random.Random(1)
    words = "zebra quartz violin harbor copper lantern meadow saffron glacier orbit".split()
    path = tmp_path / "other.txt"
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) + " ." for _ in range(600)))
    return path


def _is_slice(window, ids):
    """``window`` (T,) is a contiguous run of ``ids`` (N,)."""
    runs = ids.unfold(0, window.numel(), 1)
    return bool((runs == window).all(dim=1).any())


def test_several_training_texts_give_their_shares_of_the_windows(tiny_config, tmp_path):
    from podar.engine.data import calibration_windows, load_text, tokenize_text
    from podar.stages.finetune import VALIDATION_SHARE, training_texts

    other = _other_text(tmp_path)
    cfg = ft_config(tiny_config, steps=2, extra_datasets=(str(other),), dataset_weights=(3.0, 1.0),
                    validation_windows=4)
    pipe = Pipeline(cfg, run_dir=tmp_path / "run", progress=False)
    result = pipe.run()
    assert result.ok, result.failure
    ctx = pipe.context
    ids = [tokenize_text(ctx.tokenizer, load_text(str(p), None)) for p in (cfg.finetune.dataset, other)]
    cuts = [int(i.numel() * (1 - VALIDATION_SHARE)) for i in ids]
    windows, held = training_texts(ctx, 40)
    assert windows.shape == (40, cfg.finetune.sequence_length)
    source = [[_is_slice(w, i[:c]) for i, c in zip(ids, cuts, strict=True)] for w in windows]
    assert all(sum(s) == 1 for s in source)  # each window from one text, never from its held-out tail
    assert sum(s[0] for s in source) == 30 and sum(s[1] for s in source) == 10  # 3 : 1
    assert [s[0] for s in source] != sorted((s[0] for s in source), reverse=True)  # shuffled together
    assert held.shape == (4, cfg.finetune.sequence_length)  # 3 : 1 of the validation windows, from the tails
    assert [_is_slice(w, ids[0][cuts[0]:]) for w in held] == [True, True, True, False]
    assert _is_slice(held[3], ids[1][cuts[1]:])
    assert "other.txt (25%)" in (tmp_path / "run" / "export" / "README.md").read_text()
    manifest = RunStore(tmp_path / "run").read_manifest()
    assert f"finetune:extra:{other}" in manifest.data_sha256
    # one text: the windows one text always gave (the same seed, no shuffle)
    single = ft_config(tiny_config, steps=2)
    pipe = Pipeline(single, run_dir=tmp_path / "one", progress=False)
    assert pipe.run().ok
    windows, _ = training_texts(pipe.context, 5)
    want = calibration_windows(ids[0][:cuts[0]], 5, single.finetune.sequence_length,
                               single.finetune.seed + pipe.context.state.round_index)
    assert torch.equal(windows, want)


def test_a_mixed_fine_tune_killed_resumes_to_the_same_export(tiny_config, tmp_path):
    cfg = ft_config(tiny_config, extra_datasets=(str(_other_text(tmp_path)),), dataset_weights=(1.0, 2.0))
    killed_and_resumed(cfg, tmp_path, "kill@step:fine_tuning#3")


def test_bad_mixtures_are_refused_before_any_work(tiny_config, tmp_path):
    from pydantic import ValidationError

    other = str(_other_text(tmp_path))
    with pytest.raises(ValidationError, match="2 weights for 3 training texts"):
        ft_config(tiny_config, extra_datasets=(other, other + "x"), dataset_weights=(1.0, 2.0))
    with pytest.raises(ValidationError, match="every weight must be > 0"):
        ft_config(tiny_config, extra_datasets=(other,), dataset_weights=(1.0, 0.0))
    with pytest.raises(ValidationError, match="repeats a training text"):
        ft_config(tiny_config, extra_datasets=(tiny_config.finetune.dataset,))
    cfg = ft_config(tiny_config, extra_datasets=(other, tiny_config.evaluation.dataset))
    with pytest.raises(DataError, match=r"finetune.extra_datasets\[1\] .* is the evaluation text"):
        Pipeline(cfg, run_dir=tmp_path / "eval", progress=False).run()
    with pytest.raises(PodarError, match=r"finetune.extra_datasets\[0\]"):
        Pipeline(ft_config(tiny_config, extra_datasets=(str(tmp_path / "nope.txt"),)), run_dir=tmp_path / "missing",
                 progress=False).run()
    for name in ("eval", "missing"):
        assert not (tmp_path / name / "manifest.json").exists()


# ---------------------------------------------------------------- the hidden-state term


def test_hidden_state_loss_against_float64():
    from podar.stages.finetune import hidden_state_loss

    g = torch.Generator().manual_seed(3)
    student = [torch.randn(2, 5, 7, generator=g) for _ in range(3)]
    teacher = [torch.randn(2, 5, 7, generator=g) for _ in range(3)]
    cos, mse = [], []
    for h, t in zip(student, teacher, strict=True):
        h, t = h.double(), t.double()
        per_token = [1 - float(h[b, i] @ t[b, i]) / float(h[b, i].norm() * t[b, i].norm())
                     for b in range(2) for i in range(5)]
        cos.append(sum(per_token) / len(per_token))
        mse.append(float((h - t).square().sum() / t.square().sum()))
    assert float(hidden_state_loss(student, teacher, "cosine")) == pytest.approx(sum(cos) / 3, rel=1e-5)
    assert float(hidden_state_loss(student, teacher, "mse")) == pytest.approx(sum(mse) / 3, rel=1e-5)
    assert float(hidden_state_loss(teacher, teacher, "mse")) == 0.0
    s = [x.clone().requires_grad_(True) for x in student]
    t = [x.clone().requires_grad_(True) for x in teacher]
    hidden_state_loss(s, t, "cosine").backward()
    assert all(x.grad is not None for x in s) and all(x.grad is None for x in t)  # the dense side is fixed


def test_the_hidden_term_trains_a_masked_model_and_resumes(tiny_config, tmp_path):
    cfg = ft_config(tiny_config, hidden_weight=0.5, hidden_loss="mse")
    manifest = killed_and_resumed(cfg, tmp_path, "kill@step:fine_tuning#3")
    series = [x for r in manifest.results if r.stage == "fine_tuning" for x in r.series["hidden_loss"]]
    assert len(series) == 6 and all(0.0 < x < 10.0 for x in series)
    losses = [x for r in manifest.results if r.stage == "fine_tuning" for x in r.series["loss"]]
    kd = [x for r in manifest.results if r.stage == "fine_tuning" for x in r.series["kd_loss"]]
    lm = [x for r in manifest.results if r.stage == "fine_tuning" for x in r.series["lm_loss"]]
    for total, k, m, h in zip(losses, kd, lm, series, strict=True):  # kd+lm at weight 0.5, plus 0.5 × hidden
        assert total == pytest.approx(0.5 * k + 0.5 * m + 0.5 * h, rel=1e-5)
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="hidden_weight=0.5 compares every block's output"):
        ft_config(tiny_config, hidden_weight=0.5, teacher="cached")


def test_after_depth_pruning_each_block_is_compared_with_the_dense_block_it_was(corpus, tmp_path, monkeypatch):
    from test_structure import structure_config

    from podar.stages import structure
    from podar.stages.finetune import _block_outputs, _teacher

    monkeypatch.setattr(structure, "kept_blocks", lambda influence, n_remove: [0, 1, 3])  # block 2 goes
    cfg = structure_config(corpus, layers=4, depth=1)
    pipe = Pipeline(cfg, run_dir=tmp_path / "run", progress=False)
    assert pipe.run().ok
    ctx = pipe.context
    assert ctx.state.structure_plan.blocks == [0, 1, 3]
    gone = 2
    batch = ctx.state.calibration_samples[:2]
    _, dense = _teacher(ctx, batch, True)
    with torch.no_grad(), _block_outputs(ctx.model, None) as outputs:
        ctx.model(input_ids=batch, use_cache=False)
    assert len(dense) == len(outputs) == 3
    with torch.no_grad(), _block_outputs(ctx.state.dense_model, None) as every:
        ctx.state.dense_model(input_ids=batch, use_cache=False)
    assert all(torch.equal(d, every[i]) for d, i in zip(dense, [0, 1, 3], strict=True))  # the kept blocks' outputs
    for j in range(3):  # before the removed block the pruned model computes what the dense one did
        same = torch.equal(outputs[j], dense[j])
        assert same == (j < gone), (j, gone)


def test_the_hidden_term_on_a_model_without_blocks_is_refused_before_any_work(tiny_config, tmp_path, monkeypatch):
    from podar import _setup
    from podar.schemas.errors import ConfigError

    monkeypatch.setattr(_setup, "find_blocks", lambda model, path=None: None)  # a model with no block stack
    with pytest.raises(ConfigError, match="finetune.hidden_weight=0.5 .* no stack of repeated blocks"):
        Pipeline(ft_config(tiny_config, hidden_weight=0.5), run_dir=tmp_path / "run", progress=False).run()
    assert not (tmp_path / "run" / "manifest.json").exists()


def test_autocast_resolves_to_bfloat16_only_on_a_float32_model_and_where_asked_or_native(monkeypatch):
    from torch import nn

    from podar.engine import compute
    from podar.engine.compute import resolve_autocast

    cpu, lin = torch.device("cpu"), nn.Linear(4, 4)
    monkeypatch.setattr(compute, "native_bf16", lambda device: True)
    assert resolve_autocast("auto", lin, cpu) is torch.bfloat16
    assert resolve_autocast("bfloat16", lin, cpu) is torch.bfloat16
    assert resolve_autocast("off", lin, cpu) is None
    assert resolve_autocast("auto", nn.Linear(4, 4).to(torch.bfloat16), cpu) is None  # not float32: its own dtype
    monkeypatch.setattr(compute, "native_bf16", lambda device: False)
    assert resolve_autocast("auto", lin, cpu) is None  # bf16 would be emulated: not faster
    assert resolve_autocast("bfloat16", lin, cpu) is torch.bfloat16  # asked for


@pytest.mark.parametrize("autocast", ["off", "bfloat16"])
def test_autocast_trains_in_bfloat16_and_keeps_float32_weights_and_masks(tiny_config, tmp_path, monkeypatch,
                                                                          autocast):
    """Under bfloat16 autocast the student's and the teacher's Linear layers compute in bf16 while training; the
    weights, gradients and Adam's moments stay float32, the masks hold, and the run records the dtype."""
    from torch import nn

    from podar.stages import finetune

    seen: set[torch.dtype] = set()
    grads: set[torch.dtype] = set()
    weights: set[torch.dtype] = set()
    active = []
    real_loss, real_apply = finetune._loss, finetune._apply

    def loss(*a, **k):
        active.append(1)
        try:
            return real_loss(*a, **k)
        finally:
            active.pop()

    def apply(ctx, optimizer, params, masks, step):
        grads.update(p.grad.dtype for p in params.values() if p.grad is not None)
        weights.update(p.dtype for p in params.values())
        return real_apply(ctx, optimizer, params, masks, step)

    monkeypatch.setattr(finetune, "_loss", loss)
    monkeypatch.setattr(finetune, "_apply", apply)
    handle = nn.modules.module.register_module_forward_hook(
        lambda m, a, out: seen.add(out.dtype) if active and isinstance(m, nn.Linear) else None)
    try:
        result = Pipeline(ft_config(tiny_config, loss="kd", autocast=autocast, steps=2, eval_every=0),
                          run_dir=tmp_path / "run", progress=False).run()
    finally:
        handle.remove()
    assert result.ok, result.failure
    assert seen == ({torch.float32} if autocast == "off" else {torch.bfloat16})
    assert grads == weights == {torch.float32}
    parts = [r for r in result.results if r.stage == "fine_tuning"]
    assert {r.metrics["autocast"] for r in parts} == {autocast}
    assert all(r.series["pruned_max_abs_after_step"] == [0.0] * r.metrics["steps"] for r in parts)
    manifest = RunStore(tmp_path / "run").read_manifest()
    state = [manifest.artifacts[a] for r in parts for a in r.artifacts if manifest.artifacts[a].kind ==
             "finetune_state"][-1]
    tensors = load_file(tmp_path / "run" / state.path)
    assert {t.dtype for k, t in tensors.items() if k.startswith("exp_avg")} == {torch.float32}


def test_a_resume_where_autocast_resolves_otherwise_is_refused(tiny_config, tmp_path, monkeypatch):
    """Killed after 2 steps trained in bf16: another machine, where 'auto' resolves to float32, refuses to go on
    (the steps left would train otherwise); finetune.autocast set to what the steps ran in lets it resume."""
    from podar import CheckpointError
    from podar.engine import compute

    monkeypatch.setattr(compute, "native_bf16", lambda device: True)
    fail_once(monkeypatch, PruningStage.FINE_TUNING, 2)  # the second interval fails, the first is checkpointed
    assert not Pipeline(ft_config(tiny_config), run_dir=tmp_path / "run", progress=False).run().ok
    monkeypatch.setattr(compute, "native_bf16", lambda device: False)  # another machine
    refused = Pipeline.resume(tmp_path / "run", progress=False).run()  # fails entering the stage: nothing trained
    assert not refused.ok and refused.failure is not None
    assert refused.failure.type == CheckpointError.__name__
    assert ("first 2 steps of this round ran with autocast bfloat16, and finetune.autocast 'auto' resolves to off "
            "here") in refused.failure.message
    result = Pipeline.resume(tmp_path / "run", overrides={"finetune.autocast": "bfloat16"}, progress=False).run()
    assert result.ok, result.failure
    assert [r.metrics["autocast"] for r in result.results if r.stage == "fine_tuning"] == ["bfloat16"] * 3
