"""Where two runs' masks differ, block by block: a podar run folder's masks against llm-compressor's pruned
weights (zeros) for the same method, pattern and calibration windows.

    .venv-llmc/bin/python bench/llmc_one.py --method wanda --pattern 2:4 --model bench/.cache/smollm2-135m-dense \\
        --calibration bench/.cache/calibration_ids_seed1.safetensors --out /tmp/llmc.safetensors
    python bench/compare_masks.py bench/.cache/run-wanda-24 /tmp/llmc.safetensors

Differences that start at a few weights in the first block and grow with depth are float rounding compounding
(a near-tie decided differently changes the next block's inputs); differences that are large from block 0 on
would be a different algorithm.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from safetensors.torch import load_file

from podar import run_masks


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("weights", type=Path, help="llm-compressor's pruned Linear weights (llmc_one.py --out)")
    args = ap.parse_args()
    masks, weights = run_masks(args.run_dir), load_file(str(args.weights))
    by_block: dict[int, list[int]] = {}
    for name, mask in masks.items():
        block = int(name.split(".")[2])  # model.layers.<i>.…
        differ = int(((weights[name] != 0) != mask).sum())
        acc = by_block.setdefault(block, [0, 0])
        acc[0] += differ
        acc[1] += mask.numel()
    total = [sum(v[0] for v in by_block.values()), sum(v[1] for v in by_block.values())]
    print("| block | masks differing |\n| --- | --- |")
    for block in sorted(by_block):
        d, n = by_block[block]
        print(f"| {block} | {d / n:.4%} |")
    print(f"| all | {total[0] / total[1]:.4%} |")


if __name__ == "__main__":
    main()
