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


def test_the_docstring_table_is_the_structured_schema():
    """steplog's docstring table lists STEP_COLUMNS in order with the same
    type, unit and meaning (continuation lines joined); SCHEMA is built from them."""
    import re

    from trainers.run import steplog

    doc = steplog.__doc__
    rules = [m.start() for m in re.finditer(r"^=+  =+  =+  =+$", doc, flags=re.M)]
    body = doc[rules[1]:rules[2]].splitlines()[1:]
    rows = []
    for line in body:
        if line[:17].strip():
            name, type_, unit = line[:17].strip(), line[19:32].strip(), line[34:41].strip()
            rows.append([name, type_, unit, line[43:].strip()])
        else:
            rows[-1][3] += " " + line.strip()
    assert rows == [[c.name, c.type_name, c.unit, c.meaning] for c in steplog.STEP_COLUMNS]
    assert SCHEMA.names == [c.name for c in steplog.STEP_COLUMNS]
    assert [f.type for f in SCHEMA] == [c.type for c in steplog.STEP_COLUMNS]
    # every unit is built from the symbols UNITS explains ("loss/θ²" = loss, θ)
    tokens = {t.rstrip("²") for c in (*steplog.STEP_COLUMNS, *steplog.PARTITION_COLUMNS) for t in c.unit.split("/")}
    assert tokens <= set(steplog.UNITS), tokens - set(steplog.UNITS)
