"""Benchmark of the sharpness probe: cost and accuracy of λ₁ estimates.

One run, on one model and one frozen Hessian batch, measures

1. the cost of a Hessian-vector product relative to a gradient, for every
   implementation in :mod:`trainers.curvature.hessian` and for the two reference
   packages (``pyhessian``, ``hessian-eigenthings``);
2. cold starts: Hessian-vector products (HVPs) and seconds until λ₁ is within
   1e-3 (relative) of a tight reference, and where each solver stops by its
   own rule — block LOBPCG (ours), PyHessian's power iteration,
   hessian-eigenthings' power iteration and Lanczos;
3. warm starts along a real Adam trajectory: per training step, HVPs of the
   residual-stopped LOBPCG solve of λ₁(P⁻¹H) and λ₁(H), and of a warm-started
   power iteration, with the error of each reported λ against a tight
   reference solved at every step.

On GPUs with TF32 the probe's default searches with TF32 products and checks
the answer with float32 ones (``sharpness.search_precision``); its cost is
given in HVP-equivalents: TF32 products weighted by their measured time over
a float32 product's, plus the float32 products.

Usage (CPU, a few minutes; GPU with the paper-sized U-Net)::

    python bench/sharpness_bench.py --preset tiny --image-size 16 --batch 16 --device cpu
    python bench/sharpness_bench.py --preset ddpm-cifar10 --batch 128 --device cuda \
        --data .devdata/cifar10-6k.npz --results bench/RESULTS.md

The Markdown tables are printed and, with ``--results``, appended to that file
with the device, command and date.
"""
from __future__ import annotations

import argparse
import datetime
import math
import platform
import shlex
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainers.config import DataConfig, OptimConfig, ScheduleConfig, SharpnessConfig, VariantConfig  # noqa: E402
from trainers.run.data import load_images, to_model_range  # noqa: E402
from trainers.curvature.hessian import METHODS, HessianOperator, flatten, hessian_vector_product, trainable_parameters  # noqa: E402
from trainers.curvature.lobpcg import lobpcg  # noqa: E402
from trainers.curvature.thresholds import adam_preconditioner  # noqa: E402
from trainers.run.optimizers import build_optimizer  # noqa: E402
from trainers.diffusion.schedules import NoiseSchedule  # noqa: E402
from trainers.curvature.probe import (SharpnessProbe, exact_float32, has_tf32, top_eigenpairs,  # noqa: E402
                                warm_start_transport, with_tf32)
from trainers.diffusion.unet import build_unet, count_parameters  # noqa: E402
from trainers.diffusion.variants import build_variant  # noqa: E402

ACC = 1e-3   # "accurate": |λ − λ_ref| ≤ ACC·|λ_ref|


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, reps: int):
    """(median seconds, last result) of ``reps`` calls after one warm-up call."""
    out = fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def first_accurate(trajectory, ref):
    """Products at the first point of [(products, λ)] within ACC of ref."""
    for products, lam, *_ in trajectory:
        if abs(lam - ref) <= ACC * abs(ref):
            return products
    return None


def fmt(x, digits=3):
    if x is None:
        return "—"
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        return f"{x:.{digits}g}" if abs(x) < 1e5 else f"{x:.4e}"
    return str(x)


def table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# set-up


class Problem:
    """Model, frozen Hessian batch, training batches and an Adam optimizer."""

    def __init__(self, args, device):
        torch.manual_seed(args.seed)
        self.device = device
        data = (DataConfig(name="npz", path=args.data, image_size=args.image_size) if args.data
                else DataConfig(name="synthetic", image_size=args.image_size, synthetic_size=max(4 * args.batch, 256)))
        self.images = load_images(data)
        self.model = build_unet(args.preset, args.image_size, 3, dropout=0.0).to(device)
        self.params = trainable_parameters(self.model)
        self.schedule = NoiseSchedule.from_config(ScheduleConfig())
        self.variant = build_variant(VariantConfig(), self.schedule)
        self.optim_cfg = OptimConfig(name="adam", lr=args.lr)
        self.optimizer = build_optimizer(self.optim_cfg, self.params)
        g = torch.Generator(device="cpu").manual_seed(args.seed)
        x0 = to_model_range(self.images[:args.batch]).to(device)
        self.frozen = self.variant.draw(x0.cpu(), g, 0).to(device)
        self.batch = args.batch
        self.gen = torch.Generator(device="cpu").manual_seed(args.seed + 1)

    def loss(self) -> torch.Tensor:
        return self.variant.loss(self.model, self.frozen).mean()

    def train_step(self) -> float:
        idx = torch.randint(0, len(self.images), (self.batch,), generator=self.gen)
        draw = self.variant.draw(to_model_range(self.images[idx]), self.gen, 0).to(self.device)
        self.model.train()
        self.model.set_fused_attention(True)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.variant.loss(self.model, draw).mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.eval()
        self.model.set_fused_attention(False)
        return float(loss.detach())

    def probe_mode(self) -> None:
        self.model.eval()
        self.model.set_fused_attention(False)

    def precond_scale(self) -> torch.Tensor:
        P = adam_preconditioner(self.optimizer, self.params)
        return flatten(P).rsqrt()[:, None]


def precond_operator(H, d):
    return lambda Y: d * H(d * Y)


def reference(op, n, dtype, device, X0, args):
    """Tight λ₁ (and the vectors, to warm-start the next reference)."""
    r = lobpcg(op, X0, n=n, k=args.ref_block, nwanted=1, tol=args.ref_tol, max_iters=args.ref_iters,
               generator=torch.Generator().manual_seed(7), dtype=dtype, device=device)
    return float(r.eigenvalues[0]), r


def run_lobpcg(op, X0, n, dtype, device, args, guard_tol=None, gen_seed=0, tol=None, search_tf32=False):
    """One residual-stopped solve; ``search_tf32``: the probe's TF32 search +
    float32 check (:func:`trainers.curvature.lobpcg.lobpcg_verified`).  The trajectory
    is [(products, θ₁, residual₁)], products of both kinds counted as 1."""
    traj = []
    tol = args.tol if tol is None else tol
    kw = dict(n=n, k=args.block_size, nwanted=1, tol=tol, guard_tol=guard_tol, max_iters=args.max_iters,
              accuracy=args.accuracy or None,
              generator=torch.Generator().manual_seed(gen_seed), dtype=dtype, device=device,
              callback=lambda it, p, theta, rel: traj.append((p, float(theta[0]), float(rel[0]))))
    sync(device)
    t0 = time.perf_counter()
    r = top_eigenpairs(op, X0, search_tf32=search_tf32, **kw)
    sync(device)
    return r, traj, time.perf_counter() - t0


def equivalents(products: int, fast_products: int, tf32_ratio: float) -> float:
    """HVP-equivalents of a solve whose first ``fast_products`` products were
    TF32 ones costing ``tf32_ratio`` float32 products each."""
    return min(products, fast_products) * tf32_ratio + max(0, products - fast_products)


def first_accurate_equivalents(traj, ref, fast_products, tf32_ratio):
    p = first_accurate(traj, ref)
    return None if p is None else equivalents(p, fast_products, tf32_ratio)


def hvp_times(pb: "Problem", reps: int):
    """Seconds of a float32 gradient, a float32 HVP (graph reused, the probe's
    product) and the same HVP with TF32 (the probe's search products), and
    the TF32 product's relative difference from the float32 one."""
    device = pb.device
    with exact_float32():
        t_grad, _ = timed(lambda: torch.autograd.grad(pb.loss(), pb.params), device, reps)
        with HessianOperator(pb.loss, pb.params, model=pb.model) as H:
            v = torch.randn(H.n, 1, generator=torch.Generator().manual_seed(0)).to(device)
            H(v)
            t_hvp, hv = timed(lambda: H(v), device, reps)
            t_tf32, hv_tf32 = timed(lambda: with_tf32(H)(v), device, reps)
    return t_grad, t_hvp, t_tf32, float((hv_tf32 - hv).norm() / hv.norm())


def power_iteration(op, v0, max_iter, tol):
    """hessian-eigenthings' power iteration on a flat operator; returns
    (λ, v, products, converged, trajectory)."""
    from hessian_eigenthings import LambdaOperator, power_iteration_one

    traj = []

    def matvec(v):
        out = op(v[:, None])[:, 0]
        traj.append((len(traj) + 1, float(v @ out)))
        return out
    lam_op = LambdaOperator(matvec, size=v0.shape[0], device=v0.device, dtype=v0.dtype)
    lam, v, _res, iters, conv = power_iteration_one(lam_op, max_iter=max_iter, tol=tol, init=v0)
    return lam, v, len(traj), conv, traj


def lanczos_on(op, n, device, dtype, iters):
    """hessian-eigenthings' Lanczos (full re-orthogonalisation) on a flat
    operator from a seeded random start; returns [(products, top Ritz value)]
    for every prefix of the tridiagonal matrix (the m-step Lanczos estimate)."""
    from hessian_eigenthings import LambdaOperator
    from hessian_eigenthings.algorithms.lanczos import _build_tridiag_matrix, lanczos_tridiagonal

    lam_op = LambdaOperator(lambda v: op(v[:, None])[:, 0], size=n, device=device, dtype=dtype)
    v0 = torch.randn(n, generator=torch.Generator().manual_seed(11)).to(device=device, dtype=dtype)
    td = lanczos_tridiagonal(lam_op, v0, iters, reorthogonalize=True)
    T = _build_tridiag_matrix(td).double().cpu()
    return [(m, float(torch.linalg.eigvalsh(T[:m, :m])[-1])) for m in range(1, T.shape[0] + 1)]


# ---------------------------------------------------------------------------
# the parts


def part_costs(pb: Problem, args, out: list):
    device = pb.device
    log("costs: gradient and Hessian-vector products")
    n = sum(p.numel() for p in pb.params)
    V = torch.randn(n, 2, generator=torch.Generator().manual_seed(0)).to(device)
    reps = args.reps
    rows = []
    t_grad_default, _ = timed(lambda: torch.autograd.grad(pb.loss(), pb.params), device, reps)
    with exact_float32():
        t_grad, _ = timed(lambda: torch.autograd.grad(pb.loss(), pb.params), device, reps)
        t_graph, _ = timed(lambda: torch.autograd.grad(pb.loss(), pb.params, create_graph=True), device, reps)
        rows.append(("gradient (TF32 off; the unit)", 1e3 * t_grad, 1.0, None, "—"))
        rows.append(("gradient, default TF32 flags", 1e3 * t_grad_default, t_grad_default / t_grad, None, "—"))
        rows.append(("gradient graph for double backward (create_graph)", 1e3 * t_graph, t_graph / t_grad, None,
                     "once per probe"))
        ref = None
        with HessianOperator(pb.loss, pb.params, method="double_backward", fast_conv=False) as H:
            H(V[:, :1])
            t, ref = timed(lambda: H(V), device, reps)
        rows.append(("HVP double backward, graph reused, built-in conv double backward", 1e3 * t / 2, t / 2 / t_grad,
                     0.0, "ok"))
        with HessianOperator(pb.loss, pb.params, method="double_backward", model=pb.model) as H:
            sync(device)
            t0 = time.perf_counter()
            H(V[:, :1])
            sync(device)
            t_fast_graph = time.perf_counter() - t0
            t, hv = timed(lambda: H(V), device, reps)
            rows.append(("HVP double backward, graph reused, fast conv double backward (probe default; graph + first "
                         f"product {t_fast_graph / t_grad:.2f}× gradient)", 1e3 * t / 2, t / 2 / t_grad,
                         float((hv - ref).norm() / ref.norm()), "ok"))
            if has_tf32(device):
                t, hv = timed(lambda: with_tf32(H)(V), device, reps)
                rows.append(("HVP as above with TF32 (the probe's search products; float32 graph)", 1e3 * t / 2,
                             t / 2 / t_grad, float((hv - ref).norm() / ref.norm()), "ok"))
        t, hv = timed(lambda: hessian_vector_product(pb.loss, pb.params, V[:, 0]), device, max(1, reps // 2))
        rows.append(("HVP double backward from scratch (naive)", 1e3 * t, t / t_grad,
                     float((hv - ref[:, 0]).norm() / ref[:, 0].norm()), "ok"))
        for method in METHODS[1:]:
            k = 2 if method.endswith(("batched", "vmap")) else 1
            try:
                with HessianOperator(pb.loss, pb.params, method=method, model=pb.model) as H:
                    t, hv = timed(lambda: H(V[:, :k]), device, reps)
                err = float((hv - ref[:, :k]).norm() / ref[:, :k].norm())
                rows.append((f"HVP {method}" + (f" (block of {k}, per vector)" if k > 1 else ""), 1e3 * t / k,
                             t / k / t_grad, err, "ok"))
            except Exception as e:  # noqa: BLE001 - report, keep benchmarking
                msg = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
                log(f"{method} failed: {msg}")
                if args.verbose:
                    traceback.print_exc()
                rows.append((f"HVP {method}", None, None, None, f"FAILED: {msg}"))
        if device.type == "cuda":
            # cuDNN autotuning: each convolution shape (the double backward has
            # new ones) gets the fastest algorithm after a timing run
            before = torch.backends.cudnn.benchmark
            torch.backends.cudnn.benchmark = True
            try:
                t_g, _ = timed(lambda: torch.autograd.grad(pb.loss(), pb.params), device, reps)
                rows.append(("gradient, cudnn.benchmark on", 1e3 * t_g, t_g / t_grad, None, "—"))
                with HessianOperator(pb.loss, pb.params, method="double_backward", model=pb.model) as H:
                    H(V[:, :1])
                    t, _ = timed(lambda: H(V), device, reps)
                rows.append(("HVP double backward (fast conv), graph reused, cudnn.benchmark on (× that gradient: "
                             f"{t / 2 / t_g:.2f})", 1e3 * t / 2, t / 2 / t_grad, None, "ok"))
                with HessianOperator(pb.loss, pb.params, method="forward_over_reverse_vmap", model=pb.model) as H:
                    t, _ = timed(lambda: H(V), device, reps)
                rows.append(("HVP forward_over_reverse_vmap (block of 2), cudnn.benchmark on (× that gradient: "
                             f"{t / 2 / t_g:.2f})", 1e3 * t / 2, t / 2 / t_grad, None, "ok"))
            finally:
                torch.backends.cudnn.benchmark = before
        rows += reference_package_costs(pb, V, ref, t_grad, reps)
    out.append("### Cost of one Hessian-vector product\n")
    out.append(table(["implementation", "ms per vector", "× gradient", "rel. diff. vs double backward", "status"],
                     rows))
    return t_grad, t_graph, rows


def _pyhessian_inputs(pb: Problem):
    """PyHessian wants model(inputs) and criterion(outputs, targets): wrap the
    U-Net so that it sees the frozen x_t and t (same loss as the variant's)."""
    import torch.nn as nn
    import torch.nn.functional as F

    x_t = pb.schedule.q_sample(pb.frozen.x0, pb.frozen.t, pb.frozen.input_noise)

    class Wrapped(nn.Module):
        def __init__(self, unet, t):
            super().__init__()
            self.unet = unet
            self.t = t

        def forward(self, x):
            return self.unet(x, self.t.float())
    return Wrapped(pb.model, pb.frozen.t), x_t, pb.frozen.noise, (lambda out, target: F.mse_loss(out.float(), target))


def reference_package_costs(pb: Problem, V, ref, t_grad, reps):
    rows = []
    try:
        from pyhessian import hessian as PyHessian

        wrapped, x_t, noise, crit = _pyhessian_inputs(pb)
        sync(pb.device)
        t0 = time.perf_counter()
        hess = PyHessian(wrapped, crit, data=(x_t, noise), cuda=pb.device.type == "cuda")
        sync(pb.device)
        t_init = time.perf_counter() - t0
        from pyhessian.utils import hessian_vector_product as py_hvp
        from trainers.curvature.hessian import unflatten
        v = unflatten(V[:, 0].contiguous(), hess.params)
        t, hv = timed(lambda: py_hvp(hess.gradsH, hess.params, v), pb.device, reps)
        err = float((flatten(hv) - ref[:, 0]).norm() / ref[:, 0].norm())
        rows.append(("PyHessian HVP (graph reused; set-up " + f"{t_init / t_grad:.2f}× gradient)", 1e3 * t, t / t_grad,
                     err, "ok"))
        for p in pb.params:   # PyHessian leaves the gradient graph in .grad
            p.grad = None
        del hess
    except Exception as e:  # noqa: BLE001
        rows.append(("PyHessian HVP", None, None, None, f"FAILED: {type(e).__name__}: {e}"))
    try:
        from hessian_eigenthings import HessianOperator as HEOperator

        op = HEOperator(pb.model, [pb.frozen], lambda model, d: pb.variant.loss(model, d).mean())
        t, hv = timed(lambda: op.matvec(V[:, 0].contiguous()), pb.device, max(1, reps // 2))
        err = float((hv - ref[:, 0]).norm() / ref[:, 0].norm())
        rows.append(("hessian-eigenthings HVP (autograd, rebuilt per product)", 1e3 * t, t / t_grad, err, "ok"))
    except Exception as e:  # noqa: BLE001
        rows.append(("hessian-eigenthings HVP", None, None, None, f"FAILED: {type(e).__name__}: {e}"))
    return rows


def part_cold(pb: Problem, args, out: list, t_grad: float, t_hvp: float, tf32_ratio: float):
    device = pb.device
    n = sum(p.numel() for p in pb.params)
    dtype = pb.params[0].dtype
    rows = []
    summary = {}
    with exact_float32():
        H = HessianOperator(pb.loss, pb.params, model=pb.model)
        d = pb.precond_scale()
        ops = {"H": H, "P⁻¹H": precond_operator(H, d)}
        refs = {}
        for name, op in ops.items():
            log(f"cold: reference λ₁({name})")
            lam, r = reference(op, n, dtype, device, None, args)
            refs[name] = (lam, r)
            log(f"  λ₁({name}) = {lam:.8g} (residual {float(r.residuals[0]):.1e}, {r.products} HVPs, "
                f"λ₂ = {float(r.eigenvalues[1]):.6g})")
            for label, gt in (("LOBPCG k=%d, guards to tol" % args.block_size, None),
                              ("LOBPCG k=%d, guards to √tol" % args.block_size, math.sqrt(args.tol))):
                log(f"cold: {label} on {name}")
                res, traj, secs = run_lobpcg(op, None, n, dtype, device, args, guard_tol=gt, gen_seed=11)
                acc = first_accurate(traj, lam)
                err = abs(float(res.eigenvalues[0]) - lam) / abs(lam)
                rows.append((label, name, acc, res.products, float(res.eigenvalues[0]), err,
                             float(res.residuals[0]), secs))
                summary.setdefault(name, {})[label] = (acc, res.products, err)
            if has_tf32(device):
                label = f"LOBPCG k={args.block_size}, guards to √tol, TF32 search + float32 check (HVP-equivalents)"
                log(f"cold: {label} on {name}")
                res, traj, secs = run_lobpcg(op, None, n, dtype, device, args, guard_tol=math.sqrt(args.tol),
                                             gen_seed=11, search_tf32=True)
                acc = first_accurate_equivalents(traj, lam, res.fast_products, tf32_ratio)
                eq = equivalents(res.products, res.fast_products, tf32_ratio)
                err = abs(float(res.eigenvalues[0]) - lam) / abs(lam)
                rows.append((label, name, acc, eq, float(res.eigenvalues[0]), err, float(res.residuals[0]), secs))
                summary.setdefault(name, {})[label] = (acc, eq, err)
        lam_h = refs["H"][0]
        # hessian-eigenthings power iteration (on our fast operator: HVP counts are what is compared)
        for name, op in ops.items():
            lam = refs[name][0]
            log(f"cold: power iteration on {name}")
            v0 = torch.randn(n, generator=torch.Generator().manual_seed(11)).to(device=device, dtype=dtype)
            sync(device)
            t0 = time.perf_counter()
            plam, _, prods, conv, traj = power_iteration(op, v0, args.power_iters, args.power_tol)
            sync(device)
            secs = time.perf_counter() - t0
            acc = first_accurate(traj, lam)
            rows.append(("power iteration (hessian-eigenthings, Δλ & residual < tol)", name,
                         acc if acc is not None else f"> {prods}", prods, plam, abs(plam - lam) / abs(lam), None, secs))
            summary.setdefault(name, {})["power"] = (acc, prods, abs(plam - lam) / abs(lam))
            # Lanczos, the optimal Krylov method from the same kind of start: a
            # bound on what any polynomial method can do on this spectrum
            log(f"cold: Lanczos on {name}")
            try:
                sync(device)
                t0 = time.perf_counter()
                traj = lanczos_on(op, n, device, dtype, args.lanczos_iters)
                sync(device)
                secs = time.perf_counter() - t0
            except Exception as e:  # noqa: BLE001 - report, keep benchmarking
                rows.append(("Lanczos on our operator", name, None, None, None, None, None, f"FAILED: {e}"))
                continue
            acc = first_accurate(traj, lam)
            llam = traj[-1][1]
            rows.append((f"Lanczos (hessian-eigenthings, {len(traj)} steps, full reorth.) on our operator", name,
                         acc if acc is not None else f"> {len(traj)}", len(traj), llam, abs(llam - lam) / abs(lam),
                         None, secs))
            summary.setdefault(name, {})["Lanczos"] = (acc, len(traj), abs(llam - lam) / abs(lam))
        H.close()
    more = pyhessian_cold(pb, args, lam_h)
    rows += more
    r = more[0]
    if isinstance(r[3], int):
        summary["H"]["PyHessian power"] = (r[2] if isinstance(r[2], int) else None, r[3], r[5])
    out.append("\n### Cold start: λ₁ from a random start\n")
    out.append(f"Reference: LOBPCG k={args.ref_block}, relative residual ≤ {args.ref_tol:g}: "
               + ", ".join(f"λ₁({k}) = {v[0]:.8g} (residual {float(v[1].residuals[0]):.1e})" for k, v in refs.items())
               + f". One HVP ≈ {t_hvp / t_grad:.2f} gradients here.\n")
    out.append(table(["solver", "operator", f"HVPs to {ACC:g} accuracy", "HVPs at own stop", "λ₁ at stop",
                      "rel. error at stop", "rel. residual at stop", "seconds"], rows))
    return refs, summary


def start_references(pb: Problem, args):
    n = sum(p.numel() for p in pb.params)
    with exact_float32():
        with HessianOperator(pb.loss, pb.params, model=pb.model) as H:
            ops = {"H": H, "P⁻¹H": precond_operator(H, pb.precond_scale())}
            return {name: reference(op, n, pb.params[0].dtype, pb.device, None, args) for name, op in ops.items()}


def pyhessian_cold(pb: Problem, args, lam_ref):
    try:
        from pyhessian import hessian as PyHessian
        pyh_module = sys.modules["pyhessian.hessian"]
    except Exception as e:  # noqa: BLE001
        return [("PyHessian power iteration", "H", None, None, None, None, None, f"FAILED: {e}")]
    log("cold: PyHessian power iteration")
    wrapped, x_t, noise, crit = _pyhessian_inputs(pb)
    traj = []
    original = pyh_module.hessian_vector_product

    def recording(gradsH, params, v):
        hv = original(gradsH, params, v)
        traj.append((len(traj) + 1, float(sum((a * b).sum() for a, b in zip(hv, v)))))
        return hv
    pyh_module.hessian_vector_product = recording
    try:
        with exact_float32():
            torch.manual_seed(11)
            sync(pb.device)
            t0 = time.perf_counter()
            hess = PyHessian(wrapped, crit, data=(x_t, noise), cuda=pb.device.type == "cuda")
            eig, _ = hess.eigenvalues(maxIter=args.power_iters, tol=args.power_tol)
            sync(pb.device)
            secs = time.perf_counter() - t0
    finally:
        pyh_module.hessian_vector_product = original
        for p in pb.params:
            p.grad = None
        pb.probe_mode()
    acc = first_accurate(traj, lam_ref)
    return [("PyHessian power iteration (stops on Δλ < tol)", "H", acc if acc is not None else f"> {len(traj)}",
             len(traj), float(eig[0]), abs(float(eig[0]) - lam_ref) / abs(lam_ref), None, secs)]


class WarmPolicy:
    """One way of warm-starting and stopping the per-step solve."""

    def __init__(self, label, tol, guard_tol=None, transport=False, operators=("P⁻¹H",), search_tf32=False):
        self.label, self.tol, self.guard_tol = label, tol, guard_tol
        self.transport, self.operators, self.search_tf32 = transport, operators, search_tf32


def warm_policies(args, tf32_available: bool):
    """Residual tolerances × (transported or not, guards refined or not,
    TF32 search or float32 only); the probe's own default is labelled."""
    default = SharpnessConfig().tol
    pols = []
    for tol in args.warm_tols:
        both = ("P⁻¹H", "H") if tol == default else ("P⁻¹H",)
        if tf32_available:
            label = (f"LOBPCG, tol {tol:g}, TF32 search + float32 check, guards to √tol, transported"
                     + (" (probe default)" if tol == default else ""))
            pols.append(WarmPolicy(label, tol, math.sqrt(tol), transport=True, operators=both, search_tf32=True))
        label = (f"LOBPCG, tol {tol:g}, float32, guards to √tol, transported"
                 + (" (probe default)" if tol == default and not tf32_available else ""))
        pols.append(WarmPolicy(label, tol, math.sqrt(tol), transport=True, operators=both))
    if not args.warm_variants:
        return pols
    pols.append(WarmPolicy(f"LOBPCG, tol {args.tol:g}, guards to √tol, not transported", args.tol, math.sqrt(args.tol)))
    pols.append(WarmPolicy(f"LOBPCG, tol {args.tol:g}, guards to tol, transported", args.tol, None, transport=True))
    pols.append(WarmPolicy(f"LOBPCG, tol {args.tol:g}, wanted column only, transported", args.tol, float("inf"),
                           transport=True))
    return pols


def part_warm(pb: Problem, args, out: list, refs, t_grad: float, t_hvp: float, tf32_ratio: float):
    """Per Adam step: a tight reference, then every policy's warm solve.

    'transported' warm starts carry the λ₁(P⁻¹H) vectors over to the new
    preconditioner (y ← (D_new / D_old) y, D = P^{-1/2}; see
    :func:`trainers.curvature.probe.warm_start_transport`).  Seconds include building
    the gradient graph once per step."""
    device = pb.device
    n = sum(p.numel() for p in pb.params)
    dtype = pb.params[0].dtype
    policies = warm_policies(args, has_tf32(device))
    ref_X = {name: r.vectors for name, (lam, r) in refs.items()}
    warm = {(name, p.label): ref_X[name][:, :args.block_size].clone() for name in refs for p in policies}
    warm_power = {name: ref_X[name][:, 0].clone() for name in refs}
    d_prev = pb.precond_scale()
    stats: dict = {}
    probe_cfg = SharpnessConfig(block_size=args.block_size, tol=args.tol, accuracy=args.accuracy,
                                max_iters=args.max_iters)
    probe = SharpnessProbe(probe_cfg, pb.optim_cfg)
    probe.warm = {"plain": ref_X["H"][:, :args.block_size].clone(), "precond": ref_X["P⁻¹H"][:, :args.block_size].clone()}
    probe.warm_scale = d_prev.clone()
    t_train, t_probe = [], []
    for step in range(args.steps):
        sync(device)
        t0 = time.perf_counter()
        loss = pb.train_step()
        sync(device)
        t_train.append(time.perf_counter() - t0)
        pb.probe_mode()
        # the probe as the loop calls it (λ₁(P⁻¹H) and λ₁(H))
        sync(device)
        t0 = time.perf_counter()
        cols = probe.measure(pb.model, pb.loss, pb.optimizer, args.lr)
        sync(device)
        t_probe.append(time.perf_counter() - t0)
        with exact_float32():
            H = HessianOperator(pb.loss, pb.params, model=pb.model)
            d = pb.precond_scale()
            sync(device)
            t0 = time.perf_counter()
            H(torch.zeros(n, 1, device=device, dtype=dtype))     # build the graph, as the probe does
            sync(device)
            t_build = time.perf_counter() - t0
            line = [f"step {step}: loss {loss:.4f}"]
            for name in ("P⁻¹H", "H"):
                op = precond_operator(H, d) if name == "P⁻¹H" else H
                lam_ref, r = reference(op, n, dtype, device, ref_X[name], args)
                ref_X[name] = r.vectors
                line.append(f"λ₁({name}) = {lam_ref:.6g} [ref residual {float(r.residuals[0]):.1e}]")
                for pol in policies:
                    if name not in pol.operators:
                        continue
                    X0 = warm[(name, pol.label)]
                    if pol.transport and name == "P⁻¹H":
                        X0 = warm_start_transport(d, d_prev) * X0
                    res, traj, secs = run_lobpcg(op, X0, n, dtype, device, args, guard_tol=pol.guard_tol,
                                                 tol=pol.tol, search_tf32=pol.search_tf32)
                    warm[(name, pol.label)] = res.vectors
                    acc = first_accurate_equivalents(traj, lam_ref, res.fast_products, tf32_ratio)
                    eq = equivalents(res.products, res.fast_products, tf32_ratio)
                    err = abs(float(res.eigenvalues[0]) - lam_ref) / abs(lam_ref)
                    stats.setdefault((pol.label, name), []).append((res.products, acc, err, secs + t_build,
                                                                    res.converged, traj[0][2], eq))
                    line.append(f"{pol.label}: {res.products} HVPs ({res.fast_products} TF32) = {eq:.2f} "
                                f"equivalents, err {err:.1e}")
                if args.warm_power:
                    plam, v, prods, conv, traj = power_iteration(op, warm_power[name], args.warm_power_iters,
                                                                 args.power_tol)
                    warm_power[name] = v
                    acc = first_accurate(traj, lam_ref)
                    stats.setdefault(("power iteration (warm)", name), []).append(
                        (prods, acc, abs(plam - lam_ref) / abs(lam_ref), None, conv, None, prods))
                    line.append(f"power: {prods} HVPs")
                if name == "P⁻¹H":
                    line.append(f"probe λ₁(P⁻¹H) {cols['lambda_precond']:.6g} ({cols['eig_hvps']} HVPs)")
            H.close()
            d_prev = d
        log("; ".join(line))
    rows = []
    for (label, name), st in stats.items():
        prods = [x[0] for x in st]
        accs = [x[1] for x in st]
        errs = [x[2] for x in st]
        secs = [x[3] for x in st if x[3] is not None]
        init = [x[5] for x in st if x[5] is not None]
        rows.append((label, name, statistics.median(init) if init else None, statistics.mean(prods),
                     statistics.mean(x[6] for x in st), statistics.mean(accs) if None not in accs else f"> ({sum(a is None for a in accs)} never)",
                     max(errs), sum(x[4] for x in st), len(st),
                     statistics.mean(secs) / t_grad if secs else None,
                     statistics.mean(secs) / t_hvp if secs and t_hvp == t_hvp else None))
    out.append(f"\n### Warm start: {args.steps} consecutive Adam steps (lr {args.lr:g}), probe before each\n")
    out.append(f"Per step: residual-stopped solve (k = {args.block_size}) warm-started from the previous step's "
               "vectors; 'HVPs to accuracy' is the oracle count at which λ₁ was first within "
               f"{ACC:g} of that step's tight reference; 'time in HVPs' is the solve's wall time (with the "
               "gradient graph for double backward) over one graph-reusing double-backward product.  "
               "'transported': the λ₁(P⁻¹H) start block is rescaled by D_new / D_old (D = P^{-1/2}).  "
               f"HVP-equivalents: a TF32 product counts {tf32_ratio:.3f} (its measured time over a float32 "
               "product's), a float32 product 1.\n")
    out.append(table(["solver", "operator", "median warm-start residual", "mean HVPs per step",
                      "mean HVP-equivalents per step", f"mean HVP-equivalents to {ACC:g} accuracy", "max rel. error of reported λ₁", "converged steps",
                      "steps", "seconds per solve / gradient", "time in HVPs"], rows))
    out.append(f"\nFull `SharpnessProbe.measure` (λ₁(P⁻¹H) and λ₁(H), default config except k, tol): "
               f"mean {statistics.mean(t_probe):.3g} s = {statistics.mean(t_probe) / t_grad:.1f} gradients = "
               f"{statistics.mean(t_probe) / statistics.mean(t_train):.1f} training steps (training step "
               f"{statistics.mean(t_train):.3g} s, default flags, fused attention).\n")
    return stats


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16, help="Hessian (and training) batch size")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--data", default=None, help="npz file of uint8 images (default: built-in synthetic images)")
    ap.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate")
    ap.add_argument("--pretrain", type=int, default=20, help="Adam steps before measuring")
    ap.add_argument("--steps", type=int, default=8, help="warm-start steps")
    ap.add_argument("--block-size", type=int, default=2)
    ap.add_argument("--tol", type=float, default=SharpnessConfig().tol,
                    help="LOBPCG relative residual tolerance (default: the probe's)")
    ap.add_argument("--accuracy", type=float, default=SharpnessConfig().accuracy,
                    help="LOBPCG's gap-dependent residual tightening (sharpness.accuracy; 0: off)")
    ap.add_argument("--warm-tols", type=lambda v: [float(x) for x in v.split(",")], default=[1e-3, 1e-2, 2e-2, 3e-2],
                    help="residual tolerances tried warm (comma-separated)")
    ap.add_argument("--power-tol", type=float, default=1e-3, help="power iterations' own stopping tolerance")
    ap.add_argument("--no-warm-power", dest="warm_power", action="store_false",
                    help="skip the warm-started power iteration")
    ap.add_argument("--no-warm-variants", dest="warm_variants", action="store_false",
                    help="warm part: only the residual tolerances (no untransported, guards-to-tol or "
                         "wanted-column-only solves)")
    ap.add_argument("--max-iters", type=int, default=100)
    ap.add_argument("--ref-tol", type=float, default=1e-5)
    ap.add_argument("--ref-block", type=int, default=4)
    ap.add_argument("--ref-iters", type=int, default=300)
    ap.add_argument("--power-iters", type=int, default=100)
    ap.add_argument("--warm-power-iters", type=int, default=50)
    ap.add_argument("--lanczos-iters", type=int, default=40)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--parts", default="costs,cold,warm")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave)")
    ap.add_argument("--results", default=None, help="append the Markdown report to this file")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    if args.pretrain < 1:
        ap.error("--pretrain: at least one Adam step is needed for the preconditioner P")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    parts = set(args.parts.split(","))

    pb = Problem(args, device)
    n = count_parameters(pb.model)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    log(f"{args.preset}: {n:,} parameters, batch {args.batch} at {args.image_size}², device {name}, torch {torch.__version__}")
    for i in range(args.pretrain):
        loss = pb.train_step()
        if i % 10 == 0 or i == args.pretrain - 1:
            log(f"pretrain {i}: loss {loss:.4f}")
    pb.probe_mode()

    out = [f"## {args.preset}, batch {args.batch}, {args.image_size}×{args.image_size}, {name}\n",
           f"- date: {datetime.date.today().isoformat()}; torch {torch.__version__}; {n:,} parameters; "
           f"data: {args.data or 'synthetic'}; Adam lr {args.lr:g}, {args.pretrain} steps before measuring",
           f"- command: `python bench/sharpness_bench.py {' '.join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))}`",
           "- every solve in float32 with TF32 off unless its label says 'TF32 search'; HVP = one Hessian-vector "
           "product (one column of a block); LOBPCG solves stop at their residual tolerance"
           + (f", tightened to √({args.accuracy:g} · gap/λ) where the top Ritz values are close (sharpness.accuracy)"
              if args.accuracy else "") + "\n"]
    summary = refs = stats = None
    t_grad, t_hvp, t_tf32, tf32_diff = hvp_times(pb, args.reps)
    tf32_ratio = t_tf32 / t_hvp if has_tf32(device) else 1.0
    log(f"gradient {1e3 * t_grad:.1f} ms, HVP (graph reused) {1e3 * t_hvp:.1f} ms = {t_hvp / t_grad:.2f}×"
        + (f"; TF32 HVP {1e3 * t_tf32:.1f} ms = {tf32_ratio:.3f} float32 HVP (rel. diff. {tf32_diff:.1e})"
           if has_tf32(device) else ""))
    if has_tf32(device):
        out.append(f"- TF32 search products: {1e3 * t_tf32:.1f} ms vs {1e3 * t_hvp:.1f} ms float32 → one TF32 product "
                   f"= {tf32_ratio:.3f} HVP-equivalents; relative difference from the float32 product "
                   f"{tf32_diff:.1e}\n")
    if "costs" in parts:
        t_grad, _, cost_rows = part_costs(pb, args, out)
        t_hvp = next(r[1] for r in cost_rows if "probe default" in r[0]) / 1e3
    print("\n".join(out), flush=True)
    shown = len(out)
    if "cold" in parts:
        refs, summary = part_cold(pb, args, out, t_grad, t_hvp, tf32_ratio)
        print("\n".join(out[shown:]), flush=True)
        shown = len(out)
    elif "warm" in parts:
        refs = start_references(pb, args)
    if "warm" in parts:
        stats = part_warm(pb, args, out, refs, t_grad, t_hvp, tf32_ratio)
    out.append("\n" + goals(args, t_grad, t_hvp, cost_rows if "costs" in parts else None, summary, stats))
    print("\n".join(out[shown:]), flush=True)
    text = "\n".join(out) + "\n"
    if args.results:
        with open(args.results, "a") as f:
            f.write("\n" + text)
        log(f"appended to {args.results}")


def goals(args, t_grad, t_hvp, cost_rows, summary, stats) -> str:
    lines = ["### Goals"]
    if stats:
        key = next(k for k in stats if "probe default" in k[0] and k[1] == "P⁻¹H")
        mean = statistics.mean(x[6] for x in stats[key])
        prods = statistics.mean(x[0] for x in stats[key])
        worst = max(x[2] for x in stats[key])
        ok = mean <= 4 and worst <= ACC
        lines.append(f"- warm-started λ₁(P⁻¹H) to {ACC:g} in ≤ 4 HVP-equivalents per step: probe default '{key[0]}' "
                     f"{mean:.2f} HVP-equivalents ({prods:.2f} products), max λ error {worst:.1e} → "
                     f"{'met' if ok else 'not met'}")
        for (label, name), s in stats.items():
            if name == "P⁻¹H" and label.startswith("LOBPCG") and (label, name) != key:
                m = statistics.mean(x[6] for x in s)
                lines.append(f"  - '{label}': {m:.2f} HVP-equivalents per step, max λ error "
                             f"{max(x[2] for x in s):.1e}")
        acc = [x[1] for x in stats[key]]
        if None not in acc:
            lines.append(f"  - oracle: the probe's warm solves were within {ACC:g} of the reference after "
                         f"{statistics.mean(acc):.2f} HVP-equivalents per step on average")
    if cost_rows:
        # float32 products only: TF32 ones are the probe's search, not its answer
        ok = [r for r in cost_rows if r[0].startswith("HVP") and "TF32" not in r[0] and r[2] is not None]
        best = min(ok, key=lambda r: r[2])
        lines.append(f"- HVP ≤ 2.5× a gradient: best '{best[0]}' at {best[2]:.2f}× → {'met' if best[2] <= 2.5 else 'not met'}")
    if summary:
        for name, s in summary.items():
            lob_label, lob = min(((k, v) for k, v in s.items() if k.startswith("LOBPCG")),
                                 key=lambda kv: kv[1][0] or 1e9)
            for label in ("power", "PyHessian power", "Lanczos"):
                other = s.get(label)
                if not other or not lob[0]:
                    continue
                if other[0]:
                    ratio, txt = other[0] / lob[0], f"{other[0] / lob[0]:.1f}×"
                else:   # never within ACC: a lower bound
                    ratio, txt = other[1] / lob[0], f"≥ {other[1] / lob[0]:.1f}× (never reached {ACC:g} in {other[1]})"
                verdict = "" if label == "Lanczos" else f" ({'met' if ratio >= 5 else 'not met'} for ≥ 5×)"
                lines.append(f"- cold λ₁({name}), HVPs to {ACC:g} accuracy: '{lob_label}' {fmt(lob[0])} vs {label} "
                             f"{other[0] or '—'} → {txt}{verdict}")
    if stats:
        for name in ("P⁻¹H", "H"):
            lob = next((v for k, v in stats.items() if "probe default" in k[0] and k[1] == name), None)
            pw = stats.get(("power iteration (warm)", name))
            if lob and pw:
                a = statistics.mean(x[6] for x in lob)
                b = statistics.mean(x[0] for x in pw)
                lines.append(f"- warm λ₁({name}) per step (each to its own stop): LOBPCG {a:.2f} HVP-equivalents vs warm power "
                             f"iteration {b:.2f} → {b / a:.1f}× (max error {max(x[2] for x in lob):.1e} vs "
                             f"{max(x[2] for x in pw):.1e})")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
