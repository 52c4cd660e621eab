"""Structured pruning (issue 30): blocks, MLP channels and attention heads removed for real, the same in every layer.

The statistics against plain float64 loops; the kept indices against a float64 reference ranking of statistics taken
independently; the sliced model against the dense model with the same channels and heads zeroed and the same blocks
skipped; runs to Complete with the export reloaded by ``AutoModelForCausalLM.from_pretrained`` equal to podar's
pruned model; a run killed at each checkpoint resumed to the same export; every bad input refused before any work.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import killed_and_resumed, make_tiny_config
from torch import nn

from podar import Pipeline, StructureConfig, verify_audit
from podar.engine.models import tiny_model
from podar.engine.store import RunStore, sha256_file
from podar.schemas.config import TinyModelConfig
from podar.schemas.errors import ConfigError
from podar.stages.structure import (
    WIDTH_FAMILIES,
    StructurePlan,
    apply_plan,
    block_influence,
    channel_sums,
    head_sums,
    kept_blocks,
    kept_channels,
    kept_heads,
)

# ---------------------------------------------------------------- the statistics and rankings in float64


def test_block_influence_and_channel_sums_against_float64_loops():
    g = torch.Generator().manual_seed(0)
    h_in, h_out = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    want = 0.0
    for b in range(2):
        for t in range(5):
            x, y = h_in[b, t].double(), h_out[b, t].double()
            want += 1.0 - float(x @ y) / float(x.norm() * y.norm())
    assert float(block_influence(h_in, h_out)) == pytest.approx(want, rel=1e-12)
    assert float(block_influence(h_in, h_in)) == pytest.approx(0.0, abs=1e-12)
    x = torch.randn(3, 700, 12, generator=g)  # more rows than one chunk of the float64 squares
    sums = channel_sums(x)
    assert sums.dtype == torch.float64
    for c in range(12):
        assert float(sums[c]) == pytest.approx(sum(float(v) ** 2 for v in x[..., c].reshape(-1).double()), rel=1e-12)
    heads = head_sums(x, 3)
    for h in range(3):
        assert float(heads[h]) == pytest.approx(float(x[..., 4 * h:4 * h + 4].double().square().sum()), rel=1e-12)


def test_rankings_keep_the_largest_and_break_ties_to_the_lower_index():
    assert kept_blocks(torch.tensor([0.5, 0.1, 0.9, 0.1], dtype=torch.float64), 2) == [0, 2]
    assert kept_channels(torch.tensor([3.0, 1.0, 3.0, 2.0, 0.5]), 3) == [0, 2, 3]
    sums = torch.tensor([1.0, 9.0, 2.0, 2.0, 5.0, 0.0, 7.0, 0.5])  # 8 query heads, 4 KV groups of 2
    assert kept_heads(sums, 4, 4, 2) == ([0, 1, 6, 7], [0, 3])  # groups by 10, 4, 5, 7.5
    assert kept_heads(sums, 4, 4, 4) == ([1, 2, 4, 6], [0, 1, 2, 3])  # the better query head of every group
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        s = torch.rand(16, generator=g, dtype=torch.float64)
        want = sorted(sorted(range(16), key=lambda i: (-float(s[i]), i))[:10])
        assert kept_channels(s, 10) == want


# ---------------------------------------------------------------- the surgery computes what the zeroed model does


def _tiny(arch, layers=3, **kw):
    model, _ = tiny_model(TinyModelConfig(arch=arch, num_hidden_layers=layers, hidden_size=64,
                                          intermediate_size=96, num_attention_heads=8, num_key_value_heads=4, **kw))
    return model.eval()


def _zeroed(model, family, plan, n_q, head_dim):
    """The dense model with the plan's removed channels and heads zeroed and its removed blocks made identities."""
    from podar.stages.blocks import find_blocks

    ref = copy.deepcopy(model)
    layers = find_blocks(ref).layers
    with torch.no_grad():
        for i, block in enumerate(layers):
            if i in plan.channels:
                width = block.get_submodule(family.down).in_features
                gone = [c for c in range(width) if c not in plan.channels[i]]
                for name in family.up:
                    block.get_submodule(name).weight[gone] = 0
                    if block.get_submodule(name).bias is not None:
                        block.get_submodule(name).bias[gone] = 0
                if family.fused_up:
                    block.get_submodule(family.fused_up).weight[gone + [width + c for c in gone]] = 0
                block.get_submodule(family.down).weight[:, gone] = 0
            if i in plan.q_heads:
                gone = [h for h in range(n_q) if h not in plan.q_heads[i]]
                rows = [h * head_dim + j for h in gone for j in range(head_dim)]
                block.get_submodule(family.o).weight[:, rows] = 0
    for i in range(len(layers)):
        if i not in plan.blocks:
            layers[i].forward = lambda hidden_states, *a, **k: hidden_states
    return ref


@pytest.mark.parametrize("arch", sorted(WIDTH_FAMILIES))
@pytest.mark.parametrize("kv_groups", [True, False])
def test_the_sliced_model_computes_what_the_dense_model_with_those_parts_zeroed_does(arch, kv_groups):
    from podar.stages.blocks import find_blocks
    from podar.stages.targets import linearize_conv1d

    model = _tiny(arch)
    linearize_conv1d(model)  # as a run does: GPT-2's Conv1D as nn.Linear
    family = WIDTH_FAMILIES[arch]
    width = model.config.n_inner or 4 * model.config.hidden_size if arch == "gpt2" else model.config.intermediate_size
    g = torch.Generator().manual_seed(2)
    channels = {i: sorted(torch.randperm(width, generator=g)[:width // 2].tolist()) for i in (0, 2)}
    if family.o is None:
        heads = {}
    elif kv_groups:
        heads = {i: ([0, 1, 6, 7], [0, 3]) for i in (0, 2)}
    else:
        heads = {0: ([1, 2, 5, 7], [0, 1, 2, 3]), 2: ([0, 3, 4, 6], [0, 1, 2, 3])}
    config = {"num_hidden_layers": 2, family.intermediate_key: width // 2}
    if heads:
        config.update(num_attention_heads=4, num_key_value_heads=len(heads[0][1]), head_dim=8)
    plan = StructurePlan(blocks=[0, 2], channels=channels, q_heads={i: q for i, (q, _) in heads.items()},
                         kv_heads={i: kv for i, (_, kv) in heads.items()}, head_dim=8 if heads else None,
                         config=config)
    reference = _zeroed(model, family, plan, 8, 8)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=g)
    with torch.no_grad():
        want = reference(input_ids=ids).logits
    apply_plan(model, find_blocks(model), family, plan)
    layers = find_blocks(model).layers
    assert len(layers) == 2 and model.config.num_hidden_layers == 2
    assert [layers[j].get_submodule(family.attention).layer_idx for j in range(2)] == [0, 1]
    assert layers[1].get_submodule(family.down).weight.shape == (64, width // 2)
    with torch.no_grad():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the KV cache indexes the renumbered layers
        out = model(input_ids=ids[:, :20], use_cache=True)
        step = model(input_ids=ids[:, 20:], cache=out.cache, use_cache=True).logits
    torch.testing.assert_close(step, got[:, 20:], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- end to end


def structure_config(corpus, arch="llama", layers=4, finetune=False, **structure):
    cfg = make_tiny_config(corpus, arch=arch, num_hidden_layers=layers, num_attention_heads=4,
                           num_key_value_heads=2).with_target_sparsity(0.0)
    cfg = cfg._with(structure=StructureConfig(**{"alignment": 8, **structure}))
    if finetune:
        cfg = cfg.with_finetune(cfg.finetune.model_copy(update={"enabled": True, "steps": 4, "checkpoint_every": 2,
                                                                "eval_every": 2, "loss": "kd+lm",
                                                                "learning_rate": 1e-3}))
    return cfg


def _reloaded_equal(run_dir, model, arch):
    """The export loaded by transformers alone gives podar's pruned model's outputs."""
    import transformers

    cls = transformers.AutoModel if arch == "bert" else transformers.AutoModelForCausalLM
    reloaded = cls.from_pretrained(run_dir / "export").eval()
    ids = torch.randint(3, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if arch == "bert":
            want, got = model(input_ids=ids).last_hidden_state, reloaded(input_ids=ids).last_hidden_state
        else:
            want, got = model(input_ids=ids).logits, reloaded(input_ids=ids).logits
    torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-4, atol=1e-4)
    return reloaded


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "phi3", "gpt2"])
def test_width_heads_and_depth_run_to_complete_and_the_export_loads_in_transformers(corpus, tmp_path, arch):
    heads = 0 if arch == "gpt2" else 2
    cfg = structure_config(corpus, arch, depth=1, mlp=0.25, heads=heads, finetune=arch == "llama")
    pipe = Pipeline(cfg, run_dir=tmp_path / "run", progress=False)
    result = pipe.run()
    assert result.ok, result.failure
    reloaded = _reloaded_equal(tmp_path / "run", pipe.context.model, arch)
    c = reloaded.config
    if arch == "gpt2":  # the MLP width is n_inner; 4 × 64 channels, a quarter gone
        assert (c.num_hidden_layers, c.n_inner) == (3, 96)
    else:
        assert (c.num_hidden_layers, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads,
                c.head_dim) == (3, 96, 2, 1, 16)
    pruning = next(r for r in result.results if r.stage == "pruning").metrics
    assert pruning["parameters_after"] == sum(p.numel() for p in reloaded.parameters())
    assert pruning["parameters_after"] < pruning["parameters_before"]
    manifest = RunStore(tmp_path / "run").read_manifest()
    assert [a.kind for a in manifest.artifacts.values()].count("structure") == 1
    verify_audit(tmp_path / "run" / "audit.jsonl", manifest.run_id, manifest.history)
    report = (tmp_path / "run" / "report.md").read_text()
    assert "structured pruning" in report and "blocks kept" in report and "Achieved sparsity" not in report
    card = (tmp_path / "run" / "export" / "README.md").read_text()
    assert "- structured-pruning" in card and "3 kept" in card and "16 kept" not in card
    if arch == "llama":  # every remaining weight trained, with the dense copy as teacher
        ft = [r for r in result.results if r.stage == "fine_tuning"]
        assert sum(r.metrics["steps"] for r in ft) == 4
        ev = next(r for r in result.results if r.stage == "evaluating").metrics
        assert ev["dense_ppl"] != ev["pruned_ppl"]


@pytest.mark.parametrize("arch", ["gpt2", "opt", "phi3", "gemma3", "bert"])
def test_depth_runs_to_complete_for_every_family_podar_walks(corpus, tmp_path, arch):
    cfg = structure_config(corpus, arch, depth=0.5)
    if arch == "bert":
        cfg = cfg._with(evaluation=cfg.evaluation.model_copy(update={"enabled": False}))
    pipe = Pipeline(cfg, run_dir=tmp_path / "run", progress=False)
    result = pipe.run()
    assert result.ok, result.failure
    reloaded = _reloaded_equal(tmp_path / "run", pipe.context.model, arch)
    assert reloaded.config.num_hidden_layers == 2
    if arch == "gemma3":  # the per-layer list cut with the blocks
        assert len(reloaded.config.layer_types) == 2


def _plan_of(run_dir):
    store = RunStore(run_dir)
    manifest = store.read_manifest()
    record = next(a for a in manifest.artifacts.values() if a.kind == "structure")
    from safetensors import safe_open

    with safe_open(str(store.artifact_path(record.path)), framework="pt") as f:
        return StructurePlan.from_tensors({k: f.get_tensor(k) for k in f.keys()}, f.metadata())


def test_kept_indices_equal_a_float64_ranking_of_independently_taken_statistics(corpus, tmp_path):
    cfg = structure_config(corpus, depth=1, mlp=0.5, heads=2, heads_unit="query_per_group")
    pipe = Pipeline(cfg, run_dir=tmp_path / "run", progress=False)
    assert pipe.run().ok
    plan = _plan_of(tmp_path / "run")
    # the statistics again, with plain hooks over the same calibration windows, summed in float64
    model = _tiny_from(cfg)
    samples = pipe.context.state.calibration_samples
    influence, mlp, heads = [0.0] * 4, [[0.0] * 128 for _ in range(4)], [[0.0] * 4 for _ in range(4)]
    hooks = []
    for i, block in enumerate(model.model.layers):
        def on_block(_m, args, kwargs, out, i=i):
            x = (args[0] if args else kwargs["hidden_states"]).double()
            y = (out[0] if isinstance(out, tuple) else out).double()
            influence[i] += float((1 - torch.nn.functional.cosine_similarity(x, y, dim=-1)).sum())

        def on_down(_m, args, i=i):
            for c, v in enumerate(args[0].double().square().sum(dim=(0, 1)).tolist()):
                mlp[i][c] += v

        def on_o(_m, args, i=i):
            for h, v in enumerate(args[0].double().square().reshape(*args[0].shape[:2], 4, -1).sum(dim=(0, 1, 3))
                                  .tolist()):
                heads[i][h] += v
        hooks += [block.register_forward_hook(on_block, with_kwargs=True),
                  block.mlp.down_proj.register_forward_pre_hook(on_down),
                  block.self_attn.o_proj.register_forward_pre_hook(on_o)]
    with torch.no_grad():
        model.model(input_ids=samples)
    blocks = sorted(sorted(range(4), key=lambda i: (influence[i], i))[1:])
    assert plan.blocks == blocks
    for i in blocks:
        assert plan.channels[i] == sorted(sorted(range(128), key=lambda c: (-mlp[i][c], c))[:64])
        want_q = [g * 2 + max((0, 1), key=lambda j: (heads[i][g * 2 + j], -j)) for g in range(2)]
        assert plan.q_heads[i] == want_q and plan.kv_heads[i] == [0, 1]


def _tiny_from(cfg):
    model, _ = tiny_model(cfg.model.tiny)
    return model.eval()


def test_iterative_depth_measures_again_after_each_block_goes(corpus, tmp_path):
    cfg = structure_config(corpus, layers=5, depth=2, depth_mode="iterative")
    result = Pipeline(cfg, run_dir=tmp_path / "run", progress=False).run()
    assert result.ok, result.failure
    cal = next(r for r in result.results if r.stage == "calibrating").metrics
    assert cal["structure_passes"] == 2
    order = [int(v) for v in cal["removal_order"].split(",")]
    assert _plan_of(tmp_path / "run").blocks == [i for i in range(5) if i not in order]


# ---------------------------------------------------------------- durability


@pytest.mark.parametrize("fault", ["kill@after:calibrating", "kill@after:pruning", "kill@step:fine_tuning#3",
                                   "kill@after:evaluating"])
def test_a_structured_run_killed_at_each_checkpoint_resumes_to_the_same_export(corpus, tmp_path, fault):
    manifest = killed_and_resumed(structure_config(corpus, depth=1, mlp=0.25, heads=2, finetune=True), tmp_path,
                                  fault)
    assert [a.kind for a in manifest.artifacts.values()].count("structure") == 1  # the plan, written once


# ---------------------------------------------------------------- bad input, refused before any work


@pytest.mark.parametrize(("arch", "structure", "words"), [
    ("llama", {"depth": 4}, "removes 4 blocks; the model has 4"),
    ("llama", {"depth": 9}, "the model has 4"),
    ("llama", {"depth": 0.1}, "rounds to none removed"),
    ("llama", {"heads": 1}, "whole KV group of 2 query heads"),
    ("llama", {"heads": 4}, "removes 2 of 2 KV groups"),
    ("llama", {"heads": 1, "heads_unit": "query_per_group"}, "each of the 2 KV groups"),
    ("llama", {"mlp": 0.2, "alignment": 64}, "rounds to no channel removed"),
    ("llama", {"mlp": 0.9, "alignment": 64}, "rounds to zero"),
    ("opt", {"mlp": 0.25}, "model_type 'opt' is not"),
    ("bert", {"heads": 2}, "model_type 'bert' is not"),
    ("gpt2", {"heads": 2}, "GPT-2's head width is hidden_size / n_head"),
])
def test_bad_structure_is_refused_before_any_work(corpus, tmp_path, arch, structure, words):
    cfg = structure_config(corpus, arch, **structure)
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        Pipeline(cfg, run_dir=tmp_path / "run", progress=False).run()
    assert not (tmp_path / "run" / "manifest.json").exists()


def test_an_unknown_per_layer_config_list_is_refused(corpus, tmp_path, monkeypatch):
    from podar.engine import models

    real = models._tiny_config

    def with_list(cfg):
        config = real(cfg)
        config.no_rope_layers = [1] * config.num_hidden_layers
        return config

    monkeypatch.setattr(models, "_tiny_config", with_list)
    with pytest.raises(ConfigError, match="'no_rope_layers' is a list of one entry per block"):
        Pipeline(structure_config(corpus, depth=1), run_dir=tmp_path / "run", progress=False).run()


def test_a_count_that_is_not_an_integer_is_refused_by_the_config():
    with pytest.raises(ValueError, match="a fraction is in"):
        StructureConfig(depth=1.5)


def test_depth_on_a_model_without_blocks_is_refused(corpus, tmp_path):
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"num_hidden_layers": 1, "to_dict": lambda self: {}})()
            self.proj = nn.Linear(4, 4)

    from podar.stages.structure import resolve

    with pytest.raises(ConfigError, match="no stack of repeated blocks"):
        resolve(structure_config(corpus, depth=1), Flat())


def test_the_plan_round_trips_through_its_artifact():
    plan = StructurePlan(blocks=[0, 3], channels={0: [1, 2], 3: [0, 5]}, q_heads={0: [0, 1]}, kv_heads={0: [0]},
                         head_dim=8, config={"num_hidden_layers": 2, "intermediate_size": 2}, hidden=[0, 2, 5])
    tensors, meta = plan.to_tensors()
    assert StructurePlan.from_tensors(tensors, meta) == plan
    assert json.loads(meta["config"]) == plan.config


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="torchrun with gloo on Linux")
def test_two_processes_choose_what_one_process_chooses(corpus, tmp_path):
    cfg = structure_config(corpus, depth=1, mlp=0.25, heads=2, hidden=0.25)
    cfg = cfg.with_calibration(cfg.calibration.model_copy(update={"num_samples": 6}))
    assert Pipeline(cfg, run_dir=tmp_path / "one", progress=False).run().ok
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(29500 + os.getpid() % 1000), "-m", "podar.cli", "run", str(path), "--run-dir",
                           str(tmp_path / "two"), "--no-progress"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _plan_of(tmp_path / "two") == _plan_of(tmp_path / "one")
    assert RunStore(tmp_path / "two").read_manifest().world_size == 2
    assert sha256_file(tmp_path / "one/export/model.safetensors") == sha256_file(
        tmp_path / "two/export/model.safetensors")


@pytest.mark.parametrize(("fmt", "quant"), [("gguf", "none"), ("dense", "w8a16"), ("dense", "w4a16")])
def test_structured_exports_in_every_format_reload_with_the_new_shapes(corpus, tmp_path, fmt, quant):
    from podar import ExportConfig

    cfg = structure_config(corpus, depth=1, mlp=0.25, heads=2)
    cfg = cfg.with_export(ExportConfig(format=fmt, quantization=quant, group_size=16, dtype="float32"))
    result = Pipeline(cfg, run_dir=tmp_path / "run", progress=False).run()
    assert result.ok, result.failure
    ex = next(r for r in result.results if r.stage == "exporting").metrics
    assert ex["logits_max_abs_diff"] is not None
    if fmt == "gguf":
        import gguf

        reader = gguf.GGUFReader(str(tmp_path / "run" / "export" / "model.gguf"))
        fields = {k: int(v.parts[-1][0]) for k, v in reader.fields.items()
                  if k.startswith("llama.") and k.endswith(("block_count", "head_count", "head_count_kv",
                                                            "key_length", "feed_forward_length"))}
        assert fields == {"llama.block_count": 3, "llama.attention.head_count": 2, "llama.attention.head_count_kv": 1,
                          "llama.attention.key_length": 16, "llama.feed_forward_length": 96}


def test_structure_on_an_offloaded_model_is_refused_before_any_work(corpus, tmp_path):
    cfg = structure_config(corpus, depth=1)
    cfg = cfg.with_runtime(cfg.runtime.model_copy(update={"offload": "blocks"}))
    with pytest.raises(ConfigError, match="offloaded structured pruning is not built"):
        Pipeline(cfg, run_dir=tmp_path / "run", progress=False).run()
    assert not (tmp_path / "run" / "manifest.json").exists()
