"""A study on a local multi-node Ray cluster: a head and two worker "nodes"
started with `ray start` on a loopback address of this machine (each its own
raylet, one CPU each, a custom resource each), the smoke-sized study run with
`eos study run --address` against it, and one worker node's raylet SIGKILLed
mid-study.  Its trial is rescheduled on the other node, resumes from its
checkpoint in the shared study folder, the study completes, every step once.

Bounded in time (every wait has a deadline; about a minute and a half on a
loaded 2-core machine) and cleaned up afterwards: only the process groups
this test started are stopped.  Deselect with ``-m "not multinode"``.
"""
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

from test_study_spec import small_spec  # noqa: E402

pytestmark = pytest.mark.multinode

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
HOST = "127.0.0.2"          # a loopback address Ray does not rewrite to this machine's network address


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    """Stop a `ray start --block` this test started: its process group and any child that left it."""
    if proc.poll() is None:
        try:
            children = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib_suppress():
                os.killpg(proc.pid, sig)
            try:
                proc.wait(10)
                break
            except subprocess.TimeoutExpired:
                continue
        for child in children:
            with contextlib_suppress():
                child.kill()


class contextlib_suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], (ProcessLookupError, PermissionError, psutil.Error))


def raylet_of(proc: subprocess.Popen):
    for child in psutil.Process(proc.pid).children(recursive=True):
        if child.name() == "raylet":
            return child
    return None


def alive_nodes(address: str, env: dict) -> int:
    code = ("import ray, logging; ray.init(address=%r, logging_level=logging.ERROR); "
            "print(sum(n['Alive'] for n in ray.nodes()))") % address
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else 0


@pytest.fixture
def local_cluster(tmp_path):
    """(address, env, {"a": Popen, "b": Popen}) of a head without CPUs and two one-CPU worker nodes."""
    temp = Path(tempfile.mkdtemp(prefix="eosray", dir="/tmp"))   # short: Ray's socket paths must fit
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PYTHONPATH=str(REPO), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
               RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="3",
               RAY_USAGE_STATS_ENABLED="0")
    port = free_port()
    address = f"{HOST}:{port}"
    common = ["--block", "--disable-usage-stats", f"--node-ip-address={HOST}"]
    procs, logs = {}, {}

    def start(name: str, *args: str) -> None:
        logs[name] = temp / f"start-{name}.log"
        with open(logs[name], "w") as log:
            procs[name] = subprocess.Popen([RAY, "start", *args, *common], env=env, start_new_session=True,
                                           stdout=log, stderr=subprocess.STDOUT)

    def wait_for(nodes: int, seconds: float) -> bool:
        """Whether the cluster reached ``nodes`` alive nodes; False when the newest `ray start` gave up."""
        deadline = time.monotonic() + seconds
        while alive_nodes(address, env) < nodes:
            newest = list(procs)[-1]
            for name, proc in procs.items():
                if proc.poll() is not None:
                    assert name == newest and "timed out during startup" in logs[name].read_text(), \
                        f"`ray start` of node {name} exited with {proc.returncode}: {logs[name].read_text()[-2000:]}"
                    return False
            assert time.monotonic() < deadline, f"the local cluster did not reach {nodes} nodes in {seconds:.0f} s"
            time.sleep(2)
        return True

    try:
        start("head", "--head", f"--port={port}", "--num-cpus=0", "--num-gpus=0", "--include-dashboard=false",
              f"--temp-dir={temp}")
        assert wait_for(1, 120), logs["head"].read_text()[-2000:]
        # one worker at a time, each joining a GCS that already answers; Ray gives a raylet a fixed
        # 30 s to register, which a loaded 2-core machine can miss: such a start is tried again
        for name in ("a", "b"):
            for attempt in range(3):
                start(name, f"--address={address}", "--num-cpus=1", "--num-gpus=0",
                      f"--resources={json.dumps({'node_' + name: 1})}")
                if wait_for(len(procs), 120):
                    break
                with contextlib_suppress():      # what the failed start left of its process group
                    os.killpg(procs.pop(name).pid, signal.SIGKILL)
            else:
                pytest.fail(f"node {name} did not join in 3 attempts: {logs[name].read_text()[-2000:]}")
        yield address, env, procs
    finally:
        for proc in reversed(list(procs.values())):
            stop(proc)
        subprocess.run(["rm", "-rf", str(temp)], check=False)


def test_a_study_survives_a_worker_node_killed_mid_study(local_cluster, tmp_path):
    address, env, procs = local_cluster
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(small_spec(
        study={"name": "nodes", "storage": str(tmp_path), "max_failures": 3},
        resources={"cpu": 1, "max_concurrent": 2}, train={"steps": 30, "checkpoint_every": 5})))
    root = tmp_path / "nodes"
    driver = subprocess.Popen([sys.executable, "-m", "study.cli", "study", "run", str(spec_path),
                               "--address", address, "--verbose", "0"], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        # both trials running (one per node), each past its first checkpoint
        deadline = time.monotonic() + 150
        while not (len(list(root.glob("runs/*/checkpoints/ckpt-*.pt"))) >= 2
                   and len({p.parent.parent for p in root.glob("runs/*/checkpoints/ckpt-*.pt")}) == 2):
            assert driver.poll() is None, driver.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "the trials did not reach a checkpoint in time"
            time.sleep(0.2)
        raylet = raylet_of(procs["b"])
        assert raylet is not None, "no raylet under node b's `ray start`"
        killed_at = time.time()
        raylet.send_signal(signal.SIGKILL)
        output = driver.communicate(timeout=240)[0]
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait(30)
    assert driver.returncode == 0, output[-4000:]

    trials = pd.read_parquet(root / "trials.parquet").set_index("trial_id")
    assert len(trials) == 2 and (trials["status"] == "completed").all(), trials[["status", "reason"]]
    steps = pd.read_parquet(root / "steps")
    for trial in trials.index:
        got = sorted(steps.loc[steps["trial"] == trial, "step"].tolist())
        assert got == list(range(30)), f"{trial}: steps {got}"
    # the trial on node b died with it and was retried (on node a: the only one left) ...
    failed = [p for p in (root / "tune").glob("*/error.txt")]
    assert len(failed) == 1, [p.read_text()[-500:] for p in failed]
    victim = failed[0].parent.name.split("-")[0]
    # ... resuming from its checkpoint: the chunk of its first steps was written before the kill, never again
    chunks = sorted((root / f"steps/variant=base/trial={victim}").glob("part-*.parquet"))
    assert chunks[0].name == "part-000000000-000000004.parquet" and chunks[0].stat().st_mtime < killed_at
    assert alive_nodes(address, env) == 2
