"""The GPU check (issue 22): Wanda and SparseGPT at 50% on SmolLM2-135M and on a random-weight model of
Llama-2-7B's shape, timed to the end of pruning, with peak GPU memory; the 7B-shaped cases once with the whole
model on the GPU and once with its blocks offloaded (``runtime.offload: blocks``, one block on the GPU at a time,
so peak GPU memory should be about one block's working set plus embeddings, head and cached activations). One
process (a machine with several GPUs: run it again under ``torchrun --nproc_per_node N``; every rank prints, rank
0's line counts).

    python bench/gpu_check.py                    # on a GPU machine: all six cases, about 10 minutes on one H200
    python bench/gpu_check.py --smoke            # anywhere: the same code path on tiny shapes (tests run this)

Prints one JSON line per case and writes them to bench/results/gpu_check.json (or ``--out``). Time does not depend
on the weights' values, so the 7B-shaped model is randomly initialised (from a config: no download).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
# the 7B case: Llama-2-7B's shape (its vocabulary aside: podar's byte tokenizer, 259 ids)
LLAMA2_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32, "max_position_embeddings": 4096}
SMOKE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 512}


def case_config(model: str, method: str, samples: int, seq_len: int, device: str, offload: str):
    from podar import (
        CalibrationConfig,
        EvaluationConfig,
        FineTuneConfig,
        ModelSourceConfig,
        PruningConfig,
        RuntimeConfig,
    )

    if model == "smollm2-135m":
        source = ModelSourceConfig(kind="builtin", name="smollm2-135m", dtype="float32")
    else:
        shape = LLAMA2_7B if model == "llama2-7b-shape" else SMOKE
        source = ModelSourceConfig(kind="tiny", tiny={"arch": "llama", **shape, "tie_word_embeddings": False})
    return PruningConfig(method=method, target_sparsity=0.5, model=source, device=device,
                         calibration=CalibrationConfig(num_samples=samples, sequence_length=seq_len,
                                                       dataset="wikitext2-valid"),
                         finetune=FineTuneConfig(enabled=False), evaluation=EvaluationConfig(enabled=False),
                         runtime=RuntimeConfig(offload=offload))


def run_case(model: str, method: str, samples: int, seq_len: int, device: str, offload: str) -> dict:
    from podar import Pipeline, PruningStage

    cfg = case_config(model, method, samples, seq_len, device, offload)
    cuda = torch.cuda.is_available() and device != "cpu"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        pipe = Pipeline(cfg, run_dir=Path(tmp) / "run", progress=False)
        pipe.step()  # Idle → the first stage: the model is loaded and on its device
        loaded = time.perf_counter()
        while pipe.stage not in (PruningStage.FINE_TUNING, PruningStage.COMPLETE) and not pipe.stage.is_terminal():
            pipe.step()
        if pipe.stage is PruningStage.FAILED:
            raise RuntimeError(f"{model} {method}: {pipe.result().failure}")
        if cuda:
            torch.cuda.synchronize()
        done = time.perf_counter()
        n_params = sum(p.numel() for p in pipe.context.model.parameters())
        offloaded = pipe.context.runtime.offload is not None
        del pipe
        shutil.rmtree(Path(tmp) / "run", ignore_errors=True)
    return {"model": model, "method": method, "offloaded": offloaded, "samples": samples, "seq_len": seq_len,
            "params": n_params,
            "device": torch.cuda.get_device_name(0) if cuda else "cpu", "world_size": int(os.environ.get(
                "WORLD_SIZE", "1")), "load_s": loaded - started, "prune_s": done - loaded,
            "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, any device: the code path only")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--out", default=None, help="results file (default bench/results/gpu_check.json; smoke: none)")
    args = ap.parse_args()
    if args.smoke:
        cases = [("smoke", m, 4, 64, o) for o in ("off", "blocks") for m in ("wanda", "sparsegpt")]
    else:
        if not torch.cuda.is_available() and args.device != "cpu":
            sys.exit("no CUDA device: run on a GPU machine, or --smoke")
        cases = [("smollm2-135m", m, 128, 2048, "off") for m in ("wanda", "sparsegpt")]
        cases += [("llama2-7b-shape", m, 32, 2048, o) for o in ("off", "blocks") for m in ("wanda", "sparsegpt")]
    rows = []
    for model, method, samples, seq_len, offload in cases:
        rows.append(run_case(model, method, samples, seq_len, args.device, offload))
        print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out) if args.out else (None if args.smoke else RESULTS / "gpu_check.json")
    if out is not None:
        out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
