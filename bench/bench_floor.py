"""The least time sequential calibration can take on this machine: the matrix products and the attention it
cannot avoid, timed one by one on SmolLM2-135M's shapes, summed over the bench's calibration set, and set
against llm-compressor's measured time (bench/results/results.json) and the "half of it" target.

Per block and calibration batch (B windows of T tokens), a pass is the seven Linear products plus one causal
attention. The reference statistics (Wanda/SparseGPT block by block) need a dense pass without the last
Linear (down_proj feeds no other target) and a pruned pass: 1.75 passes' products. The site-by-site walk
needs one pass. llm-compressor's sequential pipeline runs every block twice whole (a calibration pass with its
hooks, then a propagation pass), with PyTorch's SDPA: two full passes (it runs at batch size 1; ``--batch-size 1``
times the products at its shapes). Nothing else (norms, rotary,
statistics, masks, solves, checkpoints) is counted, so the real times lie above these floors.

The floors are set against llm-compressor's Wanda times: from bench/results/results.json, or with ``--against`` from an
interleaved timing (``bench/bench_time.py --out NAME``: the median of its pairs).

    python bench/bench_floor.py            # B = 4, T = 512, 64 windows, 30 blocks
    python bench/bench_floor.py --against bench/results/timing-wanda.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from podar.engine.attention import causal_attention_chunked

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_of  # noqa: E402

# SmolLM2-135M: hidden 576, MLP 1536, 9 query heads and 3 key/value heads of 64, 30 blocks
HIDDEN, MLP, HEADS, KV_HEADS, HEAD_DIM, BLOCKS = 576, 1536, 9, 3, 64, 30
LINEARS = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
           "v_proj": (KV_HEADS * HEAD_DIM, HIDDEN), "o_proj": (HIDDEN, HIDDEN), "gate_proj": (MLP, HIDDEN),
           "up_proj": (MLP, HIDDEN), "down_proj": (HIDDEN, MLP)}  # (out, in)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--against", type=Path, default=Path(__file__).resolve().parent / "results" / "results.json",
                    help="llm-compressor's Wanda times: bench/results/results.json (default) or a bench_time.py JSON")
    args = ap.parse_args()
    if not args.against.is_file():
        ap.error(f"--against: no file '{args.against}'")
    torch.manual_seed(0)
    rows = args.batch_size * args.seq_len
    gemm = {}
    for name, (out_f, in_f) in LINEARS.items():
        x, w = torch.randn(rows, in_f), torch.randn(out_f, in_f)
        gemm[name] = best_of(lambda x=x, w=w: F.linear(x, w), args.repeats)
    q = torch.randn(args.batch_size, HEADS, args.seq_len, HEAD_DIM)
    k, v = (torch.randn(args.batch_size, KV_HEADS, args.seq_len, HEAD_DIM) for _ in range(2))
    attn_sdpa = best_of(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                        args.repeats)
    attn_chunked = best_of(lambda: causal_attention_chunked(q, k, v), args.repeats)

    calls = BLOCKS * -(-args.samples // args.batch_size)  # block forwards of one batch per pass
    flops = {n: 2 * rows * o * i for n, (o, i) in LINEARS.items()}
    print(f"one batch: {args.batch_size} × {args.seq_len} tokens; {calls} block-batch calls per pass\n")
    print("| product | time per call | GFLOP/s |\n| --- | --- | --- |")
    for n in LINEARS:
        print(f"| {n} | {gemm[n] * 1e3:.2f} ms | {flops[n] / gemm[n] / 1e9:.0f} |")
    print(f"| attention, SDPA causal | {attn_sdpa * 1e3:.2f} ms | |")
    print(f"| attention, chunked causal | {attn_chunked * 1e3:.2f} ms | |")

    full = sum(gemm.values())
    stats = full - gemm["down_proj"]
    attn = min(attn_sdpa, attn_chunked)
    floors = {"block (reference statistics)": (stats + full) * calls, "sublayer (site walk)": full * calls,
              "llm-compressor (two full passes)": 2 * full * calls}
    floors_attn = {"block (reference statistics)": (stats + full + 2 * attn) * calls,
                   "sublayer (site walk)": (full + attn) * calls,
                   "llm-compressor (two full passes)": 2 * (full + attn_sdpa) * calls}
    llmc = llmc_wanda_times(args.against)
    if not llmc:
        ap.error(f"--against: '{args.against}' holds no llm-compressor Wanda time")
    print(f"\nllm-compressor's Wanda times from {args.against.name}: "
          + ", ".join(f"{p} {t:.1f} s" for p, t in llmc.items()))
    print("\n| mode | products only | products + attention |"
          + "".join(f" half of llm-c Wanda {p} |" for p in llmc))
    print("| --- | --- | --- |" + " --- |" * len(llmc))
    for mode in floors:
        print(f"| {mode} | {floors[mode]:.1f} s | {floors_attn[mode]:.1f} s |"
              + "".join(f" {0.5 * t:.1f} s |" for t in llmc.values()))


def llmc_wanda_times(path: Path) -> dict[str, float]:
    """{pattern: llm-compressor's Wanda time (s)} from bench/results.json rows or bench_time.py rows (median)."""
    out = {}
    for r in json.loads(path.read_text()):
        if r.get("method") != "wanda":
            continue
        if "llmc_s" in r:  # bench_time.py: one row per case, every pair's time
            out[r["pattern"]] = statistics.median(r["llmc_s"])
        elif r.get("tool") == "llm-compressor":
            out[r["pattern"]] = r["prune_s"]
    return out


if __name__ == "__main__":
    main()
