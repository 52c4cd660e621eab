"""Causal attention computed in query chunks, for the calibration forwards: about 20% less attention time on CPU.

PyTorch's CPU ``scaled_dot_product_attention`` does the full T × T work even with ``is_causal`` (see
``bench/bench_attention.py``). Split the queries into chunks of ``CHUNK`` rows: chunk [s, e) attends to keys
[0, e) only, with the causal mask aligned to the lower right (row r of the chunk sees keys ≤ s + r), so about
(n + 1) / 2n of the products are made for n chunks. The result equals full causal attention up to float rounding.

``chunked_causal_attention(model)`` switches a Hugging Face model whose attention runs through ``sdpa`` to this
function while the context is open (the model's config is restored on exit). Any call it does not cover —
an explicit attention mask, queries shorter than keys (a cache), dropout, sliding windows, soft-capping,
sequences shorter than two chunks — goes to transformers' own ``sdpa`` function unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CHUNK", "IMPLEMENTATION", "block_attention", "causal_attention_chunked", "chunked_causal_attention"]

CHUNK = 128  # query rows per chunk (best of 64/128/256 for 512-token windows on 2 CPU cores)
IMPLEMENTATION = "podar_chunked_causal"
_UNSUPPORTED = ("sliding_window", "softcap", "position_bias", "s_aux", "sinks")


def causal_attention_chunked(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             scaling: float | None = None, chunk: int = CHUNK) -> torch.Tensor:
    """Causal softmax attention, chunked over queries. query (B, H, T, D); key, value (B, Hkv, T, D) with H a
    multiple of Hkv (grouped-query attention: query head h reads key head h // (H / Hkv)). Returns (B, H, T, D)."""
    b, h, t, d = query.shape
    gqa = key.shape[1] != h
    out = query.new_empty(b, h, t, value.shape[-1])
    for s in range(0, t, chunk):
        e = min(s + chunk, t)
        keep = torch.ones(e - s, e, dtype=torch.bool, device=query.device).tril(diagonal=s)  # (e-s, e)
        out[:, :, s:e] = F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, :e], value[:, :, :e],
                                                        attn_mask=keep, scale=scaling, enable_gqa=gqa)
    return out


def _attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: returns (attention output (B, T, H, D), None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    t = query.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    covered = (attention_mask is None and causal and dropout == 0.0 and key.shape[2] == t and t >= 2 * CHUNK
               and query.shape[1] % key.shape[1] == 0 and not kwargs.get("output_attentions")
               and all(kwargs.get(k) is None for k in _UNSUPPORTED))
    if not covered:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    out = causal_attention_chunked(query, key, value, scaling=scaling)  # (B, H, T, D)
    return out.transpose(1, 2).contiguous(), None


@contextmanager
def chunked_causal_attention(model: nn.Module) -> Iterator[bool]:
    """While open, the model's ``sdpa`` attention runs chunked (see the module docstring). Yields whether it was
    switched: models on another attention implementation (eager, flash, …) are left as they are."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        yield False
        return
    from transformers import AttentionInterface

    if IMPLEMENTATION not in AttentionInterface._global_mapping:  # registered on first use, never at import
        AttentionInterface.register(IMPLEMENTATION, _attention_forward)
    config._attn_implementation = IMPLEMENTATION
    try:
        yield True
    finally:
        config._attn_implementation = "sdpa"


def block_attention(model: nn.Module, enabled: bool) -> AbstractContextManager:
    """The context for forwards of single decoder blocks (``runtime.chunked_attention``): chunked when
    ``enabled``. Never wrap a forward of the whole model in it: its mask building looks the attention name up."""
    return chunked_causal_attention(model) if enabled else nullcontext()
