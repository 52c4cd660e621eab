"""Random SIGKILL soak (``make soak``): tiny Wanda and SparseGPT runs killed at random instants, each resumed, each
export compared with an uninterrupted run's.

    python bench/soak.py --runs 50 [--seed 0] [--out soak]

A run is started with ``podar run`` and killed with SIGKILL after a random delay drawn uniformly from 0 to the
time an uninterrupted run takes; it is then resumed with ``podar resume`` (or, when it was killed before its first
checkpoint, started again in the same folder, as the error message says), and its export's sha256 is compared with
the uninterrupted run's. ``podar audit`` must verify every resumed folder. Writes bench/results/NAME.json and .md.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=50)
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
        cfg = cfg.with_finetune(cfg.finetune.model_copy(update={"enabled": True, "steps": 2}))
        configs[method] = work / f"{method}.yaml"
        configs[method].write_text(cfg.to_yaml())
        started = time.perf_counter()
        assert podar("run", str(configs[method]), "--run-dir", str(work / f"ref-{method}")).returncode == 0
        durations[method] = time.perf_counter() - started
        refs[method] = export_sha(work / f"ref-{method}")
    rows = []
    for i in range(args.runs):
        method = ("wanda", "sparsegpt")[i % 2]
        run_dir = work / f"run-{i}"
        delay = rng.uniform(0.0, durations[method])
        proc = subprocess.Popen([sys.executable, "-m", "podar.cli", "run", str(configs[method]), "--run-dir",
                                 str(run_dir), "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
    ok = sum(r["same_export"] and r["audit_rc"] == 0 for r in rows)
    killed = sum(r["killed"] for r in rows)
    summary = {"runs": len(rows), "killed": killed, "same_export_and_audit_ok": ok,
               "resumed": sum(r["how"] == "resumed" for r in rows), "rerun": sum(r["how"] == "rerun" for r in rows),
               "uninterrupted_s": durations}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / f"{args.out}.json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=2))
    (HERE / "results" / f"{args.out}.md").write_text(
        f"{len(rows)} runs (tiny Wanda and SparseGPT, site walk, fine-tuning), {killed} killed at a random instant "
        f"(SIGKILL), {summary['resumed']} resumed, {summary['rerun']} started again (killed before the first "
        f"checkpoint): {ok} of {len(rows)} exports sha256-equal to an uninterrupted run's, audit OK.\n")
    print(json.dumps(summary))
    sys.exit(0 if ok == len(rows) else 1)


if __name__ == "__main__":
    main()
