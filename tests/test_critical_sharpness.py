"""Critical sharpness (Kalra et al. 2026): the line search against closed
forms on quadratics of known spectrum, the update direction against the
optimizer's own step, and the probe's logged value against a dense scan of
the loss along the update on the tiny U-Net."""
import copy
import math

import pytest
import torch

from conftest import tiny_config
from curvature_fixtures import Quadratic, dense_hessian, symmetric_with_spectrum
from trainers.config import ConfigError, OptimConfig, SharpnessConfig, run_config
from trainers.curvature.critical import PAPER_TOL, CriticalResult, critical_learning_rate, update_direction
from trainers.curvature.probe import SharpnessProbe
from trainers.run.optimizers import build_optimizer

SPECTRUM = [50.0, 20.0, 7.0, 3.0] + [0.5 + 0.1 * i for i in range(12)] + [-2.0]


def _quadratic(seed=0, spectrum=SPECTRUM):
    A = symmetric_with_spectrum(spectrum, seed=seed)
    theta0 = torch.randn(len(spectrum), generator=torch.Generator().manual_seed(seed + 7), dtype=torch.float64)
    return Quadratic(A, theta0), A


def _counting(fn):
    calls = [0]

    def wrapped():
        calls[0] += 1
        return fn()
    return wrapped, calls


def _assert_brackets(res, eta_true, tol):
    """η_c lies in the bracket, the bracket is as narrow as stated and the
    estimate 2/η_c is within CriticalResult.relative_error(tol)."""
    assert res.lower <= eta_true <= res.upper
    assert 1 - res.lower / res.upper <= tol
    assert abs(res.sharpness - 2 / eta_true) <= CriticalResult.relative_error(tol) * (2 / eta_true)


# --- the line search on L(θ) = ½θᵀAθ --------------------------------------------------


@pytest.mark.parametrize("guess", [1e-4, 0.01, 0.3, 50.0])
def test_gd_direction_gives_the_rayleigh_quotient_of_the_gradient(guess):
    """L(θ − ηg) − L(θ) = −η‖g‖² + ½η²gᵀAg: η_c = 2‖g‖²/gᵀAg, 2/η_c = gᵀAg/‖g‖²."""
    model, A = _quadratic(seed=1)
    g = (A @ model.theta).detach()
    eta_true = float(2 * (g @ g) / (g @ A @ g))
    loss, calls = _counting(model.loss)
    res = critical_learning_rate(loss, [model.theta], [g], guess, tol=PAPER_TOL, max_passes=40)
    _assert_brackets(res, eta_true, PAPER_TOL)
    assert res.passes == calls[0]
    assert res.sharpness <= max(SPECTRUM)   # a Rayleigh quotient of A


def test_a_guess_near_the_answer_costs_fewer_than_ten_passes():
    model, A = _quadratic(seed=2)
    g = (A @ model.theta).detach()
    eta_true = float(2 * (g @ g) / (g @ A @ g))
    for guess in (0.6 * eta_true, 0.9 * eta_true, 1.3 * eta_true, 1.9 * eta_true):
        res = critical_learning_rate(model.loss, [model.theta], [g], guess)
        _assert_brackets(res, eta_true, PAPER_TOL)
        assert res.passes < 10


def test_preconditioned_direction_against_the_closed_form_and_lambda_of_p_inverse_h():
    """Δθ = P⁻¹g: η_c = 2 ΔθᵀAθ/ΔθᵀAΔθ, and with u = P^{-1/2}g, 2/η_c is the
    Rayleigh quotient of P^{-1/2}AP^{-1/2}, at most λ₁(P⁻¹A) (dense eigvals)."""
    model, A = _quadratic(seed=3)
    P = torch.linspace(0.2, 5.0, len(SPECTRUM), dtype=torch.float64)
    g = (A @ model.theta).detach()
    d = g / P
    eta_true = float(2 * (d @ g) / (d @ A @ d))
    res = critical_learning_rate(model.loss, [model.theta], [d], 1e-3, tol=1e-4, max_passes=60)
    _assert_brackets(res, eta_true, 1e-4)
    top = float(torch.linalg.eigvals(A / P[:, None]).real.max())
    assert res.sharpness <= top * (1 + 1e-4)


def test_no_bracket_when_the_loss_rises_at_every_step_and_for_a_zero_direction():
    model, A = _quadratic(seed=4)
    g = (A @ model.theta).detach()
    res = critical_learning_rate(model.loss, [model.theta], [-g], 1e-2, max_passes=12)   # ascent
    assert res.lower is None and res.sharpness is None and res.passes == 12
    res = critical_learning_rate(model.loss, [model.theta], [torch.zeros_like(g)], 1e-2)
    assert res.sharpness is None and res.passes == 0


def test_parameters_are_restored_bit_for_bit_also_when_the_loss_raises():
    model, A = _quadratic(seed=5)
    before = model.theta.detach().clone()
    g = (A @ model.theta).detach()
    critical_learning_rate(model.loss, [model.theta], [g], 1e-3)
    assert torch.equal(model.theta.detach(), before)
    calls = [0]

    def failing():
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("boom")
        return model.loss()
    with pytest.raises(RuntimeError):
        critical_learning_rate(failing, [model.theta], [g], 1e-3)
    assert torch.equal(model.theta.detach(), before)


def test_a_non_finite_loss_counts_as_a_rise():
    model, A = _quadratic(seed=6)
    g = (A @ model.theta).detach()
    eta_true = float(2 * (g @ g) / (g @ A @ g))

    def loss():   # NaN beyond 1.5 η_c: the search must treat it as a rise, not as a decrease
        value = model.loss()
        t = float((model.theta.detach() - theta0) @ g / (g @ g))   # θ = θ₀ − t g
        return value if -t < 1.5 * eta_true else value * float("nan")
    theta0 = model.theta.detach().clone()
    res = critical_learning_rate(loss, [model.theta], [g], 0.25 * eta_true, max_passes=30)
    _assert_brackets(res, eta_true, PAPER_TOL)


# --- the update direction is the optimizer's step ----------------------------------------------


def _mlp_problem(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()
    x, y = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, 2, dtype=torch.float64)
    return model, (lambda: ((model(x) - y) ** 2).mean())


def _backward(model, loss):
    for p in model.parameters():
        p.grad = None
    loss().backward()


OPTIMIZERS = [
    OptimConfig(name="gd", lr=0.05),
    OptimConfig(name="gd", lr=0.05, weight_decay=0.1),
    OptimConfig(name="momentum", lr=0.05, momentum=0.9, weight_decay=0.01),
    OptimConfig(name="adam", lr=1e-2),
    OptimConfig(name="adam", lr=1e-2, weight_decay=0.05),
    OptimConfig(name="adamw", lr=1e-2, weight_decay=0.1),
]


@pytest.mark.parametrize("ocfg", OPTIMIZERS, ids=lambda c: f"{c.name}-wd{c.weight_decay}")
@pytest.mark.parametrize("steps_before", [0, 3])
def test_update_direction_is_the_step_the_optimizer_takes(ocfg, steps_before):
    """θ − η·update_direction(...) equals θ after optimizer.step() on a copy,
    and the optimizer's state is not touched by computing it."""
    model, loss = _mlp_problem(seed=steps_before)
    opt = build_optimizer(ocfg, model.parameters())
    for _ in range(steps_before):
        _backward(model, loss)
        opt.step()
    _backward(model, loss)
    params = list(model.parameters())
    state_before = copy.deepcopy(opt.state_dict())
    d = update_direction(opt, params, [p.grad for p in params])
    assert _same_state(opt.state_dict(), state_before)
    twin = copy.deepcopy((model, opt))
    for p, q in zip(params, twin[0].parameters()):
        q.grad = p.grad.clone()
    twin[1].step()
    for p, q, dp in zip(params, twin[0].parameters(), d):
        torch.testing.assert_close(p.detach() - ocfg.lr * dp, q.detach(), rtol=1e-12, atol=1e-14)


def _same_state(a, b):
    for k in a["state"]:
        for name, v in a["state"][k].items():
            w = b["state"][k][name]
            if torch.is_tensor(v) and not torch.equal(v, w):
                return False
    return a["state"].keys() == b["state"].keys()


def test_update_direction_without_a_finite_gradient_is_none():
    model, loss = _mlp_problem()
    opt = build_optimizer(OptimConfig(name="adam", lr=1e-3), model.parameters())
    _backward(model, loss)
    params = list(model.parameters())
    grads = [p.grad for p in params]
    assert update_direction(opt, params, [None, *grads[1:]]) is None
    assert update_direction(opt, params, [grads[0] * float("inf"), *grads[1:]]) is None


# --- the probe column -------------------------------------------------------------------------



def _trained_and_coming_step(model, ocfg, steps):
    """(optimizer, Δθ): ``model`` trained ``steps`` Adam steps, its gradient in
    .grad, and the coming update per unit η, taken by a deep-copied twin."""
    opt = build_optimizer(ocfg, model.parameters())
    for _ in range(steps):
        opt.zero_grad()
        model.loss().backward()
        opt.step()
    opt.zero_grad()
    model.loss().backward()
    twin_model, twin_opt = copy.deepcopy((model, opt))
    twin_model.theta.grad = model.theta.grad.clone()
    twin_opt.step()
    return opt, (model.theta.detach() - twin_model.theta.detach()) / ocfg.lr

def test_probe_logs_two_over_eta_c_of_the_adam_update_on_a_quadratic_and_leaves_everything_as_it_was():
    """After some Adam steps on a quadratic the logged 2/η_c equals the closed
    form ΔθᵀAΔθ / ΔθᵀAθ with Δθ from an independent deep-copied step; the
    parameters and the optimizer state are bit-identical afterwards."""
    model, A = _quadratic(seed=8)
    ocfg = OptimConfig(name="adam", lr=1e-2)
    opt, delta = _trained_and_coming_step(model, ocfg, 4)
    expected = float(delta @ A @ delta / (delta @ A @ model.theta.detach()))

    theta, state = model.theta.detach().clone(), copy.deepcopy(opt.state_dict())
    cfg = SharpnessConfig(critical=True, critical_tol=1e-3, critical_max_passes=40, tol=1e-6, max_iters=300)
    cols = SharpnessProbe(cfg, ocfg).measure(model, model.loss, opt, ocfg.lr, grads=[model.theta.grad])
    assert cols["lambda_critical"] == pytest.approx(expected, rel=CriticalResult.relative_error(1e-3) + 1e-6)
    assert 3 <= cols["critical_passes"] <= 40
    assert cols["lambda_dir"] == pytest.approx(expected, rel=1e-9)   # exact on a quadratic
    assert torch.equal(model.theta.detach(), theta) and _same_state(opt.state_dict(), state)


def test_gd_probe_agrees_with_step_sharpness_on_a_quadratic():
    """GD: 2/η_c = gᵀAg/‖g‖² (the step sharpness of the same loss)."""
    model, A = _quadratic(seed=9)
    ocfg = OptimConfig(name="gd", lr=0.01)
    opt = build_optimizer(ocfg, model.parameters())
    model.loss().backward()
    g = model.theta.grad.detach()
    cfg = SharpnessConfig(critical=True, tol=1e-6, max_iters=300)
    cols = SharpnessProbe(cfg, ocfg).measure(model, model.loss, opt, ocfg.lr, grads=[g])
    assert cols["lambda_critical"] == pytest.approx(float(g @ A @ g / (g @ g)),
                                                    rel=CriticalResult.relative_error(PAPER_TOL))
    assert cols["lambda_critical"] <= cols["lambda_max"]
    assert cols["lambda_dir"] == pytest.approx(float(g @ A @ g / (g @ g)), rel=1e-9)
    assert cols["critical_passes"] < 16


def test_without_the_option_or_without_gradients_the_columns_are_null():
    model, A = _quadratic(seed=10)
    ocfg = OptimConfig(name="gd", lr=0.01)
    opt = build_optimizer(ocfg, model.parameters())
    model.loss().backward()
    cols = SharpnessProbe(SharpnessConfig(), ocfg).measure(model, model.loss, opt, 0.01, grads=[model.theta.grad])
    assert cols["lambda_critical"] is None and cols["critical_passes"] is None and cols["lambda_dir"] is None
    cols = SharpnessProbe(SharpnessConfig(critical=True), ocfg).measure(model, model.loss, opt, 0.01)
    assert cols["lambda_critical"] is None


def test_adams_first_step_is_bounded_by_the_preconditioned_lambda():
    """On Adam's first step m̂ = g, so 2/η_c is the Rayleigh quotient of
    D A D at Dg, D = (√v̂ + ε)^{-1/2}, at most (1 − β₁)·λ₁(P⁻¹A) with the
    probe's update preconditioner (dense eigenvalues)."""
    model, A = _quadratic(seed=14)
    ocfg = OptimConfig(name="adam", lr=1e-2, eps=1e-3)
    opt = build_optimizer(ocfg, model.parameters())
    model.loss().backward()
    g = model.theta.grad.detach().clone()
    D = ((g.square()).sqrt() + ocfg.eps).rsqrt()       # v̂ = g² on the first step
    u = D * g
    rayleigh = float(u @ (D[:, None] * A * D[None, :]) @ u / (u @ u))
    cfg = SharpnessConfig(critical=True, critical_tol=1e-3, critical_max_passes=40, tol=1e-8, max_iters=500)
    cols = SharpnessProbe(cfg, ocfg).measure(model, model.loss, opt, ocfg.lr, grads=[model.theta.grad])
    assert cols["lambda_dir"] == pytest.approx(rayleigh, rel=1e-9)
    assert cols["lambda_critical"] == pytest.approx(rayleigh, rel=CriticalResult.relative_error(1e-3) + 1e-6)
    P = (1 - 0.9) * (g.abs() + ocfg.eps)
    top = float(torch.linalg.eigvals(A / P[:, None]).real.max())
    assert cols["lambda_precond"] == pytest.approx(top, rel=1e-5)
    assert cols["lambda_dir"] <= (1 - 0.9) * top * (1 + 1e-9)


def test_coupled_weight_decay_is_part_of_the_searched_loss():
    """Adam with coupled wd descends L + (wd/2)‖θ‖² (Hessian A + wd·I): 2/η_c
    and λ_dir are those of that objective, from the closed form with the
    optimizer's own step."""
    model, A = _quadratic(seed=11)
    wd = 0.5
    ocfg = OptimConfig(name="adam", lr=1e-2, weight_decay=wd)
    opt = build_optimizer(ocfg, model.parameters())
    model.loss().backward()
    twin_model, twin_opt = copy.deepcopy((model, opt))
    twin_model.theta.grad = model.theta.grad.clone()
    twin_opt.step()
    delta = (model.theta.detach() - twin_model.theta.detach()) / ocfg.lr
    theta = model.theta.detach()
    Aw = A + wd * torch.eye(len(theta), dtype=A.dtype)
    expected = float(delta @ Aw @ delta / (delta @ Aw @ theta))
    cfg = SharpnessConfig(critical=True, critical_tol=1e-3, critical_max_passes=40, tol=1e-6, max_iters=300)
    cols = SharpnessProbe(cfg, ocfg).measure(model, model.loss, opt, ocfg.lr, grads=[model.theta.grad])
    assert cols["lambda_dir"] == pytest.approx(expected, rel=1e-9)
    assert cols["lambda_critical"] == pytest.approx(expected, rel=CriticalResult.relative_error(1e-3) + 1e-6)


def test_the_next_probe_starts_from_the_last_eta_c_also_after_a_resume():
    model, A = _quadratic(seed=13)
    ocfg = OptimConfig(name="gd", lr=0.01)
    opt = build_optimizer(ocfg, model.parameters())
    model.loss().backward()
    probe = SharpnessProbe(SharpnessConfig(critical=True), ocfg)
    cols = probe.measure(model, model.loss, opt, 0.01, grads=[model.theta.grad])
    assert probe.critical_guess == pytest.approx(2 / cols["lambda_critical"])
    resumed = SharpnessProbe(SharpnessConfig(critical=True), ocfg)
    resumed.load_state_dict(probe.state_dict())
    assert resumed.critical_guess == probe.critical_guess
    again = [p.measure(model, model.loss, opt, 0.01, grads=[model.theta.grad]) for p in (probe, resumed)]
    assert again[0] == again[1]
    # L(θ), the guess (the last bracket's midpoint), one halving or doubling to a factor-2 bracket with η_c
    # within 1/16 of its top or bottom end, then 3 or 4 bisections to 1 − lower/upper ≤ 1/16: 6 or 7 passes
    # (which one depends on the side of the midpoint η_c lies, i.e. on the rounding of the first search)
    assert again[0]["critical_passes"] <= 7


def test_config_checks():
    assert SharpnessConfig().critical is False
    for key, value in (("critical_tol", 0.0), ("critical_tol", 1.0), ("critical_max_passes", 2)):
        with pytest.raises(ConfigError, match=f"sharpness.{key}"):
            run_config({"sharpness": {key: value}})


# --- the tiny U-Net, in a training run -------------------------------------------------------


def _dense_scan_eta_c(loss, params, direction, hi, n=300):
    """The first η on a grid of n points in (0, hi] at which the loss exceeds L(θ)."""
    theta = [p.detach().clone() for p in params]
    with torch.no_grad():
        base = float(loss())
        try:
            for i in range(1, n + 1):
                eta = hi * i / n
                for p, t, d in zip(params, theta, direction):
                    p.copy_(t - eta * d)
                if not float(loss()) <= base:
                    return eta
        finally:
            for p, t in zip(params, theta):
                p.copy_(t)
    return None


@pytest.mark.parametrize("optimizer, lr", [("adam", 1e-3), ("gd", 0.05)])
def test_tiny_unet_logged_value_matches_a_dense_scan_along_the_step(optimizer, lr):
    """In training steps of the tiny U-Net the probe's 2/η_c matches 2/η of a
    dense scan of the Hessian-batch loss along the update (taken from a deep
    copy of model and optimizer, stepped by the optimizer itself); training
    is bit-identical with the option on and off."""
    from trainers.run.loop import Trainer, train_step

    sharp = {"every": 1, "hessian_batch": 4, "max_iters": 10, "tol": 0.05}
    tol = 0.01
    runs = [Trainer(run_config(tiny_config(sharpness={**sharp, **extra}, optim={"name": optimizer, "lr": lr},
                                           train={"steps": 3})))
            for extra in ({"critical": True, "critical_tol": tol, "critical_max_passes": 30}, {})]
    trainer = runs[0]
    probe = trainer.probing.probe
    seen = []
    measure = probe.measure

    def spy(model, loss_fn, optimizer_, lr_, *args, grads=None, **kw):
        cols = measure(model, loss_fn, optimizer_, lr_, *args, grads=grads, **kw)
        params = [p for p in model.parameters() if p.requires_grad]
        twin_model, twin_opt = copy.deepcopy((model, optimizer_))
        for q, g in zip(twin_model.parameters(), grads):
            q.grad = g.clone()
        twin_opt.step()
        direction = [(p.detach() - q.detach()) / lr_ for p, q in zip(params, twin_model.parameters())]
        hi = 1.5 * 2 / cols["lambda_critical"]
        seen.append((cols, _dense_scan_eta_c(loss_fn, params, direction, hi), hi / 300))
        return cols
    probe.measure = spy
    for _ in range(2):
        for run in runs:
            train_step(run)
    for p, q in zip(*(run.model.parameters() for run in runs)):
        assert torch.equal(p, q)
    for cols, eta_scan, spacing in seen:
        assert eta_scan is not None and cols["critical_passes"] <= 30
        eta_logged = 2 / cols["lambda_critical"]
        assert abs(eta_logged - eta_scan) <= CriticalResult.relative_error(tol) * eta_scan + spacing
        assert math.isfinite(cols["lambda_dir"])


# --- CUDA ---------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_probe_matches_the_closed_form_and_restores_the_parameters():
    """On the GPU (CUDA-graph products, TF32 search where the GPU has it) the
    logged 2/η_c and λ_dir of an Adam step on a float32 quadratic match the
    closed form of the optimizer's own step; parameters and state unchanged."""
    model, A = _quadratic(seed=12)
    model = model.float().cuda()
    A = A.float().cuda()
    ocfg = OptimConfig(name="adam", lr=1e-2)
    opt, delta = _trained_and_coming_step(model, ocfg, 3)
    delta = delta.double()
    Ad = A.double()
    expected = float(delta @ Ad @ delta / (delta @ Ad @ model.theta.detach().double()))
    theta, state = model.theta.detach().clone(), copy.deepcopy(opt.state_dict())
    cfg = SharpnessConfig(critical=True, critical_tol=1e-3, critical_max_passes=40)
    cols = SharpnessProbe(cfg, ocfg).measure(model, model.loss, opt, ocfg.lr, grads=[model.theta.grad])
    assert cols["lambda_critical"] == pytest.approx(expected, rel=CriticalResult.relative_error(1e-3) + 1e-3)
    assert cols["lambda_dir"] == pytest.approx(expected, rel=1e-3)
    assert torch.equal(model.theta.detach(), theta) and _same_state(opt.state_dict(), state)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_tiny_unet_training_is_unchanged_and_the_value_is_finite(cuda_deterministic):
    from trainers.run.loop import Trainer, train_step

    sharp = {"every": 1, "hessian_batch": 4, "max_iters": 10, "tol": 0.05}
    runs = [Trainer(run_config(tiny_config(sharpness={**sharp, **extra}, train={"steps": 3, "device": "cuda"})))
            for extra in ({"critical": True}, {})]
    rows = []
    for _ in range(3):
        for run in runs:
            row, _ = train_step(run)
            if run is runs[0]:
                rows.append(row)
    for p, q in zip(*(run.model.parameters() for run in runs)):   # deterministic kernels: the same parameters
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-8)
    for row in rows:
        assert math.isfinite(row["lambda_critical"]) and math.isfinite(row["lambda_dir"])
        assert row["critical_passes"] <= 16
