"""Chunked causal attention against a float64 softmax reference, its delegation to transformers' sdpa, and the
context manager that switches a model to it."""

from __future__ import annotations

import pytest
import torch

from podar import TinyModelConfig, tiny_llama
from podar.engine.attention import CHUNK, IMPLEMENTATION, causal_attention_chunked, chunked_causal_attention
from podar.stages.blocks import capture_first_block_inputs, find_blocks, run_block


def reference_attention(q, k, v, scale):
    """float64 causal softmax attention; k, v heads repeated for grouped-query attention. q (B, H, T, D)."""
    q, k, v = q.double(), k.double(), v.double()
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    t = q.shape[2]
    scores = (q @ k.transpose(-1, -2)) * scale  # (B, H, T, T)
    scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    return scores.softmax(-1) @ v


@pytest.mark.parametrize(("heads", "kv_heads", "t", "chunk"), [(6, 2, 300, 64), (4, 4, 257, 128), (2, 1, 50, 7)])
def test_chunked_equals_float64_reference(heads, kv_heads, t, chunk):
    g = torch.Generator().manual_seed(t)
    q = torch.randn(2, heads, t, 16, generator=g)
    k, v = (torch.randn(2, kv_heads, t, 16, generator=g) for _ in range(2))
    got = causal_attention_chunked(q, k, v, scaling=0.25, chunk=chunk)
    want = reference_attention(q, k, v, 0.25)
    assert got.shape == (2, heads, t, 16)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # the last query row sees every key, the first only itself
    torch.testing.assert_close(got[:, :, 0].double(), v.repeat_interleave(heads // kv_heads, 1)[:, :, 0].double())


def _tiny(seed=0):
    torch.manual_seed(seed)
    model, _tok = tiny_llama(TinyModelConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    return model.eval()


@pytest.fixture
def chunked_calls(monkeypatch) -> list[int]:
    """Counts the calls that take the chunked path (one entry per call)."""
    from podar.engine import attention as attention_mod

    calls: list[int] = []
    real = attention_mod.causal_attention_chunked
    monkeypatch.setattr(attention_mod, "causal_attention_chunked", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_context_switches_sdpa_models_and_restores(chunked_calls):
    model = _tiny()
    assert model.config._attn_implementation == "sdpa"
    ids = torch.randint(0, model.config.vocab_size, (3, 2 * CHUNK + 40), generator=torch.Generator().manual_seed(1))
    inputs = capture_first_block_inputs(model, find_blocks(model), ids, 2, torch.device("cpu"))
    want = run_block(model.model.layers[0], inputs).hidden
    with chunked_causal_attention(model) as switched:
        assert switched and model.config._attn_implementation == IMPLEMENTATION
        got = run_block(model.model.layers[0], inputs).hidden
    assert len(chunked_calls) == 2  # one per batch: the chunked path really ran
    assert model.config._attn_implementation == "sdpa"
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError, match="boom"), chunked_causal_attention(model):
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"  # restored on error too


def test_uncovered_calls_go_to_transformers_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from podar.engine.attention import _attention_forward

    model = _tiny()
    attn = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(2)
    t = 2 * CHUNK
    q = torch.randn(1, 4, t, 16, generator=g)
    k, v = (torch.randn(1, 2, t, 16, generator=g) for _ in range(2))
    mask = torch.ones(1, 1, t, t, dtype=torch.bool).tril()
    for args, kwargs in [((q, k, v, mask), {}), ((q[:, :, :10], k[:, :, :10], v[:, :, :10], None), {}),
                         ((q, k, v, None), {"sliding_window": 64})]:
        got, _ = _attention_forward(attn, *args, scaling=0.25, **kwargs)
        want, _ = sdpa_attention_forward(attn, *args, scaling=0.25, **kwargs)
        assert torch.equal(got, want)
    got, _ = _attention_forward(attn, q, k, v, None, scaling=0.25)  # covered: chunked, not bitwise sdpa
    want, _ = sdpa_attention_forward(attn, q, k, v, None, scaling=0.25)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_other_attention_implementations_are_left_alone():
    model = _tiny()
    model.config._attn_implementation = "eager"
    with chunked_causal_attention(model) as switched:
        assert not switched and model.config._attn_implementation == "eager"
    assert model.config._attn_implementation == "eager"


@pytest.mark.parametrize("walk", ["block", "site"])
def test_sequential_wanda_with_chunked_attention_matches_the_models_own(tiny_config, tmp_path, chunked_calls, walk):
    """Calibration forwards of 320-token windows run chunked (counted), give the masks the model's own attention
    gives, and leave the model on its own attention afterwards."""
    from podar import Pipeline, RuntimeConfig, run_masks

    calls = chunked_calls
    masks = {}
    for chunked in (True, False):
        cal = tiny_config.calibration.model_copy(update={"walk": walk, "sequence_length": 320})
        cfg = tiny_config.with_method("wanda").with_calibration(cal).with_runtime(
            RuntimeConfig(chunked_attention=chunked))
        n_before = len(calls)
        pipe = Pipeline(cfg, run_dir=tmp_path / f"run-{chunked}", progress=False)
        result = pipe.run()
        assert result.ok, result.failure
        assert (len(calls) > n_before) == chunked
        assert pipe.context.model.config._attn_implementation == "sdpa"
        masks[chunked] = run_masks(tmp_path / f"run-{chunked}")
    assert masks[True].keys() == masks[False].keys() and len(masks[True]) == 14
    for name in masks[True]:
        assert torch.equal(masks[True][name], masks[False][name]), name
