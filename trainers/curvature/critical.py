"""Critical sharpness: the curvature along the update, from forward passes alone.

Kalra et al. 2026, "A Scalable Measure of Loss Landscape Curvature for
Analyzing the Training Dynamics of LLMs" (arXiv:2601.16979, Definition 2.1
and §2.2; reference code: github.com/facebookresearch/scalable-curvature,
``critical_lr_cache_utils.py``).  Given the update direction Δθ of the step
about to be taken (θ_next = θ − η Δθ at learning rate η), the **critical
learning rate** is the smallest η at which the loss increases,

    η_c = min {η > 0 : L(θ − η Δθ) > L(θ)},

and the **critical sharpness** is λ_c = 2/η_c.  :func:`critical_learning_rate`
finds η_c by the paper's two-phase line search: an exponential search from a
guess η₀ (double η while the loss does not rise, or halve it while it does)
brackets η_c in [η_lo, η_hi] with η_hi = 2 η_lo, then bisection narrows the
bracket until 1 − η_lo/η_hi ≤ ``tol`` (the paper's ε = 1/16); the estimate
is the midpoint (η_lo + η_hi)/2.  Every evaluation is one forward pass;
L(θ) is one more (the paper counts it too).  A non-finite loss counts as a
rise.

**What it measures.**  On the quadratic model
L(θ − ηΔθ) = L − η Δθᵀg + ½ η² ΔθᵀHΔθ the loss rises for η > 2 Δθᵀg /
ΔθᵀHΔθ, so λ_c is the directional sharpness ΔθᵀHΔθ / Δθᵀg (exactly so on a
quadratic, up to the bracket's width).  With gradient descent, Δθ = g: λ_c
= gᵀHg/‖g‖² ≤ λ₁(H).  With Adam, Δθ = m̂/(√v̂ + ε); when m̂ = g (exactly
so on Adam's first step) λ_c = uᵀ(DHD)u/‖u‖² with D = (√v̂ + ε)^{-1/2} and
u = Dg, a Rayleigh quotient of the preconditioned Hessian, so λ_c ≤
λ₁(H/(√v̂ + ε)) = (1 − β₁ᵗ⁺¹) λ₁(P⁻¹H) with the probe's ``update``
preconditioner P = (1 − β₁ᵗ⁺¹)(√v̂ + ε)
(:func:`trainers.curvature.thresholds.adam_preconditioner`; the factor is
1 − β₁ = 0.1 on the first step and tends to 1) — the paper's result for
adaptive optimizers, §2.3; with momentum, m̂ ≠ g, there is no such bound.  The threshold λ_c is compared with is 2/η
for every optimizer: λ_c > 2/η says the step about to be taken raises the
measured loss.  For GD that is also the stability threshold of λ₁(H); the
momentum and Adam thresholds of λ₁ ((2 + 2β)/η, (2 + 2β₁)/((1 − β₁)η))
are a different condition (an oscillation growing over many steps), which
the paper draws beside λ_c of AdamW (λ_c stays below it) but which λ_c is
not divided by here.  The paper searches on the training batch; the probe
searches on its frozen Hessian batch, like λ₁ (the training batch itself
when the objective is deterministic and ``sharpness.hessian_batch`` covers
it).

:func:`directional_sharpness` is that quadratic-model value, for comparison.
:func:`update_direction` computes Δθ from the optimizer's state and the
step's gradients without stepping (SGD with or without heavy-ball momentum,
Adam, AdamW), so that the optimizer's state is untouched.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

#: the paper's bisection tolerance ε = 1/2⁴ on 1 − η_lo/η_hi
PAPER_TOL = 1.0 / 16


@dataclass(frozen=True)
class CriticalResult:
    """The line search's answer: the bracket [lower, upper] of η_c (None when
    the budget ran out before the loss changed direction), the forward passes
    it took, and the estimate η_c = (lower + upper)/2, λ_c = 2/η_c."""
    lower: Optional[float]
    upper: Optional[float]
    passes: int

    @property
    def lr(self) -> Optional[float]:
        if self.lower is None or self.upper is None:
            return None
        return 0.5 * (self.lower + self.upper)

    @property
    def sharpness(self) -> Optional[float]:
        return None if self.lr is None else 2.0 / self.lr

    @staticmethod
    def relative_error(tol: float) -> float:
        """The largest |λ_c estimate − 2/η|/(2/η) for any η in a bracket with
        1 − lower/upper ≤ tol: (upper − lower)/(upper + lower) ≤ tol/(2 − tol)."""
        return tol / (2.0 - tol)


def critical_learning_rate(loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor],
                           direction: Sequence[torch.Tensor], guess: float, *, tol: float = PAPER_TOL,
                           max_passes: int = 16) -> CriticalResult:
    """η_c of ``loss_fn`` along θ − η·``direction`` by the line search of the
    module docstring, from the guess η₀ = ``guess``, in at most ``max_passes``
    forward passes (L(θ) included).

    ``params`` are changed in place for each evaluation (under ``no_grad``)
    and restored bit for bit afterwards, also when ``loss_fn`` raises.  When
    the budget ends during the bisection the bracket is wider than ``tol``;
    when it ends before a bracket is found (the loss rises at every η tried,
    e.g. Δθ is not a descent direction of this loss, or never rises) the
    result has no bracket.  A zero direction costs no pass and has none."""
    if not guess > 0 or not math.isfinite(guess):
        raise ValueError(f"critical_learning_rate: the guess must be a positive number; got {guess}")
    params, direction = list(params), list(direction)
    if not any(bool((d != 0).any()) for d in direction):
        return CriticalResult(None, None, 0)
    theta = [p.detach().clone() for p in params]
    passes = 0

    def loss_at(eta: float) -> float:
        nonlocal passes
        passes += 1
        with torch.no_grad():
            for p, t, d in zip(params, theta, direction):
                p.copy_(t - eta * d.to(t.dtype))
            return float(loss_fn())

    try:
        with torch.no_grad():
            base = float(loss_fn())
        passes = 1

        def rises(eta: float) -> bool:
            value = loss_at(eta)
            return not value <= base   # NaN/inf rises

        eta = guess
        up = not rises(eta)            # the loss did not rise at η₀: search upwards
        lower = upper = None
        while passes < max_passes:
            eta = eta * 2.0 if up else eta / 2.0
            risen = rises(eta)
            if up and risen:
                lower, upper = eta / 2.0, eta
                break
            if not up and not risen:
                lower, upper = eta, eta * 2.0
                break
        if lower is None:
            return CriticalResult(None, None, passes)
        while 1.0 - lower / upper > tol and passes < max_passes:
            mid = 0.5 * (lower + upper)
            if rises(mid):
                upper = mid
            else:
                lower = mid
        return CriticalResult(lower, upper, passes)
    finally:
        with torch.no_grad():
            for p, t in zip(params, theta):
                p.copy_(t)


def directional_sharpness(H: Callable[[torch.Tensor], torch.Tensor], grad: Sequence[torch.Tensor],
                          direction: Sequence[torch.Tensor], params: Sequence[torch.Tensor] = (),
                          weight_decay: float = 0.0) -> float:
    """The paper's directional sharpness λ_dir = ΔθᵀHΔθ / Δθᵀg (its
    Definition 2.2), the value of λ_c on the quadratic model of the loss:
    ``H`` the Hessian operator of the line search's loss (flat vectors; with
    coupled weight decay H + wd·I), ``grad`` ∇L, to which wd·θ (θ =
    ``params``) is added here.  One product; float64 sums; NaN when Δθᵀg = 0."""
    d = torch.cat([t.reshape(-1) for t in direction])
    g = torch.cat([t.reshape(-1) for t in grad]).to(d)
    if weight_decay:
        g = g + weight_decay * torch.cat([p.detach().reshape(-1) for p in params]).to(d)
    Hd = H(d).to(d).double()
    d, g = d.double(), g.double()
    slope = float(d @ g)
    return float(d @ Hd) / slope if slope != 0.0 else float("nan")


def update_direction(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor],
                     grads: Sequence[Optional[torch.Tensor]]) -> Optional[list[torch.Tensor]]:
    """Δθ of the update ``optimizer.step()`` would take now with gradients
    ``grads`` (what it reads from ``.grad``), per unit learning rate:
    θ_next = θ − η Δθ, computed from the state without changing it.

    * SGD: g' = g + wd·θ; with momentum β (dampening τ) the buffer
      b = g' on the first step, else β b + (1 − τ) g'; Δθ = b (Nesterov:
      g' + β b); no momentum: Δθ = g'.
    * Adam: g' = g + wd·θ; m, v one step on from the state with g';
      Δθ = m̂ / (√v̂ + ε) with the bias corrections of step t + 1 (AMSGrad:
      the running maximum of v).
    * AdamW: the same with g' = g, plus its decoupled decay: Δθ = m̂/(√v̂ + ε)
      + wd·θ (PyTorch's θ(1 − η wd) − η m̂/(√v̂ + ε)).

    ``maximize`` flips the sign.  None when a gradient is missing or not
    finite (no update is taken); a TypeError for another optimizer."""
    params, grads = list(params), list(grads)
    if len(grads) != len(params):
        raise ValueError(f"update_direction: {len(grads)} gradients for {len(params)} parameters")
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    out = []
    with torch.no_grad():
        for p, g in zip(params, grads):
            if g is None or not bool(torch.isfinite(g).all()):
                return None
            group, state = group_of[id(p)], optimizer.state.get(p, {})
            if isinstance(optimizer, torch.optim.SGD):
                d = _sgd_direction(p, g, state, group)
            elif isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
                d = _adam_direction(p, g, state, group, decoupled=isinstance(optimizer, torch.optim.AdamW))
            else:
                raise TypeError(f"update_direction: {type(optimizer).__name__} is not supported "
                                "(SGD, Adam, AdamW)")
            out.append(-d if group.get("maximize", False) else d)
    return out


def _sgd_direction(p, g, state, group):
    wd, beta = group["weight_decay"], group["momentum"]
    g = g + wd * p if wd else g
    if not beta:
        return g.clone()
    buf = state.get("momentum_buffer")
    b = g.clone() if buf is None else beta * buf + (1.0 - group["dampening"]) * g
    return g + beta * b if group["nesterov"] else b


def _adam_direction(p, g, state, group, decoupled: bool):
    beta1, beta2 = group["betas"]
    eps, wd = group["eps"], group["weight_decay"]
    if wd and not decoupled:
        g = g + wd * p
    if state and "exp_avg" in state:
        t = float(state["step"]) + 1.0
        m = beta1 * state["exp_avg"] + (1.0 - beta1) * g
        v = beta2 * state["exp_avg_sq"] + (1.0 - beta2) * g.square()
        if group.get("amsgrad", False):
            v = torch.maximum(state["max_exp_avg_sq"], v)
    else:
        t = 1.0
        m, v = (1.0 - beta1) * g, (1.0 - beta2) * g.square()
    d = (m / (1.0 - beta1 ** t)) / ((v / (1.0 - beta2 ** t)).sqrt() + eps)
    return d + wd * p if (wd and decoupled) else d
