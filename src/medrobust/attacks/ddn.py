"""DDN: Decoupled Direction and Norm (Rony, Hafemann, Oliveira, Ben Ayed, Sabourin & Granger,
"Decoupling Direction and Norm for Efficient Gradient-Based L2 Adversarial Attacks and Defenses",
CVPR 2019).

The direction and the norm of the perturbation are optimized separately (Algorithm 1 of the
paper). At each step ``k``, with ``g`` the gradient of the loss (cross-entropy, ascended
untargeted, descended to the target):

    delta <- delta + alpha_k * g / ||g||_2                       (the direction)
    eps   <- eps * (1 - gamma) if x + delta_k is adversarial else eps * (1 + gamma)
    delta <- eps * delta / ||delta||_2, clipped to the box, optionally quantized to ``levels``

and the smallest adversarial iterate seen is kept per sample. The step ``alpha_k`` is annealed
from ``alpha_init`` to ``alpha_final`` with a cosine, as in the authors' library
(``adv_lib/attacks/decoupled_direction_norm.py``), and a zero gradient is replaced by a random
direction, as there.

Scale-free: the attack works in the unit box ``(x - lo) / (hi - lo)`` (:mod:`.unitbox`), so
``init_epsilon`` and the step sizes are in units of the bounds' span and a model in Hounsfield units
is attacked exactly as the same model on ``[0, 1]``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from medrobust.attacks.base import AttackContext, MinimumNormAttack, RunOutput
from medrobust.attacks.carlini_wagner import _Best
from medrobust.attacks.unitbox import UnitBox
from medrobust.norms import batch_view, flat

_TINY = 1e-12


def cosine_anneal(step: int, steps: int, start: float, end: float) -> float:
    """``end + (start - end) * (1 + cos(pi * step / steps)) / 2``: ``start`` at step 0, ``end``
    at the last step."""
    return end + (start - end) * (1 + math.cos(math.pi * step / steps)) / 2


def quantize(u: torch.Tensor, levels: int) -> torch.Tensor:
    """Round unit-box values to the grid ``k / (levels - 1)``."""
    return (u * (levels - 1)).round() / (levels - 1)


def check_positive_int(name: str, v: Any, minimum: int = 1) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {v!r}")


def check_positive(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v < math.inf):
        raise ValueError(f"{name} must be a finite number > 0; got {v!r}")


def clean_start(ctx: AttackContext) -> tuple[UnitBox, _Best, torch.Tensor]:
    """What the unit-box minimum-norm attacks (DDN, FMN) start from: the unit box, the per-sample
    best store seeded with the clean pass (a sample already adversarial is found at distance 0),
    and the indices of the samples still to attack."""
    box = UnitBox(ctx)
    logits0 = ctx.logits(ctx.x)
    already = ctx.is_adversarial(logits0, ctx.all_index())
    return box, _Best(ctx, logits0, already), (~already).nonzero().flatten()


class DDN(MinimumNormAttack):
    """Decoupled Direction and Norm L2 attack (Rony et al., CVPR 2019), targeted and untargeted.

    Args:
        steps: optimization steps, one forward and one backward pass each (paper: 100 to 1000).
        init_epsilon: the first norm, in units of the span ``hi - lo`` (paper: 1 on [0, 1]).
        gamma: the factor by which the norm shrinks after an adversarial iterate and grows after
            a non-adversarial one (paper: 0.05).
        alpha_init, alpha_final: the step size, annealed with a cosine from the first to the last
            (the authors' library: 1 to 0.01; the paper's fixed step is ``alpha_final=alpha_init``).
        levels: if given, every iterate is quantized to ``levels`` values over the bounds (the
            paper's 256 for 8-bit images; for integer HU data ``hi - lo + 1``); ``None`` (default)
            keeps continuous values, since medical bounds are often not an 8-bit grid.
        loss: "ce" (the paper) or "margin".
        seed, generator: the random direction used where a gradient is exactly zero.

    Returns per sample the smallest-L2 adversarial iterate; a sample with none returns the
    **clean input** (``success`` False). With a mask only the elements inside it change.
    """

    name = "ddn"

    def __init__(
        self,
        *,
        steps: int = 100,
        init_epsilon: float = 1.0,
        gamma: float = 0.05,
        alpha_init: float = 1.0,
        alpha_final: float = 0.01,
        levels: int | None = None,
        loss: str = "ce",
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__("l2", loss=loss, seed=seed, generator=generator)
        check_positive_int("steps", steps)
        check_positive("init_epsilon", init_epsilon)
        check_positive("alpha_init", alpha_init)
        check_positive("alpha_final", alpha_final)
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 < gamma < 1:
            raise ValueError(f"gamma must lie in (0, 1); got {gamma!r}")
        if levels is not None:
            check_positive_int("levels", levels, 2)
        self.steps = steps
        self.init_epsilon = float(init_epsilon)
        self.gamma = float(gamma)
        self.alpha_init = float(alpha_init)
        self.alpha_final = float(alpha_final)
        self.levels = levels

    @classmethod
    def fast_config(cls) -> dict[str, Any]:
        """Small settings for quick tests."""
        return {"steps": 20}

    def run(self, ctx: AttackContext) -> RunOutput:
        box, best, idx = clean_start(ctx)
        if idx.numel() == 0:
            return RunOutput(best.adv, best.logits)
        u0 = box.u0[idx]
        mask = None if ctx.mask is None else ctx.mask[idx]
        far = torch.maximum(u0, 1 - u0)
        worst = flat(far if mask is None else far * mask).norm(dim=1)
        delta = torch.zeros_like(u0)
        eps = torch.full_like(worst, self.init_epsilon)
        for i in range(self.steps):
            xa = box.to_model(u0 + delta, idx)
            logits, _, gx = ctx.value_and_grad(xa, idx)
            is_adv = ctx.is_adversarial(logits, idx)
            l2 = flat(delta).double().norm(dim=1)
            best.update(idx, xa, logits, l2, is_adv)
            g = ctx.masked(box.grad(gx), idx)
            gn = flat(g).norm(dim=1)
            zero = gn < _TINY
            if zero.any():  # a random direction where the gradient vanishes (as adv-lib)
                r = ctx.randn(*g.shape).to(g.dtype)
                r = ctx.masked(r, idx)
                g = torch.where(batch_view(zero, g), r, g)
                gn = flat(g).norm(dim=1)
            alpha = cosine_anneal(i, self.steps, self.alpha_init, self.alpha_final)
            delta = delta + alpha * g / batch_view(gn.clamp_min(_TINY), g)
            eps = torch.where(is_adv, eps * (1 - self.gamma), eps * (1 + self.gamma))
            eps = torch.minimum(eps, worst)
            dn = flat(delta).norm(dim=1).clamp_min(_TINY)
            delta = delta * batch_view(eps / dn, delta)
            u = (u0 + delta).clamp(0, 1)
            if self.levels is not None:
                u = quantize(u, self.levels)
                if mask is not None:
                    u = torch.where(mask != 0, u, u0)
            delta = u - u0
        xa = box.to_model(u0 + delta, idx)  # the last iterate
        logits = ctx.logits(xa)
        best.update(idx, xa, logits, flat(delta).double().norm(dim=1),
                    ctx.is_adversarial(logits, idx))
        return RunOutput(best.adv, best.logits)


__all__ = ["DDN", "cosine_anneal", "quantize"]
