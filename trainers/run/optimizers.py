"""The optimizers a run trains with (``optim.name``).

Their stability thresholds, and Adam's preconditioner, are in
:mod:`trainers.curvature.thresholds`.
"""
from __future__ import annotations

import torch

from trainers.config import OptimConfig


def build_optimizer(cfg: OptimConfig, params) -> torch.optim.Optimizer:
    params = list(params)
    if cfg.name == "gd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.0, weight_decay=cfg.weight_decay)
    if cfg.name == "momentum":
        # PyTorch's SGD momentum (dampening 0) is heavy-ball: v ← βv + g, θ ← θ − ηv
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
