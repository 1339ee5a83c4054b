"""The classifier under attack: class logits, or one logit per finding (multi-label).

A :class:`Classifier` wraps any ``torch.nn.Module`` that returns logits. Inputs are given in the
units of ``bounds`` (``[0, 1]`` pixels, Hounsfield units, ...); optional preprocessing (an intensity
window, a resize) and per-channel normalization run inside the wrapper, differentiably, so that
every attack budget is expressed in input units (DESIGN.md, principle 1). The shared contract
(chunking, attack mode, input-only gradients, capability flags) is
:class:`~medrobust.models.base.Model`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from medrobust.models.base import Capabilities, LossFn, Model, ModelOutputError

if TYPE_CHECKING:
    from medrobust.criteria import Criterion

TASKS = ("multiclass", "multilabel")

__all__ = ["ClassTask", "Classifier", "LossFn", "TASKS"]


class Classifier(Model):
    """A classifier under attack.

    Args:
        module: any ``nn.Module`` returning logits of shape ``(N, K)``, or one logit per sample
            (``(N,)`` or ``(N, 1)``) for a binary sigmoid model, which is treated as two classes
            with logits ``[0, z]`` (so that ``softmax`` equals ``sigmoid(z)`` for class 1).
            With ``task="multilabel"`` the module returns one logit per finding ``(N, F)``, each
            finding present when its logit is > 0 (sigmoid > 0.5).
        bounds: ``(lo, hi)``: the range of valid inputs, in the user's units.
        mean, std: per-channel normalization ``(x - mean) / std`` applied inside the wrapper after
            ``preprocess`` (one value, or one per channel; any input rank).
        num_classes: the number of classes (findings for multi-label); checked against the
            module's output when given.
        preprocess: an optional differentiable callable applied first (e.g. an intensity window
            mapping HU to [0, 1], or a resize to the network's input size).
        chunk_size: the largest batch sent through the module at once; larger batches are split.
        device: where the module lives; by default the device of its first parameter or buffer.
        task: ``"multiclass"`` (one class per sample; binary included) or ``"multilabel"``
            (several findings per sample, labels ``(N, F)`` of 0/1).
        defense: a :class:`~medrobust.defenses.Defense` or a list of them (applied in order),
            run after the bounds check and before ``preprocess``; a randomized one makes
            ``capabilities.randomized`` true and predictions majority votes over ``votes`` draws.
        votes: draws per prediction with a randomized defense (default 10).

    The wrapper never changes the module permanently: :meth:`attack_mode` switches it to eval mode
    for the duration of an attack and restores every submodule's previous mode afterwards. Gradients
    are taken with ``torch.autograd.grad`` with respect to the input only, so no ``.grad`` appears
    on parameters and their ``requires_grad`` flags are left as they are. The caller's tensor is
    never handed to the module, so a network working in place on its input cannot change it.
    """

    kind = "classifier"

    def __init__(
        self,
        module: nn.Module,
        bounds: tuple[float, float] = (0.0, 1.0),
        mean: float | Sequence[float] | torch.Tensor | None = None,
        std: float | Sequence[float] | torch.Tensor | None = None,
        num_classes: int | None = None,
        preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
        chunk_size: int = 1024,
        device: torch.device | str | None = None,
        task: str = "multiclass",
        defense: Any = None,
        votes: int = 10,
    ) -> None:
        super().__init__(module, bounds, mean, std, preprocess, chunk_size, device,
                         defense=defense, votes=votes)
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}; got {task!r}")
        low = 1 if task == "multilabel" else 2
        if num_classes is not None and (
            isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < low
        ):
            raise ValueError(f"num_classes must be an integer >= {low}; got {num_classes!r}")
        self.num_classes = None if num_classes is None else int(num_classes)
        self.task = task
        self.capabilities = Capabilities(
            output="multilabel" if task == "multilabel" else "class",
            randomized=self.randomized_defense,
        )

    @property
    def multilabel(self) -> bool:
        return self.task == "multilabel"

    def _standardize(self, out: Any, n: int) -> torch.Tensor:
        if not isinstance(out, torch.Tensor):
            raise ModelOutputError(
                f"the model returned {type(out).__name__}; expected a tensor of logits (N, classes)"
            )
        if out.dim() == 1 and out.shape[0] == n:
            out = out.unsqueeze(1)
        if out.dim() != 2 or out.shape[0] != n:
            raise ModelOutputError(
                f"the model returned shape {tuple(out.shape)} for a batch of {n}; expected logits "
                f"of shape ({n}, classes), or ({n},) / ({n}, 1) for a binary sigmoid model"
            )
        if out.shape[1] == 1 and not self.multilabel:
            out = torch.cat([torch.zeros_like(out), out], dim=1)
        if self.num_classes is not None and out.shape[1] != self.num_classes:
            raise ModelOutputError(
                f"the model returned {out.shape[1]} logits per sample but num_classes="
                f"{self.num_classes}"
            )
        return out

    # ------------------------------------------------------------------ the task
    def check_labels(self, labels: Any, n: int, name: str = "labels") -> torch.Tensor:
        try:
            t = torch.as_tensor(labels)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(
                f"{name} must be a tensor or array; got {type(labels).__name__}"
            ) from None
        if t.is_complex() or (t.is_floating_point() and not self.multilabel):
            raise TypeError(f"{name} must be integer class indices; got dtype {t.dtype}")
        if self.multilabel:
            if t.dim() != 2 or t.shape[0] != n:
                raise ValueError(
                    f"{name} of a multi-label classifier must be 0/1 findings of shape ({n}, F); "
                    f"got shape {tuple(t.shape)}"
                )
            if t.is_floating_point() and not torch.isin(t, torch.tensor([0.0, 1.0])).all():
                raise ValueError(f"{name} of a multi-label classifier must be 0 or 1")
            return t.detach().long().cpu()
        if t.dtype == torch.bool:
            raise TypeError(f"{name} must be integer class indices; got dtype {t.dtype}")
        if t.dim() == 2 and t.shape[1] == 1:
            t = t[:, 0]
        if t.dim() != 1:
            raise ValueError(f"{name} must be one class index per sample, shape ({n},); got shape "
                             f"{tuple(t.shape)}")
        if t.shape[0] != n:
            raise ValueError(f"{name} has {t.shape[0]} entries but the batch has {n} inputs")
        return t.detach().long().cpu()

    def check_label_values(
        self, labels: torch.Tensor, target: torch.Tensor | None, num_outputs: int
    ) -> None:
        if self.multilabel:
            for name, t in (("labels", labels), ("target", target)):
                if t is None:
                    continue
                if t.shape[1] != num_outputs:
                    raise ValueError(
                        f"{name} have {t.shape[1]} findings per sample but the model outputs "
                        f"{num_outputs}"
                    )
                if t.numel() and (int(t.min()) < 0 or int(t.max()) > 1):
                    raise ValueError(f"{name} of a multi-label classifier must be 0 or 1")
            return
        for name, t in (("labels", labels), ("target", target)):
            if t is not None and t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_outputs):
                raise ValueError(
                    f"{name} must lie in [0, {num_outputs - 1}] (the model has {num_outputs} "
                    f"classes); got values in [{int(t.min())}, {int(t.max())}]"
                )
        if target is not None:
            same = (target == labels).nonzero().flatten()
            if same.numel():
                raise ValueError(
                    f"target equals the label for {same.numel()} sample(s) "
                    f"(indices {same[:10].tolist()}); a targeted attack needs target != label"
                )

    def default_criterion(self, targeted: bool) -> Criterion:
        from medrobust.criteria import (
            FindingFlip,
            Misclassification,
            TargetedMisclassification,
        )

        if self.multilabel:
            return FindingFlip()
        return TargetedMisclassification() if targeted else Misclassification()

    def predictions(self, outputs: torch.Tensor) -> torch.Tensor:
        if self.multilabel:
            return (outputs > 0).long()
        return outputs.argmax(1)

    def near_tie(self, outputs: torch.Tensor, rtol: float = 1e-4) -> torch.Tensor:
        if self.multilabel:
            scale = 1.0 + outputs.abs().amax(1, keepdim=True)
            return (outputs.abs() <= rtol * scale).any(1)
        return super().near_tie(outputs, rtol)

    def __repr__(self) -> str:
        task = "" if self.task == "multiclass" else f", task={self.task!r}"
        if self.defense is not None:
            task += f", defense={[d.name for d in self.defense]}"
        return (
            f"Classifier({type(self.module).__name__}, bounds={self.bounds}, "
            f"num_classes={self.num_classes}, chunk_size={self.chunk_size}{task})"
        )


class ClassTask:
    """The classification task of a model kind that classifies through others (a black box, an
    ensemble): labels, targets, criteria and decisions are those of the :class:`Classifier` held
    in ``self._task``."""

    _task: Classifier

    def check_labels(self, labels: Any, n: int, name: str = "labels") -> torch.Tensor:
        return self._task.check_labels(labels, n, name)

    def check_label_values(
        self, labels: torch.Tensor, target: torch.Tensor | None, num_outputs: int
    ) -> None:
        self._task.check_label_values(labels, target, num_outputs)

    def default_criterion(self, targeted: bool) -> Criterion:
        return self._task.default_criterion(targeted)

    def predictions(self, outputs: torch.Tensor) -> torch.Tensor:
        return self._task.predictions(outputs)
