"""The study folder, ``<storage>/<name>/``::

    study.json                                     the resolved spec (absolute paths)
    trials.parquet                                 one row per trial (study.trials)
    steps/variant=<v>/trial=<trial_id>/part-*.parquet
                                                   every trial's per-step log, one hive-
                                                   partitioned dataset (pandas.read_parquet(steps))
    runs/<trial_id>/                               the trainer's run folder (trainers.run.rundir):
                                                   config.json, status.json, checkpoints/, and
                                                   steps -> ../../steps/variant=<v>/trial=<trial_id>
    tune/                                          Ray Tune's experiment (state, results; no checkpoints)
    .driver.lock                                   the running driver (study.lock): host, pid, command
    optuna.journal                                 Optuna studies (search.algorithm: optuna)
    boundary.json                                  the boundary search's brackets and verdicts
                                                   (search.algorithm: boundary; study.boundary)

The trainer writes its log into ``run_dir/steps``; that folder is a
relative symlink to the trial's partition, so the log is written once,
directly into the dataset, with the trainer's own atomic chunk writes and
resume truncation (no copy that could lag behind or duplicate steps).
Partition folders hold only ``part-*.parquet`` files and the log's
``_manifest.json`` (temporary files start with ``.``, the manifest with
``_``: pyarrow ignores both), so the dataset is readable at any time, also
while a study runs.

Multi-node clusters need the study folder on a file system every node
mounts at the same path (see clusters/README.md).
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from trainers.run.atomic import TEMP_GLOB, write_atomic
from trainers.run.rundir import RunDir


@dataclass(frozen=True)
class StudyLayout:
    root: Path

    @property
    def study_json(self) -> Path:
        return self.root / "study.json"

    @property
    def trials_table(self) -> Path:
        return self.root / "trials.parquet"

    @property
    def steps(self) -> Path:
        return self.root / "steps"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def tune(self) -> Path:
        """Tune's experiment folder (storage_path=root, name="tune")."""
        return self.root / "tune"

    @property
    def optuna_journal(self) -> Path:
        return self.root / "optuna.journal"

    @property
    def boundary_state(self) -> Path:
        return self.root / "boundary.json"

    def run_dir(self, trial_id: str) -> RunDir:
        return RunDir(self.runs / trial_id)

    def partition(self, variant: str, trial_id: str) -> Path:
        return self.steps / f"variant={variant}" / f"trial={trial_id}"

    def prepare_run_dir(self, variant: str, trial_id: str) -> RunDir:
        """The trial's run folder with ``steps`` linked to its partition
        (idempotent: a restarted trial finds the same folder)."""
        run = self.run_dir(trial_id)
        run.path.mkdir(parents=True, exist_ok=True)
        partition = self.partition(variant, trial_id)
        partition.mkdir(parents=True, exist_ok=True)
        link = run.steps
        target = os.path.relpath(partition, run.path)
        if link.is_symlink():
            if os.readlink(link) != target:
                raise RuntimeError(f"{link} points to {os.readlink(link)}, expected {target}")
        elif link.exists():
            raise RuntimeError(f"{link} is a real folder; expected a link to the study dataset {partition}")
        else:
            write_atomic(link, lambda tmp: tmp.symlink_to(target, target_is_directory=True))
        return run

    def remove_stale_temporaries(self) -> int:
        """Delete what writers killed mid-write left (hidden ``.<name>.tmp-<pid>``
        files of :mod:`trainers.run.atomic` in the study folder and in every run
        folder, its checkpoints, samples and log partition; the
        ``.tune-checkpoint-*`` folders of earlier versions); returns how many.
        Only for the driver holding the study's lock, before trials start."""
        folders = [self.root]
        for run in map(RunDir, sorted(p for p in self.runs.iterdir() if p.is_dir())) if self.runs.is_dir() else []:
            folders += [run.path, run.checkpoint_dir, run.samples, run.steps]
        removed = 0
        for folder in folders:
            if folder.is_dir():
                for tmp in folder.glob(TEMP_GLOB):
                    if tmp.is_file():
                        tmp.unlink(missing_ok=True)
                        removed += 1
        for run in (self.runs.glob("*/.tune-checkpoint-*") if self.runs.is_dir() else []):
            shutil.rmtree(run, ignore_errors=True)
            removed += 1
        return removed

    def run_dirs(self) -> list[RunDir]:
        """The run folders of the study that hold a run (a config.json), by name."""
        if not self.runs.is_dir():
            return []
        return [run for run in map(RunDir, sorted(p for p in self.runs.iterdir() if p.is_dir())) if run.is_run()]
