"""A trial that fails on bad input is an error with its reason, not retried by Tune (issue 18.4).

Validation catches bad input before launch (tests/test_cli_errors.py); here the
data file breaks after validation (built with check_files=False), as when it is
replaced while the study runs."""
import logging

import numpy as np
import pandas as pd
import pytest

ray = pytest.importorskip("ray")

from study.runner import run_study  # noqa: E402
from study.spec import spec_from_dict  # noqa: E402
from test_study_spec import small_spec  # noqa: E402


def test_a_trial_with_bad_data_ends_as_an_error_once(tmp_path):
    data = tmp_path / "wrong.npz"
    np.savez(data, pictures=np.zeros((40, 16, 16, 3), np.uint8))
    spec = spec_from_dict(small_spec(study={"storage": str(tmp_path / "results"), "max_failures": 3},
                                     search={"algorithm": "grid", "lr": {"grid": [1e-3]}},
                                     data={"name": "npz", "path": str(data)}), check_files=False)
    ray.init(num_cpus=1, num_gpus=0, include_dashboard=False, logging_level=logging.WARNING)
    try:
        outcome = run_study(spec, verbose=0)
    finally:
        ray.shutdown()
    trials = pd.read_parquet(outcome.layout.trials_table)
    assert trials["status"].tolist() == ["error"]
    assert trials["reason"].tolist() == [f"data.path: {str(data)!r} has no array named 'x_train' or 'images' "
                                         "or 'x' (its arrays: pictures)"]
    assert not list(outcome.layout.tune.rglob("error.txt"))    # Tune saw no failure: nothing to retry
    assert outcome.errors == 1 and not outcome.complete
