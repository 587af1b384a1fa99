"""The resident Hessian operator (``sharpness.resident``): kept from one probe
to the next, refreshed at the parameters' new values, its products those of
an operator made anew (trainers.curvature.hessian, "Resident").

On the CPU residency is off (no CUDA graphs); these tests check what the
probe and the training loop do around it — which operator is kept, when it
is closed, that the loss closure stays the same within one objective — and,
on a GPU, that a refreshed resident operator's products and a training run's
λ₁ equal those of the per-probe operator."""
import pytest
import torch

from curvature_fixtures import MLP, cuda_tiny_unet, randomize, unet_blocks_problem
from trainers.config import OptimConfig, SharpnessConfig
from trainers.curvature.hessian import CurvatureOperator, DoubleBackwardHessian, flatten, trainable_parameters
from trainers.curvature.probe import SharpnessProbe
from trainers.diffusion.variants import VARIANTS
from trainers.diffusion.variants.base import Draw
from trainers.run.optimizers import build_optimizer


def _mlp(seed=0, n=24):
    torch.manual_seed(seed)
    model = randomize(MLP().double(), std=0.6, seed=seed)
    x, y = torch.randn(n, 3, dtype=torch.float64), torch.randn(n, 2, dtype=torch.float64)
    return model, (lambda: ((model(x) - y) ** 2).mean())


def _nudge(params, seed: int, scale: float = 0.05) -> None:
    """An optimizer-like in-place update of every parameter."""
    g = torch.Generator(params[0].device).manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype))


# --- the operator -------------------------------------------------------------


def test_residency_is_off_on_the_cpu_and_refresh_rebuilds_there():
    """On the CPU a ``resident`` operator is an ordinary one (nothing to
    record); its refresh drops the gradient graph, so the next products are
    those of the updated parameters, as from an operator made anew."""
    model, loss = unet_blocks_problem()
    params = trainable_parameters(model)
    n = sum(p.numel() for p in params)
    V = torch.randn(n, 2, dtype=params[0].dtype, generator=torch.Generator().manual_seed(1))
    with DoubleBackwardHessian(loss, params, model=model, cuda_graphs=True, resident=True) as op:
        assert not op.resident and not op.graphed
        before = op(V)
        _nudge(params, 2)
        assert op.refresh()
        after = op(V)
        with DoubleBackwardHessian(loss, params, model=model) as fresh:
            expected = fresh(V)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected, rtol=0, atol=0)


def test_operators_without_state_refresh_to_true():
    assert CurvatureOperator(3, torch.float64, torch.device("cpu")).refresh()
    assert not CurvatureOperator.resident


# --- the probe ----------------------------------------------------------------


class _Kept(CurvatureOperator):
    """A probe operator that says it is resident (the CPU has no resident
    operator), logging its refreshes and closes; ``moved[0]``: its refresh
    reports that the parameters moved."""

    resident = True

    def __init__(self, H, events: list, moved: list, fail: list):
        super().__init__(H.n, H.dtype, H.device)
        self.H, self.events, self.moved, self.fail = H, events, moved, fail

    def _matmat(self, V):
        if self.fail[0]:
            raise RuntimeError("the numerics failed")
        return self.H(V)

    def at(self, precision):
        return _Kept(self.H.at(precision), self.events, self.moved, self.fail)

    def gradient(self):
        return self.H.gradient()

    def loss(self):
        return self.H.loss()

    def refresh(self) -> bool:
        self.events.append(("refresh", id(self)))
        return not self.moved[0] and self.H.refresh()

    def close(self):
        self.events.append(("close", id(self)))
        self.H.close()


class _KeepingProbe(SharpnessProbe):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.events, self.moved, self.fail, self.made = [], [False], [False], []

    def hessian(self, loss_fn, params, model):
        H = _Kept(super().hessian(loss_fn, params, model), self.events, self.moved, self.fail)
        self.made.append(id(H))
        return H


def _adam_problem(seed=3):
    model, loss = _mlp(seed=seed)
    ocfg = OptimConfig(name="adam", lr=1e-2)
    opt = build_optimizer(ocfg, model.parameters())
    return model, loss, ocfg, opt


def _probed_step(probe, model, loss, opt, probed=None) -> dict:
    """One Adam step, the probe measuring ``probed`` (default: the training
    loss) before the update, with the gradients it reads, as the loop does."""
    opt.zero_grad()
    loss().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    try:
        return probe.measure(model, probed or loss, opt, 1e-2, grads=grads)
    finally:
        opt.step()


def test_the_probe_keeps_a_resident_operator_while_the_loss_is_the_same():
    """One operator for every probe of one loss closure, refreshed before
    each (after the optimizer's in-place updates), and the same λ as a probe
    that makes a new operator every time; a new closure, a moved parameter or
    a failed measurement closes it and a new one is made; ``close`` frees it."""
    model, loss, ocfg, opt = _adam_problem()
    twin = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = SharpnessConfig(tol=1e-8, max_iters=300)
    probe = _KeepingProbe(cfg, ocfg)
    rows = []
    for step in range(4):
        rows.append(_probed_step(probe, model, loss, opt))
    assert len(probe.made) == 1
    assert [e for e, _ in probe.events] == ["refresh"] * 3

    # the same trajectory with a plain probe (a new operator at every probe)
    model2, loss2, _, opt2 = _adam_problem()
    model2.load_state_dict(twin)
    plain = SharpnessProbe(cfg, ocfg)
    for step in range(4):
        expected = _probed_step(plain, model2, loss2, opt2)
        assert expected["lambda_precond"] is not None
        for col in ("lambda_max", "lambda_precond"):
            assert rows[step][col] == pytest.approx(expected[col], rel=1e-9)

    first = probe.made[0]
    other = lambda: loss()   # the same loss, another closure: not the same operator
    _probed_step(probe, model, loss, opt, other)
    assert probe.events[-1] == ("close", first) and len(probe.made) == 2
    probe.moved[0] = True
    _probed_step(probe, model, loss, opt, other)
    assert probe.events[-2:] == [("refresh", probe.made[1]), ("close", probe.made[1])] and len(probe.made) == 3

    probe.moved[0], probe.fail[0] = False, True
    with pytest.raises(RuntimeError, match="numerics"):
        _probed_step(probe, model, loss, opt, other)   # refreshed, then the solve raises: not kept
    assert probe.events[-2:] == [("refresh", probe.made[2]), ("close", probe.made[2])] and probe._kept is None
    probe.fail[0] = False
    _probed_step(probe, model, loss, opt)
    kept = probe.made[-1]
    probe.close()
    assert probe.events[-1] == ("close", kept) and probe._kept is None


def test_a_probe_that_is_not_resident_closes_its_operator_after_each_measurement():
    model, loss, ocfg, opt = _adam_problem()
    probe = SharpnessProbe(SharpnessConfig(), ocfg)
    closed = []
    made = probe.hessian

    def hessian(*args):
        H = made(*args)
        inner = H.close
        H.close = lambda: (closed.append(id(H)), inner())
        return H
    probe.hessian = hessian
    for _ in range(2):
        _probed_step(probe, model, loss, opt)
    assert len(closed) == 2 and probe._kept is None


# --- the loss closure of the training loop ----------------------------------


def _draw(seed: int, n: int = 4, weight: bool = False) -> Draw:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 3, 4, 4, generator=g)
    extra = {"weight": torch.rand(n, generator=g)} if weight else {}
    return Draw(x0, torch.randint(0, 10, (n,), generator=g), torch.randn(n, 3, 4, 4, generator=g),
                torch.randn(n, 3, 4, 4, generator=g), extra, {"pool": torch.randn(2, 3, generator=g), "k": 3})


class _Variant:
    def loss(self, model, d):
        w = d.extra.get("weight", torch.ones(len(d)))
        return w * ((model(d.x0) - d.noise) ** 2).flatten(1).mean(1) + d.shared["pool"].sum() * d.t.float()


def test_held_loss_is_one_closure_over_tensors_that_keep_their_addresses(tiny):
    """Within one objective the probe gets the same closure: a reweighted or
    redrawn batch of the same layout is copied into the tensors the closure
    reads (its loss is the new batch's), the caller's tensors are never
    written; another layout or model gets a new closure."""
    from trainers.config import run_config
    from trainers.run.probing import Probing

    probing = Probing(run_config(tiny(sharpness={"every": 1})), _Variant(), None, None, "cpu")
    model = torch.nn.Conv2d(3, 3, 1)
    loss_of = lambda d: _Variant().loss(model, d).mean()
    a, b = _draw(0, weight=True), _draw(1, weight=True)
    kept_a = [t.clone() for t in (a.x0, a.noise, a.extra["weight"])]
    fa = probing.held_loss(model, a)
    assert torch.equal(fa(), loss_of(a))
    addresses = [t.data_ptr() for t in (probing._held[1].x0, probing._held[1].extra["weight"])]
    fb = probing.held_loss(model, b)
    assert fb is fa and torch.equal(fb(), loss_of(b))
    assert [t.data_ptr() for t in (probing._held[1].x0, probing._held[1].extra["weight"])] == addresses
    assert all(torch.equal(t, k) for t, k in zip((a.x0, a.noise, a.extra["weight"]), kept_a))   # a untouched
    a.x0.add_(1.0)   # the caller's tensors are not the closure's
    assert torch.equal(fb(), loss_of(b))

    assert probing.held_loss(model, _draw(2, weight=False)) is not fb               # another field set
    assert probing.held_loss(model, _draw(3, n=5)) is not fb                        # another shape
    c = _draw(4)
    fc = probing.held_loss(model, c)
    d = _draw(5)
    d.shared["k"] = 4
    assert probing.held_loss(model, d) is not fc                                    # another non-tensor value
    e = probing.held_loss(model, d)
    assert probing.held_loss(torch.nn.Conv2d(3, 3, 1), d) is not e                  # another model
    probing.close()
    assert probing._held is None


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_probes_with_one_loss_closure_within_an_objective(variant, tiny, tmp_path, monkeypatch):
    """In the training loop each variant hands the probe one loss closure for
    all probes of one objective (``adap_s`` reweights, ``refresh_batch``
    redraws: copied in place), so that a resident operator is kept; the run
    logs the λ₁ it logs with a new closure at every probe."""
    from trainers.run.loop import train
    from trainers.run.probing import Probing
    from trainers.run.steplog import read_steps

    seen = []
    measure = SharpnessProbe.measure

    def spy(self, model, loss_fn, *args, **kwargs):
        seen.append(loss_fn)
        return measure(self, model, loss_fn, *args, **kwargs)
    monkeypatch.setattr(SharpnessProbe, "measure", spy)
    cfg = tiny(variant={"name": variant}, data={"batch_size": 8}, train={"steps": 3, "checkpoint_every": 100},
               sharpness={"every": 1, "hessian_batch": 8, "refresh_batch": True, "plain_lambda": False,
                          "max_iters": 20})   # short solves: the two runs are compared, not converged
    train(cfg, tmp_path / "held", resume=False)
    held = seen[:]
    assert len(held) == 3 and all(f is held[0] for f in held)

    seen.clear()
    monkeypatch.setattr(Probing, "held_loss", lambda self, model, draw: self.loss(model, draw))
    train(cfg, tmp_path / "fresh", resume=False)
    assert len({id(f) for f in seen}) == 3
    a, b = read_steps(tmp_path / "held" / "steps"), read_steps(tmp_path / "fresh" / "steps")
    assert a["lambda_precond"].notna().all()
    for col in ("loss", "lambda_precond"):
        assert a[col].fillna(-1).tolist() == b[col].fillna(-1).tolist()


# --- on a GPU -------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="resident operators need CUDA graphs")
def test_a_refreshed_resident_operator_gives_a_new_operators_products_on_the_gpu():
    """After in-place updates of every parameter, a resident operator's
    refresh (the first records the gradient graph, later ones replay it) gives
    the products of an operator made anew at the new parameters, in float32
    and TF32, with the products' CUDA graphs kept from the second refresh on;
    a parameter whose storage moved makes the refresh return False."""
    device = torch.device("cuda")
    model, params, loss = cuda_tiny_unet()
    n = sum(p.numel() for p in params)
    V = torch.randn(n, 3, device=device, generator=torch.Generator(device).manual_seed(0))
    op = DoubleBackwardHessian(loss, params, model=model, cuda_graphs=True, resident=True)
    tf32 = op.at("tf32")
    assert op.resident and op.graphed
    try:
        op(V), tf32(V)   # per-probe products first: eager graph, eager products, captures
        graphs = None
        for i in range(4):
            _nudge(params, 10 + i, scale=0.02)
            assert op.refresh()
            assert op._graph.build_graph is not None
            got = {"float32": op(V), "tf32": tf32(V)}
            grad, value = flatten(op.gradient()).clone(), op.loss().clone()
            captured = {k: v[0] for k, v in op._captured.items()}
            if i >= 1:   # kept from the first recorded refresh on
                assert captured == graphs
            graphs = captured
            assert op.replayed == ("float32", "tf32")
            for precision, out in got.items():
                with DoubleBackwardHessian(loss, params, model=model, precision=precision) as fresh:
                    expected = fresh(V)
                    expected_grad, expected_value = flatten(fresh.gradient()), fresh.loss()
                scale = expected.abs().max()
                atol = (1e-5 if precision == "float32" else 2e-2) * scale
                torch.testing.assert_close(out, expected, rtol=0, atol=atol)
            torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-5 * expected_grad.abs().max())
            torch.testing.assert_close(value, expected_value, rtol=1e-5, atol=0)
        moved = params[0]
        moved.data = moved.data.clone()
        assert not op.refresh()
    finally:
        op.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="resident operators need CUDA graphs")
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_resident_probe_matches_the_per_probe_operator_in_training_on_the_gpu(variant, tmp_path, monkeypatch,
                                                                              cuda_deterministic):
    """Every variant in the training loop on a GPU, warm probes as users get
    them: with ``sharpness.resident`` one operator serves every probe (made
    once) and the run logs the λ₁ of the run that makes one per probe, and the
    same training trajectory."""
    from trainers.run.loop import train
    from trainers.run.steplog import read_steps

    made = []
    hessian = SharpnessProbe.hessian

    def spy(self, *args):
        H = hessian(self, *args)
        made.append(H.resident)
        return H
    monkeypatch.setattr(SharpnessProbe, "hessian", spy)
    logs, counts = {}, {}
    for resident in (False, True):
        made.clear()
        cfg = {"model": {"preset": "tiny", "dropout": 0.1}, "variant": {"name": variant},
               "data": {"name": "synthetic", "image_size": 16, "batch_size": 8},
               "optim": {"name": "adam", "lr": 1e-3},
               "sharpness": {"every": 1, "hessian_batch": 8, "resident": resident, "tol": 1e-4, "accuracy": 1e-6,
                             "max_iters": 300},
               "train": {"steps": 6, "device": "cuda", "print_every": 0}}
        train(cfg, tmp_path / str(resident), resume=False)
        logs[resident] = read_steps(tmp_path / str(resident) / "steps")
        counts[resident] = list(made)
    assert counts[False] == [False] * 6
    assert counts[True] == [True]   # made once, refreshed at the five later probes
    plain, kept = logs[False], logs[True]
    torch.testing.assert_close(torch.tensor(kept["loss"].to_numpy()), torch.tensor(plain["loss"].to_numpy()),
                               rtol=1e-5, atol=0)
    for col in ("lambda_precond", "lambda_max"):
        torch.testing.assert_close(torch.tensor(kept[col].to_numpy()), torch.tensor(plain[col].to_numpy()),
                                   rtol=2e-3, atol=0, equal_nan=True)
