"""DAG on detection: Dense Adversary Generation against a detector's proposals.

Xie, Wang, Zhang, Zhou, Xie, Yuille, "Adversarial Examples for Semantic Segmentation and Object
Detection", ICCV 2017, Algorithm 1, applied to detection (their Section 3.2): the *targets* are the
detector's proposals that overlap a given box (IoU >= 0.3 in the paper; dense proposals), each with
an original label ``l_n`` and an adversarial label ``l'_n``. At every iteration the *active set*
holds the targets still classified as their original label, and the step is

    r_m = sum_{n active} grad( f_{l'_n}(x + r, t_n) - f_{l_n}(x + r, t_n) ),
    r  <- r + gamma / ||r_m||_inf * r_m,

until the active set is empty or ``max_iter`` (150 for detection in the paper) is reached; gamma =
0.5 (on a 0..255 scale) keeps the perturbation small.

With a RetinaNet (:class:`~medrobust.models.detector.Detector`), the proposals are the anchors'
decoded boxes, re-selected at each iteration because they move with the input; background's score
is the constant ``logit(score_thresh)`` (sigmoid heads have no background logit). Untargeted, the
adversarial label of every proposal of a true box is background, so every true box disappears
(:class:`~medrobust.detection_criteria.BoxesVanish`); targeted, the proposals of each target box get
the target's class, so a chosen region yields a box (:class:`~medrobust.detection_criteria.
BoxesAppear`). The sum over the active set is the gradient of the criterion's loss. Success is
judged on the post-NMS detections of the returned input. An optional ``eps`` bounds the
perturbation (projection after each step); without it, as in the paper, the norm reached is the
result.
"""

from __future__ import annotations

import torch

from medrobust.attacks.base import Attack, AttackContext, RunOutput, _check_eps
from medrobust.norms import Norm, batch_view, get_norm


class DAGDetection(Attack):
    """DAG against a detector (see the module docstring).

    Args:
        gamma: the L-inf length of each step in input units; default ``0.5 / 255`` of the
            bounds' span (the paper's 0.5 on 0..255 images).
        max_iter: the iteration cap (150, as in the paper for detection).
        eps: optional budget (``None``: unbounded, as in the paper).
        norm: the budget's norm (``"linf"`` or ``"l2"``).
        seed, generator: unused randomness hooks of the attack API (DAG is deterministic).
    """

    name = "dag-detection"
    supports_targeted = True
    supports_boxes = True

    def __init__(
        self,
        gamma: float | None = None,
        max_iter: int = 150,
        eps: float | None = None,
        norm: str | Norm = "linf",
        *,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(loss="ce", seed=seed, generator=generator)
        if gamma is not None and not (float(gamma) > 0):
            raise ValueError(f"gamma must be > 0; got {gamma!r}")
        if isinstance(max_iter, bool) or int(max_iter) < 1:
            raise ValueError(f"max_iter must be a positive integer; got {max_iter!r}")
        self.gamma = None if gamma is None else float(gamma)
        self.max_iter = int(max_iter)
        self.eps = None if eps is None else _check_eps(eps)
        self.norm = get_norm(norm)

    def _budget(self, n: int, device: torch.device) -> torch.Tensor | None:
        if self.eps is None:
            return None
        return torch.as_tensor(self.eps, dtype=torch.float32).to(device).expand(n).clone()

    def _norm_for_budget(self) -> Norm | None:
        return None if self.eps is None else self.norm

    def run(self, ctx: AttackContext) -> RunOutput:
        x = ctx.x
        gamma = self.gamma if self.gamma is not None else 0.5 / 255.0 * ctx.model.span
        eps = self._budget(ctx.n, x.device)
        adv = x.clone()
        active = torch.ones(ctx.n, dtype=torch.bool, device=x.device)
        iterations = torch.zeros(ctx.n, dtype=torch.long)
        for _ in range(self.max_iter):
            idx = active.nonzero().flatten()
            if idx.numel() == 0:
                break
            out, _, grad = ctx.value_and_grad(adv[idx], idx)
            done = ctx.is_adversarial(out, idx)
            r = ctx.masked(grad, idx)
            scale = r.flatten(1).abs().amax(1)
            # no active target left (or nothing to move): the sample leaves the loop
            stop = done | (scale == 0)
            active[idx[stop]] = False
            keep = ~stop
            if not keep.any():
                break
            sel = idx[keep]
            step = gamma / batch_view(scale[keep], r[keep]) * r[keep]
            new = ctx.clip(adv[sel] + step)
            if eps is not None:
                new = ctx.clip(x[sel] + self.norm.project(new - x[sel], eps[sel]))
            adv[sel] = new
            iterations[sel.cpu()] += 1
        return RunOutput(adv, extra={"iterations": iterations})
