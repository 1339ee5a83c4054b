"""The result every attack returns: the adversarial tensor with its evidence.

DESIGN.md, principle 5: never a bare tensor, never a silently failed sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class AttackResult:
    """What an attack produced, per sample.

    Attributes:
        adversarial: the adversarial inputs; same shape, dtype and device as the inputs.
        success: bool ``(N,)``: the model's decision on ``adversarial`` meets the goal
            (untargeted: prediction != label; targeted: prediction == target). A sample the model
            already misclassifies counts as a success with a zero perturbation.
        predictions: int64: the model's decisions on ``adversarial`` (``(N,)`` classes, ``(N, F)``
            findings of a multi-label classifier).
        labels: int64: the true labels, in the same form.
        target: int64 ``(N,)`` target classes of a targeted attack, else ``None``.
        perturbation_norms: per-sample "linf", "l2", "l1", "l0" (changed input elements) and
            "pixels" (changed pixels or voxels, all channels of one position counting once).
        forward_passes, backward_passes: model evaluations spent, counted per sample (a batch of
            ``n`` inputs through the model counts ``n``), including the final check of
            ``adversarial``.
        attack: the attack's name and hyperparameters.
        extra: attack-specific evidence (e.g. the loss reached).
        voxel_success: dense outputs only (segmenters): bool ``(N, *spatial)``, the voxels whose
            prediction on ``adversarial`` meets the criterion's per-voxel goal (untargeted:
            changed from the label; targeted: equal to the target); ``None`` for classifiers.
        dice: dense outputs only: float64 ``(N, K)``, the Dice of each class between the
            prediction on ``adversarial`` and the labels (``nan`` where a class is absent from
            both); ``None`` for classifiers.
    """

    adversarial: torch.Tensor
    success: torch.Tensor
    predictions: torch.Tensor
    labels: torch.Tensor
    perturbation_norms: dict[str, torch.Tensor]
    forward_passes: int
    backward_passes: int
    target: torch.Tensor | None = None
    attack: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    voxel_success: torch.Tensor | None = None
    dice: torch.Tensor | None = None

    @property
    def success_rate(self) -> float:
        """Fraction of *all* samples whose returned input meets the goal (a sample already
        misclassified counts as a success with a zero perturbation). The evaluation reports the
        success over the correctly classified samples separately, as ``success_on_correct``."""
        return float(self.success.float().mean())

    @property
    def robust_accuracy(self) -> float:
        """Fraction of samples still classified correctly on ``adversarial``."""
        same = self.predictions == self.labels
        if same.dim() > 1:  # findings or label maps: correct only when all of them are
            same = same.reshape(same.shape[0], -1).all(1)
        return float(same.float().mean())

    def __len__(self) -> int:
        return int(self.success.shape[0])

    def summary(self) -> dict[str, float]:
        """Headline numbers as plain floats."""
        ok = self.success
        out = {
            "n": float(len(self)),
            "success_rate": self.success_rate,
            "robust_accuracy": self.robust_accuracy,
            "forward_passes": float(self.forward_passes),
            "backward_passes": float(self.backward_passes),
        }
        if self.dice is not None:
            for c in range(self.dice.shape[1]):
                col = self.dice[:, c]
                col = col[~torch.isnan(col)]
                out[f"dice_class{c}"] = float(col.mean()) if col.numel() else float("nan")
        for k, v in self.perturbation_norms.items():
            out[f"median_{k}_successful"] = (
                float(v[ok].float().median()) if ok.any() else float("nan")
            )
        return out
