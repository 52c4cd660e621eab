"""Helpers the tests share (importable by name: tests/ is on the path)."""

from __future__ import annotations

from pathlib import Path

import torch

from podar import (
    CalibrationConfig,
    EvaluationConfig,
    FineTuneConfig,
    ModelSourceConfig,
    PruningConfig,
    QualityGates,
    RuntimeConfig,
    TinyModelConfig,
)


def training_text(corpus: Path) -> Path:
    """A text beside ``corpus`` for fine-tuning (podar refuses the evaluation text as training text): the same
    words, other sentences."""
    path = corpus.with_name("training.txt")
    if not path.exists():
        lines = corpus.read_text().splitlines()
        path.write_text("\n".join(" ".join(reversed(line.split()[:-1])) + " ." for line in lines))
    return path


def make_tiny_config(corpus: Path, **tiny: object) -> PruningConfig:
    """A config that runs end to end on a 2-block random model (Llama unless ``arch=``) in a few seconds."""
    return PruningConfig(
        model=ModelSourceConfig(kind="tiny", tiny=TinyModelConfig(**tiny)),
        calibration=CalibrationConfig(num_samples=4, sequence_length=64, dataset=str(corpus)),
        # the reference arithmetic (float32 forwards) that the tests' float64 references follow; 'auto' (bf16
        # forwards for Wanda/RIA where native) is tested on its own (tests/test_compute_dtype.py)
        runtime=RuntimeConfig(compute_dtype="model"),
        finetune=FineTuneConfig(enabled=False, steps=2, sequence_length=32, dataset=str(training_text(corpus)),
                                validation_windows=4),
        evaluation=EvaluationConfig(dataset=str(corpus), sequence_length=64, max_windows=4,
                                    gates=QualityGates(max_perplexity_increase_pct=None)),
    )


def fail_once(monkeypatch, stage, on_call: int) -> list[int]:
    """Make ``stage``'s handler raise RuntimeError('transient failure') on its ``on_call``-th call and run the
    real one otherwise; returns the list each call appends to."""
    from podar.stages import HANDLERS

    original, calls = HANDLERS[stage], []

    def flaky(ctx):
        calls.append(1)
        if len(calls) == on_call:
            raise RuntimeError("transient failure")
        return original(ctx)

    monkeypatch.setitem(HANDLERS, stage, flaky)
    return calls


def _grid_scales(w, bits):
    """(rows, 1) float64: max |w| of each row over half the integer range (1 for an all-zero row)."""
    amax = w.abs().amax(dim=1, keepdim=True)
    return torch.where(amax > 0, amax / ((2 ** bits - 1) / 2), torch.ones_like(amax))


def reference_sparsegpt(w, x, sparsity, n=None, m=None, block=128, damp=0.01, margins=None, quant=None):
    """Frantar & Alistarh (2023), Algorithm 1, in float64 with plain loops. ``margins`` (a list): each unstructured
    block decision's relative gap between every saliency and the block's threshold is appended, (out, count).
    ``quant`` (bits, group or None): joint quantization — kept weights snapped to the symmetric integer grid as
    their column is solved, scales per row from an unquantized solve's result or per group at its first column."""
    w = w.clone()
    h = 2.0 * x.t() @ x / 1  # one "sample": the scale cancels in the solver
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    rows, cols = w.shape
    prune = torch.zeros_like(w, dtype=torch.bool)
    scales = None
    if quant is not None and quant[1] is None:  # per row: from the row an unquantized solve gives
        plain, _ = reference_sparsegpt(w, x, sparsity, n=n, m=m, block=block, damp=damp)
        scales = _grid_scales(plain, quant[0])[:, 0]
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        if n is None:
            sal = w[:, i1:i2] ** 2 / torch.diag(hinv)[i1:i2] ** 2
            k = int(sal.numel() * sparsity)
            flat = torch.zeros(sal.numel(), dtype=torch.bool)
            order = torch.argsort(sal.reshape(-1), stable=True)
            flat[order[:k]] = True
            prune[:, i1:i2] = flat.view_as(sal)
            if margins is not None and 0 < k < sal.numel():
                threshold = (sal.reshape(-1)[order[k - 1]] + sal.reshape(-1)[order[k]]) / 2
                margins.append(((sal - threshold).abs() / threshold.abs().clamp_min(1e-300), i1, i2))
        for i in range(i1, i2):
            if n is not None and (i - i1) % m == 0:
                sal = w[:, i:i + m] ** 2 / torch.diag(hinv)[i:i + m] ** 2
                for r in range(rows):
                    prune[r, i + torch.argsort(sal[r], stable=True)[: m - n]] = True
            q = torch.where(prune[:, i], torch.zeros_like(w[:, i]), w[:, i])
            if quant is not None:
                bits, group = quant
                if group is not None and i % group == 0:
                    scales = _grid_scales(w[:, i:i + group], bits)[:, 0]
                q = torch.clamp(torch.round(q / scales), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * scales
            err = (w[:, i] - q) / hinv[i, i]
            w[:, i:] -= err[:, None] * hinv[i, i:][None, :]
            w[:, i] = q
    w[prune] = 0
    return w, ~prune


def killed_run(cfg: PruningConfig, run_dir: Path, fault: str) -> None:
    """Run ``cfg`` through the CLI into ``run_dir`` with the fault ``fault`` (``faults`` syntax) set: the process
    must die by SIGKILL there, leaving a run folder to resume."""
    import os
    import signal
    import subprocess
    import sys

    from podar.engine import faults

    path = run_dir.with_name(run_dir.name + ".yaml")
    path.write_text(cfg.to_yaml())
    env = {**os.environ, faults.ENV: fault, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "podar.cli", "run", str(path), "--run-dir", str(run_dir),
                           "--no-progress"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


def export_hashes(run_dir: Path) -> dict[str, str]:
    """sha256 of every file of a run's export, by path inside it."""
    from podar.engine.store import sha256_file

    export = run_dir / "export"
    return {str(p.relative_to(export)): sha256_file(p) for p in sorted(export.rglob("*")) if p.is_file()}


def killed_and_resumed(cfg: PruningConfig, root: Path, fault: str):
    """Run ``cfg`` uninterrupted into ``root/ref``, then killed at ``fault`` into ``root/run`` and resumed: the two
    exports must be equal file for file and the resumed run's audit must verify. Returns its manifest."""
    from podar import Pipeline, verify_audit
    from podar.engine.store import RunStore

    assert Pipeline(cfg, run_dir=root / "ref", progress=False).run().ok
    killed_run(cfg, root / "run", fault)
    result = Pipeline.resume(root / "run", progress=False).run()
    assert result.ok, result.failure
    assert export_hashes(root / "run") == export_hashes(root / "ref")
    manifest = RunStore(root / "run").read_manifest()
    verify_audit(root / "run" / "audit.jsonl", manifest.run_id, manifest.history)
    return manifest
