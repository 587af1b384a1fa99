"""Benchmark of the sharpness probe: cost and accuracy of λ₁ estimates.

One run, on one model and one frozen Hessian batch (a
:class:`trainers.run.loop.Trainer` and the probe's own operators), measures

1. :func:`hvp_costs`: the cost of a Hessian-vector product relative to a
   gradient, for every product method of :mod:`trainers.curvature.hessian`
   and for the two reference packages (``pyhessian``, ``hessian-eigenthings``);
2. :func:`cold_start`: Hessian-vector products (HVPs) and seconds until λ₁ is
   within 1e-3 (relative) of a tight reference, and where each solver stops
   by its own rule — block LOBPCG (ours), PyHessian's power iteration,
   hessian-eigenthings' power iteration and Lanczos;
3. :func:`warm_start`: warm starts along an Adam trajectory: per training
   step, HVPs of the residual-stopped LOBPCG solve of λ₁(P⁻¹H) and λ₁(H)
   under several policies, and of a warm-started power iteration, with the
   error of each reported λ against a tight reference solved at every step,
   and the time of the probe itself (:class:`SharpnessProbe`);
4. :func:`goals`: the three goals of the probe, graded from those results.

On GPUs with TF32 the probe searches with TF32 products and checks the
answer with float32 ones (``sharpness.search_precision``); its cost is given
in HVP-equivalents: TF32 products weighted by their measured time over a
float32 product's, plus the float32 products.  The reference packages are
optional (``pip install -e .[bench]``); without them their rows say
"skipped".

Usage (CPU, a few minutes; GPU with the paper-sized U-Net)::

    python -m bench.sharpness_bench --preset tiny --image-size 16 --batch 16 --device cpu
    python -m bench.sharpness_bench --preset ddpm-cifar10 --batch 128 --device cuda \\
        --data .devdata/cifar10-6k.npz --results bench/RESULTS.md

The Markdown report is printed and, with ``--results``, appended to that
file with the device, command and date.
"""
from __future__ import annotations

import argparse
import datetime
import math
import shlex
import statistics
import sys
import traceback
from dataclasses import dataclass, field, fields
from typing import Optional

import torch

from bench import reference_solvers as refs
from bench.common import (Problem, bench_config, device_name, log, relative_difference, seconds, table, timed)
from trainers.config import HVP_METHODS, SharpnessConfig
from trainers.curvature.hessian import (CurvatureOperator, Diagonal, arithmetic, hessian_operator,
                                        hessian_vector_product)
from trainers.curvature.lobpcg import lobpcg
from trainers.curvature.probe import SharpnessProbe, has_tf32, top_eigenpairs, warm_start_transport

ACC = 1e-3   # "accurate": |λ − λ_ref| ≤ ACC·|λ_ref|
Estimate = refs.Estimate


@dataclass
class Settings:
    """The solver and measurement knobs of one bench run (the CLI's flags)."""
    lr: float = 1e-4
    steps: int = 8
    block_size: int = 2
    tol: float = SharpnessConfig().tol
    accuracy: float = SharpnessConfig().accuracy
    warm_tols: list = field(default_factory=lambda: [1e-3, 1e-2, 2e-2, 3e-2])
    power_tol: float = 1e-3
    warm_power: bool = True
    warm_variants: bool = True
    max_iters: int = 100
    ref_tol: float = 1e-5
    ref_block: int = 4
    ref_iters: int = 300
    power_iters: int = 100
    warm_power_iters: int = 50
    lanczos_iters: int = 40
    reps: int = 5
    verbose: bool = False


def first_accurate(trajectory: list[Estimate], ref: float) -> Optional[float]:
    """Products at the first estimate within ACC of ``ref`` (None: never)."""
    return next((e.products for e in trajectory if abs(e.value - ref) <= ACC * abs(ref)), None)


def equivalents(products: float, fast_products: float, tf32_ratio: float) -> float:
    """HVP-equivalents of a solve whose first ``fast_products`` products were
    TF32 ones costing ``tf32_ratio`` float32 products each."""
    return min(products, fast_products) * tf32_ratio + max(0, products - fast_products)


# ---------------------------------------------------------------------------
# the unit: a gradient, a product


@dataclass
class ProductTiming:
    """Seconds of a float32 gradient, of the probe's float32 product (graph
    reused) and of the same product at TF32 (the search's), with the TF32
    product's relative difference from the float32 one."""
    gradient_s: float
    product_s: float
    tf32_product_s: Optional[float] = None
    tf32_difference: Optional[float] = None

    @property
    def tf32_ratio(self) -> float:
        """One TF32 product in float32 products (1 without TF32)."""
        return self.tf32_product_s / self.product_s if self.tf32_product_s else 1.0


def product_timing(pb: Problem, reps: int) -> ProductTiming:
    with arithmetic("float32", pb.device):
        t_grad, _ = timed(lambda: torch.autograd.grad(pb.loss(), pb.params), pb.device, reps)
    with pb.hessian() as H:
        v = torch.randn(H.n, 1, generator=torch.Generator().manual_seed(0)).to(pb.device)
        H(v)
        t_hvp, hv = timed(lambda: H(v), pb.device, reps)
        if not has_tf32(pb.device):
            return ProductTiming(t_grad, t_hvp)
        fast = H.at("tf32")
        t_tf32, hv_tf32 = timed(lambda: fast(v), pb.device, reps)
    return ProductTiming(t_grad, t_hvp, t_tf32, relative_difference(hv_tf32, hv))


# ---------------------------------------------------------------------------
# 1. cost of one product


@dataclass
class CostRow:
    implementation: str
    ms_per_vector: Optional[float]
    per_gradient: Optional[float]
    rel_diff: Optional[float] = None      # vs double backward with PyTorch's convolution double backward
    status: str = "ok"
    product: bool = True                  # a Hessian-vector product (not a gradient)
    tf32: bool = False                    # TF32 arithmetic (the search's products, not an answer)
    probe_default: bool = False
    reference: bool = False               # a reference package's product, not ours


def _failed(label: str, e: Exception, verbose: bool) -> CostRow:
    msg = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    log(f"{label} failed: {msg}")
    if verbose:
        traceback.print_exc()
    return CostRow(label, None, None, None, f"FAILED: {msg}")


@dataclass
class Costs:
    rows: list[CostRow]
    gradient_s: float          # a float32 gradient, the unit

    @property
    def probe_product_s(self) -> float:
        """Seconds of the probe's default product (float32, graph reused)."""
        return next(r for r in self.rows if r.probe_default).ms_per_vector / 1e3


def hvp_costs(pb: Problem, s: Settings) -> Costs:
    """Milliseconds per vector and × a float32 gradient of every product."""
    device, reps = pb.device, s.reps
    log("costs: gradient and Hessian-vector products")
    V = torch.randn(pb.n, 2, generator=torch.Generator().manual_seed(0)).to(device)
    t_default, _ = timed(lambda: torch.autograd.grad(pb.loss(), pb.params), device, reps)
    with arithmetic("float32", device):
        t_grad, _ = timed(lambda: torch.autograd.grad(pb.loss(), pb.params), device, reps)
        t_graph, _ = timed(lambda: torch.autograd.grad(pb.loss(), pb.params, create_graph=True), device, reps)
    rows = [CostRow("gradient (TF32 off; the unit)", 1e3 * t_grad, 1.0, product=False, status="—"),
            CostRow("gradient, default TF32 flags", 1e3 * t_default, t_default / t_grad, product=False, status="—"),
            CostRow("gradient graph for double backward (create_graph)", 1e3 * t_graph, t_graph / t_grad,
                    product=False, status="once per probe")]

    def row(label, t, k, out=None, ref=None, **kw):
        return CostRow(label, 1e3 * t / k, t / k / t_grad, None if ref is None else relative_difference(out, ref), **kw)

    with pb.hessian(fast_conv=False) as H:
        H(V[:, :1])
        t, ref = timed(lambda: H(V), device, reps)
    rows.append(CostRow("HVP double backward, graph reused, built-in conv double backward", 1e3 * t / 2,
                        t / 2 / t_grad, 0.0))
    with pb.hessian() as H:
        t_first, _ = seconds(lambda: H(V[:, :1]), device)
        t, hv = timed(lambda: H(V), device, reps)
        rows.append(row("HVP double backward, graph reused, fast conv double backward (probe default; graph + "
                        f"first product {t_first / t_grad:.2f}× gradient)", t, 2, hv, ref, probe_default=True))
        if has_tf32(device):
            fast = H.at("tf32")
            t, hv = timed(lambda: fast(V), device, reps)
            rows.append(row("HVP as above with TF32 (the probe's search products; float32 graph)", t, 2, hv, ref,
                            tf32=True))
    t, hv = timed(lambda: hessian_vector_product(pb.loss, pb.params, V[:, 0]), device, max(1, reps // 2))
    rows.append(row("HVP double backward from scratch (naive)", t, 1, hv, ref[:, 0]))
    for method in HVP_METHODS[1:]:
        k = 2 if method.endswith(("batched", "vmap")) else 1
        label = f"HVP {method}" + (f" (block of {k}, per vector)" if k > 1 else "")
        try:
            with hessian_operator(method, pb.loss, pb.params, model=pb.model) as H:
                t, hv = timed(lambda: H(V[:, :k]), device, reps)
            rows.append(row(label, t, k, hv, ref[:, :k]))
        except Exception as e:  # noqa: BLE001 - report, keep benchmarking
            rows.append(_failed(f"HVP {method}", e, s.verbose))
    if device.type == "cuda":
        rows += _cudnn_benchmark_costs(pb, V, t_grad, reps)
    rows += _reference_costs(pb, V, ref, t_grad, reps)
    return Costs(rows, t_grad)


def _cudnn_benchmark_costs(pb: Problem, V: torch.Tensor, t_grad: float, reps: int) -> list[CostRow]:
    """The same with cuDNN autotuning (each convolution shape, the double
    backward's too, gets the fastest algorithm after a timing run)."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        with arithmetic("float32", pb.device):
            t_g, _ = timed(lambda: torch.autograd.grad(pb.loss(), pb.params), pb.device, reps)
        rows = [CostRow("gradient, cudnn.benchmark on", 1e3 * t_g, t_g / t_grad, product=False, status="—")]
        with pb.hessian() as H:
            H(V[:, :1])
            t, _ = timed(lambda: H(V), pb.device, reps)
        rows.append(CostRow("HVP double backward (fast conv), graph reused, cudnn.benchmark on (× that gradient: "
                            f"{t / 2 / t_g:.2f})", 1e3 * t / 2, t / 2 / t_grad))
        with hessian_operator("forward_over_reverse_vmap", pb.loss, pb.params, model=pb.model) as H:
            t, _ = timed(lambda: H(V), pb.device, reps)
        rows.append(CostRow("HVP forward_over_reverse_vmap (block of 2), cudnn.benchmark on (× that gradient: "
                            f"{t / 2 / t_g:.2f})", 1e3 * t / 2, t / 2 / t_grad))
        return rows
    finally:
        torch.backends.cudnn.benchmark = before


def _reference_costs(pb: Problem, V, ref, t_grad: float, reps: int) -> list[CostRow]:
    rows = []
    try:
        t_init, t, hv = refs.pyhessian_product_cost(pb, V[:, 0], reps)
        rows.append(CostRow(f"PyHessian HVP (graph reused; set-up {t_init / t_grad:.2f}× gradient)", 1e3 * t,
                            t / t_grad, relative_difference(hv, ref[:, 0])))
    except refs.Missing as e:
        rows.append(CostRow("PyHessian HVP", None, None, None, f"skipped: {e}"))
    except Exception as e:  # noqa: BLE001
        rows.append(_failed("PyHessian HVP", e, False))
    try:
        t, hv = refs.eigenthings_product_cost(pb, V[:, 0], max(1, reps // 2))
        rows.append(CostRow("hessian-eigenthings HVP (autograd, rebuilt per product)", 1e3 * t, t / t_grad,
                            relative_difference(hv, ref[:, 0])))
    except refs.Missing as e:
        rows.append(CostRow("hessian-eigenthings HVP", None, None, None, f"skipped: {e}"))
    except Exception as e:  # noqa: BLE001
        rows.append(_failed("hessian-eigenthings HVP", e, False))
    for r in rows:
        r.reference = True
    return rows


# ---------------------------------------------------------------------------
# eigen-solves


@dataclass
class Reference:
    """A tight λ₁ (LOBPCG, k = ref_block, residual ≤ ref_tol)."""
    value: float
    residual: float
    products: int
    second: float
    vectors: torch.Tensor


def reference(op: CurvatureOperator, X0: Optional[torch.Tensor], s: Settings) -> Reference:
    r = lobpcg(op, X0, n=op.n, k=s.ref_block, nwanted=1, tol=s.ref_tol, max_iters=s.ref_iters,
               generator=torch.Generator().manual_seed(7), dtype=op.dtype, device=op.device)
    return Reference(float(r.eigenvalues[0]), float(r.residuals[0]), r.products, float(r.eigenvalues[1]), r.vectors)


def lobpcg_solve(op: CurvatureOperator, X0: Optional[torch.Tensor], s: Settings, *, guard_tol=None, tol=None,
                 seed: int = 0, search_tf32: bool = False):
    """One residual-stopped solve as the probe does it (``search_tf32``: TF32
    search + float32 check); returns (result, estimates, seconds), products
    of both kinds counted as 1 in the estimates."""
    trajectory: list[Estimate] = []
    kw = dict(n=op.n, k=s.block_size, nwanted=1, tol=s.tol if tol is None else tol, guard_tol=guard_tol,
              max_iters=s.max_iters, accuracy=s.accuracy or None, generator=torch.Generator().manual_seed(seed),
              dtype=op.dtype, device=op.device,
              callback=lambda it, p, theta, rel: trajectory.append(Estimate(p, float(theta[0]), float(rel[0]))))
    t, result = seconds(lambda: top_eigenpairs(op, X0, search_tf32=search_tf32, **kw), op.device)
    return result, trajectory, t


@dataclass
class Solve:
    """One solver's run on one operator from a cold start."""
    solver: str
    operator: str
    to_accuracy: Optional[float]       # HVPs (or HVP-equivalents) until within ACC; None: never
    at_stop: Optional[float]           # HVPs (or equivalents) at the solver's own stop
    value: Optional[float] = None
    rel_error: Optional[float] = None
    residual: Optional[float] = None
    seconds: Optional[float] = None
    kind: str = "lobpcg"               # lobpcg | power | pyhessian | lanczos
    status: str = "ok"

    def cells(self) -> tuple:
        acc = self.to_accuracy if self.to_accuracy is not None or self.at_stop is None else f"> {fmt_int(self.at_stop)}"
        return (self.solver, self.operator, acc, self.at_stop, self.value, self.rel_error, self.residual,
                self.seconds if self.status == "ok" else self.status)


def fmt_int(x) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.3g}"


@dataclass
class ColdResult:
    references: dict[str, Reference]
    solves: list[Solve]


def operators(pb: Problem, H) -> dict[str, CurvatureOperator]:
    """H and the symmetric form D H D (D = P^{-1/2}) of P⁻¹H."""
    D = Diagonal(pb.preconditioner_scale())
    return {"H": H, "P⁻¹H": D @ H @ D}


def cold_start(pb: Problem, s: Settings, timing: ProductTiming) -> ColdResult:
    references, solves = {}, []
    with pb.hessian() as H:
        ops = operators(pb, H)
        for name, op in ops.items():
            log(f"cold: reference λ₁({name})")
            ref = references[name] = reference(op, None, s)
            log(f"  λ₁({name}) = {ref.value:.8g} (residual {ref.residual:.1e}, {ref.products} HVPs, "
                f"λ₂ = {ref.second:.6g})")
            policies = [(f"LOBPCG k={s.block_size}, guards to tol", None, False),
                        (f"LOBPCG k={s.block_size}, guards to √tol", math.sqrt(s.tol), False)]
            if has_tf32(pb.device):
                policies.append((f"LOBPCG k={s.block_size}, guards to √tol, TF32 search + float32 check "
                                 "(HVP-equivalents)", math.sqrt(s.tol), True))
            for label, guard_tol, tf32 in policies:
                log(f"cold: {label} on {name}")
                res, trajectory, secs = lobpcg_solve(op, None, s, guard_tol=guard_tol, seed=11, search_tf32=tf32)
                p = first_accurate(trajectory, ref.value)
                ratio = timing.tf32_ratio if tf32 else 1.0
                solves.append(Solve(label, name, None if p is None else equivalents(p, res.fast_products, ratio),
                                    equivalents(res.products, res.fast_products, ratio), float(res.eigenvalues[0]),
                                    _error(float(res.eigenvalues[0]), ref.value), float(res.residuals[0]), secs))
        for name, op in ops.items():
            solves += _reference_cold(pb, op, name, references[name].value, s)
    solves += _pyhessian_cold(pb, references["H"].value, s)
    return ColdResult(references, solves)


def _error(value: float, ref: float) -> float:
    return abs(value - ref) / abs(ref)


def _reference_cold(pb: Problem, op, name: str, ref: float, s: Settings) -> list[Solve]:
    """hessian-eigenthings' power iteration and Lanczos on our operator
    (Lanczos, the optimal Krylov method from one start vector, bounds what
    any polynomial method can do on this spectrum)."""
    out = []
    log(f"cold: power iteration on {name}")
    label = "power iteration (hessian-eigenthings, Δλ & residual < tol)"
    try:
        v0 = torch.randn(pb.n, generator=torch.Generator().manual_seed(11)).to(device=pb.device, dtype=pb.dtype)
        t, r = seconds(lambda: refs.power_iteration(op, v0, s.power_iters, s.power_tol), pb.device)
        out.append(Solve(label, name, first_accurate(r.trajectory, ref), r.products, r.value, _error(r.value, ref),
                         None, t, kind="power"))
    except refs.Missing as e:
        out.append(Solve(label, name, None, None, kind="power", status=f"skipped: {e}"))
    log(f"cold: Lanczos on {name}")
    label = f"Lanczos (hessian-eigenthings, {s.lanczos_iters} steps, full reorth.) on our operator"
    try:
        t, trajectory = seconds(lambda: refs.lanczos(op, pb.n, pb.device, pb.dtype, s.lanczos_iters), pb.device)
        last = trajectory[-1]
        out.append(Solve(label, name, first_accurate(trajectory, ref), last.products, last.value,
                         _error(last.value, ref), None, t, kind="lanczos"))
    except refs.Missing as e:
        out.append(Solve(label, name, None, None, kind="lanczos", status=f"skipped: {e}"))
    except Exception as e:  # noqa: BLE001 - report, keep benchmarking
        out.append(Solve(label, name, None, None, kind="lanczos", status=f"FAILED: {e}"))
    return out


def _pyhessian_cold(pb: Problem, ref: float, s: Settings) -> list[Solve]:
    label = "PyHessian power iteration (stops on Δλ < tol)"
    log("cold: PyHessian power iteration")
    try:
        t, r = seconds(lambda: refs.pyhessian_power_iteration(pb, s.power_iters, s.power_tol), pb.device)
    except refs.Missing as e:
        return [Solve(label, "H", None, None, kind="pyhessian", status=f"skipped: {e}")]
    except Exception as e:  # noqa: BLE001
        return [Solve(label, "H", None, None, kind="pyhessian", status=f"FAILED: {e}")]
    return [Solve(label, "H", first_accurate(r.trajectory, ref), r.products, r.value, _error(r.value, ref), None, t,
                  kind="pyhessian")]


# ---------------------------------------------------------------------------
# 3. warm starts along a trajectory


@dataclass
class WarmPolicy:
    """One way of warm-starting and stopping the per-step solve."""
    label: str
    tol: float
    guard_tol: Optional[float] = None
    transport: bool = False
    operators: tuple = ("P⁻¹H",)
    search_tf32: bool = False
    probe_default: bool = False


def warm_policies(s: Settings, tf32_available: bool) -> list[WarmPolicy]:
    """Residual tolerances × (transported or not, guards refined or not, TF32
    search or float32 only); the policy of the probe as this run configures
    it (``--tol``, by default the probe's default) is marked."""
    default = s.tol
    pols = []
    for tol in s.warm_tols:
        both = ("P⁻¹H", "H") if tol == default else ("P⁻¹H",)
        if tf32_available:
            pols.append(WarmPolicy(f"LOBPCG, tol {tol:g}, TF32 search + float32 check, guards to √tol, transported"
                                   + (" (probe default)" if tol == default else ""), tol, math.sqrt(tol), True, both,
                                   search_tf32=True, probe_default=tol == default))
        is_default = tol == default and not tf32_available
        pols.append(WarmPolicy(f"LOBPCG, tol {tol:g}, float32, guards to √tol, transported"
                               + (" (probe default)" if is_default else ""), tol, math.sqrt(tol), True, both,
                               probe_default=is_default))
    if s.warm_variants:
        pols += [WarmPolicy(f"LOBPCG, tol {s.tol:g}, guards to √tol, not transported", s.tol, math.sqrt(s.tol)),
                 WarmPolicy(f"LOBPCG, tol {s.tol:g}, guards to tol, transported", s.tol, None, transport=True),
                 WarmPolicy(f"LOBPCG, tol {s.tol:g}, wanted column only, transported", s.tol, float("inf"),
                            transport=True)]
    return pols


WARM_POWER = "power iteration (warm)"


@dataclass
class WarmSolve:
    """One policy's solve at one training step."""
    solver: str
    operator: str
    step: int
    products: int
    equivalents: float
    to_accuracy: Optional[float]
    rel_error: float
    converged: bool
    seconds: Optional[float] = None        # the solve and the step's gradient-graph build
    start_residual: Optional[float] = None
    probe_default: bool = False


@dataclass
class WarmSummary:
    solver: str
    operator: str
    median_start_residual: Optional[float]
    mean_products: float
    mean_equivalents: float
    mean_to_accuracy: Optional[float]
    never_accurate: int
    max_error: float
    converged: int
    steps: int
    per_gradient: Optional[float]
    per_product: Optional[float]
    probe_default: bool


@dataclass
class WarmResult:
    solves: list[WarmSolve]
    probe_seconds: list[float]
    train_seconds: list[float]

    def summary(self, timing: ProductTiming) -> list[WarmSummary]:
        groups: dict[tuple, list[WarmSolve]] = {}
        for w in self.solves:
            groups.setdefault((w.solver, w.operator), []).append(w)
        out = []
        for (solver, op), ws in groups.items():
            acc = [w.to_accuracy for w in ws if w.to_accuracy is not None]
            secs = [w.seconds for w in ws if w.seconds is not None]
            starts = [w.start_residual for w in ws if w.start_residual is not None]
            mean_secs = statistics.mean(secs) if secs else None
            out.append(WarmSummary(
                solver, op, statistics.median(starts) if starts else None, statistics.mean(w.products for w in ws),
                statistics.mean(w.equivalents for w in ws), statistics.mean(acc) if len(acc) == len(ws) else None,
                len(ws) - len(acc), max(w.rel_error for w in ws), sum(w.converged for w in ws), len(ws),
                None if mean_secs is None else mean_secs / timing.gradient_s,
                None if mean_secs is None else mean_secs / timing.product_s, ws[0].probe_default))
        return out


def warm_start(pb: Problem, s: Settings, references: dict[str, Reference], timing: ProductTiming) -> WarmResult:
    """Per Adam step: the probe as the loop calls it, a tight reference, then
    every policy's warm solve.  'Transported' warm starts carry the λ₁(P⁻¹H)
    vectors over to the new preconditioner (y ← (D_new / D_old) y,
    D = P^{-1/2}; :func:`trainers.curvature.probe.warm_start_transport`)."""
    policies = warm_policies(s, has_tf32(pb.device))
    ref_X = {name: r.vectors for name, r in references.items()}
    warm = {(name, p.label): ref_X[name][:, :s.block_size].clone() for name in references for p in policies}
    warm_power = {name: ref_X[name][:, 0].clone() for name in references}
    d_prev = pb.preconditioner_scale()
    probe = SharpnessProbe(SharpnessConfig(block_size=s.block_size, tol=s.tol, accuracy=s.accuracy,
                                           max_iters=s.max_iters,
                                           adam_preconditioner=pb.cfg.sharpness.adam_preconditioner), pb.cfg.optim)
    probe.warm = {"plain": ref_X["H"][:, :s.block_size].clone(), "precond": ref_X["P⁻¹H"][:, :s.block_size].clone()}
    probe.warm_scale = d_prev.clone()[:, None]
    power = s.warm_power and refs.missing("hessian_eigenthings") is None
    if s.warm_power and not power:
        log(f"warm power iteration skipped: {refs.missing('hessian_eigenthings')}")
    result = WarmResult([], [], [])
    for step in range(s.steps):
        t, loss = seconds(pb.train_step, pb.device)
        result.train_seconds.append(t)
        t, cols = seconds(lambda: probe.measure(pb.model, pb.loss, pb.optimizer, s.lr), pb.device)
        result.probe_seconds.append(t)
        line = [f"step {step}: loss {loss:.4f}"]
        with pb.hessian() as H:
            t_build, _ = seconds(H.prepare, pb.device)   # the gradient graph, as the probe builds it
            d = pb.preconditioner_scale()
            ops = operators(pb, H)
            for name in ("P⁻¹H", "H"):
                op = ops[name]
                ref = reference(op, ref_X[name], s)
                ref_X[name] = ref.vectors
                line.append(f"λ₁({name}) = {ref.value:.6g} [ref residual {ref.residual:.1e}]")
                for pol in (p for p in policies if name in p.operators):
                    X0 = warm[(name, pol.label)]
                    if pol.transport and name == "P⁻¹H":
                        X0 = warm_start_transport(d[:, None], d_prev[:, None]) * X0
                    res, trajectory, secs = lobpcg_solve(op, X0, s, guard_tol=pol.guard_tol, tol=pol.tol,
                                                         search_tf32=pol.search_tf32)
                    warm[(name, pol.label)] = res.vectors
                    ratio = timing.tf32_ratio if pol.search_tf32 else 1.0
                    p = first_accurate(trajectory, ref.value)
                    w = WarmSolve(pol.label, name, step, res.products, equivalents(res.products, res.fast_products,
                                                                                      ratio),
                                  None if p is None else equivalents(p, res.fast_products, ratio),
                                  _error(float(res.eigenvalues[0]), ref.value), res.converged, secs + t_build,
                                  trajectory[0].residual, pol.probe_default)
                    result.solves.append(w)
                    line.append(f"{pol.label}: {w.products} HVPs ({res.fast_products} TF32) = {w.equivalents:.2f} "
                                f"equivalents, err {w.rel_error:.1e}")
                if power:
                    r = refs.power_iteration(op, warm_power[name], s.warm_power_iters, s.power_tol)
                    warm_power[name] = r.vector
                    result.solves.append(WarmSolve(WARM_POWER, name, step, r.products, r.products,
                                                   first_accurate(r.trajectory, ref.value),
                                                   _error(r.value, ref.value), r.converged))
                    line.append(f"power: {r.products} HVPs")
                if name == "P⁻¹H":
                    line.append(f"probe λ₁(P⁻¹H) {cols['lambda_precond']:.6g} ({cols['eig_hvps']} HVPs)")
        d_prev = d
        log("; ".join(line))
    return result


# ---------------------------------------------------------------------------
# 4. goals


@dataclass
class Goal:
    """One line of the goals: ``met`` None for a comparison without a verdict."""
    text: str
    met: Optional[bool] = None
    detail: list = field(default_factory=list)

    def markdown(self) -> str:
        verdict = "" if self.met is None else f" → {'met' if self.met else 'not met'}"
        return "\n".join([f"- {self.text}{verdict}"] + [f"  - {d}" for d in self.detail])


def goals(costs: Optional[Costs], cold: Optional[ColdResult], warm: Optional[list[WarmSummary]]) -> list[Goal]:
    out = []
    default = next((w for w in warm or [] if w.probe_default and w.operator == "P⁻¹H"), None)
    if default:
        g = Goal(f"warm-started λ₁(P⁻¹H) to {ACC:g} in ≤ 4 HVP-equivalents per step: probe default "
                 f"'{default.solver}' {default.mean_equivalents:.2f} HVP-equivalents ({default.mean_products:.2f} "
                 f"products), max λ error {default.max_error:.1e}",
                 default.mean_equivalents <= 4 and default.max_error <= ACC)
        g.detail = [f"'{w.solver}': {w.mean_equivalents:.2f} HVP-equivalents per step, max λ error {w.max_error:.1e}"
                    for w in warm if w.operator == "P⁻¹H" and w.solver.startswith("LOBPCG") and w is not default]
        if default.mean_to_accuracy is not None:
            g.detail.append(f"oracle: the probe's warm solves were within {ACC:g} of the reference after "
                            f"{default.mean_to_accuracy:.2f} HVP-equivalents per step on average")
        out.append(g)
    if costs:
        # our float32 products only: TF32 ones are the probe's search, not its answer
        ok = [r for r in costs.rows if r.product and not r.tf32 and not r.reference and r.per_gradient is not None]
        if ok:
            best = min(ok, key=lambda r: r.per_gradient)
            out.append(Goal(f"HVP ≤ 2.5× a gradient: best '{best.implementation}' at {best.per_gradient:.2f}×",
                            best.per_gradient <= 2.5))
    if cold:
        for name in cold.references:
            ours = [c for c in cold.solves if c.operator == name and c.kind == "lobpcg" and c.to_accuracy is not None]
            if not ours:
                continue
            best = min(ours, key=lambda c: c.to_accuracy)
            for other in (c for c in cold.solves if c.operator == name and c.kind != "lobpcg" and c.status == "ok"):
                if other.to_accuracy is not None:
                    ratio, txt = other.to_accuracy / best.to_accuracy, f"{other.to_accuracy / best.to_accuracy:.1f}×"
                else:   # never within ACC: a lower bound
                    ratio = other.at_stop / best.to_accuracy
                    txt = f"≥ {ratio:.1f}× (never reached {ACC:g} in {fmt_int(other.at_stop)})"
                out.append(Goal(f"cold λ₁({name}), HVPs to {ACC:g} accuracy: '{best.solver}' {best.to_accuracy:.3g} "
                                f"vs {other.solver} {fmt_int(other.to_accuracy) if other.to_accuracy else '—'} → "
                                f"{txt}" + ("" if other.kind == "lanczos" else " (goal: ≥ 5×)"),
                                None if other.kind == "lanczos" else ratio >= 5))
    for name in ("P⁻¹H", "H"):
        lob = next((w for w in warm or [] if w.probe_default and w.operator == name), None)
        pw = next((w for w in warm or [] if w.solver == WARM_POWER and w.operator == name), None)
        if lob and pw:
            out.append(Goal(f"warm λ₁({name}) per step (each to its own stop): LOBPCG {lob.mean_equivalents:.2f} "
                            f"HVP-equivalents vs warm power iteration {pw.mean_products:.2f} → "
                            f"{pw.mean_products / lob.mean_equivalents:.1f}× (max error {lob.max_error:.1e} vs "
                            f"{pw.max_error:.1e})"))
    return out


# ---------------------------------------------------------------------------
# the report


@dataclass
class Report:
    timing: ProductTiming
    costs: Optional[Costs] = None
    cold: Optional[ColdResult] = None
    warm: Optional[WarmResult] = None
    goals: list = field(default_factory=list)
    text: str = ""


def cost_table(costs: Costs) -> str:
    return table(["implementation", "ms per vector", "× gradient", "rel. diff. vs double backward", "status"],
                 [(r.implementation, r.ms_per_vector, r.per_gradient, r.rel_diff, r.status) for r in costs.rows])


def cold_table(cold: ColdResult) -> str:
    return table(["solver", "operator", f"HVPs to {ACC:g} accuracy", "HVPs at own stop", "λ₁ at stop",
                  "rel. error at stop", "rel. residual at stop", "seconds"], [c.cells() for c in cold.solves])


def warm_table(summary: list[WarmSummary]) -> str:
    rows = [(w.solver, w.operator, w.median_start_residual, w.mean_products, w.mean_equivalents,
             w.mean_to_accuracy if w.mean_to_accuracy is not None else f"> ({w.never_accurate} never)", w.max_error,
             w.converged, w.steps, w.per_gradient, w.per_product) for w in summary]
    return table(["solver", "operator", "median warm-start residual", "mean HVPs per step",
                  "mean HVP-equivalents per step", f"mean HVP-equivalents to {ACC:g} accuracy",
                  "max rel. error of reported λ₁", "converged steps", "steps", "seconds per solve / gradient",
                  "time in HVPs"], rows)


def run(pb: Problem, s: Settings, parts: set, pretrain: int, header: list[str]) -> Report:
    """Pre-train, then the parts (``costs``, ``cold``, ``warm``); prints the
    report as it goes and returns it."""
    for i in range(pretrain):
        loss = pb.train_step()
        if i % 10 == 0 or i == pretrain - 1:
            log(f"pretrain {i}: loss {loss:.4f}")
    timing = product_timing(pb, s.reps)
    report = Report(timing)
    out = list(header)
    log(f"gradient {1e3 * timing.gradient_s:.1f} ms, HVP (graph reused) {1e3 * timing.product_s:.1f} ms = "
        f"{timing.product_s / timing.gradient_s:.2f}×")
    if timing.tf32_product_s:
        out.append(f"- TF32 search products: {1e3 * timing.tf32_product_s:.1f} ms vs {1e3 * timing.product_s:.1f} ms "
                   f"float32 → one TF32 product = {timing.tf32_ratio:.3f} HVP-equivalents; relative difference from "
                   f"the float32 product {timing.tf32_difference:.1e}\n")
    shown = 0

    def show():
        nonlocal shown
        print("\n".join(out[shown:]), flush=True)
        shown = len(out)

    if "costs" in parts:
        report.costs = hvp_costs(pb, s)
        # the cost table's medians (more repetitions) are the units from here on
        timing = report.timing = ProductTiming(report.costs.gradient_s, report.costs.probe_product_s,
                                               timing.tf32_product_s, timing.tf32_difference)
        out += ["### Cost of one Hessian-vector product\n", cost_table(report.costs)]
        show()
    references = None
    if "cold" in parts:
        report.cold = cold_start(pb, s, timing)
        references = report.cold.references
        out.append("\n### Cold start: λ₁ from a random start\n")
        out.append(f"Reference: LOBPCG k={s.ref_block}, relative residual ≤ {s.ref_tol:g}: "
                   + ", ".join(f"λ₁({k}) = {v.value:.8g} (residual {v.residual:.1e})" for k, v in references.items())
                   + f". One HVP ≈ {timing.product_s / timing.gradient_s:.2f} gradients here.\n")
        out.append(cold_table(report.cold))
        show()
    summary = None
    if "warm" in parts:
        if references is None:
            with pb.hessian() as H:
                references = {name: reference(op, None, s) for name, op in operators(pb, H).items()}
        report.warm = warm_start(pb, s, references, timing)
        summary = report.warm.summary(timing)
        w = report.warm
        out.append(f"\n### Warm start: {s.steps} consecutive Adam steps (lr {s.lr:g}), probe before each\n")
        out.append(f"Per step: residual-stopped solve (k = {s.block_size}) warm-started from the previous step's "
                   "vectors; 'HVPs to accuracy' is the oracle count at which λ₁ was first within "
                   f"{ACC:g} of that step's tight reference; 'time in HVPs' is the solve's wall time (with the "
                   "gradient graph for double backward) over one graph-reusing double-backward product.  "
                   "'transported': the λ₁(P⁻¹H) start block is rescaled by D_new / D_old (D = P^{-1/2}).  "
                   f"HVP-equivalents: a TF32 product counts {timing.tf32_ratio:.3f} (its measured time over a "
                   "float32 product's), a float32 product 1.\n")
        out.append(warm_table(summary))
        out.append(f"\nFull `SharpnessProbe.measure` (λ₁(P⁻¹H) and λ₁(H), default config except k, tol): "
                   f"mean {statistics.mean(w.probe_seconds):.3g} s = "
                   f"{statistics.mean(w.probe_seconds) / timing.gradient_s:.1f} gradients = "
                   f"{statistics.mean(w.probe_seconds) / statistics.mean(w.train_seconds):.1f} training steps "
                   f"(training step {statistics.mean(w.train_seconds):.3g} s, default flags).\n")
    report.goals = goals(report.costs, report.cold, summary)
    out.append("\n### Goals\n" + "\n".join(g.markdown() for g in report.goals) + "\n")
    show()
    report.text = "\n".join(out) + "\n"
    return report


def parse_args(argv=None):
    d = Settings()
    ap = argparse.ArgumentParser(prog="python -m bench.sharpness_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16, help="Hessian (and training) batch size")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--data", default=None, help="npz file of uint8 images (default: built-in synthetic images)")
    ap.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate")
    ap.add_argument("--pretrain", type=int, default=20, help="Adam steps before measuring")
    ap.add_argument("--steps", type=int, default=d.steps, help="warm-start steps")
    ap.add_argument("--block-size", type=int, default=d.block_size)
    ap.add_argument("--tol", type=float, default=d.tol,
                    help="LOBPCG relative residual tolerance (default: the probe's)")
    ap.add_argument("--accuracy", type=float, default=d.accuracy,
                    help="LOBPCG's gap-dependent residual tightening (sharpness.accuracy; 0: off)")
    ap.add_argument("--warm-tols", type=lambda v: [float(x) for x in v.split(",")], default=d.warm_tols,
                    help="residual tolerances tried warm (comma-separated)")
    ap.add_argument("--power-tol", type=float, default=d.power_tol, help="power iterations' own stopping tolerance")
    ap.add_argument("--no-warm-power", dest="warm_power", action="store_false",
                    help="skip the warm-started power iteration")
    ap.add_argument("--no-warm-variants", dest="warm_variants", action="store_false",
                    help="warm part: only the residual tolerances (no untransported, guards-to-tol or "
                         "wanted-column-only solves)")
    ap.add_argument("--max-iters", type=int, default=d.max_iters)
    ap.add_argument("--ref-tol", type=float, default=d.ref_tol)
    ap.add_argument("--ref-block", type=int, default=d.ref_block)
    ap.add_argument("--ref-iters", type=int, default=d.ref_iters)
    ap.add_argument("--power-iters", type=int, default=d.power_iters)
    ap.add_argument("--warm-power-iters", type=int, default=d.warm_power_iters)
    ap.add_argument("--lanczos-iters", type=int, default=d.lanczos_iters)
    ap.add_argument("--reps", type=int, default=d.reps)
    ap.add_argument("--parts", default="costs,cold,warm")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave)")
    ap.add_argument("--results", default=None, help="append the Markdown report to this file")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    if args.pretrain < 1:
        ap.error("--pretrain: at least one Adam step is needed for the preconditioner P")
    unknown = set(args.parts.split(",")) - {"costs", "cold", "warm"}
    if unknown:
        ap.error(f"--parts: unknown part(s) {', '.join(sorted(unknown))}; choose from costs, cold, warm")
    return args


def main(argv=None) -> Report:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = Settings(**{f.name: getattr(args, f.name) for f in fields(Settings)})
    pb = Problem(bench_config(preset=args.preset, image_size=args.image_size, batch=args.batch, device=args.device,
                              data=args.data, lr=args.lr, seed=args.seed))
    name = device_name(pb.device)
    log(f"{args.preset}: {pb.n:,} parameters, batch {args.batch} at {args.image_size}², device {name}, "
        f"torch {torch.__version__}")
    command = " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    header = [f"## {args.preset}, batch {args.batch}, {args.image_size}×{args.image_size}, {name}\n",
              f"- date: {datetime.date.today().isoformat()}; torch {torch.__version__}; {pb.n:,} parameters; "
              f"data: {args.data or 'synthetic'}; Adam lr {args.lr:g}, {args.pretrain} steps before measuring",
              f"- command: `python -m bench.sharpness_bench {command}`",
              "- every solve in float32 with TF32 off unless its label says 'TF32 search'; HVP = one Hessian-vector "
              "product (one column of a block); LOBPCG solves stop at their residual tolerance"
              + (f", tightened to √({args.accuracy:g} · gap/λ) where the top Ritz values are close "
                 "(sharpness.accuracy)" if args.accuracy else "") + "\n"]
    report = run(pb, settings, set(args.parts.split(",")), args.pretrain, header)
    if args.results:
        with open(args.results, "a") as f:
            f.write("\n" + report.text)
        log(f"appended to {args.results}")
    return report


if __name__ == "__main__":
    main()
