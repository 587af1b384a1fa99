"""The per-step log: Parquet chunks with a fixed, versioned schema.

A run directory holds ``steps/part-<first>-<last>.parquet`` files.  Each chunk
is written to a temporary file and renamed into place
(:mod:`trainers.run.atomic`), so a reader never sees half a chunk.  Chunks are flushed together with checkpoints; on resume the log
is cut back to the checkpoint's step, so no step is ever duplicated or lost.

Schema version 1 (one row per optimizer step; null where not measured):

=================  ===========  ==================================================
column             type         meaning
=================  ===========  ==================================================
step               int64        index of the optimizer step (0-based); the row
                                describes the parameters *before* that update
wall_time          float64      seconds of training so far (summed over resumes)
loss               float64      training loss of the step's batch
lr                 float64      learning rate used for the update
grad_norm          float64      global gradient norm before clipping
lambda_max         float64      λ₁(H) of the frozen-batch loss Hessian
lambda_precond     float64      λ₁(P⁻¹H), P = diag(√v̂ + ε) (Adam/AdamW only)
threshold          float64      the optimizer's stability threshold (2/η, ...)
ratio              float64      (λ₁(P⁻¹H) for Adam, else λ₁(H)) / threshold
eig_residual       float64      relative residual ‖Hv − λv‖/|λ| of the reported λ
eig_iters          int64        solver iterations of the estimate
eig_hvps           int64        Hessian-vector products the estimate cost (TF32 search products included)
eig_converged      bool         the residual reached the tolerance
topk               list<f64>    top-k eigenvalues (of the operator in ``ratio``)
hessian_trace      float64      Hutchinson estimate of tr(H)
batch_sharpness    float64      directional curvature gᵀHg/‖g‖² on the training batch
variant_stats      string       JSON object of the variant's own scalars
fid                float64      FID of EMA samples vs. real images (eval steps only)
inception_score    float64      Inception score of the same samples
kid                float64      kernel inception distance of the same samples
=================  ===========  ==================================================
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from trainers.run.atomic import remove_stale_temporaries, write_atomic

SCHEMA_VERSION = 1

SCHEMA = pa.schema(
    [
        ("step", pa.int64()),
        ("wall_time", pa.float64()),
        ("loss", pa.float64()),
        ("lr", pa.float64()),
        ("grad_norm", pa.float64()),
        ("lambda_max", pa.float64()),
        ("lambda_precond", pa.float64()),
        ("threshold", pa.float64()),
        ("ratio", pa.float64()),
        ("eig_residual", pa.float64()),
        ("eig_iters", pa.int64()),
        ("eig_hvps", pa.int64()),
        ("eig_converged", pa.bool_()),
        ("topk", pa.list_(pa.float64())),
        ("hessian_trace", pa.float64()),
        ("batch_sharpness", pa.float64()),
        ("variant_stats", pa.string()),
        ("fid", pa.float64()),
        ("inception_score", pa.float64()),
        ("kid", pa.float64()),
    ],
    metadata={b"eos_schema_version": str(SCHEMA_VERSION).encode()},
)
COLUMNS = SCHEMA.names


def _row(values: dict[str, Any]) -> dict[str, Any]:
    unknown = set(values) - set(COLUMNS)
    if unknown:
        raise KeyError(f"not in the step-log schema v{SCHEMA_VERSION}: {sorted(unknown)}")
    row = {c: values.get(c) for c in COLUMNS}
    if isinstance(row["variant_stats"], dict):
        row["variant_stats"] = json.dumps(row["variant_stats"], sort_keys=True) if row["variant_stats"] else None
    return row


def write_parquet(table: pa.Table, path: Path) -> Path:
    """``table`` as a Parquet file, written atomically (:func:`trainers.run.atomic.write_atomic`)."""
    return write_atomic(path, lambda tmp: pq.write_table(table, tmp))


class StepLog:
    """Buffered, chunked, atomic writer of the per-step log in ``directory``."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._rows: list[dict] = []

    def append(self, **values) -> None:
        self._rows.append(_row(values))

    def update_last(self, **values) -> None:
        """Fill columns of the newest buffered row (e.g. FID measured after the step)."""
        if not self._rows:
            raise RuntimeError("no buffered row to update")
        self._rows[-1].update(_row({**{k: v for k, v in self._rows[-1].items() if v is not None}, **values}))

    def chunks(self) -> list[Path]:
        return sorted(self.directory.glob("part-*.parquet"))

    def flush(self) -> Optional[Path]:
        if not self._rows:
            return None
        table = pa.Table.from_pylist(self._rows, schema=SCHEMA)
        first, last = self._rows[0]["step"], self._rows[-1]["step"]
        path = self.directory / f"part-{first:09d}-{last:09d}.parquet"
        write_parquet(table, path)
        self._rows = []
        return path

    def truncate_after(self, step: int) -> None:
        """Drop every logged row with ``step`` > the given step (resume from a
        checkpoint taken at ``step + 1``); also drops buffered rows."""
        self._rows = [r for r in self._rows if r["step"] <= step]
        for path in self.chunks():
            first, last = (int(x) for x in path.stem.split("-")[1:3])
            if first > step:
                path.unlink()
            elif last > step:
                table = pq.read_table(path, schema=SCHEMA)
                keep = table.filter(pc.less_equal(table["step"], step))
                new = self.directory / f"part-{first:09d}-{step:09d}.parquet"
                write_parquet(keep, new)
                path.unlink()
        remove_stale_temporaries(self.directory)

    def last_step(self) -> Optional[int]:
        chunks = self.chunks()
        return int(chunks[-1].stem.split("-")[2]) if chunks else None


def read_steps(directory: str | os.PathLike):
    """The per-step log of one run as a pandas DataFrame sorted by step."""
    import pandas as pd

    directory = Path(directory)
    files = sorted(directory.glob("part-*.parquet"))
    if not files:
        return pd.DataFrame({name: pd.Series(dtype=f.type.to_pandas_dtype()) for name, f in zip(SCHEMA.names, SCHEMA)})
    table = pa.concat_tables([pq.read_table(f, schema=SCHEMA) for f in files])
    return table.to_pandas().sort_values("step").reset_index(drop=True)
