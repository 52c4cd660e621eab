"""DSnoT mask refinement (issue 31): the swaps against a plain float64 loop of the documented rule, the counts
kept, earlier rounds' pruned weights never regrown, the pipeline with every kind of method, and the refusals."""

from __future__ import annotations

import pytest
import torch
from helpers import make_tiny_config

from podar import ConfigError, Pipeline, run_masks
from podar.stages.dsnot import dsnot_refine


def reference_dsnot(w, keep, mean, var, sq, prior, cycles, thr, p):
    """Row by row, plain Python floats (float64), the rule of stages/dsnot.py's docstring."""
    w, mean, var, sq = w.double(), mean.double(), var.double(), sq.double()
    out = keep.clone()
    for r in range(w.shape[0]):
        n = w.shape[1]
        d = [float(w[r, j] * mean[j]) for j in range(n)]
        pruned = [j for j in range(n) if not keep[r, j]]
        grow = sorted((j for j in pruned if prior is None or prior[r, j]),
                      key=lambda j: (d[j] / float(var[j]) ** p, j))
        wanda = [abs(float(w[r, j])) * float(sq[j]) ** 0.5 for j in range(n)]
        neg = sorted((j for j in range(n) if keep[r, j] and d[j] < 0), key=lambda j: (wanda[j], j))
        pos = sorted((j for j in range(n) if keep[r, j] and d[j] > 0), key=lambda j: (wanda[j], j))
        err = sum(d[j] for j in pruned)
        lo, hi, ni, pi = 0, len(grow) - 1, 0, 0
        for _ in range(cycles):
            if abs(err) <= thr or lo > hi or (err < 0 and pi >= len(pos)) or (err >= 0 and ni >= len(neg)):
                break
            if err > 0:
                g, hi = grow[hi], hi - 1
            else:
                g, lo = grow[lo], lo + 1
            if err < 0:
                q, pi = pos[pi], pi + 1
            else:
                q, ni = neg[ni], ni + 1
            out[r, g], out[r, q] = True, False
            err += d[q] - d[g]
    return out


def problem(seed, out_f=12, in_f=40):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(300, in_f, generator=gen) * torch.rand(in_f, generator=gen).mul(3) + torch.randn(in_f,
                                                                                                    generator=gen)
    w = torch.randn(out_f, in_f, generator=gen)
    score = w.abs() * x.pow(2).sum(0).sqrt()
    keep = score >= score.kthvalue(int(in_f * 0.6), dim=1, keepdim=True).values  # 60% per row, Wanda's mask
    return x, w, keep


@pytest.mark.parametrize(("seed", "thr", "p"), [(0, 0.1, 1.0), (1, 0.0, 0.5), (2, 1.0, 0.0), (3, 0.05, 2.0)])
def test_dsnot_matches_a_plain_loop_of_its_rule(seed, thr, p):
    x, w, keep = problem(seed)
    mean, var, sq = x.double().mean(0), x.double().var(0, unbiased=False), x.double().pow(2).sum(0)
    prior = None
    if seed == 3:  # an earlier round pruned some weights: never regrown
        prior = torch.rand(keep.shape, generator=torch.Generator().manual_seed(9)) > 0.2
        keep = keep & prior
    for cycles in (1, 7, 50):
        got, metrics = dsnot_refine(w, keep, mean, var, sq, prior=prior, max_cycles=cycles, update_threshold=thr,
                                    var_power=p)
        ref = reference_dsnot(w, keep, mean, var, sq, prior, cycles, thr, p)
        assert torch.equal(got, ref)
        assert torch.equal(got.sum(1), keep.sum(1))  # every row keeps its count
        assert metrics["dsnot_swaps"] == int((got & ~keep).sum())
        if prior is not None:
            assert not bool((got & ~prior).any())
    assert metrics["dsnot_error_after"] < metrics["dsnot_error_before"]


def reference_dsnot_nm(w, keep, mean, var, sq, prior, cycles, thr, p, m):
    """Row by row in plain floats: the N:M rule of stages/dsnot.py's docstring (swaps inside a group of m)."""
    w, mean, var, sq = w.double(), mean.double(), var.double(), sq.double()
    out = keep.clone()
    n_in = w.shape[1]
    for r in range(w.shape[0]):
        d = [float(w[r, j] * mean[j]) for j in range(n_in)]
        key = [d[j] / float(var[j]) ** p for j in range(n_in)]
        wanda = [abs(float(w[r, j])) * float(sq[j]) ** 0.5 for j in range(n_in)]
        can_grow = {j for j in range(n_in) if not keep[r, j] and (prior is None or prior[r, j])}
        can_prune = {j for j in range(n_in) if keep[r, j]}
        err = sum(d[j] for j in range(n_in) if not keep[r, j])
        for _ in range(cycles):
            if abs(err) <= thr:
                break

            def partners(j, err=err, d=d, can_prune=can_prune):
                group = range(j // m * m, j // m * m + m)
                return [k for k in group if k in can_prune and (d[k] > 0 if err < 0 else d[k] < 0)]

            eligible = sorted(j for j in can_grow if partners(j))
            if not eligible:
                break
            g = (max if err > 0 else min)(eligible, key=lambda j: (key[j], -j) if err > 0 else (key[j], j))
            q = min(partners(g), key=lambda k: (wanda[k], k))
            out[r, g], out[r, q] = True, False
            can_grow.discard(g)
            can_prune.discard(q)
            err += d[q] - d[g]
    return out


@pytest.mark.parametrize(("seed", "thr", "p", "nm"), [(0, 0.1, 1.0, (2, 4)), (1, 0.0, 0.5, (2, 4)),
                                                      (2, 0.0, 1.0, (4, 8)), (3, 0.05, 0.0, (1, 4))])
def test_nm_dsnot_matches_a_plain_loop_and_keeps_n_per_group(seed, thr, p, nm):
    n, m = nm
    x, w, _ = problem(seed)
    score = w.abs() * x.pow(2).sum(0).sqrt()
    keep = torch.zeros_like(score, dtype=torch.bool)
    top = score.reshape(score.shape[0], -1, m).topk(n, dim=-1).indices  # Wanda's N:M mask
    keep.view(score.shape[0], -1, m).scatter_(-1, top, True)
    mean, var, sq = x.double().mean(0), x.double().var(0, unbiased=False), x.double().pow(2).sum(0)
    prior = None
    if seed == 3:  # an earlier round's pruned weights (kept out of the mask) are never regrown
        prior = keep | (torch.rand(keep.shape, generator=torch.Generator().manual_seed(5)) > 0.3)
    for cycles in (1, 5, 50):
        got, metrics = dsnot_refine(w, keep, mean, var, sq, prior=prior, max_cycles=cycles, update_threshold=thr,
                                    var_power=p, m=m)
        assert torch.equal(got, reference_dsnot_nm(w, keep, mean, var, sq, prior, cycles, thr, p, m))
        assert bool((got.reshape(got.shape[0], -1, m).sum(-1) == n).all())
        assert metrics["dsnot_swaps"] == int((got & ~keep).sum())
        if prior is not None:
            assert not bool((got & ~prior).any())
    assert metrics["dsnot_swaps"] > 0 and metrics["dsnot_error_after"] < metrics["dsnot_error_before"]


@pytest.mark.parametrize("permutation", [False, True])
def test_nm_dsnot_in_the_pipeline_keeps_the_pattern(corpus, tmp_path, permutation):
    cfg = dsnot_config(corpus, "ria", **{"pattern": {"kind": "nm", "n": 2, "m": 4}, "target_sparsity": 0.5,
                                         "permutation.enabled": permutation, "export.format": "sparse-24-bitmask"})
    plain = cfg.with_overrides({"dsnot.enabled": False})
    assert Pipeline(plain, run_dir=tmp_path / "plain", progress=False).run().ok
    pipe = Pipeline(cfg, run_dir=tmp_path / "run", progress=False)
    assert pipe.run().ok  # Pruning checks N:M in the mask's own order; the 2:4 export refuses anything else
    masks, before = run_masks(tmp_path / "run"), run_masks(tmp_path / "plain")
    first = next(iter(masks))
    assert not torch.equal(masks[first], before[first])
    swaps = [m["dsnot_swaps"] for r in pipe.results if r.stage == "pruning" for m in r.layer_metrics.values()]
    assert sum(swaps) > 0


def dsnot_config(corpus, method="wanda", **changes):
    cfg = make_tiny_config(corpus).with_method(method).with_target_sparsity(0.6)
    return cfg.with_overrides({"dsnot.enabled": True, "dsnot.update_threshold": 0.0, **changes})


@pytest.mark.parametrize(("method", "refit"), [("magnitude", False), ("wanda", False), ("ria", False),
                                               ("wanda", True), ("sparsegpt", True)])
def test_dsnot_in_the_pipeline_swaps_and_keeps_the_counts(corpus, tmp_path, method, refit):
    cfg = dsnot_config(corpus, method, **{"reconstruction.enabled": refit})
    plain = cfg.with_overrides({"dsnot.enabled": False, "reconstruction.enabled": False})
    assert Pipeline(plain, run_dir=tmp_path / "plain", progress=False).run().ok
    pipe = Pipeline(cfg, run_dir=tmp_path / "run", progress=False)
    assert pipe.run().ok
    masks, before = run_masks(tmp_path / "run"), run_masks(tmp_path / "plain")
    assert sorted(masks) == sorted(before)
    first = next(iter(masks))  # the first group's inputs are the same in both runs: its masks differ by swaps only
    assert torch.equal(masks[first].sum(1), before[first].sum(1))
    assert not torch.equal(masks[first], before[first])
    swaps = [m["dsnot_swaps"] for r in pipe.results if r.stage == "pruning" for m in r.layer_metrics.values()]
    assert swaps and sum(swaps) > 0
    params = dict(pipe.context.model.named_parameters())
    for name, mask in masks.items():
        w = params[f"{name}.weight"].detach()
        assert torch.equal(w[~mask], torch.zeros_like(w[~mask])), name


def test_dsnot_after_sparsegpt_needs_the_refit(corpus, tmp_path):
    with pytest.raises(ConfigError, match="reconstruction.enabled"):
        Pipeline(dsnot_config(corpus, "sparsegpt"), run_dir=tmp_path / "run", progress=False).run()


@pytest.mark.parametrize(("changes", "words"), [
    ({"pattern": {"kind": "block", "block_height": 2, "block_width": 2}, "target_sparsity": 0.5}, "pattern 'block"),
    ({"scope": "global"}, "scope 'global'"),
    ({"target_sparsity": 0.0, "structure.mlp": 0.25}, "structure.enabled"),
])
def test_what_dsnot_cannot_do_is_refused(corpus, changes, words):
    with pytest.raises(ConfigError, match="dsnot") as err:
        dsnot_config(corpus, **changes)
    assert words in str(err.value)
