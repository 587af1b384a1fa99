"""Warm starts that cannot lock in (sharpness.solver: track, sharpness.explore).

A 400-dimensional quadratic loss ½ θᵀA_tθ whose spectrum and eigenvectors move
from probe to probe, probed as the training loop probes (one
:class:`SharpnessProbe` carried along, warm-started); the reference is
``numpy.linalg.eigvalsh`` of the dense A_t (an independent computation).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from trainers.config import OptimConfig, SharpnessConfig
from trainers.curvature.probe import SharpnessProbe

N = 400


class Quadratic(nn.Module):
    def __init__(self, theta: torch.Tensor):
        super().__init__()
        self.theta = nn.Parameter(theta.clone())
        self.A = None

    def loss(self) -> torch.Tensor:
        return 0.5 * self.theta @ (self.A @ self.theta)


def spectra(kind: str, probes: int):
    """Per probe: (eigenvalues, eigenvector rotation). λ₁ = 10, λ₂ = 9, the
    bulk in [0, 4]; the third eigenvalue rises smoothly from 5 to 14
    ("smooth") or jumps from 5 to 15 at probe 10 ("jump")."""
    rng = np.random.default_rng(0)
    bulk = np.sort(rng.uniform(0, 4, N - 3))[::-1]
    out = []
    for t in range(probes):
        if kind == "smooth":
            third = 5 + 9 * t / (probes - 1)
        else:
            third = 5.0 if t < 10 else 15.0
        out.append(np.concatenate([[10.0, 9.0, third], bulk]))
    return out


def rotations(probes: int, angle: float = 0.02):
    """Orthogonal Q_t = Q_0 R^t, R a rotation by ``angle`` in 40 random planes."""
    rng = np.random.default_rng(1)
    Q, _ = np.linalg.qr(rng.standard_normal((N, N)))
    R = np.eye(N)
    perm = rng.permutation(N)
    for i in range(40):
        a, b = perm[2 * i], perm[2 * i + 1]
        G = np.eye(N)
        G[[a, a, b, b], [a, b, a, b]] = [np.cos(angle), -np.sin(angle), np.sin(angle), np.cos(angle)]
        R = R @ G
    Qs = []
    for _ in range(probes):
        Qs.append(Q)
        Q = Q @ R
    return Qs


def run(kind: str, probes: int = 30, **sharpness):
    lams, Qs = spectra(kind, probes), rotations(probes)
    model = Quadratic(torch.randn(N, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    probe = SharpnessProbe(SharpnessConfig(**sharpness), OptimConfig(name="gd", lr=0.1))
    errors, hvps = [], []
    for lam, Q in zip(lams, Qs):
        A = (Q * lam) @ Q.T
        model.A = torch.from_numpy(0.5 * (A + A.T))
        cols = probe.measure(model, model.loss, None, 0.1)
        true = float(np.linalg.eigvalsh(model.A.numpy())[-1])
        errors.append(abs(cols["lambda_max"] - true) / true)
        hvps.append(cols["eig_hvps"])
    return np.array(errors), np.array(hvps), lams


def crossing(lams) -> int:
    """First probe at which the third eigenvalue exceeds λ₁ = 10."""
    return next(t for t, lam in enumerate(lams) if lam[2] > 10.0)


@pytest.mark.parametrize("kind", ["smooth", "jump"])
def test_a_rising_eigenvalue_is_caught_within_two_probes(kind):
    errors, hvps, lams = run(kind)
    c = crossing(lams)
    assert errors[:c].max() <= 1e-3
    assert errors[c + 1:].max() <= 1e-3, f"errors after the crossing at probe {c}: {errors[c:c + 5]}"
    assert hvps[1:].mean() < 10   # warm probes stay cheap


@pytest.mark.parametrize("kind", ["smooth", "jump"])
def test_without_exploration_the_warm_start_locks_in(kind):
    """The failure the exploration column prevents, reproduced: warm vectors
    alone keep reporting the old λ₁ well past the crossing."""
    errors, _, lams = run(kind, solver="lobpcg")
    c = crossing(lams)
    assert errors[c + 1:].max() > 0.05
