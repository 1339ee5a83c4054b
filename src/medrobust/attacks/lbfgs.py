"""L-BFGS attack (Szegedy et al., "Intriguing properties of neural networks", ICLR 2014).

The paper's box-constrained optimization: for a constant ``c``, minimize

    ||r||_2^2 + c * loss_f(x + r)   subject to   x + r in [lo, hi]

with L-BFGS-B, and search over ``c`` for the smallest one whose minimizer is adversarial. (The
paper writes ``c |r| + loss_f`` and asks for the "minimum c"; with ``c`` on the distance the
meaningful search is for the largest one, which is the same problem as the smallest ``c`` on the
loss written here. The squared norm, as in Foolbox's implementation, keeps the objective smooth.)
``loss_f`` is the cross-entropy to the target (targeted, as in the paper) or, untargeted,
``-log(1 - p_y)``: the cross-entropy of "any class but the label", which is bounded below so that
the minimizer stays finite.

Batched: all samples of the batch are solved by one call of scipy's L-BFGS-B on the flattened
batch, whose objective is a sum of per-sample terms (each with its own ``c``), so the minimizer is
each sample's minimizer. The box is given to L-BFGS-B per element; elements outside the mask get the
degenerate box ``[x_i, x_i]``.

Scale-free: the variables are those of the unit box ``(x - lo) / (hi - lo)`` (:mod:`.unitbox`), so
``||r||`` is measured in units of the bounds' span and ``initial_const`` and the solver's
tolerances mean the same on a model in Hounsfield units as on ``[0, 1]`` (where nothing changes).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import Bounds, minimize

from medrobust.attacks.base import AttackContext, MinimumNormAttack, RunOutput
from medrobust.attacks.carlini_wagner import _Best
from medrobust.attacks.unitbox import UnitBox
from medrobust.norms import flat


def _one_blas_thread() -> contextlib.AbstractContextManager[Any]:
    """L-BFGS-B's vector operations are memory-bound BLAS level-1 calls; a multi-threaded BLAS only
    adds contention (10x slower on a loaded machine). Limited for the solve when threadpoolctl is
    installed (restored after); otherwise nothing changes."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - optional
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def lbfgs_loss(logits: torch.Tensor, labels: torch.Tensor, target: torch.Tensor | None
               ) -> torch.Tensor:
    """Per-sample ``loss_f``: CE to the target, or ``-log(1 - p_label)`` untargeted."""
    if target is not None:
        return F.cross_entropy(logits, target, reduction="none")
    other = logits.scatter(1, labels.unsqueeze(1), float("-inf"))
    return torch.logsumexp(logits, 1) - torch.logsumexp(other, 1)


class LBFGS(MinimumNormAttack):
    """Box-constrained L-BFGS attack (Szegedy et al., ICLR 2014), targeted and untargeted.

    Args:
        steps: the maximum L-BFGS-B iterations per solve (Foolbox's default: 150; the paper gives
            none).
        search_steps: the number of solves in the search over ``c``: ``c`` grows tenfold from
            ``initial_const`` until the minimizer is adversarial, then bisects between the largest
            failing and the smallest succeeding ``c`` (default 10).
        initial_const: the first ``c`` (default 1e-2).
        rtol: a sample stops searching when ``upper - lower <= rtol * upper`` (default 1e-2).
        memory: L-BFGS's history size (default 10).
        seed, generator: accepted for a uniform interface; the attack is deterministic.

    Per sample the result is the smallest-L2 adversarial point among all points L-BFGS-B evaluated
    (the minimizers and the iterates before them); a sample for which none was found returns the
    **clean input** (``success`` False).
    """

    name = "lbfgs"

    def __init__(
        self,
        *,
        steps: int = 150,
        search_steps: int = 10,
        initial_const: float = 1e-2,
        rtol: float = 1e-2,
        memory: int = 10,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__("l2", seed=seed, generator=generator)
        for name, v in (("steps", steps), ("search_steps", search_steps), ("memory", memory)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer; got {v!r}")
        if not (initial_const > 0) or not math.isfinite(initial_const):
            raise ValueError(f"initial_const must be a finite number > 0; got {initial_const!r}")
        if not (0 < rtol < 1):
            raise ValueError(f"rtol must lie in (0, 1); got {rtol!r}")
        self.steps = steps
        self.search_steps = search_steps
        self.initial_const = float(initial_const)
        self.rtol = float(rtol)
        self.memory = memory

    @classmethod
    def fast_config(cls) -> dict[str, Any]:
        """Small settings for quick tests."""
        return {"steps": 20, "search_steps": 4}

    def run(self, ctx: AttackContext) -> RunOutput:
        x0, y, t = ctx.x, ctx.labels, ctx.target
        box = UnitBox(ctx)  # solve in [0, 1]: the same attack at any bounds
        logits0 = ctx.logits(x0)
        already = ctx.is_adversarial(logits0, ctx.all_index())
        best = _Best(ctx, logits0, already)
        dev = x0.device
        const = torch.full((ctx.n,), self.initial_const, dtype=torch.float64)
        lower = torch.zeros(ctx.n, dtype=torch.float64)
        upper = torch.full((ctx.n,), math.inf, dtype=torch.float64)
        searching = (~already).cpu()
        for _ in range(self.search_steps):
            idx = searching.nonzero().flatten()
            if idx.numel() == 0:
                break
            gidx = idx.to(dev)
            xs = box.u0[gidx]
            xs_np = flat(xs).double().cpu().numpy().ravel()
            lo_np = np.zeros_like(xs_np)
            hi_np = np.ones_like(xs_np)
            if ctx.mask is not None:
                fixed = flat(ctx.mask[gidx]).cpu().numpy().ravel() == 0
                lo_np[fixed] = xs_np[fixed]
                hi_np[fixed] = xs_np[fixed]
            ys = y[gidx]
            ts = None if t is None else t[gidx]
            cs = const[idx].to(device=dev, dtype=x0.dtype)
            pos = torch.arange(idx.numel(), device=dev)

            def loss_fn(logits: torch.Tensor, i: torch.Tensor, ys: torch.Tensor = ys,
                        ts: torch.Tensor | None = ts, cs: torch.Tensor = cs) -> torch.Tensor:
                return cs[i] * lbfgs_loss(logits, ys[i], None if ts is None else ts[i])

            def objective(z: np.ndarray, xs: torch.Tensor = xs, gidx: torch.Tensor = gidx,
                          ys: torch.Tensor = ys, ts: torch.Tensor | None = ts,
                          pos: torch.Tensor = pos, loss_fn: Any = loss_fn
                          ) -> tuple[float, np.ndarray]:
                ua = torch.from_numpy(z).view(xs.shape).to(device=dev, dtype=x0.dtype)
                xa = box.to_model(ua, gidx)
                logits, closs, gx = ctx.value_and_grad(xa, pos, loss_fn)
                d = (ua - xs).double()
                l2sq = flat(d).pow(2).sum(1)
                ok = ctx.is_adversarial(logits, gidx)
                best.update(gidx, xa, logits, l2sq.sqrt(), ok)
                value = float((l2sq + closs.double()).sum())
                grad = (box.grad(gx).double() + 2 * d).cpu().numpy().ravel()
                return value, grad

            with _one_blas_thread():
                sol = minimize(objective, xs_np, jac=True, method="L-BFGS-B",
                               bounds=Bounds(lo_np, hi_np),
                               options={"maxcor": self.memory, "maxiter": self.steps,
                                        "ftol": 1e7 * np.finfo(float).eps, "gtol": 1e-8})
            z = sol.x
            ua = torch.from_numpy(z).view(xs.shape).to(device=dev, dtype=x0.dtype)
            za = box.to_model(ua, gidx)
            logits = ctx.logits(za)
            ok = ctx.is_adversarial(logits, gidx)
            best.update(gidx, za, logits, flat(ua - xs).double().norm(dim=1), ok)
            ok_c = ok.cpu()
            c = const[idx]
            up = torch.where(ok_c, torch.minimum(upper[idx], c), upper[idx])
            low = torch.where(ok_c, lower[idx], torch.maximum(lower[idx], c))
            known = torch.isfinite(up)
            const[idx] = torch.where(known, (low + up) / 2, c * 10)
            upper[idx], lower[idx] = up, low
            searching[idx] = ~(known & (up - low <= self.rtol * up))
        return RunOutput(best.adv, best.logits,
                         extra={"const": upper.where(torch.isfinite(upper), const)})


__all__ = ["LBFGS", "lbfgs_loss"]
