"""RIA (issue 31): the score against a float64 reference in plain loops, its masks by the reference's comparison
groups, and the method end to end (unstructured over the layer, and 2:4)."""

from __future__ import annotations

import pytest
import torch

from podar import ConfigError, Pipeline, run_masks
from podar.stages.masks import nm_mask, unstructured_mask
from podar.stages.methods.ria import ria_score


def reference_ria(w, x, n_samples, a):
    """Plain loops in float64: (|W_ij|/Σ_k|W_kj| + |W_ij|/Σ_k|W_ik|) · (sqrt(Σ_t x_tj² / n))^a."""
    out_f, in_f = w.shape
    score = torch.zeros(out_f, in_f, dtype=torch.float64)
    for i in range(out_f):
        for j in range(in_f):
            col = sum(abs(float(w[k, j])) for k in range(out_f))
            row = sum(abs(float(w[i, k])) for k in range(in_f))
            norm = (sum(float(x[t, j]) ** 2 for t in range(x.shape[0])) / n_samples) ** 0.5
            score[i, j] = (abs(float(w[i, j])) / col + abs(float(w[i, j])) / row) * norm ** a
    return score


@pytest.mark.parametrize("a", [0.5, 0.0, 1.0])
def test_ria_score_matches_a_float64_reference(a):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 12, generator=g, dtype=torch.float64)
    x = torch.randn(40, 12, generator=g, dtype=torch.float64) * torch.linspace(0.1, 5, 12, dtype=torch.float64)
    got = ria_score(w.float(), (x ** 2).sum(dim=0).float(), 4, a)
    ref = reference_ria(w, x, 4, a)
    assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-7)
    # the masks the reference compares: the whole layer (unstructured), each group of m inputs (N:M)
    flat = torch.argsort(ref.reshape(-1), stable=True)[:36]
    keep = torch.ones(72, dtype=torch.bool)
    keep[flat] = False
    assert torch.equal(unstructured_mask(got, 0.5, "per_layer"), keep.view(6, 12))
    groups = ref.view(6, 3, 4)
    keep_nm = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, groups.topk(2, dim=2).indices, True)
    assert torch.equal(nm_mask(got, 2, 4), keep_nm.view(6, 12))


def test_ria_zero_rows_and_columns_score_zero_not_nan():
    w = torch.zeros(3, 4)
    w[1, 2] = 2.0
    score = ria_score(w, torch.ones(4), 1, 0.5)
    assert torch.isfinite(score).all() and float(score[1, 2]) == pytest.approx(2.0)


@pytest.mark.parametrize("pattern", [{"pattern.kind": "unstructured"},
                                     {"pattern.kind": "nm", "pattern.n": 2, "pattern.m": 4}])
def test_ria_runs_end_to_end(tiny_config, tmp_path, pattern):
    cfg = tiny_config.with_overrides({"method": {"name": "ria", "a": 0.5}, "target_sparsity": 0.5, **pattern})
    assert cfg.resolved_scope() == "per_layer"
    pipe = Pipeline(cfg, run_dir=tmp_path / "run", progress=False)
    assert pipe.run().ok
    for name, mask in run_masks(tmp_path / "run").items():
        if pattern["pattern.kind"] == "nm":
            assert torch.all(mask.view(mask.shape[0], -1, 4).sum(-1) == 2), name
        else:
            assert int((~mask).sum()) == int(mask.numel() * 0.5), name


def test_ria_parameters_are_validated(tiny_config):
    with pytest.raises(ConfigError, match="a"):
        tiny_config.with_overrides({"method": {"name": "ria", "a": 3}})
