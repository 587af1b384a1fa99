"""The boundary search (``search.algorithm: boundary``): each variant's largest stable lr by k-section.

Per (variant, seed), independently:

1. The search starts from the spec's bracket ``search.lr.bracket: [low,
   high]``, taken to hold the boundary: ``low`` is *assumed* stable and
   ``high`` *assumed* unstable until a trial says otherwise.
2. A **round** tries ``k`` learning rates spaced evenly in log-lr strictly
   inside the current bracket [lo, hi]: lr_i = 10^(log₁₀lo + i·(log₁₀hi −
   log₁₀lo)/(k+1)), i = 1..k (``k = 1``: bisection).  Its trials run in
   parallel.
3. Each trial's **verdict**: *unstable* when it ends ``diverged`` — NaN/inf
   loss or a loss above ``train.divergence_loss`` (the trainer), a loss above
   ``early_stop.loss_blowup`` × the first loss, λ₁/threshold above
   ``early_stop.ratio_above`` for ``ratio_steps`` measurements, or, after the
   EoS onset, λ₁/threshold above 1 + ``early_stop.edge_delta`` for
   ``edge_steps`` consecutive measurements (:mod:`study.early_stop`; a rule
   that fires ends the trial there) — and *stable* when it completes.  The
   verdict and its reason (the run's ``status.json`` reason) are recorded per
   trial in the state file and the trials table (``status``, ``reason``).
4. When every trial of the round has its verdict, the bracket becomes
   [largest stable lr below the smallest unstable lr, smallest unstable lr]
   (:func:`analysis.boundary.bracket_of`; an end no trial has decided yet
   stays the assumed ``low``/``high``) — one of the round's k + 1
   sub-intervals, so each round divides the log-width by k + 1.
5. The search stops when hi/lo ≤ ``search.boundary.factor``.  If an end is
   still only assumed then, one more trial checks it: ``low`` unstable means
   the boundary is below the bracket (``below``), ``high`` stable that it is
   above (``above``); otherwise the boundary is ``found`` in [lo, hi].

So a (variant, seed) takes at most ``k · R + 1`` trials in ``R + 1`` rounds,
R = ⌈log_{k+1}(ln(high/low) / ln(factor))⌉ (:func:`max_trials`): 7 + 1 for
bisection of [1e-5, 1e-1] to a factor 1.1.  A trial that fails (Tune gave up
after ``study.max_failures`` retries) stops its (variant, seed) with status
``error``; a resumed study runs it again and the search goes on.

:class:`BoundarySearch` is the Ray Tune :class:`~ray.tune.search.Searcher`
(wrapped in Tune's ``ConcurrencyLimiter`` by :func:`study.search.build_search`):
``suggest`` hands out the open points of the (variant, seed) with the fewest
trials so far, ``None`` while every open point is running (or
``resources.max_concurrent`` trials are), and ``FINISHED`` once every search
has stopped.  Its state is written to
``<study>/boundary.json`` at every change (and into Tune's searcher
checkpoint): the bracket, the current round and every verdict with its
reason.  A resumed study continues the bracket from that file: finished
trials are not run again (a point whose run folder already holds a final
status takes its verdict from there), and the trials Tune restores are the
ones the restored searcher still waits for.
"""
from __future__ import annotations

import json
import math
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ray.tune.search import Searcher

from analysis.boundary import REL_TOL, Bracket, bracket_of, within_factor
from study.spec import StudySpec, trial_id
from trainers.config import ConfigError
from trainers.run.atomic import write_json_atomic
from trainers.run.rundir import RunDir

STATE_FORMAT = 1
SEARCHING, FOUND, BELOW, ABOVE, ERROR = "searching", "found", "below", "above", "error"
STOPPED = (FOUND, BELOW, ABOVE)     # a search that has its answer


def rounds_needed(low: float, high: float, k: int, factor: float) -> int:
    """Rounds of k points that narrow [low, high] to a width of ``factor``."""
    width, rounds = math.log(high / low), 0
    while width > math.log(factor) * (1 + REL_TOL):
        width /= k + 1
        rounds += 1
    return rounds


def max_trials(low: float, high: float, k: int, factor: float) -> int:
    """The most trials one (variant, seed) takes: k per round, plus one check of an assumed end."""
    return k * rounds_needed(low, high, k, factor) + 1


def k_section(lo: float, hi: float, k: int) -> list[float]:
    """k learning rates evenly spaced in log₁₀ strictly inside (lo, hi)."""
    a, b = math.log10(lo), math.log10(hi)
    return [10.0 ** (a + i * (b - a) / (k + 1)) for i in range(1, k + 1)]


@dataclass
class BracketSearch:
    """The search of one (variant, seed), without Tune: feed it verdicts
    (:meth:`record`), ask it which lrs to try (:meth:`open_points`)."""
    low: float
    high: float
    k: int
    factor: float
    round: list[float] = field(default_factory=list)
    round_index: int = 0
    trials: list[dict] = field(default_factory=list)    # {"lr", "verdict", "reason", "trial", "round"} in order

    def __post_init__(self):
        if not self.round and not self.trials:
            self.round = k_section(self.low, self.high, self.k)

    # --- what is known ------------------------------------------------------
    @property
    def verdicts(self) -> dict[float, bool]:
        """lr -> stable, for the trials with a verdict."""
        return {t["lr"]: t["verdict"] == "stable" for t in self.trials if t["verdict"] in ("stable", "unstable")}

    @property
    def errors(self) -> dict[float, str]:
        """lr -> reason, for round points whose trial failed and has no verdict yet."""
        judged = self.verdicts
        return {t["lr"]: t["reason"] for t in self.trials if t["verdict"] == "error" and t["lr"] not in judged}

    def bracket(self) -> Bracket:
        """The bracket of the verdicts alone (ends no trial decided are None)."""
        return bracket_of(self.verdicts.items())

    def bounds(self) -> tuple[float, float]:
        """The current [lo, hi], an undecided end being the assumed bracket end."""
        b = self.bracket()
        return (self.low if b.lo is None else b.lo), (self.high if b.hi is None else b.hi)

    @property
    def status(self) -> str:
        verdicts, b = self.verdicts, self.bracket()
        if b.lo is not None and b.hi is not None and within_factor(b.lo, b.hi, self.factor):
            return FOUND
        if b.lo is None and verdicts.get(self.low) is False:
            return BELOW
        if b.hi is None and verdicts.get(self.high) is True:
            return ABOVE
        if any(lr in self.errors for lr in self.round):
            return ERROR
        return SEARCHING

    @property
    def done(self) -> bool:
        return self.status in STOPPED or self.status == ERROR

    def open_points(self, running: set[float] = frozenset()) -> list[float]:
        """Points of the current round that have no verdict, no error and are not ``running``."""
        if self.status != SEARCHING:
            return []
        judged, errors = self.verdicts, self.errors
        return [lr for lr in self.round if lr not in judged and lr not in errors and lr not in running]

    # --- what happens ---------------------------------------------------------
    def record(self, lr: float, stable: bool, reason: Optional[str] = None, trial: Optional[str] = None) -> bool:
        """A trial's verdict; False (and nothing changes) when ``lr`` already has one."""
        lr = float(lr)
        if lr in self.verdicts:
            return False
        self.trials.append({"lr": lr, "verdict": "stable" if stable else "unstable", "reason": reason,
                            "trial": trial, "round": self._round_of(lr)})
        self._advance()
        return True

    def fail(self, lr: float, reason: str, trial: Optional[str] = None) -> None:
        """A trial that failed without a verdict: its (variant, seed) stops with status ``error``."""
        lr = float(lr)
        if lr in self.verdicts or lr in self.errors:
            return
        self.trials.append({"lr": lr, "verdict": "error", "reason": reason, "trial": trial,
                            "round": self._round_of(lr)})

    def retry(self, lr: float) -> None:
        """A failed point runs again: its failures are kept as ``retried`` and the search goes on."""
        for t in self.trials:
            if t["lr"] == float(lr) and t["verdict"] == "error":
                t["verdict"] = "retried"

    def _round_of(self, lr: float) -> int:
        return self.round_index if lr in self.round else -1

    def _advance(self) -> None:
        while self.status == SEARCHING and all(lr in self.verdicts for lr in self.round):
            self.round = self._next_round()
            self.round_index += 1

    def _next_round(self) -> list[float]:
        lo, hi = self.bounds()
        b = self.bracket()
        if not within_factor(lo, hi, self.factor):
            return k_section(lo, hi, self.k)
        return [self.low] if b.lo is None else [self.high]   # check the end that is only assumed

    # --- state ------------------------------------------------------------------
    def to_dict(self) -> dict:
        b = self.bracket()
        lo, hi = self.bounds()
        return {"status": self.status, "lo": lo, "hi": hi, "lo_decided": b.lo is not None,
                "hi_decided": b.hi is not None, "non_monotone": b.non_monotone,
                "round_index": self.round_index, "round": list(self.round), "trials": [dict(t) for t in self.trials]}

    @classmethod
    def from_dict(cls, low: float, high: float, k: int, factor: float, data: dict) -> "BracketSearch":
        return cls(low, high, k, factor, round=[float(x) for x in data["round"]],
                   round_index=int(data["round_index"]), trials=[dict(t) for t in data["trials"]])


def _config_of(result: Optional[dict]) -> Optional[tuple[str, int, float]]:
    """(variant, seed, lr) of a Tune result (its ``config``, nested or flattened)."""
    if not result:
        return None
    config = result.get("config")
    if isinstance(config, dict) and {"variant", "seed", "lr"} <= set(config):
        return str(config["variant"]), int(config["seed"]), float(config["lr"])
    keys = ("config/variant", "config/seed", "config/lr")
    if all(k in result for k in keys):
        return str(result[keys[0]]), int(result[keys[1]]), float(result[keys[2]])
    return None


def read_state(path: str | os.PathLike) -> Optional[dict]:
    """The boundary state file of a study, or None when it has none."""
    path = Path(path)
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def state_finished(state: Optional[dict]) -> bool:
    """Whether every (variant, seed) of a state file has its answer."""
    return bool(state) and all(s["status"] in STOPPED for s in state["searches"])


class BoundarySearch(Searcher):
    """One :class:`BracketSearch` per (variant, seed), as a Tune searcher.

    ``state_path``: the JSON state file (``<study>/boundary.json``); when it
    exists the searches continue from it.  ``runs_dir``: the study's run
    folders, where a trial's reason is read (``<runs_dir>/<trial_id>/status.json``)
    and where a point already finished by an earlier attempt finds its verdict.
    """

    def __init__(self, spec: StudySpec, state_path: str | os.PathLike, runs_dir: Optional[str | os.PathLike] = None,
                 metric: str = "objective"):
        super().__init__(metric=metric, mode="max")
        options = spec.search.boundary
        self._params = {"bracket": [float(x) for x in spec.search.lr.bracket], "k": options.k,
                        "factor": options.factor}
        self._study = spec.name
        self._keys = [(v, s) for v in spec.study.variants for s in spec.study.seeds]
        self._path = Path(state_path)
        self._runs = Path(runs_dir) if runs_dir is not None else None
        low, high = self._params["bracket"]
        self._searches = {key: BracketSearch(low, high, options.k, options.factor) for key in self._keys}
        self._pending: dict[str, tuple[tuple[str, int], float]] = {}   # Tune trial id -> (key, lr)
        self._failed: dict[str, tuple[tuple[str, int], float]] = {}    # trials Tune gave up on
        self._max_concurrent: Optional[int] = None
        stored = read_state(self._path)
        if stored is not None:
            # a new experiment: the trials that were running then are not running now, and no Tune will
            # retry the failed ones, so their points reopen and are proposed again
            self._load(stored)
            for search in self._searches.values():
                for lr in list(search.errors):
                    search.retry(lr)

    # --- state file --------------------------------------------------------------
    def _load(self, stored: dict) -> None:
        if stored.get("format") != STATE_FORMAT:
            raise ConfigError(f"search: {self._path} has format {stored.get('format')}; this version reads "
                              f"format {STATE_FORMAT}")
        for name in ("bracket", "k", "factor"):
            if stored.get(name) != self._params[name]:
                raise ConfigError(f"search: {self._path} was written for {name}={stored.get(name)}, the spec has "
                                  f"{self._params[name]}; remove the file to start the search again")
        low, high = self._params["bracket"]
        for entry in stored["searches"]:
            key = (entry["variant"], int(entry["seed"]))
            if key in self._searches:
                self._searches[key] = BracketSearch.from_dict(low, high, self._params["k"],
                                                              self._params["factor"], entry)

    def state(self) -> dict:
        return {"format": STATE_FORMAT, "study": self._study, **self._params,
                "searches": [{"variant": v, "seed": s, **self._searches[(v, s)].to_dict()} for v, s in self._keys],
                "pending": {tid: {"variant": key[0], "seed": key[1], "lr": lr}
                            for tid, (key, lr) in self._pending.items()}}

    def _write(self) -> None:
        write_json_atomic(self._path, self.state())

    # --- run folders -----------------------------------------------------------
    def _run_status(self, key: tuple[str, int], lr: float) -> dict:
        if self._runs is None:
            return {}
        try:
            status = RunDir(self._runs / trial_id(key[0], lr, key[1])).read_status()
        except (OSError, ValueError):
            return {}
        return {} if status is None else status.to_dict()

    @staticmethod
    def _reason(status: str, reason: Optional[str], steps: Optional[int]) -> str:
        if reason:
            return reason
        if status == "completed":
            return f"completed{f' {steps} steps' if steps is not None else ''}; no instability rule fired"
        return "diverged"

    def _take_finished_runs(self, key: tuple[str, int]) -> None:
        """Verdicts of open (or failed) points whose run folder already holds a final status."""
        search = self._searches[key]
        running = {lr for k, lr in self._pending.values() if k == key}
        candidates = search.open_points(running) + [lr for lr in search.errors if lr not in running]
        for lr in candidates:
            status = self._run_status(key, lr)
            if status.get("status") in ("completed", "diverged"):
                search.record(lr, status["status"] == "completed",
                              self._reason(status["status"], status.get("reason"), status.get("steps_done")),
                              trial_id(key[0], lr, key[1]))

    # --- Searcher ----------------------------------------------------------------
    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True   # the space comes from the spec

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        """The ``ConcurrencyLimiter``'s limit is kept here (True: the limiter passes every call through), so
        that this searcher also hears of the trials a restored experiment retries, which the limiter
        would drop as unknown."""
        self._max_concurrent = max_concurrent
        return True

    def suggest(self, trial_id_: str):
        for key in self._keys:
            self._take_finished_runs(key)
        if self._max_concurrent is not None and len(self._pending) >= self._max_concurrent:
            return None
        choices = []
        for i, key in enumerate(self._keys):
            running = {lr for k, lr in self._pending.values() if k == key}
            points = self._searches[key].open_points(running)
            if points:
                n = len(self._searches[key].trials) + len(running)
                choices.append((n, i, key, points[0]))
        if not choices:
            if not self._pending and all(s.done for s in self._searches.values()):
                self._write()
                return Searcher.FINISHED
            return None
        _, _, key, lr = min(choices)
        self._pending[trial_id_] = (key, lr)
        self._write()
        return {"variant": key[0], "seed": key[1], "lr": lr}

    def on_trial_complete(self, trial_id_: str, result: Optional[dict] = None, error: bool = False) -> None:
        entry = self._pending.pop(trial_id_, None)
        if entry is None:   # a trial Tune restored that this searcher's checkpoint did not know
            config = _config_of(result)
            if config is None:
                return
            entry = ((config[0], config[1]), config[2])
        key, lr = entry
        search = self._searches.get(key)
        if search is None:
            return
        name = trial_id(key[0], lr, key[1])
        status = (result or {}).get("status")
        if status in ("completed", "diverged"):
            run = self._run_status(key, lr)
            reason = (result or {}).get("reason") or run.get("reason")
            search.record(lr, status == "completed", self._reason(status, reason, (result or {}).get("steps_done")),
                          name)
        elif error:
            search.fail(lr, "the trial failed (Tune gave up after study.max_failures retries; "
                            "`eos study resume` retries it)", name)
            self._failed[trial_id_] = key, lr
        # anything else (a trial stopped before its end) leaves the point open: it is proposed again
        self._write()

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump({"state": self.state(), "pending": self._pending, "failed": self._failed}, f)

    def restore(self, checkpoint_path: str) -> None:
        """Tune's checkpoint says which trials the restored experiment runs
        again with their ids: the ones running then, and the ones it had
        given up on (``eos study resume`` retries errored trials).  The
        verdicts and rounds come from the state file when it is there (it is
        written at every change, so it is at least as new)."""
        with open(checkpoint_path, "rb") as f:
            saved = pickle.load(f)
        stored = read_state(self._path)
        self._load(stored if stored is not None else saved["state"])
        self._pending = {**saved["pending"], **saved["failed"]}
        self._failed = {}
        for key, lr in saved["failed"].values():
            self._searches[key].retry(lr)
        self._write()

    # --- reading -------------------------------------------------------------
    @property
    def searches(self) -> dict[tuple[str, int], BracketSearch]:
        return dict(self._searches)
