"""Evaluation: the perplexity protocol by hand, KL and top-1 agreement against float64 references, gates, the
cached dense baseline, and the report."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from podar import (
    EvaluationConfig,
    Gradual,
    Pipeline,
    PruningStage,
    QualityGates,
    TinyModelConfig,
    evaluate,
    tiny_llama,
)
from podar.cli import main
from podar.engine.data import eval_windows, tokenize_text
from podar.engine.store import RunStore
from podar.schemas.report import RunReport
from podar.stages import HANDLERS
from podar.stages import evaluate as evaluate_stage
from podar.stages.evaluate import check_gates
from podar.stages.perplexity import perplexity
from podar.stages.quality import TextMetrics, compare_to_reference, dense_reference


@pytest.fixture(scope="module")
def models():
    a, tok = tiny_llama(TinyModelConfig(seed=0))
    b, _ = tiny_llama(TinyModelConfig(seed=1))
    return a, b, tok


@pytest.fixture(scope="module")
def windows(models, corpus):
    _a, _b, tok = models
    return eval_windows(tokenize_text(tok, corpus.read_text()), 48, 5)


def test_perplexity_protocol_matches_hand_computation(models, windows):
    model = models[0]
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:  # one window at a time, float64 log-softmax, tokens 1..T-1
            logp = torch.log_softmax(model(input_ids=w[None]).logits[0].double(), dim=-1)
            for t in range(windows.shape[1] - 1):
                total -= float(logp[t, w[t + 1]])
                count += 1
    expected = math.exp(total / count)
    assert compare_to_reference(model, windows, None, batch_size=2).ppl == pytest.approx(expected, rel=1e-5)
    assert perplexity(model, windows, batch_size=3).ppl == pytest.approx(expected, rel=1e-5)
    assert count == windows.shape[0] * (windows.shape[1] - 1)


def test_identical_models_have_zero_kl_and_full_agreement(models, corpus):
    model, _b, tok = models
    out = evaluate(model, tok, {"corpus": corpus.read_text()}, reference=model, seq_len=48, max_windows=4)
    m = out["corpus"]["model"]
    assert m.kl_mean == pytest.approx(0.0, abs=1e-6)
    assert m.top1_agreement == 1.0
    assert m.ppl == pytest.approx(out["corpus"]["reference"].ppl, rel=1e-9)


def exact_kl_and_agreement(ref_model, model, windows):
    kls, agree, n = 0.0, 0, 0
    with torch.no_grad():
        for w in windows:
            logp = torch.log_softmax(ref_model(input_ids=w[None]).logits[0, :-1].double(), dim=-1)
            logq = torch.log_softmax(model(input_ids=w[None]).logits[0, :-1].double(), dim=-1)
            kls += float((logp.exp() * (logp - logq)).sum())
            agree += int((logp.argmax(-1) == logq.argmax(-1)).sum())
            n += logp.shape[0]
    return kls / n, agree / n


def test_kl_exact_with_full_vocabulary_and_lower_bound_with_top_k(models, windows):
    a, b, _tok = models
    exact_kl, exact_agree = exact_kl_and_agreement(a, b, windows)
    assert exact_kl > 0.01
    full = compare_to_reference(b, windows, dense_reference(a, windows, top_k=None))
    assert full.kl_mean == pytest.approx(exact_kl, rel=1e-4)
    assert full.top1_agreement == pytest.approx(exact_agree)
    top8 = compare_to_reference(b, windows, dense_reference(a, windows, top_k=8))
    assert 0 < top8.kl_mean <= exact_kl + 1e-6
    assert top8.top1_agreement == pytest.approx(exact_agree)


def metrics(ppl, kl=None, agree=None):
    return TextMetrics(ppl=ppl, nll_sum=0.0, n_tokens=1, n_windows=1, seq_len=2, kl_mean=kl, top1_agreement=agree)


def test_each_gate_passes_and_fails_with_message():
    dense = metrics(10.0, 0.0, 1.0)
    ok = metrics(11.0, 0.05, 0.95)
    bad = metrics(30.0, 0.5, 0.6)
    assert check_gates("wiki", QualityGates(max_perplexity_increase_pct=20), dense, ok) == []
    [msg] = check_gates("wiki", QualityGates(max_perplexity_increase_pct=20), dense, bad)
    assert "'wiki'" in msg and "200.0%" in msg and "max_perplexity_increase_pct=20" in msg
    gates = QualityGates(max_perplexity_increase_pct=None, max_perplexity=12)
    assert check_gates("wiki", gates, dense, ok) == []
    assert "30.00 is above max_perplexity=12" in check_gates("wiki", gates, dense, bad)[0]
    gates = QualityGates(max_perplexity_increase_pct=None, max_kl=0.1)
    assert check_gates("wiki", gates, dense, ok) == []
    assert "mean KL 0.5000 nats is above max_kl=0.1" in check_gates("wiki", gates, dense, bad)[0]
    gates = QualityGates(max_perplexity_increase_pct=None, min_top1_agreement=0.9)
    assert check_gates("wiki", gates, dense, ok) == []
    assert "top-1 agreement 0.6000 is below min_top1_agreement=0.9" in check_gates("wiki", gates, dense, bad)[0]


def test_gates_per_dataset_and_unknown_names(corpus):
    ev = EvaluationConfig(dataset="a", extra_datasets=("b",), gates_per_dataset={"b": QualityGates(max_kl=0.2)})
    assert ev.gates_for("b").max_kl == 0.2 and ev.gates_for("a").max_kl is None
    with pytest.raises(ValueError, match="not evaluated"):
        EvaluationConfig(dataset="a", gates_per_dataset={"c": QualityGates()})


def test_kl_gate_fails_run_naming_text(tiny_config, tmp_path):
    ev = tiny_config.evaluation.model_copy(update={"gates": QualityGates(max_perplexity_increase_pct=None,
                                                                         max_kl=1e-9)})
    result = Pipeline(tiny_config.with_evaluation(ev), run_dir=tmp_path / "r", progress=False).run()
    assert result.stage is PruningStage.FAILED and "max_kl=1e-09" in result.failure.message
    assert tiny_config.evaluation.dataset in result.failure.message


def test_non_finite_evaluation_names_text_and_window(tiny_config, tmp_path):
    model, tok = tiny_llama(TinyModelConfig())
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    result = Pipeline(tiny_config, run_dir=tmp_path / "r", model=model, tokenizer=tok, progress=False).run()
    assert result.stage is PruningStage.FAILED and result.failure.stage == "Evaluating"
    assert "window 0" in result.failure.message and tiny_config.evaluation.dataset in result.failure.message


def test_dense_baseline_is_checkpointed_and_an_unrecorded_one_never_reused(tiny_config, tmp_path, monkeypatch,
                                                                           corpus):
    """The dense side of the gates is recorded with what it was computed from; a run that crashed after writing
    it (before its stage's checkpoint) recomputes it on resume instead of trusting the unrecorded file."""
    from safetensors import safe_open

    original = HANDLERS[PruningStage.EVALUATING]
    calls = []

    def fail_after_baseline(ctx):
        calls.append(original(ctx))
        raise RuntimeError("crash after the baseline was written")

    monkeypatch.setitem(HANDLERS, PruningStage.EVALUATING, fail_after_baseline)
    run_dir = tmp_path / "r"
    assert Pipeline(tiny_config, run_dir=run_dir, progress=False).run().stage is PruningStage.FAILED
    [path] = (run_dir / "artifacts" / "baseline").glob("*.safetensors")
    with safe_open(str(path), framework="pt") as f:  # a forged dense baseline: the dense perplexity made tiny
        forged = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    forged["nll"] = forged["nll"] * 0.01
    from safetensors.torch import save_file

    save_file(forged, str(path), metadata=meta)
    monkeypatch.setitem(HANDLERS, PruningStage.EVALUATING, original)
    result = Pipeline.resume(run_dir, progress=False).run()
    assert result.ok
    assert result.metrics["evaluating"]["dense_ppl"] == pytest.approx(calls[0].metrics["dense_ppl"])
    manifest = RunStore(run_dir).read_manifest()
    record = next(r for r in manifest.artifacts.values() if r.kind == "baseline")
    with safe_open(str(run_dir / record.path), framework="pt") as f:
        assert f.metadata()["model_fingerprint"] == manifest.model_fingerprint
        assert f.metadata()["text_sha256"] == manifest.data_sha256["evaluation"]


def test_report_schema_and_plots(tiny_config, tmp_path, capsys):
    cfg = tiny_config.with_method("wanda").with_schedule(
        Gradual(start_step=0, end_step=2, initial_sparsity=0.25, final_sparsity=0.5, frequency=1))
    cfg = cfg.with_finetune(cfg.finetune.model_copy(update={"enabled": True, "steps": 2}))
    run_dir = tmp_path / "r"
    assert Pipeline(cfg, run_dir=run_dir, progress=False).run().ok
    report = RunReport.model_validate_json((run_dir / "report.json").read_text())
    assert report.state == "complete" and report.method == "wanda" and len(report.layers) == 14
    assert all(lay.reconstruction_error is not None for lay in report.layers)
    assert report.texts[0].kl_mean is not None and report.texts[0].gates_passed
    assert report.schedule_points == [(0, 0.25), (1, 0.375), (2, 0.5)]
    assert len(report.finetune_losses) == 1 + 1 + 2  # one step between rounds, then the configured 2
    for plot in ("layer_sparsity", "layer_reconstruction_error", "sparsity_schedule", "finetune_loss"):
        path = run_dir / "plots" / f"{plot}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", plot
        assert f"plots/{plot}.png" in report.plots
    md = (run_dir / "report.md").read_text()
    assert "![plots/layer_sparsity.png]" in md and "KL" in md
    # podar report rebuilds it from the folder; podar compare lists runs side by side
    (run_dir / "report.json").unlink()
    assert main(["report", str(run_dir)]) == 0
    assert json.loads((run_dir / "report.json").read_text())["run_id"] == report.run_id
    other = tmp_path / "m"
    assert Pipeline(tiny_config, run_dir=other, progress=False).run().ok
    capsys.readouterr()
    assert main(["compare", str(run_dir), str(other)]) == 0
    out = capsys.readouterr().out
    assert "| r | complete | wanda | unstructured |" in out and "| m | complete | magnitude |" in out


def test_report_written_for_failed_run(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setitem(HANDLERS, PruningStage.FINE_TUNING, lambda ctx: 1 / 0)
    run_dir = tmp_path / "r"
    assert Pipeline(tiny_config, run_dir=run_dir, progress=False).run().stage is PruningStage.FAILED
    report = RunReport.model_validate_json((run_dir / "report.json").read_text())
    assert report.state == "failed" and report.failure.type == "ZeroDivisionError"


def test_evaluate_stage_module_is_the_registered_handler():
    assert HANDLERS[PruningStage.EVALUATING] is evaluate_stage.run


# ---------------------------------------------------------------- issue 28: logits a chunk of positions at a time


@pytest.mark.parametrize("chunk_bytes", [1, 700, 4096, None])
def test_next_token_stats_equal_those_of_the_whole_logits_in_float64(models, windows, chunk_bytes):
    """The vocabulary a chunk at a time (down to one token of one position): logsumexp, the next token's logit,
    the top-k, chosen tokens' logits and the argmax equal the whole logits' (float64); no chunk above the bound."""
    from podar.stages.quality import _logit_blocks, head_splits, next_token_stats

    model = models[0]
    batch = windows[:2]
    assert head_splits(model, batch[:1, :8])
    with torch.no_grad():
        whole = model(input_ids=batch).logits[:, :-1].double()  # (B, T-1, V)
    vocab = whole.shape[-1]
    ids = torch.randint(0, vocab, (*whole.shape[:2], 5), generator=torch.Generator().manual_seed(0))
    top = torch.topk(whole, 7, dim=-1)
    for split in (True, False):
        stats = next_token_stats(model, batch, split=split, top_k=7, ids=ids, chunk_bytes=chunk_bytes)
        assert stats.vocab == vocab and stats.nonfinite == 0
        assert torch.allclose(stats.lse, torch.logsumexp(whole, dim=-1), rtol=0, atol=1e-5)
        assert torch.allclose(stats.target.double(), whole.gather(-1, batch[:, 1:, None]).squeeze(-1), atol=1e-5)
        assert torch.equal(stats.top_ids, top.indices)
        assert torch.allclose(stats.top_values.double(), top.values, atol=1e-5)
        assert torch.allclose(stats.at.double(), whole.gather(-1, ids), atol=1e-5)
        assert torch.equal(stats.argmax, whole.argmax(dim=-1))
        assert stats.max_abs == pytest.approx(float(whole.abs().max()), abs=1e-5)
    if chunk_bytes is not None:
        with torch.no_grad():
            sizes = [c.nbytes for _w, chunks in _logit_blocks(model, batch, True, chunk_bytes) for _v, c in chunks]
        assert max(sizes) <= max(chunk_bytes, 2 * 4) and sum(sizes) == whole.numel() * 4


@pytest.mark.parametrize("chunk_bytes", [1, 4096, None])
def test_chunked_evaluation_equals_the_whole_computation_in_float64(models, windows, monkeypatch, chunk_bytes):
    """Perplexity, KL and top-1 a few positions at a time (down to one) against float64 computed whole."""
    from podar.stages import quality

    if chunk_bytes is not None:
        monkeypatch.setattr(quality, "_CHUNK_BYTES", chunk_bytes)
    a, b, _ = models
    exact_kl, exact_agree = exact_kl_and_agreement(a, b, windows)
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logq = torch.log_softmax(b(input_ids=w[None]).logits[0, :-1].double(), dim=-1)
            total -= float(logq.gather(-1, w[1:, None]).sum())
            count += w.shape[0] - 1
    got = compare_to_reference(b, windows, dense_reference(a, windows, top_k=None), batch_size=2)
    assert got.ppl == pytest.approx(math.exp(total / count), rel=1e-5)
    assert got.kl_mean == pytest.approx(exact_kl, rel=1e-4, abs=1e-7)
    assert got.top1_agreement == pytest.approx(exact_agree)
    assert perplexity(b, windows, batch_size=3).ppl == pytest.approx(math.exp(total / count), rel=1e-5)


def test_a_model_whose_head_does_not_split_is_computed_whole(models, windows):
    from podar.stages.quality import head_splits

    model = models[0]
    original = model.forward

    def scaled(*args, **kwargs):  # a head with a scale the split path would miss
        out = original(*args, **kwargs)
        out.logits = out.logits * 2.0
        return out

    model.forward = scaled
    try:
        assert not head_splits(model, windows[:1, :8])
        doubled = compare_to_reference(model, windows, None).ppl
    finally:
        model.forward = original
    assert doubled != pytest.approx(compare_to_reference(model, windows, None).ppl)


def test_stats_computed_in_float32_from_a_half_precision_head_equal_a_float32_copy(models, windows):
    """The export's check computes its float32 logits from bfloat16 weights a vocabulary chunk at a time: the
    chosen tokens' logits equal those of a float32 copy of the model."""
    from podar.engine.compute import computing_in
    from podar.stages.quality import head_splits, next_token_stats

    model = models[0]
    half = copy.deepcopy(model).to(torch.bfloat16)
    full = copy.deepcopy(half).float()
    batch = windows[:2]
    with torch.no_grad():
        whole = full(input_ids=batch).logits[:, :-1].float()  # (B, T-1, V)
    ids = torch.topk(whole, 7, dim=-1).indices.flip(-1)  # any ids, any order
    assert head_splits(half, batch[:1, :8])
    with computing_in(half, torch.float32):
        got = next_token_stats(half, batch, split=True, ids=ids, chunk_bytes=4096).at
    assert torch.allclose(got, torch.gather(whole, -1, ids), rtol=1e-5, atol=1e-5)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
