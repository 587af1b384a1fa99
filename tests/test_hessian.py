"""Hessian-vector products against dense Hessians of tiny float64 models."""
import pytest
import torch
import torch.nn as nn

from curvature_fixtures import (unet_blocks_problem, MLP, TinyConvNet, TinyUNetLike, cuda_tiny_unet, dense_hessian,
                                randomize)
from trainers.config import HVP_METHODS as METHODS, ConfigError
from trainers.curvature.hessian import (PRODUCTS, Diagonal, DoubleBackwardHessian, ForwardOverReverseHessian,
                                        HessianOperator, flatten, gradient, hessian_operator, hessian_vector_product,
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
    with hessian_operator(method, loss, trainable_parameters(model), model=model) as op:
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
    op = DoubleBackwardHessian(loss, params)
    g = flatten(op.gradient())
    torch.testing.assert_close(g, flatten(torch.autograd.grad(loss(), params)))
    with pytest.raises(ValueError, match="expected a vector"):
        op(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="method"):
        hessian_operator("finite_differences", loss, params)
    with pytest.raises(ValueError, match="model"):
        ForwardOverReverseHessian(loss, params)
    with pytest.raises(ValueError, match="precision"):
        DoubleBackwardHessian(loss, params, precision="bfloat16")
    op.close()


def test_graph_reuse_sees_the_parameters_of_its_construction():
    """The double-backward operator builds the gradient graph once; products
    stay those of the Hessian at that point (it must be rebuilt after an update)."""
    model, loss = _mlp_problem()
    params = trainable_parameters(model)
    H0 = dense_hessian(model, loss)
    v = torch.randn(H0.shape[0], dtype=torch.float64)
    with DoubleBackwardHessian(loss, params) as op:
        first = op(v)
        second = op(v)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first, H0 @ v, rtol=1e-10, atol=1e-12)


def test_batched_products_raise_a_clear_error_where_vmap_fails(unet_problem, monkeypatch):
    """Where PyTorch's vmapped double backward raises (its batching rules for
    convolutions and GroupNorm on CUDA), the batched method does not switch to
    another method: it raises one error that names the default method."""
    model, loss, H = unet_problem
    V = torch.randn(H.shape[0], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    grad = torch.autograd.grad

    def vmap_fails(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise RuntimeError("The size of tensor a (2) must match the size of tensor b (64) at non-singleton dim 4")
        return grad(*args, **kwargs)
    monkeypatch.setattr(torch.autograd, "grad", vmap_fails)
    with hessian_operator("double_backward_batched", loss, trainable_parameters(model)) as op:
        with pytest.raises(ConfigError, match=r"sharpness\.hvp: double_backward \(") as err:
            op(V)
    assert "\n" not in str(err.value) and "size of tensor a (2)" in str(err.value)
    assert op.products == 0


def test_cuda_graphs_are_ignored_on_the_cpu(unet_problem):
    model, loss, H = unet_problem
    V = torch.randn(H.shape[0], 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with DoubleBackwardHessian(loss, trainable_parameters(model), model=model, cuda_graphs=True) as op:
        assert not op.graphed
        torch.testing.assert_close(op(V), H @ V, rtol=1e-9, atol=1e-12)


def test_a_failed_capture_is_a_clear_error(unet_problem, monkeypatch):
    """A failed capture leaves CUDA's state unusable, so it is not papered
    over: the error says which setting turns CUDA graphs off."""
    model, loss, H = unet_problem
    V = torch.randn(H.shape[0], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    op = DoubleBackwardHessian(loss, trainable_parameters(model), model=model)
    op.prepare()             # the gradient graph, built as without CUDA graphs
    op._cuda_graphs = True   # products as on a GPU

    def fail(v):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(op, "_capture", fail)
    torch.testing.assert_close(op(V[:, :2]), H @ V[:, :2], rtol=1e-9, atol=1e-12)  # eager, before capturing
    with pytest.raises(RuntimeError, match=r"sharpness\.cuda_graphs: false"):
        op(V)
    op.close()


def test_registry_has_one_product_class_per_config_method():
    assert tuple(PRODUCTS) == METHODS
    for name, cls in PRODUCTS.items():
        assert issubclass(cls, HessianOperator) and cls.method == name


def _recording_problem():
    """An MLP whose loss closure records the float32 arithmetic it runs under."""
    model, loss = _mlp_problem()
    seen = []

    def recording():
        seen.append((torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32))
        return loss()
    return model, recording, seen


@pytest.mark.parametrize("method", METHODS)
def test_precision_is_the_operators_argument_not_the_global_flags(method, monkeypatch):
    """Products run at the operator's precision whatever the global TF32
    flags are, and leave those flags as they were; the gradient graph is
    always float32."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    torch.set_float32_matmul_precision("medium")
    try:
        model, loss, seen = _recording_problem()
        H = dense_hessian(model, loss)
        V = torch.randn(H.shape[0], 2, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
        with hessian_operator(method, loss, trainable_parameters(model), model=model, precision="tf32") as op:
            seen.clear()
            torch.testing.assert_close(op(V), H @ V, rtol=1e-10, atol=1e-12)
            tf32 = list(seen)
            seen.clear()
            exact = op.at("float32")
            assert exact.precision == "float32" and op.precision == "tf32"
            torch.testing.assert_close(exact(V), H @ V, rtol=1e-10, atol=1e-12)
            assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == ("medium", True)
        if method.startswith("double_backward"):
            # one graph, built (float32) at the first product and shared with the float32 view
            assert tf32 == [("highest", False)] and seen == []
        else:
            # the loss is evaluated inside each product, at the product's precision
            assert tf32 and set(tf32) == {("high", True)} and set(seen) == {("highest", False)}
        assert op.products == 2 and exact.products == 2
    finally:
        torch.set_float32_matmul_precision("highest")


def test_preconditioned_operator_is_a_composition(unet_problem):
    """Diagonal(d) @ H @ Diagonal(d) is D H D (against the dense Hessian);
    its TF32 view shares H's gradient graph."""
    model, loss, H = unet_problem
    n = H.shape[0]
    d = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(7)) + 0.5
    V = torch.randn(n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    with DoubleBackwardHessian(loss, trainable_parameters(model), model=model) as op:
        P = Diagonal(d) @ op @ Diagonal(d)
        assert len(P.factors) == 3 and P.n == n
        torch.testing.assert_close(P(V), d[:, None] * (H @ (d[:, None] * V)), rtol=1e-9, atol=1e-12)
        fast = P.at("tf32")
        torch.testing.assert_close(fast(V[:, 0]), d * (H @ (d * V[:, 0])), rtol=1e-9, atol=1e-12)
        view = fast.factors[1]
        assert view.precision == "tf32" and view._graph is op._graph
        assert fast.factors[0] is P.factors[0]          # a diagonal has no precision
        assert P.products == 3 and op.products == 3 and view.products == 1
    assert op._graph.grads is None                      # closed with the operator
    with pytest.raises(ValueError, match="different lengths"):
        Diagonal(d) @ Diagonal(torch.ones(3, dtype=torch.float64))


def test_cuda_graph_replays_are_keyed_on_the_precision(unet_problem, monkeypatch):
    """One capture per precision (the operator's and its views' argument, not
    the global flags), each after EAGER_BEFORE_CAPTURE eager products of that
    precision; replays give the products.  Capture simulated on the CPU."""
    from trainers.curvature.hessian import EAGER_BEFORE_CAPTURE

    model, loss, H = unet_problem
    V = torch.randn(H.shape[0], 4, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    op = DoubleBackwardHessian(loss, trainable_parameters(model), model=model)
    op.prepare()
    op._cuda_graphs = True   # products as on a GPU
    captured_under = []

    class FakeGraph:         # replays the second backward pass eagerly
        def __init__(self, v_in, v_out):
            self.v_in, self.v_out = v_in, v_out

        def replay(self):
            self.v_out.copy_(op._graph.column(self.v_in))

    def capture(v):
        captured_under.append(torch.get_float32_matmul_precision())
        graph = FakeGraph(v.clone(), torch.empty_like(v))
        return graph, graph.v_in, graph.v_out
    monkeypatch.setattr(op, "_capture", capture)
    torch.set_float32_matmul_precision("high")   # global flags say TF32: they do not choose the key
    try:
        torch.testing.assert_close(op(V), H @ V, rtol=1e-9, atol=1e-12)
        assert op.replayed == ("float32",)
        tf32 = op.at("tf32")
        torch.testing.assert_close(tf32(V), H @ V, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(op(V[:, :2]), H @ V[:, :2], rtol=1e-9, atol=1e-12)
    finally:
        torch.set_float32_matmul_precision("highest")
    assert op.replayed == tf32.replayed == ("float32", "tf32")
    assert captured_under == ["highest", "high"]
    assert op._eager == {"float32": EAGER_BEFORE_CAPTURE, "tf32": EAGER_BEFORE_CAPTURE}
    op.close()
    assert op.replayed == () and tf32.replayed == ()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_products_equal_plain_products_on_the_gpu():
    """The replayed second backward gives the plain products (float32 U-Net
    with attention, GroupNorm and the fast convolution double backward), for
    the TF32 and the float32 precision, and after many replays; a TF32 view
    of a graphed operator captures its own graph."""
    device = torch.device("cuda")
    model, params, loss = cuda_tiny_unet()
    n = sum(p.numel() for p in params)
    V = torch.randn(n, 3, device=device, generator=torch.Generator(device).manual_seed(0))
    for precision in ("float32", "tf32"):
        with DoubleBackwardHessian(loss, params, model=model, precision=precision) as plain:
            expected = plain(V)
        with DoubleBackwardHessian(loss, params, model=model, precision=precision, cuda_graphs=True) as graphed:
            first = graphed(V)   # two eager products, then the capture and one replay
            assert graphed.graphed and graphed.replayed == (precision,)
            again = graphed(V[:, [2, 0, 1]])
            other = graphed.at("tf32" if precision == "float32" else "float32")
            other(V)
            assert graphed.replayed == ("float32", "tf32")
        scale = expected.abs().max()
        torch.testing.assert_close(first, expected, rtol=0, atol=1e-5 * scale)
        torch.testing.assert_close(again, expected[:, [2, 0, 1]], rtol=0, atol=1e-5 * scale)
