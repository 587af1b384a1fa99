"""``eos study``: sweeps of variants × learning rates × seeds with Ray Tune.

    eos study run SPEC [--name NAME] [--set KEY=VALUE ...] [--address auto] [--resume] [--dry-run]
    eos study resume STUDY_DIR_OR_NAME [--address auto]
    eos study merge OUT PART [PART ...] [--replace]

SPEC is a YAML file or a preset name (smoke, paper, optuna, boundary; study/presets/).
Without ``--address`` a local Ray instance runs the trials (no dashboard);
``--address auto`` (or HOST:PORT) runs them on an existing Ray cluster.
Results: results/<name>/{study.json, trials.parquet, steps/variant=*/trial=*/}.
"""
from __future__ import annotations

import argparse
import sys

EPILOG = """spec format (see study/spec.py and study/presets/):
  study:      name, variants, optimizer, seeds, objective (final_loss | fid | largest_stable_lr),
              storage, max_failures, variant_options
  search:     algorithm (grid | optuna | boundary),
              lr ({grid: [...]} | {log_uniform: [low, high]} | {bracket: [low, high]}),
              num_samples (optuna, per variant and seed), seed (optuna),
              boundary: {k (trials per round per variant and seed), factor (stop at hi/lo <= factor)}
  resources:  cpu, gpu (fractional, e.g. 0.25), max_concurrent
  early_stop: loss_blowup, ratio_above, ratio_steps, edge_delta, edge_steps
  trackers:   every (report to Tune every N steps), mlflow, tensorboard, wandb (Tune's tracker callbacks,
              pip install -e .[tracking]); or a list of names: [mlflow, tensorboard]
  model, data, schedule, optim, variant, sharpness, eval, train: the base run config of every trial
"""


def _run(args: argparse.Namespace) -> int:
    from study.spec import load_spec
    from trainers.run.cli import parse_override
    from trainers.config import ConfigError

    try:
        spec = load_spec(args.spec, name=args.name, overrides=[parse_override(t) for t in args.set])
    except ConfigError as e:
        print(f"eos study run: invalid spec: {e}", file=sys.stderr)
        return 2
    misfit = None
    if not args.address:   # this machine runs the trials: one trial must fit on it (GPUs, CPUs)
        try:
            check_local_resources(spec, args.num_cpus)
        except ConfigError as e:
            misfit = str(e)
    if args.dry_run:
        return _print_plan(spec, misfit)
    if misfit:
        print(f"eos study run: {misfit}", file=sys.stderr)
        return 2
    from study.runner import run_study, summary
    from trainers.run.atomic import DiskFull

    try:
        outcome = run_study(spec, address=args.address, num_cpus=args.num_cpus, autoscale=args.autoscale,
                            verbose=args.verbose, resume=args.resume)
    except ConfigError as e:
        print(f"eos study run: {e}", file=sys.stderr)
        return 2
    except DiskFull as e:
        print(f"eos study run: {e.strerror}", file=sys.stderr)
        return 1
    print(summary(outcome), flush=True)
    return 0 if outcome.complete and not outcome.errors else 1


def check_local_resources(spec, num_cpus=None) -> None:
    """Fail when one trial of ``spec`` does not fit on this machine (the
    local Ray instance gets its GPUs and ``num_cpus`` or all its CPUs)."""
    import os

    import torch

    from study.runner import check_resources
    from trainers.run.preflight import check_device

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    key = spec.study
    check_device(spec.run_config(key.variants[0], 1e-3, key.seeds[0]))   # an explicit train.device: cuda
    node = {"Alive": True, "Resources": {"CPU": float(num_cpus or os.cpu_count() or 1), "GPU": float(gpus)}}
    check_resources(spec.resources, [node], cluster=False)


def _resume(args: argparse.Namespace) -> int:
    from study.runner import resume_study, summary
    from trainers.config import ConfigError
    from trainers.run.atomic import DiskFull

    try:
        outcome = resume_study(args.study, address=args.address, num_cpus=args.num_cpus,
                               autoscale=args.autoscale, verbose=args.verbose)
    except ConfigError as e:
        print(f"eos study resume: {e}", file=sys.stderr)
        return 2
    except DiskFull as e:
        print(f"eos study resume: {e.strerror}", file=sys.stderr)
        return 1
    print(summary(outcome), flush=True)
    return 0 if outcome.complete and not outcome.errors else 1


def _merge(args: argparse.Namespace) -> int:
    from study.merge import MergeError, merge_studies

    try:
        merged = merge_studies(args.out, args.parts, replace=args.replace)
    except MergeError as e:
        print(f"eos study merge: {e}", file=sys.stderr)
        return 2
    parts = merged.groupby("part", sort=False).size()
    print(f"merged {len(merged)} trials into {args.out} ("
          + ", ".join(f"{name}: {n}" for name, n in parts.items()) + f"); eos report {args.out}")
    return 0


def _print_plan(spec, misfit=None) -> int:
    """The dry run: what would run (``misfit``: why one trial cannot run on this machine)."""
    if misfit and "train.device" in misfit:
        print(f"eos study run: {misfit}", file=sys.stderr)
        return 2
    print(f"study {spec.name} -> {spec.study_dir}")
    existing = _existing_folder(spec)
    if existing:
        print(f"  {existing}")
    if misfit:
        print(f"  not on this machine: {misfit}")
    at_most = "at most " if spec.search.algorithm == "boundary" else ""
    print(f"  {at_most}{spec.num_trials()} trials, search {spec.search.algorithm}, objective {spec.study.objective} "
          f"({spec.mode}), {spec.resources.cpu:g} CPU + {spec.resources.gpu:g} GPU per trial, "
          f"at most {spec.resources.max_concurrent} at once")
    if 0 < spec.resources.gpu < 1:
        from study.mps import plan
        from trainers.config import ConfigError

        try:   # on this machine; with --address each node of the cluster starts its own daemon
            print(f"  on this machine: {plan(spec.resources.mps, spec.resources.gpu, cluster=False).reason}")
        except ConfigError as e:
            print(f"  on this machine: {e}")
    every = spec.trackers.every
    print(f"  trials report to Tune {f'every {every} steps' if every else 'at checkpoints and the end'}; "
          f"trackers: {', '.join(spec.trackers.enabled) or 'none'}")
    if spec.search.algorithm == "grid":
        for key in spec.grid_trials():
            print(f"  {key.trial_id}")
    elif spec.search.algorithm == "boundary":
        _print_boundary_plan(spec)
    else:
        low, high = spec.search.lr.log_uniform
        for v in spec.study.variants:
            for s in spec.study.seeds:
                print(f"  {v} seed {s}: {spec.search.num_samples} TPE trials, lr in [{low:g}, {high:g}] (log)")
    return 0


def _existing_folder(spec) -> str | None:
    """What the dry run says about a study folder that already exists (None: it does not)."""
    import json

    from study.layout import StudyLayout

    layout = StudyLayout(spec.study_dir)
    if not layout.root.exists():
        return None
    if not layout.study_json.is_file():
        return f"the folder {layout.root} exists but holds no study (study.json); the run will use it"
    try:
        stored = json.loads(layout.study_json.read_text()).get("spec")
    except (OSError, ValueError):
        return f"the folder {layout.root} exists, its study.json is not readable: choose another --name"
    if stored != spec.to_dict():
        return (f"the folder {layout.root} already holds a study {spec.name!r} with a different spec: "
                "`eos study run` will refuse; choose another --name")
    done = 0
    for run in layout.run_dirs():
        try:
            done += bool((run.read_status() or _NotEnded).ended)
        except (OSError, ValueError, KeyError, TypeError):   # a damaged status.json: not counted
            pass
    return (f"the folder {layout.root} already holds this study ({done} trial(s) ended): "
            f"`eos study run ... --resume` or `eos study resume {layout.root}` continues it")


class _NotEnded:
    ended = False


def _print_boundary_plan(spec) -> None:
    from study.boundary import k_section, max_trials, rounds_needed

    low, high = spec.search.lr.bracket
    k, factor = spec.search.boundary.k, spec.search.boundary.factor
    rounds = rounds_needed(low, high, k, factor)
    first = ", ".join(f"{lr:.4g}" for lr in k_section(low, high, k))
    print(f"  per variant and seed: k-section of lr in [{low:g}, {high:g}] (log), {k} trial(s) per round in "
          f"parallel, until smallest unstable / largest stable lr <= {factor:g}: {rounds} rounds "
          f"(+1 trial if an end of the bracket is still only assumed), at most "
          f"{max_trials(low, high, k, factor)} trials; first round: lr {first}")
    rules = ["NaN/inf loss, or a loss above train.divergence_loss"] + spec.early_stop.describe()
    print("  a trial is unstable when it diverges, i.e. when one of these ends it (else stable):")
    for rule in rules:
        print(f"    - {rule}")
    for v in spec.study.variants:
        for s in spec.study.seeds:
            print(f"  {v} seed {s}: bracket [{low:g}, {high:g}]")
    from study.layout import StudyLayout

    print(f"  state: {StudyLayout(spec.study_dir).boundary_state}")


def _add_cluster_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None,
                   help="Ray cluster to run on ('auto', or HOST:PORT of the head); default: a local Ray instance")
    p.add_argument("--num-cpus", type=int, default=None,
                   help="CPUs of the local Ray instance (default: all); ignored with --address")
    p.add_argument("--autoscale", action="store_true",
                   help="on a cluster, do not fail when no node fits a trial yet (the autoscaler adds nodes)")
    p.add_argument("--verbose", type=int, nargs="?", const=1, default=None, choices=(0, 1, 2),
                   help="default (no --verbose): one concise progress line per trial start/end and every 10 s "
                        "(trials done/running/diverged, steps/s, ETA, λ₁/threshold per running trial), Ray's "
                        "own messages off; --verbose (= 1): Ray Tune's status table, Ray's warnings and the "
                        "trials' own output; 2: every result; 0: silent")


def register(subparsers) -> None:
    p = subparsers.add_parser("study", help="Ray Tune / Optuna sweeps over variants × learning rates",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="study_command", required=True, metavar="ACTION")

    run = sub.add_parser("run", help="validate a spec and run its trials", description=__doc__,
                         epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("spec", help="study spec YAML, or a preset name (smoke, paper, optuna, boundary)")
    run.add_argument("--name", default=None, help="study name (default: study.name of the spec)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a spec value, e.g. --set train.steps=200 --set 'search.lr.grid=[1e-3]'")
    run.add_argument("--dry-run", action="store_true", help="validate and list the trials, run nothing")
    run.add_argument("--resume", action="store_true",
                     help="if the study folder already holds this spec, continue it (done trials are kept), "
                          "else start it: the same command can run again (the README's, resubmitted batch jobs)")
    _add_cluster_arguments(run)
    run.set_defaults(func=_run)

    resume = sub.add_parser("resume", help="continue an interrupted study",
                            description="Continue an interrupted study: unfinished and errored trials resume "
                                        "from their checkpoints, trials not yet started start.")
    resume.add_argument("study", help="study folder (results/<name>) or name under results/")
    _add_cluster_arguments(resume)
    resume.set_defaults(func=_resume)

    merge = sub.add_parser("merge", help="one study folder for eos report from studies run in parts",
                           description="Merge studies run in parts (e.g. a subset of variants per GPU session, "
                                       "each with its own --name) into one folder that eos report reads: "
                                       "their step datasets, run folders without checkpoints and trials "
                                       "tables.  The merged folder is for reading; resume the parts.")
    merge.add_argument("out", help="the merged study folder (new, or an earlier merge with --replace)")
    merge.add_argument("parts", nargs="+", help="study folders to merge (each with trials.parquet and steps/)")
    merge.add_argument("--replace", action="store_true", help="overwrite OUT if it is an earlier merge")
    merge.set_defaults(func=_merge)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m study.commands")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
