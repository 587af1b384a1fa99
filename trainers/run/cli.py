"""Single-trial command line: ``eos train`` (and ``python -m trainers.run.cli``).

Keeps the reference repository's flags: ``--base --edm --vparam --snr --pd
--adap_s --stf`` choose variants (several at once run one trial each) and
``--lr`` the learning rate(s); without ``--lr`` the sweep 1e-3, 5e-4, 1e-4
runs.  Everything else comes from ``--config FILE`` (YAML/JSON, a RunConfig
mapping; a study spec's run sections are used, the rest ignored) and
``--set section.key=value`` overrides, in that order.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import textwrap
from pathlib import Path

import yaml

from trainers.config import ConfigError, RunConfig, merge, read_yaml, run_config
from trainers.diffusion.variants import VARIANTS
from trainers.run.preflight import check_run_inputs
from trainers.run.rundir import RunDir, RunFolderError, trial_id
from trainers.run.steplog import StepLogError

DEFAULT_LRS = (1e-3, 5e-4, 1e-4)
#: the RunConfig sections (what --config takes from a study spec)
RUN_SECTIONS = tuple(f.name for f in dataclasses.fields(RunConfig))


def parse_override(text: str) -> dict:
    """``optim.lr=1e-3`` -> {"optim": {"lr": 0.001}} (the value is read as YAML)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    key, value = text.split("=", 1)
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    try:
        node[parts[-1]] = yaml.safe_load(value)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({problem})") from None
    return out


def load_config_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config: no such file {path!r}")
    data = read_yaml(p, "--config") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path!r} must hold a mapping")
    if "study" in data:   # a study spec (study/presets/*.yaml): its run sections, its optimizer
        optimizer = (data.get("study") or {}).get("optimizer")
        data = {k: v for k, v in data.items() if k in RUN_SECTIONS}
        if optimizer:
            data = merge(data, {"optim": {"name": optimizer}})
    return data


#: measured cost of the built-in default trial (bench/RESULTS.md, "default single trial")
DEFAULT_TRIAL_COST = ("on a 2-core CPU: first step after ~8 s, done in about 1-1.5 min "
                      "(more when the machine is busy)")


def defaults_text() -> str:
    """What a run without --config trains, read from trainers/config.py's defaults."""
    cfg = run_config()
    sharp = cfg.sharpness
    return textwrap.fill(f"Without --config a trial uses the built-in default (trainers/config.py): the {cfg.model.preset} "
            f"U-Net, {cfg.data.name} {cfg.data.image_size} px images, batch {cfg.data.batch_size}, "
            f"{cfg.optim.name}, {cfg.train.steps} steps, λ₁ of the preconditioned Hessian "
            f"{'every step' if sharp.every == 1 else f'every {sharp.every} steps'} on a frozen batch of {sharp.hessian_batch} examples"
            f"{' (plus plain λ₁(H))' if sharp.plain_lambda else ''}; {DEFAULT_TRIAL_COST}. "
            f"Larger runs: --config FILE (e.g. examples/my-run.yaml, or a study preset such as "
            f"study/presets/paper.yaml, whose run sections are used) and --set.", 79)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("variants (reference flags; several run one trial each)")
    for name in VARIANTS:
        group.add_argument(f"--{name}", action="append_const", const=name, dest="variants",
                           help=f"train the {name!r} variant")
    p.add_argument("--lr", type=float, action="append", dest="lrs",
                   help=f"learning rate (repeatable); default: the sweep {', '.join(map(str, DEFAULT_LRS))}")
    p.add_argument("--config", help="YAML/JSON file with a run config (sections: model, data, schedule, "
                                    "optim, variant, sharpness, eval, train)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set train.steps=200 --set data.name=npz")
    p.add_argument("--steps", type=int, help="shorthand for --set train.steps=N")
    p.add_argument("--out", default="results/runs",
                   help="folder that receives one run folder per trial, <variant>_lr<lr>_s<seed>")
    p.add_argument("--fresh", action="store_true", help="start over instead of resuming an existing run folder")


def run_train(args: argparse.Namespace) -> int:
    from trainers.run.loop import train

    try:
        base = load_config_file(args.config) if args.config else {}
        for text in args.set:
            base = merge(base, parse_override(text))
        if args.steps is not None:
            base = merge(base, {"train": {"steps": args.steps}})
        variants = args.variants or [base.get("variant", {}).get("name", "base")]
        lrs = args.lrs or ([base["optim"]["lr"]] if "lr" in base.get("optim", {}) else list(DEFAULT_LRS))
        configs = []
        for variant in variants:
            for lr in lrs:
                cfg = run_config(merge(base, {"variant": {"name": variant}, "optim": {"lr": lr}}))
                configs.append(cfg)
    except ConfigError as e:
        print(f"eos train: invalid config: {e}", file=sys.stderr)
        return 2
    try:   # every trial's data, Inception weights and device, before any run folder is touched
        for cfg in configs:
            check_run_inputs(cfg)
    except ConfigError as e:
        print(f"eos train: {e}", file=sys.stderr)
        return 2
    results = []
    for i, cfg in enumerate(configs, 1):
        name = trial_id(cfg.variant.name, cfg.optim.lr, cfg.train.seed)
        print(f"[eos] trial {i}/{len(configs)}: {name}", flush=True)
        try:
            results.append(train(cfg, Path(args.out) / name, resume=not args.fresh))
        except (ConfigError, FileNotFoundError, RunFolderError, StepLogError) as e:
            # bad config, missing data or Inception weights, a run folder that cannot be resumed
            print(f"eos train: {e}", file=sys.stderr)
            return 2
    print(json.dumps([{"trial": r.run_dir.name, "status": r.status, "steps": r.steps_done,
                       "final_loss": r.final_loss} for r in results], indent=1))
    return 0


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1; got {value}")
    return value


def add_sample_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a run folder written by eos train")
    p.add_argument("--n", type=positive_int, default=64, help="number of images")
    p.add_argument("--sampler", choices=["ddpm", "ddim", "heun", "dpmpp2m"], help="default: the run's eval.sampler")
    p.add_argument("--sampler-steps", type=positive_int, help="default: the run's eval.sampler_steps")
    p.add_argument("--out", help="PNG path (default: RUN_DIR/samples/final-<sampler>.png)")


def run_sample(args: argparse.Namespace) -> int:
    from trainers.run.loop import Trainer, generate_samples
    from trainers.diffusion.samplers import save_grid

    run = RunDir(args.run_dir)
    try:
        cfg_dict = run.read_config()
    except (OSError, ValueError) as err:   # a damaged config.json
        print(f"eos sample: {run / 'config.json'} is not readable ({type(err).__name__})", file=sys.stderr)
        return 2
    if cfg_dict is None:
        print(f"eos sample: {run} has no config.json (not a run folder)", file=sys.stderr)
        return 2
    if args.sampler:
        cfg_dict["eval"]["sampler"] = args.sampler
    if args.sampler_steps is not None:
        cfg_dict["eval"]["sampler_steps"] = args.sampler_steps
    cfg_dict["sharpness"]["every"] = 0
    try:
        trainer = Trainer(run_config(cfg_dict))
    except ConfigError as err:
        print(f"eos sample: {err}", file=sys.stderr)
        return 2
    if not trainer.resume(run):   # sharpness.every = 0: the checkpoint's probe state is ignored
        print(f"eos sample: {run} has no checkpoint yet", file=sys.stderr)
        return 2
    images = generate_samples(trainer, args.n)
    out = Path(args.out) if args.out else run.samples / f"final-{trainer.cfg.eval.sampler}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    save_grid(images, out)
    print(f"[eos] {args.n} samples (EMA weights, step {trainer.step}, {trainer.cfg.eval.sampler}) -> {out}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train single trials (one per variant × lr)",
                              description=__doc__, epilog=defaults_text(),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(p)
    p.set_defaults(func=run_train)
    p = subparsers.add_parser("sample", help="draw a sample grid from a run's EMA weights")
    add_sample_arguments(p)
    p.set_defaults(func=run_sample)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainers.run.cli", description=__doc__,
                                     epilog=defaults_text(), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(parser)
    return run_train(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
