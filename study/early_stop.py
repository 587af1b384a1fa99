"""Early stopping of diverging trials: the ``early_stop`` rules, step by step.

The trainer already ends a run as ``diverged`` on a NaN/inf loss or a loss
above ``train.divergence_loss``.  A study adds two rules, checked on every
logged row (the trainer calls ``on_step(row)`` and ends the run with the
status it returns):

* **loss blow-up**: ``loss > loss_blowup × (loss of the first step)``;
* **persistent sharpness**: λ₁/threshold (the log's ``ratio``) above
  ``ratio_above`` for ``ratio_steps`` consecutive measurements (rows without
  a measurement, when ``sharpness.every > 1``, neither count nor reset);
* **off the edge**: once the EoS onset has come — the first measurement with
  ratio ≥ 1 after a measurement below 1, or, given ``opening``
  (:func:`analysis.metrics.opening_steps`: runs measuring Adam's ``update``
  preconditioner), at or after step ``opening`` (Adam's opening transient,
  where λ₁(P⁻¹H) starts far above the threshold, is not an onset; the
  definition of :func:`analysis.metrics.eos_onset`) — the ratio stays above
  1 + ``edge_delta`` for ``edge_steps`` consecutive measurements, counted
  from the onset on: the run crossed the threshold and did not settle at it.

Both rules depend on earlier steps, so a resumed trial first replays its
log (:meth:`DivergenceMonitor.replay`): the verdict is the same whether or
not the run was interrupted.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

from study.spec import EarlyStopSection
from trainers.run.rundir import DIVERGED


def _number(value) -> Optional[float]:
    """A finite-or-infinite float, or None for missing/NaN-as-missing values
    (pandas turns the log's nulls into NaN)."""
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


class DivergenceMonitor:
    """Applies :class:`EarlyStopSection` rules to a run's rows in step order."""

    def __init__(self, rules: EarlyStopSection, opening: Optional[int] = None):
        self.rules = rules
        self.opening = opening           # analysis.metrics.opening_steps of the run's config
        self.first_loss: Optional[float] = None
        self.ratio_streak = 0
        self.below_seen = False          # the opening transient is over (a ratio < 1, or the opening passed)
        self.onset: Optional[int] = None  # step of the EoS onset
        self.edge_streak = 0
        self.reason: Optional[str] = None

    def replay(self, rows: Iterable[dict]) -> None:
        """Feed the rows logged before a resume (they did not stop the run)."""
        for row in rows:
            self._observe(row)
        self.reason = None

    def __call__(self, row: dict) -> Optional[str]:
        """``"diverged"`` when a rule fires at this row (reason in ``self.reason``), else None."""
        return DIVERGED if self._observe(row) else None

    def _observe(self, row: dict) -> bool:
        step = row.get("step")
        loss = _number(row.get("loss"))
        if self.first_loss is None and loss is not None and math.isfinite(loss):
            self.first_loss = loss
        factor = self.rules.loss_blowup
        if factor is not None and loss is not None and self.first_loss is not None:
            if loss > factor * self.first_loss:
                self.reason = (f"loss {loss:.4g} > {factor:g} × first loss {self.first_loss:.4g} "
                               f"at step {step}")
                return True
        ratio = _number(row.get("ratio"))
        above = self.rules.ratio_above
        if above is not None and ratio is not None:
            self.ratio_streak = self.ratio_streak + 1 if ratio > above else 0
            if self.ratio_streak >= self.rules.ratio_steps:
                self.reason = (f"λ₁/threshold > {above:g} for {self.ratio_streak} consecutive "
                               f"measurements (step {step})")
                return True
        if ratio is not None:
            opened = self.opening is not None and step is not None and step >= self.opening
            if self.onset is None and (self.below_seen or opened) and ratio >= 1.0:
                self.onset = step
            self.below_seen = self.below_seen or ratio < 1.0 or opened
        delta = self.rules.edge_delta
        if delta is not None and ratio is not None and self.onset is not None:
            self.edge_streak = self.edge_streak + 1 if ratio > 1.0 + delta else 0
            if self.edge_streak >= self.rules.edge_steps:
                self.reason = (f"λ₁/threshold > {1 + delta:g} for {self.edge_streak} consecutive "
                               f"measurements after the EoS onset at step {self.onset} (step {step})")
                return True
        return False
