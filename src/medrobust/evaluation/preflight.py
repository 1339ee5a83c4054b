"""Pre-flight checks of the model, before its numbers are trusted (after AutoAttack's
``autoattack/checks.py``, Croce & Hein 2020, and more):

* ``randomness`` — two evaluations of the same inputs differ: a randomized model (dropout left on,
  a random defense). A deterministic attack then measures one draw; use ``standard-rand`` (EOT).
* ``probabilities`` — the outputs already look like probabilities (non-negative rows summing to
  one): a softmax inside the model; the cross-entropy of its softmax saturates, so gradient
  attacks with CE are weakened. Give the logits.
* ``classes`` — too few classes for a loss: DLR needs 3 classes and the targeted DLR 4; binary
  tasks use the margin loss instead (said here, as information).
* ``constant_prediction`` — the model predicts the same class for every sample: a sanity-check
  failure (its robust accuracy measures the class balance, not robustness).

Each is a check dict as in :mod:`medrobust.evaluation.sanity` (``status`` pass, fail, warn or
info); :func:`preflight_checks` returns them for the ``sanity`` block.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from medrobust.evaluation.sanity import FAIL, INFO, PASS, WARN, check
from medrobust.models import Classifier

__all__ = ["model_checks", "preflight_checks"]

PROBE = 16
"""How many samples the randomness and probability probes send through the model."""


def model_checks(clf: Classifier, x: torch.Tensor, rand_aware: bool) -> list[dict[str, Any]]:
    """The probes that need the model: randomness and probability outputs on ``x`` (a few
    samples). ``rand_aware``: the evaluation already attacks with EOT."""
    with clf.attack_mode():
        a = clf.logits(x.to(clf.dtype)).float().cpu()
        b = clf.logits(x.to(clf.dtype)).float().cpu()
    out = []
    diff = float((a - b).abs().max()) if a.numel() else 0.0
    if diff > 0:
        out.append(check(
            "randomness", "randomness", None, PASS if rand_aware else FAIL,
            f"two evaluations of the same {x.shape[0]} inputs differ (max |logit difference| "
            f"{diff:.3g}): a randomized model"
            + (" — attacked with EOT" if rand_aware else
               "; a deterministic attack measures one draw: evaluate with attacks='standard-rand'"
               " (Expectation over Transformation), or put the model in a deterministic mode"),
            {"max_abs_difference": diff},
        ))
    else:
        out.append(check("randomness", "randomness", None, PASS,
                         f"two evaluations of the same {x.shape[0]} inputs are identical"))
    rows = a.sum(1)
    probs_like = bool(a.numel()) and bool((a >= 0).all()) and bool(
        ((rows - 1).abs() < 1e-3).all())
    out.append(check(
        "probabilities", "probabilities", None, WARN if probs_like else PASS,
        ("the model's outputs are non-negative and sum to 1: they look like probabilities (a "
         "softmax inside the model). Cross-entropy on them saturates and weakens gradient "
         "attacks; wrap the network without its final softmax" if probs_like else
         "the model's outputs are logits (not probabilities)"),
    ))
    return out


def preflight_checks(clean_pred: np.ndarray, k: int, notes: list[str],
                     probes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The pre-flight block: the model probes, the class count, a constant prediction."""
    out = list(probes)
    if k < 4:
        detail = (f"{k} classes: the DLR loss needs 3 classes and the targeted DLR loss 4; "
                  "the margin loss replaces them where needed")
        if notes:
            detail += " (" + "; ".join(notes) + ")"
        out.append(check("classes", "classes", None, INFO, detail, {"num_classes": k}))
    else:
        out.append(check("classes", "classes", None, PASS,
                         f"{k} classes: every loss (CE, DLR, targeted DLR) is defined"))
    counts = np.bincount(clean_pred.astype(np.int64), minlength=k)
    if clean_pred.size > 1 and int((counts > 0).sum()) == 1:
        c = int(counts.argmax())
        out.append(check(
            "constant_prediction", "constant_prediction", None, FAIL,
            f"the model predicts class {c} for all {clean_pred.size} samples: its accuracy is "
            "the class balance, and robust accuracy says nothing about robustness",
            {"predicted_classes": counts.tolist()},
        ))
    else:
        out.append(check("constant_prediction", "constant_prediction", None, PASS,
                         f"the model predicts {int((counts > 0).sum())} different classes"))
    return out
