"""Sub-layer sequential calibration: the site walk against the block's own forward, the site grouping, and the
masks of a whole run against a float64 reference built from the pruned model's own activations."""

from __future__ import annotations

import pytest
import torch
from structlog.testing import capture_logs
from torch import nn

from podar import Pipeline, PruneMethod, PruningStage, SparsityPatternConfig, TinyModelConfig, run_masks, tiny_llama
from podar.engine.store import RunStore
from podar.schemas.errors import ConfigError
from podar.stages.blocks import capture_first_block_inputs, find_blocks, run_block
from podar.stages.methods.sparsegpt import SparseGPT
from podar.stages.sublayer import SITE_NAMES, SublayerCursor, block_sites, check_block, group_targets_by_site


def tiny(seed=0, layers=2):
    torch.manual_seed(seed)
    model, _tok = tiny_llama(TinyModelConfig(num_hidden_layers=layers))
    return model.eval()


def block_inputs(model, n=5, t=24, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (n, t), generator=g)
    return capture_first_block_inputs(model, find_blocks(model), ids, batch, torch.device("cpu"))


def test_walk_reproduces_the_blocks_forward_bitwise():
    model = tiny(layers=3)
    inputs = block_inputs(model)  # batches of 2, 2, 1
    expected = inputs
    for block in model.model.layers:
        expected = run_block(block, expected)
    cursor = SublayerCursor.start(inputs)
    cursor.advance_to(model.model.layers, 3, 0)
    assert cursor.site_passes == 12 and cursor.carry is None
    assert torch.equal(cursor.hidden, torch.cat(expected.hidden))
    assert check_block(model.model.layers[0], inputs.hidden[0], inputs.calls[0].kwargs) == 0.0
    with pytest.raises(ValueError, match="cannot move back"):
        cursor.advance_to(model.model.layers, 1, 2)


def test_walk_keeps_one_carry_buffer_and_stops_after_a_cut_short_step():
    model = tiny(layers=3)
    layers = model.model.layers
    cursor = SublayerCursor.start(block_inputs(model))  # batches of 2, 2, 1
    cursor.step(layers)  # site 0: attention output stored
    storage = cursor.buffer.data_ptr()
    assert cursor.carry.data_ptr() == storage and cursor.carry.shape[-1] == layers[0].self_attn.o_proj.in_features
    cursor.advance_to(layers, 1, 3)  # through block 0 and most of block 1
    assert cursor.carry.data_ptr() == storage and cursor.carry.shape[-1] == layers[1].mlp.down_proj.in_features
    before = cursor.hidden.clone()
    cursor.step(layers, max_batches=1)  # only the first batch (2 samples) goes past the site
    assert cursor.truncated
    assert not torch.equal(cursor.hidden[:2], before[:2]) and torch.equal(cursor.hidden[2:], before[2:])
    with pytest.raises(RuntimeError, match="cut short"):
        cursor.step(layers)


def odd_widths_model():
    """Attention width 32 and MLP width 48, both below the hidden size 64 (the held inputs are the widest)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("odd", [False, True], ids=["tiny", "odd-widths"])
def test_norms_made_for_the_statistics_are_reused_by_the_step(odd):
    model = odd_widths_model() if odd else tiny(layers=2)
    layers = model.model.layers
    inputs = block_inputs(model)  # batches of 2, 2, 1
    plain = SublayerCursor.start(inputs)
    plain.advance_to(layers, 2, 0)  # never asked for its site inputs: norms every batch itself

    calls = {"n": 0}
    norms = [m for b in layers for m in (b.input_layernorm, b.post_attention_layernorm)]
    handles = [m.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1)) for m in norms]
    try:
        cursor = SublayerCursor.start(inputs)
        while cursor.position < (2, 0):
            if cursor.position == (1, 2):  # a consumer that stops after one batch: nothing is held
                next(iter(cursor.site_inputs(layers)))
                assert cursor.held is None
            else:
                list(cursor.site_inputs(layers))
                assert cursor.held == (cursor.position if cursor.site in (0, 2) else None)
            cursor.step(layers)
            assert cursor.held is None
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(cursor.hidden, plain.hidden)  # bitwise: the held inputs are the very values
    # 4 normed sites x 3 batches, once each; the cut-short site: 1 batch for the consumer, 3 in the step
    assert calls["n"] == 3 * 3 + 1 + 3


def test_site_inputs_are_what_each_linear_reads():
    model = tiny()
    inputs = block_inputs(model)
    block = model.model.layers[0]
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: seen.setdefault(n, []).append(a[0]))
             for n, m in block.named_modules() if isinstance(m, nn.Linear)]
    run_block(block, inputs)
    for h in hooks:
        h.remove()
    cursor = SublayerCursor.start(inputs)
    for site, name in enumerate(["self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"]):
        assert cursor.position == (0, site)
        got = torch.cat(list(cursor.site_inputs(model.model.layers)))
        assert torch.equal(got, torch.cat(seen[name])), SITE_NAMES[site]
        cursor.step(model.model.layers)


def test_block_sites_and_grouping():
    model = tiny()
    sites = block_sites(model.model.layers[0])
    names = {id(m): n for n, m in model.model.layers[0].named_modules()}
    assert [[names[id(m)] for m in s] for s in sites] == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    targets = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and "layers" in n
               and "k_proj" not in n and not n.endswith("1.self_attn.o_proj")}
    positions, groups = group_targets_by_site(model.model.layers, targets)
    assert positions == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 2), (1, 3)]
    assert groups[0] == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    assert groups[4] == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]

    class NotLlama(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

    assert block_sites(NotLlama()) is None
    assert group_targets_by_site(nn.ModuleList([NotLlama()]), {}) is None


def test_gram_upper_bands_match_float64_reference():
    g = torch.Generator().manual_seed(0)
    method = SparseGPT()
    entry = method.new_stats(600, torch.device("cpu"))  # 600 > 128: three levels of halving
    xs = [torch.randn(3, 7, 600, generator=g) * torch.linspace(0.1, 2, 600) for _ in range(3)]
    for x in xs:
        method.accumulate(entry, x)
    method.finish(entry)
    method.finish(entry)  # a shared record finished twice: mirrored once
    flat = torch.cat([x.reshape(-1, 600) for x in xs]).double()
    ref = flat.t() @ flat
    assert entry.n_samples == 9 and not entry.upper_only
    assert torch.allclose(entry.gram_sum.double(), ref, rtol=1e-5, atol=1e-3)
    assert torch.equal(entry.gram_sum, entry.gram_sum.t())


@pytest.mark.parametrize("pattern", [SparsityPatternConfig.unstructured(), SparsityPatternConfig.nm_2_4()])
def test_wanda_sublayer_masks_equal_float64_reference(tiny_config, tmp_path, pattern):
    """Sub-layer Wanda: each layer's statistics come from inputs that went through every pruned site before it,
    which are exactly the inputs that layer sees in the final pruned model. So the masks must equal per-row Wanda
    masks computed in float64 from the dense weights and the activations of the *pruned* model."""
    cfg = tiny_config.with_method("wanda").with_pattern(pattern).with_calibration(
        tiny_config.calibration.model_copy(update={"walk": "site"}))
    model, tok = tiny_llama(cfg.model.tiny)
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    pipe = Pipeline(cfg, run_dir=tmp_path / "run", model=model, tokenizer=tok, progress=False)
    result = pipe.run()
    assert result.ok, result.failure
    masks = run_masks(tmp_path / "run")
    samples = pipe.context.state.calibration_samples
    norms: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(
        lambda mod, a, o, n=n: norms.__setitem__(n, norms.get(n, 0) + a[0].double().pow(2).sum(dim=(0, 1))))
        for n, m in model.named_modules() if n in masks]
    bs = cfg.calibration.batch_size
    with torch.no_grad():
        for i in range(0, samples.shape[0], bs):  # the pruned model, in the run's batches
            model.model(input_ids=samples[i:i + bs], use_cache=False)
    for h in hooks:
        h.remove()
    assert len(masks) == 14
    for name, mask in masks.items():
        score = dense[name].double().abs() * (norms[name] / samples.shape[0]).sqrt()[None, :]
        if pattern.kind == "nm":  # 2 lowest of every 4 consecutive inputs, per row
            groups = score.view(score.shape[0], -1, 4)
            ref_keep = torch.ones_like(groups, dtype=torch.bool)
            ref_keep.scatter_(2, torch.sort(groups, dim=2, stable=True).indices[:, :, :2], False)
            ref_keep = ref_keep.view_as(mask)
        else:  # half of every row
            ref_keep = torch.ones_like(mask)
            ref_keep.scatter_(1, torch.sort(score, dim=1, stable=True).indices[:, :score.shape[1] // 2], False)
        assert torch.equal(mask, ref_keep), name


@pytest.mark.parametrize("method", [PruneMethod.WANDA, PruneMethod.SPARSEGPT])
@pytest.mark.parametrize("pattern", [SparsityPatternConfig.unstructured(), SparsityPatternConfig.nm_2_4()])
def test_sublayer_runs_site_by_site(tiny_config, tmp_path, method, pattern):
    cfg = tiny_config.with_method(method).with_pattern(pattern).with_calibration(
        tiny_config.calibration.model_copy(update={"walk": "site"}))
    with capture_logs() as logs:
        result = Pipeline(cfg, run_dir=tmp_path / "run", progress=False).run()
    assert result.ok, result.failure
    assert any(e["event"] == "calibration_plan" and e["walk"] == "site" and e["groups"] == 8
               for e in logs)
    manifest = RunStore(tmp_path / "run").read_manifest()
    calibrations = [r for r in manifest.results if r.stage == "calibrating"]
    assert [(r.metrics["block"], r.metrics["site"]) for r in calibrations] == [
        (b, s) for b in range(2) for s in SITE_NAMES]
    prunings = [r for r in manifest.results if r.stage == "pruning"]
    # one site pass each (one forward per block); after the last site nothing downstream needs the outputs, so
    # SparseGPT (its error comes from Σ x xᵀ) runs none, Wanda only the windows its error is measured on
    assert [r.metrics["block_forwards"] for r in prunings] == [1] * 7 + [0 if method == "sparsegpt" else 1]
    for r in prunings:
        for name, lm in r.layer_metrics.items():
            assert lm["mask_sparsity"] == pytest.approx(0.5, abs=0.01), name
            assert 0.0 < lm["reconstruction_error"] < 1.0, name
    assert len([a for a in manifest.artifacts.values() if a.kind == "masks"]) == 8


def test_sublayer_falls_back_to_blocks_when_the_walk_differs(tiny_config, tmp_path):
    model, tok = tiny_llama(tiny_config.model.tiny)
    block = model.model.layers[0]
    plain = type(block).forward
    block.forward = lambda *a, **k: plain(block, *a, **k) * 1.5  # computes something the walk does not
    cfg = tiny_config.with_method("wanda").with_calibration(
        tiny_config.calibration.model_copy(update={"walk": "site"}))
    with capture_logs() as logs:
        pipe = Pipeline(cfg, run_dir=tmp_path / "run", model=model, tokenizer=tok, progress=False)
        while pipe.stage not in (PruningStage.FINE_TUNING, PruningStage.FAILED):  # (no export: not a real model)
            pipe.step()
    assert pipe.stage is PruningStage.FINE_TUNING
    assert [r.metrics.get("block_forwards") for r in pipe.results if r.stage == "pruning"] == [4, 4]
    fallback = [e for e in logs if e["event"] == "calibration_walk_fallback"]
    assert fallback and "differs from its own forward" in fallback[0]["reason"] and fallback[0]["asked"] == "site"
    assert any(e["event"] == "calibration_plan" and e["walk"] == "block" for e in logs)


def test_sublayer_needs_one_block_per_group():
    from podar import CalibrationConfig

    with pytest.raises((ConfigError, ValueError), match="blocks_per_group"):
        CalibrationConfig(walk="site", blocks_per_group=2)


def test_auto_walk_goes_site_by_site_for_sparsegpt_only(tiny_config):
    assert tiny_config.calibration.walk == "auto"
    assert tiny_config.with_method("sparsegpt").resolved_walk() == "site"
    assert tiny_config.with_method("wanda").resolved_walk() == "block"
    assert tiny_config.with_method("magnitude").resolved_walk() == "none"
    two = tiny_config.calibration.model_copy(update={"blocks_per_group": 2})
    assert tiny_config.with_method("sparsegpt").with_calibration(two).resolved_walk() == "block"
