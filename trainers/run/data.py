"""Image data sets, held in memory as uint8 NCHW tensors.

EoS studies train on small fixed subsets (5k images), so every source is read
once into a single uint8 tensor; batches are gathered by index, scaled to
[-1, 1] and randomly flipped on the training device.  Which indices a step
uses, and which of them are flipped, is a pure function of (seed, step)
(:mod:`trainers.run.rng`), so a resumed run sees exactly the batches an
uninterrupted one would.

Sources:
* ``synthetic`` (built-in default, no files): smooth random colour fields with
  a few shapes, generated from a fixed seed;
* ``cifar10``: torchvision's CIFAR-10 training split, downloaded into
  ``data.path`` (default ``./data``) when missing;
* ``npz``: uint8 arrays, NHWC or NCHW, key ``x_train`` (or ``images``), e.g.
  ``../shared/data/cifar10-6k.npz``;
* ``imagefolder``: every image file under a folder (recursively).
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from trainers.config import ConfigError, DataConfig
from trainers.run.rng import epoch_order, flip_generator, subset_order

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def synthetic_images(n: int, size: int = 32, channels: int = 3, seed: int = 1234) -> torch.Tensor:
    """``n`` deterministic uint8 images: a smooth low-frequency colour field
    plus one bright disc or square per image (structure a U-Net can learn)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, channels, 4, 4, generator=g)
    field = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False) * 0.5
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    centre = torch.rand(n, 2, generator=g) * 1.2 - 0.6
    radius = torch.rand(n, generator=g) * 0.3 + 0.15
    square = torch.rand(n, generator=g) < 0.5
    dx = xx[None] - centre[:, 0, None, None]
    dy = yy[None] - centre[:, 1, None, None]
    disc = (dx ** 2 + dy ** 2).sqrt() < radius[:, None, None]
    box = torch.maximum(dx.abs(), dy.abs()) < radius[:, None, None]
    mask = torch.where(square[:, None, None], box, disc)[:, None].float()
    colour = torch.rand(n, channels, 1, 1, generator=g) * 2 - 1
    img = (field * (1 - mask) + colour * mask).clamp(-1, 1)
    return ((img + 1) * 127.5).round().to(torch.uint8)


def _to_nchw(arr: np.ndarray, where: str) -> torch.Tensor:
    if arr.dtype != np.uint8:
        raise ConfigError(f"{where}: expected uint8 images, got dtype {arr.dtype}")
    if arr.ndim == 3:  # N H W (grey)
        arr = arr[:, None]
    if arr.ndim != 4:
        raise ConfigError(f"{where}: expected a 4-D image array, got shape {arr.shape}")
    if arr.shape[-1] in (1, 3) and arr.shape[1] not in (1, 3):
        arr = arr.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(arr))


def load_npz(path: str, key: str = "x_train") -> torch.Tensor:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"data.path: no such file {path!r}")
    try:
        with np.load(p) as z:
            for k in (key, "images", "x"):
                if k in z:
                    return _to_nchw(z[k], f"data.path ({path}:{k})")
            raise ConfigError(f"data.path: {path!r} has no array {key!r} (keys: {', '.join(z.files)})")
    except ConfigError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        raise ConfigError(f"data.path: {path!r} is not a readable .npz archive ({type(err).__name__})") from None


def load_cifar10(root: str, download: bool) -> torch.Tensor:
    from torchvision.datasets import CIFAR10

    try:
        ds = CIFAR10(root=root, train=True, download=download)
    except RuntimeError as e:
        raise ConfigError(f"data.path: CIFAR-10 not found under {root!r} and download={download} ({e})") from None
    return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()


def load_imagefolder(root: str, size: int, channels: int, limit: int | None) -> torch.Tensor:
    from PIL import Image

    rootp = Path(root)
    if not rootp.is_dir():
        raise ConfigError(f"data.path: no such folder {root!r}")
    files = sorted(p for p in rootp.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError(f"data.path: no image files under {root!r}")
    if limit is not None:
        files = files[:limit]
    mode = "RGB" if channels == 3 else "L"
    out = []
    for f in files:
        try:
            img = Image.open(f).convert(mode)
        except (OSError, ValueError) as err:   # PIL.UnidentifiedImageError is an OSError
            raise ConfigError(f"data.path: cannot read image {str(f)!r} ({type(err).__name__})") from None
        w, h = img.size  # centre crop to a square, then resize
        s = min(w, h)
        img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((size, size), Image.BICUBIC)
        out.append(np.asarray(img, dtype=np.uint8).reshape(size, size, channels))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def _fit(images: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """Match the configured channel count and resolution."""
    if images.shape[1] != cfg.channels:
        if images.shape[1] == 3 and cfg.channels == 1:
            images = images.float().mean(1, keepdim=True).round().to(torch.uint8)
        elif images.shape[1] == 1 and cfg.channels == 3:
            images = images.expand(-1, 3, -1, -1).contiguous()
    if images.shape[-1] != cfg.image_size or images.shape[-2] != cfg.image_size:
        x = F.interpolate(images.float(), size=(cfg.image_size, cfg.image_size), mode="area" if images.shape[-1] > cfg.image_size else "bilinear")
        images = x.round().clamp(0, 255).to(torch.uint8)
    return images


def load_images(cfg: DataConfig) -> torch.Tensor:
    """The training images of ``cfg`` as a uint8 (N, C, H, W) tensor, cut to
    ``cfg.subset`` (the first N after a fixed shuffle, so subsets are
    class-balanced in expectation and identical across runs)."""
    if cfg.name == "synthetic":
        images = synthetic_images(cfg.synthetic_size, cfg.image_size, cfg.channels)
    elif cfg.name == "npz":
        images = load_npz(cfg.path)
    elif cfg.name == "cifar10":
        images = load_cifar10(cfg.path or "data", cfg.download)
    else:
        images = load_imagefolder(cfg.path, cfg.image_size, cfg.channels, None)
    images = _fit(images, cfg)
    if cfg.subset is not None:
        if cfg.subset > len(images):
            raise ConfigError(f"data.subset: {cfg.subset} is larger than the data set ({len(images)} images)")
        images = images[subset_order(len(images))[: cfg.subset]].contiguous()
    return images


def micro_batch_size(cfg: DataConfig, accumulate: int) -> int:
    """Examples per micro-batch of a step: ``data.batch_size`` in ``full``
    batching (the whole data set in chunks of that size), else
    ``batch_size // optim.accumulate``."""
    return cfg.batch_size if cfg.batching == "full" else cfg.batch_size // accumulate


def to_model_range(images_uint8: torch.Tensor) -> torch.Tensor:
    return images_uint8.float() / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class Batches:
    """Deterministic batches of a uint8 image tensor kept on ``device``.

    ``batch(step)`` returns the float [-1, 1] images for that step: a slice
    of a per-epoch permutation (``random``), the same first ``batch_size``
    images (``fixed``) or all images (``full``).  Flips are drawn from a
    generator seeded by (seed, step) (:mod:`trainers.run.rng`) — except in
    ``fixed``/``full`` mode, where the batch never changes (the objective is
    deterministic).
    """

    def __init__(self, images: torch.Tensor, cfg: DataConfig, seed: int, device):
        if len(images) < (1 if cfg.batching == "full" else cfg.batch_size):
            raise ConfigError(f"data.batch_size: {cfg.batch_size} is larger than the data set ({len(images)} images)")
        self.images = images.to(device)
        self.cfg = cfg
        self.seed = seed
        self.device = device
        self.per_epoch = max(1, len(images) // cfg.batch_size)

    def __len__(self) -> int:
        return len(self.images)

    def indices(self, step: int) -> torch.Tensor:
        n, b = len(self.images), self.cfg.batch_size
        if self.cfg.batching == "full":
            return torch.arange(n)
        if self.cfg.batching == "fixed":
            return torch.arange(b)
        epoch, pos = divmod(step, self.per_epoch)
        return epoch_order(self.seed, epoch, n)[pos * b:(pos + 1) * b]

    def batch(self, step: int) -> torch.Tensor:
        x = to_model_range(self.images[self.indices(step).to(self.images.device)])
        if self.cfg.flip and self.cfg.batching == "random":
            flip = (torch.rand(len(x), generator=flip_generator(self.seed, step)) < 0.5).to(x.device)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x

    def sample(self, generator: torch.Generator) -> torch.Tensor:
        """A fresh training mini-batch from the CPU ``generator`` (batch
        sharpness): ``random``: ``batch_size`` distinct images drawn
        uniformly, flipped like training batches (``data.flip``); ``fixed``/
        ``full``: the training batch, which never changes."""
        if self.cfg.batching != "random":
            return self.batch(0)
        idx = torch.randperm(len(self.images), generator=generator)[:self.cfg.batch_size]
        x = to_model_range(self.images[idx.to(self.images.device)])
        if self.cfg.flip:
            flip = (torch.rand(len(x), generator=generator) < 0.5).to(x.device)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x

    def hessian_batch(self, size: int) -> torch.Tensor:
        """A fixed batch for the frozen Hessian: the first ``size`` images
        (the training batch itself in ``fixed`` mode), unflipped."""
        size = min(size, len(self.images))
        return to_model_range(self.images[:size])
