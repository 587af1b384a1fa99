"""The trials table ``<study>/trials.parquet``: one row per trial.

Built from the run folders themselves (:class:`trainers.run.rundir.RunDir`:
``config.json``, ``status.json`` and the step log), so it is complete
whatever happened to the driver; Tune only adds what a run folder cannot
know (a trial that exhausted its retries is ``error``).  The statuses are
the run folder's (:data:`trainers.run.rundir.STATUSES`).  Columns
(:data:`TRIALS_SCHEMA`):

==============  ========  ==========================================================
trial_id        string    ``<variant>_lr<lr>_s<seed>``; the ``trial=`` partition
variant         string    stabilization variant
lr              float64   learning rate
seed            int64     train.seed
optimizer       string    optim.name
status          string    completed | diverged (a result) | running (not finished:
                          the study was interrupted; resuming it continues the
                          trial) | stopped (ended early on request) | error
                          (crashed more than study.max_failures times)
reason          string    why it diverged, stopped or failed
steps_done      int64     optimizer steps taken
final_loss      float64   last training loss (NaN/inf when it diverged that way)
final_ratio     float64   last measured λ₁/threshold
max_ratio       float64   largest measured λ₁/threshold
fid             float64   last FID (eval.every), null if never measured
inception_score float64   last Inception score, null if never measured
kid             float64   last KID, null if never measured
objective       float64   the study objective of this trial (study.objective)
wall_time       float64   training seconds
run_dir         string    the run folder, relative to the study folder
config          string    the trial's RunConfig as JSON
==============  ========  ==========================================================
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa

from study.layout import StudyLayout
from trainers.run.rundir import DIVERGED, ERROR, RESULTS, RUNNING, STATUSES, RunDir
from trainers.run.steplog import write_parquet

UNFINISHED_REASON = "unfinished: the study was interrupted (eos study resume continues it)"

TRIALS_SCHEMA = pa.schema([
    ("trial_id", pa.string()), ("variant", pa.string()), ("lr", pa.float64()), ("seed", pa.int64()),
    ("optimizer", pa.string()), ("status", pa.string()), ("reason", pa.string()),
    ("steps_done", pa.int64()), ("final_loss", pa.float64()), ("final_ratio", pa.float64()),
    ("max_ratio", pa.float64()), ("fid", pa.float64()), ("inception_score", pa.float64()),
    ("kid", pa.float64()), ("objective", pa.float64()), ("wall_time", pa.float64()),
    ("run_dir", pa.string()), ("config", pa.string()),
])


def objective_value(objective: str, status: str, lr: float, loss: Optional[float],
                    fid: Optional[float]) -> float:
    """The trial's objective.  ``final_loss``/``fid`` (minimised): the value,
    +inf when the trial diverged or the value is missing; ``largest_stable_lr``
    (maximised): the lr when the trial did not diverge, 0 when it did."""
    diverged = status == DIVERGED
    if objective == "largest_stable_lr":
        return 0.0 if diverged else float(lr)
    value = loss if objective == "final_loss" else fid
    if diverged or value is None or not math.isfinite(value):
        return math.inf
    return float(value)


def _last(series) -> Optional[float]:
    values = series.dropna()
    return float(values.iloc[-1]) if len(values) else None


def trial_row(layout: StudyLayout, run: RunDir, objective: str, error: Optional[str] = None) -> dict:
    """The trials-table row of one run folder; ``error``: Tune gave up on the trial."""
    config = run.read_config()
    status = run.read_status()
    steps = run.read_steps()
    logged = int(steps["step"].max()) + 1 if len(steps) else 0
    if status is not None and status.ended:
        state, reason = status.status, status.reason
        steps_done, final_loss = status.steps_done, status.final_loss
    else:
        state, reason = (ERROR, error) if error else (RUNNING, UNFINISHED_REASON)
        steps_done, final_loss = logged, (_last(steps["loss"]) if len(steps) else None)
    ratio = steps["ratio"].dropna()
    fid = _last(steps["fid"])
    lr = float(config["optim"]["lr"])
    return {
        "trial_id": run.name,
        "variant": config["variant"]["name"],
        "lr": lr,
        "seed": int(config["train"]["seed"]),
        "optimizer": config["optim"]["name"],
        "status": state,
        "reason": reason,
        "steps_done": int(steps_done),
        "final_loss": final_loss,
        "final_ratio": float(ratio.iloc[-1]) if len(ratio) else None,
        "max_ratio": float(ratio.max()) if len(ratio) else None,
        "fid": fid,
        "inception_score": _last(steps["inception_score"]),
        "kid": _last(steps["kid"]),
        "objective": objective_value(objective, state, lr, final_loss, fid),
        "wall_time": status.wall_time if status else (_last(steps["wall_time"]) if len(steps) else None),
        "run_dir": run.path.relative_to(layout.root).as_posix(),
        "config": json.dumps(config, sort_keys=True),
    }


def error_row(trial: dict, objective: str, error: str) -> dict:
    """A trial Tune could not run at all (no run folder)."""
    row = {name: None for name in TRIALS_SCHEMA.names}
    row.update(trial_id=trial["trial_id"], variant=trial["variant"], lr=float(trial["lr"]),
               seed=int(trial["seed"]), status=ERROR, reason=error, steps_done=0,
               objective=objective_value(objective, ERROR, float(trial["lr"]), None, None))
    return row


def collect_trials(layout: StudyLayout, objective: str, variants: Sequence[str],
                   tune_trials: Sequence[dict] = ()) -> pa.Table:
    """One row per trial: every run folder, plus Tune trials that failed
    before creating one.  ``tune_trials``: dicts with ``trial_id``,
    ``variant``, ``lr``, ``seed`` and ``error`` (None unless Tune gave up)."""
    errors = {t["trial_id"]: t["error"] for t in tune_trials if t.get("error")}
    rows = [trial_row(layout, d, objective, errors.get(d.name)) for d in layout.run_dirs()]
    seen = {r["trial_id"] for r in rows}
    rows += [error_row(t, objective, t["error"]) for t in tune_trials
             if t.get("error") and t["trial_id"] not in seen]
    order = {v: i for i, v in enumerate(variants)}
    rows.sort(key=lambda r: (order.get(r["variant"], len(order)), r["lr"], r["seed"]))
    return pa.Table.from_pylist(rows, schema=TRIALS_SCHEMA)


def write_trials(layout: StudyLayout, table: pa.Table) -> Path:
    return write_parquet(table, layout.trials_table)


def status_counts(table: pa.Table) -> dict[str, int]:
    statuses = table.column("status").to_pylist()
    return {s: statuses.count(s) for s in STATUSES if s in statuses}


def best_trials(table: pa.Table, mode: str) -> list[dict]:
    """The best trial with a result (completed or diverged) per variant by
    ``objective`` (ties: first in table order)."""
    best: dict[str, dict] = {}
    for row in table.to_pylist():
        value = row["objective"]
        if row["status"] not in RESULTS or value is None or np.isnan(value):
            continue
        current = best.get(row["variant"])
        better = current is None or (value < current["objective"] if mode == "min" else value > current["objective"])
        if better:
            best[row["variant"]] = row
    return list(best.values())
