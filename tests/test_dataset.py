"""The per-step dataset as a data product: the README's one-line readers
(pandas, pyarrow.dataset, DuckDB, polars) run against a study folder, and
``eos schema`` prints the one schema definition (the README's table too)."""
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.cli import schema_document
from analysis_fixtures import SyntheticTrial, write_study
from study.cli import main as eos
from trainers.run.steplog import COLUMNS, PARTITION_COLUMNS, SCHEMA_VERSION, STEP_COLUMNS, UNITS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def readme_reader_lines() -> list[str]:
    block = README.split("<!-- dataset: one line per reader -->", 1)[1]
    code = re.search(r"```python\n(.*?)```", block, flags=re.S).group(1)
    return [line for line in code.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    trials = [SyntheticTrial("base", lr, 0, steps=30, onset=10, every=2) for lr in (1e-3, 1e-4)]
    trials.append(SyntheticTrial("edm", 1e-3, 1, steps=20, onset=8))
    return write_study(tmp_path_factory.mktemp("data") / "smoke", trials), trials


def _canonical(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (trial, step), the columns every reader agrees on, sorted."""
    frame = frame.assign(trial=frame["trial"].astype(str), variant=frame["variant"].astype(str))
    cols = ["variant", "trial", "step", "loss", "ratio", "threshold"]
    return frame[cols].sort_values(["trial", "step"]).reset_index(drop=True)


def test_each_readme_reader_reads_the_whole_study_in_one_line(study, monkeypatch):
    pytest.importorskip("duckdb")
    pytest.importorskip("polars")
    root, trials = study
    imports, *readers = readme_reader_lines()
    assert [line.split("(")[0].split("=")[1].strip() for line in readers] == [
        "pd.read_parquet", "ds.dataset", "duckdb.sql", "pl.read_parquet"]
    monkeypatch.chdir(root.parent)                   # the README's paths are relative: results/smoke/...
    (root.parent / "results").mkdir()
    (root.parent / "results" / "smoke").symlink_to(root)
    scope: dict = {}
    exec(imports, scope)
    frames = []
    for line in readers:
        exec(line, scope)
        steps = scope["steps"]
        frames.append(steps if isinstance(steps, pd.DataFrame) else steps.to_pandas())
    expected = sum(t.steps for t in trials)
    reference = _canonical(frames[0])
    assert len(reference) == expected and set(reference["trial"]) == {t.trial_id for t in trials}
    for frame in frames:
        assert set(COLUMNS) | {c.name for c in PARTITION_COLUMNS} == set(frame.columns)
        pd.testing.assert_frame_equal(_canonical(frame), reference, check_dtype=False)
    # the values are the trials' own: the ratio of a probed step, null between probes (every=2)
    base = reference[reference["trial"] == trials[0].trial_id].set_index("step")
    rows = {r["step"]: r for r in trials[0].rows()}
    assert np.isclose(base.loc[4, "ratio"], rows[4]["ratio"]) and np.isnan(base.loc[5, "ratio"])


def test_eos_schema_prints_every_column_in_each_format(capsys):
    assert eos(["schema"]) == 0
    text = capsys.readouterr().out
    assert f"schema version {SCHEMA_VERSION}" in text
    for c in (*STEP_COLUMNS, *PARTITION_COLUMNS):
        line = next(l for l in text.splitlines() if l.split() and l.split()[0] == c.name)
        assert c.type_name in line and c.meaning in line and f" {c.unit} " in line
    assert eos(["schema", "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema_version"] == SCHEMA_VERSION and doc["units"] == UNITS
    assert [(c["column"], c["type"], c["unit"], c["meaning"], c["where"]) for c in doc["columns"]] == [
        *((c.name, c.type_name, c.unit, c.meaning, "file") for c in STEP_COLUMNS),
        *((c.name, c.type_name, c.unit, c.meaning, "partition") for c in PARTITION_COLUMNS)]


def test_the_readme_schema_table_is_eos_schema_output():
    block = README.split("<!-- eos schema --format markdown -->\n", 1)[1].split("\n<!-- end eos schema -->", 1)[0]
    assert block == schema_document("markdown"), "README is stale: paste `eos schema --format markdown`"
    # the Markdown table has one row per column (| inside a meaning is escaped)
    rows = [line for line in block.splitlines() if line.startswith("| ") and not line.startswith("| column")]
    assert [r.split("|")[1].strip() for r in rows] == [c.name for c in (*STEP_COLUMNS, *PARTITION_COLUMNS)]
    assert all(len(re.split(r"(?<!\\)\|", r)) == 7 for r in rows)
