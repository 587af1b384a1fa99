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
    """A tiny run of 8 steps, checkpoints every 3, the probe on every 2nd step (Adam: λ₁(P⁻¹H); its
    Hutchinson trace draws from the probe's generator)."""
    base = dict(train={"steps": 8, "checkpoint_every": 3},
                sharpness={"every": 2, "hessian_batch": 4, "max_iters": 4, "plain_lambda": False,
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


def probed_steps(df):
    """Per row: whether it has a λ (λ₁(P⁻¹H), or λ₁(H) at step 0, before Adam has a preconditioner)."""
    return (df["lambda_max"].notna() | df["lambda_precond"].notna()).tolist()


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
        train(cfg, tmp_path / "run", on_step=crash_at(5))
    saved = torch.load(RunDir(tmp_path / "run").checkpoints()[-1], weights_only=False)
    trainer = Trainer(run_config(cfg))
    trainer.device = torch.device("meta")   # what map_location=device would have moved everything to
    assert trainer.resume(RunDir(tmp_path / "run")) and trainer.step == 3
    state = trainer.probing.probe.generator.get_state()
    assert state.device.type == "cpu" and state.dtype == torch.uint8
    assert torch.equal(state, saved["probe"]["probe"]["generator"])   # the Probing state holds the probe's
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
def test_cuda_probed_run_killed_and_resumed_equals_an_uninterrupted_one(tmp_path, cuda_deterministic):
    """17.1 on the GPU: a probed run on CUDA interrupted at step 5 (after the
    checkpoint at 3), resumed, compared row by row with an uninterrupted CUDA
    run; then ``eos sample`` of the resumed run.  Deterministic kernels
    (``cuda_deterministic``: with the default ones λ₁(P⁻¹H) at step 2, a row
    written before the interruption, differed by 0.2 % between the two runs
    on an H200); values are compared to a relative 1e-4 (the integers of the
    solver — iterations, products — to ±2)."""
    import numpy as np

    cfg = probed(train={"device": "cuda"})
    train(cfg, tmp_path / "straight")
    with pytest.raises(Crash):
        train(cfg, tmp_path / "resumed", on_step=crash_at(5))
    assert rows(tmp_path / "resumed")["step"].max() == 2
    result = train(cfg, tmp_path / "resumed")
    assert result.status == "completed" and result.steps_done == 8
    a, b = rows(tmp_path / "straight"), rows(tmp_path / "resumed")
    assert b["step"].tolist() == list(range(8))
    assert probed_steps(b) == [s % 2 == 0 for s in range(8)]
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
        train(cfg, tmp_path / "resumed", on_step=crash_at(5))
    train(cfg, tmp_path / "resumed")
    assert_same_rows(rows(tmp_path / "straight"), rows(tmp_path / "resumed"), 8)


def test_resumed_run_keeps_the_tf32_offset_of_its_last_float32_check(tmp_path, monkeypatch):
    """The TF32 search path, forced on the CPU with TF32 products 0.4 % low
    (curvature_fixtures.BiasedTF32), λ₁ float32-checked at every 3rd probe:
    the probe at step 4 is not checked and reports the TF32 λ times the
    offset of the check at step 0, which a resume from the checkpoint at
    step 3 must restore — every row equals the uninterrupted run's."""
    import trainers.curvature.probe as sharpness
    from curvature_fixtures import BiasedTF32

    hessian = sharpness.SharpnessProbe.hessian
    monkeypatch.setattr(sharpness, "has_tf32", lambda device: True)
    monkeypatch.setattr(sharpness.SharpnessProbe, "hessian",
                        lambda self, *args: BiasedTF32(hessian(self, *args), 1 - 4e-3))
    cfg = probed(sharpness={"verify_every": 3, "max_iters": 100})
    train(cfg, tmp_path / "straight")
    with pytest.raises(Crash):
        train(cfg, tmp_path / "resumed", on_step=crash_at(5))
    train(cfg, tmp_path / "resumed")
    a, b = rows(tmp_path / "straight"), rows(tmp_path / "resumed")
    assert a["eig_check"].notna().tolist() == [s in (0, 6) for s in range(8)]
    assert_same_rows(a, b, 8)


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


# ---------------------------------------------------------------------------
# 17.2: the checkpoints and the log disagree

FRESH_HINT = "or start over (eos train --fresh deletes this run's checkpoints and step log)"


def short(**train_section):
    """12 steps, checkpoints every 4, the newest 2 kept, no probe (fast)."""
    return tiny_config(train={"steps": 12, "checkpoint_every": 4, "keep_checkpoints": 2, **train_section})


def killed_at_10(cfg, run_dir):
    """Checkpoints at 4 and 8, the log holds steps 0–7."""
    with pytest.raises(Crash):
        train(cfg, run_dir, on_step=crash_at(10))
    run = RunDir(run_dir)
    assert [p.name for p in run.checkpoints()] == ["ckpt-000000004.pt", "ckpt-000000008.pt"]
    return run


class TuneCheckpoint:
    """What ``tune.get_checkpoint()`` returns, as far as study.trainable.restore_checkpoint uses it."""

    def __init__(self, folder):
        self.folder = folder

    def as_directory(self):
        import contextlib
        return contextlib.nullcontext(str(self.folder))


def test_no_loadable_checkpoint_stops_with_one_line_and_deletes_nothing(tmp_path, capsys):
    cfg = short()
    run = killed_at_10(cfg, tmp_path / "runs" / "base_lr0.001_s0")
    for p in run.checkpoints():
        p.write_bytes(b"torn")
    logged = rows(run)
    message = (f"{run}: cannot resume: ckpt-000000008.pt does not load; ckpt-000000004.pt does not load; "
               f"put a checkpoint the log reaches into {run.checkpoint_dir} {FRESH_HINT}")
    from trainers.run.rundir import RunFolderError
    with pytest.raises(RunFolderError) as err:
        train(cfg, run)
    assert str(err.value) == message
    capsys.readouterr()
    assert eos(["train", "--config", write_config(tmp_path, cfg), "--out", str(tmp_path / "runs")]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"eos train: {message}"
    # nothing was deleted or cut
    assert [p.read_bytes() for p in run.checkpoints()] == [b"torn", b"torn"]
    assert rows(run).equals(logged) and run.read_status().status == "running"


def test_tunes_copy_replaces_unreadable_checkpoints(tmp_path):
    from study.trainable import restore_checkpoint

    cfg = short()
    train(cfg, tmp_path / "straight")
    run = killed_at_10(cfg, tmp_path / "run")
    tune_copy = tmp_path / "tune"
    tune_copy.mkdir()
    (tune_copy / "ckpt-000000008.pt").write_bytes(run.checkpoint_path(8).read_bytes())
    for p in run.checkpoints():
        p.write_bytes(b"torn")
    assert restore_checkpoint(TuneCheckpoint(tune_copy), run) == run.checkpoint_path(8)
    result = train(cfg, run)
    assert result.status == "completed" and result.steps_done == 12
    assert_same_rows(rows(tmp_path / "straight"), rows(run), 12)


def test_a_checkpoint_the_log_does_not_reach_is_refused(tmp_path):
    from study.trainable import restore_checkpoint
    from trainers.run.rundir import RunFolderError

    cfg = short()
    run = killed_at_10(cfg, tmp_path / "run")
    tune_copy = tmp_path / "tune"
    tune_copy.mkdir()
    (tune_copy / "ckpt-000000008.pt").write_bytes(run.checkpoint_path(8).read_bytes())
    # the state: the local checkpoints gone, the log cut back to steps 0–3, Tune's copy at step 8
    for p in run.checkpoints():
        p.unlink()
    run.step_log().truncate_after(3)
    restore_checkpoint(TuneCheckpoint(tune_copy), run)
    with pytest.raises(RunFolderError) as err:
        train(cfg, run)
    assert str(err.value) == (f"{run}: cannot resume: ckpt-000000008.pt needs logged steps 0–7 but the step "
                              f"log holds steps 0–3; put a checkpoint the log reaches into {run.checkpoint_dir} {FRESH_HINT}")
    assert run.read_status().status == "running" and rows(run)["step"].tolist() == [0, 1, 2, 3]
    assert [p.name for p in run.checkpoints()] == ["ckpt-000000008.pt"]


def test_resume_falls_back_to_a_checkpoint_the_log_reaches_and_sets_the_other_aside(tmp_path):
    cfg = short()
    train(cfg, tmp_path / "straight")
    run = killed_at_10(cfg, tmp_path / "run")
    run.step_log().truncate_after(3)        # the log reaches ckpt-4, not ckpt-8
    result = train(cfg, run)
    assert result.status == "completed"
    assert_same_rows(rows(tmp_path / "straight"), rows(run), 12)
    assert [p.name for p in run.unused_checkpoint_dir.iterdir()] == ["ckpt-000000008.pt"]   # kept, aside
    assert [p.name for p in run.checkpoints()] == ["ckpt-000000008.pt", "ckpt-000000012.pt"]


def test_a_run_is_never_marked_ended_with_a_gap_in_its_log(tmp_path):
    from trainers.run.rundir import RunFolderError

    cfg = short()
    run = RunDir(tmp_path / "run")

    def lose_a_chunk(path, steps_done):
        if steps_done == 8:
            (run.steps / "part-000000000-000000003.parquet").unlink()

    with pytest.raises(RunFolderError) as err:
        train(cfg, run, on_checkpoint=lose_a_chunk)
    assert str(err.value) == (f"{run}: not marked completed after 12 steps: the step log holds steps 4–11 but steps "
                              "0–3 missing (part-000000000-000000003.parquet is missing (steps 0–3, 4 rows, "
                              "listed in _manifest.json))")
    assert run.read_status().status == "running"


# ---------------------------------------------------------------------------
# 17.3: a chunk of the log deleted or damaged


def test_resume_over_a_deleted_chunk_goes_back_to_a_checkpoint_before_it(tmp_path):
    cfg = short()
    train(cfg, tmp_path / "straight")
    run = killed_at_10(cfg, tmp_path / "run")
    (run.steps / "part-000000004-000000007.parquet").unlink()   # the log reaches ckpt-4 only
    assert train(cfg, run).status == "completed"
    assert_same_rows(rows(tmp_path / "straight"), rows(run), 12)


def test_resume_over_a_truncated_chunk_without_a_checkpoint_before_it_names_it(tmp_path):
    from trainers.run.rundir import RunFolderError

    cfg = short(keep_checkpoints=1)
    with pytest.raises(Crash):
        train(cfg, tmp_path / "run", on_step=crash_at(10))
    run = RunDir(tmp_path / "run")
    chunk = run.steps / "part-000000004-000000007.parquet"
    chunk.write_bytes(chunk.read_bytes()[:50])
    with pytest.raises(RunFolderError) as err:
        train(cfg, run)
    assert str(err.value) == (
        f"{run}: cannot resume: ckpt-000000008.pt needs logged steps 0–7 but the step log holds steps 0–3 "
        "(part-000000004-000000007.parquet is damaged (Parquet magic bytes not found in footer. Either the file "
        f"is corrupted or this is not a parquet file.)); put a checkpoint the log reaches into "
        f"{run.checkpoint_dir} {FRESH_HINT}")
    assert chunk.stat().st_size == 50 and run.checkpoints() == [run.checkpoint_path(8)]


def test_a_completed_run_with_a_deleted_chunk_is_not_returned_as_completed(tmp_path):
    from trainers.run.rundir import RunFolderError

    cfg = short()
    train(cfg, tmp_path / "run")
    run = RunDir(tmp_path / "run")
    (run.steps / "part-000000004-000000007.parquet").unlink()
    with pytest.raises(RunFolderError, match="part-000000004-000000007.parquet is missing .*the run is completed "
                                             r"but its log is not whole \(eos train --fresh"):
        train(cfg, run)


# ---------------------------------------------------------------------------
# 17.6: the probe's solver fails, or the curvature is not finite

EIGH_FAILURE = ("linalg.eigh: The algorithm failed to converge because the input matrix is ill-conditioned or has "
                "too many repeated eigenvalues (error code: 3).")


def inject_probe(monkeypatch, fault):
    """Wrap SharpnessProbe.measure: ``fault(call, probe, cols)`` runs after each real measurement
    and may raise or change the columns; records whether each call started warm."""
    from trainers.curvature.probe import SharpnessProbe

    real, calls = SharpnessProbe.measure, []

    def measure(self, *args, **kwargs):
        calls.append(bool(self.warm))
        cols = real(self, *args, **kwargs)
        return fault(len(calls), self, cols)

    monkeypatch.setattr(SharpnessProbe, "measure", measure)
    return calls


def test_a_solver_failure_is_retried_cold_and_the_run_goes_on(tmp_path, monkeypatch):
    cfg = probed(train={"steps": 6, "checkpoint_every": 3})

    def fail_second_call(call, probe, cols):
        if call == 2:   # the probe at step 2, which starts warm
            raise torch.linalg.LinAlgError(EIGH_FAILURE)
        return cols

    calls = inject_probe(monkeypatch, fail_second_call)
    result = train(cfg, tmp_path / "run")
    assert result.status == "completed" and result.steps_done == 6
    assert calls == [False, True, False, True]    # step 0 cold, step 2 warm then cold, step 4 warm
    df = rows(tmp_path / "run")
    assert df["step"].tolist() == list(range(6))
    assert probed_steps(df) == [True, False, True, False, True, False]
    assert df["eig_error"].isna().all()


def test_a_solver_that_fails_again_cold_is_recorded_not_a_crash(tmp_path, monkeypatch):
    cfg = probed(train={"steps": 6, "checkpoint_every": 3})

    def fail_at_step_2(call, probe, cols):
        if call in (2, 3):   # step 2, warm and cold
            raise torch.linalg.LinAlgError(EIGH_FAILURE)
        return cols

    inject_probe(monkeypatch, fail_at_step_2)
    result = train(cfg, tmp_path / "run")
    assert result.status == "completed" and result.steps_done == 6 and result.reason is None
    df = rows(tmp_path / "run")
    assert df["step"].tolist() == list(range(6))
    assert probed_steps(df) == [True, False, False, False, True, False]
    assert [v if isinstance(v, str) else None for v in df["eig_error"]] == [None, None, f"LinAlgError: {EIGH_FAILURE} at step 2, also after a cold "
                                        "start", None, None, None]
    assert df["loss"].notna().all()


def test_non_finite_curvature_is_a_diverged_result(tmp_path, monkeypatch):
    cfg = probed(train={"steps": 8, "checkpoint_every": 2})

    def nan_from_step_4(call, probe, cols):
        if call >= 3:   # step 4 (calls 1, 2: steps 0, 2; calls 3, 4: step 4 warm and cold)
            cols = {**cols, "lambda_max": float("nan")}
        return cols

    inject_probe(monkeypatch, nan_from_step_4)
    result = train(cfg, tmp_path / "run")
    reason = "non-finite curvature (lambda_max nan) at step 4, also after a cold start"
    assert (result.status, result.steps_done, result.reason) == ("diverged", 5, reason)
    status = RunDir(tmp_path / "run").read_status()
    assert (status.status, status.steps_done, status.reason) == ("diverged", 5, reason)
    df = rows(tmp_path / "run")
    assert df["step"].tolist() == list(range(5))
    assert df["eig_error"].iloc[-1] == reason and not probed_steps(df)[-1]
    assert df["eig_error"].iloc[:-1].isna().all()
    monkeypatch.undo()
    again = train(cfg, tmp_path / "run")   # a result: not trained again, no loop
    assert (again.status, again.steps_done) == ("diverged", 5)


# ---------------------------------------------------------------------------
# 18.1, 18.2, 18.10: eos train with bad input, --fresh, a folder of a failed attempt

TINY_ARGS = ["--set", "data.image_size=16", "--set", "data.synthetic_size=32", "--set", "data.batch_size=8",
             "--set", "sharpness.every=0", "--set", "train.print_every=0", "--set", "train.device=cpu",
             "--set", "train.checkpoint_every=2"]


def eos_train(out, *extra, capsys):
    capsys.readouterr()
    code = eos(["train", "--base", "--lr", "1e-3", "--out", str(out), *TINY_ARGS, *extra])
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines()


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_fresh_with_a_typo_deletes_nothing(tmp_path, capsys):
    out = tmp_path / "runs"
    assert eos_train(out, "--steps", "4", capsys=capsys)[0] == 0
    before = snapshot(out)
    assert any(k.startswith("base_lr0.001_s0/checkpoints/") for k in before)
    code, err = eos_train(out, "--steps", "4", "--fresh", "--set", "data.name=npz",
                          "--set", "data.path=nope_typo.npz", capsys=capsys)
    assert (code, err[-1]) == (2, "eos train: data.path: no such file 'nope_typo.npz'")
    assert snapshot(out) == before          # the completed run is untouched
    code, _ = eos_train(out, "--steps", "4", "--fresh", capsys=capsys)   # the corrected command starts over
    assert code == 0 and RunDir(out / "base_lr0.001_s0").read_status().status == "completed"
    assert rows(out / "base_lr0.001_s0")["step"].tolist() == [0, 1, 2, 3]


def test_a_run_that_never_trained_a_step_does_not_lock_its_folder(tmp_path, capsys):
    out = tmp_path / "runs"
    code, err = eos_train(out, "--steps", "4", "--set", "data.name=npz", "--set", "data.path=nope_typo.npz",
                          capsys=capsys)
    assert (code, err[-1]) == (2, "eos train: data.path: no such file 'nope_typo.npz'")
    assert not (out / "base_lr0.001_s0" / "config.json").exists()    # checked before anything was written
    # an attempt that wrote its config.json but died before its first step (killed, out of memory, ...)
    cfg = json.loads(json.dumps(run_config(tiny_config(data={"synthetic_size": 32, "batch_size": 8},
                                                       train={"steps": 4})).to_dict()))
    with pytest.raises(Crash):
        train(cfg, out / "base_lr0.001_s0", on_step=crash_at(0))
    assert (out / "base_lr0.001_s0" / "config.json").exists()
    code, err = eos_train(out, "--steps", "4", capsys=capsys)      # a different config: not refused
    assert code == 0 and rows(out / "base_lr0.001_s0")["step"].tolist() == [0, 1, 2, 3]


def test_a_trained_run_with_another_config_names_the_flag_and_what_it_deletes(tmp_path, capsys):
    out = tmp_path / "runs"
    assert eos_train(out, "--steps", "4", "--set", "train.keep_checkpoints=5", capsys=capsys)[0] == 0
    before = snapshot(out)
    code, err = eos_train(out, "--steps", "6", "--set", "train.keep_checkpoints=5", capsys=capsys)
    assert (code, err[-1]) == (2, f"eos train: run_dir: {out / 'base_lr0.001_s0'} holds a run with a different "
                                  "config (sections differ: train) that has 2 checkpoint(s) and 4 logged step(s); "
                                  "use another --out folder, or --fresh to delete them and start over")
    assert snapshot(out) == before


def test_a_hessian_batch_larger_than_the_data_is_rejected_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "runs"
    code, err = eos_train(out, "--steps", "2", "--set", "sharpness.every=1", "--set", "sharpness.hessian_batch=40",
                          capsys=capsys)
    assert (code, err[-1]) == (2, "eos train: sharpness.hessian_batch: 40 is larger than the 32 examples the Hessian "
                                  "batch is drawn from (the data set's 32 images); set it to at most 32")
    assert not (out / "base_lr0.001_s0" / "config.json").exists()
    code, err = eos_train(out, "--steps", "2", "--set", "sharpness.every=1", "--set", "sharpness.hessian_batch=40",
                          "--set", "data.batching=fixed", "--set", "train.fixed_noise=true", capsys=capsys)
    assert (code, err[-1]) == (2, "eos train: sharpness.hessian_batch: 40 is larger than the 8 examples the Hessian "
                                  "batch is drawn from (the fixed training batch, data.batch_size=8); set it to at "
                                  "most 8")


def test_what_counts_as_a_solver_failure():
    from trainers.run.probing import solver_failure

    assert solver_failure(torch.linalg.LinAlgError(EIGH_FAILURE))
    # what lobpcg raised on the tiny model at Adam lr 0.3 (every direction vanished)
    assert solver_failure(RuntimeError("max(): Expected reduction dim to be specified for input.numel() == 0."))
    assert not solver_failure(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not solver_failure(RuntimeError("CUDA error: an illegal memory access was encountered"))
