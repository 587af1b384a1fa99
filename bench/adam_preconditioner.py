"""λ₁(P⁻¹H)/threshold of Adam under the two preconditioner conventions, at the same parameters.

    python -m bench.adam_preconditioner [--preset tiny] [--image-size 16] [--batch 16] [--lr 1e-3]
                                        [--report 0 1 2 3 5 10 20 50] [--tol 1e-3] [--device cpu]

One Adam training run (``base`` variant, synthetic data, β = (0.9, 0.999),
dropout off; the loop's own :class:`~trainers.run.loop.Trainer`, its draws
and its frozen Hessian batch) per learning rate.  At each ``--report`` step,
after the step's backward pass and clipping and before its update, as the
loop probes, two probes measure λ₁(P⁻¹H) at the same parameters:
``update`` (the P of the update being taken, P = (1 − β₁ᵗ⁺¹)(√v̂ₜ₊₁ + ε),
Cohen et al. 2022) and ``init2winit`` (√v̂ₜ + ε of the state before the
step).  Prints one Markdown table: the ratio λ₁(P⁻¹H) / (38/η) per step and
convention ("—": init2winit has no P before the first step).
"""
from __future__ import annotations

import sys
from datetime import datetime, timezone

CONVENTIONS = ("update", "init2winit")


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, nargs="+", default=[1e-3])
    p.add_argument("--report", type=int, nargs="+", default=[0, 1, 2, 3, 5, 10, 20, 50])
    p.add_argument("--tol", type=float, default=1e-3, help="sharpness.tol")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    import torch

    from trainers.config import merge, run_config
    from trainers.curvature.probe import SharpnessProbe
    from trainers.diffusion.unet import probe_mode
    from trainers.run.loop import Trainer, learning_rate
    from trainers.run.rng import seed_dropout

    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}; "
          f"python -m bench.adam_preconditioner {' '.join(sys.argv[1:] if argv is None else argv)}\n")
    header = "| lr | P | " + " | ".join(f"step {s}" for s in args.report) + " |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1), flush=True)
    for lr in args.lr:
        base = {
            "model": {"preset": args.preset, "dropout": 0.0},
            "variant": {"name": "base"},
            "data": {"name": "synthetic", "image_size": args.image_size, "batch_size": args.batch,
                     "synthetic_size": max(4 * args.batch, 256)},
            "optim": {"name": "adam", "lr": lr},
            "sharpness": {"every": 0, "hessian_batch": args.batch, "plain_lambda": False, "tol": args.tol},
            "train": {"steps": max(args.report) + 1, "seed": args.seed, "device": args.device},
        }
        cfg = run_config(base)
        trainer = Trainer(cfg)
        probes = {c: SharpnessProbe(run_config(merge(base, {"sharpness": {"adam_preconditioner": c}})).sharpness,
                                    cfg.optim) for c in CONVENTIONS}
        ratios: dict[str, list] = {c: [] for c in CONVENTIONS}
        for step in range(max(args.report) + 1):
            # one step of the loop (trainers.run.loop.train_step), the probes where it probes
            lr_step = learning_rate(cfg, step)
            for group in trainer.optimizer.param_groups:
                group["lr"] = lr_step
            draws = trainer.draws(step)
            seed_dropout(cfg.train.seed, step)
            trainer.optimizer.zero_grad(set_to_none=True)
            total = sum(len(d) for d in draws)
            for d in draws:
                (trainer.variant.loss(trainer.model, d).float().mean() * (len(d) / total)).backward()
            if cfg.optim.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(trainer.params, cfg.optim.grad_clip)
            if step in args.report:
                grads = [q.grad for q in trainer.params]
                loss = trainer.probing.loss(trainer.model, trainer.probing.hessian_draw(step))
                with probe_mode(trainer.model):
                    for c, probe in probes.items():
                        cols = probe.measure(trainer.model, loss, trainer.optimizer, lr_step, grads=grads)
                        ratios[c].append(cols["ratio"])
            trainer.optimizer.step()
            trainer.step = step + 1
        for c in CONVENTIONS:
            cells = ["—" if r is None else f"{r:.4g}" for r in ratios[c]]
            print(f"| {lr:g} | {c} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
