"""Reproduce the edge of stability on a diffusion U-Net (docs/results.md).

    python -m study.reproduce_eos --data ../shared/data/cifar10-6k.npz --out results/eos-check

1. Pilot: λ₁(H) of the fixed-batch diffusion loss at initialisation (λ₀).
2. Gradient descent on that fixed batch (fixed x₀, t and noise: one
   deterministic objective) at learning rates whose threshold 2/η sits at
   several multiples of λ₀: λ₁ rises (progressive sharpening) past 2/η and,
   after an overshoot in which several eigenvalues exceed 2/η, settles just
   above it (Cohen et al. 2021; docs/results.md).  ``--topk`` records λ₂…λ_k,
   ``--batch-sharpness`` the curvature gᵀHg/‖g‖² along GD's step, which sits
   at 2/η from the onset on.
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
import os
import time
from pathlib import Path

from trainers.config import PRECONDITIONED_OPTIMIZERS, SharpnessConfig, merge, run_config


def base_config(args) -> dict:
    data = ({"name": "npz", "path": args.data, "subset": 5000} if args.data
            else {"name": "synthetic", "synthetic_size": max(args.batch, 64)})
    return {
        "model": {"preset": args.preset, "dropout": 0.0},
        "data": {**data, "image_size": args.image_size, "batch_size": args.batch, "batching": "fixed", "flip": False},
        "sharpness": {"every": args.every, "hessian_batch": args.batch,
                      "block_size": args.block if args.block is not None else max(2, args.topk + 1),
                      "topk": args.topk, "tol": args.tol, "max_iters": 60,
                      "batch_sharpness": args.batch_sharpness, "critical": args.critical},
        "train": {"steps": args.steps, "fixed_noise": True, "checkpoint_every": 10_000, "print_every": 50,
                  "seed": 0, "device": args.device},
    }


def _run(cfg: dict, run_dir: str, seconds: float, threads: int | None = None) -> None:
    import torch

    from trainers.run.loop import train
    from trainers.run.rundir import STOPPED

    if threads:
        torch.set_num_threads(threads)
    start = time.monotonic()
    train(cfg, run_dir, resume=False,
          on_step=lambda row: STOPPED if time.monotonic() - start > seconds else None)


def cpu_threads_per_run(device: str, runs: int) -> int | None:
    """Intra-op threads per run process when ``runs`` runs train at once on
    the CPU (the cores split evenly, at least one each); None on a GPU."""
    from trainers.run.loop import resolve_device

    if resolve_device(device).type != "cpu":
        return None
    return max(1, (os.cpu_count() or 1) // max(runs, 1))


def pilot_lambda(cfg: dict) -> float:
    """λ₁(H) of the fixed-batch objective at initialisation."""
    from trainers.run.loop import Trainer, learning_rate

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
    p.add_argument("--block", type=int, default=None, help="LOBPCG block size (default: max(2, topk + 1))")
    p.add_argument("--topk", type=int, default=1, help="eigenvalues recorded per probe (λ₁ … λ_k)")
    p.add_argument("--tol", type=float, default=SharpnessConfig().tol,
                   help="relative residual at which a λ estimate stops (λ error ≈ tol²)")
    p.add_argument("--batch-sharpness", action="store_true",
                   help="also log gᵀHg/‖g‖², the curvature along the gradient step")
    p.add_argument("--critical", action="store_true",
                   help="also log the critical sharpness 2/η_c (line search along the update) and ΔθᵀHΔθ/Δθᵀg")
    p.add_argument("--minutes", type=float, default=6.0, help="wall-time limit per run")
    p.add_argument("--gd-multiples", type=float, nargs="*", default=[2.0, 4.0],
                   help="GD runs at 2/η = multiple × λ₀")
    p.add_argument("--adam-lrs", type=float, nargs="*", default=[1e-4, 4e-4])
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    if not args.gd_multiples and not args.adam_lrs:
        p.error("nothing to run: give --gd-multiples and/or --adam-lrs")

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
    # CPU runs share the cores: each process's own default (all cores) would
    # oversubscribe the machine len(runs) times over
    threads = cpu_threads_per_run(args.device, len(runs))
    procs = [ctx.Process(target=_run, args=(cfg, str(out / name), args.minutes * 60, threads))
             for name, cfg in runs.items()]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    (out / "pilot.json").write_text(json.dumps({"lambda0": lam0, "runs": list(runs)}, indent=2))
    summarize(out, list(runs))
    return 0


SUBSCRIPT = str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉")


def run_summary(name: str, steps, cfg: dict, status: str) -> dict:
    """One row of the summary table for a run's step log (``steps`` with the
    ``lambda`` column and, where logged, ``topk`` and ``batch_sharpness``).

    Statistics are over the second half of the measured steps (after the
    progressive-sharpening transient): λ₁/threshold, its median on even and
    on odd steps (GD at the edge of stability oscillates with period 2, so a
    probe every 2nd or 4th step sees one phase only), λ₂/threshold, how many
    of the recorded top eigenvalues exceed the threshold, and the curvature
    along the gradient gᵀHg/‖g‖² over the threshold (GD runs)."""
    import numpy as np

    from analysis.metrics import trial_metrics

    lam = steps.dropna(subset=["lambda"])
    tail = lam[lam["step"] >= lam["step"].max() * 0.5]
    ratio = tail["lambda"] / tail["threshold"]
    m = trial_metrics(steps)
    row = {"run": name, "optimizer": cfg["optim"]["name"], "lr": cfg["optim"]["lr"],
           "threshold": float(lam["threshold"].iloc[-1]), "steps": int(steps["step"].max() + 1), "status": status,
           "lambda_start": float(lam["lambda"].iloc[0]),
           "ratio_2nd_half_median": float(ratio.median()),
           "ratio_2nd_half_min": float(ratio.min()), "ratio_2nd_half_max": float(ratio.max()),
           "ratio_even_steps": float(ratio[tail["step"] % 2 == 0].median()),
           "ratio_odd_steps": float(ratio[tail["step"] % 2 == 1].median()),
           **{k: m.get(k) for k in ("onset_step", "frac_near_threshold", "peak_ratio")}}
    if "topk" in tail and tail["topk"].map(lambda v: v is not None and len(v) > 1).all():
        top = np.stack([np.asarray(v, dtype=float) for v in tail["topk"]])
        thr = tail["threshold"].to_numpy(dtype=float)[:, None]
        row["lambda2_ratio_median"] = float(np.median(top[:, 1] / thr[:, 0]))
        row["eigs_above_threshold_median"] = float(np.median((top > thr).sum(axis=1)))
        row["k_recorded"] = int(top.shape[1])
    # gᵀHg/‖g‖² is the curvature of plain H along the gradient step: compared with the threshold of
    # GD (Adam's step is preconditioned, and its threshold applies to P⁻¹H)
    if cfg["optim"]["name"] not in PRECONDITIONED_OPTIMIZERS and "batch_sharpness" in tail and tail["batch_sharpness"].notna().any():
        row["grad_curvature_ratio_median"] = float((tail["batch_sharpness"] / tail["threshold"]).median())
    # 2/η_c (sharpness.critical): against λ₁ for every optimizer, against 2/η (its own threshold: one step raises
    # the loss) for GD only; and the fraction of probes with 2/η_c > 2/η: the update about to be taken raises the loss
    if "lambda_critical" in tail and tail["lambda_critical"].notna().any():
        crit = tail["lambda_critical"]
        row["critical_over_lambda_median"] = float((crit / tail["lambda"]).median())
        if cfg["optim"]["name"] not in PRECONDITIONED_OPTIMIZERS:
            row["critical_ratio_median"] = float((crit / tail["threshold"]).median())
            row["critical_above_threshold"] = float((crit.dropna() > tail.loc[crit.notna(), "threshold"]).mean())
    return row


def summarize(out: Path, names: list[str]) -> None:
    """Figures (λ vs threshold, ratio) and a Markdown table for the runs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import pandas as pd

    from analysis.load import ANALYSIS_COLUMNS, load_run
    from analysis.metrics import with_lambda
    from trainers.run.rundir import RunDir

    rows, frames = [], []
    for name in names:
        study = load_run(out / name, columns=(*ANALYSIS_COLUMNS, "topk"))
        steps = with_lambda(study.steps)
        steps["run"] = name
        frames.append(steps)
        run = RunDir(out / name)
        cfg = run.read_config()
        if steps["lambda"].isna().all():
            print(f"[eos-check] {name}: no λ₁ measured (stopped after {len(steps)} steps)", flush=True)
            continue
        rows.append(run_summary(name, steps, cfg, run.read_status().status))
    if not rows:
        return
    table = pd.DataFrame(rows).round(4)
    (out / "summary.md").write_text(table.to_markdown(index=False) + "\n")
    print(table.to_string(index=False), flush=True)

    data = pd.concat(frames)
    opts = [o for o in ("gd", "adam") if any(n.startswith(o) for n in names)]
    fig, axes = plt.subplots(1, len(opts), figsize=(6 * len(opts), 4.2), squeeze=False)
    for ax, opt in zip(axes[0], opts):
        for i, name in enumerate(n for n in names if n.startswith(opt)):
            d = data[data["run"] == name].dropna(subset=["lambda"])
            color = f"C{i}"
            ax.plot(d["step"], d["lambda"], color=color, linewidth=1.2, label=f"{name}: λ₁")
            top = d["topk"].dropna() if "topk" in d else []
            if len(top) and all(len(v) > 1 for v in top):
                k = min(len(v) for v in top)
                ev = np.stack([np.asarray(v[:k], dtype=float) for v in top])
                for j in range(1, k):
                    ax.plot(d.loc[top.index, "step"], ev[:, j], color=color, linewidth=0.6, alpha=0.6,
                            label=(f"{name}: λ₂" + (f"…λ{str(k).translate(SUBSCRIPT)}" if k > 2 else ""))
                            if j == 1 else None)
            if opt == "gd" and "batch_sharpness" in d and d["batch_sharpness"].notna().any():
                ax.plot(d["step"], d["batch_sharpness"], color=color, linestyle=":", linewidth=1,
                        label=f"{name}: gᵀHg/‖g‖²")
            if "lambda_critical" in d and d["lambda_critical"].notna().any():
                ax.plot(d["step"], d["lambda_critical"], color=color, linestyle="-.", linewidth=0.9, alpha=0.8,
                        label=f"{name}: 2/η_c")
            ax.plot(d["step"], d["threshold"], color=color, linestyle="--", linewidth=1)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("λ(H)" if opt == "gd" else "λ₁(P⁻¹H)")
        ax.set_title(("GD: top eigenvalues vs 2/η (dashed)" if opt == "gd" else "Adam: λ₁(P⁻¹H) vs 38/η (dashed)"))
        ax.legend(fontsize=7)
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
