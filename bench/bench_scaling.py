"""Memory and disk against model size: random-weight Llama-shaped models written as safetensors folders, each
pruned by ``podar run`` (Wanda, 50%, block walk, bf16 calibration forwards) from that folder through every stage.

    python bench/bench_scaling.py --shapes 135m 1.7b 7b [--work DIR] [--out scaling]

Each shape's folder (config.json, the built-in SmolLM2 tokenizer, sharded float32 safetensors of N(0, 0.02)
weights; time does not depend on the values) is written once under ``--work`` and reused. The run is a child
process sampled every 0.2 s: peak resident memory (VmHWM, the kernel's own high-water mark), peak anonymous
memory (RssAnon: heap, activations, statistics, pruned weights not yet on disk) and peak file-backed memory
(RssFile: weight pages mapped from the model's files or scratch files, which the kernel can drop and read again),
the disk the run took at its peak (free space before minus the lowest seen, so unlinked scratch files count) and
the run folder's size at the end. Writes bench/results/NAME.json and .md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402

VOCAB = 49152  # the SmolLM2 tokenizer's (every model here is run with it: its ids fit any larger vocabulary)


@dataclass(frozen=True)
class Shape:
    """A model's shape: widths, depth, heads, vocabulary, family (llama, qwen2, gemma3) and its run's settings
    (calibration windows × tokens, evaluation windows; the same token count per window for both)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    tied: bool
    family: str = "llama"
    vocab: int = VOCAB
    head_dim: int | None = None
    samples: int = 8
    seq: int = 256
    eval_windows: int = 2
    eval_seq: int | None = None  # tokens per evaluation window (None: seq)
    folder: str | None = None  # the model folder's shape, when another shape's weights are reused


SHAPES = {
    "135m": Shape(576, 1536, 30, 9, 3, True),  # SmolLM2-135M
    "1.7b": Shape(2048, 8192, 24, 32, 32, True),  # SmolLM2-1.7B
    "7b-8": Shape(4096, 11008, 8, 32, 32, False),  # Llama-2-7B's blocks, 8 of them
    "7b": Shape(4096, 11008, 32, 32, 32, False),  # Llama-2-7B (its blocks; the SmolLM2 vocabulary)
    # real vocabularies at real window lengths (issue 28): two blocks of each, 16 × 2048 calibration tokens
    "qwen2-vocab": Shape(896, 4864, 2, 14, 2, True, family="qwen2", vocab=151936, samples=16, seq=2048,
                         eval_windows=4),  # Qwen2-0.5B's blocks and vocabulary
    # the cost table: podar's default calibration (128 × 2048) and evaluation (32 × 512), and a quick setting
    "135m-default": Shape(576, 1536, 30, 9, 3, True, samples=128, seq=2048, eval_windows=32, eval_seq=512,
                          folder="135m"),
    "135m-quick": Shape(576, 1536, 30, 9, 3, True, samples=16, seq=512, eval_windows=8, eval_seq=512,
                        folder="135m"),
    "1.7b-quick": Shape(2048, 8192, 24, 32, 32, True, samples=16, seq=512, eval_windows=8, eval_seq=512,
                        folder="1.7b"),
    # the real models of issue 28 at their full depth: Qwen2-0.5B and Gemma-3-270M, 16 × 2048 calibration tokens,
    # 8 evaluation windows of 2048
    "qwen2-0.5b": Shape(896, 4864, 24, 14, 2, True, family="qwen2", vocab=151936, samples=16, seq=2048,
                        eval_windows=8),
    "gemma3-270m": Shape(640, 2048, 18, 4, 1, True, family="gemma3", vocab=262144, head_dim=256, samples=16,
                         seq=2048, eval_windows=8),
    "gemma3-vocab": Shape(640, 2048, 2, 4, 1, True, family="gemma3", vocab=262144, head_dim=256, samples=16,
                          seq=2048, eval_windows=4),  # Gemma-3-270M's blocks (extra norms) and vocabulary
}


def model_config(shape: Shape):
    """The transformers config of ``shape`` (its family's class)."""
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config

    common = dict(hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_hidden_layers=shape.layers,
                  num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, vocab_size=shape.vocab,
                  max_position_embeddings=max(4096, shape.seq), tie_word_embeddings=shape.tied,
                  torch_dtype="float32")
    if shape.family == "qwen2":
        return Qwen2Config(**common, architectures=["Qwen2ForCausalLM"])
    if shape.family == "gemma3":
        return Gemma3TextConfig(**common, head_dim=shape.head_dim, architectures=["Gemma3ForCausalLM"])
    return LlamaConfig(**common, architectures=["LlamaForCausalLM"])


def write_model(folder: Path, shape: Shape, shard_bytes: int = 2 << 30) -> int:
    """Write the random model of ``shape`` into ``folder`` one shard at a time (never the whole model in memory);
    returns its float32 weight bytes. A folder whose ``.complete`` marker exists is reused."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from podar.engine.models import builtin_gguf_path

    if (folder / ".complete").exists():
        return int((folder / ".complete").read_text())
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    config = model_config(shape)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    names = {n: p.shape for n, p in skeleton.state_dict().items()}
    if shape.tied:
        names.pop("lm_head.weight", None)
    gen = torch.Generator().manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    size = total = 0
    weight_map: dict[str, str] = {}
    files: list[str] = []

    def flush() -> None:  # one shard in memory at a time
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        files.append(name)
        weight_map.update({k: name for k in shard})
        shard.clear()

    for name, dims in names.items():
        t = torch.ones(dims) if name.endswith("norm.weight") else torch.randn(dims, generator=gen) * 0.02
        if size and size + t.numel() * 4 > shard_bytes:
            flush()
            size = 0
        shard[name] = t
        size += t.numel() * 4
        total += t.numel() * 4
    flush()
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.save_pretrained(folder)
    gguf = builtin_gguf_path("smollm2-135m")
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(folder)
    (folder / ".complete").write_text(str(total))
    return total


def run_config(folder: Path, shape: Shape) -> str:
    """The run's config. Gemma-3 exports in float32: a random Gemma-3's logits are small (|max| about 6) and its
    bfloat16 weights move them by more than the export check's tolerance (10% of that), so podar refuses them."""
    batch = 8 if shape.seq <= 256 else 1
    gates = "gates: {max_perplexity_increase_pct: 1.0e9}"
    return f"""method: wanda
target_sparsity: 0.5
pattern: {{kind: unstructured}}
model: {{kind: hf, name: {folder}, dtype: float32}}
calibration: {{num_samples: {shape.samples}, sequence_length: {shape.seq}, batch_size: {batch}, walk: block}}
runtime: {{compute_dtype: bfloat16}}
evaluation: {{sequence_length: {shape.eval_seq or shape.seq}, max_windows: {shape.eval_windows}, {gates}}}
export: {{format: dense, dtype: {"float32" if shape.family == "gemma3" else "float16"}, verify_windows: 1}}
"""


def forward_seconds(folder: Path, shape: Shape) -> float:
    """Seconds of the forward passes Evaluating needs (dense and pruned: 2 × evaluation windows of ``shape.seq``
    tokens, whole logits), in a child process of their own, after one untimed forward that reads the weights from
    disk: what Evaluating's time compares with."""
    code = (f"import time, torch; from transformers import AutoModelForCausalLM; "
            f"m = AutoModelForCausalLM.from_pretrained({str(folder)!r}, dtype=torch.float32).eval(); "
            f"ids = torch.randint(0, {VOCAB}, (1, {shape.eval_seq or shape.seq}))\n"
            f"with torch.no_grad():\n    m(input_ids=ids, use_cache=False).logits\n    t = time.perf_counter()\n"
            f"    for _ in range({2 * shape.eval_windows}):\n"
            f"        m(input_ids=ids, use_cache=False).logits\nprint(time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return round(float(out.strip().splitlines()[-1]), 1)


def baseline_anon_mb() -> int:
    """RssAnon of a process that has imported what a run imports, before any model: the floor of every stage."""
    code = ("import podar, podar.cli, transformers, torch; from transformers import AutoModelForCausalLM; "
            "print([l for l in open('/proc/self/status') if l.startswith('RssAnon')][0].split()[1])")
    return round(int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                    check=True).stdout.strip()) / 1024)


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def measure(name: str, work: Path) -> dict:
    shape = SHAPES[name]
    folder = work / f"model-{shape.folder or name}"
    started = time.perf_counter()
    weight_bytes = write_model(folder, shape)
    written_s = time.perf_counter() - started
    run_dir = work / f"run-{name}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = work / f"{name}.yaml"
    cfg.write_text(run_config(folder, shape))
    free_before = shutil.disk_usage(work).free
    peak = {"VmHWM": 0, "RssAnon": 0, "RssFile": 0}
    lowest_free = [free_before]
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "podar.cli", "run", str(cfg), "--run-dir", str(run_dir),
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log: list[str] = []
    reader = threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True)
    reader.start()
    samples: list[tuple[float, int, int]] = []  # (unix time, RssAnon kB, RssFile kB)
    while proc.poll() is None:
        now = common.proc_status_kb(proc.pid)
        for key, value in now.items():
            if key in peak:
                peak[key] = max(peak[key], value)
        if now:
            samples.append((time.time(), now["RssAnon"], now["RssFile"]))
        lowest_free[0] = min(lowest_free[0], shutil.disk_usage(work).free)
        time.sleep(0.2)
    wall_s = time.perf_counter() - started
    reader.join(timeout=10)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: podar run failed ({proc.returncode}):\n{''.join(log[-40:])}")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    stages: dict[str, float] = {}
    stage_anon: dict[str, int] = {}  # peak RssAnon (MB) while each stage ran; "setup" before the first move
    entered = [("setup", samples[0][0] if samples else 0.0)]
    for line in (run_dir / "audit.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("duration_s") is not None:
            stages[rec["source"]] = round(stages.get(rec["source"], 0.0) + rec["duration_s"], 1)
        entered.append((rec["dest"], datetime.fromisoformat(rec["at"].replace("Z", "+00:00")).timestamp()))
    stage_rss: dict[str, int] = {}  # peak RssAnon + RssFile (MB) while each stage ran
    for (stage, since), (_, until) in zip(entered, entered[1:] + [("end", float("inf"))], strict=True):
        during = [(anon, anon + file) for t, anon, file in samples if since <= t < until]
        if during:
            stage_anon[stage] = max(stage_anon.get(stage, 0), round(max(a for a, _ in during) / 1024))
            stage_rss[stage] = max(stage_rss.get(stage, 0), round(max(r for _, r in during) / 1024))
    metrics: dict = {}
    for result in manifest["results"]:
        metrics.update(result.get("metrics") or {})
    return {
        "shape": name, **asdict(shape), "baseline_anon_mb": baseline_anon_mb(),
        "float32_weights_mb": round(weight_bytes / 1e6), "write_s": round(written_s, 1),
        "wall_s": round(wall_s, 1), "stage_s": stages, "stage_peak_anon_mb": stage_anon,
        "stage_peak_rss_mb": stage_rss, "forward_s": forward_seconds(folder, shape),
        "peak_rss_mb": round(peak["VmHWM"] / 1024), "peak_anon_mb": round(peak["RssAnon"] / 1024),
        "peak_file_mb": round(peak["RssFile"] / 1024),
        "peak_disk_mb": round((free_before - lowest_free[0]) / 1e6), "run_folder_mb": round(du(run_dir) / 1e6),
        "export_mb": round(du(run_dir / "export") / 1e6), "state": manifest["state"],
        "achieved_sparsity": metrics.get("achieved_sparsity"), "dense_ppl": metrics.get("dense_ppl"),
        "pruned_ppl": metrics.get("pruned_ppl"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["135m", "1.7b"], choices=sorted(SHAPES))
    ap.add_argument("--work", type=Path, default=Path("/tmp/podar-scaling"))
    ap.add_argument("--out", default="scaling")
    ap.add_argument("--keep-runs", action="store_true", help="keep each run folder (default: removed after)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    out = HERE / "results" / f"{args.out}.json"
    rows = json.loads(out.read_text())["rows"] if out.exists() else []
    for name in args.shapes:
        row = {**measure(name, args.work), "command": f"python bench/bench_scaling.py --shapes {name}"}
        if not args.keep_runs:
            shutil.rmtree(args.work / f"run-{name}", ignore_errors=True)
        rows = [r for r in rows if r["shape"] != name] + [row]
        print(json.dumps(row), flush=True)
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps({"mem_total_mb": mem_total_mb(), "rows": rows}, indent=2))
        write_table(out.with_suffix(".md"), rows)


def mem_total_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 1024)
    return 0


def write_table(path: Path, rows: list[dict]) -> None:
    head = ("| shape | blocks | vocabulary | calibration | evaluation | fp32 weights MB | wall s | Evaluating s | its "
            "forwards s | peak RSS MB | peak anon MB | peak file-backed MB | peak disk MB | run folder MB | export MB "
            "|\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    body = "".join(
        f"| {r['shape']} | {r['layers']} | {r.get('vocab', VOCAB)} | {r.get('samples', 8)} × {r.get('seq', 256)} "
        f"| {r.get('eval_windows', 2)} × {r.get('eval_seq') or r.get('seq', 256)} | {r['float32_weights_mb']} "
        f"| {r['wall_s']} | {r['stage_s'].get('evaluating', '—')} | {r.get('forward_s', '—')} | {r['peak_rss_mb']} "
        f"| {r['peak_anon_mb']} | {r['peak_file_mb']} | {r['peak_disk_mb']} | {r['run_folder_mb']} "
        f"| {r['export_mb']} |\n" for r in sorted(rows, key=lambda r: r["float32_weights_mb"]))
    path.write_text(f"Wanda 50%, block walk, bf16 calibration forwards, from a safetensors folder (machine memory "
                    f"{mem_total_mb()} MB); calibration and evaluation as windows × tokens. 'its forwards s': the "
                    "dense forward passes Evaluating needs (2 × its windows), timed alone.\n\n" + head + body)


if __name__ == "__main__":
    main()
