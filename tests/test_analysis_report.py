"""`eos report`: HTML + Markdown from a fixture study and from a run folder."""
import argparse

import numpy as np

import pandas as pd
import pytest

from analysis import cli
from analysis.report import build_report
from analysis_fixtures import (SyntheticTrial, build_fixture_study, check_report, markdown_rows, write_run,
                               write_study)


def test_report_from_fixture_study(tmp_path, capsys):
    study_dir, trials = build_fixture_study(tmp_path)
    paths = check_report(study_dir, tmp_path / "out")
    assert set(paths.figures) == {"lambda", "ratio", "loss", "heatmaps", "fid"}
    page = paths.html.read_text(encoding="utf-8")
    md = paths.markdown.read_text(encoding="utf-8")
    # base at 1e-3: onsets 40, 44, 48 → "44 [34, 54]"; edm at 1e-3: one of two seeds diverged
    assert "44 [34, 54]" in md and "44 [34, 54]" in page
    assert ["edm", "1e-3", "2", "1/2", "2/2"] in [row[:5] for row in markdown_rows(md)]
    assert "No FID" not in md                      # vparam measured FID
    summary = pd.read_csv(paths.summary_csv).set_index(["variant", "lr"])
    assert summary.loc[("base", 1e-3), "onset_step_mean"] == 44.0
    # quiet=True prints nothing; the CLI prints the table
    assert capsys.readouterr().out == ""


def test_report_without_fid_says_why(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    trials = [SyntheticTrial("base", lr, seed, steps=40, onset=20 + 2 * seed) for lr in (1e-3, 1e-4) for seed in (0, 1)]
    study_dir = write_study(tmp_path / "nofid", trials)
    paths = build_report(study_dir)                  # default out: <study>/report
    assert paths.html.parent == study_dir / "report"
    assert "fid" not in paths.figures
    out = capsys.readouterr().out
    assert "onset step" in out and "21 [8, 34]" in out   # onsets 20, 22: 21 ± t(0.975, 1)·√2/√2
    for text in (paths.html.read_text(encoding="utf-8"), paths.markdown.read_text(encoding="utf-8"), out):
        assert "No FID/IS/KID was measured" in text
        assert "eval.inception_weights" in text


def test_report_of_a_single_run(tmp_path):
    run = write_run(tmp_path / "runs" / "one", SyntheticTrial("base", 1e-3, 0, steps=50, onset=25))
    paths = check_report(run, tmp_path / "out")
    assert ["base", "1e-3", "1", "0/1", "1/1", "25"] in [row[:6] for row in markdown_rows(paths.markdown.read_text(encoding="utf-8"))]


def test_cli_standalone_and_registered(tmp_path, capsys):
    run = write_run(tmp_path / "run", SyntheticTrial("base", 1e-3, 0, steps=20, onset=10))
    # as the eos dispatcher uses it
    parser = argparse.ArgumentParser(prog="eos")
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["report", str(run), "--out", str(tmp_path / "b")])
    assert args.func(args) == 0 and (tmp_path / "b" / "report.html").is_file()
    out = capsys.readouterr().out
    assert "reached EoS" in out and str(tmp_path / "b" / "report.html") in out
    # standalone (python -m analysis.cli report ...): errors are one line and exit code 2
    assert cli.main(["report", str(tmp_path / "missing")]) == 2
    assert "no such study or run folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["report"])                       # the study folder is required


def test_unprobed_trials_are_not_counted_as_never_reaching_eos(tmp_path):
    from analysis.load import load
    from analysis.metrics import aggregate_metrics, per_trial_metrics
    from analysis.report import summary_table

    study = load(write_study(tmp_path / "s", [SyntheticTrial("base", 1e-3, 0, steps=10, onset=5)]))
    study.steps["ratio"] = np.nan                   # sharpness.every = 0: no λ₁ at all
    agg = aggregate_metrics(per_trial_metrics(study))
    assert agg["n_probed"].tolist() == [0] and agg["n_reached_eos"].tolist() == [0]
    assert summary_table(agg)["reached EoS"].tolist() == ["not probed"]


def test_search_over_many_learning_rates_is_binned(tmp_path):
    from analysis.load import load
    from analysis.metrics import MAX_LEARNING_RATES, bin_learning_rates

    lrs = 10 ** np.linspace(-4, -2, 12)              # 12 distinct lrs, as an Optuna search proposes
    trials = [SyntheticTrial("base", lr, 0, steps=12, onset=6) for lr in lrs]
    study = load(write_study(tmp_path / "optuna", trials))
    binned, did = bin_learning_rates(study)
    assert did and MAX_LEARNING_RATES == 8
    by_id = binned.trials.set_index("trial_id")
    # bins of log10 lr of width 2/8 = 0.25 from -4; labelled by their geometric centre
    expect = {0: -3.875, 5: -3.125, 11: -2.125}     # log10 lr: -4, -3.09, -2 (the top edge joins the last bin)
    for k, centre in expect.items():
        row = by_id.loc[trials[k].trial_id]
        assert row["lr"] == pytest.approx(10 ** centre) and row["lr_exact"] == pytest.approx(lrs[k])
    assert bin_learning_rates(load(write_study(tmp_path / "grid", trials[:3])))[1] is False
    paths = build_report(study.path, tmp_path / "out", quiet=True)
    md = paths.markdown.read_text(encoding="utf-8")
    assert "equal bins of log₁₀ lr" in md
    assert len(pd.read_csv(paths.summary_csv)) <= 8 and len(pd.read_csv(paths.per_trial_csv)) == 12


def test_step_curvature_curve_and_figure_for_gd_trials_only(tmp_path):
    """gᵀHg/‖g‖² over the threshold is averaged for GD trials and left out for
    Adam (whose threshold belongs to P⁻¹H); the report draws it when present."""
    from analysis.load import load
    from analysis.metrics import curves
    from analysis_fixtures import write_steps

    gd, adam = SyntheticTrial("base", 1e-3, 0, steps=20, onset=10), SyntheticTrial("edm", 1e-3, 0, steps=20, onset=10)
    study_dir = tmp_path / "s"
    for t, factor in ((gd, 0.9), (adam, 0.5)):
        rows = t.rows()
        for r in rows:
            r["batch_sharpness"] = factor * r["threshold"] if r["step"] % 2 == 0 else None
        write_steps(study_dir / "steps" / f"variant={t.variant}" / f"trial={t.trial_id}", rows)
    trials = pd.DataFrame([gd.trial_row(), adam.trial_row()])
    trials.loc[0, "optimizer"] = "gd"
    trials.to_parquet(study_dir / "trials.parquet")

    c = curves(load(study_dir))
    base, edm = c[c["variant"] == "base"], c[c["variant"] == "edm"]
    logged = base["step"] % 2 == 0
    assert np.allclose(base.loc[logged, "step_ratio_mean"], 0.9) and (base.loc[logged, "step_ratio_n"] == 1).all()
    assert (base.loc[~logged, "step_ratio_n"] == 0).all()
    assert (edm["step_ratio_n"] == 0).all()
    paths = build_report(study_dir, tmp_path / "out", quiet=True)
    assert "step_ratio" in paths.figures and paths.figures["step_ratio"].png.stat().st_size > 0
    assert "step curvature" in paths.markdown.read_text(encoding="utf-8")


def test_documents_are_templates_with_tables_rendered_by_pandas(tmp_path):
    """The HTML template escapes text; the summary table of summary.md is
    summary_table cell for cell; each table appears once in the page."""
    from analysis.load import load
    from analysis.report import study_tables, summary_table

    trials = [SyntheticTrial("base", lr, 0, steps=12, onset=6) for lr in (1e-3, 1e-4)]
    study_dir = write_study(tmp_path / "a&b<i>", trials)
    paths = build_report(study_dir, tmp_path / "out", quiet=True)
    page, md = paths.html.read_text(encoding="utf-8"), paths.markdown.read_text(encoding="utf-8")
    assert "a&amp;b&lt;i&gt;" in page and "a&b<i>" not in page
    assert "# Edge-of-stability report — a&b<i>" in md
    expected = summary_table(study_tables(load(study_dir)).aggregate)
    rows = markdown_rows(md)
    assert rows[0] == list(expected.columns)
    assert rows[1:len(expected) + 1] == expected.astype(str).values.tolist()
    assert page.count('<table id="T_summary"') == 1 and page.count('<table id="T_trials"') == 1
    assert page.count("<tr>") == (len(expected) + 1) + (len(trials) + 1)


def _critical_study(tmp_path):
    """Two Adam trials whose probed steps log a critical sharpness alternating
    1.5 and 0.5 × 2/η, and λ_dir = 2/η; one trial without (a study mixing
    runs with and without sharpness.critical)."""
    from analysis_fixtures import write_steps

    trials = [SyntheticTrial("base", 1e-3, 0, steps=20, onset=10), SyntheticTrial("base", 1e-4, 0, steps=20),
              SyntheticTrial("edm", 1e-3, 0, steps=20, onset=10)]
    study_dir = tmp_path / "s"
    expected = {}
    for t in trials:
        rows = t.rows()
        with_critical = t.variant == "base"
        for r in rows:
            if with_critical and r["step"] % 2 == 0:
                r["lambda_critical"] = (1.5 if r["step"] % 4 == 0 else 0.5) * 2 / t.lr
                r["lambda_dir"] = 2 / t.lr
                r["critical_passes"] = 6 + r["step"] % 4
        write_steps(study_dir / "steps" / f"variant={t.variant}" / f"trial={t.trial_id}", rows)
        if with_critical:
            probed = [r for r in rows if r.get("lambda_critical") is not None]
            expected[t.lr] = (len(probed), float(np.median([r["lambda_critical"] / r["lambda_precond"]
                                                            for r in probed])))
    pd.DataFrame([t.trial_row() for t in trials]).to_parquet(study_dir / "trials.parquet")
    return study_dir, expected


def test_critical_sharpness_agreement_table_and_figure(tmp_path):
    from analysis.load import load
    from analysis.metrics import critical_agreement

    study_dir, expected = _critical_study(tmp_path)
    table = critical_agreement(load(study_dir)).set_index("lr")
    assert list(table["variant"]) == ["base", "base"]          # edm logged none
    for lr, (probes, over_lambda) in expected.items():
        assert table.loc[lr, "probes"] == probes
        assert table.loc[lr, "critical_over_lambda"] == pytest.approx(over_lambda)
        assert table.loc[lr, "critical_over_dir"] == pytest.approx(1.0)   # median of 1.5 and 0.5 (5 and 5)
        assert table.loc[lr, "above_two_over_lr"] == pytest.approx(0.5)
        assert table.loc[lr, "passes"] == pytest.approx(7.0)
    paths = check_report(study_dir, tmp_path / "out")
    assert "critical" in paths.figures and paths.figures["critical"].png.stat().st_size > 10_000
    md = paths.markdown.read_text(encoding="utf-8")
    assert "## Critical sharpness" in md and "50%" in md
    assert paths.html.read_text(encoding="utf-8").count('class="critical"') == 1


def test_no_critical_section_without_the_column(tmp_path):
    study_dir, _ = build_fixture_study(tmp_path)
    paths = build_report(study_dir, tmp_path / "out", quiet=True)
    assert "critical" not in paths.figures
    assert "Critical sharpness" not in paths.markdown.read_text(encoding="utf-8").split("## Definitions")[0]


def test_count_above_the_cut_is_averaged_over_seeds_and_drawn(tmp_path):
    """n_above of two seeds is averaged per step (a capped seed flagged); the
    report draws the figure only when some trial logged the count."""
    from analysis.load import load
    from analysis.metrics import curves
    from analysis_fixtures import write_steps

    seeds = [SyntheticTrial("base", 1e-3, s, steps=20, onset=10) for s in (0, 1)]
    study_dir = tmp_path / "s"
    for t in seeds:
        rows = t.rows()
        for r in rows:   # seed 0: step // 5 above, seed 1: one more, capped at 3 from step 10
            n = r["step"] // 5 + t.seed
            r.update(n_above=min(n, 3), n_above_capped=n >= 3, above_values=[2.0] * min(n, 3))
        write_steps(study_dir / "steps" / f"variant={t.variant}" / f"trial={t.trial_id}", rows)
    pd.DataFrame([t.trial_row() for t in seeds]).to_parquet(study_dir / "trials.parquet")

    c = curves(load(study_dir)).set_index("step")
    assert c.loc[7, "n_above_mean"] == 1.5 and c.loc[7, "n_above_n"] == 2 and c.loc[7, "n_above_capped_mean"] == 0
    assert c.loc[12, "n_above_mean"] == 2.5 and c.loc[12, "n_above_capped_mean"] == 0.5
    assert c.loc[17, "n_above_mean"] == 3.0 and c.loc[17, "n_above_capped_mean"] == 1.0
    paths = build_report(study_dir, tmp_path / "out", quiet=True)
    assert "above" in paths.figures and paths.figures["above"].png.stat().st_size > 0
    assert "sharpness.above_fraction" in paths.markdown.read_text(encoding="utf-8")
    fixture_dir, _ = build_fixture_study(tmp_path / "f")   # no count logged: no figure
    assert "above" not in build_report(fixture_dir, tmp_path / "out2", quiet=True).figures
