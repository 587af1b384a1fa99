"""The default single trial and its progress output (issue 18.3), through the CLI."""
import io

from trainers.config import run_config
from trainers.run.loop import Progress
from trainers.run.steplog import read_steps


def test_eos_train_help_states_the_defaults_and_their_cost(capsys):
    import pytest

    from study.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    cfg = run_config()
    assert (f"the {cfg.model.preset} U-Net, {cfg.data.name} {cfg.data.image_size} px images, "
            f"batch {cfg.data.batch_size}, {cfg.optim.name}, {cfg.train.steps} steps") in out
    assert f"on a frozen batch of {cfg.sharpness.hessian_batch} examples" in out
    assert "on a 2-core CPU: first step after ~8 s, done in about 1-1.5 min" in out


def test_the_built_in_default_is_cpu_sized():
    cfg = run_config()
    assert cfg.model.preset == "tiny" and cfg.data.image_size <= 16
    assert cfg.data.batch_size <= 16 and cfg.sharpness.hessian_batch <= 8 and cfg.train.steps <= 20


def test_default_trial_prints_every_slow_step_with_the_ratio(tmp_path, capsys, monkeypatch):
    from study.cli import main

    monkeypatch.setattr(Progress, "SLOW_STEP_S", 0.0)   # every step counts as slow
    out = tmp_path / "runs"
    assert main(["train", "--base", "--lr", "1e-3", "--steps", "3", "--set", "train.device=cpu",
                 "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    cfg = run_config()
    assert (f"[eos] base lr=0.001: 3 steps from step 0, tiny U-Net, synthetic {cfg.data.image_size} px, "
            f"batch {cfg.data.batch_size}, adam, λ₁ every step on {cfg.sharpness.hessian_batch} examples") in lines
    steps = [line for line in lines if line.startswith("[eos] base lr=0.001 step ")]
    assert [line.split(" | ")[0] for line in steps] == [f"[eos] base lr=0.001 step {i}/3" for i in (1, 2, 3)]
    assert "λ₁/threshold" in steps[1] and "λ₁/threshold" in steps[2]   # Adam's P exists from step 1 on
    assert len(read_steps(out / "base_lr0.001_s0" / "steps")) == 3


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_on_a_terminal_progress_is_a_bar_with_the_ratio_in_its_postfix():
    cfg = run_config({"train": {"steps": 2}})
    stream = _Terminal()
    progress = Progress(cfg, True, stream=stream)
    progress.start(0)
    for i in (1, 2):
        progress.after_step(i, {"loss": 0.5, "lambda_precond": 30.0, "ratio": 0.789})
    progress.finished(type("R", (), {"__str__": lambda self: "run"})(), "completed", 2, 0.5, None)
    text = stream.getvalue()
    assert "2/2" in text and "λ₁ 30 | λ₁/threshold 0.789" in text
    assert text.rstrip().endswith("[eos] completed: 2 steps, final loss 0.5 -> run")


def test_off_a_terminal_fast_steps_print_every_print_every():
    cfg = run_config({"train": {"steps": 4, "print_every": 2}})
    stream = io.StringIO()
    progress = Progress(cfg, True, stream=stream)
    progress.SLOW_STEP_S = 1e9
    progress.start(0)
    for i in range(1, 5):
        progress.after_step(i, {"loss": 0.5})
    steps = [line.split(" | ")[0] for line in stream.getvalue().splitlines() if " step " in line and ":" not in line.split(" | ")[0]]
    assert steps == ["[eos] base lr=0.0001 step 2/4", "[eos] base lr=0.0001 step 4/4"]
    assert "\x1b[" not in stream.getvalue() and "\r" not in stream.getvalue()
