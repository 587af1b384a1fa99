"""The study spec: one YAML file → typed, validated dataclasses.

A spec names *what to sweep* (``study``, ``search``), *how to run it*
(``resources``, ``early_stop``) and the *base run config* every trial
shares (the :class:`trainers.config.RunConfig` sections ``model``, ``data``,
``schedule``, ``optim``, ``variant``, ``sharpness``, ``eval``, ``train``)::

    study:
      name: smoke
      variants: [base, edm]
      optimizer: adam               # optim.name of every trial
      seeds: [0]                    # train.seed of every trial
      objective: final_loss         # final_loss (min) | fid (min) | largest_stable_lr (max)
      storage: results              # the study folder is <storage>/<name>
      max_failures: 2               # crashes of one trial Tune retries from its checkpoint
    search:
      algorithm: grid               # grid | optuna | boundary
      lr: {grid: [1e-3, 1e-4]}      # optuna: {log_uniform: [1e-5, 1e-2]}; boundary: {bracket: [1e-5, 1e-1]}
      # num_samples: 8              # optuna: trials per (variant, seed)
      seed: 0                       # seed of the TPE samplers
      # boundary: {k: 1, factor: 1.1}   # boundary: trials per round per (variant, seed); stop at hi/lo <= factor
    resources: {cpu: 1, gpu: 0.25, max_concurrent: 4}
    early_stop: {loss_blowup: 100, ratio_above: 20, ratio_steps: 200, edge_delta: null, edge_steps: 20}
    trackers:                       # Tune's MLflow / TensorBoard / W&B callbacks (study.trackers)
      every: 10                     # trials report loss, λ₁, ratio, ... every 10 steps
      mlflow: {tracking_uri: sqlite:///results/mlflow.db}
      # tensorboard: {}             # or the short form  trackers: [mlflow, tensorboard]
    model: {preset: tiny}
    data: {name: synthetic, image_size: 16}
    train: {steps: 10}
    ...

Each trial is (variant, lr, seed) applied over the base sections: the
per-trial fields ``optim.name``, ``optim.lr``, ``variant.name`` and
``train.seed`` come from ``study``/``search`` and may not be set in the base
sections.  :func:`load_spec` rejects unknown keys and bad values with a
:class:`trainers.config.ConfigError` naming the field
(``study.variants[2]: unknown variant 'foo'``), builds and validates the full
RunConfig of every trial, checks that data files exist, and resolves every
relative path against the current directory — all before anything launches.

The objective ``largest_stable_lr`` is the trial's learning rate when the
trial did not diverge and 0 when it did; maximised by Optuna it searches for
the edge of trainability, and the best value per variant is that variant's
largest stable learning rate among the trials run.  ``search.algorithm:
boundary`` finds the same edge by bracketing and k-section instead
(:mod:`study.boundary`): a trial is *unstable* when it ends ``diverged``
(the trainer's NaN/inf and ``train.divergence_loss`` checks, and the
``early_stop`` rules) and *stable* when it completes.
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from study.trackers import TrackersSection
from study.trackers import normalize as normalize_trackers
from study.trackers import resolve_paths as resolve_tracker_paths
from trainers.config import (OPTIMIZERS, ConfigError, DataConfig, RunConfig, from_dict, merge,
                             read_yaml, run_config, to_dict)
from trainers.run.preflight import check_run_inputs
from trainers.run.rundir import trial_id

PRESETS_DIR = Path(__file__).resolve().parent / "presets"

# objective -> Tune mode
OBJECTIVES = {"final_loss": "min", "fid": "min", "largest_stable_lr": "max"}
ALGORITHMS = ("grid", "optuna", "boundary")
MAX_NAME_BYTES = 255   # a file-name component on Linux, macOS and Windows file systems
RUN_SECTIONS = ("model", "data", "schedule", "optim", "variant", "sharpness", "eval", "train")
# fields each trial sets itself (field path -> where the value comes from)
PER_TRIAL_FIELDS = {
    ("optim", "name"): "study.optimizer",
    ("optim", "lr"): "search.lr",
    ("variant", "name"): "study.variants",
    ("variant", "options"): "study.variant_options",
    ("train", "seed"): "study.seeds",
}


def _fail(path: str, message: str):
    raise ConfigError(f"{path}: {message}")


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@dataclass
class StudySection:
    """What the study is: its name, the variants, optimizer, seeds, objective."""
    name: Optional[str] = None
    variants: list[str] = field(default_factory=lambda: ["base"])
    optimizer: str = "adam"
    seeds: list[int] = field(default_factory=lambda: [0])
    objective: str = "final_loss"
    storage: str = "results"
    max_failures: int = 2
    variant_options: dict[str, Any] = field(default_factory=dict)  # variant -> VariantConfig.options

    def __post_init__(self):
        from trainers.diffusion.variants import VARIANTS

        if not self.name:
            _fail("study.name", "is required (or pass --name)")
        if "/" in self.name or self.name in (".", "..") or self.name.startswith("."):
            _fail("study.name", f"must be a plain folder name; got {self.name!r}")
        if len(self.name.encode()) > MAX_NAME_BYTES:
            _fail("study.name", f"must be at most {MAX_NAME_BYTES} bytes (it names a folder); got "
                                f"{len(self.name.encode())}: {self.name[:40]!r}...")
        if not self.variants:
            _fail("study.variants", "must list at least one variant")
        for i, v in enumerate(self.variants):
            if v not in VARIANTS:
                _fail(f"study.variants[{i}]", f"unknown variant {v!r} (known: {', '.join(VARIANTS)})")
            if v in self.variants[:i]:
                _fail(f"study.variants[{i}]", f"duplicate variant {v!r}")
        if self.optimizer not in OPTIMIZERS:
            _fail("study.optimizer", f"must be one of {', '.join(OPTIMIZERS)}; got {self.optimizer!r}")
        if not self.seeds:
            _fail("study.seeds", "must list at least one seed")
        for i, s in enumerate(self.seeds):
            if s < 0:
                _fail(f"study.seeds[{i}]", f"must be >= 0; got {s}")
            if s in self.seeds[:i]:
                _fail(f"study.seeds[{i}]", f"duplicate seed {s}")
        if self.objective not in OBJECTIVES:
            _fail("study.objective", f"must be one of {', '.join(OBJECTIVES)}; got {self.objective!r}")
        if not self.storage:
            _fail("study.storage", "must be a folder path")
        if self.max_failures < 0:
            _fail("study.max_failures", f"must be >= 0; got {self.max_failures}")
        for v, options in self.variant_options.items():
            if v not in self.variants:
                _fail(f"study.variant_options.{v}", f"is not one of study.variants ({', '.join(self.variants)})")
            if not isinstance(options, dict):
                _fail(f"study.variant_options.{v}", f"must be a mapping of the variant's options; got {options!r}")


@dataclass
class LRSpace:
    """The learning-rate space: a ``grid`` list, a ``log_uniform`` [low, high]
    range (optuna), or a ``bracket`` [low, high] that holds the boundary (boundary)."""
    grid: Optional[list[float]] = None
    log_uniform: Optional[tuple[float, float]] = None
    bracket: Optional[tuple[float, float]] = None

    def __post_init__(self):
        if self.grid is not None:
            if not self.grid:
                _fail("search.lr.grid", "must list at least one learning rate")
            for i, lr in enumerate(self.grid):
                if not _positive_number(lr):
                    _fail(f"search.lr.grid[{i}]", f"must be > 0; got {lr}")
                if lr in self.grid[:i]:
                    _fail(f"search.lr.grid[{i}]", f"duplicate learning rate {lr}")
        if self.log_uniform is not None:
            low, high = self.log_uniform
            if not _positive_number(low):
                _fail("search.lr.log_uniform[0]", f"must be > 0; got {low}")
            if not (_positive_number(high) and high > low):
                _fail("search.lr.log_uniform[1]", f"must be > log_uniform[0]={low}; got {high}")
        if self.bracket is not None:
            low, high = self.bracket
            if not _positive_number(low):
                _fail("search.lr.bracket[0]", f"must be > 0; got {low}")
            if not (_positive_number(high) and high > low):
                _fail("search.lr.bracket[1]", f"must be > bracket[0]={low}; got {high}")


@dataclass
class BoundaryOptions:
    """The boundary search (``search.algorithm: boundary``, :mod:`study.boundary`).

    ``k``: trials per round of each (variant, seed), at ``k`` log-evenly
    spaced points inside the current bracket (1: bisection), run in parallel.
    ``factor``: the search of a (variant, seed) stops once its smallest
    unstable lr is at most ``factor`` × its largest stable lr.
    """
    k: int = 1
    factor: float = 1.1

    def __post_init__(self):
        if self.k < 1:
            _fail("search.boundary.k", f"must be >= 1; got {self.k}")
        if not (_positive_number(self.factor) and self.factor > 1):
            _fail("search.boundary.factor", f"must be > 1; got {self.factor}")


# the lr space each algorithm takes
LR_SPACES = {"grid": "grid", "optuna": "log_uniform", "boundary": "bracket"}


@dataclass
class SearchSection:
    """How learning rates are chosen: every grid point, Optuna TPE per
    (variant, seed), or a boundary search per (variant, seed)."""
    algorithm: str = "grid"
    lr: LRSpace = field(default_factory=LRSpace)
    num_samples: Optional[int] = None   # optuna: trials per (variant, seed)
    seed: int = 0                       # optuna: TPE sampler seed
    boundary: Optional[BoundaryOptions] = None   # boundary: k and factor (BoundaryOptions' defaults if absent)

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            _fail("search.algorithm", f"must be one of {', '.join(ALGORITHMS)}; got {self.algorithm!r}")
        wanted = LR_SPACES[self.algorithm]
        if getattr(self.lr, wanted) is None:
            shape = {"grid": "a list of learning rates", "log_uniform": "[low, high]",
                     "bracket": "[low, high] around the boundary"}[wanted]
            _fail(f"search.lr.{wanted}", f"is required for search.algorithm={self.algorithm} ({shape})")
        for algorithm, space in LR_SPACES.items():
            if space != wanted and getattr(self.lr, space) is not None:
                _fail(f"search.lr.{space}", f"is only for search.algorithm={algorithm}")
        if self.algorithm == "optuna":
            if self.num_samples is None or self.num_samples < 1:
                _fail("search.num_samples", f"must be >= 1 for search.algorithm=optuna; got {self.num_samples}")
        elif self.num_samples is not None:
            why = ("grid runs every variant × lr × seed once" if self.algorithm == "grid"
                   else "boundary stops when the bracket is narrower than search.boundary.factor")
            _fail("search.num_samples", f"is only for search.algorithm=optuna ({why})")
        if self.algorithm == "boundary":
            if self.boundary is None:
                self.boundary = BoundaryOptions()
            low, high = self.lr.bracket
            if high / low <= self.boundary.factor:
                _fail("search.lr.bracket", f"[{low:g}, {high:g}] is already narrower than "
                                           f"search.boundary.factor={self.boundary.factor:g}; widen it")
        elif self.boundary is not None:
            _fail("search.boundary", "is only for search.algorithm=boundary")


@dataclass
class ResourcesSection:
    """What one trial holds (Ray logical resources) and how many run at once."""
    cpu: float = 1.0
    gpu: float = 0.0                    # fractional slices (0.25) share a GPU; above 1: whole GPUs
    max_concurrent: int = 4
    # CUDA MPS for trials sharing a GPU on this machine (study.mps): null = when it can, true = required, false = never
    mps: Optional[bool] = None

    def __post_init__(self):
        if not self.cpu > 0:
            _fail("resources.cpu", f"must be > 0; got {self.cpu}")
        if self.gpu < 0:
            _fail("resources.gpu", f"must be >= 0; got {self.gpu}")
        if self.gpu > 1 and not float(self.gpu).is_integer():
            _fail("resources.gpu", f"above 1 must be a whole number of GPUs; got {self.gpu}")
        if self.max_concurrent < 1:
            _fail("resources.max_concurrent", f"must be >= 1; got {self.max_concurrent}")


@dataclass
class EarlyStopSection:
    """Rules that end a trial as ``diverged`` (on top of the trainer's own
    NaN/inf and ``train.divergence_loss`` checks).

    ``loss_blowup``: the loss exceeds this factor × the first step's loss.
    ``ratio_above``/``ratio_steps``: λ₁/threshold stays above ``ratio_above``
    for ``ratio_steps`` consecutive sharpness measurements.
    ``edge_delta``/``edge_steps``: after the EoS onset (the first measurement
    with λ₁/threshold ≥ 1 after one below 1, as in :mod:`analysis.metrics`),
    λ₁/threshold stays above 1 + ``edge_delta`` for ``edge_steps``
    consecutive measurements: the run does not settle at the edge of
    stability.  ``null`` turns a rule off.
    """
    loss_blowup: Optional[float] = 100.0
    ratio_above: Optional[float] = None
    ratio_steps: int = 20
    edge_delta: Optional[float] = None
    edge_steps: int = 20

    def __post_init__(self):
        if self.loss_blowup is not None and not self.loss_blowup > 1:
            _fail("early_stop.loss_blowup", f"must be > 1 or null; got {self.loss_blowup}")
        if self.ratio_above is not None and not self.ratio_above > 0:
            _fail("early_stop.ratio_above", f"must be > 0 or null; got {self.ratio_above}")
        if self.ratio_steps < 1:
            _fail("early_stop.ratio_steps", f"must be >= 1; got {self.ratio_steps}")
        if self.edge_delta is not None and not (math.isfinite(self.edge_delta) and self.edge_delta >= 0):
            _fail("early_stop.edge_delta", f"must be >= 0 or null; got {self.edge_delta}")
        if self.edge_steps < 1:
            _fail("early_stop.edge_steps", f"must be >= 1; got {self.edge_steps}")

    def describe(self) -> list[str]:
        """The rules that are on, in words (``eos study run --dry-run``)."""
        out = []
        if self.loss_blowup is not None:
            out.append(f"loss > {self.loss_blowup:g} × the first step's loss")
        if self.ratio_above is not None:
            out.append(f"λ₁/threshold > {self.ratio_above:g} for {self.ratio_steps} consecutive measurements")
        if self.edge_delta is not None:
            out.append(f"after the EoS onset, λ₁/threshold > {1 + self.edge_delta:g} for {self.edge_steps} "
                       "consecutive measurements")
        return out


@dataclass(frozen=True)
class TrialKey:
    """One trial's coordinates; everything else comes from the spec."""
    variant: str
    lr: float
    seed: int

    @property
    def trial_id(self) -> str:
        """The trial's name: its run folder and ``trial=`` partition (:func:`trainers.run.rundir.trial_id`)."""
        return trial_id(self.variant, self.lr, self.seed)


@dataclass
class StudySpec:
    study: StudySection
    search: SearchSection = field(default_factory=SearchSection)
    resources: ResourcesSection = field(default_factory=ResourcesSection)
    early_stop: EarlyStopSection = field(default_factory=EarlyStopSection)
    trackers: TrackersSection = field(default_factory=TrackersSection)
    model: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    schedule: dict[str, Any] = field(default_factory=dict)
    optim: dict[str, Any] = field(default_factory=dict)
    variant: dict[str, Any] = field(default_factory=dict)
    sharpness: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)

    # --- derived ---------------------------------------------------------
    @property
    def name(self) -> str:
        return self.study.name

    @property
    def mode(self) -> str:
        """Tune/Optuna direction of the objective."""
        return OBJECTIVES[self.study.objective]

    @property
    def study_dir(self) -> Path:
        return Path(self.study.storage) / self.study.name

    def base_config(self) -> dict:
        return {s: copy.deepcopy(getattr(self, s)) for s in RUN_SECTIONS if getattr(self, s)}

    def run_config_dict(self, variant: str, lr: float, seed: int) -> dict:
        """The RunConfig dict of one trial: the base sections plus the trial's fields."""
        trial = {"optim": {"name": self.study.optimizer, "lr": float(lr)},
                 "variant": {"name": variant, "options": dict(self.study.variant_options.get(variant, {}))},
                 "train": {"seed": int(seed)}}
        return merge(self.base_config(), trial)

    def run_config(self, variant: str, lr: float, seed: int) -> RunConfig:
        return run_config(self.run_config_dict(variant, lr, seed))

    def grid_trials(self) -> list[TrialKey]:
        """Every trial of a grid search, in variant, lr, seed order."""
        return [TrialKey(v, float(lr), s) for v in self.study.variants for lr in self.search.lr.grid
                for s in self.study.seeds]

    def num_trials(self) -> int:
        """The number of trials; for a boundary search the most it can take
        (:func:`study.boundary.max_trials` per variant and seed)."""
        if self.search.algorithm == "grid":
            per = len(self.search.lr.grid)
        elif self.search.algorithm == "optuna":
            per = self.search.num_samples
        else:
            from study.boundary import max_trials

            low, high = self.search.lr.bracket
            per = max_trials(low, high, self.search.boundary.k, self.search.boundary.factor)
        return len(self.study.variants) * len(self.study.seeds) * per

    def to_dict(self) -> dict:
        return to_dict(self)


def _check_run_sections(spec: StudySpec) -> None:
    for section in RUN_SECTIONS:
        value = getattr(spec, section)
        for key in value:
            source = PER_TRIAL_FIELDS.get((section, key))
            if source:
                _fail(f"{section}.{key}", f"is set per trial from {source}; remove it here")


def _validate_trials(spec: StudySpec) -> None:
    """Build the RunConfig of every trial (both ends of an Optuna range)."""
    from trainers.diffusion.schedules import NoiseSchedule
    from trainers.diffusion.variants import build_variant

    if spec.search.algorithm == "grid":
        keys = spec.grid_trials()
    else:
        low, high = spec.search.lr.log_uniform if spec.search.algorithm == "optuna" else spec.search.lr.bracket
        keys = [TrialKey(v, lr, s) for v in spec.study.variants for lr in (low, high) for s in spec.study.seeds]
    for key in keys:
        try:
            cfg = spec.run_config(key.variant, key.lr, key.seed)
            # a variant checks its own options when it is built
            build_variant(cfg.variant, NoiseSchedule.from_config(cfg.schedule))
        except ConfigError as e:
            raise ConfigError(f"{e} (trial variant={key.variant}, lr={key.lr:g}, seed={key.seed})") from None
    device = spec.train.get("device", "auto")
    if spec.resources.gpu == 0 and isinstance(device, str) and device.startswith("cuda"):
        _fail("train.device", f"{device!r} needs resources.gpu > 0 (Ray hides GPUs from trials without a GPU share)")
    if spec.study.objective == "fid" and not spec.eval.get("every"):
        _fail("study.objective", "'fid' needs eval.every > 0 (FID is measured during training)")
    if spec.search.algorithm == "boundary" and spec.study.objective != "largest_stable_lr":
        _fail("study.objective", f"search.algorithm=boundary searches for the largest stable lr; set "
                                 f"study.objective: largest_stable_lr (got {spec.study.objective!r})")
    if spec.early_stop.edge_delta is not None and cfg.sharpness.every == 0:  # sharpness: a base section
        _fail("early_stop.edge_delta", "needs λ₁/threshold measurements; set sharpness.every > 0 "
                                       "(or edge_delta: null)")


def _resolve_paths(spec: StudySpec, base: Path) -> None:
    """Absolute paths, so trial workers (whose working folder Tune changes) find them."""
    def absolute(p: str) -> str:
        return str((base / Path(p).expanduser()).resolve())

    spec.study.storage = absolute(spec.study.storage)
    data = spec.data
    if data.get("path"):
        data["path"] = absolute(data["path"])
    elif data.get("name") == "cifar10":
        data["path"] = absolute("data")  # the trainer's own default, fixed before Tune changes folders
    if spec.eval.get("inception_weights"):
        spec.eval["inception_weights"] = absolute(spec.eval["inception_weights"])
    resolve_tracker_paths(spec.trackers, absolute)


def check_data(spec: StudySpec) -> None:
    """Data files the trials read must exist (cifar10 with download: the driver fetches it)."""
    data = from_dict(DataConfig, spec.data, "data")
    if data.name == "npz" and not Path(data.path).is_file():
        _fail("data.path", f"no such file {data.path!r}")
    if data.name == "imagefolder" and not Path(data.path).is_dir():
        _fail("data.path", f"no such folder {data.path!r}")
    if data.name == "cifar10" and not data.download and not Path(data.path).is_dir():
        _fail("data.path", f"no such folder {data.path!r} (and data.download is false)")
    weights = spec.eval.get("inception_weights")
    if weights and not Path(weights).is_file():
        _fail("eval.inception_weights", f"no such file {weights!r}")
    if data.name == "cifar10" and not Path(data.path).is_dir():
        return   # downloaded by the driver before launch (study.runner.prepare_data)
    # the data file opened and its shape read, the batch against the data set, the Inception weights
    key = spec.grid_trials()[0] if spec.search.algorithm == "grid" else None
    variant, lr, seed = (key.variant, key.lr, key.seed) if key else (spec.study.variants[0], 1e-3, spec.study.seeds[0])
    check_run_inputs(spec.run_config(variant, lr, seed), device=False)


def spec_from_dict(data: dict, *, base_dir: str | os.PathLike | None = None,
                   check_files: bool = True) -> StudySpec:
    """A validated :class:`StudySpec`; relative paths resolve against ``base_dir``
    (default: the current folder)."""
    if not isinstance(data, dict):
        _fail("spec", f"must be a mapping; got {type(data).__name__}")
    if "study" not in data:
        _fail("study", "section is required (study.name, study.variants, ...)")
    data = copy.deepcopy(data)
    if "trackers" in data:
        data["trackers"] = normalize_trackers(data["trackers"])
    spec = from_dict(StudySpec, data)
    _check_run_sections(spec)
    _resolve_paths(spec, Path(base_dir) if base_dir is not None else Path.cwd())
    _validate_trials(spec)
    if check_files:
        check_data(spec)
    return spec


def preset_path(name: str) -> Path:
    return PRESETS_DIR / f"{name}.yaml"


def presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def read_spec_file(path_or_preset: str | os.PathLike) -> dict:
    """The raw mapping of a spec file, or of a preset given by name (``smoke``)."""
    p = Path(path_or_preset)
    if not p.is_file() and str(path_or_preset) in presets():
        p = preset_path(str(path_or_preset))
    if not p.is_file():
        raise ConfigError(f"spec: no such file {str(path_or_preset)!r} (presets: {', '.join(presets())})")
    data = read_yaml(p, "spec")
    if not isinstance(data, dict):
        raise ConfigError(f"spec: {str(p)!r} must hold a mapping")
    return data


def load_spec(path_or_preset: str | os.PathLike, *, name: Optional[str] = None,
              overrides: Optional[list[dict]] = None, check_files: bool = True) -> StudySpec:
    """Read, override (``--name``, ``--set``) and validate a study spec."""
    data = read_spec_file(path_or_preset)
    for override in overrides or []:
        data = merge(data, override)
    if name is not None:
        data = merge(data, {"study": {"name": name}})
    return spec_from_dict(data, check_files=check_files)
