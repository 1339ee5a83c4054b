"""RP2-style robust physical perturbation: confined to a region, smooth, and robust to scanner-like
changes of the image.

Eykholt, Evtimov, Fernandes, Li, Rahmati, Xiao, Prakash, Kohno & Song, "Robust Physical-World
Attacks on Deep Learning Visual Classification", CVPR 2018 (RP2): the perturbation ``delta`` is
confined to a region mask ``M`` (the ``mask`` argument: e.g. a lesion or a region an attacker can
touch) and optimized over a distribution of transformations ``T`` of the physical conditions,

    max_delta  E_{t ~ T} loss(f(t(x + M delta)))  -  lambda TV(M delta)

with a total-variation term so the perturbation is smooth enough to survive. Here ``T`` models
scanner-like changes (instead of the paper's viewing distances and angles): additive Gaussian noise,
a Gaussian blur, an intensity drift (gain and offset), and small rotations and shifts. The
budget is a hard eps-ball under the norm (the paper's ``lambda ||M delta||_p`` as a constraint),
with projected sign-gradient (L-inf) or normalized-gradient (L2) steps on the EOT mean.

Success is reported twice: on the returned image (``success``, as every attack) and under a fresh
set of transformations not used in the optimization (``extra["transform_success"]``: per sample,
the fraction of ``eval_draws`` new draws that are adversarial). 2-D images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from medrobust.attacks.base import AttackContext, FixedBudgetAttack, RunOutput
from medrobust.norms import Norm, batch_view

__all__ = ["RP2", "ScannerTransforms", "scanner_transform", "total_variation"]


@dataclass(frozen=True)
class ScannerTransforms:
    """The transformation distribution, in fractions of the bounds' range and in pixels/degrees:
    noise standard deviation, max blur sigma (pixels), max gain change and offset (intensity
    drift), max rotation (degrees), max shift (pixels)."""

    noise: float = 0.02
    blur: float = 1.0
    gain: float = 0.05
    offset: float = 0.03
    rotation: float = 5.0
    shift: float = 1.5


def total_variation(d: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation per sample (mean absolute neighbour difference)."""
    tv = d.new_zeros(d.shape[0])
    for axis in range(2, d.dim()):
        tv = tv + d.diff(dim=axis).abs().flatten(1).mean(1)
    return tv


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample Gaussian blur (separable, reflect padding); sigma in pixels."""
    k = 5
    t = torch.arange(k, device=x.device, dtype=x.dtype) - k // 2
    w = torch.exp(-0.5 * (t[None, :] / sigma.clamp_min(1e-3)[:, None]) ** 2)
    w = w / w.sum(1, keepdim=True)
    w = torch.where(sigma[:, None] < 1e-3, (t == 0).to(x.dtype).expand_as(w), w)
    n, c, h, wd = x.shape
    y = F.pad(x.reshape(1, n * c, h, wd), (k // 2, k // 2, k // 2, k // 2), mode="reflect")
    wk = w.repeat_interleave(c, 0)
    y = F.conv2d(y, wk.view(n * c, 1, 1, k), groups=n * c)
    y = F.conv2d(y, wk.view(n * c, 1, k, 1), groups=n * c)
    return y.view(n, c, h, wd)


def scanner_transform(x: torch.Tensor, bounds: tuple[float, float], spec: ScannerTransforms,
                      generator: torch.Generator) -> torch.Tensor:
    """One random draw of ``spec`` per image of ``x`` ``(N, C, H, W)``; differentiable in ``x``."""
    n, _, h, w = x.shape
    lo, hi = bounds
    span = hi - lo

    def u(a: float) -> torch.Tensor:
        r = 2 * torch.rand(n, generator=generator, dtype=torch.float64) - 1
        return (a * r).to(x.device, x.dtype)

    ang = u(spec.rotation) * math.pi / 180
    tx, ty = u(spec.shift) / (w / 2), u(spec.shift) / (h / 2)
    theta = torch.stack([
        torch.stack([ang.cos(), -ang.sin(), tx], 1),
        torch.stack([ang.sin(), ang.cos(), ty], 1),
    ], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    y = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    sigma = (u(spec.blur).abs()) if spec.blur > 0 else torch.zeros(n, device=x.device,
                                                                     dtype=x.dtype)
    y = _blur(y, sigma)
    gain = 1 + u(spec.gain)
    off = u(spec.offset) * span
    y = (y - lo) * batch_view(gain, y) + lo + batch_view(off, y)
    noise = torch.randn(y.shape, generator=generator, dtype=torch.float64).to(y.device, y.dtype)
    return (y + spec.noise * span * noise).clamp(lo, hi)


class RP2(FixedBudgetAttack):
    """RP2-style masked, smooth, transformation-robust perturbation (Eykholt et al., CVPR 2018).

    Args:
        eps, norm: the budget (``"linf"``, ``"l2"`` or ``"l1"``), in input units.
        steps: optimization steps.
        draws: transformations averaged per step (EOT).
        tv_weight: ``lambda``, the weight of the total-variation term, relative: its gradient is
            rescaled to the L1 norm of the loss gradient before weighting.
        step_size: the step in the norm's units (default ``2.5 eps / steps``).
        transforms: the :class:`ScannerTransforms` distribution.
        eval_draws: fresh transformations for ``extra["transform_success"]``.
        loss, seed, generator: as every attack.
    """

    name = "rp2"
    spatial_ranks = (2,)

    def __init__(
        self,
        eps: float | torch.Tensor,
        norm: str | Norm = "linf",
        *,
        steps: int = 50,
        draws: int = 8,
        tv_weight: float = 0.1,
        step_size: float | None = None,
        transforms: ScannerTransforms | None = None,
        eval_draws: int = 16,
        loss: str = "ce",
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(eps, norm, loss=loss, seed=seed, generator=generator)
        for name, v in (("steps", steps), ("draws", draws), ("eval_draws", eval_draws)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer; got {v!r}")
        if not tv_weight >= 0:
            raise ValueError(f"tv_weight must be >= 0; got {tv_weight!r}")
        if step_size is not None and not step_size > 0:
            raise ValueError(f"step_size must be > 0; got {step_size!r}")
        self.steps = steps
        self.draws = draws
        self.tv_weight = float(tv_weight)
        self.step_size = step_size
        self.transforms = transforms if transforms is not None else ScannerTransforms()
        self.eval_draws = eval_draws

    def config(self) -> dict[str, Any]:
        out = super().config()
        out["transforms"] = self.transforms.__dict__
        return out

    def _eot(self, ctx: AttackContext, xa: torch.Tensor, draws: int,
             g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``draws`` transformed copies of ``xa`` stacked ``(draws * N, ...)`` and their owners."""
        rep = xa.repeat(draws, *([1] * (xa.dim() - 1)))
        owners = ctx.all_index().repeat(draws)
        return scanner_transform(rep, ctx.bounds, self.transforms, g), owners

    def run(self, ctx: AttackContext) -> RunOutput:
        x, n = ctx.x, ctx.n
        eps = self._budget(n, x.device).to(x.dtype)
        alpha = eps * 2.5 / self.steps if self.step_size is None else torch.full_like(
            eps, float(self.step_size))
        span = ctx.bounds[1] - ctx.bounds[0]
        delta = torch.zeros_like(x)
        for _ in range(self.steps):
            dr = delta.detach().requires_grad_(True)
            with torch.enable_grad():
                xa = ctx.clip(x + ctx.masked(dr))
                xt, owners = self._eot(ctx, xa, self.draws, ctx.generator)
                _, _, gx = ctx.value_and_grad(xt.detach(), owners)
                (g,) = torch.autograd.grad(xt, dr, gx / self.draws)
                tv = total_variation(ctx.masked(dr)) / span
                (gtv,) = torch.autograd.grad(tv.sum(), dr)
            # lambda is relative: the TV gradient is rescaled to the loss gradient's L1 norm
            scale = g.flatten(1).abs().sum(1) / gtv.flatten(1).abs().sum(1).clamp_min(1e-12)
            grad = ctx.masked(g - self.tv_weight * batch_view(scale, gtv) * gtv)
            step = self.norm.direction(grad, x, ctx.bounds)
            delta = delta + batch_view(alpha, delta) * step
            delta = self.norm.project(ctx.clip(x + ctx.masked(delta)) - x, eps)
        adv = ctx.clip(x + ctx.masked(delta))
        # success under a fresh set of transformations (a generator seeded from the attack's)
        g_eval = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,),
                                                                 generator=ctx.generator)))
        xt, owners = self._eot(ctx, adv, self.eval_draws, g_eval)
        hit = ctx.is_adversarial(ctx.logits(xt), owners).view(self.eval_draws, n).float()
        per = hit.mean(0).cpu()
        return RunOutput(adv, None, extra={"transform_success": per,
                                           "transform_success_rate": float(per.mean()),
                                           "tv": total_variation(adv - x).cpu()})

