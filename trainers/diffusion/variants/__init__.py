"""Registry of stabilization variants.

A variant is a small object with one interface (:class:`trainers.diffusion.variants.base.Variant`):
``draw`` the randomness of a loss evaluation, ``loss`` on a draw (training and
the frozen Hessian batch use the same function), ``denoiser`` for sampling.
Adding a variant means one new module and one line here.
"""
from __future__ import annotations

import importlib

# name -> "module:Class"; imported lazily so that config validation stays cheap
VARIANTS: dict[str, str] = {
    "base": "trainers.diffusion.variants.base:Base",
    "edm": "trainers.diffusion.variants.edm:EDM",
    "vparam": "trainers.diffusion.variants.vparam:VParam",
    "snr": "trainers.diffusion.variants.snr:MinSNR",
    "pd": "trainers.diffusion.variants.pd:ProgressiveDifficulty",
    "adap_s": "trainers.diffusion.variants.adap_s:AdaptiveSampling",
    "stf": "trainers.diffusion.variants.stf:StableTargetField",
}


def variant_class(name: str):
    if name not in VARIANTS:
        raise KeyError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    module, cls = VARIANTS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build_variant(cfg, schedule):
    """The variant named by ``cfg`` (a :class:`trainers.config.VariantConfig`)."""
    return variant_class(cfg.name)(schedule, cfg)
