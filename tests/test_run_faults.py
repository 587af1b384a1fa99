"""Faults injected into single runs (issues 17 and 18): a resume on another
device, kills at chosen moments, damaged or missing files, a solver that
fails, bad input with --fresh.  Each test asserts the outcome: every logged
row exactly once (and equal to an uninterrupted run's), the status, and the
exact message."""
import json

import pytest
import torch

from conftest import tiny_config
from study.cli import main as eos
from trainers.config import run_config
from trainers.run.loop import Trainer, train
from trainers.run.rundir import RunDir
from trainers.run.steplog import read_steps


class Crash(RuntimeError):
    pass


def probed(**sections):
    """A tiny run of 12 steps, checkpoints every 5, the probe on every 2nd step (Adam: λ₁(P⁻¹H) and λ₁(H))."""
    base = dict(train={"steps": 12, "checkpoint_every": 5},
                sharpness={"every": 2, "hessian_batch": 4, "max_iters": 4, "plain_lambda": True,
                           "trace_samples": 1})
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v}
    return tiny_config(**base)


def crash_at(step):
    def on_step(row):
        if row["step"] == step:
            raise Crash(f"killed at step {step}")
    return on_step


def rows(run_dir):
    return read_steps(RunDir(run_dir).steps).drop(columns="wall_time")


def assert_same_rows(a, b, steps):
    assert b["step"].tolist() == list(range(steps))   # every step exactly once
    assert a.equals(b)


# ---------------------------------------------------------------------------
# 17.1: a checkpoint is loaded onto the CPU, each RNG state restored on its own device


def test_resume_loads_every_state_on_the_cpu_whatever_the_training_device(tmp_path):
    """The GPU crash, simulated on the CPU: the old loader mapped the checkpoint
    to the trainer's device, so on CUDA the probe's CPU generator state became a
    cuda ByteTensor (``TypeError: RNG state must be a torch.ByteTensor``).
    Here the trainer's device is 'meta' when it resumes: mapping to it gives
    exactly that TypeError; the checkpoint must load on the CPU instead."""
    cfg = probed()
    with pytest.raises(Crash):
        train(cfg, tmp_path / "run", on_step=crash_at(7))
    saved = torch.load(RunDir(tmp_path / "run").checkpoints()[-1], weights_only=False)
    trainer = Trainer(run_config(cfg))
    trainer.device = torch.device("meta")   # what map_location=device would have moved everything to
    assert trainer.resume(RunDir(tmp_path / "run")) and trainer.step == 5
    state = trainer.probing.probe.generator.get_state()
    assert state.device.type == "cpu" and state.dtype == torch.uint8
    assert torch.equal(state, saved["probe"]["generator"])
    assert all(v.device.type == "cpu" for v in trainer.probing.probe.warm.values())


def test_probe_state_from_another_device_is_restored_on_the_cpu():
    from trainers.curvature.probe import SharpnessProbe

    cfg = run_config(probed())
    probe = SharpnessProbe(cfg.sharpness, cfg.optim, seed=3)
    torch.randint(0, 2, (5,), generator=probe.generator)
    state = probe.state_dict()
    # a state whose tensors are not CPU ByteTensors (another dtype stands in for another device)
    state["generator"] = state["generator"].to(torch.int16)
    state["warm"] = {"plain": torch.ones(4, 2, dtype=torch.float64)}
    other = SharpnessProbe(cfg.sharpness, cfg.optim, seed=0)
    other.load_state_dict(state)
    assert torch.equal(other.generator.get_state(), probe.generator.get_state())
    assert other.warm["plain"].device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_probed_run_killed_and_resumed_equals_an_uninterrupted_one(tmp_path):
    """17.1 on the GPU: a probed run on CUDA interrupted at step 7 (after the
    checkpoint at 5), resumed, compared row by row with an uninterrupted CUDA
    run; then ``eos sample`` of the resumed run.  GPU kernels (cuDNN, atomics)
    are not bit-reproducible, so values are compared to a relative 1e-4
    (the integers of the solver — iterations, products — to ±2)."""
    import numpy as np

    cfg = probed(train={"device": "cuda"})
    train(cfg, tmp_path / "straight")
    with pytest.raises(Crash):
        train(cfg, tmp_path / "resumed", on_step=crash_at(7))
    assert rows(tmp_path / "resumed")["step"].max() == 4
    result = train(cfg, tmp_path / "resumed")
    assert result.status == "completed" and result.steps_done == 12
    a, b = rows(tmp_path / "straight"), rows(tmp_path / "resumed")
    assert b["step"].tolist() == list(range(12))
    assert b["lambda_max"].notna().tolist() == [s % 2 == 0 for s in range(12)]
    for col in ("loss", "lr", "grad_norm", "threshold", "lambda_max", "lambda_precond", "ratio", "hessian_trace"):
        np.testing.assert_allclose(b[col].astype(float), a[col].astype(float), rtol=1e-4, atol=1e-7, err_msg=col)
    for col in ("eig_iters", "eig_hvps"):
        assert (b[col].fillna(0) - a[col].fillna(0)).abs().max() <= 2, col
    assert eos(["sample", str(tmp_path / "resumed"), "--n", "4"]) == 0
    assert (tmp_path / "resumed" / "samples").is_dir()


def test_resumed_probed_run_equals_an_uninterrupted_one(tmp_path):
    cfg = probed()
    train(cfg, tmp_path / "straight")
    with pytest.raises(Crash):
        train(cfg, tmp_path / "resumed", on_step=crash_at(7))
    train(cfg, tmp_path / "resumed")
    assert_same_rows(rows(tmp_path / "straight"), rows(tmp_path / "resumed"), 12)


# ---------------------------------------------------------------------------
# 17.7: a kill after the final checkpoint


def write_config(tmp_path, cfg) -> str:
    path = tmp_path / "run.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def test_kill_after_the_final_checkpoint_takes_the_final_loss_from_the_log(tmp_path, capsys):
    from trainers.run.rundir import RUNNING, RunStatus

    cfg = tiny_config(train={"steps": 10, "checkpoint_every": 5})
    out = tmp_path / "runs"
    run = RunDir(out / "base_lr0.001_s0")

    def killed_after_final(path, steps_done):
        if steps_done == 10:
            raise Crash("killed after the final checkpoint")

    with pytest.raises(Crash):
        train(cfg, run, on_checkpoint=killed_after_final)
    # killed between the checkpoint file and its status line: status.json still says step 5
    run.write_status(RunStatus(RUNNING, 5, None))
    logged = read_steps(run.steps)
    assert logged["step"].tolist() == list(range(10))

    capsys.readouterr()
    assert eos(["train", "--config", write_config(tmp_path, cfg), "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert printed == [{"trial": run.name, "status": "completed", "steps": 10,
                        "final_loss": logged["loss"].iloc[-1]}]
    status = run.read_status()
    assert status.status == "completed" and status.steps_done == 10 and status.final_loss == logged["loss"].iloc[-1]
    assert read_steps(run.steps).drop(columns="wall_time").equals(logged.drop(columns="wall_time"))
    # a completed status without a final loss (written by an older version) is repaired from the log
    run.write_status(RunStatus("completed", 10, None))
    assert train(cfg, run).final_loss == logged["loss"].iloc[-1] == run.read_status().final_loss
