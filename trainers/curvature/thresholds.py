"""Stability thresholds of the optimizers, and the preconditioner Adam's threshold applies to.

For a quadratic with curvature λ along an eigenvector, each update rule is
stable only while λ (or, for Adam, the eigenvalue of the preconditioned
Hessian P⁻¹H) stays below a threshold:

* gradient descent:          2 / η
* heavy-ball momentum β:     (2 + 2β) / η
* Adam (frozen P, β₁):       (2 + 2β₁) / ((1 − β₁) η)     (38/η at β₁ = 0.9)

(Cohen et al. 2021, "Gradient Descent on Neural Networks Typically Occurs at
the Edge of Stability"; Cohen et al. 2022, "Adaptive Gradient Methods at the
Edge of Stability".)
"""
from __future__ import annotations

import torch

from trainers.config import PRECONDITIONED_OPTIMIZERS, OptimConfig


def gd_threshold(lr: float) -> float:
    return 2.0 / lr


def momentum_threshold(lr: float, beta: float) -> float:
    return (2.0 + 2.0 * beta) / lr


def adam_threshold(lr: float, beta1: float) -> float:
    return (2.0 + 2.0 * beta1) / ((1.0 - beta1) * lr)


def stability_threshold(cfg: OptimConfig, lr: float | None = None) -> float:
    """The threshold of ``cfg``'s optimizer at learning rate ``lr`` (default ``cfg.lr``)."""
    lr = cfg.lr if lr is None else lr
    if cfg.name == "gd":
        return gd_threshold(lr)
    if cfg.name == "momentum":
        return momentum_threshold(lr, cfg.momentum)
    return adam_threshold(lr, cfg.betas[0])


def is_preconditioned(cfg: OptimConfig) -> bool:
    """Whether the threshold applies to P⁻¹H (Adam family) rather than H."""
    return cfg.name in PRECONDITIONED_OPTIMIZERS


def adam_preconditioner(optimizer: torch.optim.Optimizer, params) -> list[torch.Tensor] | None:
    """Per-parameter diagonal P = √v̂ + ε of an Adam/AdamW optimizer's current
    state (bias-corrected second moment), or None before its first step."""
    group = optimizer.param_groups[0]
    beta2, eps = group["betas"][1], group["eps"]
    out = []
    for p in params:
        state = optimizer.state.get(p)
        if not state or "exp_avg_sq" not in state:
            return None
        step = float(state["step"])
        v_hat = state["exp_avg_sq"] / (1.0 - beta2 ** step)
        out.append(v_hat.sqrt() + eps)
    return out
