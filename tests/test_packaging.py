"""The project's own files agree with each other: pins, README commands, CI."""
import re
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _reqs(lines):
    return sorted(l.strip() for l in lines if l.strip() and not l.strip().startswith(("#", "-")))


def test_environment_yml_pins_equal_requirements_txt():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert _reqs(pip) == _reqs((ROOT / "requirements.txt").read_text().splitlines())
    assert "torch==2.14.1" in pip and "ray[tune]==2.60.0" in pip and "optuna==5.0.0" in pip


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    out = subprocess.run(["awk", '/<!-- ci: test command -->/{getline; getline; print; exit}', "README.md"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    assert "pytest" in out and out in readme
    assert "test_command" in (ROOT / ".ci" / "run").read_text()


def test_readme_names_install_and_main_job_commands():
    readme = (ROOT / "README.md").read_text()
    assert "pip install -r requirements.txt -e ." in readme
    assert re.search(r"eos study run study/presets/smoke\.yaml", readme)
    assert (ROOT / "study" / "presets" / "smoke.yaml").exists()


def test_report_templates_ship_as_package_data():
    import fnmatch
    import tomllib

    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["analysis"]
    templates = sorted((ROOT / "analysis" / "templates").iterdir())
    assert templates
    for path in templates:
        rel = path.relative_to(ROOT / "analysis").as_posix()
        assert any(fnmatch.fnmatch(rel, g) for g in globs), f"{rel} is not package data"
