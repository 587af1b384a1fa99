"""Samplers against the analytic denoiser of Gaussian data.

For x₀ ~ N(μ, s² I) the optimal denoiser of x = x₀ + σ ε is
D*(x, σ) = μ + s²/(s² + σ²) (x − μ), and the probability-flow ODE
dx/dσ = (x − D*)/σ has the exact solution (x − μ) ∝ √(s² + σ²).  So every
sampler must return samples with mean μ and variance s², and the
deterministic ones must follow the exact map x_start ↦ x₀ with the error
shrinking at their order (1 for DDIM, 2 for Heun and DPM-Solver++(2M)).
Since every sampler is then an affine map of its first random draw, the
discretisation error is measured without Monte-Carlo noise by running the
exact flow on that same draw.
"""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from trainers.config import SAMPLERS, ScheduleConfig, VariantConfig
from trainers.diffusion.samplers import (DEFAULT_SPACING, SPACINGS, generate, karras_sigmas, logsnr_sigmas, noise_levels,
                               quadratic_timesteps, sample, sample_ddim, save_grid, strided_timesteps)
from trainers.diffusion.schedules import NoiseSchedule, linear_betas
from trainers.diffusion.unet import build_unet
from trainers.diffusion.variants import build_variant

MU, S = 0.3, 0.5
SHAPE = (20000, 1, 2, 2)


def gaussian_denoiser(mu=MU, s=S):
    def denoise(x, sigma):
        sigma = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        return mu + s ** 2 / (s ** 2 + sigma ** 2) * (x - mu)
    return denoise


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.from_config(ScheduleConfig())


# Each sampler on its default grid, at step counts where its variance is within
# a few percent on this problem.  The counts (DPM-Solver++ 20, DDIM 50)
# have their own tests below, which separate the discretisation error from
# the Monte-Carlo error: DPM-Solver++(2M) meets 3% at 20 steps; DDIM cannot
# at 50 steps on any grid (−6.5% on its default, −4.8% on the best possible).
@pytest.mark.parametrize("sampler,steps,options,var_tol", [
    ("ddpm", 1000, {}, 0.03),
    ("ddim", 250, {}, 0.04),
    ("ddim", 250, {"eta": 0.5}, 0.05),
    ("heun", 40, {}, 0.04),
    ("heun", 40, {"sigma_min": 0.002, "sigma_max": 80.0}, 0.04),
    ("dpmpp2m", 40, {}, 0.04),
])
def test_samples_of_gaussian_data_have_its_moments(schedule, sampler, steps, options, var_tol):
    shape = (10000, 1, 2, 2) if steps >= 1000 else SHAPE  # keep the 1000-step run cheap
    x = sample(gaussian_denoiser(), shape, sampler, steps, schedule, torch.Generator().manual_seed(0), **options)
    assert x.shape == shape and x.dtype == torch.float32
    # Monte-Carlo std of the mean: S/√(40000…80000) ≤ 0.0025; of the variance ratio ≤ 0.7%
    assert abs(x.mean().item() - MU) < 0.01
    assert abs(x.var().item() / S ** 2 - 1) < var_tol
    # the dimensions stay independent (D* acts per pixel)
    flat = x.flatten(1)
    assert abs(torch.corrcoef(flat.T)[0, 1].item()) < 0.03


def test_coarse_ddim_grid_error_is_the_euler_recursion(schedule):
    """With the brief's 50 DDIM steps on the uniform grid the variance is
    ≈ 11% low.  That is the method, not a bug: DDIM is Euler on
    dx/dσ = (x − μ) σ/(s² + σ²), whose scalar recursion
    (x' − μ) = (x − μ)(1 + (σ' − σ) σ/(s² + σ²)), computed here in float64,
    predicts the sampled variance."""
    x = sample(gaussian_denoiser(), SHAPE, "ddim", 50, schedule, torch.Generator().manual_seed(0), spacing="uniform")
    sig = [float(schedule.sigmas[t]) for t in strided_timesteps(schedule, 50)] + [0.0]
    gain = 1.0
    for a, b in zip(sig[:-1], sig[1:]):
        gain *= 1 + (b - a) * a / (S ** 2 + a ** 2)
    predicted = (1 + sig[0] ** 2) * gain ** 2  # the VP prior has variance 1 + σ_T² in VE coordinates
    assert 0.85 < predicted / S ** 2 < 0.95
    assert abs(x.var().item() / predicted - 1) < 0.03


def _exact_ode_map(x_start, sigma_start, mu=MU, s=S):
    return mu + (x_start - mu) * s / math.sqrt(s ** 2 + sigma_start ** 2)


def _exact_flow_of_first_draw(sampler, shape, seed, sigma_start):
    """x₀ of the exact probability-flow ODE started where the sampler starts:
    its first draw z scaled to the VP prior √(1 + σ₀²) (ddim) or to σ₀."""
    z = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).double()
    scale = math.sqrt(1 + sigma_start ** 2) if sampler == "ddim" else sigma_start
    return _exact_ode_map(z * scale, sigma_start)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("sampler,min_ratio", [("ddim", 1.7), ("heun", 3.0), ("dpmpp2m", 3.0)])
def test_deterministic_samplers_converge_at_their_order(schedule, sampler, min_ratio, spacing):
    shape = (512, 1, 1, 1)
    errors = []
    # DPM-Solver++ on 20 uniform timesteps is still pre-asymptotic (variance +54%,
    # error ratio 2.9 from 20 to 40 steps, then 3.8, 4.1): start it at 40
    counts = (40, 80, 160) if (sampler, spacing) == ("dpmpp2m", "uniform") else (20, 40, 80)
    for steps in counts:
        x = sample(gaussian_denoiser(), shape, sampler, steps, schedule, torch.Generator().manual_seed(1), spacing=spacing)
        exact = _exact_flow_of_first_draw(sampler, shape, 1, schedule.sigma_max)
        errors.append((x.double() - exact).pow(2).mean().sqrt().item())
    assert errors[0] > errors[1] > errors[2]
    assert errors[0] / errors[1] > min_ratio and errors[1] / errors[2] > min_ratio


def _discretisation_variance_ratio(sampler, steps, schedule, seed=0, **options):
    """Var(samples) / Var(exact flow of the same draw): the discretisation
    error of a deterministic sampler without Monte-Carlo error (both are
    affine maps of one draw), and the samples themselves."""
    x = sample(gaussian_denoiser(), SHAPE, sampler, steps, schedule, torch.Generator().manual_seed(seed), **options)
    exact = _exact_flow_of_first_draw(sampler, SHAPE, seed, schedule.sigma_max)
    return x.double().var().item() / exact.var().item(), x


def test_dpm_solver_within_three_percent_at_twenty_steps(schedule):
    """The issue: DPM-Solver++(2M) within a few percent with 20 steps.  On its
    default logSNR grid the variance is +2.9% (it was +10% on the Karras grid
    and +54% on uniform timesteps); the mean is exact up to Monte Carlo."""
    ratio, x = _discretisation_variance_ratio("dpmpp2m", 20, schedule)
    assert abs(ratio - 1) < 0.03
    assert abs(ratio - 1) < 0.5 * abs(_discretisation_variance_ratio("dpmpp2m", 20, schedule, spacing="karras")[0] - 1)
    n = x.numel()  # standard error of the sample variance ratio: √(2/n) = 0.5%; of the mean: s/√n
    assert abs(x.mean().item() - MU) < 0.03 * S
    assert abs(x.var().item() / S ** 2 - 1) < 0.03 + 3 * math.sqrt(2 / n)


def _ddim_variance_ratio_by_angles(sigmas, s=S):
    """DDIM on Gaussian data, in the angle θ = arctan(σ/s): its step multiplies
    x − μ by (s² + σσ')/(s² + σ²) = cos(θ − θ') cos θ / cos θ', the exact flow
    by cos θ / cos θ'; so Var(DDIM)/Var(exact) = ∏ cos²(θ_i − θ_{i+1})."""
    theta = [math.atan(sig / s) for sig in sigmas]
    return math.prod(math.cos(a - b) ** 2 for a, b in zip(theta[:-1], theta[1:]))


def test_ddim_at_fifty_steps_is_the_angle_product_and_no_grid_gets_within_three_percent(schedule):
    """The issue asks for DDIM within a few percent with 50 steps.  Its
    default (quadratic) grid gives −6.5% in variance, the best of the standard
    grids; the product ∏ cos² Δθ with Σ Δθ = θ₀ ≈ π/2 is largest for equal
    Δθ (log cos is concave), and even that grid — which depends on s — is
    −4.8%.  3% takes 81 steps on that grid, 111 on the quadratic one."""
    ratios = {}
    for spacing in SPACINGS:
        ratio, x = _discretisation_variance_ratio("ddim", 50, schedule, spacing=spacing)
        predicted = _ddim_variance_ratio_by_angles(noise_levels(schedule, 50, spacing))
        assert ratio == pytest.approx(predicted, abs=2e-4)
        ratios[spacing] = ratio
    assert max(ratios, key=ratios.get) == DEFAULT_SPACING["ddim"] == "quadratic"
    assert 0.93 < ratios["quadratic"] < 0.94
    assert ratios["uniform"] < 0.9
    # the optimal grid: equal steps in θ from σ_max down to 0
    theta0 = math.atan(schedule.sigma_max / S)
    equal_angles = [S * math.tan(theta0 * (1 - i / 50)) for i in range(50)] + [0.0]
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).double()
    x = sample_ddim(gaussian_denoiser(), SHAPE, equal_angles, torch.Generator().manual_seed(0))
    best = x.double().var().item() / _exact_ode_map(z * math.sqrt(1 + schedule.sigma_max ** 2), schedule.sigma_max).var().item()
    assert best == pytest.approx(math.cos(theta0 / 50) ** 100, abs=2e-4)
    assert max(ratios.values()) < best < 0.97
    assert math.cos(theta0 / 80) ** 160 < 0.97 < math.cos(theta0 / 81) ** 162
    quadratic = [_ddim_variance_ratio_by_angles(noise_levels(schedule, n, "quadratic")) for n in (110, 111)]
    assert quadratic[0] < 0.97 < quadratic[1]


@pytest.mark.parametrize("spacing", SPACINGS)
def test_ddim_with_eta_one_is_ancestral_ddpm(schedule, spacing):
    """Song et al.: DDIM with η = 1 is the DDPM ancestral process; both
    samplers draw the same random numbers in the same order."""
    a = sample(gaussian_denoiser(), (256, 1, 2, 2), "ddpm", 40, schedule, torch.Generator().manual_seed(3), spacing=spacing)
    b = sample(gaussian_denoiser(), (256, 1, 2, 2), "ddim", 40, schedule, torch.Generator().manual_seed(3), eta=1.0,
               spacing=spacing)
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    c = sample(gaussian_denoiser(), (256, 1, 2, 2), "ddim", 40, schedule, torch.Generator().manual_seed(3), spacing=spacing)
    assert not torch.allclose(a, c, atol=1e-2)


def test_karras_sigmas_by_hand():
    # σ_max^{1/ρ} = 4, σ_min^{1/ρ} = 1 with ρ = 2: midpoint 2.5² = 6.25
    assert karras_sigmas(3, 1.0, 16.0, rho=2.0) == pytest.approx([16.0, 6.25, 1.0, 0.0])
    sig = karras_sigmas(18, 0.002, 80.0)
    assert len(sig) == 19 and sig[0] == pytest.approx(80.0) and sig[-2] == pytest.approx(0.002) and sig[-1] == 0
    assert all(a > b for a, b in zip(sig[:-1], sig[1:]))
    assert karras_sigmas(1, 0.002, 80.0) == [80.0, 0.0]


def test_strided_timesteps(schedule):
    ts = strided_timesteps(schedule, 5)
    assert ts[0] == 999 and ts[-1] == 0 and len(ts) == 5
    assert all(a > b for a, b in zip(ts[:-1], ts[1:]))
    assert strided_timesteps(schedule, 1000) == list(range(999, -1, -1))
    with pytest.raises(ValueError, match="steps"):
        strided_timesteps(schedule, 1001)


def test_quadratic_timesteps_by_hand():
    ten = NoiseSchedule(linear_betas(10))
    assert quadratic_timesteps(ten, 4) == [9, 4, 1, 0]                # 9 · (j/3)²
    # 9 · (j/7)² rounds to 0 0 1 2 3 5 7 9; where the parabola is flatter than
    # one timestep per step the j-th timestep is j
    assert quadratic_timesteps(ten, 8) == [9, 7, 5, 4, 3, 2, 1, 0]
    assert quadratic_timesteps(ten, 10) == list(range(9, -1, -1))
    assert quadratic_timesteps(ten, 1) == [9]
    with pytest.raises(ValueError, match="steps"):
        quadratic_timesteps(ten, 11)


def test_quadratic_timesteps_are_distinct_for_every_count(schedule):
    for steps in range(2, schedule.timesteps + 1):
        ts = quadratic_timesteps(schedule, steps)
        assert len(ts) == steps and ts[0] == schedule.timesteps - 1 and ts[-1] == 0
        assert all(a > b for a, b in zip(ts[:-1], ts[1:]))


def test_logsnr_sigmas_by_hand():
    assert logsnr_sigmas(3, 1.0, 100.0) == pytest.approx([100.0, 10.0, 1.0, 0.0])
    sig = logsnr_sigmas(20, 0.01, 157.0)
    steps = [math.log(a / b) for a, b in zip(sig[:-2], sig[1:-1])]
    assert steps == pytest.approx([math.log(15700) / 19] * 19)
    assert logsnr_sigmas(1, 0.01, 157.0) == [157.0, 0.0]
    with pytest.raises(ValueError, match="sigma_min"):
        logsnr_sigmas(5, 2.0, 1.0)


def test_noise_levels(schedule):
    assert noise_levels(schedule, 5, "uniform") == [float(schedule.sigmas[t]) for t in strided_timesteps(schedule, 5)] + [0.0]
    assert noise_levels(schedule, 5, "quadratic") == [float(schedule.sigmas[t]) for t in quadratic_timesteps(schedule, 5)] + [0.0]
    assert noise_levels(schedule, 5, "karras") == karras_sigmas(5, schedule.sigma_min, schedule.sigma_max)
    assert noise_levels(schedule, 5, "logsnr", sigma_min=0.002, sigma_max=80.0) == logsnr_sigmas(5, 0.002, 80.0)
    for spacing in SPACINGS:  # every grid spans the discrete schedule's σ range by default
        sig = noise_levels(schedule, 7, spacing)
        assert sig[0] == pytest.approx(schedule.sigma_max) and sig[-2] == pytest.approx(schedule.sigma_min)
        assert len(sig) == 8 and sig[-1] == 0
    assert set(DEFAULT_SPACING) == set(SAMPLERS) and set(DEFAULT_SPACING.values()) <= set(SPACINGS)
    with pytest.raises(ValueError, match="spacing"):
        noise_levels(schedule, 5, "cosine")
    with pytest.raises(ValueError, match="spacing"):
        sample(gaussian_denoiser(), (2, 1, 2, 2), "ddim", 5, schedule, torch.Generator(), spacing="linear")


def test_unknown_sampler_is_named(schedule):
    with pytest.raises(ValueError, match="sampler"):
        sample(gaussian_denoiser(), (2, 1, 2, 2), "euler", 10, schedule, torch.Generator())


def test_progress_is_reported(schedule):
    seen = []
    sample(gaussian_denoiser(), (2, 1, 2, 2), "heun", 5, schedule, torch.Generator(), progress=lambda i, n: seen.append((i, n)))
    assert seen == [(i, 5) for i in range(1, 6)]


def test_generate_batches_under_no_grad_and_restores_mode(schedule):
    model = build_unet("tiny", image_size=8, channels=3)
    for p in model.parameters():  # a non-trivial network (the U-Net's output layers start at zero)
        p.data.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    variant = build_variant(VariantConfig(name="base"), schedule)
    model.train()
    done = []
    a = generate(model, variant, 5, "ddim", 4, 2, torch.Generator().manual_seed(0), "cpu",
                 progress=lambda k, n: done.append(k))
    assert a.shape == (5, 3, 8, 8) and not a.requires_grad and a.device.type == "cpu"
    assert a.min() >= -1 and a.max() <= 1
    assert done == [2, 4, 5]
    assert model.training
    b = generate(model, variant, 5, "ddim", 4, 2, torch.Generator().manual_seed(0), "cpu")
    assert torch.equal(a, b)
    c = generate(model, variant, 5, "ddim", 4, 2, torch.Generator().manual_seed(1), "cpu")
    assert not torch.equal(a, c)


@pytest.mark.parametrize("sampler,options", [("heun", {}), ("dpmpp2m", {}), ("ddim", {"spacing": "logsnr"})])
def test_generate_uses_the_variants_sigma_range(schedule, sampler, options):
    """EDM samples between its own σ_min and σ_max (0.002, 80) on the σ grids."""
    seen = []

    class Recorder(torch.nn.Module):
        image_shape = (1, 2, 2)

        def forward(self, x, t):
            return torch.zeros_like(x)

    variant = build_variant(VariantConfig(name="edm"), schedule)
    inner = variant.denoiser

    def spy(model):
        d = inner(model)
        return lambda x, sigma: (seen.append(float(sigma[0])), d(x, sigma))[1]

    variant.denoiser = spy
    generate(Recorder(), variant, 3, sampler, 6, 3, torch.Generator().manual_seed(0), "cpu", **options)
    assert max(seen) == pytest.approx(80.0) and min(seen) == pytest.approx(0.002)
    if DEFAULT_SPACING[sampler] == "logsnr" or options.get("spacing") == "logsnr":
        assert seen == pytest.approx(logsnr_sigmas(6, 0.002, 80.0)[:-1], rel=1e-6)


def test_save_grid_writes_a_png(tmp_path):
    images = torch.cat([torch.full((5, 1, 8, 8), -1.0), torch.full((5, 1, 8, 8), 1.0)])
    path = tmp_path / "grid.png"
    save_grid(images, path)
    img = np.asarray(Image.open(path).convert("L"))
    # ⌈√10⌉ = 4 per row, 3 rows, 8 px + 1 px padding
    assert img.shape == (3 * 9 + 1, 4 * 9 + 1)
    assert img[1 + 4, 1 + 4] == 0              # first image: −1 → black
    assert img[2 * 9 + 1 + 4, 1 * 9 + 1 + 4] == 255  # tenth image (row 2, col 1): +1 → white
