"""What "adversarial" means: criteria with a differentiable loss and a success test.

A criterion knows the labels (or targets) of a batch. ``loss(logits, index)`` returns a per-sample
loss that the attacker *maximizes*; ``is_adversarial(logits, index)`` says which samples meet the
goal. ``index`` selects the rows of the batch the logits belong to (attacks work on active subsets).

Losses by name (``LOSSES``), for every gradient attack:

* ``"ce"``: cross-entropy (Goodfellow et al. 2015);
* ``"margin"``: the logit margin of Carlini & Wagner (2017);
* ``"dlr"``: the Difference of Logits Ratio of Croce & Hein, "Reliable evaluation of adversarial
  robustness with an ensemble of diverse parameter-free attacks", ICML 2020 (eq. 6):
  ``-(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3)``, invariant to shifts and rescalings of the
  logits, so a saturated softmax or logits multiplied by a constant do not hide the gradient;
* ``"dlr-targeted"``: their targeted DLR (eq. 7),
  ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)``; needs target classes.

``z_pi1 >= z_pi2 >= ...`` are the sorted logits. DLR needs at least three classes: on a binary task
(two logits) both DLR losses fall back to the margin loss, with a warning, and the criterion records
the fact in :attr:`Criterion.notes`. With three classes the targeted DLR's denominator uses
``z_pi3`` alone (there is no ``z_pi4``).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

LOSSES = ("ce", "margin", "dlr", "dlr-targeted")
_DLR_TINY = 1e-12


def _margin(logits: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """``logits[cls] - max_{j != cls} logits[j]`` per sample."""
    true = logits.gather(1, cls.unsqueeze(1)).squeeze(1)
    other = logits.scatter(1, cls.unsqueeze(1), float("-inf")).amax(1)
    return true - other


def dlr_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Untargeted DLR loss (Croce & Hein 2020, eq. 6), to be maximized, per sample.

    ``-(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3 + 1e-12)``; needs at least 3 classes."""
    if logits.shape[1] < 3:
        raise ValueError(
            f"the DLR loss needs at least 3 classes; got logits with {logits.shape[1]} "
            "(use the margin loss on binary tasks)"
        )
    top = logits.topk(3, dim=1).values
    return -_margin(logits, labels) / (top[:, 0] - top[:, 2] + _DLR_TINY)


def dlr_targeted_loss(logits: torch.Tensor, labels: torch.Tensor, target: torch.Tensor
                      ) -> torch.Tensor:
    """Targeted DLR loss (Croce & Hein 2020, eq. 7), to be maximized, per sample.

    ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)``; with exactly 3 classes the
    denominator is ``z_pi1 - z_pi3``. Needs at least 3 classes."""
    k = logits.shape[1]
    if k < 3:
        raise ValueError(
            f"the targeted DLR loss needs at least 3 classes; got logits with {k} "
            "(use the margin loss on binary tasks)"
        )
    top = logits.topk(min(k, 4), dim=1).values
    low = top[:, 2] if k == 3 else 0.5 * (top[:, 2] + top[:, 3])
    zy = logits.gather(1, labels.unsqueeze(1)).squeeze(1)
    zt = logits.gather(1, target.unsqueeze(1)).squeeze(1)
    return -(zy - zt) / (top[:, 0] - low + _DLR_TINY)


def dlr_fallback_note(num_classes: int) -> str:
    """The note recorded (and warned) when a DLR loss meets a task with fewer than 3 classes."""
    return (
        f"the DLR loss needs >= 3 classes but the model has {num_classes}: the margin loss "
        "(Carlini & Wagner) was used instead"
    )


class Criterion:
    """Base class: the labels of the batch and the loss used to reach the goal."""

    def __init__(self, labels: torch.Tensor, loss: str = "ce") -> None:
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; expected one of {LOSSES}")
        self.labels = labels
        self.loss_name = loss
        self.notes: list[str] = []
        """What the criterion had to change (e.g. the DLR loss on a binary task), for reports."""

    def _dlr_fallback(self, num_classes: int) -> bool:
        """True when a DLR loss must fall back to the margin loss; warns once per criterion."""
        if num_classes >= 3:
            return False
        note = dlr_fallback_note(num_classes)
        if note not in self.notes:
            self.notes.append(note)
            warnings.warn(note, stacklevel=3)
        return True

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
    """Untargeted: any class but the label. CE loss (Goodfellow et al. 2015), the margin loss
    ``max_{j != y} z_j - z_y`` (Carlini & Wagner 2017) or the DLR loss (Croce & Hein 2020)."""

    def __init__(self, labels: torch.Tensor, loss: str = "ce") -> None:
        if loss == "dlr-targeted":
            raise ValueError(
                "the loss 'dlr-targeted' needs target classes: give target=..., or use 'dlr' "
                "for an untargeted attack"
            )
        super().__init__(labels, loss)

    def to(self, device: torch.device) -> Misclassification:
        return Misclassification(self.labels.to(device), self.loss_name)

    def loss(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        y = self.labels[index]
        if self.loss_name == "ce":
            return F.cross_entropy(logits, y, reduction="none")
        if self.loss_name == "dlr" and not self._dlr_fallback(logits.shape[1]):
            return dlr_loss(logits, y)
        return -_margin(logits, y)

    def margin(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return -_margin(logits, self.labels[index])

    def is_adversarial(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return logits.argmax(1) != self.labels[index]


class TargetedMisclassification(Criterion):
    """Targeted: the prediction must be the target class. The CE loss is ``-CE(z, t)``; the margin
    loss ``z_t - max_{j != t} z_j``; ``"dlr"`` and ``"dlr-targeted"`` both mean the targeted DLR
    loss (Croce & Hein 2020)."""

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
        if self.loss_name in ("dlr", "dlr-targeted") and not self._dlr_fallback(logits.shape[1]):
            return dlr_targeted_loss(logits, self.labels[index], t)
        return _margin(logits, t)

    def margin(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return _margin(logits, self.target[index])

    def is_adversarial(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return logits.argmax(1) == self.target[index]
