"""Used as a library and from the command line on real models (issue 28): the model that was pruned is the one
the run names; the command line does not choose a method silently."""

from __future__ import annotations

import json

import pytest
import yaml
from helpers import fail_once

from podar import ModelLoadError, Pipeline, PruningStage, TinyModelConfig, tiny_llama
from podar.cli import main


def test_a_model_handed_in_memory_is_the_one_the_run_names(tiny_config, tmp_path):
    model, tok = tiny_llama(TinyModelConfig(hidden_size=32, intermediate_size=64))
    model.config._name_or_path = "my-org/my-finetune"
    cfg = tiny_config.with_method("wanda")  # its model section names the tiny default: not what is pruned here
    run_dir = tmp_path / "run"
    assert Pipeline(cfg, run_dir=run_dir, model=model, tokenizer=tok, progress=False).run().ok
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["kind"] == "memory" and saved["model"]["name"] == "my-org/my-finetune"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["config"]["model"]["name"] == "my-org/my-finetune"
    info = manifest["model_info"]
    assert info["class"] == "LlamaForCausalLM" and info["name_or_path"] == "my-org/my-finetune"
    assert len(info["config_sha256"]) == 64 and len(manifest["model_fingerprint"]) == 64
    assert "model `memory:my-org/my-finetune`" in (run_dir / "report.md").read_text()


def test_resuming_an_in_memory_run_needs_the_model_again(tiny_config, tmp_path, monkeypatch):
    model, tok = tiny_llama(TinyModelConfig())
    run_dir = tmp_path / "run"
    fail_once(monkeypatch, PruningStage.EVALUATING, 1)
    assert Pipeline(tiny_config, run_dir=run_dir, model=model, tokenizer=tok, progress=False).run().stage is \
        PruningStage.FAILED
    with pytest.raises(ModelLoadError, match="handed in memory.*Pipeline.resume"):
        Pipeline.resume(run_dir, progress=False).run()
    dense, tok = tiny_llama(TinyModelConfig())  # the run pruned its model in place: hand the dense one again
    assert Pipeline.resume(run_dir, model=dense, tokenizer=tok, progress=False).run().ok


def test_model_without_method_on_the_command_line_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "--model", str(tmp_path), "--run-dir", str(tmp_path / "r")])
    assert e.value.code == 2
    assert "--model without a config needs --method" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------- the export checked in its own dtype


def overflowing_model():
    """A tiny Llama whose residual stream goes beyond float16's range (65504) while its normed logits stay
    finite in float32, as Gemma-3's do in half precision."""
    import torch

    model, tok = tiny_llama(TinyModelConfig())
    with torch.no_grad():  # the MLP's input scaled by its norm, its output by down_proj: a residual of ~2.5e5
        model.model.layers[0].post_attention_layernorm.weight.mul_(1000.0)
        model.model.layers[0].mlp.down_proj.weight.mul_(20.0)
    return model, tok


def export_config(tiny_config, dtype):
    return tiny_config.with_export(tiny_config.export.model_copy(update={"dtype": dtype}))


def test_a_float16_export_of_a_model_that_overflows_is_refused_before_writing(tiny_config, tmp_path):
    model, tok = overflowing_model()
    run_dir = tmp_path / "run"
    result = Pipeline(export_config(tiny_config, "float16"), run_dir=run_dir, model=model, tokenizer=tok,
                      progress=False).run()
    assert result.stage is PruningStage.FAILED and result.failure.stage == "Exporting"
    assert "beyond float16's largest value (65504)" in result.failure.message
    assert "export.dtype: bfloat16" in result.failure.message
    assert not (run_dir / "export").exists() and not (run_dir / ".export.tmp").exists()


def test_the_export_computed_in_its_own_dtype_refuses_non_finite_logits(tiny_config, tmp_path, monkeypatch):
    from podar.stages import export

    monkeypatch.setattr(export, "check_float16_range", lambda ref: None)  # the check after writing alone
    model, tok = overflowing_model()
    result = Pipeline(export_config(tiny_config, "float16"), run_dir=tmp_path / "run", model=model, tokenizer=tok,
                      progress=False).run()
    assert result.stage is PruningStage.FAILED
    assert "non-finite value(s) in its own dtype (float16)" in result.failure.message


def test_its_bfloat16_export_loads_in_transformers_with_equal_logits(tiny_config, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    model, tok = overflowing_model()
    run_dir = tmp_path / "run"
    result = Pipeline(export_config(tiny_config, "bfloat16"), run_dir=run_dir, model=model, tokenizer=tok,
                      progress=False).run()
    assert result.ok, result.failure
    assert result.metrics["exporting"]["logits_max_abs_diff"] >= 0.0
    loaded = AutoModelForCausalLM.from_pretrained(run_dir / "export")
    assert next(loaded.parameters()).dtype == torch.bfloat16
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])
    with torch.no_grad():
        ours = model(input_ids=ids).logits.float()
        theirs = loaded(input_ids=ids).logits.float()
    assert torch.isfinite(theirs).all()
    assert float((ours - theirs).abs().max()) <= 0.2 * float(ours.abs().max())
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


# ---------------------------------------------------------------- logging


LIBRARY_RUN = """
import logging, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from helpers import make_tiny_config
from podar import Pipeline
if {configure}:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
assert Pipeline(make_tiny_config(Path({corpus!r})), run_dir={run_dir!r}, progress=False).run().ok
print("done")
"""


@pytest.mark.parametrize("configure", [False, True])
def test_as_a_library_podar_logs_only_once_the_application_configures_logging(corpus, tmp_path, configure):
    import subprocess
    import sys
    from pathlib import Path

    code = LIBRARY_RUN.format(tests=str(Path(__file__).parent), corpus=str(corpus), run_dir=str(tmp_path / "run"),
                              configure=configure)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == "done\n"
    if configure:  # the application's handler receives podar's records, on the 'podar' logger
        assert "podar INFO event='stage_done'" in proc.stderr and "targets_resolved" in proc.stderr
    else:
        assert proc.stderr == ""


# ---------------------------------------------------------------- what a run will cost, before work


def test_the_planned_cost_is_logged_recorded_in_the_first_record_and_shown_by_status(tiny_config, tmp_path,
                                                                                     capsys):
    from structlog.testing import capture_logs

    cfg = tiny_config.with_method("wanda")  # 4 × 64 calibration tokens, 2 blocks, the block walk
    run_dir = tmp_path / "run"
    with capture_logs() as logs:
        assert Pipeline(cfg, run_dir=run_dir, progress=False).run().ok
    [cost] = [e for e in logs if e["event"] == "cost_estimate"]
    assert cost["calibration_tokens"] == 4 * 64 and cost["calibration_block_forwards"] == 4 * 2 * 2
    assert cost["evaluation_tokens"] == 2 * 4 * 64
    assert cost["block0_ms"] > 0 and cost["est_calibration_s"] >= 0 and cost["est_evaluation_s"] >= 0
    first = json.loads((run_dir / "audit.jsonl").read_text().splitlines()[0])
    assert first["trigger"] == "start" and first["metrics"]["calibration_tokens"] == 256
    assert main(["status", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "plan: 256 calibration tokens (16 block forwards), 512 evaluation tokens; estimated calibration" in out
    assert main(["audit", str(run_dir)]) == 0
