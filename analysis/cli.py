"""The analysis commands of ``eos``:

    eos report STUDY_DIR [--out DIR]          HTML report + Markdown summary of a study or run
    eos schema [--format text|markdown|json]  the step dataset's schema (columns, type, unit, meaning)

``register(subparsers)`` adds them to the ``eos`` dispatcher; each sets
``func`` (called with the parsed namespace, returns an exit code).
``python -m analysis.cli report results/<study>`` runs them standalone.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

SCHEMA_FORMATS = ("text", "markdown", "json")


def _report(args: argparse.Namespace) -> int:
    import pyarrow as pa

    from analysis.load import StudyFormatError
    from analysis.report import build_report

    try:
        build_report(args.study_dir, args.out, quiet=args.quiet)
    except (FileNotFoundError, StudyFormatError) as err:
        print(f"eos report: {err}", file=sys.stderr)
        return 2
    except (pa.ArrowException, OSError) as err:   # a damaged Parquet file (its path is in the message)
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"eos report: cannot read the results: {first}", file=sys.stderr)
        return 2
    return 0


def schema_document(fmt: str = "text") -> str:
    """The step dataset's schema (:mod:`trainers.run.steplog`) as text, a
    Markdown table (the README's) or JSON."""
    import pandas as pd

    from analysis.tables import markdown_table
    from trainers.run.steplog import PARTITION_COLUMNS, SCHEMA_VERSION, UNITS, schema_rows

    rows = schema_rows()
    if fmt == "json":
        return json.dumps({"schema_version": SCHEMA_VERSION, "columns": rows, "units": UNITS}, indent=2,
                          ensure_ascii=False)
    frame = pd.DataFrame(rows)
    table = markdown_table(frame, "pipe") if fmt == "markdown" else frame.to_markdown(
        index=False, tablefmt="simple", disable_numparse=True)
    partitions = ", ".join(c.name for c in PARTITION_COLUMNS)
    units = "; ".join(f"{symbol}: {meaning}" for symbol, meaning in UNITS.items())
    return (f"Step log, schema version {SCHEMA_VERSION}: one row per optimizer step, null where not measured. "
            f"The partition columns ({partitions}) come from a study's folder names "
            "(steps/variant=<v>/trial=<id>/part-*.parquet), not from the files.\n\n"
            f"{table}\n\nUnits: {units}.")


def _schema(args: argparse.Namespace) -> int:
    print(schema_document(args.format))
    return 0


def register(subparsers) -> None:
    """Add ``report`` and ``schema`` to an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "report", help="HTML report and Markdown summary of a study or run folder",
        description="Load results/<study> (or a single run folder), compute the edge-of-stability metrics "
                    "per trial and per variant × learning rate, and write report.html (self-contained), "
                    "summary.md, CSV tables and PNG/SVG figures. Works while a study runs or after it was "
                    "interrupted: trials come from the run folders where trials.parquet is missing or older, "
                    "and unfinished trials are marked.")
    p.add_argument("study_dir", help="study folder (steps/, runs/, trials.parquet if it ended) or run folder "
                                     "(config.json, steps/)")
    p.add_argument("--out", default=None, help="output folder (default: STUDY_DIR/report)")
    p.add_argument("--quiet", action="store_true", help="do not print progress and the summary table")
    p.set_defaults(func=_report)

    s = subparsers.add_parser(
        "schema", help="the per-step dataset's schema: columns, type, unit, meaning, version",
        description="Print the schema of the per-step log (trainers/run/steplog.py) that every run writes and "
                    "that a study gathers into one hive-partitioned Parquet dataset (results/<study>/steps).")
    s.add_argument("--format", choices=SCHEMA_FORMATS, default="text",
                   help="text (default), markdown (the README's table) or json")
    s.set_defaults(func=_schema)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.cli", description=__doc__.split("\n")[0])
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
