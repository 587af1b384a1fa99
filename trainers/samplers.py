"""Samplers for evaluation: DDPM ancestral, DDIM, EDM Heun, DPM-Solver++(2M).

Every sampler drives one variant-independent denoiser D(x, σ) ≈ E[x₀ | x]
of the variance-exploding state x = x₀ + σ ε (``Variant.denoiser(model)``)
and returns x at σ = 0, i.e. images in the data space.

* ``ddpm`` — ancestral sampling with the posterior q(x_{t−1} | x_t, x̂₀)
  (Ho et al. 2020; variance β̃_t) on ``steps`` evenly strided timesteps of
  the discrete schedule (the respacing of Nichol & Dhariwal 2021).
* ``ddim`` — DDIM (Song et al. 2021) on the same strided timesteps, option
  ``eta`` (0: deterministic; 1: the same process as ``ddpm``).
* ``heun`` — EDM's deterministic 2nd-order Heun solver (Karras et al. 2022,
  Algorithm 1) on the Karras σ schedule with ρ = 7 (option ``rho``) between
  the model's σ_max and σ_min, then one Euler step to σ = 0.
* ``dpmpp2m`` — DPM-Solver++(2M) (Lu et al. 2022), multistep 2nd order in
  data prediction, on the same Karras σ schedule (as in k-diffusion).

``steps`` is the number of noise levels visited: ddpm, ddim and dpmpp2m
evaluate the denoiser ``steps`` times, heun 2·steps − 1 times.  The DDPM/DDIM
walk starts from the VP prior x_T ~ N(0, I), i.e. x = x_T √(1 + σ_T²); Heun and
DPM-Solver++ start from N(0, σ_max² I).
"""
from __future__ import annotations

import math
import os
from typing import Callable, Optional

import torch

from trainers.config import SAMPLERS
from trainers.schedules import NoiseSchedule

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Progress = Optional[Callable[[int, int], None]]


# ---------------------------------------------------------------------------
# noise-level grids


def strided_timesteps(schedule: NoiseSchedule, steps: int) -> list[int]:
    """``steps`` timesteps from T−1 down to 0, evenly spaced (descending)."""
    if not 1 <= steps <= schedule.timesteps:
        raise ValueError(f"steps: must be in [1, {schedule.timesteps}] for a discrete-schedule sampler; got {steps}")
    if steps == 1:
        return [schedule.timesteps - 1]
    grid = torch.linspace(schedule.timesteps - 1, 0, steps, dtype=torch.float64).round().long()
    return grid.tolist()


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> list[float]:
    """σ_i = (σ_max^{1/ρ} + i/(N−1) (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, i < N, then σ_N = 0
    (Karras et al. 2022, Eq. 5)."""
    if steps < 1:
        raise ValueError(f"steps: must be >= 1; got {steps}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"sigma_min, sigma_max: need 0 < sigma_min < sigma_max; got {sigma_min}, {sigma_max}")
    if steps == 1:
        return [float(sigma_max), 0.0]
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return [(hi + i / (steps - 1) * (lo - hi)) ** rho for i in range(steps)] + [0.0]


# ---------------------------------------------------------------------------
# the samplers (x: float32 batch on the generator's device)


def _randn(shape, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)


def _denoise(denoiser: Denoiser, x: torch.Tensor, sigma: float) -> torch.Tensor:
    return denoiser(x, torch.full((x.shape[0],), sigma, device=x.device, dtype=torch.float32)).float()


def _report(progress: Progress, i: int, n: int) -> None:
    if progress is not None:
        progress(i + 1, n)


def sample_ddpm(denoiser: Denoiser, shape, schedule: NoiseSchedule, steps: int, generator: torch.Generator,
                progress: Progress = None) -> torch.Tensor:
    """Ancestral DDPM in the VP state x_t; x_{t'} ~ q(x_{t'} | x_t, x̂₀) with
    t' the next strided timestep (ᾱ_{t'} = 1 after the last one)."""
    ts = strided_timesteps(schedule, steps)
    x = _randn(shape, generator)  # x_T
    for i, t in enumerate(ts):
        ab = float(schedule.alpha_bar[t])
        ab_prev = float(schedule.alpha_bar[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        beta = 1 - ab / ab_prev
        x0 = _denoise(denoiser, x / math.sqrt(ab), float(schedule.sigmas[t]))
        mean = (math.sqrt(ab_prev) * beta / (1 - ab)) * x0 + (math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab)) * x
        var = (1 - ab_prev) / (1 - ab) * beta
        x = mean + math.sqrt(var) * _randn(shape, generator) if var > 0 else mean
        _report(progress, i, len(ts))
    return x


def sample_ddim(denoiser: Denoiser, shape, schedule: NoiseSchedule, steps: int, generator: torch.Generator,
                eta: float = 0.0, progress: Progress = None) -> torch.Tensor:
    """DDIM written for the VE state: with ε̂ = (x − x̂₀)/σ,

        x' = x̂₀ + √(σ'² − c²) ε̂ + c z,   c = η σ' √(1 − σ'²/σ²),

    which is Song et al.'s update x_{t'} = √ᾱ' x̂₀ + √(1 − ᾱ' − σ_η²) ε̂ + σ_η z
    divided by √ᾱ'."""
    if eta < 0:
        raise ValueError(f"eta: must be >= 0; got {eta}")
    ts = strided_timesteps(schedule, steps)
    sig = [float(schedule.sigmas[t]) for t in ts] + [0.0]
    x = _randn(shape, generator) * math.sqrt(1 + sig[0] ** 2)
    for i in range(len(ts)):
        s, s_next = sig[i], sig[i + 1]
        x0 = _denoise(denoiser, x, s)
        eps = (x - x0) / s
        c = eta * s_next * math.sqrt(max(0.0, 1 - s_next ** 2 / s ** 2))
        x = x0 + math.sqrt(max(0.0, s_next ** 2 - c ** 2)) * eps
        if c > 0:
            x = x + c * _randn(shape, generator)
        _report(progress, i, len(ts))
    return x


def sample_heun(denoiser: Denoiser, shape, sigmas: list[float], generator: torch.Generator,
                progress: Progress = None) -> torch.Tensor:
    """EDM Algorithm 1 (deterministic): Heun steps along dx/dσ = (x − D(x, σ))/σ,
    Euler for the last step to σ = 0."""
    x = _randn(shape, generator) * sigmas[0]
    n = len(sigmas) - 1
    for i in range(n):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = (x - _denoise(denoiser, x, s)) / s
        x_next = x + (s_next - s) * d
        if s_next > 0:
            d_next = (x_next - _denoise(denoiser, x_next, s_next)) / s_next
            x_next = x + (s_next - s) * (d + d_next) / 2
        x = x_next
        _report(progress, i, n)
    return x


def sample_dpmpp_2m(denoiser: Denoiser, shape, sigmas: list[float], generator: torch.Generator,
                    progress: Progress = None) -> torch.Tensor:
    """DPM-Solver++(2M) in λ = −ln σ (Lu et al. 2022, Algorithm 2):

        x' = (σ'/σ) x − (e^{−h} − 1) D̃,   h = λ' − λ,
        D̃ = (1 + 1/(2r)) D_i − (1/(2r)) D_{i−1},   r = h_{i−1}/h

    with D̃ = D_i on the first step and on the final step to σ = 0."""
    x = _randn(shape, generator) * sigmas[0]
    n = len(sigmas) - 1
    previous, h_previous = None, None
    for i in range(n):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = _denoise(denoiser, x, s)
        if s_next == 0:
            x = denoised
        else:
            h = math.log(s) - math.log(s_next)
            d = denoised
            if previous is not None:
                r = h_previous / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * previous
            x = (s_next / s) * x - math.expm1(-h) * d
            h_previous = h
        previous = denoised
        _report(progress, i, n)
    return x


# ---------------------------------------------------------------------------
# entry points


def sample(denoiser: Denoiser, shape, sampler: str, steps: int, schedule: NoiseSchedule,
           generator: torch.Generator, *, sigma_min: Optional[float] = None, sigma_max: Optional[float] = None,
           rho: float = 7.0, eta: float = 0.0, progress: Progress = None) -> torch.Tensor:
    """Images x₀ (unclamped, float32, on the generator's device) of ``shape``.

    ``sigma_min``/``sigma_max`` bound the Karras schedule of heun/dpmpp2m
    (default: the discrete schedule's range; pass ``Variant.sigma_range``);
    ``eta`` is DDIM's; ``rho`` the Karras schedule's."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: must be one of {', '.join(SAMPLERS)}; got {sampler!r}")
    if sampler == "ddpm":
        return sample_ddpm(denoiser, shape, schedule, steps, generator, progress)
    if sampler == "ddim":
        return sample_ddim(denoiser, shape, schedule, steps, generator, eta, progress)
    sigmas = karras_sigmas(steps, schedule.sigma_min if sigma_min is None else sigma_min,
                           schedule.sigma_max if sigma_max is None else sigma_max, rho)
    if sampler == "heun":
        return sample_heun(denoiser, shape, sigmas, generator, progress)
    return sample_dpmpp_2m(denoiser, shape, sigmas, generator, progress)


def generate(model: torch.nn.Module, variant, n: int, sampler: str, steps: int, batch_size: int,
             generator: torch.Generator, device, *, shape: Optional[tuple[int, ...]] = None,
             progress: Progress = None, **options) -> torch.Tensor:
    """``n`` images in [−1, 1] (float32, CPU) from ``model`` trained with
    ``variant``, in batches of ``batch_size`` under ``torch.no_grad``.

    ``shape`` (C, H, W) defaults to ``model.image_shape`` (the U-Net's);
    ``generator`` lives on ``device``; ``progress(done, n)`` is called after
    each batch; ``options`` go to :func:`sample` (eta, rho)."""
    if n < 1 or batch_size < 1:
        raise ValueError(f"n, batch_size: must be >= 1; got {n}, {batch_size}")
    shape = tuple(shape or model.image_shape)
    if torch.device(device).type != generator.device.type:
        raise ValueError(f"generator: must live on {device}; it is on {generator.device}")
    sigma_min, sigma_max = variant.sigma_range
    options = {"sigma_min": sigma_min, "sigma_max": sigma_max, **options}
    was_training = model.training
    model.eval()
    denoise = variant.denoiser(model)
    images = []
    try:
        with torch.no_grad():
            for start in range(0, n, batch_size):
                b = min(batch_size, n - start)
                x = sample(denoise, (b, *shape), sampler, steps, variant.schedule, generator, **options)
                images.append(x.clamp(-1, 1).cpu())
                if progress is not None:
                    progress(start + b, n)
    finally:
        model.train(was_training)
    return torch.cat(images)


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: Optional[int] = None) -> None:
    """A PNG grid of data-space images in [−1, 1] (``nrow`` per row; default ⌈√N⌉)."""
    from torchvision.utils import save_image

    nrow = nrow or max(1, math.ceil(math.sqrt(images.shape[0])))
    save_image(((images.detach().float().cpu() + 1) / 2).clamp(0, 1), str(path), nrow=nrow, padding=1)
