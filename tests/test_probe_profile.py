"""bench/probe_profile.py runs end to end on the CPU and its parts add up."""
import re

import torch


def test_probe_profile_parts_add_up(capsys):
    from bench import probe_profile

    profile = probe_profile.main(["--preset", "tiny", "--batch", "4", "--image-size", "8", "--device", "cpu",
                                  "--steps", "3", "--skip", "1", "--rows", "0"])
    out = capsys.readouterr().out
    parts = {m.group(1): float(m.group(2)) for m in re.finditer(r"^\| \*{0,2}([a-z][^|*]*?)\*{0,2} \| \*{0,2}([0-9.]+)",
                                                                  out, flags=re.M)}
    total = parts["probe total"]
    assert total > 0
    assert abs(parts["products"] + parts["gradient graph builds"] + parts["rest (solver, syncs, copies)"] - total) \
        < 2e-3 + 1e-6 * total
    assert parts["products"] > 0
    assert "one product alone (float32, gradient graph reused, CUDA graphs off)" in out
    # per step: the timed parts lie inside the probe's wall time; products were counted
    assert len(profile.steps) == 3
    for s in profile.steps:
        assert s.products > 0 and s.graph > 0 and s.products + s.graph <= s.probe
        assert s.columns >= s.eig_hvps > 0
    # the bench times through a probe subclass: the project's classes are left as they are
    from trainers.curvature.hessian import CurvatureOperator
    from trainers.curvature.probe import SharpnessProbe
    assert CurvatureOperator.__call__.__module__ == "trainers.curvature.hessian"
    assert SharpnessProbe.measure.__qualname__ == "SharpnessProbe.measure"
    assert SharpnessProbe.hessian.__qualname__ == "SharpnessProbe.hessian"
    assert torch.get_float32_matmul_precision() == "highest"
