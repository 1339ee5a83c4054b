"""FAB, the Fast Adaptive Boundary attack (Croce & Hein, "Minimally distorted adversarial examples
with a fast adaptive boundary attack", ICML 2020), untargeted and targeted (FAB-T), L-inf, L2, L1.

Each step linearizes the classifier at the current iterate ``x_k`` and picks the decision
hyperplane ``w.z = b`` (``w`` the gradient of ``z_j - z_y``) with the smallest distance
``|z_j - z_y| / ||w||_q`` (``q`` the dual norm). It projects both ``x_k`` and the clean input
``x_0`` onto that hyperplane intersected with the box of valid inputs (exact projections for
p = inf, 2, 1: ``d_k`` and ``d_0``), and moves to the biased combination
``(1 - a)(x_k + eta d_k) + a (x_0 + eta d_0)`` with ``a = min(||d_k|| / (||d_k|| + ||d_0||),
alpha_max)``, which keeps the iterate close to ``x_0``. When an iterate is adversarial it is kept if
it is the smallest so far, and the next iterate goes back towards ``x_0``:
``x_0 + beta (x_k - x_0)``. Restarts start from random points at half the best norm found (or the
restart radius). A final search along the segment from ``x_0`` to the best point (the linear
interpolation of the reference code's ``las`` option) moves it onto the boundary.

FAB-T (as used in AutoAttack) keeps the untargeted goal but linearizes only ``z_t - z_y`` for one
target ``t`` at a time, the classes with the 2nd, 3rd, ... highest clean logits, which costs one
gradient per step instead of ``K - 1``.

**With a budget.** FAB is a minimum-norm attack. Given ``eps``, it works as AutoAttack's FAB: a
sample stops as soon as a point within ``eps`` is found, and restarts and further targets attack
only the samples not yet broken within ``eps``; the returned point may still lie beyond ``eps`` for
the others (it is the smallest found). An evaluation engine counts a sample as broken at ``eps``
when ``result.success`` and ``result.perturbation_norms[norm] <= eps`` (up to float tolerance).

Bounds are the model's (any units): the projections handle a general box, so nothing assumes
[0, 1]. Follows ``fra31/auto-attack`` (``fab_base.py``, ``fab_pt.py``, ``fab_projections.py``) and
``fra31/fab-attack`` (the final search).
"""

from __future__ import annotations

from typing import Any

import torch

from medrobust.attacks.base import AttackContext, MinimumNormAttack, RunOutput
from medrobust.attacks.deepfool import _candidate_gradients
from medrobust.norms import Norm, batch_view, flat

_TINY = 1e-12
_TIE_RTOL = 1e-4  # the models' decision-tie tolerance (Model.near_tie), relative to the scale
# the reference code's default restart radii on [0, 1] inputs, scaled by the bounds' span
_DEFAULT_RADIUS = {"linf": 0.3, "l2": 1.0, "l1": 5.0}


# ------------------------------------------------------------------ projections
def _solve_capped(s: torch.Tensor, mu: torch.Tensor, c: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``lam >= 0`` with ``sum_i s_i min(lam, mu_i) = c`` (``s, mu >= 0``, ``c >= 0``), per row,
    from the sorted breakpoints ``mu``; and whether it exists (``sum s_i mu_i >= c``)."""
    order = mu.argsort(1)
    ms, ss = mu.gather(1, order), s.gather(1, order)
    cs = (ss * ms).cumsum(1)
    cw = ss.cumsum(1)
    total = cw[:, -1:]
    h = cs + ms * (total - cw)  # the sum at lam = ms_k
    feasible = h[:, -1] >= c
    k = (h < c.unsqueeze(1)).sum(1, keepdim=True).clamp_max(mu.shape[1] - 1)
    prev = (k - 1).clamp_min(0)
    first = k == 0
    cs_prev = torch.where(first, torch.zeros_like(c).unsqueeze(1), cs.gather(1, prev))
    cw_prev = torch.where(first, torch.zeros_like(c).unsqueeze(1), cw.gather(1, prev))
    lam = (c.unsqueeze(1) - cs_prev) / (total - cw_prev).clamp_min(_TINY)
    return lam.squeeze(1).clamp_min(0.0), feasible


def project_hyperplane_box(t: torch.Tensor, w: torch.Tensor, b: torch.Tensor, norm: str,
                           lo: float, hi: float) -> torch.Tensor:
    """The smallest ``d`` (in ``norm``) with ``w.(t + d) = b`` and ``lo <= t + d <= hi``, per row of
    ``t, w`` ``(n, d)`` and ``b`` ``(n,)`` (FAB's projection, Croce & Hein 2020, Section 3.1).

    Each coordinate moves against ``sign(w_i)`` (towards the hyperplane) by at most the room the box
    leaves, ``cap_i``. L-inf: ``min(lam, cap_i)``; L2: ``min(lam |w_i|, cap_i)``; L1: the
    coordinates with the largest ``|w_i|`` first, each up to its cap. When the box does not reach
    the hyperplane, L-inf and L2 return the projection without the box and L1 the box's corner, as
    the reference code does (the caller clips)."""
    c = (w * t).sum(1) - b
    sgn = torch.where(c >= 0, 1.0, -1.0).to(t.dtype).unsqueeze(1)
    wp = w * sgn  # now w'.(t + d) must fall by |c|
    need = c.abs()
    aw = wp.abs()
    direction = -wp.sign()
    cap = torch.where(wp > 0, t - lo, hi - t).clamp_min(0.0) * (aw > 0)
    if norm == "linf":
        lam, ok = _solve_capped(aw, cap, need)
        d = direction * torch.minimum(lam.unsqueeze(1), cap)
        free = direction * (need / aw.sum(1).clamp_min(_TINY)).unsqueeze(1)
    elif norm == "l2":
        mu = torch.where(aw > 0, cap / aw.clamp_min(_TINY), torch.zeros_like(cap))
        lam, ok = _solve_capped(aw * aw, mu, need)
        d = direction * aw * torch.minimum(lam.unsqueeze(1), mu)
        free = -wp * (need / (aw * aw).sum(1).clamp_min(_TINY)).unsqueeze(1)
    elif norm == "l1":
        order = aw.argsort(1, descending=True)
        gain = (aw * cap).gather(1, order).cumsum(1)  # reduction reached with the first k coords
        k = (gain < need.unsqueeze(1)).sum(1, keepdim=True)
        ok = k.squeeze(1) < aw.shape[1]
        k = k.clamp_max(aw.shape[1] - 1)
        before = torch.where(k > 0, gain.gather(1, (k - 1).clamp_min(0)), torch.zeros_like(k,
                             dtype=t.dtype))
        rank = torch.empty_like(order).scatter_(
            1, order, torch.arange(aw.shape[1], device=t.device).expand_as(order))
        last = order.gather(1, k)
        partial = (need.unsqueeze(1) - before) / aw.gather(1, last).clamp_min(_TINY)
        move = torch.where(rank < k, cap, torch.zeros_like(cap))
        move = move.scatter(1, last, torch.minimum(partial, cap.gather(1, last)))
        d = direction * move
        free = direction * cap
    else:
        raise ValueError(f"FAB supports 'linf', 'l2' and 'l1'; got {norm!r}")
    d = torch.where(ok.unsqueeze(1), d, free)
    return torch.where((aw > 0) & (need > 0).unsqueeze(1), d, torch.zeros_like(d))


def _dual_norm(g: torch.Tensor, norm: str) -> torch.Tensor:
    """``||g||_q`` over the last dimension, ``q`` dual to ``norm``."""
    if norm == "linf":
        return g.abs().sum(-1)
    if norm == "l2":
        return g.norm(dim=-1)
    return g.abs().amax(-1)


def _norm(d: torch.Tensor, norm: str) -> torch.Tensor:
    f = flat(d)
    if norm == "linf":
        return f.abs().amax(1)
    if norm == "l2":
        return f.norm(dim=1)
    return f.abs().sum(1)


class FAB(MinimumNormAttack):
    """Fast Adaptive Boundary attack (Croce & Hein, ICML 2020).

    Args:
        norm: "linf" (default), "l2" or "l1".
        steps: iterations per run (paper: 100).
        restarts: runs; the first from the clean input, the others from random points at half the
            smallest norm found so far (or ``eps`` / the restart radius) (AutoAttack: 5 for FAB,
            1 for FAB-T).
        eps: optional budget. With it a sample stops as soon as a point within ``eps`` is found
            (AutoAttack's use); see the module docstring for how an evaluation counts it.
        alpha_max: the largest bias towards the clean input (paper: 0.1).
        eta: the overshoot of the projection (paper: 1.05).
        beta: the backward step after an adversarial iterate (paper: 0.9).
        final_search_steps: linear-interpolation steps between the clean input and the best point
            (fab-attack's final search; 0 = none, as in AutoAttack).
        restart_radius: the random restarts' radius when ``eps`` is not given; default the
            reference's (0.3, 1.0, 5.0 for L-inf, L2, L1 on [0, 1] inputs) times the bounds' span.
        seed, generator: the randomness of the restarts.

    Called with ``target``, the goal is that class: each step linearizes ``z_t - z_j`` for the
    strongest other class ``j``. Samples already adversarial are returned unchanged; a sample
    never fooled is returned unchanged with ``success`` False.
    """

    name = "fab"
    requires_gradients = True
    requires_scores = True
    supports_dense = False

    def __init__(
        self,
        norm: str | Norm = "linf",
        *,
        steps: int = 100,
        restarts: int = 1,
        eps: float | None = None,
        alpha_max: float = 0.1,
        eta: float = 1.05,
        beta: float = 0.9,
        final_search_steps: int = 3,
        restart_radius: float | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(norm, seed=seed, generator=generator)
        if self.norm.name not in ("linf", "l2", "l1"):
            raise ValueError(f"FAB supports 'linf', 'l2' and 'l1'; got {self.norm.name!r}")
        for name, v in (("steps", steps), ("restarts", restarts)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer; got {v!r}")
        if isinstance(final_search_steps, bool) or not isinstance(final_search_steps, int) or (
            final_search_steps < 0
        ):
            raise ValueError(f"final_search_steps must be an integer >= 0; got "
                             f"{final_search_steps!r}")
        if eps is not None and not (float(eps) >= 0):
            raise ValueError(f"eps must be a number >= 0 or None; got {eps!r}")
        if not 0.0 <= alpha_max <= 1.0:
            raise ValueError(f"alpha_max must lie in [0, 1]; got {alpha_max!r}")
        if not eta >= 1.0:
            raise ValueError(f"eta (the overshoot) must be >= 1; got {eta!r}")
        if not 0.0 < beta < 1.0:
            raise ValueError(f"beta must lie in (0, 1); got {beta!r}")
        if restart_radius is not None and not restart_radius > 0:
            raise ValueError(f"restart_radius must be > 0; got {restart_radius!r}")
        self.steps = steps
        self.restarts = restarts
        self.eps = None if eps is None else float(eps)
        self.alpha_max = float(alpha_max)
        self.eta = float(eta)
        self.beta = float(beta)
        self.final_search_steps = final_search_steps
        self.restart_radius = restart_radius

    @classmethod
    def fast_config(cls) -> dict[str, Any]:
        """Small settings for quick tests."""
        return {"steps": 10}

    # ------------------------------------------------------------------ run
    def run(self, ctx: AttackContext) -> RunOutput:
        x0 = ctx.x
        logits = ctx.logits(x0)
        done0 = ctx.is_adversarial(logits, ctx.all_index())
        best_adv = x0.clone()
        best_norm = torch.full((ctx.n,), float("inf"), device=x0.device, dtype=x0.dtype)
        best_norm[done0] = 0.0
        for target in self._targets(ctx, logits):
            for r in range(self.restarts):
                todo = ~done0 & ~self._broken(best_norm)
                index = todo.nonzero().flatten()
                if index.numel() == 0:
                    break
                self._run_once(ctx, index, target, r > 0, best_adv, best_norm)
        found = torch.isfinite(best_norm) & ~done0
        if self.final_search_steps and found.any():
            idx = found.nonzero().flatten()
            best_adv[idx] = self._final_search(ctx, idx, best_adv[idx])
        return RunOutput(best_adv, None, extra={"best_norm": best_norm.cpu()})

    def _targets(self, ctx: AttackContext, logits: torch.Tensor) -> list[torch.Tensor | None]:
        """Untargeted FAB: one pass over all classes (``None``)."""
        return [None]

    def _broken(self, best_norm: torch.Tensor) -> torch.Tensor:
        if self.eps is None:
            return torch.zeros_like(best_norm, dtype=torch.bool)
        return best_norm <= self.eps

    def _radius(self, ctx: AttackContext) -> float:
        if self.eps is not None:
            return self.eps
        if self.restart_radius is not None:
            return float(self.restart_radius)
        lo, hi = ctx.bounds
        return _DEFAULT_RADIUS[self.norm.name] * (hi - lo)

    def _hyperplanes(
        self, ctx: AttackContext, xk: torch.Tensor, index: torch.Tensor,
        target: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits at ``xk``, and for every row the chosen linearized boundary: ``f`` (its value, < 0
        on the clean side) and ``g`` (its input gradient)."""
        y = ctx.labels[index]
        k = ctx.num_classes
        if ctx.targeted:
            # the goal is class t: linearize z_t - z_j for the strongest other class j
            assert ctx.target is not None
            t = ctx.target[index]
            z = ctx.logits(xk)
            other = z.scatter(1, t.unsqueeze(1), float("-inf")).argmax(1)
            cand = torch.stack([other, t], 1)
        elif target is not None:
            cand = torch.stack([y, target[index]], 1)  # FAB-T: z_t - z_y
        else:
            rest = torch.arange(k, device=y.device).expand(y.shape[0], k)
            rest = rest[rest != y.unsqueeze(1)].view(y.shape[0], k - 1)
            cand = torch.cat([y.unsqueeze(1), rest], 1)  # z_j - z_y for every j != y
        logits, f, g = _candidate_gradients(ctx, xk, cand)
        g = g * ctx.mask[index].unsqueeze(1) if ctx.mask is not None else g
        gf = g.reshape(g.shape[0], g.shape[1], -1)
        dist = f.abs() / (_dual_norm(gf, self.norm.name) + _TINY)
        j = dist.argmin(1)
        rows = torch.arange(f.shape[0], device=f.device)
        return logits, f[rows, j], gf[rows, j]

    def _run_once(self, ctx: AttackContext, index: torch.Tensor, target: torch.Tensor | None,
                  random_start: bool, best_adv: torch.Tensor, best_norm: torch.Tensor) -> None:
        lo, hi = ctx.bounds
        norm = self.norm.name
        x0 = ctx.x[index]
        xk = x0.clone()
        if random_start:
            xk = self._random_point(ctx, x0, index, best_norm[index])
        alive = torch.ones(index.numel(), dtype=torch.bool, device=x0.device)
        for _ in range(self.steps):
            pos = alive.nonzero().flatten()
            if pos.numel() == 0:
                break
            active = index[pos]
            xa, xo = xk[pos], x0[pos]
            _, f, w = self._hyperplanes(ctx, xa, active, target)
            xa_f, xo_f = flat(xa), flat(xo)
            # the linearized boundary f + w.(z - xa) = 0, i.e. w.z = w.xa - f
            b = (w * xa_f).sum(1) - f
            d = project_hyperplane_box(torch.cat([xa_f, xo_f]), torch.cat([w, w]),
                                       torch.cat([b, b]), norm, lo, hi)
            m = xa.shape[0]
            d1, d2 = d[:m].view_as(xa), d[m:].view_as(xa)
            a1 = _norm(d1, norm).clamp_min(1e-8)
            a2 = _norm(d2, norm).clamp_min(1e-8)
            alpha = batch_view((a1 / (a1 + a2)).clamp(0.0, self.alpha_max), xa)
            xa = ctx.clip((xa + self.eta * d1) * (1 - alpha) + (xo + self.eta * d2) * alpha)
            if ctx.mask is not None:
                xa = torch.where(ctx.mask[active] != 0, xa, xo)
            logits = ctx.logits(xa)
            adv = ctx.is_adversarial(logits, active)
            if adv.any():
                dist = _norm(xa - xo, norm)
                better = adv & (dist < best_norm[active])
                sel = active[better]
                best_adv[sel] = xa[better]
                best_norm[sel] = dist[better]
                xa = torch.where(batch_view(adv, xa), xo + (xa - xo) * self.beta, xa)
            xk[pos] = xa
            if self.eps is not None:
                alive[pos] = ~self._broken(best_norm[active])

    def _random_point(self, ctx: AttackContext, x0: torch.Tensor, index: torch.Tensor,
                      best: torch.Tensor) -> torch.Tensor:
        radius = torch.clamp(best, max=self._radius(ctx))
        norm = self.norm.name
        if norm == "linf":
            t = 2 * ctx.rand(*x0.shape).to(x0.dtype) - 1
        else:
            t = ctx.randn(*x0.shape).to(x0.dtype)
        t = ctx.masked(t, index)
        t = t / batch_view(_norm(t, norm).clamp_min(_TINY), t)
        return ctx.clip(x0 + batch_view(radius, t) * t * 0.5)

    def _final_search(self, ctx: AttackContext, index: torch.Tensor, adv: torch.Tensor
                      ) -> torch.Tensor:
        """Linear interpolation between the clean side ``a1`` and the adversarial side ``a2`` at
        the zero of the linearized margin, keeping each side's role (fab-attack's final search)."""
        a1 = ctx.x[index].clone()
        a2 = adv.clone()
        z1 = ctx.logits(a1)
        z2 = ctx.logits(a2)
        y = ctx.labels[index]
        for _ in range(self.final_search_steps):
            if ctx.targeted:
                m1 = ctx.criterion.margin(z1, index)  # < 0: not yet the target
                m2 = ctx.criterion.margin(z2, index)
            else:
                c = z2.argmax(1)  # the adversarial class at a2
                m1 = z1.gather(1, c[:, None])[:, 0] - z1.gather(1, y[:, None])[:, 0]
                m2 = z2.gather(1, c[:, None])[:, 0] - z2.gather(1, y[:, None])[:, 0]
            # aim at a small clear margin rather than at the zero itself: a point on the boundary
            # would be a float tie, neither reliably adversarial nor clean
            goal = 2 * _TIE_RTOL * (1.0 + z2.abs().amax(1))
            t = (goal - m1) / (m2 - m1 + 1e-10)
            t = torch.where((t >= 0) & (t <= 1), t, torch.ones_like(t))
            a3 = a1 + (a2 - a1) * batch_view(t, a1)
            z3 = ctx.logits(a3)
            adv3 = ctx.is_adversarial(z3, index)
            good = adv3 & ~ctx.model.near_tie(z3, _TIE_RTOL)
            clean = ~adv3
            a2 = torch.where(batch_view(good, a1), a3, a2)
            z2 = torch.where(good.unsqueeze(1), z3, z2)
            a1 = torch.where(batch_view(clean, a1), a3, a1)
            z1 = torch.where(clean.unsqueeze(1), z3, z1)
        return a2


class FABT(FAB):
    """FAB-T (Croce & Hein 2020, as in AutoAttack): the untargeted goal, reached by linearizing
    ``z_t - z_y`` towards one target at a time, the classes with the 2nd, 3rd, ... highest clean
    logits (``min(n_target_classes, K - 1)`` of them; paper: 9). With ``eps`` later targets attack
    only samples not yet broken within ``eps``; without it every target runs on every sample and
    the smallest perturbation is kept. Called with ``target`` it is :class:`FAB` towards it.
    """

    name = "fab-t"

    def __init__(
        self,
        norm: str | Norm = "linf",
        *,
        steps: int = 100,
        restarts: int = 1,
        n_target_classes: int = 9,
        eps: float | None = None,
        alpha_max: float = 0.1,
        eta: float = 1.05,
        beta: float = 0.9,
        final_search_steps: int = 3,
        restart_radius: float | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(norm, steps=steps, restarts=restarts, eps=eps, alpha_max=alpha_max,
                         eta=eta, beta=beta, final_search_steps=final_search_steps,
                         restart_radius=restart_radius, seed=seed, generator=generator)
        if isinstance(n_target_classes, bool) or not isinstance(n_target_classes, int) or (
            n_target_classes < 1
        ):
            raise ValueError(f"n_target_classes must be a positive integer; got "
                             f"{n_target_classes!r}")
        self.n_target_classes = n_target_classes

    @classmethod
    def fast_config(cls) -> dict[str, Any]:
        return {"steps": 10, "n_target_classes": 2}

    def _targets(self, ctx: AttackContext, logits: torch.Tensor) -> list[torch.Tensor | None]:
        if ctx.targeted:
            return [None]
        order = logits.argsort(1, descending=True)
        y = ctx.labels
        out: list[torch.Tensor | None] = []
        for rank in range(1, min(self.n_target_classes, ctx.num_classes - 1) + 1):
            out.append(torch.where(order[:, rank] == y, order[:, 0], order[:, rank]))
        return out


__all__ = ["FAB", "FABT", "project_hyperplane_box"]
