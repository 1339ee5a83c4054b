"""Spatial attacks: they move pixels instead of adding noise.

* stAdv — Xiao, Zhu, Li, He, Liu & Song, "Spatially Transformed Adversarial Examples", ICLR 2018:
  a per-pixel flow field, bilinear resampling, and a smoothness loss on the flow.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medrobust.attacks.base import Attack, AttackContext, RunOutput


def identity_grid(spatial: tuple[int, ...], device: torch.device, dtype: torch.dtype
                  ) -> torch.Tensor:
    """``grid_sample``'s identity grid ``(1, *spatial, S)`` (``align_corners=True``; the last axis
    is ordered x, y[, z], i.e. the spatial axes reversed)."""
    axes = [torch.linspace(-1.0, 1.0, n, device=device, dtype=dtype) if n > 1
            else torch.zeros(1, device=device, dtype=dtype) for n in spatial]
    mesh = torch.meshgrid(*axes, indexing="ij")
    return torch.stack(mesh[::-1], -1)[None]


def warp(x: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Resample ``x`` ``(N, C, *spatial)`` at the positions displaced by ``flow``
    ``(N, S, *spatial)`` (in pixels, one component per spatial axis in the order of ``spatial``):
    ``x_adv(p) = x(p + flow(p))`` with bilinear (2D) or trilinear (3D) interpolation. Samples
    outside the image take the nearest border value, so the result is a convex combination of the
    input's values and stays inside its bounds."""
    spatial = tuple(x.shape[2:])
    s = len(spatial)
    scale = torch.tensor([2.0 / (n - 1) if n > 1 else 0.0 for n in spatial],
                         device=x.device, dtype=x.dtype)
    disp = flow.movedim(1, -1) * scale  # (N, *spatial, S) in normalized units, spatial order
    grid = identity_grid(spatial, x.device, x.dtype) + disp.flip(-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True) \
        if s in (2, 3) else x


def flow_loss(flow: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The paper's smoothness loss per sample: ``sum_p sum_{q in N(p)} sqrt(||f_p - f_q||^2 +
    eps)`` over the 4 (2D) or 6 (3D) neighbours, the border replicated (as the authors' code pads
    the flow)."""
    s = flow.dim() - 2
    padded = F.pad(flow, (1, 1) * s, mode="replicate")
    total = flow.new_zeros(flow.shape[0])
    core = tuple(slice(1, -1) for _ in range(s))
    for axis in range(s):
        for shift in (0, 2):
            sl = list(core)
            sl[axis] = slice(shift, shift + flow.shape[2 + axis])
            nb = padded[(slice(None), slice(None), *sl)]
            diff = ((flow - nb) ** 2).sum(1)
            total = total + (diff + eps).sqrt().reshape(flow.shape[0], -1).sum(1)
    return total


class StAdv(Attack):
    """Spatially transformed adversarial examples (Xiao et al., "Spatially Transformed Adversarial
    Examples", ICLR 2018).

    The adversarial image is the input resampled along a per-pixel flow field ``f``:
    ``x_adv(p) = x(p + f(p))``, bilinear in 2D and trilinear in 3D (``grid_sample``). The flow
    minimizes ``L_adv(x_adv) + tau * L_flow(f)`` where ``L_flow`` is the paper's smoothness loss
    (:func:`flow_loss`) and ``L_adv`` C&W's margin loss with confidence ``kappa``: untargeted
    ``max(z_y - max_{j != y} z_j, -kappa)``, targeted ``max(max_{j != t} z_j - z_t, -kappa)``.
    As in the paper the solver is L-BFGS (``torch.optim.LBFGS`` with a strong-Wolfe line search on
    the batch's summed objective, which is separable per sample), starting from the zero flow;
    ``optimizer="adam"`` runs Adam with ``lr`` instead. Every point the solver evaluates is
    checked, and each sample keeps its adversarial iterate with the smallest ``L_flow`` (else the
    one with the smallest ``L_adv``). With a mask the image changes only where it allows:
    ``x_adv = x + mask * (warp(x, f) - x)``, and the objective sees exactly that.

    Args:
        tau: the weight of the flow loss (the paper: 0.05).
        kappa: the confidence of the margin loss (the paper: 0).
        steps: L-BFGS iterations (or Adam steps). The paper does not state its iteration count;
            200 is a faster default than running L-BFGS to convergence, enough on MedMNIST CNNs.
        optimizer: "lbfgs" (the paper) or "adam".
        lr: L-BFGS's initial step (1.0) or Adam's learning rate (0.01 pixels, the default used
            when ``optimizer="adam"`` and ``lr`` is not given).
        history_size: L-BFGS's memory.
        flow_eps: the epsilon inside ``L_flow``'s square root.
        tau_retries, tau_decay: re-solve the samples that failed with a smaller ``tau`` (see
            above); defaults 2 and 0.1 (tau 0.05, then 0.005, then 0.0005).
        loss, seed, generator: see :class:`~medrobust.attacks.base.Attack` (stAdv is
            deterministic; the margin loss is fixed by the paper).

    ``tau`` trades smoothness for success, and its right value depends on the scale of the
    model's logits: 0.05, the paper's choice for MNIST and CIFAR-10 models, leaves most samples
    of a small MedMNIST CNN unchanged (the flow loss's kink at zero outweighs the margin's
    gradient). So, an extension of the paper: the samples still not adversarial after a run are
    solved again, from the zero flow, with ``tau *= tau_decay``, up to ``tau_retries`` times (like
    C&W's search over its constant, downward only). ``tau_retries=0`` is the paper's single run.

    ``extra`` reports per sample ``flow_loss`` (``L_flow`` of the returned flow), ``flow_max``
    (the largest displacement, in pixels), ``flow_mean`` (the mean displacement) and ``flow``
    (the field itself, ``(N, S, *spatial)``, in pixels) and ``rounds`` (the runs each sample
    took).
    """

    spatial_ranks = (2, 3)

    name = "stadv"

    def __init__(
        self,
        tau: float = 0.05,
        kappa: float = 0.0,
        *,
        steps: int = 200,
        optimizer: str = "lbfgs",
        lr: float | None = None,
        history_size: int = 10,
        flow_eps: float = 1e-8,
        tau_retries: int = 2,
        tau_decay: float = 0.1,
        loss: str = "margin",
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(loss=loss, seed=seed, generator=generator)
        if not (isinstance(tau, (int, float)) and tau >= 0):
            raise ValueError(f"tau must be >= 0; got {tau!r}")
        if not (isinstance(kappa, (int, float)) and kappa >= 0):
            raise ValueError(f"kappa must be >= 0; got {kappa!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer; got {steps!r}")
        if optimizer not in ("lbfgs", "adam"):
            raise ValueError(f"optimizer must be 'lbfgs' or 'adam'; got {optimizer!r}")
        if lr is not None and not lr > 0:
            raise ValueError(f"lr must be > 0; got {lr!r}")
        if isinstance(history_size, bool) or not isinstance(history_size, int) or history_size < 1:
            raise ValueError(f"history_size must be a positive integer; got {history_size!r}")
        if isinstance(tau_retries, bool) or not isinstance(tau_retries, int) or tau_retries < 0:
            raise ValueError(f"tau_retries must be an integer >= 0; got {tau_retries!r}")
        if not 0 < tau_decay < 1:
            raise ValueError(f"tau_decay must be in (0, 1); got {tau_decay!r}")
        if not flow_eps > 0:
            raise ValueError(f"flow_eps must be > 0; got {flow_eps!r}")
        self.tau = float(tau)
        self.kappa = float(kappa)
        self.steps = steps
        self.optimizer = optimizer
        self.lr = lr
        self.history_size = history_size
        self.flow_eps = float(flow_eps)
        self.tau_retries = tau_retries
        self.tau_decay = float(tau_decay)

    def run(self, ctx: AttackContext) -> RunOutput:
        x = ctx.x
        n = ctx.n
        spatial = tuple(x.shape[2:])
        s = len(spatial)
        if s not in (2, 3):
            raise ValueError(f"StAdv needs 2D or 3D inputs (N, C, H, W[, D]); got shape "
                             f"{tuple(x.shape)}")
        best = _Best(x, ctx.num_classes, s)
        tau = self.tau
        index = ctx.all_index()
        rounds = torch.zeros(n, dtype=torch.long)
        for r in range(self.tau_retries + 1):
            if r > 0:
                index = (~best.succ).nonzero().flatten()
                if index.numel() == 0:
                    break
                tau = tau * self.tau_decay
            rounds[index.cpu()] = r + 1
            self._solve(ctx, index, tau, best)
        mag = best.flow.pow(2).sum(1).sqrt().reshape(n, -1)
        extra = {
            "flow_loss": flow_loss(best.flow, self.flow_eps).cpu(),
            "flow_max": mag.amax(1).cpu(),
            "flow_mean": mag.mean(1).cpu(),
            "flow": best.flow.cpu(),
            "rounds": rounds,
        }
        return RunOutput(best.adv, best.logits, extra=extra)

    def _solve(self, ctx: AttackContext, index: torch.Tensor, tau: float, best: _Best) -> None:
        """Minimize ``L_adv + tau * L_flow`` for the rows ``index``, from the zero flow."""
        x = ctx.x[index]
        mask = None if ctx.mask is None else ctx.mask[index]
        n = x.shape[0]
        spatial = tuple(x.shape[2:])
        module = ctx.model
        flow = torch.zeros((n, len(spatial)) + spatial, device=x.device, dtype=x.dtype,
                           requires_grad=True)
        chunk = module.chunk_size

        def objective() -> torch.Tensor:
            """The summed objective with its flow gradient, chunked; records the best iterates."""
            total = x.new_zeros(())
            grads = []
            for s0 in range(0, n, chunk):
                s1 = min(n, s0 + chunk)
                rows = index[s0:s1]
                with torch.enable_grad():
                    f = flow[s0:s1].detach().requires_grad_(True)
                    xa = warp(x[s0:s1], f)
                    if mask is not None:
                        xa = x[s0:s1] + mask[s0:s1] * (xa - x[s0:s1])
                    logits = module.forward(xa)
                    ladv = self._margin_rows(ctx, logits, rows)
                    lflow = flow_loss(f, self.flow_eps)
                    obj = ladv + tau * lflow
                    (g,) = torch.autograd.grad(obj.sum(), f)
                ctx.forward_passes += s1 - s0
                ctx.backward_passes += s1 - s0
                grads.append(g)
                total = total + obj.detach().sum()
                best.update(ctx, rows, xa.detach(), logits.detach(), f.detach(),
                            lflow.detach(), ladv.detach())
            flow.grad = torch.cat(grads)
            return total

        if self.optimizer == "lbfgs":
            opt: torch.optim.Optimizer = torch.optim.LBFGS(
                [flow], lr=1.0 if self.lr is None else self.lr, max_iter=self.steps,
                max_eval=int(self.steps * 1.25) + 1, history_size=self.history_size,
                tolerance_grad=1e-10, tolerance_change=1e-12, line_search_fn="strong_wolfe")
            opt.step(objective)  # type: ignore[arg-type]
        else:
            opt = torch.optim.Adam([flow], lr=0.01 if self.lr is None else self.lr)
            for _ in range(self.steps):
                opt.zero_grad(set_to_none=True)
                objective()
                opt.step()
            with torch.no_grad():
                objective()
        flow.grad = None

    def _margin_rows(self, ctx: AttackContext, logits: torch.Tensor, rows: torch.Tensor
                     ) -> torch.Tensor:
        cls = (ctx.target if ctx.target is not None else ctx.labels)[rows]
        own = logits.gather(1, cls[:, None])[:, 0]
        other = logits.scatter(1, cls[:, None], float("-inf")).amax(1)
        m = other - own if ctx.target is not None else own - other
        return m.clamp_min(-self.kappa)


class _Best:
    """Per sample: the adversarial iterate with the smallest ``L_flow``, else the smallest
    ``L_adv``."""

    def __init__(self, x: torch.Tensor, num_classes: int, s: int) -> None:
        n = x.shape[0]
        self.adv = x.clone()
        self.logits = torch.zeros(n, num_classes, device=x.device, dtype=x.dtype)
        self.flow = torch.zeros((n, s) + tuple(x.shape[2:]), device=x.device, dtype=x.dtype)
        self.lflow = torch.full((n,), float("inf"), device=x.device, dtype=x.dtype)
        self.ladv = torch.full((n,), float("inf"), device=x.device, dtype=x.dtype)
        self.succ = torch.zeros(n, dtype=torch.bool, device=x.device)

    def update(self, ctx: AttackContext, rows: torch.Tensor, xa: torch.Tensor,
               logits: torch.Tensor, f: torch.Tensor, lflow: torch.Tensor,
               ladv: torch.Tensor) -> None:
        succ = ctx.is_adversarial(logits, rows)
        old = self.succ[rows]
        better = (succ & ~old) | (succ & old & (lflow < self.lflow[rows])) | (
            ~succ & ~old & (ladv < self.ladv[rows]))
        if not better.any():
            return
        sel = rows[better]
        self.adv[sel] = xa[better]
        self.logits[sel] = logits[better].to(self.logits.dtype)
        self.flow[sel] = f[better]
        self.lflow[sel] = lflow[better]
        self.ladv[sel] = ladv[better]
        self.succ[sel] = succ[better]


__all__ = ["StAdv", "flow_loss", "warp"]
