"""Hessian-vector products of a scalar loss, as linear operators on flat vectors.

A parameter list ``[p₁, …, p_m]`` is identified with one vector of length
n = Σ numel(pᵢ) (:func:`flatten`, :func:`unflatten`), and a block of k
vectors is an (n, k) matrix.

The operators follow curvlinops' design: a base class,
:class:`CurvatureOperator`, validates the input (a vector (n,) or a block
(n, k)), counts products and composes with ``@``; a subclass only supplies
the block product ``_matmat(V)``.

* :class:`Diagonal` multiplies by a diagonal matrix, so the preconditioned
  Hessian D H D (the probe's P^{-1/2} H P^{-1/2}) is
  ``Diagonal(d) @ H @ Diagonal(d)``, a :class:`Composition`;
  :class:`Shifted` is A + c·I (H + wd·I under coupled weight decay).
* :class:`HessianOperator` is the Hessian H = ∇²L(θ) of a zero-argument
  closure ``loss_fn() -> scalar`` with respect to ``params``, computed from
  the model's *current* parameters.  One subclass per product method, by
  their ``sharpness.hvp`` names (:data:`PRODUCTS`, :func:`hessian_operator`):

  - ``double_backward`` (:class:`DoubleBackwardHessian`): reverse over
    reverse (Pearlmutter 1994).  The gradient g(θ) is built once with
    ``create_graph=True``; each product is one second backward pass,
    Hv = ∇(gᵀv), reusing that graph (``retain_graph=True``).  Given the
    ``model``, the graph is built with convolutions whose second derivatives
    run on the ordinary convolution kernels
    (:mod:`trainers.curvature.conv_double_backward`).  Optionally the second
    backward pass is replayed as a CUDA graph (below).
  - ``double_backward_batched`` (:class:`BatchedDoubleBackwardHessian`): one
    vmapped second backward pass per block (``is_grads_batched``), with
    PyTorch's own convolution double backward, whose batching rules vmap
    relies on.  Where PyTorch has no batching rule for an operation's double
    backward, the product raises an error that names the default method.
  - ``forward_over_reverse`` (:class:`ForwardOverReverseHessian`):
    ``torch.func.jvp(torch.func.grad(L), θ, v)``, one forward-mode pass
    through the gradient computation per vector; the parameters are swapped
    for functional ones by ``torch.func.functional_call`` on a wrapper of the
    ``model``, so the same closure serves.
  - ``forward_over_reverse_vmap`` (:class:`VmapForwardOverReverseHessian`):
    the same, ``vmap``-batched over a block.

**Precision.**  A Hessian operator computes its products at an explicit
``precision``: ``"float32"`` (TF32 off for matmuls and cuDNN convolutions)
or ``"tf32"`` (on, where the GPU has it), with autocast off, set for the
duration of each product and restored after it.  ``H.at("tf32")`` is the
same operator at another precision: it shares everything the products
reuse (the gradient graph, the CUDA graphs).  The double-backward gradient
graph itself — the forward pass and the first backward — is always
computed at float32 precision; forward over reverse evaluates the loss
inside each product, at the product's precision.

**CUDA graphs** (``DoubleBackwardHessian(..., cuda_graphs=True)``, CUDA and
a ``model`` only).  On a small model a product is dominated by kernel
launches (thousands per second backward pass).  The operator records the
second backward pass of one vector as a CUDA graph, once per precision after
:data:`EAGER_BEFORE_CAPTURE` eager products of that precision (which choose
the kernels the capture records), and replays it for every further vector:
one launch instead of thousands.  The graph reads the vector from, and
writes the product to, fixed buffers, and reads the gradient graph's saved
tensors, which do not move while the operator lives.  The gradient graph is
taken with respect to fresh leaves that share the parameters' storage (the
parameters' own autograd nodes may still belong to the training step's
graph, on another stream, and a capture that meets them fails), and it is
built on the stream the captures run on.  A capture that fails raises an
error that names the switch (``sharpness.cuda_graphs``): a failed capture
leaves CUDA's state unusable, so there is no quiet fallback.

**Resident** (``DoubleBackwardHessian(..., cuda_graphs=True, resident=True)``).
Building the gradient graph (a forward pass and a backward pass with
``create_graph``) and recording the products' CUDA graphs cost several
products when an operator is made anew for every parameter update.  A
resident operator is kept instead: :meth:`DoubleBackwardHessian.refresh`,
after the parameters were updated in place, records the build itself as a
CUDA graph the first time and replays it from then on, writing the loss,
the gradient and every saved tensor of the gradient graph into the same
memory, so that the products' CUDA graphs recorded on that graph stay
valid.  The loss closure must compute the same function of the parameters
at every refresh (its other inputs, e.g. a frozen batch, fixed tensors at
fixed addresses); the parameters must keep their storage (a refresh returns
False when one moved).  The recorded build's memory stays allocated between
refreshes.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Callable, ClassVar, Iterator, Optional, Sequence

import torch
import torch.nn as nn

from trainers.config import HVP_METHODS, PRECISIONS, ConfigError
from trainers.curvature.conv_double_backward import fast_double_backward

LossFn = Callable[[], torch.Tensor]

#: products of one precision computed eagerly before that precision is
#: captured as a CUDA graph: they choose the kernels the capture records, and
#: a capture costs about one eager product, so a precision the solver uses
#: once or twice per probe (the float32 check of a TF32 search) is never captured
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
# precision


def _check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision: must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    return precision


@contextlib.contextmanager
def arithmetic(precision: str, device: torch.device) -> Iterator[None]:
    """float32 matmuls and cuDNN convolutions at ``precision`` (``"float32"``:
    TF32 off; ``"tf32"``: on) with autocast off, for the block; the global
    settings are restored on exit."""
    _check_precision(precision)
    matmul = torch.get_float32_matmul_precision()
    cudnn = torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest" if precision == "float32" else "high")
    torch.backends.cudnn.allow_tf32 = precision == "tf32"
    try:
        with torch.autocast(torch.device(device).type, enabled=False):
            yield
    finally:
        torch.set_float32_matmul_precision(matmul)
        torch.backends.cudnn.allow_tf32 = cudnn


# ---------------------------------------------------------------------------
# the interface


class CurvatureOperator:
    """A symmetric linear operator on flat vectors of length ``n``.

    ``A(V)`` (or ``A @ V``) for V of shape (n,) or (n, k), converted to the
    operator's dtype and device; ``A @ B`` for another operator is their
    :class:`Composition`.  ``products`` counts vector products (a block of k
    counts k).  Subclasses implement :meth:`_matmat` for a block (n, k),
    k ≥ 1.  ``close()`` (or the end of a ``with`` block) frees what the
    operator holds.
    """

    def __init__(self, n: int, dtype: torch.dtype, device):
        self.n = n
        self.dtype = dtype
        self.device = torch.device(device)
        self.products = 0

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _context(self):
        """The context every product runs in."""
        return contextlib.nullcontext()

    def __call__(self, V: torch.Tensor) -> torch.Tensor:
        single = V.dim() == 1
        if single:
            V = V[:, None]
        if V.dim() != 2 or V.shape[0] != self.n:
            raise ValueError(f"expected a vector ({self.n},) or a block ({self.n}, k); got {tuple(V.shape)}")
        V = V.to(device=self.device, dtype=self.dtype)
        if V.shape[1] == 0:
            return V.clone()
        with self._context():
            out = self._matmat(V)
        self.products += V.shape[1]
        return out[:, 0] if single else out

    def __matmul__(self, other):
        if isinstance(other, CurvatureOperator):
            return Composition(self, other)
        return self(other)

    def at(self, precision: str) -> "CurvatureOperator":
        """This operator with its products at ``precision``; an operator
        without float32 matmuls or convolutions is its own."""
        _check_precision(precision)
        return self

    #: whether :meth:`refresh` keeps what the products reuse, so that a
    #: caller may keep the operator from one parameter update to the next
    resident: bool = False

    def refresh(self) -> bool:
        """Bring the operator to the current values of what it depends on
        (parameters updated in place); False when it cannot (make a new one).
        Nothing here depends on anything."""
        return True

    def close(self) -> None:
        """Free what the operator holds (nothing here)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Diagonal(CurvatureOperator):
    """Multiplication by diag(d), d a flat vector (n,)."""

    def __init__(self, d: torch.Tensor):
        if d.dim() != 1:
            raise ValueError(f"Diagonal: expected a flat vector (n,); got shape {tuple(d.shape)}")
        super().__init__(d.shape[0], d.dtype, d.device)
        self.d = d

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.d[:, None] * V


class Composition(CurvatureOperator):
    """The product A₁ A₂ ⋯ A_m of operators (applied right to left); closing
    it closes the factors."""

    def __init__(self, *factors: CurvatureOperator):
        flat: list[CurvatureOperator] = []
        for f in factors:
            flat.extend(f.factors if isinstance(f, Composition) else (f,))
        if not flat:
            raise ValueError("Composition: no factors")
        sizes = {f.n for f in flat}
        if len(sizes) != 1:
            raise ValueError(f"Composition: factors act on vectors of different lengths {sorted(sizes)}")
        super().__init__(flat[0].n, flat[0].dtype, flat[0].device)
        self.factors = tuple(flat)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        for f in reversed(self.factors):
            V = f(V)
        return V

    def at(self, precision: str) -> "Composition":
        return Composition(*(f.at(precision) for f in self.factors))

    def close(self) -> None:
        for f in self.factors:
            f.close()


class Shifted(CurvatureOperator):
    """A + c·I for an operator A and a scalar c (the Hessian of
    L + (c/2)‖θ‖² is H + c·I: coupled L2 weight decay); closing it closes A."""

    def __init__(self, A: CurvatureOperator, shift: float):
        super().__init__(A.n, A.dtype, A.device)
        self.A = A
        self.shift = float(shift)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.A(V) + self.shift * V

    def at(self, precision: str) -> "Shifted":
        return Shifted(self.A.at(precision), self.shift)

    def close(self) -> None:
        self.A.close()


# ---------------------------------------------------------------------------
# Hessians


class _Functional:
    """``loss_fn`` as a function of tensors standing in for ``params``
    (``torch.func.functional_call`` on a wrapper of the model)."""

    class _LossModule(nn.Module):
        def __init__(self, model: nn.Module, loss_fn: LossFn):
            super().__init__()
            self.model = model
            self._loss_fn = loss_fn

        def forward(self) -> torch.Tensor:
            return self._loss_fn()

    def __init__(self, model: nn.Module, loss_fn: LossFn, params: Sequence[torch.Tensor]):
        ids = {id(p): i for i, p in enumerate(params)}
        names: list[Optional[str]] = [None] * len(params)
        for name, p in model.named_parameters():
            if id(p) in ids:
                names[ids[id(p)]] = "model." + name
        missing = sum(nm is None for nm in names)
        if missing:
            raise ValueError(f"params: {missing} parameters are not parameters of the model")
        self.names = names
        self.wrapper = self._LossModule(model, loss_fn)

    def loss(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        from torch.func import functional_call
        return functional_call(self.wrapper, dict(zip(self.names, tensors)), ())

    def grad(self):
        """θ ↦ ∇L(θ) as a tuple (``torch.func.grad``)."""
        from torch.func import grad
        return grad(lambda *ps: self.loss(ps), argnums=tuple(range(len(self.names))))


class HessianOperator(CurvatureOperator):
    """The Hessian of ``loss_fn`` with respect to ``params`` (see the module
    docstring); subclasses are the product methods.

    ``model``: the module the parameters belong to (the forward-over-reverse
    methods and CUDA graphs need it; double backward uses it for its
    convolutions).  ``precision``: ``"float32"`` or ``"tf32"`` products;
    :meth:`at` gives the same operator at another precision.  The parameters
    must not change while the operator lives.
    """

    #: the ``sharpness.hvp`` name of the method
    method: ClassVar[str]
    #: whether the method can replay its products as CUDA graphs
    CUDA_GRAPHS: ClassVar[bool] = False

    def __init__(self, loss_fn: LossFn, params: Sequence[torch.Tensor], *, model: Optional[nn.Module] = None,
                 precision: str = "float32"):
        params = list(params)
        if not params:
            raise ValueError("params: no parameters to differentiate")
        super().__init__(num_elements(params), params[0].dtype, params[0].device)
        self.loss_fn = loss_fn
        self.params = params
        self.model = model
        self.precision = _check_precision(precision)

    def _context(self):
        return arithmetic(self.precision, self.device)

    def at(self, precision: str) -> "HessianOperator":
        """This operator with its products at ``precision``: a view that
        shares the gradient graph and the CUDA graphs (closing either closes
        both) and counts its own products."""
        if _check_precision(precision) == self.precision:
            return self
        view = copy.copy(self)
        view.precision = precision
        view.products = 0
        return view

    def prepare(self) -> None:
        """Build what the products reuse (products do it on first use)."""

    def gradient(self) -> list[torch.Tensor]:
        """∇L at the operator's point (detached, float32 arithmetic)."""
        with arithmetic("float32", self.device):
            return [g.detach() for g in gradient(self.loss_fn, self.params)]

    def loss(self) -> torch.Tensor:
        """The (detached) loss value at which the operator is taken."""
        with torch.no_grad(), arithmetic("float32", self.device):
            return self.loss_fn().detach()


class _GradientGraph:
    """∇L(θ) with its autograd graph (``create_graph``), built once and shared
    by an operator and its precision views; the second backward passes."""

    def __init__(self, loss_fn: LossFn, params: list[torch.Tensor], *, fast_conv_model: Optional[nn.Module] = None,
                 functional: Optional[_Functional] = None, own_stream: bool = False, resident: bool = False):
        self.loss_fn = loss_fn
        self.params = params
        self.device = params[0].device
        self.fast_conv_model = fast_conv_model
        self.functional = functional   # fresh leaves through functional_call (CUDA graphs)
        self.own_stream = own_stream
        self.stream: Optional[torch.cuda.Stream] = None   # where the graph is built and the captures run
        self.grads: Optional[list[torch.Tensor]] = None
        self.loss: Optional[torch.Tensor] = None
        self.live: list[int] = []
        self.wrt: list[torch.Tensor] = params   # the leaves the graph is differentiated with respect to
        # resident (CUDA graphs): the build itself is recorded as a CUDA graph at the first refresh
        # and replayed at the next ones; the parameters' storage it reads (data_ptr) then
        self.resident = resident and own_stream
        self.build_graph: Optional["torch.cuda.CUDAGraph"] = None
        self.storage: list[int] = []

    def build(self, record: Optional["torch.cuda.CUDAGraph"] = None) -> None:
        """The loss, its gradient and the gradient's graph at the parameters'
        current values; ``record``: capture the build into this CUDA graph
        instead (nothing runs until it is replayed)."""
        if self.grads is not None:
            return
        convs = (fast_double_backward(self.fast_conv_model) if self.fast_conv_model is not None
                 else contextlib.nullcontext())
        stream = capture = contextlib.nullcontext()
        if self.own_stream:
            # the second backward runs each op on the stream of the op it
            # differentiates, so the graph is built on the capture stream
            if self.stream is None:
                self.stream = torch.cuda.Stream(self.device)
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            stream = torch.cuda.stream(self.stream)
            if record is not None:
                capture = torch.cuda.graph(record, stream=self.stream)
        with arithmetic("float32", self.device), convs, stream, capture:
            if self.functional is not None:
                # fresh leaves sharing the parameters' storage (see the module docstring); a
                # recorded graph outlives optimizer steps, whose in-place updates would bump a
                # version counter shared through detach(): .data shares the storage alone
                self.wrt = [(p.data if record is not None else p.detach()).requires_grad_(True) for p in self.params]
                loss = self.functional.loss(self.wrt)
            else:
                loss = self.loss_fn()
            if loss.dim() != 0:
                raise ValueError(f"loss_fn must return a scalar; got shape {tuple(loss.shape)}")
            grads = torch.autograd.grad(loss, self.wrt, create_graph=True, allow_unused=True)
        self.loss = loss.detach()
        self.grads = _zeros_for_none(grads, self.params)
        # Gradient entries that do not depend on the parameters (linear in θ, or
        # unused) have no graph: their rows of H are zero.
        self.live = [i for i, g in enumerate(self.grads) if g.requires_grad]
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)

    def refresh(self) -> bool:
        """Bring the graph to the parameters' current values.  Not resident:
        it is dropped and rebuilt at the next use.  Resident: the first
        refresh records the build as a CUDA graph (and replays it), later ones
        replay it, in place — the saved tensors, the gradient and the loss
        keep their addresses, so CUDA graphs of products recorded on this
        graph stay valid.  False when a parameter's storage moved since the
        recording (the caller builds a new operator)."""
        storage = [p.data_ptr() for p in self.params]
        if self.build_graph is None:
            self.close()
            if not self.resident:
                return True
            graph = torch.cuda.CUDAGraph()
            try:
                self.build(record=graph)
            except RuntimeError as e:
                self.close()
                raise RuntimeError(f"Hessian-vector product: recording the gradient graph as a CUDA graph failed "
                                   f"({e}). Keep it per probe (sharpness.resident: false) or turn CUDA graphs off "
                                   "(sharpness.cuda_graphs: false), and report the model and loss.") from e
            self.build_graph, self.storage = graph, storage
        elif storage != self.storage:
            return False
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            self.build_graph.replay()
        current.wait_stream(self.stream)
        return True

    def column(self, v: torch.Tensor) -> torch.Tensor:
        """Hv for one flat vector v (n,) by a second backward pass."""
        live = self.live
        parts = unflatten(v, self.params)
        hv = torch.autograd.grad([self.grads[i] for i in live], [self.wrt[i] for i in live], [parts[i] for i in live],
                                 retain_graph=True, allow_unused=True)
        full = [torch.zeros_like(p) for p in self.params]
        for i, h in zip(live, hv):
            if h is not None:
                full[i] = h
        return flatten(full)

    def block(self, V: torch.Tensor) -> torch.Tensor:
        """HV for a block V (n, k) by one vmapped second backward pass
        (PyTorch's errors pass through)."""
        live, k = self.live, V.shape[1]
        parts = unflatten(V, self.params)
        hv = torch.autograd.grad([self.grads[i] for i in live], [self.wrt[i] for i in live], [parts[i] for i in live],
                                 retain_graph=True, allow_unused=True, is_grads_batched=True)
        full = [torch.zeros((k, *p.shape), device=p.device, dtype=p.dtype) for p in self.params]
        for i, h in zip(live, hv):
            if h is not None:
                full[i] = h
        return _flat_block(full)

    def close(self) -> None:
        self.grads = None
        self.loss = None
        self.live = []
        self.build_graph = None
        self.storage = []


class _DoubleBackward(HessianOperator):
    """What the double-backward methods share: the gradient graph."""

    _graph: _GradientGraph

    def prepare(self) -> None:
        self._graph.build()

    def gradient(self) -> list[torch.Tensor]:
        """∇L at the operator's point (detached), from the graph the products use."""
        self._graph.build()
        return [g.detach() for g in self._graph.grads]

    def loss(self) -> torch.Tensor:
        self._graph.build()
        return self._graph.loss

    def close(self) -> None:
        """Free the gradient graph."""
        self._graph.close()


class DoubleBackwardHessian(_DoubleBackward):
    """``double_backward``: one second backward pass per vector through a
    gradient graph built once.

    ``fast_conv`` (with ``model``): the model's convolutions differentiate
    twice on the ordinary kernels (:mod:`trainers.curvature.conv_double_backward`).
    ``cuda_graphs`` (CUDA and ``model`` only; ignored otherwise): replay each
    product's second backward pass as a CUDA graph, one per precision;
    ``graphed`` says whether products are being replayed.  ``resident``
    (with CUDA graphs): :meth:`refresh` keeps the operator across parameter
    updates, replaying the recorded gradient graph (module docstring).
    """

    method = "double_backward"
    CUDA_GRAPHS = True

    def __init__(self, loss_fn: LossFn, params: Sequence[torch.Tensor], *, model: Optional[nn.Module] = None,
                 precision: str = "float32", fast_conv: bool = True, cuda_graphs: bool = False,
                 resident: bool = False):
        super().__init__(loss_fn, params, model=model, precision=precision)
        self._cuda_graphs = cuda_graphs and self.device.type == "cuda" and model is not None
        functional = _Functional(model, loss_fn, self.params) if self._cuda_graphs else None
        self._graph = _GradientGraph(loss_fn, self.params, fast_conv_model=model if fast_conv else None,
                                     functional=functional, own_stream=self._cuda_graphs,
                                     resident=resident and self._cuda_graphs)
        self._captured: dict = {}   # precision -> (CUDA graph, input buffer, output buffer)
        self._eager: dict = {}      # precision -> products computed without a CUDA graph

    @property
    def graphed(self) -> bool:
        return self._cuda_graphs

    @property
    def resident(self) -> bool:
        """Whether :meth:`refresh` keeps the gradient graph and the products'
        CUDA graphs (CUDA graphs on and ``resident``)."""
        return self._graph.resident

    def refresh(self) -> bool:
        """The operator at the parameters' current values (they were updated
        in place since its products).  Resident: the first refresh drops the
        products' CUDA graphs, which read the eagerly built gradient graph,
        and records the build; from then on a refresh is one replay of the
        recorded build and the products' CUDA graphs are kept (recorded at a
        precision's first product after one eager one chose its kernels).
        Otherwise the gradient graph (and any CUDA graphs) are dropped and
        rebuilt at the next product.  False when the parameters' storage
        moved: the caller makes a new operator."""
        if self._graph.build_graph is None:
            self._drop_captures()
            self._eager.clear()
        elif [p.data_ptr() for p in self.params] != self._graph.storage:
            return False
        return self._graph.refresh()

    def _drop_captures(self) -> None:
        if self._captured and self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()   # no replay still reads the buffers
        self._captured.clear()

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        self._graph.build()
        if not self._graph.live:
            return torch.zeros_like(V)
        if self._cuda_graphs:
            return self._replayed(V)
        out = torch.empty_like(V)
        for j in range(V.shape[1]):
            out[:, j] = self._graph.column(V[:, j])
        return out

    def _capture(self, v: torch.Tensor):
        """Record a second backward pass as a CUDA graph (after eager products
        on the graph's stream have chosen the kernels); returns the graph and
        its input and output buffers."""
        stream, current = self._graph.stream, torch.cuda.current_stream(self.device)
        v_in = v.clone()
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                v_out = self._graph.column(v_in)
        current.wait_stream(stream)
        return graph, v_in, v_out

    def _replayed(self, V: torch.Tensor) -> torch.Tensor:
        """Products of the columns of V: eager for the first
        :data:`EAGER_BEFORE_CAPTURE` of this precision, then replayed."""
        key = self.precision
        # a recorded gradient graph lives on: one eager product (its kernels) is enough before a capture
        before = 1 if self._graph.build_graph is not None else EAGER_BEFORE_CAPTURE
        out = torch.empty_like(V)
        for j in range(V.shape[1]):
            entry = self._captured.get(key)
            if entry is None and self._eager.get(key, 0) >= before:
                try:
                    entry = self._captured[key] = self._capture(V[:, j])
                except RuntimeError as e:
                    # a failed capture leaves CUDA state (the RNG's capture
                    # bookkeeping) unusable: no quiet fallback, a clear error
                    raise RuntimeError(f"Hessian-vector product: CUDA graph capture failed ({e}). Turn CUDA graphs "
                                       "off (sharpness.cuda_graphs: false) and report the model and loss.") from e
            if entry is None:
                out[:, j] = self._graph.column(V[:, j])
                self._eager[key] = self._eager.get(key, 0) + 1
            else:
                graph, v_in, v_out = entry
                v_in.copy_(V[:, j])
                graph.replay()
                out[:, j] = v_out
        return out

    @property
    def replayed(self) -> tuple[str, ...]:
        """The precisions whose products are replayed from a CUDA graph."""
        return tuple(sorted(self._captured))

    def close(self) -> None:
        """Free the gradient graph and the CUDA graphs that replay products."""
        self._drop_captures()
        self._eager.clear()
        super().close()


class BatchedDoubleBackwardHessian(_DoubleBackward):
    """``double_backward_batched``: one vmapped second backward pass per
    block (``is_grads_batched``) through a gradient graph built once, with
    PyTorch's own convolution double backward.  Where PyTorch's batching
    rules for a double-backward formula fail, products raise a
    :class:`~trainers.config.ConfigError` naming ``sharpness.hvp: double_backward``."""

    method = "double_backward_batched"

    def __init__(self, loss_fn: LossFn, params: Sequence[torch.Tensor], *, model: Optional[nn.Module] = None,
                 precision: str = "float32"):
        super().__init__(loss_fn, params, model=model, precision=precision)
        self._graph = _GradientGraph(loss_fn, self.params)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        self._graph.build()
        if not self._graph.live:
            return torch.zeros_like(V)
        try:
            return self._graph.block(V)
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError as e:
            raise ConfigError(f"sharpness.hvp: double_backward_batched is not supported for this model here: "
                              f"PyTorch's vmapped double backward failed ({str(e).splitlines()[0]}); use "
                              "sharpness.hvp: double_backward (the same products, one vector at a time)") from e


class _ForwardOverReverse(HessianOperator):
    """What the forward-over-reverse methods share: the functional loss."""

    def __init__(self, loss_fn: LossFn, params: Sequence[torch.Tensor], *, model: Optional[nn.Module] = None,
                 precision: str = "float32"):
        super().__init__(loss_fn, params, model=model, precision=precision)
        if model is None:
            raise ValueError(f"model: the {self.method} products need the model the parameters belong to")
        self._functional = _Functional(model, loss_fn, self.params)

    def _hvp(self):
        """tangents ↦ H·tangents (tuples shaped like the parameters)."""
        from torch.func import jvp

        primals = tuple(p.detach() for p in self.params)
        grad_fn = self._functional.grad()

        def hvp(*tangents):
            return jvp(grad_fn, primals, tangents)[1]
        return hvp


class ForwardOverReverseHessian(_ForwardOverReverse):
    """``forward_over_reverse``: ``jvp(grad(L))`` per vector (needs ``model``)."""

    method = "forward_over_reverse"

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        hvp = self._hvp()
        parts = unflatten(V, self.params)
        out = torch.empty_like(V)
        for j in range(V.shape[1]):
            out[:, j] = flatten(hvp(*(t[j] for t in parts)))
        return out


class VmapForwardOverReverseHessian(_ForwardOverReverse):
    """``forward_over_reverse_vmap``: ``vmap(jvp(grad(L)))`` per block (needs ``model``)."""

    method = "forward_over_reverse_vmap"

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        from torch.func import vmap
        return _flat_block(vmap(self._hvp())(*unflatten(V, self.params)))


#: ``sharpness.hvp`` name -> product method (the names are trainers.config.HVP_METHODS)
PRODUCTS: dict[str, type[HessianOperator]] = {cls.method: cls for cls in (
    DoubleBackwardHessian, BatchedDoubleBackwardHessian, ForwardOverReverseHessian, VmapForwardOverReverseHessian)}


def hessian_operator(method: str, loss_fn: LossFn, params: Sequence[torch.Tensor], *,
                     model: Optional[nn.Module] = None, precision: str = "float32",
                     cuda_graphs: bool = False, resident: bool = False) -> HessianOperator:
    """The Hessian operator of product method ``method`` (:data:`PRODUCTS`);
    ``cuda_graphs`` and ``resident`` apply to the methods that can replay
    products and are ignored by the others."""
    cls = PRODUCTS.get(method)
    if cls is None:
        raise ValueError(f"method: must be one of {', '.join(HVP_METHODS)}; got {method!r}")
    options = {"cuda_graphs": cuda_graphs, "resident": resident} if cls.CUDA_GRAPHS else {}
    return cls(loss_fn, params, model=model, precision=precision, **options)


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
    with DoubleBackwardHessian(loss_fn, params) as H:
        hv = H(v if flat else flatten(v))
    return hv if flat else unflatten(hv, params)


def hessian_vector_products(loss_fn: LossFn, params: Sequence[torch.Tensor], V: torch.Tensor,
                            method: str = "double_backward", model: Optional[nn.Module] = None) -> torch.Tensor:
    """HV for a block V (n, k) of flat vectors by ``method`` (:data:`PRODUCTS`;
    the forward-over-reverse methods need the ``model`` the parameters belong to)."""
    with hessian_operator(method, loss_fn, list(params), model=model) as H:
        return H(V)
