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

The Hessian batch is frozen — fixed x₀, t/σ and noise — and follows the
objective the variant is training on: it is redrawn when the variant's
objective changes (:meth:`Variant.objective_id
<trainers.diffusion.variants.base.Variant.objective_id>`, e.g. a new ``pd``
curriculum stage), at each probe with ``sharpness.refresh_batch`` (not for a
deterministic objective), and otherwise kept, so that the probe's warm
starts carry over; at every probe the variant may reweight it to its current
objective (``follow_objective``: ``adap_s``'s importance weights).  Each
probe row records which batch it measured on (``hessian_batch_id``: 0 for
the first, +1 at every redraw); at a change of objective the probe's warm
start is dropped (the next solve is cold).  Within one objective the probe
is handed the same loss closure at every probe, over tensors that keep
their addresses (a redrawn or reweighted batch is copied into them:
:meth:`Probing.held_loss`), so that a resident Hessian operator
(``sharpness.resident``) can replay its recorded gradient graph.

When the training objective is deterministic (``train.fixed_noise`` on a
``fixed`` or ``full`` batch, with a variant whose draw fixed noise fixes —
not ``adap_s``: GD on one loss), the Hessian batch is the first
``sharpness.hessian_batch`` examples of that objective's own draw (taken at
the step the batch is drawn).  λ₁ is then the curvature of the whole
objective GD descends only when ``hessian_batch`` is at least the batch
(``data.batch_size``, or the data set with ``full``); otherwise it is that of
the mean loss over those first examples (their per-example terms of the
objective, STF's references into the whole batch included).  Otherwise the
Hessian batch is the first ``hessian_batch`` training images, unflipped,
with t/σ and noise from the ``HESSIAN`` stream (:mod:`trainers.run.rng`),
drawn by the variant's ``hessian_draw``.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence, Union

import torch

from trainers.config import RunConfig
from trainers.curvature.probe import COLUMNS as PROBE_COLUMNS, MicroBatches, SharpnessProbe
from trainers.curvature.thresholds import stability_threshold
from trainers.diffusion.unet import probe_mode
from trainers.diffusion.variants.base import Draw
from trainers.run.data import Batches, micro_batch_size
from trainers.run.rng import Purpose, step_generator, step_seed

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


def _fields(d: Draw) -> list[tuple[str, Any]]:
    return ([(f, getattr(d, f)) for f in Draw.PER_EXAMPLE] + [("extra." + k, v) for k, v in sorted(d.extra.items())]
            + [("shared." + k, v) for k, v in sorted(d.shared.items())])


def _owned(d: Draw) -> Draw:
    """``d`` with its own copy of every tensor (no view into a training batch)."""
    own = lambda v: v.clone() if isinstance(v, torch.Tensor) else v
    return Draw(*(own(getattr(d, f)) for f in Draw.PER_EXAMPLE), {k: own(v) for k, v in d.extra.items()},
                {k: own(v) for k, v in d.shared.items()})


def _copy_into(dst: Draw, src: Draw) -> bool:
    """Copy ``src``'s tensors into ``dst``'s, in place, when the two have the
    same layout (False, nothing copied, when not)."""
    a, b = _fields(dst), _fields(src)
    if [n for n, _ in a] != [n for n, _ in b]:
        return False
    for (_, x), (_, y) in zip(a, b):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor):
            if (x.shape, x.dtype, x.device) != (y.shape, y.dtype, y.device):
                return False
        elif x is not y:
            try:
                if not bool(x == y):
                    return False
            except Exception:   # a value without a truth value of ==
                return False
    with torch.no_grad():
        for (_, x), (_, y) in zip(a, b):
            if isinstance(x, torch.Tensor) and x is not y:
                x.copy_(y)
    return True


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
        self._objective: Optional[int] = None   # the variant's objective_id when the batch was drawn
        self._objective_changed = False         # the probe's warm start is due a reset
        self.hessian_batch_id = 0               # redraws of the Hessian batch so far
        self._held: Optional[tuple] = None      # (model, draw, its loss closure) of the last probe (:meth:`held_loss`)

    # --- what the loop asks -------------------------------------------------
    def threshold(self, lr: float) -> float:
        """The ``threshold`` column of every step: the optimizer's stability threshold at ``lr``."""
        return stability_threshold(self.cfg.optim, lr)

    def due(self, step: int) -> bool:
        """Whether the probe measures at ``step`` (every ``sharpness.every``-th step)."""
        return self.probe is not None and step % self.cfg.sharpness.every == 0

    def measure(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, lr: float,
                train_draws: Union[Draw, Sequence[Draw]], grads=None) -> dict:
        """The probe's columns (:data:`trainers.curvature.probe.COLUMNS`) and
        ``hessian_batch_id`` at ``step``, before its update, measured now on
        the frozen Hessian batch with the model in probe mode.
        ``train_draws``: the step's training micro-batches (step sharpness);
        ``grads``: the gradients the coming update reads (Adam's ``update``
        preconditioner).  With ``sharpness.batch_sharpness`` the step and
        batch sharpness are measured in training mode (dropout on), the
        global generators saved and restored around them
        (:meth:`batch_sharpness_batches`)."""
        if self.probe is None:
            raise RuntimeError("sharpness.every is 0: this run has no sharpness probe")
        if isinstance(train_draws, Draw):
            train_draws = [train_draws]
        draw = self.hessian_draw(step)
        if self._objective_changed:
            self.probe.reset_warm_start()
            self._objective_changed = False
            self._held = None
        hessian_loss = self.held_loss(model, draw)
        if not self.cfg.sharpness.batch_sharpness:
            with probe_mode(model):
                cols = self.probe.measure(model, hessian_loss, optimizer, lr, grads=grads)
        else:
            devices = [self.device] if torch.device(self.device).type == "cuda" else []
            with torch.random.fork_rng(devices=devices), probe_mode(model):
                step_batch, sample = self.batch_sharpness_batches(model, step, list(train_draws), train=True)
                cols = self.probe.measure(model, hessian_loss, optimizer, lr, step_batch, grads=grads,
                                          sample_batch=sample)
        return {**cols, "hessian_batch_id": self.hessian_batch_id}

    def measure_or_record(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, lr: float,
                          train_draws: Union[Draw, Sequence[Draw]], grads=None) -> tuple[dict, Optional[str]]:
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
                cols = self.measure(model, optimizer, step, lr, train_draws, grads)
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

    def held_loss(self, model: torch.nn.Module, draw: Draw) -> LossFn:
        """The Hessian loss on ``draw`` (:meth:`loss`), as the same closure
        from one probe to the next within one objective: ``draw``'s values are
        copied into the tensors the last probe's closure reads when they have
        the same fields, shapes, dtypes and devices (and the same non-tensor
        ``shared`` values), so that the probe's resident Hessian operator
        (``sharpness.resident``) replays what it recorded on them; otherwise
        (the first probe, a new objective) a new closure over copies of
        ``draw``'s tensors.  The variant's loss must be a function of the
        model and the draw alone (adap_s's current weights are in the draw)."""
        held = self._held
        if held is not None and held[0] is model and _copy_into(held[1], draw):
            return held[2]
        own = _owned(draw)
        fn = self.loss(model, own)
        self._held = (model, own, fn)
        return fn

    def close(self) -> None:
        """Free what the probe keeps between probes (its resident Hessian operator)."""
        self._held = None
        if self.probe is not None:
            self.probe.close()

    def deterministic_objective(self) -> bool:
        """Fixed/full batch with fixed noise (and a variant whose draw that
        fixes): every step of one objective minimises the same loss."""
        return (self.cfg.train.fixed_noise and self.cfg.data.batching != "random"
                and self.variant.deterministic_draw)

    def hessian_draw(self, step: int) -> Draw:
        """The frozen Hessian batch at ``step`` (see the module docstring):
        drawn at the first call, redrawn at a change of the variant's
        objective and, with ``sharpness.refresh_batch`` (random objective
        only), at every call; rebuilt unchanged after a resume; brought to
        the current objective by the variant's ``follow_objective``."""
        sharp = self.cfg.sharpness
        objective = self.variant.objective_id(step)
        first = self._objective is None
        changed = not first and objective != self._objective
        refresh = sharp.refresh_batch and not self.deterministic_objective()
        if first or changed or refresh or self._hessian_draw is None:
            if not first and (changed or refresh):
                self.hessian_batch_id += 1
            self._objective_changed = self._objective_changed or changed
            self._objective = objective
            self._hessian_draw = self._build_hessian_draw(step, step if refresh else self.hessian_batch_id)
        return self.variant.follow_objective(self._hessian_draw, step)

    def _build_hessian_draw(self, step: int, stream_step: int) -> Draw:
        examples = self.cfg.sharpness.hessian_batch
        if self.deterministic_objective():
            whole = Draw.concatenate(self.draws(step))
            return whole.take(slice(0, min(examples, len(whole))))
        x0 = self.batches.hessian_batch(examples)
        g = step_generator(self.cfg.train.seed, stream_step, Purpose.HESSIAN, self.device)
        return self.variant.hessian_draw(x0, g, step)

    # --- state ------------------------------------------------------------------
    def state_dict(self) -> Optional[dict]:
        """The probe's state (warm-start vectors, its generator) and which
        Hessian batch it measures on (its id and the variant's objective
        then), None without a probe.  The Hessian batch itself is not saved:
        the first probe after a resume rebuilds it from the seed and the
        batch id (a deterministic objective's: from the variant's draw at
        that step, which is the same within one objective)."""
        if self.probe is None:
            return None
        return {"probe": self.probe.state_dict(), "hessian_batch_id": self.hessian_batch_id,
                "objective": self._objective, "objective_changed": self._objective_changed}

    def load_state_dict(self, state: Optional[dict]) -> None:
        if self.probe is not None and state:
            if "probe" not in state:   # a checkpoint from before the batch id: the probe's state alone
                state = {"probe": state}
            self.probe.load_state_dict(state["probe"])
            self.hessian_batch_id = int(state.get("hessian_batch_id", 0))
            self._objective = state.get("objective")
            self._objective_changed = bool(state.get("objective_changed", False))
            self._hessian_draw = None
