import json
import subprocess
import sys

from trainers.run.cli import parse_override
from trainers.run.steplog import read_steps
from study.cli import main


def test_parse_override_reads_yaml_values():
    from trainers.config import run_config
    assert parse_override("data.flip=false") == {"data": {"flip": False}}
    assert parse_override("sharpness.every=3") == {"sharpness": {"every": 3}}
    assert run_config(parse_override("optim.lr=1e-3")).optim.lr == 1e-3


def test_eos_train_runs_one_trial_per_variant_and_lr(tmp_path, capsys):
    args = ["train", "--base", "--lr", "1e-3", "--lr", "5e-4", "--out", str(tmp_path),
            "--set", "data.image_size=16", "--set", "data.synthetic_size=32", "--set", "data.batch_size=8",
            "--set", "sharpness.every=0", "--set", "train.print_every=0", "--steps", "3"]
    assert main(args) == 0
    runs = sorted(p.name for p in tmp_path.iterdir())
    assert runs == ["base_lr0.0005_s0", "base_lr0.001_s0"]   # trainers.run.rundir.trial_id, as in a study
    for r in runs:
        assert len(read_steps(tmp_path / r / "steps")) == 3
        assert json.loads((tmp_path / r / "status.json").read_text())["status"] == "completed"


def test_bad_config_exits_2_naming_the_field(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "study.cli", "train", "--base", "--lr", "-1", "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "optim.lr" in proc.stderr
