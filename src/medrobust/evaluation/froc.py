"""FROC analysis of a detector: sensitivity at fixed false positives per volume, with bootstrap
intervals over volumes.

The free-response ROC (Chakraborty, "Maximum likelihood analysis of free-response receiver
operating characteristic (FROC) data", Med. Phys. 1989) plots the lesion sensitivity against the
mean number of false positives per volume as the score threshold falls. Its points at 1/8, 1/4,
1/2, 1, 2, 4 and 8 false positives per volume, and their mean (the *competition performance
metric*, CPM), are how LUNA16 scores nodule detectors (Setio et al., "Validation, comparison, and
combination of algorithms for automatic detection of pulmonary nodules in computed tomography
images: the LUNA16 challenge", Medical Image Analysis 2017).

The matching is that of :func:`medrobust.boxes.sensitivity_at_fp`: within a volume, detections
are matched greedily by score to a not-yet-matched true box of their class with IoU >=
``iou_thresh``; the threshold is lowered over all volumes' detections ranked by score while the
false positives per volume stay within the rate (ties at one score are kept or dropped together).
Greedy matching by score is incremental — a lower-scored detection never changes how a higher one
was matched — so each detection is labelled true or false positive once, and the whole curve,
with ``n_boot`` resamplings of the volumes for the intervals, is a cumulative sum.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from medrobust.boxes import box_iou

__all__ = ["FROC_FP_RATES", "FrocData", "at_threshold", "froc", "label_detections"]

FROC_FP_RATES: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
"""The FROC points of LUNA16 (false positives per volume)."""


@dataclass
class FrocData:
    """Every detection ranked by score, labelled once: ``score``, ``volume``, ``tp`` (matched a
    true box) and each volume's number of true boxes ``lesions``."""

    score: np.ndarray
    volume: np.ndarray
    tp: np.ndarray
    lesions: np.ndarray


def label_detections(
    detections: Sequence[dict[str, torch.Tensor]],
    truths: Sequence[dict[str, torch.Tensor]],
    iou_thresh: float = 0.1,
) -> FrocData:
    """Rank all detections by score and label each a true or a false positive (see the module
    docstring)."""
    if len(detections) != len(truths):
        raise ValueError(f"{len(detections)} detection lists for {len(truths)} volumes")
    scores, vols, tps = [], [], []
    for v, (d, t) in enumerate(zip(detections, truths, strict=True)):
        s = d["scores"].detach().float().cpu()
        order = torch.argsort(s, descending=True, stable=True)
        tp = torch.zeros(s.numel(), dtype=torch.bool)
        tb = t["boxes"].detach().float().cpu()
        if s.numel() and tb.shape[0]:
            iou = box_iou(d["boxes"].detach().float().cpu(), tb)
            tl = t["labels"].detach().cpu().long()
            dl = d["labels"].detach().cpu().long()
            hit = torch.zeros(tb.shape[0], dtype=torch.bool)
            for j in order.tolist():
                ok = (iou[j] >= iou_thresh) & ~hit & (tl == dl[j])
                if ok.any():
                    hit[int(torch.where(ok, iou[j], torch.full_like(iou[j], -1)).argmax())] = True
                    tp[j] = True
        scores.append(s.numpy())
        vols.append(np.full(s.numel(), v, dtype=np.int64))
        tps.append(tp.numpy())
    score = np.concatenate(scores) if scores else np.zeros(0)
    rank = np.argsort(-score, kind="stable")
    return FrocData(
        score=score[rank].astype(np.float64),
        volume=np.concatenate(vols)[rank] if vols else np.zeros(0, np.int64),
        tp=np.concatenate(tps)[rank] if tps else np.zeros(0, bool),
        lesions=np.array([int(t["boxes"].shape[0]) for t in truths], dtype=np.int64),
    )


def _curve(data: FrocData, weights: np.ndarray, rates: Sequence[float]
           ) -> tuple[np.ndarray, np.ndarray]:
    """Sensitivities ``(B, R)`` and thresholds ``(B, R)`` for volume weights ``(B, V)``."""
    b = weights.shape[0]
    nvol = weights.sum(1)  # (B,)
    lesions = weights @ data.lesions  # (B,)
    d = data.score.size
    if d == 0:
        return np.zeros((b, len(rates))), np.full((b, len(rates)), np.inf)
    w = weights[:, data.volume]  # (B, D)
    cum_tp = np.cumsum(w * data.tp, axis=1)
    cum_fp = np.cumsum(w * ~data.tp, axis=1)
    # a cut is possible after the last detection of each tied score
    valid = np.ones(d, dtype=bool)
    valid[:-1] = data.score[:-1] != data.score[1:]
    sens = np.zeros((b, len(rates)))
    thr = np.full((b, len(rates)), np.inf)
    for r, rate in enumerate(rates):
        # the allowed cuts are a prefix (false positives only grow): take its last valid cut
        ok = (cum_fp <= rate * nvol[:, None] + 1e-9) & valid[None, :]
        any_ok = ok.any(1)
        last = d - 1 - np.argmax(ok[:, ::-1], axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            s = np.where(any_ok, cum_tp[np.arange(b), last], 0.0) / lesions
        sens[:, r] = np.where(lesions > 0, s, np.nan)
        thr[:, r] = np.where(any_ok, data.score[last], np.inf)
    return sens, thr


def froc(
    detections: Sequence[dict[str, torch.Tensor]],
    truths: Sequence[dict[str, torch.Tensor]],
    fp_rates: Sequence[float] = FROC_FP_RATES,
    iou_thresh: float = 0.1,
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """The FROC points at ``fp_rates`` with 95% percentile-bootstrap intervals over volumes, and
    their mean (CPM).

    Returns ``{"points": [{"fp_per_volume", "sensitivity", "ci95", "threshold"}], "cpm":
    {"value", "ci95"}, "volumes", "lesions"}``; a sensitivity is ``None`` without true boxes.
    """
    rates = [float(r) for r in fp_rates]
    if not rates or any(not (r >= 0 and np.isfinite(r)) for r in rates):
        raise ValueError(f"fp_rates must be finite numbers >= 0; got {list(fp_rates)}")
    data = label_detections(detections, truths, iou_thresh)
    v = len(truths)
    sens, thr = _curve(data, np.ones((1, v)), rates)
    rng = np.random.default_rng(seed)
    counts = np.stack([np.bincount(rng.integers(0, v, v), minlength=v) for _ in range(n_boot)]
                      ) if v and n_boot > 0 else np.zeros((0, v))
    boot, _ = _curve(data, counts.astype(np.float64), rates) if len(counts) else (None, None)

    def ci(col: np.ndarray | None) -> list[float | None]:
        if col is None:
            return [None, None]
        c = col[np.isfinite(col)]
        if c.size == 0:
            return [None, None]
        return [float(np.quantile(c, 0.025)), float(np.quantile(c, 0.975))]

    def val(x: float) -> float | None:
        return float(x) if np.isfinite(x) else None

    points = [{"fp_per_volume": r, "sensitivity": val(sens[0, j]),
               "ci95": ci(None if boot is None else boot[:, j]),
               "threshold": val(thr[0, j])} for j, r in enumerate(rates)]
    cpm = float(np.mean(sens[0])) if np.all(np.isfinite(sens[0])) else None
    return {
        "points": points,
        "cpm": {"value": cpm, "ci95": ci(None if boot is None else boot.mean(1))},
        "volumes": v,
        "lesions": int(data.lesions.sum()),
    }


def at_threshold(
    detections: Sequence[dict[str, torch.Tensor]],
    truths: Sequence[dict[str, torch.Tensor]],
    threshold: float | None,
    iou_thresh: float = 0.1,
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Sensitivity and false positives per volume of the detections scoring >= ``threshold`` (a
    fixed operating point, e.g. the clean one at 1 FP/volume), with 95% bootstrap intervals over
    volumes. ``threshold=None`` (no operating point) keeps nothing.

    Returns ``{"threshold", "sensitivity", "ci95", "fp_per_volume"}``."""
    data = label_detections(detections, truths, iou_thresh)
    v = len(truths)
    # scores are float32: compare at their precision (0.7 means the float32 0.7)
    keep = (data.score >= float(np.float32(threshold)) if threshold is not None
            else np.zeros_like(data.tp))
    tp_v = np.bincount(data.volume[keep & data.tp], minlength=v).astype(np.float64)
    fp_v = np.bincount(data.volume[keep & ~data.tp], minlength=v).astype(np.float64)
    les = data.lesions.astype(np.float64)
    sens = float(tp_v.sum() / les.sum()) if les.sum() else None
    ci: list[float | None] = [None, None]
    if sens is not None and n_boot > 0:
        rng = np.random.default_rng(seed)
        w = np.stack([np.bincount(rng.integers(0, v, v), minlength=v) for _ in range(n_boot)])
        den = w @ les
        ok = den > 0
        b = (w @ tp_v)[ok] / den[ok]
        if b.size:
            ci = [float(np.quantile(b, 0.025)), float(np.quantile(b, 0.975))]
    return {"threshold": None if threshold is None else float(threshold), "sensitivity": sens,
            "ci95": ci, "fp_per_volume": float(fp_v.sum() / max(v, 1))}
