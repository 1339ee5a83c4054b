"""Carlini-Wagner L2 (Carlini & Wagner, "Towards Evaluating the Robustness of Neural Networks",
IEEE S&P 2017).

Minimize ``||(x' - x) / (hi - lo)||_2^2 + c * f(x')`` over
``x' = lo + (hi - lo) * (tanh(w) + 1) / 2`` (the change of variables keeps ``x'`` inside the
model's bounds) with Adam, where
``f(x') = max(z_y - max_{j != y} z_j, -kappa)`` (untargeted) or
``max(max_{j != t} z_j - z_t, -kappa)`` (targeted), and a per-sample binary search over ``c``.
This follows the authors' reference code (``nn_robust_attacks/l2_attack.py``) step by step, with
one change: the distance is measured in units of the bounds' span (on ``[0, 1]`` the same as the
reference), so that ``initial_const`` and the learning rate (already in tanh space) mean the same
at any bounds; without it a model in Hounsfield units (span 4095) needs a ``c`` 4095^2 times
larger, which the binary search from 1e-3 does not reach.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from medrobust.attacks.base import AttackContext, MinimumNormAttack, RunOutput
from medrobust.norms import flat

_UPPER_INIT = 1e10


def cw_margin(logits: torch.Tensor, labels: torch.Tensor, target: torch.Tensor | None
              ) -> torch.Tensor:
    """``z_y - max_{j != y} z_j`` (untargeted) or ``max_{j != t} z_j - z_t`` (targeted): the
    amount by which the sample is *not yet* adversarial (< 0 means adversarial)."""
    cls = labels if target is None else target
    own = logits.gather(1, cls.unsqueeze(1)).squeeze(1)
    other = logits.scatter(1, cls.unsqueeze(1), float("-inf")).amax(1)
    return own - other if target is None else other - own


def kappa_success(logits: torch.Tensor, labels: torch.Tensor, target: torch.Tensor | None,
                  kappa: float) -> torch.Tensor:
    """The reference code's ``compare``: adversarial with a logit margin of at least ``kappa``
    (for ``kappa = 0``: the model's decision meets the goal)."""
    z = logits.clone()
    rows = torch.arange(z.shape[0], device=z.device)
    if target is None:
        z[rows, labels] += kappa
        return z.argmax(1) != labels
    z[rows, target] -= kappa
    return z.argmax(1) == target


class BinarySearchConst:
    """The per-sample binary search over ``c`` of the reference code: after a successful outer
    step ``upper = min(upper, c)``, else ``lower = max(lower, c)``; ``c`` becomes the midpoint once
    an upper bound is known, and grows tenfold before."""

    def __init__(self, n: int, initial_const: float, device: torch.device) -> None:
        self.const = torch.full((n,), float(initial_const), dtype=torch.float64, device=device)
        self.lower = torch.zeros(n, dtype=torch.float64, device=device)
        self.upper = torch.full((n,), _UPPER_INIT, dtype=torch.float64, device=device)

    def use_upper(self) -> None:
        """The reference code's ``repeat``: the last outer step runs at the upper bound."""
        self.const = torch.where(self.upper < _UPPER_INIT, self.upper, self.const)

    def update(self, index: torch.Tensor, success: torch.Tensor) -> None:
        c, lo, up = self.const[index], self.lower[index], self.upper[index]
        up = torch.where(success, torch.minimum(up, c), up)
        lo = torch.where(success, lo, torch.maximum(lo, c))
        known = up < _UPPER_INIT * 0.1
        c = torch.where(known, (lo + up) / 2, c * 10)
        self.const[index], self.lower[index], self.upper[index] = c, lo, up


class _Adam:
    """Adam on a tensor of parameters (TensorFlow's defaults, as in the reference code), with
    per-element state so that every sample of the batch is optimized independently."""

    def __init__(self, w: torch.Tensor, lr: float) -> None:
        self.m = torch.zeros_like(w)
        self.v = torch.zeros_like(w)
        self.lr, self.b1, self.b2, self.eps = lr, 0.9, 0.999, 1e-8
        self.t = 0

    def step(self, w: torch.Tensor, g: torch.Tensor, sel: torch.Tensor | None) -> None:
        """One step on the rows ``sel`` of ``w`` (all rows when ``None``)."""
        self.t += 1
        b1t, b2t = 1 - self.b1**self.t, 1 - self.b2**self.t
        lr = self.lr * math.sqrt(b2t) / b1t
        if sel is None:
            self.m.mul_(self.b1).add_(g, alpha=1 - self.b1)
            self.v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
            w.addcdiv_(self.m, self.v.sqrt().add_(self.eps), value=-lr)
            return
        m = self.m[sel].mul_(self.b1).add_(g, alpha=1 - self.b1)
        v = self.v[sel].mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
        self.m[sel], self.v[sel] = m, v
        w[sel] = w[sel] - lr * m / (v.sqrt() + self.eps)


class _Best:
    """Per sample: the smallest successful perturbation found so far, with its logits."""

    def __init__(self, ctx: AttackContext, logits0: torch.Tensor, already: torch.Tensor) -> None:
        self.adv = ctx.x.clone()
        self.logits = logits0.clone()
        self.dist = torch.full((ctx.n,), float("inf"), dtype=torch.float64, device=ctx.x.device)
        self.dist[already] = 0.0

    def update(self, gidx: torch.Tensor, xa: torch.Tensor, logits: torch.Tensor,
               dist: torch.Tensor, success: torch.Tensor) -> None:
        better = success & (dist < self.dist[gidx])
        if better.any():
            sel = gidx[better]
            self.adv[sel] = xa[better]
            self.logits[sel] = logits[better].to(self.logits.dtype)
            self.dist[sel] = dist[better]


def check_common(steps: int, binary_search_steps: int, initial_const: float, confidence: float,
                 learning_rate: float) -> None:
    for name, v in (("steps", steps), ("binary_search_steps", binary_search_steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer; got {v!r}")
    if not (initial_const > 0) or not math.isfinite(initial_const):
        raise ValueError(f"initial_const must be a finite number > 0; got {initial_const!r}")
    if not (confidence >= 0) or not math.isfinite(confidence):
        raise ValueError(f"confidence must be a finite number >= 0; got {confidence!r}")
    if not (learning_rate > 0) or not math.isfinite(learning_rate):
        raise ValueError(f"learning rate must be a finite number > 0; got {learning_rate!r}")


class CarliniWagnerL2(MinimumNormAttack):
    """Carlini & Wagner's L2 attack (IEEE S&P 2017), targeted and untargeted.

    Args:
        binary_search_steps: outer steps of the per-sample binary search over ``c`` (paper: 9).
        steps: Adam iterations per outer step. The paper uses 10000; the default here is 1000
            because with ``abort_early`` the reference code rarely runs past a few hundred
            iterations on small images, while 9 x 10000 gradient evaluations per sample are
            impractical for 3D volumes. Pass ``steps=10000`` for the paper's setting.
        learning_rate: Adam's step size in tanh space (paper: 1e-2).
        initial_const: the first ``c`` (paper: 1e-3).
        confidence: the logit margin ``kappa`` a result must reach (paper: 0).
        abort_early: every ``steps // 10`` iterations, a sample whose loss has not decreased by
            0.01% since the last check stops its outer step (the reference code's test, applied per
            sample rather than to the batch's summed loss, so samples leave the loop separately).
        seed, generator: accepted for a uniform interface; the attack is deterministic.

    Returns per sample the smallest successful perturbation found over all iterations and outer
    steps. A sample for which no adversarial example was found returns the **clean input** (so its
    perturbation norms are 0 and ``success`` is False). With a mask only the elements inside it are
    optimized. Elements whose tanh variable never moved are returned bit-identical to the input.
    """

    name = "carlini_wagner_l2"

    def __init__(
        self,
        *,
        binary_search_steps: int = 9,
        steps: int = 1000,
        learning_rate: float = 1e-2,
        initial_const: float = 1e-3,
        confidence: float = 0.0,
        abort_early: bool = True,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__("l2", seed=seed, generator=generator)
        check_common(steps, binary_search_steps, initial_const, confidence, learning_rate)
        self.binary_search_steps = binary_search_steps
        self.steps = steps
        self.learning_rate = float(learning_rate)
        self.initial_const = float(initial_const)
        self.confidence = float(confidence)
        self.abort_early = bool(abort_early)

    @classmethod
    def fast_config(cls) -> dict[str, Any]:
        """Small settings for quick tests."""
        return {"binary_search_steps": 3, "steps": 20}

    def run(self, ctx: AttackContext) -> RunOutput:
        x0, y, t = ctx.x, ctx.labels, ctx.target
        lo, hi = ctx.bounds
        half = (hi - lo) / 2
        span = hi - lo  # distances in units of the span: the same attack at any bounds
        kappa = self.confidence
        logits0 = ctx.logits(x0)
        already = ctx.is_adversarial(logits0, ctx.all_index())
        best = _Best(ctx, logits0, already)
        # tanh space; the factor keeps atanh finite at the bounds (reference: * 0.999999)
        w0 = torch.atanh(((x0 - lo) / half - 1).clamp(-1, 1) * 0.999999)
        search = BinarySearchConst(ctx.n, self.initial_const, x0.device)
        todo = (~already).nonzero().flatten()
        check_every = max(self.steps // 10, 1)
        for outer in range(self.binary_search_steps):
            if todo.numel() == 0:
                break
            if self.binary_search_steps >= 10 and outer == self.binary_search_steps - 1:
                search.use_upper()
            gidx = todo
            xs, ws = x0[gidx], w0[gidx]
            ms = None if ctx.mask is None else ctx.mask[gidx]
            ys = y[gidx]
            ts = None if t is None else t[gidx]
            const = search.const[gidx].to(x0.dtype)
            w = ws.clone()
            adam = _Adam(w, self.learning_rate)
            found = torch.zeros(gidx.numel(), dtype=torch.bool, device=x0.device)
            prev = torch.full((gidx.numel(),), float("inf"), dtype=torch.float64,
                              device=x0.device)
            act: torch.Tensor | None = None  # positions still optimizing; None = all
            for it in range(self.steps):
                if act is None:
                    wa, wsa, xsa, ysa, tsa, ca, msa = w, ws, xs, ys, ts, const, ms
                    ga = gidx
                else:
                    wa, wsa, xsa = w[act], ws[act], xs[act]
                    ysa, tsa, ca = ys[act], None if ts is None else ts[act], const[act]
                    msa = None if ms is None else ms[act]
                    ga = gidx[act]
                th = torch.tanh(wa)
                xa = torch.where(wa == wsa, xsa, (th + 1) * half + lo).clamp(lo, hi)

                def loss_fn(logits: torch.Tensor, i: torch.Tensor, ysa: torch.Tensor = ysa,
                            tsa: torch.Tensor | None = tsa, ca: torch.Tensor = ca
                            ) -> torch.Tensor:
                    tt = None if tsa is None else tsa[i]
                    return ca[i] * cw_margin(logits, ysa[i], tt).clamp_min(-kappa)

                pos = torch.arange(xa.shape[0], device=x0.device)
                logits, closs, gx = ctx.value_and_grad(xa, pos, loss_fn)
                delta = (xa - xsa) / span
                l2sq = flat(delta).double().pow(2).sum(1)
                ok = kappa_success(logits, ysa, tsa, kappa)
                best.update(ga, xa, logits, l2sq.sqrt(), ok)
                if act is None:
                    found |= ok
                else:
                    found[act] |= ok
                g = (gx + 2 * delta / span) * (half * (1 - th * th))
                if msa is not None:
                    g = g * msa
                adam.step(w, g, act)
                if self.abort_early and it % check_every == 0:
                    loss = l2sq + closs.double()
                    p = prev if act is None else prev[act]
                    stalled = loss > p * 0.9999
                    if act is None:
                        prev = loss
                        cur = torch.arange(gidx.numel(), device=x0.device)
                    else:
                        prev[act] = loss
                        cur = act
                    if stalled.any():
                        act = cur[~stalled]
                        if act.numel() == 0:
                            break
            search.update(gidx, found)
        return RunOutput(best.adv, best.logits,
                         extra={"const": search.const.cpu(), "upper": search.upper.cpu()})


__all__ = ["CarliniWagnerL2"]
