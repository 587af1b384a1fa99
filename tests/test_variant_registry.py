"""An eighth variant is one new module and one registry line: a toy variant,
written to a temporary module and registered, trains through ``eos train``
with λ₁ measured, and the suite's per-variant lists pick it up."""
from __future__ import annotations

import textwrap

import torch

from trainers.diffusion.variants import VARIANTS, variant_class
from trainers.run.steplog import read_steps

TOY = '''
    import torch

    from trainers.diffusion.variants.base import Base


    class Toy(Base):
        """ε-prediction with t uniform on the upper half of the schedule, weighted by 1/2."""

        name = "toy"

        def sample_t(self, batch, generator, step, device):
            half = self.schedule.timesteps // 2
            return torch.randint(half, self.schedule.timesteps, (batch,), generator=generator, device=device)

        def loss_weight(self, d):
            return torch.full((len(d),), 0.5, device=d.x0.device)
'''


def register_toy(tmp_path, monkeypatch) -> None:
    (tmp_path / "toy_variant_module.py").write_text(textwrap.dedent(TOY))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(VARIANTS, "toy", "toy_variant_module:Toy")


def test_a_registered_toy_variant_trains_through_the_cli(tmp_path, monkeypatch, capsys):
    from study.cli import main

    register_toy(tmp_path, monkeypatch)
    out = tmp_path / "runs"
    args = ["train", "--toy", "--lr", "1e-3", "--steps", "2", "--out", str(out),
            "--set", "data.image_size=16", "--set", "data.synthetic_size=32", "--set", "data.batch_size=8",
            "--set", "sharpness.hessian_batch=4", "--set", "train.print_every=0", "--set", "train.device=cpu"]
    assert main(args) == 0
    (run,) = list(out.iterdir())
    steps = read_steps(run / "steps")
    assert list(steps["step"]) == [0, 1]
    assert steps["loss"].notna().all() and (steps["loss"] > 0).all()
    assert torch.isfinite(torch.tensor(steps["lambda_max"].to_numpy())).all()
    # Adam has a preconditioner from its first step on: λ₁(P⁻¹H) at step 1
    assert steps["lambda_precond"].iloc[1] > 0


def test_the_toy_variant_is_seen_wherever_variants_are_listed(tmp_path, monkeypatch):
    from trainers.config import ConfigError, VariantConfig

    register_toy(tmp_path, monkeypatch)
    assert variant_class("toy").name == "toy"
    VariantConfig(name="toy")   # validation reads the registry
    try:
        VariantConfig(name="not-registered")
    except ConfigError as e:
        assert "toy" in str(e)
    else:
        raise AssertionError("an unknown variant must be rejected")
