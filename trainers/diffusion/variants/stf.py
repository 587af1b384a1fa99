"""Stable Target Field (Xu et al. 2023, "Stable Target Field for Reduced
Variance Score Estimation in Diffusion Models", arXiv 2302.00670).

Denoising score matching regresses on the score of a single source image,
∇ log p(x_t | x₀); in the intermediate-noise regime many images could have
produced x_t and that target is very noisy.  STF regresses instead on a
self-normalised importance-sampling estimate of the true score over a
reference batch {x₀¹ = x₀, x₀², …, x₀ⁿ} that contains the source image:

    w_j ∝ p(x_t | x₀ʲ) = N(x_t; √ᾱ x₀ʲ, (1 − ᾱ) I),   Σ_j w_j = 1
    x̄₀ = Σ_j w_j x₀ʲ,    ε-target = (x_t − √ᾱ x̄₀) / √(1 − ᾱ)

(a small bias that vanishes as n grows, much lower variance).  With n = 1 it
is the ordinary ε target.  Under input perturbation the network input x_t is
built from the perturbed noise while the plain target is the unperturbed ε;
STF then shifts that plain target by the same correction,
ε + √ᾱ (x₀ − x̄₀)/√(1 − ᾱ), which is the formula above without perturbation.

The reference batch is drawn from the batch the draw is made of (a
training step's whole batch, before it is split into micro-batches or
full-batch chunks; the Hessian batch's own images):
``reference_size`` − 1 other images per example, without replacement
(``null``: the whole batch).  That batch is the draw's reference pool
(``Draw.shared["pool"]``) and the reference indices point into it
(``Draw.extra["ref"]``, per example), so every slice of the draw — a
micro-batch, the first ``hessian_batch`` examples of a deterministic
objective — keeps its references: accumulation gives the loss of one big
batch.  Distances are computed in
float64 outside autocast: at low noise the logits −‖x_t − √ᾱ x₀ʲ‖²/(2(1−ᾱ))
are huge and need the precision.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from trainers.diffusion.variants.base import Base, Draw, check_option


@dataclass
class StableTargetFieldOptions:
    reference_size: Optional[int] = None  # n, including the source image; null: the whole batch

    def __post_init__(self):
        if self.reference_size is not None:
            check_option(self.reference_size >= 1, "reference_size", f"must be >= 1 or null; got {self.reference_size}")


def reference_indices(batch: int, size: int, generator: torch.Generator, device) -> torch.Tensor:
    """(batch, size) indices into the batch: column 0 is the example itself,
    the rest distinct other examples in random order."""
    keys = torch.rand(batch, batch, generator=generator, device=device)
    keys.fill_diagonal_(2.0)  # sorts the example itself last
    others = keys.argsort(dim=1)[:, : size - 1]
    return torch.cat([torch.arange(batch, device=device)[:, None], others], dim=1)


class StableTargetField(Base):
    """ε-prediction with the STF target over an in-batch reference set."""

    name = "stf"
    Options = StableTargetFieldOptions

    def draw(self, x0: torch.Tensor, generator: torch.Generator, step: int = 0) -> Draw:
        d = super().draw(x0, generator, step)
        n = len(d) if self.options.reference_size is None else min(self.options.reference_size, len(d))
        d.extra["ref"] = reference_indices(len(d), n, generator, x0.device)
        d.shared["pool"] = x0
        return d

    def reference_weights(self, d: Draw) -> torch.Tensor:
        """(B, n) weights w_ij over the reference images ``d.shared["pool"][d.extra["ref"]]``."""
        with torch.autocast(d.x0.device.type, enabled=False):
            alpha, s = (v.to(torch.float64).reshape(-1, 1) for v in self.scales(d.t, 2))
            x0 = d.x0.to(torch.float64).flatten(1)
            pool = d.shared["pool"].to(torch.float64).flatten(1)
            x_t = alpha * x0 + s * d.input_noise.to(torch.float64).flatten(1)
            # ‖x_t,i − α_i x0_j‖² for every example i and pool image j, then the reference columns of each row
            dist = (x_t ** 2).sum(1, keepdim=True) - 2 * alpha * (x_t @ pool.T) + alpha ** 2 * (pool ** 2).sum(1)[None]
            logits = -dist.gather(1, d.extra["ref"]) / (2 * s ** 2)
            return torch.softmax(logits, dim=1)

    def target(self, d: Draw) -> torch.Tensor:
        w = self.reference_weights(d)
        pool = d.shared["pool"].to(torch.float64)
        dense = torch.zeros(len(d), len(pool), dtype=w.dtype, device=w.device).scatter_add_(1, d.extra["ref"], w)
        x0 = d.x0.to(torch.float64)
        x0_bar = (dense @ pool.flatten(1)).view_as(x0)
        alpha, s = (v.to(torch.float64) for v in self.scales(d.t, d.x0.ndim))
        return (d.noise.to(torch.float64) + alpha / s * (x0 - x0_bar)).to(d.noise.dtype)
