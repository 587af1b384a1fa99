"""Every random stream of a run, each a pure function of the run's seed.

Each step's randomness comes from generators seeded afresh from
(``train.seed``, step), so a run resumed from a checkpoint takes exactly
the steps an uninterrupted one would (the one stateful generator, the
sharpness probe's own, is saved in the checkpoint).  The streams and their
seeds:

* :func:`step_generator` — ``(seed · 1_000_003 + step) · 16 + purpose`` on the
  training device, one :class:`Purpose` at one step (the draw's t/σ and
  noise, the Hessian batch, the sampler, the batch sharpness's fresh
  mini-batches: a CPU generator of this seed for their images, flips and
  dropout seeds, one on the device for their t/σ and noise; the probe
  saves and restores the global generators around its dropout, so training
  draws the same numbers with batch sharpness on or off);
* :func:`seed_dropout` — the same formula with purpose ``DROPOUT``, into
  ``torch.manual_seed`` (dropout draws from the global generators);
* :func:`epoch_order` — ``seed · 1_000_003 + epoch`` (CPU): the batch order
  of one epoch;
* :func:`flip_generator` — ``seed · 7_919 + step`` (CPU): the horizontal
  flips of the step's batch;
* :func:`seed_model_init` — ``seed`` into ``torch.manual_seed``: the
  model's initial weights;
* :func:`subset_order` — seed 0 (CPU): which images form ``data.subset``,
  the same for every run seed.
"""
from __future__ import annotations

import enum

import torch

_STEP_STRIDE = 1_000_003     # a prime larger than any run's step count: (seed, step) pairs never collide
_PURPOSES = 16               # room for the purposes below
_FLIP_STRIDE = 7_919


class Purpose(enum.IntEnum):
    """What a step generator is for; each purpose of a step is an independent stream."""
    DRAW = 1        # the step's t/σ and noise (Variant.draw)
    DROPOUT = 2     # dropout masks of the step's forward passes
    HESSIAN = 3     # the frozen Hessian batch's t/σ and noise
    SAMPLES = 4     # the sampler's noise (sample grids, FID samples)
    BATCH_SHARPNESS = 5   # the fresh mini-batches of the batch sharpness (images, flips, t/σ, noise, dropout)


def step_seed(seed: int, step: int, purpose: Purpose) -> int:
    return (seed * _STEP_STRIDE + step) * _PURPOSES + int(purpose)


def step_generator(seed: int, step: int, purpose: Purpose, device) -> torch.Generator:
    """A generator for one purpose at one step, independent of all others."""
    g = torch.Generator(device=device)
    g.manual_seed(step_seed(seed, step, purpose))
    return g


def seed_dropout(seed: int, step: int) -> None:
    """Seed the global generators (all devices) for the dropout masks of ``step``."""
    torch.manual_seed(step_seed(seed, step, Purpose.DROPOUT))


def seed_model_init(seed: int) -> None:
    """Seed the global generators before the model's weights are initialised."""
    torch.manual_seed(seed)


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The order in which ``n`` examples are visited during ``epoch`` (random batching)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * _STEP_STRIDE + epoch))


def flip_generator(seed: int, step: int) -> torch.Generator:
    """The (CPU) generator of the step's horizontal flips."""
    return torch.Generator().manual_seed(seed * _FLIP_STRIDE + step)


def subset_order(n: int) -> torch.Tensor:
    """A fixed shuffle of ``n`` images; ``data.subset`` keeps its first entries."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(0))
