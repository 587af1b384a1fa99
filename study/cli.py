"""The ``eos`` command: one entry point, one subcommand per area.

    eos train   ...   single trials (trainers.run.cli)
    eos sample  ...   sample grid from a run's EMA weights (trainers.run.cli)
    eos study   ...   Ray Tune / Optuna sweeps (study.commands)
    eos report  ...   EoS report of a study (analysis.cli)
    eos schema  ...   the per-step dataset's schema (analysis.cli)
"""
from __future__ import annotations

import argparse
import importlib
import sys

AREAS = ("trainers.run.cli", "study.commands", "analysis.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in AREAS:
        importlib.import_module(module).register(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
