"""bench/probe_profile.py runs end to end on the CPU and its parts add up."""
import importlib.util
import re
from pathlib import Path


def _load():
    path = Path(__file__).resolve().parents[1] / "bench" / "probe_profile.py"
    spec = importlib.util.spec_from_file_location("probe_profile", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_probe_profile_parts_add_up(capsys):
    mod = _load()
    mod.main(["--preset", "tiny", "--batch", "4", "--image-size", "8", "--device", "cpu", "--steps", "3",
              "--skip", "1", "--rows", "0"])
    out = capsys.readouterr().out
    parts = {m.group(1): float(m.group(2)) for m in re.finditer(r"^\| \*{0,2}([a-z][^|*]*?)\*{0,2} \| \*{0,2}([0-9.]+)",
                                                                  out, flags=re.M)}
    total = parts["probe total"]
    assert total > 0
    assert abs(parts["products"] + parts["gradient graph builds"] + parts["rest (solver, syncs, copies)"] - total) \
        < 2e-3 + 1e-6 * total
    assert parts["products"] > 0
    assert "one product alone (float32, gradient graph reused, CUDA graphs off)" in out
    # the timers it wraps around the probe are gone again
    from trainers.curvature.hessian import HessianOperator
    from trainers.run.loop import Trainer
    from trainers.curvature.probe import SharpnessProbe
    assert HessianOperator.__call__.__module__ == "trainers.curvature.hessian"
    assert SharpnessProbe.measure.__qualname__ == "SharpnessProbe.measure"
    assert Trainer.measure_sharpness.__qualname__ == "Trainer.measure_sharpness"
