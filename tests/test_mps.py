"""CUDA MPS for trials sharing a GPU (study/mps.py), with stand-in
``nvidia-cuda-mps-control`` and ``nvidia-smi`` programs that record how they
were called: the study starts a private daemon only when it should, points
the environment Ray's workers inherit at it, and quits it at exit; it never
touches a daemon it did not start."""
from __future__ import annotations

import os
import stat
import textwrap
from pathlib import Path

import pytest

from study import mps
from trainers.config import ConfigError

FAKE_CONTROL = r'''#!/usr/bin/env bash
# records its arguments, its stdin and the pipe folder it was given
echo "args=$* pipe=${CUDA_MPS_PIPE_DIRECTORY:-} stdin=$(if [ "$1" != "-d" ]; then cat; fi)" >> "$MPS_CALLS"
if [ "$1" = "-d" ]; then mkfifo "$CUDA_MPS_PIPE_DIRECTORY/control"; fi
'''
FAKE_SMI = '''#!/usr/bin/env bash
echo "GPU 0: NVIDIA H200 (UUID: GPU-0)"
'''


@pytest.fixture
def fake_driver(tmp_path, monkeypatch):
    """A PATH with the stand-in programs; returns the file their calls are logged to."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in ((mps.CONTROL, FAKE_CONTROL), ("nvidia-smi", FAKE_SMI)):
        path = bin_dir / name
        path.write_text(textwrap.dedent(text))
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    calls = tmp_path / "calls.log"
    monkeypatch.setenv("MPS_CALLS", str(calls))
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    monkeypatch.delenv("CUDA_MPS_LOG_DIRECTORY", raising=False)
    monkeypatch.setattr(mps, "DEFAULT_PIPE", str(tmp_path / "no-default-daemon"))
    return calls


def test_a_local_study_with_fractional_gpus_gets_a_private_daemon_quit_at_exit(fake_driver):
    lines = []
    with mps.study_mps(None, 0.25, cluster=False, log=lines.append) as decision:
        assert decision.start
        pipe = os.environ["CUDA_MPS_PIPE_DIRECTORY"]
        assert (Path(pipe) / "control").exists() and Path(os.environ["CUDA_MPS_LOG_DIRECTORY"]).is_dir()
        assert mps.running_daemon() == pipe
    calls = fake_driver.read_text().splitlines()
    assert calls == [f"args=-d pipe={pipe} stdin=", f"args= pipe={pipe} stdin=quit"]
    assert "CUDA_MPS_PIPE_DIRECTORY" not in os.environ and not Path(pipe).exists()
    assert lines == [f"[eos] CUDA MPS: started a private control daemon (pipe {pipe}); it quits when the study ends"]


def test_a_daemon_already_running_is_used_and_left_alone(fake_driver, tmp_path, monkeypatch):
    theirs = tmp_path / "their-pipe"
    theirs.mkdir()
    os.mkfifo(theirs / "control")
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(theirs))
    lines = []
    with mps.study_mps(None, 0.5, cluster=False, log=lines.append) as decision:
        assert not decision.start and os.environ["CUDA_MPS_PIPE_DIRECTORY"] == str(theirs)
    assert not fake_driver.exists()            # neither started nor told to quit
    assert (theirs / "control").exists()
    assert lines == [f"[eos] CUDA MPS: the control daemon already running (pipe {theirs}) serves the trials; "
                     "it is left running at exit"]


@pytest.mark.parametrize("mode, share, cluster, says", [
    (False, 0.25, False, "CUDA MPS off (resources.mps: false)"),
    (None, 0.0, False, None),                  # CPU trials: nothing to say
    (None, 1.0, False, None),                  # a whole GPU per trial
    (None, 0.25, True, None),                  # a cluster's nodes start their own
])
def test_no_daemon_where_none_is_wanted(fake_driver, mode, share, cluster, says):
    lines = []
    with mps.study_mps(mode, share, cluster=cluster, log=lines.append) as decision:
        assert not decision.start and "CUDA_MPS_PIPE_DIRECTORY" not in os.environ
    assert not fake_driver.exists()
    assert lines == ([] if says is None else [f"[eos] {decision.reason}"]) and (says is None or says in lines[0])


def test_without_the_driver_tools_the_default_goes_on_and_true_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))   # neither program
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    monkeypatch.setattr(mps, "DEFAULT_PIPE", str(tmp_path / "none"))
    decision = mps.plan(None, 0.25, cluster=False)
    assert not decision.start and "nvidia-cuda-mps-control is not on PATH" in decision.reason
    with pytest.raises(ConfigError, match=r"^resources\.mps: true, but nvidia-cuda-mps-control is not on PATH"):
        mps.plan(True, 0.25, cluster=False)
    assert mps.plan(None, 0.25, cluster=False, which=lambda _: "/x", gpus=lambda: 0).reason.startswith(
        "CUDA MPS not started: nvidia-smi lists no GPU")


def test_the_spec_field_is_validated_and_the_dry_run_says_what_happens(tmp_path, capsys, fake_driver):
    from study.cli import main
    from study.spec import load_spec

    with pytest.raises(ConfigError, match=r"resources\.mps: must be true or false"):
        load_spec("smoke", overrides=[{"resources": {"mps": "sometimes"}}], check_files=False)
    assert main(["study", "run", "smoke", "--dry-run", "--set", "resources.gpu=0.25",
                 "--set", "train.device=auto", "--set", f"study.storage={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "on this machine: CUDA MPS: a private control daemon serves the trials sharing each GPU" in out
    assert not fake_driver.exists()            # a dry run starts nothing
