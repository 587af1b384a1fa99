import math

import pytest
import torch

from trainers.config import OptimConfig
from trainers.curvature.thresholds import adam_threshold, gd_threshold, momentum_threshold, stability_threshold
from trainers.run.optimizers import build_optimizer


def test_threshold_formulas():
    assert gd_threshold(0.01) == pytest.approx(200.0)
    assert momentum_threshold(0.01, 0.9) == pytest.approx(380.0)
    assert adam_threshold(1e-3, 0.9) == pytest.approx(38 / 1e-3)
    assert stability_threshold(OptimConfig(name="adamw", lr=2e-4)) == pytest.approx(38 / 2e-4)


def _run_quadratic(cfg: OptimConfig, curvature: float, steps: int = 400) -> float:
    """|x| after training f(x) = curvature/2 · x² with the real torch optimizer."""
    x = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    opt = build_optimizer(cfg, [x])
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * curvature * x ** 2).sum().backward()
        opt.step()
    return abs(float(x.detach()))


@pytest.mark.parametrize("cfg", [OptimConfig(name="gd", lr=0.01), OptimConfig(name="momentum", lr=0.01, momentum=0.9)])
def test_threshold_separates_convergence_from_divergence(cfg):
    # An independent check: the optimizer, run on a 1-D quadratic, converges
    # just below its threshold curvature and diverges just above it.
    thr = stability_threshold(cfg)
    assert _run_quadratic(cfg, 0.97 * thr) < 1e-3
    assert _run_quadratic(cfg, 1.03 * thr) > 1e3


def test_adam_threshold_on_a_frozen_preconditioner():
    # Adam with a frozen preconditioner P is heavy-ball-like EMA momentum on P⁻¹H:
    # m ← β₁m + (1-β₁)g, x ← x − η m/P.  Simulate that recursion by hand.
    lr, beta1, p = 1e-2, 0.9, 2.0
    thr = adam_threshold(lr, beta1)

    def run(eig_of_pinv_h):
        h = eig_of_pinv_h * p
        x, m = 1.0, 0.0
        for _ in range(2000):
            m = beta1 * m + (1 - beta1) * h * x
            x -= lr * m / p
        return abs(x)

    assert run(0.97 * thr) < 1e-3
    assert run(1.03 * thr) > 1e3


def test_build_optimizer_kinds():
    p = [torch.nn.Parameter(torch.zeros(2))]
    assert isinstance(build_optimizer(OptimConfig(name="gd", lr=0.1), p), torch.optim.SGD)
    assert build_optimizer(OptimConfig(name="momentum", lr=0.1, momentum=0.5), p).param_groups[0]["momentum"] == 0.5
    assert isinstance(build_optimizer(OptimConfig(name="adamw", lr=0.1), p), torch.optim.AdamW)
