"""Attacks made for dense outputs (segmenters): DAG and CosPGD.

* DAG — Xie, Wang, Zhang, Zhou, Xie & Yuille, "Adversarial Examples for Semantic Segmentation and
  Object Detection", ICCV 2017 (Algorithm 1, Dense Adversary Generation). Each voxel ``t`` has a
  true label ``l_t`` and an adversarial label ``l'_t``; the *active set* ``T_m`` holds the voxels
  not yet fooled. Each iteration adds the normalized step

      r_m = sum_{t in T_m} [grad z_{l'_t}(x_m, t) - grad z_{l_t}(x_m, t)],
      x_{m+1} = x_m + gamma * r_m / ||r_m||_inf,

  on the logits ``z`` (pre-softmax scores), until ``T_m`` is empty or ``max_iter`` iterations have
  run (the paper: ``gamma = 0.5`` on 0..255 images, ``max_iter = 200`` for segmentation). The paper
  is unbounded; with ``eps`` the iterate is projected onto the L-inf ball after every step.
* CosPGD — Agnihotri, Jung & Keuper, "CosPGD: an efficient white-box adversarial attack for
  pixel-wise prediction tasks", ICML 2024. PGD whose per-pixel loss is weighted by the cosine
  similarity between the softmax prediction and the one-hot label (untargeted: pixels still
  predicted like their label weigh most, those already fooled fade out) or by one minus the
  similarity to the one-hot target (targeted: pixels already at their target fade out); the
  weights are not differentiated through. The step, projection and random start are PGD's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from medrobust.attacks.base import Attack, AttackContext, RunOutput, _check_eps
from medrobust.attacks.gradient import GradientAttack
from medrobust.criteria import Criterion, DenseCriterion
from medrobust.norms import Linf, Norm, batch_view, get_norm

__all__ = ["DAG", "CosPGD"]


def _check_output(attack: Any, ctx: AttackContext) -> None:
    if ctx.model.capabilities.output not in ("dense", "class"):
        raise TypeError(
            f"{type(attack).__name__} attacks dense outputs (segmenters) and class outputs; the "
            f"{ctx.model.kind} has {ctx.model.capabilities.output!r} outputs"
        )


class DAG(Attack):
    """Dense Adversary Generation (Xie et al., ICCV 2017), for segmenters.

    Args:
        eps: an optional L-inf budget in input units (the paper's attack is unbounded; ``None``).
            With a budget, every iterate is projected onto the eps-ball (and the bounds).
        norm: ``"linf"`` only (the budget's norm; accepted for a uniform interface).
        gamma: the L-inf length of each normalized step, in input units; default ``0.5 / 255``
            of the bounds' span (the paper's 0.5 on 0..255 images).
        max_iter: the most iterations (the paper: 200 for segmentation).
        active: which voxels stay in the active set: ``"unreached"`` (default: voxels whose goal
            is not met yet — targeted: not yet predicted as their target; untargeted: still
            predicted as their label) or ``"correct"`` (the paper's rule: voxels still predicted
            as their true label; a voxel that moves to a third class leaves the set).
        early_stop: also stop a sample once the criterion is met (default: run until its active
            set is empty, as in the paper).
        seed, generator: unused (DAG is deterministic); accepted for a uniform interface.

    On a classifier (class outputs) a sample is one "pixel": DAG is then the iterative,
    L-inf-normalized ascent on ``z_target - z_label`` (untargeted: the most likely other class)
    until the prediction flips.

    Targeted (``target=`` label maps, e.g. :func:`~medrobust.criteria.remove_target`), the
    adversarial label of a voxel is its target and only voxels whose target differs from their
    label take part. Untargeted, the adversarial label of each active voxel is its most likely
    other class at the current iterate. The loss option is unused: DAG follows the logit
    difference. Samples whose active set empties leave the loop (active sets, principle 7).
    """

    name = "dag"
    supports_dense = True
    supported_norms = ("linf",)

    def __init__(
        self,
        eps: float | torch.Tensor | None = None,
        norm: str | Norm = "linf",
        *,
        gamma: float | None = None,
        max_iter: int = 200,
        active: str = "unreached",
        early_stop: bool = False,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(seed=seed, generator=generator)
        self.eps = None if eps is None else _check_eps(eps)
        if get_norm(norm).name != "linf":
            raise ValueError(f"DAG's budget is an L-inf ball; got norm {get_norm(norm).name!r}")
        self.norm = Linf()
        if gamma is not None and not (float(gamma) > 0):
            raise ValueError(f"gamma must be > 0; got {gamma!r}")
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"max_iter must be a positive integer; got {max_iter!r}")
        if active not in ("unreached", "correct"):
            raise ValueError(f"active must be 'unreached' or 'correct'; got {active!r}")
        self.gamma = None if gamma is None else float(gamma)
        self.max_iter = max_iter
        self.active = active
        self.early_stop = bool(early_stop)

    def _budget(self, n: int, device: torch.device) -> torch.Tensor | None:
        eps = self.eps
        if eps is None:
            return None
        if isinstance(eps, torch.Tensor) and eps.dim() == 1 and eps.numel() != n:
            raise ValueError(
                f"eps has {eps.numel()} values but the batch has {n} samples; give one eps per "
                "sample or a single number"
            )
        return torch.as_tensor(eps, dtype=torch.float32).to(device).expand(n).clone()

    def _norm_for_budget(self) -> Norm | None:
        return None if self.eps is None else self.norm

    def _active(self, logits: torch.Tensor, labels: torch.Tensor,
                target: torch.Tensor | None) -> torch.Tensor:
        pred = logits.argmax(1)
        if target is None or self.active == "correct":
            act = pred == labels
        else:
            act = pred != target
        if target is not None:
            act = act & (target != labels)
        return act

    def _adversarial_class(self, logits: torch.Tensor, labels: torch.Tensor,
                           target: torch.Tensor | None) -> torch.Tensor:
        if target is not None:
            return target
        return logits.detach().scatter(1, labels.unsqueeze(1), float("-inf")).argmax(1)

    def run(self, ctx: AttackContext) -> RunOutput:
        _check_output(self, ctx)
        x = ctx.x
        n = ctx.n
        gamma = self.gamma if self.gamma is not None else 0.5 / 255.0 * ctx.model.span
        eps = self._budget(n, x.device)
        box = None
        if eps is not None:
            e = batch_view(eps.to(x.dtype), x)
            box = ((x - e).clamp_min(ctx.bounds[0]), (x + e).clamp_max(ctx.bounds[1]))
        labels, target = ctx.labels, ctx.target
        xa = x.clone()
        index = ctx.all_index()
        iterations = torch.zeros(n, dtype=torch.long)
        active_left = torch.zeros(n, dtype=torch.long)
        chunks: list[torch.Tensor] = []

        def loss_fn(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            y = labels[idx]
            t = None if target is None else target[idx]
            with torch.no_grad():
                act = self._active(logits, y, t)
                adv = self._adversarial_class(logits, y, t)
            chunks.append(act)
            diff = logits.gather(1, adv.unsqueeze(1)) - logits.gather(1, y.unsqueeze(1))
            return (diff.squeeze(1) * act.to(logits.dtype)).reshape(act.shape[0], -1).sum(1)

        def count(act: torch.Tensor) -> torch.Tensor:
            left = act.reshape(act.shape[0], -1).sum(1)
            active_left[index.cpu()] = left.cpu()
            return left

        for _ in range(self.max_iter):
            chunks.clear()
            logits, _, grad = ctx.value_and_grad(xa[index], index, loss_fn)
            keep = count(torch.cat(chunks)) > 0
            if self.early_stop:
                keep = keep & ~ctx.is_adversarial(logits, index)
            index, grad = index[keep], grad[keep]
            if index.numel() == 0:
                break
            if ctx.mask is not None:
                grad = grad * ctx.mask[index]
            r_inf = grad.abs().reshape(grad.shape[0], -1).amax(1)
            moving = r_inf > 0  # a zero gradient cannot move (a saturated or masked-out sample)
            index, grad, r_inf = index[moving], grad[moving], r_inf[moving]
            if index.numel() == 0:
                break
            step = grad * batch_view(gamma / r_inf, grad)
            xi = xa[index] + step
            if box is not None:
                xi = torch.minimum(torch.maximum(xi, box[0][index]), box[1][index])
            else:
                xi = ctx.clip(xi)
            xa[index] = xi
            iterations[index.cpu()] += 1
        else:  # max_iter steps: count what is left at the last iterate
            if index.numel():
                logits = ctx.logits(xa[index])
                y = labels[index]
                t = None if target is None else target[index]
                count(self._active(logits, y, t))
        return RunOutput(
            xa, None, extra={"iterations": iterations, "active_left": active_left}
        )


class _CosineWeighted(Criterion):
    """A bound criterion whose per-voxel loss (per-sample loss for class outputs) is weighted by
    CosPGD's cosine similarity between the softmax output and the one-hot goal."""

    def __init__(self, inner: Criterion) -> None:
        super().__init__(inner.labels, inner.loss_name)
        self.inner = inner
        self.goal_target: torch.Tensor | None = getattr(inner, "target", None)
        self.targeted = self.goal_target is not None

    def _weight(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        goal = self.goal_target[index] if self.goal_target is not None else self.labels[index]
        with torch.no_grad():
            p = torch.softmax(logits, dim=1)
            onehot = F.one_hot(goal, logits.shape[1]).movedim(-1, 1).to(p.dtype)
            cos = F.cosine_similarity(p, onehot, dim=1, eps=1e-12)
        return 1.0 - cos if self.targeted else cos

    def loss(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        inner = self.inner
        weight = self._weight(logits, index)
        if isinstance(inner, DenseCriterion):
            inner._check_classes(logits)
            per_voxel = inner.voxel_loss(logits, index) * weight
            return inner.reduce(per_voxel, inner.voxel_weights(logits, index))
        return inner.loss(logits, index) * weight  # class outputs: one "pixel" per sample

    def margin(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return self.inner.margin(logits, index)

    def is_adversarial(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return self.inner.is_adversarial(logits, index)


class CosPGD(GradientAttack):
    """CosPGD (Agnihotri et al., ICML 2024): PGD on a cosine-weighted per-pixel loss.

    Untargeted, the loss of each voxel is scaled by ``cos(softmax(z), onehot(y))`` (voxels still
    predicted like their label weigh most); targeted, by ``1 - cos(softmax(z), onehot(t))``
    (voxels already at their target stop pulling the step). The per-voxel loss is the
    criterion's (cross-entropy by default, as in the paper; ``loss="margin"`` for the clipped
    margin) and the weights are constants for the gradient (detached, as in the paper's code).
    On a classifier each sample is one "pixel": its loss is weighted by the cosine similarity of
    its softmax output to the one-hot label (target).

    Args: those of :class:`~medrobust.attacks.PGD` (``eps``, ``norm`` "linf" or "l2", ``steps``,
    ``step_size``/``rel_step_size``, ``random_start``, ``restarts``, ``loss``, ``early_stop``,
    ``seed``/``generator``). The paper's L-inf setting is eps = 8/255 with step 0.01 for 3..100
    iterations; the default here is PGD's (40 steps of ``2.5 * eps / steps``, random start).
    """

    name = "cospgd"
    supports_multilabel = False
    supports_dense = True
    supported_norms = ("linf", "l2")

    def __init__(
        self,
        eps: float | torch.Tensor,
        norm: str | Norm = "linf",
        *,
        steps: int = 40,
        step_size: float | None = None,
        rel_step_size: float | None = None,
        random_start: bool = True,
        restarts: int = 1,
        loss: str = "ce",
        early_stop: bool = False,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(
            eps, norm, steps=steps, step_size=step_size, rel_step_size=rel_step_size,
            random_start=random_start, restarts=restarts, loss=loss, early_stop=early_stop,
            seed=seed, generator=generator,
        )
        if self.norm.name not in ("linf", "l2"):
            raise ValueError(f"CosPGD is defined for linf and l2; got {self.norm.name!r}")

    def run(self, ctx: AttackContext) -> RunOutput:
        _check_output(self, ctx)
        inner = ctx.criterion
        ctx.criterion = _CosineWeighted(inner)
        try:
            return super().run(ctx)
        finally:
            ctx.criterion = inner

