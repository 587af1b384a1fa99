"""Checks of a run's inputs that need the machine: run before anything starts.

:func:`check_run_inputs` opens the data (an npz file's array header, an
image folder's file list; nothing is decoded but the headers), checks that
``data.subset`` and ``data.batch_size`` fit the number of images, that the
Inception weights are there when ``eval.every`` > 0, and that a CUDA device
asked for exists.  ``eos train`` runs it before any run folder is touched,
and a study spec (:func:`study.spec.check_data`) before launch, so
``eos study run --dry-run`` catches the same errors.  Each error is one
:class:`~trainers.config.ConfigError` line naming the field.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from trainers.config import ConfigError, DataConfig, RunConfig

#: CIFAR-10's training split
CIFAR10_TRAIN_IMAGES = 50_000


def npz_array_info(path: str, keys: tuple[str, ...] = ("x_train", "images", "x")) -> tuple[str, np.dtype, tuple]:
    """(key, dtype, shape) of the image array of an npz file, read from the
    array's header only.  ConfigError when the file is not an npz (zip)
    archive, has none of ``keys``, or its array is not uint8 images."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"data.path: no such file {path!r}")
    try:
        with zipfile.ZipFile(p) as z:
            names = [n[:-4] if n.endswith(".npy") else n for n in z.namelist()]
            key = next((k for k in keys if k in names), None)
            if key is None:
                raise ConfigError(f"data.path: {path!r} has no array named {' or '.join(map(repr, keys))} "
                                  f"(its arrays: {', '.join(names) or 'none'})")
            with z.open(f"{key}.npy") as f:
                version = np.lib.format.read_magic(f)
                shape, _, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0(f))
    except ConfigError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, KeyError) as err:
        raise ConfigError(f"data.path: {path!r} is not a readable .npz archive ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else 'damaged'})") from None
    if dtype != np.uint8:
        raise ConfigError(f"data.path: {path}:{key} must hold uint8 images; got dtype {dtype}")
    if len(shape) not in (3, 4):
        raise ConfigError(f"data.path: {path}:{key} must be a 3-D or 4-D image array (N, H, W[, C]); got shape {shape}")
    return key, dtype, tuple(shape)


def count_images(cfg: DataConfig) -> int:
    """How many images ``cfg``'s source holds, before ``subset``."""
    if cfg.name == "synthetic":
        return cfg.synthetic_size
    if cfg.name == "npz":
        return npz_array_info(cfg.path)[2][0]
    if cfg.name == "cifar10":
        return CIFAR10_TRAIN_IMAGES
    from trainers.run.data import IMAGE_SUFFIXES

    root = Path(cfg.path)
    if not root.is_dir():
        raise ConfigError(f"data.path: no such folder {cfg.path!r}")
    files = [p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise ConfigError(f"data.path: no image files under {cfg.path!r}")
    from PIL import Image

    for f in files:   # the header of each: a file that is no image fails here, not in the trial
        try:
            with Image.open(f):
                pass
        except (OSError, ValueError) as err:
            raise ConfigError(f"data.path: cannot read image {str(f)!r} ({type(err).__name__})") from None
    return len(files)


def check_data_fits(cfg: DataConfig) -> int:
    """The number of training images (after ``subset``); ConfigError when the
    subset or a batch is larger than the data set."""
    n = count_images(cfg)
    if cfg.subset is not None:
        if cfg.subset > n:
            raise ConfigError(f"data.subset: {cfg.subset} is larger than the data set ({n} images)")
        n = cfg.subset
    if cfg.batching != "full" and cfg.batch_size > n:
        raise ConfigError(f"data.batch_size: {cfg.batch_size} is larger than the data set ({n} images)")
    return n


def check_inception_weights(cfg: RunConfig) -> None:
    """With ``eval.every`` > 0 the Inception weights must be on this machine."""
    if not cfg.eval.every:
        return
    from trainers.run.fid import InceptionWeightsMissing, find_inception_weights

    try:
        find_inception_weights(cfg.eval.inception_weights)
    except InceptionWeightsMissing as err:
        looked = ", ".join(str(p) for p in err.looked_for)
        raise ConfigError(f"eval.every: {cfg.eval.every} needs the Inception-v3 weights for FID/IS/KID, not "
                          f"found (looked for {looked}); set eval.inception_weights, or eval.every: 0 "
                          "(python -m trainers.run.fid fetch downloads them)") from None


def check_device(cfg: RunConfig) -> None:
    """A CUDA device asked for by ``train.device`` must exist."""
    device = cfg.train.device
    if not device.startswith("cuda"):
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    suffix = device.split(":", 1)[1] if ":" in device else "0"
    if not suffix.isdigit():
        raise ConfigError(f"train.device: must be auto, cpu, cuda or cuda:N; got {device!r}")
    index = int(suffix)
    if count == 0:
        raise ConfigError(f"train.device: {device!r} requested but this machine has no CUDA GPU "
                          "(use train.device=cpu or auto)")
    if index >= count:
        raise ConfigError(f"train.device: {device!r} requested but this machine has {count} CUDA GPU(s)")


def check_run_inputs(cfg: RunConfig, *, device: bool = True) -> None:
    """Every check above (``device``: also :func:`check_device`)."""
    check_data_fits(cfg.data)
    check_inception_weights(cfg)
    if device:
        check_device(cfg)
