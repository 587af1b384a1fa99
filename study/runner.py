"""Run and resume a study with Ray Tune.

:func:`run_study` validates the spec (already done by :func:`study.spec.load_spec`),
connects to Ray (a local instance, or an existing cluster with ``address``),
checks that one trial's resources fit on a node, writes ``study.json`` and
runs a :class:`ray.tune.Tuner` over the trials; :func:`resume_study`
continues an interrupted study with ``Tuner.restore``.  Both end by writing
``trials.parquet`` (also after an interruption, with unfinished trials as
``running``).  The folder layout is :mod:`study.layout`.

Both hold the study folder's driver lock (:mod:`study.lock`) and, before
any trial starts, remove temporaries of interrupted writes.  A resume whose
Tune state is damaged (:func:`set_aside_damaged_tune_state`) continues from
the run folders instead.  A trial that fails on a full disk stops the study
as Ctrl+C would (:class:`DiskFullWatch`) and the driver raises one
:class:`trainers.run.atomic.DiskFull` saying which file and how to resume.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import os
import re
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import pyarrow as pa

from study.layout import StudyLayout
from study.lock import study_lock
from study.mps import study_mps
from study.spec import ResourcesSection, StudySpec, spec_from_dict
from study.trials import best_trials, collect_trials, status_counts, write_trials
from trainers.config import ConfigError
from trainers.run.atomic import NO_SPACE, DiskFull, write_json_atomic
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


AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def _local_token_auth() -> None:
    """Token authentication for a local instance, set explicitly: unless the
    user configured Ray's authentication (any of :data:`AUTH_ENV`), a fresh
    random token for this process and the Ray processes it starts, held in
    the environment only (no token file is written)."""
    import secrets

    if any(name in os.environ for name in AUTH_ENV):
        if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
            print(f"[eos] Ray token authentication is off (RAY_AUTH_MODE={os.environ['RAY_AUTH_MODE']})",
                  flush=True)
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")                       # this process reads its Ray config again, as ray.init would
    AuthenticationTokenLoader.instance().reset_cache()


@contextlib.contextmanager
def _loopback_only():
    """While a local instance starts: its node address is the loopback one,
    so GCS, raylet, object manager and workers listen on 127.0.0.1 only (Ray
    otherwise picks this machine's network address, and its servers listen
    on every interface).  Ray's own switch for this (a single-machine
    "cluster", its default on macOS and Windows) is read once at import;
    it is set here for this process and, through the environment, for the
    processes the instance starts."""
    from ray._private import ray_constants

    name = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    before_env, before = os.environ.get(name), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[name], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before
        if before_env is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before_env


def connect(address: Optional[str] = None, num_cpus: Optional[int] = None, quiet: bool = False) -> bool:
    """Start a local Ray instance or connect to ``address``; returns whether
    this call did it (and should shut it down).  An already-initialised Ray
    (tests, notebooks) is used as it is.  A local instance has no dashboard,
    token authentication (:func:`_local_token_auth`) and every port on the
    loopback address (:func:`_loopback_only`).  ``quiet``: Ray logs errors
    only and the trials' own output stays in their log files (the study's
    progress view speaks for them)."""
    import ray

    if ray.is_initialized():
        return False
    level = logging.ERROR if quiet else logging.WARNING
    if address:
        ray.init(address=address, logging_level=level, log_to_driver=not quiet)
    else:
        _local_token_auth()
        with _loopback_only():
            ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                     logging_level=level, log_to_driver=not quiet)
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
            trial_dirname_creator=tune_trial_dirname,
            reuse_actors=True),   # a trial slot keeps its worker process: no start-up and imports per trial
        run_config=tune.RunConfig(
            name=layout.tune.name, storage_path=str(layout.root),
            failure_config=tune.FailureConfig(max_failures=spec.study.max_failures),
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
    """Write ``trials.parquet`` from the run folders (and Tune's errors); on
    a full disk say so in one line and return the table unwritten."""
    tune_trials = _tune_trials(result_grid) if result_grid is not None else []
    table = collect_trials(layout, spec.study.objective, spec.study.variants, tune_trials)
    try:
        write_trials(layout, table)
    except DiskFull as e:
        print(f"[eos] the trials table was not written: {e.strerror}", file=sys.stderr, flush=True)
    return StudyOutcome(layout, spec, table)


class DiskFullWatch(logging.Filter):
    """Stops a study whose trial failed on a full disk, with one line instead of tracebacks.

    A filter on the log record by which Tune reports a failed trial task
    (``Trial task failed for trial ...``, with the exception): when that
    exception is a :class:`trainers.run.atomic.DiskFull` (or any "no space
    left on device"), the record is dropped, its one-line message kept in
    :attr:`message`, and the driver interrupts Tune once (SIGINT, as Ctrl+C:
    Tune saves its state and the study stays resumable) instead of retrying
    trials into the same full disk."""
    # Tune's failed trials; then, same cause, Tune's own state upload and Ray's "unhandled error"
    # of a trial that failed while Tune was stopping
    LOGGERS = ("ray.tune.execution.tune_controller", "ray.tune.execution.experiment_state", "ray._private.worker")

    def __init__(self):
        super().__init__()
        self.message: Optional[str] = None

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        text = f"{record.getMessage()}\n{error if error is not None else ''}"
        match = re.search(r"(?:DiskFull: \[Errno 28\] )(" + NO_SPACE + ".*)", text, re.IGNORECASE)
        if match is None and self.message is None:
            return True
        if match is None:   # after the first: drop any other "no space" record too
            return not re.search(NO_SPACE, text, re.IGNORECASE)
        if self.message is None:
            self.message = match.group(1).strip()
            if threading.current_thread() is threading.main_thread():
                os.kill(os.getpid(), signal.SIGINT)
        return False

    @contextlib.contextmanager
    def installed(self):
        loggers = [logging.getLogger(name) for name in self.LOGGERS]
        for logger in loggers:
            logger.addFilter(self)
        try:
            yield self
        finally:
            for logger in loggers:
                logger.removeFilter(self)


def _resumable(message: str, layout: StudyLayout) -> DiskFull:
    """The one line ``eos study run``/``resume`` print for a study stopped by a full disk."""
    return DiskFull(errno.ENOSPC, f"{message}; the study stopped and can be resumed: free space on that "
                                  f"file system, then `eos study resume {layout.root}`")


def _as_disk_full(error: BaseException, layout: StudyLayout) -> Optional[DiskFull]:
    """A full disk in the driver itself (Tune's own writes) as one :class:`DiskFull`."""
    if isinstance(error, DiskFull):
        return error
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        where = error.filename or layout.root
        return DiskFull(errno.ENOSPC, f"{NO_SPACE}: writing {where} failed")
    return None


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
    watch = DiskFullWatch()
    try:
        with sigterm_as_sigint(), watch.installed():
            result_grid = tuner.fit()
    except BaseException as e:
        finish(spec, layout)  # keep the table in step with the run folders, whatever happened
        full = _as_disk_full(e, layout)
        if full is None and watch.message and isinstance(e, Exception):
            full = DiskFull(errno.ENOSPC, watch.message)   # e.g. Tune reading back its own cut-short files
        if full is not None:
            raise _resumable(full.strerror, layout) from e
        raise
    if watch.message:   # the failed trials are unfinished (resumable), not errors Tune gave up on
        finish(spec, layout)
        raise _resumable(watch.message, layout)
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
    resubmitted until the study is done.  The driver holds the study
    folder's lock (:mod:`study.lock`) throughout; a second driver is refused."""
    layout = StudyLayout(spec.study_dir)
    created = not layout.root.exists()
    layout.root.mkdir(parents=True, exist_ok=True)
    try:
        with study_lock(layout.root):
            if _existing_study(spec, layout, resume):
                return _resume_locked(layout, load_study_spec(layout.root), address=address,
                                      num_cpus=num_cpus, autoscale=autoscale, verbose=verbose)
            return _run_locked(spec, layout, address=address, num_cpus=num_cpus, autoscale=autoscale,
                               verbose=verbose)
    except BaseException:
        if created:   # failed before writing anything (e.g. resources do not fit): leave no empty folder
            with contextlib.suppress(OSError):
                layout.root.rmdir()
        raise


def _clean_up_after_a_crash(layout: StudyLayout) -> None:
    removed = layout.remove_stale_temporaries()
    if removed:
        print(f"[eos] removed {removed} temporary file(s) left in {layout.root} by an interrupted write", flush=True)


def _run_locked(spec: StudySpec, layout: StudyLayout, *, address, num_cpus, autoscale, verbose) -> StudyOutcome:
    import ray

    _clean_up_after_a_crash(layout)

    with study_mps(spec.resources.mps, spec.resources.gpu, cluster=bool(address)):
        started = connect(address, num_cpus, quiet=_quiet(verbose))
        _quiet_ray(_quiet(verbose))
        try:
            check_resources(spec.resources, ray.nodes(), cluster=bool(address), autoscale=autoscale)
            prepare_data(spec)
            write_json_atomic(layout.study_json, _study_record(spec))
            _quiet_tune()
            return _fit(build_tuner(spec, layout, verbose), spec, layout)
        finally:
            if started:
                ray.shutdown()   # the trials end before an MPS daemon of this study quits


TUNE_STATE_GLOBS = ("experiment_state-*.json", "basic-variant-state-*.json", "tuner.pkl", "searcher-state-*.pkl")


def _readable(path: Path) -> bool:
    import pickle

    try:
        if path.name.startswith("experiment_state-"):   # JSON; the others are pickles (whatever their suffix)
            json.loads(path.read_text())
        elif path.stat().st_size == 0:
            return False
        else:
            with path.open("rb") as f:
                pickle.load(f)
    except (OSError, ValueError, EOFError, pickle.UnpicklingError):
        return False
    except Exception:  # noqa: BLE001 - whole but needs what only Tune's restore sets up: Tune decides
        return True
    return True


def set_aside_damaged_tune_state(layout: StudyLayout) -> list[Path]:
    """Rename Tune's unreadable state files (``Tuner.restore`` would fail
    on them half-way, e.g. a 0-byte ``experiment_state-*.json``) to
    ``.<name>.damaged``; returns the damaged files (empty: all is well).
    After this ``Tuner.can_restore`` is false when the experiment state was
    among them, and a resume rebuilds the trials from the run folders."""
    damaged = [p for pattern in TUNE_STATE_GLOBS for p in sorted(layout.tune.glob(pattern)) if not _readable(p)]
    for path in damaged:
        os.replace(path, path.with_name(f".{path.name}.damaged"))
    if damaged:   # whatever Tune still has is of the same experiment: set it all aside, restore nothing
        for pattern in TUNE_STATE_GLOBS:
            for path in layout.tune.glob(pattern):
                os.replace(path, path.with_name(f".{path.name}.damaged"))
    return damaged


def find_study(study_dir_or_name: str | os.PathLike, storage: str | os.PathLike = "results") -> Path:
    """A study folder given as a path, or as a name under ``storage``."""
    candidates = [Path(study_dir_or_name), Path(storage) / str(study_dir_or_name)]
    for path in candidates:
        if (path / "study.json").is_file():
            return path.resolve()
        if (path / "merged.json").is_file():    # study.merge: a folder for reading
            raise ConfigError(f"study: {path} is a merge of studies run in parts (merged.json): resume each "
                              f"part in its own folder, then eos study merge again")
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
    from their checkpoints (``Tuner.restore``), the rest start.  Holds the
    study folder's lock like :func:`run_study`."""
    layout = StudyLayout(find_study(study_dir_or_name))
    with study_lock(layout.root):
        return _resume_locked(layout, load_study_spec(layout.root), address=address, num_cpus=num_cpus,
                              autoscale=autoscale, verbose=verbose)


def _resume_locked(layout: StudyLayout, spec: StudySpec, *, address, num_cpus, autoscale,
                   verbose) -> StudyOutcome:
    import ray
    from ray import tune

    _clean_up_after_a_crash(layout)

    with study_mps(spec.resources.mps, spec.resources.gpu, cluster=bool(address)):
        started = connect(address, num_cpus, quiet=_quiet(verbose))
        _quiet_ray(_quiet(verbose))
        try:
            check_resources(spec.resources, ray.nodes(), cluster=bool(address), autoscale=autoscale)
            prepare_data(spec)
            _quiet_tune()
            damaged = set_aside_damaged_tune_state(layout)
            if damaged:
                print(f"[eos] Tune's state in {layout.tune} is damaged ({', '.join(p.name for p in damaged)}: "
                      "a kill or a full disk while Tune wrote it; set aside as .*.damaged); resuming from "
                      "the run folders instead: finished trials are reused, unfinished ones continue from "
                      "their checkpoints", flush=True)
            if not damaged and tune.Tuner.can_restore(str(layout.tune)):
                tuner = tune.Tuner.restore(str(layout.tune), trainable=_trainable(_plan(spec, layout)),
                                           resume_unfinished=True, resume_errored=True)
            else:  # no (usable) Tune state: start the trials again; the run folders resume them
                if not damaged:
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
