"""Variance-preserving noise schedules and the closed-form forward process.

    q(x_t | x_0) = N(sqrt(ᾱ_t) x_0, (1 - ᾱ_t) I),   ᾱ_t = ∏_{s<=t} (1 - β_s)

Timesteps are indexed 0..T-1 (index 0 is the least noisy).  Every VP state
x_t corresponds to the variance-exploding state x_t / sqrt(ᾱ_t) = x_0 + σ_t ε
with σ_t = sqrt((1 - ᾱ_t) / ᾱ_t); samplers work with σ so that one denoiser
interface D(x, σ) ≈ E[x_0 | x_0 + σ ε = x] serves every variant.
"""
from __future__ import annotations

import math

import torch

from trainers.config import ScheduleConfig


def linear_betas(timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)


def cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal (2021): ᾱ(t) = cos²(((t/T) + s)/(1 + s) · π/2) / ᾱ(0)."""
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    return torch.clip(1 - alpha_bar[1:] / alpha_bar[:-1], 0.0, max_beta)


class NoiseSchedule:
    """Precomputed ᾱ_t, σ_t and friends for a discrete VP schedule.

    Tables are float64 on the CPU; :meth:`at` gathers float32 values on the
    device of the index tensor, from a copy of the table on that device made
    at its first use there (so that a loss, once evaluated on a GPU, copies
    nothing from the host: it can be recorded as a CUDA graph).
    """

    def __init__(self, betas: torch.Tensor):
        self.betas = betas.to(torch.float64)
        self.timesteps = len(betas)
        self.alphas = 1.0 - self.betas
        self.alpha_bar = torch.cumprod(self.alphas, dim=0)
        self.alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bar[:-1]])
        self.sqrt_alpha_bar = self.alpha_bar.sqrt()
        self.sqrt_one_minus_alpha_bar = (1.0 - self.alpha_bar).sqrt()
        self.sigmas = (self.sqrt_one_minus_alpha_bar / self.sqrt_alpha_bar)  # VE noise level per t
        self.snr = self.alpha_bar / (1.0 - self.alpha_bar)
        self._log_sigmas = self.sigmas.log()
        self._on_device: dict = {}   # (table id, device) -> the table on that device

    def _table(self, table: torch.Tensor, device: torch.device) -> torch.Tensor:
        if device.type == "cpu":
            return table
        key = (id(table), str(device))
        if key not in self._on_device:
            self._on_device[key] = (table, table.to(device))   # the table kept with it: its id stays its own
        return self._on_device[key][1]

    @classmethod
    def from_config(cls, cfg: ScheduleConfig) -> "NoiseSchedule":
        if cfg.kind == "linear":
            return cls(linear_betas(cfg.timesteps, cfg.beta_start, cfg.beta_end))
        return cls(cosine_betas(cfg.timesteps))

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def at(self, table: torch.Tensor, t: torch.Tensor, ndim: int = 4) -> torch.Tensor:
        """``table[t]`` as float32 on t's device, shaped to broadcast over an
        ``ndim``-dimensional batch.  ``t`` may be fractional (linear
        interpolation), which samplers use for continuous σ."""
        table = self._table(table, t.device)
        if t.dtype.is_floating_point:
            t = t.to(torch.float64).clamp(0, self.timesteps - 1)
            lo = t.floor().long()
            hi = (lo + 1).clamp(max=self.timesteps - 1)
            w = t - lo
            vals = table[lo] * (1 - w) + table[hi] * w
        else:
            vals = table[t]
        return vals.to(torch.float32).reshape(-1, *([1] * (ndim - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε."""
        return self.at(self.sqrt_alpha_bar, t, x0.ndim) * x0 + self.at(self.sqrt_one_minus_alpha_bar, t, x0.ndim) * noise

    def t_from_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timestep whose σ_t equals ``sigma`` (interpolated in log σ;
        clamped to the schedule's range)."""
        log_sigma = sigma.to(torch.float64).log().reshape(-1)
        table = self._table(self._log_sigmas, log_sigma.device)
        log_sigma = log_sigma.clamp(float(self._log_sigmas[0]), float(self._log_sigmas[-1]))
        hi = torch.searchsorted(table, log_sigma).clamp(1, self.timesteps - 1)
        lo = hi - 1
        w = (log_sigma - table[lo]) / (table[hi] - table[lo])
        return (lo.to(torch.float64) + w).to(torch.float32)
