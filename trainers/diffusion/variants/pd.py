"""Progressive-difficulty curriculum (Kim et al. 2025, "Denoising Task
Difficulty-based Curriculum for Training Diffusion Models", arXiv 2403.10348).

The timesteps 0..T−1 are split into N uniform intervals
C_j = [⌊(j−1)T/N⌋, ⌊jT/N⌋), j = 1..N.  Denoising at high noise (large t) is
the easy task — it converges faster — so training starts on the highest
interval C_N alone; curriculum stage n trains on the union of the n highest
intervals C_{N−n+1} ∪ … ∪ C_N, i.e. t uniform in [⌊(N−n)T/N⌋, T).  Once
stage N is reached the objective is the ordinary uniform-t ε loss.

Pacing (when to add the next, harder interval):

* ``patience`` (the paper's Algorithm 1): an exponential moving average of the
  observed batch loss is tracked; after ``patience`` consecutive observations
  without a new best, the next stage starts (best and average are reset, as
  the loss level changes with the task mix).  One observation is one
  training micro-batch.
* ``fixed``: stage n = min(N, 1 + ⌊step / stage_steps⌋), a pure function of
  the step (reproducible across learning rates, since it ignores the loss).

The frozen Hessian batch follows the curriculum: it is redrawn in the
current stage's range at the first probe of each new stage
(:meth:`objective_id`) and fixed within a stage.

The state (stage, patience counter, best and averaged loss) is in
``state_dict`` so that a resumed run continues exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from trainers.diffusion.variants.base import Base, Draw, check_option


@dataclass
class ProgressiveDifficultyOptions:
    intervals: int = 20        # N uniform timestep intervals (the paper's 20)
    pacing: str = "patience"   # patience | fixed
    patience: int = 200        # τ: observations without a new best loss before the next stage
    smoothing: float = 0.99    # EMA factor of the loss the patience rule watches
    stage_steps: int = 100     # fixed pacing: training steps per stage

    def __post_init__(self):
        check_option(self.intervals >= 1, "intervals", f"must be >= 1; got {self.intervals}")
        check_option(self.pacing in ("patience", "fixed"), "pacing",
                     f"must be one of patience, fixed; got {self.pacing!r}")
        check_option(self.patience >= 1, "patience", f"must be >= 1; got {self.patience}")
        check_option(0.0 <= self.smoothing < 1.0, "smoothing", f"must be in [0, 1); got {self.smoothing}")
        check_option(self.stage_steps >= 1, "stage_steps", f"must be >= 1; got {self.stage_steps}")


class ProgressiveDifficulty(Base):
    """ε-prediction; timesteps restricted to the curriculum's current stage."""

    name = "pd"
    Options = ProgressiveDifficultyOptions

    def __init__(self, schedule, cfg=None):
        super().__init__(schedule, cfg)
        check_option(self.options.intervals <= schedule.timesteps, "intervals",
                     f"must be <= schedule.timesteps={schedule.timesteps}; got {self.options.intervals}")
        self.stage = 1
        self.counter = 0
        self.best = math.inf
        self.average = None  # EMA of the observed loss; None: restart at the next observation

    # --- the curriculum ------------------------------------------------------
    def interval(self, j: int) -> tuple[int, int]:
        """[lo, hi) timesteps of interval C_j (j = 1: lowest noise, N: highest)."""
        n, big_t = self.options.intervals, self.schedule.timesteps
        return (j - 1) * big_t // n, j * big_t // n

    def stage_at(self, step: int) -> int:
        if self.options.pacing == "fixed":
            return min(self.options.intervals, 1 + step // self.options.stage_steps)
        return self.stage

    def t_min(self, stage: int) -> int:
        """Lowest timestep trained at ``stage`` (the union of the top ``stage`` intervals)."""
        return self.interval(self.options.intervals - stage + 1)[0]

    def objective_id(self, step: int) -> int:
        """The curriculum stage of step ``step``'s draw: the frozen Hessian batch is redrawn at each new stage."""
        return self.stage_at(step)

    def sample_t(self, batch: int, generator: torch.Generator, step: int, device) -> torch.Tensor:
        lo = self.t_min(self.stage_at(step))
        return torch.randint(lo, self.schedule.timesteps, (batch,), generator=generator, device=device)

    # --- pacing ---------------------------------------------------------------
    def observe(self, d: Draw, per_example_loss: torch.Tensor, step: int) -> dict[str, float]:
        if self.options.pacing == "fixed":
            self.stage = self.stage_at(step)
        elif self.stage < self.options.intervals:
            loss = float(per_example_loss.float().mean())
            a = self.options.smoothing
            self.average = loss if self.average is None else a * self.average + (1 - a) * loss
            if self.average < self.best:
                self.best, self.counter = self.average, 0
            else:
                self.counter += 1
            if self.counter >= self.options.patience:
                self.stage += 1
                self.counter, self.best, self.average = 0, math.inf, None
        return {"stage": float(self.stage), "t_min": float(self.t_min(self.stage))}

    def state_dict(self) -> dict:
        return {"stage": self.stage, "counter": self.counter, "best": self.best, "average": self.average}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.stage, self.counter = int(state["stage"]), int(state["counter"])
            self.best, self.average = float(state["best"]), state["average"]
