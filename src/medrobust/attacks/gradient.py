"""Gradient attacks with a fixed budget: FGSM, BIM (I-FGSM), PGD and MI-FGSM.

All four are one projected steepest-ascent loop (DESIGN principle 2) with different parts:

* FGSM — Goodfellow, Shlens & Szegedy, "Explaining and Harnessing Adversarial Examples", ICLR 2015:
  one step of size ``eps`` along the sign of the gradient (the normalized gradient under L2, the
  sparse L1 step under L1: the "fast gradient method").
* BIM / I-FGSM — Kurakin, Goodfellow & Bengio, "Adversarial Examples in the Physical World", ICLR
  workshop 2017: repeated small steps, clipped to the eps-ball and the bounds after each step.
* PGD — Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018:
  BIM from a uniform random start inside the ball, with projection, and restarts. Under L1 the step
  is the sparse steepest descent of Tramer & Boneh (NeurIPS 2019) and the projection is onto the L1
  ball (Duchi et al. 2008) intersected with the box.
* MI-FGSM — Dong et al., "Boosting Adversarial Attacks with Momentum", CVPR 2018: the step follows
  an accumulated gradient ``g <- mu * g + grad / ||grad||_1``.

Per sample, the loop keeps the best iterate it has evaluated: a successful one over an unsuccessful
one, then the one with the highest loss, so success never gets lost by a later step. With
``early_stop=True`` samples leave the loop as soon as they are adversarial (fast evaluation); with
``early_stop=False`` every sample spends the full budget (the strongest examples).
"""

from __future__ import annotations

import torch

from medrobust.attacks.base import AttackContext, FixedBudgetAttack, RunOutput
from medrobust.attacks.boost import diverse_inputs, scaled_kernel_size, smooth_gradient
from medrobust.norms import L1, Linf, Norm, batch_view, get_norm


class _Best:
    """Per-sample best iterate: success first, then the highest loss."""

    def __init__(self, x: torch.Tensor, num_classes: int) -> None:
        n = x.shape[0]
        self.adv = x.clone()
        # (N, K) for classifiers; allocated on the first update for other output shapes
        self.logits = torch.zeros(n, num_classes, device=x.device, dtype=x.dtype)
        self.loss = torch.full((n,), float("-inf"), device=x.device, dtype=x.dtype)
        self.success = torch.zeros(n, dtype=torch.bool, device=x.device)
        self.evaluated = torch.zeros(n, dtype=torch.bool, device=x.device)

    def update(self, index: torch.Tensor, xa: torch.Tensor, logits: torch.Tensor,
               loss: torch.Tensor, success: torch.Tensor) -> None:
        if logits.shape[1:] != self.logits.shape[1:]:
            self.logits = torch.zeros(
                (self.adv.shape[0], *logits.shape[1:]), device=logits.device, dtype=logits.dtype
            )
        old_s = self.success[index]
        better = (success & ~old_s) | ((success == old_s) & (loss >= self.loss[index]))
        if not better.any():
            return
        if bool(better.all()) and index.numel() == self.adv.shape[0]:
            self.adv.copy_(xa)
            self.logits.copy_(logits)
            self.loss.copy_(loss)
            self.success.copy_(success)
            self.evaluated.fill_(True)
            return
        sel = index[better]
        self.adv[sel] = xa[better]
        self.logits[sel] = logits[better].to(self.logits.dtype)
        self.loss[sel] = loss[better]
        self.success[sel] = success[better]
        self.evaluated[sel] = True


class GradientAttack(FixedBudgetAttack):
    """Projected steepest ascent on the loss within an eps-ball (the loop behind all four attacks).

    Args:
        eps: the budget, in input units: a number, or a tensor with one value per sample.
        norm: "linf", "l2" or "l1" (or a :class:`~medrobust.norms.Norm`).
        steps: number of gradient steps.
        step_size: the step length in the norm's units; default ``rel_step_size * eps``.
        rel_step_size: the step as a fraction of eps when ``step_size`` is not given
            (default 2.5 / steps, Madry et al.'s rule of thumb: the walk can cross the ball).
        random_start: start from a point drawn uniformly from the ball (and the mask).
        restarts: independent random starts; later restarts only attack samples not yet fooled,
            and each sample keeps its successful result or else the one with the highest loss.
        loss: "ce" (cross-entropy) or "margin" (C&W's logit margin; robust to saturated softmax).
        early_stop: stop updating samples as soon as they are adversarial.
        momentum: the decay ``mu`` of MI-FGSM's accumulated, L1-normalized gradient (0 = none).
        l1_sparsity: fraction of coordinates moved per step under L1 (Tramer & Boneh's q).
        bpda: against a defended model, run each non-differentiable defense straight-through with
            its backward approximation (BPDA, Athalye et al., ICML 2018).
        eot: average the gradient over this many draws of a randomized defense (Expectation over
            Transformation, Athalye et al., ICML 2018); each draw counts as a forward and a
            backward pass.
        input_diversity: DI's probability ``p`` of a random resize-and-pad of the input before
            each forward pass (Xie et al., CVPR 2019; :mod:`medrobust.attacks.boost`). The loop
            then cannot judge success on the iterates (their outputs are of transformed inputs):
            it keeps the last iterate, as the paper, and ``early_stop`` applies only at the end.
        translation_kernel: TI's Gaussian kernel width ``k`` for smoothing the gradient (Dong et
            al., CVPR 2019), or ``"auto"``: the paper's 15 px for 299 px scaled to the input size.
        seed, generator: the randomness of the random start (and of DI's transform).
    """

    name = "gradient"
    supports_multilabel = True
    supports_dense = True

    def __init__(
        self,
        eps: float | torch.Tensor,
        norm: str | Norm = "linf",
        *,
        steps: int = 10,
        step_size: float | None = None,
        rel_step_size: float | None = None,
        random_start: bool = True,
        restarts: int = 1,
        loss: str = "ce",
        early_stop: bool = False,
        momentum: float = 0.0,
        l1_sparsity: float = 0.05,
        bpda: bool = False,
        eot: int = 1,
        input_diversity: float = 0.0,
        translation_kernel: int | str | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(eps, norm, loss=loss, seed=seed, generator=generator)
        if not 0.0 <= input_diversity <= 1.0:
            raise ValueError(f"input_diversity must be a probability in [0, 1]; got "
                             f"{input_diversity!r}")
        if translation_kernel is not None and translation_kernel != "auto" and (
            isinstance(translation_kernel, bool) or not isinstance(translation_kernel, int)
            or translation_kernel < 1 or translation_kernel % 2 == 0
        ):
            raise ValueError(f"translation_kernel must be an odd positive integer, 'auto' or None; "
                             f"got {translation_kernel!r}")
        self.input_diversity = float(input_diversity)
        self.translation_kernel = translation_kernel
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer; got {steps!r}")
        if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
            raise ValueError(f"restarts must be a positive integer; got {restarts!r}")
        if step_size is not None and not (step_size > 0):
            raise ValueError(f"step_size must be > 0; got {step_size!r}")
        if rel_step_size is not None and not (rel_step_size > 0):
            raise ValueError(f"rel_step_size must be > 0; got {rel_step_size!r}")
        if not 0.0 <= momentum:
            raise ValueError(f"momentum must be >= 0; got {momentum!r}")
        if isinstance(eot, bool) or not isinstance(eot, int) or eot < 1:
            raise ValueError(f"eot must be a positive integer; got {eot!r}")
        if isinstance(self.norm, L1):
            self.norm = L1(l1_sparsity)
        self.steps = steps
        self.step_size = step_size
        self.rel_step_size = rel_step_size
        self.random_start = bool(random_start)
        self.restarts = restarts
        self.early_stop = bool(early_stop)
        self.momentum = float(momentum)
        self.l1_sparsity = float(l1_sparsity)
        self.bpda = bool(bpda)
        self.eot = eot

    def _steps_per_sample(self, eps: torch.Tensor) -> torch.Tensor:
        if self.step_size is not None:
            return torch.full_like(eps, float(self.step_size))
        rel = self.rel_step_size if self.rel_step_size is not None else 2.5 / self.steps
        return eps * rel

    def run(self, ctx: AttackContext) -> RunOutput:
        x = ctx.x
        eps = self._budget(ctx.n, x.device).to(x.dtype)
        alpha = self._steps_per_sample(eps)
        best = _Best(x, ctx.num_classes)
        restarts = self.restarts if self.random_start else 1
        for r in range(restarts):
            if r == 0:
                index = ctx.all_index()
            else:
                index = (~best.success).nonzero().flatten()
                if index.numel() == 0:
                    break
            self._attack(ctx, index, eps, alpha, best)
        return RunOutput(best.adv, best.logits, extra={"loss": best.loss.cpu()})

    def _attack(self, ctx: AttackContext, index: torch.Tensor, eps_all: torch.Tensor,
                alpha_all: torch.Tensor, best: _Best) -> None:
        x_all, norm, bounds = ctx.x, self.norm, ctx.bounds
        full = index.numel() == ctx.n
        x = x_all if full else x_all[index]
        eps, alpha = eps_all[index], alpha_all[index]
        mask = ctx.mask if (full or ctx.mask is None) else ctx.mask[index]
        if self.random_start:
            delta = norm.random(x.shape, eps.cpu(), ctx.generator).to(x.device, x.dtype)
            if mask is not None:
                delta = norm.project(delta * mask, eps)
            xa = ctx.clip(x + delta)
        else:
            xa = x.clone()
        g = torch.zeros_like(x) if self.momentum > 0 else None
        # L-inf: the eps-ball and the bounds together are a per-element box, computed once
        box = None
        if isinstance(norm, Linf):
            e = batch_view(eps, x)
            box = ((x - e).clamp_min(bounds[0]), (x + e).clamp_max(bounds[1]))
        kernel = self.translation_kernel
        if kernel == "auto":
            kernel = scaled_kernel_size(min(x.shape[2:])) if x.dim() > 2 else 1
        for _ in range(self.steps):
            if self.input_diversity > 0:
                grad = self._diverse_grad(ctx, xa, index)
            else:
                logits, loss, grad = ctx.value_and_grad(xa, index)
                success = ctx.is_adversarial(logits, index)
                best.update(index, xa, logits, loss, success)
            if self.early_stop and self.input_diversity == 0 and success.any():
                keep = ~success
                if not keep.any():
                    return
                index, x, xa, grad, eps, alpha = (
                    index[keep], x[keep], xa[keep], grad[keep], eps[keep], alpha[keep]
                )
                mask = None if mask is None else mask[keep]
                g = None if g is None else g[keep]
                box = None if box is None else (box[0][keep], box[1][keep])
            if kernel:
                grad = smooth_gradient(grad, int(kernel))
            if mask is not None:
                grad = grad * mask
            if g is not None:
                l1 = grad.abs().reshape(grad.shape[0], -1).sum(1).clamp_min(1e-12)
                g = self.momentum * g + grad / batch_view(l1, grad)
                grad = g
            step = norm.direction(grad, xa, bounds)
            if mask is not None:
                step = step * mask
            xa = xa + batch_view(alpha, xa) * step
            if box is not None:
                xa = torch.minimum(torch.maximum(xa, box[0]), box[1])
            else:
                xa = ctx.clip(x + norm.project(xa - x, eps))
        logits = ctx.logits(xa)
        loss = ctx.criterion.loss(logits, index)
        best.update(index, xa, logits, loss, ctx.is_adversarial(logits, index))

    def _diverse_grad(self, ctx: AttackContext, xa: torch.Tensor, index: torch.Tensor
                      ) -> torch.Tensor:
        """The input gradient through DI's random resize-and-pad (chained to ``xa``)."""
        xr = xa.detach().requires_grad_(True)
        with torch.enable_grad():
            xt = diverse_inputs(xr, self.input_diversity, ctx.bounds[0], ctx.generator)
            _, _, gt = ctx.value_and_grad(xt.detach(), index)
            (grad,) = torch.autograd.grad(xt, xr, gt)
        return grad


class FGSM(GradientAttack):
    """Fast Gradient Sign Method (Goodfellow et al., ICLR 2015): ``x + eps * sign(grad)``.

    Under "l2" / "l1" this is the fast gradient method (one normalized step of length eps).
    ``random_start=True`` gives the random-init variant (FGSM-RS, Wong et al., ICLR 2020) with step
    ``1.25 * eps`` by default.
    """

    name = "fgsm"

    def __init__(
        self,
        eps: float | torch.Tensor,
        norm: str | Norm = "linf",
        *,
        loss: str = "ce",
        random_start: bool = False,
        step_size: float | None = None,
        early_stop: bool = False,
        l1_sparsity: float = 0.05,
        bpda: bool = False,
        eot: int = 1,
        input_diversity: float = 0.0,
        translation_kernel: int | str | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(
            eps, norm, steps=1, step_size=step_size,
            rel_step_size=1.25 if random_start else 1.0,
            random_start=random_start, restarts=1, loss=loss, early_stop=early_stop,
            l1_sparsity=l1_sparsity, input_diversity=input_diversity,
            translation_kernel=translation_kernel, bpda=bpda, eot=eot, seed=seed,
            generator=generator,
        )


class BIM(GradientAttack):
    """Basic Iterative Method / I-FGSM (Kurakin et al. 2017): FGSM steps of ``step_size`` from the
    clean input, clipped to the eps-ball and the bounds after every step. Default step
    ``eps / 4`` with 10 steps (the common setting; Kurakin et al. used 1/255 per step and
    ``min(eps + 4, 1.25 eps)`` steps in 0..255 units)."""

    name = "bim"

    def __init__(
        self,
        eps: float | torch.Tensor,
        norm: str | Norm = "linf",
        *,
        steps: int = 10,
        step_size: float | None = None,
        rel_step_size: float | None = 0.25,
        loss: str = "ce",
        early_stop: bool = False,
        l1_sparsity: float = 0.05,
        bpda: bool = False,
        eot: int = 1,
        input_diversity: float = 0.0,
        translation_kernel: int | str | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(
            eps, norm, steps=steps, step_size=step_size, rel_step_size=rel_step_size,
            random_start=False, restarts=1, loss=loss, early_stop=early_stop,
            l1_sparsity=l1_sparsity, input_diversity=input_diversity,
            translation_kernel=translation_kernel, bpda=bpda, eot=eot, seed=seed,
            generator=generator,
        )


class PGD(GradientAttack):
    """Projected Gradient Descent (Madry et al., ICLR 2018): BIM from a uniform random start
    inside the ball, with restarts. Defaults: 40 steps of ``2.5 * eps / steps``, one restart."""

    name = "pgd"

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
        l1_sparsity: float = 0.05,
        bpda: bool = False,
        eot: int = 1,
        input_diversity: float = 0.0,
        translation_kernel: int | str | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(
            eps, norm, steps=steps, step_size=step_size, rel_step_size=rel_step_size,
            random_start=random_start, restarts=restarts, loss=loss, early_stop=early_stop,
            l1_sparsity=l1_sparsity, input_diversity=input_diversity,
            translation_kernel=translation_kernel, bpda=bpda, eot=eot, seed=seed,
            generator=generator,
        )


class MIFGSM(GradientAttack):
    """Momentum Iterative FGSM (Dong et al., CVPR 2018): 10 steps of ``eps / 10`` along the
    accumulated gradient with decay ``momentum = 1.0`` (the paper's settings), no random start."""

    name = "mifgsm"

    def __init__(
        self,
        eps: float | torch.Tensor,
        norm: str | Norm = "linf",
        *,
        steps: int = 10,
        step_size: float | None = None,
        momentum: float = 1.0,
        random_start: bool = False,
        restarts: int = 1,
        loss: str = "ce",
        early_stop: bool = False,
        l1_sparsity: float = 0.05,
        bpda: bool = False,
        eot: int = 1,
        input_diversity: float = 0.0,
        translation_kernel: int | str | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(
            eps, norm, steps=steps, step_size=step_size, rel_step_size=1.0 / steps,
            random_start=random_start, restarts=restarts, loss=loss, early_stop=early_stop,
            momentum=momentum, l1_sparsity=l1_sparsity, input_diversity=input_diversity,
            translation_kernel=translation_kernel, bpda=bpda, eot=eot, seed=seed,
            generator=generator,
        )


class DIFGSM(MIFGSM):
    """M-DI2-FGSM (Xie et al., CVPR 2019): MI-FGSM with input diversity ``p = 0.5`` (the paper's
    setting; the resize-and-pad scaled to the input size, :mod:`medrobust.attacks.boost`)."""

    name = "difgsm"

    def __init__(
        self,
        eps: float | torch.Tensor,
        norm: str | Norm = "linf",
        *,
        input_diversity: float = 0.5,
        translation_kernel: int | str | None = None,
        steps: int = 10,
        step_size: float | None = None,
        momentum: float = 1.0,
        random_start: bool = False,
        restarts: int = 1,
        loss: str = "ce",
        early_stop: bool = False,
        l1_sparsity: float = 0.05,
        bpda: bool = False,
        eot: int = 1,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(
            eps, norm, steps=steps, step_size=step_size, momentum=momentum,
            random_start=random_start, restarts=restarts, loss=loss, early_stop=early_stop,
            l1_sparsity=l1_sparsity, input_diversity=input_diversity,
            translation_kernel=translation_kernel, bpda=bpda, eot=eot, seed=seed,
            generator=generator,
        )


class TIFGSM(MIFGSM):
    """TI-MI-FGSM (Dong et al., CVPR 2019): MI-FGSM with the gradient smoothed by a Gaussian kernel
    (``"auto"``: the paper's 15 x 15 for 299 px, scaled to the input size)."""

    name = "tifgsm"

    def __init__(
        self,
        eps: float | torch.Tensor,
        norm: str | Norm = "linf",
        *,
        translation_kernel: int | str | None = "auto",
        input_diversity: float = 0.0,
        steps: int = 10,
        step_size: float | None = None,
        momentum: float = 1.0,
        random_start: bool = False,
        restarts: int = 1,
        loss: str = "ce",
        early_stop: bool = False,
        l1_sparsity: float = 0.05,
        bpda: bool = False,
        eot: int = 1,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(
            eps, norm, steps=steps, step_size=step_size, momentum=momentum,
            random_start=random_start, restarts=restarts, loss=loss, early_stop=early_stop,
            l1_sparsity=l1_sparsity, input_diversity=input_diversity,
            translation_kernel=translation_kernel, bpda=bpda, eot=eot, seed=seed,
            generator=generator,
        )


__all__ = ["GradientAttack", "FGSM", "BIM", "PGD", "MIFGSM", "DIFGSM", "TIFGSM", "get_norm"]
