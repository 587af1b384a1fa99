"""The boundary search without a cluster: the bracketing logic, the Tune
searcher driven by a hand-written Tune loop against synthetic boundaries,
its state file and resume, the spec fields and the EoS early-stop rule."""
import json
import math
import pickle

import numpy as np
import pytest

from analysis.boundary import bracket_of
from analysis.metrics import eos_onset
from study.boundary import (ABOVE, BELOW, ERROR, FOUND, SEARCHING, BoundarySearch, BracketSearch, k_section,
                            max_trials, read_state, rounds_needed, state_finished)
from study.early_stop import DivergenceMonitor
from study.spec import EarlyStopSection, load_spec, spec_from_dict, trial_id
from test_study_spec import error_of, small_spec
from trainers.config import ConfigError

LOW, HIGH = 1e-5, 1e-1


# ---------------------------------------------------------------------------
# (a) the bracketing logic


def test_k_section_points_are_log_evenly_spaced_inside_the_bracket():
    assert k_section(1e-5, 1e-1, 1) == pytest.approx([1e-3], rel=1e-12)
    assert k_section(1e-5, 1e-1, 3) == pytest.approx([1e-4, 1e-3, 1e-2], rel=1e-12)
    for k in (1, 2, 5):
        pts = k_section(2e-4, 3e-2, k)
        assert pts == pytest.approx(list(np.logspace(np.log10(2e-4), np.log10(3e-2), k + 2)[1:-1]), rel=1e-12)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_rounds_needed_is_the_smallest_r_with_width_over_k_plus_1_to_the_r_below_the_factor(k):
    for low, high, factor in [(1e-5, 1e-1, 1.1), (1e-4, 1e-1, 1.1), (1e-3, 1.0, 2.0), (1e-3, 1.3e-3, 1.1)]:
        r = rounds_needed(low, high, k, factor)
        w = math.log(high / low)
        assert w / (k + 1) ** r <= math.log(factor) < w / (k + 1) ** (r - 1) if r else w <= math.log(factor)
        assert max_trials(low, high, k, factor) == k * r + 1
    assert rounds_needed(1e-5, 1e-1, 1, 1.1) == 7   # log2(ln 1e4 / ln 1.1) = 6.6


def bisect_by_hand(low, high, factor, boundary):
    """k = 1 written out: the lrs a bisection in log₁₀ tries, given stable iff lr < boundary."""
    a, b, tried, a_known, b_known = math.log10(low), math.log10(high), [], False, False
    while b - a > math.log10(factor) + 1e-12:
        m = (a + b) / 2
        tried.append(10 ** m)
        if 10 ** m < boundary:
            a, a_known = m, True
        else:
            b, b_known = m, True
    if not a_known:
        tried.append(low)
    elif not b_known:
        tried.append(high)
    return tried


def run_oracle(search: BracketSearch, stable, order=None):
    """Feed a search verdicts round by round; returns the lrs tried, per round."""
    rounds = []
    rng = np.random.default_rng(0)
    while search.status == SEARCHING:
        points = search.open_points()
        assert points, "a searching bracket has open points"
        rounds.append(points)
        for lr in (rng.permutation(points) if order == "random" else points):
            search.record(float(lr), stable(float(lr)), "oracle")
    return rounds


@pytest.mark.parametrize("boundary", [3.3e-5, 1.7e-4, 1e-3, 2.9e-3, 4.4e-2])
def test_bisection_tries_the_lrs_a_hand_written_bisection_tries(boundary):
    search = BracketSearch(LOW, HIGH, 1, 1.1)
    rounds = run_oracle(search, lambda lr: lr < boundary)
    assert [lr for r in rounds for lr in r] == pytest.approx(bisect_by_hand(LOW, HIGH, 1.1, boundary), rel=1e-12)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_k_section_brackets_every_boundary_within_the_factor_and_the_trial_bound(k):
    rng = np.random.default_rng(k)
    bound = max_trials(LOW, HIGH, k, 1.1)
    for boundary in 10 ** rng.uniform(-5, -1, size=60):
        search = BracketSearch(LOW, HIGH, k, 1.1)
        rounds = run_oracle(search, lambda lr: lr < boundary, order="random")
        tried = [lr for r in rounds for lr in r]
        b = search.bracket()
        assert search.status == FOUND
        assert b.lo < boundary <= b.hi and b.hi / b.lo <= 1.1 * (1 + 1e-9)
        assert len(tried) == len(set(tried)) <= bound
        assert all(len(r) == k for r in rounds[:rounds_needed(LOW, HIGH, k, 1.1)])
        assert not b.non_monotone


def test_a_boundary_outside_the_bracket_is_reported_below_or_above():
    search = BracketSearch(LOW, HIGH, 2, 1.1)
    tried = [lr for r in run_oracle(search, lambda lr: lr < 1e-7) for lr in r]
    assert search.status == BELOW and tried[-1] == LOW and len(tried) <= max_trials(LOW, HIGH, 2, 1.1)
    search = BracketSearch(LOW, HIGH, 2, 1.1)
    tried = [lr for r in run_oracle(search, lambda lr: True) for lr in r]
    assert search.status == ABOVE and tried[-1] == HIGH
    # a boundary just above the low end: the low end is checked once and is stable
    search = BracketSearch(LOW, HIGH, 1, 1.1)
    tried = [lr for r in run_oracle(search, lambda lr: lr < 1.05e-5) for lr in r]
    assert search.status == FOUND and tried[-1] == LOW and search.bracket().lo == LOW


def test_bracket_of_takes_the_first_unstable_lr_and_flags_a_stable_lr_above_it():
    b = bracket_of([(1e-3, True), (2e-3, False), (4e-3, True), (8e-3, False), (5e-4, True)])
    assert (b.lo, b.hi, b.non_monotone) == (1e-3, 2e-3, True)
    assert b.estimate == pytest.approx(math.sqrt(2e-6)) and b.width == pytest.approx(2.0)
    b = bracket_of([(1e-3, True), (2e-3, True)])
    assert (b.lo, b.hi, b.non_monotone) == (2e-3, None, False) and math.isnan(b.width)
    b = bracket_of([(1e-3, False)])
    assert (b.lo, b.hi) == (None, 1e-3)


def test_a_non_monotone_response_narrows_below_the_first_unstable_lr():
    # stable below 1e-3 and in a window [3e-3, 5e-3]; unstable elsewhere
    stable = lambda lr: lr < 1e-3 or 3e-3 <= lr <= 5e-3  # noqa: E731
    search = BracketSearch(LOW, HIGH, 3, 1.1)
    run_oracle(search, stable)
    b = search.bracket()
    assert search.status == FOUND and b.lo < 1e-3 <= b.hi


def test_record_is_idempotent_and_a_failed_trial_stops_until_it_gets_a_verdict():
    search = BracketSearch(LOW, HIGH, 2, 1.1)
    p1, p2 = search.open_points()
    assert search.record(p1, True) and not search.record(p1, False)
    assert search.verdicts == {p1: True}
    search.fail(p2, "crashed")
    assert search.status == ERROR and search.open_points() == [] and search.done
    assert search.record(p2, False, "diverged")   # e.g. a resumed study retried it
    assert search.status == SEARCHING and search.round_index == 1
    assert search.open_points() == pytest.approx(k_section(p1, p2, 2))


def test_bracket_search_round_trips_through_its_dict():
    search = BracketSearch(LOW, HIGH, 2, 1.1)
    for _ in range(2):
        for lr in search.open_points():
            search.record(lr, lr < 4e-3, "oracle")
    again = BracketSearch.from_dict(LOW, HIGH, 2, 1.1, json.loads(json.dumps(search.to_dict())))
    assert again.open_points() == search.open_points() and again.verdicts == search.verdicts
    assert again.status == search.status and again.round_index == search.round_index == 2


# ---------------------------------------------------------------------------
# (b) the Tune searcher on synthetic boundaries, with a hand-written Tune loop

BOUNDARIES = {"base": 2.2e-4, "edm": 1.37e-3, "vparam": 3.1e-2, "snr": 1.5e-4}


def boundary_spec(tmp_path, variants=tuple(BOUNDARIES), seeds=(0,), bracket=(LOW, HIGH), **options) -> object:
    return spec_from_dict(small_spec(
        study={"name": "bnd", "variants": list(variants), "seeds": list(seeds), "storage": str(tmp_path),
               "objective": "largest_stable_lr"},
        search={"algorithm": "boundary", "lr": {"bracket": list(bracket)}, **({"boundary": options} if options else {})}))


def synthetic_result(config: dict) -> dict:
    """What the study trainable reports at a trial's end, for stable iff lr < BOUNDARIES[variant]."""
    stable = config["lr"] < BOUNDARIES[config["variant"]]
    return {"status": "completed" if stable else "diverged", "objective": config["lr"] if stable else 0.0,
            "reason": None if stable else f"synthetic: lr >= {BOUNDARIES[config['variant']]:g}",
            "config": dict(config)}


def drive(searcher, slots: int, rng=None, stop_after=None, ids=None, running=None):
    """Tune's loop: fill the free slots with suggestions, complete one running trial (the oldest, or a random
    one with ``rng``), until the searcher says FINISHED; ``stop_after`` completions: stop there and return the
    still-running trials too (an interrupted study).  ``running``: (id, config) trials already running."""
    ids = ids if ids is not None else iter(range(10 ** 6))
    running, done = list(running or []), []
    while True:
        while len(running) < slots:
            tid = f"t{next(ids)}"
            config = searcher.suggest(tid)
            if config is None:
                break
            if config == searcher.FINISHED:
                assert not running, "FINISHED while trials run"
                return done, running
            running.append((tid, config))
        assert running, "the searcher proposed nothing and has nothing running"
        if stop_after is not None and len(done) == stop_after:
            return done, running
        tid, config = running.pop(int(rng.integers(len(running))) if rng is not None else 0)
        searcher.on_trial_complete(tid, result=synthetic_result(config))
        done.append(config)


def per_key(done):
    out = {}
    for c in done:
        out.setdefault((c["variant"], c["seed"]), []).append(c["lr"])
    return out


@pytest.mark.parametrize("k,bracket,slots", [(1, (1e-5, 1e-1), 1), (1, (1e-5, 1e-1), 4), (2, (1e-4, 1e-1), 8),
                                             (2, (1e-4, 1e-1), 3)])
def test_searcher_finds_each_variants_boundary_within_the_factor_in_at_most_8_trials(tmp_path, k, bracket, slots):
    spec = boundary_spec(tmp_path, bracket=bracket, k=k)
    searcher = BoundarySearch(spec, tmp_path / "boundary.json")
    done, _ = drive(searcher, slots, rng=np.random.default_rng(slots))
    trials = per_key(done)
    assert set(trials) == {(v, 0) for v in BOUNDARIES}
    for (variant, seed), lrs in trials.items():
        # bisection of [1e-5, 1e-1] to 1.1: 7 rounds (+1 check of an assumed end) whatever the boundary;
        # 2 per round in [1e-4, 1e-1]: 4 rounds of 2 (+1 when the boundary is in an end sub-interval)
        assert len(lrs) <= max_trials(*bracket, k, 1.1) == (8 if k == 1 else 9), (variant, lrs)
        assert len(lrs) <= 8 and len(set(lrs)) == len(lrs), (variant, lrs)
        search = searcher.searches[(variant, seed)]
        b = search.bracket()
        assert search.status == FOUND and b.lo < BOUNDARIES[variant] <= b.hi and b.hi / b.lo <= 1.1
    state = read_state(tmp_path / "boundary.json")
    assert state_finished(state) and state["pending"] == {}
    for entry in state["searches"]:
        assert {t["verdict"] for t in entry["trials"]} <= {"stable", "unstable"}
        unstable = [t for t in entry["trials"] if t["verdict"] == "unstable"]
        assert unstable and all(t["reason"].startswith("synthetic: lr >= ") for t in unstable)
        stable = [t for t in entry["trials"] if t["verdict"] == "stable"]
        assert all("no instability rule fired" in t["reason"] for t in stable)


def test_searcher_runs_at_most_k_trials_of_a_variant_at_once_and_balances_variants(tmp_path):
    spec = boundary_spec(tmp_path, variants=("base", "edm"), seeds=(0, 1), k=3)
    searcher = BoundarySearch(spec, tmp_path / "boundary.json")
    first = [searcher.suggest(f"t{i}") for i in range(13)]
    # 2 variants × 2 seeds × 3 points, then nothing until a trial completes
    assert sum(c is not None for c in first) == 12 and first[12] is None
    counts = per_key([c for c in first if c])
    assert all(len(v) == 3 for v in counts.values()) and len(counts) == 4
    assert [first[i]["variant"] for i in range(4)] == ["base", "base", "edm", "edm"]  # fewest trials first


def test_a_trial_that_failed_stops_its_variant_only(tmp_path):
    spec = boundary_spec(tmp_path, variants=("base", "edm"))
    searcher = BoundarySearch(spec, tmp_path / "boundary.json")
    a, b = searcher.suggest("a"), searcher.suggest("b")
    assert {a["variant"], b["variant"]} == {"base", "edm"}
    searcher.on_trial_complete("a", error=True)
    failed = searcher.searches[(a["variant"], 0)]
    assert failed.status == ERROR and "max_failures" in failed.errors[a["lr"]]
    done, _ = drive(searcher, 2, ids=iter(range(100, 10 ** 6)), running=[("b", b)])  # the other variant goes on
    assert all(c["variant"] == b["variant"] for c in done)
    assert searcher.searches[(b["variant"], 0)].status == FOUND
    assert not state_finished(read_state(tmp_path / "boundary.json"))


def test_a_failed_trial_is_retried_by_a_resumed_study(tmp_path):
    spec = boundary_spec(tmp_path, variants=("base",))
    path = tmp_path / "boundary.json"
    searcher = BoundarySearch(spec, path)
    config = searcher.suggest("a")
    searcher.on_trial_complete("a", error=True)
    assert searcher.suggest("b") == searcher.FINISHED       # nothing else to do: the study ends, unfinished
    searcher.save(str(tmp_path / "ckpt.pkl"))
    # `eos study resume` (Tuner.restore, resume_errored): Tune runs trial "a" again, with its id
    restored = BoundarySearch(spec, path)
    restored.restore(str(tmp_path / "ckpt.pkl"))
    assert restored.suggest("c") is None                     # waits for "a"
    restored.on_trial_complete("a", result=synthetic_result(config))
    done, _ = drive(restored, 1, ids=iter(range(100, 10 ** 6)))
    search = restored.searches[("base", 0)]
    assert search.status == FOUND and [t["verdict"] for t in search.trials][:2] == ["retried", "unstable"]
    # without Tune's state a new searcher proposes the failed point again itself
    other = tmp_path / "other"
    first = BoundarySearch(boundary_spec(other, variants=("base",)), other / "boundary.json")
    lost = first.suggest("a")
    first.on_trial_complete("a", error=True)
    assert BoundarySearch(boundary_spec(other, variants=("base",)), other / "boundary.json").suggest("x") == lost


def test_the_concurrency_limit_is_kept_by_the_searcher(tmp_path):
    from ray.tune.search import ConcurrencyLimiter

    searcher = BoundarySearch(boundary_spec(tmp_path, k=2), tmp_path / "boundary.json")
    limited = ConcurrencyLimiter(searcher, max_concurrent=3)
    got = [limited.suggest(f"t{i}") for i in range(4)]
    assert all(isinstance(c, dict) for c in got[:3]) and got[3] is None
    limited.on_trial_complete("t0", result=synthetic_result(got[0]))
    assert isinstance(limited.suggest("t4"), dict)


def test_a_trial_stopped_before_its_end_is_proposed_again(tmp_path):
    searcher = BoundarySearch(boundary_spec(tmp_path, variants=("base",)), tmp_path / "boundary.json")
    first = searcher.suggest("a")
    searcher.on_trial_complete("a", result={"status": "running", "config": first})
    assert searcher.suggest("b") == first


def test_a_point_whose_run_folder_is_finished_takes_its_verdict_from_there(tmp_path):
    spec = boundary_spec(tmp_path, variants=("base",))
    runs = tmp_path / "runs"
    lr = k_section(LOW, HIGH, 1)[0]
    (runs / trial_id("base", lr, 0)).mkdir(parents=True)
    (runs / trial_id("base", lr, 0) / "status.json").write_text(json.dumps(
        {"status": "diverged", "steps_done": 3, "reason": "loss 55 > 10 × first loss 1 at step 2"}))
    searcher = BoundarySearch(spec, tmp_path / "boundary.json", runs_dir=runs)
    nxt = searcher.suggest("a")
    assert nxt["lr"] == pytest.approx(k_section(LOW, lr, 1)[0])   # 1e-3 was judged from its folder: no trial
    entry = read_state(tmp_path / "boundary.json")["searches"][0]
    assert entry["trials"][0]["verdict"] == "unstable" and entry["trials"][0]["reason"].startswith("loss 55")


# ---------------------------------------------------------------------------
# (d) resume continues the bracket


def uninterrupted(tmp_path, **options):
    spec = boundary_spec(tmp_path / "ref", **options)
    done, _ = drive(BoundarySearch(spec, tmp_path / "ref" / "boundary.json"), 2)
    return per_key(done)


def test_a_new_searcher_continues_from_the_state_file(tmp_path):
    """The driver died (no Tune state): the study starts a new searcher, which reads boundary.json,
    proposes again the points that were running and goes on with the same bracket."""
    expected = uninterrupted(tmp_path, k=2)
    spec = boundary_spec(tmp_path, k=2)
    path = tmp_path / "boundary.json"
    done, running = drive(BoundarySearch(spec, path), 2, stop_after=9)
    assert running and not state_finished(read_state(path))
    again = BoundarySearch(spec, path)
    reproposed = [(f"n{i}", again.suggest(f"n{i}")) for i in range(len(running))]
    assert sorted((c["variant"], c["lr"]) for _, c in reproposed) == sorted((c["variant"], c["lr"])
                                                                           for _, c in running)
    rest, _ = drive(again, 2, ids=iter(range(1000, 10 ** 6)), running=reproposed)
    total = per_key(done + rest)
    assert {k: sorted(v) for k, v in total.items()} == {k: sorted(v) for k, v in expected.items()}
    assert all(len(v) == len(set(v)) for v in total.values())  # no point tried twice


def test_tunes_checkpoint_says_which_trials_resume_and_the_state_file_holds_the_newer_verdicts(tmp_path):
    """Tune restores from a searcher checkpoint older than boundary.json: the trials in the checkpoint are
    resumed by Tune (same ids), verdicts that came after it are kept, no point runs twice."""
    expected = uninterrupted(tmp_path, k=1)
    spec = boundary_spec(tmp_path, k=1)
    path = tmp_path / "boundary.json"
    first = BoundarySearch(spec, path)
    done, running = drive(first, 2, stop_after=4)
    first.save(str(tmp_path / "ckpt.pkl"))                    # Tune's experiment snapshot
    tid, config = running.pop(0)                              # after it: one trial finishes ...
    first.on_trial_complete(tid, result=synthetic_result(config))
    done.append(config)
    late = [(t, first.suggest(t)) for t in ("late0", "late1")]   # ... and new ones start, then the driver dies
    late = [(t, c) for t, c in late if isinstance(c, dict)]
    assert late

    restored = pickle.loads(pickle.dumps(BoundarySearch(spec, path)))   # Tuner.restore unpickles the searcher
    restored.restore(str(tmp_path / "ckpt.pkl"))
    # Tune resumes the trials of its snapshot, with their ids: the finished one reports again (its run
    # folder is done), the other runs to its end
    for t, c in [(tid, config)] + running:
        restored.on_trial_complete(t, result=synthetic_result(c))
    done += [c for _, c in running]
    # the trials started after the snapshot are unknown to Tune: their points are proposed again
    rest, _ = drive(restored, 2, ids=iter(range(500, 10 ** 6)))
    assert {(c["variant"], c["lr"]) for _, c in late} <= {(c["variant"], c["lr"]) for c in rest}
    total = per_key(done + rest)
    assert {k: sorted(v) for k, v in total.items()} == {k: sorted(v) for k, v in expected.items()}


def test_a_state_file_of_another_search_is_refused(tmp_path):
    path = tmp_path / "boundary.json"
    BoundarySearch(boundary_spec(tmp_path, k=1), path).suggest("a")
    with pytest.raises(ConfigError, match=r"^search: .*boundary\.json was written for k=1, the spec has 2"):
        BoundarySearch(boundary_spec(tmp_path, k=2), path)


# ---------------------------------------------------------------------------
# the spec


def test_boundary_spec_fields_and_defaults(tmp_path):
    spec = boundary_spec(tmp_path)
    assert spec.search.boundary.k == 1 and spec.search.boundary.factor == 1.1
    assert spec.num_trials() == len(BOUNDARIES) * 8 and spec.mode == "max"
    again = spec_from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    preset = load_spec("boundary")
    assert preset.search.algorithm == "boundary" and preset.study.objective == "largest_stable_lr"
    assert preset.early_stop.edge_delta is not None and preset.sharpness["every"] > 0


def boundary_error(**search) -> str:
    return error_of(small_spec(study={"objective": "largest_stable_lr"},
                               search={"algorithm": "boundary", "lr": {"bracket": [1e-5, 1e-1]}, **search}))


def test_boundary_spec_errors_name_the_field():
    assert boundary_error(lr={"bracket": [0, 1e-1]}).startswith("search.lr.bracket[0]: must be > 0")
    assert boundary_error(lr={"bracket": [1e-2, 1e-3]}).startswith("search.lr.bracket[1]: must be > bracket[0]")
    assert boundary_error(lr={"bracket": [1e-2]}).startswith("search.lr.bracket: must be a list of 2 values")
    assert boundary_error(lr={"log_uniform": [1e-5, 1e-1]}).startswith("search.lr.bracket: is required for "
                                                                      "search.algorithm=boundary")
    assert boundary_error(lr={"bracket": [1e-3, 1.05e-3]}).startswith("search.lr.bracket: [0.001, 0.00105] is "
                                                                     "already narrower")
    assert boundary_error(boundary={"k": 0}).startswith("search.boundary.k: must be >= 1")
    assert boundary_error(boundary={"factor": 1.0}).startswith("search.boundary.factor: must be > 1")
    assert boundary_error(boundary={"kk": 2}).startswith("search.boundary.kk: unknown key")
    assert boundary_error(num_samples=8).startswith("search.num_samples: is only for search.algorithm=optuna")
    assert error_of(small_spec(search={"boundary": {"k": 2}})).startswith("search.boundary: is only for "
                                                                          "search.algorithm=boundary")
    assert error_of(small_spec(search={"lr": {"grid": [1e-3], "bracket": [1e-4, 1e-2]}})).startswith(
        "search.lr.bracket: is only for search.algorithm=boundary")
    msg = error_of(small_spec(search={"algorithm": "boundary", "lr": {"bracket": [1e-5, 1e-1]}}))
    assert msg.startswith("study.objective: search.algorithm=boundary searches for the largest stable lr")
    assert error_of(small_spec(early_stop={"edge_delta": -0.1})).startswith("early_stop.edge_delta: must be >= 0")
    assert error_of(small_spec(early_stop={"edge_steps": 0})).startswith("early_stop.edge_steps: must be >= 1")
    # small_spec turns the probe off: a λ₁ rule without λ₁ is refused
    assert error_of(small_spec(early_stop={"edge_delta": 0.1})).startswith("early_stop.edge_delta: needs λ₁")


def test_dry_run_describes_the_plan(capsys):
    from study.cli import main

    assert main(["study", "run", "boundary", "--dry-run", "--set", "search.boundary.k=2"]) == 0
    out = capsys.readouterr().out
    assert "at most 77 trials, search boundary" in out
    assert "2 trial(s) per round in parallel" in out and "5 rounds" in out and "at most 11 trials" in out
    assert "first round: lr 0.0002154, 0.004642" in out
    assert "after the EoS onset, λ₁/threshold > 1.2 for 20 consecutive measurements" in out
    assert "loss > 10 × the first step's loss" in out and "stf seed 0: bracket [1e-05, 0.1]" in out
    assert "boundary.json" in out


# ---------------------------------------------------------------------------
# the edge rule of early_stop


def edge_verdict_by_hand(ratios, delta, m):
    """The first step at which m consecutive measured ratios after the onset are all > 1 + delta, from
    analysis.metrics.eos_onset and a window scan."""
    steps = np.arange(len(ratios))
    r = np.array([np.nan if x is None else x for x in ratios], dtype=float)
    onset = eos_onset(steps, r)
    if onset is None:
        return None
    measured = [(s, x) for s, x in zip(steps, r) if np.isfinite(x) and s >= onset]
    for i in range(m - 1, len(measured)):
        if all(x > 1 + delta for _, x in measured[i - m + 1:i + 1]):
            return int(measured[i][0])
    return None


def test_edge_rule_matches_the_onset_of_the_analysis_and_a_window_scan():
    rng = np.random.default_rng(3)
    for trial in range(300):
        n = int(rng.integers(5, 40))
        ratios = list(np.round(rng.choice([0.5, 0.95, 1.0, 1.05, 1.15, 1.3, 3.0], size=n), 3))
        for i in rng.choice(n, size=n // 5, replace=False):
            ratios[i] = None
        delta, m = float(rng.choice([0.0, 0.1, 0.2])), int(rng.integers(1, 5))
        monitor = DivergenceMonitor(EarlyStopSection(loss_blowup=None, edge_delta=delta, edge_steps=m))
        got = next((s for s, x in enumerate(ratios) if monitor({"step": s, "loss": 1.0, "ratio": x})), None)
        assert got == edge_verdict_by_hand(ratios, delta, m), (ratios, delta, m)
        if got is not None:
            assert f"> {1 + delta:g} for {m} consecutive measurements after the EoS onset" in monitor.reason


def test_edge_rule_ignores_adams_opening_transient_and_replays_the_same():
    rules = EarlyStopSection(loss_blowup=None, edge_delta=0.1, edge_steps=3)
    transient = [9.0, 6.0, 3.0, 1.5]            # starts far above the threshold: not an onset
    ratios = transient + [0.8, 0.9, 1.02, 1.3, 1.25, 0.9, 1.2, 1.3, 1.4, 1.0]
    monitor = DivergenceMonitor(rules)
    verdicts = [monitor({"step": s, "loss": 1.0, "ratio": x}) for s, x in enumerate(ratios)]
    assert verdicts.index("diverged") == 12 and "onset at step 6" in monitor.reason
    resumed = DivergenceMonitor(rules)
    resumed.replay([{"step": s, "loss": 1.0, "ratio": x} for s, x in enumerate(ratios[:11])])
    assert [resumed({"step": s, "loss": 1.0, "ratio": ratios[s]}) for s in (11, 12)] == [None, "diverged"]


def test_summary_lines_of_a_boundary_study(tmp_path):
    from study.layout import StudyLayout
    from study.runner import boundary_lines

    spec = boundary_spec(tmp_path, variants=("base", "edm"))
    layout = StudyLayout(spec.study_dir)
    searcher = BoundarySearch(spec, layout.boundary_state)
    drive(searcher, 2)
    lines = boundary_lines(layout)
    assert lines[0].startswith("[eos]   boundary base seed 0: found, stable ")
    lo, hi = (searcher.searches[("base", 0)].bracket().lo, searcher.searches[("base", 0)].bracket().hi)
    assert f"stable {lo:g} < unstable {hi:g} (×{hi / lo:.3g}), 7 trials" in lines[0]
    assert lines[-1] == f"[eos] boundary state: {layout.boundary_state}"
