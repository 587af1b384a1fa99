"""How trials are chosen: a grid, Optuna TPE over log-lr per (variant, seed),
or a boundary search per (variant, seed).

``grid``: Tune's ``grid_search`` over variants × learning rates × seeds.

``optuna``: one Optuna study per (variant, seed), each a seeded TPE sampler
over ``log_uniform`` learning rates proposing ``search.num_samples``
trials, so the search for one variant never sees another variant's results.
:class:`PerVariantSearch` hands Tune the next proposal of the study with the
fewest trials so far (ties in spec order), and is wrapped in Tune's
``ConcurrencyLimiter``.  The studies live in ``<study>/optuna.journal``
(Optuna's JournalStorage: an append-only file that is safe on network file
systems), named ``<study>/<variant>/seed<seed>``; they survive restarts and
can be opened with::

    optuna.load_study(study_name="smoke/base/seed0",
                      storage=JournalStorage(JournalFileBackend("results/smoke/optuna.journal")))

``boundary``: :class:`study.boundary.BoundarySearch`, k-section of a log-lr
bracket per (variant, seed) until the largest stable and the smallest
unstable lr are within ``search.boundary.factor``; also wrapped in the
``ConcurrencyLimiter``, with Tune's ``num_samples`` the most trials it can
take; its state lives in ``<study>/boundary.json``.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Optional

from ray.tune.search import ConcurrencyLimiter, Searcher

from study.layout import StudyLayout
from study.spec import StudySpec

METRIC = "objective"


def optuna_study_name(study: str, variant: str, seed: int) -> str:
    return f"{study}/{variant}/seed{seed}"


def journal_storage(path: str | Path):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(path)))


def grid_param_space(spec: StudySpec) -> dict:
    from ray import tune

    return {"variant": tune.grid_search(list(spec.study.variants)),
            "lr": tune.grid_search([float(lr) for lr in spec.search.lr.grid]),
            "seed": tune.grid_search(list(spec.study.seeds))}


class PerVariantSearch(Searcher):
    """One seeded :class:`ray.tune.search.optuna.OptunaSearch` per (variant, seed)."""

    def __init__(self, spec: StudySpec, journal: str | Path, metric: str = METRIC):
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        super().__init__(metric=metric, mode=spec.mode)
        storage = journal_storage(journal)
        low, high = spec.search.lr.log_uniform
        self._keys = [(v, s) for v in spec.study.variants for s in spec.study.seeds]
        self._studies = {}
        for i, (variant, seed) in enumerate(self._keys):
            self._studies[(variant, seed)] = OptunaSearch(
                space={"lr": optuna.distributions.FloatDistribution(low, high, log=True)},
                metric=metric, mode=spec.mode,
                sampler=optuna.samplers.TPESampler(seed=spec.search.seed + i),
                study_name=optuna_study_name(spec.name, variant, seed), storage=storage)
        self._quota = spec.search.num_samples
        self._assigned = {key: 0 for key in self._keys}
        self._trial_key: dict[str, tuple[str, int]] = {}

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # metric, mode and spaces are fixed at construction

    def suggest(self, trial_id: str) -> Optional[dict]:
        open_keys = [k for k in self._keys if self._assigned[k] < self._quota]
        if not open_keys:
            return self.FINISHED
        key = min(open_keys, key=lambda k: self._assigned[k])
        params = self._studies[key].suggest(trial_id)
        self._assigned[key] += 1
        self._trial_key[trial_id] = key
        return {"variant": key[0], "seed": key[1], "lr": float(params["lr"])}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._trial_key:
            self._studies[self._trial_key[trial_id]].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
        if trial_id in self._trial_key:
            self._studies[self._trial_key[trial_id]].on_trial_complete(trial_id, result=result, error=error)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))


def build_search(spec: StudySpec, layout: StudyLayout):
    """(param_space, search_alg, num_samples, max_concurrent_trials) for the Tuner."""
    if spec.search.algorithm == "grid":
        return grid_param_space(spec), None, 1, spec.resources.max_concurrent
    if spec.search.algorithm == "boundary":
        from study.boundary import BoundarySearch

        searcher = BoundarySearch(spec, layout.boundary_state, runs_dir=layout.runs, metric=METRIC)
    else:
        searcher = PerVariantSearch(spec, layout.optuna_journal)
    return {}, ConcurrencyLimiter(searcher, max_concurrent=spec.resources.max_concurrent), spec.num_trials(), None
