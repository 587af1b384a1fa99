"""Sample quality of generated images: FID, Inception score and KID.

The metrics are torch-fidelity's own formulas (``fid_statistics_to_metric``,
``isc_features_to_metric``, ``kid_features_to_metric``), applied to features
that this module extracts itself, so that

* the feature extractor is pluggable: the default is torch-fidelity's
  InceptionV3 port of the TensorFlow FID network (pool3 features for FID and
  KID, unbiased logits for IS); tests and experiments can pass any callable
  ``uint8 (N, 3, H, W) -> (features (N, D), logits (N, C))``;
* the real images' features are computed once and reused at every
  evaluation (:class:`SampleMetrics`);
* nothing is downloaded implicitly.  The Inception weights are looked up as
  files; when they are absent, :class:`InceptionWeightsMissing` says where
  they were looked for and how to provide them.  ``python -m trainers.run.fid
  fetch`` downloads them (with a timeout) on a machine with internet.

Images are uint8 in [0, 255] or floating point in [-1, 1] (the trainers'
convention), NCHW, with 1 or 3 channels.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_SHA256_PREFIX = "6726825d"
# torch-fidelity's file name first; pytorch-fid ships the same network under the second
INCEPTION_FILE_NAMES = (
    "weights-inception-2015-12-05-6726825d.pth",
    "pt_inception-2015-12-05-6726825d.pth",
)

FeatureExtractor = Callable[[torch.Tensor], Sequence[torch.Tensor]]


class InceptionWeightsMissing(FileNotFoundError):
    """The Inception weights FID/IS/KID need are not on this machine."""

    def __init__(self, looked_for: Sequence[Path], configured: Optional[str] = None, reason: str = ""):
        self.looked_for = [Path(p) for p in looked_for]
        self.configured = configured
        cache = inception_cache_dir()
        lines = ["Inception-v3 weights for FID/IS/KID not found" + (f" ({reason})" if reason else "") + "."]
        lines.append("Looked for: " + ", ".join(str(p) for p in self.looked_for))
        lines.append("They are not downloaded at run time. Provide them in one of these ways:")
        lines.append(f"  1. set eval.inception_weights to the file's path in the run config "
                     f"(trainers/config.py EvalConfig), e.g. eval.inception_weights: "
                     f"/data/weights/{INCEPTION_FILE_NAMES[0]}")
        lines.append(f"  2. copy the file to the torch hub cache: {cache}/{INCEPTION_FILE_NAMES[0]} "
                     f"(that folder is $TORCH_HOME/hub/checkpoints; set TORCH_HOME to use another folder)")
        lines.append(f"  3. on a machine with internet run `python -m trainers.run.fid fetch` (downloads "
                     f"{INCEPTION_URL} into that cache) and copy the file over.")
        lines.append("Or set eval.every: 0 to train without sample metrics.")
        super().__init__("\n".join(lines))


def inception_cache_dir() -> Path:
    """Where torch-fidelity caches the weights: ``$TORCH_HOME/hub/checkpoints``."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def find_inception_weights(path: Optional[Union[str, os.PathLike]] = None) -> Path:
    """The weights file: ``path`` when given (it must exist), else the first
    of :data:`INCEPTION_FILE_NAMES` in :func:`inception_cache_dir`."""
    if path is not None:
        p = Path(path).expanduser()
        if p.is_file():
            return p
        raise InceptionWeightsMissing([p], configured=str(path), reason="eval.inception_weights points to no file")
    candidates = [inception_cache_dir() / name for name in INCEPTION_FILE_NAMES]
    for p in candidates:
        if p.is_file():
            return p
    raise InceptionWeightsMissing(candidates)


def fetch_inception_weights(timeout: float = 20.0, url: str = INCEPTION_URL) -> Path:
    """Download the weights into :func:`inception_cache_dir` (socket timeout
    ``timeout`` seconds, checked against the SHA-256 prefix in the name)."""
    dest = inception_cache_dir() / INCEPTION_FILE_NAMES[0]
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            done = 0
            while chunk := response.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if total:
                    print(f"\rdownloading {dest.name}: {done / total:.0%}", end="", file=sys.stderr)
        print(file=sys.stderr)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise InceptionWeightsMissing([dest], reason=f"download from {url} failed: {err}") from err
    if not digest.hexdigest().startswith(INCEPTION_SHA256_PREFIX):
        tmp.unlink(missing_ok=True)
        raise InceptionWeightsMissing([dest], reason=f"downloaded file has SHA-256 {digest.hexdigest()[:8]}..., "
                                                     f"expected {INCEPTION_SHA256_PREFIX}...")
    os.replace(tmp, dest)
    return dest


class InceptionFeatures(nn.Module):
    """torch-fidelity's InceptionV3 (the TensorFlow FID network): uint8 RGB
    images of any size → (2048-d pool3 features, 1008 unbiased logits)."""

    def __init__(self, weights: Optional[Union[str, os.PathLike]] = None):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        path = find_inception_weights(weights)
        try:
            self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                   feature_extractor_weights_path=str(path))
        except (RuntimeError, KeyError, EOFError, OSError, ValueError, pickle.UnpicklingError) as err:
            raise InceptionWeightsMissing([path], configured=str(weights) if weights else None,
                                          reason=f"{path} is not a usable weights file: {err}") from err

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net(images)


def to_uint8_rgb(images: torch.Tensor) -> torch.Tensor:
    """NCHW uint8 (kept) or float in [-1, 1] (→ round(127.5·x + 127.5),
    clipped) with 1 or 3 channels → uint8 with 3 channels."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"images: expected an NCHW tensor; got {getattr(images, 'shape', type(images))}")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"images: expected 1 or 3 channels (NCHW); got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        out = images
    elif images.is_floating_point():
        out = (images.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)   # as NVlabs/edm
    else:
        raise ValueError(f"images: expected uint8 or floating point; got {images.dtype}")
    return out.expand(-1, 3, -1, -1) if out.shape[1] == 1 else out


@dataclass
class SampleFeatures:
    """Features (for FID/KID) and logits (for IS) of a set of images."""
    features: torch.Tensor   # (N, D) float32, CPU
    logits: torch.Tensor     # (N, C) float32, CPU

    def __len__(self) -> int:
        return len(self.features)


@torch.no_grad()
def extract_features(images: torch.Tensor, extractor: FeatureExtractor, batch_size: int = 64,
                     device: Optional[Union[str, torch.device]] = None) -> SampleFeatures:
    device = torch.device(device) if device is not None else images.device
    feats, logits = [], []
    for i in range(0, len(images), batch_size):
        batch = to_uint8_rgb(images[i:i + batch_size]).to(device)
        out = extractor(batch)
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise ValueError("feature_extractor: must return (features (N, D), logits (N, C))")
        f, l = out
        if f.dim() != 2 or l.dim() != 2 or len(f) != len(batch) or len(l) != len(batch):
            raise ValueError(f"feature_extractor: returned shapes {tuple(f.shape)}, {tuple(l.shape)} for "
                             f"{len(batch)} images; expected (N, D) and (N, C)")
        feats.append(f.float().cpu())
        logits.append(l.float().cpu())
    return SampleFeatures(torch.cat(feats), torch.cat(logits))


def frechet_distance(generated: torch.Tensor, real: torch.Tensor) -> float:
    """FID between two feature sets, by torch-fidelity's formula
    ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁Σ₂)^½."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

    stats_1, stats_2 = fid_features_to_statistics(generated), fid_features_to_statistics(real)
    return float(fid_statistics_to_metric(stats_1, stats_2, verbose=False)[KEY_METRIC_FID])


def inception_score(logits: torch.Tensor, splits: int = 10, seed: int = 2020) -> float:
    """Mean over ``splits`` of exp E_x KL(p(y|x) ‖ p(y)) (torch-fidelity)."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, isc_features_to_metric

    return float(isc_features_to_metric(logits, splits=min(splits, len(logits)), shuffle=True,
                                        rng_seed=seed)[KEY_METRIC_ISC_MEAN])


def kernel_inception_distance(generated: torch.Tensor, real: torch.Tensor, subsets: int = 100,
                              subset_size: int = 1000, seed: int = 2020) -> float:
    """Mean unbiased MMD² with the cubic polynomial kernel over random subsets
    of ``min(subset_size, N₁, N₂)`` (torch-fidelity)."""
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, kid_features_to_metric

    size = min(subset_size, len(generated), len(real))
    return float(kid_features_to_metric(generated, real, kid_subsets=subsets, kid_subset_size=size,
                                        rng_seed=seed, verbose=False)[KEY_METRIC_KID_MEAN])


class SampleMetrics:
    """FID / IS / KID of generated images against a fixed set of real images.

    Build it once (it loads the extractor and the real images' features),
    then call it with each set of generated images.  ``feature_extractor``:
    any callable ``uint8 (N, 3, H, W) -> (features, logits)``; default
    :class:`InceptionFeatures` from ``inception_weights`` (the config field
    ``eval.inception_weights``; None: the torch hub cache).
    """

    def __init__(self, real: Union[torch.Tensor, SampleFeatures], *,
                 feature_extractor: Optional[FeatureExtractor] = None,
                 inception_weights: Optional[Union[str, os.PathLike]] = None,
                 device: Optional[Union[str, torch.device]] = None, batch_size: int = 64,
                 kid_subsets: int = 100, kid_subset_size: int = 1000, isc_splits: int = 10, seed: int = 2020):
        if device is None:
            device = real.device if isinstance(real, torch.Tensor) else torch.device("cpu")
        self.device = torch.device(device)
        self.extractor = feature_extractor if feature_extractor is not None else InceptionFeatures(inception_weights)
        if isinstance(self.extractor, nn.Module):
            self.extractor = self.extractor.to(self.device).eval()
        self.batch_size = batch_size
        self.kid_subsets, self.kid_subset_size = kid_subsets, kid_subset_size
        self.isc_splits, self.seed = isc_splits, seed
        self.real = real if isinstance(real, SampleFeatures) else self.features(real)
        if len(self.real) < 2:
            raise ValueError(f"real: need at least 2 images; got {len(self.real)}")

    def features(self, images: torch.Tensor) -> SampleFeatures:
        return extract_features(images, self.extractor, self.batch_size, self.device)

    def __call__(self, generated: Union[torch.Tensor, SampleFeatures]) -> dict[str, float]:
        gen = generated if isinstance(generated, SampleFeatures) else self.features(generated)
        if len(gen) < 2:
            raise ValueError(f"generated: need at least 2 images; got {len(gen)}")
        return {
            "fid": frechet_distance(gen.features, self.real.features),
            "inception_score": inception_score(gen.logits, self.isc_splits, self.seed),
            "kid": kernel_inception_distance(gen.features, self.real.features, self.kid_subsets,
                                             self.kid_subset_size, self.seed),
        }


def compute_sample_metrics(generated: torch.Tensor, real: Union[torch.Tensor, SampleFeatures], *,
                           feature_extractor: Optional[FeatureExtractor] = None,
                           inception_weights: Optional[Union[str, os.PathLike]] = None,
                           device: Optional[Union[str, torch.device]] = None, batch_size: int = 64,
                           kid_subsets: int = 100, kid_subset_size: int = 1000, isc_splits: int = 10,
                           seed: int = 2020) -> dict[str, float]:
    """``{"fid", "inception_score", "kid"}`` of ``generated`` against ``real``
    (NCHW uint8, or float in [-1, 1]).  Raises :class:`InceptionWeightsMissing`
    when no ``feature_extractor`` is given and the Inception weights are
    absent.  For repeated evaluations against the same real images build a
    :class:`SampleMetrics` once instead."""
    if device is None:
        device = generated.device
    metrics = SampleMetrics(real, feature_extractor=feature_extractor, inception_weights=inception_weights,
                            device=device, batch_size=batch_size, kid_subsets=kid_subsets,
                            kid_subset_size=kid_subset_size, isc_splits=isc_splits, seed=seed)
    return metrics(generated)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainers.run.fid", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="download the Inception weights into the torch hub cache")
    fetch.add_argument("--timeout", type=float, default=20.0, help="socket timeout in seconds")
    sub.add_parser("where", help="print the weights file in use, or why there is none")
    args = parser.parse_args(argv)
    try:
        path = fetch_inception_weights(args.timeout) if args.command == "fetch" else find_inception_weights()
    except InceptionWeightsMissing as err:
        print(err, file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
