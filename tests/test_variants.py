"""The seven stabilization variants, against independent computations:
Gaussian-data optima, the EDM paper's identities, hand-computed weights."""
import math

import numpy as np
import pytest
import torch

from trainers.diffusion import parameterization as param
from trainers.config import ConfigError, ScheduleConfig, VariantConfig
from trainers.run.data import synthetic_images, to_model_range
from trainers.diffusion.schedules import NoiseSchedule
from trainers.diffusion.unet import build_unet
from trainers.diffusion.variants import VARIANTS, build_variant, variant_class

MU, S = 0.2, 0.5  # Gaussian data N(μ, s² I)

# (registry name, options, what the network predicts — stated here, not read from the code)
CASES = [
    ("base", {}, "eps"),
    ("edm", {}, "edm"),
    ("vparam", {}, "v"),
    ("snr", {}, "eps"),
    ("snr", {"target": "v"}, "v"),
    ("snr", {"target": "x0"}, "x0"),
    ("pd", {}, "eps"),
    ("adap_s", {}, "eps"),
    ("adap_s", {"importance_weight": True}, "eps"),
    ("stf", {"reference_size": 1}, "eps"),
]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in o.items())}" if o else n for n, o, _ in CASES]


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.from_config(ScheduleConfig())


def make(name, schedule, **options):
    return build_variant(VariantConfig(name=name, options=options), schedule)


def test_registry_holds_the_seven_variants_under_their_own_names():
    assert {"base", "edm", "vparam", "snr", "pd", "adap_s", "stf"} <= set(VARIANTS)
    for name in VARIANTS:
        assert variant_class(name).name == name


# ---------------------------------------------------------------------------
# the ideal network for Gaussian data


class IdealGaussianNet(torch.nn.Module):
    """Returns the variant's optimal network output for x₀ ~ N(μ, s² I), plus
    a learnable affine perturbation a + b·(network input) that is zero at init.

    It recovers σ from its time input with each parameterisation's published
    convention: discrete variants get the timestep t (σ_t interpolated in log σ
    between integer steps) and the VP state x_t; EDM gets c_noise·scale with
    c_noise = ln(σ)/4 and the input c_in x with c_in = 1/√(σ² + σ_d²)."""

    def __init__(self, kind, schedule, edm_options=None, mu=MU, s=S):
        super().__init__()
        self.kind, self.mu, self.var = kind, mu, s ** 2
        self.log_sigmas = schedule.sigmas.log().numpy()
        self.edm = edm_options
        self.a = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))

    def sigma_of(self, t_in):
        t = t_in.detach().double().numpy()
        if self.kind == "edm":
            return torch.from_numpy(np.exp(4 * t / self.edm.c_noise_scale))
        return torch.from_numpy(np.exp(np.interp(t, np.arange(len(self.log_sigmas)), self.log_sigmas)))

    def forward(self, x_in, t_in):
        sigma = self.sigma_of(t_in).reshape(-1, 1, 1, 1)
        x_in64 = x_in.double()
        mu, v = self.mu, self.var
        if self.kind == "edm":
            sd = self.edm.sigma_data
            x = x_in64 * (sigma ** 2 + sd ** 2).sqrt()
            posterior_x0 = mu + v / (v + sigma ** 2) * (x - mu)
            c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
            c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
            out = (posterior_x0 - c_skip * x) / c_out
        else:
            alpha, s = 1 / (1 + sigma ** 2).sqrt(), sigma / (1 + sigma ** 2).sqrt()
            centred = x_in64 - alpha * mu
            e_x0 = mu + v * alpha / (alpha ** 2 * v + s ** 2) * centred
            e_eps = s / (alpha ** 2 * v + s ** 2) * centred
            out = {"eps": e_eps, "x0": e_x0, "v": alpha * e_eps - s * e_x0}[self.kind]
        return (out + self.a + self.b * x_in64).float()


def optimal_denoiser(x, sigma, mu=MU, s=S):
    return mu + s ** 2 / (s ** 2 + sigma ** 2) * (x - mu)


@pytest.mark.parametrize("name,options,kind", CASES, ids=IDS)
def test_denoiser_of_the_ideal_network_is_the_gaussian_optimum(schedule, name, options, kind):
    variant = make(name, schedule, **options)
    net = IdealGaussianNet(kind, schedule, getattr(variant, "options", None))
    denoise = variant.denoiser(net)
    x = MU + torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(0)) * 3
    # integer-timestep σ's of the schedule, values in between, and EDM's range
    for sigma in [float(schedule.sigmas[0]), float(schedule.sigmas[137]), 0.05, 0.3, 1.0, 3.0, 20.0, 79.0]:
        got = denoise(x * (1 + sigma), torch.full((64,), sigma))
        want = optimal_denoiser(x * (1 + sigma), sigma)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * (1 + sigma)), (sigma, (got - want).abs().max())
    # a scalar σ works as well as a (B,) tensor
    assert torch.allclose(denoise(x, 0.3), denoise(x, torch.full((64,), 0.3)))


@pytest.mark.parametrize("name,options,kind", CASES, ids=IDS)
def test_training_loss_is_minimised_by_the_ideal_network(schedule, name, options, kind):
    """End to end: the variant's loss on its own draws (input construction,
    target, weighting) has its minimum over the affine family ideal + a + b·input
    at a = b = 0, i.e. at the network whose denoiser is D*."""
    variant = make(name, schedule, **options)
    net = IdealGaussianNet(kind, schedule, getattr(variant, "options", None))
    g = torch.Generator().manual_seed(1)
    x0 = MU + S * torch.randn(4096, 1, 2, 2, generator=g)
    d = variant.draw(x0, g, step=0)
    loss = variant.loss(net, d).mean()
    params = [net.a, net.b]
    grad = torch.autograd.grad(loss, params, create_graph=True)
    hess = torch.stack([torch.stack(torch.autograd.grad(gi, params, retain_graph=True)) for gi in grad])
    theta = -torch.linalg.solve(hess.double(), torch.stack(grad).double())
    assert theta.abs().max() < 0.05, theta


# ---------------------------------------------------------------------------
# ε / x₀ / v conversions


def test_parameterisation_round_trips():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(8, 3, 4, 4, generator=g), torch.randn(8, 3, 4, 4, generator=g)
    sigma = torch.tensor([0.01, 0.1, 0.5, 1.0, 2.0, 10.0, 80.0, 150.0]).reshape(-1, 1, 1, 1)
    alpha, s = param.vp_scales(sigma)
    assert torch.allclose(alpha ** 2 + s ** 2, torch.ones_like(alpha))
    assert torch.allclose(s / alpha, sigma)
    x_t = alpha * x0 + s * eps
    v = param.velocity(x0, eps, alpha, s)
    # the formulas of latent-diffusion-notes.md (general α, σ: divided by α² + σ²)
    assert torch.allclose(param.to_x0("v", x_t, v, alpha, s), (alpha * x_t - s * v) / (alpha ** 2 + s ** 2), atol=1e-5)
    assert torch.allclose(param.to_eps("v", x_t, v, alpha, s), (s * x_t + alpha * v) / (alpha ** 2 + s ** 2), atol=1e-5)
    for prediction in param.PREDICTIONS:
        out = param.target(prediction, x0, eps, alpha, s)
        assert torch.allclose(param.to_x0(prediction, x_t, out, alpha, s), x0, atol=2e-3 if prediction == "eps" else 1e-5)
        assert torch.allclose(param.to_eps(prediction, x_t, out, alpha, s), eps, atol=2e-3 if prediction == "x0" else 1e-5)
    with pytest.raises(ValueError, match="prediction"):
        param.target("score", x0, eps, alpha, s)


# ---------------------------------------------------------------------------
# EDM


def test_edm_preconditioning_identities(schedule):
    v = make("edm", schedule)
    sd = 0.5
    sigma = torch.tensor([0.002, 0.05, 0.5, 1.0, 5.0, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in = v.c_skip(sigma), v.c_out(sigma), v.c_in(sigma)
    # unit-variance input: Var[c_in (x₀ + σ n)] = c_in² (σ_d² + σ²) = 1
    assert torch.allclose(c_in ** 2 * (sigma ** 2 + sd ** 2), torch.ones_like(sigma))
    # unit-variance target (Karras et al. Eq. 130): c_out² = (1 − c_skip)² σ_d² + c_skip² σ²
    assert torch.allclose(c_out ** 2, (1 - c_skip) ** 2 * sd ** 2 + c_skip ** 2 * sigma ** 2)
    # c_skip minimises that c_out² (Eq. 131): derivative in c_skip vanishes
    assert torch.allclose(-2 * (1 - c_skip) * sd ** 2 + 2 * c_skip * sigma ** 2, torch.zeros_like(sigma), atol=1e-12)
    # the loss weight makes the effective weight of F unity: λ c_out² = 1
    assert torch.allclose(v.loss_weight(sigma) * c_out ** 2, torch.ones_like(sigma))
    assert torch.allclose(v.c_noise(sigma), sigma.log() / 4)
    assert v.sigma_range == (0.002, 80.0)


def test_edm_network_target_and_input_have_unit_variance(schedule):
    v = make("edm", schedule)
    g = torch.Generator().manual_seed(0)
    for sigma in [0.01, 0.3, 2.0, 40.0]:
        x0 = 0.5 * torch.randn(40000, 1, 1, 1, generator=g)  # std σ_data
        noise = torch.randn(x0.shape, generator=g)
        s = torch.full((40000,), sigma)
        target = v.network_target(x0, noise, s)
        assert abs(target.var().item() - 1) < 0.03
        assert abs((v.c_in(torch.tensor(sigma)) * (x0 + sigma * noise)).var().item() - 1) < 0.03


def test_edm_draws_log_normal_sigma(schedule):
    v = make("edm", schedule)
    d = v.draw(torch.zeros(20000, 1, 1, 1), torch.Generator().manual_seed(0))
    assert d.t.dtype == torch.float32 and (d.t > 0).all()
    log_sigma = d.t.log()
    assert abs(log_sigma.mean().item() + 1.2) < 0.03 and abs(log_sigma.std().item() - 1.2) < 0.03


def test_edm_loss_is_weighted_denoising_error(schedule):
    """With F ≡ 0, D = c_skip x, and the loss is λ(σ) mean((c_skip x − x₀)²)."""
    v = make("edm", schedule)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 1, 2, 2, generator=g)
    d = v.draw(x0, g)
    zero = lambda x, t: torch.zeros_like(x)
    sd, sig = 0.5, d.t.double().reshape(-1, 1, 1, 1)
    x = x0.double() + sig * d.noise.double()
    want = ((sig ** 2 + sd ** 2) / (sig * sd) ** 2).flatten() * ((sd ** 2 / (sig ** 2 + sd ** 2) * x - x0.double()) ** 2).flatten(1).mean(1)
    assert torch.allclose(v.loss(zero, d).double(), want, rtol=1e-5)


def test_edm_loss_is_nvlabs_loss_divided_by_the_pixel_count(schedule):
    """NVlabs/edm: EDMLoss is weight · (D(y + n) − y)² per pixel, and the
    training loop backpropagates loss.sum() / batch; ours is the per-example
    mean over the C·H·W pixels, so NVlabs' objective is C·H·W times ours."""
    v = make("edm", schedule)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(5, 3, 4, 4, generator=g)
    d = v.draw(x0, g)
    net = build_unet("tiny", 8, 3)
    with torch.no_grad():
        for p in net.parameters():   # off the zero-initialised output layer
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    sd, sig = 0.5, d.t.reshape(-1, 1, 1, 1)
    y, n = x0, d.noise * sig
    x = y + n
    c_skip, c_out = sd ** 2 / (sig ** 2 + sd ** 2), sig * sd / (sig ** 2 + sd ** 2).sqrt()
    c_in, c_noise = 1 / (sd ** 2 + sig ** 2).sqrt(), sig.log() / 4
    D = c_skip * x + c_out * net(c_in * x, c_noise.flatten())
    nvlabs = ((sig ** 2 + sd ** 2) / (sig * sd) ** 2 * (D - y) ** 2).sum() / len(y)
    ours = v.loss(net, d).mean()
    assert torch.allclose(nvlabs, 3 * 4 * 4 * ours, rtol=1e-5)


# ---------------------------------------------------------------------------
# Min-SNR-γ and v-prediction on a hand-made schedule


def three_step_schedule():
    # ᾱ = 0.9, 0.45, 0.045 → SNR = 9, 9/11, 9/191
    return NoiseSchedule(torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))


@pytest.mark.parametrize("target,gamma,want", [
    ("eps", 5.0, [5 / 9, 1.0, 1.0]),
    ("v", 5.0, [0.5, 0.45, 0.045]),          # min(SNR, γ)/(SNR + 1): 5/10, (9/11)/(20/11), (9/191)/(200/191)
    ("x0", 5.0, [5.0, 9 / 11, 9 / 191]),
    ("eps", 0.5, [0.5 / 9, 0.5 * 11 / 9, 1.0]),
])
def test_min_snr_weights_by_hand(target, gamma, want):
    v = build_variant(VariantConfig(name="snr", options={"target": target, "gamma": gamma}), three_step_schedule())
    assert torch.allclose(v.weight_at(torch.tensor([0, 1, 2])).double(), torch.tensor(want, dtype=torch.float64), rtol=1e-6)


def test_min_snr_and_vparam_losses_with_a_zero_network():
    sched = three_step_schedule()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 1, 2, 2, generator=g)
    zero = lambda x, t: torch.zeros_like(x)
    ab = torch.tensor([0.9, 0.45, 0.045], dtype=torch.float64).reshape(-1, 1, 1, 1)
    for name, options, weight, target in [
        ("snr", {"target": "eps"}, [5 / 9, 1, 1], lambda x, e: e),
        ("snr", {"target": "v"}, [0.5, 0.45, 0.045], lambda x, e: ab.sqrt() * e - (1 - ab).sqrt() * x),
        ("vparam", {}, [1, 1, 1], lambda x, e: ab.sqrt() * e - (1 - ab).sqrt() * x),
    ]:
        v = build_variant(VariantConfig(name=name, options=options), sched)
        d = v.draw(x0, g)
        d.t = torch.tensor([0, 1, 2])
        want = torch.tensor(weight, dtype=torch.float64) * target(x0.double(), d.noise.double()).pow(2).flatten(1).mean(1)
        assert torch.allclose(v.loss(zero, d).double(), want, rtol=1e-5), name


# ---------------------------------------------------------------------------
# offset noise and input perturbation (Variant.sample_noise, every variant)


def test_offset_noise_and_input_perturbation_statistics(schedule):
    cfg = VariantConfig(name="base", offset_noise=0.1, input_perturbation=0.2)
    v = build_variant(cfg, schedule)
    noise, input_noise = v.sample_noise(torch.zeros(4000, 3, 8, 8), torch.Generator().manual_seed(0))
    # offset noise: a per-(example, channel) constant of std 0.1 on top of unit noise
    channel_means = noise.mean((2, 3))
    assert abs(channel_means.var().item() - (0.1 ** 2 + 1 / 64)) < 0.002
    assert abs(noise.var().item() - (1 + 0.1 ** 2)) < 0.01
    # input perturbation: independent per-pixel noise of std 0.2 added only to the input noise
    extra = input_noise - noise
    assert abs(extra.std().item() - 0.2) < 0.002
    assert abs(torch.corrcoef(torch.stack([extra.flatten(), noise.flatten()]))[0, 1].item()) < 0.01
    plain = build_variant(VariantConfig(name="base"), schedule)
    n2, i2 = plain.sample_noise(torch.zeros(2, 3, 8, 8), torch.Generator().manual_seed(0))
    assert i2 is n2


@pytest.mark.parametrize("name", ["base", "vparam", "snr", "pd", "adap_s", "stf", "edm"])
def test_input_perturbation_enters_the_input_not_the_target(schedule, name):
    """The network input is built from ``input_noise``; the target from ``noise``
    (for ε-style targets a zero network's loss is then mean(noise²) · weight)."""
    v = build_variant(VariantConfig(name=name, input_perturbation=0.5, options={"reference_size": 1} if name == "stf" else {}),
                      schedule)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 1, 4, 4, generator=g)
    d = v.draw(x0, g)
    assert not torch.equal(d.noise, d.input_noise)
    seen = {}

    def record(x, t):
        seen["x"] = x
        return torch.zeros_like(x)

    v.loss(record, d)
    if name == "edm":
        sigma = d.t.reshape(-1, 1, 1, 1)
        want_in = (x0 + sigma * d.input_noise) / (sigma ** 2 + 0.25).sqrt()
    else:
        ab = schedule.alpha_bar[d.t].float().reshape(-1, 1, 1, 1)
        want_in = ab.sqrt() * x0 + (1 - ab).sqrt() * d.input_noise
    assert torch.allclose(seen["x"], want_in, atol=1e-5)
    if name in ("base", "pd", "stf"):
        assert torch.allclose(v.loss(record, d), d.noise.pow(2).flatten(1).mean(1), rtol=1e-5)


# ---------------------------------------------------------------------------
# progressive difficulty


def test_curriculum_intervals_run_from_high_noise_to_low_with_fixed_pacing(schedule):
    v = make("pd", schedule, intervals=4, pacing="fixed", stage_steps=10)
    assert [v.interval(j) for j in (1, 2, 3, 4)] == [(0, 250), (250, 500), (500, 750), (750, 1000)]
    g = torch.Generator().manual_seed(0)
    x0 = torch.zeros(2000, 1, 1, 1)
    for step, lo in [(0, 750), (9, 750), (10, 500), (25, 250), (30, 0), (500, 0)]:
        t = v.draw(x0, g, step).t
        assert int(t.min()) >= lo and int(t.max()) == 999
        assert int(t.min()) < lo + 10  # the whole union is used, down to its lowest interval
        assert v.observe(v.draw(x0, g, step), torch.ones(2000), step)["t_min"] == lo


def test_curriculum_patience_pacing_and_resume(schedule):
    v = make("pd", schedule, intervals=3, pacing="patience", patience=5, smoothing=0.0)
    d = v.draw(torch.zeros(4, 1, 1, 1), torch.Generator().manual_seed(0))
    # a falling loss keeps the first (easiest) stage
    for k in range(20):
        assert v.observe(d, torch.full((4,), 1.0 / (k + 1)), k)["stage"] == 1
    # a flat loss: 5 observations without a new best advance one stage
    stages = [v.observe(d, torch.full((4,), 1.0), 20 + k)["stage"] for k in range(12)]
    # first flat value (1.0) is worse than the best (0.05): counts 1..5 → stage 2 at the 5th,
    # then best resets: 1.0 is a new best, 5 more equal values → stage 3
    assert stages == [1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 3, 3]
    assert v.t_min(3) == 0 and v.t_min(2) == 333 and v.t_min(1) == 666
    w = make("pd", schedule, intervals=3, pacing="patience", patience=5, smoothing=0.0)
    w.load_state_dict(v.state_dict())
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(v.draw(torch.zeros(8, 1, 1, 1), g1, 99).t, w.draw(torch.zeros(8, 1, 1, 1), g2, 99).t)
    assert w.state_dict() == v.state_dict()


# ---------------------------------------------------------------------------
# adaptive sampling


def _rigged_run(v, loss_of_bin, observations=60, batch=64):
    g = torch.Generator().manual_seed(0)
    x0 = torch.zeros(batch, 1, 1, 1)
    for k in range(observations):
        d = v.draw(x0, g, k)
        v.observe(d, loss_of_bin(d.extra["bin"], k), k)
    return v.probabilities()


def test_adaptive_sampler_moves_toward_high_loss_bins(schedule):
    v = make("adap_s", schedule, bins=4, reward="loss", lr=0.5)
    q = _rigged_run(v, lambda b, k: torch.where(b == 2, 3.0, 1.0))
    assert int(q.argmax()) == 2 and q[2] > 0.5
    assert q.min() >= 0.1 / 4  # the uniform floor


def test_adaptive_sampler_moves_toward_bins_that_are_learning(schedule):
    v = make("adap_s", schedule, bins=4, reward="progress", lr=0.5)
    # bin 1's loss keeps falling; the others are flat
    q = _rigged_run(v, lambda b, k: torch.where(b == 1, 0.9 ** k, 1.0))
    assert int(q.argmax()) == 1 and q[1] > 0.4
    # flat losses everywhere: no reward signal, only the entropy bonus → uniform
    u = make("adap_s", schedule, bins=4, reward="progress", lr=0.5)
    q = _rigged_run(u, lambda b, k: torch.ones_like(b, dtype=torch.float32))
    assert torch.allclose(q, torch.full((4,), 0.25, dtype=torch.float64))


def test_adaptive_sampler_draws_from_its_distribution_and_weights_are_unbiased(schedule):
    v = make("adap_s", schedule, bins=4, importance_weight=True)
    v.logits = torch.tensor([0.0, 1.0, 2.0, -1.0], dtype=torch.float64)
    q = v.probabilities()
    d = v.draw(torch.zeros(40000, 1, 1, 1), torch.Generator().manual_seed(0))
    freq = torch.bincount(d.t // 250, minlength=4).double() / 40000
    assert torch.allclose(freq, q, atol=0.01)
    assert torch.equal(d.extra["bin"], d.t // 250)
    # w(t) = p_uniform(t)/p(t); E_p[w] = 1 and the weighted t-histogram is uniform
    p_t = v.timestep_probabilities()
    assert torch.allclose(p_t.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert torch.allclose(d.extra["weight"].double(), 1 / (1000 * p_t[d.t]), rtol=1e-5)
    assert abs(d.extra["weight"].mean().item() - 1) < 0.02
    weighted = torch.bincount(d.t // 250, weights=d.extra["weight"].double(), minlength=4) / 40000
    assert torch.allclose(weighted, torch.full((4,), 0.25, dtype=torch.float64), atol=0.01)


def test_adaptive_sampler_resumes_exactly(schedule):
    rig = lambda b, k: torch.where(b == 3, 0.8 ** k, 1.0)
    a = make("adap_s", schedule, bins=5)
    _rigged_run(a, rig, observations=10)
    state = {k: v.clone() for k, v in a.state_dict().items()}
    b = make("adap_s", schedule, bins=5)
    b.load_state_dict(state)
    x0 = torch.zeros(16, 1, 1, 1)
    for k in range(10, 15):
        da = a.draw(x0, torch.Generator().manual_seed(k), k)
        db = b.draw(x0, torch.Generator().manual_seed(k), k)
        assert torch.equal(da.t, db.t)
        sa, sb = a.observe(da, rig(da.extra["bin"], k), k), b.observe(db, rig(db.extra["bin"], k), k)
        assert sa == sb
    assert torch.equal(a.logits, b.logits)


# ---------------------------------------------------------------------------
# stable target field


def test_stf_with_one_reference_is_the_plain_target(schedule):
    for perturbation in (0.0, 0.3):
        v = build_variant(VariantConfig(name="stf", options={"reference_size": 1}, input_perturbation=perturbation), schedule)
        g = torch.Generator().manual_seed(0)
        d = v.draw(torch.randn(8, 3, 4, 4, generator=g), g)
        assert d.extra["ref"].shape == (8, 1)
        assert torch.equal(v.target(d), d.noise)
        base = make("base", schedule)
        net = build_unet("tiny", 8, 3)
        d8 = v.draw(torch.randn(4, 3, 8, 8, generator=g), g)
        assert torch.allclose(v.loss(net, d8), base.loss(net, d8))


def test_stf_weights_and_target_by_hand_for_two_references(schedule):
    v = make("stf", schedule, reference_size=2)
    x0 = torch.tensor([[0.5, -0.5], [-0.3, 0.2]]).reshape(2, 1, 1, 2)
    d = v.draw(x0, torch.Generator().manual_seed(0))
    d.t = torch.tensor([600, 300])
    d.noise = d.input_noise = torch.tensor([[0.3, -1.0], [0.7, 0.1]]).reshape(2, 1, 1, 2)
    assert d.extra["ref"].tolist() == [[0, 1], [1, 0]]
    for i in range(2):
        ab = float(schedule.alpha_bar[int(d.t[i])])
        a, s = math.sqrt(ab), math.sqrt(1 - ab)
        xi = [a * x0[i].flatten()[k].item() + s * d.noise[i].flatten()[k].item() for k in range(2)]
        dist = [sum((xi[k] - a * x0[j].flatten()[k].item()) ** 2 for k in range(2)) for j in (i, 1 - i)]
        e = [math.exp(-dd / (2 * s * s)) for dd in dist]
        w = [ee / sum(e) for ee in e]
        assert v.reference_weights(d)[i].tolist() == pytest.approx(w, rel=1e-6)  # ᾱ enters as float32
        xbar = [w[0] * x0[i].flatten()[k].item() + w[1] * x0[1 - i].flatten()[k].item() for k in range(2)]
        want = [(xi[k] - a * xbar[k]) / s for k in range(2)]
        assert v.target(d)[i].flatten().tolist() == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert 0.01 < v.reference_weights(d)[0, 1] < 0.99  # the test exercises a genuine mix


def test_stf_reference_indices(schedule):
    v = make("stf", schedule, reference_size=5)
    d = v.draw(torch.randn(12, 1, 2, 2), torch.Generator().manual_seed(0))
    ref = d.extra["ref"]
    assert ref.shape == (12, 5) and torch.equal(ref[:, 0], torch.arange(12))
    assert all(len(set(row.tolist())) == 5 for row in ref)
    whole = make("stf", schedule).draw(torch.randn(6, 1, 2, 2), torch.Generator().manual_seed(0))
    assert whole.extra["ref"].shape == (6, 6) and all(sorted(r.tolist()) == list(range(6)) for r in whole.extra["ref"])


# ---------------------------------------------------------------------------
# options are validated and named


@pytest.mark.parametrize("name,options,field", [
    ("snr", {"gamma": -1.0}, "variant.options.gamma"),
    ("snr", {"target": "score"}, "variant.options.target"),
    ("edm", {"sigma_data": 0.0}, "variant.options.sigma_data"),
    ("pd", {"intervals": 2000}, "variant.options.intervals"),
    ("pd", {"pacing": "linear"}, "variant.options.pacing"),
    ("adap_s", {"bins": 1}, "variant.options.bins"),
    ("adap_s", {"uniform_mix": 0.0}, "variant.options.uniform_mix"),
    ("stf", {"reference_size": 0}, "variant.options.reference_size"),
    ("vparam", {"gamma": 5.0}, "variant.options.gamma"),
    ("snr", {"gamma": "five"}, "variant.options.gamma"),
])
def test_bad_options_name_the_field(schedule, name, options, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        make(name, schedule, **options)


# ---------------------------------------------------------------------------
# every variant: deterministic given a draw, double-differentiable, trains


ALL = list(VARIANTS)   # every registered variant, an added one too


def tiny_model(seed=0, size=8):
    torch.manual_seed(seed)
    model = build_unet("tiny", size, 3)
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():  # move off the zero-initialised output layers
        p.data.add_(0.02 * torch.randn(p.shape, generator=g))
    return model


def images(n, size=8):
    return to_model_range(synthetic_images(n, size, 3))


@pytest.mark.parametrize("name", ALL)
def test_loss_is_deterministic_given_a_draw_and_double_differentiable(schedule, name):
    v = make(name, schedule)
    model = tiny_model().eval()
    g = torch.Generator().manual_seed(0)
    d = v.draw(images(6), g, step=0)
    l1, l2 = v.loss(model, d), v.loss(model, d)
    assert l1.shape == (6,) and torch.equal(l1, l2)
    params = [p for p in model.parameters()]
    gen = torch.Generator().manual_seed(1)
    def unit(vs):
        norm = math.sqrt(sum(float((x * x).sum()) for x in vs))
        return [x / norm for x in vs]

    u = unit([torch.randn(p.shape, generator=gen) for p in params])
    w = unit([torch.randn(p.shape, generator=gen) for p in params])

    def grad_of(loss):
        return torch.autograd.grad(loss, params, create_graph=True)

    grads = grad_of(v.loss(model, d).mean())
    hu = torch.autograd.grad(sum((gi * ui).sum() for gi, ui in zip(grads, u)), params, retain_graph=True)
    hw = torch.autograd.grad(sum((gi * wi).sum() for gi, wi in zip(grads, w)), params)
    # the Hessian is symmetric: wᵀ H u = uᵀ H w
    a = sum((x * y).sum() for x, y in zip(hu, w)).item()
    b = sum((x * y).sum() for x, y in zip(hw, u)).item()
    assert math.isfinite(a) and abs(a - b) <= 1e-3 * (abs(a) + abs(b)) + 1e-6
    # and matches a central difference of gradients along u (float32: loose)
    h = 1e-2
    with torch.no_grad():
        for p, ui in zip(params, u):
            p.add_(h * ui)
    g_plus = torch.autograd.grad(v.loss(model, d).mean(), params)
    with torch.no_grad():
        for p, ui in zip(params, u):
            p.sub_(2 * h * ui)
    g_minus = torch.autograd.grad(v.loss(model, d).mean(), params)
    fd = sum(((gp - gm) / (2 * h) * wi).sum() for gp, gm, wi in zip(g_plus, g_minus, w)).item()
    assert abs(fd - a) <= 0.05 * abs(a) + 1e-4, (fd, a)


@pytest.mark.parametrize("name", ALL)
def test_each_variant_loss_falls_on_a_tiny_run(schedule, name):
    v = make(name, schedule)
    torch.manual_seed(0)
    model = build_unet("tiny", 8, 3)
    data = images(64)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    held_out = v.draw(data[:32], torch.Generator().manual_seed(123), step=0)
    with torch.no_grad():
        before = v.loss(model, held_out).mean().item()
    g = torch.Generator().manual_seed(0)
    for step in range(40):
        idx = torch.randint(0, 64, (16,), generator=g)
        d = v.draw(data[idx], g, step)
        loss = v.loss(model, d)
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
        stats = v.observe(d, loss.detach(), step)
        assert all(isinstance(x, float) and math.isfinite(x) for x in stats.values())
    with torch.no_grad():
        after = v.loss(model, held_out).mean().item()
    # 40 steps: ε-targets fall to ≈ 0.2–0.3 of the start, EDM and v-targets to ≈ 0.7–0.8
    assert after < 0.9 * before, (before, after)
