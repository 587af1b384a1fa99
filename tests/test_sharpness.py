"""The sharpness probe against dense Hessians and hand-simulated quadratics."""
import copy

import pytest
import torch

from curvature_fixtures import (BiasedTF32, unet_blocks_problem, MLP, Quadratic, TinyUNetLike, dense_gradient, dense_hessian, randomize,
                                symmetric_with_spectrum, top_eigenvalues)
from trainers.config import OptimConfig, SharpnessConfig
from trainers.run.optimizers import build_optimizer
from trainers.curvature.probe import COLUMNS, SharpnessProbe, batch_sharpness
from trainers.run.steplog import COLUMNS as LOG_COLUMNS
from trainers.diffusion.variants import VARIANTS

TIGHT = dict(tol=1e-8, max_iters=500)


def _mlp(seed=0, n=24):
    torch.manual_seed(seed)
    model = randomize(MLP().double(), std=0.6, seed=seed)
    x, y = torch.randn(n, 3, dtype=torch.float64), torch.randn(n, 2, dtype=torch.float64)
    return model, (lambda: ((model(x) - y) ** 2).mean())


def _quadratic(eigenvalues, seed=0):
    A = symmetric_with_spectrum(eigenvalues, seed=seed)
    theta0 = torch.randn(len(eigenvalues), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    model = Quadratic(A, theta0)
    return model, model.loss


def test_columns_are_step_log_columns():
    assert set(COLUMNS) <= set(LOG_COLUMNS)


def test_gd_lambda_and_top3_match_dense_on_unet_blocks():
    model, loss = unet_blocks_problem()
    true = top_eigenvalues(dense_hessian(model, loss), 3)
    ocfg = OptimConfig(name="gd", lr=0.01)
    probe = SharpnessProbe(SharpnessConfig(block_size=4, topk=3, **TIGHT), ocfg)
    cols = probe.measure(model, loss, build_optimizer(ocfg, model.parameters()), 0.01)
    assert abs(cols["lambda_max"] - true[0]) <= 1e-5 * true[0]
    torch.testing.assert_close(torch.tensor(cols["topk"], dtype=torch.float64), true, rtol=1e-5, atol=0)
    assert "threshold" not in cols   # the run writes the threshold column (trainers.run.probing)
    assert cols["ratio"] == pytest.approx(cols["lambda_max"] / 200.0)
    assert cols["lambda_precond"] is None
    assert cols["eig_converged"] and cols["eig_residual"] <= 1e-8
    assert cols["eig_hvps"] >= 4 and cols["eig_iters"] >= 1


@pytest.mark.parametrize("spectrum", [
    [10.0, 10.0 * (1 - 1e-7), 7.0] + [1.0 + 0.1 * i for i in range(30)],       # nearly equal top two
    [10.0, 8.0, 7.0] + [1.0 + 0.1 * i for i in range(30)] + [-500.0],          # large negative eigenvalue
])
def test_hard_spectra_on_a_quadratic(spectrum):
    model, loss = _quadratic(spectrum, seed=3)
    ocfg = OptimConfig(name="momentum", lr=0.05, momentum=0.9)
    probe = SharpnessProbe(SharpnessConfig(block_size=4, topk=3, **TIGHT), ocfg)
    cols = probe.measure(model, loss, build_optimizer(ocfg, model.parameters()), 0.05)
    top3 = torch.tensor(sorted(spectrum, reverse=True)[:3], dtype=torch.float64)
    torch.testing.assert_close(torch.tensor(cols["topk"], dtype=torch.float64), top3, rtol=1e-5, atol=0)
    assert cols["ratio"] == pytest.approx(cols["lambda_max"] / ((2 + 2 * 0.9) / 0.05))


def _adam_steps(model, loss, ocfg, steps):
    """Run ``steps`` Adam steps and, independently of the optimizer, the
    second-moment recursion v ← β₂v + (1−β₂)g² on the same gradients;
    returns the optimizer and the hand-made P = √(v/(1−β₂ᵗ)) + ε."""
    opt = build_optimizer(ocfg, model.parameters())
    b2 = ocfg.betas[1]
    v = None
    for _ in range(steps):
        g = dense_gradient(model, loss)
        v = (1 - b2) * g ** 2 if v is None else b2 * v + (1 - b2) * g ** 2
        opt.zero_grad()
        loss().backward()
        opt.step()
    P = (v / (1 - b2 ** steps)).sqrt() + ocfg.eps
    return opt, P


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_preconditioned_lambda_matches_dense(name):
    model, loss = _mlp(seed=4)
    ocfg = OptimConfig(name=name, lr=1e-2, eps=1e-3, weight_decay=0.01 if name == "adamw" else 0.0)
    opt, P = _adam_steps(model, loss, ocfg, steps=5)
    H = dense_hessian(model, loss)
    # eigenvalues of the non-symmetric P⁻¹H directly (not through the symmetric form)
    pre = torch.linalg.eigvals(H / P[:, None]).real.sort(descending=True).values[:3]
    plain = top_eigenvalues(H, 3)
    probe = SharpnessProbe(SharpnessConfig(block_size=4, topk=3, adam_preconditioner="init2winit", **TIGHT), ocfg)
    before = {k: [t.clone() for t in s.values() if torch.is_tensor(t)] for k, s in enumerate(opt.state.values())}
    cols = probe.measure(model, loss, opt, 1e-2)
    assert abs(cols["lambda_precond"] - pre[0]) <= 1e-5 * pre[0]
    torch.testing.assert_close(torch.tensor(cols["topk"], dtype=torch.float64), pre, rtol=1e-5, atol=0)
    assert abs(cols["lambda_max"] - plain[0]) <= 1e-5 * plain[0]
    threshold = (2 + 2 * 0.9) / ((1 - 0.9) * 1e-2)
    assert cols["ratio"] == pytest.approx(cols["lambda_precond"] / threshold)
    after = {k: [t for t in s.values() if torch.is_tensor(t)] for k, s in enumerate(opt.state.values())}
    assert all(torch.equal(a, b) for k in before for a, b in zip(before[k], after[k]))


def test_adam_before_first_step_and_options():
    model, loss = _mlp(seed=5)
    ocfg = OptimConfig(name="adam", lr=1e-3)
    opt = build_optimizer(ocfg, model.parameters())
    cols = SharpnessProbe(SharpnessConfig(adam_preconditioner="init2winit", **TIGHT), ocfg).measure(
        model, loss, opt, 1e-3)
    assert cols["lambda_precond"] is None and cols["ratio"] is None
    assert cols["lambda_max"] == pytest.approx(float(top_eigenvalues(dense_hessian(model, loss), 1)[0]), rel=1e-6)
    assert cols["topk"] == [cols["lambda_max"]]

    opt, _ = _adam_steps(model, loss, ocfg, steps=2)
    no_plain = SharpnessProbe(SharpnessConfig(plain_lambda=False, adam_preconditioner="init2winit", **TIGHT),
                              ocfg).measure(model, loss, opt, 1e-3)
    assert no_plain["lambda_max"] is None and no_plain["lambda_precond"] is not None
    unpre = SharpnessProbe(SharpnessConfig(precondition="none", **TIGHT), ocfg).measure(model, loss, opt, 1e-3)
    assert unpre["lambda_precond"] is None
    assert unpre["ratio"] == pytest.approx(unpre["lambda_max"] / ((2 + 2 * 0.9) / ((1 - 0.9) * 1e-3)))


# --- the ratio predicts stability: quadratics trained for real ------------------

SPECTRUM = [4.0, 2.5, 1.0, 0.5, 0.2]


def _train(model, loss, opt, steps):
    for _ in range(steps):
        opt.zero_grad()
        loss().backward()
        opt.step()
    return float(loss().detach().abs())


@pytest.mark.parametrize("factor, diverges", [(1.03, True), (0.97, False)])
def test_gd_on_a_quadratic_diverges_exactly_when_the_ratio_exceeds_one(factor, diverges):
    model, loss = _quadratic(SPECTRUM, seed=6)
    lr = factor * 2.0 / SPECTRUM[0]
    ocfg = OptimConfig(name="gd", lr=lr)
    opt = build_optimizer(ocfg, model.parameters())
    cols = SharpnessProbe(SharpnessConfig(tol=1e-6), ocfg).measure(model, loss, opt, lr)
    start = float(loss().detach().abs())
    final = _train(model, loss, opt, 400)
    assert (cols["ratio"] > 1) == diverges
    assert cols["ratio"] == pytest.approx(factor, rel=1e-6)
    assert (final > 1e3 * start) if diverges else (final < 1e-3 * start)


def _heavy_ball_1d(curvature, lr, beta, steps=600):
    """v ← βv + λθ, θ ← θ − ηv from θ = 1, by hand."""
    theta, v = 1.0, 0.0
    for _ in range(steps):
        v = beta * v + curvature * theta
        theta = theta - lr * v
    return abs(theta)


def _adam_frozen_1d(curvature, p, lr, beta1, steps=600):
    """m ← β₁m + (1−β₁)λθ, θ ← θ − η m / p from θ = 1, by hand (frozen P)."""
    theta, m = 1.0, 0.0
    for _ in range(steps):
        m = beta1 * m + (1 - beta1) * curvature * theta
        theta = theta - lr * m / p
    return abs(theta)


@pytest.mark.parametrize("factor", [1.02, 0.98])
def test_heavy_ball_threshold_against_hand_simulation_and_probe(factor):
    lr, beta = 0.1, 0.9
    curvature = factor * (2 + 2 * beta) / lr
    assert (_heavy_ball_1d(curvature, lr, beta) > 1e3) == (factor > 1)
    assert (_heavy_ball_1d(curvature, lr, beta) < 1e-3) == (factor < 1)
    # the same quadratic (top curvature ``curvature``) trained with torch's SGD momentum
    model, loss = _quadratic([curvature] + [0.5 * curvature, 0.1 * curvature], seed=7)
    ocfg = OptimConfig(name="momentum", lr=lr, momentum=beta)
    opt = build_optimizer(ocfg, model.parameters())
    cols = SharpnessProbe(SharpnessConfig(tol=1e-6), ocfg).measure(model, loss, opt, lr)
    start = float(loss().detach().abs())
    final = _train(model, loss, opt, 600)
    assert cols["ratio"] == pytest.approx(factor, rel=1e-6)
    assert (final > 1e3 * start) == (factor > 1) and (final < 1e-3 * start) == (factor < 1)


@pytest.mark.parametrize("factor", [1.02, 0.98])
def test_adam_threshold_against_hand_simulation_of_frozen_preconditioner(factor):
    lr, beta1, p = 0.01, 0.9, 0.5
    top = factor * (2 + 2 * beta1) / ((1 - beta1) * lr) * p        # λ₁(P⁻¹H) = factor · threshold
    assert (_adam_frozen_1d(top, p, lr, beta1) > 1e3) == (factor > 1)
    assert (_adam_frozen_1d(top, p, lr, beta1) < 1e-3) == (factor < 1)
    # the probe reads P from a torch Adam state holding v̂ = (p − ε)²
    model, loss = _quadratic([top, 0.3 * top, 0.1 * top], seed=8)
    ocfg = OptimConfig(name="adam", lr=lr, betas=(beta1, 0.999))
    opt = build_optimizer(ocfg, model.parameters())
    _train(model, loss, opt, 1)
    state = opt.state[model.theta]
    step = 7
    state["step"] = torch.tensor(float(step))
    state["exp_avg_sq"] = torch.full_like(model.theta, (p - ocfg.eps) ** 2 * (1 - 0.999 ** step))
    cols = SharpnessProbe(SharpnessConfig(tol=1e-6, adam_preconditioner="init2winit"), ocfg).measure(
        model, loss, opt, lr)
    assert cols["lambda_precond"] == pytest.approx(top / p, rel=1e-6)
    assert cols["ratio"] == pytest.approx(factor, rel=1e-6)


# --- trace, batch sharpness -----------------------------------------------------


def test_hutchinson_trace_is_exact_for_a_diagonal_hessian():
    A = torch.diag(torch.tensor([3.0, -1.0, 2.5, 0.25], dtype=torch.float64))
    model = Quadratic(A, torch.ones(4, dtype=torch.float64))
    ocfg = OptimConfig(name="gd", lr=0.1)
    cols = SharpnessProbe(SharpnessConfig(trace_samples=3), ocfg).measure(
        model, model.loss, build_optimizer(ocfg, model.parameters()), 0.1)
    assert cols["hessian_trace"] == pytest.approx(4.75, rel=1e-12)


def test_hutchinson_trace_is_unbiased_on_an_mlp():
    model, loss = _mlp(seed=9)
    H = dense_hessian(model, loss)
    s = 400
    se = (2 * (H.square().sum() - H.diagonal().square().sum()) / s).sqrt()
    ocfg = OptimConfig(name="gd", lr=0.1)
    cols = SharpnessProbe(SharpnessConfig(trace_samples=s), ocfg).measure(
        model, loss, build_optimizer(ocfg, model.parameters()), 0.1)
    assert abs(cols["hessian_trace"] - float(H.trace())) < 5 * float(se)
    off = SharpnessProbe(SharpnessConfig(), ocfg).measure(model, loss, build_optimizer(ocfg, model.parameters()), 0.1)
    assert off["hessian_trace"] is None and off["batch_sharpness"] is None


def test_batch_sharpness_matches_dense():
    model, frozen = _mlp(seed=10)
    xb, yb = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    batch = lambda: ((model(xb) - yb) ** 2).mean()  # noqa: E731
    H, g = dense_hessian(model, batch), dense_gradient(model, batch)
    expected = float(g @ H @ g / (g @ g))
    params = [p for p in model.parameters()]
    assert batch_sharpness(batch, params) == pytest.approx(expected, rel=1e-10)
    ocfg = OptimConfig(name="gd", lr=0.1)
    cols = SharpnessProbe(SharpnessConfig(batch_sharpness=True), ocfg).measure(
        model, frozen, build_optimizer(ocfg, model.parameters()), 0.1, batch)
    assert cols["step_sharpness"] == pytest.approx(expected, rel=1e-10)


# --- warm start, resume, side effects ------------------------------------------------


def test_warm_start_needs_fewer_products_while_training_slowly():
    totals = {}
    for warm in (True, False):
        model, loss = _mlp(seed=11)
        ocfg = OptimConfig(name="gd", lr=1e-3)
        opt = build_optimizer(ocfg, model.parameters())
        probe = SharpnessProbe(SharpnessConfig(warm_start=warm, tol=1e-6, max_iters=300), ocfg)
        hvps = []
        for _ in range(6):
            hvps.append(probe.measure(model, loss, opt, 1e-3)["eig_hvps"])
            _train(model, loss, opt, 1)
        totals[warm] = sum(hvps[1:])
    assert totals[True] < 0.75 * totals[False]


@pytest.mark.parametrize("hvp", ["forward_over_reverse", "forward_over_reverse_vmap", "double_backward_batched"])
def test_hvp_setting_selects_the_product_and_gives_the_same_lambda(hvp):
    model, loss = unet_blocks_problem()
    true = top_eigenvalues(dense_hessian(model, loss), 1)[0]
    ocfg = OptimConfig(name="gd", lr=0.01)
    probe = SharpnessProbe(SharpnessConfig(hvp=hvp, **TIGHT), ocfg)
    assert probe.method == hvp
    cols = probe.measure(model, loss, build_optimizer(ocfg, model.parameters()), 0.01)
    assert abs(cols["lambda_max"] - true) <= 1e-5 * true


def test_warm_start_follows_the_changing_preconditioner():
    """H = 100 hhᵀ + small: the top eigenvector of P^{-1/2}HP^{-1/2} is ∝ P^{-1/2}h,
    so when Adam's v̂ changes, the transported start (D_new/D_old)·y is already
    (nearly) the new eigenvector, while the plain previous vector is not."""
    n = 40
    g = torch.Generator().manual_seed(21)
    h = torch.randn(n, generator=g, dtype=torch.float64)
    A = 100.0 * torch.outer(h, h) / (h @ h) + torch.diag(torch.linspace(0.01, 0.1, n, dtype=torch.float64))
    ocfg = OptimConfig(name="adam", lr=1e-3)
    cfg = SharpnessConfig(tol=1e-6, max_iters=300, plain_lambda=False, adam_preconditioner="init2winit")
    results = {}
    for transport in (True, False):
        model = Quadratic(A, torch.randn(n, generator=torch.Generator().manual_seed(22), dtype=torch.float64))
        opt = build_optimizer(ocfg, model.parameters())
        _train(model, model.loss, opt, 1)
        state = opt.state[model.theta]
        state["exp_avg_sq"].copy_(torch.linspace(1.0, 2.0, n, dtype=torch.float64))
        probe = SharpnessProbe(cfg, ocfg)
        probe.measure(model, model.loss, opt, 1e-3)
        state["exp_avg_sq"].copy_(torch.linspace(4.0, 0.5, n, dtype=torch.float64))   # P changes a lot
        if not transport:
            probe.warm_scale = None
        results[transport] = probe.measure(model, model.loss, opt, 1e-3)
    P = (torch.linspace(4.0, 0.5, n, dtype=torch.float64) / (1 - 0.999)).sqrt() + 1e-8
    d = P.rsqrt()
    true = torch.linalg.eigvalsh(d[:, None] * A * d[None, :])[-1]
    for cols in results.values():
        assert cols["lambda_precond"] == pytest.approx(float(true), rel=1e-9)
    assert results[True]["eig_hvps"] < results[False]["eig_hvps"]
    assert results[True]["eig_iters"] <= 2


def test_resumed_probe_continues_identically():
    model, loss = _mlp(seed=12)
    ocfg = OptimConfig(name="adam", lr=1e-2)
    opt = build_optimizer(ocfg, model.parameters())
    cfg = SharpnessConfig(tol=1e-4, trace_samples=2)
    probe = SharpnessProbe(cfg, ocfg, seed=3)
    rows, saved = [], None
    snapshots = []
    for step in range(4):
        snapshots.append((copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())))
        rows.append(probe.measure(model, loss, opt, 1e-2))
        if step == 1:
            saved = copy.deepcopy(probe.state_dict())
        _train(model, loss, opt, 1)
    assert all(v.device.type == "cpu" for v in saved["warm"].values())
    resumed = SharpnessProbe(cfg, ocfg, seed=999)
    resumed.load_state_dict(saved)
    for step in (2, 3):
        model.load_state_dict(snapshots[step][0])
        opt.load_state_dict(snapshots[step][1])
        assert resumed.measure(model, loss, opt, 1e-2) == rows[step]


def test_probe_does_not_disturb_training():
    model, loss = _mlp(seed=13)
    ocfg = OptimConfig(name="adam", lr=1e-2)
    opt = build_optimizer(ocfg, model.parameters())
    _train(model, loss, opt, 2)
    loss().backward()        # a pending gradient (the loop may hold one)
    params = list(model.parameters())
    params[0].grad = None    # and a parameter without one
    before = [p.detach().clone() for p in params]
    grads = [None if p.grad is None else p.grad.clone() for p in params]
    rng = torch.get_rng_state()
    tf32 = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    SharpnessProbe(SharpnessConfig(trace_samples=2, batch_sharpness=True), ocfg).measure(model, loss, opt, 1e-2, loss)
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert params[0].grad is None
    assert all(torch.equal(p.grad, g) for p, g in zip(params[1:], grads[1:]))
    assert torch.equal(torch.get_rng_state(), rng)
    assert (torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()) == tf32


def test_warm_state_of_another_model_is_refused():
    model, loss = _mlp(seed=14)
    ocfg = OptimConfig(name="gd", lr=0.1)
    probe = SharpnessProbe(SharpnessConfig(), ocfg)
    probe.load_state_dict({"warm": {"plain": torch.zeros(5, 2, dtype=torch.float64)}})
    with pytest.raises(ValueError, match="trainable parameters"):
        probe.measure(model, loss, build_optimizer(ocfg, model.parameters()), 0.1)


@pytest.mark.parametrize("tol", [1e-8, 1e-2])
def test_tf32_search_is_checked_in_float32(monkeypatch, tol):
    """The TF32 search path (forced on here: the CPU has no TF32, so its
    products are exact) reports λ to the same accuracy as float32 products,
    and its HVP count includes the float32 check."""
    import trainers.curvature.probe as sharpness

    model, loss = unet_blocks_problem()
    true = top_eigenvalues(dense_hessian(model, loss), 1)[0]
    ocfg = OptimConfig(name="gd", lr=0.01)
    opt = build_optimizer(ocfg, model.parameters())
    assert not sharpness.has_tf32("cpu")
    cols = {}
    for precision, forced in (("float32", False), ("tf32", False), ("tf32", True)):
        monkeypatch.setattr(sharpness, "has_tf32", lambda device, forced=forced: forced)
        probe = SharpnessProbe(SharpnessConfig(tol=tol, max_iters=500, search_precision=precision), ocfg)
        cols[precision, forced] = probe.measure(model, loss, opt, 0.01)
    # without TF32 hardware the setting changes nothing
    assert cols["tf32", False] == cols["float32", False]
    forced = cols["tf32", True]
    assert forced["eig_residual"] <= tol
    assert abs(forced["lambda_max"] - true) <= max(10 * tol ** 2, 1e-9) * true
    if tol >= sharpness.TF32_SEARCH_TOL:   # the search reaches tol itself: one more product, the check
        assert forced["eig_hvps"] == cols["float32", False]["eig_hvps"] + 1


class _BiasedProbe(SharpnessProbe):
    """The probe on :class:`curvature_fixtures.BiasedTF32` operators."""

    def __init__(self, *args, factor: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.factor = factor

    def hessian(self, loss_fn, params, model):
        return BiasedTF32(super().hessian(loss_fn, params, model), self.factor)


def test_unchecked_tf32_probes_are_corrected_by_the_last_float32_check(monkeypatch):
    """With ``verify_every`` 3, probes 0, 3, 6 are checked with float32
    products (eig_check ≈ the TF32 products' 0.4 % bias) and the others
    report the TF32 λ₁ times the last check's λ_float32/λ_TF32: every probe's
    λ₁ is within 1e-4 of the dense Hessian's, where the TF32 value alone is
    0.4 % off.  The correction survives a state_dict round trip (a resume)."""
    import trainers.curvature.probe as sharpness

    monkeypatch.setattr(sharpness, "has_tf32", lambda device: True)
    model, loss = _mlp(seed=3)
    ocfg = OptimConfig(name="gd", lr=0.05)
    opt = build_optimizer(ocfg, model.parameters())
    factor = 1 - 4e-3
    cfg = SharpnessConfig(verify_every=3, tol=1e-3)
    probe = _BiasedProbe(cfg, ocfg, factor=factor)
    for step in range(8):
        if step == 5:   # a resumed run: a new probe from the saved state
            state = probe.state_dict()
            probe = _BiasedProbe(cfg, ocfg, factor=factor)
            probe.load_state_dict(state)
        true = float(top_eigenvalues(dense_hessian(model, loss), 1)[0])
        cols = probe.measure(model, loss, opt, 0.05)
        assert (cols["eig_check"] is not None) == (step % 3 == 0), step
        if cols["eig_check"] is not None:
            assert abs(cols["eig_check"] - (1 / factor - 1) * factor) < 2e-4, cols["eig_check"]
        else:
            assert abs(probe.tf32_offset["plain"] - (1 / factor - 1)) < 2e-4
        assert abs(cols["lambda_max"] - true) <= 1e-4 * true, (step, cols["lambda_max"], true)
        assert abs(cols["topk"][0] - cols["lambda_max"]) <= 1e-12 * true
        opt.zero_grad()
        loss().backward()
        opt.step()


def test_a_check_that_iterated_in_float32_leaves_the_offset():
    """A float32 check that had to iterate (its vectors are no longer the
    search's) measures the solve as well as the TF32 bias: its check is
    logged, the offset kept from before."""
    from trainers.curvature.lobpcg import LOBPCGResult

    probe = SharpnessProbe(SharpnessConfig(), OptimConfig(name="gd", lr=0.1))
    probe.tf32_offset["plain"] = 1e-3
    def result(products, fast, search):
        return LOBPCGResult(eigenvalues=torch.tensor([2.0, 1.0], dtype=torch.float64), vectors=torch.eye(3, 2),
                            residuals=torch.zeros(2, dtype=torch.float64), iterations=1, products=products,
                            converged=True, fast_products=fast,
                            search_eigenvalues=None if search is None else torch.tensor([1.9, 1.0]))
    res, check = probe._calibrated("plain", result(8, 5, 1.9), nwanted=1)   # 3 float32 products: it iterated
    assert check == pytest.approx(0.05) and probe.tf32_offset["plain"] == 1e-3
    res, check = probe._calibrated("plain", result(6, 5, 1.9), nwanted=1)   # one: the same vector's float32 RQ
    assert check == pytest.approx(0.05) and probe.tf32_offset["plain"] == pytest.approx(2.0 / 1.9 - 1)
    res, check = probe._calibrated("plain", result(5, 0, None), nwanted=1)   # not checked: corrected
    assert check is None and res.eigenvalues.tolist() == pytest.approx([2.0 * 2.0 / 1.9, 1.0 * 2.0 / 1.9])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TF32 products need a GPU")
def test_unchecked_tf32_probes_give_the_float32_checked_lambda_on_the_gpu():
    """On a GPU with TF32 and the defaults users get (resident CUDA-graph
    products, the ``track`` solver), probes between float32 checks
    (``verify_every`` 4) report λ₁ within 1e-4 of a probe that checks every
    time (``verify_every`` 1) at the same parameters, along a GD run."""
    import trainers.curvature.probe as sharpness
    from curvature_fixtures import cuda_tiny_unet

    if not sharpness.has_tf32("cuda"):
        pytest.skip("this GPU has no TF32")
    model, _, loss = cuda_tiny_unet()
    ocfg = OptimConfig(name="gd", lr=2e-3)
    opt = build_optimizer(ocfg, model.parameters())
    always, between = (SharpnessProbe(SharpnessConfig(verify_every=v, tol=1e-3), ocfg) for v in (1, 4))
    unchecked = []
    try:
        for step in range(9):
            a = always.measure(model, loss, opt, ocfg.lr)
            b = between.measure(model, loss, opt, ocfg.lr)
            assert a["eig_check"] is not None and (b["eig_check"] is not None) == (step % 4 == 0)
            if b["eig_check"] is None:
                err = abs(b["lambda_max"] - a["lambda_max"]) / a["lambda_max"]
                raw = b["lambda_max"] / (1 + between.tf32_offset["plain"])
                unchecked.append((err, abs(raw - a["lambda_max"]) / a["lambda_max"]))
                assert err <= 1e-4, (step, b["lambda_max"], a["lambda_max"], between.tf32_offset)
            opt.zero_grad()
            loss().backward()
            opt.step()
    finally:
        always.close()
        between.close()
    assert len(unchecked) == 6
    print("unchecked probes: (error, error of the uncorrected TF32 value)", unchecked)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cuda_graph_probe_matches_the_plain_probe_in_training(variant, tmp_path, cuda_deterministic):
    """Every variant's probe with CUDA-graph products, inside the training
    loop (whose previous step's autograd graph is still referenced, and whose
    dropout draws from the CUDA generator), logs what the plain probe logs
    and leaves the training trajectory bit-for-bit unchanged.

    Each probe is a cold LOBPCG solve from the probe's own seeded start block
    to a tight tolerance, so both runs converge to the same eigenpair and
    their λ differ only by the products' rounding.  Both runs use
    deterministic CUDA kernels (``cuda_deterministic``): with the default
    ones two identical runs' λ₁(P⁻¹H) differed by 0.2–4 % at Adam's step 2 on
    an H200 (``snr``, ``adap_s``, ``stf``), the trajectories' rounding
    amplified by the opening steps' tiny √v̂, whichever products the probe
    used.  How close warm solves come to a tight reference is measured by
    ``bench/probe_overhead.py``."""
    from trainers.run.loop import train
    from trainers.run.steplog import read_steps

    logs = {}
    for graphs in (False, True):
        cfg = {"model": {"preset": "tiny", "dropout": 0.1}, "variant": {"name": variant},
               "data": {"name": "synthetic", "image_size": 16, "batch_size": 8},
               "optim": {"name": "adam", "lr": 1e-3},
               "sharpness": {"every": 1, "hessian_batch": 8, "cuda_graphs": graphs, "warm_start": False,
                             "solver": "lobpcg", "tol": 1e-4, "accuracy": 1e-6, "max_iters": 300},
               "train": {"steps": 4, "device": "cuda", "print_every": 0}}
        train(cfg, tmp_path / str(graphs), resume=False)
        logs[graphs] = read_steps(tmp_path / str(graphs) / "steps")
    plain, graphed = logs[False], logs[True]
    # the same dropout masks (a disturbed CUDA generator would change them): the
    # same losses up to the GPU's non-deterministic reductions
    torch.testing.assert_close(torch.tensor(graphed["loss"].to_numpy()), torch.tensor(plain["loss"].to_numpy()),
                               rtol=1e-5, atol=0)
    for col in ("lambda_precond", "lambda_max"):
        torch.testing.assert_close(torch.tensor(graphed[col].to_numpy()), torch.tensor(plain[col].to_numpy()),
                                   rtol=2e-3, atol=0, equal_nan=True)  # no λ₁(P⁻¹H) before Adam's first step
