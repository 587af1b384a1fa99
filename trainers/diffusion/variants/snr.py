"""Min-SNR-γ loss weighting (Hang et al. 2023, "Efficient Diffusion Training
via Min-SNR Weighting Strategy", §3.4 and §4.2).

Training on timestep t is treated as one task of a multi-task problem; the
per-task weight in x₀ terms is w_t = min(SNR(t), γ) with SNR = ᾱ/(1−ᾱ),
which caps the weight of the low-noise (high-SNR) tasks.  Expressed for the
network's own target (‖x₀ − x̂₀‖² = ‖ε − ε̂‖²/SNR = ‖v − v̂‖²/(SNR + 1)):

    target  eps:  min(SNR, γ) / SNR
            v:    min(SNR, γ) / (SNR + 1)
            x0:   min(SNR, γ)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from trainers.diffusion.parameterization import PREDICTIONS
from trainers.diffusion.variants.base import Base, Draw, check_option


@dataclass
class MinSNROptions:
    gamma: float = 5.0
    target: str = "eps"   # what the network predicts: eps, v or x0

    def __post_init__(self):
        check_option(self.gamma > 0, "gamma", f"must be > 0; got {self.gamma}")
        check_option(self.target in PREDICTIONS, "target",
                     f"must be one of {', '.join(PREDICTIONS)}; got {self.target!r}")


class MinSNR(Base):
    """Uniform timesteps, Min-SNR-γ weighted loss for the chosen target."""

    name = "snr"
    Options = MinSNROptions

    @property
    def prediction(self) -> str:
        return self.options.target

    def weight_at(self, t: torch.Tensor) -> torch.Tensor:
        """The Min-SNR-γ weight (B,) of timesteps t, in the network's target."""
        snr = self.schedule.at(self.schedule.snr, t, ndim=1)
        clipped = snr.clamp(max=self.options.gamma)
        if self.options.target == "eps":
            w = clipped / snr
        elif self.options.target == "v":
            w = clipped / (snr + 1)
        else:
            w = clipped
        return w

    def loss_weight(self, d: Draw) -> torch.Tensor:
        return self.weight_at(d.t)
