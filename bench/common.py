"""Shared set-up of the benchmark: the same model folder, calibration samples and evaluation windows for
podar and llm-compressor. Runs in podar's environment."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"  # the committed result files
CACHE = ROOT / ".cache"
MODEL_DIR = CACHE / "smollm2-135m-dense"
CALIB = CACHE / "calibration_ids.safetensors"
EVAL = CACHE / "eval_ids.safetensors"

NUM_SAMPLES = 64
SEQ_LEN = 512
EVAL_WINDOWS = 32
SEED = 0


MEMORY_FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile")


def proc_status_kb(pid: int | str = "self") -> dict[str, int]:
    """The memory fields of /proc/PID/status (VmHWM, VmRSS, RssAnon, RssFile) in kB; {} once PID has ended."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    fields = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key in MEMORY_FIELDS:
            fields[key] = int(value.split()[0])
    return fields


def status_mib(field: str) -> float:
    """A memory field of /proc/self/status (VmHWM, VmRSS, RssAnon, RssFile) in MiB, this process only."""
    kb = proc_status_kb().get(field)
    if kb is None:
        raise RuntimeError(f"no {field} in /proc/self/status")
    return kb / 1024


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM) in MiB. Not getrusage's ru_maxrss: Linux carries that over
    from the forking parent across exec, so a child of a big parent would report the parent's size."""
    return status_mib("VmHWM")


def calib_path(seed: int = SEED) -> Path:
    """The calibration windows' file for ``seed`` (seed 0, the bench's default, keeps its historical name)."""
    return CALIB if seed == SEED else CACHE / f"calibration_ids_seed{seed}.safetensors"


def prepare(seed: int = SEED) -> None:
    """Write the dense model folder (fp32, from the GGUF) and the token windows both tools use."""
    from podar.engine.data import calibration_windows, eval_windows, load_text, resolve_data_dir, tokenize_text
    from podar.engine.models import load_model
    from podar.schemas.config import ModelSourceConfig

    CACHE.mkdir(exist_ok=True)
    if not (MODEL_DIR / "config.json").is_file():
        model, tok = load_model(ModelSourceConfig())
        model.save_pretrained(str(MODEL_DIR), safe_serialization=True)
        tok.save_pretrained(str(MODEL_DIR))
    if not calib_path(seed).is_file() or not EVAL.is_file():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(MODEL_DIR))
        cal = tokenize_text(tok, load_text("wikitext2-valid", resolve_data_dir(None)))  # shipped, or PODAR_DATA_DIR
        ev = tokenize_text(tok, load_text("wikitext2", resolve_data_dir(None)))
        save_file({"input_ids": calibration_windows(cal, NUM_SAMPLES, SEQ_LEN, seed).contiguous()},
                  str(calib_path(seed)))
        save_file({"input_ids": eval_windows(ev, SEQ_LEN, EVAL_WINDOWS).contiguous()}, str(EVAL))


def podar_config(method: str, pattern: str, *, seed: int = SEED, batch_size: int = 4, walk: str = "auto",
                 chunked_attention: bool = True, compute_dtype: str = "model", export=None):
    """The PruningConfig of a bench run: 50% ``pattern`` ('unstructured' or '2:4') with ``method``, the bench's
    model folder, calibration windows (``seed``) and evaluation windows, no perplexity gate; ``export`` an
    ExportConfig or None for the default; ``compute_dtype``: ``runtime.compute_dtype``."""
    from podar import (
        CalibrationConfig,
        EvaluationConfig,
        ExportConfig,
        ModelSourceConfig,
        PruningConfig,
        QualityGates,
        RuntimeConfig,
        SparsityPatternConfig,
    )

    return PruningConfig(
        method=method, target_sparsity=0.5,
        pattern=SparsityPatternConfig.nm_2_4() if pattern == "2:4" else SparsityPatternConfig.unstructured(),
        model=ModelSourceConfig(kind="hf", name=str(MODEL_DIR)),
        calibration=CalibrationConfig(num_samples=NUM_SAMPLES, sequence_length=SEQ_LEN, dataset="wikitext2-valid",
                                      seed=seed, batch_size=batch_size, walk=walk),
        runtime=RuntimeConfig(chunked_attention=chunked_attention, compute_dtype=compute_dtype),
        evaluation=EvaluationConfig(dataset="wikitext2", sequence_length=SEQ_LEN, max_windows=EVAL_WINDOWS,
                                    gates=QualityGates(max_perplexity_increase_pct=None)),
        export=export if export is not None else ExportConfig(),
    )


def dense_with_weights(path: Path):
    """(model, sparsity): the bench's dense model (float32, eval) with ``path``'s Linear weights (safetensors, by
    module name) copied in, and the fraction of those weights that are zero."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(MODEL_DIR), dtype=torch.float32).eval()
    modules = dict(model.named_modules())
    zeros = total = 0
    with torch.no_grad():
        for name, w in load_file(str(path)).items():
            modules[name].weight.copy_(w)
            zeros += int((w == 0).sum())
            total += w.numel()
    return model, zeros / total


def calibration_ids(seed: int = SEED) -> torch.Tensor:
    return load_file(str(calib_path(seed)))["input_ids"]


def eval_ids() -> torch.Tensor:
    return load_file(str(EVAL))["input_ids"]


def tidy_run(run_dir: Path, keep: tuple[str, ...] = ()) -> None:
    """Remove a finished bench run's folder (checkpoints, dense parts: gigabytes a run) but the entries in ``keep``."""
    import shutil

    if not run_dir.is_dir():
        return
    for entry in run_dir.iterdir():
        if entry.name in keep:
            continue
        shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Seconds of the fastest of ``repeats`` calls of ``fn`` after one warm-up call (this machine is noisy)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best
