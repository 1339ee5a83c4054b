"""Robust AUC under attack for binary tasks: the ROC AUC of the scores of attacked inputs, each
sample attacked in the direction that hurts its own class (a positive pushed towards "negative",
a negative towards "positive") at the budget, with a percentile bootstrap interval.

An attack that stops at the decision boundary (early stopping) would leave the scores just past
it; the AUC needs the scores pushed as far as the budget allows, so the unit runs a gradient
attack with the scale-free margin loss and no early stop (PGD, which keeps pushing the loss of a
sample already misclassified; APGD, as AutoAttack's, leaves those unchanged), on every sample —
misclassified ones too, since they still move the ranking.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from medrobust.attacks import ATTACKS
from medrobust.evaluation.budgets import Budget
from medrobust.evaluation.families.base import (
    UnitJob,
    UnitOutput,
    register_family,
    whole_range_budget,
)
from medrobust.evaluation.families.single import FixedBudgetFamily
from medrobust.evaluation.metrics import auc_medmnist, bootstrap_auc_ci
from medrobust.evaluation.specs import AttackSpec
from medrobust.evaluation.util import accepts, jsonable, sha256_json

__all__ = ["RobustAUCFamily", "robust_auc_spec", "summarize_robust_auc"]

NAME = "robust-auc"


def robust_auc_spec(steps: int | None = None) -> AttackSpec:
    """The spec of the robust-AUC units (PGD, margin loss, no early stop)."""
    name = "pgd"
    cls = ATTACKS[name]
    kw: dict[str, Any] = {"loss": "margin"}
    if accepts(cls, "early_stop"):
        kw["early_stop"] = False
    if steps is not None and accepts(cls, "steps"):
        kw["steps"] = int(steps)
    key = f"{NAME}:{name}:{sha256_json(jsonable(kw))[:12]}"
    return AttackSpec(NAME, cls, kw, key, minimization=False, single_step=False, kind=NAME)


class RobustAUCFamily(FixedBudgetFamily):
    """Per budget and batch: the positive-class score of every sample's adversarial input."""

    name = NAME

    def units(self, spec: AttackSpec, budgets: list[Budget], big: Budget | None
              ) -> list[tuple[str, Budget | None]]:
        return [(b.key, b) for b in budgets]

    def run(self, spec: AttackSpec, job: UnitJob) -> UnitOutput:
        x, y = job.x, job.y
        t0 = time.perf_counter()
        atk = spec.build(job.eps, job.norm, job.seed)
        with whole_range_budget(False):
            res = atk(job.clf, x, y)
        with job.clf.attack_mode():
            logits = job.clf.logits(res.adversarial.to(x.dtype)).float().cpu()
        rec: dict[str, np.ndarray] = {"idx": np.arange(x.shape[0], dtype=np.int64),
               "score": torch.softmax(logits, 1).numpy().astype(np.float32),
               "cost_forward": np.array([float(res.forward_passes)]),
               "cost_backward": np.array([float(res.backward_passes)]),
               "time_s": np.array([time.perf_counter() - t0])}
        return UnitOutput(rec, res.adversarial.detach())


register_family(RobustAUCFamily())


def summarize_robust_auc(spec: AttackSpec, collected: Any, labels: np.ndarray,
                         budgets: list[Budget], seed: int) -> dict[str, Any]:
    """The ``robust_auc`` block: per budget, the AUC of the attacked scores with its CI."""
    per = []
    for b in budgets:
        rec = collected[f"{spec.key}|{b.key}"]
        probs = np.asarray(rec["score"], dtype=np.float64)
        auc = auc_medmnist(labels, probs, "binary")
        lo, hi = bootstrap_auc_ci(labels, probs, "binary", seed=seed)
        per.append({"eps": b.value, "eps_label": b.label, "value": auc, "ci_low": lo,
                    "ci_high": hi})
    return {"attack": spec.describe("linf")["config"].get("name"), "loss": "margin",
            "method": "every sample attacked towards the other class (margin loss, no early "
                      "stop); ROC AUC of the attacked positive-class scores; 95% CI: percentile "
                      "bootstrap, 1000 resamples",
            "per_eps": per}
