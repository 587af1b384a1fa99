"""Experiment trackers through Ray Tune's callbacks: the spec section, and a
study whose MLflow (local ``file:`` store), TensorBoard and W&B (offline)
records are read back with each tool's own reader and compared, step by
step, with the study's step log."""
import json
import logging
import math
import struct
from pathlib import Path

import pandas as pd
import pytest

from study import trackers as T
from study.cli import main as cli_main
from study.spec import spec_from_dict
from study.trainable import STEP_METRICS, step_metrics
from test_study_spec import error_of, small_spec

# ---------------------------------------------------------------------------
# the spec section


def test_no_trackers_by_default_and_the_short_form_turns_them_on(tmp_path):
    spec = spec_from_dict(small_spec(study={"storage": str(tmp_path)}))
    assert spec.trackers.enabled == [] and spec.trackers.every == 10
    spec = spec_from_dict(small_spec(study={"storage": str(tmp_path)}, trackers=["tensorboard", "wandb"]))
    assert spec.trackers.enabled == ["tensorboard", "wandb"]
    assert spec.trackers.wandb == T.WandbTracker() and spec.trackers.mlflow is None
    assert spec_from_dict(spec.to_dict()) == spec          # study.json round trip
    assert spec_from_dict(small_spec(study={"storage": str(tmp_path)}, trackers=None)).trackers.enabled == []


def test_tracker_options_are_validated_with_the_field_named(tmp_path, monkeypatch):
    base = {"study": {"storage": str(tmp_path)}}
    assert error_of(small_spec(**base, trackers=["mlflow", "neptune"])) == \
        "trackers[1]: unknown tracker 'neptune' (known: mlflow, tensorboard, wandb)"
    assert error_of(small_spec(**base, trackers={"mlflow": {"tracking_url": "x"}})).startswith(
        "trackers.mlflow.tracking_url: unknown key (known: experiment_name, save_artifact, tags, tracking_uri)")
    assert error_of(small_spec(**base, trackers={"wandb": {"mode": "cloud"}})) == \
        "trackers.wandb.mode: must be one of online, offline, disabled; got 'cloud'"
    assert error_of(small_spec(**base, trackers={"every": -1})) == "trackers.every: must be >= 0; got -1"
    assert error_of(small_spec(**base, trackers={"tensorboard": True})) == \
        "trackers.tensorboard: must be a mapping; got bool"
    # MLflow 3 opens a file store only when asked to by its own switch
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    assert error_of(small_spec(**base, trackers={"mlflow": {"tracking_uri": f"file:{tmp_path}/mlruns"}})) \
        .startswith("trackers.mlflow.tracking_uri: this MLflow refuses file stores unless MLFLOW_ALLOW_FILE_STORE=true")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    spec_from_dict(small_spec(**base, trackers={"mlflow": {"tracking_uri": f"file:{tmp_path}/mlruns"}}))


def test_relative_tracker_paths_become_absolute(tmp_path):
    spec = spec_from_dict(small_spec(study={"storage": "r"}, trackers={
        "mlflow": {"tracking_uri": "sqlite:///r/mlflow.db"}, "wandb": {"dir": "r/wandb", "mode": "offline"}}),
        base_dir=tmp_path)
    assert spec.trackers.mlflow.tracking_uri == f"sqlite:///{tmp_path}/r/mlflow.db"
    assert spec.trackers.wandb.dir == str(tmp_path / "r" / "wandb")
    server = spec_from_dict(small_spec(trackers={"mlflow": {"tracking_uri": "http://127.0.0.1:5000"}}))
    assert server.trackers.mlflow.tracking_uri == "http://127.0.0.1:5000"


def test_a_tracker_whose_package_is_missing_fails_in_one_line(tmp_path, monkeypatch, capsys):
    import yaml

    monkeypatch.setitem(T.PACKAGES, "wandb", ("eos_not_installed_pkg", "wandb"))
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(small_spec(study={"storage": str(tmp_path)}, trackers=["wandb"])))
    assert cli_main(["study", "run", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err == ("eos study run: invalid spec: trackers.wandb: needs the 'eos_not_installed_pkg' package, which "
                   "is not installed (pip install -e .[tracking], or pip install wandb)\n")


def test_step_metrics_keep_the_measured_finite_columns():
    row = {"step": 6, "loss": float("nan"), "lr": 1e-3, "lambda_max": None, "lambda_precond": 30.0,
           "threshold": 38e3, "ratio": 30.0 / 38e3, "eig_residual": 0.01, "grad_norm": 2.0}
    m = step_metrics(row, 7, status="diverged", objective=math.inf, trial="t")
    assert m == {"objective": math.inf, "status": "diverged", "diverged": 1.0, "steps_done": 7,
                 "timesteps_total": 7, "trial": "t", "step": 6, "lr": 1e-3, "lambda_precond": 30.0,
                 "threshold": 38e3, "ratio": 30.0 / 38e3, "eig_residual": 0.01}
    assert step_metrics(None, 3, status="running", objective=0.5, trial="t")["diverged"] == 0.0
    assert "step" not in step_metrics(None, 3, status="running", objective=0.5, trial="t")


# ---------------------------------------------------------------------------
# a study with all three trackers

STEPS, EVERY = 10, 3          # reports after steps 0, 3, 6, 9 (timesteps_total 1, 4, 7, 10)
REPORTED = list(range(0, STEPS, EVERY))
# Adam under init2winit's preconditioner convention (P from the optimizer state before the step):
# λ₁(P⁻¹H) and the ratio from step 1 on, plain λ₁(H) at step 0 (no preconditioner yet), so the
# trackers see columns that are measured at some reported steps and missing at others
CHECKED = ("loss", "lr", "lambda_max", "lambda_precond", "threshold", "ratio", "eig_residual")


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    ray = pytest.importorskip("ray")
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    from study.runner import run_study

    root = tmp_path_factory.mktemp("tracked")
    uri = f"file:{root / 'mlruns'}"
    spec_dict = small_spec(
        study={"name": "tracked", "storage": str(root)}, resources={"max_concurrent": 2},
        sharpness={"every": EVERY, "hessian_batch": 4, "max_iters": 10, "tol": 0.05, "plain_lambda": False,
                   "adam_preconditioner": "init2winit"},
        train={"steps": STEPS, "checkpoint_every": 4, "device": "cpu"},
        trackers={"every": EVERY, "mlflow": {"tracking_uri": uri, "tags": {"owner": "tests"}}, "tensorboard": {},
                  "wandb": {"mode": "offline", "project": "eos-tests"}})   # dir: <study>/wandb
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")   # MLflow 3's opt-in for file stores
        spec = spec_from_dict(spec_dict)
        ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, logging_level=logging.WARNING)
        try:
            outcome = run_study(spec, verbose=0)
        finally:
            ray.shutdown()
    steps = pd.read_parquet(spec.study_dir / "steps")
    steps["trial"] = steps["trial"].astype(str)
    return spec, outcome, uri, steps


def _expected(steps: pd.DataFrame, trial: str, column: str) -> list[tuple[int, float]]:
    """(steps done, value) of the reported steps where the log has the column."""
    own = steps[steps["trial"] == trial].set_index("step")
    return [(s + 1, float(own.loc[s, column])) for s in REPORTED if pd.notna(own.loc[s, column])]


def assert_series(got: list, expected: list, column: str, rel: float = 1e-12) -> None:
    assert [s for s, _ in got] == [s for s, _ in expected], f"{column}: steps"
    assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=rel), f"{column}: values"


def test_the_tracked_study_completes(tracked):
    spec, outcome, _, steps = tracked
    assert outcome.complete and outcome.errors == 0
    for trial in outcome.trials.column("trial_id").to_pylist():
        own = steps[steps["trial"] == trial]
        assert sorted(own["step"]) == list(range(STEPS))
        measured = own.set_index("step").loc[REPORTED]
        assert measured["lambda_max"].notna().tolist() == [True, False, False, False]
        assert measured["lambda_precond"].notna().tolist() == [False, True, True, True]


def test_mlflow_holds_every_reported_step_of_every_trial(tracked):
    from mlflow import MlflowClient

    spec, outcome, uri, steps = tracked
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name("tracked")
        runs = client.search_runs([experiment.experiment_id])
        assert len(runs) == 2
        for run in runs:
            params = run.data.params
            trial = f"{params['variant']}_lr{float(params['lr'])!r}_s{params['seed']}"
            assert run.data.tags["status"] == "completed" and run.data.tags["eos.study"] == "tracked"
            assert run.data.tags["owner"] == "tests" and run.info.status == "FINISHED"
            for column in CHECKED:
                history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, column))
                assert_series(history, _expected(steps, trial, column), column)
            assert [m.value for m in client.get_metric_history(run.info.run_id, "step")] == REPORTED
            diverged = client.get_metric_history(run.info.run_id, "diverged")
            assert {m.value for m in diverged} == {0.0} and max(m.step for m in diverged) == STEPS


def test_tensorboard_event_files_hold_every_reported_step(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    spec, outcome, _, steps = tracked
    folders = {}
    for events in (spec.study_dir / "tune").rglob("events.out.tfevents.*"):
        trial = json.loads((events.parent / "params.json").read_text())
        folders[f"{trial['variant']}_lr{float(trial['lr'])!r}_s{trial['seed']}"] = events.parent
    assert set(folders) == set(outcome.trials.column("trial_id").to_pylist())
    for trial, folder in folders.items():
        acc = EventAccumulator(str(folder)).Reload()
        for column in CHECKED:
            got = [(e.step, e.value) for e in acc.Scalars(f"ray/tune/{column}")]
            assert_series(got, _expected(steps, trial, column), column, rel=1e-6)   # events hold float32


def _wandb_records(path: Path):
    """The protobuf records of a W&B transaction log (``run-<id>.wandb``): a
    LevelDB-style log of 32 KiB blocks after a 7-byte header, each record
    ``crc32c:u32 length:u16 type:u8 data`` with FULL/FIRST/MIDDLE/LAST types."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:                 # block trailer: skip to the next block
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        payload, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def test_wandb_offline_runs_hold_every_reported_step(tracked):
    spec, outcome, _, steps = tracked
    logs = list((spec.study_dir / "wandb").rglob("offline-run-*/run-*.wandb"))
    assert len(logs) == 2
    seen = set()
    for log in logs:
        history, config = [], {}
        for record in _wandb_records(log):
            if record.HasField("history"):
                history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                for item in record.history.item})
            if record.HasField("config"):
                config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        trial = config["trial"]
        seen.add(trial)
        assert config["status"] == "completed" and config["variant"] == "base"
        for column in CHECKED:
            got = [(h["timesteps_total"], h[column]) for h in history if column in h]
            assert_series(got, _expected(steps, trial, column), column)
    assert seen == set(outcome.trials.column("trial_id").to_pylist())
