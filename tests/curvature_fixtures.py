"""Tiny float64 models whose dense Hessian fits in memory, and the dense
reference computations (``torch.autograd.functional.hessian`` + ``eigh``)
that the Hessian, LOBPCG and sharpness-probe tests compare against."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from trainers.curvature.hessian import CurvatureOperator
from trainers.diffusion.unet import AttnBlock, Downsample, ResBlock, Upsample, timestep_embedding


class MLP(nn.Module):
    """3 → 8 → 8 → 2 tanh MLP (122 parameters)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))

    def forward(self, x):
        return self.net(x)


class TinyConvNet(nn.Module):
    """Conv → GroupNorm → SiLU → strided conv → nearest upsampling → conv (1 channel in/out)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1)
        self.norm = nn.GroupNorm(1, 3)
        self.down = nn.Conv2d(3, 3, 3, stride=2, padding=1)
        self.out = nn.Conv2d(3, 1, 3, padding=1)

    def forward(self, x):
        h = F.silu(self.norm(self.conv1(x)))
        h = F.interpolate(F.silu(self.down(h)), scale_factor=2.0, mode="nearest")
        return self.out(h)


class TinyUNetLike(nn.Module):
    """The U-Net's own blocks at 2 channels (≈ 500 parameters): timestep
    embedding, ResBlocks with GroupNorm, self-attention, down/up-sampling and
    a skip concatenation.  ``model(x, t)`` like :class:`trainers.diffusion.unet.UNet`."""

    def __init__(self, ch: int = 2, temb_ch: int = 4):
        super().__init__()
        self.temb_ch = temb_ch
        self.temb = nn.Linear(temb_ch, temb_ch)
        self.conv_in = nn.Conv2d(1, ch, 3, padding=1)
        self.res1 = ResBlock(ch, ch, temb_ch, 0.0, 1)
        self.attn = AttnBlock(ch, 1)
        self.down = Downsample(ch)
        self.res2 = ResBlock(ch, ch, temb_ch, 0.0, 1)
        self.up = Upsample(ch)
        self.res3 = ResBlock(2 * ch, ch, temb_ch, 0.0, 1)
        self.conv_out = nn.Conv2d(ch, 1, 3, padding=1)

    def forward(self, x, t):
        temb = self.temb(timestep_embedding(t, self.temb_ch).to(x.dtype))
        h0 = self.attn(self.res1(self.conv_in(x), temb))
        h = self.up(self.res2(self.down(h0), temb))
        return self.conv_out(self.res3(torch.cat([h, h0], 1), temb))


class Quadratic(nn.Module):
    """L(θ) = ½ θᵀAθ + bᵀθ: the Hessian is A exactly."""

    def __init__(self, A: torch.Tensor, theta0: torch.Tensor, b: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("A", A)
        self.register_buffer("b", torch.zeros_like(theta0) if b is None else b)
        self.theta = nn.Parameter(theta0.clone())

    def loss(self) -> torch.Tensor:
        return 0.5 * self.theta @ self.A @ self.theta + self.b @ self.theta


def randomize(model: nn.Module, std: float = 0.3, seed: int = 0) -> nn.Module:
    """Replace every parameter (the U-Net zero-initialises some) by N(0, std²)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return model


def symmetric_with_spectrum(eigenvalues, seed: int = 0) -> torch.Tensor:
    """Q diag(λ) Qᵀ with a random orthogonal Q (float64)."""
    lam = torch.as_tensor(eigenvalues, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(lam), len(lam), generator=g, dtype=torch.float64))
    A = (Q * lam) @ Q.T
    return 0.5 * (A + A.T)


def dense_hessian(model: nn.Module, loss_of_model) -> torch.Tensor:
    """The (n, n) Hessian of ``loss_of_model()`` (a closure calling ``model``)
    w.r.t. the model's trainable parameters in ``model.parameters()`` order,
    by ``torch.autograd.functional.hessian`` of the loss as a function of one
    flat vector."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    names = [name for name, _ in named]
    shapes = [p.shape for _, p in named]

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self):
            return loss_of_model()

    wrapper = Wrapper()

    def f(flat: torch.Tensor) -> torch.Tensor:
        parts, offset = {}, 0
        for name, shape in zip(names, shapes):
            parts["model." + name] = flat[offset:offset + shape.numel()].reshape(shape)
            offset += shape.numel()
        return functional_call(wrapper, parts, ())

    theta = torch.cat([p.detach().reshape(-1) for _, p in named])
    H = torch.autograd.functional.hessian(f, theta)
    return 0.5 * (H + H.T)


def dense_gradient(model: nn.Module, loss_of_model) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss_of_model(), params)
    return torch.cat([g.reshape(-1) for g in grads])


def top_eigenvalues(H: torch.Tensor, k: int) -> torch.Tensor:
    return torch.linalg.eigvalsh(H.to(torch.float64)).flip(0)[:k]


def unet_blocks_problem():
    """A ~500-parameter net of the U-Net's own blocks and its ε-prediction loss
    on a fixed batch (float64): (model, loss closure)."""
    torch.manual_seed(2)
    model = randomize(TinyUNetLike().double(), std=0.3, seed=2).eval()
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    t = torch.tensor([10.0, 300.0, 900.0], dtype=torch.float64)
    eps = torch.randn_like(x)
    return model, lambda: ((model(x, t) - eps) ** 2).mean()


class TinyDenoiser(nn.Module):
    """``model(x, t)`` with 79 parameters (1 channel): conv, timestep
    embedding, GroupNorm, SiLU, conv — a denoiser whose dense Hessian is cheap."""

    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(1, 3, 3, padding=1)
        self.temb = nn.Linear(4, 3)
        self.norm = nn.GroupNorm(1, 3)
        self.conv_out = nn.Conv2d(3, 1, 3, padding=1)

    def forward(self, x, t):
        h = self.conv_in(x) + self.temb(timestep_embedding(t, 4).to(x.dtype))[:, :, None, None]
        return self.conv_out(F.silu(self.norm(h)))


def cuda_tiny_unet():
    """The ``tiny`` U-Net on the GPU (16 px, eval mode, attention by the
    double-differentiable path) and its ε-prediction loss on a fixed batch of
    four: (model, trainable parameters, loss closure)."""
    from trainers.curvature.hessian import trainable_parameters
    from trainers.diffusion.unet import build_unet

    torch.manual_seed(0)
    device = torch.device("cuda")
    model = build_unet("tiny", 16, 3, dropout=0.0).to(device).eval()
    model.set_fused_attention(False)
    x = torch.randn(4, 3, 16, 16, device=device)
    t = torch.tensor([10.0, 200.0, 500.0, 900.0], device=device)
    eps = torch.randn_like(x)

    def loss():
        return ((model(x, t) - eps) ** 2).mean()
    return model, trainable_parameters(model), loss


class BiasedTF32(CurvatureOperator):
    """A Hessian operator whose TF32 products are the float32 ones times
    ``factor``: on the CPU (no TF32) a stand-in for the systematic rounding
    of TF32 products, with a known size."""

    def __init__(self, H, factor: float, precision: str = "float32"):
        super().__init__(H.n, H.dtype, H.device)
        self.H, self.factor, self.precision = H, factor, precision

    def _matmat(self, V):
        out = self.H(V)
        return out * self.factor if self.precision == "tf32" else out

    def at(self, precision):
        return BiasedTF32(self.H, self.factor, precision)

    def gradient(self):
        return self.H.gradient()

    @property
    def resident(self):
        return False

    def refresh(self):
        return self.H.refresh()

    def close(self):
        self.H.close()
