"""The analysis commands of ``eos``: ``eos report STUDY_DIR [--out DIR]``.

``register(subparsers)`` adds them to the ``eos`` dispatcher; each sets
``func`` (called with the parsed namespace, returns an exit code).
``python -m analysis.cli report results/<study>`` runs them standalone.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def _report(args: argparse.Namespace) -> int:
    from analysis.load import StudyFormatError
    from analysis.report import build_report

    try:
        build_report(args.study_dir, args.out, quiet=args.quiet)
    except (FileNotFoundError, StudyFormatError) as err:
        print(f"eos report: {err}", file=sys.stderr)
        return 2
    return 0


def register(subparsers) -> None:
    """Add ``report`` to an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "report", help="HTML report and Markdown summary of a study or run folder",
        description="Load results/<study> (or a single run folder), compute the edge-of-stability metrics "
                    "per trial and per variant × learning rate, and write report.html (self-contained), "
                    "summary.md, CSV tables and PNG/SVG figures.")
    p.add_argument("study_dir", help="study folder (steps/, trials.parquet) or run folder (config.json, steps/)")
    p.add_argument("--out", default=None, help="output folder (default: STUDY_DIR/report)")
    p.add_argument("--quiet", action="store_true", help="do not print progress and the summary table")
    p.set_defaults(func=_report)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.cli", description=__doc__.split("\n")[0])
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
