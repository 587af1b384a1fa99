"""One training run (one trial): :func:`train` turns a :class:`RunConfig` into a run folder.

:func:`train` reads top to bottom: prepare the run folder
(:class:`trainers.run.rundir.RunDir`) and the :class:`Trainer`, resume from
the newest checkpoint, then per step :func:`train_step` (forward and
backward passes, the curvature columns, the update), the log row,
:func:`evaluate` (sample grids, FID/IS/KID at their cadence), the caller's
``on_step``, :func:`checkpoint` and the progress line; at the end the final
evaluation, checkpoint and ``status.json``.

Determinism: every random choice of step s (batch indices, flips, t/σ and
noise, dropout) comes from generators seeded by (seed, s)
(:mod:`trainers.run.rng`), so a run resumed from a checkpoint takes exactly
the steps an uninterrupted run would.  The log is flushed right before each
checkpoint and cut back to the checkpoint on resume: no step is lost or
written twice.

A NaN/inf loss or gradient, a loss above ``train.divergence_loss``, or a
non-finite curvature (λ₁ still NaN/inf when the probe retries from a cold
start) ends the run with status ``diverged``: a result, recorded like any
other (the statuses: :mod:`trainers.run.rundir`).  A solver failure on a
healthy run is retried from a cold start, then recorded in the row
(``eig_error``, null λ) and training goes on
(:meth:`trainers.run.probing.Probing.measure_or_record`).
"""
from __future__ import annotations

import copy
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from trainers.config import ConfigError, RunConfig, run_config
from trainers.diffusion.schedules import NoiseSchedule
from trainers.diffusion.unet import build_unet
from trainers.diffusion.variants import build_variant
from trainers.run.data import Batches, load_images, micro_batch_size
from trainers.run.optimizers import build_optimizer
from trainers.run.probing import Probing
from trainers.run.rng import Purpose, seed_dropout, seed_model_init, step_generator
from trainers.run.rundir import COMPLETED, DIVERGED, RUNNING, RunDir, RunFolderError, RunStatus
from trainers.run.steplog import LogCheck, StepLog

#: ``on_step(row)`` after every step: None to go on, or a status to end the
#: run with (reason "stopped by callback at step N"), or (status, reason).
StepCallback = Callable[[dict], Union[None, str, tuple[str, str]]]
CheckpointCallback = Callable[[Path, int], None]


@dataclass
class RunResult:
    status: str                 # completed | diverged | stopped (trainers.run.rundir)
    steps_done: int
    final_loss: Optional[float]
    reason: Optional[str]
    run_dir: Path


def train(cfg: RunConfig | dict, run_dir: str | os.PathLike, *, resume: bool = True,
          on_step: Optional[StepCallback] = None, on_checkpoint: Optional[CheckpointCallback] = None,
          progress: Optional[bool] = None, feature_extractor=None) -> RunResult:
    """Train one run to ``cfg.train.steps`` steps in ``run_dir``.

    ``resume``: continue from the newest checkpoint in ``run_dir`` (the
    config must match; a run that has ended is returned as it is);
    otherwise start over.  ``on_step(row)`` is called after every step with
    the logged row and may end the run (:data:`StepCallback`).
    ``on_checkpoint(path, steps_done)`` is called after each checkpoint is
    written.  ``progress``: print progress lines (default: when
    ``train.print_every`` > 0).  ``feature_extractor`` replaces Inception
    for FID/IS/KID (tests, tools).
    """
    cfg = run_config(cfg) if isinstance(cfg, dict) else cfg
    run = RunDir(run_dir)
    ended = run.read_status() if resume else None
    if ended is not None and ended.ended:
        run.prepare(cfg.to_dict(), resume=True)  # still refuses a different config
        problem = run.step_log().check().error()
        if problem:
            raise RunFolderError(f"{problem}; the run is {ended.status} but its log is not whole "
                                 "(eos train --fresh deletes it and trains again)")
        if ended.final_loss is None and ended.steps_done > 0:   # written by an older version: the log's
            ended = replace(ended, final_loss=run.step_log().last_loss())
            run.write_status(ended)
        return RunResult(ended.status, ended.steps_done, ended.final_loss, ended.reason, run.path)

    # everything that can fail on bad input (data, model, Inception weights)
    # fails here, before the run folder is touched: a fresh start deletes the
    # old run only once the new one is about to write
    trainer = Trainer(cfg)
    if cfg.eval.every:
        trainer.build_sample_metrics(feature_extractor)
    run.prepare(cfg.to_dict(), resume)
    log = run.step_log()
    report = Progress(cfg, cfg.train.print_every > 0 if progress is None else progress)
    if resume and trainer.resume(run, log.check()):
        report.resumed(run, trainer.step)
    log.truncate_after(trainer.step - 1)

    report.start(trainer.step)
    row: Optional[dict] = None
    status, reason = COMPLETED, None
    while trainer.step < cfg.train.steps:
        row, diverged = train_step(trainer)
        log.append(**row)
        if not diverged:
            evaluate(trainer, run, log, row)
        verdict = on_step(row) if on_step else None
        if diverged:
            status, reason = DIVERGED, trainer.divergence or (
                f"loss {row['loss']:.4g}, grad norm {row['grad_norm']:.4g} at step {row['step']}"
                + (f"; the probe: {row['eig_error']}" if row.get("eig_error") else ""))
            break
        if verdict:
            status, reason = verdict if isinstance(verdict, tuple) else (
                verdict, f"stopped by callback at step {row['step']}")
            break
        if trainer.step % cfg.train.checkpoint_every == 0 and trainer.step < cfg.train.steps:
            checkpoint(trainer, run, log, row, on_checkpoint)
        report.after_step(trainer.step, row)

    trainer.probing.close()   # the probe's resident operator (GPU memory)
    if row is None:
        # nothing trained here: resumed from the final checkpoint (a run killed
        # after it, before status.json said completed); the loss is the log's
        final_loss = log.last_loss()
    else:
        if status == COMPLETED:
            evaluate(trainer, run, log, row, final=True)
        if status == DIVERGED:
            log.flush()   # no checkpoint of diverged weights
        else:
            checkpoint(trainer, run, log, row, on_checkpoint)
        final_loss = row["loss"]
    ensure_complete_log(run, log, status, trainer.step)
    run.write_status(RunStatus(status, trainer.step, final_loss, reason, trainer.wall_time))
    report.finished(run, status, trainer.step, final_loss, reason)
    return RunResult(status, trainer.step, final_loss, reason, run.path)


def ensure_complete_log(run: RunDir, log: StepLog, status: str, steps_done: int) -> None:
    """Refuse to mark a run ended unless its log holds steps 0…steps_done−1, each once, intact."""
    check = log.check()
    if check.error() or check.reaches != steps_done - 1 or check.last != steps_done - 1:
        raise RunFolderError(f"{run}: not marked {status} after {steps_done} steps: the step log {check.summary()}"
                             + (f" ({'; '.join(check.problems)})" if check.problems else ""))


# ---------------------------------------------------------------------------
# one step


def train_step(trainer: Trainer) -> tuple[dict, bool]:
    """Step ``trainer.step``: the loss and gradient over the step's
    micro-batches, clipping, the curvature columns (at the parameters before
    the update, with the gradient the update will use: Adam's preconditioner
    of this update needs it), the update and the EMA.  Returns the step's
    log row and whether it diverged; a diverged step is logged but its
    update is not applied."""
    cfg, step = trainer.cfg, trainer.step
    t0 = time.perf_counter()
    lr = learning_rate(cfg, step)
    for group in trainer.optimizer.param_groups:
        group["lr"] = lr
    draws = trainer.draws(step)

    row = {"step": step, "lr": lr, "threshold": trainer.probing.threshold(lr)}
    seed_dropout(cfg.train.seed, step)
    trainer.optimizer.zero_grad(set_to_none=True)
    n_total = sum(len(d) for d in draws)
    loss_sum, stats = 0.0, {}
    for d in draws:
        with torch.autocast(trainer.device.type, dtype=torch.bfloat16, enabled=cfg.train.bf16):
            per_example = trainer.variant.loss(trainer.model, d)
        micro_loss = per_example.float().mean()
        (micro_loss * (len(d) / n_total)).backward()
        loss_sum += micro_loss.item() * len(d)
        stats.update(trainer.variant.observe(d, per_example.detach(), step))
    loss = loss_sum / n_total
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip is not None else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(trainer.params, clip))
    diverged = not math.isfinite(loss) or loss > cfg.train.divergence_loss or not math.isfinite(grad_norm)
    curvature_diverged = None
    if trainer.probing.due(step):
        # no update is taken on a diverged step: no gradient for its preconditioner
        grads = None if diverged else [p.grad for p in trainer.params]
        columns, curvature_diverged = trainer.probing.measure_or_record(trainer.model, trainer.optimizer, step, lr,
                                                                        draws, grads)
        row.update(columns)
    row.update(loss=loss, grad_norm=grad_norm, variant_stats=stats or None)

    trainer.divergence = curvature_diverged if not diverged else None
    diverged = diverged or curvature_diverged is not None
    if not diverged:
        trainer.optimizer.step()
        trainer.update_ema()
    trainer.wall_time += time.perf_counter() - t0
    row["wall_time"] = trainer.wall_time
    trainer.step = step + 1
    return row, diverged


def learning_rate(cfg: RunConfig, step: int) -> float:
    if cfg.optim.warmup_steps > 0:
        return cfg.optim.lr * min(1.0, (step + 1) / cfg.optim.warmup_steps)
    return cfg.optim.lr


# ---------------------------------------------------------------------------
# evaluation


def evaluate(trainer: Trainer, run: RunDir, log: StepLog, row: dict, *, final: bool = False) -> None:
    """After a step: a sample grid (``eval.grid_every``) and FID/IS/KID
    (``eval.every``) of the EMA weights when their cadence falls on this
    step, or with ``final`` when it does not (the run's last step)."""
    ev, steps_done = trainer.cfg.eval, trainer.step

    def due(every: int) -> bool:
        return bool(every) and (steps_done % every != 0 if final else steps_done % every == 0)

    if due(ev.grid_every):
        save_sample_grid(trainer, run)
    if due(ev.every):
        evaluate_into_log(trainer, log, row)


def generate_samples(trainer: Trainer, n: int, seed_offset: int = 0) -> torch.Tensor:
    """``n`` images in [-1, 1] from the EMA weights with the configured sampler."""
    from trainers.diffusion.samplers import generate

    ev = trainer.cfg.eval
    g = step_generator(trainer.cfg.train.seed, trainer.step + seed_offset, Purpose.SAMPLES, trainer.device)
    return generate(trainer.ema, trainer.variant, n, ev.sampler, ev.sampler_steps, ev.batch_size, g, trainer.device)


def save_sample_grid(trainer: Trainer, run: RunDir) -> Path:
    from trainers.diffusion.samplers import save_grid

    images = generate_samples(trainer, trainer.cfg.eval.grid_size)
    path = run.sample_grid_path(trainer.step)
    path.parent.mkdir(exist_ok=True)
    save_grid(images, path)
    return path


def evaluate_into_log(trainer: Trainer, log: StepLog, row: dict) -> None:
    """FID/IS/KID of EMA samples against the training images, written into
    the log row of the step just taken (still buffered: evaluation runs
    before the checkpoint that flushes it)."""
    from trainers.run.data import to_uint8

    metrics = trainer.sample_metrics(to_uint8(generate_samples(trainer, trainer.cfg.eval.samples)))
    values = {k: metrics.get(k) for k in ("fid", "inception_score", "kid")}
    log.update_last(**values)
    row.update(values)


# ---------------------------------------------------------------------------
# checkpointing


def checkpoint(trainer: Trainer, run: RunDir, log: StepLog, row: Optional[dict],
               on_checkpoint: Optional[CheckpointCallback]) -> Path:
    """Flush the log, save the trainer's state (keeping ``train.keep_checkpoints``)
    and mark the run ``running`` at this step."""
    log.flush()
    path = run.save_checkpoint(trainer.state_dict(), trainer.step, trainer.cfg.train.keep_checkpoints)
    run.write_status(RunStatus(RUNNING, trainer.step, row["loss"] if row else None, None, trainer.wall_time))
    if on_checkpoint:
        on_checkpoint(path, trainer.step)
    return path


# ---------------------------------------------------------------------------
# progress reporting


class Progress:
    """The console output of a run (all silent when not ``enabled``): a
    start line saying what trains, resuming, per-step progress, the outcome.

    On a terminal the per-step progress is a tqdm bar on stdout, updated
    after every step, with loss, λ₁ and λ₁/threshold in its postfix.
    Otherwise (a log file, a pipe) it is one line every ``train.print_every``
    steps, and after every step that took longer than :attr:`SLOW_STEP_S`
    seconds, so a slow run shows every step as it is taken."""

    SLOW_STEP_S = 1.0

    def __init__(self, cfg: RunConfig, enabled: bool, stream=None):
        self.cfg = cfg
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stdout
        self._time, self._step = time.perf_counter(), 0
        self._last = self._time
        self._bar = None

    def _print(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def resumed(self, run: RunDir, step: int) -> None:
        if self.enabled:
            self._print(f"[eos] resuming {run} at step {step}")

    def start(self, step: int) -> None:
        self._time, self._step = time.perf_counter(), step
        self._last = self._time
        if not self.enabled:
            return
        cfg = self.cfg
        sharp = cfg.sharpness
        probe = (f"λ₁ every {'step' if sharp.every == 1 else f'{sharp.every} steps'} on {sharp.hessian_batch} "
                 "examples" if sharp.every else "no λ₁ probe")
        self._print(f"[eos] {cfg.variant.name} lr={cfg.optim.lr:g}: {cfg.train.steps} steps from step {step}, "
                    f"{cfg.model.preset} U-Net, {cfg.data.name} {cfg.data.image_size} px, batch "
                    f"{cfg.data.batch_size}, {cfg.optim.name}, {probe}")
        if self.stream.isatty() and cfg.train.print_every:
            from tqdm import tqdm

            self._bar = tqdm(total=cfg.train.steps, initial=step, file=self.stream, unit="step",
                             desc=f"[eos] {cfg.variant.name} lr={cfg.optim.lr:g}", dynamic_ncols=True)

    def after_step(self, steps_done: int, row: dict) -> None:
        if not (self.enabled and self.cfg.train.print_every):
            return
        now = time.perf_counter()
        slow = now - self._last >= self.SLOW_STEP_S
        self._last = now
        if self._bar is not None:
            self._bar.set_postfix_str(self.postfix(row), refresh=False)
            self._bar.update(1)
            return
        every = self.cfg.train.print_every
        if not (slow or steps_done % every == 0 or steps_done == self.cfg.train.steps):
            return
        rate = (steps_done - self._step) / max(now - self._time, 1e-9)
        self._time, self._step = now, steps_done
        self._print(self.line(steps_done, row, rate))

    @staticmethod
    def postfix(row: dict) -> str:
        parts = [f"loss {row['loss']:.4f}"]
        lam = row.get("lambda_precond") if row.get("lambda_precond") is not None else row.get("lambda_max")
        if lam is not None:
            parts.append(f"λ₁ {lam:.4g}")
        if row.get("ratio") is not None:
            parts.append(f"λ₁/threshold {row['ratio']:.3f}")
        return " | ".join(parts)

    def line(self, steps_done: int, row: dict, rate: float) -> str:
        cfg = self.cfg
        return (f"[eos] {cfg.variant.name} lr={cfg.optim.lr:g} step {steps_done}/{cfg.train.steps} | "
                f"{self.postfix(row)} | {rate:.2f} steps/s")

    def finished(self, run: RunDir, status: str, steps_done: int, final_loss: Optional[float],
                 reason: Optional[str]) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.enabled:
            loss = "none" if final_loss is None else f"{final_loss:.4g}"
            self._print(f"[eos] {status}: {steps_done} steps, final loss {loss}"
                        + (f" ({reason})" if reason else "") + f" -> {run}")


# ---------------------------------------------------------------------------
# the pieces of a run


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {name!r} requested but CUDA is not available")
    return torch.device(name)


def check_hessian_batch(cfg: RunConfig, images: int) -> None:
    """A :class:`ConfigError` when ``sharpness.hessian_batch`` asks for more
    examples than the Hessian batch is drawn from (``images``, or the fixed
    training batch of a deterministic objective): the probe would measure a
    smaller batch than config.json says."""
    sharp, data = cfg.sharpness, cfg.data
    if sharp.every == 0:
        return
    deterministic = cfg.train.fixed_noise and data.batching != "random"
    if deterministic and data.batching == "fixed":
        available, source = data.batch_size, f"the fixed training batch, data.batch_size={data.batch_size}"
    else:
        available, source = images, f"the data set's {images} images"
    if sharp.hessian_batch > available:
        raise ConfigError(f"sharpness.hessian_batch: {sharp.hessian_batch} is larger than the {available} examples "
                          f"the Hessian batch is drawn from ({source}); set it to at most {available}")


class Trainer:
    """The pieces of one run (model, EMA, variant, data, optimizer, probing);
    :func:`train` drives them.  Exposed so tests and tools (sampling, the
    probe benchmarks) can build the same objects."""

    def __init__(self, cfg: RunConfig, device: Optional[torch.device] = None):
        self.cfg = cfg
        self.device = device or resolve_device(cfg.train.device)
        seed_model_init(cfg.train.seed)
        self.model = build_unet(cfg.model.preset, cfg.data.image_size, cfg.data.channels, cfg.model.dropout).to(self.device)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.schedule = NoiseSchedule.from_config(cfg.schedule)
        self.variant = build_variant(cfg.variant, self.schedule)
        self.batches = Batches(load_images(cfg.data), cfg.data, cfg.train.seed, self.device)
        check_hessian_batch(cfg, len(self.batches))
        self.optimizer = build_optimizer(cfg.optim, self.params)
        self.probing = Probing(cfg, self.variant, self.batches, self.draws, self.device)
        self.sample_metrics = None  # trainers.run.fid.SampleMetrics when eval.every > 0
        self.divergence: Optional[str] = None   # why the last step diverged, when the curvature said so
        self.step = 0
        self.wall_time = 0.0

    def build_sample_metrics(self, feature_extractor=None) -> None:
        """FID/IS/KID against the training images.  Built once, before
        training: loads the feature extractor and the real images' features,
        so missing Inception weights fail here, not hours in."""
        from trainers.run.fid import SampleMetrics

        ev = self.cfg.eval
        self.sample_metrics = SampleMetrics(self.batches.images, feature_extractor=feature_extractor,
                                            inception_weights=ev.inception_weights, device=self.device,
                                            batch_size=ev.batch_size)

    # --- state -----------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "wall_time": self.wall_time,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "variant": self.variant.state_dict(),
            "probe": self.probing.state_dict(),
            "config": self.cfg.to_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.wall_time = state["wall_time"]
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.variant.load_state_dict(state["variant"])
        self.probing.load_state_dict(state.get("probe"))

    def resume(self, run: RunDir, log: Optional[LogCheck] = None) -> bool:
        """Load the newest readable checkpoint of ``run``; False when there is none.
        With ``log`` (the run's :meth:`StepLog.check`), the newest one the log
        reaches (:meth:`RunDir.resumable_checkpoint`, which raises
        :class:`RunFolderError` when no checkpoint is usable).  Loaded onto
        the CPU (:meth:`RunDir.load_checkpoint`); :meth:`load_state_dict`
        moves every tensor to its owner's device."""
        state = run.load_latest_checkpoint() if log is None else run.resumable_checkpoint(log)
        if state is None:
            return False
        self.load_state_dict(state)
        return True

    # --- pieces of a step ------------------------------------------------
    def draws(self, step: int):
        """The step's draw (batch, t/σ, noise), split into micro-batches."""
        x0 = self.batches.batch(step)
        g = step_generator(self.cfg.train.seed, 0 if self.cfg.train.fixed_noise else step, Purpose.DRAW, self.device)
        draw = self.variant.draw(x0, g, step)
        return draw.split(micro_batch_size(self.cfg.data, self.cfg.optim.accumulate))

    def measure_sharpness(self, step: int, lr: float, train_draws, grads=None) -> dict:
        """The probe's columns at ``step`` now (:meth:`Probing.measure` on
        this trainer's model and optimizer); ``train_draws``: the step's
        micro-batches; ``grads``: the gradients of the coming update (for
        Adam's ``update`` preconditioner)."""
        return self.probing.measure(self.model, self.optimizer, step, lr, train_draws, grads)

    def update_ema(self) -> None:
        d = self.cfg.train.ema_decay
        with torch.no_grad():
            for pe, p in zip(self.ema.parameters(), self.model.parameters()):
                pe.lerp_(p, 1.0 - d)
