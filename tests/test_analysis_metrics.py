"""EoS metrics against hand-built curves, and loading of study and run folders."""
import math

import numpy as np
import pandas as pd
import pytest

from analysis.load import StudyFormatError, load, load_run, load_study
from analysis.metrics import (aggregate_metrics, curves, eos_onset, fraction_near_threshold, mean_band,
                              per_trial_metrics, peak_ratio, sharpening_rate, trial_metrics)
from analysis_fixtures import SyntheticTrial, build_fixture_study, write_run, write_study

# Student-t quantiles t_{0.975, ν} from a printed table
T975 = {1: 12.706204736174707, 2: 4.302652729911275, 3: 3.182446305284263}


# ---------------------------------------------------------------------------
# single curves


def test_onset_is_first_step_at_or_above_one():
    step = np.arange(100)
    ratio = 0.5 + step / 74.0            # exactly 1.0 at step 37
    ratio[20] = 0.999                    # close, but below
    assert eos_onset(step, ratio) == 37
    # unprobed steps (NaN) and shuffled rows do not matter
    ratio_gaps = ratio.copy()
    ratio_gaps[30:37] = np.nan
    order = np.random.default_rng(0).permutation(100)
    assert eos_onset(step[order], ratio_gaps[order]) == 37
    # a probe every 5 steps first sees the crossing at step 40
    assert eos_onset(step[::5], ratio[::5]) == 40
    assert eos_onset(step, np.full(100, 0.9)) is None


def test_fraction_near_threshold_counts_steps_after_onset():
    # onset at 10; 40 probed steps from the onset on, 30 of them within ±10 %
    step = np.arange(50)
    ratio = np.full(50, 0.5)
    after = np.array([1.05, 0.95, 1.0, 1.09, 0.92, 1.3, 0.7, 1.5] * 5)   # 5 in, 3 out per 8
    ratio[10:] = after
    assert after[0] >= 1
    expected = 25 / 40
    assert fraction_near_threshold(step, ratio, eos_onset(step, ratio)) == pytest.approx(expected)
    assert math.isnan(fraction_near_threshold(step, ratio, None))
    # steps before the onset never count, even when near 1
    ratio[5] = 0.98
    assert fraction_near_threshold(step, ratio, 10) == pytest.approx(expected)


def test_sharpening_rate_is_slope_before_onset():
    step = np.arange(0, 200, 3)                      # probed every 3 steps
    lam = 5.0 + 0.3 * step
    onset = 60
    lam[step >= onset] = 17.0 + 4.0 * np.sin(step[step >= onset])   # EoS oscillation, must be ignored
    assert sharpening_rate(step, lam, onset) == pytest.approx(0.3, rel=1e-12)
    # without an onset: the whole curve
    assert sharpening_rate(step, 2.0 - 0.01 * step, None) == pytest.approx(-0.01, rel=1e-12)
    assert math.isnan(sharpening_rate([0, 1, 2], [1.0, 2.0, 3.0], 1))   # one point before onset


def test_peak_ratio_ignores_missing():
    assert peak_ratio([0, 1, 2, 3], [0.2, np.nan, 1.7, 1.1]) == 1.7
    assert math.isnan(peak_ratio([0, 1], [np.nan, np.nan]))


def test_adam_initial_transient_is_not_the_edge_of_stability():
    """λ₁(P⁻¹H) of Adam starts far above threshold and falls within a few
    steps (as in the smoke study: 2902, 53, 4.8, 1.3, ...); the onset is the
    first upward crossing after it, and the metrics ignore it."""
    step = np.arange(60)
    ratio = np.empty(60)
    ratio[:4] = [2900.0, 53.0, 4.8, 1.3]                 # transient: above 1, falling
    ratio[4:37] = 0.5 + 0.01 * (step[4:37] - 4)         # below 1 from step 4, sharpening 0.01/step
    ratio[37:] = [1.04, 0.97] * 11 + [1.04]             # EoS from step 37
    assert ratio[36] < 1 <= ratio[37]
    threshold = 38 / 1e-3
    frame = pd.DataFrame({"step": step, "ratio": ratio, "threshold": threshold, "loss": 1.0,
                          "fid": np.nan, "inception_score": np.nan, "kid": np.nan})
    m = trial_metrics(frame)
    assert m["onset_step"] == 37 and m["transient_end"] == 4 and m["transient_steps"] == 4
    assert not m["start_above"]
    assert m["peak_ratio"] == pytest.approx(1.04)
    assert m["sharpening_rate"] == pytest.approx(0.01 * threshold, rel=1e-9)
    assert m["frac_near_threshold"] == 1.0
    # still in the transient at the end (or diverging from the start): no onset, and no peak, as the
    # report defines it (after the transient; issue 18.6: it showed the opening 2900 as the peak)
    m = trial_metrics(frame.iloc[:4])
    assert math.isnan(m["onset_step"]) and m["start_above"] and math.isnan(m["peak_ratio"])
    assert math.isnan(m["sharpening_rate"])
    # a curve that starts below 1 has no transient
    m = trial_metrics(frame.iloc[4:])
    assert m["transient_steps"] == 0 and m["onset_step"] == 37


def test_trial_metrics_use_ratio_times_threshold_as_lambda():
    # Adam: λ is λ₁(P⁻¹H) = ratio × threshold, not lambda_max
    step = np.arange(60)
    threshold = 38 / 1e-3
    ratio = np.where(step < 37, 0.2 + 0.02 * step, 1.02)
    frame = pd.DataFrame({"step": step, "ratio": ratio, "threshold": threshold, "loss": 1.0,
                          "lambda_max": 7.0, "fid": np.nan, "inception_score": np.nan, "kid": np.nan})
    m = trial_metrics(frame)
    assert m["onset_step"] == 37
    assert m["sharpening_rate"] == pytest.approx(0.02 * threshold)
    assert m["frac_near_threshold"] == 1.0
    assert m["peak_ratio"] == pytest.approx(1.02)
    assert not m["nonfinite_loss"]


# ---------------------------------------------------------------------------
# over seeds


def test_mean_band_matches_hand_computation():
    mean, lo, hi, n = mean_band([30.0, 40.0, 50.0, np.nan])
    # mean 40, sample sd 10, half width t_{0.975,2} · 10/√3
    half = T975[2] * 10.0 / math.sqrt(3.0)
    assert (mean, n) == (40.0, 3)
    assert lo == pytest.approx(40.0 - half, rel=1e-9)
    assert hi == pytest.approx(40.0 + half, rel=1e-9)
    m1, lo1, hi1, n1 = mean_band([7.0])
    assert (m1, n1) == (7.0, 1) and math.isnan(lo1) and math.isnan(hi1)


@pytest.fixture(scope="module")
def fixture_study(tmp_path_factory):
    path, trials = build_fixture_study(tmp_path_factory.mktemp("study"))
    return load(path), trials


def test_per_trial_metrics_recover_the_fixture_answers(fixture_study):
    study, trials = fixture_study
    per_trial = per_trial_metrics(study).set_index("trial_id")
    assert len(per_trial) == len(trials)
    for t in trials:
        row = per_trial.loc[t.trial_id]
        if t.onset is None:
            assert math.isnan(row["onset_step"]) and not row["reached_eos"]
        else:
            assert row["onset_step"] == t.onset
        assert row["sharpening_rate"] == pytest.approx(t.expected_rate(), rel=1e-9)
        np.testing.assert_allclose(row["frac_near_threshold"], t.expected_fraction())
        assert bool(row["diverged"]) == (t.diverge_at is not None)
        assert row["final_loss"] == t.expected_final_loss()
        if t.fid_final is not None:
            assert row["fid"] == pytest.approx(t.fid_final)
            assert row["fid_step"] == t.steps - 1
        else:
            assert math.isnan(row["fid"])


def test_aggregate_over_seeds(fixture_study):
    study, trials = fixture_study
    agg = aggregate_metrics(per_trial_metrics(study)).set_index(["variant", "lr"])
    base = agg.loc[("base", 1e-3)]
    # onsets 40, 44, 48: mean 44, sd 4
    half = T975[2] * 4.0 / math.sqrt(3.0)
    assert (base["n_trials"], base["n_reached_eos"], base["onset_step_n"]) == (3, 3, 3)
    assert base["onset_step_mean"] == 44.0
    assert base["onset_step_lo"] == pytest.approx(44.0 - half)
    assert base["onset_step_hi"] == pytest.approx(44.0 + half)
    never = agg.loc[("base", 1e-4)]
    assert never["n_reached_eos"] == 0 and math.isnan(never["onset_step_mean"])
    edm = agg.loc[("edm", 1e-3)]
    assert (edm["n_diverged"], edm["diverged_frac"], edm["n_completed"]) == (1, 0.5, 1)
    # the diverged seed's final loss is inf: left out of the mean
    finite = [t.expected_final_loss() for t in trials if t.variant == "edm" and t.lr == 1e-3 and t.diverge_at is None]
    assert edm["final_loss_n"] == 1 and edm["final_loss_mean"] == pytest.approx(finite[0])
    # fractions: t band clipped to [0, 1]
    assert edm["frac_near_threshold_lo"] == 0.0 and edm["frac_near_threshold_hi"] == 1.0
    vp = agg.loc[("vparam", 1e-4)]
    assert vp["fid_mean"] == pytest.approx(61.0)                  # FID 60 and 62
    assert vp["fid_hi"] - vp["fid_mean"] == pytest.approx(T975[1] * math.sqrt(2.0) / math.sqrt(2.0))


def test_curves_mean_and_band_per_step(fixture_study):
    study, trials = fixture_study
    c = curves(study).set_index(["variant", "lr", "step"])
    seeds = [t for t in trials if t.variant == "vparam" and t.lr == 1e-3]
    for step in (0, 10, 49, 53, 100):
        values = np.array([t.ratio_at(step) for t in seeds])
        row = c.loc[("vparam", 1e-3, step)]
        assert row["ratio_mean"] == pytest.approx(values.mean())
        half = T975[1] * values.std(ddof=1) / math.sqrt(2)
        assert row["ratio_hi"] == pytest.approx(values.mean() + half)
        assert row["lambda_mean"] == pytest.approx(values.mean() * seeds[0].threshold)
        assert row["ratio_n"] == 2
    # edm probes every second step: odd steps have loss but no ratio
    odd = c.loc[("edm", 1e-4, 11)]
    assert odd["ratio_n"] == 0 and math.isnan(odd["ratio_mean"]) and odd["loss_n"] == 2
    # after the diverged seed stops, only one seed is left and there is no band
    late = c.loc[("edm", 1e-3, 100)]
    assert late["ratio_n"] == 1 and math.isnan(late["ratio_lo"])
    assert list(c.loc[("edm", 1e-4)].index) == sorted(c.loc[("edm", 1e-4)].index)


# ---------------------------------------------------------------------------
# loading


def test_load_study_layout(fixture_study):
    study, trials = fixture_study
    assert study.kind == "study"
    assert set(study.steps["trial_id"]) == {t.trial_id for t in trials}
    assert study.variants == ["base", "edm", "vparam"] and study.lrs == [1e-4, 1e-3]
    n_rows = sum(t.steps_done for t in trials)
    assert len(study.steps) == n_rows
    one = study.steps[study.steps["trial_id"] == trials[0].trial_id]
    assert list(one["step"]) == list(range(trials[0].steps))


class _NumericId(SyntheticTrial):
    @property
    def trial_id(self) -> str:
        return f"{self.seed:05d}"


def test_numeric_looking_trial_ids_stay_strings(tmp_path):
    trials = [_NumericId("base", 1e-3, 7, steps=10, onset=5), _NumericId("base", 1e-3, 12, steps=10, onset=6)]
    study = load_study(write_study(tmp_path / "s", trials))
    assert sorted(study.steps["trial_id"].unique()) == ["00007", "00012"]
    per_trial = per_trial_metrics(study).set_index("trial_id")
    assert per_trial.loc["00007", "onset_step"] == 5 and per_trial.loc["00012", "onset_step"] == 6


def test_load_run_folder(tmp_path):
    trial = SyntheticTrial("base", 5e-4, 3, steps=30, onset=12)
    run = write_run(tmp_path / "runs" / "r1", trial)
    study = load(run)
    assert study.kind == "run" and study.name == "r1"
    row = study.trials.iloc[0]
    assert (row["trial_id"], row["variant"], row["lr"], row["seed"], row["optimizer"], row["status"]) == \
        ("r1", "base", 5e-4, 3, "adam", "completed")
    assert per_trial_metrics(study).iloc[0]["onset_step"] == 12
    # a run still going has no status.json
    running = load_run(write_run(tmp_path / "runs" / "r2", trial, status=False))
    assert running.trials.iloc[0]["status"] == "running"
    assert running.trials.iloc[0]["steps_done"] == 30


def test_bad_folders_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such"):
        load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StudyFormatError, match="neither a study folder"):
        load(tmp_path / "empty")
    path = write_study(tmp_path / "s", [SyntheticTrial("base", 1e-3, 0, steps=5)])
    pd.DataFrame({"trial_id": ["x"], "variant": ["base"]}).to_parquet(path / "trials.parquet")
    with pytest.raises(StudyFormatError, match=r"missing columns \['lr', 'seed', 'status'\]"):
        load(path)
    (path / "trials.parquet").unlink()     # a study still running: its trials are read from steps/
    row = load(path).trials.iloc[0]
    assert (row["trial_id"], row["variant"], row["lr"], row["seed"], row["status"], row["steps_done"]) == \
        ("base_lr0.001_s0", "base", 1e-3, 0, "running", 5)
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "study.json").write_text("{}")
    with pytest.raises(StudyFormatError, match="no trials yet"):
        load(tmp_path / "new")


# ---------------------------------------------------------------------------
# the opening transient follows the Adam preconditioner the run measured


def _adam_config(convention=None, beta1=0.9, name="adam", precondition="auto"):
    sharp = {"precondition": precondition}
    if convention is not None:
        sharp["adam_preconditioner"] = convention
    return {"optim": {"name": name, "betas": [beta1, 0.999]}, "sharpness": sharp}


def test_opening_steps_follow_the_recorded_convention():
    from analysis.metrics import opening_steps

    assert opening_steps(_adam_config("update")) == 10            # 1/(1 − 0.9)
    assert opening_steps(_adam_config("update", beta1=0.95)) == 20
    assert opening_steps(_adam_config("update", name="adamw")) == 10
    assert opening_steps(_adam_config("init2winit")) is None
    assert opening_steps(_adam_config(None)) is None               # a config from before the option
    assert opening_steps(_adam_config("update", precondition="none")) is None
    assert opening_steps(_adam_config("update", name="gd")) is None
    assert opening_steps(None) is None


def test_update_convention_limits_the_transient_to_the_opening():
    """Under ``update`` a ratio still ≥ 1 after the first 1/(1 − β₁) steps is
    an onset, not a transient; under init2winit the transient runs on until
    the first ratio below 1."""
    step = np.arange(40)
    ratio = np.empty(40)
    ratio[:3] = [111.0, 4.0, 1.5]            # the opening
    ratio[3:14] = 1.2                        # still above after step 10
    ratio[14:] = 0.8 + 0.01 * (step[14:] - 14)   # below from step 14, back above 1 at step 34
    frame = pd.DataFrame({"step": step, "ratio": ratio, "threshold": 38e3, "loss": 1.0,
                          "fid": np.nan, "inception_score": np.nan, "kid": np.nan})
    old = trial_metrics(frame, _adam_config("init2winit"))
    assert old["transient_end"] == 14 and old["transient_steps"] == 14 and old["onset_step"] == 34
    new = trial_metrics(frame, _adam_config("update"))
    assert new["transient_end"] == 10 and new["transient_steps"] == 10 and new["onset_step"] == 10
    assert new["peak_ratio"] == pytest.approx(1.2)
    # probed every 4 steps: the first probe at or after the opening is step 12
    sparse = frame[frame["step"] % 4 == 0]
    assert trial_metrics(sparse, _adam_config("update"))["onset_step"] == 12
    # an opening that ends below 1 ends the transient there, as before
    dip = frame.copy()
    dip.loc[2, "ratio"] = 0.9
    m = trial_metrics(dip, _adam_config("update"))
    assert m["transient_end"] == 2 and m["onset_step"] == 3


def test_per_trial_metrics_read_the_convention_from_the_run_config(tmp_path):
    """A run folder's config.json decides the rule: a ratio that starts at
    1.5 and falls below 1 only after step 10 is an onset at step 10 under
    ``update`` and a transient under ``init2winit``."""
    import json

    from analysis.metrics import trial_config

    trial = SyntheticTrial("base", 1e-3, 0, steps=60, ratio0=1.5, ratio_end=0.6)
    run = write_run(tmp_path / "run", trial)
    config = json.loads((run / "config.json").read_text())
    assert config["sharpness"]["adam_preconditioner"] == "update"      # the default
    m = per_trial_metrics(load_run(run)).iloc[0]
    assert m["transient_end"] == 10 and m["onset_step"] == 10
    config["sharpness"]["adam_preconditioner"] = "init2winit"
    (run / "config.json").write_text(json.dumps(config))
    m = per_trial_metrics(load_run(run)).iloc[0]
    assert m["transient_end"] > 10 and math.isnan(m["onset_step"])
    assert trial_config({"config": None}) is None and trial_config({}) is None
