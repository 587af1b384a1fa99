"""2-D convolutions whose *second* derivatives run on the fast kernels.

A Hessian-vector product by double backward differentiates the backward
pass of every convolution.  PyTorch's formula for that
(``_convolution_double_backward``) computes one of its terms, the weight
gradient of the backward's input gradient, as a convolution of the batch-
and channel-transposed activations with a kernel as large as the feature
map.  cuDNN runs that shape on a slow generic kernel
(``implicit_convolve_sgemm``; ``bench/hvp_profile.py`` shows where the time
of a product goes, ``bench/RESULTS.md`` what it measured).

Here the two outputs of the backward of a convolution y = conv(x, w) are
computed by a small autograd function (:class:`_ConvBackward`) whose own
backward is one forward convolution plus one ordinary data- or
weight-gradient kernel:

* ``dx = dgrad(gy, w)``: ∂/∂gy = conv(ggx, w), ∂/∂w = wgrad(ggx, gy);
* ``dw = wgrad(x, gy)``: ∂/∂gy = conv(x, ggw), ∂/∂x = dgrad(gy, ggw).

These are the same derivatives (exact to float rounding), so gradients and
Hessian-vector products do not change, only the kernels that compute them.
Third derivatives are not supported (``once_differentiable``).

:func:`fast_double_backward` switches every ``nn.Conv2d`` of a model over
for the duration of a ``with`` block;
:class:`trainers.curvature.hessian.DoubleBackwardHessian` uses it while it
builds the gradient graph.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def _conv_backward(gy, x, w, stride, padding, dilation, groups, mask):
    return torch.ops.aten.convolution_backward(gy, x, w, None, stride, padding, dilation, False, [0, 0], groups,
                                               mask)


INPUT, WEIGHT = 0, 1   # which output of the convolution backward


class _ConvBackward(torch.autograd.Function):
    """One output of the backward of y = conv(x, w), differentiable once:
    ``INPUT``: dx = dgrad(gy, w); ``WEIGHT``: dw = wgrad(x, gy)."""

    @staticmethod
    def forward(ctx, which, gy, x, w, stride, padding, dilation, groups):
        ctx.save_for_backward(gy, x, w)
        ctx.which, ctx.conf = which, (stride, padding, dilation, groups)
        mask = [which == INPUT, which == WEIGHT, False]
        return _conv_backward(gy, x, w, stride, padding, dilation, groups, mask)[which]

    @staticmethod
    @once_differentiable
    def backward(ctx, gg):
        gy, x, w = ctx.saved_tensors
        conf = ctx.conf
        d_gy = d_x = d_w = None
        if ctx.which == INPUT:    # dx is bilinear in (gy, w)
            if ctx.needs_input_grad[1]:
                d_gy = F.conv2d(gg, w, None, *conf)
            if ctx.needs_input_grad[3]:
                d_w = _conv_backward(gy, gg, w, *conf, [False, True, False])[1]
        else:                     # dw is bilinear in (x, gy)
            if ctx.needs_input_grad[1]:
                d_gy = F.conv2d(x, gg, None, *conf)
            if ctx.needs_input_grad[2]:
                d_x = _conv_backward(gy, x, gg, *conf, [True, False, False])[0]
        return None, d_gy, d_x, d_w, None, None, None, None


class _Conv2d(torch.autograd.Function):
    """conv2d (zero padding) with a differentiable backward made of two
    :class:`_ConvBackward` outputs."""

    @staticmethod
    def forward(ctx, x, w, b, stride, padding, dilation, groups):
        ctx.save_for_backward(x, w)
        ctx.conf = (stride, padding, dilation, groups)
        ctx.has_bias = b is not None
        return F.conv2d(x, w, b, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        conf = ctx.conf
        dx = _ConvBackward.apply(INPUT, gy, x, w, *conf) if ctx.needs_input_grad[0] else None
        dw = _ConvBackward.apply(WEIGHT, gy, x, w, *conf) if ctx.needs_input_grad[1] else None
        db = gy.sum((0, 2, 3)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None, None, None


def conv2d(x: torch.Tensor, w: torch.Tensor, b=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
           groups: int = 1) -> torch.Tensor:
    """``F.conv2d`` (numeric padding, zeros mode) with the fast double backward."""
    pair = torch.nn.modules.utils._pair
    return _Conv2d.apply(x, w, b, list(pair(stride)), list(pair(padding)), list(pair(dilation)), groups)


def _module_forward(mod: nn.Conv2d, x, w, b):
    return conv2d(x, w, b, mod.stride, mod.padding, mod.dilation, mod.groups)


def supported(module: nn.Conv2d) -> bool:
    return isinstance(module, nn.Conv2d) and module.padding_mode == "zeros" and not isinstance(module.padding, str)


@contextlib.contextmanager
def fast_double_backward(model: nn.Module) -> Iterator[int]:
    """Route the forward of every (zero-padded) ``nn.Conv2d`` in ``model``
    through :func:`conv2d` inside the block; yields how many were switched."""
    switched = []
    for m in model.modules():
        if supported(m) and "_conv_forward" not in m.__dict__:
            m._conv_forward = functools.partial(_module_forward, m)
            switched.append(m)
    try:
        yield len(switched)
    finally:
        for m in switched:
            del m.__dict__["_conv_forward"]
