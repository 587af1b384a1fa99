"""Where the time of a per-step probe goes, on a real (short) training run.

Splits the wall time of ``SharpnessProbe.measure`` at every probed step into

* **products**: Hessian-vector products (the second backward passes, TF32 or
  float32), timed around each operator call;
* **graph**: building the gradient graph the products reuse (one forward and
  one backward with ``create_graph``), once per operator;
* **rest**: everything else in the probe — LOBPCG's small dense algebra,
  orthogonalisation, host synchronisations, the preconditioner, copies.

Each timer synchronises the device, so the parts add up to the probe's wall
time.  Also prints the training step's own time, one product timed alone in
a loop (gradient graph reused; with and without CUDA graphs), and a torch.profiler table of one probed step (top
operators by self CPU time, and how often the host waited for the device).

    python bench/probe_profile.py --preset small --batch 64 --device cuda --steps 12
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainers.curvature import probe as sharpness_mod  # noqa: E402
from trainers.curvature.hessian import EAGER_BEFORE_CAPTURE, HessianOperator, trainable_parameters  # noqa: E402
from trainers.curvature.probe import SharpnessProbe  # noqa: E402
from trainers.config import run_config  # noqa: E402
from trainers.run.loop import Trainer, train  # noqa: E402

SYNC_OPS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync", "cudaEventSynchronize")


class Timers:
    """Wall-clock seconds per category, synchronising ``device`` around each."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = defaultdict(float)
        self.calls = defaultdict(int)
        self.columns = 0

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def wrap(self, name, fn, count_columns=False):
        timers = self

        def timed(*args, **kwargs):
            timers.sync()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            timers.sync()
            timers.seconds[name] += time.perf_counter() - t0
            timers.calls[name] += 1
            if count_columns:
                V = args[1]
                timers.columns += 1 if V.dim() == 1 else V.shape[1]
            return out
        return timed

    def reset(self):
        self.seconds.clear()
        self.calls.clear()
        self.columns = 0


def main(argv=None):
    originals = [(HessianOperator, "__call__"), (HessianOperator, "_build_graph"), (SharpnessProbe, "measure"),
                 (Trainer, "measure_sharpness")]
    saved = [(cls, name, cls.__dict__[name]) for cls, name in originals]
    try:
        profile_probe(argv)
    finally:   # the timers wrap class attributes: put the originals back
        for cls, name, fn in saved:
            setattr(cls, name, fn)


def profile_probe(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=16, help="training and Hessian batch")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--steps", type=int, default=12, help="training steps, λ₁ probed at each")
    ap.add_argument("--skip", type=int, default=4, help="first steps left out of the means (cold solves)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="extra config override, e.g. --set sharpness.search_precision=float32")
    ap.add_argument("--rows", type=int, default=20, help="rows of the profiler table (0: no profile)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)

    from trainers.run.cli import parse_override
    from trainers.config import merge
    cfg = {"model": {"preset": args.preset}, "variant": {"name": "base"},
           "data": {"name": "synthetic", "image_size": args.image_size, "batch_size": args.batch},
           "optim": {"name": "adam", "lr": args.lr},
           "sharpness": {"every": 1, "hessian_batch": args.batch},
           "train": {"steps": args.steps, "device": args.device, "print_every": 0, "checkpoint_every": 10**9}}
    for text in args.set:
        cfg = merge(cfg, parse_override(text))
    cfg = run_config(cfg)

    timers = Timers(device)
    HessianOperator.__call__ = timers.wrap("products", HessianOperator.__call__, count_columns=True)
    HessianOperator._build_graph = timers.wrap("graph", HessianOperator._build_graph)
    SharpnessProbe.measure = timers.wrap("probe", SharpnessProbe.measure)

    captured = []   # the run's Trainer, for the single-product timing and the profiled probe
    measure_sharpness = Trainer.measure_sharpness

    def capture(self, *a, **kw):
        if not captured:
            captured.append(self)
        return measure_sharpness(self, *a, **kw)
    Trainer.measure_sharpness = capture

    rows, per_step = [], []

    def on_step(row):
        per_step.append(({k: timers.seconds[k] for k in ("probe", "products", "graph")}, timers.columns,
                         row["wall_time"]))
        rows.append(row)
        timers.reset()

    with tempfile.TemporaryDirectory() as run_dir:
        train(cfg, run_dir, resume=False, on_step=on_step, progress=False)
    wall = [w for _, _, w in per_step]
    step_wall = [b - a for a, b in zip([0.0] + wall[:-1], wall)]
    kept = range(min(args.skip, len(per_step) - 1), len(per_step))

    def mean(xs):
        return statistics.fmean(xs) if xs else float("nan")

    probe = mean([per_step[i][0]["probe"] for i in kept])
    prods = mean([per_step[i][0]["products"] for i in kept])
    graph = mean([per_step[i][0]["graph"] for i in kept])
    cols = mean([per_step[i][1] for i in kept])
    train_only = mean([step_wall[i] - per_step[i][0]["probe"] for i in kept])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# probe profile: preset {args.preset}, batch {args.batch}, {args.image_size}x{args.image_size}, "
          f"{name}, torch {torch.__version__}")
    print(f"# config overrides: {args.set or 'none'}; steps {args.skip}..{args.steps - 1} averaged")
    print()
    print("| part | seconds per probed step | share of the probe |")
    print("|---|---|---|")
    for label, t in (("products", prods), ("gradient graph builds", graph), ("rest (solver, syncs, copies)",
                                                                            probe - prods - graph)):
        print(f"| {label} | {t:.3f} | {t / probe:.0%} |")
    print(f"| **probe total** | **{probe:.3f}** | 100% |")
    print(f"| training step (without the probe) | {train_only:.4f} | — |")
    print()
    print(f"products per probed step: {cols:.1f} → {prods / max(cols, 1e-9) * 1e3:.1f} ms per product in the solver; "
          f"λ₁(P⁻¹H) HVPs logged: {mean([rows[i]['eig_hvps'] for i in kept]):.1f}")

    # one product alone, graph reused, TF32 off and on (the trained model, its Hessian batch)
    trainer = captured[-1]
    model, params = trainer.model, trainable_parameters(trainer.model)
    fused = trainer._fused()
    model.eval()
    model.set_fused_attention(False)
    loss = trainer.frozen_loss(trainer.frozen_hessian_draw(trainer.step))
    V = torch.randn(sum(p.numel() for p in params), 1, device=device)
    for label, ctx in (("float32", sharpness_mod.exact_float32), ("TF32", sharpness_mod.tf32)):
        for graphs in (False, True):
            with ctx():
                H = HessianOperator(loss, params, model=model, cuda_graphs=graphs)
                for _ in range(EAGER_BEFORE_CAPTURE + 1):   # with CUDA graphs: eager products, then the capture
                    H(V)
                timers.reset()
                for _ in range(10):
                    H(V)
                H.close()
            print(f"one product alone ({label}, gradient graph reused, CUDA graphs {'on' if H.graphed else 'off'}): "
                  f"{timers.seconds['products'] / 10 * 1e3:.1f} ms")
    model.train()
    model.set_fused_attention(fused)

    if args.rows <= 0:
        return
    # torch.profiler over one warm probe of the trained run
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    draw = trainer.draws(trainer.step)[0]
    with profile(activities=acts) as prof:
        trainer.measure_sharpness(trainer.step, args.lr, draw)
    events = prof.key_averages()
    waits = {e.key: e.count for e in events if e.key in SYNC_OPS}
    print(f"\nhost waits in one warm probe: {waits or 'none recorded'}")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    if device.type == "cuda":
        print(events.table(sort_by="self_cuda_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
