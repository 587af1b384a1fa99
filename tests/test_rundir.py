"""The run folder (trainers.run.rundir) and the one atomic write (trainers.run.atomic)."""
import json
import math
import os

import pyarrow as pa
import pytest
import torch

from trainers.config import ConfigError
from trainers.run.atomic import write_atomic, write_json_atomic
from trainers.run.rundir import (COMPLETED, DIVERGED, ENDED, ERROR, RESULTS, RUNNING, STATUS_MEANINGS, STATUSES,
                                 STOPPED, RunDir, RunStatus, trial_id)
from trainers.run.steplog import StepLog, write_parquet


def hidden_files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob(".*"))


def test_atomic_writes_leave_no_temporary_files(tmp_path):
    write_json_atomic(tmp_path / "a.json", {"x": 1})
    write_parquet(pa.table({"step": [0, 1]}), tmp_path / "t" / "x.parquet")
    write_atomic(tmp_path / "w.pt", lambda tmp: torch.save({"w": torch.ones(2)}, tmp))
    assert hidden_files(tmp_path) == []
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}
    assert torch.equal(torch.load(tmp_path / "w.pt")["w"], torch.ones(2))


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "status.json"
    write_json_atomic(target, {"v": "old"})

    def half_then_fail(tmp):
        tmp.write_text('{"v": "ne')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, half_then_fail)
    assert json.loads(target.read_text()) == {"v": "old"}
    assert hidden_files(tmp_path) == []


def test_status_round_trip_keeps_non_finite_losses(tmp_path):
    run = RunDir(tmp_path / "r")
    assert run.read_status() is None
    for loss in (0.25, math.inf, -math.inf, None):
        status = RunStatus(DIVERGED, 7, loss, "why", 1.5)
        run.write_status(status)
        back = run.read_status()
        assert back == status and back.ended
        json.loads(run.status_file.read_text())   # strict JSON: no bare NaN/Infinity
    run.write_status(RunStatus(DIVERGED, 7, math.nan))
    assert math.isnan(run.read_status().final_loss)
    assert json.loads(run.status_file.read_text())["final_loss"] == "nan"
    run.write_status(RunStatus(RUNNING, 3))
    assert not run.read_status().ended
    with pytest.raises(ValueError, match="not one of"):
        run.write_status(RunStatus("finished", 3))
    assert hidden_files(run.path) == []


def test_one_status_vocabulary():
    assert set(STATUSES) == {RUNNING, COMPLETED, DIVERGED, STOPPED, ERROR} and len(STATUSES) == 5
    assert set(RESULTS) == {COMPLETED, DIVERGED}
    assert set(ENDED) == {COMPLETED, DIVERGED, STOPPED}   # running resumes; error is a study's verdict
    assert set(STATUS_MEANINGS) == set(STATUSES)


def test_checkpoints_keep_the_newest_n_and_fall_back_past_a_damaged_one(tmp_path):
    run = RunDir(tmp_path / "r")
    for step in (10, 20, 30, 40, 100):
        path = run.save_checkpoint({"step": step}, step, keep=2)
        assert path == run.checkpoint_path(step)
    assert [p.name for p in run.checkpoints()] == ["ckpt-000000040.pt", "ckpt-000000100.pt"]
    assert run.load_latest_checkpoint()["step"] == 100
    run.checkpoint_path(100).write_bytes(b"torn")
    assert run.load_latest_checkpoint()["step"] == 40
    assert hidden_files(run.path) == []
    assert RunDir(tmp_path / "none").load_latest_checkpoint() is None


def test_add_checkpoint_only_when_newer(tmp_path):
    source = RunDir(tmp_path / "src")
    older, newer = source.save_checkpoint({"step": 5}, 5, keep=5), source.save_checkpoint({"step": 9}, 9, keep=5)
    run = RunDir(tmp_path / "r")
    assert run.add_checkpoint(older) == run.checkpoint_path(5)
    assert run.add_checkpoint(older) is None
    assert run.add_checkpoint(newer) == run.checkpoint_path(9)
    run.save_checkpoint({"step": 12}, 12, keep=5)
    assert run.add_checkpoint(newer) is None
    assert run.load_latest_checkpoint()["step"] == 12


def _fill(run: RunDir) -> None:
    run.prepare({"train": {"steps": 3}}, resume=True)
    run.save_checkpoint({"step": 2}, 2, keep=2)
    log = run.step_log()
    log.append(step=0, loss=1.0)
    log.flush()
    run.samples.mkdir()
    run.sample_grid_path(2).write_bytes(b"png")
    run.write_status(RunStatus(RUNNING, 2, 0.5))


def test_clear_removes_what_a_run_wrote(tmp_path):
    run = RunDir(tmp_path / "r")
    _fill(run)
    assert run.has_state() and len(run.read_steps()) == 1
    run.clear()
    assert run.checkpoints() == [] and len(run.read_steps()) == 0 and run.read_status() is None
    assert list(run.samples.iterdir()) == []
    assert run.read_config() == {"train": {"steps": 3}}


def test_prepare_resumes_the_same_config_and_refuses_another(tmp_path):
    run = RunDir(tmp_path / "r")
    _fill(run)
    run.prepare({"train": {"steps": 3}}, resume=True)            # same config: everything kept
    assert len(run.checkpoints()) == 1 and run.read_status().steps_done == 2
    with pytest.raises(ConfigError, match=r"different config \(sections differ: optim, train\)"):
        run.prepare({"train": {"steps": 4}, "optim": {}}, resume=True)
    run.prepare({"train": {"steps": 4}}, resume=False)           # a fresh start clears it
    assert run.checkpoints() == [] and run.read_status() is None and len(run.read_steps()) == 0
    assert run.read_config() == {"train": {"steps": 4}}


def test_prepare_removes_temporaries_of_a_killed_writer(tmp_path):
    run = RunDir(tmp_path / "r")
    run.prepare({}, resume=True)
    run.checkpoint_dir.mkdir()
    stale = [run.path / ".status.json.tmp-99999", run.checkpoint_dir / ".ckpt-000000010.pt.tmp-99999"]
    for p in stale:
        p.write_bytes(b"half")
    run.prepare({}, resume=True)
    assert not any(p.exists() for p in stale)


def test_run_dir_is_path_like(tmp_path):
    run = RunDir(tmp_path / "r")
    assert os.fspath(run) == str(tmp_path / "r") and run / "x" == tmp_path / "r" / "x"
    assert RunDir(run) == run and run.name == "r" and not run.is_run()
    run.prepare({"a": 1}, resume=True)
    assert run.is_run() and run.read_config() == {"a": 1}


def test_trial_id_is_one_name_for_cli_and_study():
    assert trial_id("base", 1e-3, 0) == "base_lr0.001_s0"
    from study.spec import TrialKey
    assert TrialKey("edm", 5e-4, 2).trial_id == trial_id("edm", 5e-4, 2) == "edm_lr0.0005_s2"


def test_step_log_of_a_run_dir_writes_atomically(tmp_path):
    run = RunDir(tmp_path / "r")
    log = run.step_log()
    assert isinstance(log, StepLog) and run.steps.is_dir()
    for s in range(3):
        log.append(step=s, loss=float(s))
    log.flush()
    assert run.read_steps()["step"].tolist() == [0, 1, 2]
    assert hidden_files(run.path) == []


def test_saving_a_checkpoint_never_deletes_the_file_just_written(tmp_path):
    run = RunDir(tmp_path / "r")
    run.save_checkpoint({"step": 10}, 10, keep=2)
    for later in (30, 40):   # files of later steps (a resume sets them aside; here they are still there)
        run.checkpoint_path(later).write_bytes(b"torn")
    run.save_checkpoint({"step": 20}, 20, keep=2)
    assert [p.name for p in run.checkpoints()] == ["ckpt-000000010.pt", "ckpt-000000020.pt",
                                                   "ckpt-000000030.pt", "ckpt-000000040.pt"]
    run.save_checkpoint({"step": 25}, 25, keep=1)
    assert run.checkpoint_path(25).is_file() and not run.checkpoint_path(20).exists()


def test_add_checkpoint_replaces_a_newer_file_that_does_not_load(tmp_path):
    source = RunDir(tmp_path / "src")
    good = source.save_checkpoint({"step": 9}, 9, keep=5)
    run = RunDir(tmp_path / "r")
    run.checkpoint_dir.mkdir(parents=True)
    run.checkpoint_path(9).write_bytes(b"torn")
    run.checkpoint_path(12).write_bytes(b"torn")
    assert run.add_checkpoint(good) == run.checkpoint_path(9)
    assert run.load_latest_checkpoint()["step"] == 9
