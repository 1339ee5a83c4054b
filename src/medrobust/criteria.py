"""What "adversarial" means: criteria with a differentiable loss and a success test.

A criterion knows the labels (or targets) of a batch. ``loss(logits, index)`` returns a per-sample
loss that the attacker *maximizes*; ``is_adversarial(logits, index)`` says which samples meet the
goal. ``index`` selects the rows of the batch the logits belong to (attacks work on active subsets).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("ce", "margin")


def _margin(logits: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """``logits[cls] - max_{j != cls} logits[j]`` per sample."""
    true = logits.gather(1, cls.unsqueeze(1)).squeeze(1)
    other = logits.scatter(1, cls.unsqueeze(1), float("-inf")).amax(1)
    return true - other


class Criterion:
    """Base class: the labels of the batch and the loss used to reach the goal."""

    def __init__(self, labels: torch.Tensor, loss: str = "ce") -> None:
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; expected one of {LOSSES}")
        self.labels = labels
        self.loss_name = loss

    def to(self, device: torch.device) -> Criterion:
        raise NotImplementedError

    def loss(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def margin(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Signed distance to the goal in logit space: > 0 means adversarial."""
        raise NotImplementedError

    def is_adversarial(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Misclassification(Criterion):
    """Untargeted: any class but the label. CE loss (Goodfellow et al. 2015) or the margin loss
    ``max_{j != y} z_j - z_y`` (Carlini & Wagner 2017)."""

    def to(self, device: torch.device) -> Misclassification:
        return Misclassification(self.labels.to(device), self.loss_name)

    def loss(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        y = self.labels[index]
        if self.loss_name == "ce":
            return F.cross_entropy(logits, y, reduction="none")
        return -_margin(logits, y)

    def margin(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return -_margin(logits, self.labels[index])

    def is_adversarial(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return logits.argmax(1) != self.labels[index]


class TargetedMisclassification(Criterion):
    """Targeted: the prediction must be the target class. The CE loss is ``-CE(z, t)``; the margin
    loss ``z_t - max_{j != t} z_j``."""

    def __init__(self, labels: torch.Tensor, target: torch.Tensor, loss: str = "ce") -> None:
        super().__init__(labels, loss)
        self.target = target

    def to(self, device: torch.device) -> TargetedMisclassification:
        return TargetedMisclassification(
            self.labels.to(device), self.target.to(device), self.loss_name
        )

    def loss(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        t = self.target[index]
        if self.loss_name == "ce":
            return -F.cross_entropy(logits, t, reduction="none")
        return _margin(logits, t)

    def margin(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return _margin(logits, self.target[index])

    def is_adversarial(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return logits.argmax(1) == self.target[index]
