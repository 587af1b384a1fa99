"""The analysis notebook runs top to bottom on a fixture study (nbclient)."""
import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from analysis_fixtures import build_fixture_study  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "analysis" / "notebooks" / "eos_curves.ipynb"
KERNEL = "eos-analysis-test"


def _kernel_for_this_interpreter(tmp_path, monkeypatch) -> str:
    """A kernelspec that starts ipykernel with the interpreter running the
    tests (whatever kernels are installed, or not, on the machine)."""
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "eos test kernel", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return KERNEL


def test_notebook_executes_on_fixture(tmp_path, monkeypatch):
    study_dir, _ = build_fixture_study(tmp_path)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, "the notebook has one cell tagged 'parameters'"
    # like papermill: a cell after the parameters cell overrides them
    nb.cells.insert(params[0] + 1, nbformat.v4.new_code_cell(f"STUDY_DIR = {str(study_dir)!r}"))
    kernel = _kernel_for_this_interpreter(tmp_path, monkeypatch)
    client = nbclient.NotebookClient(nb, kernel_name=kernel, timeout=300,
                                     resources={"metadata": {"path": str(ROOT / "analysis" / "notebooks")}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 6          # λ, ratio, loss, heatmaps, FID, one trial
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "fixture: 13 trials" in text
    tables = [o for o in outputs if "text/html" in o.get("data", {})]
    assert any("44 [34, 54]" in o["data"]["text/html"] for o in tables)
