"""One driver per study folder (study.lock): a second driver is refused with
a clear message, the lock goes when its driver exits, and the lock of a
killed driver is detected as stale by pid (and process start time) and host."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from study.lock import LOCK_NAME, StudyLocked, acquire, read_lock, release, study_lock

REPO = Path(__file__).resolve().parents[1]

HOLDER = """
import sys, time
from pathlib import Path
from study.lock import study_lock
with study_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(120)
"""


def hold_lock(root: Path) -> subprocess.Popen:
    """A second process that takes the lock of ``root`` and keeps it."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(root)], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_the_lock_is_released_on_exit_also_by_an_exception(tmp_path):
    with pytest.raises(RuntimeError):
        with study_lock(tmp_path) as path:
            held = read_lock(path)
            assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
            raise RuntimeError("boom")
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_second_driver_in_another_process_is_refused_until_the_first_ends(tmp_path):
    proc = hold_lock(tmp_path)
    try:
        with pytest.raises(StudyLocked, match=rf"^study: {tmp_path} is in use by another driver "
                                              rf"\(pid {proc.pid} on host {socket.gethostname()} since "):
            acquire(tmp_path)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    # Ctrl+C ends the holder through its `finally`: the lock is gone and can be taken
    assert not (tmp_path / LOCK_NAME).exists()
    release(acquire(tmp_path))


def test_the_lock_of_a_killed_driver_is_stale_and_taken_over(tmp_path, capsys):
    proc = hold_lock(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert (tmp_path / LOCK_NAME).exists()      # SIGKILL: nothing ran to remove it
    path = acquire(tmp_path)
    assert read_lock(path)["pid"] == os.getpid()
    assert "removing the stale lock of a driver that no longer runs" in capsys.readouterr().out
    release(path)


def test_a_reused_pid_is_still_a_stale_lock(tmp_path):
    # the pid runs (this process), but it started at another time: not the lock's owner
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid(),
                                                  "start": "1", "since": "then"}))
    release(acquire(tmp_path))


def test_a_lock_of_another_host_is_refused_and_says_how_to_clear_it(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "elsewhere-node-7", "pid": 4242, "since": "x"}))
    with pytest.raises(StudyLocked, match=r"pid 4242 on host elsewhere-node-7 .*another host: check there; "
                                          r"once that driver is gone, delete .*\.driver\.lock"):
        acquire(tmp_path)


def test_eos_study_run_and_resume_are_refused_while_another_driver_holds_the_study(tmp_path, capsys):
    from study.cli import main as cli_main
    from test_study_spec import small_spec

    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(small_spec(study={"name": "locked", "storage": str(tmp_path)})))
    root = tmp_path / "locked"
    root.mkdir()
    (root / "study.json").write_text("{}")   # `resume` finds a study here (the lock comes first)
    proc = hold_lock(root)
    try:
        t0 = time.monotonic()
        assert cli_main(["study", "run", str(spec_path), "--resume", "--verbose", "0"]) == 2
        assert cli_main(["study", "resume", str(root), "--verbose", "0"]) == 2
        assert time.monotonic() - t0 < 30     # refused before Ray is started
    finally:
        proc.terminate()
        proc.wait(30)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2, err
    assert err[0].startswith(f"eos study run: study: {root} is in use by another driver (pid {proc.pid} ")
    assert err[1].startswith(f"eos study resume: study: {root} is in use by another driver (pid {proc.pid} ")
    assert "two drivers would train the same trials twice" in err[0]

