"""Hidden (embedding) channels removed (issue 30, ``structure.hidden``): the same channels from the embedding, every
block's norms and projections, the final norm and the (tied) head.

The sliced model against a model built by transformers from the new config with the weights sliced by hand, in
float64; the kept channels against a float64 ranking of the norms' outputs taken with plain hooks; runs to Complete
with the export reloaded by ``AutoModelForCausalLM.from_pretrained``; a killed run resumed to the same export; what
is not built refused before any work.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import killed_and_resumed, make_tiny_config

from podar import Pipeline, PruningConfig, StructureConfig
from podar.engine.models import tiny_model
from podar.schemas.config import TinyModelConfig
from podar.schemas.errors import ConfigError
from podar.stages.blocks import find_blocks
from podar.stages.structure import HIDDEN_FAMILIES, WIDTH_FAMILIES, StructurePlan, apply_plan


def _by_hand(model, keep: list[int], head_dim: int):
    """A fresh model of the new config (hidden_size = len(keep)) holding the dense weights sliced by hand."""
    import transformers

    config = copy.deepcopy(model.config)
    config.hidden_size, config.head_dim = len(keep), head_dim
    ref = transformers.AutoModelForCausalLM.from_config(config).double().eval()
    k = torch.tensor(keep)
    state = {}
    for name, w in model.state_dict().items():
        if "embed_tokens" in name or name == "lm_head.weight":
            w = w[:, k]
        elif "norm" in name:
            w = w[k]
        elif any(p in name for p in ("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj", "up_proj")):
            w = w[:, k]
        elif "o_proj" in name or "down_proj" in name:
            w = w[k]
        state[name] = w
    ref.load_state_dict(state, strict=False)
    if config.tie_word_embeddings:
        ref.tie_weights()
    return ref


@pytest.mark.parametrize("arch", sorted(HIDDEN_FAMILIES))
@pytest.mark.parametrize("tied", [True, False])
def test_the_sliced_model_computes_what_transformers_builds_from_the_new_config(arch, tied):
    model, _ = tiny_model(TinyModelConfig(arch=arch, num_hidden_layers=3, hidden_size=64, intermediate_size=96,
                                          num_attention_heads=8, num_key_value_heads=4))
    model.config.tie_word_embeddings = tied
    if not tied:
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone() + 0.01)
    model = model.double().eval()
    keep = sorted(torch.randperm(64, generator=torch.Generator().manual_seed(1))[:40].tolist())
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    ref = _by_hand(model, keep, head_dim=8)
    with torch.no_grad():
        want = ref(input_ids=ids).logits
    plan = StructurePlan(blocks=[0, 1, 2], head_dim=8, config={"num_hidden_layers": 3, "hidden_size": 40,
                                                                "head_dim": 8}, hidden=keep)
    apply_plan(model, find_blocks(model), WIDTH_FAMILIES[arch], plan)
    assert model.config.hidden_size == 40 and model.model.embed_tokens.weight.shape[1] == 40
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    with torch.no_grad():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def hidden_config(corpus, arch="llama", finetune=False, **structure):
    cfg = make_tiny_config(corpus, arch=arch, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2).with_target_sparsity(0.0)
    cfg = cfg._with(structure=StructureConfig(**{"alignment": 8, "hidden": 0.25, **structure}))
    if finetune:
        cfg = cfg.with_finetune(cfg.finetune.model_copy(update={"enabled": True, "steps": 4, "checkpoint_every": 2,
                                                                "eval_every": 2, "loss": "kd+lm",
                                                                "learning_rate": 1e-3}))
    return cfg


def test_kept_hidden_channels_equal_a_float64_ranking_of_the_norms_outputs(corpus, tmp_path):
    cfg = hidden_config(corpus, depth=1)
    pipe = Pipeline(cfg, run_dir=tmp_path / "run", progress=False)
    assert pipe.run().ok
    from test_structure import _plan_of

    plan = _plan_of(tmp_path / "run")
    model, _ = tiny_model(cfg.model.tiny)
    model.eval()
    sums = [[0.0] * 64 for _ in range(4)]
    hooks = []
    for i, block in enumerate(model.model.layers):
        for norm in (block.input_layernorm, block.post_attention_layernorm):
            def on_norm(_m, _args, out, i=i):
                for c, v in enumerate(out.double().square().sum(dim=(0, 1)).tolist()):
                    sums[i][c] += v
            hooks.append(norm.register_forward_hook(on_norm))
    with torch.no_grad():
        model.model(input_ids=pipe.context.state.calibration_samples)
    total = [sum(sums[i][c] for i in plan.blocks) for c in range(64)]
    assert len(plan.blocks) == 3
    assert plan.hidden == sorted(sorted(range(64), key=lambda c: (-total[c], c))[:48])


@pytest.mark.parametrize("arch", sorted(HIDDEN_FAMILIES))
def test_hidden_with_the_rest_runs_to_complete_and_the_export_loads_in_transformers(corpus, tmp_path, arch):
    import transformers

    cfg = hidden_config(corpus, arch, depth=1, mlp=0.25, heads=2, finetune=arch == "llama")
    pipe = Pipeline(cfg, run_dir=tmp_path / "run", progress=False)
    result = pipe.run()
    assert result.ok, result.failure
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "export").eval()
    c = reloaded.config
    assert (c.hidden_size, c.head_dim, c.num_hidden_layers, c.intermediate_size, c.num_attention_heads) == (
        48, 16, 3, 96, 2)
    ids = torch.randint(3, c.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, pipe.context.model(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)
    pruning = next(r for r in result.results if r.stage == "pruning").metrics
    assert pruning["parameters_after"] == sum(p.numel() for p in reloaded.parameters())
    assert pruning["hidden_size"] == 48


def test_hidden_gguf_export_reloads_with_its_head_width(corpus, tmp_path):
    cfg = hidden_config(corpus)
    cfg = cfg.with_export(cfg.export.model_copy(update={"format": "gguf"}))
    result = Pipeline(cfg, run_dir=tmp_path / "run", progress=False).run()
    assert result.ok, result.failure  # the export's own check reloads it through transformers' GGUF loader


@pytest.mark.parametrize("fault", ["kill@after:pruning", "kill@step:fine_tuning#3"])
def test_a_hidden_run_killed_resumes_to_the_same_export(corpus, tmp_path, fault):
    killed_and_resumed(hidden_config(corpus, mlp=0.25, finetune=True), tmp_path, fault)


@pytest.mark.parametrize(("arch", "structure", "words"), [
    ("phi3", {"hidden": 0.25}, "model_type 'phi3' is not"),
    ("gpt2", {"hidden": 0.25}, "model_type 'gpt2' is not"),
    ("llama", {"hidden": 0.05, "alignment": 64}, "structure.hidden=0.05 rounds to no channel removed"),
    ("llama", {"hidden": 0.9, "alignment": 64}, "rounds to zero"),
])
def test_hidden_where_it_cannot_go_is_refused_before_any_work(corpus, tmp_path, arch, structure, words):
    cfg = hidden_config(corpus, arch, **structure)
    with pytest.raises(ConfigError, match=words):
        Pipeline(cfg, run_dir=tmp_path / "run", progress=False).run()
    assert not (tmp_path / "run" / "manifest.json").exists()


def test_hidden_state_distillation_across_widths_is_refused_by_the_config():
    with pytest.raises(ValueError, match="makes them of different widths"):
        PruningConfig(target_sparsity=0.0, structure=StructureConfig(hidden=0.25),
                      finetune={"enabled": True, "hidden_weight": 1.0})


def test_hidden_is_kept_a_multiple_of_the_query_heads_as_transformers_requires(corpus, tmp_path):
    """3 query heads and alignment 8: the kept width is a multiple of 24 (transformers 5 refuses a hidden_size that
    num_attention_heads does not divide); 48 × 0.75 = 36 rounds to 48, nothing removed: refused, saying why."""
    cfg = make_tiny_config(corpus, arch="llama", num_hidden_layers=2, hidden_size=48, num_attention_heads=3,
                           num_key_value_heads=1).with_target_sparsity(0.0)
    with pytest.raises(ConfigError, match="multiple of 24 .the multiple of structure.alignment=8 and of the 3 query"):
        Pipeline(cfg._with(structure=StructureConfig(alignment=8, hidden=0.25)), run_dir=tmp_path / "a",
                 progress=False).run()
    result = Pipeline(cfg._with(structure=StructureConfig(alignment=8, hidden=0.5)), run_dir=tmp_path / "b",
                      progress=False).run()
    assert result.ok, result.failure
    assert next(r for r in result.results if r.stage == "pruning").metrics["hidden_size"] == 24
