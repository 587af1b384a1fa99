"""Reproduce the edge of stability on a diffusion U-Net (docs/results.md).

    python -m study.reproduce_eos --data ../shared/data/cifar10-6k.npz --out results/eos-check

1. Pilot: λ₁(H) of the fixed-batch diffusion loss at initialisation (λ₀).
2. Gradient descent on that fixed batch (fixed x₀, t and noise: one
   deterministic objective) at learning rates whose threshold 2/η sits at
   several multiples of λ₀: λ₁ rises (progressive sharpening) until it
   reaches 2/η and then hovers there (Cohen et al. 2021).
3. Adam on the same objective: λ₁(P⁻¹H) settles near 38/η (Cohen et al. 2022).

All runs go in parallel processes on one device, each stopped at ``--minutes``
of wall time or ``--steps`` steps, whichever comes first; every run folder is
a normal ``eos train`` run (config.json, status.json, steps/).  Figures and a
Markdown table of per-run EoS metrics are written to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from pathlib import Path

from trainers.config import merge, run_config


def base_config(args) -> dict:
    data = ({"name": "npz", "path": args.data, "subset": 5000} if args.data
            else {"name": "synthetic", "synthetic_size": max(args.batch, 64)})
    return {
        "model": {"preset": args.preset, "dropout": 0.0},
        "data": {**data, "image_size": args.image_size, "batch_size": args.batch, "batching": "fixed", "flip": False},
        "sharpness": {"every": args.every, "hessian_batch": args.batch, "block_size": args.block, "topk": 1,
                      "tol": 1e-3, "max_iters": 60},
        "train": {"steps": args.steps, "fixed_noise": True, "checkpoint_every": 10_000, "print_every": 50,
                  "seed": 0, "device": args.device},
    }


def _run(cfg: dict, run_dir: str, seconds: float) -> None:
    from trainers.loop import train

    start = time.monotonic()
    train(cfg, run_dir, resume=False,
          on_step=lambda row: "stopped" if time.monotonic() - start > seconds else None)


def pilot_lambda(cfg: dict) -> float:
    """λ₁(H) of the fixed-batch objective at initialisation."""
    from trainers.loop import Trainer, learning_rate

    trainer = Trainer(run_config(merge(cfg, {"optim": {"name": "gd", "lr": 1.0},
                                             "sharpness": {"tol": 1e-4, "max_iters": 200}})))
    row = trainer.measure_sharpness(0, learning_rate(trainer.cfg, 0), trainer.draws(0)[0])
    return float(row["lambda_max"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="npz of uint8 images (default: built-in synthetic data)")
    p.add_argument("--out", default="results/eos-check")
    p.add_argument("--preset", default="small")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--every", type=int, default=5, help="probe λ₁ every N steps")
    p.add_argument("--block", type=int, default=2, help="LOBPCG block size")
    p.add_argument("--minutes", type=float, default=6.0, help="wall-time limit per run")
    p.add_argument("--gd-multiples", type=float, nargs="+", default=[2.0, 4.0],
                   help="GD runs at 2/η = multiple × λ₀")
    p.add_argument("--adam-lrs", type=float, nargs="+", default=[1e-4, 4e-4])
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = base_config(args)
    run_config(base)  # validate before launching anything
    lam0 = pilot_lambda(base)
    print(f"[eos-check] λ₁ at initialisation: {lam0:.4g}", flush=True)

    runs = {}
    for m in args.gd_multiples:
        lr = 2.0 / (m * lam0)
        runs[f"gd-lr{lr:.3g}"] = merge(base, {"optim": {"name": "gd", "lr": lr}})
    for lr in args.adam_lrs:
        runs[f"adam-lr{lr:g}"] = merge(base, {"optim": {"name": "adam", "lr": lr}})
    for cfg in runs.values():
        run_config(cfg)

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_run, args=(cfg, str(out / name), args.minutes * 60)) for name, cfg in runs.items()]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    (out / "pilot.json").write_text(json.dumps({"lambda0": lam0, "runs": list(runs)}, indent=2))
    summarize(out, list(runs))
    return 0


def summarize(out: Path, names: list[str]) -> None:
    """Figures (λ vs threshold, ratio) and a Markdown table for the runs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from analysis.load import load_run
    from analysis.metrics import trial_metrics, with_lambda
    from analysis.report import markdown_table

    rows, frames = [], []
    for name in names:
        study = load_run(out / name)
        steps = with_lambda(study.steps)
        steps["run"] = name
        frames.append(steps)
        m = trial_metrics(study.steps)
        cfg = json.loads((out / name / "config.json").read_text())
        lam = steps.dropna(subset=["lambda"])
        if lam.empty:
            print(f"[eos-check] {name}: no λ₁ measured (stopped after {len(steps)} steps)", flush=True)
            continue
        tail = lam[lam["step"] >= lam["step"].max() * 0.5]
        rows.append({"run": name, "optimizer": cfg["optim"]["name"], "lr": cfg["optim"]["lr"],
                     "threshold": float(lam["threshold"].iloc[-1]), "steps": int(steps["step"].max() + 1),
                     "status": json.loads((out / name / "status.json").read_text())["status"],
                     "lambda_start": float(lam["lambda"].iloc[0]),
                     "ratio_2nd_half_median": float((tail["lambda"] / tail["threshold"]).median()),
                     **{k: m.get(k) for k in ("onset_step", "fraction_near_threshold", "peak_ratio")}})
    if not rows:
        return
    table = pd.DataFrame(rows).round(4)
    (out / "summary.md").write_text(markdown_table(table))
    print(table.to_string(index=False), flush=True)

    data = pd.concat(frames)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, opt in zip(axes, ("gd", "adam")):
        for i, name in enumerate(n for n in names if n.startswith(opt)):
            d = data[data["run"] == name].dropna(subset=["lambda"])
            color = f"C{i}"
            ax.plot(d["step"], d["lambda"], color=color, label=name)
            ax.plot(d["step"], d["threshold"], color=color, linestyle="--", linewidth=1)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("λ₁(H)" if opt == "gd" else "λ₁(P⁻¹H)")
        ax.set_title(("GD: λ₁ vs 2/η (dashed)" if opt == "gd" else "Adam: λ₁(P⁻¹H) vs 38/η (dashed)"))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "eos_lambda.png", dpi=120)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, name in enumerate(names):
        d = data[data["run"] == name].dropna(subset=["lambda"])
        ax.plot(d["step"], d["lambda"] / d["threshold"], label=name, color=f"C{i}")
    ax.axhline(1.0, color="k", linewidth=1)
    ax.axhspan(0.9, 1.1, color="0.85", zorder=0)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("λ₁ / threshold")
    ax.set_title("Threshold-normalised sharpness")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "eos_ratio.png", dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
