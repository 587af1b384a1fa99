import pyarrow.parquet as pq
import pytest

from trainers.run.steplog import SCHEMA, SCHEMA_VERSION, StepLog, read_steps


def test_chunks_are_written_atomically_with_the_schema(tmp_path):
    log = StepLog(tmp_path)
    for s in range(5):
        log.append(step=s, loss=1.0 / (s + 1), lr=0.1, topk=[3.0, 2.0], variant_stats={"h": 1.5})
    path = log.flush()
    assert path.name == "part-000000000-000000004.parquet"
    assert not list(tmp_path.glob(".*tmp*"))
    table = pq.read_table(path)
    assert table.schema.equals(SCHEMA, check_metadata=False)
    assert table.schema.metadata[b"eos_schema_version"] == str(SCHEMA_VERSION).encode()
    df = read_steps(tmp_path)
    assert df["step"].tolist() == [0, 1, 2, 3, 4]
    assert df["topk"][0].tolist() == [3.0, 2.0] and df["variant_stats"][0] == '{"h": 1.5}'


def test_unknown_column_is_rejected(tmp_path):
    with pytest.raises(KeyError, match="lamda"):
        StepLog(tmp_path).append(step=0, lamda=1.0)


def test_truncate_after_cuts_chunks_and_buffer(tmp_path):
    log = StepLog(tmp_path)
    for s in range(10):
        log.append(step=s, loss=float(s))
        if s in (3, 7):
            log.flush()
    log.truncate_after(5)  # drops rows 6..9 (6, 7 from disk, 8, 9 buffered)
    log.flush()
    assert read_steps(tmp_path)["step"].tolist() == [0, 1, 2, 3, 4, 5]
    log.truncate_after(-1)
    assert read_steps(tmp_path).empty


def test_update_last_fills_eval_columns(tmp_path):
    log = StepLog(tmp_path)
    log.append(step=0, loss=1.0)
    log.update_last(fid=12.5)
    log.flush()
    row = read_steps(tmp_path).iloc[0]
    assert row["fid"] == 12.5 and row["loss"] == 1.0
