import json

import numpy as np

import pytest
import torch

from conftest import tiny_config
from trainers.config import ConfigError, run_config
from trainers.run.loop import Trainer, train
from trainers.run.rundir import RunDir
from trainers.run.steplog import read_steps


class Crash(RuntimeError):
    pass


def _weights(run_dir):
    ckpts = sorted((run_dir / "checkpoints").glob("ckpt-*.pt"))
    return torch.load(ckpts[-1], weights_only=False)


def test_tiny_run_loss_falls_and_everything_is_written(tmp_path):
    cfg = tiny_config(train={"steps": 60, "checkpoint_every": 30}, optim={"lr": 2e-3})
    result = train(cfg, tmp_path / "run")
    assert result.status == "completed" and result.steps_done == 60
    df = read_steps(tmp_path / "run" / "steps")
    assert df["step"].tolist() == list(range(60))
    assert df["loss"].iloc[-10:].mean() < 0.7 * df["loss"].iloc[:10].mean()
    assert np.allclose(df["threshold"], 38 / 2e-3)
    status = RunDir(tmp_path / "run").read_status()
    assert status.status == "completed" and status.steps_done == 60
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["optim"]["lr"] == 2e-3 and saved["train"]["steps"] == 60


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path):
    cfg = tiny_config(model={"dropout": 0.1})  # dropout: the global RNG must be restored too
    train(cfg, tmp_path / "straight")

    def crash_at_13(row):
        if row["step"] == 13:
            raise Crash()

    with pytest.raises(Crash):
        train(cfg, tmp_path / "resumed", on_step=crash_at_13)
    # checkpoint at 10; rows 10..13 were never flushed
    assert read_steps(tmp_path / "resumed" / "steps")["step"].max() == 9
    train(cfg, tmp_path / "resumed")

    a = read_steps(tmp_path / "straight" / "steps").drop(columns="wall_time")
    b = read_steps(tmp_path / "resumed" / "steps").drop(columns="wall_time")
    assert b["step"].tolist() == list(range(20))
    assert a.equals(b)
    wa, wb = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    for k in wa["model"]:
        assert torch.equal(wa["model"][k], wb["model"][k]), k
        assert torch.equal(wa["ema"][k], wb["ema"][k]), k


def test_rows_flushed_after_the_checkpoint_are_not_duplicated(tmp_path):
    # A crash between the log flush and the checkpoint write leaves rows on
    # disk beyond the newest checkpoint: resume must cut them, not repeat them.
    cfg = tiny_config()
    run = tmp_path / "run"
    train(cfg, run)
    straight = read_steps(run / "steps").drop(columns="wall_time")
    (run / "checkpoints" / "ckpt-000000020.pt").unlink()
    (run / "status.json").unlink()
    train(cfg, run)
    again = read_steps(run / "steps").drop(columns="wall_time")
    assert again["step"].tolist() == list(range(20))
    assert again.equals(straight)


def test_divergence_is_a_recorded_result(tmp_path):
    cfg = tiny_config(optim={"name": "gd", "lr": 1e4}, train={"steps": 50})
    result = train(cfg, tmp_path / "run")
    assert result.status == "diverged"
    assert result.steps_done < 50
    status = RunDir(tmp_path / "run").read_status()
    assert status.status == "diverged" and "step" in status.reason
    df = read_steps(tmp_path / "run" / "steps")
    assert len(df) == result.steps_done  # the diverging step is logged too
    # calling again does not retrain a finished run
    assert train(cfg, tmp_path / "run").status == "diverged"


def test_callback_can_stop_a_run(tmp_path):
    result = train(tiny_config(), tmp_path / "run", on_step=lambda row: "stopped" if row["step"] == 4 else None)
    assert result.status == "stopped" and result.steps_done == 5


def test_resume_refuses_a_different_config(tmp_path):
    train(tiny_config(train={"steps": 10}), tmp_path / "run")
    with pytest.raises(ConfigError, match="different config"):
        train(tiny_config(train={"steps": 10}, optim={"lr": 5e-4}), tmp_path / "run")


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    cfg = dict(train={"steps": 3}, optim={"name": "gd", "lr": 0.05})
    train(tiny_config(**cfg), tmp_path / "one")
    train(tiny_config(train={"steps": 3}, optim={"name": "gd", "lr": 0.05, "accumulate": 4}), tmp_path / "acc")
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "acc")
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], atol=1e-6), k
    la = read_steps(tmp_path / "one" / "steps")["loss"]
    lb = read_steps(tmp_path / "acc" / "steps")["loss"]
    assert np.allclose(la, lb, rtol=1e-5)


def test_full_batch_gd_is_deterministic_and_uses_every_image(tmp_path):
    cfg = tiny_config(data={"batching": "full", "batch_size": 16, "synthetic_size": 40},
                      optim={"name": "gd", "lr": 0.05}, train={"steps": 4, "fixed_noise": True})
    train(cfg, tmp_path / "a")
    train(cfg, tmp_path / "b")
    la = read_steps(tmp_path / "a" / "steps")["loss"]
    assert np.array_equal(la, read_steps(tmp_path / "b" / "steps")["loss"])
    assert la.iloc[-1] < la.iloc[0]  # GD on a fixed objective at a small lr descends


def test_gradient_clipping_bounds_the_update(tmp_path):
    # GD with lr η and clip c moves the parameters by at most η·c per step
    cfg = tiny_config(optim={"name": "gd", "lr": 1.0, "grad_clip": 1e-3}, train={"steps": 1, "ema_decay": 0.0})

    init = Trainer(run_config(cfg)).model.state_dict()
    train(cfg, tmp_path / "run")
    after = _weights(tmp_path / "run")["model"]
    step = torch.sqrt(sum(((after[k] - init[k]) ** 2).sum() for k in init))
    assert 0 < float(step) <= 1e-3 * (1 + 1e-5)
    assert read_steps(tmp_path / "run" / "steps")["grad_norm"].iloc[0] > 1e-3  # logged before clipping


def test_bf16_autocast_trains(tmp_path):
    result = train(tiny_config(train={"steps": 3, "bf16": True}), tmp_path / "run")
    assert result.status == "completed" and np.isfinite(result.final_loss)
