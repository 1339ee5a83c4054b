"""An ensemble of classifiers as one model kind, for transfer attacks.

Liu, Chen, Liu & Song, "Delving into Transferable Adversarial Examples and Black-box Attacks",
ICLR 2017: adversarial examples crafted on an ensemble of models transfer better than those crafted
on any one of them (their ensemble fuses the models' logits, Eq. 4 ... the softmax of the weighted
sum of logits). Dong et al. (CVPR 2018, MI-FGSM) compare fusing logits, predictions or losses.

``combine="logits"``: the ensemble's outputs are the weighted mean of the members' logits, and the
attack's loss is taken on them. ``combine="loss"``: the attack's loss is the weighted mean of each
member's own loss (the outputs, used for the success test, are still the mean logits). Every member
keeps its own preprocessing and normalization (inputs are in the shared bounds' units), so the
members must share bounds and units; every gradient attack accepts an ensemble.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from medrobust.models.base import Capabilities, LossFn, Model, ModelOutputError
from medrobust.models.classifier import Classifier, ClassTask

if TYPE_CHECKING:
    pass

COMBINE = ("logits", "loss")

__all__ = ["COMBINE", "Ensemble"]


class Ensemble(ClassTask, Model):
    """Several classifiers attacked as one.

    Args:
        members: the classifiers (same bounds, same number of classes, same units).
        weights: one non-negative weight per member (normalized to sum 1); default equal.
        combine: ``"logits"`` (mean logits) or ``"loss"`` (mean of the members' losses).
        units: optional units per member (e.g. from saved models' metadata), checked equal.
    """

    kind = "ensemble"

    def __init__(
        self,
        members: Sequence[Classifier],
        weights: Sequence[float] | None = None,
        combine: str = "logits",
        units: Sequence[str] | None = None,
    ) -> None:
        members = list(members)
        if len(members) < 1:
            raise ValueError("an ensemble needs at least one member")
        for i, m in enumerate(members):
            if not isinstance(m, Classifier):
                raise TypeError(
                    f"ensemble member {i} is a {type(m).__name__}; members must be "
                    "medrobust.Classifier (a black box has no gradients to combine)"
                )
            if m.multilabel:
                raise ValueError(f"ensemble member {i} is multi-label; members must be multi-class")
        if combine not in COMBINE:
            raise ValueError(f"combine must be one of {COMBINE}; got {combine!r}")
        bounds = {m.bounds for m in members}
        if len(bounds) > 1:
            raise ValueError(
                f"ensemble members have different bounds {sorted(bounds)}: every member must take "
                "inputs in the same units and range (wrap them with the same bounds)"
            )
        if units is not None:
            if len(units) != len(members):
                raise ValueError(f"units has {len(units)} entries for {len(members)} members")
            if len(set(units)) > 1:
                raise ValueError(f"ensemble members have different units {sorted(set(units))}")
        ks = {m.num_classes for m in members if m.num_classes is not None}
        if len(ks) > 1:
            raise ValueError(f"ensemble members have different numbers of classes {sorted(ks)}")
        if weights is None:
            w = torch.full((len(members),), 1.0 / len(members))
        else:
            w = torch.as_tensor(list(weights), dtype=torch.float64)
            if w.shape != (len(members),) or not torch.isfinite(w).all() or (w < 0).any() \
                    or float(w.sum()) <= 0:
                raise ValueError(
                    f"weights must be {len(members)} non-negative numbers, not all zero; got "
                    f"{list(weights)!r}"
                )
            w = (w / w.sum()).float()
        super().__init__(nn.ModuleList([m.module for m in members]), members[0].bounds,
                         chunk_size=min(m.chunk_size for m in members))
        self.members = members
        self.weights = w
        self.combine = combine
        self.num_classes = next(iter(ks)) if ks else None
        self.capabilities = Capabilities(gradients=True, scores=True, output="class")
        self._task = members[0]

    @property
    def device(self) -> torch.device:
        return self.members[0].device

    @property
    def work_dtype(self) -> torch.dtype:
        return self.members[0].work_dtype

    def _standardize(self, out: Any, n: int) -> torch.Tensor:  # pragma: no cover - unused
        return out  # type: ignore[no-any-return]

    def member_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each member's logits for ``x`` (with autograd)."""
        outs = [m.forward(x) for m in self.members]
        ks = {o.shape[1] for o in outs}
        if len(ks) > 1:
            raise ModelOutputError(
                f"ensemble members returned different numbers of classes {sorted(ks)}"
            )
        return outs

    def _mean(self, outs: list[torch.Tensor]) -> torch.Tensor:
        w = self.weights.to(outs[0].device, outs[0].dtype)
        return sum(wi * o for wi, o in zip(w, outs, strict=True))  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._mean(self.member_outputs(x))

    __call__ = forward

    def value_and_grad(
        self, x: torch.Tensor, loss_fn: LossFn, *, bpda: bool = False, eot: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.combine == "logits":
            return super().value_and_grad(x, loss_fn, bpda=bpda, eot=eot)
        if bpda or eot != 1:
            raise ValueError("adaptive gradients (bpda/eot) are available for ensembles that "
                             "combine logits only")
        out_parts, loss_parts, grad_parts = [], [], []
        for s in self._chunks(x.shape[0]):
            xi = x[s].detach().requires_grad_(True)
            with torch.enable_grad():
                outs = self.member_outputs(xi)
                index = torch.arange(s.start, s.stop, device=outs[0].device)
                w = self.weights.to(outs[0].device, outs[0].dtype)
                loss = sum(wi * loss_fn(o, index) for wi, o in zip(w, outs, strict=True))
                (grad,) = torch.autograd.grad(loss.sum(), xi)  # type: ignore[union-attr]
            out_parts.append(self._mean([o.detach() for o in outs]))
            loss_parts.append(loss.detach())  # type: ignore[union-attr]
            grad_parts.append(grad.detach())
        return torch.cat(out_parts), torch.cat(loss_parts), torch.cat(grad_parts)


    def check_inputs(self, x: torch.Tensor, name: str = "inputs") -> None:
        for m in self.members:
            m.check_inputs(x, name)

    def __repr__(self) -> str:
        return (f"Ensemble({len(self.members)} members, weights={self.weights.tolist()}, "
                f"combine={self.combine!r})")
