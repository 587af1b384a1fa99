"""Typed configuration for one training run.

Configuration flows one way: a dict (from a YAML/JSON spec or CLI flags) is
turned into these dataclasses by :func:`from_dict`, which rejects unknown keys
and wrong types, and each dataclass validates its own values in
``__post_init__``.  Every error is a :class:`ConfigError` whose message starts
with the dotted path of the offending field (``optim.lr: must be > 0``).

The defaults written here are the only defaults: nothing downstream invents
its own.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


def _fail(path: str, message: str) -> None:
    raise ConfigError(f"{path}: {message}")


def _check(cond: bool, path: str, message: str) -> None:
    if not cond:
        _fail(path, message)


def _choice(value: str, choices: tuple[str, ...], path: str) -> None:
    _check(value in choices, path, f"must be one of {', '.join(choices)}; got {value!r}")


@dataclass
class ModelConfig:
    """U-Net preset and overrides (see ``trainers.diffusion.unet.PRESETS``)."""
    preset: str = "tiny"
    dropout: Optional[float] = None  # None: the preset's own value

    def __post_init__(self):
        from trainers.diffusion.unet import PRESETS
        _choice(self.preset, tuple(PRESETS), "model.preset")
        if self.dropout is not None:
            _check(0.0 <= self.dropout < 1.0, "model.dropout", f"must be in [0, 1); got {self.dropout}")


DATASETS = ("synthetic", "cifar10", "npz", "imagefolder")


@dataclass
class DataConfig:
    """Where images come from and how batches are drawn.

    ``batching``: ``random`` draws a fresh mini-batch each step, ``fixed``
    uses the same mini-batch every step (fixed-batch GD), ``full`` uses the
    whole (subset) data set every step, accumulated in chunks of
    ``batch_size`` (full-batch GD).
    """
    name: str = "synthetic"
    path: Optional[str] = None          # npz file, imagefolder root, or cifar10 download dir
    subset: Optional[int] = None        # fixed-size subset of the training set (EoS studies: 5000)
    image_size: int = 16                # the built-in default is CPU-sized: see eos train --help
    channels: int = 3
    flip: bool = True
    batch_size: int = 16
    batching: str = "random"
    synthetic_size: int = 512           # number of generated images for ``synthetic``
    download: bool = True               # cifar10: download into ``path`` when missing

    def __post_init__(self):
        _choice(self.name, DATASETS, "data.name")
        _choice(self.batching, ("random", "fixed", "full"), "data.batching")
        _check(self.batch_size >= 1, "data.batch_size", f"must be >= 1; got {self.batch_size}")
        _check(self.image_size >= 8 and self.image_size % 8 == 0, "data.image_size",
               f"must be a multiple of 8 and >= 8; got {self.image_size}")
        _check(self.channels in (1, 3), "data.channels", f"must be 1 or 3; got {self.channels}")
        if self.subset is not None:
            _check(self.subset >= 1, "data.subset", f"must be >= 1; got {self.subset}")
        _check(self.synthetic_size >= 1, "data.synthetic_size", f"must be >= 1; got {self.synthetic_size}")
        if self.name == "synthetic" and self.subset is not None:
            _check(self.subset <= self.synthetic_size, "data.subset",
                   f"{self.subset} is larger than data.synthetic_size={self.synthetic_size}")
        if self.name in ("npz", "imagefolder"):
            _check(self.path is not None, "data.path", f"is required for data.name={self.name!r}")


@dataclass
class ScheduleConfig:
    """Discrete-time variance-preserving noise schedule."""
    kind: str = "linear"
    timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def __post_init__(self):
        _choice(self.kind, ("linear", "cosine"), "schedule.kind")
        _check(self.timesteps >= 2, "schedule.timesteps", f"must be >= 2; got {self.timesteps}")
        _check(0 < self.beta_start < self.beta_end < 1, "schedule.beta_start",
               f"need 0 < beta_start < beta_end < 1; got {self.beta_start}, {self.beta_end}")


OPTIMIZERS = ("gd", "momentum", "adam", "adamw")
#: the optimizers whose stability threshold applies to P⁻¹H (P from the second-moment estimate) rather than H
PRECONDITIONED_OPTIMIZERS = ("adam", "adamw")
#: optimizers whose weight decay is coupled L2 (added to the gradient, so the update's curvature is H + wd·I)
COUPLED_DECAY_OPTIMIZERS = ("gd", "momentum", "adam")


@dataclass
class OptimConfig:
    """Optimizer and its hyper-parameters.

    ``gd``: plain gradient descent (SGD without momentum); ``momentum``:
    heavy-ball SGD with coefficient ``momentum``; ``adam``/``adamw``.
    """
    name: str = "adam"
    lr: float = 1e-4
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: Optional[float] = None   # max global grad norm; None: no clipping
    accumulate: int = 1                 # micro-batches per step (batch_size split evenly)
    warmup_steps: int = 0               # linear lr warm-up (0: constant lr, as EoS studies use)

    def __post_init__(self):
        _choice(self.name, OPTIMIZERS, "optim.name")
        _check(isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0,
               "optim.lr", f"must be a finite number > 0; got {self.lr}")
        _check(0.0 <= self.momentum < 1.0, "optim.momentum", f"must be in [0, 1); got {self.momentum}")
        _check(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas), "optim.betas",
               f"must be two numbers in [0, 1); got {self.betas}")
        _check(self.eps > 0, "optim.eps", f"must be > 0; got {self.eps}")
        _check(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0; got {self.weight_decay}")
        if self.grad_clip is not None:
            _check(self.grad_clip > 0, "optim.grad_clip", f"must be > 0 or null; got {self.grad_clip}")
        _check(self.accumulate >= 1, "optim.accumulate", f"must be >= 1; got {self.accumulate}")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0; got {self.warmup_steps}")


@dataclass
class VariantConfig:
    """Which stabilization variant trains the model, and its options.

    ``options`` belong to the variant (each variant validates its own, see
    ``trainers.diffusion.variants``); ``offset_noise`` and ``input_perturbation`` apply
    to every variant.
    """
    name: str = "base"
    options: dict[str, Any] = field(default_factory=dict)
    offset_noise: float = 0.0
    input_perturbation: float = 0.0

    def __post_init__(self):
        from trainers.diffusion.variants import VARIANTS
        _choice(self.name, tuple(VARIANTS), "variant.name")
        _check(self.offset_noise >= 0, "variant.offset_noise", f"must be >= 0; got {self.offset_noise}")
        _check(self.input_perturbation >= 0, "variant.input_perturbation",
               f"must be >= 0; got {self.input_perturbation}")


#: Hessian-vector product methods, the names of trainers.curvature.hessian.PRODUCTS
HVP_METHODS = ("double_backward", "double_backward_batched", "forward_over_reverse", "forward_over_reverse_vmap")
#: arithmetic of float32 Hessian-vector products: "float32" (TF32 off) or "tf32" (trainers.curvature.hessian)
PRECISIONS = ("float32", "tf32")
#: warm-probe solvers (sharpness.solver) and exploration columns (sharpness.explore)
SOLVERS = ("track", "lobpcg")
EXPLORATIONS = ("gradient", "random", "none")
# which Adam preconditioner λ₁(P⁻¹H) uses (trainers.curvature.thresholds.adam_preconditioner):
# "update": the one of the update being taken, P = (1 − β₁ᵗ⁺¹)(√v̂ₜ₊₁ + ε) with this step's gradient in v̂
# (Cohen et al. 2022); "init2winit": √v̂ₜ + ε of the state before the step (google/init2winit)
ADAM_PRECONDITIONERS = ("update", "init2winit")


@dataclass
class SharpnessConfig:
    """The per-step curvature probe (λ₁ of the (preconditioned) Hessian).

    ``every``: probe every N steps (1: every step, 0: off).  The Hessian is
    taken of the variant's loss on a frozen batch of ``hessian_batch``
    examples (fixed x₀, t/σ and noise, dropout off) that follows the
    variant's current objective (:mod:`trainers.run.probing`).
    """
    every: int = 1
    hessian_batch: int = 8
    block_size: int = 2          # LOBPCG block size k >= 2
    topk: int = 1                # eigenvalues recorded (<= block_size)
    tol: float = 1e-2            # relative residual ||Hv - λv|| / |λ| to stop (λ error <~ tol²: bench/RESULTS.md)
    # relative λ accuracy: where the top Ritz values are closer than tol allows for (λ error ≈ residual² / gap),
    # the residual is tightened to √(accuracy · gap / λ) (trainers.curvature.lobpcg.stopping_tolerances); 0: tol alone
    accuracy: float = 1e-3
    max_iters: int = 100
    warm_start: bool = True
    precondition: str = "auto"   # auto: P^-1 H for Adam/AdamW, plain H otherwise; or "none"
    plain_lambda: bool = True    # with P^-1 H, also solve for the plain λ₁(H) (a second eigen-solve)
    plain_every: int = 1         # with plain_lambda: λ₁(H) at every N-th probe only (lambda_max null between)
    adam_preconditioner: str = "update"   # ADAM_PRECONDITIONERS: P of the update being taken, or init2winit's
    trace_samples: int = 0       # Hutchinson probes (0: off)
    # batch sharpness (Andreyev & Beneventano 2024): Monte-Carlo mean of gᵀH_Bg/‖g‖² over fresh training
    # mini-batches B in train mode, until its relative standard error is <= batch_sharpness_rse or
    # batch_sharpness_max_batches batches were drawn (at least 2); also the step's own batch (step_sharpness)
    batch_sharpness: bool = False
    batch_sharpness_rse: float = 0.01
    batch_sharpness_max_batches: int = 100
    refresh_batch: bool = False  # draw a new Hessian batch at every probe instead of a fixed one
    hvp: str = "double_backward"  # Hessian-vector product method (HVP_METHODS)
    # "tf32": on GPUs with TF32 (compute capability >= 8) LOBPCG searches with TF32 products and checks the
    # answer with float32 ones (reported λ and residual are float32 values); "float32": every product float32
    search_precision: str = "tf32"
    # "track" (default): a warm probe does one Rayleigh-Ritz step on the previous top Ritz vectors and an
    # exploration column, and LOBPCG only if that misses tol; "lobpcg": LOBPCG from the previous vectors
    # (trainers.curvature.lobpcg.track / lobpcg)
    solver: str = "track"
    # the exploration column of a warm "track" solve: "gradient" (of the Hessian-batch loss; P^-1/2-scaled for
    # P^-1 H), "random", or "none" (warm vectors only: can lock onto a stale direction)
    explore: str = "gradient"
    # with the TF32 search and the "track" solver: check λ with float32 products every N-th probe (the cold
    # probe always; 1: every probe, 0: never); the eig_check column holds |λ_TF32 - λ_float32| / λ there, and
    # the probes between checks report the TF32 λ times the last check's λ_float32 / λ_TF32
    # (trainers.curvature.probe.SharpnessProbe._calibrated)
    verify_every: int = 10
    # CUDA: replay each Hessian-vector product's second backward pass as a CUDA graph (one launch instead of
    # thousands; trainers.curvature.hessian); no effect on the CPU or with other hvp methods
    cuda_graphs: bool = True
    # with CUDA graphs: keep the probe's Hessian operator from one probe to the next while the Hessian batch stays
    # the same, replaying its gradient graph (forward + first backward) and its products as recorded CUDA graphs
    # instead of building and recording them at every probe; the gradient graph's memory stays allocated between
    # probes (trainers.curvature.hessian, "Resident"); no effect on the CPU
    resident: bool = True
    # critical sharpness 2/η_c (Kalra et al. 2026; trainers.curvature.critical): line search for the smallest η at
    # which the update raises the Hessian-batch loss, to 1 - η_lo/η_hi <= critical_tol, in <= critical_max_passes
    # forward passes
    critical: bool = False
    critical_tol: float = 0.0625
    critical_max_passes: int = 16
    # count the eigenvalues of the measured operator (the one in ratio) above above_fraction × threshold
    # (0.75: centralflows' 1.5/η under GD), growing the solver's wanted columns while the smallest is still
    # above, at most above_cap of them (n_above, n_above_capped, above_values).  above_cap 0 (default) or
    # above_fraction 0: no count (it costs about two products per counted eigenvalue and probe, far more in
    # Adam's opening steps: bench/RESULTS.md); e.g. above_cap: 8 turns it on
    above_fraction: float = 0.75
    above_cap: int = 0

    def __post_init__(self):
        _check(self.every >= 0, "sharpness.every", f"must be >= 0; got {self.every}")
        _check(self.plain_every >= 1, "sharpness.plain_every", f"must be >= 1; got {self.plain_every}")
        _check(self.hessian_batch >= 1, "sharpness.hessian_batch", f"must be >= 1; got {self.hessian_batch}")
        _check(self.block_size >= 2, "sharpness.block_size", f"must be >= 2 (block solver); got {self.block_size}")
        _check(1 <= self.topk <= self.block_size, "sharpness.topk",
               f"must be in [1, block_size={self.block_size}]; got {self.topk}")
        _check(0 < self.tol < 1, "sharpness.tol", f"must be in (0, 1); got {self.tol}")
        _check(0 <= self.accuracy < 1, "sharpness.accuracy", f"must be in [0, 1); got {self.accuracy}")
        _check(self.max_iters >= 1, "sharpness.max_iters", f"must be >= 1; got {self.max_iters}")
        _choice(self.precondition, ("auto", "none"), "sharpness.precondition")
        _choice(self.adam_preconditioner, ADAM_PRECONDITIONERS, "sharpness.adam_preconditioner")
        _check(0 < self.batch_sharpness_rse < 1, "sharpness.batch_sharpness_rse",
               f"must be in (0, 1); got {self.batch_sharpness_rse}")
        _check(self.batch_sharpness_max_batches >= 2, "sharpness.batch_sharpness_max_batches",
               f"must be >= 2 (a standard error needs two batches); got {self.batch_sharpness_max_batches}")
        _check(self.trace_samples >= 0, "sharpness.trace_samples", f"must be >= 0; got {self.trace_samples}")
        _choice(self.hvp, HVP_METHODS, "sharpness.hvp")
        _choice(self.search_precision, PRECISIONS, "sharpness.search_precision")
        _choice(self.solver, SOLVERS, "sharpness.solver")
        _choice(self.explore, EXPLORATIONS, "sharpness.explore")
        _check(self.verify_every >= 0, "sharpness.verify_every", f"must be >= 0; got {self.verify_every}")
        _check(0 < self.critical_tol < 1, "sharpness.critical_tol", f"must be in (0, 1); got {self.critical_tol}")
        _check(self.critical_max_passes >= 3, "sharpness.critical_max_passes",
               f"must be >= 3 (the loss, a guess and one more); got {self.critical_max_passes}")
        _check(self.above_fraction >= 0 and math.isfinite(self.above_fraction), "sharpness.above_fraction",
               f"must be >= 0 (0: off); got {self.above_fraction}")
        _check(self.above_cap == 0 or self.above_cap >= self.topk, "sharpness.above_cap",
               f"must be 0 (off) or >= topk={self.topk}; got {self.above_cap}")


SAMPLERS = ("ddpm", "ddim", "heun", "dpmpp2m")


@dataclass
class EvalConfig:
    """Sampling and sample-quality metrics during training (EMA weights)."""
    every: int = 0                # FID/IS/KID every N steps and at the end (0: off)
    samples: int = 1000           # generated images per evaluation
    batch_size: int = 250
    sampler: str = "ddim"
    sampler_steps: int = 50
    grid_every: int = 0           # save a sample grid PNG every N steps and at the end (0: off)
    grid_size: int = 64
    inception_weights: Optional[str] = None  # local path to torch-fidelity's Inception weights

    def __post_init__(self):
        _check(self.every >= 0, "eval.every", f"must be >= 0; got {self.every}")
        _check(self.samples >= 2, "eval.samples", f"must be >= 2; got {self.samples}")
        _check(self.batch_size >= 1, "eval.batch_size", f"must be >= 1; got {self.batch_size}")
        _choice(self.sampler, SAMPLERS, "eval.sampler")
        _check(self.sampler_steps >= 1, "eval.sampler_steps", f"must be >= 1; got {self.sampler_steps}")
        _check(self.grid_every >= 0, "eval.grid_every", f"must be >= 0; got {self.grid_every}")
        _check(self.grid_size >= 1, "eval.grid_size", f"must be >= 1; got {self.grid_size}")


@dataclass
class TrainConfig:
    """The loop: length, seed, precision, EMA, checkpoints, logging."""
    steps: int = 20
    seed: int = 0
    device: str = "auto"          # auto: cuda when available, else cpu
    bf16: bool = False            # bf16 autocast for the training step (CUDA)
    ema_decay: float = 0.999
    checkpoint_every: int = 10    # also flushes the Parquet log
    keep_checkpoints: int = 2
    print_every: int = 10         # progress line every N steps, and after every step slower than 1 s (0: quiet)
    fixed_noise: bool = False     # same t/σ and noise every step (deterministic objective)
    divergence_loss: float = 1e6  # a loss above this (or NaN/inf) ends the run as diverged

    def __post_init__(self):
        _check(self.steps >= 1, "train.steps", f"must be >= 1; got {self.steps}")
        _check(0.0 <= self.ema_decay < 1.0, "train.ema_decay", f"must be in [0, 1); got {self.ema_decay}")
        _check(self.checkpoint_every >= 1, "train.checkpoint_every", f"must be >= 1; got {self.checkpoint_every}")
        _check(self.keep_checkpoints >= 1, "train.keep_checkpoints", f"must be >= 1; got {self.keep_checkpoints}")
        _check(self.print_every >= 0, "train.print_every", f"must be >= 0; got {self.print_every}")
        _check(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), "train.device",
               f"must be auto, cpu, cuda or cuda:N; got {self.device!r}")
        _check(self.divergence_loss > 0, "train.divergence_loss", f"must be > 0; got {self.divergence_loss}")


@dataclass
class RunConfig:
    """Everything one training run (one trial) needs."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    variant: VariantConfig = field(default_factory=VariantConfig)
    sharpness: SharpnessConfig = field(default_factory=SharpnessConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if self.data.batching != "full":
            _check(self.data.batch_size % self.optim.accumulate == 0, "optim.accumulate",
                   f"must divide data.batch_size={self.data.batch_size}; got {self.optim.accumulate}")

    def to_dict(self) -> dict:
        return to_dict(self)


# ---------------------------------------------------------------------------
# dict <-> dataclass


def to_dict(obj) -> Any:
    """A JSON-ready copy of a config dataclass (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], path)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            _fail(path, f"must be a mapping; got {type(value).__name__}")
        return from_dict(tp, value, path)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):
                try:
                    return float(value)  # YAML reads 1e-3 as a string
                except ValueError:
                    pass
            _fail(path, f"must be a number; got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            _fail(path, f"must be an integer; got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            _fail(path, f"must be true or false; got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            _fail(path, f"must be a string; got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            _fail(path, f"must be a list of {len(args)} values; got {value!r}")
        return tuple(_convert(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            _fail(path, f"must be a list; got {value!r}")
        return [_convert(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            _fail(path, f"must be a mapping; got {value!r}")
        return dict(value)
    return value


def from_dict(cls, data: Optional[dict], path: str = ""):
    """Build dataclass ``cls`` from ``data``; unknown keys and bad types raise
    :class:`ConfigError` naming the field (``optim.lr: ...``)."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        _fail(path or cls.__name__, f"must be a mapping; got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in names:
            where = f"{path}.{key}" if path else key
            _fail(where, f"unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else key
        kwargs[key] = _convert(value, hints[key], where)
    return cls(**kwargs)


def run_config(data: Optional[dict] = None) -> RunConfig:
    """A validated :class:`RunConfig` from a (possibly partial) nested dict."""
    return from_dict(RunConfig, data or {})


def merge(base: dict, override: dict) -> dict:
    """Recursive dict merge; ``override`` wins.  Used to apply per-trial
    settings (variant, lr, seed) over a study's base config."""
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path, what: str):
    """The YAML (or JSON) document of ``path``; a ConfigError naming the file
    and line when it does not parse, or the file cannot be read."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{what}: cannot read {str(path)!r} ({type(err).__name__})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        context, start = getattr(err, "context", None), getattr(err, "context_mark", None)
        if context and start is not None and mark is not None and start.line != mark.line:
            problem += f", {context} from line {start.line + 1}"
        raise ConfigError(f"{what}: {where}: invalid YAML ({problem})") from None
