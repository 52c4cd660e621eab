"""FLAP-style bias compensation for structured pruning (issue 30): the mean output of the removed MLP channels and
attention heads over the calibration tokens, folded into the bias of the layer they fed.

The compensation against a plain float64 loop; on a pruned model, every kept block's MLP and attention output
projections give the dense model's mean output over the calibration tokens (they do not without it); runs to Complete
with the export reloaded by ``AutoModelForCausalLM.from_pretrained`` (its config switching the biases on); a run
killed after Pruning or inside FineTuning resumes to the same export; what cannot take a bias is refused before any
work.
"""

from __future__ import annotations

import pytest
import torch
from helpers import killed_and_resumed
from test_structure import _plan_of, _reloaded_equal, structure_config

from podar import ExportConfig, Pipeline
from podar.engine.store import sha256_file
from podar.schemas.errors import ConfigError
from podar.stages.structure import WIDTH_FAMILIES, StructurePlan, channel_totals, compensation


def test_compensation_against_a_float64_loop():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(5, 9, generator=g), torch.randn(3, 700, 9, generator=g)  # more rows than one chunk
    first = channel_totals(x)
    assert first.dtype == torch.float64
    for c in range(9):
        assert float(first[c]) == pytest.approx(sum(float(v) for v in x[..., c].reshape(-1).double()), rel=1e-12)
    kept = [0, 2, 3, 7]
    got = compensation(w, kept, first, 2100)
    for o in range(5):
        want = sum(float(w[o, c]) * float(first[c]) / 2100 for c in range(9) if c not in kept)
        assert got[o] == pytest.approx(want, rel=1e-12, abs=1e-15)
    # the layer's mean output over the tokens is what it was with every column
    flat = x.reshape(-1, 9).double()
    dense = (flat @ w.double().t()).mean(dim=0)
    pruned = (flat[:, kept] @ w[:, kept].double().t()).mean(dim=0) + torch.tensor(got, dtype=torch.float64)
    torch.testing.assert_close(pruned, dense, rtol=1e-12, atol=1e-12)


def _inputs(model, family, samples):
    """Per block of ``model``: the inputs of its MLP output projection and of its attention output projection over
    ``samples``, float64, flattened over tokens."""
    from podar.stages.blocks import find_blocks

    out: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for i, block in enumerate(find_blocks(model).layers):
        for part, name in (("mlp", family.down), ("o", family.o)):
            def hook(_m, args, i=i, part=part):
                out[(i, part)] = args[0].detach().double().reshape(-1, args[0].shape[-1])
            hooks.append(block.get_submodule(name).register_forward_pre_hook(hook))
    with torch.no_grad():
        model(input_ids=samples)
    for h in hooks:
        h.remove()
    return out


@pytest.mark.parametrize("compensate", [True, False])
def test_every_kept_block_gives_the_dense_mean_output_on_the_calibration_tokens(corpus, tmp_path, compensate):
    cfg = structure_config(corpus, mlp=0.5, heads=2, heads_unit="query_per_group", bias_compensation=compensate)
    pipe = Pipeline(cfg, run_dir=tmp_path / "run", progress=False)
    result = pipe.run()
    assert result.ok, result.failure
    st = pipe.context.state
    family, plan = WIDTH_FAMILIES["llama"], st.structure_plan
    dense = _inputs(st.dense_model, family, st.calibration_samples)  # what calibration measured
    pruned_layers = pipe.context.model.model.layers
    worst = 0.0
    for j, i in enumerate(plan.blocks):
        block = pruned_layers[j]
        for part, name, kept in (("mlp", family.down, plan.channels[i]),
                                 ("o", family.o, [h * 16 + d for h in plan.q_heads[i] for d in range(16)])):
            x = dense[(i, part)]
            want = x.mean(dim=0) @ st.dense_model.model.layers[i].get_submodule(name).weight.double().t()
            layer = block.get_submodule(name)
            got = x[:, kept].mean(dim=0) @ layer.weight.double().t()
            if layer.bias is not None:
                got = got + layer.bias.double()
            gap = float((got - want).abs().max().detach() / want.abs().max())
            worst = max(worst, gap)
            if compensate:
                assert gap < 1e-5, (i, part, gap)
    if not compensate:  # the check can fail: without the bias the mean output moves
        assert worst > 1e-3
    if compensate:
        c = pipe.context.model.config
        assert c.mlp_bias is True and c.attention_bias is True
        assert all(float(b.self_attn.q_proj.bias.detach().abs().max()) == 0.0
                   and float(b.mlp.gate_proj.bias.detach().abs().max()) == 0.0 for b in pruned_layers)
        card = (tmp_path / "run" / "export" / "README.md").read_text()
        assert "bias compensation" in card


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_compensated_run_completes_and_its_export_loads_in_transformers(corpus, tmp_path, arch):
    heads = 0 if arch == "gpt2" else 2
    cfg = structure_config(corpus, arch, depth=1, mlp=0.25, heads=heads, bias_compensation=True)
    pipe = Pipeline(cfg, run_dir=tmp_path / "run", progress=False)
    result = pipe.run()
    assert result.ok, result.failure
    reloaded = _reloaded_equal(tmp_path / "run", pipe.context.model, arch)
    plan = _plan_of(tmp_path / "run")
    assert sorted(plan.mlp_bias) == plan.blocks and all(any(v != 0 for v in b) for b in plan.mlp_bias.values())
    if arch == "llama":
        assert reloaded.config.mlp_bias and reloaded.config.attention_bias
        assert sorted(plan.o_bias) == plan.blocks
        assert reloaded.model.layers[0].mlp.down_proj.bias is not None
    else:  # GPT-2's c_proj has a bias of its own: the compensation is added to it
        dense_bias = pipe.context.state.dense_model.transformer.h[plan.blocks[0]].mlp.c_proj.bias.double()
        got = reloaded.transformer.h[0].mlp.c_proj.bias.double()
        torch.testing.assert_close(got - dense_bias, torch.tensor(plan.mlp_bias[plan.blocks[0]], dtype=torch.float64),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("quant", ["w8a16", "w4a16"])
def test_compensated_pack_quantized_exports_pass_their_check(corpus, tmp_path, quant):
    cfg = structure_config(corpus, mlp=0.25, heads=2, bias_compensation=True)
    cfg = cfg.with_export(ExportConfig(format="dense", quantization=quant, group_size=16, dtype="float32"))
    result = Pipeline(cfg, run_dir=tmp_path / "run", progress=False).run()
    assert result.ok, result.failure
    ex = next(r for r in result.results if r.stage == "exporting").metrics
    assert ex["logits_max_abs_diff"] is not None


@pytest.mark.parametrize("fault", ["kill@after:pruning", "kill@step:fine_tuning#3"])
def test_a_compensated_run_killed_resumes_to_the_same_export(corpus, tmp_path, fault):
    cfg = structure_config(corpus, depth=1, mlp=0.25, heads=2, finetune=True, bias_compensation=True)
    manifest = killed_and_resumed(cfg, tmp_path, fault)
    assert [a.kind for a in manifest.artifacts.values()].count("structure") == 1


def test_the_plan_with_biases_round_trips_through_its_artifact():
    plan = StructurePlan(blocks=[0, 3], channels={0: [1, 2], 3: [0, 5]}, head_dim=8,
                         config={"num_hidden_layers": 2, "mlp_bias": True},
                         mlp_bias={0: [0.1, -2.5e-7, 3.0], 3: [1.0 / 3, 0.0, -1.0]})
    tensors, meta = plan.to_tensors()
    assert tensors["mlp_bias.3"].dtype == torch.float64
    assert StructurePlan.from_tensors(tensors, meta) == plan


@pytest.mark.parametrize(("arch", "structure", "words"), [
    ("llama", {"depth": 1}, "structure removes neither"),
    ("qwen2", {"mlp": 0.25}, "model_type 'qwen2' has no bias on its MLP output projection"),
    ("mistral", {"heads": 2}, "model_type 'mistral' has no bias on its attention output projection"),
    ("phi3", {"mlp": 0.25}, "model_type 'phi3' has no bias"),
    ("llama", {"mlp": 0.25, "gguf": True}, "export.format gguf"),
])
def test_compensation_where_no_bias_can_go_is_refused_before_any_work(corpus, tmp_path, arch, structure, words):
    gguf = structure.pop("gguf", False)
    cfg = structure_config(corpus, arch, bias_compensation=True, **structure)
    if gguf:
        cfg = cfg.with_export(ExportConfig(format="gguf"))
    with pytest.raises(ConfigError, match=words):
        Pipeline(cfg, run_dir=tmp_path / "run", progress=False).run()
    assert not (tmp_path / "run" / "manifest.json").exists()


def test_two_processes_compensate_as_one_does(corpus, tmp_path):
    """The first moments are summed in batch order over processes like the other statistics: the same biases."""
    import sys

    from test_distributed import torchrun

    if not sys.platform.startswith("linux"):
        pytest.skip("torchrun with gloo on Linux")
    cfg = structure_config(corpus, mlp=0.25, heads=2, bias_compensation=True, channel_score="fluctuation")
    cfg = cfg.with_calibration(cfg.calibration.model_copy(update={"num_samples": 6}))
    assert Pipeline(cfg, run_dir=tmp_path / "one", progress=False).run().ok
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    proc = torchrun(["run", str(path), "--run-dir", str(tmp_path / "two"), "--no-progress"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _plan_of(tmp_path / "two") == _plan_of(tmp_path / "one")  # the same sums, added in the same order
    assert sha256_file(tmp_path / "one/export/model.safetensors") == sha256_file(
        tmp_path / "two/export/model.safetensors")


# ---------------------------------------------------------------- FLAP's fluctuation ranking


def test_fluctuation_against_a_float64_loop():
    from podar.stages.structure import channel_sums, fluctuation

    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(2, 600, 6, generator=g) + torch.arange(6.0), torch.randn(3, 6, generator=g)
    got = fluctuation(channel_sums(x), channel_totals(x), 1200, w)
    for c in range(6):
        values = [float(v) for v in x[..., c].reshape(-1).double()]
        mean = sum(values) / 1200
        var = sum((v - mean) ** 2 for v in values) / 1200
        assert float(got[c]) == pytest.approx(var * sum(float(w[o, c]) ** 2 for o in range(3)), rel=1e-9)


def test_fluctuation_keeps_the_channels_and_heads_of_a_float64_reference(corpus, tmp_path):
    cfg = structure_config(corpus, mlp=0.5, heads=2, heads_unit="query_per_group", channel_score="fluctuation")
    pipe = Pipeline(cfg, run_dir=tmp_path / "run", progress=False)
    assert pipe.run().ok
    plan = _plan_of(tmp_path / "run")
    assert plan.mlp_bias == {} and plan.o_bias == {}  # the ranking alone: no compensation asked
    dense = pipe.context.state.dense_model
    family = WIDTH_FAMILIES["llama"]
    inputs = _inputs(dense, family, pipe.context.state.calibration_samples)
    for i in range(4):
        a = inputs[(i, "mlp")]
        w = dense.model.layers[i].mlp.down_proj.weight.double()
        score = a.var(dim=0, unbiased=False) * w.square().sum(dim=0)
        assert plan.channels[i] == sorted(sorted(range(128), key=lambda c: (-float(score[c]), c))[:64])
        o = inputs[(i, "o")]
        wo = dense.model.layers[i].self_attn.o_proj.weight.double()
        per_head = (o.var(dim=0, unbiased=False) * wo.square().sum(dim=0)).view(4, 16).sum(dim=1)
        want = [g * 2 + max((0, 1), key=lambda j: (float(per_head[g * 2 + j]), -j)) for g in range(2)]
        assert plan.q_heads[i] == want
    # the activation ranking chooses otherwise somewhere (the check can fail)
    other = Pipeline(structure_config(corpus, mlp=0.5, heads=2, heads_unit="query_per_group"),
                     run_dir=tmp_path / "activation", progress=False)
    assert other.run().ok
    assert _plan_of(tmp_path / "activation").channels != plan.channels
