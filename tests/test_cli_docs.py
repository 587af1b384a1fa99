"""The README's commands as a newcomer runs them (issue 18.8, 18.9), through the CLI."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_readme_example_config_ships_and_validates():
    from trainers.config import run_config
    from trainers.run.cli import load_config_file

    readme = (REPO / "README.md").read_text()
    assert "--config examples/my-run.yaml" in readme
    cfg = run_config(load_config_file(str(REPO / "examples" / "my-run.yaml")))
    assert cfg.model.preset == "small" and cfg.data.name == "npz" and cfg.data.subset == 5000


def test_eos_train_takes_a_study_presets_run_sections(tmp_path, capsys):
    from study.cli import main

    out = tmp_path / "runs"
    assert main(["train", "--base", "--lr", "1e-3", "--config", str(REPO / "study" / "presets" / "smoke.yaml"),
                 "--steps", "2", "--set", "train.print_every=0", "--out", str(out)]) == 0
    preset = yaml.safe_load((REPO / "study" / "presets" / "smoke.yaml").read_text())
    config = json.loads((out / "base_lr0.001_s0" / "config.json").read_text())
    for section in ("model", "data", "sharpness"):
        for key, value in preset[section].items():
            assert config[section][key] == value, f"{section}.{key}"
    assert config["optim"]["name"] == preset["study"]["optimizer"] and config["train"]["steps"] == 2
    assert config["train"]["checkpoint_every"] == preset["train"]["checkpoint_every"]


def test_the_readme_says_how_to_activate_and_what_the_install_and_tests_cost():
    readme = (REPO / "README.md").read_text()
    assert "source .venv/bin/activate" in readme
    assert "about 6 GB, even on a machine without a GPU" in readme
    assert "https://download.pytorch.org/whl/cpu" in readme
    assert "the whole suite takes about 18 minutes on a 2-core CPU" in readme
    assert ".venv/bin/eos study run study/presets/smoke.yaml --resume && .venv/bin/eos report results/smoke" in readme


def _study_folder(tmp_path, spec_overrides=()):
    from study.spec import load_spec
    from trainers.run.cli import parse_override

    spec = load_spec("smoke", overrides=[parse_override(f"study.storage={tmp_path}"),
                                         *map(parse_override, spec_overrides)])
    spec.study_dir.mkdir(parents=True)
    (spec.study_dir / "study.json").write_text(json.dumps({"format": 1, "spec": spec.to_dict()}))
    run = spec.study_dir / "runs" / "base_lr0.001_s0"
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (run / "status.json").write_text(json.dumps({"status": "completed", "steps_done": 6}))
    return spec


def test_the_dry_run_says_when_the_folder_holds_this_study(tmp_path, capsys):
    from study.cli import main

    spec = _study_folder(tmp_path)
    before = _tree(tmp_path)
    assert main(["study", "run", "smoke", "--dry-run", "--set", f"study.storage={tmp_path}"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1] == (f"  the folder {spec.study_dir} already holds this study (1 trial(s) ended): "
                      f"`eos study run ... --resume` or `eos study resume {spec.study_dir}` continues it")
    assert main(["study", "run", "smoke", "--dry-run", "--set", f"study.storage={tmp_path}",
                 "--set", "train.steps=7"]) == 0
    assert capsys.readouterr().out.splitlines()[1] == (
        f"  the folder {spec.study_dir} already holds a study 'smoke' with a different spec: "
        "`eos study run` will refuse; choose another --name")
    assert _tree(tmp_path) == before


@pytest.mark.skipif(not __import__("importlib").util.find_spec("ray"), reason="needs Ray")
def test_the_quick_start_command_runs_twice(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    line = [sys.executable, "-m", "study.cli", "study", "run", str(REPO / "study" / "presets" / "smoke.yaml"),
            "--resume", "--num-cpus", "2", "--set", "study.variants=[base]", "--set", "search.lr.grid=[1e-3]",
            "--set", "train.steps=3"]
    first = subprocess.run(line, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    steps = tmp_path / "results" / "smoke" / "steps"
    kept = _tree(steps)
    assert kept
    second = subprocess.run(line, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "[eos] study smoke: 1 completed (1/1 finished)" in second.stdout
    assert _tree(steps) == kept                              # the first run's steps, untouched
