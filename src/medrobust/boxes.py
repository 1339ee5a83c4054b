"""Boxes in medrobust's axis order, and what a detector's output means.

medrobust keeps images as ``(N, C, H, W)`` and volumes as ``(N, C, D, H, W)`` (D = slices). A box
is given in the same axis order, in voxel-index coordinates, corners first then ends:
``[h0, w0, h1, w1]`` in 2D and ``[d0, h0, w0, d1, h1, w1]`` in 3D, covering the voxels
``d0 <= d < d1`` and so on (a box from a mask ends one past its last voxel).

MONAI's detection code (``monai.apps.detection``) works on ``(B, C, H, W, D)`` with boxes
``[xmin, ymin, zmin, xmax, ymax, zmax]`` along ``(H, W, D)``; :func:`to_monai_boxes` and
:func:`from_monai_boxes` convert (2D is the same in both).

Labels of a detection batch are a list of per-image dicts
``{"boxes": (M, 2*dims), "labels": (M,)}``; inside attacks they travel packed as one float
tensor ``(N, M_max, 2*dims + 1)`` (box, then class; class ``-1`` marks
padding): :func:`pack_boxes` / :func:`unpack_boxes`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = [
    "boxes_from_masks",
    "box_iou",
    "from_monai_boxes",
    "match_detections",
    "pack_boxes",
    "select_detections",
    "sensitivity_at_fp",
    "to_monai_boxes",
    "unpack_boxes",
]


def _perm(dims: int) -> list[int]:
    """Index map medrobust -> MONAI for one corner triple: (d, h, w) -> (h, w, d)."""
    return [0, 1] if dims == 2 else [1, 2, 0]


def to_monai_boxes(boxes: torch.Tensor, dims: int) -> torch.Tensor:
    """medrobust ``[d0, h0, w0, d1, h1, w1]`` -> MONAI ``[h0, w0, d0, h1, w1, d1]`` (2D: same)."""
    p = _perm(dims)
    return boxes[..., p + [dims + i for i in p]]


def from_monai_boxes(boxes: torch.Tensor, dims: int) -> torch.Tensor:
    """MONAI ``[h0, w0, d0, h1, w1, d1]`` -> medrobust ``[d0, h0, w0, d1, h1, w1]``."""
    inv = [0, 1] if dims == 2 else [2, 0, 1]
    return boxes[..., inv + [dims + i for i in inv]]


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of every box in ``a`` (P, 2d) with every box in ``b`` (Q, 2d): (P, Q)."""
    d = a.shape[-1] // 2
    lo = torch.maximum(a[:, None, :d], b[None, :, :d])
    hi = torch.minimum(a[:, None, d:], b[None, :, d:])
    inter = (hi - lo).clamp_min(0).prod(-1)
    va = (a[:, d:] - a[:, :d]).clamp_min(0).prod(-1)
    vb = (b[:, d:] - b[:, :d]).clamp_min(0).prod(-1)
    union = va[:, None] + vb[None, :] - inter
    return inter / union.clamp_min(1e-12)


def boxes_from_masks(masks: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """One box per non-empty mask (the bounding box of its nonzero voxels), class 0.

    ``masks``: ``(N, *spatial)``; returns per-image ``{"boxes", "labels"}`` (empty for an empty
    mask), in medrobust's axis order."""
    out = []
    dims = masks.dim() - 1
    for m in masks:
        nz = m.nonzero()
        if nz.numel() == 0:
            out.append({"boxes": torch.zeros((0, 2 * dims)),
                        "labels": torch.zeros(0, dtype=torch.long)})
            continue
        lo = nz.min(0).values.float()
        hi = nz.max(0).values.float() + 1
        out.append({"boxes": torch.cat([lo, hi])[None], "labels": torch.zeros(1, dtype=torch.long)})
    return out


def pack_boxes(items: Sequence[Mapping[str, Any]], dims: int, name: str = "labels") -> torch.Tensor:
    """Per-image ``{"boxes", "labels"}`` -> ``(N, M_max, 2*dims + 1)`` float (class -1 = padding).

    Raises ``ValueError`` naming the image and what is wrong (missing key, shape, NaN, a box whose
    end is not after its start, a negative class)."""
    rows = []
    for i, item in enumerate(items):
        if not isinstance(item, Mapping) or "boxes" not in item:
            raise ValueError(
                f"{name}[{i}] must be a dict with 'boxes' ({2 * dims} numbers each, "
                f"{'[h0, w0, h1, w1]' if dims == 2 else '[d0, h0, w0, d1, h1, w1]'}) and 'labels'"
            )
        b = torch.as_tensor(item["boxes"], dtype=torch.float32).detach().cpu()
        if b.numel() == 0:
            b = b.reshape(0, 2 * dims)
        if b.dim() != 2 or b.shape[1] != 2 * dims:
            raise ValueError(
                f"{name}[{i}]['boxes'] must have shape (M, {2 * dims}) for {dims}D inputs; got "
                f"{tuple(b.shape)}"
            )
        lab = item.get("labels")
        c = (torch.zeros(b.shape[0]) if lab is None
             else torch.as_tensor(lab).detach().cpu().reshape(-1).float())
        if c.shape[0] != b.shape[0]:
            raise ValueError(f"{name}[{i}]: {b.shape[0]} boxes but {c.shape[0]} labels")
        if not torch.isfinite(b).all():
            raise ValueError(f"{name}[{i}]['boxes'] contains NaN or Inf")
        if (b[:, dims:] <= b[:, :dims]).any():
            raise ValueError(
                f"{name}[{i}]['boxes']: every box needs end > start on each axis "
                "(corners first, then ends)"
            )
        if c.numel() and (c < 0).any():
            raise ValueError(f"{name}[{i}]['labels'] must be class indices >= 0")
        rows.append(torch.cat([b, c[:, None]], 1))
    m = max((r.shape[0] for r in rows), default=0)
    out = torch.full((len(rows), m, 2 * dims + 1), -1.0)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out


def unpack_boxes(packed: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """The inverse of :func:`pack_boxes` (and of :func:`select_detections`' packed form)."""
    d2 = packed.shape[-1] - 1 if packed.shape[-1] % 2 == 1 else packed.shape[-1] - 2
    out = []
    for row in packed:
        keep = row[:, d2] >= 0
        r = row[keep]
        item = {"boxes": r[:, :d2], "labels": r[:, d2].long()}
        if packed.shape[-1] == d2 + 2:
            item["scores"] = r[:, d2 + 1]
        out.append(item)
    return out


def select_detections(
    outputs: torch.Tensor,
    num_classes: int,
    *,
    score_thresh: float = 0.05,
    nms_thresh: float = 0.5,
    topk: int = 1000,
    max_detections: int = 300,
) -> torch.Tensor:
    """Post-NMS detections from a detector's standard outputs, as MONAI's ``BoxSelector`` does.

    ``outputs``: ``(N, A, K + 2*dims)``: per-anchor class logits, then the decoded box (medrobust
    axis order, already clipped to the image). Per image: sigmoid scores, keep ``score >
    score_thresh``, the ``topk`` best (anchor, class) pairs, class-wise NMS at ``nms_thresh``
    (``monai.data.box_utils.batched_nms``), at most ``max_detections``.

    Returns ``(N, P_max, 2*dims + 2)``: box, class, score; padding rows have class -1, score 0.
    """
    from monai.data.box_utils import batched_nms

    n, _, width = outputs.shape
    k = num_classes
    dims = (width - k) // 2
    per = []
    for i in range(n):
        logits = outputs[i, :, :k].float()
        boxes = outputs[i, :, k:].float()
        scores = torch.sigmoid(logits).flatten()
        idx = torch.where(scores > score_thresh)[0]
        s = scores[idx]
        if idx.numel() > topk:
            s, order = s.topk(topk)
            idx = idx[order]
        labels = idx % k
        b = boxes[idx // k]
        if b.numel():
            keep = batched_nms(b, s, labels, nms_thresh, max_proposals=max_detections)
            keep = torch.as_tensor(keep, device=b.device).long()
            b, s, labels = b[keep], s[keep], labels[keep]
        per.append(torch.cat([b, labels[:, None].float(), s[:, None]], 1))
    m = max((p.shape[0] for p in per), default=0)
    out = torch.zeros((n, m, 2 * dims + 2), device=outputs.device)
    out[:, :, 2 * dims] = -1.0
    for i, p in enumerate(per):
        out[i, : p.shape[0]] = p
    return out


def match_detections(
    detections: dict[str, torch.Tensor], truth: dict[str, torch.Tensor], iou_thresh: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy matching by score: ``(tp (P,) bool per detection, hit (M,) bool per true box)``.

    A detection is a true positive when it overlaps a not-yet-matched true box of its class with
    IoU >= ``iou_thresh``."""
    db, ds, dl = detections["boxes"], detections["scores"], detections["labels"]
    tb, tl = truth["boxes"], truth["labels"]
    tp = torch.zeros(db.shape[0], dtype=torch.bool)
    hit = torch.zeros(tb.shape[0], dtype=torch.bool)
    if db.shape[0] == 0 or tb.shape[0] == 0:
        return tp, hit
    iou = box_iou(db.float().cpu(), tb.float().cpu())
    for j in torch.argsort(ds.cpu(), descending=True).tolist():
        ok = (iou[j] >= iou_thresh) & (~hit) & (tl.cpu() == dl[j].cpu())
        if ok.any():
            t = int(torch.where(ok, iou[j], torch.full_like(iou[j], -1)).argmax())
            hit[t] = True
            tp[j] = True
    return tp, hit


def sensitivity_at_fp(
    detections: Sequence[dict[str, torch.Tensor]],
    truths: Sequence[dict[str, torch.Tensor]],
    fp_per_volume: float = 1.0,
    iou_thresh: float = 0.1,
) -> dict[str, float]:
    """Sensitivity at ``fp_per_volume`` false positives per volume (a point of the FROC curve).

    Detections of all volumes are ranked by score; the threshold is lowered while the false
    positives per volume stay <= ``fp_per_volume``; the sensitivity is the fraction of true boxes
    matched (:func:`match_detections`) by detections at or above that threshold.

    Returns ``{"sensitivity", "threshold", "fp_per_volume", "lesions", "volumes"}``."""
    if len(detections) != len(truths):
        raise ValueError(f"{len(detections)} detection lists for {len(truths)} volumes")
    nvol = len(truths)
    n_true = sum(int(t["boxes"].shape[0]) for t in truths)
    # rank all detections; at each distinct score, match what is kept so far
    items = []
    for v, d in enumerate(detections):
        for j in range(d["boxes"].shape[0]):
            items.append((float(d["scores"][j]), v, j))
    items.sort(key=lambda r: -r[0])
    best = {"sensitivity": 0.0, "threshold": float("inf"), "fp_per_volume": 0.0}
    kept: dict[int, list[int]] = {}
    fp = 0
    for pos, (score, v, j) in enumerate(items):
        kept.setdefault(v, []).append(j)
        # evaluate only at the last detection of a tied score
        if pos + 1 < len(items) and items[pos + 1][0] == score:
            continue
        tp_total, fp = 0, 0
        for vol, idx in kept.items():
            d = detections[vol]
            sub = {k: d[k][idx] for k in ("boxes", "scores", "labels")}
            tp, hit = match_detections(sub, truths[vol], iou_thresh)
            tp_total += int(hit.sum())
            fp += int((~tp).sum())
        if fp / max(nvol, 1) > fp_per_volume:
            break
        best = {
            "sensitivity": tp_total / n_true if n_true else float("nan"),
            "threshold": score,
            "fp_per_volume": fp / max(nvol, 1),
        }
    return {**best, "lesions": float(n_true), "volumes": float(nvol)}
