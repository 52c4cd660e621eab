"""The optimizer step of fine-tuning: PyTorch's AdamW per-tensor loop against its fused kernel
(``stages.finetune.adamw``), on tensors shaped like SmolLM2-135M's trained parameters after structured pruning
(the 49,152 × 576 tied embedding and 24 blocks' 9 matrices), interleaved rounds, median seconds per step.

    python bench/bench_adamw.py [--rounds 5] [--out adamw]

Writes bench/results/NAME.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402


def main() -> None:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="adamw")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    shapes = [(49152, 576)] + [(576, 576), (192, 576), (192, 576), (576, 576), (1344, 576), (1344, 576),
                                (576, 1344), (576,), (576,)] * 24
    params = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    kinds = {"loop": {"foreach": False}, "fused": {"fused": True}}
    optimizers = {k: torch.optim.AdamW(params, lr=1e-5, **kw) for k, kw in kinds.items()}
    for opt in optimizers.values():
        opt.step()  # the moments allocated outside the timing
    seconds: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(args.rounds):
        for k, opt in optimizers.items():
            started = time.perf_counter()
            for _ in range(args.steps):
                opt.step()
            seconds[k].append((time.perf_counter() - started) / args.steps)
    n = sum(p.numel() for p in params)
    out = {"command": " ".join(["python bench/bench_adamw.py", *sys.argv[1:]]), "parameters": n,
           "median_s": {k: round(statistics.median(v), 4) for k, v in seconds.items()},
           "seconds": {k: [round(x, 4) for x in v] for k, v in seconds.items()}}
    out["fused_over_loop"] = round(out["median_s"]["fused"] / out["median_s"]["loop"], 3)
    (common.RESULTS / f"{args.out}.json").write_text(json.dumps(out, indent=1))
    (common.RESULTS / f"{args.out}.md").write_text(
        f"`{out['command']}`\n\nAdamW over {n:,} parameters ({args.threads} threads), median of {args.rounds} "
        f"interleaved rounds of {args.steps} steps: per-tensor loop {out['median_s']['loop']} s a step, fused "
        f"{out['median_s']['fused']} s ({out['fused_over_loop']}×).\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
