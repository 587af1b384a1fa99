"""The largest stable learning rate of each variant (and seed), read from the trials.

A trial's **verdict** is *stable* when it completed and *unstable* when it
diverged (the trainer's NaN/inf and ``train.divergence_loss`` checks and the
study's ``early_stop`` rules; see :mod:`study.early_stop`); stopped and
errored trials give none.  From the verdicts of one (variant, seed):

* **hi**, the smallest unstable learning rate (none if no trial was unstable);
* **lo**, the largest stable learning rate below ``hi`` (below every lr when
  ``hi`` is none); none if there is no such trial;
* **non-monotone**: a stable learning rate above ``hi`` was also seen (the
  boundary is then taken below the first unstable lr: ``lo`` and ``hi`` stay
  as defined, which is the conservative reading);
* the **boundary estimate** is the geometric mean √(lo·hi) and the **width**
  hi/lo; a boundary search stops once the width is at most
  ``search.boundary.factor``.

:func:`bracket_of` is the one place this reduction is written; the boundary
search (:mod:`study.boundary`) decides with it where to try next.
:func:`boundary_table` tabulates it per (variant, seed), :func:`plot_boundary`
draws every verdict with the bracket, and :func:`report_section` gives the
report its table and figure for studies that search the largest stable lr
(``search.algorithm: boundary``, or ``study.objective: largest_stable_lr``).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from analysis import plots as P
from analysis.load import Study

VERDICTS = {"completed": True, "diverged": False}   # trial status -> stable
REL_TOL = 1e-9   # relative tolerance of "hi/lo <= factor" (floating-point rounding of log-spaced lrs)

STATUS_TEXT = {
    "found": "found: hi/lo within the factor",
    "below": "below the bracket: its low end is unstable",
    "above": "above the bracket: its high end is stable",
    "open": "open: not narrowed to the factor yet",
    "bracketed": "bracketed",
    "all stable": "no unstable trial",
    "all unstable": "no stable trial",
    "no verdict": "no finished trial",
}


@dataclass(frozen=True)
class Bracket:
    """The bracket read from a set of verdicts (see the module docstring)."""
    lo: Optional[float]
    hi: Optional[float]
    non_monotone: bool = False

    @property
    def width(self) -> float:
        """hi/lo (NaN when either end is missing)."""
        return self.hi / self.lo if self.lo is not None and self.hi is not None else math.nan

    @property
    def estimate(self) -> float:
        """√(lo·hi) (NaN when either end is missing)."""
        return math.sqrt(self.lo * self.hi) if self.lo is not None and self.hi is not None else math.nan


def bracket_of(verdicts: Iterable[tuple[float, bool]]) -> Bracket:
    """The bracket of ``(lr, stable)`` pairs."""
    verdicts = [(float(lr), bool(stable)) for lr, stable in verdicts]
    unstable = [lr for lr, stable in verdicts if not stable]
    hi = min(unstable) if unstable else None
    stable = [lr for lr, s in verdicts if s]
    below = [lr for lr in stable if hi is None or lr < hi]
    lo = max(below) if below else None
    return Bracket(lo, hi, non_monotone=hi is not None and any(lr > hi for lr in stable))


def within_factor(lo: float, hi: float, factor: float) -> bool:
    """hi/lo <= factor, up to :data:`REL_TOL`."""
    return math.log(hi / lo) <= math.log(factor) * (1 + REL_TOL) + 1e-15


def _status(b: Bracket, tried: Sequence[float], factor: Optional[float],
            bracket: Optional[tuple[float, float]]) -> str:
    if not tried:
        return "no verdict"
    if factor is None:   # not a boundary search: only what the verdicts say
        if b.lo is not None and b.hi is not None:
            return "bracketed"
        return "all stable" if b.hi is None else "all unstable"
    if b.lo is not None and b.hi is not None and within_factor(b.lo, b.hi, factor):
        return "found"
    if bracket is not None:
        low, high = bracket
        if b.lo is None and b.hi is not None and b.hi <= low * (1 + REL_TOL):
            return "below"
        if b.hi is None and b.lo is not None and b.lo >= high * (1 - REL_TOL):
            return "above"
    return "open"


def boundary_table(trials: pd.DataFrame, factor: Optional[float] = None,
                   bracket: Optional[tuple[float, float]] = None) -> pd.DataFrame:
    """One row per (variant, seed), in the trials table's order: ``trials``
    (with a verdict), ``stable``, ``unstable``, ``lo``, ``hi``, ``width``
    (hi/lo), ``estimate`` (√(lo·hi)), ``non_monotone`` and ``status``
    (:data:`STATUS_TEXT`; ``found``/``below``/``above``/``open`` when
    ``factor`` — the boundary search's stopping width — is given, with
    ``bracket`` its [low, high])."""
    rows = []
    for (variant, seed), group in trials.groupby(["variant", "seed"], sort=False):
        judged = group[group["status"].isin(list(VERDICTS))]
        verdicts = [(lr, VERDICTS[s]) for lr, s in zip(judged["lr"], judged["status"])]
        b = bracket_of(verdicts)
        rows.append({
            "variant": variant, "seed": int(seed), "trials": len(verdicts),
            "stable": sum(s for _, s in verdicts), "unstable": sum(not s for _, s in verdicts),
            "lo": np.nan if b.lo is None else b.lo, "hi": np.nan if b.hi is None else b.hi,
            "width": b.width, "estimate": b.estimate, "non_monotone": b.non_monotone,
            "status": _status(b, [lr for lr, _ in verdicts], factor, bracket),
        })
    columns = ["variant", "seed", "trials", "stable", "unstable", "lo", "hi", "width", "estimate",
               "non_monotone", "status"]
    return pd.DataFrame(rows, columns=columns)


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """:func:`boundary_table` formatted for reading."""
    def lr(x) -> str:
        return "—" if not np.isfinite(x) else P.format_lr(float(x))

    out = pd.DataFrame({
        "variant": table["variant"], "seed": table["seed"],
        "largest stable lr": table["lo"].map(lr), "smallest unstable lr": table["hi"].map(lr),
        "hi/lo": table["width"].map(lambda x: "—" if not np.isfinite(x) else f"{x:.3g}"),
        "boundary ≈ √(lo·hi)": table["estimate"].map(lr),
        "trials": table.apply(lambda r: f"{r['trials']} ({r['stable']} stable)", axis=1),
        "status": table.apply(lambda r: STATUS_TEXT[r["status"]]
                              + ("; non-monotone: a stable lr above hi" if r["non_monotone"] else ""), axis=1),
    })
    return out


def plot_boundary(trials: pd.DataFrame, table: pd.DataFrame, factor: Optional[float] = None,
                  bracket: Optional[tuple[float, float]] = None, title: str = "") -> Figure:
    """One row per (variant, seed): every trial's lr (log x) as a stable ●
    or unstable ✕ marker, the bracket [lo, hi] as a bar, the estimate √(lo·hi)
    as a tick; the search's bracket ends dotted when given."""
    labels = [f"{v}" if table["seed"].nunique() == 1 else f"{v} (seed {s})"
              for v, s in zip(table["variant"], table["seed"])]
    colors = {True: sns.color_palette("colorblind")[2], False: sns.color_palette("colorblind")[3]}
    with sns.axes_style(P.STYLE), sns.plotting_context(P.CONTEXT):
        fig, axes = P._figure(1, 1, width=8.0, height=1.2 + 0.55 * len(table))
        ax = axes[0, 0]
        for y, row in enumerate(table.itertuples(index=False)):
            group = trials[(trials["variant"] == row.variant) & (trials["seed"] == row.seed)]
            judged = group[group["status"].isin(list(VERDICTS))]
            for stable, marker in ((True, "o"), (False, "X")):
                lrs = judged.loc[judged["status"].map(VERDICTS) == stable, "lr"]
                ax.scatter(lrs, [y] * len(lrs), marker=marker, s=45, color=colors[stable], zorder=3,
                           label=("stable" if stable else "unstable") if y == 0 else None)
            other = group.loc[~group["status"].isin(list(VERDICTS)), "lr"]
            if len(other):
                ax.scatter(other, [y] * len(other), marker="o", s=45, facecolors="none", edgecolors="0.5",
                           zorder=3, label="no verdict (stopped/error)")
            if np.isfinite(row.lo) and np.isfinite(row.hi):
                ax.plot([row.lo, row.hi], [y, y], color="0.2", linewidth=6, alpha=0.35, zorder=2,
                        solid_capstyle="butt", label="bracket [lo, hi]" if y == 0 else None)
                ax.plot([row.estimate], [y], marker="|", markersize=16, color="0.1", zorder=4,
                        label="√(lo·hi)" if y == 0 else None)
                ax.annotate(f"{P.format_lr(row.estimate)} (×{row.width:.3g})", (row.hi, y),
                            xytext=(8, 6), textcoords="offset points", fontsize=9, color="0.2")
            elif np.isfinite(row.lo) or np.isfinite(row.hi):   # one end: below/above the bracket, or open
                end = row.hi if np.isfinite(row.hi) else row.lo
                text = {"below": "below the bracket", "above": "above the bracket"}.get(
                    row.status, "no unstable trial" if np.isfinite(row.lo) else "no stable trial")
                left = not np.isfinite(row.hi)   # write it towards the middle of the axis
                ax.annotate(text, (end, y), xytext=(-8 if left else 8, 6), textcoords="offset points", fontsize=9,
                            color="0.2", ha="right" if left else "left")
        if bracket is not None:
            for end in bracket:
                ax.axvline(end, color="0.5", linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ax.set_yticks(range(len(table)))
        ax.set_yticklabels(labels)
        ax.set_ylim(len(table) - 0.5, -0.5)
        ax.set_xlabel("learning rate η")
        handles, names = ax.get_legend_handles_labels()
        unique = dict(zip(names, handles))
        ax.legend(unique.values(), unique.keys(), loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
        where = f"\n(the search stops at hi/lo ≤ {factor:g})" if factor is not None else ""
        ax.set_title(title or f"Largest stable learning rate: every trial's verdict and the bracket{where}")
    return fig


# ---------------------------------------------------------------------------
# the report's section


CAPTION = ("Every trial's learning rate per variant (and seed): ● stable (completed), ✕ unstable (diverged: NaN/inf, "
           "loss blow-up or an early_stop rule); the grey bar is the bracket from the largest stable lr below the "
           "smallest unstable one to that unstable lr, the tick its geometric mean; dotted lines: the search's "
           "bracket.")


@dataclass
class BoundarySection:
    table: pd.DataFrame          # boundary_table
    display: pd.DataFrame        # display_table
    figure: P.FigurePaths
    csv: Path
    factor: Optional[float]
    algorithm: str

    @property
    def title(self) -> str:
        return "Largest stable learning rate (boundary per variant, with its bracket)"

    def note(self) -> str:
        how = ("boundary search (k-section of the log-lr bracket)" if self.algorithm == "boundary"
               else f"{self.algorithm} search with objective largest_stable_lr")
        stop = f" It stops a (variant, seed) once hi/lo ≤ {self.factor:g}." if self.factor is not None else ""
        return (f"From a {how}. A trial is stable when it completed and unstable when it diverged; lo is the "
                f"largest stable lr below the smallest unstable lr hi.{stop}")

    def context(self, out_dir: Path) -> dict:
        """The section as the report templates show it (``boundary`` in :func:`analysis.report.report_context`)."""
        import base64

        return {"title": self.title, "note": self.note(), "table": self.display, "caption": CAPTION,
                "png": self.figure.png.relative_to(out_dir).as_posix(),
                "svg": self.figure.svg.relative_to(out_dir).as_posix(),
                "png_base64": base64.b64encode(self.figure.png.read_bytes()).decode("ascii")}


def search_settings(study_dir: str | os.PathLike) -> Optional[dict]:
    """``{"algorithm", "factor", "bracket"}`` of a study that searches the
    largest stable lr (from its ``study.json``), else None."""
    path = Path(study_dir) / "study.json"
    if not path.is_file():
        return None
    spec = json.loads(path.read_text()).get("spec", {})
    search, study = spec.get("search") or {}, spec.get("study") or {}
    algorithm = search.get("algorithm")
    if algorithm == "boundary":
        return {"algorithm": algorithm, "factor": float(search["boundary"]["factor"]),
                "bracket": tuple(float(x) for x in search["lr"]["bracket"])}
    if study.get("objective") == "largest_stable_lr":
        return {"algorithm": algorithm, "factor": None, "bracket": None}
    return None


def report_section(study: Study, out_dir: str | os.PathLike) -> Optional[BoundarySection]:
    """The boundary table (also written as ``boundary.csv``) and figure
    (``figures/boundary.png``/``.svg``) under ``out_dir`` for a study that
    searches the largest stable lr; None for other studies and single runs."""
    settings = search_settings(study.path) if study.kind == "study" else None
    if settings is None or study.trials.empty:
        return None
    out_dir = Path(out_dir)
    table = boundary_table(study.trials, settings["factor"], settings["bracket"])
    fig = plot_boundary(study.trials, table, settings["factor"], settings["bracket"])
    figure = P.save_figure(fig, out_dir / "figures", "boundary")
    csv = out_dir / "boundary.csv"
    table.to_csv(csv, index=False)
    return BoundarySection(table, display_table(table), figure, csv, settings["factor"], settings["algorithm"])
