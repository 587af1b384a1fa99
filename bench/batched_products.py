"""Do batched Hessian-vector products pay?  One vmapped second backward pass
for a block of k vectors against k replayed single-vector passes.

The probe computes a block's products one column at a time, each replayed
as a CUDA graph (``sharpness.hvp: double_backward``).  The alternative is
one second backward pass vmapped over the block
(``torch.autograd.grad(..., is_grads_batched=True)``), which could fill the
GPU better where a single product leaves it idle.  PyTorch's vmap rule for
GroupNorm's double backward fails on CUDA, so this bench builds the gradient
graph with each GroupNorm written out (mean, variance, affine: ops whose
double backward vmap handles) and with the project's fast convolution
double backward (:mod:`trainers.curvature.conv_double_backward`).

On a :class:`~bench.common.Problem` (``--pretrain`` Adam steps first), at
TF32 precision on CUDA (float32 on the CPU), it prints per block size k:
ms per block and per column, eager and (CUDA) replayed as one CUDA graph,
and the largest relative difference of the batched products from the
probe's own operator; plus the probe's operator per column (replayed on
CUDA) and one training step, all from one process.

    python -m bench.batched_products --preset small --batch 128 --device cuda --blocks 1,2,4,8
"""
from __future__ import annotations

import argparse
import contextlib
import functools
from typing import Iterator

import torch
import torch.nn as nn

from bench.common import Problem, bench_config, device_name, table, timed
from trainers.curvature.conv_double_backward import fast_double_backward
from trainers.curvature.hessian import _flat_block, arithmetic, unflatten


def _group_norm(m: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    xg = x.reshape(x.shape[0], m.num_groups, -1)
    mean = xg.mean(-1, keepdim=True)
    var = (xg - mean).square().mean(-1, keepdim=True)
    y = ((xg - mean) * torch.rsqrt(var + m.eps)).reshape_as(x)
    if m.affine:
        y = y * m.weight[None, :, None, None] + m.bias[None, :, None, None]
    return y


@contextlib.contextmanager
def written_out_group_norm(model: nn.Module) -> Iterator[int]:
    """Every ``nn.GroupNorm`` of ``model`` computed from elementary ops inside
    the block (the same function); yields how many were switched."""
    switched = [m for m in model.modules() if isinstance(m, nn.GroupNorm) and "forward" not in m.__dict__]
    for m in switched:
        m.forward = functools.partial(_group_norm, m)
    try:
        yield len(switched)
    finally:
        for m in switched:
            del m.__dict__["forward"]


class BatchedProducts:
    """H·V for blocks V (n, k) by one vmapped second backward pass through a
    gradient graph built once (written-out GroupNorm, fast convolutions).
    On CUDA the graph is built, and the products run, on a stream of its own
    (the one a CUDA graph of the products is recorded on: :func:`replayed`)."""

    def __init__(self, pb: Problem, precision: str):
        self.pb, self.precision = pb, precision
        self.stream = torch.cuda.Stream(pb.device) if pb.device.type == "cuda" else None
        with self.on_stream(), arithmetic("float32", pb.device), written_out_group_norm(pb.model), \
                fast_double_backward(pb.model):
            loss = pb.loss()
            grads = torch.autograd.grad(loss, pb.params, create_graph=True, allow_unused=True)
        self.live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        self.grads = grads

    @contextlib.contextmanager
    def on_stream(self):
        current = None if self.stream is None else torch.cuda.current_stream(self.pb.device)
        if current is None or current == self.stream:   # the CPU, or already on it (a capture)
            yield
            return
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            yield
        current.wait_stream(self.stream)

    def __call__(self, V: torch.Tensor) -> torch.Tensor:
        params, live = self.pb.params, self.live
        parts = unflatten(V, params)
        with self.on_stream(), arithmetic(self.precision, self.pb.device):
            hv = torch.autograd.grad([self.grads[i] for i in live], [params[i] for i in live],
                                     [parts[i] for i in live], retain_graph=True, allow_unused=True,
                                     is_grads_batched=True)
        full = [torch.zeros((V.shape[1], *p.shape), device=p.device, dtype=p.dtype) for p in params]
        for i, h in zip(live, hv):
            if h is not None:
                full[i] = h
        return _flat_block(full)


def replayed(products: BatchedProducts, V: torch.Tensor):
    """``products`` on a fixed input buffer recorded as one CUDA graph on its
    stream: (replay, output buffer)."""
    v_in = V.clone()
    for _ in range(2):   # kernels chosen before the capture
        products(v_in)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=products.stream):
        v_out = products(v_in)

    def replay():
        current = torch.cuda.current_stream(V.device)
        products.stream.wait_stream(current)
        with torch.cuda.stream(products.stream):
            graph.replay()
        current.wait_stream(products.stream)
    return replay, v_out


def max_rel(A: torch.Tensor, B: torch.Tensor) -> float:
    return float(((A - B).norm(dim=0) / B.norm(dim=0).clamp_min(1e-30)).max())


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m bench.batched_products", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=16, help="training and Hessian batch")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--data", default=None, help="npz file (default: synthetic images)")
    ap.add_argument("--pretrain", type=int, default=20, help="Adam steps before measuring")
    ap.add_argument("--blocks", default="1,2,4,8", help="block sizes k")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    blocks = [int(k) for k in args.blocks.split(",")]

    pb = Problem(bench_config(preset=args.preset, image_size=args.image_size, batch=args.batch,
                              device=args.device, data=args.data))
    for _ in range(args.pretrain):
        pb.train_step()
    cuda = pb.device.type == "cuda"
    precision = "tf32" if cuda else "float32"
    step_s, _ = timed(pb.train_step, pb.device, args.reps)
    gen = torch.Generator().manual_seed(0)
    V = torch.randn(pb.n, max(blocks), generator=gen).to(pb.device)

    H = pb.hessian(precision=precision, cuda_graphs=cuda)
    col_s, ref = timed(lambda: H(V), pb.device, args.reps)   # one column at a time (replayed on CUDA)
    per_column = col_s / V.shape[1] * 1e3
    batched = BatchedProducts(pb, precision)
    rows = []
    for k in blocks:
        Vk = V[:, :k].contiguous()
        row = {"k": k, "eager_ms": None, "replayed_ms": None, "rel_diff": None, "error": None,
               "probe_ms_per_column": per_column}
        try:
            eager_s, out = timed(lambda: batched(Vk), pb.device, args.reps)
            row.update(eager_ms=eager_s * 1e3, rel_diff=max_rel(out, ref[:, :k]))
            if cuda:
                replay, v_out = replayed(batched, Vk)
                replay_s, _ = timed(replay, pb.device, args.reps)
                row["replayed_ms"] = replay_s * 1e3
                row["rel_diff"] = max(row["rel_diff"], max_rel(v_out, ref[:, :k]))
        except torch.cuda.OutOfMemoryError as e:
            row["error"] = f"out of memory ({str(e).splitlines()[0][:60]}…)"
            torch.cuda.empty_cache()
        except RuntimeError as e:
            row["error"] = str(e).splitlines()[0][:120]
        rows.append(row)
    H.close()

    print(f"# batched products: preset {args.preset}, {pb.n:,} parameters, batch {args.batch}, "
          f"{args.image_size}x{args.image_size}, {device_name(pb.device)}, torch {torch.__version__}, "
          f"{precision} products, {args.pretrain} Adam steps first")
    print(f"training step: {step_s * 1e3:.1f} ms; the probe's operator, one column at a time"
          f"{' (CUDA-graph replays)' if cuda else ''}: {per_column:.1f} ms per column")
    print()

    def per(ms, k, unit=1.0):
        return None if ms is None else ms / k / unit

    print(table(["k", "batched eager ms", "per column", "batched replayed ms", "per column",
                 "per column ÷ the probe's", "max rel. diff", "error"],
                [[r["k"], r["eager_ms"], per(r["eager_ms"], r["k"]), r["replayed_ms"], per(r["replayed_ms"], r["k"]),
                  per(r["replayed_ms"] if cuda else r["eager_ms"], r["k"], per_column),
                  r["rel_diff"], r["error"] or "—"] for r in rows]))
    return rows


if __name__ == "__main__":
    main()
