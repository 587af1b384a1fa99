"""Figures of a study, drawn with seaborn on the Agg canvas, saved as PNG and SVG.

Every function takes the tables of :mod:`analysis.metrics` and returns a
:class:`matplotlib.figure.Figure` (no pyplot state, so it is safe in a
notebook, a worker or a test); :func:`save_figure` writes it.  Lines are the
mean over seeds and the shaded bands the confidence interval of
:func:`analysis.metrics.t_band`.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import matplotlib
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from trainers.config import PRECONDITIONED_OPTIMIZERS

MAX_POINTS = 2000   # longer curves are averaged into this many step bins for drawing
STYLE = "whitegrid"
CONTEXT = "notebook"
THRESHOLD_FORMULAS = {
    "gd": "2/η",
    "momentum": "(2+2β)/η",
    "adam": "(2+2β₁)/((1−β₁)η)",
    "adamw": "(2+2β₁)/((1−β₁)η)",
}


@dataclass
class FigurePaths:
    png: Path
    svg: Path


MIN_WIDTH = 8.0     # inches: room for the suptitle next to an outside legend


def _figure(nrows: int = 1, ncols: int = 1, width: float = 5.0, height: float = 3.8, **kw):
    fig = Figure(figsize=(max(width * ncols, MIN_WIDTH), height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def save_figure(fig: Figure, out_dir: str | os.PathLike, name: str, dpi: int = 120) -> FigurePaths:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = FigurePaths(out_dir / f"{name}.png", out_dir / f"{name}.svg")
    fig.savefig(paths.png, dpi=dpi)
    with matplotlib.rc_context({"svg.fonttype": "none"}):   # text stays text: searchable, editable
        fig.savefig(paths.svg)
    return paths


def format_lr(lr: float) -> str:
    """Shortest scientific form with up to 3 significant digits: 1e-3, 5e-4, 3.16e-4."""
    for digits in (0, 1):
        text = f"{lr:.{digits}e}"
        if abs(float(text) - lr) <= 1e-9 * abs(lr):
            break
    else:
        text = f"{lr:.2e}"
    return text.replace("e-0", "e-").replace("e+0", "e")


def lr_label(lr: float) -> str:
    return f"η = {format_lr(lr)}"


def lambda_label(optimizers: Sequence[str]) -> str:
    optimizers = {o for o in optimizers if isinstance(o, str)}
    if optimizers and optimizers <= set(PRECONDITIONED_OPTIMIZERS):
        return "λ₁(P⁻¹H)"
    if optimizers and not optimizers & set(PRECONDITIONED_OPTIMIZERS):
        return "λ₁(H)"
    return "λ₁ (of P⁻¹H for Adam, H otherwise)"


def threshold_label(optimizers: Sequence[str]) -> str:
    formulas = sorted({THRESHOLD_FORMULAS[o] for o in optimizers if o in THRESHOLD_FORMULAS})
    return "threshold " + (" or ".join(formulas) if formulas else "")


def thin(curve: pd.DataFrame, max_points: int = MAX_POINTS) -> pd.DataFrame:
    """``curve`` (one line, sorted by step) averaged into ``max_points`` bins
    of consecutive steps when it is longer."""
    if len(curve) <= max_points:
        return curve
    bins = np.arange(len(curve)) * max_points // len(curve)
    return curve.groupby(bins).mean(numeric_only=True)


def _band(ax, x, mean, lo, hi, color, **kw):
    ax.plot(x, mean, color=color, **kw)
    lo, hi = np.asarray(lo, dtype=float), np.asarray(hi, dtype=float)
    if np.isfinite(lo).any():
        ax.fill_between(x, lo, hi, color=color, alpha=0.2, linewidth=0)


def _log_limits(ax, *series, margin: float = 2.0) -> None:
    """Fit a log y-axis to the mean curves (not the bands, which can reach
    zero or below for two seeds) with a factor ``margin`` either side."""
    v = np.concatenate([np.asarray(s, dtype=float).ravel() for s in series])
    v = v[np.isfinite(v) & (v > 0)]
    if len(v):
        ax.set_ylim(v.min() / margin, v.max() * margin)


def _positive(values) -> bool:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return len(v) > 0 and bool((v > 0).all())


def lr_order(lrs) -> list:
    """The one order of learning rates in every figure, legend and table: largest first."""
    return sorted(lrs, reverse=True)


def _lr_palette(lrs) -> dict:
    colors = sns.color_palette("viridis", n_colors=max(len(lrs), 1))
    return {lr: colors[i] for i, lr in enumerate(lr_order(lrs))}


def _variant_palette(variants) -> dict:
    colors = sns.color_palette("tab10", n_colors=max(len(variants), 1))
    return {v: colors[i % len(colors)] for i, v in enumerate(sorted(variants))}


def _facets(n: int, max_cols: int = 3):
    ncols = min(n, max_cols)
    return max(1, math.ceil(n / max(ncols, 1))), max(ncols, 1)


def _hide_unused(axes, used: int) -> None:
    for ax in axes.flat[used:]:
        ax.set_visible(False)


def plot_lambda(curves: pd.DataFrame, optimizers: Sequence[str] = (), title: str = "") -> Figure:
    """λ₁ vs step, one panel per variant, one colour per learning rate; the
    dashed line of the same colour is that learning rate's threshold."""
    variants = sorted(curves["variant"].unique())
    lrs = lr_order(curves["lr"].unique())
    palette = _lr_palette(lrs)
    with sns.axes_style(STYLE), sns.plotting_context(CONTEXT):
        nrows, ncols = _facets(len(variants))
        fig, axes = _figure(nrows, ncols, sharex=True, sharey=True)
        log = _positive(curves["lambda_mean"]) and _positive(curves["threshold_mean"])
        for ax, variant in zip(axes.flat, variants):
            for lr in lrs:
                c = curves[(curves["variant"] == variant) & (curves["lr"] == lr)]
                c = thin(c.dropna(subset=["lambda_mean"]))
                if c.empty:
                    continue
                lo = c["lambda_lo"].clip(lower=c["lambda_mean"].min() * 1e-3) if log else c["lambda_lo"]
                _band(ax, c["step"], c["lambda_mean"], lo, c["lambda_hi"], palette[lr], linewidth=1.3)
                ax.plot(c["step"], c["threshold_mean"], color=palette[lr], linestyle="--", linewidth=1.2)
            ax.set_title(variant)
            ax.set_xlabel("step")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel(lambda_label(optimizers))
        if log:
            axes[0, 0].set_yscale("log")   # shared y: one call sets every panel
            _log_limits(axes[0, 0], curves["lambda_mean"], curves["threshold_mean"])
        _hide_unused(axes, len(variants))
        handles = [Line2D([], [], color=palette[lr], label=lr_label(lr)) for lr in lrs]
        handles.append(Line2D([], [], color="0.3", linestyle="--", label=threshold_label(optimizers)))
        fig.legend(handles=handles, loc="outside right center", title="learning rate")
        fig.suptitle(title or "Sharpness λ₁ and the stability threshold (mean over seeds, 95% CI)")
    return fig


def plot_critical(curves: pd.DataFrame, optimizers: Sequence[str] = (), title: str = "") -> Optional[Figure]:
    """Critical sharpness 2/η_c (``lambda_critical``, markers) against λ₁ of
    the ratio's operator (solid), the directional sharpness ``lambda_dir``
    (dotted) and 2/η (dashed), one panel per variant, one colour per
    learning rate (:func:`analysis.metrics.critical_curves`); None without
    critical sharpness.  Log scale when 2/η_c is positive throughout, with
    the non-positive values of the other curves (λ_dir < 0: the update's
    direction has negative curvature) left out."""
    if "lambda_critical_n" not in curves or curves["lambda_critical_n"].sum() == 0:
        return None
    variants = sorted(curves["variant"].unique())
    lrs = lr_order(curves["lr"].unique())
    palette = _lr_palette(lrs)
    lines = (("lambda", "-", None), ("lambda_critical", "-", "o"), ("lambda_dir", ":", None),
             ("two_over_lr", "--", None))
    with sns.axes_style(STYLE), sns.plotting_context(CONTEXT):
        nrows, ncols = _facets(len(variants))
        fig, axes = _figure(nrows, ncols, sharex=True, sharey=True)
        log = _positive(curves["lambda_critical_mean"])
        for ax, variant in zip(axes.flat, variants):
            for lr in lrs:
                c = thin(curves[(curves["variant"] == variant) & (curves["lr"] == lr)])
                for col, style, marker in lines:
                    ok = (c[f"{col}_n"] > 0) & ((c[f"{col}_mean"] > 0) if log else True)
                    ax.plot(c["step"], c[f"{col}_mean"].where(ok), color=palette[lr], linestyle=style, marker=marker,
                            markersize=3, linewidth=1.6 if col == "lambda_critical" else 1.0)
            ax.set_title(variant)
            ax.set_xlabel("step")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel("sharpness (1/η)")
        values = [curves[f"{col}_mean"] for col, _, _ in lines]
        if log:
            axes[0, 0].set_yscale("log")
            _log_limits(axes[0, 0], *values)
        _hide_unused(axes, len(variants))
        handles = [Line2D([], [], color=palette[lr], label=lr_label(lr)) for lr in lrs]
        handles += [Line2D([], [], color="0.3", linestyle="-", marker="o", markersize=3, label="2/η_c (critical)"),
                    Line2D([], [], color="0.3", linestyle="-", label=lambda_label(optimizers)),
                    Line2D([], [], color="0.3", linestyle=":", label="ΔθᵀHΔθ/Δθᵀg"),
                    Line2D([], [], color="0.3", linestyle="--", label="2/η")]
        fig.legend(handles=handles, loc="outside right center")
        fig.suptitle(title or "Critical sharpness 2/η_c, λ₁ and ΔθᵀHΔθ/Δθᵀg (mean over seeds)")
    return fig


def plot_ratio(curves: pd.DataFrame, title: str = "", column: str = "ratio", ylabel: str = "λ₁ / threshold") -> Figure:
    """``column`` (default λ₁/threshold) of every variant on one axis per
    learning rate (log y), with the threshold (ratio 1) and the ±10 % band
    around it.  ``column="step_ratio"``: the curvature along the gradient
    step over the threshold (:func:`analysis.metrics.with_step_ratio`)."""
    variants = sorted(curves["variant"].unique())
    lrs = lr_order(curves["lr"].unique())
    palette = _variant_palette(variants)
    with sns.axes_style(STYLE), sns.plotting_context(CONTEXT):
        fig, axes = _figure(1, len(lrs), sharey=True, width=5.5)
        for ax, lr in zip(axes.flat, lrs):
            ax.axhspan(0.9, 1.1, color="0.85", zorder=0)
            ax.axhline(1.0, color="black", linewidth=1.2, linestyle="--")
            for variant in variants:
                c = curves[(curves["variant"] == variant) & (curves["lr"] == lr)]
                c = thin(c.dropna(subset=[f"{column}_mean"]))
                c = c[c[f"{column}_mean"] > 0]
                if c.empty:
                    continue
                _band(ax, c["step"], c[f"{column}_mean"],
                      c[f"{column}_lo"].clip(lower=c[f"{column}_mean"].min() * 1e-3),
                      c[f"{column}_hi"], palette[variant], linewidth=1.3)
            ax.set_title(lr_label(lr))
            ax.set_xlabel("step")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel(ylabel)
        axes[0, 0].set_yscale("log")   # shared y
        _log_limits(axes[0, 0], curves[f"{column}_mean"], [0.9, 1.1], margin=1.5)
        shown = sorted(curves.loc[curves[f"{column}_mean"].notna(), "variant"].unique())   # colours as in other figures
        handles = [Line2D([], [], color=palette[v], label=v) for v in shown]
        handles.append(Line2D([], [], color="black", linestyle="--", label="threshold (ratio 1)"))
        handles.append(Line2D([], [], color="0.85", linewidth=6, label="±10 %"))
        fig.legend(handles=handles, loc="outside right center", title="variant")
        fig.suptitle(title or "Threshold-normalised sharpness (mean over seeds, 95% CI)")
    return fig


def plot_above(curves: pd.DataFrame, title: str = "") -> Figure:
    """How many eigenvalues sit above the cut (``n_above``: above
    ``sharpness.above_fraction`` × threshold) against the step, one panel per
    variant, one colour per learning rate (mean over seeds, band); a triangle
    marks the steps where some seed hit ``sharpness.above_cap`` (a lower bound)."""
    variants = sorted(curves["variant"].unique())
    lrs = lr_order(curves["lr"].unique())
    palette = _lr_palette(lrs)
    with sns.axes_style(STYLE), sns.plotting_context(CONTEXT):
        nrows, ncols = _facets(len(variants))
        fig, axes = _figure(nrows, ncols, sharex=True, sharey=True)
        for ax, variant in zip(axes.flat, variants):
            for lr in lrs:
                c = thin(curves[(curves["variant"] == variant) & (curves["lr"] == lr)].dropna(subset=["n_above_mean"]))
                if c.empty:
                    continue
                _band(ax, c["step"], c["n_above_mean"], c["n_above_lo"].clip(lower=0), c["n_above_hi"], palette[lr],
                      linewidth=1.3)
                if "n_above_capped_mean" in c:
                    capped = c[c["n_above_capped_mean"] > 0]
                    ax.plot(capped["step"], capped["n_above_mean"], "^", color=palette[lr], markersize=4)
            ax.set_title(variant)
            ax.set_xlabel("step")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel("eigenvalues above the cut")
        _hide_unused(axes, len(variants))
        handles = [Line2D([], [], color=palette[lr], label=lr_label(lr)) for lr in lrs]
        handles.append(Line2D([], [], color="0.3", marker="^", linestyle="none", label="capped (≥)"))
        fig.legend(handles=handles, loc="outside right center", title="learning rate")
        fig.suptitle(title or "Eigenvalues above above_fraction × threshold (mean over seeds, 95% CI)")
    return fig


def plot_loss(curves: pd.DataFrame, window: Optional[int] = None, title: str = "") -> Figure:
    """Training loss vs step, one panel per variant, one colour per lr; each
    seed-mean curve is smoothed by a centred rolling mean over ``window``
    logged steps (default: 1 % of the longest curve, at least 1)."""
    variants = sorted(curves["variant"].unique())
    lrs = lr_order(curves["lr"].unique())
    palette = _lr_palette(lrs)
    if window is None:
        longest = curves.groupby(["variant", "lr"])["step"].count().max() if len(curves) else 1
        window = max(1, int(longest) // 100)
    with sns.axes_style(STYLE), sns.plotting_context(CONTEXT):
        nrows, ncols = _facets(len(variants))
        fig, axes = _figure(nrows, ncols, sharex=True, sharey=True)
        log = _positive(curves["loss_mean"])
        for ax, variant in zip(axes.flat, variants):
            for lr in lrs:
                c = curves[(curves["variant"] == variant) & (curves["lr"] == lr)].dropna(subset=["loss_mean"])
                if c.empty:
                    continue
                smooth = c[["loss_mean", "loss_lo", "loss_hi"]].rolling(window, center=True, min_periods=1).mean()
                c = thin(pd.concat([c[["step"]], smooth], axis=1))
                lo = c["loss_lo"].clip(lower=c["loss_mean"].min() * 1e-3) if log else c["loss_lo"]
                _band(ax, c["step"], c["loss_mean"], lo, c["loss_hi"], palette[lr], linewidth=1.3)
            ax.set_title(variant)
            ax.set_xlabel("step")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel("training loss" + (f" (rolling mean, {window} steps)" if window > 1 else ""))
        if log:
            axes[0, 0].set_yscale("log")   # shared y
            _log_limits(axes[0, 0], curves["loss_mean"], margin=1.5)
        _hide_unused(axes, len(variants))
        handles = [Line2D([], [], color=palette[lr], label=lr_label(lr)) for lr in lrs]
        fig.legend(handles=handles, loc="outside right center", title="learning rate")
        fig.suptitle(title or "Training loss (mean over seeds, 95% CI)")
    return fig


def _grid(aggregate: pd.DataFrame, column: str) -> pd.DataFrame:
    grid = aggregate.pivot(index="variant", columns="lr", values=column)
    return grid.reindex(columns=lr_order(grid.columns))


def plot_heatmaps(aggregate: pd.DataFrame, title: str = "") -> Figure:
    """Two heatmaps over variant × lr: mean EoS onset step (with the count of
    seeds that reached the threshold; hatched "never" where none did), and
    the fraction of seeds that diverged."""
    onset = _grid(aggregate, "onset_step_mean")
    reached = _grid(aggregate, "n_reached_eos")
    trials = _grid(aggregate, "n_trials")
    diverged = _grid(aggregate, "diverged_frac")
    n_div = _grid(aggregate, "n_diverged")
    probed = _grid(aggregate, "n_probed") if "n_probed" in aggregate else trials
    above = _grid(aggregate, "n_start_above") if "n_start_above" in aggregate else trials * 0
    errors = _grid(aggregate, "n_error") if "n_error" in aggregate else trials * 0
    onset_text = onset.copy().astype(object)
    for v in onset.index:
        for lr in onset.columns:
            if pd.isna(trials.loc[v, lr]) or pd.isna(onset.loc[v, lr]):
                onset_text.loc[v, lr] = ""
            else:
                onset_text.loc[v, lr] = f"{onset.loc[v, lr]:.0f}\n({reached.loc[v, lr]:.0f}/{trials.loc[v, lr]:.0f})"
    div_text = diverged.copy().astype(object)
    for v in diverged.index:
        for lr in diverged.columns:
            div_text.loc[v, lr] = "" if pd.isna(trials.loc[v, lr]) else \
                f"{diverged.loc[v, lr]:.0%}\n({n_div.loc[v, lr]:.0f}/{trials.loc[v, lr]:.0f})"
    xlabels = [lr_label(lr) for lr in onset.columns]
    height = 1.2 + 0.6 * len(onset.index)
    with sns.axes_style("white"), sns.plotting_context(CONTEXT):
        fig, axes = _figure(1, 2, width=5.2, height=max(3.0, height))
        ax = axes[0, 0]
        plot_values = onset.astype(float)
        any_onset = bool(plot_values.notna().any().any())
        sns.heatmap(plot_values, ax=ax, annot=onset_text.to_numpy(), fmt="", cmap="mako_r",
                    linewidths=0.5, linecolor="white", cbar=any_onset,
                    cbar_kws={"label": "mean onset step"} if any_onset else None, xticklabels=xlabels,
                    vmin=None if any_onset else 0, vmax=None if any_onset else 1)
        never = plot_values.isna() & trials.notna()
        for i, v in enumerate(onset.index):
            for j, lr in enumerate(onset.columns):
                if never.loc[v, lr]:   # heatmap masks NaN cells: hatch and label them here
                    ax.add_patch(_hatch(j, i))
                    if errors.loc[v, lr] == trials.loc[v, lr]:
                        label = "error"
                    elif probed.loc[v, lr] == 0:
                        label = "λ₁ not\nprobed"
                    elif above.loc[v, lr] == probed.loc[v, lr]:   # the ratio never dropped below 1
                        label = f"never\nbelow 1\n({above.loc[v, lr]:.0f}/{trials.loc[v, lr]:.0f})"
                    else:
                        label = f"never\n(0/{trials.loc[v, lr]:.0f})"
                    ax.text(j + 0.5, i + 0.5, label, ha="center", va="center", color="0.25")
        ax.set_title("EoS onset: first step with λ₁/threshold ≥ 1\n(seeds that reached it / seeds)")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("variant")
        ax = axes[0, 1]
        sns.heatmap(diverged.astype(float), ax=ax, annot=div_text.to_numpy(), fmt="", cmap="rocket_r",
                    vmin=0, vmax=1, linewidths=0.5, linecolor="white",
                    cbar_kws={"label": "fraction of seeds diverged"}, xticklabels=xlabels)
        ax.set_title("Divergence\n(diverged seeds / seeds)")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("variant")
        for ax in axes.flat:
            ax.tick_params(axis="y", rotation=0)
        fig.suptitle(title or "Onset of the edge of stability and divergence over variant × learning rate")
    return fig


def _hatch(j: int, i: int):
    from matplotlib.patches import Rectangle
    return Rectangle((j, i), 1, 1, fill=False, hatch="//", edgecolor="0.7", linewidth=0)


def plot_fid(aggregate: pd.DataFrame, title: str = "") -> Optional[Figure]:
    """Final FID vs learning rate (log x), one line per variant with the
    confidence interval over seeds as error bars; None without any FID."""
    data = aggregate.dropna(subset=["fid_mean"])
    if data.empty:
        return None
    palette = _variant_palette(aggregate["variant"].unique())
    with sns.axes_style(STYLE), sns.plotting_context(CONTEXT):
        fig, axes = _figure(1, 1, width=6.5, height=4.2)
        ax = axes[0, 0]
        for variant, c in data.groupby("variant", sort=True):
            c = c.sort_values("lr")
            lo = (c["fid_mean"] - c["fid_lo"]).fillna(0).clip(lower=0)
            hi = (c["fid_hi"] - c["fid_mean"]).fillna(0).clip(lower=0)
            ax.errorbar(c["lr"], c["fid_mean"], yerr=[lo, hi], color=palette[variant], marker="o",
                        capsize=3, label=variant)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate η")
        ax.set_ylabel("final FID (lower is better)")
        ax.legend(title="variant", loc="best")
        ax.set_title(title or "Final FID of EMA samples vs learning rate (mean over seeds, 95% CI)")
    return fig
