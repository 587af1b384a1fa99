"""Block LOBPCG for the largest eigenvalues of a symmetric operator.

Knyazev's locally optimal block preconditioned conjugate gradient method
(Knyazev 2001), without a preconditioner, in the robust form of Duersch,
Shao, Yang & Gu (2018, "A robust and efficient implementation of LOBPCG"):

* each iteration does Rayleigh–Ritz on the basis S = [X, P, W] of the current
  Ritz vectors X (n×k), the previous search directions P and the residuals
  W = AX − XΘ of the columns that have not converged, and keeps the top k;
* S is kept orthonormal: P and W are orthogonalised against what precedes
  them by block Gram–Schmidt *twice* and orthonormalised by SVQB (Stathopoulos
  & Wu 2002), which drops directions that have become linearly dependent
  instead of dividing by their tiny norms — the failure of the naive
  Rayleigh–Ritz basis, whose Gram matrix turns singular near convergence;
* AP is updated from AX, AW by the same linear combinations (A is linear), so
  an iteration costs exactly one operator application per active column;
* the small projected problems (Gram matrices, eigen-decompositions, the
  combination coefficients) are float64, whatever the vectors' dtype, and
  never go through TF32 matrix products;
* a column has converged when its relative residual ‖Ax − θx‖ / |θ| ≤ tol
  and, with ``accuracy`` set, ≤ √(accuracy · gap / |θ|), gap being the
  distance from θ to the neighbouring Ritz values: a Ritz value's error is
  about residual² / gap, so on a cluster of nearly equal top eigenvalues a
  residual that is small next to θ can still leave θ a mixture of the
  cluster's eigenvalues (bench/RESULTS.md has an example); the solver stops
  when the ``nwanted`` top columns have converged — never on the change of
  θ, which stalls on near-degenerate spectra long before the top eigenpair
  is found.

The extra ``k − nwanted`` columns are guard vectors: they make the
convergence rate depend on the gap to λ_{k+1} instead of λ_{nwanted+1}, and
keep two nearly equal top eigenvalues apart.

A warm start passes the previous solve's vectors as ``X0``; an (n, k) block
with fewer columns (or rank-deficient columns) is completed with random ones.

:func:`lobpcg_verified` searches with a cheap, slightly inexact operator (the
same Hessian operator at TF32 precision) and checks the answer with the
exact one: one exact product per wanted column gives their exact Rayleigh
quotients and residuals, and the search continues with exact products only
if a residual is above tolerance.  The eigenvalues it reports
are exact-operator Rayleigh–Ritz values, whose error is bounded by the exact
residuals like any other (≈ residual² · λ / gap), whatever the search's noise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

Operator = Callable[[torch.Tensor], torch.Tensor]

#: rows per float64 chunk of :func:`gram` and :func:`combine`, which bounds their temporary memory: on a
#: GPU few large chunks (few kernel launches); on the CPU chunks that stay within the caches and the
#: allocator's reused memory (a chunk of millions of rows is fresh memory, page faults and all, every time)
_CHUNK_ROWS = {"cuda": 1 << 22, "cpu": 1 << 17}


def _chunk_rows(device: torch.device) -> int:
    return _CHUNK_ROWS.get(device.type, _CHUNK_ROWS["cpu"])


@dataclass
class LOBPCGResult:
    """Top-k eigenpairs of a symmetric operator, eigenvalues descending.

    ``eigenvalues``/``residuals``: float64 CPU tensors (k,), residuals relative
    (‖Ax − θx‖ / |θ|); ``vectors``: (n, k) orthonormal, in the dtype and on the
    device of the operator's vectors; ``products``: operator applications
    counted per vector; ``converged``: the ``nwanted`` top columns reached tol.
    """
    eigenvalues: torch.Tensor
    vectors: torch.Tensor
    residuals: torch.Tensor
    iterations: int
    products: int
    converged: bool
    fast_products: int = 0   # of ``products``, those of the cheap search operator (lobpcg_verified)
    #: :func:`verify`: the search's eigenvalues, before its wanted ones were replaced by exact-operator values
    search_eigenvalues: Optional[torch.Tensor] = None
    explore: Optional[torch.Tensor] = None   # the next exploration direction (:func:`track`), (n, 1)


# ---------------------------------------------------------------------------
# float64 dense helpers


def gram(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """AᵀB in float64 on A's device (chunked over rows, never TF32)."""
    out = torch.zeros(A.shape[1], B.shape[1], dtype=torch.float64, device=A.device)
    rows = _chunk_rows(A.device)
    for i in range(0, A.shape[0], rows):
        out += A[i:i + rows].to(torch.float64).T @ B[i:i + rows].to(torch.float64)
    return out


def combine(A: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """A @ C with float64 arithmetic, returned in A's dtype (A: n×m, C: m×k)."""
    C = C.to(device=A.device, dtype=torch.float64)
    out = torch.empty(A.shape[0], C.shape[1], dtype=A.dtype, device=A.device)
    rows = _chunk_rows(A.device)
    for i in range(0, A.shape[0], rows):
        out[i:i + rows] = (A[i:i + rows].to(torch.float64) @ C).to(A.dtype)
    return out


def _drop_tol(dtype: torch.dtype) -> float:
    # Directions whose norm falls below this fraction after orthogonalisation
    # are numerically dependent: their normalised images would be rounding noise.
    return 100.0 * torch.finfo(dtype).eps


def svqb(U: torch.Tensor, AU: Optional[torch.Tensor] = None, drop: Optional[float] = None):
    """Orthonormalise the columns of U (and apply the same map to AU) by
    SVQB: U ← U D V Θ^{-1/2}, with D = diag(UᵀU)^{-1/2} and V Θ Vᵀ the
    eigendecomposition of D UᵀU D; directions with θ < drop·max θ are dropped.
    Applied twice (the second pass fixes the rounding of the first)."""
    drop = _drop_tol(U.dtype) if drop is None else drop
    for _ in range(2):
        if U.shape[1] == 0:
            break
        M = gram(U, U)
        d = M.diagonal().clamp_min(0).sqrt()
        ok = d > 0
        if not bool(ok.all()):
            U, M, d = U[:, ok.to(U.device)], M[ok][:, ok], d[ok]
            AU = None if AU is None else AU[:, ok.to(AU.device)]
            if U.shape[1] == 0:
                break
        Dinv = 1.0 / d
        theta, V = torch.linalg.eigh(Dinv[:, None] * M * Dinv[None, :])
        keep = theta > drop * theta.max().clamp_min(0)
        T = (Dinv[:, None] * V[:, keep]) / theta[keep].sqrt()[None, :]
        U = combine(U, T)
        AU = None if AU is None else combine(AU, T)
    return U, AU


def orthonormalize_against(Q: Optional[torch.Tensor], U: torch.Tensor, AQ=None, AU=None, drop=None):
    """Orthogonalise U against the orthonormal columns of Q (twice, block
    classical Gram–Schmidt), then orthonormalise it with :func:`svqb`.  The
    same linear map is applied to AU given AQ (no operator applications)."""
    if U.shape[1] == 0:
        return U, AU
    # unit columns first, so that "dropped" means "dependent", whatever the scale
    norms = gram(U, U).diagonal().sqrt()
    nonzero = norms > 0
    U, norms = U[:, nonzero.to(U.device)], norms[nonzero]
    AU = None if AU is None else AU[:, nonzero.to(AU.device)]
    if U.shape[1] == 0:
        return U, AU
    scale = torch.diag(1.0 / norms)
    U = combine(U, scale)
    AU = None if AU is None else combine(AU, scale)
    if Q is not None and Q.shape[1] > 0:
        for _ in range(2):
            C = gram(Q, U)
            U = U - combine(Q, C)
            if AU is not None:
                AU = AU - combine(AQ, C)
        # a unit column left with norm < drop lay in span(Q): what remains is rounding
        left = gram(U, U).diagonal().clamp_min(0).sqrt() > (_drop_tol(U.dtype) if drop is None else drop)
        U = U[:, left.to(U.device)]
        AU = None if AU is None else AU[:, left.to(AU.device)]
    return svqb(U, AU, drop)


def _top_ritz(G: torch.Tensor, M: torch.Tensor, k: int, drop: float):
    """The k largest eigenpairs of the pencil (G, M), M ≈ I positive
    semi-definite; returns (θ descending, C) with CᵀMC = I."""
    G = 0.5 * (G + G.T)
    M = 0.5 * (M + M.T)
    mu, V = torch.linalg.eigh(M)
    keep = mu > drop * mu.max()
    T = V[:, keep] / mu[keep].sqrt()[None, :]
    theta, Y = torch.linalg.eigh(T.T @ G @ T)
    order = torch.argsort(theta, descending=True)[:k]
    return theta[order], T @ Y[:, order]


def _relative_residuals(R: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """‖r‖ / |θ| per column of the residuals R = AX − Xθ, float64 on the CPU."""
    rnorm = gram(R, R).diagonal().clamp_min(0).sqrt().cpu()
    return rnorm / theta.cpu().abs().clamp_min(torch.finfo(torch.float64).tiny)


def _search_directions(C: torch.Tensor, M: torch.Tensor, k: int) -> torch.Tensor:
    """Coefficients (in the basis S = [X, P, W]) of the next search directions:
    the non-X part of the new Ritz vectors, [0; C_PW], M-orthogonalised against
    C and M-orthonormalised *in the small space* (Hetmaniuk & Lehoucq 2006,
    Duersch et al. 2018).  P = S·Cp then has unit columns orthogonal to the new
    X without any cancellation among long vectors, and AP = AS·Cp is as
    accurate as AS."""
    Cp = C.clone()
    Cp[:k] = 0
    for _ in range(2):
        Cp = Cp - C @ (C.T @ M @ Cp)
    N = Cp.T @ M @ Cp
    N = 0.5 * (N + N.T)
    mu, V = torch.linalg.eigh(N)
    keep = mu > 1e-24 * max(float(mu.max()), 1e-300)   # exact zeros only: the directions are exact in span(S)
    Cp = Cp @ (V[:, keep] / mu[keep].sqrt()[None, :])
    for _ in range(2):  # re-orthogonalise against C after the rescaling
        Cp = Cp - C @ (C.T @ M @ Cp)
    return Cp


# ---------------------------------------------------------------------------
# the solver


def stopping_tolerances(theta: torch.Tensor, nwanted: int, tol: float, accuracy: Optional[float] = None,
                        min_tol: float = 0.0) -> torch.Tensor:
    """Relative residual each of the ``nwanted`` top Ritz values must reach:
    ``tol``, lowered to √(accuracy · gap/|θ|) where the gap to the
    neighbouring Ritz values (of all k) is small, so that the Ritz value's
    error, ≈ residual² · |θ| / gap, stays within ``accuracy`` · |θ|; never
    below ``min_tol`` (the noise floor of an inexact operator)."""
    theta = theta.to(torch.float64).cpu()
    out = torch.full((nwanted,), float(tol), dtype=torch.float64)
    if accuracy is not None and theta.numel() > 1:
        for i in range(nwanted):
            gaps = [theta[j] - theta[i] for j in (i - 1, i + 1) if 0 <= j < theta.numel()]
            gap = float(min(abs(g) for g in gaps)) / max(float(abs(theta[i])), torch.finfo(torch.float64).tiny)
            out[i] = min(float(tol), (accuracy * gap) ** 0.5)
    return out.clamp_min(min_tol)


def lobpcg(operator: Operator, X0: Optional[torch.Tensor] = None, *, AX0: Optional[torch.Tensor] = None,
           n: Optional[int] = None, k: int = 2,
           nwanted: int = 1, tol: float = 1e-3, guard_tol: Optional[float] = None, max_iters: int = 100,
           accuracy: Optional[float] = None, min_tol: float = 0.0,
           generator: Optional[torch.Generator] = None,
           dtype: Optional[torch.dtype] = None, device=None,
           callback: Optional[Callable[[int, int, torch.Tensor, torch.Tensor], None]] = None) -> LOBPCGResult:
    """Top-``k`` eigenpairs (largest algebraic) of the symmetric ``operator``
    (X (n×m) ↦ AX (n×m)).

    ``X0``: start block (n×j); missing or dependent columns are filled with
    Gaussian ones from ``generator``.  ``AX0``: the operator applied to X0,
    when the caller has it already (X0 must then have k independent columns;
    the start block costs no products).  Without X0, ``n``, ``dtype``, ``device``
    say what vectors to make.  Stops when the ``nwanted`` top columns have
    relative residual ≤ ``tol`` (and, with ``accuracy``, small enough for
    their gaps: :func:`stopping_tolerances`, floored at ``min_tol``) or after
    ``max_iters`` iterations.  The guard
    columns (after the first ``nwanted``) get a residual direction, at one
    operator application each, only while their relative residual exceeds
    ``guard_tol`` (default ``tol``): a looser ``guard_tol`` saves products once
    the guards are good enough to keep the wanted columns apart.
    ``callback(iteration, products, θ, relative residuals)`` is called after
    every Rayleigh–Ritz step (θ and residuals float64 CPU).
    """
    if k < 1:
        raise ValueError(f"k: must be >= 1; got {k}")
    if not 1 <= nwanted <= k:
        raise ValueError(f"nwanted: must be in [1, k={k}]; got {nwanted}")
    if not tol > 0:
        raise ValueError(f"tol: must be > 0; got {tol}")
    if accuracy is not None and not accuracy > 0:
        raise ValueError(f"accuracy: must be > 0; got {accuracy}")
    guard_tol = tol if guard_tol is None else guard_tol
    if X0 is not None:
        if X0.dim() == 1:
            X0 = X0[:, None]
        n = X0.shape[0] if n is None else n
        dtype = X0.dtype if dtype is None else dtype
        device = X0.device if device is None else device
    if n is None or dtype is None:
        raise ValueError("lobpcg needs X0 or n and dtype")
    if k > n:
        raise ValueError(f"k: must be <= n={n}; got {k}")
    device = torch.device("cpu") if device is None else torch.device(device)
    drop = _drop_tol(dtype)

    def random_block(m: int) -> torch.Tensor:
        gen_device = generator.device if generator is not None else torch.device("cpu")
        R = torch.randn(n, m, generator=generator, dtype=dtype, device=gen_device)
        return R.to(device)

    products = 0

    def apply(V: torch.Tensor) -> torch.Tensor:
        nonlocal products
        if V.shape[1] == 0:
            return V.clone()
        AV = operator(V)
        if AV.shape != V.shape:
            raise ValueError(f"operator returned shape {tuple(AV.shape)} for input {tuple(V.shape)}")
        products += V.shape[1]
        return AV

    # --- start block: orthonormal, full rank -------------------------------
    X = torch.empty(n, 0, dtype=dtype, device=device)
    AX = None
    if X0 is not None and X0.shape[1] > 0:
        given = None if AX0 is None else AX0[:, :k].to(device=device, dtype=dtype)
        X, AX = orthonormalize_against(None, X0[:, :k].to(device=device, dtype=dtype), AU=given, drop=drop)
        if AX is not None and X.shape[1] < k:
            AX = None   # dependent columns: the block is completed and applied afresh
    for _ in range(10):
        if X.shape[1] >= k:
            break
        extra, _ = orthonormalize_against(X, random_block(k - X.shape[1]), drop=drop)
        X = torch.cat([X, extra], dim=1)
    if X.shape[1] < k:
        raise RuntimeError("could not build a full-rank start block")
    if AX is None or AX.shape[1] != k:
        AX = apply(X)
    theta, C = _top_ritz(gram(X, AX), gram(X, X), k, drop)
    X, AX = combine(X, C), combine(AX, C)
    P = AP = None

    iterations = 0
    while True:
        R = AX - combine(X, torch.diag(theta))
        theta_cpu = theta.cpu()
        rel = _relative_residuals(R, theta_cpu)
        if callback is not None:
            callback(iterations, products, theta_cpu.clone(), rel.clone())
        wanted_tol = stopping_tolerances(theta_cpu, nwanted, tol, accuracy, min_tol)
        done = bool((rel[:nwanted] <= wanted_tol).all())
        if done or iterations >= max_iters:
            break
        # basis S = [X, P, W]: X and P orthonormal by construction, W (the
        # residuals of the unconverged columns) orthonormalised against them
        Q, AQ = (X, AX) if P is None else (torch.cat([X, P], 1), torch.cat([AX, AP], 1))
        active = torch.cat([rel[:nwanted] > wanted_tol, rel[nwanted:] > guard_tol])
        W, _ = orthonormalize_against(Q, R[:, active.to(device)], drop=drop)
        AW = apply(W)
        S, AS = torch.cat([Q, W], 1), torch.cat([AQ, AW], 1)
        M = gram(S, S)
        theta, C = _top_ritz(gram(S, AS), M, k, drop)
        Cp = _search_directions(C, M, k)
        X, AX = combine(S, C), combine(AS, C)
        P, AP = (combine(S, Cp), combine(AS, Cp)) if Cp.shape[1] else (None, None)
        iterations += 1

    return LOBPCGResult(eigenvalues=theta.cpu(), vectors=X, residuals=rel, iterations=iterations,
                        products=products, converged=done)


def verify(search: LOBPCGResult, exact_operator: Operator, *, nwanted: int = 1, tol: float = 1e-3,
           accuracy: Optional[float] = None, **kwargs) -> LOBPCGResult:
    """Check a result found with an inexact operator against ``exact_operator``.

    One ``exact_operator`` product per wanted column: Rayleigh–Ritz of
    ``exact_operator`` on the wanted Ritz vectors of ``search`` gives their
    eigenvalues and exact relative residuals; if a wanted residual exceeds its
    tolerance (``tol``, ``accuracy``: :func:`stopping_tolerances`), LOBPCG goes
    on with ``exact_operator`` from the current block (its start block costs k
    exact products).  ``kwargs`` go to :func:`lobpcg`.  ``products`` counts
    both kinds, ``fast_products`` those of ``search``; the guard columns'
    eigenvalues and residuals are the search's unless LOBPCG went on.
    """
    X = search.vectors
    Xw = X[:, :nwanted]
    AXw = exact_operator(Xw)
    if AXw.shape != Xw.shape:
        raise ValueError(f"exact_operator returned shape {tuple(AXw.shape)} for input {tuple(Xw.shape)}")
    theta_w, Y = _top_ritz(gram(Xw, AXw), gram(Xw, Xw), nwanted, _drop_tol(Xw.dtype))
    Xw, AXw = combine(Xw, Y), combine(AXw, Y)
    rel_w = _relative_residuals(AXw - combine(Xw, torch.diag(theta_w)), theta_w)
    products = search.products + nwanted
    X = torch.cat([Xw, X[:, nwanted:]], dim=1)
    eigenvalues = torch.cat([theta_w.cpu(), search.eigenvalues[nwanted:]])
    residuals = torch.cat([rel_w, search.residuals[nwanted:]])
    callback = kwargs.get("callback")
    if callback is not None:
        callback(search.iterations, products, eigenvalues.clone(), residuals.clone())
    if bool((rel_w <= stopping_tolerances(eigenvalues, nwanted, tol, accuracy)).all()):
        return LOBPCGResult(eigenvalues=eigenvalues, vectors=X, residuals=residuals, iterations=search.iterations,
                            products=products, converged=True, fast_products=search.products,
                            search_eigenvalues=search.eigenvalues)
    if callback is not None:   # the exact solve's product counts continue from here
        kwargs = {**kwargs, "callback": lambda it, p, th, rel: callback(search.iterations + it, products + p, th, rel)}
    rest = lobpcg(exact_operator, X, nwanted=nwanted, tol=tol, accuracy=accuracy, **kwargs)
    return LOBPCGResult(eigenvalues=rest.eigenvalues, vectors=rest.vectors, residuals=rest.residuals,
                        iterations=search.iterations + rest.iterations, products=products + rest.products,
                        converged=rest.converged, fast_products=search.products,
                        search_eigenvalues=search.eigenvalues)


def lobpcg_verified(fast_operator: Operator, exact_operator: Operator, X0: Optional[torch.Tensor] = None, *,
                    nwanted: int = 1, tol: float = 1e-3, fast_tol: Optional[float] = None,
                    accuracy: Optional[float] = None, **kwargs) -> LOBPCGResult:
    """:func:`lobpcg` that iterates with ``fast_operator``, a cheaper and
    slightly inexact version of ``exact_operator`` (e.g. the same product with
    TF32 arithmetic), and answers with exact-operator values.

    1. LOBPCG with ``fast_operator`` to relative residual ``tol`` (and
       ``accuracy``, see :func:`lobpcg`), never below ``fast_tol`` (the fast
       operator's noise floor; default: no floor);
    2. :func:`verify`: one ``exact_operator`` product per wanted column, and
       LOBPCG with ``exact_operator`` if a wanted residual misses its tolerance.

    ``kwargs`` go to :func:`lobpcg` (k, guard_tol, max_iters, generator, n,
    dtype, device, callback).
    """
    fast_tol = 0.0 if fast_tol is None else fast_tol
    if not fast_tol >= 0:
        raise ValueError(f"fast_tol: must be >= 0; got {fast_tol}")
    search = lobpcg(fast_operator, X0, nwanted=nwanted, tol=max(tol, fast_tol), accuracy=accuracy, min_tol=fast_tol,
                    **kwargs)
    return verify(search, exact_operator, nwanted=nwanted, tol=tol, accuracy=accuracy, **kwargs)


def track(operator: Operator, X_warm: torch.Tensor, explore: Optional[torch.Tensor] = None, *, k: int = 2,
          nwanted: int = 1, tol: float = 1e-3, accuracy: Optional[float] = None, min_tol: float = 0.0,
          generator: Optional[torch.Generator] = None, callback=None, **kwargs) -> LOBPCGResult:
    """Top-``k`` eigenpairs from the previous solve's vectors, for an operator
    that changed a little since: one Rayleigh–Ritz step on the basis
    S = [X_warm, explore], then LOBPCG only if it is needed.

    ``X_warm`` (n, j): the previous solve's top Ritz vectors; ``explore``
    (n, 1): a direction from outside them.  S is orthonormalised (dependent or
    zero columns dropped, random ones added up to k); one operator application
    per column of S.  If the top ``nwanted`` Ritz pairs pass the tolerances of
    :func:`lobpcg` (``tol``, ``accuracy``, ``min_tol``) they are the answer,
    otherwise :func:`lobpcg` continues from the top ``k`` Ritz vectors (``AX0``
    given: no products for its start block).  ``kwargs`` go to :func:`lobpcg`
    (guard_tol, max_iters, dtype, device).

    The result's ``explore`` is the next probe's exploration direction: the
    operator applied to the Ritz vector after the top ``k`` (the one S held
    beyond them), made orthogonal to the answer's ``k`` vectors — one step of
    power iteration on what the answer does not span, at no extra product.
    Carried from probe to probe, it converges to the largest eigenvalue
    outside the top ``k`` and follows it, so an eigenvalue that rises past λ₁
    from there, smoothly or at once, appears in the next Rayleigh–Ritz step as
    a larger Ritz value: a warm start cannot lock onto a stale direction while
    a larger eigenvalue grows beside it.
    """
    n = X_warm.shape[0]
    dtype, device = X_warm.dtype, X_warm.device
    drop = _drop_tol(dtype)
    parts = [X_warm] + ([explore.to(device=device, dtype=dtype)] if explore is not None else [])
    S, _ = orthonormalize_against(None, torch.cat(parts, dim=1), drop=drop)
    for _ in range(10):
        if S.shape[1] >= k:
            break
        gen_device = generator.device if generator is not None else torch.device("cpu")
        R = torch.randn(n, k - S.shape[1], generator=generator, dtype=dtype, device=gen_device).to(device)
        extra, _ = orthonormalize_against(S, R, drop=drop)
        S = torch.cat([S, extra], dim=1)
    AS = operator(S)
    if AS.shape != S.shape:
        raise ValueError(f"operator returned shape {tuple(AS.shape)} for input {tuple(S.shape)}")
    products = S.shape[1]
    theta_all, C = _top_ritz(gram(S, AS), gram(S, S), min(k + 1, S.shape[1]), drop)
    beyond = combine(AS, C[:, k:k + 1]) if C.shape[1] > k else None   # A · (Ritz vector k+1)
    theta, C = theta_all[:k], C[:, :k]
    X, AX = combine(S, C), combine(AS, C)
    rel = _relative_residuals(AX - combine(X, torch.diag(theta)), theta)
    theta_cpu = theta.cpu()
    if callback is not None:
        callback(0, products, theta_cpu.clone(), rel.clone())
    if bool((rel[:nwanted] <= stopping_tolerances(theta_cpu, nwanted, tol, accuracy, min_tol)).all()):
        res = LOBPCGResult(eigenvalues=theta_cpu, vectors=X, residuals=rel, iterations=0, products=products,
                           converged=True)
    else:
        if callback is not None:
            kwargs["callback"] = lambda it, p, th, r: callback(it, products + p, th, r)
        rest = lobpcg(operator, X, AX0=AX, k=k, nwanted=nwanted, tol=tol, accuracy=accuracy, min_tol=min_tol,
                      generator=generator, **kwargs)
        res = LOBPCGResult(eigenvalues=rest.eigenvalues, vectors=rest.vectors, residuals=rest.residuals,
                           iterations=rest.iterations, products=products + rest.products, converged=rest.converged)
    if beyond is not None:
        nxt, _ = orthonormalize_against(res.vectors, beyond, drop=drop)
        res.explore = nxt if nxt.shape[1] else None
    return res
