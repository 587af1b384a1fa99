"""Where the time of a Hessian-vector product goes: the top operators of one
gradient, one graph-reusing double-backward product (PyTorch's convolution
double backward, and trainers/curvature/conv_double_backward.py) and one
vmapped forward-over-reverse block, by self device time (torch.profiler),
on the frozen Hessian batch of a :class:`~bench.common.Problem`.  Every
product is float32 (TF32 off).

    python -m bench.hvp_profile --preset ddpm-cifar10 --batch 128 --device cuda
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from bench.common import Problem, bench_config, sync
from trainers.curvature.hessian import VmapForwardOverReverseHessian, arithmetic


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.hvp_profile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rows", type=int, default=15)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    pb = Problem(bench_config(preset=args.preset, image_size=args.image_size, batch=args.batch, device=args.device))
    device = pb.device
    V = torch.randn(pb.n, 2, generator=torch.Generator().manual_seed(0)).to(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"

    def gradient():
        with arithmetic("float32", device):
            return torch.autograd.grad(pb.loss(), pb.params)

    with pb.hessian(fast_conv=False) as H, pb.hessian() as Hc, \
            VmapForwardOverReverseHessian(pb.loss, pb.params, model=pb.model) as Hf:
        jobs = {"gradient": gradient,
                "HVP double backward (graph reused), built-in conv double backward, 1 vector": lambda: H(V[:, :1]),
                "HVP double backward (graph reused), fast conv double backward, 1 vector": lambda: Hc(V[:, :1]),
                "HVP forward_over_reverse_vmap, block of 2": lambda: Hf(V)}
        for name, fn in jobs.items():
            fn()   # warm-up (and the gradient graph of the double-backward operators)
            sync(device)
            with profile(activities=acts) as prof:
                fn()
                sync(device)
            print(f"\n### {name}\n", flush=True)
            print(prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=60), flush=True)


if __name__ == "__main__":
    main()
