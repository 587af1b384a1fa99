"""What λ₁ at every step costs in wall time, and how close it is to a tight reference.

In one process, on the project's own Trainer (``base`` variant, Adam,
training batch = Hessian batch), :class:`~bench.common.Problem` trains

0. ``--warmup`` untimed steps (the probe's cost past the first steps of a run),
1. ``--steps`` plain steps (no probe), then
2. for each probe setting in ``--settings``, ``--steps`` more steps with the
   probe measuring before every update, as the training loop does —

and prints the median wall time of a step of each (the first ``--skip`` of
each segment left out: the cold solve and the CUDA-graph captures), their
ratio to a plain step, Hessian-vector products per probe and the peak GPU memory of each segment.
The settings:

* ``precond``: λ₁(P⁻¹H) only (``sharpness.plain_lambda: false``), the defaults otherwise;
* ``both``: λ₁(P⁻¹H) and λ₁(H), the defaults users get;
* ``precond-per-probe``: ``precond`` with the Hessian operator made anew at
  every probe (``sharpness.resident: false``: gradient graph built and CUDA
  graphs recorded per probe), the default before the resident operator;
* ``counted``: both, with up to 8 eigenvalues above 0.75 × threshold counted
  (``sharpness.above_cap: 8``);
* ``precond-verify1``, ``precond-verify10``, ``both-verify1``, ``both-verify10``:
  λ₁ checked with float32 products at every probe or every 10th
  (``sharpness.verify_every``; the others report the TF32 value corrected by
  the last check);
* ``lobpcg``: both, with the previous warm solver (``sharpness.solver: lobpcg``:
  LOBPCG from the last vectors, every answer checked with float32 products).

At ``--checks`` probed steps of each setting in ``--check-settings``
(evenly spaced), after the probe and before the update, an independent reference solves the operators the
probe measured: scipy's ARPACK (``eigsh``,
``which='LA'``, ``tol`` 1e-6) over a plain double-backward Hessian-vector
product written here (``torch.autograd.grad`` twice, float32 arithmetic,
TF32 off, none of the project's operators), started from a random vector.
The table gives the relative error of the probe's λ at those steps and the
share within 1e-3, and apart the largest error at checked steps whose probe
did not check its λ with float32 products (``sharpness.verify_every``).  Reference solves are not timed.

    python -m bench.probe_overhead --preset small --batch 128 --device cuda --data .devdata/cifar10-5k-train.npz --steps 20
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from bench.common import Problem, bench_config, device_name, log, sync
from trainers.config import merge, run_config
from trainers.curvature.hessian import CurvatureOperator, HessianOperator, flatten
from trainers.curvature.probe import SharpnessProbe, has_tf32
from trainers.curvature.thresholds import adam_preconditioner

SETTINGS = {
    "precond": {"plain_lambda": False},
    "both": {},
    "precond-per-probe": {"plain_lambda": False, "resident": False},   # the operator rebuilt at every probe
    "lobpcg": {"solver": "lobpcg"},
    "counted": {"above_cap": 8},
    "precond-verify1": {"plain_lambda": False, "verify_every": 1},   # every probe's λ float32-checked
    "precond-verify10": {"plain_lambda": False, "verify_every": 10},
    "both-verify1": {"verify_every": 1},
    "both-verify10": {"verify_every": 10},
    "precond-batched": {"plain_lambda": False, "hvp": "double_backward_batched"},   # one vmapped pass per block
    "both-batched": {"hvp": "double_backward_batched"},
}


# ---------------------------------------------------------------------------
# the independent reference


def reference_lambdas(pb: Problem, tol: float = 1e-6, seed: int = 0,
                      keys: tuple = ("lambda_max", "lambda_precond")) -> dict:
    """λ₁(H) (``lambda_max``) and λ₁(P^{-1/2} H P^{-1/2}) (``lambda_precond``),
    those named in ``keys``, by ARPACK over a plain double-backward HVP."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    matmul, cudnn = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    try:
        params = pb.params
        loss = pb.loss()
        grads = torch.autograd.grad(loss, params, create_graph=True)
        P = adam_preconditioner(pb.optimizer, params, pb.cfg.sharpness.adam_preconditioner)
        d = None if P is None else flatten(P).double().rsqrt()

        def hvp(v: np.ndarray, scale) -> np.ndarray:
            x = torch.from_numpy(v.reshape(-1)).to(pb.device, torch.float64)
            if scale is not None:
                x = x * scale
            parts, off = [], 0
            for p in params:
                parts.append(x[off:off + p.numel()].view_as(p).to(p.dtype))
                off += p.numel()
            hv = torch.autograd.grad(grads, params, parts, retain_graph=True)
            out = torch.cat([h.reshape(-1) for h in hv]).double()
            if scale is not None:
                out = out * scale
            return out.cpu().numpy()

        rng = np.random.default_rng(seed)
        out, t0, calls = {}, time.perf_counter(), [0]
        for key, scale in (("lambda_max", None), ("lambda_precond", d)):
            if key not in keys or (key == "lambda_precond" and scale is None):
                continue
            def matvec(v, s=scale):
                calls[0] += 1
                return hvp(v, s)
            op = LinearOperator((pb.n, pb.n), matvec=matvec, dtype=np.float64)
            vals = eigsh(op, k=1, which="LA", tol=tol, v0=rng.standard_normal(pb.n), ncv=20,
                         return_eigenvectors=False)
            out[key] = float(vals[-1])
        log(f"reference at step {pb.step}: {out} ({calls[0]} products, {time.perf_counter() - t0:.1f} s)")
        return out
    finally:
        torch.set_float32_matmul_precision(matmul)
        torch.backends.cudnn.allow_tf32 = cudnn


# ---------------------------------------------------------------------------
# counting the probe's products


class CountedHessian(CurvatureOperator):
    """The probe's Hessian operator, its products counted: ``counter[0]`` all of
    them, ``counter[1]`` those at float32 precision (the rest are TF32)."""

    def __init__(self, H: HessianOperator, counter: list):
        super().__init__(H.n, H.dtype, H.device)
        self.H, self.counter = H, counter

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        self.counter[0] += V.shape[1]
        if getattr(self.H, "precision", "float32") == "float32":
            self.counter[1] += V.shape[1]
        return self.H(V)

    def at(self, precision: str) -> "CountedHessian":
        return CountedHessian(self.H.at(precision), self.counter)

    def gradient(self):
        return self.H.gradient()

    @property
    def resident(self) -> bool:
        return self.H.resident

    def refresh(self) -> bool:
        return self.H.refresh()

    def close(self) -> None:
        self.H.close()


class CountedProbe(SharpnessProbe):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.counter = [0, 0]   # products, of them float32

    def hessian(self, loss_fn, params, model) -> CountedHessian:
        return CountedHessian(super().hessian(loss_fn, params, model), self.counter)


# ---------------------------------------------------------------------------
# the run


def peak_memory(device, reset: bool = False) -> str:
    """The peak GPU memory allocated since the last reset, in GiB ("—" on the CPU)."""
    if torch.device(device).type != "cuda":
        return "—"
    if reset:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return ""
    return f"{torch.cuda.max_memory_allocated(device) / 2 ** 30:.1f}"


@dataclass
class Segment:
    name: str
    step_s: list = field(default_factory=list)
    products: list = field(default_factory=list)
    exact: list = field(default_factory=list)   # float32 products per probe
    errors: dict = field(default_factory=lambda: {"lambda_max": [], "lambda_precond": []})
    unchecked: list = field(default_factory=list)   # errors of the main λ at probes without a float32 check
    residuals: list = field(default_factory=list)
    checks: list = field(default_factory=list)
    above: list = field(default_factory=list)   # n_above per probe (None: not counted)


def timed_step(pb: Problem, probe=None, check: bool = False, seg: Segment = None):
    sync(pb.device)
    t0 = time.perf_counter()
    cols = probe.measure(pb.model, pb.loss, pb.optimizer, pb.lr) if probe is not None else None
    sync(pb.device)
    dt = time.perf_counter() - t0
    # the reference (untimed) at the same parameters, of the operators the probe measured
    ref = reference_lambdas(pb, keys=tuple(k for k in ("lambda_max", "lambda_precond") if cols.get(k) is not None)) \
        if check and cols is not None else None
    sync(pb.device)
    t0 = time.perf_counter()
    pb.train_step()
    sync(pb.device)
    dt += time.perf_counter() - t0
    if seg is not None:
        seg.step_s.append(dt)
        if cols is not None:
            seg.residuals.append(cols["eig_residual"])
            seg.above.append(cols.get("n_above"))
            if cols.get("eig_check") is not None:
                seg.checks.append(cols["eig_check"])
        if ref is not None:
            for key, val in ref.items():
                if cols.get(key) is not None:
                    seg.errors[key].append(abs(cols[key] - val) / abs(val))
            solved = "lambda_precond" if cols.get("lambda_precond") is not None else "lambda_max"
            tf32 = has_tf32(pb.device) and probe.cfg.search_precision == "tf32"   # else nothing is checked
            if tf32 and cols.get("eig_check") is None and solved in ref and seg.errors[solved]:
                seg.unchecked.append(seg.errors[solved][-1])
            log(f"{seg.name} step {pb.step - 1}: probe {cols['lambda_precond']} / {cols['lambda_max']}, "
                f"errors {[round(seg.errors[k][-1], 7) for k in ref if seg.errors[k]]}, {cols['eig_hvps']} products")
    return cols


def check_steps(skip: int, steps: int, checks: int) -> set:
    """``checks`` step indices evenly spaced over [skip, steps)."""
    if checks <= 0 or steps <= skip:
        return set()
    span = steps - skip
    return {skip + (j * span) // checks for j in range(min(checks, span))}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench.probe_overhead", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=128, help="training and Hessian batch")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--data", default=None, help="npz file of uint8 images (default: synthetic)")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--warmup", type=int, default=0, help="untimed training steps before the first segment "
                                                          "(measures a run past its first steps)")
    ap.add_argument("--steps", type=int, default=30, help="steps per segment")
    ap.add_argument("--skip", type=int, default=5, help="first steps of each segment left out of the medians")
    ap.add_argument("--checks", type=int, default=5, help="reference solves per checked setting, evenly spaced "
                                                          "over its steps after --skip (0: none)")
    ap.add_argument("--check-settings", default="precond,both", help="settings whose steps are checked")
    ap.add_argument("--settings", default="precond,both,lobpcg", help=f"comma list of {', '.join(SETTINGS)}")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = ap.parse_args(argv)
    names = [s for s in args.settings.split(",") if s]
    unknown = set(names) - set(SETTINGS)
    if unknown:
        ap.error(f"--settings: unknown {sorted(unknown)}; choose from {', '.join(SETTINGS)}")

    cfg = bench_config(preset=args.preset, image_size=args.image_size, batch=args.batch, device=args.device,
                       data=args.data, lr=args.lr, overrides=args.set)
    pb = Problem(cfg)
    for i in range(args.warmup):
        pb.train_step()
        if (i + 1) % 100 == 0 or i + 1 == args.warmup:
            log(f"warm-up: {i + 1} of {args.warmup} steps")
    plain = Segment("plain")
    peak_memory(pb.device, reset=True)
    for _ in range(args.steps):
        timed_step(pb, seg=plain)
    log(f"plain: median step {statistics.median(plain.step_s[args.skip:]) * 1e3:.1f} ms")
    def med(xs):
        return statistics.median(xs) if xs else float("nan")

    base = med(plain.step_s[args.skip:])
    plain_peak = peak_memory(pb.device)
    print(f"# probe overhead: preset {args.preset} ({pb.n:,} parameters), batch {args.batch} = Hessian batch, "
          f"{args.image_size}x{args.image_size}, {device_name(pb.device)}, torch {torch.__version__}, "
          f"data {args.data or 'synthetic'}, Adam lr {args.lr}, {time.strftime('%Y-%m-%d')}")
    print(f"# {args.warmup} untimed steps first, {args.steps} steps per segment, medians of steps >= {args.skip}; overrides: {args.set or 'none'}")
    print()
    print("| setting | step ms | × plain step | products per probe (float32) | λ₁(P⁻¹H) err: median / max / ≤1e-3 "
          "| λ₁(H) err: median / max / ≤1e-3 | of them unchecked: max (n) | residual median | TF32 check median "
          "| n_above mean / max | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| plain step | {base * 1e3:.1f} | 1.00 | — | — | — | — | — | — | — | {plain_peak} |", flush=True)
    summary = {"plain_ms": base * 1e3, "settings": {}}
    for name in names:   # each setting's row is printed as soon as it is measured
        run_cfg = run_config(merge(cfg.to_dict(), {"sharpness": SETTINGS[name]}))
        probe = CountedProbe(run_cfg.sharpness, run_cfg.optim)
        seg = Segment(name)
        peak_memory(pb.device, reset=True)
        checked = check_steps(args.skip, args.steps, args.checks if name in args.check_settings.split(",") else 0)
        for i in range(args.steps):
            before, before_exact = probe.counter
            timed_step(pb, probe, check=i in checked, seg=seg)
            seg.products.append(probe.counter[0] - before)
            seg.exact.append(probe.counter[1] - before_exact)
        memory = peak_memory(pb.device)
        probe.close()   # its resident operator's memory
        t = med(seg.step_s[args.skip:])
        prods = statistics.fmean(seg.products[args.skip:]) if seg.products[args.skip:] else float("nan")
        exact = statistics.fmean(seg.exact[args.skip:]) if seg.exact[args.skip:] else float("nan")

        def err(key):
            e = seg.errors[key]
            if not e:
                return "—", None
            within = sum(x <= 1e-3 for x in e) / len(e)
            return f"{med(e):.1e} / {max(e):.1e} / {within:.0%} of {len(e)}", within
        ep, wp = err("lambda_precond")
        eh, wh = err("lambda_max")
        res = med([r for r in seg.residuals[args.skip:] if r is not None])
        chk = f"{med(seg.checks):.1e}" if seg.checks else "—"
        counted = [a for a in seg.above[args.skip:] if a is not None]
        above = f"{statistics.fmean(counted):.1f} / {max(counted)}" if counted else "—"
        unchecked = f"{max(seg.unchecked):.1e} ({len(seg.unchecked)})" if seg.unchecked else "— (0)"
        print(f"| {seg.name} | {t * 1e3:.1f} | {t / base:.2f} | {prods:.1f} ({exact:.1f}) | {ep} | {eh} | {unchecked} "
              f"| {res:.1e} | {chk} | {above} | {memory} |", flush=True)
        summary["settings"][seg.name] = {"step_ms": t * 1e3, "ratio": t / base, "products": prods, "float32_products": exact,
                                         "within_precond": wp, "within_plain": wh,
                                         "errors": seg.errors, "unchecked_errors": seg.unchecked, "residual": res,
                                         "n_above": counted}
    return summary


if __name__ == "__main__":
    main()
