"""Single-trial command line: ``eos train`` (and ``python -m trainers.run.cli``).

Keeps the reference repository's flags: ``--base --edm --vparam --snr --pd
--adap_s --stf`` choose variants (several at once run one trial each) and
``--lr`` the learning rate(s); without ``--lr`` the sweep 1e-3, 5e-4, 1e-4
runs.  Everything else comes from ``--config FILE`` (YAML/JSON, a RunConfig
mapping) and ``--set section.key=value`` overrides, in that order.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from trainers.config import ConfigError, merge, run_config
from trainers.diffusion.variants import VARIANTS
from trainers.run.rundir import RunDir, RunFolderError, trial_id
from trainers.run.steplog import StepLogError

DEFAULT_LRS = (1e-3, 5e-4, 1e-4)


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
    node[parts[-1]] = yaml.safe_load(value)
    return out


def load_config_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config: no such file {path!r}")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path!r} must hold a mapping")
    return data


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


def add_sample_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a run folder written by eos train")
    p.add_argument("--n", type=int, default=64, help="number of images")
    p.add_argument("--sampler", choices=["ddpm", "ddim", "heun", "dpmpp2m"], help="default: the run's eval.sampler")
    p.add_argument("--sampler-steps", type=int, help="default: the run's eval.sampler_steps")
    p.add_argument("--out", help="PNG path (default: RUN_DIR/samples/final-<sampler>.png)")


def run_sample(args: argparse.Namespace) -> int:
    from trainers.run.loop import Trainer, generate_samples
    from trainers.diffusion.samplers import save_grid

    run = RunDir(args.run_dir)
    cfg_dict = run.read_config()
    if cfg_dict is None:
        print(f"eos sample: {run} has no config.json (not a run folder)", file=sys.stderr)
        return 2
    if args.sampler:
        cfg_dict["eval"]["sampler"] = args.sampler
    if args.sampler_steps:
        cfg_dict["eval"]["sampler_steps"] = args.sampler_steps
    cfg_dict["sharpness"]["every"] = 0
    trainer = Trainer(run_config(cfg_dict))
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
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(p)
    p.set_defaults(func=run_train)
    p = subparsers.add_parser("sample", help="draw a sample grid from a run's EMA weights")
    add_sample_arguments(p)
    p.set_defaults(func=run_sample)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainers.run.cli", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(parser)
    return run_train(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
