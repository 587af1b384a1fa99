"""The local Ray instance of `eos study run`/`resume` (study.runner.connect):
token authentication set explicitly (a fresh token, no token file), every
port it opens on the loopback address, no dashboard."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import json, os, time
import psutil, ray
from study.runner import connect
assert connect(num_cpus=1)
@ray.remote
def f():
    return os.environ.get("RAY_AUTH_MODE")
worker_mode = ray.get(f.remote())
from ray._raylet import get_authentication_mode, AuthenticationMode
tree = {p.pid: p.name() for p in [psutil.Process()] + psutil.Process().children(recursive=True)}
listening = [(c.laddr.ip, c.laddr.port, tree[c.pid]) for c in psutil.net_connections(kind="inet")
             if c.status == psutil.CONN_LISTEN and c.pid in tree]
print(json.dumps({"token": get_authentication_mode() == AuthenticationMode.TOKEN, "worker_mode": worker_mode,
                  "gcs": ray.get_runtime_context().gcs_address, "listening": listening,
                  "names": sorted(set(tree.values()))}))
ray.shutdown()
"""


def test_a_local_instance_uses_a_token_and_listens_on_loopback_only(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(PYTHONPATH=str(REPO), HOME=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert probe["token"] and probe["worker_mode"] == "token"
    assert not (tmp_path / ".ray" / "auth_token").exists()      # the token lived in the environment only
    assert probe["gcs"].startswith("127.0.0.1:")
    assert probe["listening"], "found no listening socket of the Ray processes"
    exposed = [l for l in probe["listening"] if l[0] not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    assert not exposed, f"listening beyond loopback: {exposed}"
    assert not any("dashboard" in name for name in probe["names"])
