"""The curvature columns of a run's step log: when to probe, on which batch, in which model mode.

:class:`Probing` is the training loop's one contact with the sharpness
probe (:class:`trainers.curvature.probe.SharpnessProbe`).  It gives every
step's ``threshold`` column (the optimizer's stability threshold at the
step's learning rate; the probe itself does not write it), decides which
steps are probed (every ``sharpness.every``-th) and measures λ₁ and the
other probe columns there, before the update, on the frozen Hessian batch
with the model in :func:`trainers.diffusion.unet.probe_mode`.

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

import math
from typing import Callable, Optional

import torch

from trainers.config import RunConfig
from trainers.curvature.probe import COLUMNS as PROBE_COLUMNS, SharpnessProbe
from trainers.curvature.thresholds import stability_threshold
from trainers.diffusion.unet import probe_mode
from trainers.diffusion.variants.base import Draw
from trainers.run.data import Batches
from trainers.run.rng import Purpose, step_generator

LossFn = Callable[[], torch.Tensor]


def solver_failure(err: BaseException) -> bool:
    """Whether ``err`` from a measurement is the numerics failing (recorded,
    the run goes on) rather than the machine (out of memory, a CUDA or cuDNN
    error: raised)."""
    if isinstance(err, torch.linalg.LinAlgError):
        return True
    if isinstance(err, torch.OutOfMemoryError):
        return False
    text = str(err)
    return not any(word in text for word in ("CUDA", "cuDNN", "cuBLAS", "out of memory", "NCCL"))


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


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
                train_draw: Draw) -> dict:
        """The probe's columns (:data:`trainers.curvature.probe.COLUMNS`) at
        ``step``, before its update, measured now on the frozen Hessian batch
        with the model in probe mode.  ``train_draw``: the step's first
        training micro-batch (for batch sharpness)."""
        if self.probe is None:
            raise RuntimeError("sharpness.every is 0: this run has no sharpness probe")
        with probe_mode(model):
            batch_loss = self.loss(model, train_draw) if self.cfg.sharpness.batch_sharpness else None
            return self.probe.measure(model, self.loss(model, self.hessian_draw(step)), optimizer, lr, batch_loss)

    def measure_or_record(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, lr: float,
                          train_draw: Draw) -> tuple[dict, Optional[str]]:
        """:meth:`measure`, never raising for the solver: returns the columns
        and, when the curvature is non-finite, why (the run is diverging).

        A solver failure (:func:`solver_failure`: ``torch.linalg.LinAlgError``,
        e.g. ``eigh`` on an ill-conditioned Gram matrix, or another
        ``RuntimeError``/``ValueError`` of the numerics — not running out of
        memory, not a CUDA error) or a non-finite λ is retried once from a
        cold start (no warm-start vectors).  When the retry fails too, the
        probe columns are null and ``eig_error`` says why; a non-finite λ is
        also returned as the reason, for the loop to end the run ``diverged``."""
        failure = None
        for attempt in ("warm", "cold"):
            if attempt == "cold":
                self.probe.warm.clear()
                self.probe.warm_scale = None
            try:
                cols = self.measure(model, optimizer, step, lr, train_draw)
            except (RuntimeError, ValueError) as e:
                if not solver_failure(e):
                    raise
                name = "LinAlgError" if isinstance(e, torch.linalg.LinAlgError) else type(e).__name__
                failure, non_finite = f"{name}: {_first_line(e)}", False
                continue
            bad = [c for c in ("lambda_max", "lambda_precond", "ratio") if cols.get(c) is not None
                   and not math.isfinite(cols[c])]
            if not bad:
                return cols, None
            failure, non_finite = f"non-finite curvature ({', '.join(f'{c} {cols[c]}' for c in bad)})", True
        self.probe.warm.clear()   # start the next probe cold
        self.probe.warm_scale = None
        reason = f"{failure} at step {step}, also after a cold start"
        cols = {c: None for c in PROBE_COLUMNS}
        cols["eig_error"] = reason
        return cols, (reason if non_finite else None)

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
