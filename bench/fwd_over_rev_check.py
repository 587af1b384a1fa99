"""Which layers of the U-Net support forward-over-reverse Hessian-vector
products (``torch.func.jvp(torch.func.grad(f))``) on a device?

Runs jvp(grad(L)) for each building block alone and for whole U-Net presets,
with the default (partly zero) initialisation and with random weights, fused
attention on and off, and prints which combinations fail and with what
error (the first and last frames of the traceback).  Each successful product
is checked against double backward.

    python bench/fwd_over_rev_check.py --device cuda
"""
from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainers.curvature.hessian import HessianOperator, trainable_parameters  # noqa: E402
from trainers.diffusion.unet import AttnBlock, ResBlock, build_unet  # noqa: E402


class Interp(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class SiLUConv(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.silu(x))


def blocks(ch):
    temb = torch.randn(4, 4 * ch)
    return {
        "Conv2d": (nn.Conv2d(ch, ch, 3, padding=1), None),
        "GroupNorm": (nn.Sequential(nn.GroupNorm(8, ch), nn.Conv2d(ch, ch, 1)), None),
        "SiLU+Conv2d": (SiLUConv(ch), None),
        "interpolate+Conv2d": (Interp(ch), None),
        "AttnBlock": (AttnBlock(ch, 8), None),
        "ResBlock": (ResBlock(ch, ch, 4 * ch, 0.0, 8), temb),
    }


def check(name, model, inputs, target_fn, device, fused=None):
    model = model.to(device).eval()
    if fused is not None:
        model.set_fused_attention(fused)
    inputs = [x.to(device) for x in inputs]
    with torch.no_grad():
        target = torch.randn_like(model(*inputs))

    def loss():
        return ((model(*inputs) - target) ** 2).mean()
    params = trainable_parameters(model)
    V = torch.randn(sum(p.numel() for p in params), 2, device=device)
    with HessianOperator(loss, params) as H:
        ref = H(V)
    out = []
    for method in ("forward_over_reverse", "forward_over_reverse_vmap", "double_backward_batched"):
        try:
            with HessianOperator(loss, params, method=method, model=model) as H:
                hv = H(V)
            err = float((hv - ref).norm() / ref.norm().clamp_min(1e-30))
            out.append(f"{method}: ok (rel. diff {err:.1e})")
        except Exception as e:  # noqa: BLE001
            tb = traceback.extract_tb(e.__traceback__)
            where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in tb[-3:][::-1])
            out.append(f"{method}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:160]} [{where}]")
    print(f"{name}: " + "; ".join(out), flush=True)


def randomize(model):
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--presets", default="tiny,ddpm-cifar10")
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, device {device}", flush=True)
    ch = 32
    x = torch.randn(4, ch, 16, 16)
    for name, (m, temb) in blocks(ch).items():
        for init in ("default", "random"):
            mm = m if init == "default" else randomize(m)
            check(f"{name} [{init} init]", mm, [x] if temb is None else [x, temb], None, device)
    for preset in args.presets.split(","):
        for init in ("default", "random"):
            for fused in (False, True):
                torch.manual_seed(0)
                model = build_unet(preset, 32, 3, dropout=0.0)
                if init == "random":
                    randomize(model)
                xi = torch.randn(args.batch, 3, 32, 32)
                t = torch.rand(args.batch) * 999
                check(f"UNet {preset} [{init} init, fused attention {fused}]", model, [xi, t], None, device, fused)


if __name__ == "__main__":
    main()
