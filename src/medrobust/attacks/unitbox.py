"""The model's box ``[lo, hi]`` seen as the unit box ``[0, 1]``, so that an attack's step sizes and
constants mean the same thing at any bounds.

A minimum-norm attack whose constants were tuned on ``[0, 1]`` images (an initial norm, a step
size, a distance weight) behaves very differently on a CT model in Hounsfield units, whose span is
4095: every distance is 4095 times larger and every input gradient 4095 times smaller. Working in
``u = (x - lo) / (hi - lo)`` makes the attack exactly the same on a model with any bounds as on the
same model composed with the affine map onto ``[0, 1]`` (up to float rounding): distances are
measured in units of the span, and the gradient with respect to ``u`` is ``span * dL/dx``.
"""

from __future__ import annotations

import torch

from medrobust.attacks.base import AttackContext


class UnitBox:
    """Maps between the model's units and the unit box for the inputs of one attack call.

    Attributes:
        lo, span: the model's lower bound and ``hi - lo``.
        u0: the clean inputs in the unit box ``(N, ...)``.
    """

    def __init__(self, ctx: AttackContext) -> None:
        lo, hi = ctx.bounds
        self.lo = float(lo)
        self.span = float(hi - lo)
        self.x0 = ctx.x
        self.u0 = self.to_unit(ctx.x)

    def to_unit(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.lo) / self.span).clamp(0, 1)

    def to_model(self, u: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Inputs in the model's units for unit-box points ``u`` of the rows ``index``; elements
        equal to the clean ``u0`` come back bit-identical to the clean input."""
        x = (self.lo + self.span * u).clamp(self.lo, self.lo + self.span).to(self.x0.dtype)
        return torch.where(u == self.u0[index], self.x0[index], x)

    def grad(self, grad_x: torch.Tensor) -> torch.Tensor:
        """The gradient with respect to ``u`` from the gradient with respect to ``x``."""
        return grad_x * self.span


__all__ = ["UnitBox"]
