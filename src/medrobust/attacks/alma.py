"""ALMA: Augmented Lagrangian Method for Adversarial attacks (Rony, Granger, Pedersoli & Ben Ayed,
"Augmented Lagrangian Adversarial Attacks", ICCV 2021), L2 and L1.

The constrained problem ``min_delta D(delta)  s.t.  c(x + delta) <= 0`` (``c`` < 0 means
adversarial) is solved with a penalty-Lagrangian method: minimize
``D(delta) + P(c(x + delta), rho, mu)`` with RMSProp and momentum, where

* ``c`` is the difference of logits ratio (DLR, Croce & Hein 2020) of the goal, made positive on
  the non-adversarial side: ``(-margin + tol) / (z_pi1 - z_pi3)`` untargeted and
  ``(-margin + tol) / (z_pi1 - (z_pi3 + z_pi4) / 2)`` targeted, with ``margin > 0`` meaning
  adversarial and ``tol`` the logit tolerance. The ratio makes the constraint invariant to the
  logits' scale. With too few classes for that denominator (2 classes untargeted, 2 or 3
  targeted) the denominator is the range of the clean logits ``z_pi1 - z_piK`` instead (for two
  classes: the clean margin), still scale-free; ``extra["constraint"]`` says which was used.
* ``P`` is a penalty-Lagrangian function (default ``P2`` of the paper:
  ``mu y + mu rho y^2 + rho^2 y^3 / 6`` for ``y >= 0``, ``mu y / (1 - rho y)`` below);
* the multiplier ``mu`` follows an exponential moving average of ``dP/dy`` (weight ``1 - alpha``),
  and the penalty parameter ``rho`` grows by ``gamma`` every ``check_steps`` iterations in which the
  constraint did not improve by the factor ``tau`` and no adversarial point was found yet;
* the first step only minimizes the penalty; its learning rate is found by a line search so that
  the step moves the distance by ``init_lr_distance``; the learning rate then decays
  exponentially to ``lr_reduction`` times itself from the step where a sample first became
  adversarial.

This follows the authors' library (``adv_lib/attacks/augmented_lagrangian.py``). Scale-free: the
attack works in the unit box ``(x - lo) / (hi - lo)`` (:mod:`.unitbox`), so distances and learning
rates are in units of the bounds' span.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from medrobust.attacks.base import AttackContext, MinimumNormAttack, RunOutput
from medrobust.attacks.carlini_wagner import _Best
from medrobust.attacks.ddn import check_positive, check_positive_int, quantize
from medrobust.attacks.unitbox import UnitBox
from medrobust.norms import Norm, batch_view, flat

Penalty = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def penalty_p1(y: torch.Tensor, rho: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    y_sup = mu * y + 0.5 * rho * y**2 + rho**2 * y**3
    y_mid = mu * y + 0.5 * rho * y**2
    y_inf = -(mu**2) / (2 * rho)
    return torch.where(y >= 0, y_sup, torch.where(y <= -mu / rho, y_inf, y_mid))


def penalty_p2(y: torch.Tensor, rho: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    y_sup = mu * y + mu * rho * y**2 + rho**2 * y**3 / 6
    y_inf = mu * y / (1 - rho * y.clamp(max=0))
    return torch.where(y >= 0, y_sup, y_inf)


def penalty_p3(y: torch.Tensor, rho: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    y_sup = mu * y + mu * rho * y**2
    y_inf = mu * y / (1 - rho * y.clamp(max=0))
    return torch.where(y >= 0, y_sup, y_inf)


def penalty_phr(y: torch.Tensor, rho: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """The quadratic penalty of Powell, Hestenes and Rockafellar."""
    return ((mu + rho * y).relu() ** 2 - mu**2) / (2 * rho)


PENALTIES: dict[str, Penalty] = {"P1": penalty_p1, "P2": penalty_p2, "P3": penalty_p3,
                                 "PHRQuad": penalty_phr}


def penalty_derivative(penalty: Penalty, y: torch.Tensor, rho: torch.Tensor, mu: torch.Tensor
                       ) -> torch.Tensor:
    """``dP/dy`` per sample (autograd on the scalar constraint values)."""
    with torch.enable_grad():
        yy = y.detach().clone().requires_grad_(True)
        (d,) = torch.autograd.grad(penalty(yy, rho, mu).sum(), yy)
    return d.detach()


def dlr_constraint(margin: torch.Tensor, logits: torch.Tensor, targeted: bool,
                   clean_range: torch.Tensor | None, tol: float) -> torch.Tensor:
    """``(-margin + tol) / normalization``: < 0 exactly when the margin exceeds ``tol``."""
    k = logits.shape[1]
    if targeted and k >= 4:
        top = logits.topk(4, dim=1).values
        norm = top[:, 0] - (top[:, 2] + top[:, 3]) / 2
    elif not targeted and k >= 3:
        top = logits.topk(3, dim=1).values
        norm = top[:, 0] - top[:, 2]
    else:
        assert clean_range is not None
        norm = clean_range
    return (-margin + tol) / (norm + 1e-8)


class ALMA(MinimumNormAttack):
    """Augmented Lagrangian attack (Rony et al., ICCV 2021), L2 and L1, targeted and untargeted.

    Args:
        norm: "l2" (default) or "l1": the distance minimized.
        steps: iterations, one forward and one backward pass each (paper: 1000; 100 with
            ``alpha=0.5``).
        alpha: the weight of the moving averages (multiplier, RMSProp, momentum; paper: 0.9).
        init_lr_distance: how far (in units of the span) the first step moves; ``None`` uses the
            authors' presets, 0.1 for L2 and 0.5 for L1.
        lr_init: the learning rate when ``init_lr_distance`` is 0 (disables the line search).
        lr_reduction: the final learning rate relative to the first (paper: 0.01).
        mu_init, rho_init: the first multiplier and penalty parameter (paper: 1, 1).
        check_steps, tau, gamma: every ``check_steps`` iterations ``rho`` is multiplied by
            ``gamma`` where the constraint did not fall below ``tau`` times its last checked value
            (paper: 10, 0.95, 1.2).
        penalty: "P2" (default, the paper's choice), "P1", "P3" or "PHRQuad".
        logit_tolerance: the margin a point needs to count as satisfying the constraint (1e-4).
        levels: quantize every iterate to ``levels`` values over the bounds (default: none).
        seed, generator: the random direction used where the first gradient is zero.

    Returns per sample the adversarial iterate with the smallest distance; a sample with none
    returns the **clean input** (``success`` False). With a mask only the elements inside it change.
    """

    name = "alma"

    def __init__(
        self,
        norm: str | Norm = "l2",
        *,
        steps: int = 1000,
        alpha: float = 0.9,
        init_lr_distance: float | None = None,
        lr_init: float = 0.1,
        lr_reduction: float = 0.01,
        mu_init: float = 1.0,
        rho_init: float = 1.0,
        check_steps: int = 10,
        tau: float = 0.95,
        gamma: float = 1.2,
        penalty: str = "P2",
        logit_tolerance: float = 1e-4,
        levels: int | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(norm, loss="margin", seed=seed, generator=generator)
        if self.norm.name not in ("l1", "l2"):
            raise ValueError(f"ALMA supports norm 'l2' or 'l1'; got {self.norm.name!r}")
        check_positive_int("steps", steps)
        check_positive_int("check_steps", check_steps)
        for name, v in (("alpha", alpha), ("tau", tau), ("lr_reduction", lr_reduction)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
                raise ValueError(f"{name} must lie in (0, 1); got {v!r}")
        for name, v in (("lr_init", lr_init), ("mu_init", mu_init), ("rho_init", rho_init),
                        ("gamma", gamma)):
            check_positive(name, v)
        if init_lr_distance is not None and not (
            isinstance(init_lr_distance, (int, float)) and 0 <= init_lr_distance < math.inf
        ):
            raise ValueError(f"init_lr_distance must be a finite number >= 0 or None; got "
                             f"{init_lr_distance!r}")
        if penalty not in PENALTIES:
            raise ValueError(f"unknown penalty {penalty!r}; expected one of {sorted(PENALTIES)}")
        if not (logit_tolerance >= 0):
            raise ValueError(f"logit_tolerance must be >= 0; got {logit_tolerance!r}")
        if levels is not None:
            check_positive_int("levels", levels, 2)
        self.steps = steps
        self.alpha = float(alpha)
        self.init_lr_distance = (
            (0.1 if self.norm.name == "l2" else 0.5) if init_lr_distance is None
            else float(init_lr_distance)
        )
        self.lr_init = float(lr_init)
        self.lr_reduction = float(lr_reduction)
        self.mu_init = float(mu_init)
        self.rho_init = float(rho_init)
        self.check_steps = check_steps
        self.tau = float(tau)
        self.gamma = float(gamma)
        self.penalty = penalty
        self.logit_tolerance = float(logit_tolerance)
        self.levels = levels

    @classmethod
    def fast_config(cls) -> dict[str, Any]:
        """Small settings for quick tests."""
        return {"steps": 30, "alpha": 0.5}

    def _distance(self, delta: torch.Tensor) -> torch.Tensor:
        d = flat(delta)
        return d.norm(dim=1) if self.norm.name == "l2" else d.abs().sum(1)

    def _distance_grad(self, delta: torch.Tensor) -> torch.Tensor:
        if self.norm.name == "l1":
            return delta.sign()
        n = flat(delta).norm(dim=1)
        return delta / batch_view(n.clamp_min(1e-12), delta)

    def _init_lr(self, u0: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Per sample the ``lr`` with ``D(clip(u0 - lr * g) - u0) = init_lr_distance``: doubling,
        then 20 bisection steps (adv-lib's ``init_lr_finder``)."""
        target = self.init_lr_distance

        def dist(lr: torch.Tensor) -> torch.Tensor:
            return self._distance((u0 - batch_view(lr, g) * g).clamp(0, 1) - u0)

        lr = torch.ones(u0.shape[0], dtype=u0.dtype, device=u0.device)
        lower = torch.zeros_like(lr)
        found = dist(lr) > target
        for _ in range(64):  # the distance is bounded by the box: stop doubling at some point
            if bool(found.all()):
                break
            lower = torch.where(found, lower, lr)
            lr = torch.where(found, lr, lr * 2)
            found = dist(lr) > target
        for _ in range(20):
            mid = (lower + lr) / 2
            larger = dist(mid) > target
            lower, lr = torch.where(larger, lower, mid), torch.where(larger, mid, lr)
        return (lr + lower) / 2

    def run(self, ctx: AttackContext) -> RunOutput:
        box = UnitBox(ctx)
        logits0 = ctx.logits(ctx.x)
        already = ctx.is_adversarial(logits0, ctx.all_index())
        best = _Best(ctx, logits0, already)
        idx = (~already).nonzero().flatten()
        k = logits0.shape[1]
        needs_clean = (ctx.targeted and k < 4) or (not ctx.targeted and k < 3)
        extra: dict[str, Any] = {"constraint": "clean-range" if needs_clean else "dlr"}
        if idx.numel() == 0:
            return RunOutput(best.adv, best.logits, extra=extra)
        n = idx.numel()
        u0 = box.u0[idx]
        dev, dt = u0.device, u0.dtype
        clean_range = None
        if needs_clean:
            z0 = logits0[idx]
            clean_range = (z0.amax(1) - z0.amin(1)).clamp_min(1e-6)
        penalty = PENALTIES[self.penalty]
        tol, targeted = self.logit_tolerance, ctx.targeted

        def constraint(logits: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
            pos = torch.searchsorted(idx, i)
            cr = None if clean_range is None else clean_range[pos]
            return dlr_constraint(ctx.criterion.margin(logits, i), logits, targeted, cr, tol)

        delta = torch.zeros_like(u0)
        square_avg = torch.ones_like(u0)
        momentum = torch.zeros_like(u0)
        lr = torch.full((n,), self.lr_init, dtype=dt, device=dev)
        mu = torch.full((n,), self.mu_init, dtype=dt, device=dev)
        rho = torch.full((n,), self.rho_init, dtype=dt, device=dev)
        found = torch.zeros(n, dtype=torch.bool, device=dev)
        step_found = torch.full((n,), float(self.steps + 1), dtype=dt, device=dev)
        prev_c = torch.zeros(n, dtype=dt, device=dev)
        a = self.alpha
        for i in range(self.steps):
            xa = box.to_model(u0 + delta, idx)
            logits, c, gc = ctx.value_and_grad(xa, idx, constraint)
            c = c.to(dt)
            if i == 0:
                prev_c = c
            elif (i + 1) % self.check_steps == 0:
                improved = c < self.tau * prev_c
                rho = torch.where(~(found | improved), self.gamma * rho, rho)
                prev_c = c
            if i:
                new_mu = penalty_derivative(penalty, c, rho, mu)
                mu = torch.lerp(mu, new_mu, 1 - a).clamp(1e-6, 1e12)
            is_adv = ctx.is_adversarial(logits, idx)
            dist = self._distance(delta).double()
            best.update(idx, xa, logits, dist, is_adv)
            step_found = torch.where(~found & is_adv, torch.full_like(step_found, float(i)),
                                     step_found)
            found |= is_adv
            coef = penalty_derivative(penalty, c, rho, mu)
            g = box.grad(gc) * batch_view(coef, gc)
            if i:
                g = g + self._distance_grad(delta)
            g = ctx.masked(g, idx)
            if i == 0 and self.init_lr_distance > 0:
                gn = flat(g).norm(dim=1)
                zero = gn <= 1e-6
                if zero.any():
                    r = ctx.masked(ctx.randn(*g.shape).to(dt), idx)
                    r = r / batch_view(flat(r).norm(dim=1).clamp_min(1e-12), r)
                    g = torch.where(batch_view(zero, g), r, g)
                lr = self._init_lr(u0, g)
            decay = self.lr_reduction ** (
                (i - step_found).clamp_min(0) / (self.steps - step_found))
            step = lr * decay
            square_avg = square_avg * a + (1 - a) * g * g
            momentum = momentum * a + g / (square_avg.sqrt() + 1e-8)
            u = (u0 + delta - batch_view(step, momentum) * momentum).clamp(0, 1)
            if self.levels is not None:
                u = quantize(u, self.levels)
            if ctx.mask is not None:
                u = torch.where(ctx.mask[idx] != 0, u, u0)
            delta = u - u0
        xa = box.to_model(u0 + delta, idx)  # the last iterate
        logits = ctx.logits(xa)
        best.update(idx, xa, logits, self._distance(delta).double(),
                    ctx.is_adversarial(logits, idx))
        return RunOutput(best.adv, best.logits, extra=extra)


__all__ = ["ALMA", "PENALTIES", "dlr_constraint"]
