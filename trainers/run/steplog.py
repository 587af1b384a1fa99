"""The per-step log: Parquet chunks with a fixed, versioned schema.

A run directory holds ``steps/part-<first>-<last>.parquet`` files.  Each chunk
is written to a temporary file and renamed into place
(:mod:`trainers.run.atomic`), so a reader never sees half a chunk.  Chunks are flushed together with checkpoints; on resume the log
is cut back to the checkpoint's step, so no step is ever duplicated or lost.

Schema version 2 (one row per optimizer step; null where not measured).
:data:`STEP_COLUMNS` below is its one definition (name, Arrow type, unit,
meaning) and :data:`UNITS` says what the unit symbols mean (θ: the
parameters' unit, η: the learning rate's, so that the threshold and the λ in
``ratio`` are both in 1/η).  :data:`SCHEMA`, ``eos schema`` and the README's
table are built from them; tests/test_steplog.py checks this table too.

=================  =============  =======  ====================================================
column             type           unit     meaning
=================  =============  =======  ====================================================
step               int64          step     index of the optimizer step (0-based); the row
                                           describes the parameters *before* that update
wall_time          float64        s        seconds of training so far (summed over resumes)
loss               float64        loss     training loss of the step's batch
lr                 float64        η        learning rate used for the update
grad_norm          float64        loss/θ   global gradient norm before clipping
lambda_max         float64        loss/θ²  λ₁(H) of the frozen-batch loss Hessian; with coupled
                                           L2 weight decay (gd/momentum/adam,
                                           optim.weight_decay > 0) λ₁(H + wd·I), the update's
                                           curvature (every curvature column likewise)
lambda_precond     float64        1/θ      λ₁(P⁻¹H), P the preconditioner of Adam's update
                                           (sharpness.adam_preconditioner; Adam/AdamW only)
threshold          float64        1/η      the optimizer's stability threshold (2/η, ...)
ratio              float64        1        (λ₁(P⁻¹H) for Adam, else λ₁(H)) / threshold
eig_residual       float64        1        relative residual ‖Hv − λv‖/|λ| of the reported λ
eig_iters          int64          count    solver iterations of the estimate
eig_hvps           int64          count    Hessian-vector products the estimate cost (TF32
                                           search products included)
eig_converged      bool           —        the residual reached the tolerance
topk               list<float64>  1/η      top-k eigenvalues (of the operator in ``ratio``)
hessian_trace      float64        loss/θ²  Hutchinson estimate of tr(H)
step_sharpness     float64        loss/θ²  gᵀH_Bg/‖g‖² on the step's own training batch B,
                                           train mode
batch_sharpness    float64        loss/θ²  batch sharpness: mean of gᵀH_Bg/‖g‖² over fresh
                                           training mini-batches B (g, H_B of the same B; train
                                           mode), Monte Carlo
batch_sharpness_n  int64          count    mini-batches the batch sharpness averaged (it stops
                                           at sharpness.batch_sharpness_rse or _max_batches)
variant_stats      string         JSON     JSON object of the variant's own scalars
fid                float64        1        FID of EMA samples vs. real images (eval steps only)
inception_score    float64        1        Inception score of the same samples
kid                float64        1        kernel inception distance of the same samples
=================  =============  =======  ====================================================

A study's dataset (``<study>/steps/variant=<v>/trial=<id>/part-*.parquet``,
:mod:`study.layout`) adds the hive partition columns :data:`PARTITION_COLUMNS`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from trainers.run.atomic import remove_stale_temporaries, write_atomic

SCHEMA_VERSION = 2


@dataclass(frozen=True)
class Column:
    """One column of the step log: its name, Arrow type, unit and meaning."""
    name: str
    type: pa.DataType
    unit: str
    meaning: str

    @property
    def type_name(self) -> str:
        """The type in pandas' words (``float64``; ``list<float64>`` for a list)."""
        if pa.types.is_list(self.type):
            return f"list<{_TYPE_NAMES[self.type.value_type]}>"
        return _TYPE_NAMES[self.type]


_F, _I = pa.float64(), pa.int64()
_TYPE_NAMES = {_F: "float64", _I: "int64", pa.bool_(): "bool", pa.string(): "string"}
STEP_COLUMNS: tuple[Column, ...] = (
    Column("step", _I, "step", "index of the optimizer step (0-based); the row describes the parameters "
                               "*before* that update"),
    Column("wall_time", _F, "s", "seconds of training so far (summed over resumes)"),
    Column("loss", _F, "loss", "training loss of the step's batch"),
    Column("lr", _F, "η", "learning rate used for the update"),
    Column("grad_norm", _F, "loss/θ", "global gradient norm before clipping"),
    Column("lambda_max", _F, "loss/θ²", "λ₁(H) of the frozen-batch loss Hessian; with coupled L2 weight decay "
                                        "(gd/momentum/adam, optim.weight_decay > 0) λ₁(H + wd·I), the update's "
                                        "curvature (every curvature column likewise)"),
    Column("lambda_precond", _F, "1/θ", "λ₁(P⁻¹H), P the preconditioner of Adam's update "
                                        "(sharpness.adam_preconditioner; Adam/AdamW only)"),
    Column("threshold", _F, "1/η", "the optimizer's stability threshold (2/η, ...)"),
    Column("ratio", _F, "1", "(λ₁(P⁻¹H) for Adam, else λ₁(H)) / threshold"),
    Column("eig_residual", _F, "1", "relative residual ‖Hv − λv‖/|λ| of the reported λ"),
    Column("eig_iters", _I, "count", "solver iterations of the estimate"),
    Column("eig_hvps", _I, "count", "Hessian-vector products the estimate cost (TF32 search products included)"),
    Column("eig_converged", pa.bool_(), "—", "the residual reached the tolerance"),
    Column("topk", pa.list_(_F), "1/η", "top-k eigenvalues (of the operator in ``ratio``)"),
    Column("hessian_trace", _F, "loss/θ²", "Hutchinson estimate of tr(H)"),
    Column("step_sharpness", _F, "loss/θ²", "gᵀH_Bg/‖g‖² on the step's own training batch B, train mode"),
    Column("batch_sharpness", _F, "loss/θ²", "batch sharpness: mean of gᵀH_Bg/‖g‖² over fresh training "
                                             "mini-batches B (g, H_B of the same B; train mode), Monte Carlo"),
    Column("batch_sharpness_n", _I, "count", "mini-batches the batch sharpness averaged (it stops at "
                                                   "sharpness.batch_sharpness_rse or _max_batches)"),
    Column("variant_stats", pa.string(), "JSON", "JSON object of the variant's own scalars"),
    Column("fid", _F, "1", "FID of EMA samples vs. real images (eval steps only)"),
    Column("inception_score", _F, "1", "Inception score of the same samples"),
    Column("kid", _F, "1", "kernel inception distance of the same samples"),
)
# the symbols the units above are made of (eos schema prints them)
UNITS = {
    "step": "optimizer steps", "count": "a count", "s": "seconds", "1": "dimensionless",
    "loss": "the variant's training loss", "θ": "the parameters' unit",
    "η": "the learning rate's unit: θ²/loss for GD and momentum, θ for Adam (the threshold and the λ in ratio "
         "are both in 1/η)",
    "JSON": "a JSON object as text", "—": "none",
}
# the hive partitions of a study's dataset (folder names, not stored in the files)
PARTITION_COLUMNS: tuple[Column, ...] = (
    Column("variant", pa.string(), "—", "stabilization variant (partition folder variant=<v>)"),
    Column("trial", pa.string(), "—", "trial id <variant>_lr<lr>_s<seed> (partition folder trial=<id>)"),
)

SCHEMA = pa.schema([(c.name, c.type) for c in STEP_COLUMNS],
                   metadata={b"eos_schema_version": str(SCHEMA_VERSION).encode()})
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


def schema_rows(partitions: bool = True) -> list[dict]:
    """The schema as records (``column``, ``type``, ``unit``, ``meaning``,
    ``where``: ``file`` or ``partition``), for ``eos schema`` and documents."""
    cols = [(c, "file") for c in STEP_COLUMNS] + ([(c, "partition") for c in PARTITION_COLUMNS] if partitions else [])
    return [{"column": c.name, "type": c.type_name, "unit": c.unit, "meaning": c.meaning, "where": where}
            for c, where in cols]
