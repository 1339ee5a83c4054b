"""Training and scoring a small lesion detector on the built-in CT phantoms.

The detector is :func:`~medrobust.models.detector.build_retinanet` (MONAI's RetinaNet) trained as
in the RetinaNet paper (Lin et al., ICCV 2017): anchors matched to boxes by IoU (positive at >= 0.4,
plus each box's ``num_candidates`` best anchors as in ATSS, Zhang et al., CVPR 2020; negative below
0.3), the sigmoid focal loss (alpha 0.25, gamma 2) over all matched and negative anchors normalised
by the positives, and a smooth-L1 loss on the encoded box offsets of the positives (MONAI's
``BoxCoder``). MONAI's own training path needs torchvision, which medrobust does not depend on.
It is trained on phantoms in HU whose lesion masks give the boxes
(:func:`medrobust.boxes.boxes_from_masks`). Inputs are mapped to [0, 1] by a soft-tissue window
inside the :class:`~medrobust.models.detector.Detector`, so budgets stay in HU. It is scored
by its sensitivity at a fixed number of false positives per volume
(:func:`medrobust.boxes.sensitivity_at_fp`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from medrobust.boxes import boxes_from_masks, sensitivity_at_fp, to_monai_boxes
from medrobust.data.base import ImageData
from medrobust.data.phantoms import make_phantoms
from medrobust.models.detector import Detector, build_retinanet

__all__ = [
    "DETECTION_PHANTOM",
    "DetectorTraining",
    "detection_phantoms",
    "evaluate_detector",
    "train_detector",
]

DETECTION_PHANTOM: dict[str, Any] = {
    "units": "HU", "task": "segmentation", "lesion_fraction": 0.7,
    "lesion_contrast": 100.0, "lesion_radius": (0.1, 0.16),
}
"""Phantom settings for detection: HU, 70% with a lesion, 100 HU contrast, radius 10-16% of the
size (against the default 12 HU noise, 15 HU texture and three organ-like distractors)."""


def detection_phantoms(
    n: int, size: int = 32, dim: int = 3, seed: int = 0, split: str | None = None, **kw: Any
) -> tuple[ImageData, list[dict[str, torch.Tensor]]]:
    """Phantoms for detection and their boxes (medrobust axis order, class 0 = lesion)."""
    opts = {**DETECTION_PHANTOM, **kw}
    data = make_phantoms(n, size, dim=dim, seed=seed, split=split, **opts)
    return data, boxes_from_masks(data.labels)


@dataclass
class DetectorTraining:
    """The trained detector, its architecture arguments and the per-epoch log."""

    detector: Detector
    arch_args: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)


def train_detector(
    images: torch.Tensor,
    boxes: Sequence[dict[str, torch.Tensor]],
    *,
    bounds: tuple[float, float] = (-1024.0, 3071.0),
    window: tuple[float, float] | None = (40.0, 400.0),
    epochs: int = 10,
    batch_size: int = 8,
    lr: float = 2e-3,
    seed: int = 0,
    arch_args: dict[str, Any] | None = None,
    on_epoch_end: Callable[[dict[str, float]], None] | None = None,
) -> DetectorTraining:
    """Train a RetinaNet on ``images`` ``(N, C, *spatial)`` (in ``bounds`` units) with per-image
    ``boxes`` (``{"boxes", "labels"}``, medrobust axis order). Deterministic for a seed.

    Args:
        window: (centre, width) of the intensity window mapped to [0, 1] inside the detector
            (``None``: no window).
        arch_args: arguments of :func:`build_retinanet` (``spatial_dims`` and ``in_channels`` are
            taken from the images).
    """
    from medrobust.preprocessing import IntensityWindow
    from medrobust.training import seeded

    if images.dim() not in (4, 5):
        raise ValueError(
            f"images must be (N, C, H, W) or (N, C, D, H, W); got {tuple(images.shape)}"
        )
    if len(boxes) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(boxes)} box lists")
    if epochs < 1 or batch_size < 1 or not (lr > 0 and math.isfinite(lr)):
        raise ValueError("epochs and batch_size must be >= 1 and lr > 0")
    dims = images.dim() - 2
    args = {"spatial_dims": dims, "in_channels": int(images.shape[1]), "num_classes": 1,
            **(arch_args or {})}
    args["spatial_dims"], args["in_channels"] = dims, int(images.shape[1])
    with seeded(seed):
        net: Any = build_retinanet(**args)
    pre = IntensityWindow(*window) if window is not None else None
    det = Detector(net, bounds=bounds, preprocess=pre)
    targets = [
        {"boxes": to_monai_boxes(b["boxes"].float(), dims), "labels": b["labels"].long()}
        for b in boxes
    ]
    opt = torch.optim.Adam(net.network.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    g = torch.Generator().manual_seed(seed)
    history: list[dict[str, float]] = []
    n = images.shape[0]
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        net.train()
        perm = torch.randperm(n, generator=g)
        total, count = 0.0, 0
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            if idx.numel() < 2:
                continue  # batch norm needs two samples
            with torch.no_grad():
                z = det._normalize(images[idx])
            logits, reg, anchors, _ = det.head(z)
            loss = retinanet_loss(logits, reg, anchors, [targets[int(i)] for i in idx],
                                  net.box_coder)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"detector training diverged at epoch {epoch} (lr={lr})")
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * idx.numel()
            count += idx.numel()
        sched.step()
        rec = {"epoch": float(epoch), "train_loss": total / max(count, 1),
               "time_s": time.perf_counter() - t0}
        history.append(rec)
        if on_epoch_end is not None:
            on_epoch_end(rec)
    net.eval()
    return DetectorTraining(det, args, history)


def retinanet_loss(
    logits: torch.Tensor,
    reg: torch.Tensor,
    anchors: torch.Tensor,
    targets: Sequence[dict[str, torch.Tensor]],
    box_coder: Any,
    *,
    pos_iou: float = 0.4,
    neg_iou: float = 0.3,
    num_candidates: int = 4,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> torch.Tensor:
    """RetinaNet's training loss for one batch (boxes in MONAI's order, like ``anchors``)."""
    from medrobust.boxes import box_iou

    n, a, k = logits.shape
    cls_target = torch.zeros_like(logits)
    valid = torch.ones((n, a), dtype=torch.bool, device=logits.device)
    box_losses = []
    num_pos = 0
    for i, t in enumerate(targets):
        gt = t["boxes"].to(anchors)
        if gt.shape[0] == 0:
            continue
        iou = box_iou(anchors, gt)  # (A, M)
        best, which = iou.max(1)
        pos = best >= pos_iou
        top = iou.topk(min(num_candidates, a), dim=0).indices  # (C, M)
        for m in range(gt.shape[0]):
            pos[top[:, m]] = True
            which[top[:, m]] = m
        valid[i] = pos | (best < neg_iou)
        cls_target[i, pos, t["labels"].to(logits.device)[which[pos]]] = 1.0
        enc = box_coder.encode_single(gt[which[pos]], anchors[pos])
        box_losses.append(torch.nn.functional.smooth_l1_loss(
            reg[i, pos].float(), enc.float(), beta=1.0 / 9, reduction="sum"))
        num_pos += int(pos.sum())
    p = torch.sigmoid(logits)
    ce = torch.nn.functional.binary_cross_entropy_with_logits(logits, cls_target, reduction="none")
    pt = p * cls_target + (1 - p) * (1 - cls_target)
    w = alpha * cls_target + (1 - alpha) * (1 - cls_target)
    focal = (w * (1 - pt) ** gamma * ce)[valid].sum()
    norm = max(num_pos, 1)
    box = torch.stack(box_losses).sum() if box_losses else logits.new_zeros(())
    return (focal + box) / norm


def evaluate_detector(
    detector: Detector,
    images: torch.Tensor,
    boxes: Sequence[dict[str, torch.Tensor]],
    fp_per_volume: float = 1.0,
    iou_thresh: float = 0.1,
) -> dict[str, float]:
    """Sensitivity at ``fp_per_volume`` false positives per volume (see
    :func:`medrobust.boxes.sensitivity_at_fp`)."""
    dets = detector.detect(images)
    return sensitivity_at_fp(dets, list(boxes), fp_per_volume, iou_thresh)
