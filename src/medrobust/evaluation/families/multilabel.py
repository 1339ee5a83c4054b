"""Multi-label tasks (ChestMNIST's 14 findings; a model ``Classifier(..., task="multilabel")``
with one logit per finding, present when > 0): the family that attacks findings and the task
type that aggregates them.

Per unit (one attack, one budget, one batch) the attack is run with the criterion
:class:`~medrobust.criteria.FindingFlip`:

* once on all findings (``FindingFlip(None, "any")``): success when any finding of the report is
  flipped — a sample is *robust* when its whole report is right clean and stays right;
* once per finding ``j`` (``FindingFlip(j)``): robust accuracy per finding — finding ``j`` correct
  clean and not flipped by an attack on ``j`` alone (not in the unbounded sanity check).

The numbers reuse the keys of the other tasks, so that the checks and the report read them
unchanged: ``robust_accuracy`` (whole report right, under the attack on all findings),
``raw_accuracy``, ``success_on_correct`` and ``per_class`` (here: per finding, under the attack on
that finding).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from medrobust.criteria import FindingFlip
from medrobust.evaluation.budgets import Budget
from medrobust.evaluation.families.base import (
    UnitJob,
    UnitOutput,
    register_family,
    whole_range_budget,
)
from medrobust.evaluation.families.single import STATS, FixedBudgetFamily
from medrobust.evaluation.metrics import Proportion, auc_medmnist, bootstrap_auc_ci, psnr, ssim
from medrobust.evaluation.specs import AttackSpec

__all__ = ["MultiLabelFamily", "aggregate_multilabel"]


class MultiLabelFamily(FixedBudgetFamily):
    """A fixed-budget attack on a multi-label model: all findings at once, then each alone."""

    name = "multilabel"

    def run(self, spec: AttackSpec, job: UnitJob) -> UnitOutput:
        idx = job.idx
        x, y = job.x[idx], job.y[idx]
        f = int(y.shape[1])
        n = x.shape[0]
        t0 = time.perf_counter()
        fwd = bwd = 0.0
        atk = spec.build(job.eps, job.norm, job.seed, large=job.large)
        with whole_range_budget(job.large):
            res = atk(job.clf, x, y, criterion=FindingFlip(None, "any"))
        fwd += res.forward_passes
        bwd += res.backward_passes
        adv = res.adversarial.detach()
        each = np.zeros((n, f), dtype=bool)
        if not job.large:
            for j in range(f):
                atk_j = spec.build(job.eps, job.norm, job.seed + 1 + j)
                r = atk_j(job.clf, x, y, criterion=FindingFlip(j))
                fwd += r.forward_passes
                bwd += r.backward_passes
                each[:, j] = (r.predictions[:, j] != y[:, j].cpu()).numpy()
        rec: dict[str, np.ndarray] = {
            "idx": idx.cpu().numpy().astype(np.int64),
            "pred": res.predictions.numpy().astype(np.int8),
            "success": res.success.numpy().astype(bool),
            "flipped_each": each,
            "linf": res.perturbation_norms["linf"].numpy().astype(np.float32),
            "l2": res.perturbation_norms["l2"].numpy().astype(np.float32),
            "psnr": psnr(x, adv, job.span).numpy().astype(np.float32),
            "ssim": ssim(x, adv, job.span).numpy().astype(np.float32),
            "cost_forward": np.array([fwd]), "cost_backward": np.array([bwd]),
            "time_s": np.array([time.perf_counter() - t0]),
        }
        return UnitOutput(rec, adv)


register_family(MultiLabelFamily())


def aggregate_multilabel(
    *, collected: Any, labels: np.ndarray, specs: list[AttackSpec], budgets: list[Budget],
    big: Budget | None, seed: int, names: list[str],
) -> dict[str, Any]:
    """The ``clean``, ``attacks`` and ``worst_case`` blocks of a multi-label evaluation."""
    y = np.asarray(labels, dtype=np.int64)
    n, f = y.shape
    clean = collected["clean|"]
    probs = clean["probs"].astype(np.float64)
    pred = clean["pred"].astype(np.int64)
    finding_ok = pred == y
    exact = finding_ok.all(1)
    auc = auc_medmnist(y, probs, "multi-label")
    lo, hi = bootstrap_auc_ci(y, probs, "multi-label", seed=seed)

    def findings(ok: np.ndarray) -> list[dict[str, Any]]:
        return [{"class": j, "name": names[j] if j < len(names) else str(j),
                 **Proportion.of(ok[:, j]).to_dict()} for j in range(f)]

    clean_block = {
        "n": n, "accuracy": Proportion.of(exact).to_dict(),
        "auc": {"value": auc, "ci_low": lo, "ci_high": hi,
                "method": "mean ROC AUC over findings (sigmoid scores); 95% CI: percentile "
                          "bootstrap, 1000 resamples"},
        "per_class": findings(finding_ok),
        "finding_accuracy": Proportion.of(finding_ok.reshape(-1)).to_dict(),
        "predicted_classes": pred.sum(0).tolist(),
    }

    def entry(b: Budget, rec: dict[str, np.ndarray]) -> tuple[dict[str, Any], np.ndarray,
                                                             np.ndarray]:
        idx = rec["idx"]
        attacked = np.zeros(n, dtype=bool)
        attacked[idx] = True
        adv_pred = pred.copy()
        adv_pred[idx] = rec["pred"]
        adv_exact = (adv_pred == y).all(1)
        robust = exact & adv_exact
        flipped = np.zeros((n, f), dtype=bool)
        flipped[idx] = rec["flipped_each"]
        per_finding = finding_ok & ~flipped
        fooled = exact & attacked & ~adv_exact
        stats = {}
        for name in STATS:
            v = np.full(n, np.nan)
            v[idx] = rec[name]
            stats[name] = v
        from medrobust.evaluation.metrics import summary_stats

        e = {
            "eps": b.value, "eps_label": b.label, "n": n, "n_attacked": int(attacked.sum()),
            "robust_accuracy": Proportion.of(robust).to_dict(),
            "raw_accuracy": Proportion.of(adv_exact).to_dict(),
            "success_on_correct": Proportion.of(~adv_exact, exact & attacked).to_dict(),
            "perturbation": {g: {k: summary_stats(v[m]) for k, v in stats.items()}
                             for g, m in (("successful", fooled), ("attacked", attacked))},
            "per_class": findings(per_finding),
            "cost": {"forward_passes": int(np.sum(rec["cost_forward"])),
                     "backward_passes": int(np.sum(rec["cost_backward"]))},
        }
        return e, robust, per_finding

    attacks: dict[str, Any] = {}
    timing: dict[str, Any] = {}
    robust_by: dict[str, list[np.ndarray]] = {b.key: [] for b in budgets}
    finding_by: dict[str, list[np.ndarray]] = {b.key: [] for b in budgets}
    for spec in specs:
        block: dict[str, Any] = {"key": spec.key, "kind": spec.kind, "single_step":
                                 spec.single_step, "gradient_free": spec.gradient_free,
                                 "per_eps": [], "large_eps": None}
        secs = 0.0
        for b in budgets + ([big] if big is not None else []):
            rec = collected[f"{spec.key}|{b.key}"]
            secs += float(np.sum(rec["time_s"]))
            e, robust, per_finding = entry(b, rec)
            if b is big:
                block["large_eps"] = e
                continue
            block["per_eps"].append(e)
            robust_by[b.key].append(robust)
            finding_by[b.key].append(per_finding)
        attacks[spec.name] = block
        timing[spec.name] = {"seconds": round(secs, 3)}
    worst = []
    for b in budgets:
        r = np.logical_and.reduce(robust_by[b.key])
        pf = np.logical_and.reduce(finding_by[b.key])
        worst.append({"eps": b.value, "eps_label": b.label, "n": n,
                      "robust_accuracy": Proportion.of(r).to_dict(),
                      "success_on_correct": Proportion.of(~r, exact).to_dict(),
                      "fooled_only_by": {}, "per_class": findings(pf)})
    return {"clean": clean_block, "attacks": attacks, "worst_case": worst, "timing": timing}


def clean_record_multilabel(logits: torch.Tensor) -> dict[str, np.ndarray]:
    """The clean pass of a multi-label batch: logits, sigmoid scores, 0/1 findings."""
    return {"probs": torch.sigmoid(logits).numpy().astype(np.float32),
            "pred": (logits > 0).numpy().astype(np.int8),
            "logits": logits.numpy().astype(np.float32)}
