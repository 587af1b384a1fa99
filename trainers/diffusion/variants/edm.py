"""EDM preconditioning (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models", Table 1 and §5).

The network F_θ is wrapped into a denoiser of the VE state x = x₀ + σ n:

    D_θ(x, σ) = c_skip(σ) x + c_out(σ) F_θ(c_in(σ) x, c_noise(σ))

    c_skip = σ_d² / (σ² + σ_d²)      c_out = σ σ_d / √(σ² + σ_d²)
    c_in   = 1 / √(σ² + σ_d²)        c_noise = ln(σ) / 4

with σ_d = σ_data.  Training draws ln σ ~ N(P_mean, P_std²) and minimises
λ(σ) ‖D_θ(x₀ + σ n; σ) − x₀‖² with λ = (σ² + σ_d²)/(σ σ_d)², which equals
‖F_θ − F_target‖² with the unit-variance target
F_target = (x₀ − c_skip x)/c_out.

Time input.  NVlabs/edm feeds c_noise = ln(σ)/4 straight into its positional
embedding, whose frequencies (1 down to 1/10000) are those of this
repository's DDPM sinusoidal embedding, so we do the same by default.  Over
the training range (ln σ ∈ [−4.8, 2.4] at ±3 P_std) the argument spans only
≈ 1.8 radians, a much coarser code than DDPM's 0…999 timesteps; the option
``c_noise_scale`` multiplies c_noise before the embedding (400 gives ≈ 100
embedding units per unit of ln σ, what the linear DDPM schedule gives the
baseline).  On the tiny U-Net (16 px synthetic data, Adam 1e-3, 400 steps)
scales 1, 100 and 400 reached the same held-out loss (0.347, 0.345, 0.348),
so the default stays NVlabs' exact input.

Loss scale.  The per-example loss here is λ(σ) times the *mean* over the
C·H·W pixels of (D_θ − x₀)² (:func:`per_example_mse`, as for every variant);
NVlabs/edm's ``EDMLoss`` returns the per-pixel error and its training loop
*sums* it (``loss.sum() / batch``), so NVlabs' loss, gradient and Hessian are
C·H·W times these (3072 at 32×32×3).  λ₁(H) here is NVlabs' λ₁/(C·H·W), and
GD/momentum at learning rate η here take NVlabs' step at η/(C·H·W), where the
threshold comparison is the same; Adam's λ₁(P⁻¹H) is unchanged (up to ε).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from trainers.diffusion import parameterization as param
from trainers.diffusion.variants.base import Draw, Variant, check_option, per_example_mse


@dataclass
class EDMOptions:
    sigma_data: float = 0.5
    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_min: float = 0.002      # sampling range (Karras et al.'s defaults)
    sigma_max: float = 80.0
    c_noise_scale: float = 1.0    # multiplies c_noise before the U-Net's embedding (module docstring)

    def __post_init__(self):
        check_option(self.sigma_data > 0, "sigma_data", f"must be > 0; got {self.sigma_data}")
        check_option(self.p_std > 0, "p_std", f"must be > 0; got {self.p_std}")
        check_option(0 < self.sigma_min < self.sigma_max, "sigma_min",
                     f"need 0 < sigma_min < sigma_max; got {self.sigma_min}, {self.sigma_max}")
        check_option(self.c_noise_scale > 0, "c_noise_scale", f"must be > 0; got {self.c_noise_scale}")


class EDM(Variant):
    """Karras et al. preconditioning with log-normal σ; ``Draw.t`` holds σ."""

    name = "edm"
    Options = EDMOptions
    continuous = True

    # --- the preconditioning (σ: tensor broadcastable over the batch) ------
    def c_skip(self, sigma: torch.Tensor) -> torch.Tensor:
        sd = self.options.sigma_data
        return sd ** 2 / (sigma ** 2 + sd ** 2)

    def c_out(self, sigma: torch.Tensor) -> torch.Tensor:
        sd = self.options.sigma_data
        return sigma * sd / (sigma ** 2 + sd ** 2).sqrt()

    def c_in(self, sigma: torch.Tensor) -> torch.Tensor:
        return (sigma ** 2 + self.options.sigma_data ** 2).rsqrt()

    def c_noise(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma.log() / 4

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        sd = self.options.sigma_data
        return (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2

    def network_target(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """F_target = (x₀ − c_skip x)/c_out, the effective regression target of F_θ."""
        s = param.expand_like(sigma, x0)
        return (x0 - self.c_skip(s) * (x0 + s * noise)) / self.c_out(s)

    # --- randomness ------------------------------------------------------
    @property
    def sigma_range(self) -> tuple[float, float]:
        return self.options.sigma_min, self.options.sigma_max

    def sample_t(self, batch: int, generator: torch.Generator, step: int, device) -> torch.Tensor:
        z = torch.randn(batch, generator=generator, device=device)
        return (self.options.p_mean + self.options.p_std * z).exp()

    # --- loss and denoiser ---------------------------------------------------
    def precondition(self, model, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """D_θ(x, σ) for a (B,) tensor σ."""
        s = param.expand_like(sigma, x)
        t_in = self.options.c_noise_scale * self.c_noise(sigma)
        out = model(self.c_in(s) * x, t_in)
        return self.c_skip(s) * x + self.c_out(s) * out.float()

    def loss(self, model, d: Draw) -> torch.Tensor:
        sigma = d.t.float()
        x = d.x0 + param.expand_like(sigma, d.x0) * d.input_noise
        return self.loss_weight(sigma) * per_example_mse(self.precondition(model, x, sigma), d.x0)

    def denoiser(self, model):
        def denoise(x: torch.Tensor, sigma) -> torch.Tensor:
            return self.precondition(model, x, param.batch_sigma(sigma, x))
        return denoise

