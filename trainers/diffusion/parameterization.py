"""What a diffusion network predicts, and how to convert between the choices.

A variance-preserving state is x_t = α x₀ + s ε with α = √ᾱ_t, s = √(1 − ᾱ_t)
(so α² + s² = 1).  The same state in the variance-exploding picture is
x = x_t / α = x₀ + σ ε with σ = s / α, i.e. α = 1/√(1 + σ²), s = σ/√(1 + σ²).

A network can predict

* ``eps`` — the noise ε (Ho et al. 2020);
* ``x0``  — the clean image x₀;
* ``v``   — the velocity v = α ε − s x₀ (Salimans & Ho 2022).

Given x_t any one of them determines the other two:

    x₀ = (x_t − s ε)/α = α x_t − s v          ε = (x_t − α x₀)/s = s x_t + α v
"""
from __future__ import annotations

import torch

PREDICTIONS = ("eps", "x0", "v")


def _check(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {', '.join(PREDICTIONS)}; got {prediction!r}")


def vp_scales(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(α, s) of the VP state whose VE noise level is σ."""
    alpha = (1 + sigma ** 2).rsqrt()
    return alpha, sigma * alpha


def velocity(x0: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """v = α ε − s x₀."""
    return alpha * eps - s * x0


def target(prediction: str, x0: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The regression target of a network that predicts ``prediction``."""
    _check(prediction)
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    return velocity(x0, eps, alpha, s)


def to_x0(prediction: str, x_t: torch.Tensor, out: torch.Tensor, alpha: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x₀ implied by the network output ``out`` at the VP state x_t."""
    _check(prediction)
    if prediction == "eps":
        return (x_t - s * out) / alpha
    if prediction == "x0":
        return out
    return alpha * x_t - s * out


def to_eps(prediction: str, x_t: torch.Tensor, out: torch.Tensor, alpha: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """ε implied by the network output ``out`` at the VP state x_t."""
    _check(prediction)
    if prediction == "eps":
        return out
    if prediction == "x0":
        return (x_t - alpha * out) / s
    return s * x_t + alpha * out


def batch_sigma(sigma, x: torch.Tensor) -> torch.Tensor:
    """σ as a float32 (B,) tensor on x's device (σ may be a number, a 0-d or a (B,) tensor)."""
    sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).reshape(-1)
    return sigma.expand(x.shape[0]) if sigma.numel() == 1 else sigma


def expand_like(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A (B,) tensor shaped to broadcast over the batch ``x``."""
    return v.reshape(-1, *([1] * (x.ndim - 1)))
