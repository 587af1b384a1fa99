"""The convolution with a fast double backward computes the same first and
second derivatives as F.conv2d (dense Hessians in float64)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from curvature_fixtures import dense_hessian, unet_blocks_problem
from trainers.curvature.conv_double_backward import conv2d, fast_double_backward
from trainers.curvature.hessian import DoubleBackwardHessian, trainable_parameters

CASES = [  # (in_ch, out_ch, kernel, stride, padding, dilation, groups, bias)
    (2, 3, 3, 1, 1, 1, 1, True),
    (2, 3, 3, 2, 1, 1, 1, True),     # strided (the U-Net's downsampling)
    (4, 2, 1, 1, 0, 1, 1, False),    # 1×1, no bias (attention projections)
    (4, 4, 3, 1, 2, 2, 2, True),     # dilated, grouped
]


def _joint_hessian(conv, x, w, b, target):
    """Hessian of ½‖tanh(conv(x, w, b)) − target‖² w.r.t. (x, w, b) jointly."""
    sizes = [x.numel(), w.numel()] + ([b.numel()] if b is not None else [])

    def f(flat):
        parts = torch.split(flat, sizes)
        xx, ww = parts[0].reshape(x.shape), parts[1].reshape(w.shape)
        bb = parts[2] if b is not None else None
        return 0.5 * ((torch.tanh(conv(xx, ww, bb)) - target) ** 2).sum()
    flat = torch.cat([x.reshape(-1), w.reshape(-1)] + ([b] if b is not None else []))
    g = torch.autograd.functional.jacobian(f, flat)
    return g, torch.autograd.functional.hessian(f, flat)


@pytest.mark.parametrize("case", CASES)
def test_gradient_and_hessian_equal_those_of_conv2d(case):
    cin, cout, k, stride, padding, dilation, groups, bias = case
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cin, 7, 6, dtype=torch.float64, generator=g)
    w = 0.5 * torch.randn(cout, cin // groups, k, k, dtype=torch.float64, generator=g)
    b = torch.randn(cout, dtype=torch.float64, generator=g) if bias else None
    out_shape = F.conv2d(x, w, b, stride, padding, dilation, groups).shape
    target = torch.randn(out_shape, dtype=torch.float64, generator=g)
    ref_g, ref_H = _joint_hessian(lambda xx, ww, bb: F.conv2d(xx, ww, bb, stride, padding, dilation, groups),
                                  x, w, b, target)
    our_g, our_H = _joint_hessian(lambda xx, ww, bb: conv2d(xx, ww, bb, stride, padding, dilation, groups),
                                  x, w, b, target)
    assert ref_H.abs().max() > 0
    torch.testing.assert_close(our_g, ref_g, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(our_H, ref_H, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fast_conv", [True, False])
def test_operator_products_match_dense_hessian_with_and_without_fast_convs(fast_conv):
    model, loss = unet_blocks_problem()
    H = dense_hessian(model, loss)
    V = torch.randn(H.shape[0], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with DoubleBackwardHessian(loss, trainable_parameters(model), model=model, fast_conv=fast_conv) as op:
        HV = op(V)
        grad = torch.cat([gi.reshape(-1) for gi in op.gradient()])
    torch.testing.assert_close(HV, H @ V, rtol=1e-9, atol=1e-12)
    ref_grad = torch.autograd.grad(loss(), trainable_parameters(model))
    torch.testing.assert_close(grad, torch.cat([gi.reshape(-1) for gi in ref_grad]), rtol=1e-12, atol=1e-14)


def test_switch_is_scoped_and_skips_unsupported_convolutions():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding="same"),
                          nn.Conv2d(2, 1, 3, padding=1, padding_mode="reflect"))
    x = torch.randn(1, 1, 5, 5)
    before = model(x)
    with fast_double_backward(model) as switched:
        assert switched == 1
        assert "_conv_forward" in model[0].__dict__
        assert "_conv_forward" not in model[1].__dict__ and "_conv_forward" not in model[2].__dict__
        torch.testing.assert_close(model(x), before)
    assert all("_conv_forward" not in m.__dict__ for m in model)
