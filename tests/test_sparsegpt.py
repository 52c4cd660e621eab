"""SparseGPT and the calibration statistics against plain float64 references written from the papers."""

from __future__ import annotations

import pytest
import torch
from helpers import reference_sparsegpt
from torch import nn

from podar import TinyModelConfig, tiny_llama
from podar.stages.blocks import capture_first_block_inputs, execution_order, find_blocks, run_block, skipped_module
from podar.stages.methods.sparsegpt import (
    SparseGPT,
    hessian_from_sum,
    inverse_hessian_factor,
    sparsegpt_prune,
    sparsegpt_saliency,
)
from podar.stages.methods.wanda import Wanda
from podar.stages.walks import collect_stats


def data(out_f=24, in_f=40, tokens=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    # correlated inputs with uneven scales, as activations are
    mix = torch.randn(in_f, in_f, generator=g, dtype=torch.float64) * 0.3 + torch.eye(in_f, dtype=torch.float64)
    x = (torch.randn(tokens, in_f, generator=g, dtype=torch.float64) @ mix) * torch.linspace(0.2, 3, in_f)
    return w, x


def recon_error(w, w_hat, x):
    return float(((x @ (w - w_hat).t()) ** 2).sum() / ((x @ w.t()) ** 2).sum())


@pytest.mark.parametrize("shape,block", [((24, 40), 128), ((16, 64), 16), ((8, 37), 10)])
def test_unstructured_no_worse_than_reference(shape, block):
    w, x = data(*shape)
    ref_w, ref_keep = reference_sparsegpt(w, x, 0.5, block=block)
    h_sum = (x.t() @ x).float()
    upper, dead, _frac, _r = inverse_hessian_factor(hessian_from_sum(h_sum, 1), 0.01)
    ours, keep, _loss, _ = sparsegpt_prune(w.float(), upper, 0.5, dead=dead, block_size=block)
    ours_err, ref_err = recon_error(w, ours.double(), x), recon_error(w, ref_w, x)
    assert ours_err <= ref_err * 1.01 + 1e-9
    expected = sum(int(shape[0] * (min(i + block, shape[1]) - i) * 0.5) for i in range(0, shape[1], block))
    assert int((~keep).sum()) == expected
    assert torch.equal(ours[~keep], torch.zeros(int((~keep).sum())))
    # magnitude pruning at the same sparsity is much worse: the OBS update matters
    mag = w.clone()
    mag[w.abs() < w.abs().median()] = 0
    assert ours_err < recon_error(w, mag, x)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_nm_no_worse_than_reference_and_exact(n, m):
    w, x = data(16, 64, seed=1)
    ref_w, _ = reference_sparsegpt(w, x, 0.5, n=n, m=m)
    upper, dead, _f, _r = inverse_hessian_factor(hessian_from_sum((x.t() @ x).float(), 1), 0.01)
    ours, keep, _, _ = sparsegpt_prune(w.float(), upper, 0.5, dead=dead, n=n, m=m)
    assert recon_error(w, ours.double(), x) <= recon_error(w, ref_w, x) * 1.01 + 1e-9
    assert (keep.view(16, -1, m).sum(dim=-1) == n).all()


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_stacked_layers_equal_separate_solves(nm):
    """Layers sharing one H (q/k/v) solved together give exactly what solving each alone gives."""
    w1, x = data(12, 32, seed=4)
    w2, _ = data(5, 32, seed=5)
    upper, dead, _f, _r = inverse_hessian_factor(hessian_from_sum((x.t() @ x).float(), 1), 0.01)
    n, m = nm if nm else (None, None)
    a, ka, la, _ = sparsegpt_prune(w1.float(), upper, 0.5, dead=dead, n=n, m=m, block_size=16)
    b, kb, lb, _ = sparsegpt_prune(w2.float(), upper, 0.5, dead=dead, n=n, m=m, block_size=16)
    both, kboth, lboth, _ = sparsegpt_prune(torch.cat([w1, w2]).float(), upper, 0.5, dead=dead, n=n, m=m,
                                         block_size=16, row_segments=[(0, 12), (12, 17)])
    assert torch.allclose(both, torch.cat([a, b]), atol=1e-6)
    assert torch.equal(kboth, torch.cat([ka, kb]))
    assert torch.allclose(lboth, torch.cat([la, lb]))


def test_dead_inputs_zeroed_and_saliency():
    w, x = data(8, 16, seed=2)
    x[:, 3] = 0
    upper, dead, _f, _r = inverse_hessian_factor(hessian_from_sum((x.t() @ x).float(), 1), 0.01)
    assert dead.tolist() == [i == 3 for i in range(16)]
    sal = sparsegpt_saliency(w.float(), upper, dead)
    assert (sal[:, 3] == 0).all()
    ref = (w.float() ** 2) / torch.diag(upper)[None, :] ** 2
    assert torch.allclose(sal[:, :3], ref[:, :3])
    ours, keep, _, _ = sparsegpt_prune(w.float(), upper, 0.5, dead=dead)
    assert (ours[:, 3] == 0).all()


def test_inverse_factor_is_upper_and_squares_to_the_dampened_inverse_in_float64():
    """U is upper triangular with a positive diagonal and Uᵀ U = (H + λI)⁻¹ (dead inputs set to H_jj = 1), the
    inverse computed directly in float64."""
    w, x = data(8, 48, seed=6)
    x[:, 5] = 0  # a dead input
    h = hessian_from_sum((x.t() @ x).float(), 3)
    upper, dead, frac, retries = inverse_hessian_factor(h, 0.01)
    assert retries == 0 and frac == 0.01 and dead.nonzero().flatten().tolist() == [5]
    assert torch.equal(upper, torch.triu(upper)) and (torch.diag(upper) > 0).all()
    h64 = h.double().clone()
    h64[5, 5] = 1.0
    h64 += 0.01 * torch.diag(h64).mean() * torch.eye(48, dtype=torch.float64)
    ref = torch.linalg.inv(h64)
    got = upper.double().t() @ upper.double()
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


def test_cholesky_retries_then_fails_loudly():
    h = -torch.eye(4)  # negative definite: no dampening of 0.01·mean(diag) can fix it within the bound
    h[0, 0] = 1.0
    retries = []
    with pytest.raises(Exception, match="layer 'x'.*Cholesky.*failed"):
        inverse_hessian_factor(h, 0.01, layer="x", on_retry=retries.append)
    assert len(retries) == 8 and retries[0] == pytest.approx(0.02)
    # a singular but positive semi-definite H succeeds with the first dampening
    x = torch.randn(3, 6)
    upper, _d, frac, r = inverse_hessian_factor(x.t() @ x, 0.01)
    assert r == 0 and frac == 0.01 and torch.isfinite(upper).all()


def test_block_statistics_match_direct_computation():
    model, _tok = tiny_llama(TinyModelConfig())
    block = model.model.layers[0]
    samples = torch.randint(3, 200, (3, 24))
    inputs = capture_first_block_inputs(model, find_blocks(model), samples, 2, torch.device("cpu"))
    assert inputs.n_samples == 3 and [h.shape[0] for h in inputs.hidden] == [2, 1]
    targets = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    captured: dict[str, list[torch.Tensor]] = {n: [] for n in targets}
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: captured[n].append(a[0].reshape(-1, a[0].shape[-1])))
             for n, m in targets.items()]
    run_block(block, inputs)
    for h in hooks:
        h.remove()
    order = execution_order(block, targets, inputs.hidden[0], inputs.calls[0])
    assert order[-1] == "mlp.down_proj" and order[:3] == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    for method in (Wanda(), SparseGPT()):
        with collect_stats(targets, method) as stats, skipped_module(targets[order[-1]]):
            run_block(block, inputs)
        assert stats["self_attn.q_proj"] is stats["self_attn.k_proj"] is stats["self_attn.v_proj"]
        assert stats["mlp.gate_proj"] is stats["mlp.up_proj"]
        assert stats["self_attn.o_proj"] is not stats["self_attn.q_proj"]
        for name in targets:
            x = torch.cat(captured[name]).double()  # (tokens, in)
            assert stats[name].n_samples == 3
            if method.name == "wanda":
                assert torch.allclose(stats[name].sq_norm_sum.double(), (x ** 2).sum(0), rtol=1e-5)
            else:
                assert torch.allclose(stats[name].gram_sum.double(), x.t() @ x, rtol=1e-4, atol=1e-4)
    # the skipped module is restored afterwards
    out = targets["mlp.down_proj"](torch.ones(1, 128))
    assert out.abs().sum() > 0


def test_reconstruction_error_matches_direct_computation():
    from podar.stages.walks import reconstruction_hooks

    g = torch.Generator().manual_seed(3)
    layer = nn.Linear(12, 5, bias=True)
    dense = {"l": layer.weight.detach().clone()}
    with torch.no_grad():
        layer.weight[layer.weight.abs() < layer.weight.abs().median()] = 0
    x = torch.randn(3, 7, 12, generator=g)  # 3 sequences of 7 tokens
    with reconstruction_hooks({"l": layer}, dense, max_samples=2) as acc:
        layer(x[:2])
        layer(x[2:])  # beyond max_samples: ignored
    err, ref, n = acc["l"]
    xs = x[:2].reshape(-1, 12).double()
    w, w_hat = dense["l"].double(), layer.weight.detach().double()
    assert n == 2
    assert err == pytest.approx(float(((xs @ (w - w_hat).t()) ** 2).sum()), rel=1e-5)
    assert ref == pytest.approx(float(((xs @ w.t()) ** 2).sum()), rel=1e-5)


def test_nm_group_choice_breaks_ties_like_a_stable_sort():
    from podar.stages.methods.sparsegpt import _lowest_in_groups

    g = torch.Generator().manual_seed(3)
    for m in (2, 4, 8):
        sal = torch.randint(-1, 3, (m, 500), generator=g).float()  # many ties; −1 as a prior mask marks
        sal[:, :50] = torch.rand(m, 50, generator=g)  # and columns without ties
        for k in range(m + 1):
            ref = torch.zeros_like(sal, dtype=torch.bool)
            ref.scatter_(0, torch.sort(sal, dim=0, stable=True).indices[:k], True)
            assert torch.equal(_lowest_in_groups(sal, k), ref), (m, k)


def test_gram_errors_match_the_errors_on_the_inputs():
    """SparseGPT's per-layer error from Σ x xᵀ equals ‖XWᵀ − XŴᵀ‖² and ‖XWᵀ‖² computed on the tokens (float64),
    per row; a dead input (all-zero column of X) contributes nothing whatever its weights."""
    from podar.stages.methods.sparsegpt import gram_errors

    g = torch.Generator().manual_seed(5)
    x = torch.randn(300, 24, generator=g, dtype=torch.float64)
    x[:, 7] = 0.0  # dead input
    w = torch.randn(10, 24, generator=g, dtype=torch.float64)
    h = inverse_hessian_factor(hessian_from_sum((x.t() @ x).float(), 6), 0.01)
    w_hat, _keep, _loss, _ = sparsegpt_prune(w.float(), h[0], 0.5, dead=h[1], n=2, m=4)
    err, ref = gram_errors(w.float(), w_hat, (x.t() @ x).float())
    assert err.dtype == ref.dtype == torch.float64 and err.shape == ref.shape == (10,)
    direct_err = ((x @ (w - w_hat.double()).t()) ** 2).sum(dim=0)  # (out,)
    direct_ref = ((x @ w.t()) ** 2).sum(dim=0)
    assert torch.allclose(err, direct_err, rtol=1e-4)
    assert torch.allclose(ref, direct_ref, rtol=1e-5)
    assert 0 < float(err.sum() / ref.sum()) < 1


# ---------------------------------------------------------------- joint quantization (SparseGPT paper, 50% + 4-bit)


@pytest.mark.parametrize(("bits", "group", "nm"), [(4, 32, None), (8, None, None), (4, 32, (2, 4)), (4, 64, None)])
def test_joint_quantization_matches_the_float64_reference(bits, group, nm):
    from podar.stages.quantize import WeightQuant, fake_quantize

    w, x = data(16, 128, tokens=400, seed=3)
    n, m = nm if nm else (None, None)
    ref_w, ref_keep = reference_sparsegpt(w, x, 0.5, n=n, m=m, block=64, quant=(bits, group))
    upper, dead, _f, _r = inverse_hessian_factor(hessian_from_sum((x.t() @ x).float(), 1), 0.01)
    spec = WeightQuant(bits, group)
    ours, keep, _, scales = sparsegpt_prune(w.float(), upper, 0.5, dead=dead, n=n, m=m, block_size=64, quant=spec)
    assert scales.shape == (16, 128 // (group or 128))
    # every kept weight lies on its group's grid, pruned ones are zero
    g = group or 128
    q = ours.reshape(16, -1, g) / scales[..., None]
    assert torch.allclose(q, q.round(), atol=1e-4) and q.abs().max() <= 2 ** (bits - 1)
    assert torch.equal(ours[~keep], torch.zeros(int((~keep).sum())))
    # the same decisions as the float64 reference (up to a rare rounding tie), and the same error
    assert (keep == ref_keep).float().mean() >= 0.99
    assert recon_error(w, ours.double(), x) == pytest.approx(recon_error(w, ref_w, x), rel=0.02)
    # at 4 bits, better than quantizing after pruning: the OBS update absorbs the rounding error (at 8 bits the
    # rounding error is small next to the clamping of weights the update grows past the row's first range)
    pruned, keep2, _, _ = sparsegpt_prune(w.float(), upper, 0.5, dead=dead, n=n, m=m, block_size=64)
    after = fake_quantize(pruned, spec, torch.float32)
    if bits == 4:
        assert recon_error(w, ours.double(), x) < recon_error(w, after.double(), x)


def test_joint_quantization_groups_must_fit_the_obs_blocks():
    from podar.stages.quantize import WeightQuant

    w, x = data(8, 128)
    upper, dead, _f, _r = inverse_hessian_factor(hessian_from_sum((x.t() @ x).float(), 1), 0.01)
    with pytest.raises(ValueError, match="divide the OBS block"):
        sparsegpt_prune(w.float(), upper, 0.5, dead=dead, block_size=48, quant=WeightQuant(4, 32))
