"""Synthetic study and run folders with known edge-of-stability answers.

Each :class:`SyntheticTrial` is built from its answers: the ratio λ₁/threshold
rises linearly from ``ratio0`` at step 0 to exactly 1 at ``onset`` (so the
sharpening rate is threshold·(1 − ratio0)/onset per step), then oscillates at
1 ± 0.05 except every fifth measured step, which sits at 1.2 (so the fraction
of post-onset steps within ±10 % is known).  A trial with ``diverge_at``
climbs instead (1 + 0.15k at the k-th measured step after the onset), and its loss is inf at that step, where it stops.  FID is
logged every ``fid_every`` steps as ``fid_final + (fid0 − fid_final)·(1 − t/T)``.

The folders have the layout the study and ``eos train`` write (see
``analysis.load``), so the analysis code reads them exactly as real output.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from trainers.config import run_config
from trainers.run.steplog import StepLog

BETA1 = 0.9


def adam_threshold(lr: float) -> float:
    return (2 + 2 * BETA1) / ((1 - BETA1) * lr)   # 38/lr, written out here on purpose


@dataclass
class SyntheticTrial:
    variant: str
    lr: float
    seed: int
    steps: int = 120
    onset: Optional[int] = None      # None: the ratio stays below 1
    ratio0: float = 0.2
    ratio_end: float = 0.6           # ratio at the last step when there is no onset
    every: int = 1                   # probe cadence (ratio is null in between)
    diverge_at: Optional[int] = None
    fid_every: int = 0
    fid0: float = 300.0
    fid_final: Optional[float] = None
    extra: dict = field(default_factory=dict)

    @property
    def trial_id(self) -> str:
        return f"{self.variant}_lr{self.lr:g}_s{self.seed}"

    @property
    def threshold(self) -> float:
        return adam_threshold(self.lr)

    @property
    def status(self) -> str:
        return "diverged" if self.diverge_at is not None else "completed"

    @property
    def steps_done(self) -> int:
        return self.diverge_at + 1 if self.diverge_at is not None else self.steps

    # -- the answers -------------------------------------------------------

    def measured_steps(self) -> np.ndarray:
        return np.arange(0, self.steps_done, self.every)

    def expected_rate(self) -> float:
        if self.onset is None:
            return self.threshold * (self.ratio_end - self.ratio0) / (self.steps - 1)
        return self.threshold * (1 - self.ratio0) / self.onset

    def expected_fraction(self) -> float:
        if self.onset is None:
            return float("nan")
        after = [s for s in self.measured_steps() if s >= self.onset]
        if self.diverge_at is not None:
            return 1 / len(after)          # only the onset step itself (1.0) is within ±10 %
        return sum(1 for k in range(len(after)) if k % 5 != 4) / len(after)

    def expected_final_loss(self) -> float:
        return float("inf") if self.diverge_at is not None else self.loss_at(self.steps - 1)

    # -- the curves --------------------------------------------------------

    def ratio_at(self, step: int) -> float:
        if self.onset is None:
            return self.ratio0 + (self.ratio_end - self.ratio0) * step / (self.steps - 1)
        if step < self.onset:
            return self.ratio0 + (1 - self.ratio0) * step / self.onset
        k = (step - self.onset) // self.every
        if self.diverge_at is not None:
            return 1.0 + 0.15 * k
        return 1.2 if k % 5 == 4 else 1.0 + 0.05 * (-1) ** k

    def loss_at(self, step: int) -> float:
        if self.diverge_at is not None and step >= self.diverge_at:
            return float("inf")
        tau = 40 * (1e-3 / self.lr) ** 0.3       # a smaller lr learns more slowly
        return 0.1 + 0.9 * np.exp(-step / tau) + 0.01 * np.sin(step + self.seed)

    def fid_at(self, step: int) -> Optional[float]:
        if not self.fid_every or self.fid_final is None:
            return None
        if step % self.fid_every and step != self.steps - 1:
            return None
        return self.fid_final + (self.fid0 - self.fid_final) * (1 - step / (self.steps - 1))

    def rows(self) -> list[dict]:
        rows = []
        for step in range(self.steps_done):
            measured = step % self.every == 0
            ratio = self.ratio_at(step) if measured else None
            lam = None if ratio is None else ratio * self.threshold
            fid = self.fid_at(step)
            rows.append(dict(
                step=step, wall_time=0.01 * step, loss=self.loss_at(step), lr=self.lr, grad_norm=1.0,
                lambda_max=None if lam is None else 0.01 * lam,   # λ₁(H): not the Adam operator
                lambda_precond=lam, threshold=self.threshold, ratio=ratio,
                eig_residual=1e-4 if measured else None, eig_iters=5 if measured else None,
                eig_hvps=10 if measured else None, eig_converged=True if measured else None,
                topk=[lam] if measured else None,
                fid=fid, inception_score=None if fid is None else 2.0 + 1.0 / fid,
                kid=None if fid is None else fid / 1000.0,
            ))
        return rows

    def trial_row(self) -> dict:
        return dict(trial_id=self.trial_id, variant=self.variant, lr=self.lr, seed=self.seed,
                    optimizer="adam", status=self.status, steps_done=self.steps_done,
                    final_loss=self.expected_final_loss(), **self.extra)


def write_steps(directory: Path, rows: list[dict], chunk: int = 50) -> None:
    log = StepLog(directory)
    for i, row in enumerate(rows):
        log.append(**row)
        if (i + 1) % chunk == 0:
            log.flush()
    log.flush()


def write_study(study_dir: Path, trials: list[SyntheticTrial]) -> Path:
    """A study folder holding ``trials``."""
    study_dir = Path(study_dir)
    for t in trials:
        write_steps(study_dir / "steps" / f"variant={t.variant}" / f"trial={t.trial_id}", t.rows())
    pd.DataFrame([t.trial_row() for t in trials]).to_parquet(study_dir / "trials.parquet")
    return study_dir


def write_run(run_dir: Path, trial: SyntheticTrial, status: bool = True) -> Path:
    """A single ``eos train`` run folder of ``trial`` (variant must be registered)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = run_config({"variant": {"name": trial.variant}, "optim": {"name": "adam", "lr": trial.lr},
                      "train": {"seed": trial.seed, "steps": trial.steps}})
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    if status:
        (run_dir / "status.json").write_text(json.dumps({
            "status": trial.status, "steps_done": trial.steps_done,
            "final_loss": trial.expected_final_loss(), "reason": None}))
    write_steps(run_dir / "steps", trial.rows())
    return run_dir


def fixture_trials() -> list[SyntheticTrial]:
    """Three variants × two learning rates × two or three seeds.

    * ``base``: reaches EoS at 1e-3 (onsets 40, 44, 48), never at 1e-4.
    * ``edm``: onsets 30 and 34 at 1e-3, the second seed diverges at step 80;
      onsets 60 and 64 at 1e-4; probed every 2 steps.
    * ``vparam``: onsets 50, 54 at 1e-3 and 70, 74 at 1e-4; FID every 40 steps.
    """
    T = []
    for seed, onset in enumerate((40, 44, 48)):
        T.append(SyntheticTrial("base", 1e-3, seed, onset=onset))
    for seed in (0, 1):
        T.append(SyntheticTrial("base", 1e-4, seed, onset=None, ratio_end=0.6 + 0.1 * seed))
    T.append(SyntheticTrial("edm", 1e-3, 0, onset=30, every=2))
    T.append(SyntheticTrial("edm", 1e-3, 1, onset=34, every=2, diverge_at=80))
    for seed, onset in enumerate((60, 64)):
        T.append(SyntheticTrial("edm", 1e-4, seed, onset=onset, every=2))
    for seed, onset in enumerate((50, 54)):
        T.append(SyntheticTrial("vparam", 1e-3, seed, onset=onset, fid_every=40, fid_final=40.0 + seed))
    for seed, onset in enumerate((70, 74)):
        T.append(SyntheticTrial("vparam", 1e-4, seed, onset=onset, fid_every=40, fid_final=60.0 + 2 * seed))
    return T


def build_fixture_study(root: Path, name: str = "fixture") -> tuple[Path, list[SyntheticTrial]]:
    trials = fixture_trials()
    return write_study(Path(root) / name, trials), trials


def markdown_rows(md: str) -> list[list[str]]:
    """The cells (stripped) of every Markdown table row in ``md``, header rows
    included, separator rows (``|---|``) left out."""
    rows = []
    for line in md.splitlines():
        if line.startswith("|") and not set(line) <= set("|-: "):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def check_report(study_dir: Path, out_dir: Path):
    """Build the report of ``study_dir`` into ``out_dir`` and check that it is
    complete: HTML with every figure embedded (no external files), Markdown
    summary with one table row per variant × lr, CSV tables, PNG + SVG files.
    Returns the :class:`analysis.report.ReportPaths`.  For any study folder,
    e.g. the smoke study's: ``check_report(results / "smoke", tmp_path)``."""
    import base64
    import re

    from analysis.load import load
    from analysis.report import build_report

    study = load(study_dir)
    paths = build_report(study_dir, out_dir, quiet=True)
    page = paths.html.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    sources = re.findall(r"""src=['"]([^'"]+)['"]""", page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources), "report must be self-contained"
    for s in sources:
        assert base64.b64decode(s.split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n")
    assert len(sources) == len(paths.figures) >= 1
    for fig in paths.figures.values():
        assert fig.png.stat().st_size > 1000 and fig.svg.stat().st_size > 1000
    groups = study.trials.groupby(["variant", "lr"]).ngroups
    summary = pd.read_csv(paths.summary_csv)
    assert len(summary) == groups
    assert len(pd.read_csv(paths.per_trial_csv)) == len(study.trials)
    md = paths.markdown.read_text(encoding="utf-8")
    summary_md = md.split("## Summary", 1)[1].split("\n## ", 1)[0]   # other sections have tables of their own
    table_rows = [line for line in summary_md.splitlines() if line.startswith("| ")]
    assert len(table_rows) == groups + 1            # header + one row per variant × lr
    first_cells = [row[0] for row in markdown_rows(md)]
    for variant in study.variants:
        assert variant in first_cells and variant in page
    return paths
