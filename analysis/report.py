"""``eos report``: a study's (or a run's) tables and figures as HTML and Markdown.

:func:`build_report` writes into ``<study>/report/`` (or ``out_dir``):

* ``report.html`` — self-contained (figures embedded as base64 PNG, inline CSS);
* ``summary.md`` — the summary table, definitions and links to the figures;
* ``summary.csv``, ``per_trial.csv`` — the numbers behind the tables;
* ``figures/<name>.png`` and ``.svg``.

and prints the summary table.  Sample-quality metrics are optional: without
any FID value the report says so and builds the rest.

A study still running (or interrupted) reports too: its trials come from
the run folders and the step dataset (:func:`analysis.load.study_trials`),
and its unfinished trials are marked (:func:`partial_banner` at the top of
both documents, :func:`figure_marker` on every figure, their status as
``running (step 37 of 300)`` in the trials table, an ``unfinished`` count in
the summary table, the list of them in a note); their metrics are those of
the steps logged so far.

Both documents are Jinja2 templates shipped with the package
(``analysis/templates/report.html.j2`` and ``summary.md.j2``) rendered from
one context (:func:`report_context`); pandas renders the tables (the
``html_table`` and ``markdown_table`` filters, :mod:`analysis.tables`).
Adding a section to the report is one entry in :func:`report_context` and
one ``{% block %}`` in the template(s) that show it.
"""
from __future__ import annotations

import base64
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from analysis import metrics as M
from analysis import plots as P
from analysis.load import Study, is_unfinished, load
from analysis.tables import html_table, markdown_table
from trainers.run.rundir import RUNNING, STATUS_MEANINGS, STATUSES

FIGURE_CAPTIONS = {
    "lambda": "λ₁ against the step, one panel per variant; the dashed line of each colour is that "
              "learning rate's stability threshold.",
    "ratio": "λ₁/threshold of every variant, one axis per learning rate (log scale); the dashed line is the "
             "threshold and the grey band ±10 % around it.",
    "step_ratio": "Curvature along the gradient step, gᵀHg/‖g‖² (batch sharpness), over the threshold, for GD "
                  "and momentum trials (log scale): under GD it can sit at the threshold while λ₁ is above it "
                  "(docs/results.md).",
    "above": "How many eigenvalues of the operator in the ratio sit above `sharpness.above_fraction` × threshold "
             "(default 0.75: 1.5/η under GD), one panel per variant; a triangle: some seed hit "
             "`sharpness.above_cap`, the count is a lower bound there.",
    "loss": "Training loss, one panel per variant.",
    "heatmaps": "Mean EoS onset step and fraction of diverged seeds over variant × learning rate.",
    "fid": "Final FID of EMA samples against the learning rate.",
    "critical": "Critical sharpness 2/η_c (markers; `sharpness.critical`) against λ₁ (solid), its quadratic model "
                "ΔθᵀHΔθ/Δθᵀg (dotted) and 2/η (dashed), all on the Hessian batch: 2/η_c above 2/η means the "
                "step raised that loss (docs/results.md).",
}

DEFINITIONS = [
    ("ratio", "λ₁ / threshold, where λ₁ is the top eigenvalue of P⁻¹H for Adam/AdamW and of H otherwise, and "
              "the threshold is 2/η (GD), (2+2β)/η (momentum) or (2+2β₁)/((1−β₁)η) (Adam)."),
    ("step curvature", "batch sharpness / threshold: the mean over fresh training mini-batches of gᵀH_Bg / ‖g‖², "
                       "the curvature of a mini-batch loss along its own gradient "
                       "(`sharpness.batch_sharpness`), for GD and momentum trials."),
    ("initial transient", "leading probed steps whose ratio is already ≥ 1 before it first drops below 1 "
                          "(Adam's preconditioner, built from a few gradients, starts λ₁(P⁻¹H) far above "
                          "threshold); for runs measuring Adam's `update` preconditioner "
                          "(`sharpness.adam_preconditioner`) at most the first 1/(1−β₁) steps. The metrics "
                          "below start after it."),
    ("onset", "first step with ratio ≥ 1 from the end of the transient on, i.e. the first upward crossing of the "
              "threshold (mean over the seeds that reached it; the count is shown)."),
    ("near threshold", f"fraction of probed steps at or after the onset with |ratio − 1| ≤ {M.NEAR_THRESHOLD:.0%}."),
    ("peak ratio", "largest probed ratio after the transient (— when the ratio never drops below 1: every step "
                   "is still in the transient)."),
    ("sharpening rate", "least-squares slope of λ₁ per step over the probed steps after the transient and before "
                        "the onset."),
    ("critical sharpness", "2/η_c, η_c the smallest step along the update Δθ the optimizer is about to take at "
                           "which the Hessian-batch loss rises, by line search (Kalra et al. 2026, "
                           "`sharpness.critical`); ΔθᵀHΔθ/Δθᵀg is its value on the quadratic model. Compared "
                           "with 2/η for every optimizer (above it: the step raises that loss); it is at most λ₁(H) "
                           "for GD and, on Adam's first step, at most (1 − β₁)·λ₁(P⁻¹H); it is not divided by "
                           "Adam's threshold."),
    ("status", "; ".join(f"`{s}`: {STATUS_MEANINGS[s]}" for s in STATUSES) + "."),
    ("diverged", "trial status `diverged` or a NaN/inf loss."),
    ("final loss", "the trial's final training loss; the mean is over seeds whose final loss is finite."),
    ("bands", f"[low, high] is the {M.CONFIDENCE:.0%} Student-t confidence interval of the mean over seeds "
              "(clipped to the quantity's natural range, e.g. [0, 1] for fractions)."),
]


@dataclass
class StudyTables:
    per_trial: pd.DataFrame
    aggregate: pd.DataFrame
    curves: pd.DataFrame
    lr_binned: bool = False    # lrs of a search were binned (see metrics.bin_learning_rates)


@dataclass
class ReportPaths:
    out_dir: Path
    html: Path
    markdown: Path
    summary_csv: Path
    per_trial_csv: Path
    figures: dict[str, P.FigurePaths] = field(default_factory=dict)


def study_tables(study: Study) -> StudyTables:
    study, binned = M.bin_learning_rates(study)
    per_trial = M.per_trial_metrics(study)
    return StudyTables(per_trial, M.aggregate_metrics(per_trial), M.curves(study), binned)


def _binning_note(tables: StudyTables) -> Optional[str]:
    if not tables.lr_binned:
        return None
    return (f"This study has more than {M.MAX_LEARNING_RATES} distinct learning rates (a search): the variant × lr "
            f"tables and figures group them into {M.MAX_LEARNING_RATES} equal bins of log₁₀ lr, labelled by the "
            "bin's geometric centre. The trials table lists each trial's exact lr.")


def mark_partial(fig, text: str) -> None:
    """``text`` in red along the bottom of ``fig``, in a strip the
    constrained layout leaves free for it."""
    strip = 0.25 / fig.get_figheight()      # inches → figure fraction
    fig.get_layout_engine().set(rect=(0, strip, 1, 1 - strip))
    fig.text(0.005, 0.2 * strip, text, ha="left", va="bottom", fontsize=8, color="firebrick")


def draw_figures(study: Study, tables: StudyTables, out_dir: str | os.PathLike,
                 progress: bool = False) -> dict[str, P.FigurePaths]:
    """Every figure the data supports, saved under ``out_dir``."""
    optimizers = list(study.trials["optimizer"]) if "optimizer" in study.trials else []
    c, agg = tables.curves, tables.aggregate
    has_ratio = "ratio_n" in c and c["ratio_n"].sum() > 0
    has_loss = "loss_n" in c and c["loss_n"].sum() > 0
    has_step = "step_ratio_n" in c and c["step_ratio_n"].sum() > 0
    has_above = "n_above_n" in c and c["n_above_n"].sum() > 0
    makers = {
        "lambda": (lambda: P.plot_lambda(c, optimizers)) if has_ratio else None,
        "ratio": (lambda: P.plot_ratio(c)) if has_ratio else None,
        "step_ratio": (lambda: P.plot_ratio(
            c, column="step_ratio", ylabel="gᵀHg/‖g‖² / threshold",
            title="Step curvature gᵀHg/‖g‖² / threshold (mean, 95% CI)"))
        if has_step else None,
        "above": (lambda: P.plot_above(c)) if has_above else None,
        "loss": (lambda: P.plot_loss(c)) if has_loss else None,
        "heatmaps": (lambda: P.plot_heatmaps(agg)) if len(agg) else None,
        "fid": (lambda: P.plot_fid(agg)) if len(agg) else None,
        "critical": (lambda: P.plot_critical(M.critical_curves(study), optimizers)) if M.has_critical(study) else None,
    }
    out = {}
    partial = figure_marker(study)
    for name, make in makers.items():
        fig = make() if make else None
        if fig is None:
            continue
        if partial:
            mark_partial(fig, partial)
        out[name] = P.save_figure(fig, out_dir, name)
        if progress:
            print(f"  figure {out[name].png}", flush=True)
    return out


# ---------------------------------------------------------------------------
# formatting


def _num(x: float, digits: int = 3) -> str:
    if x is None or not np.isfinite(x):
        return "—" if x is None or np.isnan(x) else ("∞" if x > 0 else "−∞")
    if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}"


def _with_band(row: pd.Series, name: str, fmt=_num) -> str:
    mean, lo, hi, n = row[f"{name}_mean"], row[f"{name}_lo"], row[f"{name}_hi"], row[f"{name}_n"]
    if n == 0 or not np.isfinite(mean):
        return "—"
    if n >= 2 and np.isfinite(lo):
        return f"{fmt(mean)} [{fmt(lo)}, {fmt(hi)}]"
    return fmt(mean)


def _pct(x: float) -> str:
    return "—" if not np.isfinite(x) else f"{x:.0%}"


def in_lr_order(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows by variant, then learning rate in the figures' order (:func:`analysis.plots.lr_order`)."""
    if frame.empty:
        return frame
    rank = {lr: i for i, lr in enumerate(P.lr_order(frame["lr"].unique()))}
    keys = ["variant", "_lr_rank"] + (["seed"] if "seed" in frame else [])
    return (frame.assign(_lr_rank=frame["lr"].map(rank)).sort_values(keys, kind="stable")
            .drop(columns="_lr_rank").reset_index(drop=True))


def summary_table(aggregate: pd.DataFrame) -> pd.DataFrame:
    """The aggregate table formatted for reading (strings), one row per variant × lr."""
    has_fid = "fid_n" in aggregate and aggregate["fid_n"].sum() > 0
    has_unfinished = "n_unfinished" in aggregate and aggregate["n_unfinished"].sum() > 0
    has_errors = "n_error" in aggregate and aggregate["n_error"].sum() > 0
    rows = []
    for _, r in in_lr_order(aggregate).iterrows():
        errors = int(r["n_error"]) if "n_error" in r else 0
        if r["n_probed"]:
            reached = (f"{int(r['n_reached_eos'])}/{int(r['n_trials'])}"
                       + (f" ({int(r['n_start_above'])} never below 1)" if r["n_start_above"] else ""))
        else:
            reached = "— (error)" if errors == r["n_trials"] else "not probed"
        row = {
            "variant": r["variant"],
            "lr": P.format_lr(r["lr"]),
            "seeds": int(r["n_trials"]),
            "diverged": (f"{int(r['n_diverged'])}/{int(r['n_trials'] - errors)}" if errors < r["n_trials"]
                         else "—"),
            "reached EoS": reached,
            "onset step": _with_band(r, "onset_step", lambda x: f"{x:.0f}"),
            "near threshold": _with_band(r, "frac_near_threshold", _pct),
            "peak ratio": _with_band(r, "peak_ratio"),
            "sharpening rate (λ/step)": _with_band(r, "sharpening_rate"),
            "final loss": _with_band(r, "final_loss"),
        }
        if has_errors:
            row["errors"] = f"{errors}/{int(r['n_trials'])}"
        if has_unfinished:
            row["unfinished"] = f"{int(r['n_unfinished'])}/{int(r['n_trials'])}"
        if has_fid:
            row["FID"] = _with_band(r, "fid")
            row["IS"] = _with_band(r, "inception_score")
            row["KID"] = _with_band(r, "kid")
        rows.append(row)
    return pd.DataFrame(rows)


def critical_table(study: Study) -> pd.DataFrame:
    """:func:`analysis.metrics.critical_agreement` in the report's words."""
    t = in_lr_order(M.critical_agreement(study))
    return pd.DataFrame({
        "variant": t["variant"], "lr": [P.format_lr(lr) for lr in t["lr"]], "probes": t["probes"],
        "2/η_c ÷ λ₁ (median)": [_num(x) for x in t["critical_over_lambda"]],
        "2/η_c ÷ ΔθᵀHΔθ/Δθᵀg (median)": [_num(x) for x in t["critical_over_dir"]],
        "steps with 2/η_c > 2/η": [_pct(x) for x in t["above_two_over_lr"]],
        "line-search passes (median)": [_num(x) for x in t["passes"]],
    })


def per_trial_table(per_trial: pd.DataFrame) -> pd.DataFrame:
    cols = {"trial_id": "trial", "variant": "variant", "lr": "lr", "seed": "seed", "status": "status",
            "steps_done": "steps", "transient_steps": "transient steps", "onset_step": "onset step", "frac_near_threshold": "near threshold",
            "peak_ratio": "peak ratio", "sharpening_rate": "sharpening rate", "final_loss": "final loss",
            "fid": "FID"}
    if "lr_exact" in per_trial:
        per_trial = per_trial.assign(lr=per_trial["lr_exact"])
    per_trial = in_lr_order(per_trial)
    if "status" in per_trial and is_unfinished(per_trial).any():
        per_trial = per_trial.assign(status=[status_text(r) for r in per_trial.to_dict("records")])
    if "reason" in per_trial and per_trial["reason"].notna().any():   # why a trial diverged, stopped or failed
        cols = {**cols, "reason": "reason"}
    table = per_trial[[c for c in cols if c in per_trial]].rename(columns=cols).copy()
    if "reason" in table:
        table["reason"] = table["reason"].map(lambda x: "" if x is None or pd.isna(x) else str(x))
    table["lr"] = table["lr"].map(P.format_lr)
    for c in ("onset step", "transient steps"):
        table[c] = table[c].map(lambda x: "—" if not np.isfinite(x) else f"{x:.0f}")
    table["near threshold"] = table["near threshold"].map(_pct)
    for c in ("peak ratio", "sharpening rate", "final loss", "FID"):
        if c in table:
            table[c] = table[c].map(lambda x: _num(float(x)))
    return table


def fid_requested(trials: pd.DataFrame) -> Optional[bool]:
    """Whether some trial asked for FID (``eval.every`` > 0 in its config);
    None when the trials carry no config to tell."""
    if "config" not in trials or trials["config"].isna().all():
        return None
    import json

    def every(text) -> int:
        try:
            return int(((json.loads(text) or {}).get("eval") or {}).get("every") or 0)
        except (TypeError, ValueError, AttributeError):
            return 0
    return bool(any(every(text) > 0 for text in trials["config"].dropna()))


def sample_metrics_note(per_trial: pd.DataFrame) -> Optional[str]:
    """Why there is no FID and how to get it: only when FID was asked for
    (``eval.every`` > 0; or when the trials do not say) and none was measured."""
    if "fid" in per_trial and np.isfinite(per_trial["fid"].astype(float)).any():
        return None
    if fid_requested(per_trial) is False:
        return None
    from trainers.run.fid import InceptionWeightsMissing, find_inception_weights

    note = ("No FID/IS/KID was measured in this study. They are computed during training every "
            "`eval.every` steps (0 turns them off) from EMA samples, and need the Inception weights.")
    try:
        path = find_inception_weights()
        note += f" On this machine the weights are present ({path})."
    except InceptionWeightsMissing as err:
        note += " On this machine they are missing:\n\n" + str(err)
    return note


def error_note(per_trial: pd.DataFrame) -> Optional[str]:
    """The trials that ended in ``error`` (no result), each with its reason."""
    if "status" not in per_trial:
        return None
    failed = in_lr_order(per_trial[per_trial["status"] == "error"])
    if failed.empty:
        return None
    lines = [f"{len(failed)} trial(s) ended in error (no result; left out of the metrics):"]
    for r in failed.itertuples(index=False):
        reason = getattr(r, "reason", None)
        lines.append(f"- {r.trial_id}: {reason if isinstance(reason, str) and reason else 'no reason recorded'}")
    return "\n".join(lines)


def planned_steps(row: dict) -> Optional[int]:
    """``train.steps`` of a trials-table row's config, or None."""
    try:
        return int(M.trial_config(row)["train"]["steps"])
    except (TypeError, KeyError, ValueError):
        return None


def status_text(row: dict) -> str:
    """The status of a trials-table row for reading: an unfinished trial's
    with its progress, ``running (step 37 of 300)``."""
    if row["status"] != RUNNING:
        return str(row["status"])
    done, total = row.get("steps_done"), planned_steps(row)
    if done is None or pd.isna(done):
        return RUNNING
    return f"{RUNNING} (step {int(done)}" + (f" of {total})" if total else ")")


def partial_banner(study: Study) -> Optional[str]:
    """One line saying how many trials are unfinished, None when none is."""
    n = int(is_unfinished(study.trials).sum())
    if not n:
        return None
    what = "run" if study.kind == "run" else "study"
    return (f"{n} of {len(study.trials)} trial{'s' if len(study.trials) > 1 else ''} unfinished: the {what} is "
            f"still running or was interrupted; numbers for {'them' if n > 1 else 'it'} are partial")


def figure_marker(study: Study) -> Optional[str]:
    """The mark on every figure of a partial study (None when every trial has finished)."""
    n = int(is_unfinished(study.trials).sum())
    return f"partial: {n} of {len(study.trials)} trials unfinished, curves up to their last logged step" if n else None


def unfinished_note(per_trial: pd.DataFrame, most: int = 20) -> Optional[str]:
    """The unfinished trials with their progress (at most ``most`` named)."""
    if "status" not in per_trial:
        return None
    unfinished = in_lr_order(per_trial[is_unfinished(per_trial)])
    if unfinished.empty:
        return None
    lines = [f"{len(unfinished)} trial(s) unfinished (their metrics are from the steps logged so far):"]
    lines += [f"- {r['trial_id']}: {status_text(r)}" for r in unfinished.head(most).to_dict("records")]
    if len(unfinished) > most:
        lines.append(f"- … and {len(unfinished) - most} more (per_trial.csv lists every trial)")
    return "\n".join(lines)


def _status_counts(trials: pd.DataFrame) -> str:
    counts = trials["status"].value_counts()
    return ", ".join(f"{n} {s}" for s, n in counts.items())


# ---------------------------------------------------------------------------
# the documents


def blockquote(text: str) -> str:
    """Markdown quote of every line of ``text``."""
    return "\n".join("> " + line if line else ">" for line in text.splitlines())


def _environment() -> Environment:
    env = Environment(loader=PackageLoader("analysis", "templates"), autoescape=select_autoescape(["html.j2"]),
                      trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, undefined=StrictUndefined)
    env.filters.update(html_table=html_table, markdown_table=markdown_table, blockquote=blockquote)
    return env


def report_context(study: Study, tables: StudyTables, figures: dict[str, P.FigurePaths],
                   note: Optional[str], out_dir: Path, boundary=None) -> dict:
    """Everything the templates show: tables as DataFrames, notes and
    captions as plain text (the HTML template escapes them).  ``boundary``:
    the largest-stable-lr section (:func:`analysis.boundary.report_section`), if any."""
    return {
        "title": f"Edge-of-stability report — {study.name}",
        "banner": partial_banner(study),
        "study": {"name": study.name, "path": str(study.path), "n_trials": len(study.trials),
                  "statuses": _status_counts(study.trials), "variants": list(study.variants),
                  "lrs": [P.format_lr(lr) for lr in P.lr_order(study.lrs)]},
        "summary": summary_table(tables.aggregate),
        "notes": [text for text in (unfinished_note(tables.per_trial), error_note(tables.per_trial),
                                    _binning_note(tables), note) if text],
        "figures": [{"name": name, "caption": FIGURE_CAPTIONS.get(name, name),
                     "png": paths.png.relative_to(out_dir).as_posix(),
                     "svg": paths.svg.relative_to(out_dir).as_posix(),
                     "png_base64": base64.b64encode(paths.png.read_bytes()).decode("ascii")}
                    for name, paths in figures.items()],
        "boundary": None if boundary is None else boundary.context(out_dir),
        "trials": per_trial_table(tables.per_trial),
        "critical": critical_table(study) if M.has_critical(study) else None,
        "definitions": DEFINITIONS,
    }


def render(template: str, context: dict) -> str:
    """Render ``analysis/templates/<template>`` with ``context``."""
    return _environment().get_template(template).render(**context)


def build_report(study_dir: str | os.PathLike, out_dir: Optional[str | os.PathLike] = None,
                 quiet: bool = False) -> ReportPaths:
    """Write the HTML report, the Markdown summary, CSV tables and figures of
    the study (or single run) in ``study_dir`` into ``out_dir`` (default
    ``<study_dir>/report``), print the summary table unless ``quiet``, and
    return the paths."""
    study_dir = Path(study_dir)
    out_dir = Path(out_dir) if out_dir is not None else study_dir / "report"
    if not quiet:
        print(f"loading {study_dir}", flush=True)
    study = load(study_dir)
    tables = study_tables(study)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = draw_figures(study, tables, out_dir / "figures", progress=not quiet)
    note = sample_metrics_note(tables.per_trial)
    paths = ReportPaths(out_dir=out_dir, html=out_dir / "report.html", markdown=out_dir / "summary.md",
                        summary_csv=out_dir / "summary.csv", per_trial_csv=out_dir / "per_trial.csv",
                        figures=figures)
    tables.aggregate.to_csv(paths.summary_csv, index=False)
    tables.per_trial.to_csv(paths.per_trial_csv, index=False)
    from analysis.boundary import report_section

    boundary = report_section(study, out_dir)
    context = report_context(study, tables, figures, note, out_dir, boundary)
    paths.html.write_text(render("report.html.j2", context), encoding="utf-8")
    paths.markdown.write_text(render("summary.md.j2", context), encoding="utf-8")
    if boundary is not None:
        paths.figures["boundary"] = boundary.figure
    if not quiet:
        if context["banner"]:
            print(context["banner"])
        with pd.option_context("display.width", 200, "display.max_columns", None):
            print(summary_table(tables.aggregate).to_string(index=False))
            if boundary is not None:  # boundary hook
                print(boundary.display.to_string(index=False))
        for text in (unfinished_note(tables.per_trial), error_note(tables.per_trial), note):
            if text:
                print(text)
        print(f"report: {paths.html}\nsummary: {paths.markdown}")
    return paths
