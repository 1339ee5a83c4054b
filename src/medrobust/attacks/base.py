"""The shared ``__call__`` of every attack: validation, the side-effect-free context, bookkeeping.

As in Foolbox 3 (``foolbox/attacks/base.py``), the base class owns everything a subclass could get
wrong — input checks, the model's mode, the mask, the bounds, the budget, success computed on the
returned tensor, the cost spent — and subclasses implement only :meth:`Attack.run`.

Two kinds of attack share one result type (DESIGN principle 4): a :class:`FixedBudgetAttack` asks
"is there an adversarial example within ``eps``?" and a :class:`MinimumNormAttack` asks "how far is
the nearest one?".
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

from medrobust.criteria import LOSSES, Criterion, Misclassification, TargetedMisclassification
from medrobust.models import Classifier
from medrobust.norms import Norm, batch_view, get_norm, measure_all
from medrobust.results import AttackResult


@dataclass
class RunOutput:
    """What :meth:`Attack.run` returns: the adversarial inputs (working dtype and device) and,
    optionally, the logits of exactly those inputs, so that the base class need not recompute them.
    """

    adversarial: torch.Tensor
    logits: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class AttackContext:
    """Everything an attack's ``run`` needs for one call, with the model evaluations counted.

    Attributes:
        model: the :class:`~medrobust.models.Classifier` (already in eval mode).
        x: the clean inputs on the model's device in its dtype ``(N, ...)``; never modify it.
        labels, target: int64 ``(N,)`` (``target`` is ``None`` for untargeted attacks).
        criterion: the goal, with the chosen loss.
        mask: ``None`` or a 0/1 tensor of ``x``'s shape: 1 where the perturbation is allowed.
        bounds: ``(lo, hi)``.
        num_classes: the number of classes the model outputs.
        generator: the attack's random generator (CPU); draw with :meth:`rand` / :meth:`randn`.
    """

    def __init__(
        self,
        model: Classifier,
        x: torch.Tensor,
        labels: torch.Tensor,
        target: torch.Tensor | None,
        criterion: Criterion,
        mask: torch.Tensor | None,
        num_classes: int,
        generator: torch.Generator,
    ) -> None:
        self.model = model
        self.x = x
        self.labels = labels
        self.target = target
        self.criterion = criterion
        self.mask = mask
        self.bounds = model.bounds
        self.num_classes = num_classes
        self.generator = generator
        self.forward_passes = 0
        self.backward_passes = 0

    @property
    def targeted(self) -> bool:
        return self.target is not None

    @property
    def n(self) -> int:
        return int(self.x.shape[0])

    def all_index(self) -> torch.Tensor:
        return torch.arange(self.n, device=self.x.device)

    # --- model evaluations, counted per sample
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits without autograd (chunked)."""
        self.forward_passes += int(x.shape[0])
        return self.model.logits(x)

    def value_and_grad(
        self, x: torch.Tensor, index: torch.Tensor, loss_fn: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits, per-sample loss and input gradient of the criterion's loss (or ``loss_fn``,
        called as ``loss_fn(logits, index_into_batch)``) for the rows ``index`` of the batch."""
        self.forward_passes += int(x.shape[0])
        self.backward_passes += int(x.shape[0])
        fn = loss_fn if loss_fn is not None else self.criterion.loss
        return self.model.value_and_grad(x, lambda logits, i: fn(logits, index[i]))

    def is_adversarial(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return self.criterion.is_adversarial(logits, index)

    # --- constraints
    def clip(self, x: torch.Tensor) -> torch.Tensor:
        """Clamp to the model's bounds."""
        return x.clamp(self.bounds[0], self.bounds[1])

    def masked(self, delta: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """``delta`` with the forbidden region zeroed (rows ``index`` of the batch)."""
        if self.mask is None:
            return delta
        m = self.mask if index is None else self.mask[index]
        return delta * m

    # --- randomness (the attack's own generator, never the global state)
    def rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=self.generator).to(self.x.device)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator).to(self.x.device)


def _new_generator(seed: int | None, generator: torch.Generator | None) -> tuple[
    torch.Generator, int | None
]:
    if generator is not None:
        return generator, None
    if seed is None:
        seed = int.from_bytes(os.urandom(7), "little")
    g = torch.Generator()
    g.manual_seed(int(seed))
    return g, int(seed)


class Attack(ABC):
    """Base class of all attacks.

    Subclasses set ``name`` and implement :meth:`run`; ``__call__`` is final and does the
    bookkeeping. Randomness comes from ``seed`` (a fresh generator each call, so that the same seed
    reproduces the same result) or from a ``generator`` the caller owns; never the global state.
    """

    name: str = "attack"
    supports_targeted: bool = True
    spatial_ranks: tuple[int, ...] | None = None
    """The spatial ranks (1 = signals, 2 = images, 3 = volumes) the method makes sense for;
    ``None`` means any."""

    def __init__(
        self,
        *,
        loss: str = "ce",
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; expected one of {LOSSES}")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise TypeError(f"seed must be an int; got {seed!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator; got {type(generator).__name__}")
        self.loss = loss
        self.seed = seed
        self.generator = generator

    # ------------------------------------------------------------------ API
    @abstractmethod
    def run(self, ctx: AttackContext) -> RunOutput:
        """Find adversarial inputs for ``ctx.x``.

        The base class then enforces the mask, the bounds and the budget."""

    def config(self) -> dict[str, Any]:
        """The attack's name and hyperparameters (for reports and reproducibility)."""
        out: dict[str, Any] = {"name": self.name}
        for k, v in vars(self).items():
            if k == "generator" or k.startswith("_"):
                continue
            if isinstance(v, torch.Tensor):
                v = v.tolist()
            elif isinstance(v, Norm):
                v = v.name
            out[k] = v
        return out

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({args})"

    def _budget(self, n: int, device: torch.device) -> torch.Tensor | None:
        """Per-sample budget ``(N,)`` for fixed-budget attacks; ``None`` otherwise."""
        return None

    def _norm_for_budget(self) -> Norm | None:
        return None

    # --------------------------------------------------------------- __call__
    def __call__(
        self,
        model: Classifier,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        target: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> AttackResult:
        """Attack ``model`` on ``inputs`` (in the model's units) with true ``labels``.

        Args:
            model: a :class:`~medrobust.models.Classifier`.
            inputs: ``(N, C, ...)`` float tensor inside ``model.bounds``; 1D, 2D and 3D alike.
            labels: ``(N,)`` true classes.
            target: ``(N,)`` target classes; makes the attack targeted.
            mask: broadcastable to ``inputs``; nonzero where the perturbation is allowed.
        """
        if not isinstance(model, Classifier):
            raise TypeError(
                f"model must be a medrobust.Classifier; got {type(model).__name__}. Wrap your "
                "network: medrobust.Classifier(module, bounds=(lo, hi))"
            )
        model.check_inputs(inputs)
        rank = inputs.dim() - 2
        if self.spatial_ranks is not None and rank not in self.spatial_ranks:
            raise ValueError(
                f"{type(self).__name__} works on inputs with {self.spatial_ranks} spatial "
                f"dimensions; got shape {tuple(inputs.shape)} ({rank} spatial)"
            )
        n = int(inputs.shape[0])
        device, dtype = model.device, model.dtype
        y = _check_classes(labels, n, "labels")
        t = None if target is None else _check_classes(target, n, "target")
        if t is not None and not self.supports_targeted:
            raise ValueError(
                f"{type(self).__name__} is an untargeted attack; call it without target"
            )
        m = _check_mask(mask, inputs)

        gen, used_seed = _new_generator(self.seed, self.generator)
        x = inputs.detach().to(device=device, dtype=dtype)
        with model.attack_mode():
            num_classes = model.num_classes
            ctx_forward = 0
            if num_classes is None:
                num_classes = int(model.logits(x[:1]).shape[1])
                ctx_forward = 1
            _check_range(y, num_classes, "labels")
            if t is not None:
                _check_range(t, num_classes, "target")
                same = (t == y).nonzero().flatten()
                if same.numel():
                    raise ValueError(
                        f"target equals the label for {same.numel()} sample(s) "
                        f"(indices {same[:10].tolist()}); a targeted attack needs target != label"
                    )
            y_dev = y.to(device)
            t_dev = None if t is None else t.to(device)
            criterion: Criterion = (
                Misclassification(y_dev, self.loss)
                if t_dev is None
                else TargetedMisclassification(y_dev, t_dev, self.loss)
            )
            m_dev = None if m is None else m.to(device=device, dtype=dtype)
            ctx = AttackContext(model, x, y_dev, t_dev, criterion, m_dev, num_classes, gen)
            ctx.forward_passes = ctx_forward
            eps = self._budget(n, device)
            out = self.run(ctx)
            adv_w, logits = self._enforce(ctx, out, eps)
            final = adv_w.to(dtype=inputs.dtype)
            if m is not None or inputs.dtype != dtype:
                # keep untouched elements bit-identical to the caller's tensor
                final = torch.where(adv_w == x, inputs.to(device), final)
            final = final.clamp(*model.bounds)
            # The logits an attack computed on its own sub-batches are reused only when they are
            # for exactly the returned tensor and no sample sits on a decision tie: there, float
            # noise from another batch composition could flip the argmax (minimum-norm attacks end
            # on the boundary by design), so the whole returned batch is evaluated once more, as
            # a user checking ``model.logits(adversarial)`` would.
            if (
                logits is None
                or bool(_rows_differ(final.to(dtype), adv_w).any())
                or bool(_near_tie(logits).any())
            ):
                logits = ctx.logits(final.to(dtype))
            index = ctx.all_index()
            success = criterion.is_adversarial(logits, index).cpu()
            predictions = logits.argmax(1).cpu()

        final = final.to(inputs.device)
        norms = {k: v.cpu() for k, v in measure_all(final - inputs).items()}
        config = self.config()
        if used_seed is not None:
            config["seed"] = used_seed
        return AttackResult(
            adversarial=final,
            success=success,
            predictions=predictions,
            labels=y.cpu(),
            target=None if t is None else t.cpu(),
            perturbation_norms=norms,
            forward_passes=ctx.forward_passes,
            backward_passes=ctx.backward_passes,
            attack=config,
            extra=out.extra,
        )

    def _enforce(
        self, ctx: AttackContext, out: RunOutput, eps: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mask, bounds and budget, changing only what violates them."""
        x = ctx.x
        adv = out.adversarial.detach()
        if adv.shape != x.shape:
            raise RuntimeError(
                f"{type(self).__name__}.run returned shape {tuple(adv.shape)}, expected "
                f"{tuple(x.shape)}"
            )
        adv = adv.to(x.dtype)
        adv = torch.where(torch.isfinite(adv), adv, x)
        if ctx.mask is not None:
            adv = torch.where(ctx.mask != 0, adv, x)
        adv = ctx.clip(adv)
        norm = self._norm_for_budget()
        if eps is not None and norm is not None:
            lo, hi = ctx.bounds
            over = norm.measure(adv - x) > eps * (1 + 1e-5) + 1e-6 * (hi - lo)
            if over.any():
                idx = over.nonzero().flatten()
                delta = norm.project(adv[idx] - x[idx], eps[idx])
                adv = adv.clone()
                adv[idx] = ctx.clip(x[idx] + delta)
        logits = out.logits
        if logits is not None:
            changed = _rows_differ(adv, out.adversarial.to(x.dtype))
            if changed.any():
                logits = logits.clone()
                idx = changed.nonzero().flatten()
                logits[idx] = ctx.logits(adv[idx])
        return adv, logits


class FixedBudgetAttack(Attack):
    """An attack with a budget ``eps`` under a norm: the result lies in the eps-ball."""

    def __init__(
        self,
        eps: float | torch.Tensor,
        norm: str | Norm = "linf",
        *,
        loss: str = "ce",
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(loss=loss, seed=seed, generator=generator)
        self.eps = _check_eps(eps)
        self.norm = get_norm(norm)

    def _budget(self, n: int, device: torch.device) -> torch.Tensor:
        eps = self.eps
        if isinstance(eps, torch.Tensor) and eps.dim() == 1 and eps.numel() != n:
            raise ValueError(
                f"eps has {eps.numel()} values but the batch has {n} samples; give one eps per "
                "sample or a single number"
            )
        return torch.as_tensor(eps, dtype=torch.float32).to(device).expand(n).clone()

    def _norm_for_budget(self) -> Norm:
        return self.norm


class MinimumNormAttack(Attack):
    """An attack that looks for the smallest perturbation under ``norm`` that meets the goal."""

    def __init__(
        self,
        norm: str | Norm = "l2",
        *,
        loss: str = "ce",
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(loss=loss, seed=seed, generator=generator)
        self.norm = get_norm(norm)


# ------------------------------------------------------------------ validation helpers
def _check_eps(eps: float | torch.Tensor) -> float | torch.Tensor:
    if isinstance(eps, torch.Tensor):
        if eps.dim() > 1:
            raise ValueError(f"eps must be a number or a 1-D tensor (one per sample); got shape "
                             f"{tuple(eps.shape)}")
        e = eps.detach().float().cpu()
        if not torch.isfinite(e).all():
            raise ValueError("eps contains NaN or Inf")
        if (e < 0).any():
            raise ValueError(f"eps must be >= 0; got min {float(e.min()):g}")
        return e if e.dim() == 1 else float(e)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a number or a tensor; got {type(eps).__name__}")
    if not math.isfinite(eps):
        raise ValueError(f"eps must be finite; got {eps}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0; got {eps}")
    return float(eps)


def _check_classes(v: Any, n: int, name: str) -> torch.Tensor:
    t = torch.as_tensor(v)
    if t.dim() == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if t.dim() != 1:
        raise ValueError(f"{name} must be one class index per sample, shape ({n},); got shape "
                         f"{tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be integer class indices; got dtype {t.dtype}")
    if t.shape[0] != n:
        raise ValueError(f"{name} has {t.shape[0]} entries but the batch has {n} inputs")
    return t.detach().long().cpu()


def _check_range(t: torch.Tensor, num_classes: int, name: str) -> None:
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        raise ValueError(
            f"{name} must lie in [0, {num_classes - 1}] (the model has {num_classes} classes); "
            f"got values in [{int(t.min())}, {int(t.max())}]"
        )


def _check_mask(mask: Any, inputs: torch.Tensor) -> torch.Tensor | None:
    if mask is None:
        return None
    m = torch.as_tensor(mask, device=inputs.device)
    try:
        m = torch.broadcast_to(m, inputs.shape)
    except RuntimeError:
        raise ValueError(
            f"mask of shape {tuple(m.shape)} does not broadcast to the inputs' shape "
            f"{tuple(inputs.shape)}"
        ) from None
    if m.is_floating_point() and not torch.isfinite(m).all():
        raise ValueError("mask contains NaN or Inf")
    return (m != 0).to(inputs.dtype)


def _near_tie(logits: torch.Tensor, rtol: float = 1e-4) -> torch.Tensor:
    """Samples whose two largest logits are closer than ``rtol`` times the logits' scale."""
    if logits.shape[1] < 2:
        return torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    top2 = logits.topk(2, dim=1).values
    scale = 1.0 + logits.abs().amax(1)
    return (top2[:, 0] - top2[:, 1]) <= rtol * scale


def _rows_differ(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a != b).reshape(a.shape[0], -1).any(1)


def as_batch(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample ``(N,)`` values broadcastable against ``like``."""
    return batch_view(v, like)
