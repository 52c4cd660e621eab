"""End-to-end runs on a tiny random Llama (seconds each)."""

import json
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from podar import (
    CheckpointError,
    ConfigError,
    DataError,
    EvaluationConfig,
    Gradual,
    Pipeline,
    PruneMethod,
    PruningStage,
    QualityGates,
    SparsityPatternConfig,
    StageError,
    TinyModelConfig,
    tiny_llama,
    verify_audit,
)
from podar.engine.audit import read_audit
from podar.engine.store import RunStore
from podar.stages import HANDLERS


def run(cfg, tmp_path, name="run", **kwargs):
    return Pipeline(cfg, run_dir=tmp_path / name, progress=False, **kwargs).run()


def moves(run_dir):
    return [(r["trigger"], r["source"], r["dest"]) for r in read_audit(run_dir / "audit.jsonl")]


def pruned_weights(run_dir):
    model = AutoModelForCausalLM.from_pretrained(str(run_dir / "export"))
    return {n: m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def test_magnitude_end_to_end_skips_calibration(tiny_config, tmp_path):
    result = run(tiny_config, tmp_path)
    assert result.stage is PruningStage.COMPLETE and result.ok and result.failure is None
    run_dir = tmp_path / "run"
    assert moves(run_dir) == [
        ("start", "idle", "computing_importance"), ("scored", "computing_importance", "pruning"),
        ("pruned", "pruning", "fine_tuning"), ("finetuned", "fine_tuning", "evaluating"),
        ("evaluated", "evaluating", "exporting"), ("exported", "exporting", "complete")]
    manifest = RunStore(run_dir).read_manifest()
    assert manifest.state == "complete" and manifest.config_sha256 == tiny_config.sha256()
    verify_audit(run_dir / "audit.jsonl", manifest.run_id, manifest.history)
    ev = result.metrics["evaluating"]
    assert ev["dense_ppl"] > 1 and ev["pruned_ppl"] > 1
    assert ev["pruned_layers_sparsity"] == pytest.approx(0.5, abs=1e-3)
    # every exported file is in the manifest with its sha256
    exported = [a for a in manifest.artifacts.values() if a.kind == "export"]
    assert any(a.path.endswith(".safetensors") for a in exported)
    weights = pruned_weights(run_dir)
    assert "lm_head" in weights  # tied to the embeddings: never pruned by default
    assert float((weights["lm_head"] == 0).float().mean()) < 0.01
    for name, w in weights.items():
        if name != "lm_head":
            assert int((w == 0).sum()) == w.numel() // 2, name  # per-layer magnitude: exactly half


def test_export_reloads_equal_to_memory(tiny_config, tmp_path):
    model, tok = tiny_llama(TinyModelConfig())
    result = run(tiny_config, tmp_path, model=model, tokenizer=tok)
    assert result.ok
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "run" / "export"))
    mem = model.state_dict()
    for key, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, mem[key]), key
    assert result.metrics["exporting"]["tensors_checked"] == len(mem)


def test_2_4_mask_exact(tiny_config, tmp_path):
    cfg = tiny_config.with_pattern(SparsityPatternConfig.nm_2_4())
    assert run(cfg, tmp_path).ok
    for name, w in pruned_weights(tmp_path / "run").items():
        if name == "lm_head":
            continue
        zeros = (w == 0).view(w.shape[0], -1, 4).sum(dim=-1)
        assert (zeros >= 2).all(), name  # 2 pruned in every group of 4 (random weights have no other zeros)
        assert int((w == 0).sum()) == w.numel() // 2, name


@pytest.mark.parametrize("method", [PruneMethod.WANDA, PruneMethod.SPARSEGPT])
@pytest.mark.parametrize("pattern", [SparsityPatternConfig.unstructured(), SparsityPatternConfig.nm_2_4()])
def test_calibration_methods_sequential(tiny_config, tmp_path, method, pattern):
    cfg = tiny_config.with_method(method).with_pattern(pattern).with_calibration(
        tiny_config.calibration.model_copy(update={"granularity": "block"}))
    result = run(cfg, tmp_path)
    assert result.ok, result.failure
    triggers = [m[0] for m in moves(tmp_path / "run")]
    # two decoder blocks: one loop Pruning → Calibrating
    assert triggers[:6] == ["start", "calibrated", "scored", "next_group", "calibrated", "scored"]
    manifest = RunStore(tmp_path / "run").read_manifest()
    prunings = [r for r in manifest.results if r.stage == "pruning"]
    assert len(prunings) == 2
    for r in prunings:
        for name, lm in r.layer_metrics.items():
            assert lm["mask_sparsity"] == pytest.approx(0.5, abs=0.01), name
            assert 0.0 <= lm["reconstruction_error"] < 1.0, name
    masks = [a for a in manifest.artifacts.values() if a.kind == "masks"]
    assert len(masks) == 2


def test_raising_handler_fails_once_with_error(tiny_config, tmp_path, monkeypatch):
    def boom(ctx):
        ctx.current_layer = "model.layers.1.mlp.up_proj"
        raise RuntimeError("disk on fire")

    monkeypatch.setitem(HANDLERS, PruningStage.PRUNING, boom)
    result = run(tiny_config, tmp_path)
    assert result.stage is PruningStage.FAILED
    f = result.failure
    assert f.type == "RuntimeError" and "disk on fire" in f.message
    assert f.stage == "Pruning" and f.layer == "model.layers.1.mlp.up_proj"
    records = read_audit(tmp_path / "run" / "audit.jsonl")
    fails = [r for r in records if r["trigger"] == "fail"]
    assert len(fails) == 1 and fails[0]["source"] == "pruning" and fails[0]["error"]["type"] == "RuntimeError"
    manifest = RunStore(tmp_path / "run").read_manifest()
    assert manifest.state == "failed" and manifest.failure.message == f.message
    assert not (tmp_path / "run" / "run.lock").exists()


def test_keyboard_interrupt_ends_failed_interrupted(tiny_config, tmp_path, monkeypatch):
    def interrupt(ctx):
        raise KeyboardInterrupt

    monkeypatch.setitem(HANDLERS, PruningStage.FINE_TUNING, interrupt)
    result = run(tiny_config, tmp_path)
    assert result.stage is PruningStage.FAILED and result.failure.reason == "interrupted"


def test_non_finite_weight_fails_importance_naming_layer(tiny_config, tmp_path):
    model, tok = tiny_llama(TinyModelConfig())
    with torch.no_grad():
        model.model.layers[1].mlp.gate_proj.weight[0, 0] = float("nan")
    result = run(tiny_config, tmp_path, model=model, tokenizer=tok)
    assert result.stage is PruningStage.FAILED
    assert result.failure.stage == "Computing Importance"
    assert result.failure.layer == "model.layers.1.mlp.gate_proj"
    assert "non-finite" in result.failure.message


def test_quality_gate_fails_run_and_warn_lets_it_export(tiny_config, tmp_path):
    strict = tiny_config.with_evaluation(EvaluationConfig(
        dataset=tiny_config.evaluation.dataset, sequence_length=64, max_windows=4,
        gates=QualityGates(max_perplexity_increase_pct=None, max_perplexity=1.01)))
    result = run(strict, tmp_path, "strict")
    assert result.stage is PruningStage.FAILED and result.failure.reason == "quality_gate"
    assert "max_perplexity=1.01" in result.failure.message
    assert moves(tmp_path / "strict")[-1] == ("evaluated", "evaluating", "failed")
    assert not (tmp_path / "strict" / "export").exists()
    warn = strict.with_evaluation(strict.evaluation.model_copy(
        update={"gates": QualityGates(max_perplexity_increase_pct=None, max_perplexity=1.01, on_fail="warn")}))
    result = run(warn, tmp_path, "warn")
    assert result.ok and result.metrics["evaluating"]["gates_failed"] == 1


def test_finetune_keeps_pruned_weights_zero_every_step(tiny_config, tmp_path):
    cfg = tiny_config.with_finetune(tiny_config.finetune.model_copy(update={"enabled": True, "steps": 4,
                                                                            "learning_rate": 1e-2}))
    model, tok = tiny_llama(TinyModelConfig())
    before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    result = run(cfg, tmp_path, model=model, tokenizer=tok)
    assert result.ok and result.metrics["fine_tuning"]["steps"] == 4
    [finetuned] = [r for r in result.results if r.stage == "fine_tuning"]
    assert finetuned.series["pruned_max_abs_after_step"] == [0.0] * 4 and len(finetuned.series["loss"]) == 4
    after = model.model.layers[0].mlp.up_proj.weight.detach()
    kept = after != 0
    assert not torch.equal(after[kept], before[kept])  # training changed the kept weights
    assert int((after == 0).sum()) == after.numel() // 2


def test_gradual_schedule_loops_through_finetuning(tiny_config, tmp_path):
    cfg = tiny_config.with_schedule(Gradual(start_step=0, end_step=4, initial_sparsity=0.2, final_sparsity=0.6,
                                            frequency=2))
    cfg = cfg.with_finetune(cfg.finetune.model_copy(update={"enabled": True, "steps": 1}))
    result = run(cfg, tmp_path)
    assert result.ok, result.failure
    triggers = [m[0] for m in moves(tmp_path / "run")]
    assert triggers.count("next_round") == 2 and triggers.count("scored") == 3
    prunings = [r for r in RunStore(tmp_path / "run").read_manifest().results if r.stage == "pruning"]
    assert [round(r.metrics["target_sparsity"], 6) for r in prunings] == [0.2, 0.4, 0.6]
    assert result.metrics["evaluating"]["pruned_layers_sparsity"] == pytest.approx(0.6, abs=0.01)


def test_targets_matching_nothing_fail_before_work(tiny_config, tmp_path):
    cfg = tiny_config.with_targets(("re:.*no_such_module",))
    with pytest.raises(ConfigError, match="matched no Linear module"):
        Pipeline(cfg, run_dir=tmp_path / "r", progress=False).run()
    assert not (tmp_path / "r" / "manifest.json").exists()
    assert not (tmp_path / "r" / "run.lock").exists()


def test_pattern_not_fitting_names_layer(tiny_config, tmp_path):
    cfg = tiny_config.with_model(tiny_config.model.model_copy(update={"tiny": TinyModelConfig(intermediate_size=30)}))
    cfg = cfg.with_pattern(SparsityPatternConfig.nm_2_4())
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.mlp\.down_proj.*in_features=30"):
        Pipeline(cfg, run_dir=tmp_path / "r", progress=False).run()


def test_short_calibration_text_fails_before_work(tiny_config, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    cfg = tiny_config.with_method("wanda").with_calibration(
        tiny_config.calibration.model_copy(update={"dataset": str(short)}))
    with pytest.raises(DataError, match="calibration.*sequence_length=64"):
        Pipeline(cfg, run_dir=tmp_path / "r", progress=False).run()
    assert not (tmp_path / "r" / "manifest.json").exists()


def test_tokenizer_model_mismatch_fails_before_work(tiny_config, tmp_path):
    model, tok = tiny_llama(TinyModelConfig())
    model.resize_token_embeddings(100)
    with pytest.raises(DataError, match="tokenizer/model mismatch"):
        Pipeline(tiny_config, run_dir=tmp_path / "r", model=model, tokenizer=tok, progress=False).run()


def test_second_process_refused_by_lock(tiny_config, tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "run.lock").write_text(json.dumps({"pid": 1, "host": __import__("socket").gethostname(),
                                                   "since": "t"}))
    with pytest.raises(CheckpointError, match="locked by pid 1"):
        Pipeline(tiny_config, run_dir=run_dir, progress=False).run()


def test_existing_run_folder_refused(tiny_config, tmp_path):
    assert run(tiny_config, tmp_path).ok
    with pytest.raises(CheckpointError, match="already holds a run"):
        run(tiny_config, tmp_path)


def test_step_and_subscribe(tiny_config, tmp_path):
    seen = []
    p = Pipeline(tiny_config, run_dir=tmp_path / "r", progress=False)
    p.subscribe(lambda ev: seen.append((ev.seq, ev.dest, (tmp_path / "r" / "audit.jsonl").read_text().count("\n"))))
    assert p.stage is PruningStage.IDLE
    assert p.step() is PruningStage.COMPUTING_IMPORTANCE
    assert p.step() is PruningStage.PRUNING
    assert len(p.history) == 2
    while not p.stage.is_terminal():
        p.step()
    assert p.stage is PruningStage.COMPLETE
    # each callback saw its record already on disk
    assert [s[0] for s in seen] == list(range(6)) and all(n >= seq + 1 for seq, _d, n in seen)


def test_cancel_ends_failed_cancelled(tiny_config, tmp_path):
    p = Pipeline(tiny_config, run_dir=tmp_path / "r", progress=False)
    p.step()
    p.cancel()
    p.step()
    assert p.stage is PruningStage.FAILED
    assert p.result().failure.reason == "cancelled"


def test_stage_error_carries_layer():
    e = StageError("x", stage="Pruning", layer="a.b")
    assert e.layer == "a.b" and e.stage == "Pruning"


def test_log_names_pruned_and_skipped_modules(tiny_config, tmp_path):
    from structlog.testing import capture_logs

    with capture_logs() as logs:
        assert run(tiny_config, tmp_path).ok
    [event] = [e for e in logs if e["event"] == "targets_resolved"]
    assert event["n_pruned"] == 14  # a long list summarised: its count and the first names
    assert event["pruned"].startswith("14: model.layers.0.self_attn.q_proj, ") and event["pruned"].endswith(
        "… (9 more)")
    assert event["skipped"].startswith("1: lm_head")


def test_tied_head_pruned_only_when_named(tiny_config, tmp_path):
    cfg = tiny_config.with_targets(("Linear", "lm_head"), ignore=())
    p = Pipeline(cfg, run_dir=tmp_path / "r", progress=False)
    assert p.run().ok
    assert "lm_head" in p.context.state.targets
    cfg = tiny_config.with_targets(("Linear",), ignore=())
    p = Pipeline(cfg, run_dir=tmp_path / "r2", progress=False)
    assert p.run().ok
    assert "lm_head" not in p.context.state.targets


def test_opt_calibrates_block_by_block(tiny_config, tmp_path):
    from structlog.testing import capture_logs
    from transformers import OPTConfig, OPTForCausalLM

    from podar.engine.tokenizer import BYTE_VOCAB_SIZE, byte_tokenizer

    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(vocab_size=BYTE_VOCAB_SIZE, hidden_size=32, num_hidden_layers=2,
                                     ffn_dim=64, num_attention_heads=4, max_position_embeddings=128,
                                     word_embed_proj_dim=32)).eval()
    cfg = tiny_config.with_method("wanda")
    with capture_logs() as logs:
        result = run(cfg, tmp_path, model=model, tokenizer=byte_tokenizer())
    assert result.ok, result.failure
    assert any(e["event"] == "calibration_plan" and e["walk"] == "block" and e["blocks"] == "model.decoder.layers"
               for e in logs)
    assert [m[0] for m in moves(tmp_path / "run")].count("calibrated") == 2


def test_sequential_off_uses_one_pass_on_llama(tiny_config, tmp_path):
    cfg = tiny_config.with_method("sparsegpt").with_calibration(
        tiny_config.calibration.model_copy(update={"walk": "one_pass"}))
    assert run(cfg, tmp_path).ok
    assert [m[0] for m in moves(tmp_path / "run")].count("calibrated") == 1


def test_run_masks_reads_what_the_run_pruned_and_refuses_a_changed_artifact(tiny_config, tmp_path):
    from podar import run_masks
    from podar.schemas.errors import CheckpointError

    cfg = tiny_config.with_method("wanda").with_pattern(SparsityPatternConfig.nm_2_4())
    pipe = Pipeline(cfg, run_dir=tmp_path / "run", progress=False)
    assert pipe.run().ok
    masks = run_masks(tmp_path / "run")
    modules = dict(pipe.context.model.named_modules())
    assert len(masks) == 14
    for name, mask in masks.items():
        assert torch.equal(mask, modules[name].weight.detach() != 0), name
        assert int(mask.sum()) * 2 == mask.numel()
    path = next((tmp_path / "run" / "artifacts" / "masks").glob("*.safetensors"))
    path.write_bytes(path.read_bytes()[:-1] + b"\0")
    with pytest.raises(CheckpointError, match="sha256"):
        run_masks(tmp_path / "run")


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_last_group_runs_only_what_its_error_needs(tiny_config, tmp_path, method):
    """Block by block, the last group's outputs feed nothing: Wanda runs only the windows its reconstruction error
    is measured on, SparseGPT (error from Σ x xᵀ on every window) runs none; every layer still has its error."""
    cal = tiny_config.calibration.model_copy(update={"granularity": "block", "batch_size": 1,
                                                     "reconstruction_samples": 2})
    pipe = Pipeline(tiny_config.with_method(method).with_calibration(cal), run_dir=tmp_path / "run", progress=False)
    assert pipe.run().ok
    prunings = [r for r in pipe.results if r.stage == "pruning"]
    assert [r.metrics["block_forwards"] for r in prunings] == ([4, 2] if method == "wanda" else [4, 0])
    for r in prunings:
        errors = [lm["reconstruction_error"] for lm in r.layer_metrics.values()]
        assert len(errors) == 7 and all(0.0 < e < 1.0 for e in errors), r.metrics["group"]


def test_named_datasets_ship_with_podar(monkeypatch):
    """With no data folder set and no hub, the named datasets are podar's shipped copies, byte for byte the
    WikiText-2 files (their sha256 as podar/data/README.md gives them)."""
    from podar.engine import data

    monkeypatch.delenv("PODAR_DATA_DIR", raising=False)
    monkeypatch.setattr(data, "_from_hub", lambda spec: None)
    assert data.text_sha256(data.load_text("wikitext2", None)).startswith("4f3e427e4aff23ac")
    assert data.text_sha256(data.load_text("wikitext2-valid", None)).startswith("f0737ed31fc13290")


def test_a_data_folder_without_the_named_file_names_the_field_and_the_fix(tmp_path, monkeypatch):
    """A data folder that is set but lacks the file (and no hub): the error names the config field, the missing
    path, how to use the shipped texts, and the optional extra for the hub."""
    from podar.engine import data
    from podar.schemas.errors import DataError

    monkeypatch.setattr(data, "_from_hub", lambda spec: None)
    with pytest.raises(DataError, match=r"evaluation\.dataset 'wikitext2': '.*wiki\.test\.raw' does not exist.*"
                                        r"unset both to use the texts shipped with podar.*pip install 'podar\[hub\]'"):
        data.load_text("wikitext2", tmp_path, field="evaluation.dataset")
    monkeypatch.setenv("PODAR_DATA_DIR", str(tmp_path))
    assert data.resolve_data_dir(None) == tmp_path


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="file mappings are read from /proc/self/maps")
@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_pruned_weights_are_mapped_from_a_file(tiny_config, tmp_path, method):
    """After a group is pruned and propagated, its weights are file mappings (so they need not stay resident):
    SparseGPT's of the weights checkpoint just written, Wanda's (masks only in the run folder) of a scratch file
    that is unlinked at once. They equal what the solver or the mask made; writing to them changes no file."""
    from safetensors.torch import load_file

    from podar.engine.memory import file_backed_ranges
    from podar.engine.store import sha256_file

    run_dir = tmp_path / "run"
    pipe = Pipeline(tiny_config.with_method(method), run_dir=run_dir, progress=False)
    while pipe.stage is not PruningStage.FINE_TUNING:
        pipe.step()
    ctx = pipe.context
    records = [r for r in RunStore(run_dir).read_manifest().artifacts.values()
               if r.kind == "weights" and r.stage == "pruning"]  # not the dense reference's parts
    saved = {}
    for record in records:
        saved.update(load_file(run_dir / record.path))
    assert sorted(saved) == (sorted(ctx.state.targets) if method == "sparsegpt" else [])
    assert not list(run_dir.glob(".podar-scratch-*"))  # the scratch files are gone from the folder
    ranges = file_backed_ranges()
    for name, module in ctx.state.targets.items():
        w = module.weight.detach()
        if method == "sparsegpt":
            assert torch.equal(w, saved[name]), name
        else:
            assert torch.equal(w, ctx.state.dense_weights[name].masked_fill(~ctx.state.masks[name], 0.0)), name
        assert any(a <= w.data_ptr() < b for a, b in ranges), f"{name} is a copy in memory"
        assert int((w == 0).sum()) * 2 == w.numel()
    assert pipe.run().ok
    if records:
        path = run_dir / records[0].path
        digest = sha256_file(path)
        name = next(iter(load_file(path)))
        with torch.no_grad():
            ctx.state.targets[name].weight.add_(1.0)  # copy-on-write: the run folder's checkpoint stays as it was
        assert sha256_file(path) == digest == records[0].sha256


def test_sparsegpt_keeps_its_weights_in_memory_when_the_checkpoint_cannot_be_mapped(tiny_config, tmp_path,
                                                                                       monkeypatch):
    from structlog.testing import capture_logs

    from podar.engine import runtime

    def refuse(path):
        raise OSError(f"'{path}' cannot be mapped: no mmap here")

    monkeypatch.setattr(runtime, "load_file", refuse)
    with capture_logs() as logs:
        result = run(tiny_config.with_method("sparsegpt"), tmp_path)
    assert result.ok, result.failure
    warned = [e for e in logs if e["event"] == "weights_not_mapped"]
    assert warned and "no mmap here" in warned[0]["reason"]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_half_precision_model_calibrates_with_float32_statistics(tiny_config, tmp_path, method, dtype):
    """A half-precision model runs its calibration forwards in its dtype, while the statistics are fp32 sums; the
    pruned weights keep the model's dtype, every 2:4 group is exact, and the export verifies."""
    cfg = tiny_config.with_method(method).with_pattern(SparsityPatternConfig.nm_2_4())
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"dtype": dtype})})
    pipe = Pipeline(cfg, run_dir=tmp_path / "run", progress=False)
    seen = []
    while pipe.stage is not PruningStage.FINE_TUNING:
        pipe.step()
        if pipe.stage is PruningStage.COMPUTING_IMPORTANCE:  # right after Calibrating
            seen.append(pipe.context.state.stats)
    assert seen
    key = "sq_norm_sum" if method == "wanda" else "gram_sum"
    for stats in seen:
        for name, entry in stats.items():
            stat = getattr(entry, key)
            assert stat.dtype == torch.float32, name
            assert bool(torch.isfinite(stat).all()) and float(stat.abs().sum()) > 0, name
    ctx = pipe.context
    for name, module in ctx.state.targets.items():
        w = module.weight.detach()
        assert w.dtype == getattr(torch, dtype), name
        kept = (w.reshape(w.shape[0], -1, 4) != 0).sum(dim=-1)
        assert bool((kept <= 2).all()) and int((w == 0).sum()) * 2 >= w.numel(), name
    assert pipe.run().ok


@pytest.mark.parametrize("walk", ["block", "site", "one_pass"])
def test_calibration_and_pruning_forwards_build_no_autograd_graph(tiny_config, tmp_path, walk):
    """Every forward of Calibrating and Pruning runs without autograd: a graph would keep each block's activations
    alive (measured: 290 MB more peak memory for Wanda on SmolLM2 when the block walk's statistics pass had one)."""
    cfg = tiny_config.with_method("wanda").with_calibration(tiny_config.calibration.model_copy(update={"walk": walk}))
    pipe = Pipeline(cfg, run_dir=tmp_path / "run", progress=False)
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda mod, args, out: seen.append(torch.is_grad_enabled()) if isinstance(mod, torch.nn.Linear) else None)
    try:
        while pipe.stage is not PruningStage.FINE_TUNING:
            pipe.step()
    finally:
        handle.remove()
    assert seen and not any(seen)
    assert pipe.run().ok
