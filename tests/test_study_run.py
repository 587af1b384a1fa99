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
from study.trainable import FAULT_ENV, FULL_DISK_ENV  # noqa: E402
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


def test_every_checkpoint_is_stored_once_in_its_run_folder(smoke):
    spec, _ = smoke
    root = spec.study_dir
    assert not list((root / "tune").rglob("checkpoint_*")), "Tune holds copies of the checkpoints"
    assert not list((root / "tune").rglob("*.pt"))
    for run in (root / "runs").iterdir():
        assert list((run / "checkpoints").glob("ckpt-*.pt")), run


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


def test_an_interrupted_study_resumes_and_ends_with_all_trials(ray_address, tmp_path, capsys):
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
        # a second driver on the running study (here `resume`, as an overlapping resubmission) is refused
        assert cli_main(["study", "resume", str(root), "--verbose", "0"]) == 2
        assert f"is in use by another driver (pid {driver.pid} " in capsys.readouterr().err
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


def test_a_study_whose_tune_state_was_cut_short_resumes_from_its_run_folders(ray_address, tmp_path, capsys):
    """A kill or a full disk while Tune writes its state leaves a 0-byte
    experiment_state-*.json; Tuner.restore would fail on it (JSONDecodeError,
    then KeyError 'variant').  Resume sets it aside and continues from the run
    folders: the trial killed at step 3 resumes from its step-2 checkpoint."""
    marker = tmp_path / "killed"
    spec = spec_from_dict(small_spec(study={"name": "cut", "storage": str(tmp_path), "max_failures": 0},
                                     resources={"max_concurrent": 1}, search={"lr": {"grid": [1e-3]}}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(FAULT_ENV, f"3:{marker}")
        first = run_study(spec, verbose=0)
    assert marker.is_file() and first.errors == 1
    root = spec.study_dir
    states = list((root / "tune").glob("experiment_state-*.json"))
    assert states
    for state in states:
        state.write_bytes(b"")
    # what a crash mid-write leaves besides (writers' hidden temporaries): cleared when the driver starts
    run = root / "runs/base_lr0.001_s0"
    stale = [root / ".trials.parquet.tmp-99999", run / ".status.json.tmp-99999",
             run / "checkpoints/.ckpt-000000004.pt.tmp-99999", run / "steps/.part-000000002-000000003.parquet.tmp-9"]
    for path in stale:
        path.write_bytes(b"partial")
    capsys.readouterr()
    outcome = run_study(spec, verbose=0, resume=True)
    out = capsys.readouterr().out
    assert f"[eos] removed 4 temporary file(s) left in {root} by an interrupted write" in out
    assert not any(p.exists() for p in stale)
    assert f"[eos] Tune's state in {root / 'tune'} is damaged (experiment_state-" in out
    assert "resuming from the run folders instead" in out
    assert outcome.complete and outcome.errors == 0
    assert trials_of(root).loc["base_lr0.001_s0", "status"] == "completed"
    assert_every_step_once(steps_of(root), "base_lr0.001_s0", 4)
    assert all((s.parent / f".{s.name}.damaged").is_file() for s in states)
    chunk = root / "steps/variant=base/trial=base_lr0.001_s0/part-000000000-000000001.parquet"
    assert chunk.stat().st_mtime <= marker.stat().st_mtime   # steps 0-1 were not trained again


def test_a_full_disk_stops_the_study_with_one_clear_line_and_it_resumes(ray_address, tmp_path, capsys):
    """The first trial's checkpoint after step 2 fails as on a full disk (a
    partial file, then ENOSPC): the study stops at once (no retries into the
    full disk), says which file and how much space in one line, removes the
    partial file, writes the trials table, and `eos study resume` finishes it."""
    marker = tmp_path / "disk-filled"
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(small_spec(
        study={"name": "full", "storage": str(tmp_path), "max_failures": 2},
        resources={"max_concurrent": 1}, train={"steps": 6, "checkpoint_every": 2})))
    root = tmp_path / "full"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(FULL_DISK_ENV, f"2:{marker}")
        assert cli_main(["study", "run", str(spec_path), "--verbose", "0"]) == 1
    assert marker.is_file(), "the fault was not injected"
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    ckpt = root / "runs/base_lr0.001_s0/checkpoints"   # the first trial (grid order, one at a time)
    assert line.startswith(f"eos study run: no space left on device: writing {ckpt / 'ckpt-000000004.pt'} "
                           "failed with "), line
    assert "it needs about " in line and "(the size of ckpt-000000002.pt)" in line
    assert line.endswith(f"the study stopped and can be resumed: free space on that file system, then "
                         f"`eos study resume {root}`")
    assert "Traceback" not in err
    assert not list(root.rglob(".*.tmp-*")), "temporary files left behind"
    trials = trials_of(root)          # written, with the stopped trial unfinished
    assert trials.loc["base_lr0.001_s0", "status"] == "running"
    # Tune did not retry the trial into the full disk: one failure only
    errors = list((root / "tune").glob("base_lr0.001_s0-*/error.txt"))
    assert len(errors) == 1 and errors[0].read_text().count("Failure #") == 1

    assert cli_main(["study", "resume", str(root), "--verbose", "0"]) == 0   # space again (the marker)
    trials = trials_of(root)
    assert len(trials) == 2 and (trials["status"] == "completed").all()
    steps = steps_of(root)
    for t in trials.index:
        assert_every_step_once(steps, t, 6)


# ---------------------------------------------------------------------------
# the boundary search


def test_boundary_search_under_tune_finds_each_synthetic_boundary(ray_address, tmp_path):
    """BoundarySearch as built for a study (ConcurrencyLimiter, num_samples cap), in a real Tuner, with a
    function trainable that is stable iff lr < the variant's boundary: every boundary within the factor 1.1
    in at most 8 trials per variant."""
    from ray import tune

    from study.boundary import read_state, state_finished
    from study.search import METRIC, build_search

    boundaries = {"base": 2.2e-4, "edm": 1.37e-3, "vparam": 3.1e-2}
    spec = spec_from_dict(small_spec(
        study={"name": "bnd", "variants": list(boundaries), "storage": str(tmp_path),
               "objective": "largest_stable_lr"},
        search={"algorithm": "boundary", "lr": {"bracket": [1e-5, 1e-1]}}, resources={"max_concurrent": 2}))
    layout = StudyLayout(spec.study_dir)

    def synthetic(config):
        stable = config["lr"] < boundaries[config["variant"]]
        tune.report({"objective": config["lr"] if stable else 0.0, "status": "completed" if stable else "diverged",
                     "reason": None if stable else "synthetic divergence"})

    param_space, search_alg, num_samples, _ = build_search(spec, layout)
    assert num_samples == 3 * 8
    grid = tune.Tuner(
        tune.with_resources(synthetic, {"cpu": 1}), param_space=param_space,
        tune_config=tune.TuneConfig(metric=METRIC, mode=spec.mode, search_alg=search_alg, num_samples=num_samples,
                                    reuse_actors=True),
        run_config=tune.RunConfig(name="tune", storage_path=str(layout.root), verbose=0)).fit()
    tried: dict[str, list[float]] = {}
    for result in grid:
        assert result.error is None
        tried.setdefault(result.config["variant"], []).append(result.config["lr"])
    state = read_state(layout.boundary_state)
    assert state_finished(state)
    for entry in state["searches"]:
        lrs = tried[entry["variant"]]
        assert len(lrs) <= 8 and len(set(lrs)) == len(lrs)
        assert sorted(lrs) == sorted(t["lr"] for t in entry["trials"])
        assert entry["status"] == "found" and entry["lo"] < boundaries[entry["variant"]] <= entry["hi"]
        assert entry["hi"] / entry["lo"] <= 1.1
        assert {t["reason"] for t in entry["trials"] if t["verdict"] == "unstable"} == {"synthetic divergence"}


def test_an_interrupted_boundary_study_resumes_its_bracket_without_repeating_trials(ray_address, tmp_path, capsys):
    """A real boundary study (tiny model, Adam; unstable = the loss 20× its first value), stopped with SIGINT
    after two trials and resumed: the bisection goes on from the state file, every lr runs once (one Tune
    trial and one run folder each), and the lrs are the ones an uninterrupted bisection with these verdicts
    tries."""
    from analysis.report import build_report
    from study.boundary import BracketSearch, read_state, state_finished

    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(small_spec(
        study={"name": "bnd", "storage": str(tmp_path), "objective": "largest_stable_lr"},
        search={"algorithm": "boundary", "lr": {"bracket": [1e-3, 1.0]}, "boundary": {"k": 1, "factor": 2.0}},
        resources={"max_concurrent": 1}, early_stop={"loss_blowup": 20},
        train={"steps": 4, "checkpoint_every": 2})))
    root = tmp_path / "bnd"
    driver = subprocess.Popen([sys.executable, "-m", "study.cli", "study", "run", str(spec_path),
                               "--address", ray_address, "--verbose", "0"], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while len((read_state(root / "boundary.json") or {"searches": [{"trials": []}]})["searches"][0]["trials"]) < 2:
            assert driver.poll() is None, driver.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "two trials did not finish in time"
            time.sleep(0.3)
        # a second driver on the running study (here `resume`, as an overlapping resubmission) is refused
        assert cli_main(["study", "resume", str(root), "--verbose", "0"]) == 2
        assert f"is in use by another driver (pid {driver.pid} " in capsys.readouterr().err
        driver.send_signal(signal.SIGINT)
        output = driver.communicate(timeout=120)[0]
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 1, output[-3000:]
    before = read_state(root / "boundary.json")
    assert not state_finished(before)
    judged_before = [t["lr"] for t in before["searches"][0]["trials"]]
    assert len(judged_before) >= 2

    assert cli_main(["study", "resume", str(root), "--verbose", "0"]) == 0
    state = read_state(root / "boundary.json")
    assert state_finished(state)
    entry = state["searches"][0]
    lrs = [t["lr"] for t in entry["trials"]]
    assert lrs[:len(judged_before)] == judged_before      # the verdicts before the interruption were kept
    assert len(lrs) == len(set(lrs))
    # one Tune trial and one run folder per lr: nothing ran twice
    trials = trials_of(root)
    assert sorted(trials["lr"]) == sorted(lrs) and len(list((root / "tune").glob("base_lr*-*"))) == len(lrs)
    assert set(trials["status"]) <= {"completed", "diverged"}
    verdict = {t["lr"]: t["verdict"] for t in entry["trials"]}
    for t, row in trials.iterrows():
        assert verdict[row["lr"]] == ("stable" if row["status"] == "completed" else "unstable")
        if row["status"] == "diverged":
            assert "first loss" in row["reason"]
    # the same verdicts fed to a fresh bisection give the same lrs in the same order
    replay = BracketSearch(1e-3, 1.0, 1, 2.0)
    order = []
    while replay.open_points():
        lr = replay.open_points()[0]
        order.append(lr)
        replay.record(lr, verdict[lr] == "stable")
    assert order == lrs and replay.status == entry["status"]
    steps = steps_of(root)
    for t, row in trials.iterrows():
        assert_every_step_once(steps, t, int(row["steps_done"]))
    # the report has the boundary table and figure
    paths = build_report(root, out_dir=tmp_path / "report", quiet=True)
    assert "boundary" in paths.figures
    assert "Largest stable learning rate" in paths.markdown.read_text(encoding="utf-8")
