"""Structured pruning (issue 30) on SmolLM2-135M: blocks, MLP channels and heads removed, then recovered by
distillation from the dense model within a fine-tuning budget; the export against the dense model in transformers.

Per setting: parameters (all, and without the embedding), the export's size, perplexity on WikiText-2 test and on a
text of another domain (``bench/other_text.py``) right after pruning and after recovery, and the fine-tuning's
seconds. Then prefill (one 512-token window) and decode (64 tokens, KV cache, greedy) tokens/s of each export and
of the dense model in transformers (float32, ``--threads`` threads), in rounds where the dense and the pruned model
take turns at every forward (``interleaved``); the ratio of each round, and their median.

    python bench/bench_structure.py [--steps 220] [--settings depth mlp combo] [--out structure]

Writes bench/results/NAME.json and .md after every setting (a long run's figures so far).
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

OTHER = HERE / "data" / "stdlib-docstrings.txt"

SETTINGS = {  # name → structure section
    "depth": {"depth": 6},  # 6 of 30 blocks (−20%)
    "mlp": {"mlp": 0.25},  # 1,536 → 1,152 channels
    "combo": {"depth": 4, "mlp": 0.125, "heads": 3, "heads_unit": "query_per_group"},  # −26.9% non-embedding
    "depth-mlp": {"depth": 5, "mlp": 0.125},  # −24.5% non-embedding, no heads removed
    "depth6-mlp": {"depth": 6, "mlp": 0.125},  # 24 blocks, 1,344 channels: −27.5% non-embedding
    "depth6-mlp-iter": {"depth": 6, "mlp": 0.125, "depth_mode": "iterative"},  # the blocks chosen one at a time
    "depth-mlp27": {"depth": 5, "mlp": 1 / 6},  # 25 blocks, 1,280 channels: −27.1% non-embedding
    "depth-mlp26": {"depth": 5, "mlp": 224 / 1536, "alignment": 32},  # 25 blocks, 1,312 channels: −25.8%
    "depth6-mlp25": {"depth": 6, "mlp": 128 / 1536},  # 24 blocks, 1,408 channels: −25.0% non-embedding
    "depth7-mlp25": {"depth": 7, "mlp": 64 / 1536},  # 23 blocks, 1,472 channels: −25.7% non-embedding
    "heads": {"heads": 3, "heads_unit": "query_per_group"},  # 9 → 6 query heads, 3 KV heads kept
    # hidden 576 → 504 (a multiple of 8 and of the 9 heads; the tied head too), 5 of 30 blocks: −27.1% non-embedding
    "depth-hidden": {"depth": 5, "hidden": 0.125, "alignment": 8},
}
# each width setting also with FLAP's bias compensation (NAME+bias), and with it FLAP's fluctuation ranking (NAME+flap)
_WIDTH = [(name, s) for name, s in SETTINGS.items() if "mlp" in s or "heads" in s]
SETTINGS.update({f"{name}+bias": {**s, "bias_compensation": True} for name, s in _WIDTH})
SETTINGS.update({f"{name}+flap": {**s, "bias_compensation": True, "channel_score": "fluctuation"}
                 for name, s in _WIDTH})


def config(structure: dict, *, finetune: dict | None, windows: int):
    from podar import (
        CalibrationConfig,
        EvaluationConfig,
        FineTuneConfig,
        PruningConfig,
        QualityGates,
        StructureConfig,
    )

    return PruningConfig(
        target_sparsity=0.0, structure=StructureConfig(**structure),
        calibration=CalibrationConfig(num_samples=32, sequence_length=512),
        evaluation=EvaluationConfig(dataset="wikitext2", extra_datasets=(str(OTHER),), sequence_length=512,
                                    max_windows=windows, gates=QualityGates(max_perplexity_increase_pct=None)),
        finetune=FineTuneConfig(enabled=finetune is not None, **(finetune or {})),
    )


def parameters(model) -> tuple[int, int]:
    """(all parameters, those outside the embedding and the tied head)."""
    seen = {id(p): (n, p) for n, p in model.named_parameters()}
    total = sum(p.numel() for _, p in seen.values())
    embedding = model.get_input_embeddings().weight.numel()
    return total, total - embedding


def run_one(name: str, cfg, work: Path, keep: bool = False) -> dict:
    from podar import Pipeline

    started = time.perf_counter()
    pipe = Pipeline(cfg, run_dir=work / name, progress=False)
    result = pipe.run()
    if not result.ok:
        raise SystemExit(f"{name}: {result.failure}")
    ev = result.metrics["evaluating"]
    total, body = parameters(pipe.context.model)
    export = work / name / "export"
    parts = [r for r in result.results if r.stage == "fine_tuning" and not r.metrics.get("skipped")]
    row = {"run": name, "wall_s": round(time.perf_counter() - started, 1), "parameters": total,
           "non_embedding_parameters": body,
           "export_bytes": sum(p.stat().st_size for p in export.glob("*.safetensors")),
           "ppl_wikitext2": ev["pruned_ppl"], "dense_ppl_wikitext2": ev["dense_ppl"],
           "ppl_other": ev[f"{OTHER}.pruned_ppl"], "dense_ppl_other": ev[f"{OTHER}.dense_ppl"],
           "export": str(export)}
    if parts:
        row.update(finetune_s=round(sum(r.duration_s for r in parts), 1),
                   steps=sum(r.metrics["steps"] for r in parts),
                   tokens_per_s=round(sum(r.metrics["tokens_per_s"] for r in parts) / len(parts), 1),
                   autocast=parts[0].metrics["autocast"])
    if not keep:
        common.tidy_run(work / name, keep=("export",))  # the export is timed afterwards
    print(json.dumps(row), flush=True)
    return row


def dense_folder(work: Path) -> Path:
    """The dense SmolLM2-135M as a transformers folder (podar's loader, saved once)."""
    folder = work / "dense-hf"
    if not (folder / "config.json").is_file():
        from podar import load_model
        from podar.schemas.config import ModelSourceConfig

        model, tokenizer = load_model(ModelSourceConfig(), progress=False)
        model.save_pretrained(folder)
    return folder


def interleaved(models: list, prompt, new_tokens: int) -> list[tuple[float, float]]:
    """(prefill tokens/s, decode tokens/s) of each model on one window, the models taking turns at every step: the
    prompt in one forward (model 1, model 2, …; after one untimed pass of each), then greedy single-token steps on
    each model's KV cache, one model's step after the other's. A machine that slows down for a second slows every
    model alike, so their ratio holds where back-to-back 64-token runs differ by ±15% on this shared CPU."""
    import torch

    prefill = [0.0] * len(models)
    decode = [0.0] * len(models)
    state = []
    with torch.no_grad():
        for model in models:  # untimed: each model's activations allocated (and freed) once before timing
            model(input_ids=prompt, use_cache=True)
        for i, model in enumerate(models):
            t0 = time.perf_counter()
            out = model(input_ids=prompt, use_cache=True)
            prefill[i] = time.perf_counter() - t0
            state.append((out.cache, out.logits[:, -1:].argmax(-1)))
        for _ in range(new_tokens):
            for i, model in enumerate(models):
                cache, token = state[i]
                t0 = time.perf_counter()
                out = model(input_ids=token, cache=cache, use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
                decode[i] += time.perf_counter() - t0
                state[i] = (out.cache, token)
    return [(prompt.shape[1] / p, new_tokens / d) for p, d in zip(prefill, decode, strict=True)]


def speed(folders: dict[str, Path], rounds: int, threads: int, prompt_len: int, new_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    models = {n: AutoModelForCausalLM.from_pretrained(f, dtype=torch.float32).eval() for n, f in folders.items()}
    prompt = torch.randint(100, 40000, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    interleaved(list(models.values()), prompt[:, :64], 4)  # warm-up
    names = [n for n in models if n != "dense"]
    figures: dict[str, dict[str, list[float]]] = {n: {"prefill": [], "decode": []} for n in models}
    ratios: dict[str, dict[str, list[float]]] = {n: {"prefill": [], "decode": []} for n in names}
    for _ in range(rounds):
        for name in names:  # the dense model and each pruned one taking turns, step by step
            (pd, dd), (pp, dp) = interleaved([models["dense"], models[name]], prompt, new_tokens)
            for who, (p, d) in (("dense", (pd, dd)), (name, (pp, dp))):
                figures[who]["prefill"].append(p)
                figures[who]["decode"].append(d)
            ratios[name]["prefill"].append(pp / pd)
            ratios[name]["decode"].append(dp / dd)
    out = {n: {"prefill_tok_s": statistics.median(f["prefill"]), "decode_tok_s": statistics.median(f["decode"])}
           for n, f in figures.items()}
    for name in names:
        out[name].update(prefill_ratio=statistics.median(ratios[name]["prefill"]),
                         decode_ratio=statistics.median(ratios[name]["decode"]),
                         prefill_ratios=[round(x, 3) for x in ratios[name]["prefill"]],
                         decode_ratios=[round(x, 3) for x in ratios[name]["decode"]])
    return out


def _ratio(speed: dict, key: str) -> str:
    return f"{speed[key]:.2f}" if key in speed else "—"  # not measured (--rounds 0)


def write(rows: list[dict], speeds: dict, args: argparse.Namespace) -> None:
    out = {"command": "python bench/bench_structure.py " + " ".join(sys.argv[1:]),
           "args": vars(args) | {"work": str(args.work)}, "settings": SETTINGS, "rows": rows, "speed": speeds}
    (common.RESULTS / f"{args.out}.json").write_text(json.dumps(out, indent=1))
    lines = ["| setting | parameters | non-embedding | export MB | fine-tune s | WikiText-2 ppl | other-domain ppl "
             "| prefill × dense | decode × dense |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    dense = next((r for r in rows), None)
    if dense is not None:
        lines.append(f"| dense | — | — | — | — | {dense['dense_ppl_wikitext2']:.2f} | {dense['dense_ppl_other']:.2f} "
                     "| 1.00 | 1.00 |")
    for r in rows:
        s = speeds.get(r["run"].removesuffix("-pruned").removesuffix("-recovered"), {})
        lines.append(f"| {r['run']} | {r['parameters']:,} | {r['non_embedding_parameters']:,} "
                     f"| {r['export_bytes'] / 1e6:.1f} | {r.get('finetune_s', 0)} | {r['ppl_wikitext2']:.2f} "
                     f"| {r['ppl_other']:.2f} | {_ratio(s, 'prefill_ratio')} | {_ratio(s, 'decode_ratio')} |")
    if speeds.get("dense"):
        lines.append("")
        lines.append(f"Dense in transformers: prefill {speeds['dense']['prefill_tok_s']:.0f} tok/s, decode "
                     f"{speeds['dense']['decode_tok_s']:.1f} tok/s ({args.threads} threads, float32, median of "
                     f"{args.rounds} interleaved rounds).")
    (common.RESULTS / f"{args.out}.md").write_text(f"`{out['command']}`\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--steps", type=int, default=220, help="fine-tuning steps of --seq tokens (0: no recovery)")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--windows", type=int, default=16, help="evaluation windows of 512 tokens per text")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved speed rounds (0: speed not measured)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--work", type=Path, default=Path("/tmp/podar-structure"))
    ap.add_argument("--out", default="structure")
    ap.add_argument("--recovered-only", action="store_true", help="skip the runs without recovery")
    ap.add_argument("--keep-runs", action="store_true", help="keep each run folder whole (default: only its export)")
    ap.add_argument("--autocast", default="auto", choices=["auto", "off", "bfloat16"], help="finetune.autocast")
    args = ap.parse_args()
    rows: list[dict] = []
    speeds: dict = {}
    ft = dict(steps=args.steps, batch_size=1, sequence_length=args.seq, learning_rate=args.lr, loss="kd",
              autocast=args.autocast, checkpoint_every=max(args.steps // 2, 1), eval_every=max(args.steps // 4, 1))
    for name in args.settings:
        if not args.recovered_only:
            rows.append(run_one(f"{name}-pruned", config(SETTINGS[name], finetune=None, windows=args.windows),
                                args.work, args.keep_runs))
            write(rows, speeds, args)
        if args.steps:
            rows.append(run_one(f"{name}-recovered", config(SETTINGS[name], finetune=ft, windows=args.windows),
                                args.work, args.keep_runs))
            write(rows, speeds, args)
    if not args.rounds:
        return
    folders = {"dense": dense_folder(args.work)}
    for name in args.settings:
        run = f"{name}-recovered" if args.steps else f"{name}-pruned"
        folders[name] = args.work / run / "export"
    speeds = speed(folders, args.rounds, args.threads, args.prompt, args.new_tokens)
    write(rows, speeds, args)


if __name__ == "__main__":
    main()
