"""The per-step curvature probe: λ₁ of the (preconditioned) Hessian.

At a probed step, before the optimizer's update, :class:`SharpnessProbe`
measures on the frozen Hessian batch

* λ₁(H), the top eigenvalue of the loss Hessian (``lambda_max``);
* for Adam/AdamW, λ₁(P⁻¹H) with P the diagonal preconditioner of Adam's
  update (``lambda_precond``; :func:`trainers.curvature.thresholds.adam_preconditioner`,
  ``sharpness.adam_preconditioner``: ``update``, the default, is the P of
  the update being taken, P = (1 − β₁ᵗ⁺¹)(√v̂ₜ₊₁ + ε) with this step's
  gradient in v̂ₜ₊₁, which needs the step's gradients ``grads``;
  ``init2winit`` is √v̂ₜ + ε of the state before the step).  P⁻¹H is similar
  to the symmetric P^{-1/2} H P^{-1/2} (``Diagonal(d) @ H @ Diagonal(d)``,
  d = P^{-1/2}), whose eigenvalues are computed instead;
* the ratio λ/threshold to the optimizer's stability threshold at the step's
  learning rate (λ₁(P⁻¹H) for the Adam family, λ₁(H) otherwise); a ratio
  above 1 means the quadratic model of the loss is unstable under the update
  (the ``threshold`` column itself is written by the run, for every step);
* how the estimate was obtained (relative residual, iterations, Hessian-vector
  products, converged) and the top-k eigenvalues of the same operator;
* how many eigenvalues of the same operator lie above ``sharpness.above_fraction``
  × threshold, and their values (``n_above``, ``n_above_capped``,
  ``above_values``; :meth:`SharpnessProbe._solve`);
* optionally a Hutchinson estimate of tr(H); the step sharpness gᵀH_Bg/‖g‖²
  of the step's own training batch B (``step_sharpness``); and the batch
  sharpness of the "Edge of Stochastic Stability" paper (Andreyev &
  Beneventano 2024), the mean of gᵀH_Bg/‖g‖² over fresh mini-batches B
  (g and H_B of the same B), estimated by Monte Carlo until its relative
  standard error reaches ``sharpness.batch_sharpness_rse`` or
  ``batch_sharpness_max_batches`` batches were drawn
  (:func:`monte_carlo_batch_sharpness`; ``batch_sharpness``,
  ``batch_sharpness_n``);
* optionally (``sharpness.critical``) the critical sharpness 2/η_c of Kalra
  et al. 2026 on the Hessian batch, along the update the optimizer is about
  to take (:mod:`trainers.curvature.critical`; ``lambda_critical``,
  ``critical_passes``), and its quadratic model, the directional sharpness
  ΔθᵀHΔθ/Δθᵀg of the same Δθ and loss (``lambda_dir``, one product).

Each eigenproblem is solved by block LOBPCG (:mod:`trainers.curvature.lobpcg`),
warm-started from the previous probe's vectors.  The Hessian operator
(:mod:`trainers.curvature.hessian`; method ``sharpness.hvp``) computes float32
products and reuses one gradient graph per probe; on a GPU its products are
replayed as CUDA graphs (``sharpness.cuda_graphs``), and the operator is kept
from one probe to the next while the loss closure stays the same
(``sharpness.resident``): the gradient graph and the products are then
replays of CUDA graphs recorded once (:meth:`SharpnessProbe._operator`).  On GPUs with TF32
(``sharpness.search_precision: tf32``, the default) LOBPCG searches with the
same operator at TF32 precision and the answer is checked with float32
products (:func:`trainers.curvature.lobpcg.verify`) at every cold solve and
every ``sharpness.verify_every``-th warm one: there the reported λ and
residual are float32 values, and the ratio λ_float32/λ_TF32 is kept as the
TF32 products' offset; the warm solves between checks report the TF32 λ times
that ratio, with the TF32 residual (:meth:`SharpnessProbe._calibrated`).

The probe leaves training undisturbed: parameters and their ``.grad`` are not
touched, the global RNG and the global TF32 settings are left as they were
(its own generator is part of :meth:`SharpnessProbe.state_dict`); the
training mini-batch closures it is given may draw dropout masks from the
global generators, which their caller saves and restores
(:meth:`trainers.run.probing.Probing.measure`).

**Weight decay.**  With coupled L2 weight decay (``optim.weight_decay`` > 0
on ``gd``, ``momentum`` or ``adam``: PyTorch adds wd·θ to the gradient) the
update descends L + (wd/2)‖θ‖², whose Hessian is H + wd·I, and that is the
curvature every column measures (λ₁(H + wd·I), λ₁(P⁻¹(H + wd·I)), the
trace, the batch and step sharpness with g + wd·θ), so that the comparison
with the threshold stays that of the update.  AdamW's decoupled decay is
not part of the gradient and not of the probed curvature.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn as nn

from trainers.config import OptimConfig, SharpnessConfig
from trainers.curvature.critical import critical_learning_rate, directional_sharpness, update_direction
from trainers.curvature.hessian import (CurvatureOperator, Diagonal, DoubleBackwardHessian, Shifted, flatten, gradient,
                                        hessian_operator, trainable_parameters)
from trainers.curvature.lobpcg import LOBPCGResult, lobpcg, lobpcg_verified, track, verify
from trainers.curvature.thresholds import (adam_preconditioner, coupled_weight_decay, is_preconditioned,
                                           stability_threshold)

LossFn = Callable[[], torch.Tensor]
#: one mini-batch as micro-batches: (loss closure, weight) pairs whose
#: weighted sum is the mini-batch loss (weights: micro-batch size / batch size)
MicroBatches = Sequence[tuple[LossFn, float]]

#: columns of the step log that :meth:`SharpnessProbe.measure` fills
COLUMNS = ("lambda_max", "lambda_precond", "ratio", "eig_residual", "eig_iters", "eig_hvps",
           "eig_converged", "eig_check", "topk", "n_above", "n_above_capped", "above_values", "hessian_trace",
           "step_sharpness", "batch_sharpness", "batch_sharpness_n", "lambda_critical", "critical_passes",
           "lambda_dir")


def has_tf32(device) -> bool:
    """Whether float32 convolutions and matmuls on ``device`` can run as TF32
    (NVIDIA compute capability 8.0 and later)."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


#: relative residual the TF32 search stops at, at least: the noise floor of
#: TF32 products relative to float32 ones (bench/RESULTS.md)
TF32_SEARCH_TOL = 2e-3


#: guard columns at least, below the wanted ones, while counting eigenvalues
#: above the cut grows the block past ``topk``: one guard tracks one eigenvalue
#: by continuity and can lose one that rises from below across it; with two the
#: count followed every crossing of tests/test_above_threshold.py
COUNTING_GUARDS = 2


def top_eigenpairs(operator: CurvatureOperator, X0: Optional[torch.Tensor] = None, *, search_tf32: bool = False,
                   **kwargs) -> LOBPCGResult:
    """:func:`trainers.curvature.lobpcg.lobpcg` of ``operator``; with
    ``search_tf32`` the search runs on ``operator.at("tf32")`` and the answer
    is checked with ``operator.at("float32")``
    (:func:`trainers.curvature.lobpcg.lobpcg_verified`)."""
    if search_tf32:
        return lobpcg_verified(operator.at("tf32"), operator.at("float32"), X0, fast_tol=TF32_SEARCH_TOL, **kwargs)
    return lobpcg(operator, X0, **kwargs)


class SharpnessProbe:
    """Measures the curvature columns of the step log (see :data:`COLUMNS`).

    ``measure(model, loss_fn, optimizer, lr, batch_loss_fn, grads=,
    sample_batch=)``: ``loss_fn`` is a zero-argument closure returning the
    scalar frozen-batch loss at the model's current parameters (the caller
    puts the model in eval mode with double-differentiable attention);
    ``batch_loss_fn`` and ``sample_batch`` give training mini-batches for the
    step and batch sharpness (the caller builds them in the training step's
    mode); ``grads``: the step's gradients, for Adam's ``update``
    preconditioner.

    ``method``: Hessian-vector product method
    (:data:`trainers.curvature.hessian.PRODUCTS`; default ``cfg.hvp``); ``seed``: the probe's own generator
    (random start vectors, Hutchinson probes).  :meth:`hessian` builds the
    operator a measurement solves with.
    """

    def __init__(self, cfg: SharpnessConfig, optim_cfg: OptimConfig, *, method: Optional[str] = None,
                 seed: int = 0):
        self.cfg = cfg
        self.optim_cfg = optim_cfg
        self.method = cfg.hvp if method is None else method
        self.preconditioned = is_preconditioned(optim_cfg) and cfg.precondition == "auto"
        self.generator = torch.Generator().manual_seed(seed)
        self.warm: dict[str, torch.Tensor] = {}   # "plain" / "precond" -> (n, k) eigenvector blocks
        self.explore: dict[str, torch.Tensor] = {}   # "plain" / "precond" -> (n, 1) exploration direction
        self.warm_scale: Optional[torch.Tensor] = None   # P^{-1/2} (n, 1) at the last λ₁(P⁻¹H) solve
        self.counted: dict[str, int] = {}   # "plain" / "precond" -> eigenvalues above the cut at the last probe
        # "plain" / "precond" -> λ_float32 / λ_TF32 - 1 at the last float32 check (:meth:`_calibrated`)
        self.tf32_offset: dict[str, float] = {}
        self.probes = 0
        self.critical_guess: Optional[float] = None   # the last η_c: the next line search starts there
        self._kept = None   # ((loss_fn, model, params), resident operator) between probes (:meth:`_operator`)

    # --- state -----------------------------------------------------------
    def state_dict(self) -> dict:
        return {"warm": {k: v.detach().cpu().clone() for k, v in self.warm.items()},
                "explore": {k: v.detach().cpu().clone() for k, v in self.explore.items()},
                "warm_scale": None if self.warm_scale is None else self.warm_scale.detach().cpu().clone(),
                "generator": self.generator.get_state(), "probes": self.probes,
                "critical_guess": self.critical_guess, "counted": dict(self.counted),
                "tf32_offset": dict(self.tf32_offset)}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; tensors may come on any device (they are
        kept on the CPU: the warm-start blocks move to the operator's device at
        the next solve, the generator is a CPU generator)."""
        self.warm = {k: v.detach().to("cpu").clone() for k, v in state.get("warm", {}).items()}
        self.explore = {k: v.detach().to("cpu").clone() for k, v in state.get("explore", {}).items()}
        scale = state.get("warm_scale")
        self.warm_scale = None if scale is None else scale.detach().to("cpu").clone()
        if "generator" in state:
            self.generator.set_state(state["generator"].to("cpu", torch.uint8))
        self.probes = int(state.get("probes", 0))
        self.critical_guess = state.get("critical_guess")
        self.counted = {k: int(v) for k, v in state.get("counted", {}).items()}
        self.tf32_offset = {k: float(v) for k, v in state.get("tf32_offset", {}).items()}

    def reset_warm_start(self) -> None:
        """Forget the warm-start vectors: the next solve starts cold (the
        measured objective changed, e.g. a redrawn Hessian batch)."""
        self.warm = {}
        self.explore = {}
        self.warm_scale = None
        self.counted = {}
        self.tf32_offset = {}

    # --- one eigenproblem -----------------------------------------------
    def _solve(self, key: str, operator: CurvatureOperator, transport=None,
               seed: Optional[Callable[[], torch.Tensor]] = None,
               cut: Optional[float] = None) -> tuple[LOBPCGResult, Optional[float], Optional[list[float]]]:
        """(result, check, above): :meth:`_solve_once` with ``sharpness.topk``
        wanted columns, or with ``cut`` as many as it takes to count the
        eigenvalues above ``cut``, at most ``sharpness.above_cap``.

        Counting starts from one more wanted column than the last probe
        counted (at least ``topk``: it shrinks back when fewer are above) and,
        while every wanted Ritz value is above ``cut`` and the solve
        converged, solves again with one more, warm from this probe's vectors.
        ``above``: the eigenvalues above ``cut`` (:func:`certified_above`;
        None without ``cut``).  The result's products and iterations are those
        of all the solves; ``check`` is the last one that was checked."""
        if cut is None:
            return (*self._solve_once(key, operator, self.cfg.topk, transport, seed), None)
        cap = min(self.cfg.above_cap, operator.n)
        wanted = max(self.cfg.topk, min(self.counted.get(key, 0) + 1, cap))
        products = iterations = fast = 0
        regrow, check = False, None
        while True:
            res, c = self._solve_once(key, operator, wanted, None if regrow else transport, seed, regrow=regrow)
            check = c if c is not None else check
            products, iterations = products + res.products, iterations + res.iterations
            fast += res.fast_products
            above = certified_above(res, wanted, cut, self.cfg.tol)
            if len(above) < wanted or wanted >= cap or not res.converged:
                break
            wanted, regrow = wanted + 1, True
        self.counted[key] = len(above)
        return dataclasses.replace(res, products=products, iterations=iterations, fast_products=fast), check, above

    def _solve_once(self, key: str, operator: CurvatureOperator, nwanted: int, transport=None,
                    seed: Optional[Callable[[], torch.Tensor]] = None,
                    regrow: bool = False) -> tuple[LOBPCGResult, Optional[float]]:
        """(result, check): the top ``nwanted`` eigenpairs of ``operator``
        (block: ``nwanted`` + the ``block_size − topk`` guards, at least
        :data:`COUNTING_GUARDS` when ``nwanted`` > ``topk``), and — where a
        TF32 answer was checked with float32 products at this probe — the
        relative difference of the two λ₁ (else None).  ``seed()``: the
        exploration column of the first warm ``track`` solve (later ones carry
        their own, :func:`trainers.curvature.lobpcg.track`).  ``regrow``: a
        second solve at this probe with a larger block, warm from the first
        one's vectors (already in this operator's coordinates) with one random
        column added to the exploration."""
        n, dtype, device = operator.n, operator.dtype, operator.device
        X0 = self.warm.get(key) if self.cfg.warm_start or regrow else None
        E = self.explore.get(key) if X0 is not None else None
        if X0 is not None:
            if X0.shape[0] != n:
                raise ValueError(f"sharpness probe state: warm-start vectors for {key!r} have {X0.shape[0]} "
                                 f"entries but the model has {n} trainable parameters")
            X0 = X0.to(device=device, dtype=dtype)
            E = None if E is None else E.to(device=device, dtype=dtype)
            if transport is not None:
                X0 = transport * X0
                E = None if E is None else transport * E
        tf32 = self.cfg.search_precision == "tf32" and has_tf32(device)
        guards = self.cfg.block_size - self.cfg.topk
        if nwanted > self.cfg.topk:   # counting: keep an eigenvalue rising from below in the block through crossings
            guards = max(guards, COUNTING_GUARDS)
        k = min(n, nwanted + guards)
        # Cold: every column is refined to tol (exploration protects against
        # missing λ₁).  Warm: guards only to √tol, enough for their Ritz values
        # (error ~ residual²) to take over when an eigenvalue overtakes λ₁.
        guard_tol = self.cfg.tol if X0 is None else math.sqrt(self.cfg.tol)
        kw = dict(k=k, nwanted=nwanted, accuracy=self.cfg.accuracy or None, max_iters=self.cfg.max_iters,
                  generator=self.generator, guard_tol=guard_tol, dtype=dtype, device=device)
        if X0 is None or self.cfg.solver == "lobpcg":
            res = top_eigenpairs(operator, X0, search_tf32=tf32, n=n, tol=self.cfg.tol, **kw)
        else:
            if regrow and self.cfg.explore != "none":
                z = torch.randn(n, 1, generator=self.generator, dtype=dtype).to(device)
                E = z if E is None else torch.cat([E, z], dim=1)
            elif E is None and seed is not None and self.cfg.explore != "none":
                E = seed()
            fast = operator.at("tf32") if tf32 else operator
            floor = TF32_SEARCH_TOL if tf32 else 0.0
            res = track(fast, X0[:, :k], E, tol=max(self.cfg.tol, floor), min_tol=floor, **kw)
            nxt = res.explore
            if tf32 and self.cfg.verify_every > 0 and self.probes % self.cfg.verify_every == 0:
                for name in ("nwanted", "accuracy"):
                    kw.pop(name)
                res = verify(res, operator.at("float32"), nwanted=nwanted, tol=self.cfg.tol,
                             accuracy=self.cfg.accuracy or None, **kw)
            if nxt is not None and self.cfg.explore != "none":
                self.explore[key] = nxt.detach()
            elif regrow:   # the old direction is inside the grown block now: the next probe seeds afresh
                self.explore.pop(key, None)
        self.warm[key] = res.vectors.detach()
        return self._calibrated(key, res, nwanted) if tf32 else (res, None)

    def _calibrated(self, key: str, res: LOBPCGResult, nwanted: int) -> tuple[LOBPCGResult, Optional[float]]:
        """(result, check) of a TF32 search.  Checked with float32 products
        at this probe (``search_eigenvalues`` set): ``check`` is
        |λ_TF32 − λ_float32| / λ_float32 of λ₁, and where the check took no
        float32 iteration (the same vectors, their float32 Rayleigh quotients)
        the ratio λ_float32 / λ_TF32 − 1 is kept as the TF32 products' offset
        for this operator.  Not checked: the eigenvalues are the TF32 ones
        times (1 + the last offset), check None."""
        if res.search_eigenvalues is not None:
            fast, exact = float(res.search_eigenvalues[0]), float(res.eigenvalues[0])
            if res.products - res.fast_products == nwanted and fast != 0:
                self.tf32_offset[key] = exact / fast - 1.0
            return res, abs(fast - exact) / max(abs(exact), 1e-300)
        offset = self.tf32_offset.get(key)
        if offset is None:
            return res, None
        return dataclasses.replace(res, eigenvalues=res.eigenvalues * (1.0 + offset)), None

    def _transport(self, d: torch.Tensor, n: int, device) -> Optional[torch.Tensor]:
        """Rescaling of the last λ₁(P⁻¹H) vectors to the current D = P^{-1/2}
        (:func:`warm_start_transport`), or None without a previous solve."""
        old = self.warm_scale
        if old is None or old.shape[0] != n:
            return None
        return warm_start_transport(d, old.to(device=device, dtype=d.dtype))

    def _seed(self, H: CurvatureOperator) -> torch.Tensor:
        """The first exploration column of a warm ``track`` solve, in H's
        coordinates (``sharpness.explore``): the gradient of the Hessian-batch
        loss (free: the products' gradient graph holds it) or a random vector."""
        if self.cfg.explore == "gradient" and hasattr(H, "gradient"):
            return flatten(H.gradient()).to(H.dtype)[:, None]
        z = torch.randn(H.n, 1, generator=self.generator, dtype=H.dtype)
        return z.to(H.device)

    def _rademacher(self, n: int, m: int, dtype, device) -> torch.Tensor:
        z = torch.randint(0, 2, (n, m), generator=self.generator, dtype=torch.int8)
        return (2 * z - 1).to(device=device, dtype=dtype)

    # --- the measurement ---------------------------------------------------
    def hessian(self, loss_fn: LossFn, params: list[torch.Tensor], model: nn.Module) -> CurvatureOperator:
        """The Hessian operator a measurement solves with: method ``method``,
        float32 products, CUDA graphs as ``sharpness.cuda_graphs`` says (a
        subclass may wrap it, e.g. to time its products)."""
        return hessian_operator(self.method, loss_fn, params, model=model, cuda_graphs=self.cfg.cuda_graphs,
                                resident=self.cfg.resident)

    @contextlib.contextmanager
    def _operator(self, loss_fn: LossFn, params: list[torch.Tensor], model: nn.Module):
        """The Hessian operator of this measurement: the one kept from the
        last probe, refreshed at the current parameters, when it is resident
        and the measurement is of the same loss — the same closure (``==``),
        model and parameters —, else a new one (:meth:`hessian`).  A resident
        operator is kept after a measurement that did not raise; any other is
        closed."""
        kept, self._kept = self._kept, None
        key = (loss_fn, model, params)
        H0 = None
        if kept is not None:
            (old_fn, old_model, old_params), H = kept
            same = (old_fn == loss_fn and old_model is model and len(old_params) == len(params)
                    and all(a is b for a, b in zip(old_params, params)))
            if same and H.refresh():
                H0 = H
            else:
                H.close()
        if H0 is None:
            H0 = self.hessian(loss_fn, params, model)
        ok = False
        try:
            yield H0
            ok = True
        finally:
            if ok and H0.resident:
                self._kept = (key, H0)
            else:
                H0.close()

    def close(self) -> None:
        """Free the Hessian operator kept between probes (``sharpness.resident``), if any."""
        kept, self._kept = self._kept, None
        if kept is not None:
            kept[1].close()

    def _critical(self, loss_fn: LossFn, params, lr: float, direction, wd: float, lambda_dir: float) -> dict:
        """``lambda_critical`` (2/η_c, null without a bracket) and
        ``critical_passes`` along the coming update's Δθ
        (:func:`trainers.curvature.critical.update_direction`), on the loss
        the update descends (+ (wd/2)‖θ‖² with coupled decay), starting from
        the last probe's η_c (the first: the quadratic model's 2/λ_dir where
        λ_dir > 0, else ``lr``)."""
        objective = loss_fn if not wd else (
            lambda: loss_fn() + 0.5 * wd * sum(p.detach().float().square().sum() for p in params))
        guess = self.critical_guess or (2.0 / lambda_dir if math.isfinite(lambda_dir) and lambda_dir > 0 else lr)
        res = critical_learning_rate(objective, params, direction, guess,
                                     tol=self.cfg.critical_tol, max_passes=self.cfg.critical_max_passes)
        if res.lr is not None:
            self.critical_guess = res.lr
        return {"lambda_critical": res.sharpness, "critical_passes": res.passes}

    def measure(self, model: nn.Module, loss_fn: LossFn, optimizer: torch.optim.Optimizer, lr: float,
                batch_loss_fn: Optional[Union[LossFn, MicroBatches]] = None, *, grads=None,
                sample_batch: Optional[Callable[[int], MicroBatches]] = None) -> dict:
        """The probe's columns at the model's current parameters.

        ``grads``: the gradients the optimizer's coming update reads (its
        ``.grad``, after clipping), for the ``update`` Adam preconditioner
        (without them ``lambda_precond`` is not measured under that
        convention).  ``batch_loss_fn``: the step's training batch (a loss
        closure or :data:`MicroBatches`) for ``step_sharpness``;
        ``sample_batch(i)``: the i-th fresh mini-batch for the Monte-Carlo
        batch sharpness.  Both only with ``sharpness.batch_sharpness``."""
        params = trainable_parameters(model)
        threshold = stability_threshold(self.optim_cfg, lr)
        counting = self.cfg.above_fraction > 0 and self.cfg.above_cap > 0
        cut = self.cfg.above_fraction * threshold if counting else None
        wd = coupled_weight_decay(self.optim_cfg)
        cols: dict = {c: None for c in COLUMNS}
        direction = None
        with self._operator(loss_fn, params, model) as H0:
            H = Shifted(H0, wd) if wd else H0   # the update's curvature (module docstring)
            main: Optional[LOBPCGResult] = None
            check: Optional[float] = None
            above: Optional[list[float]] = None
            def gradient_seed() -> torch.Tensor:   # the gradient only where a solve asks for it
                return self._seed(H0)   # the loss gradient (Shifted has none)
            if self.preconditioned:
                P = adam_preconditioner(optimizer, params, self.cfg.adam_preconditioner, grads)
                if P is not None:
                    d = flatten(P).to(H.dtype).rsqrt()[:, None]   # P^{-1/2}, (n, 1)
                    D = Diagonal(d[:, 0])
                    main, check, above = self._solve("precond", D @ H @ D,
                                                     transport=self._transport(d, H.n, H.device),
                                                     seed=lambda: d * gradient_seed(), cut=cut)
                    self.warm_scale = d   # a fresh tensor: nothing else holds it
                    cols["lambda_precond"] = float(main.eigenvalues[0])
                    cols["ratio"] = cols["lambda_precond"] / threshold
            plain_due = self.cfg.plain_lambda and self.probes % self.cfg.plain_every == 0
            if not self.preconditioned or plain_due or main is None:
                plain, plain_check, plain_above = self._solve("plain", H, seed=gradient_seed,
                                                              cut=None if self.preconditioned else cut)
                cols["lambda_max"] = float(plain.eigenvalues[0])
                if not self.preconditioned:
                    cols["ratio"] = cols["lambda_max"] / threshold
                if main is None:
                    main, check, above = plain, plain_check, plain_above
            cols.update(eig_residual=float(main.residuals[0]), eig_iters=int(main.iterations),
                        eig_hvps=int(main.products), eig_converged=bool(main.converged), eig_check=check,
                        topk=[float(v) for v in main.eigenvalues[:self.cfg.topk]])
            if above is not None:
                cols.update(n_above=len(above), n_above_capped=len(above) >= self.cfg.above_cap, above_values=above)
            if self.cfg.trace_samples > 0:
                Z = self._rademacher(H.n, self.cfg.trace_samples, H.dtype, H.device)
                cols["hessian_trace"] = float((Z * H(Z)).sum(dtype=torch.float64)) / self.cfg.trace_samples
            direction = (update_direction(optimizer, params, grads)
                         if self.cfg.critical and grads is not None else None)
            if direction is not None:
                cols["lambda_dir"] = directional_sharpness(H, H0.gradient(), direction, params, wd)
        if direction is not None:
            cols.update(self._critical(loss_fn, params, lr, direction, wd, cols["lambda_dir"]))
        if self.cfg.batch_sharpness:
            if batch_loss_fn is not None:
                cols["step_sharpness"] = batch_sharpness(batch_loss_fn, params, model, weight_decay=wd)
            if sample_batch is not None:
                mean, batches = monte_carlo_batch_sharpness(
                    sample_batch, params, model, weight_decay=wd, rse=self.cfg.batch_sharpness_rse,
                    max_batches=self.cfg.batch_sharpness_max_batches)
                cols.update(batch_sharpness=mean, batch_sharpness_n=batches)
        self.probes += 1
        return cols


def certified_above(res: LOBPCGResult, nwanted: int, cut: float, tol: float) -> list[float]:
    """The leading wanted Ritz values of ``res`` above ``cut`` that are
    certified: all of them when the solve converged (every wanted column met
    the solver's tolerances), else those whose relative residual is ≤ ``tol``."""
    out = []
    for i in range(nwanted):
        theta = float(res.eigenvalues[i])
        if not theta > cut or not (res.converged or float(res.residuals[i]) <= tol):
            break
        out.append(theta)
    return out


def warm_start_transport(d_new: torch.Tensor, d_old: torch.Tensor) -> torch.Tensor:
    """Factor that carries λ₁(P⁻¹H) vectors from D_old to D_new (D = P^{-1/2}).

    The top eigenvector y of the symmetric D H D satisfies H (D y) = λ P (D y).
    When one direction h dominates the curvature (H ≈ λ₁ h hᵀ + smaller
    terms), y ∝ D h: the gradient-space direction h moves little between
    steps, D does (v̂ averages squared gradients), so the warm start is
    y' = D_new h = (D_new / D_old) y rather than y."""
    return d_new / d_old


def batch_sharpness(batch: Union[LossFn, MicroBatches], params, model: Optional[nn.Module] = None, *,
                    weight_decay: float = 0.0) -> float:
    """gᵀHg / ‖g‖² with g and H the gradient and Hessian of the same
    mini-batch objective Σⱼ wⱼ Lⱼ + (wd/2)‖θ‖² (``batch``: a loss closure,
    weight 1, or :data:`MicroBatches`; ``weight_decay``: the coupled wd):
    the curvature along the step direction of plain SGD (Andreyev &
    Beneventano 2024).  One micro-batch: one gradient graph and one
    Hessian-vector product; several: a gradient pass, then one graph and one
    product per micro-batch (each closure is called twice and must give the
    same loss both times, dropout included).  ``model``: use its fast
    convolution double backward.  NaN when g = 0."""
    micro = [(batch, 1.0)] if callable(batch) else list(batch)
    if not micro:
        raise ValueError("batch_sharpness: an empty batch")
    params = list(params)
    theta = flatten([p.detach() for p in params]) if weight_decay else None
    if len(micro) == 1:
        fn, w = micro[0]
        with DoubleBackwardHessian(lambda: w * fn(), params, model=model) as H:
            g = flatten(H.gradient())
            if weight_decay:
                g = g + weight_decay * theta.to(g.dtype)
            Hg = H(g)
    else:
        g = sum(w * flatten(gradient(lambda: fn(), params)) for fn, w in micro)
        if weight_decay:
            g = g + weight_decay * theta.to(g.dtype)
        Hg = torch.zeros_like(g)
        for fn, w in micro:
            with DoubleBackwardHessian(lambda: w * fn(), params, model=model) as H:
                Hg = Hg + H(g).to(g.dtype)
    g, Hg = g.double(), Hg.double()
    if weight_decay:
        Hg = Hg + weight_decay * g
    gg = float(g.square().sum())
    if gg == 0.0:
        return float("nan")
    return float((g * Hg).sum()) / gg


def monte_carlo_batch_sharpness(sample_batch: Callable[[int], Union[LossFn, MicroBatches]], params,
                                model: Optional[nn.Module] = None, *, weight_decay: float = 0.0, rse: float = 0.01,
                                max_batches: int = 100) -> tuple[float, int]:
    """The batch sharpness E_B[gᵀH_Bg/‖g‖²] of Andreyev & Beneventano (2024)
    by Monte Carlo: :func:`batch_sharpness` of the mini-batches
    ``sample_batch(0)``, ``sample_batch(1)``, … until the standard error of
    their mean, s/√m (s the sample standard deviation of m values), is at
    most ``rse`` × |mean|, or ``max_batches`` were drawn; at least 2.
    Returns (mean, m); NaN values (g = 0) are left out of the mean."""
    values: list[float] = []
    drawn = 0
    while drawn < max_batches:
        v = batch_sharpness(sample_batch(drawn), params, model, weight_decay=weight_decay)
        drawn += 1
        if math.isfinite(v):
            values.append(v)
        m = len(values)
        if m >= 2:
            mean = math.fsum(values) / m
            sd = math.sqrt(math.fsum((x - mean) ** 2 for x in values) / (m - 1))
            if sd / math.sqrt(m) <= rse * abs(mean):
                break
    mean = math.fsum(values) / len(values) if values else float("nan")
    return mean, drawn
