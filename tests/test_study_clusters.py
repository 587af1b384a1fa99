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


def test_readme_has_a_section_per_recipe():
    text = (CLUSTERS / "README.md").read_text()
    for heading in ("## AWS", "## Google Cloud", "## SLURM", "## Kubernetes"):
        assert heading in text
