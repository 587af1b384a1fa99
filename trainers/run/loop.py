"""One training run (one trial), from a :class:`RunConfig` to a run folder.

    run_dir/
      config.json          the resolved RunConfig
      status.json          {"status", "steps_done", "final_loss", "reason", "wall_time"}
      steps/part-*.parquet the per-step log (trainers.run.steplog)
      checkpoints/ckpt-<steps_done>.pt
      samples/             sample grids (eval.grid_every)

Determinism: every random choice of step s (batch indices, flips, t/σ and
noise, dropout) comes from generators seeded by (seed, s), so a run resumed
from a checkpoint takes exactly the steps an uninterrupted run would.  The
log is flushed right before each checkpoint and cut back to the checkpoint
on resume: no step is lost or written twice.

A NaN/inf loss, or a loss above ``train.divergence_loss``, ends the run with
status ``diverged``: a result, recorded like any other.
"""
from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from trainers.config import ConfigError, RunConfig, run_config
from trainers.run.data import Batches, load_images
from trainers.curvature.thresholds import stability_threshold
from trainers.run.optimizers import build_optimizer
from trainers.diffusion.schedules import NoiseSchedule
from trainers.run.steplog import StepLog
from trainers.diffusion.unet import build_unet
from trainers.diffusion.variants import build_variant

StepCallback = Callable[[dict], Optional[str]]
CheckpointCallback = Callable[[Path, int], None]


@dataclass
class RunResult:
    status: str                 # completed | diverged | stopped
    steps_done: int
    final_loss: Optional[float]
    reason: Optional[str]
    run_dir: Path


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {name!r} requested but CUDA is not available")
    return torch.device(name)


def step_generator(seed: int, step: int, purpose: int, device) -> torch.Generator:
    """A generator for one purpose at one step, independent of all others."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step) * 16 + purpose)
    return g


PURPOSE_DRAW, PURPOSE_DROPOUT, PURPOSE_HESSIAN, PURPOSE_SAMPLES = 1, 2, 3, 4


def learning_rate(cfg: RunConfig, step: int) -> float:
    if cfg.optim.warmup_steps > 0:
        return cfg.optim.lr * min(1.0, (step + 1) / cfg.optim.warmup_steps)
    return cfg.optim.lr


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def read_status(run_dir: str | os.PathLike) -> Optional[dict]:
    p = Path(run_dir) / "status.json"
    return json.loads(p.read_text()) if p.exists() else None


def checkpoints(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob("ckpt-*.pt"), key=lambda p: int(p.stem.split("-")[1]))


def _load_latest(run_dir: Path, device) -> Optional[dict]:
    """The newest checkpoint that loads (a torn write falls back to the one before)."""
    for path in reversed(checkpoints(run_dir)):
        try:
            return torch.load(path, map_location=device, weights_only=False)
        except Exception as e:  # noqa: BLE001 - a damaged file: try the previous one
            print(f"[eos] skipping unreadable checkpoint {path.name}: {e}", file=sys.stderr)
    return None


class Trainer:
    """The pieces of one run; ``train()`` drives it.  Exposed so tests and
    tools (sampling, the sharpness benchmark) can build the same objects."""

    def __init__(self, cfg: RunConfig, device: Optional[torch.device] = None):
        self.cfg = cfg
        self.device = device or resolve_device(cfg.train.device)
        torch.manual_seed(cfg.train.seed)
        self.model = build_unet(cfg.model.preset, cfg.data.image_size, cfg.data.channels, cfg.model.dropout).to(self.device)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.schedule = NoiseSchedule.from_config(cfg.schedule)
        self.variant = build_variant(cfg.variant, self.schedule)
        self.batches = Batches(load_images(cfg.data), cfg.data, cfg.train.seed, self.device)
        self.optimizer = build_optimizer(cfg.optim, self.params)
        self.probe = None
        if cfg.sharpness.every > 0:
            from trainers.curvature.probe import SharpnessProbe
            self.probe = SharpnessProbe(cfg.sharpness, cfg.optim)
        self.hessian_draw = None
        self.sample_metrics = None  # trainers.run.fid.SampleMetrics when eval.every > 0
        self.step = 0
        self.wall_time = 0.0

    # --- state -----------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "wall_time": self.wall_time,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "variant": self.variant.state_dict(),
            "probe": self.probe.state_dict() if self.probe else None,
            "config": self.cfg.to_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.wall_time = state["wall_time"]
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.variant.load_state_dict(state["variant"])
        if self.probe and state.get("probe"):
            self.probe.load_state_dict(state["probe"])

    # --- pieces of a step ------------------------------------------------
    def draws(self, step: int):
        """The step's draw (batch, t/σ, noise), split into micro-batches."""
        x0 = self.batches.batch(step)
        g = step_generator(self.cfg.train.seed, 0 if self.cfg.train.fixed_noise else step, PURPOSE_DRAW, self.device)
        draw = self.variant.draw(x0, g, step)
        if self.cfg.data.batching == "full":
            return draw.split(self.cfg.data.batch_size)
        return draw.split(self.cfg.data.batch_size // self.cfg.optim.accumulate)

    def deterministic_objective(self) -> bool:
        """Fixed/full batch with fixed noise: every step minimises the same loss."""
        return self.cfg.train.fixed_noise and self.cfg.data.batching != "random"

    def frozen_hessian_draw(self, step: int):
        """The Hessian batch: fixed x₀, t/σ and noise (redrawn each probe
        only with ``sharpness.refresh_batch``).  When the training objective
        is deterministic (GD on a fixed batch with fixed noise), the Hessian
        batch is that objective's own draw (its first ``hessian_batch``
        examples), so λ₁ is the curvature of the loss GD actually descends."""
        if self.deterministic_objective():
            if self.hessian_draw is None:
                draw = self.draws(step)
                examples = min(self.cfg.sharpness.hessian_batch, sum(len(d) for d in draw))
                full = draw[0] if len(draw) == 1 else type(draw[0])(
                    *(torch.cat([getattr(d, f) for d in draw]) for f in ("x0", "t", "noise", "input_noise")),
                    draw[0].extra)
                self.hessian_draw = full.split(examples)[0]
            return self.hessian_draw
        if self.hessian_draw is None or self.cfg.sharpness.refresh_batch:
            x0 = self.batches.hessian_batch(self.cfg.sharpness.hessian_batch)
            s = step if self.cfg.sharpness.refresh_batch else 0
            g = step_generator(self.cfg.train.seed, s, PURPOSE_HESSIAN, self.device)
            self.hessian_draw = self.variant.draw(x0, g, s)
        return self.hessian_draw

    def frozen_loss(self, draw) -> Callable[[], torch.Tensor]:
        return lambda: self.variant.loss(self.model, draw).mean()

    def measure_sharpness(self, step: int, lr: float, train_draw) -> dict:
        fused = self._fused()
        self.model.eval()
        self.model.set_fused_attention(False)
        try:
            batch_fn = self.frozen_loss(train_draw) if self.cfg.sharpness.batch_sharpness else None
            return self.probe.measure(self.model, self.frozen_loss(self.frozen_hessian_draw(step)),
                                      self.optimizer, lr, batch_fn)
        finally:
            self.model.train()
            self.model.set_fused_attention(fused)

    def _fused(self) -> bool:
        from trainers.diffusion.unet import AttnBlock
        return any(m.fused for m in self.model.modules() if isinstance(m, AttnBlock))

    def update_ema(self) -> None:
        d = self.cfg.train.ema_decay
        with torch.no_grad():
            for pe, p in zip(self.ema.parameters(), self.model.parameters()):
                pe.lerp_(p, 1.0 - d)


def _prepare_run_dir(cfg: RunConfig, run_dir: Path, resume: bool) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = run_dir / "config.json"
    has_state = cfg_path.exists() or checkpoints(run_dir) or (run_dir / "steps").exists()
    if has_state and resume and cfg_path.exists():
        old = json.loads(cfg_path.read_text())
        if old != cfg.to_dict():
            diff = sorted(f"{k}" for k in set(old) | set(cfg.to_dict()) if old.get(k) != cfg.to_dict().get(k))
            raise ConfigError(f"run_dir: {run_dir} holds a run with a different config (sections differ: "
                              f"{', '.join(diff)}); use another run dir or start fresh")
    if has_state and not resume:
        for p in checkpoints(run_dir):
            p.unlink()
        for p in (run_dir / "steps").glob("*.parquet") if (run_dir / "steps").exists() else []:
            p.unlink()
        (run_dir / "status.json").unlink(missing_ok=True)
    _write_json(cfg_path, cfg.to_dict())


def train(cfg: RunConfig | dict, run_dir: str | os.PathLike, *, resume: bool = True,
          on_step: Optional[StepCallback] = None, on_checkpoint: Optional[CheckpointCallback] = None,
          progress: Optional[bool] = None, feature_extractor=None) -> RunResult:
    """Train one run to ``cfg.train.steps`` steps in ``run_dir``.

    ``resume``: continue from the newest checkpoint in ``run_dir`` (the
    config must match); otherwise start over.  ``on_step(row)`` is called
    after every step with the logged row; a non-empty string it returns ends
    the run with that status (e.g. ``"diverged"``).  ``on_checkpoint(path,
    steps_done)`` is called after each checkpoint is written.
    ``feature_extractor`` replaces Inception for FID/IS/KID (tests, tools).
    """
    cfg = run_config(cfg) if isinstance(cfg, dict) else cfg
    run_dir = Path(run_dir)
    progress = cfg.train.print_every > 0 if progress is None else progress
    status = read_status(run_dir) if resume else None
    if status and status["status"] in ("completed", "diverged", "stopped") and resume:
        _prepare_run_dir(cfg, run_dir, resume=True)  # still refuses a different config
        return RunResult(status["status"], status["steps_done"], status["final_loss"], status.get("reason"), run_dir)
    _prepare_run_dir(cfg, run_dir, resume)

    trainer = Trainer(cfg)
    if cfg.eval.every:
        # Built once, before training: loads the feature extractor and the real
        # images' features; missing Inception weights fail here, not hours in.
        from trainers.run.fid import SampleMetrics
        trainer.sample_metrics = SampleMetrics(trainer.batches.images, feature_extractor=feature_extractor,
                                               inception_weights=cfg.eval.inception_weights,
                                               device=trainer.device, batch_size=cfg.eval.batch_size)
    log = StepLog(run_dir / "steps")
    state = _load_latest(run_dir, trainer.device) if resume else None
    if state is not None:
        trainer.load_state_dict(state)
        if progress:
            print(f"[eos] resuming {run_dir} at step {trainer.step}", flush=True)
    log.truncate_after(trainer.step - 1)

    def checkpoint() -> None:
        log.flush()
        path = run_dir / "checkpoints" / f"ckpt-{trainer.step:09d}.pt"
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        torch.save(trainer.state_dict(), tmp)
        os.replace(tmp, path)
        for old in checkpoints(run_dir)[: -cfg.train.keep_checkpoints]:
            old.unlink()
        _write_json(run_dir / "status.json", _status("running", trainer, last_loss, None))
        if on_checkpoint:
            on_checkpoint(path, trainer.step)

    last_loss: Optional[float] = None
    row: Optional[dict] = None
    final_status, reason = "completed", None
    t_print, s_print = time.perf_counter(), trainer.step
    while trainer.step < cfg.train.steps:
        step = trainer.step
        t0 = time.perf_counter()
        lr = learning_rate(cfg, step)
        for group in trainer.optimizer.param_groups:
            group["lr"] = lr
        draws = trainer.draws(step)

        row = {"step": step, "lr": lr}
        if trainer.probe and step % cfg.sharpness.every == 0:
            row.update(trainer.measure_sharpness(step, lr, draws[0]))
        else:
            row["threshold"] = stability_threshold(cfg.optim, lr)

        torch.manual_seed((cfg.train.seed * 1_000_003 + step) * 16 + PURPOSE_DROPOUT)
        trainer.optimizer.zero_grad(set_to_none=True)
        n_total = sum(len(d) for d in draws)
        loss_sum, stats = 0.0, {}
        for d in draws:
            with torch.autocast(trainer.device.type, dtype=torch.bfloat16, enabled=cfg.train.bf16):
                per_example = trainer.variant.loss(trainer.model, d)
            loss = per_example.float().mean()
            (loss * (len(d) / n_total)).backward()
            loss_sum += loss.item() * len(d)
            stats.update(trainer.variant.observe(d, per_example.detach(), step))
        last_loss = loss_sum / n_total
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip is not None else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trainer.params, clip))
        row.update(loss=last_loss, grad_norm=grad_norm, variant_stats=stats or None)

        diverged = not math.isfinite(last_loss) or last_loss > cfg.train.divergence_loss or not math.isfinite(grad_norm)
        if not diverged:
            trainer.optimizer.step()
            trainer.update_ema()
        trainer.wall_time += time.perf_counter() - t0
        row["wall_time"] = trainer.wall_time
        log.append(**row)
        trainer.step = step + 1

        if cfg.eval.grid_every and trainer.step % cfg.eval.grid_every == 0 and not diverged:
            save_sample_grid(trainer, run_dir)
        if cfg.eval.every and trainer.step % cfg.eval.every == 0 and not diverged:
            _evaluate_into_log(trainer, log, row)
        verdict = on_step(row) if on_step else None
        if diverged:
            final_status, reason = "diverged", f"loss {last_loss:.4g}, grad norm {grad_norm:.4g} at step {step}"
            break
        if verdict:
            final_status, reason = verdict, f"stopped by callback at step {step}"
            break
        if trainer.step % cfg.train.checkpoint_every == 0 and trainer.step < cfg.train.steps:
            checkpoint()
        if progress and cfg.train.print_every and (trainer.step % cfg.train.print_every == 0 or trainer.step == cfg.train.steps):
            now = time.perf_counter()
            rate = (trainer.step - s_print) / max(now - t_print, 1e-9)
            t_print, s_print = now, trainer.step
            print(_progress_line(cfg, trainer.step, row, rate), flush=True)

    if final_status == "completed" and row is not None:
        if cfg.eval.every and trainer.step % cfg.eval.every:
            _evaluate_into_log(trainer, log, row)
        if cfg.eval.grid_every and trainer.step % cfg.eval.grid_every:
            save_sample_grid(trainer, run_dir)
    if final_status == "diverged":
        log.flush()
    else:
        checkpoint()
    _write_json(run_dir / "status.json", _status(final_status, trainer, last_loss, reason))
    if progress:
        print(f"[eos] {final_status}: {trainer.step} steps, final loss {last_loss:.4g}"
              + (f" ({reason})" if reason else "") + f" -> {run_dir}", flush=True)
    return RunResult(final_status, trainer.step, last_loss, reason, run_dir)


def _status(status: str, trainer: Trainer, loss: Optional[float], reason: Optional[str]) -> dict:
    loss = loss if loss is None or math.isfinite(loss) else str(loss)
    return {"status": status, "steps_done": trainer.step, "final_loss": loss, "reason": reason,
            "wall_time": trainer.wall_time}


def _progress_line(cfg: RunConfig, steps_done: int, row: dict, rate: float) -> str:
    parts = [f"[eos] {cfg.variant.name} lr={cfg.optim.lr:g} step {steps_done}/{cfg.train.steps}",
             f"loss {row['loss']:.4f}"]
    lam = row.get("lambda_precond") if row.get("lambda_precond") is not None else row.get("lambda_max")
    if lam is not None:
        parts.append(f"λ₁ {lam:.4g}")
    if row.get("ratio") is not None:
        parts.append(f"λ₁/threshold {row['ratio']:.3f}")
    parts.append(f"{rate:.2f} steps/s")
    return " | ".join(parts)


def generate_samples(trainer: Trainer, n: int, seed_offset: int = 0) -> torch.Tensor:
    """``n`` images in [-1, 1] from the EMA weights with the configured sampler."""
    from trainers.diffusion.samplers import generate

    ev = trainer.cfg.eval
    g = step_generator(trainer.cfg.train.seed, trainer.step + seed_offset, PURPOSE_SAMPLES, trainer.device)
    return generate(trainer.ema, trainer.variant, n, ev.sampler, ev.sampler_steps, ev.batch_size, g, trainer.device)


def save_sample_grid(trainer: Trainer, run_dir: Path) -> Path:
    from trainers.diffusion.samplers import save_grid

    images = generate_samples(trainer, trainer.cfg.eval.grid_size)
    path = run_dir / "samples" / f"step-{trainer.step:09d}.png"
    path.parent.mkdir(exist_ok=True)
    save_grid(images, path)
    return path


def _evaluate_into_log(trainer: Trainer, log: StepLog, row: dict) -> None:
    """FID/IS/KID of EMA samples against the training images, written into
    the log row of the step just taken (still buffered: eval runs before the
    checkpoint that flushes it)."""
    from trainers.run.data import to_uint8

    metrics = trainer.sample_metrics(to_uint8(generate_samples(trainer, trainer.cfg.eval.samples)))
    log.update_last(**{k: metrics.get(k) for k in ("fid", "inception_score", "kid")})
    row.update({k: metrics.get(k) for k in ("fid", "inception_score", "kid")})
