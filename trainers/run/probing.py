"""The curvature columns of a run's step log: when to probe, on which batch, in which model mode.

:class:`Probing` is the training loop's one contact with the sharpness
probe (:class:`trainers.curvature.probe.SharpnessProbe`).  It gives every
step's ``threshold`` column (the optimizer's stability threshold at the
step's learning rate; the probe itself does not write it), decides which
steps are probed (every ``sharpness.every``-th) and measures λ₁ and the
other probe columns there, before the update, on the frozen Hessian batch
with the model in :func:`trainers.diffusion.unet.probe_mode`.  The loop
calls it after the step's backward pass and clipping, before the update,
with the gradients the update will read, so that Adam's preconditioner is
the one of that update (``sharpness.adam_preconditioner: update``).  The
step and batch sharpness (``sharpness.batch_sharpness``) are measured in
training mode on the step's own batch and on fresh mini-batches of the
``BATCH_SHARPNESS`` stream (:meth:`Probing.batch_sharpness_batches`).

The Hessian batch is frozen: fixed x₀, t/σ and noise, redrawn at each probe
only with ``sharpness.refresh_batch``.  When the training objective is
deterministic (``train.fixed_noise`` on a ``fixed`` or ``full`` batch: GD on
one loss), the Hessian batch is that objective's own draw (its first
``sharpness.hessian_batch`` examples), so λ₁ is the curvature of the loss GD
actually descends.  Otherwise it is the first ``hessian_batch`` training
images, unflipped, with t/σ and noise from the ``HESSIAN`` stream
(:mod:`trainers.run.rng`).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch

from trainers.config import RunConfig
from trainers.curvature.probe import MicroBatches, SharpnessProbe
from trainers.curvature.thresholds import stability_threshold
from trainers.diffusion.unet import probe_mode
from trainers.diffusion.variants.base import Draw
from trainers.run.data import Batches, micro_batch_size
from trainers.run.rng import Purpose, step_generator, step_seed

LossFn = Callable[[], torch.Tensor]


class Probing:
    """Owns the run's :class:`SharpnessProbe` (None with ``sharpness.every: 0``),
    its cadence and its frozen Hessian batch.

    ``draws(step)``: the step's training draw as micro-batches (the
    trainer's), used for the Hessian batch of a deterministic objective.
    """

    def __init__(self, cfg: RunConfig, variant, batches: Batches, draws: Callable[[int], list[Draw]], device):
        self.cfg = cfg
        self.variant = variant
        self.batches = batches
        self.draws = draws
        self.device = device
        self.probe: Optional[SharpnessProbe] = (
            SharpnessProbe(cfg.sharpness, cfg.optim) if cfg.sharpness.every > 0 else None)
        self._hessian_draw: Optional[Draw] = None

    # --- what the loop asks -------------------------------------------------
    def threshold(self, lr: float) -> float:
        """The ``threshold`` column of every step: the optimizer's stability threshold at ``lr``."""
        return stability_threshold(self.cfg.optim, lr)

    def due(self, step: int) -> bool:
        """Whether the probe measures at ``step`` (every ``sharpness.every``-th step)."""
        return self.probe is not None and step % self.cfg.sharpness.every == 0

    def measure(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, lr: float,
                train_draws: Union[Draw, Sequence[Draw]], grads=None) -> dict:
        """The probe's columns (:data:`trainers.curvature.probe.COLUMNS`) at
        ``step``, before its update, measured now on the frozen Hessian batch
        with the model in probe mode.  ``train_draws``: the step's training
        micro-batches (step sharpness); ``grads``: the gradients the coming
        update reads (Adam's ``update`` preconditioner).  With
        ``sharpness.batch_sharpness`` the step and batch sharpness are
        measured in training mode (dropout on), the global generators saved
        and restored around them (:meth:`batch_sharpness_batches`)."""
        if self.probe is None:
            raise RuntimeError("sharpness.every is 0: this run has no sharpness probe")
        if isinstance(train_draws, Draw):
            train_draws = [train_draws]
        hessian_loss = self.loss(model, self.hessian_draw(step))
        if not self.cfg.sharpness.batch_sharpness:
            with probe_mode(model):
                return self.probe.measure(model, hessian_loss, optimizer, lr, grads=grads)
        devices = [self.device] if torch.device(self.device).type == "cuda" else []
        with torch.random.fork_rng(devices=devices), probe_mode(model):
            step_batch, sample = self.batch_sharpness_batches(model, step, list(train_draws), train=True)
            cols = self.probe.measure(model, hessian_loss, optimizer, lr, step_batch, grads=grads,
                                      sample_batch=sample)
        return cols

    # --- the batches of the step and batch sharpness ------------------------------
    def batch_sharpness_batches(self, model: torch.nn.Module, step: int, train_draws: list[Draw],
                                train: bool = True) -> tuple[MicroBatches, Callable[[int], MicroBatches]]:
        """The mini-batches of the step and batch sharpness at ``step``, as
        :data:`trainers.curvature.probe.MicroBatches` (split into micro-batches
        as training splits them), evaluated in training mode (dropout on)
        in probe mode's double-differentiable attention:

        * the step's own batch ``train_draws``, with the dropout masks of the
          training step (the ``DROPOUT`` seed of ``step``; each micro-batch
          replays the generator state its training forward pass started
          from);
        * ``sample(i)``: the i-th fresh mini-batch of the ``BATCH_SHARPNESS``
          stream of ``step`` (:mod:`trainers.run.rng`; images
          :meth:`trainers.run.data.Batches.sample`, t/σ and noise from the
          variant's draw — the ``DRAW`` stream of step 0 under
          ``train.fixed_noise``, as in training —, dropout seeded per
          micro-batch).  ``sample`` must be called with i = 0, 1, 2, … in order.

        Each micro-batch's closure sets the global generators before its
        forward pass, so the two passes of a multi-micro-batch estimate see
        the same masks; the caller saves and restores the generators."""
        seed, device = self.cfg.train.seed, self.device
        cuda = torch.device(device).type == "cuda"

        def get_state():
            return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if cuda else None)

        def set_state(state):
            torch.set_rng_state(state[0])
            if cuda:
                torch.cuda.set_rng_state(state[1], device)

        def micro(draws: list[Draw], first_seed: int, replay: bool) -> MicroBatches:
            total = sum(len(d) for d in draws)
            states: dict[int, tuple] = {}

            def closure(j: int, d: Draw) -> LossFn:
                def fn() -> torch.Tensor:
                    if j in states:
                        set_state(states[j])
                    elif j == 0 or not replay:
                        torch.manual_seed(first_seed + (0 if replay else j))
                        states[j] = get_state()
                    else:   # the state the previous micro-batch's forward pass left (first, in-order pass)
                        states[j] = get_state()
                    with probe_mode(model, train=train):
                        return self.variant.loss(model, d).float().mean()
                return fn

            return [(closure(j, d), len(d) / total) for j, d in enumerate(draws)]

        step_batch = micro(train_draws, step_seed(seed, step, Purpose.DROPOUT), replay=True)
        images = torch.Generator().manual_seed(step_seed(seed, step, Purpose.BATCH_SHARPNESS))
        noise = step_generator(seed, step, Purpose.BATCH_SHARPNESS, device)
        drawn = [0]

        def sample(i: int) -> MicroBatches:
            if i != drawn[0]:
                raise ValueError(f"batch sharpness: fresh batch {i} requested, {drawn[0]} expected next")
            drawn[0] += 1
            x0 = self.batches.sample(images)
            g = (step_generator(seed, 0, Purpose.DRAW, device) if self.cfg.train.fixed_noise else noise)
            draw = self.variant.draw(x0, g, step)
            dropout = int(torch.randint(0, 2 ** 62, (1,), generator=images))
            return micro(draw.split(micro_batch_size(self.cfg.data, self.cfg.optim.accumulate)), dropout, replay=False)

        return step_batch, sample

    # --- the Hessian batch ----------------------------------------------------
    def loss(self, model: torch.nn.Module, draw: Draw) -> LossFn:
        """The mean loss of ``model`` on the fixed ``draw``, as a zero-argument closure."""
        return lambda: self.variant.loss(model, draw).mean()

    def deterministic_objective(self) -> bool:
        """Fixed/full batch with fixed noise: every step minimises the same loss."""
        return self.cfg.train.fixed_noise and self.cfg.data.batching != "random"

    def hessian_draw(self, step: int) -> Draw:
        """The frozen Hessian batch at ``step`` (see the module docstring)."""
        sharp = self.cfg.sharpness
        if self.deterministic_objective():
            if self._hessian_draw is None:
                draw = self.draws(step)
                examples = min(sharp.hessian_batch, sum(len(d) for d in draw))
                full = draw[0] if len(draw) == 1 else type(draw[0])(
                    *(torch.cat([getattr(d, f) for d in draw]) for f in ("x0", "t", "noise", "input_noise")),
                    draw[0].extra)
                self._hessian_draw = full.split(examples)[0]
            return self._hessian_draw
        if self._hessian_draw is None or sharp.refresh_batch:
            x0 = self.batches.hessian_batch(sharp.hessian_batch)
            s = step if sharp.refresh_batch else 0
            self._hessian_draw = self.variant.draw(x0, step_generator(self.cfg.train.seed, s, Purpose.HESSIAN,
                                                                      self.device), s)
        return self._hessian_draw

    # --- state ------------------------------------------------------------------
    def state_dict(self) -> Optional[dict]:
        """The probe's state (warm-start vectors, its generator), None without a probe.
        The Hessian batch is not saved: the first probe after a resume
        rebuilds it from the seed (a deterministic objective's: from the
        variant's draw at that step)."""
        return self.probe.state_dict() if self.probe is not None else None

    def load_state_dict(self, state: Optional[dict]) -> None:
        if self.probe is not None and state:
            self.probe.load_state_dict(state)
