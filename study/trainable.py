"""The Tune function trainable: one trial = one :func:`trainers.run.loop.train` run.

A trial's run folder is ``<study>/runs/<trial_id>`` with ``trial_id`` a pure
function of (variant, lr, seed), so whoever runs the trial — the first
attempt, Tune's retry after a crash (``FailureConfig(max_failures)``), or a
resumed study — finds the same folder and the trainer resumes it exactly
(newest checkpoint, log cut back to it).

Every ``trackers.every`` steps the trial reports the step's measurements to
Tune (:func:`step_metrics`), which hands them to Tune's loggers and the
spec's trackers (:mod:`study.trackers`); so does every trainer checkpoint,
with the metrics only: the checkpoint itself stays in the run folder, the one
copy a retried or resumed trial resumes from (Tune's copy of each checkpoint
in ``tune/`` doubled the disk a study uses and the time each checkpoint
takes).  A study started by an earlier version may still have Tune
checkpoints: a retried trial gets its newest from ``tune.get_checkpoint()``
and puts it back into the run folder when the folder lacks one as new.

Bad input (a :class:`trainers.config.ConfigError`: data, Inception weights,
device; :mod:`trainers.run.preflight`) ends the trial without raising, with a
last result ``status: error`` and its ``reason``: Tune does not retry it
(it would fail the same way) and the trials table shows the reason.

Divergence is a result: the early-stop rules (:mod:`study.early_stop`)
return ``("diverged", reason)`` from the trainer's ``on_step`` and the trial
ends normally with that status and reason.

Test-only fault injection: when the driver's environment has
``EOS_STUDY_KILL_AT_STEP=<step>:<marker file>``, the first trial to reach
``<step>`` creates the marker and SIGKILLs its own worker process (trials
that find the marker carry on), to exercise Tune's restart from checkpoint.
``EOS_STUDY_FULL_DISK_AT_STEP=<step>:<marker file>`` instead makes that
trial's next checkpoint write fail as on a full disk (a partial file, then
``ENOSPC``), once.
"""
from __future__ import annotations

import logging
import math
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from study.early_stop import DivergenceMonitor
from study.layout import StudyLayout
from study.spec import StudySpec, TrialKey
from study.trials import objective_value, trial_row
from trainers.run.rundir import DIVERGED, ERROR, RUNNING, RunDir, checkpoint_step

FAULT_ENV = "EOS_STUDY_KILL_AT_STEP"
FULL_DISK_ENV = "EOS_STUDY_FULL_DISK_AT_STEP"


@dataclass(frozen=True)
class FaultInjection:
    """Inject a fault once, at ``step``, guarded by an atomically created
    ``marker`` file: ``kill`` the worker, or make the next checkpoint write
    fail with ``ENOSPC`` (``full_disk``)."""
    step: int
    marker: str
    kind: str = "kill"

    @classmethod
    def from_env(cls) -> Optional["FaultInjection"]:
        for env, kind in ((FAULT_ENV, "kill"), (FULL_DISK_ENV, "full_disk")):
            value = os.environ.get(env)
            if not value:
                continue
            step, _, marker = value.partition(":")
            if not marker:
                raise ValueError(f"{env}: expected <step>:<marker file>; got {value!r}")
            return cls(int(step), os.path.abspath(marker), kind)
        return None

    def maybe_kill(self, step: int) -> None:
        if step != self.step:
            return
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        if self.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        else:
            _fail_next_torch_save()


def _fail_next_torch_save() -> None:
    """The next ``torch.save`` in this process writes 64 KB, then fails as on a full disk."""
    import errno

    import torch

    original = torch.save

    def save(obj, f, *args, **kwargs):
        torch.save = original
        with open(f, "wb") as out:
            out.write(b"\0" * 65536)
        raise OSError(errno.ENOSPC, "No space left on device")

    torch.save = save


@dataclass(frozen=True)
class TrialPlan:
    """What every trial of a study shares (sent once to the workers)."""
    spec: StudySpec
    root: str                  # the study folder
    single: bool = False       # a one-trial study: the trainer prints its progress lines
    fault: Optional[FaultInjection] = None


def restore_checkpoint(checkpoint, run: RunDir) -> Optional[Path]:
    """Copy the trainer checkpoint held by a Tune ``checkpoint`` into the run
    folder unless the folder already has one as new."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        files = sorted(Path(d).glob(RunDir.CHECKPOINT_GLOB), key=checkpoint_step)
        return run.add_checkpoint(files[-1]) if files else None


def _finite_or_none(value) -> Optional[float]:
    return None if value is None or not math.isfinite(value) else float(value)


# the step-log columns a trial reports to Tune every trackers.every steps
STEP_METRICS = ("loss", "lr", "lambda_max", "lambda_precond", "threshold", "ratio", "eig_residual")


def step_metrics(row: Optional[dict], steps_done: int, *, status: str, objective: float, trial: str) -> dict:
    """A result for ``tune.report``: ``objective``, ``status`` (and as a
    number ``diverged``: 1.0 or 0.0), ``steps_done`` and ``timesteps_total``
    (both the optimizer steps done: the trackers' step axis) and ``trial``;
    with a step-log ``row`` also its ``step`` and its :data:`STEP_METRICS`
    columns that were measured at that step (finite values only)."""
    metrics = {"objective": objective, "status": status, "diverged": float(status == DIVERGED),
               "steps_done": int(steps_done), "timesteps_total": int(steps_done), "trial": trial}
    if row is not None:
        metrics["step"] = int(row["step"])
        for name in STEP_METRICS:
            value = _finite_or_none(row.get(name))
            if value is not None:
                metrics[name] = value
    return metrics


#: share of its GPU slice a trial's allocator leaves free: the CUDA context and libraries of each process sharing
#: the GPU live outside PyTorch's allocator
GPU_MEMORY_HEADROOM = 0.04


def cap_gpu_memory(gpu: float, device) -> Optional[float]:
    """Limit PyTorch's allocator in a trial that holds ``gpu`` < 1 of a GPU to
    that share of the device's memory, less :data:`GPU_MEMORY_HEADROOM`
    (``torch.cuda.set_per_process_memory_fraction``).  At the limit the
    caching allocator first frees what the trial itself holds cached but
    unused, and retries, before it raises out-of-memory; without a limit a
    trial's cache keeps every block its probe once needed, memory the other
    trials on the GPU cannot use.  Returns the fraction set, or None (a whole
    GPU or more, or a device that is not CUDA).
    """
    import torch

    device = torch.device(device)
    if not 0 < gpu < 1 or device.type != "cuda":
        return None
    fraction = gpu * (1 - GPU_MEMORY_HEADROOM)
    index = device.index if device.index is not None else torch.cuda.current_device()
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    return fraction


def run_trial(config: dict, plan: TrialPlan) -> None:
    """Tune entry point: ``config`` holds ``variant``, ``lr`` and ``seed``."""
    import torch
    from ray import tune

    from trainers.config import ConfigError
    from analysis.metrics import opening_steps
    from trainers.run.loop import resolve_device, train
    from trainers.run.preflight import check_run_inputs

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one "checkpoint created" line per checkpoint
    spec = plan.spec
    key = TrialKey(str(config["variant"]), float(config["lr"]), int(config["seed"]))
    layout = StudyLayout(Path(plan.root))
    run = layout.prepare_run_dir(key.variant, key.trial_id)
    cfg = spec.run_config(key.variant, key.lr, key.seed)
    torch.set_num_threads(max(1, int(spec.resources.cpu)))
    if torch.cuda.is_available() and cfg.train.device != "cpu":   # a GPU slice: its share of the memory
        cap_gpu_memory(spec.resources.gpu, resolve_device(cfg.train.device))
    restore_checkpoint(tune.get_checkpoint(), run)   # a study of an earlier version (module docstring)

    monitor = DivergenceMonitor(spec.early_stop, opening=opening_steps(cfg.to_dict()))
    seen = {"primed": False, "loss": None, "fid": None, "row": None, "reported": None, "latest_ratio": None}

    def objective(status: str) -> float:
        return objective_value(spec.study.objective, status, key.lr, seen["loss"], seen["fid"])

    def on_step(row: dict) -> Optional[tuple[str, str]]:
        if not seen["primed"]:  # a resumed run: replay the log before this step
            history = run.read_steps()
            monitor.replay(history[history["step"] < row["step"]].to_dict("records"))
            seen["primed"] = True
        seen["loss"], seen["row"] = row.get("loss"), row
        if _finite_or_none(row.get("ratio")) is not None:
            seen["latest_ratio"] = float(row["ratio"])
        if row.get("fid") is not None:
            seen["fid"] = row["fid"]
        if plan.fault is not None:
            plan.fault.maybe_kill(row["step"])
        verdict = monitor(row)
        every = spec.trackers.every
        if every and row["step"] % every == 0:
            status = verdict or RUNNING
            tune.report(step_metrics(row, row["step"] + 1, status=status, objective=objective(status),
                                     trial=key.trial_id))
            seen["reported"] = row["step"]
        return (verdict, monitor.reason) if verdict else None

    def on_checkpoint(path: Path, steps_done: int) -> None:
        metrics = step_metrics(None, steps_done, status=RUNNING, objective=objective(RUNNING), trial=key.trial_id)
        latest = seen["latest_ratio"]
        if latest is not None:   # for the driver's progress view (study.progress), not a step metric
            metrics["latest_ratio"] = latest
        tune.report(metrics)

    try:   # bad input fails the same way on every attempt: end the trial as an error, not retried by Tune
        check_run_inputs(cfg)
        train(cfg, run, resume=True, on_step=on_step, on_checkpoint=on_checkpoint, progress=plan.single)
    except ConfigError as err:
        tune.report({**step_metrics(None, 0, status=ERROR, objective=objective(ERROR), trial=key.trial_id),
                     "reason": str(err)})
        return
    row = trial_row(layout, run, spec.study.objective)
    last = seen["row"]  # the last step's measurements, unless its cadence report already carried them
    last = None if last is None or last["step"] == seen["reported"] else last
    tune.report(step_metrics(last, row["steps_done"], status=row["status"], objective=row["objective"],
                             trial=key.trial_id))
