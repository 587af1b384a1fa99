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


def _mark_subcommands(parser: argparse.ArgumentParser) -> None:
    """Each (sub)command parser records itself as ``_parser``, so that an
    unknown argument is reported with that command's usage (``eos train``),
    not the top-level one."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub.set_defaults(_parser=sub)
                _mark_subcommands(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in AREAS:
        importlib.import_module(module).register(sub)
    _mark_subcommands(parser)
    return parser


def main(argv=None) -> int:
    """Run one command; a user error is one line on stderr and exit status 2
    (argparse's usage errors name the subcommand), Ctrl+C exits with 130."""
    from trainers.config import ConfigError

    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        getattr(args, "_parser", parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.func(args) or 0
    except ConfigError as err:   # a user error that reached here: still one line
        print(f"eos {args.command}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"eos {args.command}: interrupted (run the same command again to continue)", file=sys.stderr)
        return 130
    except BrokenPipeError:   # eos ... | head
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
