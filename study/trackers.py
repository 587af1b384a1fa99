"""Experiment trackers: Ray Tune's own logger callbacks, switched on by the spec.

A spec's ``trackers`` section turns on Tune's MLflow, TensorBoard and W&B
callbacks (``ray.air.integrations.mlflow.MLflowLoggerCallback``,
``ray.tune.logger.TBXLoggerCallback``,
``ray.air.integrations.wandb.WandbLoggerCallback``)::

    trackers:
      every: 10                     # a result every 10 optimizer steps (0: checkpoints and the end only)
      mlflow: {tracking_uri: sqlite:///results/mlflow.db}   # experiment_name (default: the study name), tags
      tensorboard: {}               # event files in each trial's folder under <study>/tune/
      wandb: {project: eos, mode: offline}                  # entity, group, tags, dir, api_key_file

or, with every option at its default, ``trackers: [mlflow, tensorboard]``.
A tracker left out (or ``null``) is off.  The callbacks run in the Tune
driver, so the packages are needed there: ``pip install -e .[tracking]``;
a spec that asks for a tracker whose package is missing fails before
launch with one line naming it.

What the trackers get is what the trials report to Tune
(:func:`study.trainable.step_metrics`): every ``every`` steps the step's
``loss``, ``lr``, ``lambda_max``, ``lambda_precond``, ``threshold``,
``ratio``, ``eig_residual`` (the step-log columns of the same names, where
measured at that step), ``step``, ``objective`` and ``diverged`` (0/1), plus
``status``; Tune adds its own bookkeeping (``time_total_s``, ...).  Every
result carries ``timesteps_total`` = optimizer steps done, which the MLflow
and TensorBoard callbacks use as the step axis; W&B plots against Tune's
result count by default (choose ``timesteps_total`` or ``step`` as the x
axis there).  The trial's Tune config (variant, lr, seed) becomes each run's
parameters.  The string ``status`` becomes an MLflow tag and a W&B config
value (trackers keep only numbers as metrics); ``diverged`` carries it as a
number everywhere.

MLflow: ``tracking_uri`` defaults to MLflow's own choice (the
``MLFLOW_TRACKING_URI`` variable, else ``sqlite:///mlflow.db`` in the
folder the study was started from); a relative ``sqlite:///`` or ``file:``
path is made absolute when the spec is read.  MLflow 3 refuses ``file:``
stores unless ``MLFLOW_ALLOW_FILE_STORE=true`` (checked before launch).
A resumed study logs each resumed trial into a new MLflow/W&B run (Tune's
callbacks do not carry run ids across a restart).

TensorBoard: Tune adds its TensorBoard callback by itself whenever
tensorboardX is installed (it comes with ``ray[tune]``), so the event files
are there even without this section; ``tensorboard: {}`` makes it explicit
and checks the package.

W&B: files go to ``dir`` (default ``<study>/wandb``); ``mode: offline``
writes each trial's run there (``wandb/offline-run-*``; ``wandb sync``
uploads it later) and needs no API key; ``online`` needs ``WANDB_API_KEY``,
``wandb login`` or ``api_key_file``.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from trainers.config import ConfigError

# tracker -> (module the callback imports, what to pip install)
PACKAGES = {"mlflow": ("mlflow", "mlflow-skinny"), "tensorboard": ("tensorboardX", "tensorboardX"),
            "wandb": ("wandb", "wandb")}
WANDB_MODES = ("online", "offline", "disabled")


def _fail(path: str, message: str):
    raise ConfigError(f"{path}: {message}")


@dataclass
class MLflowTracker:
    tracking_uri: Optional[str] = None     # None: MLflow's own (MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)
    experiment_name: Optional[str] = None  # None: the study name
    tags: dict[str, str] = field(default_factory=dict)
    save_artifact: bool = False            # upload each trial's Tune folder as the run's artifacts


@dataclass
class TensorBoardTracker:
    """No options: Tune writes ``events.out.tfevents.*`` into each trial's
    folder under ``<study>/tune/`` (``tensorboard --logdir results/<study>/tune``)."""


@dataclass
class WandbTracker:
    project: Optional[str] = None          # None: the study name
    entity: Optional[str] = None
    group: Optional[str] = None            # None: Tune's experiment folder name
    tags: list[str] = field(default_factory=list)
    mode: str = "online"                   # online | offline | disabled
    dir: Optional[str] = None              # where W&B writes its files (None: <study>/wandb)
    api_key_file: Optional[str] = None

    def __post_init__(self):
        if self.mode not in WANDB_MODES:
            _fail("trackers.wandb.mode", f"must be one of {', '.join(WANDB_MODES)}; got {self.mode!r}")


@dataclass
class TrackersSection:
    """Which of Tune's tracker callbacks run, and how often trials report."""
    every: int = 10                        # report every N optimizer steps (0: at checkpoints and the end)
    mlflow: Optional[MLflowTracker] = None
    tensorboard: Optional[TensorBoardTracker] = None
    wandb: Optional[WandbTracker] = None

    def __post_init__(self):
        if self.every < 0:
            _fail("trackers.every", f"must be >= 0; got {self.every}")
        for name in self.enabled:
            module, pip_name = PACKAGES[name]
            if importlib.util.find_spec(module) is None:
                _fail(f"trackers.{name}", f"needs the {module!r} package, which is not installed "
                                          f"(pip install -e .[tracking], or pip install {pip_name})")
        if self.mlflow is not None:
            uri = self.mlflow.tracking_uri
            where = "trackers.mlflow.tracking_uri"
            if uri is None and os.environ.get("MLFLOW_TRACKING_URI"):
                uri = os.environ["MLFLOW_TRACKING_URI"]
                where = "MLFLOW_TRACKING_URI (trackers.mlflow.tracking_uri is unset)"
            if _is_file_store(uri):
                _check_file_store_allowed(where)

    @property
    def enabled(self) -> list[str]:
        return [name for name in PACKAGES if getattr(self, name) is not None]


def normalize(data) -> dict:
    """The raw ``trackers`` value as a mapping: a list of names means each
    tracker with its default options, an empty section (``null``) none."""
    if data is None:
        return {}
    if not isinstance(data, list):
        return data
    out = {}
    for i, name in enumerate(data):
        if name not in PACKAGES:
            _fail(f"trackers[{i}]", f"unknown tracker {name!r} (known: {', '.join(PACKAGES)})")
        out[name] = {}
    return out


# ---------------------------------------------------------------------------
# MLflow stores


def _is_file_store(uri: Optional[str]) -> bool:
    return uri is not None and (uri.startswith("file:") or "://" not in uri)


def _check_file_store_allowed(where: str) -> None:
    """MLflow 3 keeps its file store only behind ``MLFLOW_ALLOW_FILE_STORE``;
    say so before launch instead of in every trial's first result."""
    try:
        from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE
    except ImportError:  # an MLflow without the switch accepts file stores
        return
    if not MLFLOW_ALLOW_FILE_STORE.get():
        _fail(where, "this MLflow refuses file stores unless MLFLOW_ALLOW_FILE_STORE=true is set; "
                     "use sqlite:///PATH/mlflow.db or a tracking server instead")


def resolve_paths(section: TrackersSection, absolute) -> None:
    """Make the local paths of the section absolute with ``absolute(path)``
    (the driver of a resumed study may start in another folder)."""
    ml = section.mlflow
    if ml is not None and ml.tracking_uri:
        uri = ml.tracking_uri
        if uri.startswith("sqlite:///") and not uri[len("sqlite:///"):].startswith("/"):
            ml.tracking_uri = "sqlite:///" + absolute(uri[len("sqlite:///"):])
        elif uri.startswith("file:"):
            path = uri[len("file:"):]
            if not path.startswith("//"):
                ml.tracking_uri = "file:" + absolute(path)
        elif "://" not in uri:
            ml.tracking_uri = absolute(uri)
    wb = section.wandb
    if wb is not None:
        if wb.dir:
            wb.dir = absolute(wb.dir)
        if wb.api_key_file:
            wb.api_key_file = absolute(wb.api_key_file)


# ---------------------------------------------------------------------------
# Tune callbacks


def build_callbacks(section: TrackersSection, study: str, root: Path) -> list:
    """The Tune callbacks of the enabled trackers of study ``study`` in folder
    ``root`` (none enabled: an empty list, Tune's default loggers alone)."""
    from study import tracker_callbacks as C

    callbacks = []
    if section.mlflow is not None:
        callbacks.append(C.mlflow_callback(section.mlflow, study))
    if section.tensorboard is not None:
        callbacks.append(C.TBXLoggerCallback())
    if section.wandb is not None:
        callbacks.append(C.wandb_callback(section.wandb, study, Path(section.wandb.dir or root / "wandb")))
    return callbacks
