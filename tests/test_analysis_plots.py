"""Figures are written as PNG and SVG, are non-trivial, and carry their labels."""
import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from analysis import plots
from analysis.load import load
from analysis.metrics import aggregate_metrics, curves, per_trial_metrics
from analysis_fixtures import build_fixture_study


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    path, _ = build_fixture_study(tmp_path_factory.mktemp("study"))
    study = load(path)
    per_trial = per_trial_metrics(study)
    return study, aggregate_metrics(per_trial), curves(study)


def _check_written(paths: plots.FigurePaths, texts: list[str]) -> None:
    assert paths.png.stat().st_size > 10_000 and paths.svg.stat().st_size > 10_000
    image = mpimg.imread(paths.png)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300
    colours = np.unique(image.reshape(-1, image.shape[-1]).round(3), axis=0)
    assert len(colours) > 20                       # lines, bands, text: not a blank canvas
    svg = paths.svg.read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    for text in texts:                              # matplotlib writes text into the SVG as comments/glyph ids
        assert text in svg, text


def test_each_figure_written_with_labels(tables, tmp_path):
    study, agg, c = tables
    optimizers = list(study.trials["optimizer"])
    cases = {
        "lambda": (plots.plot_lambda(c, optimizers), ["base", "edm", "vparam", "η = 1e-3", "step"]),
        "ratio": (plots.plot_ratio(c), ["η = 1e-4", "threshold (ratio 1)", "vparam"]),
        "loss": (plots.plot_loss(c), ["training loss", "edm"]),
        "heatmaps": (plots.plot_heatmaps(agg), ["never", "Divergence", "learning rate", "50%"]),
        "fid": (plots.plot_fid(agg), ["final FID", "vparam"]),
    }
    for name, (fig, texts) in cases.items():
        _check_written(plots.save_figure(fig, tmp_path, name), texts)


def test_count_above_the_cut_figure(tmp_path):
    steps = np.arange(40)
    rows = []
    for variant in ("base", "edm"):
        for lr in (1e-3, 1e-4):
            mean = np.minimum(steps // 8, 4).astype(float)
            rows.append(pd.DataFrame({"variant": variant, "lr": lr, "step": steps, "n_above_mean": mean,
                                      "n_above_lo": mean - 0.5, "n_above_hi": mean + 0.5, "n_above_n": 2,
                                      "n_above_capped_mean": (mean >= 4).astype(float)}))
    fig = plots.plot_above(pd.concat(rows, ignore_index=True))
    _check_written(plots.save_figure(fig, tmp_path, "above"),
                   ["eigenvalues above the cut", "capped (≥)", "edm", "η = 1e-4"])
    marks = [l for ax in fig.axes for l in ax.lines if l.get_marker() == "^"]
    assert marks and all(np.all(np.asarray(l.get_ydata()) == 4) for l in marks)   # only the capped steps


def test_fid_plot_skipped_without_fid(tables):
    _, agg, _ = tables
    assert plots.plot_fid(agg.assign(fid_mean=np.nan)) is None


def test_labels_follow_the_optimizer():
    assert plots.lambda_label(["adam", "adamw"]) == "λ₁(P⁻¹H)"
    assert plots.lambda_label(["gd", "momentum"]) == "λ₁(H)"
    assert "2/η" in plots.threshold_label(["gd"])
    assert "(2+2β₁)/((1−β₁)η)" in plots.threshold_label(["adam"])


def test_thin_averages_long_curves_into_bins():
    curve = pd.DataFrame({"step": np.arange(10_000), "ratio_mean": np.arange(10_000) % 2 + 0.5})
    thin = plots.thin(curve, max_points=1000)
    assert len(thin) == 1000
    # every bin holds one period of the ±0.5 flip: the bin mean is its centre
    np.testing.assert_allclose(thin["ratio_mean"], 1.0)
    np.testing.assert_allclose(thin["step"], np.arange(1000) * 10 + 4.5)
    assert plots.thin(curve.iloc[:50], max_points=1000).equals(curve.iloc[:50])


def test_critical_figure_only_with_the_column(tables, tmp_path):
    from analysis.metrics import critical_curves

    study, _, _ = tables
    steps = study.steps.copy()
    lam = steps["ratio"].astype(float) * steps["threshold"].astype(float)
    with_critical = type(study)(study.name, study.path, study.kind,
                                steps.assign(lambda_critical=0.3 * lam, lambda_dir=0.4 * lam, critical_passes=6),
                                study.trials)
    c = critical_curves(with_critical)
    assert np.allclose(c["lambda_critical_mean"].dropna() / c.loc[c["lambda_critical_n"] > 0, "lambda_mean"], 0.3)
    assert np.allclose(c["two_over_lr_mean"], 2 / c["lr"])
    fig = plots.plot_critical(c, list(study.trials["optimizer"]))
    _check_written(plots.save_figure(fig, tmp_path, "critical"), ["2/η_c (critical)", "2/η", "base", "η = 1e-3"])
    assert plots.plot_critical(critical_curves(study)) is None
