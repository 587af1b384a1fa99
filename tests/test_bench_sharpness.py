"""bench/sharpness_bench.py runs end to end on the CPU at a tiny size: every
part reports named results, the product methods agree, and the reference
packages are measured or, when not installed, clearly skipped."""
import math

import torch

from bench import reference_solvers, sharpness_bench

REF_TOL = 1e-3
ARGS = ["--preset", "tiny", "--image-size", "8", "--batch", "2", "--device", "cpu", "--pretrain", "1",
        "--steps", "1", "--reps", "1", "--tol", "0.05", "--accuracy", "0", "--ref-tol", str(REF_TOL),
        "--ref-block", "3", "--ref-iters", "40", "--max-iters", "20", "--power-iters", "4", "--lanczos-iters", "3",
        "--warm-power-iters", "3", "--warm-tols", "0.05", "--no-warm-variants"]


def test_sharpness_bench_smoke(capsys):
    flags = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    report = sharpness_bench.main(ARGS)
    out = capsys.readouterr().out
    for heading in ("### Cost of one Hessian-vector product", "### Cold start", "### Warm start", "### Goals"):
        assert heading in out and heading in report.text

    # costs: the unit, the probe's product, every method of the registry
    rows = {r.implementation: r for r in report.costs.rows}
    default = next(r for r in report.costs.rows if r.probe_default)
    assert default.per_gradient > 0 and default.status == "ok"
    assert report.costs.gradient_s > 0 and report.timing.product_s == default.ms_per_vector / 1e3
    for r in report.costs.rows:
        if r.product and r.status == "ok" and r.rel_diff is not None:
            assert r.rel_diff < 1e-4, r      # float32 products of one Hessian by different methods agree
    assert any(name.startswith("HVP forward_over_reverse_vmap") for name in rows)
    installed = {pkg: reference_solvers.missing(pkg) is None for pkg in ("pyhessian", "hessian_eigenthings")}
    for prefix, pkg in (("PyHessian HVP", "pyhessian"), ("hessian-eigenthings HVP", "hessian_eigenthings")):
        row = next(r for r in report.costs.rows if r.implementation.startswith(prefix))
        assert row.status == "ok" if installed[pkg] else row.status.startswith(f"skipped: {pkg} not installed")

    # cold: tight references, our solves on both operators, the references skipped or run
    cold = report.cold
    assert set(cold.references) == {"H", "P⁻¹H"}
    for ref in cold.references.values():
        assert ref.residual <= REF_TOL and ref.value >= ref.second
    ours = [c for c in cold.solves if c.kind == "lobpcg"]
    assert {c.operator for c in ours} == {"H", "P⁻¹H"}
    for c in ours:
        # a residual certificate: some eigenvalue lies within residual·|θ| of θ,
        # and the top one is at least θ (Rayleigh quotients stay below λ₁)
        assert c.value <= cold.references[c.operator].value * (1 + REF_TOL)
        assert math.isfinite(c.rel_error) and c.at_stop >= 2
    others = [c for c in cold.solves if c.kind != "lobpcg"]
    assert {c.kind for c in others} == {"power", "lanczos", "pyhessian"}
    for c in others:
        pkg = "pyhessian" if c.kind == "pyhessian" else "hessian_eigenthings"
        assert (c.status == "ok") == installed[pkg], c

    # warm: one solve per step and policy (the default on both operators), the probe timed
    summary = report.warm.summary(report.timing)
    lobpcg = [w for w in summary if w.solver.startswith("LOBPCG")]
    assert {w.operator for w in lobpcg} == {"H", "P⁻¹H"} and all(w.probe_default for w in lobpcg)
    assert all(w.steps == 1 and w.mean_products >= 1 for w in lobpcg)
    assert any(w.solver == sharpness_bench.WARM_POWER for w in summary) == installed["hessian_eigenthings"]
    assert len(report.warm.probe_seconds) == 1 and report.warm.probe_seconds[0] > 0

    # goals are graded from the named results
    texts = [g.text for g in report.goals]
    assert any(t.startswith("warm-started λ₁(P⁻¹H)") for t in texts)
    assert any(t.startswith("HVP ≤ 2.5× a gradient") for t in texts)
    assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == flags
