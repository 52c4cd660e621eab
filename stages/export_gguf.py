"""GGUF export for llama.cpp (and transformers' GGUF loader): a Llama-architecture model in one ``model.gguf``.

The pruned Linears are written as ``export.gguf_type`` — F16, or llama.cpp's Q8_0 / Q4_0 blocks of 32 weights
(one float16 scale each), quantized by the ``gguf`` package's reference implementation; the other matrices as
F16 and the norms as F32, as llama.cpp's converter does. Tensor names come from ``gguf``'s name map; q and k
projections are permuted into llama.cpp's rotary layout (transformers' loader permutes them back). The
tokenizer goes in as llama.cpp's ``gpt2`` (byte-level BPE) model: tokens, token types and merges from the
tokenizer's own vocabulary. Other architectures and tokenizers are refused before any work.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from podar.schemas.errors import CheckpointError, ConfigError

__all__ = ["GGUF_FILE", "GGUF_TYPES", "check_gguf_export", "gguf_roundtrip", "write_gguf"]

GGUF_FILE = "model.gguf"
GGUF_TYPES = ("f16", "q8_0", "q4_0")
_BLOCK = 32  # weights per Q8_0 / Q4_0 block


def _qtype(name: str) -> Any:
    import gguf

    return {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
            "q4_0": gguf.GGMLQuantizationType.Q4_0}[name]


def check_gguf_export(model: Any, tokenizer: Any, targets: dict[str, Any], gguf_type: str) -> None:
    """ConfigError unless ``model`` can be written as GGUF: a Llama-architecture causal LM, a byte-level BPE fast
    tokenizer, and (Q8_0 / Q4_0) pruned layers whose widths are whole blocks of 32."""
    arch = getattr(model.config, "model_type", None)
    if arch != "llama":
        raise ConfigError(f"export.format 'gguf' writes Llama-architecture models; this one is {arch!r} (use "
                          "export.format dense)")
    if _bpe_model(tokenizer) is None:
        raise ConfigError("export.format 'gguf' needs a fast byte-level BPE tokenizer (llama.cpp's gpt2 model); "
                          f"this model's is {type(tokenizer).__name__}")
    if gguf_type != "f16":
        for name, module in targets.items():
            if module.weight.shape[1] % _BLOCK:
                raise ConfigError(f"export.gguf_type {gguf_type!r} stores blocks of {_BLOCK} weights; layer '{name}' "
                                  f"has {module.weight.shape[1]} input columns")


def _bpe_model(tokenizer: Any) -> dict[str, Any] | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    return model if model.get("type") == "BPE" else None


def _stored_type(tensor: torch.Tensor, is_target: bool, gguf_type: str) -> Any:
    """The GGML type a tensor is written as: vectors F32, a pruned Linear ``gguf_type``, other matrices F16."""
    import gguf

    if tensor.ndim == 1:
        return gguf.GGMLQuantizationType.F32
    return _qtype(gguf_type) if is_target else gguf.GGMLQuantizationType.F16


def _encode(w: torch.Tensor, qtype: Any) -> np.ndarray:
    """w (float32, CPU) as the bytes or values of GGML type ``qtype``."""
    import gguf

    if qtype == gguf.GGMLQuantizationType.F32:
        return w.numpy()
    if qtype == gguf.GGMLQuantizationType.F16:
        return w.to(torch.float16).numpy()
    return gguf.quants.quantize(w.numpy(), qtype)


def gguf_roundtrip(tensor: torch.Tensor, is_target: bool, gguf_type: str) -> torch.Tensor:
    """What a tensor reads back as from the GGUF file, in float32 (the q / k permutation undone by the reader)."""
    import gguf

    qtype = _stored_type(tensor, is_target, gguf_type)
    data = _encode(tensor.detach().float().cpu(), qtype)
    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return torch.from_numpy(data.astype(np.float32))
    return torch.from_numpy(gguf.quants.dequantize(data, qtype).reshape(tensor.shape).astype(np.float32))


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's rotary layout of a q / k projection (R, C): the two halves of each head interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    import gguf

    bpe = _bpe_model(tokenizer)
    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    special = set(tokenizer.all_special_ids)
    added = {i for i in tokenizer.added_tokens_decoder}
    tokens, types = [], []
    for i in range(vocab_size):
        tok = by_id.get(i, f"[PAD{i}]")
        tokens.append(tok)
        types.append(gguf.TokenType.CONTROL if i in special else gguf.TokenType.USER_DEFINED if i in added
                     else gguf.TokenType.NORMAL if i in by_id else gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_scores([0.0] * len(tokens))  # unused by BPE; readers that derive merges ask for them
    if merges:
        writer.add_token_merges(merges)
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(int(token_id))


def _add_config(writer: Any, config: Any, gguf_type: str) -> None:
    import gguf

    heads = config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_rope_dimension_count(head_dim)
    if head_dim * heads != config.hidden_size:  # heads removed: llama.cpp takes n_embd / n_head unless told
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                          "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[gguf_type])


def _tensor(name: str, tensor: torch.Tensor, config: Any, is_target: bool, gguf_type: str
            ) -> tuple[np.ndarray, Any]:
    """(data, GGML type) of one tensor as llama.cpp stores it."""
    w = tensor.detach().float().cpu()
    if name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
        kv = name.endswith("k_proj.weight")
        w = _permute(w, (getattr(config, "num_key_value_heads", None) or config.num_attention_heads) if kv
                     else config.num_attention_heads)
    qtype = _stored_type(w, is_target, gguf_type)
    return _encode(w, qtype), qtype


@torch.no_grad()
def write_gguf(model: Any, tokenizer: Any, folder: Path, *, targets: set[str], gguf_type: str) -> dict[str, int]:
    """Write ``folder/model.gguf``; returns {pruned_layers_bytes, pruned_layers_dense_fp16_bytes}."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(folder / GGUF_FILE), arch="llama")
    writer.add_name(getattr(config, "_name_or_path", "") or "podar-export")
    _add_config(writer, config, gguf_type)
    _add_tokenizer(writer, tokenizer, config.vocab_size)
    sizes = {"pruned_layers_bytes": 0, "pruned_layers_dense_fp16_bytes": 0}
    tied = getattr(config, "tie_word_embeddings", False)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and tied:
            continue  # llama.cpp ties output to token_embd when output.weight is absent
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise CheckpointError(f"tensor '{name}' has no GGUF name (gguf's map for llama)")
        is_target = name.endswith(".weight") and name[: -len(".weight")] in targets
        data, qtype = _tensor(name, tensor, config, is_target, gguf_type)
        writer.add_tensor(gguf_name, data, raw_dtype=qtype)
        if is_target:
            sizes["pruned_layers_bytes"] += data.nbytes
            sizes["pruned_layers_dense_fp16_bytes"] += tensor.numel() * 2
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return sizes
