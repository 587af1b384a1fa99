"""How many eigenvalues sit above a fraction of the threshold (sharpness.above_fraction, above_cap).

References are independent of the solver: ``torch.linalg.eigvalsh`` of the
explicit matrix (a quadratic loss, whose Hessian is that matrix), of the dense
Hessian of a tiny U-Net-block model, and of the dense P^{-1/2} H P^{-1/2} with
P built by hand from Adam's second-moment recursion.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from curvature_fixtures import (MLP, Quadratic, TinyUNetLike, dense_gradient, dense_hessian, randomize,
                                symmetric_with_spectrum, unet_blocks_problem)
from trainers.config import ConfigError, OptimConfig, SharpnessConfig
from trainers.curvature.probe import SharpnessProbe
from trainers.run.optimizers import build_optimizer

TIGHT = dict(tol=1e-8, max_iters=500)
LR = 0.1   # GD: threshold 2/η = 20, default cut 0.75 × 20 = 15


def _reference(eigenvalues: torch.Tensor, cut: float) -> list[float]:
    return sorted((float(v) for v in eigenvalues if v > cut), reverse=True)


def _quadratic(eigenvalues, seed=0):
    A = symmetric_with_spectrum(eigenvalues, seed=seed)
    theta0 = torch.randn(len(eigenvalues), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    model = Quadratic(A, theta0)
    return model, model.loss, A


# bulk in [0, 6]; the top ones well apart from the cuts used below
SPECTRUM = [30.0, 26.0, 22.0, 19.0, 17.5, 16.0, 13.0, 11.0] + [6.0 * i / 60 for i in range(60)]


@pytest.mark.parametrize("fraction, cap", [(1.6, 8), (1.2, 8), (0.75, 8), (0.6, 8), (0.75, 3), (0.5, 4)])
def test_count_and_values_match_eigvalsh_on_a_quadratic(fraction, cap):
    """Cuts 32, 24, 15, 12 (0, 2, 6, 7 above) and caps below the true count."""
    model, loss, A = _quadratic(SPECTRUM, seed=1)
    cut = fraction * 2 / LR
    true = _reference(torch.linalg.eigvalsh(A), cut)
    ocfg = OptimConfig(name="gd", lr=LR)
    probe = SharpnessProbe(SharpnessConfig(above_fraction=fraction, above_cap=cap, **TIGHT), ocfg)
    cols = probe.measure(model, loss, build_optimizer(ocfg, model.parameters()), LR)
    expected = true[:cap]
    assert cols["n_above"] == len(expected)
    assert cols["n_above_capped"] == (len(true) >= cap)
    np.testing.assert_allclose(cols["above_values"], expected, rtol=1e-7)
    assert cols["lambda_max"] == pytest.approx(30.0, rel=1e-9)


def test_nothing_extra_is_computed_when_lambda_is_below_the_cut():
    model, loss, A = _quadratic(SPECTRUM, seed=2)
    ocfg = OptimConfig(name="gd", lr=LR)
    on = SharpnessProbe(SharpnessConfig(above_fraction=1.6, above_cap=8, **TIGHT), ocfg).measure(model, loss, None, LR)
    off = SharpnessProbe(SharpnessConfig(above_fraction=0, **TIGHT), ocfg).measure(model, loss, None, LR)
    assert on["n_above"] == 0 and on["above_values"] == [] and on["n_above_capped"] is False
    assert off["n_above"] is None and off["above_values"] is None and off["n_above_capped"] is None
    assert on["eig_hvps"] == off["eig_hvps"] and on["lambda_max"] == off["lambda_max"]


def test_gd_count_on_unet_blocks_matches_the_dense_hessian():
    """A lr set so that the cut falls midway between λ₃ and λ₄ of the dense Hessian."""
    model, loss = unet_blocks_problem()
    lam = torch.linalg.eigvalsh(dense_hessian(model, loss)).flip(0)
    cut = float(lam[2] + lam[3]) / 2
    lr = 2 / (cut / 0.75)
    ocfg = OptimConfig(name="gd", lr=lr)
    probe = SharpnessProbe(SharpnessConfig(above_cap=8, **TIGHT), ocfg)
    cols = probe.measure(model, loss, build_optimizer(ocfg, model.parameters()), lr)
    assert cols["n_above"] == 3 and not cols["n_above_capped"]
    np.testing.assert_allclose(cols["above_values"], lam[:3].numpy(), rtol=1e-6)
    assert cols["eig_converged"]


def _unet_blocks_batch(model, loss):
    """The batch of :func:`unet_blocks_problem`, drawn again as it draws it
    (checked: the same loss)."""
    torch.manual_seed(2)
    TinyUNetLike()   # its initialisation draws from the global generator before the batch
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    t = torch.tensor([10.0, 300.0, 900.0], dtype=torch.float64)
    eps = torch.randn_like(x)
    with torch.no_grad():
        assert float(((model(x, t) - eps) ** 2).mean()) == float(loss()), "the fixture's batch was not rebuilt"
    return x, t, eps


def test_the_fixture_batch_is_rebuilt():
    _unet_blocks_batch(*unet_blocks_problem())


def test_adam_count_is_of_the_preconditioned_operator():
    """Adam: counted on P^{-1/2} H P^{-1/2}, P from the second-moment recursion by hand;
    the plain λ₁(H) solve is not counted."""
    torch.manual_seed(4)
    model = randomize(MLP().double(), std=0.6, seed=4)
    x, y = torch.randn(24, 3, dtype=torch.float64), torch.randn(24, 2, dtype=torch.float64)
    loss = lambda: ((model(x) - y) ** 2).mean()   # noqa: E731
    ocfg = OptimConfig(name="adam", lr=1e-2, eps=1e-3)
    opt = build_optimizer(ocfg, model.parameters())
    b2, v = ocfg.betas[1], None
    for _ in range(5):
        g = dense_gradient(model, loss)
        v = (1 - b2) * g ** 2 if v is None else b2 * v + (1 - b2) * g ** 2
        opt.zero_grad()
        loss().backward()
        opt.step()
    P = (v / (1 - b2 ** 5)).sqrt() + ocfg.eps
    d = P.rsqrt()
    lam = torch.linalg.eigvalsh(d[:, None] * dense_hessian(model, loss) * d[None, :]).flip(0)
    cut = float(lam[1] + lam[2]) / 2
    threshold = cut / 0.75
    lr = (2 + 2 * 0.9) / ((1 - 0.9) * threshold)
    fresh = build_optimizer(ocfg, model.parameters())   # no state yet: no P⁻¹H, no ratio, nothing counted
    before = SharpnessProbe(SharpnessConfig(adam_preconditioner="init2winit", above_fraction=1e-9, above_cap=8), ocfg)
    cols = before.measure(model, loss, fresh, lr)
    assert cols["ratio"] is None and cols["lambda_max"] > 0 and cols["n_above"] is None
    probe = SharpnessProbe(SharpnessConfig(adam_preconditioner="init2winit", above_cap=8, **TIGHT), ocfg)
    cols = probe.measure(model, loss, opt, lr)
    assert cols["n_above"] == 2
    np.testing.assert_allclose(cols["above_values"], lam[:2].numpy(), rtol=1e-6)
    assert cols["above_values"][0] == pytest.approx(cols["lambda_precond"], rel=1e-12)


class _Moving(nn.Module):
    def __init__(self, theta: torch.Tensor):
        super().__init__()
        self.theta = nn.Parameter(theta.clone())
        self.A = None

    def loss(self) -> torch.Tensor:
        return 0.5 * self.theta @ (self.A @ self.theta)


def _moving_spectra(kind: str, probes: int, n: int):
    """Per probe, a symmetric (n, n) matrix: λ₁ = 20, λ₂ = 18 fixed, six
    eigenvalues that move, the bulk in [0, 4]; the eigenvectors rotate a
    little each probe (40 random planes, 0.02 rad).  "staggered": four
    eigenvalues rise from 10 one after another (to 19, 18.7, 18.4, 18.1)
    while one falls from 18 to 10, as under progressive sharpening;
    "crossing": four rise from 5 to 17 at different speeds while two fall
    from 17 to 5, crossing each other near the cut."""
    rng = np.random.default_rng(0)
    bulk = np.sort(rng.uniform(0, 4, n - 8))[::-1]
    s = np.linspace(0, 1, probes)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    R, perm = np.eye(n), rng.permutation(n)
    for i in range(40):
        a, b = perm[2 * i], perm[2 * i + 1]
        G = np.eye(n)
        G[[a, a, b, b], [a, b, a, b]] = [np.cos(0.02), -np.sin(0.02), np.sin(0.02), np.cos(0.02)]
        R = R @ G
    out = []
    for t in range(probes):
        if kind == "staggered":
            moving = [10 + (9 - 2 * a) * np.clip((s[t] - a) / 0.5, 0, 1) for a in (0, .15, .3, .45)]
            moving += [18 - 8 * s[t], 8.0]
        else:
            moving = [5 + 12 * min(1.0, s[t] * f) for f in (1.0, 1.4, 2.0, 3.0)]
            moving += [17 - 12 * s[t], 17 - 12 * s[t] ** 2]
        lam = np.concatenate([[20.0, 18.0], moving, bulk])
        A = (Q * lam) @ Q.T
        out.append(torch.from_numpy(0.5 * (A + A.T)))
        Q = Q @ R
    return out


@pytest.mark.parametrize("kind, cap", [("staggered", 8), ("crossing", 8), ("crossing", 4)])
def test_warm_probes_follow_the_true_count(kind, cap):
    """30 warm-started probes of a slowly changing 300-dimensional quadratic
    (default tolerances): the count and values are the true ones at every
    probe where no eigenvalue is within 2 % of the cut."""
    n, lr = 300, 0.1   # cut 15
    cut = 0.75 * 2 / lr
    model = _Moving(torch.randn(n, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    probe = SharpnessProbe(SharpnessConfig(above_cap=cap), OptimConfig(name="gd", lr=lr))
    counts, trues = [], []
    for A in _moving_spectra(kind, 30, n):
        model.A = A
        cols = probe.measure(model, model.loss, None, lr)
        lam = torch.linalg.eigvalsh(A)
        true = _reference(lam, cut)
        if (abs(lam - cut) < 0.02 * cut).any():
            continue
        counts.append(cols["n_above"])
        trues.append(min(len(true), cap))
        assert cols["n_above_capped"] == (len(true) >= cap)
        np.testing.assert_allclose(cols["above_values"], true[:cap], rtol=2e-3)
    assert counts == trues and len(counts) >= 20
    assert len(set(trues)) >= 2 and (cap > 4 or 4 in trues)   # the count changes; the cap is reached


def test_warm_counting_cost(capsys):
    """Products per warm probe of the "staggered" quadratic with the count on
    and off (bench/RESULTS.md quotes the printed line): on, the grown block
    stays warm and costs a few products per counted eigenvalue; off, the
    λ₁ solve alone."""
    n, lr = 300, 0.1
    hvps = {}
    for fraction in (0.75, 0.0):
        model = _Moving(torch.randn(n, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
        probe = SharpnessProbe(SharpnessConfig(above_fraction=fraction, above_cap=8), OptimConfig(name="gd", lr=lr))
        rows = []
        for A in _moving_spectra("staggered", 30, n):
            model.A = A
            rows.append(probe.measure(model, model.loss, None, lr))
        hvps[fraction] = np.array([r["eig_hvps"] for r in rows[1:]])
        if fraction:
            counts = np.array([r["n_above"] for r in rows[1:]])
    with capsys.disabled():
        print(f"\nstaggered quadratic, 29 warm probes: products per probe {hvps[0.75].mean():.1f} counting "
              f"(mean count {counts.mean():.1f}) vs {hvps[0.0].mean():.1f} without")
    assert hvps[0.0].mean() <= 4   # the track solver's Rayleigh–Ritz step, rarely more
    assert hvps[0.75].mean() <= 4 * hvps[0.0].mean()


def test_state_dict_carries_the_count():
    model, loss, _ = _quadratic(SPECTRUM, seed=3)
    ocfg = OptimConfig(name="gd", lr=LR)
    probe = SharpnessProbe(SharpnessConfig(above_cap=8), ocfg)
    first = probe.measure(model, loss, None, LR)
    resumed = SharpnessProbe(SharpnessConfig(above_cap=8), ocfg)
    resumed.load_state_dict(probe.state_dict())
    assert resumed.counted == {"plain": first["n_above"]} and first["n_above"] == 6
    assert resumed.measure(model, loss, None, LR) == probe.measure(model, loss, None, LR)
    probe.reset_warm_start()
    assert probe.counted == {}


@pytest.mark.parametrize("fields, message", [
    (dict(above_fraction=-0.5), "sharpness.above_fraction: must be >= 0"),
    (dict(above_cap=1, block_size=3, topk=2), r"sharpness.above_cap: must be 0 \(off\) or >= topk=2"),
])
def test_bad_settings_are_one_line_errors(fields, message):
    with pytest.raises(ConfigError, match=message):
        SharpnessConfig(**fields)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the TF32 search and CUDA graphs need a GPU")
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_tf32_search_counts_float32_checked_values_on_cuda(cuda_graphs):
    """On a GPU (TF32 search, float32 check of every counted column) the count
    and values on the U-Net-block net in float32 match the float64 dense Hessian."""
    import copy

    model, loss = unet_blocks_problem()
    lam = torch.linalg.eigvalsh(dense_hessian(model, loss)).flip(0)
    cut = float(lam[2] + lam[3]) / 2
    lr = 2 / (cut / 0.75)
    x, t, eps = _unet_blocks_batch(model, loss)
    gpu = copy.deepcopy(model).float().cuda()
    x, t, eps = x.float().cuda(), t.float().cuda(), eps.float().cuda()
    ocfg = OptimConfig(name="gd", lr=lr)
    probe = SharpnessProbe(SharpnessConfig(tol=1e-3, cuda_graphs=cuda_graphs, search_precision="tf32", above_cap=8,
                                           verify_every=1), ocfg)
    for i in range(3):   # cold, then warm track solves (float32-checked every probe: verify_every 1)
        cols = probe.measure(gpu, lambda: ((gpu(x, t) - eps) ** 2).mean(), None, lr)
        assert cols["n_above"] == 3 and (i == 0 or cols["eig_check"] is not None)
        np.testing.assert_allclose(cols["above_values"], lam[:3].numpy(), rtol=1e-3)
