"""The run folder: what one trial leaves on disk, read and written only through :class:`RunDir`.

::

    <run_dir>/
      config.json                   the resolved RunConfig (RunConfig.to_dict())
      status.json                   RunStatus: status, steps_done, final_loss, reason, wall_time
      steps/part-<a>-<b>.parquet    the per-step log (trainers.run.steplog)
      checkpoints/ckpt-<steps>.pt   trainer state after <steps> steps (9 digits), the newest keep-N
      samples/step-<steps>.png      sample grids (eval.grid_every)

Every file is written under a hidden temporary name and renamed into place
(:mod:`trainers.run.atomic`), so a reader — the trials table, ``eos
report``, a resumed run — sees each file whole or not at all.

Statuses (:data:`STATUSES`), one vocabulary for the run folder, the trials
table, the analysis and the reports (:data:`STATUS_MEANINGS`):

* ``running``: not finished; the run resumes from its newest checkpoint.
  ``status.json`` says so between checkpoints, and a folder without
  ``status.json`` is running too (killed before its first checkpoint);
* ``completed``: trained to ``train.steps`` — a result;
* ``diverged``: the loss became NaN/inf or exceeded ``train.divergence_loss``,
  the curvature became NaN/inf, or an early-stop rule fired — a result;
* ``stopped``: ended early on request (a step callback's verdict, e.g. a
  time budget); not resumed;
* ``error``: the study gave up on the trial after ``study.max_failures``
  retries (trials table only: the run folder of such a trial is ``running``).

Trials are named by :func:`trial_id`, whoever runs them (``eos train`` or a
study): the folder name, and a study's ``trial=`` partition.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from trainers.config import ConfigError
from trainers.run.atomic import remove_stale_temporaries, write_atomic, write_json_atomic
from trainers.run.steplog import MANIFEST, LogCheck, StepLog, check_log, read_steps

RUNNING, COMPLETED, DIVERGED, STOPPED, ERROR = "running", "completed", "diverged", "stopped", "error"
STATUSES = (COMPLETED, DIVERGED, STOPPED, RUNNING, ERROR)
RESULTS = (COMPLETED, DIVERGED)            # a trial's outcome, counted as done by a study
ENDED = (COMPLETED, DIVERGED, STOPPED)     # a run that train() returns without training again
STATUS_MEANINGS = {
    RUNNING: "not finished; resuming continues it from its newest checkpoint",
    COMPLETED: "trained to train.steps (a result)",
    DIVERGED: "the loss became NaN/inf or exceeded train.divergence_loss, the curvature became NaN/inf, "
              "or an early-stop rule fired (a result)",
    STOPPED: "ended early on request (a step callback, e.g. a time budget); not resumed",
    ERROR: "the study gave up on the trial after study.max_failures retries",
}


def trial_id(variant: str, lr: float, seed: int) -> str:
    """The name of the trial (variant, lr, seed): its run folder, and its ``trial=`` partition in a study.

    A pure function of (variant, lr, seed): a trial restarted by Tune, or
    re-created after an interrupted study, finds the same run folder and
    resumes it.  ``repr`` keeps every digit of the learning rate (Optuna's
    proposals) while grid values stay short (``base_lr0.001_s0``)."""
    return f"{variant}_lr{float(lr)!r}_s{int(seed)}"


class RunFolderError(RuntimeError):
    """The files of a run folder contradict each other (no checkpoint that the
    step log reaches, a chunk missing); the message, one line, says what and
    what to do."""


@dataclass(frozen=True)
class RunStatus:
    """The content of ``status.json``."""
    status: str                          # one of STATUSES (never ERROR in a run folder)
    steps_done: int
    final_loss: Optional[float] = None   # the last step's training loss (NaN/inf kept)
    reason: Optional[str] = None         # why it diverged or stopped
    wall_time: Optional[float] = None    # training seconds, summed over resumes

    @property
    def ended(self) -> bool:
        return self.status in ENDED

    def to_dict(self) -> dict:
        loss = self.final_loss
        if loss is not None and not math.isfinite(loss):
            loss = str(loss)                 # JSON has no NaN/inf: "nan", "inf", "-inf"
        return {"status": self.status, "steps_done": self.steps_done, "final_loss": loss,
                "reason": self.reason, "wall_time": self.wall_time}

    @classmethod
    def from_dict(cls, data: dict) -> "RunStatus":
        loss, wall = data.get("final_loss"), data.get("wall_time")
        return cls(status=str(data["status"]), steps_done=int(data["steps_done"]),
                   final_loss=None if loss is None else float(loss), reason=data.get("reason"),
                   wall_time=None if wall is None else float(wall))


def checkpoint_step(path: Path) -> int:
    """The steps done of ``ckpt-<steps>.pt``."""
    return int(path.stem.split("-")[1])


@dataclass(frozen=True, eq=True)
class RunDir:
    """One run folder (see the module docstring).  Path-like: ``Path(run)``,
    ``run / "x"`` and ``open(run / ...)`` work as on its path."""
    path: Path

    CHECKPOINT_GLOB = "ckpt-*.pt"

    def __init__(self, path: str | os.PathLike):
        object.__setattr__(self, "path", Path(path))

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __truediv__(self, other: str | os.PathLike) -> Path:
        return self.path / other

    def __str__(self) -> str:
        return str(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    # --- paths -------------------------------------------------------------
    @property
    def config_file(self) -> Path:
        return self.path / "config.json"

    @property
    def status_file(self) -> Path:
        return self.path / "status.json"

    @property
    def steps(self) -> Path:
        return self.path / "steps"

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def samples(self) -> Path:
        return self.path / "samples"

    def checkpoint_path(self, steps_done: int) -> Path:
        return self.checkpoint_dir / f"ckpt-{steps_done:09d}.pt"

    def sample_grid_path(self, steps_done: int) -> Path:
        return self.samples / f"step-{steps_done:09d}.png"

    # --- config and status ------------------------------------------------
    def is_run(self) -> bool:
        """Whether the folder holds a run (its config.json)."""
        return self.config_file.is_file()

    def read_config(self) -> Optional[dict]:
        return json.loads(self.config_file.read_text()) if self.config_file.is_file() else None

    def write_config(self, config: dict) -> None:
        write_json_atomic(self.config_file, config)

    def read_status(self) -> Optional[RunStatus]:
        """``status.json``, or None when the run has not written one yet."""
        if not self.status_file.is_file():
            return None
        return RunStatus.from_dict(json.loads(self.status_file.read_text()))

    def write_status(self, status: RunStatus) -> None:
        if status.status not in STATUSES:
            raise ValueError(f"status: {status.status!r} is not one of {', '.join(STATUSES)}")
        write_json_atomic(self.status_file, status.to_dict())

    # --- the step log -------------------------------------------------------
    def step_log(self) -> StepLog:
        """The writer of ``steps/`` (creates the folder)."""
        return StepLog(self.steps)

    def read_steps(self):
        """The per-step log as a pandas DataFrame sorted by step (empty without one)."""
        return read_steps(self.steps)

    # --- checkpoints -------------------------------------------------------
    def checkpoints(self) -> list[Path]:
        """The checkpoint files, oldest first."""
        if not self.checkpoint_dir.is_dir():
            return []
        return sorted(self.checkpoint_dir.glob(self.CHECKPOINT_GLOB), key=checkpoint_step)

    def save_checkpoint(self, state: dict, steps_done: int, keep: int) -> Path:
        """Write ``state`` as ``ckpt-<steps_done>.pt`` and delete the older ones
        but the newest ``keep - 1``: never the file just written (a file of a
        later step, which a resume sets aside first, is left alone)."""
        import torch

        path = write_atomic(self.checkpoint_path(steps_done), lambda tmp: torch.save(state, tmp))
        older = [p for p in self.checkpoints() if checkpoint_step(p) < steps_done]
        for old in older[:max(0, len(older) - (keep - 1))]:
            old.unlink()
        return path

    def add_checkpoint(self, source: Path) -> Optional[Path]:
        """Copy the checkpoint file ``source`` in (e.g. Tune's copy), unless the
        folder already has one at least as new that loads; returns the new file
        or None.  A same-named file that does not load is replaced."""
        step = checkpoint_step(source)
        if any(self.load_checkpoint(p, quiet=True) is not None for p in self.checkpoints()
               if checkpoint_step(p) >= step):
            return None
        return write_atomic(self.checkpoint_dir / source.name, lambda tmp: shutil.copyfile(source, tmp))

    @property
    def unused_checkpoint_dir(self) -> Path:
        return self.checkpoint_dir / "unused"

    def set_aside(self, paths: list[Path], why: str) -> None:
        """Move checkpoint files into ``checkpoints/unused/`` (never deleted: a
        person may want them), saying so on stderr."""
        if not paths:
            return
        self.unused_checkpoint_dir.mkdir(parents=True, exist_ok=True)
        for p in paths:
            os.replace(p, self.unused_checkpoint_dir / p.name)
        print(f"[eos] moved {', '.join(p.name for p in paths)} to {self.unused_checkpoint_dir} ({why})",
              file=sys.stderr)

    def resumable_checkpoint(self, log: LogCheck) -> Optional[dict]:
        """The state to resume from: the newest checkpoint that loads and that
        the step log reaches (``log``: :meth:`StepLog.check`; a checkpoint after
        N steps needs logged steps 0…N−1).  Newer checkpoint files (unreadable,
        or beyond the log) are set aside, not deleted.  None when there is no
        checkpoint file; :class:`RunFolderError` when there are some but none
        is usable — the run is not restarted from step 0 over a log that says
        otherwise, and never goes on past a gap."""
        unusable = []
        for path in reversed(self.checkpoints()):
            state = self.load_checkpoint(path)
            if state is None:
                unusable.append(f"{path.name} does not load")
                continue
            steps = int(state["step"])
            if steps - 1 > log.reaches:
                unusable.append(f"{path.name} needs logged steps 0–{steps - 1} but the step log {log.summary()}")
                continue
            self.set_aside([p for p in self.checkpoints() if checkpoint_step(p) > steps],
                           f"resuming at step {steps}: " + "; ".join(unusable))
            return state
        if not unusable:
            return None
        problems = "; ".join(log.problems)
        raise RunFolderError(
            f"{self.path}: cannot resume: {'; '.join(unusable)}"
            + (f" ({problems})" if problems else "")
            + f"; put a checkpoint the log reaches into {self.checkpoint_dir} "
              "or start over (eos train --fresh deletes this run's checkpoints and step log)")

    def load_checkpoint(self, path: Path, *, quiet: bool = False) -> Optional[dict]:
        """The trainer state in checkpoint ``path``, loaded onto the CPU, or None
        when the file does not load (the reason goes to stderr).

        Always the CPU, whatever device the run trains on: each owner's
        ``load_state_dict`` puts its tensors on its own device (the model's
        and optimizer's on the parameters', the probe's generator state stays
        a CPU ``ByteTensor``).  Loading with ``map_location=<training device>``
        would move the probe's CPU generator state to the GPU, where
        ``Generator.set_state`` rejects it."""
        import torch

        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - a damaged file: the caller tries the previous one
            if not quiet:
                print(f"[eos] skipping unreadable checkpoint {path.name}: {(str(e).strip().splitlines() or [type(e).__name__])[0]}",
                      file=sys.stderr)
            return None

    def load_latest_checkpoint(self) -> Optional[dict]:
        """The newest checkpoint that loads (a damaged file falls back to the one before), or None;
        on the CPU (:meth:`load_checkpoint`)."""
        for path in reversed(self.checkpoints()):
            state = self.load_checkpoint(path)
            if state is not None:
                return state
        return None

    # --- starting a run -----------------------------------------------------
    def has_state(self) -> bool:
        """Whether anything of a run is here (config, checkpoints or a step log)."""
        return self.config_file.exists() or bool(self.checkpoints()) or self.steps.exists()

    def clear(self) -> None:
        """Remove what a run wrote (checkpoints, step-log chunks, status, sample
        grids), for a fresh start; ``config.json`` and ``steps/`` itself
        (possibly a link into a study's dataset) stay."""
        for p in self.checkpoints():
            p.unlink()
        if self.steps.is_dir():
            for p in self.steps.glob("part-*.parquet"):
                p.unlink()
            (self.steps / MANIFEST).unlink(missing_ok=True)
        if self.samples.is_dir():
            for p in self.samples.glob("*.png"):
                p.unlink()
        self.status_file.unlink(missing_ok=True)

    def trained(self) -> tuple[int, int]:
        """(checkpoint files, logged steps) of the run here: what a fresh start deletes."""
        return len(self.checkpoints()), sum(c.rows for c in check_log(self.steps).intact)

    def prepare(self, config: dict, resume: bool) -> None:
        """Make the folder ready for a run of ``config``: resuming requires the
        config already here (if any) to be the same, unless that run never
        trained a step (no checkpoint, no logged step: nothing to lose, e.g. a
        first attempt that failed on a typo); otherwise the folder is cleared.
        Writes ``config.json``."""
        self.path.mkdir(parents=True, exist_ok=True)
        old = self.read_config()
        if resume and old is not None and old != config:
            checkpoints, steps = self.trained()
            if checkpoints or steps:
                diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
                raise ConfigError(
                    f"run_dir: {self.path} holds a run with a different config (sections differ: {', '.join(diff)}) "
                    f"that has {checkpoints} checkpoint(s) and {steps} logged step(s); use another --out folder, "
                    "or --fresh to delete them and start over")
            resume = False
        if not resume and self.has_state():
            self.clear()
        for folder in (self.path, self.checkpoint_dir):
            remove_stale_temporaries(folder)
        self.write_config(config)
