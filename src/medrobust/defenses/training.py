"""Adversarial training: FGSM-RS, PGD-AT, TRADES, mixed clean + adversarial, AdvProp.

Each method plugs into :func:`medrobust.training.train`: FGSM-RS and PGD through its
``example_generator`` hook (the batch is replaced by its adversarial copy), TRADES, mixed and
AdvProp through its ``objective`` hook (the batch's training loss). Budgets are in the model's
units (the wrapper's bounds), the budget can be warmed up linearly over the first epochs, and
adversarial examples are generated in eval mode (batch-norm statistics are not updated by the
inner maximization), then the network is trained in train mode.

* FGSM-RS — Wong, Rice & Kolter, "Fast is better than free: Revisiting adversarial training",
  ICLR 2020: a uniform random start in the eps-ball and one FGSM step of ``1.25 * eps``.
* PGD-AT — Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR
  2018: train on PGD examples (random start, ``steps`` steps of ``2.5 * eps / steps``).
* TRADES — Zhang et al., "Theoretically Principled Trade-off between Robustness and Accuracy",
  ICML 2019: ``CE(f(x), y) + beta * KL(f(x) || f(x'))`` with ``x'`` maximizing the KL term by PGD
  from ``x + 0.001 * N(0, I)``.
* mixed — Goodfellow, Shlens & Szegedy, ICLR 2015 (``alpha * CE(x) + (1 - alpha) * CE(x_adv)``,
  alpha 0.5, FGSM examples) and Kurakin, Goodfellow & Bengio, "Adversarial Machine Learning at
  Scale", ICLR 2017 (clean and adversarial examples in every batch).
* AdvProp — Xie et al., "Adversarial Examples Improve Image Recognition", CVPR 2020: adversarial
  examples go through auxiliary batch norms (:class:`DualBatchNorm`), clean ones through the main
  batch norms, which alone are used at inference (:func:`strip_auxiliary_bn`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medrobust.defenses.base import DefenseError
from medrobust.models import Classifier

METHODS = ("fgsm-rs", "pgd", "trades", "mixed", "advprop")


# --------------------------------------------------------------------------- AdvProp batch norm
class DualBatchNorm(nn.Module):
    """A batch norm with a main and an auxiliary set of parameters and statistics (AdvProp).

    ``use_aux`` selects the auxiliary one (adversarial examples during training); the main one is
    used otherwise, in particular at inference."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        import copy

        self.main = bn
        self.aux = copy.deepcopy(bn)
        self.use_aux = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.aux(x) if self.use_aux else self.main(x)


def add_auxiliary_bn(module: nn.Module) -> nn.Module:
    """Replace every batch norm of ``module`` (in place) by a :class:`DualBatchNorm`."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, DualBatchNorm(child))
        else:
            add_auxiliary_bn(child)
    return module


def strip_auxiliary_bn(module: nn.Module) -> nn.Module:
    """Replace every :class:`DualBatchNorm` by its main batch norm (in place): the inference
    network, with the original architecture's state-dict keys."""
    for name, child in list(module.named_children()):
        if isinstance(child, DualBatchNorm):
            setattr(module, name, child.main)
        else:
            strip_auxiliary_bn(child)
    return module


@contextlib.contextmanager
def auxiliary_bn(module: nn.Module, on: bool = True) -> Iterator[None]:
    """Route the block's forward passes through the auxiliary batch norms."""
    duals = [m for m in module.modules() if isinstance(m, DualBatchNorm)]
    old = [m.use_aux for m in duals]
    for m in duals:
        m.use_aux = on
    try:
        yield
    finally:
        for m, o in zip(duals, old, strict=True):
            m.use_aux = o


# --------------------------------------------------------------------------- the objective
class AdversarialTraining:
    """One adversarial-training method, usable as ``example_generator`` (``fgsm-rs``, ``pgd``)
    and as ``objective`` (every method) of :func:`medrobust.training.train`.

    Args:
        method: one of :data:`METHODS`.
        eps: the L-inf budget in the model's units.
        steps: inner-maximization steps (PGD, TRADES, AdvProp; default 7, Madry et al.'s CIFAR
            setting; 1 for FGSM-RS and mixed).
        step_size: default ``1.25 * eps`` (FGSM-RS), ``eps`` (mixed: FGSM) or ``2.5 * eps /
            steps``.
        beta: TRADES's trade-off (default 6.0, the paper's).
        mix: the clean share of the mixed loss (default 0.5, Goodfellow et al.).
        warmup_epochs: the budget grows linearly from ``eps / warmup_epochs`` to ``eps`` over the
            first epochs (0: no warm-up).
        seed: the random starts.
    """

    def __init__(self, method: str, eps: float, *, steps: int | None = None,
                 step_size: float | None = None, beta: float = 6.0, mix: float = 0.5,
                 warmup_epochs: int = 0, seed: int = 0) -> None:
        if method not in METHODS:
            raise DefenseError(f"unknown adversarial training {method!r}; expected one of "
                               f"{', '.join(METHODS)}")
        if not (isinstance(eps, (int, float)) and eps > 0 and math.isfinite(eps)):
            raise DefenseError(f"eps must be > 0 (in the model's units); got {eps!r}")
        default_steps = 1 if method in ("fgsm-rs", "mixed") else 7
        self.steps = int(steps) if steps is not None else default_steps
        if self.steps < 1:
            raise DefenseError(f"steps must be >= 1; got {steps!r}")
        if step_size is not None and not step_size > 0:
            raise DefenseError(f"step_size must be > 0; got {step_size!r}")
        if not 0 <= mix <= 1:
            raise DefenseError(f"mix must be in [0, 1]; got {mix!r}")
        if beta < 0:
            raise DefenseError(f"beta must be >= 0; got {beta!r}")
        if isinstance(warmup_epochs, bool) or int(warmup_epochs) < 0:
            raise DefenseError(f"warmup_epochs must be >= 0; got {warmup_epochs!r}")
        self.method, self.eps, self.step_size = method, float(eps), step_size
        self.beta, self.mix, self.warmup_epochs = float(beta), float(mix), int(warmup_epochs)
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.epoch = 1

    def config(self) -> dict[str, Any]:
        return {"method": self.method, "eps": self.eps, "steps": self.steps,
                "step_size": self.step_size, "beta": self.beta, "mix": self.mix,
                "warmup_epochs": self.warmup_epochs, "seed": self.seed}

    def state_dict(self) -> dict[str, Any]:
        """The random state and epoch (saved in training checkpoints)."""
        return {"generator": self.generator.get_state(), "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.epoch = int(state["epoch"])

    def set_epoch(self, epoch: int) -> None:
        """Called by the training loop at the start of each epoch (1-based): the warm-up."""
        self.epoch = int(epoch)

    @property
    def current_eps(self) -> float:
        if self.warmup_epochs <= 0:
            return self.eps
        return self.eps * min(1.0, self.epoch / self.warmup_epochs)

    def _alpha(self, eps: float) -> float:
        if self.step_size is not None:
            return float(self.step_size)
        if self.method == "fgsm-rs":
            return 1.25 * eps
        if self.method == "mixed":
            return eps
        return 2.5 * eps / self.steps

    # ------------------------------------------------------------ inner maximization
    def _uniform(self, x: torch.Tensor, eps: float) -> torch.Tensor:
        u = torch.rand(x.shape, generator=self.generator).to(x.device, x.dtype)
        return (2 * u - 1) * eps

    def perturb(self, wrapper: Classifier, x: torch.Tensor, y: torch.Tensor,
                clean_probs: torch.Tensor | None = None) -> torch.Tensor:
        """Adversarial examples for the batch (in eval mode; modes restored). With
        ``clean_probs`` the KL divergence to them is maximized (TRADES), else the CE."""
        eps = self.current_eps
        alpha = self._alpha(eps)
        lo, hi = wrapper.bounds
        x = x.detach()
        if clean_probs is not None:
            start = 0.001 * torch.randn(x.shape, generator=self.generator).to(x.device, x.dtype)
        elif self.method == "mixed":
            start = torch.zeros_like(x)  # Goodfellow et al.'s FGSM from the clean input
        else:
            start = self._uniform(x, eps)
        xa = (x + start).clamp(lo, hi)
        with wrapper.attack_mode():
            for _ in range(self.steps):
                xa.requires_grad_(True)
                with torch.enable_grad():
                    logits = wrapper.forward(xa)
                    if clean_probs is not None:
                        loss = F.kl_div(logits.log_softmax(1), clean_probs, reduction="sum")
                    else:
                        loss = F.cross_entropy(logits, y, reduction="sum")
                    (g,) = torch.autograd.grad(loss, xa)
                xa = xa.detach() + alpha * g.sign()
                xa = torch.minimum(torch.maximum(xa, x - eps), x + eps).clamp(lo, hi)
        return xa.detach()

    # ------------------------------------------------------------ the two hooks
    def __call__(self, wrapper: Classifier, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``example_generator``: the batch's adversarial copy (FGSM-RS and PGD-AT)."""
        if self.method not in ("fgsm-rs", "pgd"):
            raise DefenseError(f"{self.method} changes the training loss: pass it as objective=")
        return self.perturb(wrapper, x, y)

    def objective(self, wrapper: Classifier, x: torch.Tensor,
                  y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``objective``: the batch's training loss and the clean (or trained-on) logits."""
        if self.method in ("fgsm-rs", "pgd"):
            xa = self.perturb(wrapper, x, y)
            logits = wrapper.forward(xa)
            return F.cross_entropy(logits, y), logits
        if self.method == "trades":
            with torch.no_grad(), wrapper.attack_mode():
                p_clean = wrapper.forward(x).softmax(1)
            xa = self.perturb(wrapper, x, y, clean_probs=p_clean)
            logits = wrapper.forward(x)
            kl = F.kl_div(wrapper.forward(xa).log_softmax(1), logits.softmax(1),
                          reduction="batchmean")
            return F.cross_entropy(logits, y) + self.beta * kl, logits
        if self.method == "mixed":
            xa = self.perturb(wrapper, x, y)
            logits = wrapper.forward(x)
            loss = self.mix * F.cross_entropy(logits, y) + (1 - self.mix) * F.cross_entropy(
                wrapper.forward(xa), y)
            return loss, logits
        # advprop: adversarial examples through the auxiliary batch norms
        if not any(isinstance(m, DualBatchNorm) for m in wrapper.module.modules()):
            raise DefenseError("advprop needs auxiliary batch norms: call "
                               "add_auxiliary_bn(network) before training")
        with auxiliary_bn(wrapper.module):
            xa = self.perturb(wrapper, x, y)
            loss_adv = F.cross_entropy(wrapper.forward(xa), y)
        logits = wrapper.forward(x)
        return F.cross_entropy(logits, y) + loss_adv, logits


def adversarial_example_generator(method: str, eps: float, **options: Any) -> AdversarialTraining:
    """Build an :class:`AdversarialTraining` (``method`` in :data:`METHODS`)."""
    return AdversarialTraining(method, eps, **options)


__all__ = [
    "METHODS",
    "AdversarialTraining",
    "DualBatchNorm",
    "add_auxiliary_bn",
    "adversarial_example_generator",
    "auxiliary_bn",
    "strip_auxiliary_bn",
]
