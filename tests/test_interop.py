"""The interop matrix (issue 20): every format × quantization podar writes, loaded the way users load models —
``AutoModelForCausalLM.from_pretrained`` — in separate pinned environments (``make interop`` builds them):
current transformers + compressed-tensors, and transformers 4.57 + compressed-tensors 0.14. Each export either
loads with logits equal to podar's (``podar.load_pretrained``, itself checked against the in-memory model), or
is refused with an error. Never a silent wrong model.

The environments are named in PODAR_INTEROP_ENVS (``name=python,name=python``); without it these tests skip,
unless PODAR_INTEROP=1 (CI), where a missing environment fails.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from podar import ExportConfig, Pipeline, SparsityPatternConfig, load_pretrained

pytestmark = pytest.mark.interop

LOADER = Path(__file__).parent / "interop" / "load_export.py"
# format, quantization → what every loader in the matrix must do with it
EXPECTED = {
    ("dense", "none"): "equal",
    ("dense", "w8a16"): "equal",
    ("dense", "w4a16"): "equal",
    ("sparse-bitmask", "none"): "refused",
    ("sparse-bitmask", "w8a16"): "refused",
    ("sparse-24-bitmask", "none"): "refused",
    ("sparse-24-bitmask", "w8a16"): "refused",
    ("gguf", "f16"): "equal",  # transformers' GGUF loader (quantization here is export.gguf_type)
    ("gguf", "q8_0"): "equal",
    ("gguf", "q4_0"): "equal",
}


def interop_envs() -> dict[str, str]:
    spec = os.environ.get("PODAR_INTEROP_ENVS", "")
    envs = dict(item.split("=", 1) for item in spec.split(",") if item)
    if not envs:
        if os.environ.get("PODAR_INTEROP") == "1":
            pytest.fail("PODAR_INTEROP=1 but PODAR_INTEROP_ENVS names no environment (run make interop)")
        pytest.skip("no interop environments (make interop builds them and runs these tests)")
    missing = [f"{k}={v}" for k, v in envs.items() if not Path(v).is_file()]
    if missing:
        pytest.fail(f"interop environment(s) not found: {', '.join(missing)}")
    return envs


@pytest.fixture(scope="module")
def exports(tiny_config_module, tmp_path_factory):
    """One export per case, with podar's reference logits beside it (reference.safetensors)."""
    root = tmp_path_factory.mktemp("interop")
    out = {}
    for fmt, quant in EXPECTED:
        cfg = tiny_config_module
        if fmt == "sparse-24-bitmask":
            cfg = cfg.with_pattern(SparsityPatternConfig.nm_2_4())
        if fmt == "gguf":
            cfg = cfg.with_export(ExportConfig(format=fmt, gguf_type=quant))
        else:
            cfg = cfg.with_export(ExportConfig(format=fmt, quantization=quant, group_size=32, dtype="float32"))
        run = root / f"{fmt}-{quant}"
        pipe = Pipeline(cfg, run_dir=run, progress=False)
        assert pipe.run().ok
        vocab = pipe.context.model.config.vocab_size
        ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(0))
        model = load_pretrained(run / "export", dtype=torch.float32)
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()
            if quant == "none" and fmt != "gguf":  # podar's reader gives the in-memory model
                torch.testing.assert_close(logits, pipe.context.model(input_ids=ids).logits.float())
        save_file({"input_ids": ids, "logits": logits.contiguous()}, str(run / "reference.safetensors"))
        out[fmt, quant] = run
    return out


@pytest.fixture(scope="module")
def tiny_config_module(corpus):
    from helpers import make_tiny_config

    return make_tiny_config(corpus)


def load_elsewhere(python: str, run: Path, gguf: bool, encoder: bool = False) -> dict:
    extra = (["--gguf", "model.gguf"] if gguf else []) + (["--encoder"] if encoder else [])
    proc = subprocess.run([python, str(LOADER), str(run / "export"), str(run / "reference.safetensors"), *extra],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(("fmt", "quant"), list(EXPECTED))
def test_each_loader_loads_equal_or_refuses(exports, fmt, quant):
    envs = interop_envs()
    results = {name: load_elsewhere(python, exports[fmt, quant], fmt == "gguf") for name, python in envs.items()}
    for name, got in results.items():
        assert got["outcome"] != "wrong", f"{name} loads {fmt}/{quant} with other logits: {got}"
        assert got["outcome"] == EXPECTED[fmt, quant], f"{name}: {got}"
        if got["outcome"] == "refused":  # refused because it does not know the format, not by accident
            assert "podar-" in got["error"] or "PodarSparseExport" in got["error"], got["error"]


# structured pruning (issue 30): fewer blocks, channels and heads in an ordinary config; every loader must load it.
# (architecture, format, quantization); depth, MLP width and heads where the family has them, depth elsewhere
STRUCTURED = [("llama", "dense", "none"), ("llama", "dense", "w8a16"), ("llama", "dense", "w4a16"),
              ("llama", "gguf", "f16"), ("qwen2", "dense", "none"), ("mistral", "dense", "none"),
              ("phi3", "dense", "none"), ("gpt2", "dense", "none"), ("opt", "dense", "none"),
              ("gemma3", "dense", "none"), ("bert", "dense", "none"),
              # FLAP (fluctuation ranking + bias compensation): Llama's config switches mlp_bias / attention_bias on
              ("llama+flap", "dense", "none"), ("llama+flap", "dense", "w4a16"), ("gpt2+flap", "dense", "none"),
              # hidden channels too (the embedding, norms and head narrower; head_dim explicit), and structure
              # followed by Wanda's masks in the same run
              ("llama+hidden", "dense", "none"), ("llama+hidden", "dense", "w4a16"), ("llama+hidden", "gguf", "f16"),
              ("qwen2+hidden", "dense", "none"), ("llama+masks", "dense", "none")]
_WIDTH = {"llama": (0.25, 2), "qwen2": (0.25, 2), "mistral": (0.25, 2), "phi3": (0.25, 2), "gpt2": (0.25, 0)}


@pytest.fixture(scope="module")
def structured_exports(corpus, tmp_path_factory):
    from helpers import make_tiny_config

    from podar import StructureConfig

    root = tmp_path_factory.mktemp("interop-structure")
    out = {}
    for key, fmt, quant in STRUCTURED:
        arch, _, option = key.partition("+")
        flap = option == "flap"
        mlp, heads = _WIDTH.get(arch, (0.0, 0))
        cfg = make_tiny_config(corpus, arch=arch, num_hidden_layers=4).with_target_sparsity(0.0)
        if option == "masks":
            cfg = cfg.with_method("wanda").with_target_sparsity(0.5)
        cfg = cfg._with(structure=StructureConfig(depth=1, mlp=mlp, heads=heads, alignment=8, bias_compensation=flap,
                                                  channel_score="fluctuation" if flap else "activation",
                                                  hidden=0.5 if option == "hidden" else 0.0))
        if arch == "bert":
            cfg = cfg._with(evaluation=cfg.evaluation.model_copy(update={"enabled": False}))
        cfg = cfg.with_export(ExportConfig(format=fmt, gguf_type=quant) if fmt == "gguf" else
                              ExportConfig(format=fmt, quantization=quant, group_size=32, dtype="float32"))
        run = root / f"{key}-{fmt}-{quant}"
        pipe = Pipeline(cfg, run_dir=run, progress=False)
        assert pipe.run().ok
        vocab = pipe.context.model.config.vocab_size
        ids = torch.randint(3, vocab, (2, 24), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            if arch == "bert":  # the encoder's last hidden states stand for the logits
                logits = pipe.context.model(input_ids=ids).last_hidden_state.float()
            else:
                logits = load_pretrained(run / "export", dtype=torch.float32)(input_ids=ids).logits.float()
        save_file({"input_ids": ids, "logits": logits.contiguous()}, str(run / "reference.safetensors"))
        out[key, fmt, quant] = run
    return out


@pytest.mark.parametrize(("arch", "fmt", "quant"), STRUCTURED)
def test_each_loader_loads_a_structurally_pruned_export(structured_exports, arch, fmt, quant):
    envs = interop_envs()
    for name, python in envs.items():
        got = load_elsewhere(python, structured_exports[arch, fmt, quant], fmt == "gguf", encoder=arch == "bert")
        assert got["outcome"] == "equal", f"{name} with a structured {arch} {fmt}/{quant} export: {got}"
