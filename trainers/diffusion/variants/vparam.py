"""v-prediction (Salimans & Ho 2022, "Progressive Distillation", §4 and App. D).

The network predicts the velocity v = √ᾱ_t ε − √(1−ᾱ_t) x₀ of the VP state
x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε; the loss is the plain ‖v_θ − v‖² (which in
x₀ terms is the "SNR + 1" weighting, bounded at both ends of the schedule).
Conversions back to x₀ and ε (used by the denoiser) live in
:mod:`trainers.diffusion.parameterization`: x₀ = √ᾱ x_t − √(1−ᾱ) v,
ε = √(1−ᾱ) x_t + √ᾱ v.
"""
from __future__ import annotations

from trainers.diffusion.variants.base import Base


class VParam(Base):
    """Uniform timesteps, v-target, unweighted MSE."""

    name = "vparam"
    prediction = "v"
