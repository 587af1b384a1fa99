"""Adaptive timestep sampling (after Kim et al. 2025, "Adaptive Non-Uniform
Timestep Sampling for Diffusion Model Training", arXiv 2411.09998).

The paper learns a timestep sampler by policy gradient, rewarding the
timesteps whose training step most reduces the diffusion loss.  Here the
sampler is a categorical distribution over K uniform timestep bins (t is
uniform inside a bin), parameterised by logits z and mixed with the uniform
distribution so every bin keeps being visited:

    q = (1 − u) softmax(z) + u / K          (u = ``uniform_mix``)

Reward.  The loss decrease that the paper measures with a look-ahead
(loss on a probe set before and after an update) needs extra forward passes
and the model; we use the same signal as observed during training instead,
the *learning progress* of the sampled bin (Graves et al. 2017): for an
example in bin b with loss ℓ,

    r = (L̄_b − ℓ) / L̄_b,

where L̄_b is an exponential moving average of the earlier losses observed
in bin b.  r > 0 on average where the loss is currently falling fastest; the
division makes bins with different loss scales comparable.
``reward: loss`` instead rewards high loss, r = ℓ / mean(ℓ of the batch)
(the loss-proportional sampling of Nichol & Dhariwal 2021, learned).

Update (REINFORCE with the batch-mean baseline and an entropy bonus), once
per observed micro-batch, by autograd on the logits:

    z ← z + lr · ∇_z [ mean_i (r_i − r̄) log q(b_i) + β H(softmax z) ]

Loss.  By default the per-example loss is the plain ε-MSE at the sampled t,
so the sampler changes *which objective* is optimised (more weight on the
bins it prefers), as in the paper.  With ``importance_weight: true`` each
example is weighted by p_uniform(t)/p(t) = |bin|/(T q_b), which keeps the
uniform-t objective in expectation and only changes its variance.  The
weight is fixed in the draw.

The frozen Hessian batch follows the moving objective without being
redrawn: it is a fixed draw with *uniform* t (:meth:`hessian_draw`), and at
every probe each example is weighted by T·p(t) under the current sampler
(:meth:`follow_objective`), so that its mean loss is, in expectation over
the draw, the current training objective E_{t∼p}[ℓ(t)]; with
``importance_weight`` the training objective is the uniform-t one and the
Hessian batch is unweighted.  The batch stays fixed, so warm starts carry
over between probes.  Because the sampler moves at every step, fixed noise
does not make adap_s's objective deterministic (``deterministic_draw`` is
False): its Hessian batch is this uniform-t draw in every data mode.

``state_dict`` holds the logits and the per-bin averages: a resumed run
draws exactly the same timesteps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from trainers.diffusion.variants.base import Base, Draw, check_option


@dataclass
class AdaptiveSamplingOptions:
    bins: int = 20
    reward: str = "progress"        # progress | loss
    lr: float = 0.05                # policy-gradient step size on the logits
    entropy: float = 0.01           # entropy bonus β
    uniform_mix: float = 0.1        # u: probability mass spread uniformly over the bins
    ema: float = 0.9                # decay of the per-bin loss average L̄_b
    importance_weight: bool = False

    def __post_init__(self):
        check_option(self.bins >= 2, "bins", f"must be >= 2; got {self.bins}")
        check_option(self.reward in ("progress", "loss"), "reward",
                     f"must be one of progress, loss; got {self.reward!r}")
        check_option(self.lr > 0, "lr", f"must be > 0; got {self.lr}")
        check_option(self.entropy >= 0, "entropy", f"must be >= 0; got {self.entropy}")
        check_option(0.0 < self.uniform_mix <= 1.0, "uniform_mix", f"must be in (0, 1]; got {self.uniform_mix}")
        check_option(0.0 <= self.ema < 1.0, "ema", f"must be in [0, 1); got {self.ema}")


class AdaptiveSampling(Base):
    """ε-prediction with timesteps from a learned categorical distribution."""

    name = "adap_s"
    Options = AdaptiveSamplingOptions

    def __init__(self, schedule, cfg=None):
        super().__init__(schedule, cfg)
        k, big_t = self.options.bins, schedule.timesteps
        check_option(k <= big_t, "bins", f"must be <= schedule.timesteps={big_t}; got {k}")
        self.edges = torch.tensor([j * big_t // k for j in range(k + 1)])  # bin b: [edges[b], edges[b+1])
        self.logits = torch.zeros(k, dtype=torch.float64)
        self.average = torch.zeros(k, dtype=torch.float64)   # L̄_b
        self.seen = torch.zeros(k, dtype=torch.bool)

    # --- the distribution ------------------------------------------------------
    def _mix(self, logits: torch.Tensor) -> torch.Tensor:
        u = self.options.uniform_mix
        return (1 - u) * torch.softmax(logits, 0) + u / self.options.bins

    def probabilities(self) -> torch.Tensor:
        """q over the bins (float64, CPU)."""
        return self._mix(self.logits)

    def timestep_probabilities(self) -> torch.Tensor:
        """p(t) for every timestep t (float64, CPU)."""
        sizes = self.edges[1:] - self.edges[:-1]
        return torch.repeat_interleave(self.probabilities() / sizes, sizes)

    def draw(self, x0: torch.Tensor, generator: torch.Generator, step: int = 0) -> Draw:
        device, batch = x0.device, x0.shape[0]
        q = self.probabilities()
        cdf = q.cumsum(0).to(device)
        b = torch.searchsorted(cdf, torch.rand(batch, generator=generator, device=device, dtype=torch.float64),
                               right=True).clamp(max=self.options.bins - 1)
        lo, hi = self.edges.to(device)[b], self.edges.to(device)[b + 1]
        u = torch.rand(batch, generator=generator, device=device, dtype=torch.float64)
        t = (lo + (u * (hi - lo)).floor().long()).clamp(max=hi - 1)
        noise, input_noise = self.sample_noise(x0, generator)
        extra = {"bin": b}
        if self.options.importance_weight:
            size = (hi - lo).to(torch.float64)
            extra["weight"] = (size / (self.schedule.timesteps * q.to(device)[b])).to(torch.float32)
        return Draw(x0=x0, t=t, noise=noise, input_noise=input_noise, extra=extra)

    deterministic_draw = False

    def hessian_draw(self, x0: torch.Tensor, generator: torch.Generator, step: int) -> Draw:
        """Uniform t (and the bins they fall in), the noise as in training."""
        t = self.sample_t(x0.shape[0], generator, step, x0.device)
        noise, input_noise = self.sample_noise(x0, generator)
        b = torch.searchsorted(self.edges.to(t.device), t, right=True) - 1
        return Draw(x0=x0, t=t, noise=noise, input_noise=input_noise, extra={"bin": b})

    def follow_objective(self, d: Draw, step: int) -> Draw:
        """``d`` (uniform t) with the weights T·p(t) of the current sampler
        (none with ``importance_weight``, whose objective is uniform in t)."""
        extra = {k: v for k, v in d.extra.items() if k != "weight"}
        if not self.options.importance_weight:
            p_t = self.timestep_probabilities().to(d.t.device)[d.t]
            extra["weight"] = (self.schedule.timesteps * p_t).to(torch.float32)
        return Draw(d.x0, d.t, d.noise, d.input_noise, extra, d.shared)

    def loss_weight(self, d: Draw):
        return d.extra.get("weight")

    # --- the policy-gradient update -------------------------------------------
    def rewards(self, bins: torch.Tensor, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rewards, mask of examples that take part in the update)."""
        if self.options.reward == "loss":
            return loss / loss.mean().clamp_min(1e-12), torch.ones_like(loss, dtype=torch.bool)
        mask = self.seen[bins]
        ref = self.average[bins]
        return torch.where(mask, (ref - loss) / ref.clamp_min(1e-12), torch.zeros_like(loss)), mask

    def observe(self, d: Draw, per_example_loss: torch.Tensor, step: int) -> dict[str, float]:
        bins = d.extra["bin"].detach().cpu()
        loss = per_example_loss.detach().to(torch.float64).cpu()
        if "weight" in d.extra:  # the raw loss drives the sampler, not the importance-weighted one
            loss = loss / d.extra["weight"].detach().to(torch.float64).cpu()
        r, mask = self.rewards(bins, loss)
        if mask.sum() >= 2:
            advantage = r[mask] - r[mask].mean()
            with torch.enable_grad():
                z = self.logits.clone().requires_grad_(True)
                p = torch.softmax(z, 0)
                entropy = -(p * p.clamp_min(1e-300).log()).sum()
                objective = (advantage * self._mix(z).log()[bins[mask]]).mean() + self.options.entropy * entropy
                (grad,) = torch.autograd.grad(objective, z)
            self.logits = self.logits + self.options.lr * grad
        # update the per-bin averages after the rewards used the earlier ones
        a = self.options.ema
        for b in bins.unique().tolist():
            mean_b = float(loss[bins == b].mean())
            self.average[b] = mean_b if not self.seen[b] else a * self.average[b] + (1 - a) * mean_b
            self.seen[b] = True
        q = self.probabilities()
        centres = (self.edges[1:] + self.edges[:-1] - 1).to(torch.float64) / 2
        return {"sampler_entropy": float(-(q * q.log()).sum() / math.log(self.options.bins)),
                "sampler_p_max": float(q.max()),
                "sampler_mean_t": float((q * centres).sum()),
                "reward": float(r[mask].mean()) if mask.any() else 0.0}

    def state_dict(self) -> dict:
        return {"logits": self.logits.clone(), "average": self.average.clone(), "seen": self.seen.clone()}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.logits = state["logits"].to(torch.float64).cpu().clone()
            self.average = state["average"].to(torch.float64).cpu().clone()
            self.seen = state["seen"].to(torch.bool).cpu().clone()
