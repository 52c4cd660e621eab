"""N:M channel permutation (stages.permutation): the search against plain float64 references, the fold into the
neighbouring rows (the same function on four architectures), and the pipeline: masks N:M in the order they were
chosen in, exports N:M in their own layout, 2 processes like 1, resume, refusals."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import make_tiny_config
from test_distributed import one_and_two_with_equal_masks
from test_resume import export_hashes, reference_and_killed

from podar import ConfigError, Pipeline, PruningStage, RunStore, run_masks
from podar.engine.models import tiny_model
from podar.schemas.config import TinyModelConfig
from podar.stages.blocks import find_blocks
from podar.stages.permutation import (
    PermutationSpace,
    fold_permutations,
    layer_permutation,
    nm_permutation,
    nm_retained,
    permutable_layers,
    slot_gains,
)
from podar.stages.structure import WIDTH_FAMILIES
from podar.stages.targets import linearize_conv1d


def retained_loop(score, n, m):
    """Σ over rows and groups of m of the n largest, one group at a time in float64."""
    total = 0.0
    for row in score.double().tolist():
        for g in range(0, len(row), m):
            total += sum(sorted(row[g:g + m], reverse=True)[:n])
    return total


def heavy_columns(seed, out_f, in_f):
    """Scores with a few heavy input columns placed side by side (what N:M handles worst in the given order)."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.rand(out_f, in_f, generator=gen, dtype=torch.float64)
    s[:, : in_f // 4] *= 10.0
    return s


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (3, 4), (4, 8)])
def test_retained_and_slot_gains_match_plain_loops(n, m):
    gen = torch.Generator().manual_seed(n * 10 + m)
    score = torch.rand(5, 4 * m, generator=gen, dtype=torch.float64).pow(2)
    assert float(nm_retained(score, n, m)) == pytest.approx(retained_loop(score, n, m), rel=1e-12)
    groups = torch.randperm(4 * m, generator=gen).reshape(4, m)
    for slot in range(m):
        gain = slot_gains(score, groups, slot, n)
        for b in range(4):
            others = [int(c) for j, c in enumerate(groups[b]) if j != slot]
            base = sum(sum(sorted(r, reverse=True)[:n]) for r in score[:, others].tolist())
            for c in range(4):
                cols = others + [int(groups[c, slot])]
                with_c = sum(sum(sorted(r, reverse=True)[:n]) for r in score[:, cols].tolist())
                assert float(gain[b, c]) == pytest.approx(with_c - base, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_the_permutation_never_keeps_less_and_reports_what_it_keeps(seed):
    score = heavy_columns(seed, 7, 32)
    perm, before, after = nm_permutation(score, 2, 4, max_rounds=5)
    assert sorted(perm.tolist()) == list(range(32))
    assert before == pytest.approx(retained_loop(score, 2, 4), rel=1e-12)
    assert after == pytest.approx(retained_loop(score[:, perm], 2, 4), rel=1e-12)
    assert after > before * 1.05  # the heavy columns, side by side, spread over the groups


def test_on_small_layers_the_search_finds_the_best_split_most_of_the_time():
    """Two groups of 4 (35 ways to split 8 channels): the exhaustive best, against the search."""
    found, ratios = 0, []
    for seed in range(20):
        score = torch.rand(5, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).pow(3)
        _, before, after = nm_permutation(score, 2, 4, max_rounds=20)
        best = max(retained_loop(score[:, list(c) + [i for i in range(8) if i not in c]], 2, 4)
                   for c in itertools.combinations(range(8), 4))
        assert after <= best + 1e-12 and after >= before
        found += after >= best - 1e-12
        ratios.append(after / best)
    assert found >= 14 and min(ratios) > 0.97


def test_a_weight_pruned_earlier_is_kept_last():
    score = heavy_columns(0, 4, 16)
    score[:, 3] = float("-inf")
    perm, _, _ = nm_permutation(score, 2, 4)
    assert sorted(perm.tolist()) == list(range(16))


def test_the_attention_output_keeps_one_order_per_kv_group_within_each_head():
    d, n_q, n_kv = 8, 4, 2
    score = heavy_columns(3, 6, n_q * d)
    perm, before, after = layer_permutation(score, 2, 4, PermutationSpace(head_dim=d, n_q=n_q, n_kv=n_kv))
    assert sorted(perm.tolist()) == list(range(n_q * d)) and after >= before
    per_head = [perm[h * d:(h + 1) * d] - h * d for h in range(n_q)]
    assert all(sorted(p.tolist()) == list(range(d)) for p in per_head)  # within each head
    assert torch.equal(per_head[0], per_head[1]) and torch.equal(per_head[2], per_head[3])  # one per KV group


def random_orders(model, arch):
    """A random order for every permutable layer of ``model`` (seeded), and their spaces."""
    stack = find_blocks(model)
    spaces = permutable_layers(stack, WIDTH_FAMILIES[arch], model.config, 4)
    modules = dict(model.named_modules())
    gen = torch.Generator().manual_seed(1)
    perms = {}
    for name, space in spaces.items():
        in_f = modules[name].in_features
        if space.head_dim is None:
            perms[name] = torch.randperm(in_f, generator=gen)
        else:
            perms[name] = layer_permutation(torch.rand(3, in_f, generator=gen), 2, 4, space)[0]
    return stack, spaces, perms


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3", "gpt2"])
def test_the_folded_model_computes_the_same_function(arch):
    """Before pruning: every permutable layer's inputs reordered and the rows that make them alike (GQA value
    groups, Qwen2's value bias, Phi-3's fused gate_up and qkv, GPT-2's MLP): float64 logits unchanged."""
    model = tiny_model(TinyModelConfig(arch=arch, hidden_size=64, num_attention_heads=4,
                                       num_key_value_heads=2 if arch != "gpt2" else 4))[0].double().eval()
    linearize_conv1d(model)
    if arch == "qwen2":
        for block in model.model.layers:  # a value bias that matters
            block.self_attn.v_proj.bias.data.normal_(0, 1)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    stack, spaces, perms = random_orders(model, arch)
    assert any(s.head_dim is not None for s in spaces.values()) == (arch != "gpt2")
    masks = {n: torch.rand(dict(model.named_modules())[n].weight.shape) > 0.5 for n in perms}
    moved = {n: dict(model.named_modules())[n].weight.detach().clone() for n in perms}

    def replace(param, new):
        param.data = new

    done = fold_permutations(stack, WIDTH_FAMILIES[arch], perms, spaces, masks, replace)
    assert sorted(done) == sorted(perms)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.allclose(after, before, rtol=0, atol=1e-10 * float(before.abs().max()))
    for name in perms:  # a layer's columns and its mask move together
        w = dict(model.named_modules())[name].weight.detach()
        assert torch.equal(w, moved[name][:, perms[name]])
    assert any(not torch.equal(perms[n], torch.arange(perms[n].numel())) for n in perms)


def permutation_config(corpus, method="ria", **changes):
    cfg = make_tiny_config(corpus, intermediate_size=128).with_method(method)
    return cfg.with_overrides({"pattern.kind": "nm", "pattern.n": 2, "pattern.m": 4, "target_sparsity": 0.5,
                               "permutation.enabled": True, **changes})


def nm_in_order(mask, perm, n=2, m=4):
    return bool((mask[:, perm].reshape(mask.shape[0], -1, m).sum(-1) == n).all())


def nm_in_layout(weight, n=2, m=4):
    return bool(((weight != 0).reshape(weight.shape[0], -1, m).sum(-1) <= n).all())


@pytest.mark.parametrize(("method", "changes"), [("ria", {}), ("wanda", {"calibration.walk": "site"}),
                                                 ("magnitude", {}), ("sparsegpt", {}),
                                                 ("ria", {"reconstruction.enabled": True})])
def test_a_permuted_run_exports_a_model_that_is_nm_in_its_own_layout(corpus, tmp_path, method, changes):
    cfg = permutation_config(corpus, method, **{"export.format": "dense", **changes})
    pipe = Pipeline(cfg, run_dir=tmp_path / "run", progress=False)
    while pipe.stage is not PruningStage.EVALUATING:  # each step runs the stage it enters
        pipe.step()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        evaluated = pipe.context.model(input_ids=ids).logits  # the model as Evaluating measured it, not yet folded
    assert pipe.run().ok
    store = RunStore(tmp_path / "run")
    perms: dict[str, torch.Tensor] = {}
    for record in store.read_manifest().artifacts.values():
        if record.kind == "permutation":
            perms.update(store.load_tensors(record))
    assert sorted(perms) == sorted(n for n in run_masks(tmp_path / "run") if n.endswith(("down_proj", "o_proj")))
    masks = run_masks(tmp_path / "run")
    moved = 0
    for name, perm in perms.items():  # the run folder's masks: N:M in the order each was chosen in
        assert nm_in_order(masks[name], perm), name
        moved += int(not torch.equal(perm, torch.arange(perm.numel())))
    assert moved  # the search moved channels somewhere
    pruning = [r for r in pipe.results if r.stage == "pruning"]
    kept = [m for r in pruning for n, m in r.layer_metrics.items() if n in perms]
    assert all(m["score_kept"] >= m["score_kept_unpermuted"] for m in kept)
    assert any(m["score_kept"] > m["score_kept_unpermuted"] for m in kept)
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "export")  # the plain loader, no podar
    params = dict(exported.named_parameters())
    for name in masks:
        assert nm_in_layout(params[f"{name}.weight"]), name
    with torch.no_grad():  # the function the run evaluated: the orders folded into the rows, nothing else changed
        got = exported(input_ids=ids).logits
    assert torch.allclose(got, evaluated, rtol=0, atol=1e-5 * float(evaluated.abs().max()))


def test_the_sparse_24_export_needs_the_fold_and_gets_it(corpus, tmp_path):
    """sparse-24-bitmask refuses a layer that is not 2:4 in its layout: with the orders folded in, it writes."""
    cfg = permutation_config(corpus, **{"export.format": "sparse-24-bitmask"})
    assert Pipeline(cfg, run_dir=tmp_path / "run", progress=False).run().ok


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])  # each process alone; one solves and broadcasts
def test_two_processes_choose_the_orders_and_masks_of_one(corpus, tmp_path, method):
    cfg = permutation_config(corpus, method, **{"calibration.walk": "site"})
    one_and_two_with_equal_masks(cfg, tmp_path)
    orders = []
    for d in ("one", "two"):
        store = RunStore(tmp_path / d)
        found: dict[str, torch.Tensor] = {}
        for record in store.read_manifest().artifacts.values():
            if record.kind == "permutation":
                found.update(store.load_tensors(record))
        orders.append(found)
    assert orders[0] and sorted(orders[0]) == sorted(orders[1])
    assert all(torch.equal(orders[0][k], orders[1][k]) for k in orders[0])


def test_a_run_killed_mid_pruning_resumes_to_the_same_export(corpus, tmp_path):
    cfg = permutation_config(corpus, **{"calibration.walk": "site"})
    reference_and_killed(cfg, tmp_path, "kill@after:pruning#4")
    assert Pipeline.resume(tmp_path / "run", progress=False).run().ok
    assert export_hashes(tmp_path / "run") == export_hashes(tmp_path / "ref")


@pytest.mark.parametrize(("changes", "words"), [
    ({"pattern.kind": "unstructured", "pattern.n": None, "pattern.m": None}, "pattern kind nm"),
    ({"method": "sparsegpt", "method.joint_quantization": True, "export.quantization": "w8a16"},
     "joint_quantization"),
])
def test_what_the_permutation_cannot_do_is_refused_before_any_work(corpus, tmp_path, changes, words):
    with pytest.raises(ConfigError, match="permutation") as err:
        permutation_config(corpus, **changes)
    assert words in str(err.value)


@pytest.mark.parametrize(("tiny", "changes", "words"), [
    ({"arch": "opt"}, {}, "model type 'opt'"),
    ({}, {"ignore": ["re:.*lm_head", "re:.*down_proj", "re:.*o_proj"]}, "none of the layers"),
])
def test_a_model_without_foldable_layers_is_refused_before_any_work(corpus, tmp_path, tiny, changes, words):
    cfg = make_tiny_config(corpus, **tiny).with_method("ria").with_overrides({
        "pattern.kind": "nm", "pattern.n": 2, "pattern.m": 4, "target_sparsity": 0.5, "permutation.enabled": True,
        **changes})
    with pytest.raises(ConfigError, match=words):
        Pipeline(cfg, run_dir=tmp_path / "run", progress=False).run()
    assert not (tmp_path / "run" / "manifest.json").exists()
