"""One llm-compressor run for the benchmark, in its own virtual environment (.venv-llmc). Prints one JSON line.

Gets exactly podar's inputs: the same dense model folder and the same calibration token windows; the pruned
model is saved and evaluated by the parent with podar's evaluator on the same windows.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from safetensors.torch import load_file


def peak_rss_mb() -> float:
    """Peak resident memory (VmHWM, MiB) of this process alone (see bench/common.py)."""
    for line in open("/proc/self/status").read().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", required=True, choices=["wanda", "sparsegpt"])
    ap.add_argument("--pattern", required=True, choices=["unstructured", "2:4"])
    ap.add_argument("--model", required=True)
    ap.add_argument("--calibration", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--sparsity", type=float, default=0.5, help="unstructured: the fraction pruned")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="the dtype the dense model is loaded in (its forwards run in it)")
    args = ap.parse_args()

    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    ids = load_file(args.calibration)["input_ids"]  # (N, T)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    structure = "2:4" if args.pattern == "2:4" else "0:0"
    sparsity = 0.5 if args.pattern == "2:4" else args.sparsity
    common = {"sparsity": sparsity, "mask_structure": structure, "targets": ["Linear"], "ignore": ["re:.*lm_head"]}
    recipe = WandaPruningModifier(**common) if args.method == "wanda" else SparseGPTModifier(**common)
    started = time.perf_counter()
    oneshot(model=model, tokenizer=tok, dataset=ds, recipe=recipe, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False, batch_size=args.batch_size)
    prune_s = time.perf_counter() - started
    peak = peak_rss_mb()
    from safetensors.torch import save_file

    weights = {n: m.weight.detach().contiguous() for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")}
    save_file(weights, args.out)
    print(json.dumps({"tool": "llm-compressor", "method": args.method, "pattern": args.pattern,
                      "batch_size": args.batch_size,
                      "prune_s": prune_s, "peak_rss_mb": peak}))


if __name__ == "__main__":
    main()
