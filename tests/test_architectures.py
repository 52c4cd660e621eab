"""Any Hugging Face architecture (issue 21): tiny random Llama, Qwen2, Mistral, Phi-3, GPT-2, OPT and BERT models
calibrate sequentially with Wanda and SparseGPT over their own block stack, with masks equal to a float64
reference computed from that model's own block inputs, and run through every stage to Complete (the encoder with
its hidden-state fidelity and gates)."""

from __future__ import annotations

import pytest
import torch
from helpers import make_tiny_config, reference_sparsegpt
from structlog.testing import capture_logs
from torch import nn

from podar import ConfigError, Pipeline, PruningStage, load_pretrained, run_masks
from podar.stages.blocks import find_blocks, supported_kwargs

ARCHS = ["llama", "qwen2", "mistral", "phi3", "gemma3", "gpt2", "opt", "bert"]
BLOCKS = {"llama": "model.layers", "qwen2": "model.layers", "mistral": "model.layers", "phi3": "model.layers",
          "gemma3": "model.layers", "gpt2": "transformer.h", "opt": "model.decoder.layers", "bert": "encoder.layer"}
SITE_WALK = {"llama", "qwen2", "mistral", "phi3", "gemma3"}  # blocks whose structure the site walk knows


def config_for(corpus, arch, method):
    cfg = make_tiny_config(corpus, arch=arch).with_method(method)
    if arch == "bert":  # an encoder: its pooler lies outside the block stack
        cfg = cfg.with_targets(("re:encoder\\..*",), ignore=())
    return cfg


def _block_calls(model, stack, samples, batch_size):
    """Every block's (args, kwargs) per batch, as the model runs them on the calibration samples."""
    calls = {i: [] for i in range(len(stack.layers))}
    hooks = [blk.register_forward_pre_hook(lambda m, a, k, i=i: calls[i].append((a, k)), with_kwargs=True)
             for i, blk in enumerate(stack.layers)]
    trunk = model.base_model
    with torch.no_grad():
        for i in range(0, samples.shape[0], batch_size):
            trunk(input_ids=samples[i:i + batch_size], **supported_kwargs(trunk, use_cache=False))
    for h in hooks:
        h.remove()
    return calls


def linear_inputs(model, stack, samples, batch_size, dense, walk):
    """Each target's inputs (tokens, in) fp64 as calibration saw them. The final pruned model feeds block b what
    the pruned blocks before it make; the block walk takes a block's statistics with its dense weights (swapped
    in here), the site walk with the sites before already pruned (the final model's own inputs)."""
    targets = {n: m for n, m in model.named_modules() if n in dense}
    xs = {n: [] for n in targets}
    calls = None if walk == "site" else _block_calls(model, stack, samples, batch_size)  # before the hooks
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: xs[n].append(a[0].detach().double().reshape(
        -1, a[0].shape[-1]))) for n, m in targets.items()]
    try:
        if calls is None:
            with torch.no_grad():
                for i in range(0, samples.shape[0], batch_size):
                    model.base_model(input_ids=samples[i:i + batch_size],
                                     **supported_kwargs(model.base_model, use_cache=False))
        else:
            for b, block in enumerate(stack.layers):
                mine = {n: m for n, m in targets.items() if any(m is x for x in block.modules())}
                pruned = {n: m.weight.detach().clone() for n, m in mine.items()}
                with torch.no_grad():
                    for n, m in mine.items():
                        m.weight.copy_(dense[n])
                    for args, kwargs in calls[b]:
                        block(*args, **kwargs)
                    for n, m in mine.items():
                        m.weight.copy_(pruned[n])
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(v) for n, v in xs.items()}


# SparseGPT's masks come from float32 solves: a weight whose saliency lies within this relative distance of its
# block's threshold in the float64 reference is a tie no float32 computation decides the same way every time
FLOAT32_TIE = 1e-4


def reference_mask(method, w, x, n_samples):
    """(mask, undecidable): the float64 mask of one layer at 50% unstructured (Wanda per row, SparseGPT per
    128-column OBS block), and the weights whose choice lies within float32 rounding of the threshold."""
    if method == "wanda":
        score = w.abs() * (x.pow(2).sum(0) / n_samples).sqrt()[None, :]
        keep = torch.ones_like(w, dtype=torch.bool)
        keep.scatter_(1, torch.sort(score, dim=1, stable=True).indices[:, :w.shape[1] // 2], False)
        return keep, torch.zeros_like(keep)
    margins = []
    keep = reference_sparsegpt(w, x, 0.5, margins=margins)[1]
    undecidable = torch.zeros_like(keep)
    for gap, i1, i2 in margins:
        undecidable[:, i1:i2] |= gap < FLOAT32_TIE
    return keep, undecidable


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_calibrates_sequentially_with_reference_masks(corpus, tmp_path, arch, method):
    cfg = config_for(corpus, arch, method)
    from podar.engine.models import tiny_model

    model, tok = tiny_model(cfg.model.tiny)
    with capture_logs() as logs:
        pipe = Pipeline(cfg, run_dir=tmp_path / "run", model=model, tokenizer=tok, progress=False)
        while pipe.stage is not PruningStage.FINE_TUNING:
            pipe.step()
    [plan] = [e for e in logs if e["event"] == "calibration_plan"]
    walk = "site" if (method == "sparsegpt" and arch in SITE_WALK) else "block"
    assert plan["walk"] == walk and plan["blocks"] == BLOCKS[arch], plan
    ctx = pipe.context
    stack = find_blocks(ctx.model)
    dense = {n: ctx.state.dense_weights[n].double() for n in ctx.state.targets}  # (out, in), GPT-2's too
    xs = linear_inputs(ctx.model, stack, ctx.state.calibration_samples, cfg.calibration.batch_size,
                       {n: ctx.state.dense_weights[n] for n in ctx.state.targets}, walk)
    masks = run_masks(tmp_path / "run")
    assert sorted(masks) == sorted(ctx.state.targets) and len(masks) > 0
    undecidable = 0
    for name, mask in masks.items():
        ref, ties = reference_mask(method, dense[name], xs[name], ctx.state.calibration_samples.shape[0])
        differ = (mask != ref) & ~ties
        assert not differ.any(), f"{arch} {method} {name}: {int(differ.sum())} of {mask.numel()} differ"
        undecidable += int(((mask != ref) & ties).sum())
    assert undecidable <= 4, undecidable  # a handful of float32 ties at most
    result = pipe.run()
    assert result.ok, result.failure
    ev = result.metrics["evaluating"]
    if arch == "bert":
        assert 0 < ev["hidden_cosine"] <= 1 and ev["hidden_rel_mse"] > 0 and "dense_ppl" not in ev
    else:
        assert ev["dense_ppl"] > 1 and ev["pruned_ppl"] > 1


@pytest.mark.parametrize("arch", ARCHS)
def test_the_export_reloads_in_the_models_own_class_and_matches(corpus, tmp_path, arch):
    cfg = config_for(corpus, arch, "magnitude")
    pipe = Pipeline(cfg, run_dir=tmp_path / "run", progress=False)
    result = pipe.run()
    assert result.ok, result.failure
    reloaded = load_pretrained(result.export_dir)
    assert type(reloaded).__name__ == type(pipe.context.model).__name__
    ids = torch.randint(3, 200, (2, 32))
    with torch.no_grad():
        mine, theirs = pipe.context.model(input_ids=ids), reloaded(input_ids=ids)
    key = "logits" if arch != "bert" else "last_hidden_state"
    torch.testing.assert_close(getattr(theirs, key), getattr(mine, key), rtol=1e-5, atol=1e-5)
    if arch == "gpt2":  # the export keeps GPT-2's own Conv1D layout, pruned
        conv = reloaded.transformer.h[0].attn.c_attn
        assert type(conv).__name__ == "Conv1D" and abs(float((conv.weight == 0).float().mean()) - 0.5) < 0.01


def test_an_encoders_fidelity_gate_fails_the_run(corpus, tmp_path):
    cfg = config_for(corpus, "bert", "wanda")
    cfg = cfg.with_evaluation(cfg.evaluation.model_copy(update={"gates": cfg.evaluation.gates.model_copy(
        update={"max_hidden_rel_mse": 1e-6})}))
    result = Pipeline(cfg, run_dir=tmp_path / "run", progress=False).run()
    assert result.stage is PruningStage.FAILED and result.failure.reason == "quality_gate"
    assert "max_hidden_rel_mse=1e-06" in result.failure.message


def test_an_encoder_refuses_fine_tuning_before_work(corpus, tmp_path):
    cfg = config_for(corpus, "bert", "magnitude")
    cfg = cfg.with_finetune(cfg.finetune.model_copy(update={"enabled": True}))
    with pytest.raises(ConfigError, match="finetune.enabled.*encoder model"):
        Pipeline(cfg, run_dir=tmp_path / "run", progress=False).run()


def test_the_block_stack_can_be_named_and_a_wrong_name_is_refused(corpus, tmp_path):
    cfg = config_for(corpus, "opt", "wanda")
    named = cfg.with_calibration(cfg.calibration.model_copy(update={"blocks": "model.decoder.layers"}))
    assert Pipeline(named, run_dir=tmp_path / "ok", progress=False).run().ok
    wrong = cfg.with_calibration(cfg.calibration.model_copy(update={"blocks": "model.layers"}))
    with pytest.raises(ConfigError, match="calibration.blocks 'model.layers' names nothing"):
        Pipeline(wrong, run_dir=tmp_path / "bad", progress=False).run()


def test_a_model_without_a_block_stack_calibrates_in_one_pass_with_a_warning(corpus, tmp_path):
    from transformers import PretrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutput

    from podar.engine.tokenizer import BYTE_VOCAB_SIZE, byte_tokenizer

    class FlatConfig(PretrainedConfig):
        model_type = "podar-flat"

    class Flat(PreTrainedModel):
        config_class = FlatConfig

        def __init__(self, config):
            super().__init__(config)
            self.embed = nn.Embedding(BYTE_VOCAB_SIZE, 32)
            self.up, self.down = nn.Linear(32, 64), nn.Linear(64, 32)
            self.head = nn.Linear(32, BYTE_VOCAB_SIZE)

        def get_input_embeddings(self):
            return self.embed

        def forward(self, input_ids, use_cache=None, labels=None):
            return CausalLMOutput(logits=self.head(self.down(torch.relu(self.up(self.embed(input_ids))))))

    torch.manual_seed(0)
    model = Flat(FlatConfig()).eval()
    cfg = make_tiny_config(corpus).with_method("wanda").with_targets(("re:(up|down)",), ignore=())
    cfg = cfg.with_evaluation(cfg.evaluation.model_copy(update={"enabled": False}))
    with capture_logs() as logs:
        pipe = Pipeline(cfg, run_dir=tmp_path / "run", model=model, tokenizer=byte_tokenizer(), progress=False)
        while pipe.stage is not PruningStage.FINE_TUNING:
            pipe.step()
    warned = [e for e in logs if e["event"] == "calibration_walk_fallback"]
    assert warned and warned[0]["walk"] == "one_pass" and "no stack of repeated blocks" in warned[0]["reason"]
    assert warned[0]["log_level"] == "warning"
    # OWL shares the sparsity among blocks: refused before any work (no checkpoint, no manifest)
    owl = cfg.with_overrides({"allocation.kind": "owl"})
    with pytest.raises(ConfigError, match="allocation.kind 'owl'.*no stack of repeated blocks"):
        Pipeline(owl, run_dir=tmp_path / "owl", model=model, tokenizer=byte_tokenizer(), progress=False).step()
    assert not (tmp_path / "owl" / "manifest.json").exists()


def test_a_block_the_site_walk_cannot_reproduce_falls_back_naming_the_quantity(corpus, tmp_path, monkeypatch):
    """Gemma-3 blocks walked with Llama's norms (what podar did before it knew their layout) differ from their own
    forward: the walk falls back to blocks and says what differs, by how much, in which units."""
    from podar.engine.models import tiny_model
    from podar.stages import sublayer

    monkeypatch.setattr(sublayer, "block_norms", lambda b: (b.input_layernorm, None, b.post_attention_layernorm,
                                                            None))
    cfg = config_for(corpus, "gemma3", "sparsegpt")
    model, tok = tiny_model(cfg.model.tiny)
    with capture_logs() as logs:
        pipe = Pipeline(cfg, run_dir=tmp_path / "run", model=model, tokenizer=tok, progress=False)
        pipe.step()
    [fallback] = [e for e in logs if e["event"] == "calibration_walk_fallback"]
    assert fallback["walk"] == "block"
    assert "output hidden states differ by up to" in fallback["reason"]
    assert "absolute, in the units of the hidden state" in fallback["reason"]
