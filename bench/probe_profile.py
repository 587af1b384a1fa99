"""Where the time of a per-step probe goes, along a short training run.

A :class:`~bench.common.Problem` (the project's Trainer, ``base`` variant,
Adam) trains for ``--steps`` steps and the probe measures λ₁(P⁻¹H) and
λ₁(H) before each update, as the training loop does.  The probe is a
:class:`TimedProbe`: the :class:`~trainers.curvature.probe.SharpnessProbe`
whose Hessian operator is wrapped by :class:`TimedHessian`, which splits the
wall time of each ``measure`` into

* **products**: Hessian-vector products (the second backward passes, TF32 or
  float32), timed around each operator call;
* **graph**: building the gradient graph the products reuse (one forward and
  one backward with ``create_graph``), once per probe; for the resident
  operator (``sharpness.resident``, CUDA graphs) its refresh, the replay of
  the recorded build;
* **rest**: everything else in the probe — LOBPCG's small dense algebra,
  orthogonalisation, host synchronisations, the preconditioner, copies.

Each timer synchronises the device, so the parts add up to the probe's wall
time.  Also prints the training step's own time, one product timed alone in
a loop (gradient graph reused; with and without CUDA graphs), and a
torch.profiler table of one probed step (top operators by self CPU time, and
how often the host waited for the device).

    python -m bench.probe_profile --preset small --batch 64 --device cuda --steps 12
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from bench.common import Problem, bench_config, device_name, seconds, sync
from trainers.curvature.hessian import EAGER_BEFORE_CAPTURE, CurvatureOperator, DoubleBackwardHessian, HessianOperator
from trainers.curvature.probe import SharpnessProbe

SYNC_OPS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync", "cudaEventSynchronize")
PARTS = ("products", "graph")


class PartTimer:
    """Wall-clock seconds per part, the device synchronised around each."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self.columns = 0

    @contextmanager
    def part(self, name: str):
        sync(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            sync(self.device)
            self.seconds[name] += time.perf_counter() - t0

    def reset(self) -> None:
        self.seconds.clear()
        self.columns = 0


class TimedHessian(CurvatureOperator):
    """``H`` with its gradient-graph build and its products timed apart."""

    def __init__(self, H: HessianOperator, timer: PartTimer):
        super().__init__(H.n, H.dtype, H.device)
        self.H, self.timer = H, timer
        self._prepared = False

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        if not self._prepared:
            with self.timer.part("graph"):
                self.H.prepare()
            self._prepared = True
        with self.timer.part("products"):
            out = self.H(V)
        self.timer.columns += V.shape[1]
        return out

    def at(self, precision: str) -> "TimedHessian":
        view = TimedHessian(self.H.at(precision), self.timer)
        view._prepared = self._prepared
        return view

    @property
    def resident(self) -> bool:
        return self.H.resident

    def refresh(self) -> bool:
        """A resident operator brought to the current parameters (its recorded
        gradient-graph build replayed): timed as a graph build."""
        with self.timer.part("graph"):
            ok = self.H.refresh()
        self._prepared = ok
        return ok

    def close(self) -> None:
        self.H.close()


class TimedProbe(SharpnessProbe):
    """The probe, its Hessian operator timed by ``timer``."""

    def __init__(self, *args, timer: PartTimer, **kwargs):
        super().__init__(*args, **kwargs)
        self.timer = timer

    def hessian(self, loss_fn, params, model) -> TimedHessian:
        return TimedHessian(super().hessian(loss_fn, params, model), self.timer)


@dataclass
class StepTimes:
    probe: float
    products: float
    graph: float
    columns: int
    train: float
    eig_hvps: int


@dataclass
class Profile:
    steps: list[StepTimes] = field(default_factory=list)
    single_product_ms: dict = field(default_factory=dict)   # (precision label, CUDA graphs on) -> ms


def profile_steps(pb: Problem, probe: TimedProbe, steps: int) -> list[StepTimes]:
    out = []
    for _ in range(steps):
        probe.timer.reset()
        t_probe, cols = seconds(lambda: probe.measure(pb.model, pb.loss, pb.optimizer, pb.lr), pb.device)
        parts = dict(probe.timer.seconds)
        columns = probe.timer.columns
        t_train, _ = seconds(pb.train_step, pb.device)
        out.append(StepTimes(t_probe, parts.get("products", 0.0), parts.get("graph", 0.0), columns, t_train,
                             cols["eig_hvps"]))
    return out


def single_products(pb: Problem, cuda_graphs: bool, timer: PartTimer) -> dict:
    """ms of one product alone, gradient graph reused, per precision and with
    CUDA graphs off and (where asked for) on."""
    out = {}
    V = torch.randn(pb.n, 1, device=pb.device)
    for precision in ("float32", "tf32"):
        for graphs in sorted({False, cuda_graphs}):
            with DoubleBackwardHessian(pb.loss, pb.params, model=pb.model, precision=precision,
                                       cuda_graphs=graphs) as H:
                for _ in range(EAGER_BEFORE_CAPTURE + 1):   # with CUDA graphs: eager products, then the capture
                    H(V)
                timer.reset()
                with timer.part("products"):
                    for _ in range(10):
                        H(V)
                out[precision, H.graphed] = timer.seconds["products"] / 10 * 1e3
    return out


def main(argv=None) -> Profile:
    ap = argparse.ArgumentParser(prog="python -m bench.probe_profile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
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

    cfg = bench_config(preset=args.preset, image_size=args.image_size, batch=args.batch, device=args.device,
                       lr=args.lr, overrides=args.set)
    pb = Problem(cfg)
    timer = PartTimer(pb.device)
    probe = TimedProbe(cfg.sharpness, cfg.optim, timer=timer)
    profile = Profile(profile_steps(pb, probe, args.steps))
    kept = profile.steps[min(args.skip, len(profile.steps) - 1):]

    def mean(xs):
        return statistics.fmean(xs) if xs else float("nan")

    probe_s = mean([s.probe for s in kept])
    prods = mean([s.products for s in kept])
    graph = mean([s.graph for s in kept])
    cols = mean([s.columns for s in kept])
    print(f"# probe profile: preset {args.preset}, batch {args.batch}, {args.image_size}x{args.image_size}, "
          f"{device_name(pb.device)}, torch {torch.__version__}")
    print(f"# config overrides: {args.set or 'none'}; steps {args.skip}..{args.steps - 1} averaged")
    print()
    print("| part | seconds per probed step | share of the probe |")
    print("|---|---|---|")
    for label, t in (("products", prods), ("gradient graph builds", graph),
                     ("rest (solver, syncs, copies)", probe_s - prods - graph)):
        print(f"| {label} | {t:.3f} | {t / probe_s:.0%} |")
    print(f"| **probe total** | **{probe_s:.3f}** | 100% |")
    print(f"| training step (without the probe) | {mean([s.train for s in kept]):.4f} | — |")
    print()
    print(f"products per probed step: {cols:.1f} → {prods / max(cols, 1e-9) * 1e3:.1f} ms per product in the solver; "
          f"λ₁(P⁻¹H) HVPs logged: {mean([s.eig_hvps for s in kept]):.1f}")

    # one product alone, graph reused, float32 and TF32 (the trained model, its Hessian batch)
    profile.single_product_ms = single_products(pb, cfg.sharpness.cuda_graphs, timer)
    for (precision, graphed), ms in profile.single_product_ms.items():
        label = "float32" if precision == "float32" else "TF32"
        print(f"one product alone ({label}, gradient graph reused, CUDA graphs {'on' if graphed else 'off'}): "
              f"{ms:.1f} ms")

    if args.rows > 0:
        # torch.profiler over one warm probe of the trained run
        from torch.profiler import ProfilerActivity, profile as torch_profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if pb.device.type == "cuda" else [])
        with torch_profile(activities=acts) as prof:
            probe.measure(pb.model, pb.loss, pb.optimizer, pb.lr)
        events = prof.key_averages()
        waits = {e.key: e.count for e in events if e.key in SYNC_OPS}
        print(f"\nhost waits in one warm probe: {waits or 'none recorded'}")
        print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
        if pb.device.type == "cuda":
            print(events.table(sort_by="self_cuda_time_total", row_limit=args.rows))
    return profile


if __name__ == "__main__":
    main()
