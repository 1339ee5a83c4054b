"""DeepFool (Moosavi-Dezfooli, Fawzi & Frossard, "DeepFool: a simple and accurate method to fool
deep neural networks", CVPR 2016).

At each step the classifier is linearized around the current point; for every candidate class
``k`` the distance to the linearized boundary between the label ``y`` and ``k`` is
``|f_k| / ||w_k||_q`` with ``f_k = z_k - z_y`` and ``w_k = grad f_k`` (``q`` the dual norm: 2 for
L2, 1 for L-inf). The step goes to the nearest one (Algorithm 2 of the paper, multi-class), the
steps accumulate in ``r_tot`` and the iterate is ``x + (1 + overshoot) * r_tot`` (the reference
code's placement of the overshoot), clipped to the bounds.

Batched: one forward and ``candidates - 1`` backward passes per step on the whole active batch
(all candidate gradients in one vectorized ``autograd.grad`` call), and samples leave the loop as
soon as they are misclassified.
"""

from __future__ import annotations

from typing import Any

import torch

from medrobust.attacks.base import AttackContext, MinimumNormAttack, RunOutput
from medrobust.norms import Norm, batch_view, flat

_TINY = 1e-12


def _candidate_gradients(
    ctx: AttackContext, x: torch.Tensor, cand: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits ``(m, K)``, ``f = z_cand[1:] - z_cand[0]`` ``(m, c-1)`` and its input gradients
    ``(m, c-1, ...)`` for a batch ``x`` with candidate classes ``cand`` ``(m, c)`` (label first).

    One forward per chunk and one vectorized backward over the ``c - 1`` differences; gradients are
    taken with respect to the input only (no parameter ``.grad``)."""
    model = ctx.model
    c = cand.shape[1]
    logits_parts, f_parts, g_parts = [], [], []
    for s in model._chunks(x.shape[0]):
        xi = x[s].detach().requires_grad_(True)
        ci = cand[s]
        with torch.enable_grad():
            logits = model.forward(xi)
            zc = logits.gather(1, ci)
            f = zc[:, 1:] - zc[:, :1]
            # grad_outputs[k] selects column k of f for every row: one batched backward
            eye = torch.eye(c - 1, device=f.device, dtype=f.dtype)
            go = eye.unsqueeze(1).expand(c - 1, f.shape[0], c - 1)
            if c - 1 == 1:
                (g,) = torch.autograd.grad(f[:, 0].sum(), xi)
                g = g.unsqueeze(0)
            else:
                (g,) = torch.autograd.grad(f, xi, grad_outputs=go, is_grads_batched=True)
        logits_parts.append(logits.detach())
        f_parts.append(f.detach())
        g_parts.append(g.detach().transpose(0, 1))
    ctx.forward_passes += int(x.shape[0])
    ctx.backward_passes += int(x.shape[0]) * (c - 1)
    return torch.cat(logits_parts), torch.cat(f_parts), torch.cat(g_parts)


class DeepFool(MinimumNormAttack):
    """DeepFool (Moosavi-Dezfooli et al., CVPR 2016), L2 and L-inf, multi-class.

    Args:
        norm: "l2" (default) or "linf".
        steps: the maximum number of linearization steps (paper / reference code: 50).
        candidates: the number of classes linearized at each step: the label and the
            ``candidates - 1`` classes with the highest clean logits (reference code: 10).
        overshoot: the final perturbation is ``(1 + overshoot) * r_tot`` (paper: 0.02).
        seed, generator: accepted for a uniform interface; DeepFool is deterministic.

    DeepFool is untargeted: a call with ``target`` raises ``ValueError``. Samples the model already
    misclassifies are returned unchanged; a sample not fooled within ``steps`` returns its last
    iterate (and ``success`` is False for it).
    """

    name = "deepfool"
    supports_targeted = False

    def __init__(
        self,
        norm: str | Norm = "l2",
        *,
        steps: int = 50,
        candidates: int | None = 10,
        overshoot: float = 0.02,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(norm, seed=seed, generator=generator)
        if self.norm.name not in ("l2", "linf"):
            raise ValueError(f"DeepFool supports norm 'l2' or 'linf'; got {self.norm.name!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer; got {steps!r}")
        if candidates is not None and (
            isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 2
        ):
            raise ValueError(
                f"candidates must be an integer >= 2 or None (all); got {candidates!r}"
            )
        if not (overshoot >= 0):
            raise ValueError(f"overshoot must be >= 0; got {overshoot!r}")
        self.steps = steps
        self.candidates = candidates
        self.overshoot = float(overshoot)

    @classmethod
    def fast_config(cls) -> dict[str, Any]:
        """Small settings for quick tests."""
        return {"steps": 10}

    def run(self, ctx: AttackContext) -> RunOutput:
        if ctx.targeted:
            raise ValueError("DeepFool is an untargeted attack; call it without target")
        x0, y = ctx.x, ctx.labels
        k = ctx.num_classes
        logits_out = ctx.logits(x0)
        c = k if self.candidates is None else min(self.candidates, k)
        # candidates: the label first, then the other classes by decreasing clean logit
        others = logits_out.scatter(1, y.unsqueeze(1), float("-inf")).argsort(1, descending=True)
        cand = torch.cat([y.unsqueeze(1), others[:, : c - 1]], 1)
        adv = x0.clone()
        r_tot = torch.zeros_like(x0)
        active = ~ctx.is_adversarial(logits_out, ctx.all_index())
        linf = self.norm.name == "linf"
        scale = 1.0 + self.overshoot
        for _ in range(self.steps):
            idx = active.nonzero().flatten()
            if idx.numel() == 0:
                break
            xa = adv[idx]
            logits, f, w = _candidate_gradients(ctx, xa, cand[idx])
            logits_out[idx] = logits
            done = ctx.is_adversarial(logits, idx)
            if done.any():
                active[idx[done]] = False
                keep = ~done
                if not keep.any():
                    break
                idx, f, w = idx[keep], f[keep], w[keep]
            if ctx.mask is not None:
                w = w * ctx.mask[idx].unsqueeze(1)
            wf = w.reshape(w.shape[0], w.shape[1], -1)
            wn = wf.abs().sum(2) if linf else wf.norm(dim=2)
            dist = f.abs() / (wn + 1e-8)
            dist = torch.where(wn > 0, dist, torch.full_like(dist, float("inf")))
            best = dist.argmin(1)
            rows = torch.arange(idx.numel(), device=x0.device)
            fl, wl, nl = f[rows, best].abs(), w[rows, best], wn[rows, best].clamp_min(_TINY)
            if linf:
                r = batch_view((fl + 1e-4) / nl, wl) * wl.sign()
            else:
                r = batch_view((fl + 1e-4) / nl**2, wl) * wl
            r = torch.where(batch_view(wn[rows, best] > 0, r), r, torch.zeros_like(r))
            r_tot[idx] = r_tot[idx] + r
            adv[idx] = ctx.clip(x0[idx] + scale * r_tot[idx])
        idx = active.nonzero().flatten()
        if idx.numel():  # the last iterates of the samples still running
            logits_out[idx] = ctx.logits(adv[idx])
        return RunOutput(adv, logits_out, extra={"r_tot_norm": flat(r_tot).norm(dim=1).cpu()})


__all__ = ["DeepFool"]
