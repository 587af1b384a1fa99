"""Load a study folder or a single run folder into pandas.

Two layouts are understood:

* a **study** ``results/<study>/``::

      steps/variant=<v>/trial=<trial_id>/part-*.parquet   per-step rows (trainers.run.steplog schema)
      trials.parquet                                      one row per trial

  ``trials.parquet`` must have the columns ``trial_id``, ``variant``, ``lr``,
  ``seed`` and ``status`` (:data:`trainers.run.rundir.STATUSES`);
  ``optimizer``, ``steps_done``, ``final_loss``, ``fid`` /
  ``inception_score`` / ``kid`` and ``config`` (the RunConfig as JSON: which
  Adam preconditioner the run measured, :func:`analysis.metrics.opening_steps`)
  are used when present, and any other column is kept as it is.

* a **single run** (``eos train``): a run folder
  (:class:`trainers.run.rundir.RunDir`: ``config.json``, ``status.json``,
  ``steps/part-*.parquet``), loaded as a study of one trial (its trials row
  carries ``config.json`` as the ``config`` column).  A run without
  ``status.json`` is ``running``.

Before reading, every trial's log is checked against the manifest its
writer keeps (:func:`trainers.run.steplog.check_log`) and against its
``steps_done``: a missing or damaged chunk, or a missing step, is a
:class:`StudyFormatError` that names it in one line.

Either way the result is a :class:`Study`: ``steps`` has the step-log columns
plus ``trial_id`` and ``variant``; ``trials`` has one row per trial.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds

from trainers.run.rundir import RUNNING, RunDir
from trainers.run.steplog import SCHEMA, StepLogError, check_log, steps_text

# Step-log columns the analysis reads (the list-valued ``topk`` and the JSON
# ``variant_stats`` are left out unless asked for).
ANALYSIS_COLUMNS: tuple[str, ...] = (
    "step", "wall_time", "loss", "lr", "grad_norm", "lambda_max", "lambda_precond",
    "threshold", "ratio", "eig_residual", "eig_converged", "hessian_trace", "batch_sharpness",
    "n_above", "n_above_capped",
    "fid", "inception_score", "kid",
)

TRIAL_COLUMNS_REQUIRED: tuple[str, ...] = ("trial_id", "variant", "lr", "seed", "status")


class StudyFormatError(ValueError):
    """A study or run folder does not have the expected layout or columns."""


@dataclass
class Study:
    """The per-step rows and the trials table of a study (or of one run)."""
    name: str
    path: Path
    kind: str                 # "study" or "run"
    steps: pd.DataFrame       # step-log columns + trial_id, variant
    trials: pd.DataFrame      # trial_id, variant, lr, seed, status, optimizer, ...

    @property
    def variants(self) -> list[str]:
        return sorted(self.trials["variant"].unique())

    @property
    def lrs(self) -> list[float]:
        return sorted(self.trials["lr"].unique())


def _columns(columns: Optional[Sequence[str]]) -> list[str]:
    if columns is None:
        return list(SCHEMA.names)
    unknown = [c for c in columns if c not in SCHEMA.names]
    if unknown:
        raise StudyFormatError(f"columns: not in the step-log schema: {unknown}")
    return ["step", *[c for c in columns if c != "step"]]


def is_study_dir(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / "trials.parquet").is_file() or any((path / "steps").glob("variant=*"))


def is_run_dir(path: str | os.PathLike) -> bool:
    return RunDir(path).is_run()


def load(path: str | os.PathLike, columns: Optional[Sequence[str]] = ANALYSIS_COLUMNS) -> Study:
    """A study folder or a single run folder, whichever ``path`` is."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no such study or run folder: {path}")
    if is_study_dir(path):
        return load_study(path, columns)
    if is_run_dir(path):
        return load_run(path, columns)
    raise StudyFormatError(
        f"{path}: neither a study folder (trials.parquet, steps/variant=*/trial=*/) "
        f"nor a run folder (config.json, status.json, steps/)")


def read_study_steps(study_dir: str | os.PathLike,
                     columns: Optional[Sequence[str]] = ANALYSIS_COLUMNS) -> pd.DataFrame:
    """All per-step rows of a study: the step-log columns plus ``variant`` and
    ``trial_id`` (from the hive partitions), sorted by trial and step."""
    steps_dir = Path(study_dir) / "steps"
    cols = _columns(columns)
    partitions = pa.schema([("variant", pa.string()), ("trial", pa.string())])
    schema = pa.unify_schemas([SCHEMA, partitions])
    if not steps_dir.is_dir():
        frame = pd.DataFrame({c: pd.Series(dtype=SCHEMA.field(c).type.to_pandas_dtype()) for c in cols})
        frame["variant"] = pd.Series(dtype=object)
        frame["trial_id"] = pd.Series(dtype=object)
        return frame
    verify_logs(sorted(steps_dir.glob("variant=*/trial=*")), where=f"{steps_dir}")
    dataset = ds.dataset(steps_dir, format="parquet", schema=schema,
                         partitioning=ds.partitioning(partitions, flavor="hive"))
    table = dataset.to_table(columns=[*cols, "variant", "trial"])
    frame = table.to_pandas().rename(columns={"trial": "trial_id"})
    return frame.sort_values(["trial_id", "step"], kind="stable").reset_index(drop=True)


def verify_logs(folders: Sequence[Path], where: str) -> None:
    """Check every trial's step log against its manifest
    (:func:`trainers.run.steplog.check_log`); a missing or damaged chunk, or a
    gap, is a :class:`StudyFormatError` naming it, in one line."""
    errors = [e for e in (check_log(f).error() for f in folders) if e]
    if errors:
        more = f" (and {len(errors) - 1} more trial(s) like it under {where})" if len(errors) > 1 else ""
        raise StudyFormatError(errors[0] + more)


def verify_steps_done(steps: pd.DataFrame, trials: pd.DataFrame, where: str) -> None:
    """Every trial's log holds the steps its ``steps_done`` counts (0…steps_done−1),
    else a :class:`StudyFormatError` naming the trial and the missing steps."""
    if "steps_done" not in trials.columns:
        return
    have = steps.groupby("trial_id")["step"].apply(lambda s: set(s.astype(int))) if len(steps) else {}
    for trial, done in zip(trials["trial_id"], trials["steps_done"]):
        if pd.isna(done):
            continue
        logged = have.get(trial, set()) if len(steps) else set()
        missing = sorted(set(range(int(done))) - logged)
        if missing:
            raise StudyFormatError(f"{where}: trial {trial}: {_ranges(missing)} missing from the step log "
                                   f"({len(missing)} of the {int(done)} steps done)")


def _ranges(steps: list[int]) -> str:
    out, start = [], steps[0]
    for a, b in zip(steps, steps[1:] + [None]):
        if b != a + 1:
            out.append(steps_text(start, a))
            start = b
    return ", ".join(out)


def read_trials(study_dir: str | os.PathLike) -> pd.DataFrame:
    path = Path(study_dir) / "trials.parquet"
    if not path.is_file():
        raise StudyFormatError(f"{path}: missing (the study writes one row per trial there)")
    trials = pd.read_parquet(path)
    missing = [c for c in TRIAL_COLUMNS_REQUIRED if c not in trials.columns]
    if missing:
        raise StudyFormatError(f"{path}: missing columns {missing} (has {list(trials.columns)})")
    trials = trials.copy()
    trials["trial_id"] = trials["trial_id"].astype(str)
    trials["variant"] = trials["variant"].astype(str)
    trials["lr"] = trials["lr"].astype(float)
    if trials["trial_id"].duplicated().any():
        dupes = sorted(trials.loc[trials["trial_id"].duplicated(), "trial_id"].unique())
        raise StudyFormatError(f"{path}: trial_id: duplicated values {dupes[:5]}")
    return trials


def load_study(study_dir: str | os.PathLike,
               columns: Optional[Sequence[str]] = ANALYSIS_COLUMNS) -> Study:
    """A study folder (``steps/`` hive dataset + ``trials.parquet``)."""
    study_dir = Path(study_dir)
    trials = read_trials(study_dir)
    steps = read_study_steps(study_dir, columns)
    unknown = sorted(set(steps["trial_id"]) - set(trials["trial_id"]))
    if unknown:
        raise StudyFormatError(f"{study_dir}/steps: trials {unknown[:5]} are not in trials.parquet")
    verify_steps_done(steps, trials, f"{study_dir}/trials.parquet")
    return Study(name=study_dir.resolve().name, path=study_dir, kind="study", steps=steps, trials=trials)


def load_run(run_dir: str | os.PathLike,
             columns: Optional[Sequence[str]] = ANALYSIS_COLUMNS) -> Study:
    """A single ``eos train`` run folder, as a study of one trial whose
    ``trial_id`` is the folder name."""
    run = RunDir(run_dir)
    config = run.read_config()
    if config is None:
        raise StudyFormatError(f"{run.config_file}: missing (a run folder holds config.json, status.json, steps/)")
    status = run.read_status()
    cols = _columns(columns)
    verify_logs([run.steps], where=str(run.steps))
    try:
        steps = run.read_steps()[cols].copy()
    except StepLogError as err:
        raise StudyFormatError(str(err)) from None
    try:
        variant = config["variant"]["name"]
        optim = config["optim"]
        seed = config["train"]["seed"]
    except (KeyError, TypeError) as err:
        raise StudyFormatError(f"{run.config_file}: not a RunConfig dict (missing {err})") from None
    trial_id = run.path.resolve().name
    steps["variant"] = variant
    steps["trial_id"] = trial_id
    final_loss = status.final_loss if status else None
    trials = pd.DataFrame([{
        "trial_id": trial_id,
        "variant": variant,
        "lr": float(optim["lr"]),
        "seed": seed,
        "optimizer": optim.get("name"),
        # a run without status.json has not finished (or was killed)
        "status": status.status if status else RUNNING,
        "steps_done": status.steps_done if status else (int(steps["step"].max() + 1) if len(steps) else 0),
        "final_loss": float("nan") if final_loss is None else float(final_loss),
        "reason": status.reason if status else None,
        "config": json.dumps(config, sort_keys=True),
    }])
    verify_steps_done(steps, trials, str(run.status_file))
    return Study(name=trial_id, path=run.path, kind="run", steps=steps, trials=trials)
