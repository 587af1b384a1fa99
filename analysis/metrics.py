"""Edge-of-stability metrics of one trial, and their aggregation over seeds.

Definitions (``ratio`` = λ₁ / threshold from the step log, where λ₁ is the top
eigenvalue of P⁻¹H for Adam/AdamW and of H otherwise; only steps where the
probe ran, i.e. ``ratio`` is not null, count):

* **λ₁** = ``ratio × threshold`` (the operator the threshold applies to).
* **initial transient**: the leading probed steps whose ratio is already
  ≥ 1, before the first step below 1.  Adam's preconditioner is built from
  the first few gradients only, so λ₁(P⁻¹H) starts far above 38/η and falls
  within a few steps; that is not the edge of stability, and the metrics
  below start after it.  A curve that starts below 1 has no transient.  How
  long the transient may last depends on which preconditioner the run
  measured (``sharpness.adam_preconditioner`` in its config,
  :func:`opening_steps`):

  - ``init2winit`` (P = √v̂ₜ + ε of the state before the step; also every
    run whose config predates the option), GD and momentum: until the first
    step below 1, however late;
  - ``update`` (the P of the update being taken, Cohen et al. 2022): only
    during Adam's opening, the first 1/(1 − β₁) steps (10 at β₁ = 0.9, the
    first moment's memory), while v̂ still averages a handful of gradients
    and P changes faster than the frozen-P threshold assumes.  The
    transient ends at the first step below 1 or the first probed step at or
    after the opening, whichever comes first: a ratio still ≥ 1 there is an
    onset.
* **EoS onset**: the first step with ratio ≥ 1 from the end of the transient
  on, i.e. the first upward crossing of the threshold (or, under ``update``,
  a ratio still above it after the opening); none if it never comes (also
  when the transient never ends: ``start_above`` is then true).
* **fraction near threshold**: among measured steps at or after the onset,
  the fraction with |ratio − 1| ≤ 0.1.
* **peak ratio**: the largest measured ratio after the transient; none when
  the ratio never drops below 1 (every probed step is then still in the
  transient, and ``start_above`` is true).
* **progressive-sharpening rate**: least-squares slope of λ₁ against the step
  number over the measured steps after the transient and before the onset
  (to the end if the onset never comes), in λ units per step; needs two
  points (none when the ratio never drops below 1).
* **diverged**: the trial's status is ``diverged`` or its loss became NaN/inf.
* **final loss**: the trials table's ``final_loss`` (else the last finite
  logged loss, as for every unfinished trial:
  :func:`analysis.load.with_logged_progress`); **FID / IS / KID**: the
  trials table's value when it has the column, else the last measured value
  in the step log.

Aggregation over seeds (per variant × learning rate) reports, over the seeds
where a metric is finite (a diverged seed's final loss is inf and so left out;
the divergence count says how many), the mean and a two-sided Student-t
confidence interval mean ± t₍₁₊c₎/₂,ₙ₋₁ · s/√n (s the sample standard
deviation; no band for a single seed), clipped to the metric's natural range
(:data:`BOUNDS`: fractions in [0, 1], steps and ratios ≥ 0, FID ≥ 0, IS ≥ 1).
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Iterable, Optional, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from analysis.load import Study
from trainers.config import PRECONDITIONED_OPTIMIZERS
from trainers.run.rundir import COMPLETED, DIVERGED, ERROR, RUNNING

MAX_LEARNING_RATES = 8  # more distinct lrs (an Optuna search) are binned for the variant × lr tables

NEAR_THRESHOLD = 0.10   # |ratio − 1| tolerance of "at the edge of stability"
CONFIDENCE = 0.95       # confidence level of the bands over seeds

SAMPLE_METRICS = ("fid", "inception_score", "kid")
TRIAL_METRICS = ("onset_step", "frac_near_threshold", "peak_ratio", "sharpening_rate",
                 "final_loss", *SAMPLE_METRICS)
# bands of quantities bounded by definition are clipped to the bounds
BOUNDS = {"onset_step": (0.0, None), "frac_near_threshold": (0.0, 1.0), "peak_ratio": (0.0, None),
          "fid": (0.0, None), "inception_score": (1.0, None)}


# ---------------------------------------------------------------------------
# one curve


def _measured(step, values) -> tuple[np.ndarray, np.ndarray]:
    step = np.asarray(step, dtype=float)
    values = np.asarray(values, dtype=float)
    keep = np.isfinite(values) & np.isfinite(step)
    order = np.argsort(step[keep], kind="stable")
    return step[keep][order], values[keep][order]


def opening_steps(config: Optional[dict]) -> Optional[int]:
    """How many opening steps the initial transient may last for a run of
    ``config`` (a RunConfig dict): ⌈1/(1 − β₁)⌉ for Adam/AdamW measured with
    ``sharpness.adam_preconditioner: update``; None (no limit: the transient
    lasts until the first ratio below 1) for ``init2winit``, a config without
    the option (runs recorded before it existed measured init2winit's P),
    ``sharpness.precondition: none``, GD and momentum, or no config."""
    if not isinstance(config, dict):
        return None
    optim, sharp = config.get("optim") or {}, config.get("sharpness") or {}
    if optim.get("name") not in PRECONDITIONED_OPTIMIZERS or sharp.get("precondition", "auto") != "auto":
        return None
    if sharp.get("adam_preconditioner", "init2winit") != "update":
        return None
    beta1 = float((optim.get("betas") or (0.9, 0.999))[0])
    return int(math.ceil(1.0 / (1.0 - beta1) - 1e-9))


def transient_end(step, ratio, opening: Optional[int] = None) -> Optional[int]:
    """The probed step where the analysed curve starts: the first with
    ratio < 1, or with ``opening`` (:func:`opening_steps`) the first with
    ratio < 1 or step ≥ ``opening``, whichever comes first; None when there
    is no such step."""
    s, r = _measured(step, ratio)
    end = (r < 1.0) if opening is None else (r < 1.0) | (s >= opening)
    hits = np.nonzero(end)[0]
    return int(s[hits[0]]) if len(hits) else None


def eos_onset(step, ratio, opening: Optional[int] = None) -> Optional[int]:
    """The first step with ratio ≥ 1 from the end of the transient on
    (:func:`transient_end`; without ``opening`` that step has ratio < 1, so
    this is the first upward crossing of the threshold), or None."""
    start = transient_end(step, ratio, opening)
    if start is None:
        return None
    s, r = _measured(step, ratio)
    hits = np.nonzero((r >= 1.0) & (s >= start))[0]
    return int(s[hits[0]]) if len(hits) else None


def fraction_near_threshold(step, ratio, onset: Optional[int],
                            tolerance: float = NEAR_THRESHOLD) -> float:
    """Fraction of measured steps ≥ ``onset`` with |ratio − 1| ≤ tolerance
    (NaN without an onset)."""
    if onset is None:
        return float("nan")
    s, r = _measured(step, ratio)
    after = r[s >= onset]
    if len(after) == 0:
        return float("nan")
    return float(np.mean(np.abs(after - 1.0) <= tolerance))


def peak_ratio(step, ratio, opening: Optional[int] = None) -> float:
    """The largest ratio after the initial transient (:func:`transient_end`,
    ``opening`` as there); NaN when the transient never ends (the ratio never
    drops below 1) or nothing was measured."""
    s, r = _measured(step, ratio)
    start = transient_end(step, ratio, opening)
    if start is None:
        return float("nan")
    r = r[s >= start]
    return float(r.max()) if len(r) else float("nan")


def sharpening_rate(step, lam, onset: Optional[int], start: Optional[int] = None) -> float:
    """Least-squares slope dλ/dstep over measured steps in [start, onset)."""
    s, v = _measured(step, lam)
    keep = np.ones(len(s), dtype=bool)
    if start is not None:
        keep &= s >= start
    if onset is not None:
        keep &= s < onset
    s, v = s[keep], v[keep]
    if len(s) < 2 or np.ptp(s) == 0:
        return float("nan")
    return float(np.polyfit(s, v, 1)[0])


# ---------------------------------------------------------------------------
# per trial


def with_lambda(steps: pd.DataFrame) -> pd.DataFrame:
    """``steps`` plus a ``lambda`` column = ratio × threshold (λ₁ of the
    operator the threshold applies to)."""
    out = steps.copy()
    out["lambda"] = out["ratio"].astype(float) * out["threshold"].astype(float)
    return out


def _last_finite(step: pd.Series, values: pd.Series) -> tuple[float, float]:
    ok = np.isfinite(values.to_numpy(dtype=float))
    if not ok.any():
        return float("nan"), float("nan")
    i = np.nonzero(ok)[0][-1]
    return float(values.iloc[i]), float(step.iloc[i])


def trial_metrics(steps: pd.DataFrame, config: Optional[dict] = None) -> dict:
    """The metrics of one trial from its per-step rows (any order);
    ``config``: its RunConfig dict, which says how long the opening
    transient may last (:func:`opening_steps`)."""
    steps = steps.sort_values("step", kind="stable")
    step, ratio = steps["step"], steps["ratio"]
    lam = ratio.astype(float) * steps["threshold"].astype(float)
    opening = opening_steps(config)
    onset = eos_onset(step, ratio, opening)
    start = transient_end(step, ratio, opening)
    measured = np.isfinite(ratio.to_numpy(dtype=float))
    loss = steps["loss"].to_numpy(dtype=float)
    last_loss, _ = _last_finite(steps["step"], steps["loss"])
    out = {
        "onset_step": float("nan") if onset is None else onset,
        "reached_eos": onset is not None,
        "start_above": bool(measured.any() and start is None),
        "transient_end": float("nan") if start is None else start,
        # probed steps of the opening transient (0: the curve starts below 1)
        "transient_steps": float("nan") if start is None else int((measured & (step.to_numpy() < start)).sum()),
        "frac_near_threshold": fraction_near_threshold(step, ratio, onset),
        "peak_ratio": peak_ratio(step, ratio, opening),
        # no steps after a transient that never ends
        "sharpening_rate": sharpening_rate(step, lam, onset, start) if start is not None else float("nan"),
        "nonfinite_loss": bool(len(loss) and not np.isfinite(loss).all()),
        "last_logged_loss": last_loss,
        "logged_steps": int(len(steps)),
        "measured_steps": int(measured.sum()),
    }
    for name in SAMPLE_METRICS:
        value, at = _last_finite(steps["step"], steps[name]) if name in steps else (float("nan"), float("nan"))
        out[name] = value
        out[f"{name}_step"] = at
    return out


def trial_config(row: dict) -> Optional[dict]:
    """The RunConfig dict of a trials-table row (its ``config`` JSON), or None."""
    text = row.get("config")
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return None
    try:
        config = json.loads(text) if isinstance(text, str) else text
    except ValueError:
        return None
    return config if isinstance(config, dict) else None


def per_trial_metrics(study: Study) -> pd.DataFrame:
    """One row per trial: the trials table's identity columns and the metrics."""
    groups = dict(tuple(study.steps.groupby("trial_id", sort=False)))
    empty = study.steps.iloc[0:0]
    rows = []
    for trial in study.trials.itertuples(index=False):
        row = trial._asdict()
        m = trial_metrics(groups.get(trial.trial_id, empty), trial_config(row))
        for name in SAMPLE_METRICS:  # the trials table wins where it has a value
            table_value = row.get(name)
            if table_value is not None and not pd.isna(table_value) and np.isfinite(float(table_value)):
                m[name] = float(table_value)
        table_loss = row.get("final_loss")
        has_table_loss = table_loss is not None and not pd.isna(table_loss)
        m["final_loss"] = float(table_loss) if has_table_loss else m["last_logged_loss"]
        m["diverged"] = row["status"] == DIVERGED or m["nonfinite_loss"]
        row.update(m)
        rows.append(row)
    frame = pd.DataFrame(rows)
    return frame.sort_values(["variant", "lr", "seed"], kind="stable").reset_index(drop=True)


# ---------------------------------------------------------------------------
# over seeds


def bin_learning_rates(study: Study, max_lrs: int = MAX_LEARNING_RATES) -> tuple[Study, bool]:
    """``study`` unchanged when it has at most ``max_lrs`` distinct learning
    rates (a grid); else a copy whose trials' ``lr`` is the geometric centre
    of one of ``max_lrs`` equal bins of log₁₀ lr (the exact value moves to
    ``lr_exact``), so that a search over continuous lrs still gives a
    readable variant × lr table.  Returns (study, whether it binned)."""
    lrs = study.trials["lr"].to_numpy(dtype=float)
    if len(np.unique(lrs)) <= max_lrs:
        return study, False
    log = np.log10(lrs)
    edges = np.linspace(log.min(), log.max(), max_lrs + 1)
    index = np.clip(np.searchsorted(edges, log, side="right") - 1, 0, max_lrs - 1)
    centres = 10 ** ((edges[:-1] + edges[1:]) / 2)
    trials = study.trials.copy()
    trials["lr_exact"] = trials["lr"]
    trials["lr"] = centres[index]
    return Study(study.name, study.path, study.kind, study.steps, trials), True


def t_band(mean: np.ndarray, std: np.ndarray, n: np.ndarray,
           confidence: float = CONFIDENCE) -> tuple[np.ndarray, np.ndarray]:
    """Student-t interval mean ± t·s/√n (NaN where n < 2)."""
    n = np.asarray(n, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        half = stats.t.ppf(0.5 + confidence / 2, np.where(n >= 2, n - 1, np.nan)) * np.asarray(std) / np.sqrt(n)
    return np.asarray(mean) - half, np.asarray(mean) + half


def mean_band(values: Iterable[float], confidence: float = CONFIDENCE) -> tuple[float, float, float, int]:
    """(mean, low, high, n) of the finite ``values``."""
    v = np.asarray(list(values), dtype=float)
    v = v[np.isfinite(v)]
    n = len(v)
    if n == 0:
        return float("nan"), float("nan"), float("nan"), 0
    mean = float(v.mean())
    std = float(v.std(ddof=1)) if n >= 2 else float("nan")
    lo, hi = t_band(np.array([mean]), np.array([std]), np.array([n]), confidence)
    return mean, float(lo[0]), float(hi[0]), n


def aggregate_metrics(per_trial: pd.DataFrame, metrics: Sequence[str] = TRIAL_METRICS,
                      confidence: float = CONFIDENCE) -> pd.DataFrame:
    """Per variant × lr: trial counts, divergence fraction, and for each metric
    ``<m>_mean``, ``<m>_lo``, ``<m>_hi``, ``<m>_n`` over the trials where it is
    finite (seeds that never reached the threshold have no onset)."""
    rows = []
    for (variant, lr), group in per_trial.groupby(["variant", "lr"], sort=True):
        row = {
            "variant": variant,
            "lr": lr,
            "n_trials": len(group),
            "n_completed": int((group["status"] == COMPLETED).sum()),
            "n_diverged": int(group["diverged"].sum()),
            "diverged_frac": float(group["diverged"].mean()),
            "n_reached_eos": int(group["reached_eos"].sum()),
            "n_probed": int((group["measured_steps"] > 0).sum()),   # trials with any λ₁ measurement
            "n_start_above": int(group["start_above"].sum()),       # ratio never below 1
            "n_error": int((group["status"] == ERROR).sum()),       # trials that failed (no result)
            "n_unfinished": int((group["status"] == RUNNING).sum()),  # still running or interrupted
        }
        for name in metrics:
            mean, lo, hi, n = mean_band(group[name], confidence)
            low, high = BOUNDS.get(name, (None, None))
            lo = lo if low is None or not np.isfinite(lo) else max(lo, low)
            hi = hi if high is None or not np.isfinite(hi) else min(hi, high)
            row.update({f"{name}_mean": mean, f"{name}_lo": lo, f"{name}_hi": hi, f"{name}_n": n})
        rows.append(row)
    return pd.DataFrame(rows)


def with_step_ratio(steps: pd.DataFrame, optimizer_of: pd.Series) -> pd.DataFrame:
    """``steps`` plus ``step_ratio`` = batch sharpness / threshold: the
    curvature gᵀHg/‖g‖² along the (unpreconditioned) gradient step over the
    threshold, for GD and momentum trials; NaN for Adam/AdamW, whose step and
    threshold belong to P⁻¹H, and where batch sharpness was not logged
    (or not loaded).  ``optimizer_of``: trial_id → optimizer name."""
    out = steps.copy()
    plain = ~out["trial_id"].map(optimizer_of).isin(PRECONDITIONED_OPTIMIZERS)
    if "batch_sharpness" not in out:
        out["step_ratio"] = np.nan
        return out
    ratio = out["batch_sharpness"].astype(float) / out["threshold"].astype(float)
    out["step_ratio"] = ratio.where(plain)
    return out


def curves(study: Study, columns: Sequence[str] = ("ratio", "lambda", "loss", "threshold", "step_ratio", "n_above",
                                                   "n_above_capped"),
           confidence: float = CONFIDENCE) -> pd.DataFrame:
    """Per variant × lr × step: mean and band over seeds of each column
    (``<c>_mean``, ``<c>_lo``, ``<c>_hi``, ``<c>_n``), from the finite values
    at that step.  ``lambda`` is ratio × threshold; ``step_ratio`` is
    :func:`with_step_ratio` (all-NaN without batch sharpness); a column the
    steps do not hold (``n_above`` when not loaded) is left out."""
    lr_of = study.trials.set_index("trial_id")["lr"]
    steps = with_lambda(study.steps)
    if "step_ratio" in columns:
        optimizer_of = (study.trials.set_index("trial_id")["optimizer"] if "optimizer" in study.trials
                        else pd.Series(dtype=object))
        steps = with_step_ratio(steps, optimizer_of)
    steps["lr"] = steps["trial_id"].map(lr_of)   # the trial's nominal lr (warm-up changes the logged one)
    keys = ["variant", "lr", "step"]
    parts = []
    columns = [c for c in columns if c in steps]
    for col in columns:
        values = steps[keys + [col]].copy()
        values[col] = values[col].astype(float).where(np.isfinite(values[col].astype(float)))
        g = values.dropna(subset=[col]).groupby(keys, sort=True)[col].agg(["mean", "std", "count"])
        lo, hi = t_band(g["mean"].to_numpy(), g["std"].to_numpy(), g["count"].to_numpy(), confidence)
        parts.append(pd.DataFrame({f"{col}_mean": g["mean"], f"{col}_lo": lo, f"{col}_hi": hi,
                                   f"{col}_n": g["count"]}, index=g.index))
    if not parts:
        return pd.DataFrame(columns=keys)
    out = pd.concat(parts, axis=1).sort_index().reset_index()
    for col in columns:
        out[f"{col}_n"] = out[f"{col}_n"].fillna(0).astype(int)
    return out



def has_critical(study: Study) -> bool:
    """Whether the study logged critical sharpness (``sharpness.critical``)."""
    return "lambda_critical" in study.steps and study.steps["lambda_critical"].notna().any()


def _with_critical(study: Study) -> Study:
    """The study's steps plus ``two_over_lr`` (2/η: λ_critical above it means
    the step raises the Hessian-batch loss) and the ratios of λ_critical to
    λ₁ (the operator of ``ratio``) and to λ_dir."""
    steps = with_lambda(study.steps)
    steps["two_over_lr"] = 2.0 / steps["lr"].astype(float)
    crit = steps["lambda_critical"].astype(float)
    steps["critical_over_lambda"] = crit / steps["lambda"].astype(float)
    steps["critical_over_dir"] = crit / steps["lambda_dir"].astype(float)
    return dataclasses.replace(study, steps=steps)


def critical_curves(study: Study) -> pd.DataFrame:
    """:func:`curves` of λ₁ (``lambda``), ``lambda_critical``, ``lambda_dir``
    and 2/η (``two_over_lr``)."""
    return curves(_with_critical(study), columns=("lambda", "lambda_critical", "lambda_dir", "two_over_lr"))


def critical_agreement(study: Study) -> pd.DataFrame:
    """Per variant × lr, over every probed step of every seed with a
    critical sharpness: the median of λ_critical/λ₁ and λ_critical/λ_dir, the
    fraction of steps with λ_critical > 2/η (the step raised the
    Hessian-batch loss) and the median line-search passes."""
    steps = _with_critical(study).steps
    steps = steps[np.isfinite(steps["lambda_critical"].astype(float))]
    lr_of = study.trials.set_index("trial_id")["lr"]
    steps = steps.assign(lr=steps["trial_id"].map(lr_of))
    rows = []
    for (variant, lr), g in steps.groupby(["variant", "lr"], sort=True):
        crit = g["lambda_critical"].astype(float)
        rows.append({"variant": variant, "lr": lr, "probes": len(g),
                     "critical_over_lambda": float(g["critical_over_lambda"].median()),
                     "critical_over_dir": float(g["critical_over_dir"].median()),
                     "above_two_over_lr": float((crit > g["two_over_lr"]).mean()),
                     "passes": float(g["critical_passes"].astype(float).median())})
    return pd.DataFrame(rows)
