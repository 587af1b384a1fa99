"""Sampling and FID/IS/KID during training, wired through the loop."""
import numpy as np
import pytest

from conftest import tiny_config
from test_fid import RandomConvFeatures
from trainers.run.loop import train
from trainers.run.steplog import read_steps


def test_fid_every_n_steps_fills_the_log_columns(tmp_path):
    cfg = tiny_config(train={"steps": 6, "checkpoint_every": 3},
                      eval={"every": 3, "samples": 16, "batch_size": 16, "sampler": "ddim", "sampler_steps": 4,
                            "grid_every": 6, "grid_size": 4})
    extractor = RandomConvFeatures()
    assert train(cfg, tmp_path / "run", feature_extractor=extractor).status == "completed"
    df = read_steps(tmp_path / "run" / "steps")
    measured = df.dropna(subset=["fid"])
    assert measured["step"].tolist() == [2, 5]           # after steps 3 and 6
    assert np.isfinite(measured[["fid", "inception_score", "kid"]].to_numpy()).all()
    assert (measured["fid"] > 0).all()
    assert (tmp_path / "run" / "samples" / "step-000000006.png").stat().st_size > 100


def test_missing_inception_weights_fail_before_training(tmp_path):
    from trainers.run.fid import InceptionWeightsMissing

    cfg = tiny_config(eval={"every": 5, "inception_weights": str(tmp_path / "no-such-weights.pth")})
    with pytest.raises(InceptionWeightsMissing, match="inception_weights"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "steps").exists() or read_steps(tmp_path / "run" / "steps").empty
