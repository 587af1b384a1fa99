"""A quiet, useful terminal for a study (issue 18.7): the eos progress view
instead of Tune's tables, Ray's noise off unless --verbose, no colour codes."""
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")

from study.progress import ProgressView, quiet_ray  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class _Trial:
    def __init__(self, name):
        self.name = name

    def __str__(self):
        return self.name


def test_the_progress_view_counts_trials_steps_and_shows_the_ratio():
    now = [0.0]
    out = io.StringIO()
    view = ProgressView(total_trials=3, steps_per_trial=10, stream=out, clock=lambda: now[0])
    a, b = _Trial("base_lr0.001_s0"), _Trial("edm_lr0.001_s0")
    view.on_trial_start(0, [], a)
    view.on_trial_start(0, [], b)
    view.on_trial_result(0, [], a, {"steps_done": 2, "ratio": 0.52})
    view.on_trial_result(0, [], b, {"steps_done": 2, "latest_ratio": 1.31})
    now[0] = 4.0
    view.on_trial_result(0, [], a, {"steps_done": 6, "ratio": 0.61})   # under every_s: no line
    now[0] = 12.0
    view.on_trial_result(0, [], b, {"steps_done": 10, "status": "diverged", "reason": "loss blew up"})
    view.on_trial_complete(0, [], b)
    lines = out.getvalue().splitlines()
    assert lines[0] == "[eos] 0/3 done (0 diverged, 0 error), 1 running | base_lr0.001_s0 step 0/10"
    # rate: 14 steps in 12 s since the first report (2 steps); left: 4 of a + 10 of the third trial
    assert lines[-3] == ("[eos] 0/3 done (0 diverged, 0 error), 2 running | 1.17 steps/s | ETA 0:00:12 | "
                         "base_lr0.001_s0 step 6/10 λ₁/threshold 0.61, edm_lr0.001_s0 step 10/10 λ₁/threshold 1.31")
    assert lines[-2] == "[eos] edm_lr0.001_s0 diverged after 10 steps, last λ₁/threshold 1.31: loss blew up"
    assert lines[-1] == ("[eos] 1/3 done (1 diverged, 0 error), 1 running | 1.17 steps/s | ETA 0:00:12 | "
                         "base_lr0.001_s0 step 6/10 λ₁/threshold 0.61")
    assert "\x1b[" not in out.getvalue()


def test_the_tuner_restore_hint_is_dropped_even_when_verbose():
    import logging

    quiet_ray(quiet=False)
    logger = logging.getLogger("ray.tune.tune")
    record = logger.makeRecord("ray.tune.tune", logging.WARNING, __file__, 1,
                               "Experiment has been interrupted, but the most recent state was saved.\n"
                               "Resume experiment with: Tuner.restore(path=\"/x\", trainable=...)", (), None)
    assert not logger.filter(record)


def test_a_study_prints_the_progress_view_and_none_of_rays_noise(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_AIR_NEW_OUTPUT", None)
    out = subprocess.run([sys.executable, "-m", "study.cli", "study", "run", "smoke", "--num-cpus", "2",
                          "--set", f"study.storage={tmp_path}", "--set", "search.lr.grid=[1e-3]",
                          "--set", "study.variants=[base]", "--set", "train.steps=4",
                          "--set", "train.checkpoint_every=2"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    for noise in ("╭", "Token authentication", "tensorboard", "TensorBoard", "Tuner.restore", "View detailed results",
                  "Trial status", "(run_trial pid", "\x1b["):
        assert noise not in text, noise
    lines = [line for line in text.splitlines() if line.strip()]
    assert all(line.startswith("[eos]") for line in lines), text
    done = [line for line in lines if line.startswith("[eos] base_lr0.001_s0 completed after 4 steps, last λ₁/threshold ")]
    assert done, text                                        # λ₁/threshold reported with the trial's checkpoint
    assert "[eos] 1/1 done (0 diverged, 0 error), 0 running" in "\n".join(lines)
