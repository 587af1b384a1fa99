"""The DDPM U-Net (Ho et al. 2020, CIFAR-10 configuration), self-contained.

ResBlocks (GroupNorm → SiLU → Conv, a projection of the timestep embedding,
dropout, a zero-initialised second conv), self-attention at chosen
resolutions, a sinusoidal timestep embedding followed by a 2-layer MLP.

Attention is written out (softmax(QKᵀ/√d)V) so that it supports double
backward, which Hessian-vector products need; ``set_fused_attention(True)``
swaps in ``scaled_dot_product_attention`` for plain training steps, and
:func:`probe_mode` turns it off (with dropout) while the curvature is probed.

The forward pass has no in-place operations, so Hessian-vector products work
by double backward and by forward-over-reverse (``torch.func.jvp`` of
``torch.func.grad``): an in-place write to a tangent that forward-mode AD
represents as an efficient zero tensor would raise "ZeroTensors are
immutable".  ``python -m bench.fwd_over_rev_check`` checks every block and
whole presets on a device (results in bench/RESULTS.md).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class UNetSpec:
    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    dropout: float
    groups: int = 32


PRESETS: dict[str, UNetSpec] = {
    # CPU tests: < 0.5M parameters
    "tiny": UNetSpec(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), dropout=0.0, groups=8),
    # quick studies: ~6M parameters
    "small": UNetSpec(ch=64, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1),
    # Ho et al. 2020 CIFAR-10: 35.7M parameters
    "ddpm-cifar10": UNetSpec(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1),
}


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in DDPM."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - 1))
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, hgt * wid).unbind(1)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (b, hw, c)
        if self.fused:
            h = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        else:
            w = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(c), dim=-1)
            h = w @ v
        h = h.transpose(1, 2).reshape(b, c, hgt, wid)
        return x + self.proj(h)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """ε/v/D-network: ``model(x, t)`` with x (B, C, H, W) and t (B,) float."""

    def __init__(self, spec: UNetSpec, image_size: int = 32, in_ch: int = 3):
        super().__init__()
        self.spec = spec
        self.image_shape = (in_ch, image_size, image_size)  # what samplers generate
        ch, g = spec.ch, spec.groups
        temb_ch = 4 * ch
        self.temb = nn.Sequential(nn.Linear(ch, temb_ch), nn.SiLU(), nn.Linear(temb_ch, temb_ch))
        self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)

        self.down = nn.ModuleList()
        skips, cur, res = [ch], ch, image_size
        for level, mult in enumerate(spec.ch_mult):
            out = ch * mult
            for _ in range(spec.num_res_blocks):
                blocks = [ResBlock(cur, out, temb_ch, spec.dropout, g)]
                if res in spec.attn_resolutions:
                    blocks.append(AttnBlock(out, g))
                self.down.append(nn.ModuleList(blocks))
                cur = out
                skips.append(cur)
            if level != len(spec.ch_mult) - 1:
                self.down.append(nn.ModuleList([Downsample(cur)]))
                skips.append(cur)
                res //= 2

        self.mid = nn.ModuleList([ResBlock(cur, cur, temb_ch, spec.dropout, g), AttnBlock(cur, g),
                                  ResBlock(cur, cur, temb_ch, spec.dropout, g)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(spec.ch_mult))):
            out = ch * mult
            for _ in range(spec.num_res_blocks + 1):
                blocks = [ResBlock(cur + skips.pop(), out, temb_ch, spec.dropout, g)]
                if res in spec.attn_resolutions:
                    blocks.append(AttnBlock(out, g))
                self.up.append(nn.ModuleList(blocks))
                cur = out
            if level != 0:
                self.up.append(nn.ModuleList([Upsample(cur)]))
                res *= 2

        self.norm_out = nn.GroupNorm(g, cur)
        self.conv_out = nn.Conv2d(cur, in_ch, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def set_fused_attention(self, fused: bool) -> None:
        for m in self.modules():
            if isinstance(m, AttnBlock):
                m.fused = fused

    @staticmethod
    def _run(blocks: nn.ModuleList, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        for block in blocks:
            h = block(h, temb) if isinstance(block, ResBlock) else block(h)
        return h

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.temb(timestep_embedding(t, self.spec.ch).to(x.dtype))
        h = self.conv_in(x)
        hs = [h]
        for blocks in self.down:
            h = self._run(blocks, h, temb)
            hs.append(h)
        h = self._run(self.mid, h, temb)
        for blocks in self.up:
            if isinstance(blocks[0], ResBlock):
                h = torch.cat([h, hs.pop()], dim=1)
            h = self._run(blocks, h, temb)
        return self.conv_out(F.silu(self.norm_out(h)))


@contextlib.contextmanager
def probe_mode(model: nn.Module, *, train: bool = False) -> Iterator[nn.Module]:
    """The model as Hessian-vector products need it: written-out attention
    (double-differentiable) in every :class:`AttnBlock`, and eval mode (no
    dropout), or with ``train`` the training mode (dropout on, as in a
    training step: batch sharpness); the mode and each block's attention
    are restored on exit."""
    training = model.training
    blocks = [(m, m.fused) for m in model.modules() if isinstance(m, AttnBlock)]
    model.train(train)
    for m, _ in blocks:
        m.fused = False
    try:
        yield model
    finally:
        model.train(training)
        for m, fused in blocks:
            m.fused = fused


def build_unet(preset: str, image_size: int = 32, channels: int = 3, dropout: float | None = None) -> UNet:
    if preset not in PRESETS:
        raise KeyError(f"unknown U-Net preset {preset!r}; known: {', '.join(PRESETS)}")
    spec = PRESETS[preset]
    if dropout is not None:
        spec = UNetSpec(**{**spec.__dict__, "dropout": dropout})
    return UNet(spec, image_size=image_size, in_ch=channels)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
