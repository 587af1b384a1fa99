"""The frozen Hessian batch is the objective the variant is training on now:
``pd``'s is redrawn in each new curriculum stage's range, ``adap_s``'s is a
fixed uniform-t draw weighted to the current sampler, and the step log says
when the batch changed (``hessian_batch_id``)."""
import copy
import math

import numpy as np
import pytest
import torch

from conftest import tiny_config
from curvature_fixtures import TinyDenoiser, randomize
from trainers.config import run_config
from trainers.run.loop import Trainer, train_step
from trainers.run.optimizers import build_optimizer

T = 1000   # the default schedule's timesteps


def _tiny_trainer(**sections):
    cfg = run_config(tiny_config(**{"data": {"image_size": 8, "channels": 1, "synthetic_size": 16, "batch_size": 8},
                                    "optim": {"name": "gd", "lr": 0.02},
                                    **sections}))
    trainer = Trainer(cfg)
    trainer.model = randomize(TinyDenoiser(), std=0.5, seed=3)
    trainer.ema = copy.deepcopy(trainer.model).eval().requires_grad_(False)
    trainer.params = list(trainer.model.parameters())
    trainer.optimizer = build_optimizer(cfg.optim, trainer.params)
    return trainer


def _pd_stage_range(stage, intervals=5):
    """[lo, T) of curriculum stage ``stage`` of N intervals: the top ``stage`` of
    [⌊(j−1)T/N⌋, ⌊jT/N⌋), j = 1..N (Kim et al. 2025), written out here."""
    return (intervals - stage) * T // intervals, T


PD = {"name": "pd", "options": {"intervals": 5, "pacing": "fixed", "stage_steps": 3}}


@pytest.mark.parametrize("deterministic", [False, True])
def test_pd_hessian_batch_follows_the_curriculum_stage(monkeypatch, deterministic):
    data = {"batching": "fixed"} if deterministic else {}
    trainer = _tiny_trainer(variant=PD, train={"fixed_noise": deterministic},
                            data={"image_size": 8, "channels": 1, "synthetic_size": 16, "batch_size": 8, **data},
                            sharpness={"every": 1, "hessian_batch": 6, "max_iters": 20})
    assert trainer.probing.deterministic_objective() == deterministic
    resets = []
    monkeypatch.setattr(trainer.probing.probe, "reset_warm_start", lambda: resets.append(trainer.step))
    rows = [train_step(trainer)[0] for _ in range(8)]
    # stages 1, 1, 1, 2, 2, 2, 3, 3: a new batch at steps 3 and 6, and the warm start dropped there
    assert [r["hessian_batch_id"] for r in rows] == [0, 0, 0, 1, 1, 1, 2, 2]
    assert resets == [3, 6]
    for step in (0, 4, 7):
        stage = 1 + step // 3
        lo, hi = _pd_stage_range(stage)
        t = trainer.probing.hessian_draw(step).t
        assert t.min() >= lo and t.max() < hi, (stage, t)
        if stage > 1:   # not stuck in the first stage's range
            assert t.min() < _pd_stage_range(1)[0]
        if deterministic:   # the objective's own draw: its first hessian_batch examples
            assert torch.equal(t, trainer.draws(step)[0].t[:6])
    # within a stage the batch is the same object (warm starts keep working)
    assert trainer.probing.hessian_draw(7) is trainer.probing.hessian_draw(8)


def test_pd_patience_stage_change_redraws_too():
    trainer = _tiny_trainer(variant={"name": "pd", "options": {"intervals": 4}},
                            sharpness={"every": 1, "hessian_batch": 6})
    h = trainer.probing.hessian_draw(0)
    assert h.t.min() >= 750 and trainer.probing.hessian_batch_id == 0
    trainer.variant.stage = 3   # what the patience rule does after τ observations without a new best
    h3 = trainer.probing.hessian_draw(1)
    assert trainer.probing.hessian_batch_id == 1 and h3.t.min() >= 250 and h3.t.min() < 750


def test_resumed_pd_run_logs_the_same_batches_and_lambdas():
    sections = dict(variant=PD, sharpness={"every": 1, "hessian_batch": 4, "max_iters": 20})
    straight = _tiny_trainer(**sections)
    want = [train_step(straight)[0] for _ in range(8)]
    first = _tiny_trainer(**sections)
    for _ in range(4):
        train_step(first)
    state = copy.deepcopy(first.state_dict())   # the checkpoint at step 4 (stage 2, batch 1)
    for _ in range(2):
        train_step(first)                       # ... and a crash at step 6
    resumed = _tiny_trainer(**sections)
    resumed.load_state_dict(state)
    got = [train_step(resumed)[0] for _ in range(4)]
    assert [r["hessian_batch_id"] for r in want] == [0, 0, 0, 1, 1, 1, 2, 2]
    for a, b in zip(want[4:], got):
        assert a["hessian_batch_id"] == b["hessian_batch_id"] and a["lambda_max"] == b["lambda_max"], (a, b)
        assert a["eig_hvps"] == b["eig_hvps"] and a["loss"] == b["loss"]


# ---------------------------------------------------------------------------
# adap_s: the measured objective is the current training objective in expectation


class TimeOnly(torch.nn.Module):
    """Predicts the constant image a(t) = 2t/T: its ε-MSE at t has expectation a(t)² + 1 over the noise."""

    def forward(self, x, t):
        return (2 * t / T).to(x.dtype)[:, None, None, None].expand_as(x)


def _expected_loss_under(p_t):
    a = 2 * np.arange(T) / T
    return float((p_t * (a ** 2 + 1)).sum())


def _sampler_distribution(logits, mix=0.1, bins=20):
    """p(t) of adap_s's sampler, written out here: q = (1 − u) softmax(z) + u/K over K
    equal bins, uniform inside a bin."""
    z = np.asarray(logits, dtype=np.float64)
    q = (1 - mix) * np.exp(z - z.max()) / np.exp(z - z.max()).sum() + mix / bins
    return np.repeat(q / (T // bins), T // bins)


@pytest.mark.parametrize("importance_weight", [False, True])
def test_adap_s_hessian_objective_is_the_training_objective_in_expectation(importance_weight):
    n = 4096
    trainer = _tiny_trainer(variant={"name": "adap_s", "options": {"importance_weight": importance_weight}},
                            data={"image_size": 8, "channels": 1, "synthetic_size": n, "batch_size": n,
                                  "batching": "fixed"}, train={"fixed_noise": True},
                            sharpness={"every": 1, "hessian_batch": n})
    v = trainer.variant
    assert not trainer.probing.deterministic_objective()   # the sampler moves: fixed noise fixes nothing
    model = TimeOnly()
    before = trainer.probing.hessian_draw(0)
    logits = torch.linspace(-1.5, 2.0, 20, dtype=torch.float64) ** 2 - 2   # a far-from-uniform sampler
    v.logits = logits
    h = trainer.probing.hessian_draw(1)
    # the batch itself is fixed (warm starts carry over); only its weights follow the sampler
    assert torch.equal(h.t, before.t) and torch.equal(h.noise, before.noise)
    assert trainer.probing.hessian_batch_id == 0
    p_t = _sampler_distribution(logits.numpy())
    want = _expected_loss_under(np.full(T, 1 / T) if importance_weight else p_t)
    per_example = v.loss(model, h).double()
    measured = float(trainer.probing.loss(model, h)())
    se = float(per_example.std()) / math.sqrt(n)
    assert abs(measured - want) <= 4 * se, (measured, want, se)
    # and an average of training losses, drawn from the sampler itself
    g = torch.Generator().manual_seed(5)
    x0 = torch.zeros(n, 1, 8, 8)
    training = torch.cat([v.loss(model, v.draw(x0, g, 1)) for _ in range(4)]).double()
    se2 = math.hypot(se, float(training.std()) / math.sqrt(len(training)))
    assert abs(measured - float(training.mean())) <= 4 * se2
    # the training objective moved away from uniform t: the test can tell the difference
    if not importance_weight:
        assert abs(want - _expected_loss_under(np.full(T, 1 / T))) > 8 * se
