"""Load a study folder or a single run folder into pandas.

Two layouts are understood:

* a **study** ``results/<study>/``::

      steps/variant=<v>/trial=<trial_id>/part-*.parquet   per-step rows (trainers.run.steplog schema)
      trials.parquet                                      one row per trial (written when the study ends)
      runs/<trial_id>/config.json, status.json            each trial's run folder

  ``trials.parquet`` must have the columns ``trial_id``, ``variant``, ``lr``,
  ``seed`` and ``status`` (:data:`trainers.run.rundir.STATUSES`);
  ``optimizer``, ``steps_done``, ``final_loss``, ``fid`` /
  ``inception_score`` / ``kid`` and ``config`` (the RunConfig as JSON: which
  Adam preconditioner the run measured, :func:`analysis.metrics.opening_steps`)
  are used when present, and any other column is kept as it is.

  The table is optional (:func:`study_trials`): a study still running, or
  killed, has none or an old one.  Its rows are then completed from the run
  folders (``config.json``: variant, lr, seed, optimizer, config;
  ``status.json``: status, steps_done, final_loss, reason), and a run
  folder's ``status.json`` newer than ``trials.parquet`` wins over the
  table's row.  A trial known only from its ``steps/`` partition (no run
  folder, or one without ``config.json`` yet) is ``running``, with variant,
  lr and seed read from its name (:func:`trainers.run.rundir.trial_id`).

* a **single run** (``eos train``): a run folder
  (:class:`trainers.run.rundir.RunDir`: ``config.json``, ``status.json``,
  ``steps/part-*.parquet``), loaded as a study of one trial (its trials row
  carries ``config.json`` as the ``config`` column).  A run without
  ``status.json`` is ``running``.

Before reading, every trial's log is checked against the manifest its
writer keeps (:func:`trainers.run.steplog.check_log`) and against its
``steps_done``: a missing or damaged chunk, or a missing step, is a
:class:`StudyFormatError` that names it in one line.  A ``running``
(unfinished) trial is checked against its manifest only: its ``steps_done``
becomes the steps its log holds, which may be more than its last
``status.json`` says (written at checkpoints) or fewer than an older table
says (a resume truncates the log back to its checkpoint).

Either way the result is a :class:`Study`: ``steps`` has the step-log columns
plus ``trial_id`` and ``variant``; ``trials`` has one row per trial.
"""
from __future__ import annotations

import json
import math
import os
import re
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
    "lambda_critical", "critical_passes", "lambda_dir",
    "n_above", "n_above_capped",
    "fid", "inception_score", "kid",
)

TRIAL_COLUMNS_REQUIRED: tuple[str, ...] = ("trial_id", "variant", "lr", "seed", "status")
# the columns a run folder's status.json gives (and that replace a stale trials.parquet's)
STATUS_COLUMNS: tuple[str, ...] = ("status", "steps_done", "final_loss", "reason")
# trainers.run.rundir.trial_id(variant, lr, seed) read back
TRIAL_ID = re.compile(r"^(?P<variant>.+)_lr(?P<lr>[^_]+)_s(?P<seed>-?\d+)$")


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
    return ((path / "trials.parquet").is_file() or (path / "study.json").is_file()
            or any((path / "steps").glob("variant=*")))


def is_unfinished(trials: pd.DataFrame) -> pd.Series:
    """Per row of a trials table: the trial has not finished (``running``:
    the study is still running it, or was interrupted)."""
    return trials["status"] == RUNNING


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


def run_folder_trials(study_dir: str | os.PathLike) -> pd.DataFrame:
    """One row per run folder ``runs/<trial_id>/`` that holds a ``config.json``:
    identity from the config, status from ``status.json`` (``running``
    without one), and ``status_mtime`` (ns; NaN without ``status.json``)."""
    runs = Path(study_dir) / "runs"
    rows = []
    for folder in sorted(p for p in runs.iterdir() if p.is_dir()) if runs.is_dir() else []:
        run = RunDir(folder)
        if not run.is_run():
            continue
        try:
            config = run.read_config()
            status = run.read_status()
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise StudyFormatError(f"{folder}: unreadable config.json or status.json ({type(err).__name__}: "
                                   f"{err})") from None
        rows.append({**_config_columns(config, run.config_file), "trial_id": folder.name,
                     **_status_columns(status),
                     "status_mtime": run.status_file.stat().st_mtime_ns if status else float("nan")})
    return pd.DataFrame(rows)


def _config_columns(config: dict, where: Path) -> dict:
    try:
        return {"variant": str(config["variant"]["name"]), "lr": float(config["optim"]["lr"]),
                "seed": int(config["train"]["seed"]), "optimizer": config["optim"].get("name"),
                "config": json.dumps(config, sort_keys=True)}
    except (KeyError, TypeError, ValueError) as err:
        raise StudyFormatError(f"{where}: not a RunConfig dict (missing {err})") from None


def _status_columns(status) -> dict:
    """``status.json`` as trials-table columns; a run without one is ``running``."""
    if status is None:
        return {"status": RUNNING, "steps_done": 0, "final_loss": float("nan"), "reason": None}
    loss = status.final_loss
    return {"status": status.status, "steps_done": status.steps_done,
            "final_loss": float("nan") if loss is None else float(loss), "reason": status.reason}


def steps_only_trials(steps: pd.DataFrame, known: set) -> pd.DataFrame:
    """A ``running`` row for every trial of ``steps`` not in ``known``:
    variant, lr and seed from its name (:data:`TRIAL_ID`; else the lr is
    the largest it logged, the nominal lr under warm-up and decay, and the
    seed is unknown)."""
    rows = []
    for (trial, variant), group in steps.groupby(["trial_id", "variant"], sort=True):
        if trial in known:
            continue
        match = TRIAL_ID.match(trial)
        try:
            lr, seed = (float(match["lr"]), int(match["seed"])) if match else (math.nan, None)
        except ValueError:
            lr, seed = math.nan, None
        if math.isnan(lr) and "lr" in group:
            lr = float(group["lr"].max())
        rows.append({"trial_id": trial, "variant": variant, "lr": lr, "seed": seed, "status": RUNNING,
                     "steps_done": 0, "final_loss": float("nan"),
                     "reason": "no run folder: known from its step log only"})
    return pd.DataFrame(rows)


def study_trials(study_dir: str | os.PathLike, steps: pd.DataFrame) -> pd.DataFrame:
    """The trials table of a study, also while it runs: ``trials.parquet``
    where it is current, each run folder's status where ``status.json`` is
    newer than the table (or the table lacks the trial, or there is no
    table), and a ``running`` row for a trial only ``steps`` knows."""
    study_dir = Path(study_dir)
    table_file = study_dir / "trials.parquet"
    table = read_trials(study_dir) if table_file.is_file() else None
    runs = run_folder_trials(study_dir)
    if table is None:
        trials = runs.drop(columns="status_mtime", errors="ignore")
    else:
        trials = table.set_index("trial_id", drop=False)
        if len(runs):
            runs = runs.set_index("trial_id", drop=False)
            newer = runs.index[runs["status_mtime"] > table_file.stat().st_mtime_ns]
            fresh = newer.intersection(trials.index)
            for column in STATUS_COLUMNS if len(fresh) else ():
                trials[column] = trials[column].astype(object) if column in trials else None
                trials.loc[fresh, column] = runs.loc[fresh, column].astype(object)
            trials = pd.concat([trials, runs.loc[runs.index.difference(trials.index)].drop(columns="status_mtime")])
        trials = trials.reset_index(drop=True)
    trials = pd.concat([trials, steps_only_trials(steps, set(trials.get("trial_id", ())))], ignore_index=True)
    if trials.empty:
        raise StudyFormatError(f"{study_dir}: no trials yet (no trials.parquet, no run folder with a config.json "
                               "under runs/, no rows under steps/)")
    trials["lr"] = trials["lr"].astype(float)
    for column in ("steps_done", "final_loss"):
        if column in trials and trials[column].dtype == object:
            trials[column] = pd.to_numeric(trials[column])
    return trials


def with_logged_progress(trials: pd.DataFrame, steps: pd.DataFrame) -> pd.DataFrame:
    """``trials`` whose unfinished rows have ``steps_done`` = the steps their
    log holds (last logged step + 1; 0 without rows) and no ``final_loss``
    (the metrics take the last logged loss)."""
    unfinished = is_unfinished(trials)
    if not unfinished.any():
        return trials
    logged = steps.groupby("trial_id")["step"].max() + 1 if len(steps) else pd.Series(dtype=float)
    trials = trials.copy()
    trials.loc[unfinished, "steps_done"] = trials.loc[unfinished, "trial_id"].map(logged).fillna(0).astype(int)
    if "final_loss" in trials:
        trials.loc[unfinished, "final_loss"] = math.nan
    return trials


def verify_finished(steps: pd.DataFrame, trials: pd.DataFrame, where: str) -> None:
    """:func:`verify_steps_done` of the trials that are not unfinished."""
    verify_steps_done(steps, trials[~is_unfinished(trials)], where)


def load_study(study_dir: str | os.PathLike,
               columns: Optional[Sequence[str]] = ANALYSIS_COLUMNS) -> Study:
    """A study folder (``steps/`` hive dataset + the trials of :func:`study_trials`)."""
    study_dir = Path(study_dir)
    steps = read_study_steps(study_dir, columns)
    trials = with_logged_progress(study_trials(study_dir, steps), steps)
    table = study_dir / "trials.parquet"
    verify_finished(steps, trials, str(table if table.is_file() else study_dir / "runs"))
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
    trials = with_logged_progress(trials, steps)
    verify_finished(steps, trials, str(run.status_file))
    return Study(name=trial_id, path=run.path, kind="run", steps=steps, trials=trials)
