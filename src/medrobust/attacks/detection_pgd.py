"""PGD against a detector: projected gradient ascent on DAG's detection loss.

Madry, Makelov, Schmidt, Tsipras, Vladu, "Towards Deep Learning Models Resistant to Adversarial
Attacks", ICLR 2018: steepest ascent of a loss inside an eps-ball from a uniform random start,
projected after every step (the core's :class:`~medrobust.attacks.gradient.PGD` loop). Against a
detector (:class:`~medrobust.models.detector.Detector`) the loss is the detection criterion's: for
the untargeted :class:`~medrobust.detection_criteria.BoxesVanish`, the DAG objective of Xie et al.
(ICCV 2017) — the summed excess of every true box's proposals' class logits over the score
threshold, driven down so that every true box disappears; for the targeted
:class:`~medrobust.detection_criteria.BoxesAppear`, the proposals of each target box driven above
it. Where :class:`~medrobust.attacks.DAGDetection` takes DAG's normalized steps on the still-active
proposals without a budget, this is the fixed-budget attack of the core on the same objective (the
gradient attack that applies to a detector: the per-anchor logits carry gradients, the post-NMS
selection does not and only judges success).
"""

from __future__ import annotations

from medrobust.attacks.gradient import PGD

__all__ = ["PGDDetection"]


class PGDDetection(PGD):
    """PGD on a detector's proposals (see the module docstring); arguments as
    :class:`~medrobust.attacks.gradient.PGD` (40 steps of ``2.5 * eps / steps`` by default)."""

    name = "pgd-detection"
    supports_boxes = True
    supports_multilabel = False
    supports_dense = False
