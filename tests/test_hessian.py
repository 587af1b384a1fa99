"""Hessian-vector products against dense Hessians of tiny float64 models."""
import pytest
import torch
import torch.nn as nn

from curvature_fixtures import unet_blocks_problem, MLP, TinyConvNet, TinyUNetLike, dense_hessian, randomize
from trainers.curvature.hessian import (METHODS, HessianOperator, flatten, gradient, hessian_vector_product,
                              hessian_vector_products, trainable_parameters, unflatten)


def _mlp_problem():
    torch.manual_seed(0)
    model = randomize(MLP().double(), std=0.5)
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    return model, lambda: ((model(x) - y) ** 2).mean()


def _conv_problem():
    torch.manual_seed(1)
    model = randomize(TinyConvNet().double(), std=0.5, seed=1)
    x, y = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.randn(2, 1, 8, 8, dtype=torch.float64)
    return model, lambda: ((model(x) - y) ** 2).mean()


@pytest.fixture(scope="module")
def unet_problem():
    model, loss = unet_blocks_problem()
    return model, loss, dense_hessian(model, loss)


def test_flatten_unflatten_roundtrip():
    ts = [torch.randn(2, 3), torch.randn(4), torch.randn(1, 1, 2)]
    flat = flatten(ts)
    assert flat.shape == (12,)
    for a, b in zip(unflatten(flat, ts), ts):
        assert torch.equal(a, b)
    block = torch.stack([flat, 2 * flat], dim=1)
    parts = unflatten(block, ts)
    assert [p.shape for p in parts] == [(2, 2, 3), (2, 4), (2, 1, 1, 2)]
    assert torch.equal(parts[0][1], 2 * ts[0])
    with pytest.raises(ValueError, match="entries"):
        unflatten(torch.zeros(5), ts)


@pytest.mark.parametrize("problem", [_mlp_problem, _conv_problem])
@pytest.mark.parametrize("method", METHODS)
def test_products_match_dense_hessian(problem, method):
    model, loss = problem()
    H = dense_hessian(model, loss)
    V = torch.randn(H.shape[0], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    HV = hessian_vector_products(loss, trainable_parameters(model), V, method=method, model=model)
    torch.testing.assert_close(HV, H @ V, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_unet_blocks_products_match_dense_hessian(unet_problem, method):
    """GroupNorm, SiLU, attention, strided conv, nearest upsampling, concat."""
    model, loss, H = unet_problem
    V = torch.randn(H.shape[0], 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with HessianOperator(loss, trainable_parameters(model), method=method, model=model) as op:
        HV = op(V)
        Hv = op(V[:, 0])
        assert op.products == 3
    torch.testing.assert_close(HV, H @ V, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(Hv, H @ V[:, 0], rtol=1e-9, atol=1e-12)


def test_one_shot_product_list_form_and_no_grad_side_effects():
    model, loss = _mlp_problem()
    params = trainable_parameters(model)
    H = dense_hessian(model, loss)
    v = torch.randn(H.shape[0], dtype=torch.float64)
    before = [p.detach().clone() for p in params]
    hv = hessian_vector_product(loss, params, unflatten(v, params))
    assert isinstance(hv, list) and [h.shape for h in hv] == [p.shape for p in params]
    torch.testing.assert_close(flatten(hv), H @ v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(hessian_vector_product(loss, params, v), H @ v, rtol=1e-10, atol=1e-12)
    assert all(p.grad is None for p in params)
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_unused_and_linear_parameters_have_zero_rows():
    """A parameter the loss ignores, and one it depends on linearly (whose
    gradient has no graph), give zero Hessian rows instead of an error."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
            self.b = nn.Parameter(torch.tensor(0.5, dtype=torch.float64))      # linear
            self.unused = nn.Parameter(torch.ones(3, dtype=torch.float64))

    m = M()
    loss = lambda: (m.w ** 3).sum() + 2 * m.b  # noqa: E731   H = diag(6w), 0, 0
    v = torch.arange(1.0, 7.0, dtype=torch.float64)
    for method in METHODS:
        hv = hessian_vector_products(loss, list(m.parameters()), v[:, None], method=method, model=m)[:, 0]
        torch.testing.assert_close(hv, torch.tensor([6.0, 24.0, 0, 0, 0, 0], dtype=torch.float64))
    g = gradient(loss, list(m.parameters()))
    torch.testing.assert_close(flatten(g), torch.tensor([3.0, 12.0, 2.0, 0, 0, 0], dtype=torch.float64))


def test_operator_gradient_and_input_checks():
    model, loss = _mlp_problem()
    params = trainable_parameters(model)
    op = HessianOperator(loss, params)
    g = flatten(op.gradient())
    torch.testing.assert_close(g, flatten(torch.autograd.grad(loss(), params)))
    with pytest.raises(ValueError, match="expected a vector"):
        op(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="method"):
        HessianOperator(loss, params, method="finite_differences")
    with pytest.raises(ValueError, match="model"):
        HessianOperator(loss, params, method="forward_over_reverse")
    op.close()


def test_graph_reuse_sees_the_parameters_of_its_construction():
    """The double-backward operator builds the gradient graph once; products
    stay those of the Hessian at that point (it must be rebuilt after an update)."""
    model, loss = _mlp_problem()
    params = trainable_parameters(model)
    H0 = dense_hessian(model, loss)
    v = torch.randn(H0.shape[0], dtype=torch.float64)
    with HessianOperator(loss, params) as op:
        first = op(v)
        second = op(v)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first, H0 @ v, rtol=1e-10, atol=1e-12)


def test_batched_products_fall_back_to_columns_where_vmap_fails(unet_problem, monkeypatch):
    """Where PyTorch's vmapped double backward raises (its batching rules for
    convolutions on CUDA, and on the CPU with torch 2.11), the batched method
    warns once and gives the same products column by column."""
    model, loss, H = unet_problem
    V = torch.randn(H.shape[0], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    grad = torch.autograd.grad
    batched_calls = []

    def vmap_fails(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            batched_calls.append(1)
            raise RuntimeError("The size of tensor a (2) must match the size of tensor b (64) at non-singleton dim 4")
        return grad(*args, **kwargs)
    monkeypatch.setattr(torch.autograd, "grad", vmap_fails)
    with HessianOperator(loss, trainable_parameters(model), method="double_backward_batched") as op:
        with pytest.warns(RuntimeWarning, match="one vector at a time"):
            HV = op(V)
        again = op(V[:, :2])    # no second attempt, no second warning
    assert len(batched_calls) == 1
    torch.testing.assert_close(HV, H @ V, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(again, H @ V[:, :2], rtol=1e-9, atol=1e-12)


def test_cuda_graphs_are_ignored_on_the_cpu(unet_problem):
    model, loss, H = unet_problem
    V = torch.randn(H.shape[0], 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with HessianOperator(loss, trainable_parameters(model), model=model, cuda_graphs=True) as op:
        assert not op.graphed
        torch.testing.assert_close(op(V), H @ V, rtol=1e-9, atol=1e-12)


def test_a_failed_capture_is_a_clear_error(unet_problem, monkeypatch):
    """A failed capture leaves CUDA's state unusable, so it is not papered
    over: the error says which setting turns CUDA graphs off."""
    model, loss, H = unet_problem
    V = torch.randn(H.shape[0], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    op = HessianOperator(loss, trainable_parameters(model), model=model)
    op.gradient()            # the gradient graph, built as without CUDA graphs
    op._cuda_graphs = True   # products as on a GPU

    def fail(v):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(op, "_capture", fail)
    torch.testing.assert_close(op(V[:, :2]), H @ V[:, :2], rtol=1e-9, atol=1e-12)  # eager, before capturing
    with pytest.raises(RuntimeError, match=r"sharpness\.cuda_graphs: false"):
        op(V)
    op.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_products_equal_plain_products_on_the_gpu():
    """The replayed second backward gives the plain products (float32 U-Net
    with attention, GroupNorm and the fast convolution double backward), for
    the TF32 and the float32 setting, and after many replays."""
    from trainers.curvature.probe import exact_float32, tf32
    from trainers.diffusion.unet import build_unet

    torch.manual_seed(0)
    device = torch.device("cuda")
    model = build_unet("tiny", 16, 3, dropout=0.0).to(device).eval()
    model.set_fused_attention(False)
    params = trainable_parameters(model)
    x = torch.randn(4, 3, 16, 16, device=device)
    t = torch.tensor([10.0, 200.0, 500.0, 900.0], device=device)
    eps = torch.randn_like(x)

    def loss():
        return ((model(x, t) - eps) ** 2).mean()
    n = sum(p.numel() for p in params)
    V = torch.randn(n, 3, device=device, generator=torch.Generator(device).manual_seed(0))
    for precision in (exact_float32, tf32):
        with precision():
            with HessianOperator(loss, params, model=model) as plain:
                expected = plain(V)
            with HessianOperator(loss, params, model=model, cuda_graphs=True) as graphed:
                first = graphed(V)   # two eager products, then the capture and one replay
                assert graphed.graphed and len(graphed._captured) == 1
                again = graphed(V[:, [2, 0, 1]])
        scale = expected.abs().max()
        torch.testing.assert_close(first, expected, rtol=0, atol=1e-5 * scale)
        torch.testing.assert_close(again, expected[:, [2, 0, 1]], rtol=0, atol=1e-5 * scale)
