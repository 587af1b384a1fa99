import math

import torch

from trainers.config import ScheduleConfig
from trainers.diffusion.schedules import NoiseSchedule, cosine_betas, linear_betas


def test_linear_schedule_endpoints_and_alpha_bar_product():
    s = NoiseSchedule(linear_betas(1000))
    assert math.isclose(float(s.betas[0]), 1e-4) and math.isclose(float(s.betas[-1]), 0.02)
    # ᾱ_t is the running product of (1 - β): check a few entries by a plain Python loop
    prod = 1.0
    for i in range(10):
        prod *= 1.0 - (1e-4 + i * (0.02 - 1e-4) / 999)
    assert math.isclose(float(s.alpha_bar[9]), prod, rel_tol=1e-12)
    # the DDPM schedule ends near pure noise
    assert float(s.alpha_bar[-1]) < 1e-4


def test_cosine_schedule_matches_closed_form_alpha_bar():
    T = 1000
    s = NoiseSchedule(cosine_betas(T))
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2
    for t in (1, 10, 500, 900):
        assert math.isclose(float(s.alpha_bar[t - 1]), f(t) / f(0), rel_tol=1e-9)


def test_q_sample_has_the_closed_form_moments():
    s = NoiseSchedule.from_config(ScheduleConfig())
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000, 1, 1, 1), 0.7)
    t = torch.full((200_000,), 300)
    xt = s.q_sample(x0, t, torch.randn(x0.shape, generator=g))
    ab = float(s.alpha_bar[300])
    assert abs(xt.mean().item() - math.sqrt(ab) * 0.7) < 0.01
    assert abs(xt.var().item() - (1 - ab)) < 0.01


def test_vp_and_ve_states_correspond():
    # x_t / sqrt(ᾱ) = x0 + σ_t ε with σ_t = sqrt((1-ᾱ)/ᾱ); SNR = 1/σ²
    s = NoiseSchedule(linear_betas(1000))
    x0, eps = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    t = torch.tensor([0, 10, 500, 999])
    xt = s.q_sample(x0, t, eps)
    sig = s.at(s.sigmas, t)
    assert torch.allclose(xt / s.at(s.sqrt_alpha_bar, t), x0 + sig * eps, atol=1e-4)
    assert torch.allclose(s.snr, 1 / s.sigmas ** 2)


def test_t_from_sigma_inverts_the_sigma_table():
    s = NoiseSchedule(linear_betas(1000))
    t = torch.tensor([0, 1, 250, 998, 999])
    assert torch.allclose(s.t_from_sigma(s.sigmas[t].float()), t.float(), atol=1e-3)
    # between two table entries (in log σ) it interpolates
    mid = (s.sigmas[10].log() + s.sigmas[11].log()) / 2
    assert abs(float(s.t_from_sigma(mid.exp().reshape(1))) - 10.5) < 1e-3
