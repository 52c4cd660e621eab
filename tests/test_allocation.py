"""OWL's outlier-weighted layerwise sparsity (issue 31): the outlier ratio and the allocation against float64
references, the pipeline's per-block masks, the refusals, and a resume that restores the round's allocation."""

from __future__ import annotations

import pytest
import torch
from helpers import make_tiny_config
from test_resume import export_hashes, reference_and_killed

from podar import ConfigError, Pipeline, run_masks
from podar.engine.store import RunStore
from podar.stages.allocation import ALLOCATION_KIND, outlier_ratio, owl_sparsities


def reference_outlier_ratio(scores, m):
    """Plain loops in float64: the entries above m × the mean of every entry of the block."""
    values = [float(v) for s in scores for v in s.detach().double().reshape(-1)]
    mean = sum(values) / len(values)
    return sum(1 for v in values if v > m * mean) / len(values)


def reference_owl(ratios, target, lam):
    """The OWL reference's allocation, blocks of equal size: ratios scaled to [0, 2λ], re-centred on 1 − target
    (the kept share), sparsity = 1 − kept."""
    lo, hi = min(ratios), max(ratios)
    scaled = [(r - lo) * (1 / (hi - lo) * lam * 2) for r in ratios]
    mean = sum(scaled) / len(scaled)
    return [1 - (s - mean + (1 - target)) for s in scaled]


def test_outlier_ratio_matches_a_float64_reference():
    gen = torch.Generator().manual_seed(0)
    for m in (1.5, 3.0, 5.0):
        scores = [torch.rand(7, 11, generator=gen).pow(6) * 10, torch.rand(3, 5, generator=gen).pow(3)]
        assert outlier_ratio(scores, m) == pytest.approx(reference_outlier_ratio(scores, m), abs=1e-15)
    assert outlier_ratio([torch.ones(4, 4)], 1.0) == 0.0  # equal to the threshold is not above it


def test_owl_matches_the_reference_and_keeps_the_total_exact():
    gen = torch.Generator(device="cpu").manual_seed(1)
    for target, lam in ((0.5, 0.08), (0.7, 0.08), (0.6, 0.02)):
        ratios = torch.rand(12, generator=gen, dtype=torch.float64) * 0.01
        equal = owl_sparsities(ratios, torch.full((12,), 1000.0), target, lam)
        assert equal.tolist() == pytest.approx(reference_owl(ratios.tolist(), target, lam), abs=1e-12)
        sizes = torch.randint(100, 10_000, (12,), generator=gen).double()  # blocks of other sizes: weighted mean
        got = owl_sparsities(ratios, sizes, target, lam)
        assert float((got * sizes).sum() / sizes.sum()) == pytest.approx(target, abs=1e-12)
        assert float(got.max() - got.min()) == pytest.approx(2 * lam, abs=1e-12)
        order = torch.argsort(ratios)
        assert torch.all(got[order][1:] <= got[order][:-1])  # more outliers, less pruned
    flat = owl_sparsities(torch.full((4,), 0.3, dtype=torch.float64), torch.ones(4), 0.6, 0.08)
    assert flat.tolist() == [0.6] * 4


def owl_config(corpus, method="wanda", sparsity=0.6, **alloc):
    cfg = make_tiny_config(corpus, num_hidden_layers=4).with_method(method).with_target_sparsity(sparsity)
    return cfg.with_overrides({"allocation.kind": "owl", **{f"allocation.{k}": v for k, v in alloc.items()}})


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_owl_prunes_each_block_at_its_own_sparsity_and_the_total_at_the_target(corpus, tmp_path, method):
    cfg = owl_config(corpus, method, owl_m=3.0)
    pipe = Pipeline(cfg, run_dir=tmp_path / "run", progress=False)
    result = pipe.run()
    assert result.ok
    allocation = pipe.context.state.allocation
    block = sorted(set(allocation.block_sparsity))
    assert len(block) == 4 and block[-1] - block[0] == pytest.approx(0.16, abs=1e-9)  # 2λ apart
    masks = run_masks(tmp_path / "run")
    total = sum(m.numel() for m in masks.values())
    pruned = sum(int((~m).sum()) for m in masks.values())
    rows = sum(m.shape[0] for m in masks.values())  # each comparison group rounds down at most one weight
    assert abs(pruned / total - 0.6) <= rows / total
    for name, mask in masks.items():
        b = int(name.split(".layers.")[1].split(".")[0])
        sparsity = float((~mask).sum()) / mask.numel()
        assert abs(sparsity - allocation.block_sparsity[b]) <= 1 / mask.shape[1] + 1e-9, name
    kinds = [r.kind for r in RunStore(tmp_path / "run").read_manifest().artifacts.values()]
    assert kinds.count(ALLOCATION_KIND) == 1
    pruning = [r for r in pipe.results if r.stage == "pruning"]
    assert all(r.metrics["allocation"] == "owl" for r in pruning)


def test_owl_lambda_is_bounded_by_the_target(corpus, tmp_path):
    """A target sparsity of 0.02 bounds λ to 0.01: the blocks stay within 0.02 ± 0.02, in [0, 1)."""
    pipe = Pipeline(owl_config(corpus, sparsity=0.02), run_dir=tmp_path / "run", progress=False)
    assert pipe.run().ok
    allocation = pipe.context.state.allocation
    assert allocation.lambda_used == pytest.approx(0.01)
    assert min(allocation.block_sparsity) >= 0.0


@pytest.mark.parametrize(("changes", "words"), [
    ({"pattern.kind": "nm", "pattern.n": 2, "pattern.m": 4, "target_sparsity": 0.5}, "pattern '2:4'"),
    ({"scope": "global"}, "scope 'global'"),
    ({"allocation.owl_lambda": 0.3}, "owl_lambda"),
    ({"allocation.owl_m": 0}, "owl_m"),
])
def test_owl_refuses_what_it_cannot_share(corpus, changes, words):
    with pytest.raises(ConfigError, match=words):
        make_tiny_config(corpus).with_method("wanda").with_overrides({"allocation.kind": "owl", **changes})


def test_a_run_killed_after_its_first_group_resumes_with_the_recorded_allocation(corpus, tmp_path):
    """The allocation is computed once per round on the model as it was then; a resume restores it (recomputing
    on the partly pruned model would change it) and ends with the export of a run never interrupted."""
    ref = reference_and_killed(owl_config(corpus, owl_m=3.0), tmp_path, "kill@after:pruning#2")
    pipe = Pipeline.resume(tmp_path / "run", progress=False)
    assert pipe.run().ok
    assert pipe.context.state.allocation.layer_sparsity == ref.context.state.allocation.layer_sparsity
    assert export_hashes(tmp_path / "run") == export_hashes(tmp_path / "ref")


@pytest.mark.parametrize(("method", "per_block"), [("magnitude", 1), ("wanda", 2 + 1)])
def test_the_cost_counts_owls_dense_pass(corpus, tmp_path, method, per_block):
    """4 windows × 4 blocks: the walk's forwards (Wanda's block walk: 2 per block) and OWL's one dense pass."""
    pipe = Pipeline(owl_config(corpus, method), run_dir=tmp_path / "run", progress=False)
    pipe.step()
    cost = pipe.context.state.cost
    assert cost["calibration_tokens"] == 4 * 64
    assert cost["calibration_block_forwards"] == 4 * 4 * per_block
    assert cost["est_calibration_s"] >= 0


def test_the_allocation_matches_a_plain_whole_model_reference(corpus, tmp_path):
    """Σ x² of every layer from hooks on one plain forward of the whole dense model (float64 sums), each block's
    outlier ratio and the OWL formula in plain Python: the run's block sparsities."""
    cfg = owl_config(corpus, owl_m=3.0)
    pipe = Pipeline(cfg, run_dir=tmp_path / "run", progress=False)
    pipe.step()  # set up: the dense model and its calibration samples
    model, samples = pipe.context.model, pipe.context.state.calibration_samples
    sq: dict[str, torch.Tensor] = {}
    layers = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    hooks = [m.register_forward_hook(lambda mod, args, out, n=n: sq.__setitem__(
        n, sq.get(n, 0) + args[0].double().reshape(-1, args[0].shape[-1]).pow(2).sum(0))) for n, m in layers.items()]
    with torch.no_grad():
        model(input_ids=samples)
    for h in hooks:
        h.remove()
    ratios = []
    for b in range(4):
        names = [n for n in layers if f".layers.{b}." in n]
        scores = [layers[n].weight.double().abs() * (sq[n] / samples.shape[0]).sqrt()[None, :] for n in names]
        ratios.append(reference_outlier_ratio(scores, 3.0))
    expected = reference_owl(ratios, 0.6, 0.08)
    assert pipe.run().ok
    assert pipe.context.state.allocation.block_sparsity == pytest.approx(expected, abs=1e-9)
