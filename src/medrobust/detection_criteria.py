"""What "adversarial" means for a detector: true boxes vanish, or chosen boxes appear.

Both criteria read a detector's standard outputs (the pre-NMS anchor table ``(N, A, K + 2*dims)``
of :class:`~medrobust.models.detector.Detector`: class logits, then the decoded box) and the
packed boxes of :mod:`medrobust.boxes`.

* **loss** (what attacks climb) follows DAG (Xie et al., "Adversarial Examples for Semantic
  Segmentation and Object Detection", ICCV 2017): the *targets* are the proposals — the anchors
  whose decoded box overlaps a given box with IoU >= ``proposal_iou`` (0.3 in the paper) — and
  each still-active target contributes the difference between its adversarial and its original
  class score. RetinaNet scores each class with a sigmoid and has no background logit; the
  decision "class c or nothing" is ``logit_c`` against ``logit(score_thresh)``, so background's
  score is that constant and a target is active while it is on the wrong side of it (by
  ``margin`` logits).
* **success** is judged on the post-NMS detections (:func:`medrobust.boxes.select_detections`
  with the detector's box selection), matched to boxes by IoU >= ``iou_thresh``.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch

from medrobust.boxes import box_iou, select_detections
from medrobust.criteria import Criterion

__all__ = ["BoxesAppear", "BoxesVanish", "DetectionCriterion"]

_MONAI_SELECTION = {"score_thresh": 0.05, "nms_thresh": 0.5, "topk": 1000, "max_detections": 300}


class DetectionCriterion(Criterion):
    """Shared parts of the detection criteria.

    Args:
        detector: the :class:`~medrobust.models.detector.Detector` whose box selection defines a
            detection (default: MONAI's defaults, score 0.05, NMS 0.5); the detector's own
            ``default_criterion`` passes itself.
        score_thresh: overrides the selection's score threshold (an operating point, e.g. the
            score at 1 false positive per volume).
        iou_thresh: IoU at which a detection matches a box (success test).
        proposal_iou: IoU at which an anchor's box is a target proposal of a box (loss).
        margin: logits beyond the threshold that an attack aims for (loss only).
    """

    def __init__(
        self,
        detector: Any = None,
        *,
        score_thresh: float | None = None,
        iou_thresh: float = 0.1,
        proposal_iou: float = 0.3,
        margin: float = 1.0,
    ) -> None:
        super().__init__(None, "ce")
        sel = dict(_MONAI_SELECTION if detector is None else detector.selection)
        if score_thresh is not None:
            sel["score_thresh"] = float(score_thresh)
        if not 0.0 < sel["score_thresh"] < 1.0:
            raise ValueError(f"score_thresh must lie in (0, 1); got {sel['score_thresh']}")
        for name, v in (("iou_thresh", iou_thresh), ("proposal_iou", proposal_iou)):
            if not 0.0 < v <= 1.0:
                raise ValueError(f"{name} must lie in (0, 1]; got {v}")
        if not (margin >= 0 and math.isfinite(margin)):
            raise ValueError(f"margin must be >= 0; got {margin}")
        self.selection = sel
        self.num_classes = None if detector is None else int(detector.num_classes)
        self.iou_thresh = float(iou_thresh)
        self.proposal_iou = float(proposal_iou)
        self.margin_logits = float(margin)

    @property
    def threshold_logit(self) -> float:
        s = self.selection["score_thresh"]
        return math.log(s / (1 - s))

    def to(self, device: torch.device) -> DetectionCriterion:
        out = copy.copy(self)
        out.labels = self.labels.to(device)
        if getattr(self, "target", None) is not None:
            out.target = self.target.to(device)  # type: ignore[attr-defined]
        return out

    def _split(self, outputs: torch.Tensor, boxes: torch.Tensor) -> tuple[int, int]:
        dims = (boxes.shape[-1] - 1) // 2
        k = outputs.shape[-1] - 2 * dims
        if self.num_classes is not None and k != self.num_classes:
            raise ValueError(f"outputs have {k} classes; the criterion's detector has "
                             f"{self.num_classes}")
        return dims, k

    def detections(self, outputs: torch.Tensor) -> torch.Tensor:
        """Post-NMS detections (packed) under this criterion's box selection."""
        dims = None
        for t in (self.labels, getattr(self, "target", None)):
            if t is not None:
                dims = (t.shape[-1] - 1) // 2
        k = outputs.shape[-1] - 2 * int(dims or 0)
        return select_detections(outputs, k, **self.selection)

    def _proposal_logits(
        self, outputs: torch.Tensor, boxes: torch.Tensor, i: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """For image ``i``: the target proposals' logits of each given box's class, (P,), and the
        index of the box each belongs to."""
        dims, k = self._split(outputs, boxes)
        row = boxes[i]
        row = row[row[:, 2 * dims] >= 0]
        if row.shape[0] == 0:
            empty = outputs.new_zeros(0)
            return empty, empty.long()
        iou = box_iou(outputs[i, :, k:].detach().float(), row[:, : 2 * dims].float())  # (A, M)
        anchor, which = torch.where(iou >= self._target_iou())
        cls = row[which, 2 * dims].long()
        return outputs[i, anchor, cls], which

    def _target_iou(self) -> float:
        return self.proposal_iou

    def _matched(self, dets: torch.Tensor, boxes: torch.Tensor, i: int) -> torch.Tensor:
        """Per given box of image ``i``: matched by a detection of its class (bool, (M,))."""
        dims = (boxes.shape[-1] - 1) // 2
        row = boxes[i]
        row = row[row[:, 2 * dims] >= 0]
        det = dets[i]
        det = det[(det[:, 2 * dims] >= 0)
                  & (det[:, 2 * dims + 1] >= self.selection["score_thresh"])]
        if row.shape[0] == 0 or det.shape[0] == 0:
            return torch.zeros(row.shape[0], dtype=torch.bool, device=boxes.device)
        iou = box_iou(row[:, : 2 * dims].float(), det[:, : 2 * dims].float())
        same = row[:, 2 * dims, None] == det[None, :, 2 * dims]
        return ((iou >= self.iou_thresh) & same).any(1)


class BoxesVanish(DetectionCriterion):
    """Untargeted: every true box disappears — no post-NMS detection of its class overlaps it with
    IoU >= ``iou_thresh``. An image without true boxes counts as a success.

    Loss (DAG with the adversarial label "background" for every proposal of a true box):
    ``-sum_{proposals} relu(logit_l - logit(score_thresh) + margin)``; the proposals are the
    anchors whose box overlaps a true box by ``min(proposal_iou, iou_thresh)``, so that every
    anchor that could still count as finding the box is a target."""

    def _target_iou(self) -> float:
        return min(self.proposal_iou, self.iou_thresh)

    def loss(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        boxes = self.labels[index]
        out = []
        for i in range(logits.shape[0]):
            z, _ = self._proposal_logits(logits, boxes, i)
            out.append(-torch.relu(z - self.threshold_logit + self.margin_logits).sum())
        return torch.stack(out)

    def margin(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        boxes = self.labels[index]
        out = []
        for i in range(logits.shape[0]):
            z, _ = self._proposal_logits(logits, boxes, i)
            top = z.max() if z.numel() else logits.new_tensor(-math.inf)
            out.append(self.threshold_logit - top)
        return torch.stack(out)

    def is_adversarial(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        dets = self.detections(logits)
        boxes = self.labels[index]
        return torch.stack(
            [~self._matched(dets, boxes, i).any() for i in range(logits.shape[0])]
        ).to(logits.device)


class BoxesAppear(DetectionCriterion):
    """Targeted: every target box (``target=``, same form as labels) is detected — matched by a
    post-NMS detection of its class with IoU >= ``iou_thresh`` (default 0.3).

    Loss (DAG with the target's class as adversarial label for the proposals of each target box):
    ``-sum_{proposals} relu(logit(score_thresh) + margin - logit_c)``."""

    targeted = True
    target: torch.Tensor

    def __init__(self, detector: Any = None, *, iou_thresh: float = 0.3, **kw: Any) -> None:
        super().__init__(detector, iou_thresh=iou_thresh, **kw)

    def loss(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        boxes = self.target[index]
        out = []
        for i in range(logits.shape[0]):
            z, _ = self._proposal_logits(logits, boxes, i)
            out.append(-torch.relu(self.threshold_logit + self.margin_logits - z).sum())
        return torch.stack(out)

    def margin(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        boxes = self.target[index]
        out = []
        for i in range(logits.shape[0]):
            z, which = self._proposal_logits(logits, boxes, i)
            if z.numel() == 0:
                out.append(logits.new_tensor(-math.inf))
                continue
            best = torch.full((int(which.max()) + 1,), -math.inf, device=z.device, dtype=z.dtype)
            best = best.scatter_reduce(0, which, z, reduce="amax")
            out.append(best.min() - self.threshold_logit)
        return torch.stack(out)

    def is_adversarial(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        dets = self.detections(logits)
        boxes = self.target[index]
        return torch.stack(
            [self._matched(dets, boxes, i).all() for i in range(logits.shape[0])]
        ).to(logits.device)
