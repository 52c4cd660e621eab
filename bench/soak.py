"""Random SIGKILL soak (``make soak``): tiny Wanda and SparseGPT runs killed at random instants, each resumed, each
export compared with an uninterrupted run's.

    python bench/soak.py --resumes 50 [--seed 0] [--out soak]

Runs are started until ``--resumes`` of them were killed mid-run and resumed (a kill that lands after the run
reached Complete resumes nothing and is counted apart).

A run is started with ``podar run``; once its run folder holds a manifest (the first checkpoint: a kill before it
leaves nothing to resume and the run is simply started again), it is killed with SIGKILL after a random delay drawn
uniformly from 0 to the time an uninterrupted run takes from that point to Complete. It is then resumed with
``podar resume``, and its export's sha256 is compared with the uninterrupted run's. ``podar audit`` must verify
every folder. Writes bench/results/NAME.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from golden_masks import corpus_text  # noqa: E402
from helpers import make_tiny_config  # noqa: E402

from podar.engine.store import RunStore  # noqa: E402


def podar(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "podar.cli", *args, "--no-progress"] if args[0] != "audit" else
                          [sys.executable, "-m", "podar.cli", *args], capture_output=True, text=True, timeout=600)


def export_sha(run_dir: Path) -> dict[str, str]:
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((run_dir / "export").iterdir())}


def start(config: Path, run_dir: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "podar.cli", "run", str(config), "--run-dir", str(run_dir),
                             "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_for_manifest(proc: subprocess.Popen, run_dir: Path) -> float:
    """Seconds from now until ``run_dir`` holds a manifest (or the process ended)."""
    started = time.perf_counter()
    while not (run_dir / "manifest.json").exists() and proc.poll() is None:
        time.sleep(0.01)
    return time.perf_counter() - started


def wait_for_complete(proc: subprocess.Popen, run_dir: Path) -> float:
    """Seconds from now until ``run_dir``'s manifest says Complete (the process's own exit comes after)."""
    started = time.perf_counter()
    while proc.poll() is None:
        if RunStore(run_dir).read_manifest().state == "complete":  # written by atomic rename: never partial
            break
        time.sleep(0.01)
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resumes", type=int, default=50, help="kills mid-run (each then resumed) to reach")
    ap.add_argument("--max-runs", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="soak")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="podar-soak-"))
    corpus = work / "corpus.txt"
    corpus.write_text(corpus_text())
    configs, refs, durations = {}, {}, {}
    for method in ("wanda", "sparsegpt"):
        cfg = make_tiny_config(corpus).with_method(method)
        cfg = cfg.with_calibration(cfg.calibration.model_copy(update={"walk": "site"}))
        cfg = cfg.with_finetune(cfg.finetune.model_copy(update={  # distillation over three checkpointed intervals
            "enabled": True, "steps": 6, "checkpoint_every": 2, "eval_every": 2}))
        configs[method] = work / f"{method}.yaml"
        configs[method].write_text(cfg.to_yaml())
        proc = start(configs[method], work / f"ref-{method}")
        wait_for_manifest(proc, work / f"ref-{method}")
        durations[method] = wait_for_complete(proc, work / f"ref-{method}")  # first checkpoint to Complete
        assert proc.wait() == 0, f"the uninterrupted {method} run failed"
        refs[method] = export_sha(work / f"ref-{method}")
    rows = []
    i = 0
    while sum(r["how"] == "resumed" for r in rows) < args.resumes and i < args.max_runs:
        method = ("wanda", "sparsegpt")[i % 2]
        run_dir = work / f"run-{i}"
        delay = rng.uniform(0.0, durations[method])
        proc = start(configs[method], run_dir)
        wait_for_manifest(proc, run_dir)
        time.sleep(delay)
        killed = proc.poll() is None
        if killed:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        if not (run_dir / "manifest.json").exists():  # killed before the first checkpoint: start it again
            how, out = "rerun", podar("run", str(configs[method]), "--run-dir", str(run_dir))
        elif killed and RunStore(run_dir).read_manifest().state != "complete":
            how, out = "resumed", podar("resume", str(run_dir))
        else:
            how, out = "finished before the kill", None
        same = (run_dir / "export").is_dir() and export_sha(run_dir) == refs[method]
        audited = podar("audit", str(run_dir)).returncode
        rows.append({"run": i, "method": method, "delay_s": round(delay, 3), "killed": killed, "how": how,
                     "rc": None if out is None else out.returncode, "same_export": same, "audit_rc": audited,
                     "error": None if out is None or out.returncode == 0 else out.stderr[-500:]})
        print(json.dumps(rows[-1]), flush=True)
        i += 1
    ok = sum(r["same_export"] and r["audit_rc"] == 0 for r in rows)
    killed = sum(r["how"] != "finished before the kill" for r in rows)
    summary = {"runs": len(rows), "killed": killed, "same_export_and_audit_ok": ok,
               "resumed": sum(r["how"] == "resumed" for r in rows), "rerun": sum(r["how"] == "rerun" for r in rows),
               "uninterrupted_after_first_checkpoint_s": durations}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / f"{args.out}.json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=2))
    (HERE / "results" / f"{args.out}.md").write_text(
        f"{len(rows)} runs (tiny Wanda and SparseGPT, site walk, fine-tuning), {killed} killed (SIGKILL) at a random "
        f"instant after the first checkpoint, {summary['resumed']} resumed, {summary['rerun']} started again, "
        f"{len(rows) - killed} had reached Complete before the kill: {ok} of {len(rows)} exports sha256-equal to an "
        f"uninterrupted run's, audit OK (`python bench/soak.py --resumes {args.resumes} --seed {args.seed}`).\n")
    print(json.dumps(summary))
    sys.exit(0 if ok == len(rows) and summary["resumed"] >= args.resumes else 1)


if __name__ == "__main__":
    main()
