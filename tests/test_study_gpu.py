"""GPU trials of a study on this machine's own Ray instance (CUDA only):
trials sharing a GPU (resources.gpu 0.5) in worker processes that Tune
reuses from one trial to the next (reuse_actors), one worker SIGKILLed
mid-run: every trial completes on the GPU, every step logged once."""
import pandas as pd
import pytest
import torch

ray = pytest.importorskip("ray")

from study.runner import run_study  # noqa: E402
from study.spec import spec_from_dict  # noqa: E402
from study.trainable import FAULT_ENV  # noqa: E402
from test_study_spec import small_spec  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_gpu_trials_in_reused_workers_complete_with_every_step_once(tmp_path, monkeypatch):
    marker = tmp_path / "killed"
    spec = spec_from_dict(small_spec(
        study={"name": "gpu", "storage": str(tmp_path), "max_failures": 2},
        search={"lr": {"grid": [1e-3, 5e-4, 2e-4, 1e-4]}},
        resources={"cpu": 1, "gpu": 0.5, "max_concurrent": 2, "mps": False},
        train={"steps": 8, "checkpoint_every": 2, "device": "cuda"}))
    monkeypatch.setenv(FAULT_ENV, f"5:{marker}")
    outcome = run_study(spec, verbose=0)
    assert marker.is_file(), "the fault was not injected"
    assert outcome.complete and outcome.errors == 0
    trials = pd.read_parquet(spec.study_dir / "trials.parquet").set_index("trial_id")
    assert len(trials) == 4 and (trials["status"] == "completed").all()
    steps = pd.read_parquet(spec.study_dir / "steps")
    for trial in trials.index:
        assert sorted(steps.loc[steps["trial"] == trial, "step"]) == list(range(8)), trial
    assert not list((spec.study_dir / "tune").rglob("checkpoint_*"))   # one copy: the run folder's
