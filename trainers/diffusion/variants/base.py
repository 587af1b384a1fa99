"""The variant interface and the baseline: DDPM/DDIM ε-prediction, uniform t.

Every variant splits a training loss into two parts, so that the frozen
Hessian batch and the training step share one formula:

* ``draw(x0, generator, step)`` — the randomness: timesteps (or σ), noise,
  anything else the loss needs (a reference batch, perturbation noise);
* ``loss(model, draw)`` — a deterministic per-example loss of shape (B,).

``denoiser(model)`` returns D(x, σ) ≈ E[x₀ | x₀ + σε = x] in the
variance-exploding parameterisation, which every sampler uses.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional

import torch

from trainers.diffusion import parameterization as param
from trainers.config import ConfigError, VariantConfig, from_dict
from trainers.diffusion.schedules import NoiseSchedule


@dataclass
class Draw:
    """The randomness of one loss evaluation on a batch ``x0``: a batch type
    that splits and concatenates along the examples.

    ``t``: long timestep indices (discrete variants) or float σ (continuous).
    ``noise``: the regression target's noise ε.  ``input_noise``: the noise
    used to build the network input (differs from ``noise`` only under input
    perturbation).  ``extra``: variant-specific per-example tensors (first
    dimension the batch, e.g. adap_s's bins and weights, STF's reference
    indices), sliced and concatenated with the examples.  ``shared``:
    variant-specific tensors of the whole draw that every slice keeps whole
    (STF's reference pool, into which its reference indices point, so they
    stay valid in every micro-batch).
    """
    x0: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor
    input_noise: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)

    PER_EXAMPLE: ClassVar[tuple[str, ...]] = ("x0", "t", "noise", "input_noise")

    def __post_init__(self):
        n = self.x0.shape[0]
        for name, v in [(f, getattr(self, f)) for f in self.PER_EXAMPLE[1:]] + list(self.extra.items()):
            if not isinstance(v, torch.Tensor) or v.ndim == 0 or v.shape[0] != n:
                shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(f"Draw.{name}: a per-example field needs first dimension {n} (the batch); "
                                 f"got {shape} (whole-draw tensors belong in Draw.shared)")

    def to(self, device) -> "Draw":
        move = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v
        return Draw(*(move(getattr(self, f)) for f in self.PER_EXAMPLE), {k: move(v) for k, v in self.extra.items()},
                    {k: move(v) for k, v in self.shared.items()})

    def __len__(self) -> int:
        return self.x0.shape[0]

    def take(self, index: slice) -> "Draw":
        """The examples ``index`` (a slice) of this draw; ``shared`` whole."""
        return Draw(*(getattr(self, f)[index] for f in self.PER_EXAMPLE), {k: v[index] for k, v in self.extra.items()},
                    self.shared)

    def split(self, size: int) -> list["Draw"]:
        """Consecutive slices of at most ``size`` examples (gradient
        accumulation, full-batch chunks); :meth:`concatenate` inverts it."""
        return [self.take(slice(i, i + size)) for i in range(0, len(self), size)]

    @staticmethod
    def concatenate(draws: list["Draw"]) -> "Draw":
        """The draws' examples one after the other.  They must share one
        ``shared`` (slices of one draw do)."""
        if len(draws) == 1:
            return draws[0]
        first = draws[0]
        for d in draws[1:]:
            if set(d.extra) != set(first.extra) or set(d.shared) != set(first.shared) or any(
                    d.shared[k] is not v and not (isinstance(v, torch.Tensor) and torch.equal(d.shared[k], v))
                    for k, v in first.shared.items()):
                raise ValueError("Draw.concatenate: the draws differ in their extra fields or shared tensors "
                                 "(only slices of one draw can be concatenated)")
        return Draw(*(torch.cat([getattr(d, f) for d in draws]) for f in Draw.PER_EXAMPLE),
                    {k: torch.cat([d.extra[k] for d in draws]) for k in first.extra}, first.shared)


@dataclass
class NoOptions:
    pass


def per_example_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def check_option(ok: bool, name: str, message: str) -> None:
    """Validation for a variant's ``Options``: the error names the field."""
    if not ok:
        raise ConfigError(f"variant.options.{name}: {message}")


class Variant:
    """Shared interface.  Subclasses set ``name``, ``Options`` and override
    ``loss``/``denoiser`` (and ``sample_t`` or ``draw`` when they sample
    differently).  The default draw: uniform t, Gaussian noise, with offset
    noise and input perturbation from the :class:`VariantConfig`."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    continuous: ClassVar[bool] = False  # True: Draw.t holds σ, not timestep indices

    def __init__(self, schedule: NoiseSchedule, cfg: Optional[VariantConfig] = None):
        self.schedule = schedule
        self.cfg = cfg or VariantConfig(name=self.name or "base")
        try:
            self.options = from_dict(self.Options, self.cfg.options, "variant.options")
        except ConfigError:
            raise
        except TypeError as e:  # dataclass __init__ rejects something from_dict let through
            raise ConfigError(f"variant.options: {e}") from None

    # --- randomness -----------------------------------------------------
    def sample_t(self, batch: int, generator: torch.Generator, step: int, device) -> torch.Tensor:
        return torch.randint(0, self.schedule.timesteps, (batch,), generator=generator, device=device)

    def sample_noise(self, x0: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(target noise, input noise) with offset noise and input perturbation."""
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        if self.cfg.offset_noise > 0:
            offset = torch.randn((x0.shape[0], x0.shape[1], 1, 1), generator=generator, device=x0.device, dtype=x0.dtype)
            noise = noise + self.cfg.offset_noise * offset
        input_noise = noise
        if self.cfg.input_perturbation > 0:
            extra = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            input_noise = noise + self.cfg.input_perturbation * extra
        return noise, input_noise

    @property
    def sigma_range(self) -> tuple[float, float]:
        """(σ_min, σ_max) the denoiser was trained on; continuous-σ samplers
        (Heun, DPM-Solver++) start at σ_max and stop at σ_min."""
        return self.schedule.sigma_min, self.schedule.sigma_max

    def draw(self, x0: torch.Tensor, generator: torch.Generator, step: int = 0) -> Draw:
        t = self.sample_t(x0.shape[0], generator, step, x0.device)
        noise, input_noise = self.sample_noise(x0, generator)
        return Draw(x0=x0, t=t, noise=noise, input_noise=input_noise)

    # --- the objective the frozen Hessian batch measures ------------------
    #: True: with a fixed generator state (``train.fixed_noise``) and a fixed
    #: batch, ``draw`` gives the same draw at every step of one
    #: ``objective_id``; False when the draw moves with learned state at every
    #: step (adap_s's sampler), so that fixed noise does not fix the objective
    deterministic_draw: ClassVar[bool] = True

    def objective_id(self, step: int) -> int:
        """Which training objective step ``step``'s draw samples (pd: the
        curriculum stage).  The frozen Hessian batch is redrawn when it
        changes (:class:`trainers.run.probing.Probing`).  Default 0: one
        objective for the whole run."""
        return 0

    def hessian_draw(self, x0: torch.Tensor, generator: torch.Generator, step: int) -> Draw:
        """A draw of the objective at ``step`` for the frozen Hessian batch,
        before :meth:`follow_objective`.  Default: the training draw."""
        return self.draw(x0, generator, step)

    def follow_objective(self, d: Draw, step: int) -> Draw:
        """The frozen Hessian draw ``d`` brought to the objective at ``step``
        without redrawing it (adap_s: importance weights by the current
        sampler), at every probe.  Default: ``d`` itself."""
        return d

    # --- the loss ---------------------------------------------------------
    def loss(self, model: torch.nn.Module, d: Draw) -> torch.Tensor:
        raise NotImplementedError

    def denoiser(self, model: torch.nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        raise NotImplementedError

    # --- optional state (learned samplers, curricula) ---------------------
    def observe(self, d: Draw, per_example_loss: torch.Tensor, step: int) -> dict[str, float]:
        """Called after each training loss with the detached per-example
        losses; returns scalars to log.  Default: nothing."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Base(Variant):
    """ε-prediction with uniform timesteps (Ho et al. 2020): ‖ε − ε_θ(x_t, t)‖².

    Also the skeleton of every discrete-time variant: the network sees the VP
    state x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε and the timestep t, predicts
    ``prediction`` (see :mod:`trainers.diffusion.parameterization`), and the per-example
    loss is ``loss_weight(d) · ‖output − target(d)‖²``.  Subclasses change the
    timestep distribution (``sample_t``/``draw``), the target or the weight.
    """

    name = "base"
    prediction: str = "eps"

    def scales(self, t: torch.Tensor, ndim: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
        """(√ᾱ_t, √(1−ᾱ_t)) shaped to broadcast over an ``ndim`` batch."""
        return self.schedule.at(self.schedule.sqrt_alpha_bar, t, ndim), \
            self.schedule.at(self.schedule.sqrt_one_minus_alpha_bar, t, ndim)

    def target(self, d: Draw) -> torch.Tensor:
        alpha, s = self.scales(d.t, d.x0.ndim)
        return param.target(self.prediction, d.x0, d.noise, alpha, s)

    def loss_weight(self, d: Draw) -> Optional[torch.Tensor]:
        """Per-example weight (B,), or None for an unweighted loss."""
        return None

    def loss(self, model, d: Draw) -> torch.Tensor:
        x_t = self.schedule.q_sample(d.x0, d.t, d.input_noise)
        loss = per_example_mse(model(x_t, d.t.float()), self.target(d))
        weight = self.loss_weight(d)
        return loss if weight is None else weight * loss

    def denoiser(self, model):
        def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            sigma = param.batch_sigma(sigma, x)
            t = self.schedule.t_from_sigma(sigma).to(x.device)
            alpha, s = param.vp_scales(param.expand_like(sigma, x))
            x_t = alpha * x
            return param.to_x0(self.prediction, x_t, model(x_t, t).float(), alpha, s)
        return denoise
