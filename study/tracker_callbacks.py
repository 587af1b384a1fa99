"""Tune's tracker callbacks as the study uses them (see :mod:`study.trackers`).

Imported only when a spec turns a tracker on; the classes live at module
level so that Tune's saved experiment (``tuner.pkl``) refers to them by name.
"""
from __future__ import annotations

from pathlib import Path

from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.air.integrations.wandb import WandbLoggerCallback
from ray.tune.logger import TBXLoggerCallback

__all__ = ["MLflowCallback", "TBXLoggerCallback", "WandbCallback", "mlflow_callback", "wandb_callback"]


class MLflowCallback(MLflowLoggerCallback):
    """Tune's MLflow callback; the trial's ``status`` also goes into a run tag
    (MLflow metrics are numbers only)."""

    def setup(self, *args, **kwargs):
        super().setup(*args, **kwargs)
        self._status = {}

    def log_trial_result(self, iteration, trial, result):
        super().log_trial_result(iteration, trial, result)
        status = result.get("status")
        if isinstance(status, str) and self._status.get(trial) != status:
            self.mlflow_util._get_client().set_tag(self._trial_runs[trial], "status", status)
            self._status[trial] = status


def mlflow_callback(options, study: str) -> MLflowCallback:
    """From a :class:`study.trackers.MLflowTracker`."""
    return MLflowCallback(tracking_uri=options.tracking_uri, experiment_name=options.experiment_name or study,
                          tags={"eos.study": study, **options.tags}, save_artifact=options.save_artifact)


class WandbCallback(WandbLoggerCallback):
    """Tune's W&B callback; ``status`` and ``trial`` go into the run's config
    (W&B logs numbers only), and an offline or disabled run needs no API key
    (Ray's setup asks for one unless the ``WANDB_MODE`` variable says offline)."""
    AUTO_CONFIG_KEYS = [*WandbLoggerCallback.AUTO_CONFIG_KEYS, "status", "trial"]

    def setup(self, *args, **kwargs):
        if self.kwargs.get("mode") == "online":
            super().setup(*args, **kwargs)


def wandb_callback(options, study: str, folder: Path) -> WandbCallback:
    """From a :class:`study.trackers.WandbTracker`; W&B writes into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    kwargs = {"mode": options.mode, "dir": str(folder)}
    if options.entity:
        kwargs["entity"] = options.entity
    if options.tags:
        kwargs["tags"] = list(options.tags)
    return WandbCallback(project=options.project or study, group=options.group,
                         api_key_file=options.api_key_file, **kwargs)
