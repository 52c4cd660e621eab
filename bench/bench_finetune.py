"""Recovery by fine-tuning (issue 29): SmolLM2-135M pruned by Wanda 2:4, then fine-tuned with the same step
budget by distillation from the dense model (``kd``), by the plain next-token loss (``lm``), and — the yardstick —
the dense model fine-tuned alike (``lm``, the same layers, the same windows). Perplexity on WikiText-2 test and on
a text of another domain (the Python standard library's docstrings, ``bench/other_text.py``); the share of the gap
each closes: (ppl_pruned − ppl_after) / (ppl_pruned − ppl_dense_finetuned).

    python bench/bench_finetune.py [--steps 150] [--out finetune]

Also the time of a training step with the teacher on the fly against none (``--speed-pairs``: interleaved runs
of a few steps each, tokens/s of each). Writes bench/results/NAME.json and .md.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402

OTHER = HERE / "data" / "stdlib-docstrings.txt"


def config(*, sparsity: float, pattern: str, method: str, finetune: dict | None, windows: int,
           refit: float | None = None):
    """``refit``: reconstruction.enabled with this dampening (the kept weights refit after masking)."""
    from podar import (
        CalibrationConfig,
        EvaluationConfig,
        FineTuneConfig,
        PruningConfig,
        QualityGates,
        ReconstructionConfig,
        SparsityPatternConfig,
    )

    cfg = PruningConfig(
        method=method, target_sparsity=sparsity,
        pattern=SparsityPatternConfig.nm_2_4() if pattern == "2:4" else SparsityPatternConfig(),
        calibration=CalibrationConfig(num_samples=32, sequence_length=512),
        evaluation=EvaluationConfig(dataset="wikitext2", extra_datasets=(str(OTHER),), sequence_length=512,
                                    max_windows=windows, gates=QualityGates(max_perplexity_increase_pct=None)),
        finetune=FineTuneConfig(enabled=finetune is not None, **(finetune or {})),
        reconstruction=ReconstructionConfig(enabled=refit is not None, **({"dampening_frac": refit} if refit else {})),
    )
    return cfg


def run_one(name: str, cfg, work: Path, keep: bool = False) -> dict:
    from podar import Pipeline

    started = time.perf_counter()
    result = Pipeline(cfg, run_dir=work / name, progress=False).run()
    if not result.ok:
        raise SystemExit(f"{name}: {result.failure}")
    ev = result.metrics["evaluating"]
    parts = [r for r in result.results if r.stage == "fine_tuning" and not r.metrics.get("skipped")]
    row = {"variant": name, "wall_s": round(time.perf_counter() - started, 1),
           "ppl_wikitext2": ev["pruned_ppl"], "dense_ppl_wikitext2": ev["dense_ppl"],
           "ppl_other": ev[f"{OTHER}.pruned_ppl"], "dense_ppl_other": ev[f"{OTHER}.dense_ppl"]}
    if parts:
        row.update(finetune_s=round(sum(r.duration_s for r in parts), 1),
                   steps=sum(r.metrics["steps"] for r in parts),
                   tokens_per_s=round(sum(r.metrics["tokens_per_s"] for r in parts) / len(parts), 1),
                   val_loss=[x for r in parts for x in r.series.get("val_loss", [])],
                   val_kl=[x for r in parts for x in r.series.get("val_kl", [])],
                   first_loss=parts[0].metrics["first_loss"], last_loss=parts[-1].metrics["last_loss"],
                   autocast=parts[0].metrics["autocast"])
    if not keep:
        common.tidy_run(work / name)
    print(json.dumps(row), flush=True)
    return row


def speed_pairs(args: argparse.Namespace) -> None:
    """Tokens/s of a training step (forward, backward, AdamW) with the teacher on the fly (``kd``) against none
    (``lm``), interleaved: the pruned model of one run, ``--speed-pairs`` rounds of ``--speed-steps`` steps of each."""

    from podar import Pipeline
    from podar.stages import finetune

    cfg = config(sparsity=0.5, pattern="2:4", method="wanda", finetune=None, windows=2)
    cfg = cfg.with_evaluation(cfg.evaluation.model_copy(update={"enabled": False}))
    pipe = Pipeline(cfg, run_dir=args.work / "speed", progress=False)
    assert pipe.run().ok
    ctx = pipe.context
    params = {f"{n}.weight": m.weight for n, m in ctx.state.targets.items()}
    windows, _ = finetune.training_texts(ctx, args.speed_steps * args.batch)
    modes = [f"{loss}{amp}" for amp in ("", "+bf16") for loss in ("kd", "kd-cached", "lm")]
    seconds: dict[str, list[float]] = {m: [] for m in modes}
    ctx.config = cfg.with_finetune(cfg.finetune.model_copy(update={
        "enabled": True, "batch_size": args.batch, "sequence_length": args.seq}))
    started = time.perf_counter()
    cache = finetune.teacher_cache(ctx, windows)  # what a cached round computes once before its steps
    cache_s = time.perf_counter() - started
    for _ in range(args.speed_pairs):
        for mode in seconds:
            loss, _, amp = mode.partition("+")
            ctx.config = cfg.with_finetune(cfg.finetune.model_copy(update={
                "enabled": True, "loss": loss.split("-")[0], "batch_size": args.batch, "sequence_length": args.seq,
                "autocast": "bfloat16" if amp else "off"}))
            optimizer = finetune.adamw(list(params.values()), lr=1e-6)
            with finetune._training(ctx.model, list(params.values())):
                started = time.perf_counter()
                for i in range(args.speed_steps):
                    finetune._accumulate(ctx, ctx.model, windows, i, i, cache if "cached" in loss else None)
                    finetune._apply(ctx, optimizer, params, {n: ctx.state.masks[n] for n in ctx.state.targets}, i)
                seconds[mode].append(time.perf_counter() - started)
    tokens = args.speed_steps * args.batch * args.seq
    rows = {k: {"seconds": [round(x, 2) for x in v], "tokens_per_s": round(tokens / min(v), 1)}
            for k, v in seconds.items()}
    out = {"command": "python bench/bench_finetune.py " + " ".join(sys.argv[1:]), "rows": rows,
           "kd_over_lm_time": round(min(seconds["kd"]) / min(seconds["lm"]), 3),
           "cached_over_lm_time": round(min(seconds["kd-cached"]) / min(seconds["lm"]), 3),
           "cache_s_per_window": round(cache_s / windows.shape[0], 3),
           "bf16_over_fp32_time": {k: round(min(seconds[f"{k}+bf16"]) / min(seconds[k]), 3)
                                   for k in ("kd", "kd-cached", "lm")}}
    (common.RESULTS / f"{args.out}.json").write_text(json.dumps(out, indent=1))
    (common.RESULTS / f"{args.out}.md").write_text(
        f"`{out['command']}`\n\n| loss | tokens/s (best of {args.speed_pairs}) | seconds per round |\n"
        "| --- | --- | --- |\n" + "".join(f"| {k} | {v['tokens_per_s']} | {v['seconds']} |\n"
                                          for k, v in rows.items())
        + f"\nKD with the teacher on the fly takes {out['kd_over_lm_time']}× the time of an LM step, from the "
        f"cached top-k {out['cached_over_lm_time']}×; the cache costs {out['cache_s_per_window']} s per window, "
        "once per round. Under bfloat16 autocast a step takes "
        + ", ".join(f"{k} {v}×" for k, v in out["bf16_over_fp32_time"].items()) + " its float32 time.\n")
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--windows", type=int, default=16, help="evaluation windows of 512 tokens per text")
    ap.add_argument("--variants", nargs="+", default=["pruned", "kd", "lm", "dense-lm"],
                    help="pruned, kd, lm, kd-hidden (kd + the hidden-state term), dense-lm; refit, kd-refit, "
                         "lm-refit: Wanda 2:4 with its kept weights refit (reconstruction.enabled), then nothing, kd "
                         "or lm")
    ap.add_argument("--refit-dampening", type=float, default=0.1, help="*refit: reconstruction.dampening_frac")
    ap.add_argument("--baseline", help="the pruned and dense-lm rows not in --variants from bench/results/BASELINE.json"
                                       " (run with the same arguments), marked as such, instead of running them again")
    ap.add_argument("--hidden-weight", type=float, default=1.0, help="kd-hidden: finetune.hidden_weight")
    ap.add_argument("--work", type=Path, default=Path("/tmp/podar-finetune"))
    ap.add_argument("--out", default="finetune")
    ap.add_argument("--keep-runs", action="store_true", help="keep each run folder (default: removed after)")
    ap.add_argument("--speed-pairs", type=int, default=0, help="only the step-time comparison, this many rounds")
    ap.add_argument("--speed-steps", type=int, default=4)
    ap.add_argument("--autocast", default="auto", choices=["auto", "off", "bfloat16"], help="finetune.autocast")
    args = ap.parse_args()
    if args.speed_pairs:
        speed_pairs(args)
        return
    ft = dict(steps=args.steps, batch_size=args.batch, sequence_length=args.seq, learning_rate=args.lr,
              checkpoint_every=max(args.steps // 3, 1), eval_every=max(args.steps // 6, 1), autocast=args.autocast)
    wanda24 = functools.partial(config, sparsity=0.5, pattern="2:4", method="wanda", windows=args.windows)
    variants = {
        "pruned": wanda24(finetune=None),
        "kd": wanda24(finetune={**ft, "loss": "kd"}),
        "lm": wanda24(finetune={**ft, "loss": "lm"}),
        "kd-hidden": wanda24(finetune={**ft, "loss": "kd", "hidden_weight": args.hidden_weight}),
        "dense-lm": config(sparsity=0.0, pattern="unstructured", method="magnitude",
                           finetune={**ft, "loss": "lm"}, windows=args.windows),
        "refit": wanda24(finetune=None, refit=args.refit_dampening),
        "kd-refit": wanda24(finetune={**ft, "loss": "kd"}, refit=args.refit_dampening),
        "lm-refit": wanda24(finetune={**ft, "loss": "lm"}, refit=args.refit_dampening),
    }
    rows: list[dict] = []
    if args.baseline:  # the yardsticks of an earlier run with the same arguments, marked as such
        recorded = json.loads((common.RESULTS / f"{args.baseline}.json").read_text())
        keys = ("steps", "batch", "seq", "lr", "windows")
        if any(recorded["args"][k] != getattr(args, k) for k in keys):
            raise SystemExit(f"--baseline {args.baseline} ran with other arguments: "
                             f"{ {k: recorded['args'][k] for k in keys} }")
        rows = [{"from": args.baseline} | r for r in recorded["rows"]
                if r["variant"] in ("pruned", "dense-lm") and r["variant"] not in args.variants]
    for name in args.variants:  # the files are rewritten after each variant (a long run's figures so far)
        rows.append(run_one(name, variants[name], args.work, args.keep_runs))
        write(rows, args)


def write(rows: list[dict], args: argparse.Namespace) -> None:
    by = {r["variant"]: r for r in rows}
    if "pruned" in by and "dense-lm" in by:
        for r in rows:
            for text in ("wikitext2", "other"):
                gap = by["pruned"][f"ppl_{text}"] - by["dense-lm"][f"ppl_{text}"]
                closed = (by["pruned"][f"ppl_{text}"] - r[f"ppl_{text}"]) / gap if gap else None
                r[f"gap_closed_{text}"] = None if closed is None else round(closed, 3)
    out = {"command": "python bench/bench_finetune.py " + " ".join(sys.argv[1:]),
           "args": vars(args) | {"work": str(args.work)}, "rows": rows}
    (common.RESULTS / f"{args.out}.json").write_text(json.dumps(out, indent=1))
    lines = ["| variant | steps | fine-tune s | tokens/s | WikiText-2 ppl | gap closed | other-domain ppl "
             "| gap closed |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        name = r["variant"] + (f" ({r['from']})" if "from" in r else "")
        lines.append(f"| {name} | {r.get('steps', 0)} | {r.get('finetune_s', 0)} "
                     f"| {r.get('tokens_per_s', '—')} "
                     f"| {r['ppl_wikitext2']:.2f} | {r.get('gap_closed_wikitext2', '—')} | {r['ppl_other']:.2f} "
                     f"| {r.get('gap_closed_other', '—')} |")
    (common.RESULTS / f"{args.out}.md").write_text(f"`{out['command']}`\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
