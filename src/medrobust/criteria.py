"""What "adversarial" means: criteria with a differentiable loss and a success test.

A criterion knows the labels (or targets) of a batch. ``loss(logits, index)`` returns a per-sample
loss that the attacker *maximizes*; ``is_adversarial(logits, index)`` says which samples meet the
goal. ``index`` selects the rows of the batch the logits belong to (attacks work on active subsets).

A user passes a criterion to an attack unbound (``attack(model, x, y, criterion=FindingFlip(3))``);
the attack binds it to the batch's labels, target and the attack's loss with :meth:`Criterion.bind`.
Without ``criterion=`` the model kind chooses (``model.default_criterion``).

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
``z_pi3`` alone (there is no ``z_pi4``). The DLR losses are defined for single-label classifiers
(:class:`Misclassification`, :class:`TargetedMisclassification`).
"""

from __future__ import annotations

import copy
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

    targeted: bool = False
    """Whether the criterion needs a target (``attack(..., target=...)``)."""
    labels: torch.Tensor
    """The batch's labels (set by :meth:`bind`; ``None`` on an unbound criterion)."""

    def __init__(self, labels: torch.Tensor | None = None, loss: str = "ce") -> None:
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; expected one of {LOSSES}")
        self.labels = labels  # type: ignore[assignment]
        self.loss_name = loss
        self.notes: list[str] = []
        """What the criterion had to change (e.g. the DLR loss on a binary task), for reports."""

    def _dlr_fallback(self, num_classes: int) -> bool:
        """True when a DLR loss must fall back to the margin loss (warns once per criterion)."""
        if num_classes >= 3:
            return False
        note = dlr_fallback_note(num_classes)
        if note not in self.notes:
            self.notes.append(note)
            warnings.warn(note, stacklevel=3)
        return True

    def bind(self, labels: torch.Tensor, target: torch.Tensor | None, loss: str) -> Criterion:
        """A copy of this criterion for one batch: its labels, its target and the attack's loss."""
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; expected one of {LOSSES}")
        if self.targeted and target is None:
            raise ValueError(f"{type(self).__name__} is a targeted criterion: pass target=")
        if not self.targeted and target is not None:
            raise ValueError(
                f"{type(self).__name__} is an untargeted criterion but a target was given"
            )
        if loss == "dlr-targeted" and target is None:
            raise ValueError(
                "the loss 'dlr-targeted' needs target classes: give target=..., or use 'dlr' "
                "for an untargeted attack"
            )
        bound = copy.copy(self)
        bound.labels = labels
        bound.loss_name = loss
        bound.notes = []
        if target is not None:
            bound.target = target  # type: ignore[attr-defined]
        return bound

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
    loss of Croce & Hein (2020) with the strongest non-target class in place of the label,
    ``-(max_{j != t} z_j - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)``: identical while the label leads
    (as at the start of an attack on a correctly classified input), and, unlike the paper's version
    (made for AutoAttack, where any misclassification counts), still aiming at the target once
    another class has overtaken the label."""

    targeted = True
    target: torch.Tensor

    def __init__(
        self,
        labels: torch.Tensor | None = None,
        target: torch.Tensor | None = None,
        loss: str = "ce",
    ) -> None:
        super().__init__(labels, loss)
        self.target = target  # type: ignore[assignment]

    def to(self, device: torch.device) -> TargetedMisclassification:
        return TargetedMisclassification(
            self.labels.to(device), self.target.to(device), self.loss_name
        )

    def loss(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        t = self.target[index]
        if self.loss_name == "ce":
            return -F.cross_entropy(logits, t, reduction="none")
        if self.loss_name in ("dlr", "dlr-targeted") and not self._dlr_fallback(logits.shape[1]):
            # the strongest class but the target in place of the label: the same loss while the
            # label leads (the start of an attack), and afterwards it still pushes the target over
            # every class, as reaching the target requires
            other = logits.detach().scatter(1, t.unsqueeze(1), float("-inf")).argmax(1)
            return dlr_targeted_loss(logits, other, t)
        return _margin(logits, t)

    def margin(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return _margin(logits, self.target[index])

    def is_adversarial(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return logits.argmax(1) == self.target[index]


class FindingFlip(Criterion):
    """Multi-label classifiers (one logit per finding, present when > 0): the attack flips
    findings.

    Args:
        finding: the index of the one finding to flip, or ``None`` for every finding.
        require: with ``finding=None``, ``"any"`` (default: success once any finding is flipped,
            i.e. the report is no longer exactly right) or ``"all"`` (every finding flipped).

    Untargeted, labels are the true 0/1 findings ``(N, F)`` and the goal is to flip them; targeted
    (``attack(..., target=t)`` with 0/1 findings ``t``), the goal is to make the selected findings
    equal ``t``. The loss is the binary cross-entropy away from the labels (towards the target);
    ``"margin"`` uses the signed logits instead (C&W's margin for each finding), and the per-sample
    loss is the sum over the selected findings, clipped at the goal for those already reached so
    that the remaining ones get the gradient.
    """

    def __init__(
        self,
        finding: int | None = None,
        require: str = "any",
        labels: torch.Tensor | None = None,
        loss: str = "ce",
    ) -> None:
        super().__init__(labels, loss)
        if finding is not None and (isinstance(finding, bool) or int(finding) < 0):
            raise ValueError(f"finding must be a finding index >= 0 or None; got {finding!r}")
        if require not in ("any", "all"):
            raise ValueError(f"require must be 'any' or 'all'; got {require!r}")
        self.finding = None if finding is None else int(finding)
        self.require = require
        self.target: torch.Tensor | None = None

    def bind(self, labels: torch.Tensor, target: torch.Tensor | None, loss: str) -> Criterion:
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; expected one of {LOSSES}")
        if loss.startswith("dlr"):
            raise ValueError(
                f"the loss {loss!r} is defined for single-label classifiers; FindingFlip (one "
                "logit per finding) supports 'ce' and 'margin'"
            )
        if self.finding is not None and self.finding >= labels.shape[1]:
            raise ValueError(
                f"finding {self.finding} does not exist: the labels have {labels.shape[1]} findings"
            )
        bound = copy.copy(self)
        bound.labels, bound.target, bound.loss_name = labels, target, loss
        bound.notes = []
        return bound

    def to(self, device: torch.device) -> FindingFlip:
        out = copy.copy(self)
        out.labels = self.labels.to(device)
        out.target = None if self.target is None else self.target.to(device)
        return out

    def _goal(self, index: torch.Tensor) -> torch.Tensor:
        """The 0/1 value each finding should take, ``(n, F)``."""
        if self.target is not None:
            return self.target[index]
        return 1 - self.labels[index]

    def _select(self, v: torch.Tensor) -> torch.Tensor:
        return v if self.finding is None else v[:, self.finding : self.finding + 1]

    def margin(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        sign = self._goal(index).to(logits.dtype) * 2 - 1  # +1: the logit must become > 0
        m = self._select(logits * sign)
        return m.amax(1) if self.require == "any" or self.finding is not None else m.amin(1)

    def loss(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        goal = self._goal(index).to(logits.dtype)
        if self.loss_name == "ce":
            per = -F.binary_cross_entropy_with_logits(logits, goal, reduction="none")
        else:
            per = logits * (goal * 2 - 1)
            per = per.clamp_max(0.0) if self.finding is None else per
        return self._select(per).sum(1)

    def is_adversarial(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        reached = self._select((logits > 0).long() == self._goal(index))
        if self.finding is not None or self.require == "any":
            return reached.any(1)
        return reached.all(1)
