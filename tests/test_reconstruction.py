"""Reconstruction after masking (issue 31): the least-squares refit against a float64 reference, the statistics
it collects, the pipeline's refit weights for every method, the refusals, resume and two processes."""

from __future__ import annotations

import pytest
import torch
from helpers import make_tiny_config
from test_resume import export_hashes, reference_and_killed

from podar import ConfigError, Pipeline, run_masks
from podar.engine.machine import PruningStage
from podar.stages.reconstruction import refit_kept
from podar.stages.refine import RefinedStats


def reference_refit(weight, keep, gram, frac):
    """Row by row in float64: (H_SS + λI) ŵ_S = (H w)_S + λ w_S, λ = frac · mean diag H, zero elsewhere."""
    h, w = gram.double(), weight.double()
    lam = frac * float(torch.diagonal(h).mean())
    out = torch.zeros_like(w)
    for r in range(w.shape[0]):
        s = keep[r].nonzero().squeeze(1)
        if s.numel() == 0:
            continue
        system = h[s][:, s] + lam * torch.eye(s.numel(), dtype=torch.float64)
        out[r, s] = torch.linalg.solve(system, (h @ w[r])[s] + lam * w[r, s])
    return out


def random_problem(seed, out_f=9, in_f=24, tokens=200):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, in_f, generator=gen) * torch.rand(in_f, generator=gen).pow(3).mul(20)  # outlier inputs
    w = torch.randn(out_f, in_f, generator=gen)
    keep = torch.rand(out_f, in_f, generator=gen) < 0.45
    keep[0] = False  # a row with nothing kept
    keep[1] = True  # a row with everything kept
    return x, w, keep


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_refit_matches_a_float64_reference_and_holds_the_mask(seed):
    x, w, keep = random_problem(seed)
    gram = x.t() @ x
    for frac in (1e-6, 0.01, 0.5):
        got = refit_kept(w, keep, gram, frac)
        ref = reference_refit(w, keep, gram, frac)
        assert torch.equal(got[~keep], torch.zeros_like(got[~keep]))
        assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    # with no dampening to speak of it is the plain least-squares fit of X w on the kept columns
    got = refit_kept(w, keep, gram.double(), 1e-12)
    for r in range(2, w.shape[0]):
        s = keep[r].nonzero().squeeze(1)
        lstsq = torch.linalg.lstsq(x[:, s].double(), (x @ w[r]).double()[:, None]).solution[:, 0]
        assert torch.allclose(got[r, s].double(), lstsq, rtol=1e-4, atol=1e-4)
    assert torch.equal(refit_kept(w, keep, gram, 0.01)[1], refit_kept(w, keep, gram, 0.01)[1])


def test_refit_lowers_the_objective_it_minimises_and_chunks_rows_alike(monkeypatch):
    x, w, keep = random_problem(3, out_f=40, in_f=32)
    gram = x.t() @ x
    frac = 0.01
    lam = frac * float(torch.diagonal(gram).mean())

    def objective(v):
        d = (v - w).double()
        return ((d @ gram.double()) * d).sum(1) + lam * ((v - w).double() * keep).pow(2).sum(1)

    refit = refit_kept(w, keep, gram, frac)
    assert torch.all(objective(refit) <= objective(w * keep) * (1 + 1e-6))
    monkeypatch.setattr("podar.stages.reconstruction._MAX_SYSTEM_ELEMENTS", 1)  # one row per system batch
    assert torch.allclose(refit_kept(w, keep, gram, frac), refit, rtol=1e-6, atol=1e-6)


def test_an_indefinite_row_is_retried_with_more_dampening():
    gram = torch.diag(torch.tensor([1.0, 1.0, -1.5, 1.0]))  # not a Gram matrix: row 0's system is indefinite
    w = torch.ones(2, 4)
    keep = torch.tensor([[True, False, True, False], [True, True, False, False]])
    got = refit_kept(w, keep, gram, 0.1)  # λ = 0.0375 doubled until 1 − 1.5 + λ > 0
    assert torch.isfinite(got).all() and torch.equal(got[~keep], torch.zeros(4))
    assert torch.allclose(got[1], torch.tensor([1.0, 1.0, 0.0, 0.0]))  # a positive row: its exact fit


def reconstruction_config(corpus, method="wanda", **changes):
    cfg = make_tiny_config(corpus).with_method(method).with_target_sparsity(0.6)
    return cfg.with_overrides({"reconstruction.enabled": True, **changes})


def test_the_first_group_is_refit_on_its_dense_inputs(corpus, tmp_path):
    """Wanda's block walk: block 0's layers get Σ x xᵀ of their inputs in the dense model (float64 hook
    reference) and their weights after Pruning are that refit of Wanda's masks."""
    cfg = reconstruction_config(corpus, **{"calibration.walk": "block"})
    pipe = Pipeline(cfg, run_dir=tmp_path / "run", progress=False)
    ctx = None
    while pipe.stage is not PruningStage.COMPUTING_IMPORTANCE:  # each step runs the stage it enters
        pipe.step()
        ctx = pipe.context
    st = ctx.state
    names = list(st.group_targets())
    dense = {n: st.targets[n].weight.detach().clone() for n in names}
    grams: dict[str, torch.Tensor] = {}
    hooks = [st.targets[n].register_forward_hook(
        lambda m, a, o, n=n: grams.__setitem__(n, grams.get(n, 0) + (lambda f: f.t() @ f)(
            a[0].detach().reshape(-1, a[0].shape[-1]).double()))) for n in names]
    with torch.no_grad():
        ctx.model(input_ids=st.calibration_samples)
    for h in hooks:
        h.remove()
    for n in names:
        stats = st.stats[n]
        assert isinstance(stats, RefinedStats)
        assert torch.allclose(stats.gram_sum.double(), grams[n], rtol=1e-4, atol=1e-3 * float(grams[n].abs().max()))
    pipe.step()  # Pruning
    masks = st.masks
    for n in names:
        ref = reference_refit(dense[n], masks[n], grams[n], 0.01)
        got = st.targets[n].weight.detach().double()
        assert torch.allclose(got, ref, rtol=1e-3, atol=1e-4 * float(ref.abs().max())), n
    metrics = pipe.results[-1].layer_metrics
    for n in names:
        assert metrics[n]["reconstruction_error"] < metrics[n]["reconstruction_error_before_refit"], n


@pytest.mark.parametrize("method", ["magnitude", "wanda", "ria", "sparsegpt"])
def test_every_method_runs_with_reconstruction_and_keeps_its_masks(corpus, tmp_path, method):
    cfg = reconstruction_config(corpus, method)
    plain = Pipeline(cfg.with_overrides({"reconstruction.enabled": False}), run_dir=tmp_path / "plain",
                     progress=False)
    assert plain.run().ok
    pipe = Pipeline(cfg, run_dir=tmp_path / "run", progress=False)
    result = pipe.run()
    assert result.ok
    masks, plain_masks = run_masks(tmp_path / "run"), run_masks(tmp_path / "plain")
    assert sorted(masks) == sorted(plain_masks)
    if method == "magnitude":  # the scores read the weights alone: the very masks of the plain run
        assert all(torch.equal(masks[n], plain_masks[n]) for n in masks)
    model = pipe.context.model
    params = dict(model.named_parameters())
    changed = 0
    for name, mask in masks.items():
        w = params[f"{name}.weight"].detach()
        assert torch.equal(w[~mask], torch.zeros_like(w[~mask])), name  # masks hold
        changed += int(not torch.equal(w, params_of(plain)[f"{name}.weight"].detach()))
    assert changed == len(masks)  # every layer's kept weights moved
    pruning = [r for r in pipe.results if r.stage == "pruning"]
    errors = [(m["reconstruction_error"], m["reconstruction_error_before_refit"]) for r in pruning
              for m in r.layer_metrics.values()]
    assert errors and all(after <= before * (1 + 1e-6) for after, before in errors)


def params_of(pipe):
    return dict(pipe.context.model.named_parameters())


@pytest.mark.parametrize(("method", "changes", "words"), [
    ("wanda", {"scope": "global"}, "scope 'global'"),
    ("sparsegpt", {"method.joint_quantization": True, "export.quantization": "w8a16"}, "joint_quantization"),
    ("wanda", {"target_sparsity": 0.0, "structure.mlp": 0.25}, "structure.enabled"),
])
def test_what_reconstruction_cannot_do_is_refused_before_any_work(corpus, tmp_path, method, changes, words):
    with pytest.raises(ConfigError, match="reconstruction") as err:
        reconstruction_config(corpus, method, **changes)
    assert words in str(err.value)
    assert not (tmp_path / "run").exists()


def test_magnitude_with_reconstruction_calibrates():
    from podar import PruningConfig

    cfg = PruningConfig(method="magnitude")
    assert not cfg.needs_calibration
    assert cfg.with_overrides({"reconstruction.enabled": True}).needs_calibration


def test_a_run_killed_mid_reconstruction_resumes_to_the_same_export(corpus, tmp_path):
    """DSnoT and the refit, killed after the third of eight layer groups (site walk)."""
    cfg = reconstruction_config(corpus, **{"calibration.walk": "site", "dsnot.enabled": True,
                                           "dsnot.update_threshold": 0.0})
    ref = reference_and_killed(cfg, tmp_path, "kill@after:pruning#3")
    pipe = Pipeline.resume(tmp_path / "run", progress=False)
    assert pipe.run().ok
    assert export_hashes(tmp_path / "run") == export_hashes(tmp_path / "ref")
    assert ref.context is not None
