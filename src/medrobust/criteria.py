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


# --------------------------------------------------------------------------------------------
# Dense outputs (segmenters): a label per pixel or voxel
#
# Logits are ``(n, K, *spatial)``, labels and targets label maps ``(n, *spatial)``. Each dense
# criterion has a per-voxel loss (``voxel_loss``), the voxels it averages over (``voxel_weights``:
# all voxels, or an active set), a per-voxel success map (``voxel_success``) and a per-sample
# success test. The per-sample loss is the weighted mean of the per-voxel loss.

DENSE_LOSSES = ("ce", "margin")


def _voxel_margin(logits: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """``z[cls] - max_{j != cls} z[j]`` per voxel, ``(n, *spatial)``."""
    idx = cls.unsqueeze(1)
    true = logits.gather(1, idx).squeeze(1)
    other = logits.scatter(1, idx, float("-inf")).amax(1)
    return true - other


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def _kth_largest(values: torch.Tensor, valid: torch.Tensor, fraction: float) -> torch.Tensor:
    """Per sample, the ``ceil(fraction * |valid|)``-th largest of ``values`` over the valid
    voxels (``-inf`` where no voxel is valid): at least that fraction of the valid voxels are
    > 0 exactly when it is > 0."""
    v = _flat(values).masked_fill(~_flat(valid), float("-inf"))
    count = _flat(valid).sum(1)
    k = torch.ceil(count.to(torch.float64) * fraction).long().clamp_min(1)
    ordered = v.sort(1, descending=True).values
    return ordered.gather(1, (k - 1).clamp_max(v.shape[1] - 1).unsqueeze(1)).squeeze(1)


def dice_per_class(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Dice ``2|P ∩ G| / (|P| + |G|)`` per sample and class, ``(N, K)`` float (class 0 included);
    ``nan`` where a class is absent from both the prediction and the label map."""
    p = _flat(pred)
    g = _flat(labels)
    out = torch.empty(p.shape[0], num_classes, dtype=torch.float64, device=p.device)
    for k in range(num_classes):
        pk, gk = p == k, g == k
        inter = (pk & gk).sum(1).to(torch.float64)
        denom = (pk.sum(1) + gk.sum(1)).to(torch.float64)
        out[:, k] = torch.where(denom > 0, 2 * inter / denom.clamp_min(1), float("nan"))
    return out


class DenseCriterion(Criterion):
    """Base class of the criteria for dense outputs (label maps).

    Subclasses implement :meth:`voxel_loss` (maximized by the attacker), :meth:`voxel_success`
    and :meth:`is_adversarial`; :meth:`voxel_weights` says which voxels the per-sample loss
    averages over (default: all)."""

    dense = True
    """Marks criteria for dense outputs (a segmenter refuses the others, and vice versa)."""
    target: torch.Tensor | None = None

    def bind(self, labels: torch.Tensor, target: torch.Tensor | None, loss: str) -> Criterion:
        if loss not in DENSE_LOSSES:
            raise ValueError(
                f"{type(self).__name__} supports the losses {DENSE_LOSSES}; got {loss!r}"
            )
        if labels.dim() < 2:
            raise ValueError(
                f"{type(self).__name__} is a criterion for dense outputs: labels must be label "
                f"maps (N, *spatial); got shape {tuple(labels.shape)}"
            )
        bound = super().bind(labels, target, loss)
        if target is None:
            bound.target = None  # type: ignore[attr-defined]
        return bound

    def to(self, device: torch.device) -> DenseCriterion:
        out = copy.copy(self)
        out.labels = self.labels.to(device)
        out.target = None if self.target is None else self.target.to(device)
        return out

    def _check_classes(self, logits: torch.Tensor) -> None:
        if logits.dim() < 3:
            raise ValueError(
                f"{type(self).__name__} needs dense outputs (n, K, *spatial); got shape "
                f"{tuple(logits.shape)}"
            )

    def voxel_loss(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Per-voxel loss ``(n, *spatial)`` that the attacker maximizes."""
        raise NotImplementedError

    def voxel_weights(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Per-voxel weights ``(n, *spatial)`` of the per-sample mean (default: all ones)."""
        return torch.ones(logits.shape[:1] + logits.shape[2:], device=logits.device,
                          dtype=logits.dtype)

    def voxel_success(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Per-voxel success ``(n, *spatial)`` bool: the voxel meets its goal."""
        raise NotImplementedError

    def reduce(self, per_voxel: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The per-sample weighted mean of a per-voxel quantity (0 where no weight)."""
        w = _flat(weights)
        return (_flat(per_voxel) * w).sum(1) / w.sum(1).clamp_min(1e-12)

    def loss(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        self._check_classes(logits)
        return self.reduce(self.voxel_loss(logits, index), self.voxel_weights(logits, index))


class PixelFraction(DenseCriterion):
    """Untargeted, for segmenters: success when at least ``fraction`` of the voxels are predicted
    as a class other than their label (the default untargeted criterion of a
    :class:`~medrobust.models.Segmenter`).

    Loss per voxel: cross-entropy with the label, or the margin ``max_{j != y} z_j - z_y``
    clipped at 0 (voxels already flipped stop pulling the gradient); mean over all voxels.
    """

    def __init__(self, fraction: float = 0.5, labels: torch.Tensor | None = None,
                 loss: str = "ce") -> None:
        super().__init__(labels, loss)
        if not 0.0 < float(fraction) <= 1.0:
            raise ValueError(f"fraction must lie in (0, 1]; got {fraction!r}")
        self.fraction = float(fraction)

    def voxel_loss(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        y = self.labels[index]
        if self.loss_name == "ce":
            return F.cross_entropy(logits, y, reduction="none")
        return (-_voxel_margin(logits, y)).clamp_max(0.0)

    def voxel_success(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return logits.argmax(1) != self.labels[index]

    def margin(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        m = -_voxel_margin(logits, self.labels[index])
        return _kth_largest(m, torch.ones_like(m, dtype=torch.bool), self.fraction)

    def is_adversarial(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        changed = _flat(self.voxel_success(logits, index)).to(torch.float64).mean(1)
        return changed >= self.fraction - 1e-12


class DiceBelow(DenseCriterion):
    """Untargeted, for segmenters: success when the Dice of class ``class_index`` between the
    prediction and the label map falls below ``threshold``.

    Loss: over the voxels labelled ``class_index`` (the active set), the cross-entropy with the
    label (or the clipped margin ``max_{j != c} z_j - z_c``): moving them off the structure lowers
    the Dice. A sample whose label map has no voxel of the class has Dice 1 while nothing is
    predicted as the class (and 0 once anything is); its loss is the mean over all voxels of
    ``log p_c`` (margin: ``z_c - max_{j != c} z_j`` clipped at 0), which creates a false positive.
    ``voxel_success`` marks the voxels predicted differently from their label.
    """

    def __init__(self, class_index: int, threshold: float = 0.5,
                 labels: torch.Tensor | None = None, loss: str = "ce") -> None:
        super().__init__(labels, loss)
        if isinstance(class_index, bool) or int(class_index) != class_index or class_index < 0:
            raise ValueError(f"class_index must be a class index >= 0; got {class_index!r}")
        if not 0.0 < float(threshold) <= 1.0:
            raise ValueError(f"threshold must lie in (0, 1]; got {threshold!r}")
        self.class_index = int(class_index)
        self.threshold = float(threshold)

    def _check_classes(self, logits: torch.Tensor) -> None:
        super()._check_classes(logits)
        if self.class_index >= logits.shape[1]:
            raise ValueError(
                f"DiceBelow: class {self.class_index} does not exist; the segmenter has "
                f"{logits.shape[1]} classes"
            )

    def _present(self, index: torch.Tensor) -> torch.Tensor:
        y = self.labels[index]
        return _flat(y == self.class_index).any(1)

    def voxel_loss(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        self._check_classes(logits)
        c = self.class_index
        cls = torch.full_like(self.labels[index], c)
        present = self._present(index).view((-1,) + (1,) * (logits.dim() - 2))
        if self.loss_name == "ce":
            away = F.cross_entropy(logits, cls, reduction="none")
            toward = -away
        else:
            m = _voxel_margin(logits, cls)
            away, toward = (-m).clamp_max(0.0), m.clamp_max(0.0)
        return torch.where(present, away, toward)

    def voxel_weights(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        y = self.labels[index]
        present = self._present(index).view((-1,) + (1,) * (y.dim() - 1))
        active = (y == self.class_index) | ~present
        return active.to(logits.dtype)

    def voxel_success(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return logits.argmax(1) != self.labels[index]

    def dice(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Dice of the class per sample (1 where it is absent from prediction and label)."""
        self._check_classes(logits)
        c = self.class_index
        p = _flat(logits.argmax(1) == c)
        g = _flat(self.labels[index] == c)
        inter = (p & g).sum(1).to(torch.float64)
        denom = (p.sum(1) + g.sum(1)).to(torch.float64)
        return torch.where(denom > 0, 2 * inter / denom.clamp_min(1), 1.0)

    def margin(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``threshold - Dice`` (> 0: adversarial); in Dice units, not logits."""
        return (self.threshold - self.dice(logits, index)).to(logits.dtype)

    def is_adversarial(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return self.dice(logits, index) < self.threshold


class TargetMask(DenseCriterion):
    """Targeted, for segmenters: every voxel should be predicted as its target label (the default
    targeted criterion of a :class:`~medrobust.models.Segmenter`).

    The target may equal the label at some voxels (there the prediction is to be kept); the
    *active* voxels are those whose target differs from their label. Success when at least
    ``fraction`` of the active voxels are predicted as their target. Build targets with
    :func:`remove_target` and :func:`inject_target`.

    Loss per voxel: ``-CE(z, t)`` (or the margin ``z_t - max_{j != t} z_j`` clipped at 0); mean
    over all voxels (``over="all"``: the attack drives every voxel to its target, keeping the
    rest of the segmentation) or over the active voxels only (``over="active"``).
    """

    targeted = True

    def __init__(self, fraction: float = 0.99, over: str = "all",
                 labels: torch.Tensor | None = None, target: torch.Tensor | None = None,
                 loss: str = "ce") -> None:
        super().__init__(labels, loss)
        if not 0.0 < float(fraction) <= 1.0:
            raise ValueError(f"fraction must lie in (0, 1]; got {fraction!r}")
        if over not in ("all", "active"):
            raise ValueError(f"over must be 'all' or 'active'; got {over!r}")
        self.fraction = float(fraction)
        self.over = over
        self.target = target

    def _target(self, index: torch.Tensor) -> torch.Tensor:
        assert self.target is not None
        return self.target[index]

    def active(self, index: torch.Tensor) -> torch.Tensor:
        """The voxels whose target differs from their label, ``(n, *spatial)`` bool."""
        return self._target(index) != self.labels[index]

    def voxel_loss(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        t = self._target(index)
        if self.loss_name == "ce":
            return -F.cross_entropy(logits, t, reduction="none")
        return _voxel_margin(logits, t).clamp_max(0.0)

    def voxel_weights(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if self.over == "all":
            return super().voxel_weights(logits, index)
        return self.active(index).to(logits.dtype)

    def voxel_success(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return logits.argmax(1) == self._target(index)

    def reached(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The fraction of active voxels predicted as their target, per sample (1 if none)."""
        act = _flat(self.active(index))
        hit = _flat(self.voxel_success(logits, index)) & act
        n = act.sum(1)
        return torch.where(n > 0, hit.sum(1).to(torch.float64) / n.clamp_min(1), 1.0)

    def margin(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        m = _voxel_margin(logits, self._target(index))
        return _kth_largest(m, self.active(index), self.fraction)

    def is_adversarial(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return self.reached(logits, index) >= self.fraction - 1e-12


def _label_maps(labels: torch.Tensor, name: str) -> torch.Tensor:
    t = torch.as_tensor(labels)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be integer label maps; got dtype {t.dtype}")
    if t.dim() < 2:
        raise ValueError(f"{name} must be label maps (N, *spatial); got shape {tuple(t.shape)}")
    return t


def remove_target(labels: torch.Tensor, class_index: int, background: int = 0) -> torch.Tensor:
    """The target that removes a structure: its voxels become ``background``, the rest keeps
    its label. Pass it as ``attack(segmenter, x, labels, target=remove_target(labels, c))``.

    Raises:
        ValueError: ``class_index`` is the background, or the structure has no voxel in some
            sample (there would be nothing to remove).
    """
    t = _label_maps(labels, "labels")
    if isinstance(class_index, bool) or int(class_index) != class_index or class_index < 0:
        raise ValueError(f"class_index must be a class index >= 0; got {class_index!r}")
    if int(class_index) == int(background):
        raise ValueError(f"class {class_index} is the background; there is nothing to remove")
    present = _flat(t == class_index).any(1)
    if not bool(present.all()):
        empty = (~present).nonzero().flatten()
        raise ValueError(
            f"the structure to remove (class {class_index}) is empty in {empty.numel()} "
            f"sample(s) (indices {empty[:10].tolist()}); there is nothing to remove there"
        )
    return torch.where(t == class_index, torch.full_like(t, int(background)), t)


def inject_target(labels: torch.Tensor, region: torch.Tensor, class_index: int) -> torch.Tensor:
    """The target that injects a structure: the voxels of ``region`` (a boolean map broadcastable
    to ``labels``, e.g. a ball where a lesion should appear) become ``class_index``, the rest
    keeps its label.

    Raises:
        ValueError: ``region`` does not broadcast to the label maps, or is empty in a sample.
    """
    t = _label_maps(labels, "labels")
    if isinstance(class_index, bool) or int(class_index) != class_index or class_index < 0:
        raise ValueError(f"class_index must be a class index >= 0; got {class_index!r}")
    r = torch.as_tensor(region, device=t.device)
    try:
        r = torch.broadcast_to(r != 0, t.shape)
    except RuntimeError:
        raise ValueError(
            f"region of shape {tuple(r.shape)} does not broadcast to the label maps' shape "
            f"{tuple(t.shape)}"
        ) from None
    present = _flat(r).any(1)
    if not bool(present.all()):
        empty = (~present).nonzero().flatten()
        raise ValueError(
            f"the region to inject is empty in {empty.numel()} sample(s) "
            f"(indices {empty[:10].tolist()})"
        )
    return torch.where(r, torch.full_like(t, int(class_index)), t)
