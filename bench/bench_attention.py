"""Causal attention on CPU at SmolLM2-135M's shapes (4 windows × 9 query heads / 3 key-value heads × 512 tokens ×
64), interleaved, best of 5:

1. PyTorch's SDPA with and without ``is_causal``: it does not skip the masked half;
2. SDPA causal against podar's query-chunked causal attention (``engine/attention.py``);
3. one decoder block (SmolLM2's configuration, random weights) run on the model's ``sdpa`` attention and
   inside ``chunked_causal_attention``, as the calibration forwards run it.

    python bench/bench_attention.py
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from podar.engine.attention import causal_attention_chunked, chunked_causal_attention


def interleaved(fns: dict, rounds: int = 5, inner: int = 3) -> dict[str, float]:
    """Best time per call of each function (seconds), the functions taking turns."""
    best = {n: float("inf") for n in fns}
    for _ in range(rounds):
        for n, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            best[n] = min(best[n], (time.perf_counter() - t0) / inner)
    return best


@torch.no_grad()
def main() -> None:
    torch.manual_seed(0)
    q = torch.randn(4, 9, 512, 64)
    k, v = (torch.randn(4, 3, 512, 64) for _ in range(2))
    t = interleaved({
        "sdpa causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        "sdpa full": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
        "chunked causal": lambda: causal_attention_chunked(q, k, v),
    })
    print(f"attention call: SDPA causal {t['sdpa causal'] * 1e3:.1f} ms, SDPA full {t['sdpa full'] * 1e3:.1f} ms "
          f"(ratio {t['sdpa causal'] / t['sdpa full']:.2f}); chunked causal {t['chunked causal'] * 1e3:.1f} ms "
          f"({t['chunked causal'] / t['sdpa causal']:.2f}× SDPA causal)")

    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=512, hidden_size=576, intermediate_size=1536, num_hidden_layers=1,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(config).eval()
    block = model.model.layers[0]
    hidden = torch.randn(4, 512, 576)
    position_ids = torch.arange(512)[None]
    rotary = model.model.rotary_emb(hidden, position_ids)

    def forward() -> torch.Tensor:
        return block(hidden, attention_mask=None, position_ids=position_ids, position_embeddings=rotary)

    def forward_chunked() -> torch.Tensor:
        with chunked_causal_attention(model):
            return forward()

    diff = float((forward() - forward_chunked()).abs().max())
    t = interleaved({"model": forward, "chunked": forward_chunked})
    print(f"decoder block forward: model's sdpa {t['model'] * 1e3:.1f} ms, chunked {t['chunked'] * 1e3:.1f} ms "
          f"({t['chunked'] / t['model']:.3f}×), max |difference| {diff:.2g}")


if __name__ == "__main__":
    main()
