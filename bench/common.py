"""What the benchmarks share: timing, Markdown tables, and the measured problem.

A :class:`Problem` is the project's own :class:`trainers.run.loop.Trainer`
(model, data, variant, Adam) with the frozen Hessian batch the probe uses,
its loss closure, and the Hessian operators of :mod:`trainers.curvature.hessian`.
"""
from __future__ import annotations

import contextlib
import math
import platform
import statistics
import time
from typing import Callable, Optional, Sequence

import torch

from trainers.config import RunConfig, merge, run_config
from trainers.curvature.hessian import DoubleBackwardHessian, flatten, trainable_parameters
from trainers.curvature.thresholds import adam_preconditioner
from trainers.diffusion.unet import probe_mode
from trainers.run.loop import Trainer, learning_rate


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn: Callable[[], object], device: torch.device):
    """(wall seconds, result) of one call, the device synchronised around it."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def timed(fn: Callable[[], object], device: torch.device, reps: int):
    """(median seconds, last result) of ``reps`` calls after one warm-up call."""
    out = fn()
    times = []
    for _ in range(max(1, reps)):
        t, out = seconds(fn, device)
        times.append(t)
    return statistics.median(times), out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def fmt(x, digits: int = 3) -> str:
    if x is None:
        return "—"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        return f"{x:.{digits}g}" if abs(x) < 1e5 else f"{x:.4e}"
    return str(x)


def table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A Markdown table (cells through :func:`fmt`)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def bench_config(*, preset: str, image_size: int, batch: int, device: str, data: Optional[str] = None,
                 lr: float = 1e-4, seed: int = 0, overrides: Sequence[str] = ()) -> RunConfig:
    """The run config a bench measures: the ``base`` variant, Adam at ``lr``,
    no dropout, training and Hessian batch ``batch``, the probe at every
    step; ``data``: an npz file (default: synthetic images); ``overrides``:
    ``SECTION.KEY=VALUE`` strings, as ``eos train --set`` takes them."""
    from trainers.run.cli import parse_override

    data_cfg = ({"name": "npz", "path": data} if data
                else {"name": "synthetic", "synthetic_size": max(4 * batch, 256)})
    cfg = {
        "model": {"preset": preset, "dropout": 0.0},
        "variant": {"name": "base"},
        "data": {**data_cfg, "image_size": image_size, "batch_size": batch},
        "optim": {"name": "adam", "lr": lr},
        # the benches probe between steps, before the next gradient exists: Adam's P of the state
        # (init2winit's convention; the solver's cost is the same for either)
        "sharpness": {"every": 1, "hessian_batch": batch, "adam_preconditioner": "init2winit"},
        "train": {"device": device, "seed": seed, "print_every": 0},
    }
    for text in overrides:
        cfg = merge(cfg, parse_override(text))
    return run_config(cfg)


class Problem:
    """A :class:`~trainers.run.loop.Trainer` and its frozen Hessian batch.

    ``loss()`` is the probe's loss closure (the variant's loss on the frozen
    batch); :meth:`train_step` is one optimizer step of the training loss on
    the trainer's batch of the step, at the loop's learning rate and gradient
    clipping (no EMA, variant statistics or logging: the bench measures the
    ``base`` variant), the model in training mode around it and in probe mode
    (:func:`probe_mode`) otherwise.
    """

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.trainer = Trainer(cfg)
        self.device = self.trainer.device
        self.model = self.trainer.model
        self.params = trainable_parameters(self.model)
        self.optimizer = self.trainer.optimizer
        self.draw = self.trainer.probing.hessian_draw(0)
        self.loss = self.trainer.probing.loss(self.model, self.draw)
        self.n = sum(p.numel() for p in self.params)
        self.dtype = self.params[0].dtype
        self.step = 0
        self._probe_mode = contextlib.ExitStack()
        self._probe_mode.enter_context(probe_mode(self.model))

    @property
    def lr(self) -> float:
        """The learning rate of the next step."""
        return learning_rate(self.cfg, self.step)

    def train_step(self) -> float:
        self._probe_mode.close()   # training mode, as the trainer built the model
        try:
            lr = learning_rate(self.cfg, self.step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.zero_grad(set_to_none=True)
            draws = self.trainer.draws(self.step)
            total = sum(len(d) for d in draws)
            loss_sum = 0.0
            for d in draws:
                loss = self.trainer.variant.loss(self.model, d).mean()
                (loss * (len(d) / total)).backward()
                loss_sum += float(loss.detach()) * len(d)
            if self.cfg.optim.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            return loss_sum / total
        finally:
            self._probe_mode.enter_context(probe_mode(self.model))

    def hessian(self, **options) -> DoubleBackwardHessian:
        """The probe's default Hessian operator of the frozen-batch loss."""
        return DoubleBackwardHessian(self.loss, self.params, model=self.model, **options)

    def preconditioner_scale(self) -> torch.Tensor:
        """d = P^{-1/2} (flat) from Adam's current second moment."""
        P = adam_preconditioner(self.optimizer, self.params, self.cfg.sharpness.adam_preconditioner)
        if P is None:
            raise RuntimeError("the preconditioner needs at least one Adam step (--pretrain >= 1)")
        return flatten(P).to(self.dtype).rsqrt()
