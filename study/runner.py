"""Run and resume a study with Ray Tune.

:func:`run_study` validates the spec (already done by :func:`study.spec.load_spec`),
connects to Ray (a local instance, or an existing cluster with ``address``),
checks that one trial's resources fit on a node, writes ``study.json`` and
runs a :class:`ray.tune.Tuner` over the trials; :func:`resume_study`
continues an interrupted study with ``Tuner.restore``.  Both end by writing
``trials.parquet`` (also after an interruption, with unfinished trials as
``running``).  The folder layout is :mod:`study.layout`.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import pyarrow as pa

from study.layout import StudyLayout
from study.mps import study_mps
from study.spec import ResourcesSection, StudySpec, spec_from_dict
from study.trials import best_trials, collect_trials, status_counts, write_trials
from trainers.config import ConfigError
from trainers.run.atomic import write_json_atomic
from trainers.run.rundir import ERROR, RESULTS, trial_id

STUDY_FORMAT = 1


@dataclass
class StudyOutcome:
    layout: StudyLayout
    spec: StudySpec
    trials: pa.Table

    @property
    def finished(self) -> int:
        """Trials with a result (completed or diverged)."""
        return sum(s in RESULTS for s in self.trials.column("status").to_pylist())

    @property
    def complete(self) -> bool:
        """Every trial has a result; for a boundary search: every (variant, seed) has its answer."""
        if self.spec.search.algorithm == "boundary":
            from study.boundary import read_state, state_finished

            return state_finished(read_state(self.layout.boundary_state))
        return self.finished >= self.spec.num_trials()

    @property
    def errors(self) -> int:
        return self.trials.column("status").to_pylist().count(ERROR)


# ---------------------------------------------------------------------------
# Ray


def connect(address: Optional[str] = None, num_cpus: Optional[int] = None, quiet: bool = False) -> bool:
    """Start a local Ray instance (no dashboard) or connect to ``address``;
    returns whether this call did it (and should shut it down).  An
    already-initialised Ray (tests, notebooks) is used as it is.  ``quiet``:
    Ray logs errors only and the trials' own output stays in their log files
    (the study's progress view speaks for them)."""
    import ray

    if ray.is_initialized():
        return False
    level = logging.ERROR if quiet else logging.WARNING
    if address:
        ray.init(address=address, logging_level=level, log_to_driver=not quiet)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=level, log_to_driver=not quiet)
    return True


def _quiet_ray(quiet: bool) -> None:
    from study.progress import quiet_ray

    quiet_ray(quiet)


def _quiet(verbose: Optional[int]) -> bool:
    """``verbose`` None: the eos progress view; 0: nothing; 1, 2: Tune's own output and Ray's messages."""
    return verbose is None or verbose == 0


def check_resources(resources: ResourcesSection, nodes: Sequence[dict], *, cluster: bool,
                    autoscale: bool = False) -> None:
    """Fail before launch when one trial cannot fit on any node.

    ``nodes``: ``ray.nodes()`` entries (``Alive``, ``Resources``).  On a
    cluster whose autoscaler will add nodes, ``autoscale`` skips the check."""
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive", True)]
    max_cpu = max((r.get("CPU", 0.0) for r in alive), default=0.0)
    max_gpu = max((r.get("GPU", 0.0) for r in alive), default=0.0)
    if autoscale:
        return
    hint = " (pass --autoscale if the cluster's autoscaler adds such nodes)" if cluster else ""
    where = "the largest node of the cluster" if cluster else "this machine"
    if resources.gpu > 0 and max_gpu == 0 and not cluster:
        raise ConfigError(f"resources.gpu: {resources.gpu:g} GPU per trial, but this machine has no GPU; "
                          "set resources.gpu: 0 to train on CPUs, or run on a Ray cluster with --address")
    if resources.gpu > max_gpu:
        raise ConfigError(f"resources.gpu: {resources.gpu:g} GPUs per trial, but {where} has "
                          f"{max_gpu:g}{hint}")
    if resources.cpu > max_cpu:
        raise ConfigError(f"resources.cpu: {resources.cpu:g} CPUs per trial, but {where} has "
                          f"{max_cpu:g}{hint}")


def prepare_data(spec: StudySpec) -> None:
    """Fetch a downloadable data set once, in the driver, before trials
    start (concurrent trials downloading into one folder would collide)."""
    from trainers.config import DataConfig, from_dict
    from trainers.run.data import load_cifar10

    data = from_dict(DataConfig, spec.data, "data")
    if data.name == "cifar10":
        load_cifar10(data.path, data.download)


# ---------------------------------------------------------------------------
# Tune


def tune_trial_name(trial) -> str:
    c = trial.config
    return trial_id(c["variant"], c["lr"], c["seed"])


def tune_trial_dirname(trial) -> str:
    return f"{tune_trial_name(trial)}-{trial.trial_id}"


def _trainable(plan):
    from ray import tune

    from study.trainable import run_trial

    resources = {"cpu": plan.spec.resources.cpu, "gpu": plan.spec.resources.gpu}
    return tune.with_resources(tune.with_parameters(run_trial, plan=plan), resources)


def _plan(spec: StudySpec, layout: StudyLayout):
    from study.trainable import FaultInjection, TrialPlan

    return TrialPlan(spec=spec, root=str(layout.root), single=spec.num_trials() == 1,
                     fault=FaultInjection.from_env())


def _quiet_tune() -> None:
    # Tune warns when frequent trial checkpoints force experiment snapshots; they are small here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


def build_tuner(spec: StudySpec, layout: StudyLayout, verbose: Optional[int] = None):
    """The Tuner of a study.  ``verbose``: None — the concise progress view
    (:class:`study.progress.ProgressView`) and Tune silent; 0 — silent;
    1, 2 — Tune's status table / every result."""
    from ray import tune

    from study.progress import ProgressView
    from study.search import METRIC, build_search
    from study.trackers import build_callbacks

    callbacks = build_callbacks(spec.trackers, spec.name, layout.root)
    if verbose is None:
        first = spec.run_config(spec.study.variants[0], 1e-3, spec.study.seeds[0])
        callbacks = [*(callbacks or []), ProgressView(spec.num_trials(), first.train.steps)]
    param_space, search_alg, num_samples, max_concurrent = build_search(spec, layout)
    return tune.Tuner(
        _trainable(_plan(spec, layout)),
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=METRIC, mode=spec.mode, search_alg=search_alg, num_samples=num_samples,
            max_concurrent_trials=max_concurrent, trial_name_creator=tune_trial_name,
            trial_dirname_creator=tune_trial_dirname),
        run_config=tune.RunConfig(
            name=layout.tune.name, storage_path=str(layout.root),
            failure_config=tune.FailureConfig(max_failures=spec.study.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
            verbose=0 if verbose is None else verbose),
    )


def _error_line(error: BaseException) -> str:
    """The telling line of a Tune error: the exception line ending a remote
    traceback, or the first line of e.g. "The actor died unexpectedly"."""
    lines = [line for line in str(error).splitlines() if line.strip() and not line[0].isspace()]
    return (lines[-1] if lines else type(error).__name__)[:500]


def _tune_trials(result_grid) -> list[dict]:
    out = []
    for result in result_grid:
        c = result.config or {}
        if not {"variant", "lr", "seed"} <= set(c):
            continue
        error = None if result.error is None else _error_line(result.error)
        metrics = result.metrics or {}
        if error is None and metrics.get("status") == ERROR:   # bad input, not retried (study.trainable)
            error = str(metrics.get("reason") or "error")
        out.append({"trial_id": trial_id(c["variant"], c["lr"], c["seed"]), "variant": c["variant"],
                    "lr": c["lr"], "seed": c["seed"], "error": error})
    return out


def finish(spec: StudySpec, layout: StudyLayout, result_grid=None) -> StudyOutcome:
    """Write ``trials.parquet`` from the run folders (and Tune's errors)."""
    tune_trials = _tune_trials(result_grid) if result_grid is not None else []
    table = collect_trials(layout, spec.study.objective, spec.study.variants, tune_trials)
    write_trials(layout, table)
    return StudyOutcome(layout, spec, table)


@contextlib.contextmanager
def sigterm_as_sigint():
    """While Tune runs, SIGTERM (scancel, kubectl delete, a cloud's
    preemption notice) acts as SIGINT, which Tune turns into a clean stop
    that saves the experiment for ``eos study resume``.  Installed after
    ``ray.init``, which sets a SIGTERM handler of its own; only in the main
    thread (where Python allows signal handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: signal.raise_signal(signal.SIGINT))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _fit(tuner, spec: StudySpec, layout: StudyLayout) -> StudyOutcome:
    try:
        with sigterm_as_sigint():
            result_grid = tuner.fit()
    except BaseException:
        finish(spec, layout)  # keep the table in step with the run folders, whatever happened
        raise
    return finish(spec, layout, result_grid)


# ---------------------------------------------------------------------------
# entry points


def _study_record(spec: StudySpec) -> dict:
    import ray

    return {"format": STUDY_FORMAT, "spec": spec.to_dict(), "ray": ray.__version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _existing_study(spec: StudySpec, layout: StudyLayout, resume: bool) -> bool:
    """Whether ``layout`` already holds this study (and ``resume`` allows
    continuing it); a different study there is always an error."""
    if not layout.study_json.is_file():
        return False
    stored = json.loads(layout.study_json.read_text()).get("spec")
    if stored != spec.to_dict():
        raise ConfigError(f"study.name: {layout.root} already holds a study {spec.name!r} with a different "
                          "spec; choose another name (--name) or remove the folder")
    if not resume:
        raise ConfigError(f"study.name: {layout.root} already holds this study; continue it with "
                          f"`eos study resume {layout.root}` (or choose another --name)")
    return True


def run_study(spec: StudySpec, *, address: Optional[str] = None, num_cpus: Optional[int] = None,
              autoscale: bool = False, verbose: Optional[int] = None, resume: bool = False) -> StudyOutcome:
    """Run every trial of ``spec``; returns the outcome with the trials table.

    ``resume``: when the study folder already holds this very spec, continue
    it (:func:`resume_study`) instead of failing — for batch jobs that are
    resubmitted until the study is done."""
    import ray

    layout = StudyLayout(spec.study_dir)
    if _existing_study(spec, layout, resume):
        return resume_study(layout.root, address=address, num_cpus=num_cpus, autoscale=autoscale,
                            verbose=verbose)
    with study_mps(spec.resources.mps, spec.resources.gpu, cluster=bool(address)):
        started = connect(address, num_cpus, quiet=_quiet(verbose))
        _quiet_ray(_quiet(verbose))
        try:
            check_resources(spec.resources, ray.nodes(), cluster=bool(address), autoscale=autoscale)
            prepare_data(spec)
            layout.root.mkdir(parents=True, exist_ok=True)
            write_json_atomic(layout.study_json, _study_record(spec))
            _quiet_tune()
            return _fit(build_tuner(spec, layout, verbose), spec, layout)
        finally:
            if started:
                ray.shutdown()   # the trials end before an MPS daemon of this study quits


def find_study(study_dir_or_name: str | os.PathLike, storage: str | os.PathLike = "results") -> Path:
    """A study folder given as a path, or as a name under ``storage``."""
    candidates = [Path(study_dir_or_name), Path(storage) / str(study_dir_or_name)]
    for path in candidates:
        if (path / "study.json").is_file():
            return path.resolve()
    looked = ", ".join(str(p / "study.json") for p in candidates)
    raise ConfigError(f"study: no study folder {str(study_dir_or_name)!r} (looked for {looked})")


def load_study_spec(root: Path) -> StudySpec:
    """The resolved spec of a study folder, re-validated (data files included)."""
    record = json.loads((root / "study.json").read_text())
    if record.get("format") != STUDY_FORMAT:
        raise ConfigError(f"study: {root / 'study.json'} has format {record.get('format')}; "
                          f"this version reads format {STUDY_FORMAT}")
    return spec_from_dict(record["spec"])


def resume_study(study_dir_or_name: str | os.PathLike, *, address: Optional[str] = None,
                 num_cpus: Optional[int] = None, autoscale: bool = False,
                 verbose: Optional[int] = None) -> StudyOutcome:
    """Continue an interrupted study: unfinished and errored trials resume
    from their checkpoints (``Tuner.restore``), the rest start."""
    import ray
    from ray import tune

    layout = StudyLayout(find_study(study_dir_or_name))
    spec = load_study_spec(layout.root)
    with study_mps(spec.resources.mps, spec.resources.gpu, cluster=bool(address)):
        started = connect(address, num_cpus, quiet=_quiet(verbose))
        _quiet_ray(_quiet(verbose))
        try:
            check_resources(spec.resources, ray.nodes(), cluster=bool(address), autoscale=autoscale)
            prepare_data(spec)
            _quiet_tune()
            if tune.Tuner.can_restore(str(layout.tune)):
                tuner = tune.Tuner.restore(str(layout.tune), trainable=_trainable(_plan(spec, layout)),
                                           resume_unfinished=True, resume_errored=True)
            else:  # interrupted before Tune saved its state: start over; run folders still resume
                print(f"[eos] no Tune state in {layout.tune}; starting the trials again "
                      "(finished run folders are reused)", flush=True)
                tuner = build_tuner(spec, layout, verbose)
            return _fit(tuner, spec, layout)
        finally:
            if started:
                ray.shutdown()   # the trials end before an MPS daemon of this study quits


def boundary_lines(layout: StudyLayout) -> list[str]:
    """One line per (variant, seed) of a boundary search's state file."""
    from study.boundary import read_state

    state = read_state(layout.boundary_state)
    lines = []
    for s in (state or {}).get("searches", []):
        judged = sum(t["verdict"] in ("stable", "unstable") for t in s["trials"])
        lo = f"{s['lo']:g}" + ("" if s["lo_decided"] else " (assumed)")
        hi = f"{s['hi']:g}" + ("" if s["hi_decided"] else " (assumed)")
        lines.append(f"[eos]   boundary {s['variant']} seed {s['seed']}: {s['status']}, stable {lo} < "
                     f"unstable {hi} (×{s['hi'] / s['lo']:.3g}), {judged} trials"
                     + (", non-monotone" if s["non_monotone"] else ""))
    lines.append(f"[eos] boundary state: {layout.boundary_state}")
    return lines


def summary(outcome: StudyOutcome) -> str:
    """A few lines for the console: counts, best trial per variant, paths."""
    spec, table = outcome.spec, outcome.trials
    counts = ", ".join(f"{n} {s}" for s, n in status_counts(table).items()) or "no trials"
    if spec.search.algorithm == "boundary":
        lines = [f"[eos] study {spec.name}: {counts} ({outcome.finished} finished, at most {spec.num_trials()})"]
        lines += boundary_lines(outcome.layout)
    else:
        lines = [f"[eos] study {spec.name}: {counts} ({outcome.finished}/{spec.num_trials()} finished)"]
    for row in best_trials(table, spec.mode):
        lines.append(f"[eos]   best {row['variant']}: lr={row['lr']:g} seed={row['seed']} "
                     f"{spec.study.objective}={row['objective']:.4g} ({row['status']})")
    for row in table.to_pylist():
        if row["status"] == ERROR:
            lines.append(f"[eos]   error {row['trial_id']}: {row['reason']}")
    lines.append(f"[eos] trials: {outcome.layout.trials_table}")
    lines.append(f"[eos] steps:  {outcome.layout.steps}  (pandas.read_parquet)")
    if not outcome.complete:
        lines.append(f"[eos] unfinished; continue with: eos study resume {outcome.layout.root}")
    return "\n".join(lines)
