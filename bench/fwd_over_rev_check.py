"""Which layers of the U-Net support forward-over-reverse Hessian-vector
products (``torch.func.jvp(torch.func.grad(f))``) on a device?

Runs jvp(grad(L)) for each building block alone and for whole U-Net presets,
with the default (partly zero) initialisation and with random weights, fused
attention on and off, and prints which combinations fail and with what
error (the first and last frames of the traceback).  Each successful product
is checked against double backward; every product is float32 (TF32 off).

    python -m bench.fwd_over_rev_check --device cuda
"""
from __future__ import annotations

import argparse
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainers.curvature.hessian import DoubleBackwardHessian, hessian_operator, trainable_parameters
from trainers.diffusion.unet import AttnBlock, ResBlock, build_unet


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


METHODS = ("forward_over_reverse", "forward_over_reverse_vmap", "double_backward_batched")


@dataclass
class Outcome:
    """One product method on one model: its relative difference from double
    backward, or the error it raised (with the innermost frames)."""
    method: str
    rel_diff: Optional[float] = None
    error: Optional[str] = None

    def __str__(self) -> str:
        return f"{self.method}: " + (f"ok (rel. diff {self.rel_diff:.1e})" if self.error is None
                                     else f"FAILED {self.error}")


def _describe(e: Exception) -> str:
    cause = e.__cause__ or e   # the operator's own errors wrap PyTorch's
    tb = traceback.extract_tb(cause.__traceback__)
    where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in tb[-3:][::-1])
    return f"{type(cause).__name__}: {str(cause).splitlines()[0][:160]} [{where}]"


def check(name, model, inputs, device, fused=None) -> list[Outcome]:
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
    with DoubleBackwardHessian(loss, params) as H:
        ref = H(V)
    out = []
    for method in METHODS:
        try:
            with hessian_operator(method, loss, params, model=model) as H:
                hv = H(V)
            out.append(Outcome(method, rel_diff=float((hv - ref).norm() / ref.norm().clamp_min(1e-30))))
        except Exception as e:  # noqa: BLE001 - report, keep checking
            out.append(Outcome(method, error=_describe(e)))
    print(f"{name}: " + "; ".join(map(str, out)), flush=True)
    return out


def randomize(model):
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench.fwd_over_rev_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--presets", default="tiny,ddpm-cifar10")
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, device {device}", flush=True)
    ch = 32
    x = torch.randn(4, ch, 16, 16)
    results: dict[str, list[Outcome]] = {}
    for name, (m, temb) in blocks(ch).items():
        for init in ("default", "random"):
            mm = m if init == "default" else randomize(m)
            results[f"{name} [{init} init]"] = check(f"{name} [{init} init]", mm,
                                                     [x] if temb is None else [x, temb], device)
    for preset in args.presets.split(","):
        for init in ("default", "random"):
            for fused in (False, True):
                torch.manual_seed(0)
                model = build_unet(preset, 32, 3, dropout=0.0)
                if init == "random":
                    randomize(model)
                xi = torch.randn(args.batch, 3, 32, 32)
                t = torch.rand(args.batch) * 999
                label = f"UNet {preset} [{init} init, fused attention {fused}]"
                results[label] = check(label, model, [xi, t], device, fused)
    return results


if __name__ == "__main__":
    main()
