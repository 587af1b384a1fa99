"""The reference packages the sharpness bench compares with: PyHessian and
hessian-eigenthings (``pip install -e .[bench]``).

Each function returns what it measured, or raises :class:`Missing` when its
package is not installed; the bench reports those rows as skipped.

* :func:`pyhessian_product_cost`, :func:`eigenthings_product_cost`: one
  Hessian-vector product of each package on the frozen-batch loss.
* :func:`pyhessian_power_iteration`: PyHessian's own power iteration
  (``hessian.eigenvalues``).  PyHessian reports only its final estimate; the
  estimates after each product are recovered by hooks on the parameters,
  which see every product PyHessian computes, and its own update
  (v ← Hv/‖Hv‖, estimate vᵀHv, with its own helpers).
* :func:`power_iteration`, :func:`lanczos`: hessian-eigenthings' power
  iteration and Lanczos (full re-orthogonalisation) run on *our* operator,
  so that product counts compare the algorithms, not the products.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.common import Problem, timed
from trainers.curvature.hessian import arithmetic, flatten, unflatten

INSTALL = "pip install -e .[bench]"


class Missing(RuntimeError):
    """A reference package is not installed."""


def missing(name: str) -> Optional[str]:
    """Why the package ``name`` cannot be used (None: it is installed)."""
    import importlib.util
    return None if importlib.util.find_spec(name) is not None else f"{name} not installed ({INSTALL})"


def _import(name: str) -> None:
    reason = missing(name)
    if reason is not None:
        raise Missing(reason)


@dataclass
class Estimate:
    """An eigenvalue estimate after ``products`` Hessian-vector products."""
    products: float
    value: float
    residual: Optional[float] = None


@dataclass
class PowerResult:
    value: float
    products: int
    converged: Optional[bool]
    trajectory: list[Estimate]
    vector: Optional[torch.Tensor] = None


# ---------------------------------------------------------------------------
# PyHessian


class _Wrapped(nn.Module):
    """The U-Net as PyHessian wants it, ``model(inputs)``: the frozen t bound."""

    def __init__(self, unet: nn.Module, t: torch.Tensor):
        super().__init__()
        self.unet = unet
        self.t = t

    def forward(self, x):
        return self.unet(x, self.t.float())


def _pyhessian_problem(pb: Problem):
    """(model, inputs, targets, criterion) for PyHessian: x_t from the frozen
    batch, MSE against the frozen noise — the ``base`` variant's loss."""
    draw = pb.draw
    x_t = pb.trainer.schedule.q_sample(draw.x0, draw.t, draw.input_noise)
    return _Wrapped(pb.model, draw.t), x_t, draw.noise, (lambda out, target: F.mse_loss(out.float(), target))


def _pyhessian(pb: Problem):
    _import("pyhessian")
    from pyhessian import hessian as PyHessian

    model, x_t, noise, criterion = _pyhessian_problem(pb)
    return PyHessian(model, criterion, data=(x_t, noise), cuda=pb.device.type == "cuda")


def _clear_grads(pb: Problem) -> None:
    for p in pb.params:   # PyHessian leaves the gradient graph in .grad
        p.grad = None


def pyhessian_product_cost(pb: Problem, v: torch.Tensor, reps: int):
    """(set-up seconds, seconds per product, product) of PyHessian's
    graph-reusing product of the flat vector v (float32 arithmetic)."""
    from bench.common import seconds

    with arithmetic("float32", pb.device):
        t_init, hess = seconds(lambda: _pyhessian(pb), pb.device)
        from pyhessian.utils import hessian_vector_product

        parts = unflatten(v.contiguous(), hess.params)
        try:
            t, hv = timed(lambda: hessian_vector_product(hess.gradsH, hess.params, parts), pb.device, reps)
        finally:
            del hess
            _clear_grads(pb)
    return t_init, t, flatten(hv)


def pyhessian_power_iteration(pb: Problem, max_iter: int, tol: float, seed: int = 11) -> PowerResult:
    """PyHessian's power iteration for λ₁(H) from its own random start (global
    RNG seeded with ``seed``), with the estimate after every product."""
    _import("pyhessian")
    from pyhessian.utils import group_product, normalization, orthnormal

    trajectory: list[Estimate] = []
    with arithmetic("float32", pb.device):
        hess = _pyhessian(pb)
        params = hess.params
        state = {"v": None, "parts": {}}

        def record(i: int) -> Callable[[torch.Tensor], None]:
            def hook(grad: torch.Tensor) -> None:
                state["parts"][i] = grad.detach()
                if len(state["parts"]) == len(params):   # one complete product Hv
                    hv = [state["parts"][j] for j in range(len(params))]
                    state["parts"] = {}
                    v = orthnormal(state["v"], [])
                    trajectory.append(Estimate(len(trajectory) + 1, group_product(hv, v).cpu().item()))
                    state["v"] = normalization(hv)
            return hook

        handles = [p.register_hook(record(i)) for i, p in enumerate(params)]
        try:
            torch.manual_seed(seed)   # PyHessian's start vector, drawn as it draws it
            state["v"] = normalization([torch.randn(p.size()).to(hess.device) for p in params])
            torch.manual_seed(seed)
            eigenvalues, _ = hess.eigenvalues(maxIter=max_iter, tol=tol)
        finally:
            for h in handles:
                h.remove()
            del hess
            _clear_grads(pb)
    return PowerResult(float(eigenvalues[0]), len(trajectory), None, trajectory)


# ---------------------------------------------------------------------------
# hessian-eigenthings


def eigenthings_product_cost(pb: Problem, v: torch.Tensor, reps: int):
    """(seconds per product, product) of hessian-eigenthings' own Hessian
    operator (autograd, graph rebuilt per product)."""
    _import("hessian_eigenthings")
    from hessian_eigenthings import HessianOperator

    with arithmetic("float32", pb.device):
        op = HessianOperator(pb.model, [pb.draw], lambda model, d: pb.trainer.variant.loss(model, d).mean())
        return timed(lambda: op.matvec(v.contiguous()), pb.device, reps)


def _lambda_operator(op: Callable[[torch.Tensor], torch.Tensor], v0: torch.Tensor, record=None):
    from hessian_eigenthings import LambdaOperator

    def matvec(v):
        out = op(v[:, None])[:, 0]
        if record is not None:
            record(v, out)
        return out
    return LambdaOperator(matvec, size=v0.shape[0], device=v0.device, dtype=v0.dtype)


def power_iteration(op: Callable[[torch.Tensor], torch.Tensor], v0: torch.Tensor, max_iter: int,
                    tol: float) -> PowerResult:
    """hessian-eigenthings' power iteration (stops when the change of the
    estimate and the residual are below ``tol``) on the flat operator ``op``."""
    _import("hessian_eigenthings")
    from hessian_eigenthings import power_iteration_one

    trajectory: list[Estimate] = []
    lam_op = _lambda_operator(op, v0, lambda v, out: trajectory.append(
        Estimate(len(trajectory) + 1, float(v @ out))))
    value, vector, _res, _iters, converged = power_iteration_one(lam_op, max_iter=max_iter, tol=tol, init=v0)
    return PowerResult(float(value), len(trajectory), bool(converged), trajectory, vector)


def lanczos(op: Callable[[torch.Tensor], torch.Tensor], n: int, device, dtype, iters: int,
            seed: int = 11) -> list[Estimate]:
    """hessian-eigenthings' Lanczos (full re-orthogonalisation) on ``op`` from
    a seeded random start: the top Ritz value of every prefix of the
    tridiagonal matrix (the m-step Lanczos estimate after m products)."""
    _import("hessian_eigenthings")
    from hessian_eigenthings import lanczos_tridiagonal

    v0 = torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=dtype)
    td = lanczos_tridiagonal(_lambda_operator(op, v0), v0, iters, reorthogonalize=True)
    m = td.alphas.shape[0]
    T = torch.diag(td.alphas.double().cpu())
    if m > 1:
        off = td.betas[:m - 1].double().cpu()
        T += torch.diag(off, 1) + torch.diag(off, -1)
    return [Estimate(k, float(torch.linalg.eigvalsh(T[:k, :k])[-1])) for k in range(1, m + 1)]
