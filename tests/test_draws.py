"""A variant's draw is a batch: it splits into micro-batches and concatenates
back with every per-example field (adap_s's bins and weights, STF's
reference indices, which stay valid against the draw's shared reference
pool).  Every variant trains with accumulation, full-batch GD and a fixed
batch larger than the Hessian batch, and the probe's λ₁ then matches a dense
``eigh`` of the Hessian of the same objective built without the split."""
import copy
import math

import pytest
import torch

from conftest import tiny_config
from curvature_fixtures import TinyDenoiser, TinyUNetLike, dense_hessian, randomize, top_eigenvalues
from trainers.config import ScheduleConfig, VariantConfig, run_config
from trainers.diffusion.schedules import NoiseSchedule
from trainers.diffusion.unet import probe_mode
from trainers.diffusion.variants import VARIANTS, build_variant
from trainers.diffusion.variants.base import Draw
from trainers.run.loop import Trainer, train_step
from trainers.run.optimizers import build_optimizer
from trainers.run.rng import Purpose, step_generator

ALL = list(VARIANTS)
# options that make the objective move within a few steps (pd: a new stage every step)
OPTIONS = {"pd": {"pacing": "fixed", "stage_steps": 1}, "stf": {"reference_size": 3}}


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.from_config(ScheduleConfig())


def _variant(name, schedule, **options):
    return build_variant(VariantConfig(name=name, options={**OPTIONS.get(name, {}), **options}), schedule)


@pytest.mark.parametrize("name", ALL)
def test_split_and_concatenate_keep_every_per_example_loss(schedule, name):
    v = _variant(name, schedule)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(10, 1, 8, 8, generator=g)
    d = v.draw(x0, g, step=3)
    model = randomize(TinyUNetLike(), std=0.3, seed=1).eval()
    whole = v.loss(model, d)
    parts = d.split(4)
    assert [len(p) for p in parts] == [4, 4, 2]
    # each micro-batch's per-example loss is the whole draw's (STF: references into the whole batch)
    torch.testing.assert_close(torch.cat([v.loss(model, p) for p in parts]), whole, rtol=1e-6, atol=1e-7)
    back = Draw.concatenate(parts)
    for field in Draw.PER_EXAMPLE:
        assert torch.equal(getattr(back, field), getattr(d, field)), field
    assert set(back.extra) == set(d.extra) and all(torch.equal(back.extra[k], d.extra[k]) for k in d.extra)
    sub = back.take(slice(0, 3))
    torch.testing.assert_close(v.loss(model, sub), whole[:3], rtol=1e-6, atol=1e-7)


def test_stf_micro_batches_keep_their_references(schedule):
    v = _variant("stf", schedule, reference_size=4)
    g = torch.Generator().manual_seed(0)
    d = v.draw(torch.randn(9, 1, 2, 2, generator=g), g)
    for i, part in enumerate(d.split(3)):
        assert torch.equal(part.extra["ref"], d.extra["ref"][3 * i:3 * i + 3])
        assert part.shared["pool"] is d.x0   # indices point into the whole batch, not the micro-batch
        # column 0 of each row is the example itself
        assert torch.equal(part.shared["pool"][part.extra["ref"][:, 0]], part.x0)


def test_a_per_example_field_of_the_wrong_size_is_refused(schedule):
    x = torch.zeros(4, 1, 2, 2)
    with pytest.raises(ValueError, match=r"Draw.extra_thing|Draw\.bin"):
        Draw(x, torch.zeros(4), x, x, extra={"bin": torch.zeros(5)})
    with pytest.raises(ValueError, match="shared"):
        Draw(x, torch.zeros(3), x, x)
    a = _variant("stf", schedule).draw(x, torch.Generator().manual_seed(0))
    b = _variant("stf", schedule).draw(x + 1, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="only slices of one draw"):
        Draw.concatenate([a, b])


# ---------------------------------------------------------------------------
# every variant through the training loop, λ₁ against a dense Hessian

SETTINGS = {
    # random batches of 8, two micro-batches of 4; Hessian batch: 4 images from the HESSIAN stream
    "accumulate2": dict(data={"batching": "random", "batch_size": 8}, optim={"accumulate": 2},
                        sharpness={"hessian_batch": 4}),
    # full-batch GD on 12 images in chunks of 4; the Hessian batch (6) crosses a chunk boundary
    "full": dict(data={"batching": "full", "batch_size": 4, "synthetic_size": 12}, train={"fixed_noise": True},
                 sharpness={"hessian_batch": 6}),
    # fixed batch of 8, Hessian batch its first 5 examples
    "fixed": dict(data={"batching": "fixed", "batch_size": 8}, train={"fixed_noise": True},
                  sharpness={"hessian_batch": 5}),
}


def _trainer(name, setting, device="cpu"):
    s = SETTINGS[setting]
    cfg = run_config(tiny_config(
        data={"image_size": 8, "channels": 1, "synthetic_size": 16, "flip": False, **s["data"]},
        optim={"name": "gd", "lr": 0.02, **s.get("optim", {})},
        train={"steps": 3, "device": device, **s.get("train", {})},
        variant={"name": name, "options": OPTIONS.get(name, {})},
        sharpness={"every": 1, "block_size": 3, "tol": 1e-6, "max_iters": 300, "search_precision": "float32",
                   **s["sharpness"]}))
    trainer = Trainer(cfg)
    # a net small enough for a dense Hessian
    trainer.model = randomize(TinyDenoiser(), std=0.5, seed=3).to(trainer.device)
    trainer.ema = copy.deepcopy(trainer.model).eval().requires_grad_(False)
    trainer.params = [p for p in trainer.model.parameters() if p.requires_grad]
    trainer.optimizer = build_optimizer(cfg.optim, trainer.params)
    return cfg, trainer


def _independent_objective(trainer, cfg, step):
    """The mean loss the Hessian batch stands for at ``step``, built here
    without splitting: the whole training draw's first ``hessian_batch``
    per-example losses (deterministic objective), or the uniform-t / variant
    draw of the first images from the HESSIAN stream; adap_s weighted by
    T·p(t) of its sampler, computed here from its logits."""
    v, k, seed = trainer.variant, cfg.sharpness.hessian_batch, cfg.train.seed
    model = trainer.model
    if v.name == "adap_s":
        x0 = trainer.batches.images[:k].float() / 127.5 - 1
        g = step_generator(seed, 0, Purpose.HESSIAN, trainer.device)
        t = torch.randint(0, v.schedule.timesteps, (k,), generator=g, device=trainer.device)
        noise, input_noise = v.sample_noise(x0, g)
        o = v.options
        q = (1 - o.uniform_mix) * torch.softmax(v.logits, 0) + o.uniform_mix / o.bins
        big_t = v.schedule.timesteps
        width = big_t / o.bins   # 1000 / 20 bins: 50 timesteps each
        weight = (big_t * q.to(t.device)[(t // width).long()] / width).float()
        plain = build_variant(VariantConfig(name="base"), v.schedule)
        d = Draw(x0, t, noise, input_noise)
        return lambda: (weight * plain.loss(model, d)).mean()
    if cfg.train.fixed_noise and cfg.data.batching != "random":
        x0 = trainer.batches.batch(step)
        d = v.draw(x0, step_generator(seed, 0, Purpose.DRAW, trainer.device), step)
        return lambda: v.loss(model, d)[:k].mean()
    x0 = trainer.batches.images[:k].float() / 127.5 - 1
    d = v.draw(x0, step_generator(seed, trainer.probing.hessian_batch_id, Purpose.HESSIAN, trainer.device), step)
    return lambda: v.loss(model, d).mean()


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("name", ALL)
def test_every_variant_trains_and_its_lambda_matches_a_dense_hessian(name, setting, device):
    cfg, trainer = _trainer(name, setting, device)
    rows = [train_step(trainer)[0] for _ in range(3)]
    for row in rows:
        assert math.isfinite(row["loss"]) and math.isfinite(row["lambda_max"]) and row["eig_converged"]
    step = trainer.step
    cols = trainer.probing.measure(trainer.model, trainer.optimizer, step, 0.02, trainer.draws(step)[0])
    with probe_mode(trainer.model):
        H = dense_hessian(trainer.model, _independent_objective(trainer, cfg, step))
    true = float(top_eigenvalues(H, 1)[0])
    assert true > 0 and abs(cols["lambda_max"] - true) <= 1e-4 * true, (cols["lambda_max"], true)
