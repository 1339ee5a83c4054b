"""Single registered attacks: a fixed-budget attack is run once per budget; a minimum-norm attack
(DeepFool, C&W, ...) or one with another kind of budget (sparse, spatial) is run once per batch and
judged against each budget by the norm of its perturbation (a sample counts as broken at ``eps``
when the attack succeeded with a perturbation of norm ``<= eps`` in the evaluation's norm)."""

from __future__ import annotations

import time

import numpy as np
import torch

from medrobust.evaluation.budgets import Budget
from medrobust.evaluation.families.base import (
    MIN_NORM_KEY,
    Family,
    UnitJob,
    UnitOutput,
    register_family,
)
from medrobust.evaluation.metrics import psnr, ssim
from medrobust.evaluation.specs import AttackSpec
from medrobust.norms import get_norm
from medrobust.results import AttackResult

__all__ = ["FixedBudgetFamily", "MinimumNormFamily", "empty_record", "result_record"]

STATS = ("linf", "l2", "psnr", "ssim")


def empty_record(minimization: bool) -> dict[str, np.ndarray]:
    empty_f = np.zeros(0, dtype=np.float32)
    out = {"idx": np.zeros(0, dtype=np.int64), "pred": np.zeros(0, dtype=np.int64),
           "success": np.zeros(0, dtype=bool), "linf": empty_f, "l2": empty_f,
           "psnr": empty_f, "ssim": empty_f,
           "cost_forward": np.zeros(1), "cost_backward": np.zeros(1), "time_s": np.zeros(1)}
    if minimization:
        out["dist"] = empty_f
    return out


def result_record(res: AttackResult, xa: torch.Tensor, idx: torch.Tensor, job: UnitJob,
                  seconds: float, minimization: bool) -> dict[str, np.ndarray]:
    """The per-sample vectors of one attack result on the rows ``idx`` of the batch."""
    adv = res.adversarial.detach()
    out = {
        "idx": idx.cpu().numpy().astype(np.int64),
        "pred": res.predictions.numpy().astype(np.int64),
        "success": res.success.numpy().astype(bool),
        "linf": res.perturbation_norms["linf"].numpy().astype(np.float32),
        "l2": res.perturbation_norms["l2"].numpy().astype(np.float32),
        "psnr": psnr(xa, adv, job.span).numpy().astype(np.float32),
        "ssim": ssim(xa, adv, job.span).numpy().astype(np.float32),
        "cost_forward": np.array([float(res.forward_passes)]),
        "cost_backward": np.array([float(res.backward_passes)]),
        "time_s": np.array([seconds]),
    }
    if minimization:
        out["dist"] = get_norm(job.norm).measure((adv - xa).double()).float().cpu().numpy()
    return out


class FixedBudgetFamily(Family):
    """A :class:`~medrobust.attacks.FixedBudgetAttack`: one unit per budget."""

    name = "fixed-budget"

    def run(self, spec: AttackSpec, job: UnitJob) -> UnitOutput:
        if job.idx.numel() == 0:
            return UnitOutput(empty_record(spec.minimization), job.x[:0])
        xa, ya = job.x[job.idx], job.y[job.idx]
        atk = spec.build(job.eps, job.norm, job.seed, large=job.large)
        t0 = time.perf_counter()
        res = atk(job.clf, xa, ya)
        rec = result_record(res, xa, job.idx, job, time.perf_counter() - t0, spec.minimization)
        return UnitOutput(rec, res.adversarial.detach())

    def vectors(self, spec: AttackSpec, rec: dict[str, np.ndarray], budget: Budget,
                clean_pred: np.ndarray) -> dict[str, np.ndarray]:
        n = clean_pred.shape[0]
        idx = rec["idx"].astype(np.int64)
        pred = clean_pred.copy()
        attacked = np.zeros(n, dtype=bool)
        attacked[idx] = True
        pred[idx] = rec["pred"]
        vec = {name: np.full(n, np.nan, dtype=np.float64) for name in STATS}
        for name in vec:
            vec[name][idx] = rec[name]
        return {"pred": pred, "attacked": attacked, **vec}


class MinimumNormFamily(FixedBudgetFamily):
    """A minimum-norm attack, or one with another kind of budget: one unit per batch for every
    budget, a sample broken at ``eps`` when the attack succeeded within ``eps``."""

    name = "minimum-norm"

    def units(self, spec: AttackSpec, budgets: list[Budget], big: Budget | None
              ) -> list[tuple[str, Budget | None]]:
        return [(MIN_NORM_KEY, None)]

    def unit_budget(self, spec: AttackSpec, budget: Budget) -> str:
        return MIN_NORM_KEY

    def vectors(self, spec: AttackSpec, rec: dict[str, np.ndarray], budget: Budget,
                clean_pred: np.ndarray) -> dict[str, np.ndarray]:
        n = clean_pred.shape[0]
        idx = rec["idx"].astype(np.int64)
        pred = clean_pred.copy()
        attacked = np.zeros(n, dtype=bool)
        attacked[idx] = True
        within = rec["success"] & (rec["dist"] <= budget.value * (1 + 1e-6) + 1e-12)
        pred[idx] = np.where(within, rec["pred"], clean_pred[idx])
        vec = {name: np.full(n, np.nan, dtype=np.float64) for name in STATS}
        for name in vec:
            vec[name][idx] = np.where(within, rec[name], np.nan)
        return {"pred": pred, "attacked": attacked, **vec}

    def block(self, spec: AttackSpec, collected: dict[str, dict[str, np.ndarray]],
              budgets: list[Budget], clean_correct: np.ndarray) -> dict[str, object]:
        from medrobust.evaluation.metrics import summary_stats

        rec = collected[f"{spec.key}|{MIN_NORM_KEY}"]
        # over the samples correct when clean that the attack broke: never the zeros of samples
        # already misclassified, never the distances of failures
        ok = rec["success"] & clean_correct[rec["idx"]]
        return {"distance": summary_stats(np.where(ok, rec["dist"], np.nan))}


class UnboundedFamily(MinimumNormFamily):
    """An attack with another kind of budget (sparse, spatial): judged like a minimum-norm one."""

    name = "unbounded"


register_family(FixedBudgetFamily())
register_family(MinimumNormFamily())
register_family(UnboundedFamily())
