"""Where a podar run reaches its peak memory: the bench's set-up (SmolLM2-135M fp32, 64 × 512 calibration
windows, seed 0) stepped one stage at a time, printing the peak (VmHWM) and current (VmRSS) resident memory of
this process whenever the peak grew by more than 5 MiB, with the stage (and layer group) whose handler grew it,
and how much of the resident memory is anonymous (activations, pruned weights) and file-backed (the model's
weights mapped from its safetensors file, shared libraries). Groups of the site walk: 4 per block, group % 4 =
0 q/k/v, 1 o_proj, 2 gate/up, 3 down_proj.

    python bench/memory_trace.py --method sparsegpt --pattern 2:4
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def status_mb(field: str) -> int:
    """A /proc/self/status memory field (VmHWM, VmRSS, RssAnon, RssFile) in whole MiB."""
    return int(common.status_mib(field))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="sparsegpt", choices=["wanda", "sparsegpt"])
    ap.add_argument("--pattern", default="2:4", choices=["unstructured", "2:4"])
    ap.add_argument("--batch-size", type=int, default=4)
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from podar import Pipeline, PruningStage

    common.prepare()
    model = AutoModelForCausalLM.from_pretrained(str(common.MODEL_DIR), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(common.MODEL_DIR))
    print(f"model loaded: peak {status_mb('VmHWM')} MiB, resident {status_mb('VmRSS')} MiB "
          f"(anonymous {status_mb('RssAnon')}, file {status_mb('RssFile')})")
    cfg = common.podar_config(args.method, args.pattern, batch_size=args.batch_size)
    run_dir = Path(tempfile.mkdtemp(prefix="podar-memtrace-"))
    try:
        pipe = Pipeline(cfg, run_dir=run_dir / "run", model=model, tokenizer=tok, progress=False)
        last = status_mb("VmHWM")
        step = 0
        while pipe.stage is not PruningStage.FINE_TUNING and not pipe.stage.is_terminal():
            pipe.step()  # enters the next stage, whose handler runs
            step += 1
            peak = status_mb("VmHWM")
            if peak > last + 5:
                group = pipe.context.state.group_index
                print(f"step {step} ({pipe.stage.value}, group {group}): peak {peak} MiB, "
                      f"resident {status_mb('VmRSS')} MiB (anonymous {status_mb('RssAnon')}, "
                      f"file {status_mb('RssFile')})")
                last = peak
        print(f"end of pruning: peak {status_mb('VmHWM')} MiB")
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
