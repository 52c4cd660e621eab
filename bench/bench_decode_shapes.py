"""Decode and prefill speed of SmolLM2-135M's shape with fewer blocks and MLP channels, against the dense shape, in
transformers on this CPU — before any pruning or training: the speed of a dense forward depends on the shapes, not on
the values, so this says which structured cut (issue 30) can reach a decode target, and spends no recovery budget.

Each shape is SmolLM2-135M's config (read from podar's loader) with ``num_hidden_layers``, ``intermediate_size`` and
optionally ``num_attention_heads`` and ``hidden_size`` changed (heads keep their 64 channels, KV heads their count),
randomly initialised in ``--dtype`` (float32 as the exports). Timing by ``bench_structure.interleaved``: per round a
512-token prompt in one forward, then 64 greedy single-token steps on the KV cache, every model (the dense shape
first) taking its turn at each step, so a slow second of the machine slows them alike; the ratio to the dense shape
per round, and the median.

    python bench/bench_decode_shapes.py [--rounds 9] [--shapes 25x1312 24x1408 ...] [--out decode-shapes]
    python bench/bench_decode_shapes.py --profile      # where a dense decoded token's time goes
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
from bench_structure import interleaved, parameters  # noqa: E402

DEFAULT_SHAPES = ["25x1344", "25x1312", "25x1280", "24x1408", "24x1344", "23x1536"]


def parse_shape(name: str, base) -> dict[str, int]:
    """BLOCKSxMLP[xQUERY_HEADS[xHIDDEN]] (e.g. 25x1312, 26x1344x6, 25x1536x9x504) → its dimensions; what is not
    given is the base config's."""
    dims = [int(x) for x in name.split("x")]
    if not 2 <= len(dims) <= 4:
        raise SystemExit(f"shape {name!r}: BLOCKSxMLP[xQUERY_HEADS[xHIDDEN]]")
    dims += [base.num_attention_heads, base.hidden_size][len(dims) - 2:]
    return dict(zip(("blocks", "mlp", "heads", "hidden"), dims, strict=True))


def profile(model, args: argparse.Namespace) -> None:
    """Where a decoded token of ``model`` spends its time: the operators under torch.profiler over ``--new-tokens``
    steps on a ``--prompt``-token KV cache, and the LM head's matrix-vector product alone; to
    bench/results/OUT-profile.md."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    prompt = torch.randint(100, 40000, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True)
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        for _ in range(4):  # warm-up
            out = model(input_ids=token, cache=cache, use_cache=True)
            cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.new_tokens):
                out = model(input_ids=token, cache=cache, use_cache=True)
                cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        head = model.get_output_embeddings().weight
        x = torch.randn(1, head.shape[1], dtype=head.dtype)
        t0 = time.perf_counter()
        for _ in range(args.new_tokens):
            torch.nn.functional.linear(x, head)
        head_ms = 1000 * (time.perf_counter() - t0) / args.new_tokens
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total_us = sum(e.self_cpu_time_total for e in events)
    lines = [f"`python bench/bench_decode_shapes.py {' '.join(sys.argv[1:])}`", "",
             f"A dense decoded token ({model.config.num_hidden_layers} blocks, {args.prompt}-token cache, "
             f"{args.dtype}, {args.threads} threads): {total_us / 1000 / args.new_tokens:.1f} ms of operator time "
             f"under the profiler; the LM head's {tuple(head.shape)} matrix-vector product alone {head_ms:.1f} ms.",
             "", "| operator | ms a token | share | calls a token |", "| --- | --- | --- | --- |"]
    for e in events[:12]:
        lines.append(f"| `{e.key}` | {e.self_cpu_time_total / 1000 / args.new_tokens:.2f} "
                     f"| {100 * e.self_cpu_time_total / total_us:.1f}% | {e.count / args.new_tokens:.0f} |")
    (common.RESULTS / f"{args.out}-profile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="BLOCKSxMLP[xQUERY_HEADS[xHIDDEN]] each")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and compute")
    ap.add_argument("--out", default="decode-shapes")
    ap.add_argument("--profile", action="store_true",
                    help="only where a dense decoded token's time goes (torch.profiler, --new-tokens steps)")
    args = ap.parse_args()
    if args.rounds < 2 and not args.profile:
        raise SystemExit(f"--rounds {args.rounds}: at least 2 (the table gives the rounds' quartiles)")

    import torch
    from transformers import AutoModelForCausalLM

    from podar import load_model
    from podar.schemas.config import ModelSourceConfig

    torch.set_num_threads(args.threads)
    dense_model, _ = load_model(ModelSourceConfig(), progress=False)
    base = dense_model.config
    del dense_model
    torch.manual_seed(0)
    if args.profile:
        profile(AutoModelForCausalLM.from_config(base, dtype=getattr(torch, args.dtype)).eval(), args)
        return
    models, sizes = {}, {}
    for name in ["dense", *args.shapes]:
        cfg = base.__class__.from_dict(base.to_dict())
        if name != "dense":
            dims = parse_shape(name, base)
            cfg.head_dim = base.hidden_size // base.num_attention_heads  # heads keep their width
            cfg.num_hidden_layers, cfg.intermediate_size = dims["blocks"], dims["mlp"]
            cfg.num_attention_heads, cfg.hidden_size = dims["heads"], dims["hidden"]
            if getattr(cfg, "layer_types", None):
                cfg.layer_types = cfg.layer_types[:dims["blocks"]]
        models[name] = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, args.dtype)).eval()
        sizes[name] = parameters(models[name])[1]
    prompt = torch.randint(100, 40000, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    interleaved(list(models.values()), prompt[:, :64], 4)  # warm-up
    ratios = {n: {"prefill": [], "decode": []} for n in args.shapes}
    dense_decode = []
    for r in range(args.rounds):
        (pd, dd), *rest = interleaved([models["dense"], *(models[n] for n in args.shapes)], prompt, args.new_tokens)
        dense_decode.append(dd)
        for name, (pp, dp) in zip(args.shapes, rest, strict=True):
            ratios[name]["prefill"].append(round(pp / pd, 4))
            ratios[name]["decode"].append(round(dp / dd, 4))
        print(f"round {r + 1}: " + ", ".join(f"{n} {ratios[n]['decode'][-1]:.3f}" for n in args.shapes), flush=True)
    rows = [{"shape": n, **parse_shape(n, base),
             "non_embedding_removed_pct": round(100 * (1 - sizes[n] / sizes["dense"]), 2),
             "decode_ratio": statistics.median(ratios[n]["decode"]),
             "decode_ratio_quartiles": [round(q, 3) for q in statistics.quantiles(ratios[n]["decode"], n=4)],
             "prefill_ratio": statistics.median(ratios[n]["prefill"]),
             **{f"{k}_ratios": v for k, v in ratios[n].items()}}
            for n in args.shapes]
    out = {"command": "python bench/bench_decode_shapes.py " + " ".join(sys.argv[1:]), "args": vars(args),
           "dense_non_embedding": sizes["dense"], "dense_decode_tok_s": statistics.median(dense_decode), "rows": rows}
    (common.RESULTS / f"{args.out}.json").write_text(json.dumps(out, indent=1) + "\n")
    lines = [f"`{out['command']}`", "",
             "| blocks × MLP channels × query heads × hidden | non-embedding removed | decode × dense (median) "
             "| quartiles | prefill × dense |",
             "| --- | --- | --- | --- | --- |"]
    for row in rows:
        q = row["decode_ratio_quartiles"]
        lines.append(f"| {row['blocks']} × {row['mlp']} × {row['heads']} × {row['hidden']} "
                     f"| {row['non_embedding_removed_pct']:.1f}% "
                     f"| {row['decode_ratio']:.3f} | {q[0]:.3f}–{q[2]:.3f} | {row['prefill_ratio']:.3f} |")
    lines += ["", f"Dense ({base.num_hidden_layers} × {base.intermediate_size} × {base.num_attention_heads} × "
              f"{base.hidden_size}): decode {out['dense_decode_tok_s']:.1f} tok/s median ({args.threads} threads, "
              f"{args.dtype}, {args.rounds} interleaved rounds, random weights of each shape)."]
    (common.RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
