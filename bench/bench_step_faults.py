"""Where a fine-tuning step's time goes: wall, user and system CPU seconds and minor page faults of each training
step (``stages.finetune._accumulate``: the teacher's forward, the student's forward and backward) and each
optimizer step (``_apply``), with ``runtime.keep_freed_memory`` on and off, on SmolLM2-135M structurally pruned
(``--setting``, a ``bench_structure.py`` setting; distillation, the teacher on the fly, one 512-token window a step).

    python bench/bench_step_faults.py [--steps 6] [--setting depth-mlp27] [--out step-faults]

Writes bench/results/NAME.json and .md.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_structure  # noqa: E402
import common  # noqa: E402


def _usage() -> tuple[float, float, float, int]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), r.ru_utime, r.ru_stime, r.ru_minflt


def profile(setting: str, steps: int, keep: bool, work: Path) -> list[dict]:
    from podar import Pipeline
    from podar.stages import finetune

    rows: list[dict] = []
    real = {"accumulate": finetune._accumulate, "apply": finetune._apply}

    def timed(kind):
        def wrapper(*a, **k):
            before = _usage()
            out = real[kind](*a, **k)
            after = _usage()
            rows.append({"part": kind, **{name: round(y - x, 3) for name, x, y in
                                          zip(("wall_s", "user_s", "system_s", "minor_faults"), before, after,
                                              strict=True)}})
            return out
        return wrapper

    ft = dict(steps=steps, batch_size=1, sequence_length=512, learning_rate=3e-4, loss="kd", checkpoint_every=steps,
              eval_every=0)
    cfg = bench_structure.config(bench_structure.SETTINGS[setting], finetune=ft, windows=1)
    cfg = cfg.with_evaluation(cfg.evaluation.model_copy(update={"enabled": False}))
    cfg = cfg.with_overrides({"runtime.keep_freed_memory": keep})
    run_dir = work / f"keep-{keep}"
    shutil.rmtree(run_dir, ignore_errors=True)
    finetune._accumulate, finetune._apply = timed("accumulate"), timed("apply")
    try:
        assert Pipeline(cfg, run_dir=run_dir, progress=False).run().ok
    finally:
        finetune._accumulate, finetune._apply = real["accumulate"], real["apply"]
        shutil.rmtree(run_dir, ignore_errors=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--setting", default="depth-mlp27", choices=list(bench_structure.SETTINGS))
    ap.add_argument("--work", type=Path, default=Path("/tmp/podar-step-faults"))
    ap.add_argument("--out", default="step-faults")
    args = ap.parse_args()
    out: dict = {"command": " ".join(["python bench/bench_step_faults.py", *sys.argv[1:]]), "runs": {}}
    lines = []
    for keep in (False, True):
        rows = profile(args.setting, args.steps, keep, args.work)
        steady = [r for r in rows if r["part"] == "accumulate"][2:]  # the first two steps grow the heap
        summary = {k: round(statistics.median(r[k] for r in steady), 3)
                   for k in ("wall_s", "user_s", "system_s", "minor_faults")}
        out["runs"][f"keep_freed_memory={keep}"] = {"steps": rows, "median_after_two": summary}
        lines.append(f"| {keep} | {summary['wall_s']} | {summary['user_s']} | {summary['system_s']} | "
                     f"{int(summary['minor_faults']):,} |")
    (common.RESULTS / f"{args.out}.json").write_text(json.dumps(out, indent=1))
    (common.RESULTS / f"{args.out}.md").write_text(
        f"`{out['command']}`\n\nA training step (teacher forward, student forward and backward) of `{args.setting}`, "
        f"median of steps 3..{args.steps}:\n\n| keep_freed_memory | wall s | user CPU s | system CPU s | minor page "
        "faults |\n| --- | --- | --- | --- | --- |\n" + "\n".join(lines) + "\n")
    print(json.dumps({k: v["median_after_two"] for k, v in out["runs"].items()}))


if __name__ == "__main__":
    main()
