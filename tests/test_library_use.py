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
