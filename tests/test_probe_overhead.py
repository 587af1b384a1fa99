"""bench/probe_overhead.py runs end to end on the CPU: segments timed, products counted, a reference checked."""


def test_probe_overhead_bench_runs_and_checks_against_arpack(capsys):
    from bench import probe_overhead

    summary = probe_overhead.main(["--preset", "tiny", "--batch", "4", "--image-size", "8", "--device", "cpu",
                                   "--steps", "3", "--skip", "1", "--checks", "1", "--settings", "both,lobpcg",
                                   "--check-settings", "both"])
    out = capsys.readouterr().out
    assert "| plain step |" in out and "| both |" in out and "| lobpcg |" in out
    both = summary["settings"]["both"]
    assert both["products"] >= 3   # the track solver: two warm vectors and the exploration column per operator
    # the probe's λ agrees with the independent ARPACK reference (float32 products on the CPU)
    for key in ("lambda_precond", "lambda_max"):
        assert len(both["errors"][key]) == 1 and both["errors"][key][0] < 1e-3
    assert summary["settings"]["lobpcg"]["errors"]["lambda_max"] == []
