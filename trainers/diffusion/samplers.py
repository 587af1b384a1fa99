"""Samplers for evaluation: DDPM ancestral, DDIM, EDM Heun, DPM-Solver++(2M).

Every sampler drives one variant-independent denoiser D(x, σ) ≈ E[x₀ | x]
of the variance-exploding state x = x₀ + σ ε (``Variant.denoiser(model)``)
along a descending grid of noise levels σ₀ > … > σ_{N−1} > σ_N = 0 and
returns x at σ = 0, i.e. images in the data space.

* ``ddpm`` — ancestral sampling with the posterior q(x_{t'} | x_t, x̂₀)
  (Ho et al. 2020; variance β̃) between consecutive grid levels.
* ``ddim`` — DDIM (Song et al. 2021), option ``eta`` (0: deterministic;
  1: the same process as ``ddpm``).
* ``heun`` — EDM's deterministic 2nd-order Heun solver (Karras et al. 2022,
  Algorithm 1), Euler for the last step to σ = 0.
* ``dpmpp2m`` — DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), multistep
  2nd order in data prediction, 1st order on the first step and on the final
  step to σ = 0 (as in k-diffusion and diffusers).

The grid (option ``spacing``, :data:`SPACINGS`; default per sampler in
:data:`DEFAULT_SPACING`):

* ``uniform`` — evenly strided timesteps of the discrete schedule, T−1 … 0
  (the respacing of Nichol & Dhariwal 2021);
* ``quadratic`` — timesteps t ∝ (i/(N−1))², dense near t = 0 (the DDIM paper's
  CIFAR-10 choice, here spanning the whole schedule T−1 … 0);
* ``logsnr`` — σ uniform in λ = −ln σ (half the log-SNR) between σ_max and
  σ_min (DPM-Solver's "logSNR" steps; diffusers' ``use_lu_lambdas``);
* ``karras`` — σ uniform in σ^{1/ρ} between σ_max and σ_min, ρ = 7 (EDM).

``uniform``/``quadratic`` are timesteps of the discrete schedule (its σ range);
``logsnr``/``karras`` are continuous σ between ``sigma_min`` and ``sigma_max``
(default: the discrete schedule's range; :func:`generate` passes
``Variant.sigma_range``).  The defaults are the papers'; for DDIM and
DPM-Solver++ they are also the most accurate of the four on Gaussian data,
whose probability-flow ODE is solvable in closed form (tests/test_samplers.py).
On N(μ, s²) with s = 0.5 and the linear schedule the sampled variance is off
by −6.5% for DDIM with 50 quadratic steps (−11% uniform) and by +2.9% for
DPM-Solver++(2M) with 20 logSNR steps (+10% Karras).  There each DDIM step
multiplies the exact flow's gain by cos Δθ, θ = arctan(σ/s), so *no* grid of
50 steps brings its variance closer than −4.8% (∏ cos² Δθ is largest for
equal Δθ = θ_max/50); 3% takes 81 steps on that grid and 111 quadratic ones.

``steps`` is the number of noise levels visited: ddpm, ddim and dpmpp2m
evaluate the denoiser ``steps`` times, heun 2·steps − 1 times.  The DDPM/DDIM
walk starts from the VP prior x_T ~ N(0, I), i.e. x = x_T √(1 + σ₀²); Heun and
DPM-Solver++ start from N(0, σ₀² I).
"""
from __future__ import annotations

import math
import os
from typing import Callable, Optional

import torch

from trainers.config import SAMPLERS
from trainers.diffusion.schedules import NoiseSchedule

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Progress = Optional[Callable[[int, int], None]]

SPACINGS = ("uniform", "quadratic", "logsnr", "karras")
DEFAULT_SPACING = {"ddpm": "quadratic", "ddim": "quadratic", "heun": "karras", "dpmpp2m": "logsnr"}


# ---------------------------------------------------------------------------
# noise-level grids


def _check_timestep_count(schedule: NoiseSchedule, steps: int) -> None:
    if not 1 <= steps <= schedule.timesteps:
        raise ValueError(f"steps: must be in [1, {schedule.timesteps}] for a discrete-schedule spacing; got {steps}")


def strided_timesteps(schedule: NoiseSchedule, steps: int) -> list[int]:
    """``steps`` timesteps from T−1 down to 0, evenly spaced (descending)."""
    _check_timestep_count(schedule, steps)
    if steps == 1:
        return [schedule.timesteps - 1]
    grid = torch.linspace(schedule.timesteps - 1, 0, steps, dtype=torch.float64).round().long()
    return grid.tolist()


def quadratic_timesteps(schedule: NoiseSchedule, steps: int) -> list[int]:
    """``steps`` distinct timesteps t_j = max(round((T−1)(j/(N−1))²), j), descending.

    The max keeps them distinct where the parabola is flatter than one
    timestep per step (j < (N−1)²/(2(T−1))); it is strictly increasing in j
    and ends at T−1 for every N ≤ T."""
    _check_timestep_count(schedule, steps)
    if steps == 1:
        return [schedule.timesteps - 1]
    last = schedule.timesteps - 1
    ts = [max(round(last * (j / (steps - 1)) ** 2), j) for j in range(steps)]
    return ts[::-1]


def logsnr_sigmas(steps: int, sigma_min: float, sigma_max: float) -> list[float]:
    """σ_i = exp(ln σ_max + i/(N−1) (ln σ_min − ln σ_max)), i < N, then σ_N = 0:
    equal steps in λ = −ln σ (Lu et al. 2022)."""
    _check_sigma_grid(steps, sigma_min, sigma_max)
    if steps == 1:
        return [float(sigma_max), 0.0]
    lo, hi = math.log(sigma_min), math.log(sigma_max)
    return [math.exp(hi + i / (steps - 1) * (lo - hi)) for i in range(steps)] + [0.0]


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> list[float]:
    """σ_i = (σ_max^{1/ρ} + i/(N−1) (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, i < N, then σ_N = 0
    (Karras et al. 2022, Eq. 5)."""
    _check_sigma_grid(steps, sigma_min, sigma_max)
    if rho <= 0:
        raise ValueError(f"rho: must be > 0; got {rho}")
    if steps == 1:
        return [float(sigma_max), 0.0]
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return [(hi + i / (steps - 1) * (lo - hi)) ** rho for i in range(steps)] + [0.0]


def _check_sigma_grid(steps: int, sigma_min: float, sigma_max: float) -> None:
    if steps < 1:
        raise ValueError(f"steps: must be >= 1; got {steps}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"sigma_min, sigma_max: need 0 < sigma_min < sigma_max; got {sigma_min}, {sigma_max}")


def noise_levels(schedule: NoiseSchedule, steps: int, spacing: str, *, sigma_min: Optional[float] = None,
                 sigma_max: Optional[float] = None, rho: float = 7.0) -> list[float]:
    """The sampler grid: ``steps`` descending σ > 0, then 0 (``steps`` + 1 floats).

    ``uniform``/``quadratic`` pick timesteps of ``schedule`` (and ignore
    ``sigma_min``/``sigma_max``); ``logsnr``/``karras`` span
    [``sigma_min``, ``sigma_max``], by default the schedule's range."""
    if spacing not in SPACINGS:
        raise ValueError(f"spacing: must be one of {', '.join(SPACINGS)}; got {spacing!r}")
    if spacing in ("uniform", "quadratic"):
        ts = strided_timesteps(schedule, steps) if spacing == "uniform" else quadratic_timesteps(schedule, steps)
        return [float(schedule.sigmas[t]) for t in ts] + [0.0]
    lo = schedule.sigma_min if sigma_min is None else sigma_min
    hi = schedule.sigma_max if sigma_max is None else sigma_max
    if spacing == "logsnr":
        return logsnr_sigmas(steps, lo, hi)
    return karras_sigmas(steps, lo, hi, rho)


# ---------------------------------------------------------------------------
# the samplers (x: float32 batch on the generator's device; sigmas: a grid
# σ₀ > … > σ_{N−1} > 0 = σ_N as :func:`noise_levels` makes it)


def _randn(shape, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)


def _denoise(denoiser: Denoiser, x: torch.Tensor, sigma: float) -> torch.Tensor:
    return denoiser(x, torch.full((x.shape[0],), sigma, device=x.device, dtype=torch.float32)).float()


def _report(progress: Progress, i: int, n: int) -> None:
    if progress is not None:
        progress(i + 1, n)


def sample_ddpm(denoiser: Denoiser, shape, sigmas: list[float], generator: torch.Generator,
                progress: Progress = None) -> torch.Tensor:
    """Ancestral DDPM in the VP state x_t = x/√(1 + σ²) (ᾱ = 1/(1 + σ²)):
    x_{t'} ~ q(x_{t'} | x_t, x̂₀) with t' the next grid level (ᾱ' = 1 at σ = 0)."""
    n = len(sigmas) - 1
    x = _randn(shape, generator)  # x_T
    for i in range(n):
        ab, ab_prev = 1 / (1 + sigmas[i] ** 2), 1 / (1 + sigmas[i + 1] ** 2)
        beta = 1 - ab / ab_prev
        x0 = _denoise(denoiser, x / math.sqrt(ab), sigmas[i])
        mean = (math.sqrt(ab_prev) * beta / (1 - ab)) * x0 + (math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab)) * x
        var = (1 - ab_prev) / (1 - ab) * beta
        x = mean + math.sqrt(var) * _randn(shape, generator) if var > 0 else mean
        _report(progress, i, n)
    return x


def sample_ddim(denoiser: Denoiser, shape, sigmas: list[float], generator: torch.Generator,
                eta: float = 0.0, progress: Progress = None) -> torch.Tensor:
    """DDIM written for the VE state: with ε̂ = (x − x̂₀)/σ,

        x' = x̂₀ + √(σ'² − c²) ε̂ + c z,   c = η σ' √(1 − σ'²/σ²),

    which is Song et al.'s update x_{t'} = √ᾱ' x̂₀ + √(1 − ᾱ' − σ_η²) ε̂ + σ_η z
    divided by √ᾱ'."""
    if eta < 0:
        raise ValueError(f"eta: must be >= 0; got {eta}")
    n = len(sigmas) - 1
    x = _randn(shape, generator) * math.sqrt(1 + sigmas[0] ** 2)
    for i in range(n):
        s, s_next = sigmas[i], sigmas[i + 1]
        x0 = _denoise(denoiser, x, s)
        eps = (x - x0) / s
        c = eta * s_next * math.sqrt(max(0.0, 1 - s_next ** 2 / s ** 2))
        x = x0 + math.sqrt(max(0.0, s_next ** 2 - c ** 2)) * eps
        if c > 0:
            x = x + c * _randn(shape, generator)
        _report(progress, i, n)
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
           generator: torch.Generator, *, spacing: Optional[str] = None, sigma_min: Optional[float] = None,
           sigma_max: Optional[float] = None, rho: float = 7.0, eta: float = 0.0,
           progress: Progress = None) -> torch.Tensor:
    """Images x₀ (unclamped, float32, on the generator's device) of ``shape``.

    ``spacing`` picks the grid (:data:`SPACINGS`; default
    ``DEFAULT_SPACING[sampler]``); ``sigma_min``/``sigma_max`` bound the
    ``logsnr``/``karras`` grids (default: the discrete schedule's range; pass
    ``Variant.sigma_range``); ``rho`` is the Karras grid's; ``eta`` DDIM's."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: must be one of {', '.join(SAMPLERS)}; got {sampler!r}")
    sigmas = noise_levels(schedule, steps, DEFAULT_SPACING[sampler] if spacing is None else spacing,
                          sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
    if sampler == "ddpm":
        return sample_ddpm(denoiser, shape, sigmas, generator, progress)
    if sampler == "ddim":
        return sample_ddim(denoiser, shape, sigmas, generator, eta, progress)
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
    each batch; ``options`` go to :func:`sample` (spacing, eta, rho)."""
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
