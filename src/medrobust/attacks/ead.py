"""EAD: Elastic-net Attacks to DNNs (Chen, Sharma, Zhang, Yi & Hsieh, "EAD: Elastic-Net Attacks
to Deep Neural Networks via Adversarial Examples", AAAI 2018).

Minimize ``c * f(x') + ||x' - x||_2^2 + beta * ||x' - x||_1`` over the box, with ``f`` the C&W
margin loss with confidence ``kappa``. The smooth part ``g = c * f + ||.||_2^2`` takes a gradient
step of size ``lr_k = lr * (1 - k / steps)^0.5`` (the reference code's polynomial decay) and the L1
part is handled by the projected shrinkage-thresholding operator ``S_beta``:

    S(z)_i = min(z_i - beta, hi)  if z_i - x_i >  beta
             x_i                  if |z_i - x_i| <= beta
             max(z_i + beta, lo)  if z_i - x_i < -beta

(ISTA), with Nesterov's momentum ``y_{k+1} = x_{k+1} + k / (k + 3) (x_{k+1} - x_k)`` for FISTA;
the binary search over ``c`` is the one of Carlini & Wagner. The best adversarial example is
chosen by the elastic-net loss ("EN") or by the L1 distance ("L1"). This follows the authors'
reference code (``EAD/en_attack.py``), with one change: the iterates live in the unit box
``(x - lo) / (hi - lo)`` (:mod:`.unitbox`), so that the distances, ``beta``, the step size and
``initial_const`` are in units of the bounds' span (on ``[0, 1]`` exactly the reference); without
it a model in Hounsfield units (span 4095) needs constants millions of times larger.
"""

from __future__ import annotations

from typing import Any

import torch

from medrobust.attacks.base import AttackContext, MinimumNormAttack, RunOutput
from medrobust.attacks.carlini_wagner import (
    BinarySearchConst,
    _Best,
    check_common,
    cw_margin,
    kappa_success,
)
from medrobust.attacks.unitbox import UnitBox
from medrobust.norms import flat


def shrink(z: torch.Tensor, x: torch.Tensor, beta: float, lo: float, hi: float) -> torch.Tensor:
    """The projected shrinkage-thresholding operator ``S_beta`` onto the box ``[lo, hi]``."""
    d = z - x
    up = (z - beta).clamp(max=hi)
    down = (z + beta).clamp(min=lo)
    return torch.where(d > beta, up, torch.where(d < -beta, down, x))


class EAD(MinimumNormAttack):
    """Elastic-net attack (Chen et al., AAAI 2018), ISTA or FISTA, decision rule "EN" or "L1".

    Args:
        binary_search_steps: outer steps of the per-sample binary search over ``c`` (paper: 9).
        steps: iterations per outer step (paper: 1000).
        learning_rate: the initial step size, decayed as ``(1 - k / steps)^0.5`` (paper: 1e-2).
        initial_const: the first ``c`` (paper: 1e-3).
        beta: the L1 weight (paper's experiments: 1e-3 to 1e-1; default 1e-2 as in Foolbox).
        confidence: the logit margin ``kappa`` a result must reach (paper: 0).
        decision_rule: "EN" (elastic-net loss ``||d||_2^2 + beta ||d||_1``) or "L1": how the best
            successful iterate is chosen.
        fista: FISTA (default, the paper's main algorithm) or plain ISTA.
        abort_early: every ``steps // 10`` iterations, a sample whose loss has not decreased by
            0.01% stops its outer step (the reference test, per sample).
        seed, generator: accepted for a uniform interface; the attack is deterministic.

    Returns per sample the best successful iterate over all iterations and outer steps under the
    decision rule; a sample with no adversarial example found returns the **clean input**
    (``success`` False). With a mask only the elements inside it change; unchanged elements stay
    bit-identical to the input.
    """

    name = "ead"

    def __init__(
        self,
        *,
        binary_search_steps: int = 9,
        steps: int = 1000,
        learning_rate: float = 1e-2,
        initial_const: float = 1e-3,
        beta: float = 1e-2,
        confidence: float = 0.0,
        decision_rule: str = "EN",
        fista: bool = True,
        abort_early: bool = True,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__("l1", seed=seed, generator=generator)
        check_common(steps, binary_search_steps, initial_const, confidence, learning_rate)
        if not (beta >= 0):
            raise ValueError(f"beta must be >= 0; got {beta!r}")
        rule = str(decision_rule).upper()
        if rule not in ("EN", "L1"):
            raise ValueError(f"decision_rule must be 'EN' or 'L1'; got {decision_rule!r}")
        self.binary_search_steps = binary_search_steps
        self.steps = steps
        self.learning_rate = float(learning_rate)
        self.initial_const = float(initial_const)
        self.beta = float(beta)
        self.confidence = float(confidence)
        self.decision_rule = rule
        self.fista = bool(fista)
        self.abort_early = bool(abort_early)

    @classmethod
    def fast_config(cls) -> dict[str, Any]:
        """Small settings for quick tests."""
        return {"binary_search_steps": 3, "steps": 20}

    def run(self, ctx: AttackContext) -> RunOutput:
        x0, y, t = ctx.x, ctx.labels, ctx.target
        box = UnitBox(ctx)  # iterates in [0, 1]: the same attack at any bounds
        kappa, beta = self.confidence, self.beta
        logits0 = ctx.logits(x0)
        already = ctx.is_adversarial(logits0, ctx.all_index())
        best = _Best(ctx, logits0, already)
        search = BinarySearchConst(ctx.n, self.initial_const, x0.device)
        todo = (~already).nonzero().flatten()
        check_every = max(self.steps // 10, 1)
        for _outer in range(self.binary_search_steps):
            if todo.numel() == 0:
                break
            gidx = todo
            m = gidx.numel()
            found = torch.zeros(m, dtype=torch.bool, device=x0.device)
            prev = torch.full((m,), float("inf"), dtype=torch.float64, device=x0.device)
            # the active set: rows of gidx still iterating, with their state
            pos = torch.arange(m, device=x0.device)
            xs = box.u0[gidx]
            xk, yk = xs.clone(), xs.clone()
            for it in range(self.steps):
                ga = gidx[pos]
                xsa = xs if pos.numel() == m else xs[pos]
                ya = y[ga]
                ta = None if t is None else t[ga]
                ca = search.const[ga].to(x0.dtype)
                msa = None if ctx.mask is None else ctx.mask[ga]

                def loss_fn(logits: torch.Tensor, i: torch.Tensor, ya: torch.Tensor = ya,
                            ta: torch.Tensor | None = ta, ca: torch.Tensor = ca
                            ) -> torch.Tensor:
                    tt = None if ta is None else ta[i]
                    return ca[i] * cw_margin(logits, ya[i], tt).clamp_min(-kappa)

                local = torch.arange(pos.numel(), device=x0.device)
                ylog, _, gx = ctx.value_and_grad(box.to_model(yk, ga), local, loss_fn)
                if not self.fista and it > 0:
                    # ISTA: y_k is x_k, so its logits decide success of the previous iterate
                    self._record(best, box, ga, xk, xsa, ylog, ya, ta, found, pos)
                g = box.grad(gx) + 2 * (yk - xsa)
                if msa is not None:
                    g = g * msa
                lr = self.learning_rate * (1 - it / self.steps) ** 0.5
                xnew = shrink(yk - lr * g, xsa, beta, 0.0, 1.0)
                if self.fista:
                    yk = xnew + (it / (it + 3)) * (xnew - xk)
                else:
                    yk = xnew
                xk = xnew
                last = it == self.steps - 1
                check = self.abort_early and it % check_every == 0
                if self.fista or last or check:
                    xlog = ctx.logits(box.to_model(xk, ga))
                    self._record(best, box, ga, xk, xsa, xlog, ya, ta, found, pos)
                if check:
                    d = flat(xk - xsa).double()
                    closs = (ca.double() * cw_margin(xlog, ya, ta).double().clamp_min(-kappa))
                    loss = closs + d.pow(2).sum(1) + beta * d.abs().sum(1)
                    stalled = loss > prev[pos] * 0.9999
                    prev[pos] = loss
                    if stalled.any():
                        keep = ~stalled
                        pos, xk, yk = pos[keep], xk[keep], yk[keep]
                        if pos.numel() == 0:
                            break
            search.update(gidx, found)
        return RunOutput(best.adv, best.logits,
                         extra={"const": search.const.cpu(), "upper": search.upper.cpu()})

    def _record(self, best: _Best, box: UnitBox, ga: torch.Tensor, xk: torch.Tensor,
                xs: torch.Tensor,
                logits: torch.Tensor, ya: torch.Tensor, ta: torch.Tensor | None,
                found: torch.Tensor, pos: torch.Tensor) -> None:
        ok = kappa_success(logits, ya, ta, self.confidence)
        found[pos] |= ok
        d = flat(xk - xs).double()
        l1 = d.abs().sum(1)
        score = l1 if self.decision_rule == "L1" else d.pow(2).sum(1) + self.beta * l1
        best.update(ga, box.to_model(xk, ga), logits, score, ok)


__all__ = ["EAD", "shrink"]
