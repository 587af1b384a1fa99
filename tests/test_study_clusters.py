"""The cluster recipes in clusters/: valid for their tools, token
authentication on, and nothing bound to a public address."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

CLUSTERS = Path(__file__).resolve().parents[1] / "clusters"
LAUNCHERS = ["aws.yaml", "gcp.yaml"]


def test_no_recipe_binds_to_all_interfaces():
    for path in CLUSTERS.iterdir():
        text = path.read_text()
        assert "0.0.0.0" not in text, f"{path.name} mentions 0.0.0.0"
        assert not re.search(r"type:\s*(LoadBalancer|NodePort)", text), path.name
        assert "kind: Ingress" not in text, path.name


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_configs_pass_rays_schema_and_keep_auth_on(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTERS / name).read_text())
    validate_config(prepare_config(config))
    head = " ".join(config["head_start_ray_commands"])
    worker = " ".join(config["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_MODE=token" in worker
    assert "~/.ray/auth_token" in config["file_mounts"]
    assert any("RAY_AUTH_MODE=token" in c for c in config["setup_commands"])  # for `ray exec` drivers
    head_type = config["available_node_types"][config["head_node_type"]]
    assert head_type["resources"] == {"CPU": 0}  # trials go to the GPU workers


def test_kuberay_rayjob_has_token_auth_and_runs_the_study():
    docs = [d for d in yaml.safe_load_all((CLUSTERS / "kuberay-rayjob.yaml").read_text()) if d]
    job = next(d for d in docs if d["kind"] == "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token"}
    assert cluster["rayVersion"] == "2.60.0"
    entry = job["spec"]["entrypoint"]
    assert entry.startswith("eos study run ") and "--address auto" in entry and "--resume" in entry
    claim = next(d for d in docs if d["kind"] == "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:  # the shared study folder is mounted everywhere
        mounts = [m["mountPath"] for c in pod["spec"]["containers"] for m in c.get("volumeMounts", [])]
        assert "/mnt/eos" in mounts


def test_slurm_script_is_valid_bash_with_auth_and_a_loopback_dashboard():
    text = (CLUSTERS / "slurm.sbatch").read_text()
    if shutil.which("bash"):
        subprocess.run(["bash", "-n", str(CLUSTERS / "slurm.sbatch")], check=True)
    assert "export RAY_AUTH_MODE=token" in text and "RAY_AUTH_TOKEN_PATH" in text
    assert "--dashboard-host=127.0.0.1" in text
    assert re.search(r"eos study run .*--address .*--resume", text)
    # the token file: ignored by git, removed on any exit; the waits for Ray give up after a while
    assert "trap 'rm -f \"$RAY_AUTH_TOKEN_PATH\"' EXIT" in text
    gitignore = (CLUSTERS.parent / ".gitignore").read_text().splitlines()
    assert "/.ray-auth-token-*" in gitignore
    assert "until ray status" not in text and re.search(r'wait_for "the Ray head at \$address" ray status', text)
    assert re.search(r"RAY_WAIT_S=\$\{RAY_WAIT_S:-\d+\}", text)


def test_slurm_waits_for_ray_give_up_at_the_deadline(tmp_path):
    """The script's wait_for, run with a command that never succeeds: it gives up after RAY_WAIT_S."""
    if not shutil.which("bash"):
        pytest.skip("no bash")
    text = (CLUSTERS / "slurm.sbatch").read_text()
    body = text[text.index("wait_for() {"):]
    body = body[:body.index("\n}\n") + 3]
    script = f"RAY_WAIT_S=1\nray() {{ :; }}\n{body}\nwait_for 'the Ray head' false\necho unreachable\n"
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "unreachable" not in out.stdout
    assert "[eos] the Ray head: not ready after 1s; giving up" in out.stderr


def test_readme_has_a_section_per_recipe():
    text = (CLUSTERS / "README.md").read_text()
    for heading in ("## AWS", "## Google Cloud", "## SLURM", "## Kubernetes"):
        assert heading in text
