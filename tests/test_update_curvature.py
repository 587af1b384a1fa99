"""The curvature of the update being taken: Adam's preconditioner of the coming
update (sharpness.adam_preconditioner) and coupled L2 weight decay (H + wd·I),
against a hand-simulated Adam, dense eigh and quadratics trained for real."""
import math

import pytest
import torch

from curvature_fixtures import MLP, Quadratic, dense_gradient, dense_hessian, randomize, symmetric_with_spectrum
from trainers.config import OptimConfig, SharpnessConfig
from trainers.curvature.probe import SharpnessProbe
from trainers.run.optimizers import build_optimizer

TIGHT = dict(tol=1e-9, max_iters=800, block_size=3)


def _mlp(seed=0, n=24):
    torch.manual_seed(seed)
    model = randomize(MLP().double(), std=0.6, seed=seed)
    x, y = torch.randn(n, 3, dtype=torch.float64), torch.randn(n, 2, dtype=torch.float64)
    return model, (lambda: ((model(x) - y) ** 2).mean())


def _flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


class HandAdam:
    """Adam / AdamW written out (Kingma & Ba 2015; Loshchilov & Hutter 2019
    for AdamW), on one flat parameter vector, independently of torch.optim."""

    def __init__(self, n, lr, beta1, beta2, eps, wd, decoupled):
        self.lr, self.b1, self.b2, self.eps, self.wd, self.decoupled = lr, beta1, beta2, eps, wd, decoupled
        self.m = torch.zeros(n, dtype=torch.float64)
        self.v = torch.zeros(n, dtype=torch.float64)
        self.t = 0

    def effective_gradient(self, g, theta):
        return g if self.decoupled else g + self.wd * theta

    def next_preconditioner(self, g, theta):
        """P of the update the next step takes: θ ← θ − η m_{t+1} / P."""
        ge = self.effective_gradient(g, theta)
        t = self.t + 1
        v = self.b2 * self.v + (1 - self.b2) * ge ** 2
        return (1 - self.b1 ** t) * ((v / (1 - self.b2 ** t)).sqrt() + self.eps)

    def state_preconditioner(self):
        """init2winit's P: √v̂ₜ + ε of the current state."""
        return (self.v / (1 - self.b2 ** self.t)).sqrt() + self.eps

    def step(self, g, theta):
        ge = self.effective_gradient(g, theta)
        self.t += 1
        self.m = self.b1 * self.m + (1 - self.b1) * ge
        self.v = self.b2 * self.v + (1 - self.b2) * ge ** 2
        m_hat = self.m / (1 - self.b1 ** self.t)
        v_hat = self.v / (1 - self.b2 ** self.t)
        if self.decoupled:
            theta = theta * (1 - self.lr * self.wd)
        return theta - self.lr * m_hat / (v_hat.sqrt() + self.eps)


def _set_flat(model, theta):
    with torch.no_grad():
        offset = 0
        for p in model.parameters():
            p.copy_(theta[offset:offset + p.numel()].reshape(p.shape))
            offset += p.numel()


def _top_symmetric(H, P):
    d = P.rsqrt()
    return torch.linalg.eigvalsh(d[:, None] * H * d[None, :]).flip(0)


@pytest.mark.parametrize("name, wd, steps", [("adam", 0.0, 0), ("adam", 0.0, 5), ("adam", 0.05, 5),
                                             ("adamw", 0.05, 5)])
def test_update_preconditioner_is_the_one_of_the_coming_update(name, wd, steps):
    model, loss = _mlp(seed=3)
    lr, b1, b2, eps = 1e-2, 0.9, 0.999, 1e-3
    ocfg = OptimConfig(name=name, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    opt = build_optimizer(ocfg, model.parameters())
    hand = HandAdam(sum(p.numel() for p in model.parameters()), lr, b1, b2, eps, wd, decoupled=name == "adamw")
    theta = _flat_params(model)
    for _ in range(steps):
        g = dense_gradient(model, loss)
        opt.zero_grad()
        loss().backward()
        opt.step()
        theta = hand.step(g, theta)
        torch.testing.assert_close(_flat_params(model), theta, rtol=1e-12, atol=1e-13)
    # the coming update's gradient, in .grad as the loop leaves it
    opt.zero_grad()
    loss().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    g = torch.cat([x.reshape(-1) for x in grads])
    P = hand.next_preconditioner(g, theta)
    coupled = wd if name == "adam" else 0.0
    H = dense_hessian(model, loss) + coupled * torch.eye(len(theta), dtype=torch.float64)
    expected = _top_symmetric(H, P)[:2]
    probe = SharpnessProbe(SharpnessConfig(topk=2, **TIGHT), ocfg)
    cols = probe.measure(model, loss, opt, lr, grads=grads)
    assert abs(cols["lambda_precond"] - float(expected[0])) <= 1e-6 * abs(float(expected[0]))
    torch.testing.assert_close(torch.tensor(cols["topk"], dtype=torch.float64), expected, rtol=1e-6, atol=0)
    assert cols["ratio"] == pytest.approx(cols["lambda_precond"] / ((2 + 2 * b1) / ((1 - b1) * lr)), rel=1e-12)
    # the plain λ₁ is of the same update's curvature (H + wd·I for Adam, H for AdamW)
    assert cols["lambda_max"] == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-6)
    if steps:
        init2winit = SharpnessProbe(SharpnessConfig(adam_preconditioner="init2winit", **TIGHT), ocfg).measure(
            model, loss, opt, lr, grads=grads)
        assert init2winit["lambda_precond"] == pytest.approx(
            float(_top_symmetric(H, hand.state_preconditioner())[0]), rel=1e-6)
    # P is what the update divides by: torch's step is θ − η (β₁m + (1 − β₁)g') / P (AdamW: after the decay)
    m_next = b1 * hand.m + (1 - b1) * hand.effective_gradient(g, theta)
    shrink = (1 - lr * wd) if name == "adamw" else 1.0
    opt.step()
    torch.testing.assert_close(_flat_params(model), shrink * theta - lr * m_next / P, rtol=1e-12, atol=1e-13)


def test_update_preconditioner_needs_the_gradient_and_skips_a_non_finite_one():
    model, loss = _mlp(seed=4)
    ocfg = OptimConfig(name="adam", lr=1e-3)
    opt = build_optimizer(ocfg, model.parameters())
    probe = SharpnessProbe(SharpnessConfig(**TIGHT), ocfg)
    assert probe.measure(model, loss, opt, 1e-3)["lambda_precond"] is None       # no gradient given
    grads = [torch.zeros_like(p) for p in model.parameters()]
    grads[1][0] = float("nan")
    cols = probe.measure(model, loss, opt, 1e-3, grads=grads)                     # a diverged step
    assert cols["lambda_precond"] is None and cols["lambda_max"] is not None


def _frozen_adam(A, b, P, m0, lr, beta1, steps=3000):
    """From θ = 0 (the centre of L(θ) = ½θᵀAθ + bᵀθ) with first moment m0:
    m ← β₁m + (1 − β₁)∇L, θ ← θ − η m / P, P frozen; returns ‖θ − θ*‖ / ‖θ*‖."""
    theta = torch.zeros_like(b)
    star = -torch.linalg.solve(A, b)
    m = m0.clone()
    for _ in range(steps):
        m = beta1 * m + (1 - beta1) * (A @ theta + b)
        theta = theta - lr * m / P
        if not torch.isfinite(theta).all():
            return math.inf
    return float((theta - star).norm() / star.norm())


@pytest.mark.parametrize("factor", [0.98, 1.02])
def test_adam_with_the_update_preconditioner_frozen_diverges_exactly_above_38_over_lr(factor):
    """A quadratic centred at Adam's current point (so its gradient there, b,
    does not depend on the curvature A): P of the coming update from a
    hand-simulated Adam state and b; A scaled so that λ₁(P⁻¹A) = factor ·
    38/η.  The probe reports that ratio, and Adam with P frozen converges
    below 1 and diverges above."""
    n, lr, b1, b2, eps = 6, 1e-2, 0.9, 0.999, 1e-8
    gen = torch.Generator().manual_seed(11)
    A0 = symmetric_with_spectrum([5.0, 2.0, 1.0, 0.5, 0.3, 0.1], seed=12)
    hand = HandAdam(n, lr, b1, b2, eps, 0.0, decoupled=False)
    theta = torch.zeros(n, dtype=torch.float64)
    for _ in range(4):     # some history in m and v, from gradients of another size per coordinate
        theta = hand.step(torch.randn(n, generator=gen, dtype=torch.float64) * torch.linspace(0.1, 2.0, n,
                                                                                              dtype=torch.float64),
                          theta)
    b = torch.randn(n, generator=gen, dtype=torch.float64)
    P = hand.next_preconditioner(b, theta)
    threshold = (2 + 2 * b1) / ((1 - b1) * lr)
    A = A0 * (factor * threshold / float(_top_symmetric(A0, P)[0]))
    # the same state in torch's Adam, at the quadratic's centre
    model = Quadratic(A, torch.zeros(n, dtype=torch.float64), b)
    ocfg = OptimConfig(name="adam", lr=lr, betas=(b1, b2), eps=eps)
    opt = build_optimizer(ocfg, model.parameters())
    opt.state[model.theta] = {"step": torch.tensor(float(hand.t)), "exp_avg": hand.m.clone(),
                              "exp_avg_sq": hand.v.clone()}
    cols = SharpnessProbe(SharpnessConfig(tol=1e-8, max_iters=500), ocfg).measure(
        model, model.loss, opt, lr, grads=[b.clone()])
    assert cols["ratio"] == pytest.approx(factor, rel=1e-6)
    err = _frozen_adam(A, b, P, hand.m, lr, b1)
    assert (err > 1e3) if factor > 1 else (err < 1e-3)


# --- coupled L2 weight decay: the update's curvature is H + wd·I ------------------


@pytest.mark.parametrize("name", ["gd", "momentum"])
def test_coupled_weight_decay_probe_measures_h_plus_wd(name):
    model, loss = _mlp(seed=6)
    wd, lr = 0.3, 0.05
    ocfg = OptimConfig(name=name, lr=lr, momentum=0.9, weight_decay=wd)
    n = sum(p.numel() for p in model.parameters())
    H = dense_hessian(model, loss)
    expected = torch.linalg.eigvalsh(H + wd * torch.eye(n, dtype=torch.float64)).flip(0)[:2]
    cols = SharpnessProbe(SharpnessConfig(topk=2, trace_samples=3, **TIGHT), ocfg).measure(
        model, loss, build_optimizer(ocfg, model.parameters()), lr)
    assert cols["lambda_max"] == pytest.approx(float(expected[0]), rel=1e-6)
    torch.testing.assert_close(torch.tensor(cols["topk"], dtype=torch.float64), expected, rtol=1e-6, atol=0)
    beta = 0.9 if name == "momentum" else 0.0
    assert cols["ratio"] == pytest.approx(cols["lambda_max"] / ((2 + 2 * beta) / lr), rel=1e-12)
    # without decay: the loss Hessian alone; the same Rademacher probes give a trace smaller by wd·n
    plain = OptimConfig(name=name, lr=lr, momentum=0.9)
    undecayed = SharpnessProbe(SharpnessConfig(topk=2, trace_samples=3, **TIGHT), plain).measure(
        model, loss, build_optimizer(plain, model.parameters()), lr)
    assert undecayed["lambda_max"] == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-6)
    assert cols["hessian_trace"] == pytest.approx(undecayed["hessian_trace"] + wd * n, rel=1e-9)


def test_adamw_decoupled_decay_is_not_part_of_the_curvature():
    model, loss = _mlp(seed=7)
    ocfg = OptimConfig(name="adamw", lr=1e-3, weight_decay=0.5)
    cols = SharpnessProbe(SharpnessConfig(**TIGHT), ocfg).measure(
        model, loss, build_optimizer(ocfg, model.parameters()), 1e-3)
    assert cols["lambda_max"] == pytest.approx(float(torch.linalg.eigvalsh(dense_hessian(model, loss))[-1]),
                                               rel=1e-6)


@pytest.mark.parametrize("factor", [0.97, 1.03])
def test_gd_with_weight_decay_diverges_exactly_when_the_probed_ratio_exceeds_one(factor):
    """torch's SGD with weight_decay on L = ½θᵀAθ: the iteration matrix is
    I − η(A + wd·I), so the threshold 2/η applies to λ₁(A) + wd; the probe's
    ratio says which side of it the run is."""
    lr, wd = 0.1, 2.0
    top = factor * 2 / lr - wd          # λ₁(A) + wd = factor · 2/η
    A = symmetric_with_spectrum([top, 0.5 * top, 0.1 * top], seed=13)
    model = Quadratic(A, torch.ones(3, dtype=torch.float64))
    ocfg = OptimConfig(name="gd", lr=lr, weight_decay=wd)
    opt = build_optimizer(ocfg, model.parameters())
    cols = SharpnessProbe(SharpnessConfig(tol=1e-8, max_iters=300), ocfg).measure(model, model.loss, opt, lr)
    assert cols["ratio"] == pytest.approx(factor, rel=1e-6)
    start = float(model.theta.detach().norm())
    for _ in range(400):
        opt.zero_grad()
        model.loss().backward()
        opt.step()
    final = float(model.theta.detach().norm())
    assert (final > 1e3 * start) if factor > 1 else (final < 1e-3 * start)


def test_plain_lambda_every_nth_probe_is_the_dense_top_eigenvalue_there():
    """sharpness.plain_every = 3: λ₁(P⁻¹H) at every probe, λ₁(H) at probes 0, 3, 6
    only (null between), each equal to dense eigh of H at that step's parameters."""
    model, loss = _mlp(seed=5)
    ocfg = OptimConfig(name="adam", lr=1e-2, betas=(0.9, 0.999), eps=1e-3)
    opt = build_optimizer(ocfg, model.parameters())
    probe = SharpnessProbe(SharpnessConfig(plain_every=3, **TIGHT), ocfg)
    seen = []
    for step in range(7):
        opt.zero_grad()
        loss().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        top = float(torch.linalg.eigvalsh(dense_hessian(model, loss))[-1])
        cols = probe.measure(model, loss, opt, 1e-2, grads=grads)
        assert cols["lambda_precond"] is not None and cols["ratio"] is not None
        if cols["lambda_max"] is not None:
            assert cols["lambda_max"] == pytest.approx(top, rel=1e-6)
            seen.append(step)
        opt.step()
    assert seen == [0, 3, 6]
    # the count survives a resume: a probe restored from the state after 4 probes solves at the 7th
    restored = SharpnessProbe(SharpnessConfig(plain_every=3, **TIGHT), ocfg)
    state = probe.state_dict()
    state["probes"] = 4
    restored.load_state_dict(state)
    opt.zero_grad()
    loss().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    assert restored.measure(model, loss, opt, 1e-2, grads=grads)["lambda_max"] is None
    assert restored.measure(model, loss, opt, 1e-2, grads=grads)["lambda_max"] is None
    assert restored.measure(model, loss, opt, 1e-2, grads=grads)["lambda_max"] is not None
