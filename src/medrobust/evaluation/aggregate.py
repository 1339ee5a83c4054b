"""Step 4 of the pipeline: from per-sample vectors to the numbers of ``results.json``.

Definitions (N = all evaluated samples; "attacked" = the samples the direction selects, all of
them by default):

* clean accuracy: ``mean(clean_pred == y)``; AUC as MedMNIST computes it (softmax scores).
* robust accuracy of an attack at a budget: the share of the N samples classified correctly both
  clean and on the attack's output (a sample the model gets wrong counts as broken; a sample not
  attacked keeps its clean prediction).
* raw accuracy: ``mean(adv_pred == y)`` over N, the attack's own output alone (used by the sanity
  checks, which must not mix in the clean prediction).
* success_on_correct: attack success on correctly classified samples — the share of the attacked
  samples the model got right that the attack made wrong. (An
  :class:`~medrobust.results.AttackResult`'s ``success_rate`` is another figure: over all samples.)
* worst case at a budget: a sample is robust only when it is robust to every attack (the number
  to quote).
* per class: the robust accuracy within each true class; the task type adds its own numbers
  (:mod:`medrobust.evaluation.tasks`: sensitivity/specificity, grade shift).
* perturbation statistics (L-inf, L2, PSNR, SSIM): over the successful adversarial examples
  ("successful": originally correct, broken within the budget) and over every attacked sample
  that has one ("attacked"); a minimum-norm attack's distance over the samples originally correct
  that it broke — never over the zeros of failures or of samples already misclassified.

Every proportion carries its 95% Wilson interval; the AUC a percentile bootstrap interval.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medrobust.evaluation.budgets import Budget
from medrobust.evaluation.families import family_of
from medrobust.evaluation.metrics import (
    Proportion,
    auc_medmnist,
    bootstrap_auc_ci,
    summary_stats,
)
from medrobust.evaluation.plan import CLEAN_UNIT
from medrobust.evaluation.specs import AttackSpec
from medrobust.evaluation.tasks import class_block, task_type

__all__ = ["AUC_METHOD", "aggregate", "attack_vectors"]

AUC_METHOD = ("medmnist getAUC (binary: score of the last class; else mean one-vs-rest over "
              "classes); 95% CI: percentile bootstrap, 1000 resamples")

Records = Any  # a mapping "unit|eps_key" -> record (runner.Collected or a dict)


def attack_vectors(collected: Records, spec: AttackSpec, budget: Budget,
                   clean_pred: np.ndarray) -> dict[str, np.ndarray]:
    """Per-sample vectors over all N samples for one attack at one budget (its family decides
    how the stored record reads at this budget)."""
    fam = family_of(spec)
    rec = collected[f"{spec.key}|{fam.unit_budget(spec, budget)}"]
    return fam.vectors(spec, rec, budget, clean_pred)


def _entry(spec: AttackSpec, budget: Budget, v: dict[str, np.ndarray], rec: dict[str, Any],
           y: np.ndarray, clean_pred: np.ndarray, k: int, pos: int, task: str
           ) -> dict[str, Any]:
    clean_correct = clean_pred == y
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
        "success_on_correct": Proportion.of(~adv_correct, cc_att).to_dict(),
        "perturbation": {
            group: {name: summary_stats(v[name][mask]) for name in ("linf", "l2", "psnr", "ssim")}
            for group, mask in (("successful", fooled), ("attacked", v["attacked"]))
        },
        "per_class": class_block(robust, y, k),
    }
    e.update(task_type(task, k).entry(v["pred"], clean_pred, y, robust, k, pos))
    if "cost_forward" in rec and np.asarray(rec["cost_forward"]).size == 1:
        e["cost"] = {"forward_passes": int(np.asarray(rec["cost_forward"]).sum()),
                     "backward_passes": int(np.asarray(rec["cost_backward"]).sum())}
    e.update(family_of(spec).entry(spec, rec, budget, clean_correct))
    return e


def aggregate(
    *, collected: Records, labels: np.ndarray, k: int, task: str,
    specs: list[AttackSpec], budgets: list[Budget], big: Budget | None, direction: str | None,
    positive_class: int, seed: int,
) -> dict[str, Any]:
    """The ``clean``, ``attacks`` and ``worst_case`` blocks of ``results.json``, and the
    per-attack ``timing`` (volatile: it goes under ``run``)."""
    y = np.asarray(labels, dtype=np.int64)
    clean = collected[f"{CLEAN_UNIT}|"]
    probs, clean_pred = clean["probs"].astype(np.float64), clean["pred"].astype(np.int64)
    clean_correct = clean_pred == y
    auc_task = "binary" if k == 2 else "multi-class"  # ordinal is scored like multi-class
    auc = auc_medmnist(y, probs, auc_task)
    lo, hi = bootstrap_auc_ci(y, probs, auc_task, seed=seed)
    tt = task_type(task, k)
    clean_block: dict[str, Any] = {
        "n": int(y.size),
        "accuracy": Proportion.of(clean_correct).to_dict(),
        "auc": {"value": auc, "ci_low": lo, "ci_high": hi, "method": AUC_METHOD},
        "per_class": class_block(clean_correct, y, k),
        "predicted_classes": np.bincount(clean_pred, minlength=k).tolist(),
    }
    clean_block.update(tt.clean(clean_pred, y, k, positive_class))

    attacks: dict[str, Any] = {}
    timing: dict[str, Any] = {}
    per_budget_correct: dict[str, list[np.ndarray]] = {b.key: [] for b in budgets}
    per_budget_fooled: dict[str, dict[str, np.ndarray]] = {b.key: {} for b in budgets}
    attacked_any = np.zeros(y.size, dtype=bool)
    for spec in specs:
        fam = family_of(spec)
        block: dict[str, Any] = {
            "key": spec.key,
            "kind": spec.kind,
            "single_step": spec.single_step,
            "gradient_free": spec.gradient_free,
            "per_eps": [],
            "large_eps": None,
        }
        seconds = 0.0
        comp_seconds: np.ndarray | None = None
        counted: set[str] = set()
        for b in budgets + ([big] if big is not None else []):
            ukey = f"{spec.key}|{fam.unit_budget(spec, b)}"
            rec = collected[ukey]
            v = fam.vectors(spec, rec, b, clean_pred)
            e = _entry(spec, b, v, rec, y, clean_pred, k, positive_class, task)
            if ukey not in counted and "time_s" in rec:
                counted.add(ukey)
                t = np.asarray(rec["time_s"], dtype=np.float64)
                seconds += float(t.sum())
                if t.size > 1 and b is not big:
                    comp_seconds = t if comp_seconds is None else comp_seconds + t
            if b is big:
                block["large_eps"] = e
                continue
            attacked_any |= v["attacked"]
            block["per_eps"].append(e)
            correct = v["pred"] == y
            per_budget_correct[b.key].append(correct)
            per_budget_fooled[b.key][spec.name] = clean_correct & ~correct
        block.update(fam.block(spec, collected, budgets, clean_correct))
        attacks[spec.name] = block
        timing[spec.name] = {"seconds": round(seconds, 3)}
        if comp_seconds is not None:
            labels_ = [c.label for c in getattr(spec, "components", [])]
            timing[spec.name]["components"] = {
                lab: round(float(s), 3) for lab, s in zip(labels_, comp_seconds, strict=False)}

    worst: list[dict[str, Any]] = []
    for b in budgets:
        all_correct = np.logical_and.reduce(per_budget_correct[b.key]) & clean_correct
        fooled = per_budget_fooled[b.key]
        only = {}
        for name, f in fooled.items():
            others = [g for m, g in fooled.items() if m != name]
            only[name] = int((f & ~np.logical_or.reduce(others)).sum()) if others else int(f.sum())
        we: dict[str, Any] = {
            "eps": b.value,
            "eps_label": b.label,
            "n": int(y.size),
            "robust_accuracy": Proportion.of(all_correct).to_dict(),
            "success_on_correct": Proportion.of(~all_correct,
                                                clean_correct & attacked_any).to_dict(),
            "fooled_only_by": only,
            "per_class": class_block(all_correct, y, k),
        }
        we.update(tt.entry(np.where(all_correct, y, _worst_pred(specs, collected, b, clean_pred,
                                                               y)),
                          clean_pred, y, all_correct, k, positive_class))
        worst.append(we)
    return {"clean": clean_block, "attacks": attacks, "worst_case": worst, "timing": timing}


def _worst_pred(specs: list[AttackSpec], collected: Records, budget: Budget,
                clean_pred: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per sample, the prediction of the first attack (in order) that broke it, else the clean
    prediction (the grade reported for the worst case of an ordinal task)."""
    pred = clean_pred.copy()
    done = clean_pred != y
    for spec in specs:
        v = attack_vectors(collected, spec, budget, clean_pred)
        hit = ~done & (v["pred"] != y)
        pred[hit] = v["pred"][hit]
        done |= hit
    return pred
