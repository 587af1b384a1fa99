"""Study specs, early-stop rules, objective values and the per-variant Optuna
searcher — everything of the study package that needs no Ray cluster."""
import copy
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from study.early_stop import DivergenceMonitor
from study.runner import check_resources
from study.spec import (EarlyStopSection, ResourcesSection, load_spec, preset_path, presets,
                        read_spec_file, spec_from_dict, trial_id)
from study.trials import objective_value
from trainers.config import ConfigError


def small_spec(**sections) -> dict:
    """A valid grid spec: tiny model, 16×16 synthetic data, no sharpness."""
    spec = {
        "study": {"name": "t", "variants": ["base"], "seeds": [0], "storage": "results"},
        "search": {"algorithm": "grid", "lr": {"grid": [1e-3, 1e-4]}},
        "model": {"preset": "tiny"},
        "data": {"name": "synthetic", "image_size": 16, "synthetic_size": 32, "batch_size": 8},
        "sharpness": {"every": 0},
        "train": {"steps": 4, "checkpoint_every": 2, "print_every": 0},
    }
    for name, value in sections.items():
        spec[name] = {**spec.get(name, {}), **value} if isinstance(value, dict) else value
    return spec


def error_of(data: dict, **kwargs) -> str:
    with pytest.raises(ConfigError) as err:
        spec_from_dict(data, **kwargs)
    return str(err.value)


# ---------------------------------------------------------------------------
# valid specs


def test_grid_spec_builds_one_run_config_per_trial(tmp_path):
    spec = spec_from_dict(small_spec(study={"variants": ["base"], "seeds": [0, 1], "storage": str(tmp_path)}))
    keys = spec.grid_trials()
    assert [(k.variant, k.lr, k.seed) for k in keys] == [
        ("base", 1e-3, 0), ("base", 1e-3, 1), ("base", 1e-4, 0), ("base", 1e-4, 1)]
    assert spec.num_trials() == 4
    cfg = spec.run_config("base", 1e-4, 1)
    assert (cfg.optim.name, cfg.optim.lr, cfg.train.seed, cfg.variant.name) == ("adam", 1e-4, 1, "base")
    assert cfg.model.preset == "tiny" and cfg.data.image_size == 16 and cfg.train.steps == 4
    assert spec.study_dir == tmp_path / "t"
    assert spec.mode == "min"


def test_relative_paths_become_absolute(tmp_path):
    data = tmp_path / "d.npz"
    np.savez(data, x_train=np.zeros((64, 16, 16, 3), np.uint8))   # validation reads the array's shape (issue 18.4)
    spec = spec_from_dict(small_spec(study={"storage": "out"}, data={"name": "npz", "path": "d.npz"}),
                          base_dir=tmp_path)
    assert spec.study.storage == str(tmp_path / "out")
    assert spec.data["path"] == str(data)


def test_spec_round_trips_through_its_dict(tmp_path):
    spec = spec_from_dict(small_spec(search={"algorithm": "optuna", "lr": {"log_uniform": [1e-5, 1e-2]},
                                             "num_samples": 3}))
    again = spec_from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec


def test_trial_id_is_a_pure_function_of_variant_lr_seed():
    assert trial_id("base", 1e-3, 0) == "base_lr0.001_s0"
    assert trial_id("edm", 5e-4, 2) == "edm_lr0.0005_s2"
    # every digit of a continuous proposal is kept: no two learning rates share a folder
    assert trial_id("base", 0.00012345678901234, 0) != trial_id("base", 0.00012345678901235, 0)
    assert float(trial_id("base", 0.00012345678901234, 0).split("_lr")[1].split("_s")[0]) == 0.00012345678901234


def test_presets_smoke_and_paper_and_optuna():
    assert {"smoke", "paper", "optuna"} <= set(presets())
    smoke = load_spec("smoke")
    assert smoke.num_trials() == 4 and len(smoke.study.variants) == 2 and len(smoke.search.lr.grid) == 2
    assert smoke.resources.gpu == 0 and smoke.sharpness["every"] == 1
    assert smoke.data["image_size"] == 16 and smoke.model["preset"] == "tiny"


def test_paper_and_optuna_presets_list_all_seven_variants():
    from trainers.diffusion.variants import VARIANTS

    wanted = ["base", "edm", "vparam", "snr", "pd", "adap_s", "stf"]
    for name in ("paper", "optuna"):
        assert read_spec_file(name)["study"]["variants"] == wanted
    missing = [v for v in wanted if v not in VARIANTS]
    if missing:
        pytest.skip(f"variants {missing} are not registered in trainers.diffusion.variants yet")
    paper = load_spec("paper")
    assert paper.num_trials() == 21 and paper.search.lr.grid == [1e-3, 5e-4, 1e-4]
    assert paper.study.optimizer == "adam" and paper.resources.gpu == 0.25
    assert paper.data["subset"] == 5000 and paper.sharpness["every"] == 1
    assert paper.sharpness["plain_every"] == 10     # λ₁(H) beside λ₁(P⁻¹H), every 10th step
    assert paper.model["preset"] in ("small", "ddpm-cifar10")
    optuna = load_spec("optuna")
    assert optuna.search.algorithm == "optuna" and optuna.study.objective == "largest_stable_lr"
    assert optuna.mode == "max"


# ---------------------------------------------------------------------------
# invalid specs fail before launch, naming the field


def test_unknown_variant_names_the_list_entry():
    msg = error_of(small_spec(study={"variants": ["base", "edm", "foo"]}))
    assert msg.startswith("study.variants[2]: unknown variant 'foo'")


def test_negative_or_zero_lr_names_the_grid_entry():
    assert error_of(small_spec(search={"lr": {"grid": [-1e-3]}})).startswith("search.lr.grid[0]: must be > 0")
    assert error_of(small_spec(search={"lr": {"grid": [1e-3, 0]}})).startswith("search.lr.grid[1]: must be > 0")
    msg = error_of(small_spec(search={"algorithm": "optuna", "lr": {"log_uniform": [1e-2, 1e-3]}, "num_samples": 2}))
    assert msg.startswith("search.lr.log_uniform[1]:")


def test_unknown_keys_are_rejected_at_every_level():
    assert error_of({**small_spec(), "sweep": {}}).startswith("sweep: unknown key")
    assert error_of(small_spec(search={"lrs": [1e-3]})).startswith("search.lrs: unknown key")
    assert error_of(small_spec(resources={"gpus": 1})).startswith("resources.gpus: unknown key")
    assert error_of(small_spec(model={"presett": "tiny"})).startswith("model.presett: unknown key")


def test_missing_data_path_names_data_path(tmp_path):
    msg = error_of(small_spec(data={"name": "npz", "path": str(tmp_path / "nope.npz")}))
    assert msg.startswith("data.path: no such file") and "nope.npz" in msg
    msg = error_of(small_spec(data={"name": "imagefolder", "path": str(tmp_path / "nope")}))
    assert msg.startswith("data.path: no such folder")


def test_bad_run_config_values_name_the_field_and_the_trial():
    msg = error_of(small_spec(data={"batch_size": 0}))
    assert msg.startswith("data.batch_size: must be >= 1") and "variant=base" in msg


def test_per_trial_fields_may_not_be_set_in_the_base_config():
    assert error_of(small_spec(optim={"lr": 1e-3})).startswith("optim.lr: is set per trial from search.lr")
    assert error_of(small_spec(train={"seed": 3})).startswith("train.seed: is set per trial")
    assert error_of(small_spec(variant={"name": "edm"})).startswith("variant.name: is set per trial")


def test_search_sections_must_match_the_algorithm():
    assert error_of(small_spec(search={"algorithm": "optuna", "lr": {"grid": [1e-3]}})).startswith(
        "search.lr.log_uniform: is required")
    assert error_of(small_spec(search={"num_samples": 4})).startswith("search.num_samples: is only for")
    assert error_of(small_spec(search={"algorithm": "optuna", "lr": {"log_uniform": [1e-4, 1e-2]}})).startswith(
        "search.num_samples:")
    assert error_of(small_spec(search={"algorithm": "tpe"})).startswith("search.algorithm:")


def test_other_study_fields_are_checked():
    assert error_of(small_spec(study={"name": None})).startswith("study.name: is required")
    assert error_of(small_spec(study={"objective": "accuracy"})).startswith("study.objective:")
    assert error_of(small_spec(study={"objective": "fid"})).startswith("study.objective: 'fid' needs eval.every")
    assert error_of(small_spec(study={"seeds": [0, 0]})).startswith("study.seeds[1]: duplicate")
    assert error_of(small_spec(study={"optimizer": "lion"})).startswith("study.optimizer:")
    assert error_of(small_spec(study={"variant_options": {"edm": {}}})).startswith("study.variant_options.edm:")
    assert error_of(small_spec(early_stop={"loss_blowup": 0.5})).startswith("early_stop.loss_blowup:")
    assert error_of(small_spec(train={"device": "cuda"})).startswith("train.device: 'cuda' needs resources.gpu")


def test_resources_fractional_gpus_and_whole_gpus_above_one():
    spec = spec_from_dict(small_spec(resources={"cpu": 2, "gpu": 0.25, "max_concurrent": 8}))
    assert spec.resources == ResourcesSection(cpu=2.0, gpu=0.25, max_concurrent=8)
    assert error_of(small_spec(resources={"gpu": 1.5})).startswith("resources.gpu: above 1 must be a whole number")
    assert error_of(small_spec(resources={"gpu": -1})).startswith("resources.gpu: must be >= 0")
    assert error_of(small_spec(resources={"max_concurrent": 0})).startswith("resources.max_concurrent:")


def test_gpu_per_trial_must_fit_on_a_node():
    one_gpu = [{"Alive": True, "Resources": {"CPU": 8.0, "GPU": 1.0}}]
    check_resources(ResourcesSection(cpu=2, gpu=0.25), one_gpu, cluster=False)
    check_resources(ResourcesSection(cpu=2, gpu=1), one_gpu, cluster=False)
    with pytest.raises(ConfigError, match=r"^resources\.gpu: 2 GPUs per trial, but this machine has 1"):
        check_resources(ResourcesSection(gpu=2), one_gpu, cluster=False)
    with pytest.raises(ConfigError, match=r"^resources\.gpu: 2 GPUs per trial, but the largest node .* has 1 "
                                          r"\(pass --autoscale"):
        check_resources(ResourcesSection(gpu=2), one_gpu + [{"Alive": False, "Resources": {"GPU": 8.0}}],
                        cluster=True)
    check_resources(ResourcesSection(gpu=2), one_gpu, cluster=True, autoscale=True)
    with pytest.raises(ConfigError, match=r"^resources\.cpu: 16 CPUs per trial"):
        check_resources(ResourcesSection(cpu=16), one_gpu, cluster=False)


def test_gpu_on_a_machine_without_gpu_fails_unless_on_a_cluster():
    cpu_only = [{"Alive": True, "Resources": {"CPU": 2.0}}]
    with pytest.raises(ConfigError, match=r"^resources\.gpu: 0\.25 GPU per trial, but this machine has no GPU"):
        check_resources(ResourcesSection(gpu=0.25), cpu_only, cluster=False)
    with pytest.raises(ConfigError, match="--autoscale"):  # a cluster: the check is about its nodes
        check_resources(ResourcesSection(gpu=0.25), cpu_only, cluster=True)
    check_resources(ResourcesSection(gpu=0.25), cpu_only, cluster=True, autoscale=True)


def test_cli_rejects_an_invalid_spec_before_launch(tmp_path, capsys):
    import yaml

    from study.cli import main

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(small_spec(study={"variants": ["base", "foo"], "storage": str(tmp_path)})))
    assert main(["study", "run", str(path)]) == 2
    assert "study.variants[1]: unknown variant 'foo'" in capsys.readouterr().err
    assert main(["study", "run", "smoke", "--set", "search.lr.grid=[-1]", "--dry-run"]) == 2
    assert "search.lr.grid[0]: must be > 0" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()
    assert main(["study", "run", "smoke", "--name", "other", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "study other" in out and "base_lr0.001_s0" in out and "edm_lr0.0001_s0" in out


# ---------------------------------------------------------------------------
# objective and early stopping


def test_objective_values():
    assert objective_value("final_loss", "completed", 1e-3, 0.25, None) == 0.25
    assert objective_value("final_loss", "diverged", 1e-3, 0.25, None) == math.inf
    assert objective_value("final_loss", "completed", 1e-3, float("nan"), None) == math.inf
    assert objective_value("fid", "completed", 1e-3, 0.25, 31.5) == 31.5
    assert objective_value("fid", "completed", 1e-3, 0.25, None) == math.inf
    assert objective_value("largest_stable_lr", "completed", 5e-4, 9.0, None) == 5e-4
    assert objective_value("largest_stable_lr", "diverged", 5e-4, 0.1, None) == 0.0


def rows(losses, ratios=None):
    ratios = ratios or [None] * len(losses)
    return [{"step": i, "loss": l, "ratio": r} for i, (l, r) in enumerate(zip(losses, ratios))]


def first_verdict(monitor, rs):
    for row in rs:
        if monitor(row):
            return row["step"]
    return None


def test_loss_blowup_is_relative_to_the_first_loss():
    m = DivergenceMonitor(EarlyStopSection(loss_blowup=10))
    # 2.0 × 10 = 20: 19 is fine, 21 is a blow-up
    assert first_verdict(m, rows([2.0, 5.0, 19.0, 0.1, 21.0, 1.0])) == 4
    assert "21 > 10 × first loss 2" in m.reason
    assert first_verdict(DivergenceMonitor(EarlyStopSection(loss_blowup=None)), rows([1.0, 1e9])) is None


def test_ratio_rule_counts_consecutive_measurements():
    rules = EarlyStopSection(loss_blowup=None, ratio_above=2.0, ratio_steps=3)
    # above, above, (not measured), above -> third consecutive measurement at step 3
    assert first_verdict(DivergenceMonitor(rules), rows([1] * 5, [3.0, 2.5, None, 4.0, 0.5])) == 3
    # a measurement at or below the factor resets the streak
    assert first_verdict(DivergenceMonitor(rules), rows([1] * 6, [3.0, 3.0, 2.0, 3.0, 3.0, 0.5])) is None
    m = DivergenceMonitor(rules)
    assert first_verdict(m, rows([1] * 6, [3.0, 3.0, 2.0, 3.0, 3.0, 3.0])) == 5
    assert "3 consecutive" in m.reason


def test_replayed_history_gives_the_same_verdict_as_an_uninterrupted_run():
    rules = EarlyStopSection(loss_blowup=50, ratio_above=2.0, ratio_steps=4)
    rs = rows([1.0, 3.0, 2.0, 2.0, 2.0, 2.0, 2.0], [0.5, 3.0, 3.0, 3.0, None, 3.0, 3.0])
    straight = first_verdict(DivergenceMonitor(rules), rs)
    assert straight == 5
    resumed = DivergenceMonitor(rules)
    resumed.replay(copy.deepcopy(rs[:3]))      # the log up to a checkpoint
    assert first_verdict(resumed, rs[3:]) == straight
    # loss blow-up after a resume still compares with the very first loss
    resumed = DivergenceMonitor(EarlyStopSection(loss_blowup=10))
    resumed.replay(rows([1.0, 5.0]))
    assert resumed({"step": 2, "loss": 11.0, "ratio": None}) == "diverged"


def test_onset_of_the_monitor_is_the_analysis_onset_with_and_without_an_opening():
    """The early-stop onset is analysis.metrics.eos_onset's, also when the
    opening transient is limited (runs measuring Adam's update preconditioner)."""
    import numpy as np

    from analysis.metrics import eos_onset

    rng = np.random.default_rng(5)
    for _ in range(300):
        n = int(rng.integers(3, 30))
        ratios = [float(x) for x in rng.choice([0.5, 0.99, 1.0, 1.3, 5.0], size=n)]
        for i in rng.choice(n, size=n // 4, replace=False):
            ratios[i] = None
        opening = [None, int(rng.integers(0, 15))][int(rng.integers(0, 2))]
        monitor = DivergenceMonitor(EarlyStopSection(loss_blowup=None), opening=opening)
        for s, x in enumerate(ratios):
            monitor({"step": s, "loss": 1.0, "ratio": x})
        steps = [s for s, x in enumerate(ratios) if x is not None]
        values = [x for x in ratios if x is not None]
        assert monitor.onset == eos_onset(steps, values, opening), (ratios, opening)


# ---------------------------------------------------------------------------
# the per-variant Optuna searcher, without a cluster


def optuna_spec(tmp_path, **search):
    return spec_from_dict(small_spec(
        study={"name": "opt", "variants": ["base", "edm"], "storage": str(tmp_path)},
        search={"algorithm": "optuna", "lr": {"log_uniform": [1e-4, 1e-2]}, "num_samples": 3, "seed": 7, **search}))


def test_per_variant_search_balances_variants_and_persists_its_studies(tmp_path):
    from study.search import PerVariantSearch, optuna_study_name

    spec = optuna_spec(tmp_path)
    journal = tmp_path / "optuna.journal"
    search = PerVariantSearch(spec, journal)
    proposals = [search.suggest(f"t{i}") for i in range(6)]
    assert sorted(p["variant"] for p in proposals) == ["base"] * 3 + ["edm"] * 3
    assert all(1e-4 <= p["lr"] <= 1e-2 and p["seed"] == 0 for p in proposals)
    assert search.suggest("t6") == search.FINISHED
    for i, p in enumerate(proposals):  # edm's trials are told worse values than base's
        value = p["lr"] * (1 if p["variant"] == "base" else 100)
        search.on_trial_complete(f"t{i}", {"objective": value, "training_iteration": 1})

    # the same seeds give the same proposals
    again = PerVariantSearch(optuna_spec(tmp_path / "b"), tmp_path / "b.journal")
    assert [again.suggest(f"t{i}") for i in range(6)] == proposals

    # a new process reads both studies back from the journal file
    code = (
        "import json, optuna\n"
        "from study.search import journal_storage\n"
        f"st = journal_storage({str(journal)!r})\n"
        "out = {}\n"
        "for name in optuna.study.get_all_study_names(st):\n"
        "    s = optuna.load_study(study_name=name, storage=st)\n"
        "    out[name] = [(t.state.name, t.params['lr'], t.value) for t in s.trials]\n"
        "print(json.dumps(out))\n")
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                       text=True).stdout)
    for variant in ("base", "edm"):
        mine = [(p["lr"], p["lr"] * (1 if variant == "base" else 100)) for p in proposals if p["variant"] == variant]
        theirs = [(lr, value) for state, lr, value in loaded[optuna_study_name("opt", variant, 0)]]
        assert all(state == "COMPLETE" for state, _, _ in loaded[optuna_study_name("opt", variant, 0)])
        assert sorted(theirs) == sorted(mine)  # JSON round-trips floats exactly


def test_per_variant_search_state_survives_save_and_restore(tmp_path):
    from study.search import PerVariantSearch

    spec = optuna_spec(tmp_path)
    search = PerVariantSearch(spec, tmp_path / "optuna.journal")
    first = [search.suggest(f"t{i}") for i in range(3)]
    search.save(str(tmp_path / "state.pkl"))
    restored = PerVariantSearch(spec, tmp_path / "optuna.journal")
    restored.restore(str(tmp_path / "state.pkl"))
    # the restored searcher owes exactly the remaining three proposals and can complete the first ones
    rest = [restored.suggest(f"t{i}") for i in range(3, 6)]
    assert restored.suggest("t6") == restored.FINISHED
    assert sorted(p["variant"] for p in first + rest) == ["base"] * 3 + ["edm"] * 3
    for i, p in enumerate(first + rest):
        restored.on_trial_complete(f"t{i}", {"objective": p["lr"], "training_iteration": 1})
    import optuna

    from study.search import journal_storage, optuna_study_name
    study = optuna.load_study(study_name=optuna_study_name("opt", "base", 0),
                              storage=journal_storage(tmp_path / "optuna.journal"))
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3


# ---------------------------------------------------------------------------
# the trials table, from hand-made run folders


def make_run(layout, variant, lr, seed, rows, status=None):
    """A run folder as the trainer leaves it: config.json, status.json, the step log."""
    from study.spec import trial_id as name
    from trainers.config import run_config
    from trainers.run.steplog import StepLog

    tid = name(variant, lr, seed)
    run_dir = layout.prepare_run_dir(variant, tid)
    cfg = run_config({"optim": {"name": "adam", "lr": lr}, "variant": {"name": variant}, "train": {"seed": seed}})
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict()))
    log = StepLog(run_dir / "steps")
    for row in rows:
        log.append(**row)
    log.flush()
    if status is not None:
        (run_dir / "status.json").write_text(json.dumps(status))
    return tid


def test_trials_table_statuses_and_final_metrics(tmp_path):
    import pandas as pd
    import pyarrow.parquet as pq

    from study.layout import StudyLayout
    from study.trials import UNFINISHED_REASON, collect_trials, write_trials

    layout = StudyLayout(tmp_path / "s")
    nan = None
    done = make_run(layout, "base", 1e-3, 0, [
        {"step": 0, "loss": 1.0, "ratio": nan}, {"step": 1, "loss": 0.8, "ratio": 0.5},
        {"step": 2, "loss": 0.7, "ratio": 1.5, "fid": 90.0}, {"step": 3, "loss": 0.6, "ratio": nan}],
        {"status": "completed", "steps_done": 4, "final_loss": 0.6, "reason": None, "wall_time": 3.0})
    div = make_run(layout, "base", 1.0, 0, [{"step": 0, "loss": 1.0}, {"step": 1, "loss": 150.0}],
                   {"status": "diverged", "steps_done": 2, "final_loss": 150.0, "reason": "loss blow-up",
                    "wall_time": 1.0})
    nan_loss = make_run(layout, "base", 2.0, 0, [{"step": 0, "loss": 1.0}],
                        {"status": "diverged", "steps_done": 1, "final_loss": "nan", "reason": "nan"})
    cut = make_run(layout, "base", 1e-4, 0, [{"step": 0, "loss": 1.0, "ratio": 0.2},
                                             {"step": 1, "loss": 0.9, "ratio": 0.3}],
                   {"status": "running", "steps_done": 2, "final_loss": 0.9, "reason": None, "wall_time": 2.0})
    failed = make_run(layout, "base", 3e-4, 0, [{"step": 0, "loss": 1.0}])  # no status.json: crashed early
    tune_trials = [{"trial_id": failed, "variant": "base", "lr": 3e-4, "seed": 0, "error": "boom"},
                   {"trial_id": "base_lr5e-05_s0", "variant": "base", "lr": 5e-5, "seed": 0, "error": "no node"}]
    write_trials(layout, collect_trials(layout, "final_loss", ["base"], tune_trials))

    t = pd.read_parquet(layout.trials_table).set_index("trial_id")
    assert list(t["lr"]) == sorted(t["lr"])
    assert t.loc[done, ["status", "steps_done", "final_loss", "final_ratio", "max_ratio", "fid", "objective"]].tolist() \
        == ["completed", 4, 0.6, 1.5, 1.5, 90.0, 0.6]
    assert t.loc[div, "status"] == "diverged" and t.loc[div, "objective"] == math.inf
    assert t.loc[div, "reason"] == "loss blow-up" and math.isnan(t.loc[div, "final_ratio"])
    assert math.isnan(t.loc[nan_loss, "final_loss"]) and t.loc[nan_loss, "objective"] == math.inf
    assert t.loc[cut, ["status", "reason", "steps_done", "final_loss", "final_ratio", "max_ratio"]].tolist() \
        == ["running", UNFINISHED_REASON, 2, 0.9, 0.3, 0.3]
    assert t.loc[failed, ["status", "reason", "steps_done"]].tolist() == ["error", "boom", 1]
    assert t.loc["base_lr5e-05_s0", ["status", "reason", "steps_done"]].tolist() == ["error", "no node", 0]
    assert t.loc[done, "run_dir"] == f"runs/{done}" and json.loads(t.loc[done, "config"])["optim"]["lr"] == 1e-3
    schema = pq.read_schema(layout.trials_table)
    assert str(schema.field("fid").type) == "double" and str(schema.field("seed").type) == "int64"
    # the analysis package reads the table and the dataset as one study
    from analysis.load import load

    study = load(layout.root)
    assert set(study.trials["status"]) == {"completed", "diverged", "running", "error"}
    assert len(study.steps[study.steps["trial_id"] == done]) == 4
