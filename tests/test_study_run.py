"""Studies end to end on a 2-CPU Ray instance shared by the module: the smoke
preset, Optuna search, divergence as a result, a trial's worker killed
mid-run, an interrupted study resumed, and the analysis report of a study."""
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.dataset as ds
import pytest
import yaml

ray = pytest.importorskip("ray")

from study.layout import StudyLayout  # noqa: E402
from study.cli import main as cli_main  # noqa: E402
from study.runner import run_study  # noqa: E402
from study.spec import load_spec, spec_from_dict  # noqa: E402
from study.trainable import FAULT_ENV  # noqa: E402
from test_study_spec import small_spec  # noqa: E402
from trainers.config import ConfigError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_address():
    # a CPU-only local cluster wherever the tests run (num_gpus=0: a GPU machine's
    # card would otherwise join it, and the no-GPU checks below would not apply)
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, logging_level=logging.WARNING)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def steps_of(study_dir: Path) -> pd.DataFrame:
    """The whole study's per-step dataset in one call."""
    return pd.read_parquet(study_dir / "steps")


def assert_every_step_once(steps: pd.DataFrame, trial: str, n: int) -> None:
    got = sorted(steps.loc[steps["trial"] == trial, "step"].tolist())
    assert got == list(range(n)), f"{trial}: steps {got}"


def trials_of(study_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(study_dir / "trials.parquet").set_index("trial_id")


# ---------------------------------------------------------------------------
# the smoke preset


@pytest.fixture(scope="module")
def smoke(ray_address, tmp_path_factory):
    spec = load_spec("smoke", overrides=[{"study": {"storage": str(tmp_path_factory.mktemp("studies"))}}])
    return spec, run_study(spec, verbose=0)


def test_smoke_preset_writes_every_step_of_every_trial(smoke):
    spec, outcome = smoke
    root = spec.study_dir
    assert outcome.complete and outcome.errors == 0
    trials = trials_of(root)
    expected = {f"{v}_lr{lr!r}_s0" for v in spec.study.variants for lr in spec.search.lr.grid}
    assert set(trials.index) == expected and (trials["status"] == "completed").all()
    assert (trials["steps_done"] == spec.train["steps"]).all()

    steps = steps_of(root)  # one pandas call over the hive-partitioned dataset
    assert set(steps["trial"].astype(str)) == expected
    for t in expected:
        assert_every_step_once(steps, t, spec.train["steps"])
        assert set(steps.loc[steps["trial"] == t, "variant"].astype(str)) == {trials.loc[t, "variant"]}
    # per-step λ₁ (plain H at step 0, where Adam has no preconditioner yet; P⁻¹H after)
    assert steps[["lambda_max", "lambda_precond"]].notna().any(axis=1).all()
    assert steps.loc[steps["step"] >= 1, "ratio"].notna().all()

    # pyarrow reads the same dataset; partition columns live in folder names only
    table = ds.dataset(root / "steps", format="parquet", partitioning="hive").to_table()
    assert table.num_rows == len(steps)
    some_file = next((root / "steps").rglob("part-*.parquet"))
    assert not {"variant", "trial"} & set(ds.dataset(some_file).schema.names)

    # the trials table matches each trial's own log and config
    for t, row in trials.iterrows():
        own = steps[steps["trial"] == t].sort_values("step")
        assert row["final_loss"] == pytest.approx(own["loss"].iloc[-1])
        assert row["max_ratio"] == pytest.approx(own["ratio"].max())
        assert row["final_ratio"] == pytest.approx(own["ratio"].dropna().iloc[-1])
        assert row["objective"] == pytest.approx(row["final_loss"])
        config = json.loads(row["config"])
        assert config["optim"]["lr"] == row["lr"] and config["variant"]["name"] == row["variant"]
        assert (root / row["run_dir"] / "checkpoints").is_dir()
    record = json.loads((root / "study.json").read_text())
    assert spec_from_dict(record["spec"]) == spec


def test_report_builds_from_the_smoke_study(smoke, tmp_path):
    from analysis.load import load
    from analysis.report import build_report

    spec, _ = smoke
    study = load(spec.study_dir)
    assert study.kind == "study" and len(study.trials) == 4
    assert set(study.steps["trial_id"]) == set(study.trials["trial_id"])
    paths = build_report(spec.study_dir, out_dir=tmp_path / "report", quiet=True)
    assert paths.html.is_file() and paths.markdown.is_file()
    per_trial = pd.read_csv(paths.per_trial_csv)
    assert len(per_trial) == 4


def test_an_existing_study_is_not_run_twice(smoke):
    spec, _ = smoke
    with pytest.raises(ConfigError, match=r"^study\.name: .* already holds this study; continue it with "
                                          r"`eos study resume"):
        run_study(spec)


def test_gpu_trials_on_a_machine_without_gpu_fail_before_launch(ray_address, tmp_path):
    spec = spec_from_dict(small_spec(study={"storage": str(tmp_path)}, resources={"gpu": 0.25}))
    with pytest.raises(ConfigError, match=r"^resources\.gpu: 0\.25 GPU per trial, but this machine has no GPU"):
        run_study(spec)
    assert not (tmp_path / "t" / "runs").exists() and not (tmp_path / "t" / "study.json").exists()


# ---------------------------------------------------------------------------
# Optuna


def test_optuna_search_proposes_lrs_in_the_space_and_its_study_persists(ray_address, tmp_path):
    spec = spec_from_dict(small_spec(
        study={"name": "opt", "storage": str(tmp_path)},
        search={"algorithm": "optuna", "lr": {"log_uniform": [1e-4, 1e-2]}, "num_samples": 3, "seed": 3},
        resources={"max_concurrent": 2}, train={"steps": 3, "checkpoint_every": 2}))
    outcome = run_study(spec, verbose=0)
    assert outcome.complete
    trials = trials_of(spec.study_dir)
    assert len(trials) == 3 and (trials["status"] == "completed").all()
    assert trials["lr"].between(1e-4, 1e-2).all() and trials["lr"].nunique() == 3
    steps = steps_of(spec.study_dir)
    for t in trials.index:
        assert_every_step_once(steps, t, 3)

    # a new process opens the Optuna study from the journal file under the study folder
    journal = spec.study_dir / "optuna.journal"
    code = (
        "import json, optuna\n"
        "from study.search import journal_storage\n"
        f"s = optuna.load_study(study_name='opt/base/seed0', storage=journal_storage({str(journal)!r}))\n"
        "print(json.dumps([[t.state.name, t.params['lr'], t.value] for t in s.trials]))\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=REPO)
    stored = json.loads(out.stdout)
    assert [state for state, _, _ in stored] == ["COMPLETE"] * 3
    assert sorted(lr for _, lr, _ in stored) == sorted(trials["lr"])
    by_lr = trials.set_index("lr")["objective"]
    for _, lr, value in stored:
        assert value == pytest.approx(by_lr[lr])


# ---------------------------------------------------------------------------
# divergence is a result; a killed worker is retried from its checkpoint


@pytest.fixture(scope="module")
def faulty(ray_address, tmp_path_factory):
    """One study with a diverging learning rate and a worker SIGKILLed mid-run.

    Adam at lr 1 on the tiny model: the loss jumps ~100× at step 1, which
    ``early_stop.loss_blowup: 20`` catches.  The lr 1e-3 trial is killed at
    step 5 (its last checkpoint: step 3); the lr 1 trial has diverged before
    reaching step 5."""
    root = tmp_path_factory.mktemp("faulty")
    marker = root / "killed"
    spec = spec_from_dict(small_spec(
        study={"name": "faulty", "storage": str(root), "objective": "largest_stable_lr", "max_failures": 2},
        search={"lr": {"grid": [1e-3, 1.0]}}, resources={"max_concurrent": 2},
        early_stop={"loss_blowup": 20}, train={"steps": 9, "checkpoint_every": 3}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(FAULT_ENV, f"5:{marker}")
        outcome = run_study(spec, verbose=0)
    return spec, outcome, marker


def test_a_diverging_lr_ends_as_diverged_while_the_others_complete(faulty):
    spec, outcome, _ = faulty
    assert outcome.complete and outcome.errors == 0
    trials = trials_of(spec.study_dir)
    ok, bad = trials.loc["base_lr0.001_s0"], trials.loc["base_lr1.0_s0"]
    assert ok["status"] == "completed" and ok["steps_done"] == 9 and ok["objective"] == 1e-3
    assert bad["status"] == "diverged" and "first loss" in bad["reason"]
    assert bad["steps_done"] < 5 and bad["objective"] == 0.0
    steps = steps_of(spec.study_dir)
    assert_every_step_once(steps, "base_lr1.0_s0", int(bad["steps_done"]))
    diverged = steps[steps["trial"] == "base_lr1.0_s0"].sort_values("step")["loss"]
    assert diverged.iloc[-1] > 20 * diverged.iloc[0]


def test_a_killed_trial_restarts_from_its_checkpoint_and_logs_each_step_once(faulty):
    spec, outcome, marker = faulty
    root = spec.study_dir
    assert marker.is_file(), "the fault was not injected"
    assert trials_of(root).loc["base_lr0.001_s0", "status"] == "completed"
    assert_every_step_once(steps_of(root), "base_lr0.001_s0", 9)
    # Tune saw the worker die and retried the trial ...
    errors = list((root / "tune").glob("base_lr0.001_s0-*/error.txt"))
    assert errors and "died" in errors[0].read_text().lower()
    # ... which resumed from the checkpoint at step 3 instead of starting over: the log chunk of
    # steps 0-2 was written before the kill and never rewritten
    first_chunk = root / "steps/variant=base/trial=base_lr0.001_s0/part-000000000-000000002.parquet"
    assert first_chunk.is_file() and first_chunk.stat().st_mtime <= marker.stat().st_mtime


def test_an_interrupted_study_resumes_and_ends_with_all_trials(ray_address, tmp_path):
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(small_spec(
        study={"name": "intr", "storage": str(tmp_path)},
        search={"lr": {"grid": [1e-3, 5e-4, 2e-4]}}, resources={"max_concurrent": 1},
        train={"steps": 12, "checkpoint_every": 4})))
    root = tmp_path / "intr"
    # a driver in its own process, on this module's Ray instance (--address), stopped with
    # SIGINT (Ctrl+C) once the first trial finished
    driver = subprocess.Popen([sys.executable, "-m", "study.cli", "study", "run", str(spec_path),
                               "--address", ray_address, "--verbose", "0"], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not any(json.loads(p.read_text())["status"] == "completed"
                      for p in root.glob("runs/*/status.json")):
            assert driver.poll() is None, driver.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "no trial finished in time"
            time.sleep(0.5)
        driver.send_signal(signal.SIGINT)
        output = driver.communicate(timeout=120)[0]
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 1, output[-3000:]  # exit status 1: unfinished
    assert "eos study resume" in output
    before = trials_of(root)
    assert (before["status"] == "completed").sum() < 3
    assert set(before["status"]) <= {"completed", "running"}

    # `eos study resume` (in this process: it finds Ray running and uses it)
    assert cli_main(["study", "resume", str(root), "--verbose", "0"]) == 0
    trials = trials_of(root)
    assert len(trials) == 3 and (trials["status"] == "completed").all()
    steps = steps_of(root)
    for t in trials.index:
        assert_every_step_once(steps, t, 12)
