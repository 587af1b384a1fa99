"""Hessian-vector products of a scalar loss with respect to a list of parameters.

Everything works on *flat* vectors: a parameter list ``[p₁, …, p_m]`` is
identified with one vector of length n = Σ numel(pᵢ) (:func:`flatten`,
:func:`unflatten`), and a block of k vectors is an (n, k) matrix.

Two ways to multiply by the Hessian H = ∇²L(θ):

* **double backward** (reverse-over-reverse, Pearlmutter 1994): build the
  gradient g(θ) with ``create_graph=True``, then Hv = ∇(gᵀv).  The graph of g
  does not depend on v, so :class:`HessianOperator` builds it *once* and runs
  only the second backward pass for every vector (``retain_graph=True``).
* **forward over reverse**: ``torch.func.jvp(torch.func.grad(f), θ, v)``,
  one forward-mode pass through the gradient computation per vector, or one
  ``vmap``-batched pass for a block of vectors.

Which one is faster depends on the device (``bench/RESULTS.md``).  On an H100
with the 35.7M-parameter DDPM U-Net (batch 128, float32, TF32 off) one
product cost 3.4 gradients by double backward with the graph reused, 4.4
from scratch, 3.6 by forward over reverse and 2.9 per vector for a vmapped
block of two.  A third of the double-backward time was one slow cuDNN kernel
that PyTorch's double backward of a convolution picks; given the ``model``,
the operator builds its gradient graph with convolutions whose second
derivatives use the ordinary fast kernels
(:mod:`trainers.curvature.conv_double_backward`, ``fast_conv=True``), which brings a
graph-reusing product to 2.3 gradients.
``double_backward_batched`` (``is_grads_batched``) fails on CUDA inside
GroupNorm's double backward (a vmap shape error), and with torch 2.11 also
inside a convolution's on the CPU (torch 2.14 is correct there); where it
fails, the operator warns once and computes the block column by column.
``double_backward`` is the default: exact, supported by every op with a
double-backward formula, and its graph serves all products of a probe.

On a small model the product is not arithmetic but kernel launches: the
second backward pass of the 6.5M-parameter ``small`` U-Net at batch 64
launches ~5,000 kernels, and on an H200 one product took 110–160 ms of wall
time for ~40 ms of GPU work; replayed as a CUDA graph, 44 ms (TF32), and the
whole per-step probe ran 1.78× faster (``bench/probe_profile.py``,
``bench/RESULTS.md``).  With ``cuda_graphs=True`` (CUDA
only) the operator records the second backward pass of one vector as a CUDA
graph once a few products have run eagerly (per TF32 setting: the search and
the check run different kernels) and replays it for every further vector:
one launch instead of thousands.  The graph reads the vector from, and writes
the product to, fixed buffers, and reads the gradient graph's saved tensors,
which do not move while the operator lives; the gradient graph is taken
with respect to fresh leaves that share the parameters' storage (the
parameters' own autograd nodes may still hang on the training step's graph,
on another stream).  A capture that fails raises an error that names the
switch (``sharpness.cuda_graphs``): a failed capture leaves CUDA's state
unusable, so there is no quiet fallback.

The loss is a zero-argument closure (``loss_fn() -> scalar``) computed from
the model's *current* parameters, so the same closure serves every method:
forward over reverse swaps the parameters for functional ones through
``torch.func.functional_call`` on a small wrapper module.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

from trainers.config import HVP_METHODS as METHODS  # one list, validated by SharpnessConfig.hvp
from trainers.curvature.conv_double_backward import fast_double_backward

LossFn = Callable[[], torch.Tensor]

#: products of one TF32 setting computed eagerly before it is captured: they
#: choose the kernels the capture records, and a capture costs about one eager
#: product, so a setting the solver uses once or twice per probe (the float32
#: check of a TF32 search) is never captured
EAGER_BEFORE_CAPTURE = 2


# ---------------------------------------------------------------------------
# flat vectors


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the Hessian is taken with respect to (``requires_grad``)."""
    return [p for p in model.parameters() if p.requires_grad]


def num_elements(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() for t in tensors)


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate tensors into one flat vector (a copy)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vec: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Split a flat vector (n,) or a block (n, k) into tensors shaped like
    ``like`` (views; a block gives shapes ``(k, *p.shape)``)."""
    n = num_elements(like)
    if vec.shape[0] != n:
        raise ValueError(f"vector has {vec.shape[0]} entries, the parameters have {n}")
    out, offset = [], 0
    for p in like:
        chunk = vec[offset:offset + p.numel()]
        out.append(chunk.reshape(p.shape) if vec.dim() == 1 else chunk.T.reshape(vec.shape[1], *p.shape))
        offset += p.numel()
    return out


def _flat_block(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`unflatten` for a block: tensors (k, *shape) -> (n, k)."""
    return torch.cat([t.reshape(t.shape[0], -1) for t in parts], dim=1).T


def _zeros_for_none(grads, params) -> list[torch.Tensor]:
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


# ---------------------------------------------------------------------------
# one-shot products


def gradient(loss_fn: LossFn, params: Sequence[torch.Tensor], create_graph: bool = False) -> list[torch.Tensor]:
    """∇L as a list shaped like ``params`` (zeros where L does not depend on a
    parameter).  Never touches ``p.grad``."""
    loss = loss_fn()
    grads = torch.autograd.grad(loss, list(params), create_graph=create_graph, allow_unused=True)
    return _zeros_for_none(grads, params)


def hessian_vector_product(loss_fn: LossFn, params: Sequence[torch.Tensor], v) -> list[torch.Tensor]:
    """Hv by double backward, from scratch (one forward, one backward with
    graph, one second backward).  ``v`` is a list shaped like ``params`` or a
    flat vector; the result has the same form."""
    params = list(params)
    flat = isinstance(v, torch.Tensor)
    with HessianOperator(loss_fn, params, method="double_backward") as H:
        hv = H(v if flat else flatten(v))
    return hv if flat else unflatten(hv, params)


def hessian_vector_products(loss_fn: LossFn, params: Sequence[torch.Tensor], V: torch.Tensor,
                            method: str = "double_backward", model: Optional[nn.Module] = None) -> torch.Tensor:
    """HV for a block V (n, k) of flat vectors, by ``method`` (see :data:`METHODS`;
    the forward-over-reverse methods need the ``model`` the parameters belong to)."""
    with HessianOperator(loss_fn, list(params), method=method, model=model) as H:
        return H(V)


# ---------------------------------------------------------------------------
# the operator


class _LossModule(nn.Module):
    """Wraps ``model`` and a closure over it so that ``functional_call`` can
    substitute functional parameters for the closure's forward pass."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self._loss_fn = loss_fn

    def forward(self) -> torch.Tensor:
        return self._loss_fn()


class HessianOperator:
    """The Hessian of ``loss_fn`` w.r.t. ``params`` as a linear operator on flat
    vectors: ``H(v)`` for v of shape (n,) or ``H(V)`` for a block (n, k).

    ``products`` counts vector products (a block of k counts k).  With the
    double-backward methods the gradient graph is built on first use and kept
    until :meth:`close` (or the end of a ``with`` block); the parameters must
    not change in between.  ``method``:

    * ``double_backward``: one second backward pass per vector (with
      ``model`` and ``fast_conv``, through :mod:`trainers.curvature.conv_double_backward`);
    * ``double_backward_batched``: one vmapped second backward pass per block
      (``is_grads_batched``);
    * ``forward_over_reverse``: ``jvp(grad(L))`` per vector (needs ``model``);
    * ``forward_over_reverse_vmap``: ``vmap(jvp(grad(L)))`` per block (needs ``model``).

    ``cuda_graphs``: with ``double_backward`` and ``model`` on a CUDA device,
    replay each product's second backward pass as a CUDA graph (see the module
    docstring); ignored otherwise.  ``graphed`` says whether products are being replayed.
    """

    def __init__(self, loss_fn: LossFn, params: Sequence[torch.Tensor], *, method: str = "double_backward",
                 model: Optional[nn.Module] = None, fast_conv: bool = True, cuda_graphs: bool = False):
        if method not in METHODS:
            raise ValueError(f"method: must be one of {', '.join(METHODS)}; got {method!r}")
        self.loss_fn = loss_fn
        self.params = list(params)
        if not self.params:
            raise ValueError("params: no parameters to differentiate")
        self.method = method
        self.n = num_elements(self.params)
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        self.products = 0
        self._grads: Optional[list[torch.Tensor]] = None
        self._loss: Optional[torch.Tensor] = None
        # double backward through the model's convolutions on the fast kernels
        # (trainers/curvature/conv_double_backward.py); the vmapped variant keeps the
        # built-in formula, whose batching rules it relies on
        self._fast_conv_model = model if (fast_conv and method == "double_backward") else None
        self._cuda_graphs = (cuda_graphs and method == "double_backward" and self.device.type == "cuda"
                             and model is not None)
        self._stream: Optional[torch.cuda.Stream] = None   # where the gradient graph and the captures run
        self._captured: dict = {}   # TF32 setting -> (CUDA graph, input buffer, output buffer)
        self._eager: dict = {}      # TF32 setting -> products computed without a CUDA graph
        self._wrt = self.params     # the leaves the gradient graph is differentiated with respect to
        self._unbatchable = False   # double_backward_batched: PyTorch's vmapped double backward failed here
        if method.startswith("forward_over_reverse") or self._cuda_graphs:
            if model is None:
                raise ValueError(f"model: method {method!r} needs the model the parameters belong to")
            self._setup_functional(model)

    # --- double backward ---------------------------------------------------
    def _build_graph(self) -> None:
        convs = (fast_double_backward(self._fast_conv_model) if self._fast_conv_model is not None
                 else contextlib.nullcontext())
        stream = contextlib.nullcontext()
        if self._cuda_graphs:
            # the second backward runs each op on the stream of the op it
            # differentiates, so the graph is built on the stream the CUDA
            # graphs will be captured on
            self._stream = torch.cuda.Stream(self.device)
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            stream = torch.cuda.stream(self._stream)
        with convs, stream:
            if self._cuda_graphs:
                # fresh leaves sharing the parameters' storage: the autograd
                # nodes of the parameters themselves may belong to the training
                # step's graph on the default stream, and a capture that meets
                # them synchronises with that stream and fails
                self._wrt = [p.detach().requires_grad_(True) for p in self.params]
                from torch.func import functional_call
                loss = functional_call(self._wrapper, dict(zip(self._names, self._wrt)), ())
            else:
                loss = self.loss_fn()
            if loss.dim() != 0:
                raise ValueError(f"loss_fn must return a scalar; got shape {tuple(loss.shape)}")
            grads = torch.autograd.grad(loss, self._wrt, create_graph=True, allow_unused=True)
        self._loss = loss.detach()
        self._grads = _zeros_for_none(grads, self.params)
        # Gradient entries that do not depend on the parameters (linear in θ, or
        # unused) have no graph: their rows of H are zero.
        self._live = [i for i, g in enumerate(self._grads) if g.requires_grad]
        if self._stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._stream)

    def _column_product(self, v: torch.Tensor) -> torch.Tensor:
        """Hv for one flat vector v (n,) by a second backward pass."""
        live = self._live
        live_params = [self._wrt[i] for i in live]
        parts = unflatten(v, self.params)
        hv = torch.autograd.grad([self._grads[i] for i in live], live_params, [parts[i] for i in live],
                                 retain_graph=True, allow_unused=True)
        full = [torch.zeros_like(p) for p in self.params]
        for i, h in zip(live, hv):
            if h is not None:
                full[i] = h
        return flatten(full)

    def _capture(self, v: torch.Tensor):
        """Record :meth:`_column_product` as a CUDA graph (after eager products
        on the graph's stream have chosen the kernels); returns the graph and
        its input and output buffers."""
        stream, current = self._stream, torch.cuda.current_stream(self.device)
        v_in = v.clone()
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                v_out = self._column_product(v_in)
        current.wait_stream(stream)
        return graph, v_in, v_out

    def _graphed_double_backward(self, V: torch.Tensor) -> torch.Tensor:
        """Products of the columns of V: eager for the first
        :data:`EAGER_BEFORE_CAPTURE` of a TF32 setting, then replayed."""
        key = (torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
        out = torch.empty_like(V)
        for j in range(V.shape[1]):
            entry = self._captured.get(key)
            if entry is None and self._eager.get(key, 0) >= EAGER_BEFORE_CAPTURE:
                try:
                    entry = self._captured[key] = self._capture(V[:, j])
                except RuntimeError as e:
                    # a failed capture leaves CUDA state (the RNG's capture
                    # bookkeeping) unusable: no quiet fallback, a clear error
                    raise RuntimeError(f"Hessian-vector product: CUDA graph capture failed ({e}). Turn CUDA graphs "
                                       "off (sharpness.cuda_graphs: false) and report the model and loss.") from e
            if entry is None:
                out[:, j] = self._column_product(V[:, j])
                self._eager[key] = self._eager.get(key, 0) + 1
            else:
                graph, v_in, v_out = entry
                v_in.copy_(V[:, j])
                graph.replay()
                out[:, j] = v_out
        return out

    def _batched_double_backward(self, V: torch.Tensor) -> Optional[torch.Tensor]:
        """HV for the block V by one vmapped second backward pass, or None
        where PyTorch's batching rules for a double-backward formula raise
        (convolutions and GroupNorm on CUDA; convolutions on the CPU with
        torch 2.11): then this operator warns once and goes column by column."""
        live, k = self._live, V.shape[1]
        parts = unflatten(V, self.params)
        try:
            hv = torch.autograd.grad([self._grads[i] for i in live], [self._wrt[i] for i in live],
                                     [parts[i] for i in live], retain_graph=True, allow_unused=True,
                                     is_grads_batched=True)
        except RuntimeError as e:
            self._unbatchable = True
            warnings.warn(f"double_backward_batched: PyTorch's vmapped double backward failed on this model "
                          f"({str(e).splitlines()[0]}); computing products one vector at a time (same values; "
                          "sharpness.hvp: double_backward is the fast default)", RuntimeWarning, stacklevel=4)
            return None
        full = [torch.zeros((k, *p.shape), device=p.device, dtype=p.dtype) for p in self.params]
        for i, h in zip(live, hv):
            if h is not None:
                full[i] = h
        return _flat_block(full)

    def _double_backward(self, V: torch.Tensor, batched: bool) -> torch.Tensor:
        if self._grads is None:
            self._build_graph()
        if not self._live:
            return torch.zeros_like(V)
        if batched and not self._unbatchable:
            out = self._batched_double_backward(V)
            if out is not None:
                return out
        if self._cuda_graphs:   # double_backward only
            return self._graphed_double_backward(V)
        out = torch.empty_like(V)
        for j in range(V.shape[1]):
            out[:, j] = self._column_product(V[:, j])
        return out

    # --- forward over reverse --------------------------------------------
    def _setup_functional(self, model: nn.Module) -> None:
        ids = {id(p): i for i, p in enumerate(self.params)}
        names = [None] * len(self.params)
        for name, p in model.named_parameters():
            if id(p) in ids:
                names[ids[id(p)]] = "model." + name
        missing = [i for i, nm in enumerate(names) if nm is None]
        if missing:
            raise ValueError(f"params: {len(missing)} parameters are not parameters of the model")
        self._names = names
        self._wrapper = _LossModule(model, self.loss_fn)

    def _grad_fn(self):
        from torch.func import functional_call, grad

        names, wrapper = self._names, self._wrapper

        def loss_of(*ps):
            return functional_call(wrapper, dict(zip(names, ps)), ())
        return grad(loss_of, argnums=tuple(range(len(names))))

    def _forward_over_reverse(self, V: torch.Tensor, batched: bool) -> torch.Tensor:
        from torch.func import jvp, vmap

        primals = tuple(p.detach() for p in self.params)
        grad_fn = self._grad_fn()

        def hvp(*tangents):
            return jvp(grad_fn, primals, tangents)[1]

        parts = unflatten(V, self.params)
        if batched:
            return _flat_block(vmap(hvp)(*parts))
        out = torch.empty_like(V)
        for j in range(V.shape[1]):
            out[:, j] = flatten(hvp(*(t[j] for t in parts)))
        return out

    # --- interface -----------------------------------------------------------
    def __call__(self, V: torch.Tensor) -> torch.Tensor:
        single = V.dim() == 1
        if single:
            V = V[:, None]
        if V.dim() != 2 or V.shape[0] != self.n:
            raise ValueError(f"expected a vector ({self.n},) or a block ({self.n}, k); got {tuple(V.shape)}")
        V = V.to(device=self.device, dtype=self.dtype)
        if V.shape[1] == 0:
            return V.clone()
        if self.method == "double_backward":
            out = self._double_backward(V, batched=False)
        elif self.method == "double_backward_batched":
            out = self._double_backward(V, batched=True)
        elif self.method == "forward_over_reverse":
            out = self._forward_over_reverse(V, batched=False)
        else:
            out = self._forward_over_reverse(V, batched=True)
        self.products += V.shape[1]
        return out[:, 0] if single else out

    def gradient(self) -> list[torch.Tensor]:
        """∇L at the operator's point (detached), from the same graph the
        double-backward products use."""
        if self.method.startswith("double_backward"):
            if self._grads is None:
                self._build_graph()
            return [g.detach() for g in self._grads]
        return [g.detach() for g in gradient(self.loss_fn, self.params)]

    def loss(self) -> torch.Tensor:
        """The (detached) loss value at which the operator is taken."""
        if self._loss is None:
            with torch.no_grad():
                self._loss = self.loss_fn().detach()
        return self._loss

    @property
    def graphed(self) -> bool:
        return self._cuda_graphs

    def close(self) -> None:
        """Free the gradient graph (and the CUDA graphs that replay products)."""
        if self._captured:
            torch.cuda.current_stream(self.device).synchronize()   # no replay still reads the buffers
            self._captured.clear()
        self._eager.clear()
        self._grads = None
        self._live = []

    def __enter__(self) -> "HessianOperator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
