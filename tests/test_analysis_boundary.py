"""The boundary table and figure of the report (analysis.boundary), from hand-made trials."""
import json
import math

import numpy as np
import pandas as pd
import pytest

from analysis.boundary import boundary_table, display_table, plot_boundary, search_settings
from analysis.plots import save_figure
from analysis.report import build_report
from analysis_fixtures import SyntheticTrial, write_study, markdown_rows

S, U = "completed", "diverged"
TRIALS = [  # variant, lr, status
    ("base", 1e-3, S), ("base", 1e-2, U), ("base", 3.16e-3, U), ("base", 1.78e-3, U), ("base", 1.33e-3, S),
    ("base", 1.54e-3, S), ("base", 1.65e-3, U),
    ("edm", 1e-3, U), ("edm", 1e-5, U), ("edm", 5e-4, "stopped"),
    ("vparam", 1e-3, S), ("vparam", 1e-1, S),
    ("snr", 1e-3, S), ("snr", 1e-2, U), ("snr", 3e-3, "error"),
    ("pd", 1e-3, U), ("pd", 1e-2, S), ("pd", 1e-4, S),
]


def trials_frame(rows=TRIALS) -> pd.DataFrame:
    return pd.DataFrame([{"trial_id": f"{v}_lr{lr!r}_s0", "variant": v, "lr": lr, "seed": 0, "status": s}
                         for v, lr, s in rows])


def test_table_reads_the_bracket_and_status_of_each_variant():
    table = boundary_table(trials_frame(), factor=1.1, bracket=(1e-5, 1e-1)).set_index("variant")
    assert list(table.index) == ["base", "edm", "vparam", "snr", "pd"]
    base = table.loc["base"]
    assert (base["lo"], base["hi"]) == (1.54e-3, 1.65e-3) and base["status"] == "found"
    assert base["width"] == pytest.approx(1.65 / 1.54) and base["estimate"] == pytest.approx(math.sqrt(1.54e-3 * 1.65e-3))
    assert (base["trials"], base["stable"], base["unstable"]) == (7, 3, 4) and not base["non_monotone"]
    edm = table.loc["edm"]   # the stopped trial gives no verdict
    assert edm["status"] == "below" and np.isnan(edm["lo"]) and edm["hi"] == 1e-5 and edm["trials"] == 2
    assert table.loc["vparam", "status"] == "above" and np.isnan(table.loc["vparam", "hi"])
    snr = table.loc["snr"]   # width 10 > 1.1; the errored trial gives no verdict
    assert snr["status"] == "open" and snr["trials"] == 2 and snr["width"] == pytest.approx(10)
    pd_ = table.loc["pd"]    # stable at 1e-2 above the unstable 1e-3: the bracket stays below 1e-3
    assert (pd_["lo"], pd_["hi"], pd_["non_monotone"]) == (1e-4, 1e-3, True)


def test_without_a_factor_the_table_only_says_what_the_verdicts_say():
    table = boundary_table(trials_frame(), factor=None).set_index("variant")
    assert table["status"].to_dict() == {"base": "bracketed", "edm": "all unstable", "vparam": "all stable",
                                         "snr": "bracketed", "pd": "bracketed"}


def test_display_table_formats_lrs_and_says_non_monotone():
    shown = display_table(boundary_table(trials_frame(), factor=1.1, bracket=(1e-5, 1e-1))).set_index("variant")
    assert shown.loc["base", "largest stable lr"] == "1.54e-3" and shown.loc["base", "smallest unstable lr"] == "1.65e-3"
    assert shown.loc["base", "hi/lo"] == "1.07" and shown.loc["base", "trials"] == "7 (3 stable)"
    assert shown.loc["edm", "largest stable lr"] == "—" and shown.loc["edm", "status"].startswith("below the bracket")
    assert "non-monotone" in shown.loc["pd", "status"] and "non-monotone" not in shown.loc["base", "status"]


def test_figure_has_one_row_per_variant_and_every_trial(tmp_path):
    trials = trials_frame()
    table = boundary_table(trials, factor=1.1, bracket=(1e-5, 1e-1))
    fig = plot_boundary(trials, table, factor=1.1, bracket=(1e-5, 1e-1))
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["base", "edm", "vparam", "snr", "pd"]
    assert ax.get_xscale() == "log" and "hi/lo ≤ 1.1" in ax.get_title()
    # every trial is one marker: stable + unstable + no-verdict collections hold all 18 points
    points = sum(len(c.get_offsets()) for c in ax.collections)
    assert points == len(trials)
    labels = {t.get_text() for t in ax.get_legend().get_texts()}
    assert {"stable", "unstable", "no verdict (stopped/error)", "bracket [lo, hi]", "√(lo·hi)"} <= labels
    paths = save_figure(fig, tmp_path, "boundary")
    assert paths.png.stat().st_size > 0 and "Largest stable learning rate" in paths.svg.read_text()


def write_boundary_study(root, algorithm="boundary"):
    """A boundary study of one variant: a bisection of [1e-5, 1e-1] for a boundary at 1.37e-3."""
    trials = []
    for lr in (1e-3, 1e-2, 10 ** -2.5, 10 ** -2.75, 10 ** -2.875, 10 ** -2.8125, 10 ** -2.84375):
        unstable = lr >= 1.37e-3
        trials.append(SyntheticTrial("base", lr, 0, steps=30, onset=10, diverge_at=12 if unstable else None))
    study_dir = write_study(root / "bnd", trials)
    search = ({"algorithm": "boundary", "lr": {"bracket": [1e-5, 1e-1]}, "boundary": {"k": 1, "factor": 1.1}}
              if algorithm == "boundary" else {"algorithm": "optuna", "lr": {"log_uniform": [1e-5, 1e-1]}})
    (study_dir / "study.json").write_text(json.dumps(
        {"format": 1, "spec": {"study": {"objective": "largest_stable_lr"}, "search": search}}))
    return study_dir


def test_report_of_a_boundary_study_has_the_table_and_figure(tmp_path):
    study_dir = write_boundary_study(tmp_path)
    assert search_settings(study_dir) == {"algorithm": "boundary", "factor": 1.1, "bracket": (1e-5, 1e-1)}
    paths = build_report(study_dir, out_dir=tmp_path / "report", quiet=True)
    assert "boundary" in paths.figures and paths.figures["boundary"].png.is_file()
    md, page = paths.markdown.read_text(encoding="utf-8"), paths.html.read_text(encoding="utf-8")
    for text in (md, page):
        assert "Largest stable learning rate (boundary per variant, with its bracket)" in text
        assert "hi/lo ≤ 1.1" in text
    # bisection: lo = 10^-2.875 = 1.33e-3, hi = 10^-2.84375 = 1.43e-3
    assert ["base", "0", "1.33e-3", "1.43e-3", "1.07", "1.38e-3", "7 (2 stable)",
            "found: hi/lo within the factor"] in markdown_rows(md)
    assert "![boundary](figures/boundary.png)" in md
    table = pd.read_csv(tmp_path / "report" / "boundary.csv")
    assert table.loc[0, "lo"] == pytest.approx(10 ** -2.875) and table.loc[0, "status"] == "found"


def test_report_of_a_tpe_largest_stable_lr_study_has_the_table_without_a_factor(tmp_path):
    study_dir = write_boundary_study(tmp_path, algorithm="optuna")
    paths = build_report(study_dir, out_dir=tmp_path / "report", quiet=True)
    md = paths.markdown.read_text(encoding="utf-8")
    assert "optuna search with objective largest_stable_lr" in md
    assert any(row[-1] == "bracketed" for row in markdown_rows(md))


def test_report_of_other_studies_has_no_boundary_section(tmp_path):
    trials = [SyntheticTrial("base", lr, 0, steps=30, onset=10) for lr in (1e-3, 1e-4)]
    study_dir = write_study(tmp_path / "plain", trials)
    paths = build_report(study_dir, out_dir=tmp_path / "report", quiet=True)
    assert "boundary" not in paths.figures and "Largest stable" not in paths.markdown.read_text(encoding="utf-8")
