"""FID / IS / KID with a stand-in feature extractor, and the missing-weights path."""
import numpy as np
import pytest
import scipy.linalg
import scipy.special
import torch
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

from trainers.run import fid as F


class RandomConvFeatures(FeatureExtractorBase):
    """A fixed random conv net: uint8 images → (16 pooled features, 10 logits).

    Subclasses torch-fidelity's base class so the same network can also run
    inside torch-fidelity's own ``calculate_metrics`` pipeline.
    """
    NAME = "eos-test-random-conv"

    def __init__(self, name=NAME, features_list=("features", "logits"), **kwargs):
        super().__init__(name, list(features_list))
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 16, 3)
        self.fc = torch.nn.Linear(16, 10)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.calls = 0

    @staticmethod
    def get_provided_features_list():
        return ("features", "logits")

    def forward(self, x):
        assert x.dtype == torch.uint8 and x.shape[1] == 3
        self.calls += 1
        h = torch.relu(self.conv(x.float() / 255.0)).mean(dim=(2, 3))
        out = {"features": h, "logits": self.fc(h)}
        return tuple(out[name] for name in self.features_list)   # torch-fidelity's contract


class _Images(Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def _images(n, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, 3, 12, 12, generator=g) * 255 * scale).round()
    return x.to(torch.uint8)


@pytest.fixture
def extractor():
    return RandomConvFeatures()


def test_fid_matches_scipy_frechet_distance(extractor):
    gen, real = _images(64, 1, scale=0.7), _images(80, 2)
    m = F.compute_sample_metrics(gen, real, feature_extractor=extractor)
    assert set(m) == {"fid", "inception_score", "kid"} and all(np.isfinite(v) for v in m.values())
    with torch.no_grad():
        f1 = extractor(gen)[0].double().numpy()
        f2 = extractor(real)[0].double().numpy()
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert m["fid"] > 0.01
    assert m["fid"] == pytest.approx(expected, rel=1e-5)


def test_is_and_kid_match_direct_formulas(extractor):
    n = 48
    gen, real = _images(n, 3, scale=0.5), _images(n, 4)
    m = F.compute_sample_metrics(gen, real, feature_extractor=extractor, isc_splits=1, kid_subsets=1,
                                 kid_subset_size=n)
    with torch.no_grad():
        x, logits = (t.double().numpy() for t in extractor(gen))
        y = extractor(real)[0].double().numpy()
    # IS = exp(E_x KL(p(y|x) || p(y)))
    p = scipy.special.softmax(logits, axis=1)
    kl = (p * (np.log(p) - np.log(p.mean(0, keepdims=True)))).sum(1)
    assert m["inception_score"] == pytest.approx(np.exp(kl.mean()), rel=1e-6)
    # KID = unbiased MMD² with k(a, b) = (aᵀb/d + 1)³ over all n samples (a subset of size n is all of them)
    d = x.shape[1]
    k = lambda a, b: (a @ b.T / d + 1.0) ** 3
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    mmd = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (n * (n - 1)) - 2 * kxy.mean()
    assert m["kid"] == pytest.approx(mmd, rel=1e-4, abs=1e-7)


def test_matches_torch_fidelity_pipeline(extractor):
    """Our feature extraction + metrics give what torch-fidelity's own
    ``calculate_metrics`` gives with the same feature extractor registered."""
    import torch_fidelity
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if RandomConvFeatures.NAME not in FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor(RandomConvFeatures.NAME, RandomConvFeatures)
    gen, real = _images(40, 5, scale=0.6), _images(50, 6)
    ref = torch_fidelity.calculate_metrics(
        input1=_Images(gen), input2=_Images(real), feature_extractor=RandomConvFeatures.NAME,
        feature_layer_fid="features", feature_layer_kid="features", feature_layer_isc="logits",
        fid=True, isc=True, kid=True, cuda=False, cache=False, verbose=False, save_cpu_ram=True,
        kid_subsets=20, kid_subset_size=30, isc_splits=4, rng_seed=7)
    ours = F.compute_sample_metrics(gen, real, feature_extractor=extractor, kid_subsets=20, kid_subset_size=30,
                                    isc_splits=4, seed=7)
    assert ours["fid"] == pytest.approx(ref["frechet_inception_distance"], rel=1e-6)
    assert ours["inception_score"] == pytest.approx(ref["inception_score_mean"], rel=1e-6)
    assert ours["kid"] == pytest.approx(ref["kernel_inception_distance_mean"], rel=1e-6)


def test_float_and_grayscale_inputs(extractor):
    gen_u8, real_u8 = _images(32, 7), _images(32, 8)
    base = F.compute_sample_metrics(gen_u8, real_u8, feature_extractor=extractor)
    as_float = F.compute_sample_metrics(gen_u8.float() / 127.5 - 1, real_u8.float() / 127.5 - 1,
                                        feature_extractor=extractor)
    for key in base:
        assert as_float[key] == pytest.approx(base[key], rel=1e-9)
    gray = F.to_uint8_rgb(torch.tensor([-1.0, 0.0, 1.0, 3.0]).view(4, 1, 1, 1))
    assert gray.shape == (4, 3, 1, 1) and gray[:, 0].flatten().tolist() == [0, 128, 255, 255]
    assert torch.equal(gray[:, 0], gray[:, 2])
    # a set against itself: FID ~ 0
    same = F.compute_sample_metrics(gen_u8, gen_u8, feature_extractor=extractor)
    assert abs(same["fid"]) < 1e-6


def test_real_features_are_computed_once(extractor):
    metrics = F.SampleMetrics(_images(32, 9), feature_extractor=extractor, batch_size=16)
    calls = extractor.calls
    assert calls == 2
    for seed in (10, 11):
        out = metrics(_images(32, seed))
        assert np.isfinite(out["fid"])
    assert extractor.calls == calls + 4      # only the generated images, 2 batches each


def test_bad_inputs_are_named(extractor):
    with pytest.raises(ValueError, match="uint8 or floating point"):
        F.compute_sample_metrics(torch.zeros(4, 3, 8, 8, dtype=torch.int32), _images(4, 0), feature_extractor=extractor)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        F.compute_sample_metrics(torch.zeros(4, 2, 8, 8), _images(4, 0), feature_extractor=extractor)
    with pytest.raises(ValueError, match="must return"):
        F.compute_sample_metrics(_images(4, 0), _images(4, 1), feature_extractor=lambda x: x.float())
    with pytest.raises(ValueError, match="at least 2"):
        F.compute_sample_metrics(_images(1, 0), _images(4, 1), feature_extractor=extractor)


# ---------------------------------------------------------------------------
# Inception weights


def test_missing_weights_say_how_to_provide_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(F.InceptionWeightsMissing) as err:
        F.compute_sample_metrics(_images(4, 0), _images(4, 1))
    message = str(err.value)
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    assert str(cache / "weights-inception-2015-12-05-6726825d.pth") in message
    for needle in ("eval.inception_weights", "TORCH_HOME", "python -m trainers.run.fid fetch", "eval.every: 0"):
        assert needle in message
    assert isinstance(err.value, FileNotFoundError)
    # a configured path that is not there is named
    missing = tmp_path / "nowhere" / "inception.pth"
    with pytest.raises(F.InceptionWeightsMissing, match="eval.inception_weights points to no file") as err:
        F.SampleMetrics(_images(4, 1), inception_weights=missing)
    assert str(missing) in str(err.value)
    # a file that is not a state dict
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(F.InceptionWeightsMissing, match="not a usable weights file"):
        F.InceptionFeatures(garbage)


def test_cached_weights_are_found_and_used(tmp_path, monkeypatch):
    """A file in the torch hub cache is picked up; the wrapper asks
    torch-fidelity's InceptionV3 for pool3 features and unbiased logits."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    weights = cache / "pt_inception-2015-12-05-6726825d.pth"     # the pytorch-fid name is accepted too
    torch.save({}, weights)
    assert F.find_inception_weights() == weights
    loaded = []
    monkeypatch.setattr(FeatureExtractorInceptionV3, "load_state_dict",
                        lambda self, state, strict=True: loaded.append(state))
    net = F.InceptionFeatures()
    assert loaded == [{}]
    features, logits = net(_images(1, 0))
    assert features.shape == (1, 2048) and logits.shape == (1, 1008)
