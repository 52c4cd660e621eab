"""Offloaded blocks (``runtime.offload: blocks``): one block's weights on the device at a time, the layers being
pruned held there from their calibration to the end of their pruning, the pruned weights written back to the CPU,
and the run's masks, weights and export the same as with the whole model on the device.

On this CPU-only machine the "device" is the CPU too; the offload copies on every move all the same, so a block
that computed with its stored tensors, a held weight that was never written back, or a move left in place shows
here as it would on a GPU."""

from __future__ import annotations

import pytest
import torch
from helpers import fail_once, make_tiny_config
from test_resume import export_hashes

from podar import ConfigError, Pipeline, PruningStage, RuntimeConfig, SparsityPatternConfig, TinyModelConfig, run_masks
from podar.engine.models import tiny_model
from podar.engine.offload import BlockOffload


def _tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return tiny_model(TinyModelConfig())[0].eval()


def test_each_block_computes_on_copies_one_at_a_time_and_keeps_its_stored_tensors():
    model = _tiny()
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    layers = model.model.layers
    stored = {n: p.data_ptr() for n, p in layers.named_parameters()}
    seen: list[tuple[int, bool]] = []
    offload = BlockOffload(torch.device("cpu"))
    offload.install(model, layers)
    for i, block in enumerate(layers):
        block.mlp.register_forward_pre_hook(lambda m, _a, i=i: seen.append(
            (len(offload.onloaded), all(p.data_ptr() != stored[f"{i}.mlp.{n}"] for n, p in m.named_parameters()))))
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert torch.equal(got, want)
    assert seen == [(1, True)] * len(layers)  # one block on the device, computing with copies
    assert {n: p.data_ptr() for n, p in layers.named_parameters()} == stored  # its own tensors back after
    assert offload.onloaded == [] and offload.peak_onloaded == 1
    assert model.model.embed_tokens.weight.device.type == "cpu"


def test_held_layers_are_written_back_where_they_live_on_release():
    model = _tiny()
    layers = model.model.layers
    offload = BlockOffload(torch.device("cpu"))
    offload.install(model, layers)
    target = layers[0].mlp.up_proj
    before = target.weight.detach().clone()
    stored = target.weight.data_ptr()
    offload.hold([target, model.model.embed_tokens])  # the embeddings live on the device: not held
    assert set(offload.held) == {id(target.weight)}
    assert target.weight.data_ptr() != stored
    held = target.weight.data_ptr()
    seen = []
    target.register_forward_pre_hook(lambda m, _a: seen.append(m.weight.data_ptr()))
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 4, dtype=torch.long))
        target.weight.data[:, ::2] = 0  # pruned while held
    assert seen == [held]  # the per-forward move leaves a held layer alone
    offload.release()
    assert offload.held == {} and target.weight.data_ptr() != held  # a new CPU tensor (the stored one was let go)
    assert torch.equal(target.weight[:, 1::2], before[:, 1::2]) and not target.weight[:, ::2].any()


@pytest.mark.parametrize("method,pattern,arch", [
    ("magnitude", None, "llama"), ("wanda", None, "llama"), ("wanda", "2:4", "llama"), ("sparsegpt", None, "llama"),
    ("sparsegpt", "2:4", "llama"), ("wanda", None, "gpt2"), ("sparsegpt", None, "opt")])
def test_an_offloaded_run_gives_the_masks_weights_and_export_of_a_whole_one(corpus, tmp_path, method, pattern, arch,
                                                                          monkeypatch):
    cfg = make_tiny_config(corpus, arch=arch).with_method(method)
    if pattern:
        cfg = cfg.with_pattern(SparsityPatternConfig(kind="nm", n=2, m=4))
    held_at_release: list[int] = []
    release = BlockOffload.release

    def counted(self: BlockOffload) -> None:
        held_at_release.append(len(self.held))
        release(self)

    monkeypatch.setattr(BlockOffload, "release", counted)
    runs = {}
    for mode in ("off", "blocks"):
        pipe = Pipeline(cfg.with_runtime(RuntimeConfig(offload=mode)), run_dir=tmp_path / mode, progress=False)
        result = pipe.run()
        assert result.ok, result.failure
        runs[mode] = (pipe, result)
    pipes = {mode: pipe for mode, (pipe, _) in runs.items()}
    offload = pipes["blocks"].context.runtime.offload
    assert pipes["off"].context.runtime.offload is None and offload is not None
    assert offload.peak_onloaded == 1 and offload.held == {}
    st = pipes["blocks"].context.state
    # every group's layers (weight and bias) held from its calibration to the end of its pruning (magnitude has no
    # calibration: its layers are pruned where they live)
    assert held_at_release == [0 if method == "magnitude" else sum(len(list(st.targets[n].parameters())) for n in g)
                               for g in st.layer_groups]
    for name, module in pipes["blocks"].context.state.targets.items():
        assert module.weight.device.type == "cpu"
        assert torch.equal(module.weight, pipes["off"].context.state.targets[name].weight), name
    masks = {mode: run_masks(tmp_path / mode) for mode in runs}
    assert masks["off"].keys() == masks["blocks"].keys() and masks["off"]
    for name in masks["off"]:
        assert torch.equal(masks["off"][name], masks["blocks"][name]), name
    assert export_hashes(tmp_path / "off") == export_hashes(tmp_path / "blocks")
    assert runs["off"][1].metrics["evaluating"] == runs["blocks"][1].metrics["evaluating"]


def test_auto_offloads_nothing_on_the_cpu(tiny_config, tmp_path):
    pipe = Pipeline(tiny_config.with_method("magnitude"), run_dir=tmp_path / "run", progress=False)
    assert pipe.run().ok
    assert pipe.context.runtime.offload is None


def test_fine_tuning_an_offloaded_model_is_refused_naming_the_fields(tiny_config, tmp_path):
    cfg = tiny_config.with_method("magnitude").with_runtime(RuntimeConfig(offload="blocks"))
    cfg = cfg.model_copy(update={"finetune": cfg.finetune.model_copy(update={"enabled": True})})
    with pytest.raises(ConfigError, match=r"finetune\.enabled.*runtime\.offload='blocks'"):
        Pipeline(cfg, run_dir=tmp_path / "run", progress=False).run()


def test_an_offloaded_run_that_failed_in_pruning_resumes_to_the_same_export(tiny_config, tmp_path, monkeypatch):
    """SparseGPT (kept weights change), killed by a raising handler in the second group's Pruning: the resumed run
    re-places the model (blocks offloaded again) and ends with the export of an uninterrupted whole-model run."""
    cfg = tiny_config.with_method("sparsegpt")
    assert Pipeline(cfg, run_dir=tmp_path / "whole", progress=False).run().ok
    calls = fail_once(monkeypatch, PruningStage.PRUNING, on_call=2)
    run_dir = tmp_path / "run"
    offloaded = cfg.with_runtime(RuntimeConfig(offload="blocks"))
    assert Pipeline(offloaded, run_dir=run_dir, progress=False).run().stage is PruningStage.FAILED
    resumed = Pipeline.resume(run_dir, progress=False)
    assert resumed.run().ok and len(calls) == len(resumed.context.state.layer_groups) + 1  # the failed one again
    assert resumed.context.runtime.offload is not None
    assert export_hashes(run_dir) == export_hashes(tmp_path / "whole")


def test_blocks_asked_of_a_model_without_a_block_list_is_refused_naming_the_fields():
    from podar.engine.runtime import Runtime

    with pytest.raises(ConfigError, match=r"runtime\.offload='blocks'.*calibration\.blocks"):
        Runtime(RuntimeConfig(offload="blocks")).place(_tiny(), torch.device("cpu"), None)
