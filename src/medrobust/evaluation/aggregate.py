"""From per-sample vectors to the numbers of ``results.json``.

Definitions (N = all evaluated samples; "attacked" = the samples the direction selects, all of
them by default):

* clean accuracy: ``mean(clean_pred == y)``; AUC as MedMNIST computes it (softmax scores).
* robust accuracy of an attack at a budget: the share of the N samples classified correctly both
  clean and on the attack's output (a sample the model gets wrong counts as broken; a sample not
  attacked keeps its clean prediction).
* raw accuracy: ``mean(adv_pred == y)`` over N, the attack's own output alone (used by the sanity
  checks, which must not mix in the clean prediction).
* success rate: the share of attacked samples the model got right that the attack made wrong.
* worst case at a budget: a sample is robust only when it is robust to every attack (the number
  to quote).
* per class: the robust accuracy within each true class; binary tasks: sensitivity (robust
  accuracy on the positive class) and specificity (on the negative class).
* perturbation statistics (L-inf, L2, PSNR, SSIM): over the successful adversarial examples
  ("successful") and over every attacked sample ("attacked").

Every proportion carries its 95% Wilson interval; the AUC a percentile bootstrap interval.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medrobust.evaluation.budgets import Budget
from medrobust.evaluation.engine import CLEAN_UNIT, MIN_NORM_KEY, AttackSpec
from medrobust.evaluation.metrics import (
    Proportion,
    auc_medmnist,
    bootstrap_auc_ci,
    summary_stats,
)

__all__ = ["aggregate", "attack_vectors"]

AUC_METHOD = ("medmnist getAUC (binary: score of the last class; else mean one-vs-rest over "
              "classes); 95% CI: percentile bootstrap, 1000 resamples")


def attack_vectors(
    collected: dict[str, Any], spec: AttackSpec, budget: Budget, clean_pred: np.ndarray
) -> dict[str, np.ndarray]:
    """Per-sample vectors over all N samples for one attack at one budget.

    ``pred`` is the prediction on the attack's output (the clean prediction where a sample was
    not attacked, or, for a minimum-norm attack, where it needed more than ``eps``).
    """
    n = clean_pred.shape[0]
    key = f"{spec.key}|{MIN_NORM_KEY if spec.minimization else budget.key}"
    rec = collected[key]
    idx = rec["idx"].astype(np.int64)
    pred = clean_pred.copy()
    attacked = np.zeros(n, dtype=bool)
    attacked[idx] = True
    vec = {name: np.full(n, np.nan, dtype=np.float64) for name in ("linf", "l2", "psnr", "ssim")}
    if spec.minimization:
        within = rec["success"] & (rec["dist"] <= budget.value * (1 + 1e-6) + 1e-12)
        pred[idx] = np.where(within, rec["pred"], clean_pred[idx])
        for name in vec:
            vec[name][idx] = np.where(within, rec[name], np.nan)
    else:
        pred[idx] = rec["pred"]
        for name in vec:
            vec[name][idx] = rec[name]
    return {"pred": pred, "attacked": attacked, **vec}


def _class_block(correct: np.ndarray, y: np.ndarray, k: int, names: list[str] | None
                 ) -> list[dict[str, Any]]:
    return [
        {"class": c, "name": names[c] if names and c < len(names) else str(c),
         **Proportion.of(correct, y == c).to_dict()}
        for c in range(k)
    ]


def _binary_block(correct: np.ndarray, y: np.ndarray, pos: int) -> dict[str, Any]:
    return {
        "sensitivity": Proportion.of(correct, y == pos).to_dict(),
        "specificity": Proportion.of(correct, y != pos).to_dict(),
    }


def _entry(
    budget: Budget, v: dict[str, np.ndarray], y: np.ndarray, clean_correct: np.ndarray, k: int,
    pos: int,
) -> dict[str, Any]:
    adv_correct = v["pred"] == y
    robust = clean_correct & adv_correct
    cc_att = clean_correct & v["attacked"]
    fooled = cc_att & ~adv_correct
    e: dict[str, Any] = {
        "eps": budget.value,
        "eps_label": budget.label,
        "n": int(y.size),
        "n_attacked": int(v["attacked"].sum()),
        "robust_accuracy": Proportion.of(robust).to_dict(),
        "raw_accuracy": Proportion.of(adv_correct).to_dict(),
        "success_rate": Proportion.of(~adv_correct, cc_att).to_dict(),
        "perturbation": {
            group: {name: summary_stats(v[name][mask]) for name in ("linf", "l2", "psnr", "ssim")}
            for group, mask in (("successful", fooled), ("attacked", v["attacked"]))
        },
        "per_class": _class_block(robust, y, k, None),
    }
    if k == 2:
        e.update(_binary_block(robust, y, pos))
    return e


def aggregate(
    *, collected: dict[str, Any], labels: np.ndarray, k: int, task: str,
    specs: list[AttackSpec], budgets: list[Budget], big: Budget | None, direction: str | None,
    positive_class: int, seed: int,
) -> dict[str, Any]:
    """The ``clean``, ``attacks`` and ``worst_case`` blocks of ``results.json``."""
    y = np.asarray(labels, dtype=np.int64)
    clean = collected[f"{CLEAN_UNIT}|"]
    probs, clean_pred = clean["probs"].astype(np.float64), clean["pred"].astype(np.int64)
    clean_correct = clean_pred == y
    auc_task = "binary" if k == 2 else "multi-class"  # ordinal is scored like multi-class
    auc = auc_medmnist(y, probs, auc_task)
    lo, hi = bootstrap_auc_ci(y, probs, auc_task, seed=seed)
    clean_block: dict[str, Any] = {
        "n": int(y.size),
        "accuracy": Proportion.of(clean_correct).to_dict(),
        "auc": {"value": auc, "ci_low": lo, "ci_high": hi, "method": AUC_METHOD},
        "per_class": _class_block(clean_correct, y, k, None),
    }
    if k == 2:
        clean_block.update(_binary_block(clean_correct, y, positive_class))

    attacks: dict[str, Any] = {}
    per_budget_correct: dict[str, list[np.ndarray]] = {b.key: [] for b in budgets}
    per_budget_fooled: dict[str, dict[str, np.ndarray]] = {b.key: {} for b in budgets}
    attacked_any = np.zeros(y.size, dtype=bool)
    for spec in specs:
        block: dict[str, Any] = {
            "key": spec.key,
            "kind": spec.kind,
            "single_step": spec.single_step,
            "per_eps": [],
            "large_eps": None,
        }
        for b in budgets:
            v = attack_vectors(collected, spec, b, clean_pred)
            attacked_any |= v["attacked"]
            block["per_eps"].append(_entry(b, v, y, clean_correct, k, positive_class))
            correct = v["pred"] == y
            per_budget_correct[b.key].append(correct)
            per_budget_fooled[b.key][spec.name] = clean_correct & ~correct
        if spec.minimization:
            rec = collected[f"{spec.key}|{MIN_NORM_KEY}"]
            ok = rec["success"] & clean_correct[rec["idx"]]
            block["distance"] = summary_stats(np.where(ok, rec["dist"], np.nan))
        if big is not None:
            v = attack_vectors(collected, spec, big, clean_pred)
            block["large_eps"] = _entry(big, v, y, clean_correct, k, positive_class)
        attacks[spec.name] = block

    worst: list[dict[str, Any]] = []
    for b in budgets:
        all_correct = np.logical_and.reduce(per_budget_correct[b.key]) & clean_correct
        fooled = per_budget_fooled[b.key]
        only = {}
        for name, f in fooled.items():
            others = [g for m, g in fooled.items() if m != name]
            only[name] = int((f & ~np.logical_or.reduce(others)).sum()) if others else int(f.sum())
        e: dict[str, Any] = {
            "eps": b.value,
            "eps_label": b.label,
            "n": int(y.size),
            "robust_accuracy": Proportion.of(all_correct).to_dict(),
            "success_rate": Proportion.of(~all_correct, clean_correct & attacked_any).to_dict(),
            "fooled_only_by": only,
            "per_class": _class_block(all_correct, y, k, None),
        }
        if k == 2:
            e.update(_binary_block(all_correct, y, positive_class))
        worst.append(e)
    return {"clean": clean_block, "attacks": attacks, "worst_case": worst}
