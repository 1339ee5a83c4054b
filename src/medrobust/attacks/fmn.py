"""FMN: Fast Minimum-Norm attack (Pintor, Roli, Brendel & Biggio, "Fast Minimum-norm Adversarial
Attacks through Adaptive Norm Constraints", NeurIPS 2021), under L0, L1, L2 and L-inf.

A projected gradient method on the logit difference ``L = z_y - max_{j != y} z_j`` (untargeted;
``max_{j != t} z_j - z_t`` targeted) inside an eps-ball whose radius adapts (Algorithm 1 of the
paper). At step ``k``, with ``gamma_k`` and ``alpha_k`` annealed with a cosine:

    eps <- min(eps * (1 - gamma_k), best norm)         if x + delta is adversarial
           eps * (1 + gamma_k)                          if an adversarial point was found before
           (||delta|| + |L| / ||grad L||_*) (1 + gamma_k)  otherwise (the linear extrapolation
                                                        to the boundary, ||.||_* the dual norm)
    delta <- Pi_eps(delta + alpha_k * grad / ||grad||_2), clipped to the box

For L0 the radius is a number of elements (``eps <- min(eps - 1, floor(eps (1 - gamma)))`` or
``max(eps + 1, floor(eps (1 + gamma)))``, no extrapolation) and the projection keeps the ``eps``
largest elements; for L1 the projection is the exact Euclidean projection onto the L1 ball (Duchi
et al., ICML 2008). The smallest adversarial iterate is kept per sample. This follows the authors'
code (``maurapintor/Fast-Minimum-Norm-FMN-Attack``, also ``adv_lib/attacks/fast_minimum_norm.py``),
with two differences: the L2 step is a true projection onto the ball (the paper's ``Pi_eps``) where
that code rescales every iterate to norm ``eps``; and the extrapolated radius is widened by the
factor ``1 + gamma_k``, since the extrapolation lands exactly on the linearized boundary, where a
(locally) linear model's decision has not changed yet, and the radius would stay there.

Scale-free: the attack works in the unit box ``(x - lo) / (hi - lo)`` (:mod:`.unitbox`), so the
step sizes are in units of the bounds' span.
"""

from __future__ import annotations

from typing import Any

import torch

from medrobust.attacks.base import AttackContext, MinimumNormAttack, RunOutput
from medrobust.attacks.ddn import (
    check_positive,
    check_positive_int,
    clean_start,
    cosine_anneal,
)
from medrobust.norms import Norm, batch_view, flat, project_l1_ball

_TINY = 1e-12


def project_l0(delta: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Keep the ``k`` (per sample) largest-magnitude elements of ``delta``, zero the others."""
    d = flat(delta)
    kk = k.long().clamp(0, d.shape[1])
    top = int(kk.max()) if kk.numel() else 0
    if top == 0:
        return torch.zeros_like(delta)
    order = d.abs().topk(top, dim=1).indices
    keep = torch.arange(top, device=d.device).unsqueeze(0) < kk.unsqueeze(1)
    sel = torch.zeros_like(d, dtype=torch.bool).scatter(1, order, keep)
    return (d * sel).view_as(delta)


class L0(Norm):
    """The number of changed elements (not a norm, but the sparsity measure FMN minimizes)."""

    name = "l0"

    def measure(self, delta: torch.Tensor) -> torch.Tensor:
        return (flat(delta) != 0).sum(1).to(delta.dtype)

    def project(self, delta: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return project_l0(delta, eps.floor())

    def direction(self, grad: torch.Tensor, x: torch.Tensor | None = None,
                  bounds: tuple[float, float] | None = None) -> torch.Tensor:
        """The single element with the largest |gradient|, signed."""
        g = flat(grad)
        one = project_l0(g, torch.ones(g.shape[0], device=g.device))
        return one.sign().view_as(grad)

    def random(self, shape: torch.Size, eps: torch.Tensor, generator: torch.Generator
               ) -> torch.Tensor:
        """``floor(eps)`` random elements set to uniform values in [-1, 1]."""
        v = 2 * torch.rand(shape, generator=generator, device=generator.device) - 1
        score = torch.rand(shape, generator=generator, device=generator.device)
        keep = project_l0(score, eps.to(v.device).floor()) != 0
        return v * keep


def _dual_norm(g: torch.Tensor, p: str) -> torch.Tensor:
    gf = flat(g)
    if p == "l2":
        return gf.norm(dim=1)
    if p == "linf":
        return gf.abs().sum(1)
    return gf.abs().amax(1)  # l1 -> linf


def _measure(delta: torch.Tensor, p: str) -> torch.Tensor:
    d = flat(delta).double()
    if p == "l0":
        return (d != 0).sum(1).double()
    if p == "l1":
        return d.abs().sum(1)
    if p == "l2":
        return d.norm(dim=1)
    return d.abs().amax(1)


def _project(delta: torch.Tensor, eps: torch.Tensor, p: str) -> torch.Tensor:
    e = eps.to(delta.dtype)
    if p == "l0":
        return project_l0(delta, eps.floor())
    if p == "l1":
        return project_l1_ball(delta, e)
    if p == "l2":
        n = flat(delta).norm(dim=1)
        factor = torch.where(n > e, e / n.clamp_min(_TINY), torch.ones_like(n))
        return delta * batch_view(factor, delta)
    eb = batch_view(e, delta)
    return torch.maximum(torch.minimum(delta, eb), -eb)


class FMN(MinimumNormAttack):
    """Fast Minimum-Norm attack (Pintor et al., NeurIPS 2021): L0, L1, L2, L-inf; targeted too.

    Args:
        norm: "l0", "l1", "l2" (default) or "linf".
        steps: iterations, one forward and one backward pass each (paper: 100 to 1000).
        alpha_init, alpha_final: the step size, annealed with a cosine (paper: 1 and
            ``alpha_init / 100``, the default when ``alpha_final`` is None). In units of the span.
        gamma_init, gamma_final: the radius' rate of change, annealed with a cosine (paper: 0.05
            and 0.001).
        seed, generator: accepted for a uniform interface; FMN is deterministic.

    Returns per sample the adversarial iterate with the smallest norm; a sample with none returns
    the **clean input** (``success`` False). With a mask only the elements inside it change.
    """

    name = "fmn"

    def __init__(
        self,
        norm: str | Norm = "l2",
        *,
        steps: int = 100,
        alpha_init: float = 1.0,
        alpha_final: float | None = None,
        gamma_init: float = 0.05,
        gamma_final: float = 0.001,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if isinstance(norm, str) and norm.lower().replace("-", "").replace("_", "") in ("l0", "0"):
            norm = L0()
        super().__init__(norm, loss="margin", seed=seed, generator=generator)
        if self.norm.name not in ("l0", "l1", "l2", "linf"):
            raise ValueError(f"FMN supports norm 'l0', 'l1', 'l2' or 'linf'; got {norm!r}")
        check_positive_int("steps", steps)
        check_positive("alpha_init", alpha_init)
        if alpha_final is not None:
            check_positive("alpha_final", alpha_final)
        for name, v in (("gamma_init", gamma_init), ("gamma_final", gamma_final)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
                raise ValueError(f"{name} must lie in (0, 1); got {v!r}")
        self.steps = steps
        self.alpha_init = float(alpha_init)
        self.alpha_final = float(alpha_init / 100 if alpha_final is None else alpha_final)
        self.gamma_init = float(gamma_init)
        self.gamma_final = float(gamma_final)

    @classmethod
    def fast_config(cls) -> dict[str, Any]:
        """Small settings for quick tests."""
        return {"steps": 20}

    def run(self, ctx: AttackContext) -> RunOutput:
        p = self.norm.name
        box, best, idx = clean_start(ctx)
        if idx.numel() == 0:
            return RunOutput(best.adv, best.logits)
        u0 = box.u0[idx]
        mask = None if ctx.mask is None else ctx.mask[idx]
        far = torch.maximum(u0, 1 - u0)
        if mask is not None:
            far = far * mask
        worst = _measure(far, p)
        best_norm = worst.clone()
        found = torch.zeros_like(worst, dtype=torch.bool)
        eps = torch.ones_like(worst) if p == "l0" else torch.full_like(worst, float("inf"))
        delta = torch.zeros_like(u0)

        def margin(logits: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
            return ctx.criterion.margin(logits, i)  # > 0: adversarial; ascended

        for i in range(self.steps):
            alpha = cosine_anneal(i, self.steps, self.alpha_init, self.alpha_final)
            gamma = cosine_anneal(i, self.steps, self.gamma_init, self.gamma_final)
            xa = box.to_model(u0 + delta, idx)
            logits, m, gx = ctx.value_and_grad(xa, idx, margin)
            g = ctx.masked(box.grad(gx), idx)
            dnorm = _measure(delta, p)
            is_adv = ctx.is_adversarial(logits, idx)
            best.update(idx, xa, logits, dnorm, is_adv)
            best_norm = torch.where(is_adv & (dnorm < best_norm), dnorm, best_norm)
            found |= is_adv
            if p == "l0":
                eps = torch.where(
                    is_adv,
                    torch.minimum(torch.minimum(eps - 1, (eps * (1 - gamma)).floor()), best_norm),
                    torch.maximum(eps + 1, (eps * (1 + gamma)).floor()),
                ).clamp_min(0)
            else:
                to_boundary = m.double().abs() / _dual_norm(g, p).double().clamp_min(_TINY)
                eps = torch.where(
                    is_adv,
                    torch.minimum(eps * (1 - gamma), best_norm),
                    torch.where(found, eps * (1 + gamma), (dnorm + to_boundary) * (1 + gamma)),
                )
            eps = torch.minimum(eps, worst)
            gn = flat(g).norm(dim=1).clamp_min(_TINY)
            delta = delta + alpha * g / batch_view(gn, g)
            delta = _project(delta, eps, p)
            delta = (u0 + delta).clamp(0, 1) - u0
        xa = box.to_model(u0 + delta, idx)  # the last iterate
        logits = ctx.logits(xa)
        best.update(idx, xa, logits, _measure(delta, p), ctx.is_adversarial(logits, idx))
        return RunOutput(best.adv, best.logits)


__all__ = ["FMN", "L0", "project_l0"]
