"""Trials to find a known stability boundary: the boundary search against TPE on ``largest_stable_lr``.

    python bench/boundary_vs_tpe.py [--boundaries 12] [--seeds 3] [--cap 200] [--slots 1] [--factor 1.1]

Each run is one (variant, seed) whose trials are stable iff lr < b, for
``--boundaries`` values of b spread log-evenly over [10^-4.5, 10^-1.5]
inside the search range [1e-5, 1e-1].  Both searchers are the study's own
Tune searchers, driven by the same hand-written Tune loop with ``--slots``
trials running at once (each completes in suggestion order):

* ``boundary k=K``: :class:`study.boundary.BoundarySearch`, bracket [1e-5,
  1e-1], stopping at hi/lo ≤ factor; its count is the trials it ran.
* ``TPE``: :class:`study.search.PerVariantSearch` (Optuna's seeded TPE over
  log-uniform lr, ``--seeds`` sampler seeds) on the objective
  ``largest_stable_lr`` (lr if stable, else 0), given ``--cap`` trials.  Two
  counts: trials until the best value (largest stable lr) is within the
  factor of b (b / best ≤ factor: what the study's "best trial" reports),
  and until the tried lrs bracket b within the factor (smallest unstable /
  largest stable ≤ factor: the boundary search's own stopping rule).  A run
  that does not get there within the cap counts as the cap and is listed.

Every trial takes one time unit, so "time" is the search's length in trial
durations (rounds, for the boundary search).  Prints one table (median, 90th
percentile, max, median time, runs not reached) and the command line; no
wall-clock time is measured.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from datetime import date
from pathlib import Path

import numpy as np

LOW, HIGH = 1e-5, 1e-1


def make_spec(storage: str, algorithm: str, k: int = 1, factor: float = 1.1, cap: int = 200, seed: int = 0):
    from study.spec import spec_from_dict

    search = ({"algorithm": "boundary", "lr": {"bracket": [LOW, HIGH]}, "boundary": {"k": k, "factor": factor}}
              if algorithm == "boundary" else
              {"algorithm": "optuna", "lr": {"log_uniform": [LOW, HIGH]}, "num_samples": cap, "seed": seed})
    return spec_from_dict({
        "study": {"name": "bench", "variants": ["base"], "seeds": [0], "storage": storage,
                  "objective": "largest_stable_lr"},
        "search": search,
        "model": {"preset": "tiny"}, "data": {"name": "synthetic", "image_size": 16},
        "sharpness": {"every": 0}, "train": {"steps": 1}}, check_files=False)


def drive(searcher, boundary: float, slots: int, cap: int) -> list[tuple[float, bool, int]]:
    """The Tune loop: keep ``slots`` trials running, every trial taking one time unit (so the oldest
    completes first); returns (lr, stable, completion time) in completion order."""
    running, done, n, now = [], [], 0, 0
    while len(done) < cap:
        while len(running) < slots and n < cap:
            config = searcher.suggest(f"t{n}")
            if config is None or config == searcher.FINISHED:
                break
            running.append((f"t{n}", config, now))
            n += 1
        if not running:
            break
        tid, config, started = running.pop(0)
        now = started + 1
        stable = config["lr"] < boundary
        searcher.on_trial_complete(tid, {"objective": config["lr"] if stable else 0.0, "training_iteration": 1,
                                         "status": "completed" if stable else "diverged", "config": config})
        done.append((config["lr"], stable, now))
    return done


def trials_until(history, boundary: float, factor: float, rule: str):
    """1-based count of trials after which ``rule`` holds, or None."""
    lo, hi = 0.0, np.inf
    for i, (lr, stable, _) in enumerate(history, start=1):
        if stable:
            lo = max(lo, lr)
        else:
            hi = min(hi, lr)
        ok = (lo > 0 and boundary / lo <= factor) if rule == "best" else (lo > 0 and hi / lo <= factor)
        if ok:
            return i
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--boundaries", type=int, default=12)
    p.add_argument("--seeds", type=int, default=3, help="TPE sampler seeds per boundary")
    p.add_argument("--cap", type=int, default=200, help="TPE trials per run")
    p.add_argument("--slots", type=int, default=1, help="trials running at once")
    p.add_argument("--factor", type=float, default=1.1)
    p.add_argument("--k", type=int, nargs="+", default=[1, 2])
    args = p.parse_args(argv)

    import optuna

    from study.boundary import BoundarySearch
    from study.search import PerVariantSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)

    boundaries = np.logspace(-4.5, -1.5, args.boundaries)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k in args.k:
            counts, times = [], []
            for j, b in enumerate(boundaries):
                spec = make_spec(tmp, "boundary", k=k, factor=args.factor)
                history = drive(BoundarySearch(spec, Path(tmp) / f"b{k}-{j}.json"), b, args.slots, 10 ** 6)
                assert trials_until(history, b, args.factor, "bracket") is not None
                counts.append(len(history))
                times.append(history[-1][2])
            rows[f"boundary k={k} (stops at hi/lo ≤ {args.factor:g})"] = (counts, times, 0)
        best, bracket, best_t, bracket_t = [], [], [], []
        missed_best = missed_bracket = 0
        for j, b in enumerate(boundaries):
            for seed in range(args.seeds):
                spec = make_spec(tmp, "optuna", cap=args.cap, seed=seed)
                history = drive(PerVariantSearch(spec, Path(tmp) / f"tpe-{j}-{seed}.journal"), b, args.slots, args.cap)
                for rule, counts, times in (("best", best, best_t), ("bracket", bracket, bracket_t)):
                    n = trials_until(history, b, args.factor, rule)
                    if rule == "best":
                        missed_best += n is None
                    else:
                        missed_bracket += n is None
                    counts.append(n or args.cap)
                    times.append(history[(n or len(history)) - 1][2])
            print(f"[bench] boundary {b:.3g}: TPE done", flush=True)
        rows[f"TPE: best stable lr within ×{args.factor:g} of b"] = (best, best_t, missed_best)
        rows[f"TPE: hi/lo ≤ {args.factor:g} around b"] = (bracket, bracket_t, missed_bracket)

    import ray

    print()
    print(f"- date: {date.today().isoformat()}; Ray {ray.__version__}, Optuna {optuna.__version__}; CPU only")
    print(f"- command: `python -m bench.boundary_vs_tpe {' '.join(argv if argv is not None else sys.argv[1:])}`")
    print(f"- {args.boundaries} boundaries log-even in [10^-4.5, 10^-1.5], search range [1e-5, 1e-1], "
          f"{args.slots} trial(s) at once; TPE: {args.seeds} sampler seeds per boundary, {args.cap} trials at most")
    print()
    print("| searcher | runs | median trials | 90th pct | max | median time (trial durations) | "
          "not reached (counted as the cap) |")
    print("|---|---|---|---|---|---|---|")
    for name, (counts, times, missed) in rows.items():
        c = np.asarray(counts)
        print(f"| {name} | {len(c)} | {np.median(c):g} | {np.percentile(c, 90):g} | {c.max()} | "
              f"{np.median(times):g} | {missed} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
