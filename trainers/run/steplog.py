"""The per-step log: Parquet chunks with a fixed, versioned schema.

A run directory holds ``steps/part-<first>-<last>.parquet`` files.  Each chunk
is written to a temporary file and renamed into place
(:mod:`trainers.run.atomic`), so a reader never sees half a chunk.  Chunks
are flushed together with checkpoints; on resume the log is cut back to the
checkpoint's step, so no step is ever duplicated or lost.  ``_manifest.json``
(:data:`MANIFEST`) records every chunk (file, step range, rows), so that
:func:`check_log` names a chunk deleted or damaged afterwards (a resume and
``eos report`` refuse such a log, in one line).

Schema version 4 (one row per optimizer step; null where not measured).
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
eig_error          string         —        why a probed step has no curvature: the solver's
                                           error, again after a cold start (else null)
eig_check          float64        1        |λ_TF32 − λ_float32|/|λ_float32| where a TF32 estimate
                                           was checked with float32 products at this step (null
                                           elsewhere: λ is the TF32 value times the last check's
                                           λ_float32/λ_TF32, sharpness.verify_every)
topk               list<float64>  1/η      top-k eigenvalues (of the operator in ``ratio``)
n_above            int64          count    eigenvalues of the operator in ``ratio`` above
                                           sharpness.above_fraction × threshold, each converged
                                           to the solver's tolerance (at most
                                           sharpness.above_cap)
n_above_capped     bool           —        n_above reached sharpness.above_cap: a lower bound
above_values       list<float64>  1/η      the n_above eigenvalues above the cut, descending
hessian_trace      float64        loss/θ²  Hutchinson estimate of tr(H)
step_sharpness     float64        loss/θ²  gᵀH_Bg/‖g‖² on the step's own training batch B,
                                           train mode
batch_sharpness    float64        loss/θ²  batch sharpness: mean of gᵀH_Bg/‖g‖² over fresh
                                           training mini-batches B (g, H_B of the same B; train
                                           mode), Monte Carlo
batch_sharpness_n  int64          count    mini-batches the batch sharpness averaged (it stops
                                           at sharpness.batch_sharpness_rse or _max_batches)
lambda_critical    float64        1/η      critical sharpness 2/η_c (Kalra et al. 2026): η_c
                                           the smallest step along the coming update at which
                                           the Hessian-batch loss rises, by line search
                                           (sharpness.critical)
critical_passes    int64          count    forward passes the critical-sharpness line search
                                           took
lambda_dir         float64        1/η      directional sharpness ΔθᵀHΔθ/Δθᵀg of the same update
                                           Δθ and loss: λ_critical's quadratic model
                                           (sharpness.critical)
hessian_batch_id   int64          count    frozen Hessian batch measured on: 0, then +1 at
                                           each redraw (new variant objective, e.g. pd stage;
                                           refresh_batch)
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

from trainers.run.atomic import remove_stale_temporaries, write_atomic, write_json_atomic

SCHEMA_VERSION = 4


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
    Column("eig_error", pa.string(), "—", "why a probed step has no curvature: the solver's error, again after a "
                                          "cold start (else null)"),
    Column("eig_check", _F, "1", "|λ_TF32 − λ_float32|/|λ_float32| where a TF32 estimate was checked with float32 "
                                 "products at this step (null elsewhere: λ is the TF32 value times the last check's "
                                 "λ_float32/λ_TF32, sharpness.verify_every)"),
    Column("topk", pa.list_(_F), "1/η", "top-k eigenvalues (of the operator in ``ratio``)"),
    Column("n_above", _I, "count", "eigenvalues of the operator in ``ratio`` above sharpness.above_fraction × "
                                   "threshold, each converged to the solver's tolerance (at most sharpness.above_cap)"),
    Column("n_above_capped", pa.bool_(), "—", "n_above reached sharpness.above_cap: a lower bound"),
    Column("above_values", pa.list_(_F), "1/η", "the n_above eigenvalues above the cut, descending"),
    Column("hessian_trace", _F, "loss/θ²", "Hutchinson estimate of tr(H)"),
    Column("step_sharpness", _F, "loss/θ²", "gᵀH_Bg/‖g‖² on the step's own training batch B, train mode"),
    Column("batch_sharpness", _F, "loss/θ²", "batch sharpness: mean of gᵀH_Bg/‖g‖² over fresh training "
                                             "mini-batches B (g, H_B of the same B; train mode), Monte Carlo"),
    Column("batch_sharpness_n", _I, "count", "mini-batches the batch sharpness averaged (it stops at "
                                                   "sharpness.batch_sharpness_rse or _max_batches)"),
    Column("lambda_critical", _F, "1/η", "critical sharpness 2/η_c (Kalra et al. 2026): η_c the smallest step "
                                         "along the coming update at which the Hessian-batch loss rises, by "
                                         "line search (sharpness.critical)"),
    Column("critical_passes", _I, "count", "forward passes the critical-sharpness line search took"),
    Column("lambda_dir", _F, "1/η", "directional sharpness ΔθᵀHΔθ/Δθᵀg of the same update Δθ and loss: "
                                    "λ_critical's quadratic model (sharpness.critical)"),
    Column("hessian_batch_id", _I, "count", "frozen Hessian batch measured on: 0, then +1 at each redraw (new "
                                            "variant objective, e.g. pd stage; refresh_batch)"),
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


# ---------------------------------------------------------------------------
# what a log holds: its chunks, the manifest, the check

#: the record of a log's chunks, beside them (pyarrow's dataset discovery skips
#: names starting with "_", so a study's dataset stays readable)
MANIFEST = "_manifest.json"
CHUNK_GLOB = "part-*.parquet"


class StepLogError(ValueError):
    """A step log with a missing or damaged chunk; the message (one line) names the file."""


def chunk_range(path: str | os.PathLike) -> tuple[int, int]:
    """The first and last step of ``part-<first>-<last>.parquet``."""
    first, last = Path(path).stem.split("-")[1:3]
    return int(first), int(last)


def steps_text(first: int, last: int) -> str:
    return f"step {first}" if first == last else f"steps {first}–{last}"


@dataclass(frozen=True)
class Chunk:
    """One chunk of the log as the manifest records it."""
    file: str
    first: int
    last: int
    rows: int


def read_manifest(directory: str | os.PathLike) -> Optional[dict[str, Chunk]]:
    """The chunks ``_manifest.json`` lists (by file name), None without a readable manifest."""
    path = Path(directory) / MANIFEST
    try:
        data = json.loads(path.read_text())
        return {c["file"]: Chunk(c["file"], int(c["first"]), int(c["last"]), int(c["rows"])) for c in data["chunks"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_manifest(directory: str | os.PathLike, chunks: dict[str, Chunk]) -> None:
    data = {"schema_version": SCHEMA_VERSION,
            "chunks": [vars(c) for c in sorted(chunks.values(), key=lambda c: (c.first, c.file))]}
    write_json_atomic(Path(directory) / MANIFEST, data)


@dataclass(frozen=True)
class LogCheck:
    """What a log folder holds, checked against its manifest (:func:`check_log`).

    ``intact``: the chunks that are there and whole; ``problems``: one phrase
    per missing or damaged chunk, naming the file."""
    directory: Path
    intact: tuple[Chunk, ...]
    problems: tuple[str, ...]

    @property
    def reaches(self) -> int:
        """The last step of the unbroken run of steps from 0 (-1: no step 0)."""
        following = 0
        for c in sorted(self.intact, key=lambda c: c.first):
            if c.first > following:
                break
            following = max(following, c.last + 1)
        return following - 1

    @property
    def last(self) -> int:
        """The last step any intact chunk holds (-1 without one)."""
        return max((c.last for c in self.intact), default=-1)

    def gaps(self) -> list[tuple[int, int]]:
        """The step ranges missing between step 0 and :attr:`last`."""
        out, following = [], 0
        for c in sorted(self.intact, key=lambda c: c.first):
            if c.first > following:
                out.append((following, c.first - 1))
            following = max(following, c.last + 1)
        return out

    def summary(self) -> str:
        """``holds steps 0–24``, ``holds no steps`` or ``holds steps 0–74 but steps 25–49 missing``."""
        if not self.intact:
            return "holds no steps"
        text = f"holds {steps_text(min(c.first for c in self.intact), self.last)}"
        gaps = self.gaps()
        return text + (" but " + ", ".join(steps_text(a, b) for a, b in gaps) + " missing" if gaps else "")

    def error(self) -> Optional[str]:
        """One line naming every missing or damaged chunk and every gap; None for a sound log."""
        parts = list(self.problems) + [f"{steps_text(a, b)} missing" for a, b in self.gaps()
                                       if not any(steps_text(a, b) in p for p in self.problems)]
        return f"{self.directory}: " + "; ".join(parts) if parts else None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def check_log(directory: str | os.PathLike) -> LogCheck:
    """Compare the chunks in ``directory`` with its manifest: a listed chunk
    that is gone is missing; a chunk whose footer does not read, or whose row
    count is not its name's step range (and the manifest's), is damaged.
    Reads only the Parquet footers.  A chunk the manifest does not list yet
    (a writer killed between the chunk and the manifest) counts when whole."""
    directory = Path(directory)
    listed = read_manifest(directory) or {}
    on_disk = {p.name: p for p in sorted(directory.glob(CHUNK_GLOB))} if directory.is_dir() else {}
    problems, intact = [], []
    for name, c in sorted(listed.items(), key=lambda kv: kv[1].first):
        if name not in on_disk:
            problems.append(f"{name} is missing ({steps_text(c.first, c.last)}, {c.rows} rows, listed in {MANIFEST})")
    for name, path in on_disk.items():
        first, last = chunk_range(path)
        try:
            n = pq.read_metadata(path).num_rows
        except Exception as e:  # noqa: BLE001 - any unreadable footer is a damaged file
            problems.append(f"{name} is damaged ({_first_line(e)})")
            continue
        expected = listed[name].rows if name in listed else last - first + 1
        if n != expected or n != last - first + 1:
            problems.append(f"{name} is damaged (holds {n} rows, {steps_text(first, last)} are {last - first + 1})")
            continue
        intact.append(Chunk(name, first, last, n))
    return LogCheck(directory, tuple(intact), tuple(problems))


class StepLog:
    """Buffered, chunked, atomic writer of the per-step log in ``directory``.

    Every chunk written or removed is recorded in ``_manifest.json``
    (:data:`MANIFEST`: file, first and last step, rows; written atomically
    after the chunk), so :func:`check_log` can tell a chunk that was deleted
    or damaged afterwards."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._rows: list[dict] = []

    def check(self) -> LogCheck:
        """:func:`check_log` of this log's folder (the buffered rows are not part of it)."""
        return check_log(self.directory)

    def _record(self, add: Optional[Chunk] = None, remove: tuple[str, ...] = ()) -> None:
        listed = read_manifest(self.directory)
        if listed is None:   # none yet (or a folder from before manifests): what is on disk
            listed = {p.name: Chunk(p.name, *chunk_range(p), chunk_range(p)[1] - chunk_range(p)[0] + 1)
                      for p in self.chunks()}
        for name in remove:
            listed.pop(name, None)
        if add is not None:
            listed[add.file] = add
        write_manifest(self.directory, listed)

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
        self._record(add=Chunk(path.name, first, last, table.num_rows))
        self._rows = []
        return path

    def truncate_after(self, step: int) -> None:
        """Drop every logged row with ``step`` > the given step (resume from a
        checkpoint taken at ``step + 1``); also drops buffered rows."""
        self._rows = [r for r in self._rows if r["step"] <= step]
        listed = read_manifest(self.directory) or {}
        gone = [name for name, c in listed.items() if c.first > step]   # listed, maybe already missing
        for path in self.chunks():
            first, last = chunk_range(path)
            if first > step:
                path.unlink()
                gone.append(path.name)
            elif last > step:
                table = pq.read_table(path, schema=SCHEMA)
                keep = table.filter(pc.less_equal(table["step"], step))
                new = self.directory / f"part-{first:09d}-{step:09d}.parquet"
                write_parquet(keep, new)
                path.unlink()
                self._record(add=Chunk(new.name, first, step, keep.num_rows), remove=(path.name,))
        if gone or not (self.directory / MANIFEST).exists():
            self._record(remove=tuple(gone))
        remove_stale_temporaries(self.directory)

    def last_loss(self) -> Optional[float]:
        """The ``loss`` of the newest logged row (buffered or on disk), None without rows."""
        if self._rows:
            return self._rows[-1]["loss"]
        chunks = self.chunks()
        if not chunks:
            return None
        table = pq.read_table(chunks[-1], columns=["step", "loss"])
        if table.num_rows == 0:
            return None
        losses = table.sort_by("step")["loss"]
        return losses[len(losses) - 1].as_py()

    def last_step(self) -> Optional[int]:
        chunks = self.chunks()
        return int(chunks[-1].stem.split("-")[2]) if chunks else None


def read_steps(directory: str | os.PathLike):
    """The per-step log of one run as a pandas DataFrame sorted by step."""
    import pandas as pd

    directory = Path(directory)
    files = sorted(directory.glob(CHUNK_GLOB))
    if not files:
        return pd.DataFrame({name: pd.Series(dtype=f.type.to_pandas_dtype()) for name, f in zip(SCHEMA.names, SCHEMA)})
    tables = []
    for f in files:
        try:
            tables.append(pq.read_table(f, schema=SCHEMA))
        except Exception as e:  # noqa: BLE001 - name the file, in one line
            raise StepLogError(f"{f}: damaged Parquet chunk ({_first_line(e)})") from None
    table = pa.concat_tables(tables)
    return table.to_pandas().sort_values("step").reset_index(drop=True)


def schema_rows(partitions: bool = True) -> list[dict]:
    """The schema as records (``column``, ``type``, ``unit``, ``meaning``,
    ``where``: ``file`` or ``partition``), for ``eos schema`` and documents."""
    cols = [(c, "file") for c in STEP_COLUMNS] + ([(c, "partition") for c in PARTITION_COLUMNS] if partitions else [])
    return [{"column": c.name, "type": c.type_name, "unit": c.unit, "meaning": c.meaning, "where": where}
            for c, where in cols]
