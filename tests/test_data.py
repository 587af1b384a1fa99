from pathlib import Path

import numpy as np
import pytest
import torch

from trainers.config import ConfigError, DataConfig
from trainers.run.data import Batches, load_images, synthetic_images

SHARED_NPZ = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-6k.npz"


def test_synthetic_is_deterministic_uint8_and_varied():
    a, b = synthetic_images(8, 16), synthetic_images(8, 16)
    assert a.dtype == torch.uint8 and a.shape == (8, 3, 16, 16)
    assert torch.equal(a, b)
    assert a.float().std() > 20  # not a constant image


def test_npz_nhwc_is_loaded_as_nchw(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, size=(10, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x_train=x)
    imgs = load_images(DataConfig(name="npz", path=str(tmp_path / "d.npz"), image_size=8, flip=False))
    assert imgs.shape == (10, 3, 8, 8)
    assert torch.equal(imgs[3], torch.from_numpy(x[3]).permute(2, 0, 1))


def test_missing_npz_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match="data.path"):
        load_images(DataConfig(name="npz", path=str(tmp_path / "none.npz")))


def test_subset_is_fixed_size_and_reproducible():
    cfg = DataConfig(name="synthetic", synthetic_size=50, subset=20, image_size=8)
    a, b = load_images(cfg), load_images(cfg)
    assert len(a) == 20 and torch.equal(a, b)
    with pytest.raises(ConfigError, match="data.subset"):
        load_images(DataConfig(name="synthetic", synthetic_size=5, subset=20, image_size=8))


def test_imagefolder(tmp_path):
    from PIL import Image
    for i in range(3):
        Image.fromarray(np.full((20, 30, 3), 40 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
    imgs = load_images(DataConfig(name="imagefolder", path=str(tmp_path), image_size=8))
    assert imgs.shape == (3, 3, 8, 8) and int(imgs[2].float().mean()) == 80


@pytest.mark.skipif(not SHARED_NPZ.exists(), reason="shared CIFAR-10 subset not present")
def test_shared_cifar10_subset():
    imgs = load_images(DataConfig(name="npz", path=str(SHARED_NPZ), subset=5000, image_size=32))
    assert imgs.shape == (5000, 3, 32, 32)
    # the tiny default resizes to its image size
    small = load_images(DataConfig(name="npz", path=str(SHARED_NPZ), subset=5000))
    assert small.shape == (5000, 3, DataConfig().image_size, DataConfig().image_size)


def test_batches_are_a_function_of_seed_and_step_and_in_range():
    imgs = synthetic_images(40, 8)
    cfg = DataConfig(image_size=8, batch_size=8)
    a, b = Batches(imgs, cfg, 0, "cpu"), Batches(imgs, cfg, 0, "cpu")
    assert torch.equal(a.batch(7), b.batch(7))
    assert not torch.equal(a.batch(7), a.batch(8))
    x = a.batch(3)
    assert x.min() >= -1 and x.max() <= 1
    # one epoch (5 steps of 8) visits every image exactly once
    seen = torch.cat([a.indices(s) for s in range(5)])
    assert sorted(seen.tolist()) == list(range(40))


def test_fixed_and_full_batching():
    imgs = synthetic_images(20, 8)
    fixed = Batches(imgs, DataConfig(image_size=8, batch_size=4, batching="fixed"), 0, "cpu")
    assert torch.equal(fixed.batch(0), fixed.batch(99))
    full = Batches(imgs, DataConfig(image_size=8, batch_size=4, batching="full"), 0, "cpu")
    assert full.batch(5).shape[0] == 20


def test_cifar10_without_download_names_the_path(tmp_path):
    with pytest.raises(ConfigError, match="data.path"):
        load_images(DataConfig(name="cifar10", path=str(tmp_path), download=False))
