"""Detection of adversarial examples by feature squeezing, and the adaptive attack on it.

Feature squeezing (Xu, Evans & Qi, "Feature Squeezing: Detecting Adversarial Examples in Deep
Neural Networks", NDSS 2018): the model's softmax on the raw input is compared with its softmax on
squeezed copies (bit-depth reduction, median smoothing); the score is the largest L1 gap, and an
input is flagged when the score exceeds a threshold chosen on clean inputs at a stated false
positive rate.

The adaptive attack (Carlini & Wagner, "Adversarial Examples Are Not Easily Detected: Bypassing
Ten Detection Methods", AISec 2017) attacks the classifier and the detector together: a model with
``K + 1`` outputs whose extra output exceeds every class logit exactly when the detector fires
(``max_j z_j + scale * (score - threshold)``), attacked with a criterion that succeeds only on a
wrong class that is not "detected". The squeezers' rounding is bypassed with BPDA (identity
backward pass).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from medrobust.attacks.base import Attack
from medrobust.criteria import Criterion
from medrobust.defenses.base import Defense, DefenseError, bpda
from medrobust.defenses.transforms import BitDepthReduction, MedianSmoothing
from medrobust.metrics import roc_auc
from medrobust.models import Classifier
from medrobust.results import AttackResult


@dataclass
class DetectionReport:
    """ROC AUC of the detector (clean = negative, adversarial = positive) and its rates at the
    calibrated threshold."""

    auc: float
    threshold: float
    true_positive_rate: float
    false_positive_rate: float
    n_clean: int
    n_adversarial: int


class FeatureSqueezing:
    """The feature-squeezing detector of Xu et al. (NDSS 2018) around a classifier.

    Args:
        model: the classifier (class outputs).
        squeezers: the squeezing defenses; default bit depth 4 and a 3x3 median (Xu et al. used
            1-bit for MNIST, 5-bit for CIFAR-10 and 2x2 medians; odd windows here).
        threshold: the score above which an input is flagged; set by :meth:`calibrate`.
    """

    def __init__(self, model: Classifier, squeezers: Sequence[Defense] | None = None,
                 threshold: float | None = None) -> None:
        if not isinstance(model, Classifier) or model.multilabel:
            raise DefenseError("FeatureSqueezing needs a medrobust.Classifier with class outputs")
        self.model = model
        self.squeezers = list(squeezers) if squeezers is not None else [
            BitDepthReduction(4), MedianSmoothing(3)]
        if not self.squeezers or not all(isinstance(s, Defense) for s in self.squeezers):
            raise DefenseError("squeezers must be a non-empty list of Defense objects")
        self.threshold = threshold

    def score_graph(self, x: torch.Tensor, adaptive: bool = False) -> tuple[torch.Tensor,
                                                                             torch.Tensor]:
        """``(logits on x, score)`` with autograd (squeezers through BPDA when ``adaptive``)."""
        logits = self.model.forward(x)
        p = logits.softmax(1)
        gaps = []
        for s in self.squeezers:
            xs = bpda(s, x, self.model.bounds) if adaptive else s(x, self.model.bounds)
            ps = self.model.forward(xs).softmax(1)
            gaps.append((p - ps).abs().sum(1))
        return logits, torch.stack(gaps, 1).amax(1)

    @torch.no_grad()
    def score(self, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """The detection score per input: the largest L1 gap between softmax outputs."""
        self.model.check_inputs(x)
        out = []
        with self.model.attack_mode():
            for i in range(0, x.shape[0], batch_size):
                xi = x[i : i + batch_size].to(self.model.device, self.model.work_dtype)
                out.append(self.score_graph(xi)[1].cpu())
        return torch.cat(out)

    def calibrate(self, clean: torch.Tensor, fpr: float = 0.05) -> float:
        """Set the threshold to the ``1 - fpr`` quantile of the scores of clean inputs (so that
        at most a fraction ``fpr`` of them is flagged); returns it."""
        if not 0 <= fpr < 1:
            raise DefenseError(f"fpr must be in [0, 1); got {fpr!r}")
        s = np.sort(self.score(clean).double().numpy())
        k = int(np.floor(fpr * len(s)))  # number of clean inputs allowed above the threshold
        self.threshold = float(s[len(s) - 1 - k]) if k > 0 else float(s[-1])
        return self.threshold

    def detect(self, x: torch.Tensor) -> torch.Tensor:
        """``(N,)`` bool: flagged as adversarial (score above the calibrated threshold)."""
        if self.threshold is None:
            raise DefenseError("the detector has no threshold: call calibrate(clean_inputs) first")
        return self.score(x) > self.threshold

    def evaluate(self, clean: torch.Tensor, adversarial: torch.Tensor) -> DetectionReport:
        """ROC AUC on clean (negative) vs adversarial (positive) inputs, and the true and false
        positive rates at the threshold. Pass only successful adversarial examples (as Xu et
        al.)."""
        sc, sa = self.score(clean), self.score(adversarial)
        auc = roc_auc(np.r_[np.zeros(len(sc)), np.ones(len(sa))],
                      np.r_[sc.double().numpy(), sa.double().numpy()])
        t = self.threshold if self.threshold is not None else float("nan")
        return DetectionReport(
            auc=auc, threshold=t,
            true_positive_rate=float((sa > t).float().mean()) if len(sa) else float("nan"),
            false_positive_rate=float((sc > t).float().mean()) if len(sc) else float("nan"),
            n_clean=len(sc), n_adversarial=len(sa),
        )

    # ------------------------------------------------------------------ adaptive attack
    def aware_model(self, scale: float = 10.0) -> Classifier:
        """The classifier and the detector as one model with ``K + 1`` logits (C&W, AISec 2017):
        the last exceeds every class logit exactly when the score exceeds the threshold."""
        if self.threshold is None:
            raise DefenseError("the detector has no threshold: call calibrate(clean_inputs) first")
        k = self.model.num_classes
        return Classifier(_DetectorAware(self, float(scale)), bounds=self.model.bounds,
                          num_classes=None if k is None else k + 1)

    def adaptive_attack(self, attack: Attack, x: torch.Tensor, labels: Any,
                        scale: float = 10.0) -> AttackResult:
        """Run ``attack`` against classifier + detector: success means misclassified *and* not
        flagged. Use ``loss="margin"``-style attacks or any gradient attack; the criterion's loss
        is the margin between the best undetected wrong class and the best of (label, detected)."""
        return attack(self.aware_model(scale), x, labels, criterion=UndetectedMisclassification())


class _DetectorAware(nn.Module):
    def __init__(self, fs: FeatureSqueezing, scale: float) -> None:
        super().__init__()
        self.fs = fs
        self.net = fs.model.module  # registered, so that attack mode switches it to eval
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits, score = self.fs.score_graph(x, adaptive=True)
        t = float(self.fs.threshold)  # type: ignore[arg-type]
        extra = logits.amax(1) + self.scale * (score - t)
        return torch.cat([logits, extra.unsqueeze(1)], 1)


class UndetectedMisclassification(Criterion):
    """A wrong class that the detector does not flag, on a ``K + 1``-logit detector-aware model
    (the last logit is "detected"). Loss (maximized): ``max_{j not in {y, K}} z_j -
    max(z_y, z_K)``, C&W's margin for the combined model."""

    def to(self, device: torch.device) -> UndetectedMisclassification:
        return UndetectedMisclassification(self.labels.to(device), self.loss_name)

    def _split(self, logits: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor,
                                                                          torch.Tensor]:
        y = self.labels[index]
        k = logits.shape[1] - 1
        bad = torch.zeros_like(logits, dtype=torch.bool)
        bad.scatter_(1, y.unsqueeze(1), True)
        bad[:, k] = True
        good = logits.masked_fill(bad, float("-inf")).amax(1)
        blocked = logits.masked_fill(~bad, float("-inf")).amax(1)
        return good, blocked

    def loss(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        good, blocked = self._split(logits, index)
        return good - blocked

    def margin(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return self.loss(logits, index)

    def is_adversarial(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        good, blocked = self._split(logits, index)
        return good > blocked


__all__ = ["DetectionReport", "FeatureSqueezing", "UndetectedMisclassification"]
