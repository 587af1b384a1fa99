"""The study's terminal output: one concise progress view instead of Tune's tables.

:class:`ProgressView` is a Ray Tune :class:`~ray.tune.Callback` in the driver.
It prints one plain line (no colour codes, no boxes) when a trial starts or
ends and at most every :attr:`ProgressView.every_s` seconds in between::

    [eos] 1/4 done (0 diverged, 0 error), 2 running | 3.2 steps/s | ETA 0:00:05 | base_lr0.001_s0 step 4/6 λ₁/threshold 0.52, ...

with trials done (completed or diverged) / all, diverged, failed, running,
the training steps per second over all trials, the time left at that rate,
and each running trial's last reported step and λ₁/threshold.  Trials report
every ``trackers.every`` steps and at their checkpoints (:mod:`study.trainable`).

``eos study run/resume`` use it unless ``--verbose`` asks for Ray Tune's own
output (:func:`quiet_ray`: Tune ``verbose=0`` with its legacy output engine
(``RAY_AIR_NEW_OUTPUT=0``), Ray's log level ERROR and no worker logs in the
driver (``log_to_driver=False``), so neither Tune's tables, nor the
token-auth warning, nor the TensorBoard and ``Tuner.restore`` hints appear).
"""
from __future__ import annotations

import datetime
import logging
import os
import sys
import time
from typing import Optional, TextIO

from ray.tune import Callback

from trainers.run.rundir import DIVERGED, ERROR

#: Ray's loggers silenced by :func:`quiet_ray` (the Tuner.restore hint, retries, checkpoint lines)
RAY_LOGGERS = ("ray", "ray.tune", "ray.train", "ray.air")


class _NoTunerRestoreHint(logging.Filter):
    """Drops Tune's "Resume experiment with: Tuner.restore(...)": a study resumes with ``eos study resume``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tuner.restore(" not in record.getMessage()


def quiet_ray(quiet: bool = True) -> None:
    """Tune's ``Tuner.restore`` hint off; with ``quiet`` (``eos study run``
    without ``--verbose``) also Ray's and Tune's own messages below ERROR."""
    tune_logger = logging.getLogger("ray.tune.tune")
    if not any(isinstance(f, _NoTunerRestoreHint) for f in tune_logger.filters):
        tune_logger.addFilter(_NoTunerRestoreHint())
    if quiet:
        for name in RAY_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        # Tune's new output engine prints its configuration box and the TensorBoard hint even at
        # verbose=0; the legacy engine at verbose=0 prints nothing (read when Tuner.fit starts)
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


def _eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(round(seconds))))


class ProgressView(Callback):
    """Concise progress of a study (see the module docstring).

    ``total_trials``: all trials (for a boundary search: at most);
    ``steps_per_trial``: train.steps of each."""

    every_s = 10.0

    def __init__(self, total_trials: int, steps_per_trial: int, stream: Optional[TextIO] = None,
                 clock=time.monotonic):
        self.total_trials = total_trials
        self.steps_per_trial = steps_per_trial
        self.stream = stream   # None: sys.stdout at each line (the callback is pickled with the Tuner)
        self.clock = clock
        self.running: dict[str, dict] = {}     # trial name -> last result
        self.ended: dict[str, str] = {}        # trial name -> status
        self.steps: dict[str, int] = {}        # trial name -> steps done
        self._ratios: dict[str, float] = {}    # trial name -> last reported λ₁/threshold
        self._start: Optional[float] = None
        self._start_steps = 0
        self._last_print = -float("inf")

    # --- what Tune calls ----------------------------------------------------
    def on_trial_start(self, iteration, trials, trial, **info):
        self.running.setdefault(str(trial), {})
        self._print_line(force=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        name = str(trial)
        self.running[name] = result
        ratio = result.get("ratio", result.get("latest_ratio"))
        if ratio is not None:
            self._ratios[name] = ratio
        self._count_steps(name, result)
        self._print_line()

    def on_trial_complete(self, iteration, trials, trial, **info):
        name = str(trial)
        last = self.running.pop(name, None) or {}
        self._count_steps(name, last)
        self.ended[name] = str(last.get("status") or "completed")
        ratio = last.get("ratio", last.get("latest_ratio", self._ratios.get(name)))
        ratio = f", last λ₁/threshold {ratio:.3g}" if ratio is not None else ""
        reason = f": {last['reason']}" if last.get("reason") else ""
        self._write(f"[eos] {name} {self.ended[name]} after {self.steps.get(name, 0)} steps{ratio}{reason}")
        self._print_line(force=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        name = str(trial)
        self.running.pop(name, None)
        self.ended[name] = ERROR
        self._write(f"[eos] {name} failed (Tune retries it from its checkpoint while study.max_failures allows; "
                    "the reason is in the trials table)")
        self._print_line(force=True)

    # --- the line -------------------------------------------------------------
    def _count_steps(self, name: str, result: dict) -> None:
        done = result.get("steps_done")
        if done is None:
            return
        if self._start is None:   # the rate counts from the first report on
            self._start, self._start_steps = self.clock(), sum(self.steps.values()) + int(done)
        self.steps[name] = int(done)

    def line(self) -> str:
        statuses = list(self.ended.values())
        done = sum(s != ERROR for s in statuses)
        parts = [f"[eos] {done}/{self.total_trials} done ({statuses.count(DIVERGED)} diverged, "
                 f"{statuses.count(ERROR)} error), {len(self.running)} running"]
        total_steps = sum(self.steps.values())
        elapsed = self.clock() - self._start if self._start is not None else 0.0
        if elapsed > 0:
            rate = (total_steps - self._start_steps) / elapsed
            parts.append(f"{rate:.2f} steps/s")
            left = sum(self.steps_per_trial - self.steps.get(n, 0) for n in self.running) + \
                max(0, self.total_trials - len(self.ended) - len(self.running)) * self.steps_per_trial
            if rate > 0:
                parts.append(f"ETA {_eta(left / rate)}")
        trials = []
        for name, result in sorted(self.running.items()):
            text = f"{name} step {result.get('steps_done', 0)}/{self.steps_per_trial}"
            ratio = self._ratios.get(name)
            if ratio is not None:
                text += f" λ₁/threshold {ratio:.3g}"
            trials.append(text)
        if trials:
            parts.append(", ".join(trials))
        return " | ".join(parts)

    def _print_line(self, force: bool = False) -> None:
        now = self.clock()
        if force or now - self._last_print >= self.every_s:
            self._last_print = now
            self._write(self.line())

    def _write(self, text: str) -> None:
        print(text, file=self.stream if self.stream is not None else sys.stdout, flush=True)
