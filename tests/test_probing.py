"""When and on which batch a run probes the curvature (trainers.run.probing), probe mode
(trainers.diffusion.unet.probe_mode), and the run's random streams (trainers.run.rng)."""
import numpy as np
import pytest
import torch

from conftest import tiny_config
from trainers.config import run_config
from trainers.diffusion.unet import AttnBlock, build_unet, probe_mode
from trainers.run.data import to_model_range
from trainers.run.loop import Trainer, train
from trainers.run.rng import Purpose, epoch_order, step_seed
from trainers.run.steplog import read_steps


def _attention(model):
    return [m.fused for m in model.modules() if isinstance(m, AttnBlock)]


def test_probe_mode_is_eval_with_written_out_attention_and_restores_both():
    model = build_unet("tiny", image_size=16, dropout=0.5)
    model.set_fused_attention(True)
    assert model.training and _attention(model) and all(_attention(model))
    with probe_mode(model):
        assert not model.training and not any(_attention(model))
        assert not any(m.training for m in model.modules())   # dropout off everywhere
    assert model.training and all(_attention(model))
    # restored after an error too, and an eval-mode model stays in eval mode
    model.eval()
    with pytest.raises(RuntimeError):
        with probe_mode(model):
            raise RuntimeError("probe failed")
    assert not model.training and all(_attention(model))


@pytest.mark.parametrize("convention, precond_steps", [("init2winit", [3, 6]), ("update", [0, 3, 6])])
def test_threshold_on_every_row_and_probe_columns_on_every_third(tmp_path, convention, precond_steps):
    # Adam with warm-up: the lr (and so the threshold (2 + 2·0.9)/((1 − 0.9)·lr) = 38/lr) changes per step
    cfg = tiny_config(train={"steps": 7}, optim={"name": "adam", "lr": 1e-3, "warmup_steps": 4},
                      sharpness={"every": 3, "hessian_batch": 4, "max_iters": 5, "adam_preconditioner": convention})
    train(cfg, tmp_path / "run")
    df = read_steps(tmp_path / "run" / "steps")
    lrs = [1e-3 * min(1.0, (s + 1) / 4) for s in range(7)]
    np.testing.assert_allclose(df["lr"], lrs, rtol=1e-15)
    np.testing.assert_allclose(df["threshold"], [38 / lr for lr in lrs], rtol=1e-12)
    probed = df["lambda_max"].notna().tolist()
    assert probed == [s % 3 == 0 for s in range(7)]
    # init2winit's P (the state before the step) exists from step 1 on; the update's P from step 0 on
    measured = df[df["lambda_precond"].notna()]
    assert measured["step"].tolist() == precond_steps
    np.testing.assert_allclose(measured["ratio"], measured["lambda_precond"] / measured["threshold"], rtol=1e-12)


def test_no_probe_without_sharpness():
    trainer = Trainer(run_config(tiny_config()))
    assert trainer.probing.probe is None and not trainer.probing.due(0)
    with pytest.raises(RuntimeError, match="sharpness.every is 0"):
        trainer.measure_sharpness(0, 1e-3, trainer.draws(0)[0])


def test_hessian_batch_of_a_deterministic_objective_is_its_own_draw():
    # full-batch GD with fixed noise and accumulation: the Hessian batch is the
    # first hessian_batch examples of the (concatenated) training draw
    cfg = run_config(tiny_config(data={"batching": "full", "batch_size": 8, "synthetic_size": 24},
                                 optim={"name": "gd", "lr": 0.1}, train={"fixed_noise": True},
                                 sharpness={"every": 1, "hessian_batch": 12}))
    trainer = Trainer(cfg)
    assert trainer.probing.deterministic_objective()
    micro = trainer.draws(5)
    assert [len(d) for d in micro] == [8, 8, 8]
    h = trainer.probing.hessian_draw(0)
    for field in ("x0", "t", "noise", "input_noise"):
        whole = torch.cat([getattr(d, field) for d in micro])
        assert torch.equal(getattr(h, field), whole[:12]), field
    assert trainer.probing.hessian_draw(7) is h


@pytest.mark.parametrize("refresh", [False, True])
def test_hessian_batch_of_a_random_objective(refresh):
    cfg = run_config(tiny_config(data={"flip": True}, sharpness={"every": 1, "hessian_batch": 6,
                                                                 "refresh_batch": refresh}))
    trainer = Trainer(cfg)
    assert not trainer.probing.deterministic_objective()
    h0 = trainer.probing.hessian_draw(0)
    assert torch.equal(h0.x0, to_model_range(trainer.batches.images[:6]))   # the first images, unflipped
    h0 = (h0.t.clone(), h0.noise.clone())
    h4 = trainer.probing.hessian_draw(4)
    assert torch.equal(h4.x0, to_model_range(trainer.batches.images[:6]))
    same = torch.equal(h4.t, h0[0]) and torch.equal(h4.noise, h0[1])
    assert same != refresh   # redrawn at each probe only with refresh_batch
    # a fresh trainer (a resumed run) builds the same batch for the same step
    again = Trainer(cfg).probing.hessian_draw(4)
    assert torch.equal(again.t, h4.t) and torch.equal(again.noise, h4.noise)


def test_step_streams_never_collide():
    seeds = {step_seed(seed, step, p) for seed in range(4) for step in range(2000) for p in Purpose}
    assert len(seeds) == 4 * 2000 * len(Purpose)


def test_epoch_order_is_a_permutation_that_changes_with_epoch_and_seed():
    a = epoch_order(0, 0, 50)
    assert sorted(a.tolist()) == list(range(50))
    assert not torch.equal(a, epoch_order(0, 1, 50)) and not torch.equal(a, epoch_order(1, 0, 50))
    assert torch.equal(a, epoch_order(0, 0, 50))
