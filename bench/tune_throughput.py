"""Aggregate trial-steps per second of a Ray Tune sweep with 1, 2 and 4 trials per GPU.

    python -m bench.tune_throughput [--preset small] [--steps 60] [--per-gpu 1 2 4] [--every 1] [--mps] [--json out.json]

For each packing k, the `paper` preset (Adam, λ₁(P⁻¹H) every ``--every`` steps) is run as a
study of exactly k trials (k variants at one learning rate) with
``resources.gpu = 1/k``, so all k share one GPU at once.  Throughput is the
sum of the trials' steps over the wall time of the Tune run (trial start-up
included) and, separately, over the trials' own training time (from the step
log's wall_time); the speed-up over k = 1 is measured in the same run.

Processes sharing a GPU time-slice it: one trial's kernels run at a time.
``--mps`` runs the sweep under an NVIDIA MPS control daemon of its own
(:mod:`study.mps`: private pipe and log directories, stopped at exit; the
GPU's compute mode is not touched), so that kernels of the trials on one GPU
run concurrently; without it the studies run time-sliced (``resources.mps:
false``), although ``eos study run`` would use MPS by default.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import shutil
import subprocess
import time
from datetime import date
from pathlib import Path

import pandas as pd

from study.mps import CONTROL, gpu_count, private_daemon
from trainers.diffusion.variants import VARIANTS


@contextlib.contextmanager
def cuda_mps(enabled: bool):
    """With ``enabled``, one private MPS control daemon for every sweep of the
    bench (:func:`study.mps.private_daemon`; the studies find it running and
    use it); without, the studies are told not to start one."""
    if not enabled:
        yield
        return
    exe = shutil.which(CONTROL)
    if exe is None:
        raise SystemExit(f"--mps: {CONTROL} is not on PATH (it ships with the NVIDIA driver)")
    with private_daemon(exe, log=lambda line: print(line.replace("[eos]", "[bench]"), flush=True)):
        yield


def gpu_name() -> str:
    """Name of GPU 0 without creating a CUDA context in this process (under
    MPS a context would make it a client that the daemon's quit waits for)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", "0"],
                             capture_output=True, text=True, timeout=30, check=True)
        return out.stdout.strip() or "GPU"
    except (OSError, subprocess.SubprocessError):
        return "GPU (name unknown: nvidia-smi failed)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tune_throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", help="U-Net preset of the trials")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--per-gpu", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--data", help="npz file (default: built-in synthetic data)")
    p.add_argument("--storage", default="results/bench-tune")
    p.add_argument("--cpus", type=int, default=None)
    p.add_argument("--every", type=int, default=1, help="sharpness.every: probe every N steps (1: every step)")
    p.add_argument("--hessian-batch", type=int, default=None, help="sharpness.hessian_batch (default: --batch)")
    p.add_argument("--json", help="write the results here (rewritten after every packing)")
    p.add_argument("--mps", action="store_true", help="run the trials under an MPS daemon (concurrent kernels)")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="sharpness.cuda_graphs: false (Hessian-vector products launched kernel by kernel)")
    args = p.parse_args(argv)
    with cuda_mps(args.mps):   # before this process or a trial touches CUDA
        return sweep(args)


def sweep(args) -> int:
    from study.runner import run_study
    from study.spec import load_spec

    gpus = gpu_count()   # nvidia-smi: this process must not become an MPS client
    rows = []
    for k in args.per_gpu:
        name = f"throughput-{k}-per-gpu"
        shutil.rmtree(Path(args.storage) / name, ignore_errors=True)
        data = ({"name": "npz", "path": args.data, "subset": None} if args.data
                else {"name": "synthetic", "synthetic_size": 1024, "subset": None})
        overrides = {
            "study": {"name": name, "variants": list(VARIANTS)[:k], "storage": args.storage, "seeds": [0]},
            "search": {"algorithm": "grid", "lr": {"grid": [5e-4]}},
            "resources": {"gpu": (1.0 / k) if gpus else 0, "cpu": 1, "max_concurrent": k,
                          "mps": None if args.mps else False},
            "model": {"preset": args.preset},
            "data": {**data, "batch_size": args.batch},
            "sharpness": {"hessian_batch": args.hessian_batch or args.batch, "every": args.every,
                          "cuda_graphs": not args.no_cuda_graphs},
            "train": {"steps": args.steps, "checkpoint_every": 10_000, "print_every": 0},
        }
        spec = load_spec("paper", overrides=[overrides])
        t0 = time.perf_counter()
        outcome = run_study(spec, num_cpus=args.cpus, verbose=0)
        wall = time.perf_counter() - t0
        steps = pd.read_parquet(Path(args.storage) / name / "steps")
        trial_steps = len(steps)
        train_wall = steps.groupby("trial")["wall_time"].max().max()
        rows.append({"trials_per_gpu": k, "trials": k, "trial_steps": trial_steps, "wall_s": wall,
                     "train_wall_s": float(train_wall),
                     "steps_per_s": trial_steps / wall, "train_steps_per_s": trial_steps / float(train_wall),
                     "statuses": pd.Series(outcome.trials.column("status").to_pylist()).value_counts().to_dict()})
        print(f"{k} per GPU: {trial_steps} trial-steps in {wall:.1f} s "
              f"({trial_steps / wall:.2f}/s; {trial_steps / train_wall:.2f}/s of training time)", flush=True)
        if args.json:   # partial results survive a run cut short
            Path(args.json).write_text(json.dumps({"rows": rows}, indent=2, default=str))

    for r in rows:
        r["speedup_vs_1"] = r["steps_per_s"] / rows[0]["steps_per_s"]
        r["train_speedup_vs_1"] = r["train_steps_per_s"] / rows[0]["train_steps_per_s"]
    dev = gpu_name() if gpus else platform.processor() or "cpu"
    cadence = "every step" if args.every == 1 else f"every {args.every} steps"
    sharing = "MPS" if args.mps else "time-sliced (no MPS)"
    graphs = "off" if args.no_cuda_graphs else "on"
    print(f"\nTune sweep, preset {args.preset}, batch {args.batch}, λ₁(P⁻¹H) {cadence}, {dev}, GPU sharing: {sharing}, "
          f"CUDA-graph products: {graphs}")
    print("| trials per GPU | trial-steps | wall s | trial-steps/s | speed-up | speed-up (training time only) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['trials_per_gpu']} | {r['trial_steps']} | {r['wall_s']:.1f} | {r['steps_per_s']:.2f} | "
              f"{r['speedup_vs_1']:.2f}× | {r['train_speedup_vs_1']:.2f}× |")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": dev, "date": str(date.today()), "preset": args.preset,
                                               "batch": args.batch, "steps": args.steps, "every": args.every, "mps": args.mps,
                                               "cuda_graphs": not args.no_cuda_graphs,
                                               "rows": rows}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
