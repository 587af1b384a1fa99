"""study.reproduce_eos: the EoS check's summary statistics and a tiny end-to-end run."""
import json

import numpy as np
import pandas as pd
import pytest

from study import reproduce_eos


def _steps(n=40, thr=10.0):
    """A GD-like log: λ₁ alternates 12 (even steps) / 9 (odd steps) around 2/η = 10,
    λ₂ = 11 on every step, gᵀHg/‖g‖² = 10."""
    step = np.arange(n)
    lam1 = np.where(step % 2 == 0, 12.0, 9.0)
    return pd.DataFrame({
        "step": step, "loss": np.linspace(1.0, 0.1, n), "threshold": thr, "ratio": lam1 / thr,
        "lambda": lam1, "topk": [[float(a), 11.0 if a > 11 else 8.0, 5.0] for a in lam1],
        "batch_sharpness": 10.0,
    })


def test_run_summary_against_hand_computed_statistics():
    steps = _steps()
    row = reproduce_eos.run_summary("gd-x", steps, {"optim": {"name": "gd", "lr": 0.2}}, "stopped")
    # second half: steps 20..39, ten even (ratio 1.2) and ten odd (0.9)
    assert row["ratio_even_steps"] == pytest.approx(1.2)
    assert row["ratio_odd_steps"] == pytest.approx(0.9)
    assert row["ratio_2nd_half_median"] == pytest.approx(np.median([1.2] * 10 + [0.9] * 10))
    assert (row["ratio_2nd_half_min"], row["ratio_2nd_half_max"]) == (pytest.approx(0.9), pytest.approx(1.2))
    # λ₂ is 11 on even steps, 8 on odd: median of [1.1]*10 + [0.8]*10
    assert row["lambda2_ratio_median"] == pytest.approx(0.95)
    # eigenvalues above 10: two on even steps (12, 11), none on odd steps
    assert row["eigs_above_threshold_median"] == pytest.approx(1.0)
    assert row["k_recorded"] == 3
    assert row["grad_curvature_ratio_median"] == pytest.approx(1.0)
    assert row["steps"] == 40 and row["lambda_start"] == 12.0
    assert "critical_ratio_median" not in row   # no lambda_critical column


def test_critical_sharpness_statistics_against_hand_computed_values():
    steps = _steps()
    # 2/η_c: 15 on even steps (above 2/η = 10), 6 on odd ones, missing on step 21 (no bracket)
    steps["lambda_critical"] = np.where(steps["step"] % 2 == 0, 15.0, 6.0)
    steps.loc[steps["step"] == 21, "lambda_critical"] = np.nan
    row = reproduce_eos.run_summary("gd-x", steps, {"optim": {"name": "gd", "lr": 0.2}}, "stopped")
    # second half: ten even steps 15/12 = 1.25 and nine odd ones 6/9 = 0.667 → median 1.25 (19 values)
    assert row["critical_over_lambda_median"] == pytest.approx(1.25)
    assert row["critical_ratio_median"] == pytest.approx(1.5)
    assert row["critical_above_threshold"] == pytest.approx(10 / 19)
    adam = reproduce_eos.run_summary("adam-x", steps, {"optim": {"name": "adam", "lr": 1e-3}}, "stopped")
    assert "critical_over_lambda_median" in adam and "critical_ratio_median" not in adam


def test_gradient_curvature_is_compared_with_the_threshold_for_gd_only():
    row = reproduce_eos.run_summary("adam-x", _steps(), {"optim": {"name": "adam", "lr": 1e-3}}, "stopped")
    assert "grad_curvature_ratio_median" not in row   # plain-H curvature vs Adam's P⁻¹H threshold: meaningless


def test_run_summary_without_topk_or_batch_sharpness():
    steps = _steps().drop(columns=["batch_sharpness"])
    steps["topk"] = [[float(v)] for v in steps["lambda"]]
    row = reproduce_eos.run_summary("gd-x", steps, {"optim": {"name": "gd", "lr": 0.2}}, "completed")
    assert "lambda2_ratio_median" not in row and "grad_curvature_ratio_median" not in row


def test_nothing_to_run_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        reproduce_eos.main(["--out", str(tmp_path), "--gd-multiples", "--adam-lrs"])
    assert e.value.code == 2
    assert "nothing to run" in capsys.readouterr().err


def test_tiny_gd_and_adam_run_end_to_end(tmp_path):
    out = tmp_path / "eos"
    rc = reproduce_eos.main(["--out", str(out), "--preset", "tiny", "--image-size", "8", "--batch", "8",
                             "--steps", "6", "--every", "1", "--topk", "2", "--batch-sharpness", "--critical",
                             "--gd-multiples", "2", "--adam-lrs", "1e-3", "--minutes", "5", "--device", "cpu"])
    assert rc == 0
    pilot = json.loads((out / "pilot.json").read_text())
    assert pilot["lambda0"] > 0 and len(pilot["runs"]) == 2
    for name in pilot["runs"]:
        cfg = json.loads((out / name / "config.json").read_text())
        assert cfg["sharpness"]["block_size"] == 3 and cfg["sharpness"]["topk"] == 2
        assert cfg["sharpness"]["batch_sharpness"] is True and cfg["sharpness"]["critical"] is True
    gd = next(n for n in pilot["runs"] if n.startswith("gd"))
    assert json.loads((out / gd / "config.json").read_text())["optim"]["lr"] == pytest.approx(1.0 / pilot["lambda0"])
    summary = (out / "summary.md").read_text()
    for col in ("ratio_even_steps", "lambda2_ratio_median", "grad_curvature_ratio_median",
                "critical_over_lambda_median", "critical_ratio_median", "critical_above_threshold"):
        assert col in summary
    assert (out / "eos_lambda.png").stat().st_size > 0 and (out / "eos_ratio.png").stat().st_size > 0


def test_cpu_runs_split_the_cores(monkeypatch):
    monkeypatch.setattr(reproduce_eos.os, "cpu_count", lambda: 16)
    assert reproduce_eos.cpu_threads_per_run("cpu", 2) == 8
    assert reproduce_eos.cpu_threads_per_run("cpu", 3) == 5
    assert reproduce_eos.cpu_threads_per_run("cpu", 40) == 1
    monkeypatch.setattr(reproduce_eos.os, "cpu_count", lambda: None)
    assert reproduce_eos.cpu_threads_per_run("cpu", 2) == 1
