"""Training-step speed of a U-Net preset in several precisions/layouts, in one run.

    python -m bench.train_speed --preset ddpm-cifar10 --batch 128 [--compile] [--json out.json]

Each configuration runs the same Adam step of the baseline ε-prediction loss
(forward, backward, optimizer step) on a fixed random CIFAR-sized batch; the
median of ``--iters`` timed steps after ``--warmup`` steps is reported, with
the speed-up over fp32 measured in this run.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import date

import torch

from trainers.config import ScheduleConfig, VariantConfig
from trainers.diffusion.schedules import NoiseSchedule
from trainers.diffusion.unet import build_unet, count_parameters
from trainers.diffusion.variants import build_variant


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(model, step_fn, iters: int, warmup: int, device) -> float:
    for _ in range(warmup):
        step_fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step_fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_step(model, variant, draw, opt, bf16: bool, device):
    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = variant.loss(model, draw).mean()
        loss.backward()
        opt.step()
    return step


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.train_speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="also time torch.compile (slow to build)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    schedule = NoiseSchedule.from_config(ScheduleConfig())
    variant = build_variant(VariantConfig(name="base"), schedule)
    g = torch.Generator(device=device).manual_seed(0)
    x0 = torch.rand(args.batch, 3, args.image_size, args.image_size, generator=g, device=device) * 2 - 1
    draw = variant.draw(x0, g)

    configs = [("fp32", dict(bf16=False)), ("bf16 autocast", dict(bf16=True)),
               ("bf16 + fused attention", dict(bf16=True, fused=True)),
               ("bf16 + fused attn + channels_last", dict(bf16=True, fused=True, channels_last=True)),
               ("tf32", dict(bf16=False, tf32=True))]
    if args.compile:
        configs.append(("bf16 + fused attn + torch.compile", dict(bf16=True, fused=True, compile=True)))

    rows = []
    for name, opts in configs:
        torch.manual_seed(0)
        model = build_unet(args.preset, args.image_size).to(device)
        torch.backends.cuda.matmul.allow_tf32 = opts.get("tf32", False)
        torch.backends.cudnn.allow_tf32 = opts.get("tf32", False)
        model.set_fused_attention(opts.get("fused", False))
        d = draw
        if opts.get("channels_last"):
            model = model.to(memory_format=torch.channels_last)
            d = type(draw)(draw.x0.contiguous(memory_format=torch.channels_last), draw.t,
                           draw.noise.contiguous(memory_format=torch.channels_last),
                           draw.input_noise.contiguous(memory_format=torch.channels_last))
        run_model = torch.compile(model) if opts.get("compile") else model
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        try:
            sec = time_steps(model, make_step(run_model, variant, d, opt, opts["bf16"], device),
                             args.iters, args.warmup + (10 if opts.get("compile") else 0), device)
        except Exception as e:  # noqa: BLE001 - report a configuration that does not run
            print(f"{name}: failed: {type(e).__name__}: {e}")
            continue
        rows.append({"config": name, "ms_per_step": sec * 1e3, "steps_per_s": 1 / sec})
        print(f"{name:38s} {sec * 1e3:8.1f} ms/step  {1 / sec:7.2f} steps/s", flush=True)

    base = rows[0]["ms_per_step"]
    for r in rows:
        r["speedup_vs_fp32"] = base / r["ms_per_step"]
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    result = {"device": dev, "torch": torch.__version__, "date": str(date.today()), "preset": args.preset,
              "params": count_parameters(build_unet(args.preset, args.image_size)), "batch": args.batch, "rows": rows}
    print(f"\n{args.preset} ({result['params'] / 1e6:.1f}M params), batch {args.batch}, {dev}, torch {torch.__version__}")
    print("| config | ms/step | steps/s | speed-up vs fp32 |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['ms_per_step']:.1f} | {r['steps_per_s']:.2f} | {r['speedup_vs_fp32']:.2f}× |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
