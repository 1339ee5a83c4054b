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
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from medrobust.criteria import LOSSES, Criterion
from medrobust.models.base import Model, check_capabilities
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
        model: the model (a :class:`~medrobust.models.base.Model`, already in eval mode).
        x: the clean inputs on the model's device in its dtype ``(N, ...)``; never modify it.
        labels, target: int64, ``(N,)`` classes (or the model kind's form: ``(N, F)`` findings,
            label maps); ``target`` is ``None`` for untargeted attacks.
        criterion: the goal, with the chosen loss.
        mask: ``None`` or a 0/1 tensor of ``x``'s shape: 1 where the perturbation is allowed.
        bounds: ``(lo, hi)``.
        num_classes: the number of classes (findings) the model outputs per sample.
        generator: the attack's random generator (CPU); draw with :meth:`rand` / :meth:`randn`.
        bpda, eot: adaptive gradients against a defended model (see
            :meth:`~medrobust.models.base.Model.value_and_grad`); set from the attack's own
            ``bpda`` / ``eot`` attributes. Each EOT draw counts as a forward and a backward pass.
    """

    def __init__(
        self,
        model: Model,
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
        self.bpda = False
        self.eot = 1

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
        """Logits without autograd (chunked); a majority vote with a randomized defense."""
        self.forward_passes += int(x.shape[0]) * getattr(self.model, "draws_per_prediction", 1)
        return self.model.logits(x)

    def value_and_grad(
        self, x: torch.Tensor, index: torch.Tensor, loss_fn: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits, per-sample loss and input gradient of the criterion's loss (or ``loss_fn``,
        called as ``loss_fn(logits, index_into_batch)``) for the rows ``index`` of the batch."""
        self.forward_passes += int(x.shape[0]) * self.eot
        self.backward_passes += int(x.shape[0]) * self.eot
        fn = loss_fn if loss_fn is not None else self.criterion.loss
        adaptive: dict[str, Any] = {}
        if self.bpda or self.eot > 1:  # only then: model kinds without a defense need not know
            adaptive = {"bpda": self.bpda, "eot": self.eot}
        return self.model.value_and_grad(x, lambda logits, i: fn(logits, index[i]), **adaptive)

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
    requires_gradients: bool = True
    """Needs input gradients (a black box or a label-only model is refused)."""
    requires_scores: bool = True
    """Needs real-valued outputs (a label-only model is refused)."""
    supports_multilabel: bool = False
    """Handles multi-label classifiers (any criterion with a loss: the gradient loop)."""
    supports_dense: bool = False
    """Handles dense outputs (segmenters: per-pixel losses and dense criteria)."""
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
        model: Model,
        inputs: torch.Tensor,
        labels: Any,
        target: Any = None,
        mask: torch.Tensor | None = None,
        criterion: Criterion | None = None,
    ) -> AttackResult:
        """Attack ``model`` on ``inputs`` (in the model's units) with true ``labels``.

        Args:
            model: a model kind (:class:`~medrobust.models.Classifier`, ...) implementing the
                contract of :class:`~medrobust.models.base.Model`.
            inputs: ``(N, C, ...)`` float tensor inside ``model.bounds``; 1D, 2D and 3D alike;
                float16/bfloat16 inputs are attacked in float32 and the result is rounded inward.
            labels: the truth for the model's output kind: ``(N,)`` classes, ``(N, F)`` findings.
            target: the same form; makes the attack targeted.
            mask: broadcastable to ``inputs``; nonzero where the perturbation is allowed.
            criterion: what "adversarial" means (unbound, e.g. ``FindingFlip(3)``); by default the
                model kind's (misclassification, or classification as ``target``).
        """
        if not isinstance(model, Model):
            raise TypeError(
                f"model must be a medrobust model (Classifier, ...); got {type(model).__name__}. "
                "Wrap your network: medrobust.Classifier(module, bounds=(lo, hi))"
            )
        check_capabilities(self, model)
        model.check_inputs(inputs)
        rank = inputs.dim() - 2
        if self.spatial_ranks is not None and rank not in self.spatial_ranks:
            raise ValueError(
                f"{type(self).__name__} works on inputs with {self.spatial_ranks} spatial "
                f"dimensions; got shape {tuple(inputs.shape)} ({rank} spatial)"
            )
        n = int(inputs.shape[0])
        device, dtype = model.device, model.work_dtype
        y = model.check_labels(labels, n, "labels")
        t = None if target is None else model.check_labels(target, n, "target")
        if t is not None and not self.supports_targeted:
            raise ValueError(
                f"{type(self).__name__} is an untargeted attack; call it without target"
            )
        if criterion is not None and not isinstance(criterion, Criterion):
            raise TypeError(
                f"criterion must be a medrobust.criteria.Criterion; got {type(criterion).__name__}"
            )
        m = _check_mask(mask, inputs)
        self._check_budget_scale(model, inputs)

        gen, used_seed = _new_generator(self.seed, self.generator)
        x = inputs.detach().to(device=device, dtype=dtype)
        with model.attack_mode():
            num_classes, ctx_forward = model.num_outputs(x)
            model.check_label_values(y, t, num_classes)
            y_dev = y.to(device)
            t_dev = None if t is None else t.to(device)
            spec = criterion if criterion is not None else model.default_criterion(t is not None)
            _check_criterion_kind(spec, model)
            crit = spec.bind(y_dev, t_dev, self.loss)
            m_dev = None if m is None else m.to(device=device, dtype=dtype)
            ctx = AttackContext(model, x, y_dev, t_dev, crit, m_dev, num_classes, gen)
            ctx.forward_passes = ctx_forward
            ctx.bpda, ctx.eot = _adaptive_options(self)
            eps = self._budget(n, device)
            out = self.run(ctx)
            adv_w, logits = self._enforce(ctx, out, eps)
            final = adv_w.to(dtype=inputs.dtype)
            if m is not None or inputs.dtype != dtype:
                # keep untouched elements bit-identical to the caller's tensor
                final = torch.where(adv_w == x, inputs.to(device), final)
            final = final.clamp(*model.bounds)
            if _is_lower_precision(inputs.dtype, dtype):
                final = _round_inward(final, inputs.to(device), adv_w, x, eps,
                                      self._norm_for_budget())
            # The outputs an attack computed on its own sub-batches are reused only when they are
            # for exactly the returned tensor and no sample sits on a decision tie: there, float
            # noise from another batch composition could flip the decision (minimum-norm attacks
            # end on the boundary by design), so the whole returned batch is evaluated once more,
            # as a user checking ``model.logits(adversarial)`` would.
            # A randomized model (defense) is always judged on its own majority vote.
            if (
                logits is None
                or model.capabilities.randomized
                or bool(_rows_differ(final.to(dtype), adv_w).any())
                or bool(model.near_tie(logits).any())
            ):
                logits = ctx.logits(final.to(dtype))
            index = ctx.all_index()
            success = crit.is_adversarial(logits, index).cpu()
            predictions = model.predictions(logits).cpu()
            voxel_success, dice = _dense_evidence(model, crit, logits, index, predictions, y,
                                                  num_classes)

        final = final.to(inputs.device)
        norms = {k: v.cpu() for k, v in measure_all(final.to(dtype) - inputs.to(dtype)).items()}
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
            voxel_success=voxel_success,
            dice=dice,
        )

    def _check_budget_scale(self, model: Model, inputs: torch.Tensor) -> None:
        """Warn when a budget cannot be meant: at or above the whole range of the bounds."""
        eps = getattr(self, "eps", None)
        norm = self._norm_for_budget()
        if eps is None or norm is None:
            return
        e = float(eps.max()) if isinstance(eps, torch.Tensor) else float(eps)
        per = int(inputs[0].numel())
        limit = {"linf": 1.0, "l2": math.sqrt(per), "l1": float(per)}.get(norm.name)
        if limit is not None and e >= model.span * limit:
            scale = "" if norm.name == "linf" else f" x ||1|| = {model.span * limit:g}"
            warnings.warn(
                f"{type(self).__name__}: eps={e:g} ({norm.name}) is at or above the whole range of "
                f"the model's bounds {model.bounds} (span {model.span:g}{scale}): every input is "
                "reachable; did you mean a budget in the model's units?",
                stacklevel=3,
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
def _check_criterion_kind(spec: Criterion, model: Model) -> None:
    """A criterion for dense outputs goes with a dense model, and only there."""
    dense_model = model.capabilities.output == "dense"
    dense_crit = bool(getattr(spec, "dense", False))
    if dense_model and not dense_crit:
        raise TypeError(
            f"{type(spec).__name__} is a criterion for class outputs; a {model.kind} needs a "
            "dense criterion (medrobust.criteria.PixelFraction, DiceBelow, TargetMask)"
        )
    if dense_crit and not dense_model:
        raise TypeError(
            f"{type(spec).__name__} is a criterion for dense outputs (label maps); the "
            f"{model.kind} ({type(model).__name__}) does not produce them"
        )


def _dense_evidence(
    model: Model, crit: Criterion, logits: torch.Tensor, index: torch.Tensor,
    predictions: torch.Tensor, labels: torch.Tensor, num_classes: int,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(voxel_success, dice)`` of a dense model's result; ``(None, None)`` otherwise."""
    if model.capabilities.output != "dense":
        return None, None
    from medrobust.criteria import dice_per_class

    voxel = getattr(crit, "voxel_success", None)
    vs = voxel(logits, index).cpu() if callable(voxel) else predictions != labels
    return vs, dice_per_class(predictions, labels, num_classes)


def _check_eps(eps: Any) -> float | torch.Tensor:
    if isinstance(eps, np.generic):
        eps = eps.item()
    elif isinstance(eps, np.ndarray):
        eps = torch.from_numpy(eps.astype(np.float64)) if eps.ndim else eps.item()
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
        raise TypeError(
            f"eps must be a number, a numpy scalar/array or a tensor; got {type(eps).__name__}"
        )
    if not math.isfinite(eps):
        raise ValueError(f"eps must be finite; got {eps}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0; got {eps}")
    return float(eps)


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


def _adaptive_options(attack: Attack) -> tuple[bool, int]:
    """An attack's ``bpda`` (bool) and ``eot`` (a positive int) for a defended model; attacks
    whose ``eot`` means something else (a patch attack's transformation set) get ``(.., 1)``."""
    eot = getattr(attack, "eot", 1)
    eot = eot if isinstance(eot, int) and not isinstance(eot, bool) and eot >= 1 else 1
    return getattr(attack, "bpda", False) is True, eot


def _rows_differ(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a != b).reshape(a.shape[0], -1).any(1)


def as_batch(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample ``(N,)`` values broadcastable against ``like``."""
    return batch_view(v, like)


def _is_lower_precision(dtype: torch.dtype, work: torch.dtype) -> bool:
    return torch.finfo(dtype).eps > torch.finfo(work).eps


def _round_inward(
    final: torch.Tensor,
    inputs: torch.Tensor,
    adv_w: torch.Tensor,
    x_w: torch.Tensor,
    eps: torch.Tensor | None,
    norm: Norm | None,
) -> torch.Tensor:
    """Round a perturbation computed in float32 into a lower-precision input dtype *inward*.

    Each element whose rounded change is larger than the computed change is moved one ulp back
    towards the clean value, so that every norm of the rounded perturbation is at most that of the
    computed one; a sample still over its budget as measured in the input's dtype (where even the
    subtraction rounds) is shrunk until it fits."""
    w = x_w.dtype
    grew = (final.to(w) - x_w).abs() > (adv_w - x_w).abs()
    if grew.any():
        final = torch.where(grew, torch.nextafter(final, inputs), final)
    if eps is None or norm is None:
        return final
    for _ in range(8):
        over = norm.measure((final - inputs).to(w)) > eps
        if not over.any():
            break
        idx = over.nonzero().flatten()
        d = (final[idx] - inputs[idx]).to(w)
        shrunk = (inputs[idx].to(w) + d * (1 - 2 * torch.finfo(final.dtype).eps)).to(final.dtype)
        shrunk = torch.where(shrunk == final[idx], torch.nextafter(shrunk, inputs[idx]), shrunk)
        final = final.clone()
        final[idx] = shrunk
    return final
