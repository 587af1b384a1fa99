"""Driver/Tune overhead per trial of a small study, this code against an earlier revision, side by side.

    python -m bench.trial_overhead [--before main] [--trials 8] [--concurrent 2] [--every 10] [--json out.json]

The same study — the ``smoke`` preset (tiny U-Net, λ₁ every step, 6 steps,
a checkpoint every 3) with ``--trials`` trials (its two variants × learning
rates), ``resources.max_concurrent = --concurrent`` — is run once with the
code of git revision ``--before`` (extracted with ``git archive`` into a
temporary folder) and once with this working tree, each in a fresh process
with a fresh local Ray instance of ``--concurrent`` CPUs.  Per trial:

* ``training``: the trainer's own seconds (the run folder's ``wall_time``);
* ``overhead``: ``makespan × concurrent / trials − training``, the seconds a
  trial slot spends on anything but training (worker start-up, imports,
  Tune's scheduling, reporting and checkpoint handling);
* ``disk``: bytes under the study folder (run folders and Tune's copies).

The makespan is ``run_study`` on an already started Ray instance.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# run in a child process whose PYTHONPATH is the code under test
CHILD = r"""
import json, sys, time, logging
import ray
from study.spec import load_spec
from study import runner
storage, trials, concurrent, every = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
lrs = [10 ** (-3 - 0.25 * i) for i in range((trials + 1) // 2)]
spec = load_spec("smoke", overrides=[{"study": {"storage": storage, "name": "bench"},
                                      "search": {"lr": {"grid": lrs}},
                                      "resources": {"max_concurrent": concurrent},
                                      "trackers": {"every": every}}])
ray.init(num_cpus=concurrent, num_gpus=0, include_dashboard=False, logging_level=logging.WARNING)
t0 = time.perf_counter()
outcome = runner.run_study(spec, verbose=0)   # finds Ray running: the time of the study alone
makespan = time.perf_counter() - t0
table = outcome.trials.to_pandas()
print("RESULT " + json.dumps({"makespan": makespan, "trials": len(table),
                              "completed": int((table["status"] == "completed").sum()),
                              "training": float(table["wall_time"].mean()),
                              "steps": int(table["steps_done"].sum())}))
"""


def disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def run(code: Path, args, label: str) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"eos-bench-{label}-") as storage:
        env = dict(os.environ, PYTHONPATH=str(code))
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", CHILD, storage, str(args.trials), str(args.concurrent),
                              str(args.every)], cwd=code, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode != 0 or not lines:
            raise SystemExit(f"[bench] {label}: the study failed:\n{out.stderr[-4000:]}")
        result = json.loads(lines[-1][len("RESULT "):])
        result.update(label=label, process=wall, disk=disk_bytes(Path(storage) / "bench"))
    n, c = result["trials"], args.concurrent
    result["overhead"] = result["makespan"] * c / n - result["training"]
    print(f"[bench] {label}: {result['completed']}/{n} completed, makespan {result['makespan']:.1f} s, "
          f"training {result['training']:.2f} s/trial, overhead {result['overhead']:.2f} s/trial, "
          f"disk {result['disk'] / 1e6:.1f} MB", flush=True)
    return result


def extract(rev: str, folder: Path) -> Path:
    archive = folder / "src.tar"
    subprocess.run(["git", "archive", "--format=tar", "-o", str(archive), rev], cwd=REPO, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(folder / "src", filter="data")
    return folder / "src"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", default="main", help="git revision to compare with (default: main)")
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--concurrent", type=int, default=2)
    p.add_argument("--every", type=int, default=10, help="trackers.every: report to Tune every N steps")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    rev = subprocess.run(["git", "rev-parse", "--short", args.before], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout.strip()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                          text=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                           capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="eos-bench-before-") as tmp:
        name = args.before if rev.startswith(args.before) else f"{args.before} {rev}"
        before = run(extract(args.before, Path(tmp)), args, f"before ({name})")
    after = run(REPO, args, f"after ({head}{'+changes' if dirty else ''})")
    rows = [before, after]
    print(f"\n{args.trials} trials of the smoke preset, max_concurrent {args.concurrent}, trackers.every "
          f"{args.every}; {os.cpu_count()} CPUs ({platform.machine()}), {date.today()}")
    print("| code | makespan s | training s/trial | overhead s/trial | study folder MB |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['label']} | {r['makespan']:.1f} | {r['training']:.2f} | {r['overhead']:.2f} | "
              f"{r['disk'] / 1e6:.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
