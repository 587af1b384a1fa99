"""Where the time of a Hessian-vector product goes: the top operators of one
gradient, one graph-reusing double-backward HVP (PyTorch's convolution double
backward, and trainers/curvature/conv_double_backward.py) and one vmapped
forward-over-reverse block, by self device time (torch.profiler).

    python bench/hvp_profile.py --preset ddpm-cifar10 --batch 128 --device cuda
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainers.config import ScheduleConfig, VariantConfig  # noqa: E402
from trainers.curvature.hessian import HessianOperator, trainable_parameters  # noqa: E402
from trainers.diffusion.schedules import NoiseSchedule  # noqa: E402
from trainers.curvature.probe import exact_float32  # noqa: E402
from trainers.diffusion.unet import build_unet  # noqa: E402
from trainers.diffusion.variants import build_variant  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rows", type=int, default=15)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_unet(args.preset, args.image_size, 3, dropout=0.0).to(device).eval()
    model.set_fused_attention(False)
    params = trainable_parameters(model)
    schedule = NoiseSchedule.from_config(ScheduleConfig())
    variant = build_variant(VariantConfig(), schedule)
    x0 = torch.rand(args.batch, 3, args.image_size, args.image_size) * 2 - 1
    draw = variant.draw(x0, torch.Generator().manual_seed(0), 0).to(device)

    def loss():
        return variant.loss(model, draw).mean()
    n = sum(p.numel() for p in params)
    V = torch.randn(n, 2, generator=torch.Generator().manual_seed(0)).to(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    with exact_float32():
        H = HessianOperator(loss, params, fast_conv=False)
        Hc = HessianOperator(loss, params, model=model)
        Hf = HessianOperator(loss, params, method="forward_over_reverse_vmap", model=model)
        jobs = {"gradient": lambda: torch.autograd.grad(loss(), params),
                "HVP double backward (graph reused), built-in conv double backward, 1 vector": lambda: H(V[:, :1]),
                "HVP double backward (graph reused), fast conv double backward, 1 vector": lambda: Hc(V[:, :1]),
                "HVP forward_over_reverse_vmap, block of 2": lambda: Hf(V)}
        for name, fn in jobs.items():
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            with profile(activities=acts) as prof:
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
            print(f"\n### {name}\n", flush=True)
            print(prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=60), flush=True)
        H.close()
        Hc.close()


if __name__ == "__main__":
    main()
