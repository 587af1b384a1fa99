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

from trainers.config import ADAM_PRECONDITIONERS, COUPLED_DECAY_OPTIMIZERS, PRECONDITIONED_OPTIMIZERS, OptimConfig


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


def coupled_weight_decay(cfg: OptimConfig) -> float:
    """The coupled L2 weight decay of ``cfg``: ``optim.weight_decay`` for
    gd/momentum/adam, whose PyTorch update adds wd·θ to the gradient, so that
    the update descends L + (wd/2)‖θ‖², of Hessian H + wd·I; 0 for AdamW,
    whose decay is decoupled (θ ← (1 − η·wd)θ, outside the gradient)."""
    return float(cfg.weight_decay) if cfg.name in COUPLED_DECAY_OPTIMIZERS else 0.0


def adam_preconditioner(optimizer: torch.optim.Optimizer, params, convention: str = "update",
                        grads=None) -> list[torch.Tensor] | None:
    """Per-parameter diagonal P of an Adam/AdamW update, written as
    preconditioned heavy ball θ ← θ − η P⁻¹ m (the form of the
    (2 + 2β₁)/((1 − β₁)η) threshold).

    ``convention="update"`` (Cohen et al. 2022): the preconditioner of the
    update about to be taken from the current state and this step's
    gradients ``grads`` (the tensors the optimizer will read from ``.grad``,
    after clipping), with t = the parameter's own ``step`` counter (0 before
    its first step):

        g' = g + wd·θ (Adam's coupled weight decay; AdamW: g' = g)
        v_{t+1} = β₂ v_t + (1 − β₂) g'²,   v̂_{t+1} = v_{t+1} / (1 − β₂^{t+1})
        P = (1 − β₁^{t+1}) (√v̂_{t+1} + ε)

    (torch.optim.Adam's step is θ ← θ − η m_{t+1} / ((1 − β₁^{t+1})(√v̂_{t+1} + ε))).
    None when ``grads`` is None, a gradient is missing or one is not finite
    (no update is taken).

    ``convention="init2winit"`` (google/init2winit): P = √v̂_t + ε of the
    state *before* the step, without the first-moment bias factor; None
    before the optimizer's first step.
    """
    group = optimizer.param_groups[0]
    beta1, beta2 = group["betas"]
    eps = group["eps"]
    out = []
    if convention == "init2winit":
        for p in params:
            state = optimizer.state.get(p)
            if not state or "exp_avg_sq" not in state:
                return None
            step = float(state["step"])
            v_hat = state["exp_avg_sq"] / (1.0 - beta2 ** step)
            out.append(v_hat.sqrt() + eps)
        return out
    if convention != "update":
        raise ValueError(f"adam_preconditioner: convention must be one of {', '.join(ADAM_PRECONDITIONERS)}; "
                         f"got {convention!r}")
    if grads is None:
        return None
    grads = list(grads)
    if len(grads) != len(params):
        raise ValueError(f"adam_preconditioner: {len(grads)} gradients for {len(params)} parameters")
    coupled = 0.0 if isinstance(optimizer, torch.optim.AdamW) else float(group.get("weight_decay", 0.0))
    with torch.no_grad():
        for p, g in zip(params, grads):
            if g is None or not bool(torch.isfinite(g).all()):
                return None
            state = optimizer.state.get(p)
            g = g + coupled * p if coupled else g
            if state and "exp_avg_sq" in state:
                t = float(state["step"])
                v = beta2 * state["exp_avg_sq"] + (1.0 - beta2) * g.square()
            else:
                t = 0.0
                v = (1.0 - beta2) * g.square()
            v_hat = v / (1.0 - beta2 ** (t + 1.0))
            out.append((1.0 - beta1 ** (t + 1.0)) * (v_hat.sqrt() + eps))
    return out
