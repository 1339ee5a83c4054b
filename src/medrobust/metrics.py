"""Classification metrics as the MedMNIST v2 benchmark reports them (``getACC``/``getAUC``) and
the Dice score, in numpy; shared by training and evaluation (no scikit-learn needed)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["dice_scores", "medmnist_acc", "medmnist_auc", "roc_auc"]


def _average_ranks(a: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
    order = np.argsort(a, kind="mergesort")
    sa = a[order]
    new = np.concatenate(([True], sa[1:] != sa[:-1]))
    group = np.cumsum(new) - 1
    starts = np.flatnonzero(new)
    ends = np.append(starts[1:], len(a))
    avg = (starts + ends - 1) / 2.0 + 1.0
    ranks = np.empty(len(a), dtype=np.float64)
    ranks[order] = avg[group]
    return ranks


def roc_auc(y_true: np.ndarray | Sequence[int], score: np.ndarray | Sequence[float]) -> float:
    """Area under the ROC curve of a binary problem (Mann-Whitney U; ties count one half).

    Equals ``sklearn.metrics.roc_auc_score``. ``nan`` when only one class is present.
    """
    y = np.asarray(y_true).astype(bool).reshape(-1)
    s = np.asarray(score, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"{y.shape[0]} labels but {s.shape[0]} scores")
    n1 = int(y.sum())
    n0 = int(y.size - n1)
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = _average_ranks(s)
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def medmnist_auc(y_true: np.ndarray, y_score: np.ndarray, task: str) -> float:
    """AUC as MedMNIST's ``getAUC`` reports it.

    ``y_score``: (N, K) class probabilities (softmax; sigmoid for multi-label). Binary: ROC AUC of
    the class-1 probability. Multi-class / ordinal: mean one-vs-rest AUC over classes.
    Multi-label: mean AUC over labels. Classes or labels absent from ``y_true`` are skipped.
    """
    y_true = np.asarray(y_true)
    y_score = np.asarray(y_score, dtype=np.float64)
    if task == "binary":
        return roc_auc(y_true.reshape(-1), y_score[:, -1])
    if task == "multi-label":
        aucs = [roc_auc(y_true[:, i], y_score[:, i]) for i in range(y_true.shape[1])]
    else:
        y = y_true.reshape(-1)
        aucs = [roc_auc(y == k, y_score[:, k]) for k in range(y_score.shape[1])]
    finite = [a for a in aucs if not math.isnan(a)]
    return float(np.mean(finite)) if finite else float("nan")


def medmnist_acc(
    y_true: np.ndarray, y_score: np.ndarray, task: str, threshold: float = 0.5
) -> float:
    """ACC as MedMNIST's ``getACC`` reports it.

    Binary: class-1 probability > ``threshold``. Multi-class / ordinal: argmax. Multi-label: the
    mean over labels of the per-label accuracy at ``threshold``.
    """
    y_true = np.asarray(y_true)
    y_score = np.asarray(y_score, dtype=np.float64)
    if y_true.shape[0] == 0:
        return float("nan")
    if task == "multi-label":
        pred = y_score > threshold
        return float(np.mean([(pred[:, i] == y_true[:, i]).mean() for i in range(y_true.shape[1])]))
    if task == "binary":
        pred = (y_score[:, -1] > threshold).astype(np.int64)
    else:
        pred = y_score.argmax(1)
    return float((pred == y_true.reshape(-1)).mean())


def dice_scores(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> list[float]:
    """Dice coefficient per foreground class (1..K-1) of integer masks; ``nan`` when absent."""
    out = []
    for k in range(1, num_classes):
        p, t = pred == k, target == k
        denom = int(p.sum()) + int(t.sum())
        out.append(float("nan") if denom == 0 else 2.0 * int((p & t).sum()) / denom)
    return out
