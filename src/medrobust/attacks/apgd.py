"""Auto-PGD (APGD) and its targeted version APGD-T.

* Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
  parameter-free attacks", ICML 2020: APGD for L-inf and L2. PGD with momentum ``alpha = 0.75``
  whose step size starts at ``2 eps`` and is halved at checkpoints ``w_j = ceil(p_j N)``
  (``p_0 = 0``, ``p_1 = 0.22``, ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``) when either
  (1) the loss increased in fewer than ``rho = 0.75`` of the steps since the last checkpoint, or
  (2) the step was not reduced at the last checkpoint and the best loss has not improved since;
  after a reduction the iterate restarts from the best point found. Losses: cross-entropy, DLR and
  targeted DLR (:mod:`medrobust.criteria`); APGD-T runs the targeted DLR loss once per target class,
  the ``min(9, K - 1)`` classes with the highest clean logits after the top one, each run on the
  samples still robust.
* Croce & Hein, "Mind the box: l1-APGD for sparse adversarial attacks on image classifiers",
  ICML 2021: APGD-L1. The step moves the coordinates whose |gradient| is in the top ``k`` fraction
  (by sign, normalized to unit L1 norm); ``k`` adapts at checkpoints every ``0.04 N`` steps to the
  sparsity of the best point (``k = ||x_best - x||_0 / (1.5 d)``), the step size is divided by 1.5
  or reset to ``eps`` (when the sparsity fell by 5% or more), and every iterate is projected exactly
  onto the intersection of the L1 ball and the box. Optionally the large-eps schedule of the paper
  (``3 eps``, ``2 eps``, ``eps`` for 30/30/40% of the steps).

The implementation follows the reference code (``fra31/auto-attack``, ``autopgd_base.py``) step by
step, with these differences: bounds are the model's (any units, not [0, 1]); the eps may differ per
sample; a mask restricts the perturbation; the first oscillation window compares with the loss at
the starting point (the reference compares with an uninitialized zero); the L1 random start is a
Gaussian scaled by the bounds' span (the reference's unit Gaussian assumes [0, 1] inputs); and, with
``early_stop=True`` (default), a sample leaves the loop as soon as it is adversarial. The per-sample
step-size schedule makes this exact: the other samples' trajectories do not change.

Per sample the attack returns an adversarial iterate when it found one, else the iterate with the
highest loss. On a binary task (two classes) the DLR losses, which need three, are replaced by the
margin loss, with a warning and a note in ``result.extra["notes"]``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch

from medrobust.attacks.base import AttackContext, FixedBudgetAttack, RunOutput
from medrobust.attacks.gradient import _Best
from medrobust.criteria import dlr_fallback_note, dlr_targeted_loss
from medrobust.norms import Norm, batch_view, flat, get_norm

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def project_l1_box(v: torch.Tensor, x: torch.Tensor, eps: torch.Tensor, lo: float, hi: float
                   ) -> torch.Tensor:
    """Exact Euclidean projection of the perturbation ``v`` onto
    ``{d : ||d||_1 <= eps, lo <= x + d <= hi}``, per sample (Croce & Hein 2021, Lemma 1).

    The solution is ``sign(v) * clip(|v| - tau, 0, cap)`` with ``cap`` the room left by the box in
    the direction of ``v`` and ``tau >= 0`` the smallest value that meets the budget; ``tau`` is
    found exactly from the sorted breakpoints of this piecewise-linear function of ``tau``.
    Computed in float64."""
    dtype = v.dtype
    vf = flat(v).double()
    xf = flat(x).double()
    e = eps.double().to(vf.device)
    cap = torch.where(vf > 0, hi - xf, xf - lo).clamp_min(0.0)
    a = vf.abs()
    s0 = torch.minimum(a, cap).sum(1)
    need = s0 > e
    out = vf.sign() * torch.minimum(a, cap)
    if need.any():
        idx = need.nonzero().flatten()
        ai, ci, ei = a[idx], cap[idx], e[idx]
        # the sum S(tau) = sum clip(a - tau, 0, cap) falls with slope -1 for every coordinate with
        # a - cap < tau < a: events at a - cap (slope -1) and at a (slope +1)
        points = torch.cat([(ai - ci).clamp_min(0.0), ai], 1)
        weights = torch.cat([-torch.ones_like(ai), torch.ones_like(ai)], 1)
        order = points.argsort(1)
        p = points.gather(1, order)
        slope = weights.gather(1, order).cumsum(1)  # the slope just after each event
        gaps = p[:, 1:] - p[:, :-1]
        s = torch.cat([torch.zeros_like(p[:, :1]), (slope[:, :-1] * gaps).cumsum(1)], 1)
        s = s + s0[idx].unsqueeze(1)
        k = ((s >= ei.unsqueeze(1)).sum(1) - 1).clamp_min(0).unsqueeze(1)
        sk, pk, gk = s.gather(1, k), p.gather(1, k), slope.gather(1, k)
        tau = torch.where(gk < 0, pk + (sk - ei.unsqueeze(1)) / (-gk).clamp_min(1.0), pk)
        out[idx] = vf[idx].sign() * (ai - tau).clamp_min(0.0).clamp_max(ci)
    return out.view_as(v).to(dtype)


def checkpoints(steps: int, norm: str = "linf") -> list[int]:
    """The iterations (1-based counts of steps done) after which APGD checks its step size.

    L-inf / L2 (Croce & Hein 2020): ``w_j = p_j N`` with ``p_1 = 0.22`` and
    ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``, the lengths rounded down as in the
    reference code (``0.22 N``, then ``-0.03 N`` each time, at least ``0.06 N``; at least one step).
    L1 (Croce & Hein 2021): every ``0.04 N`` steps."""
    if norm == "l1":
        k = max(int(0.04 * steps), 1)
        return list(range(k, steps + 1, k))
    k, size_decr, k_min = max(int(0.22 * steps), 1), max(int(0.03 * steps), 1), max(
        int(0.06 * steps), 1)
    out, w = [], 0
    while w + k <= steps:
        w += k
        out.append(w)
        k = max(k - size_decr, k_min)
    return out


class _State:
    """Per-sample tensors of one APGD run, filtered together when samples leave the loop."""

    def __init__(self, **tensors: Any) -> None:
        self.t: dict[str, Any] = dict(tensors)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["t"][name]
        except KeyError:
            raise AttributeError(name) from None

    def set(self, **tensors: Any) -> None:
        self.t.update(tensors)

    def keep(self, rows: torch.Tensor) -> None:
        for k, v in self.t.items():
            if isinstance(v, torch.Tensor):
                self.t[k] = v[rows]
            elif isinstance(v, tuple):
                self.t[k] = tuple(u[rows] for u in v)


class APGD(FixedBudgetAttack):
    """Auto-PGD (Croce & Hein, ICML 2020; L1: Croce & Hein, ICML 2021).

    Args:
        eps: the budget in input units: a number, or one value per sample.
        norm: "linf", "l2" or "l1".
        steps: iterations per run ``N`` (paper: 100).
        restarts: runs from random starting points; later runs attack only samples not yet fooled
            (AutoAttack's APGD-CE: 1 for L-inf/L2, 5 for L1).
        loss: "ce" (APGD-CE), "dlr" (APGD-DLR), "margin"; with a target, "ce" is ``-CE(z, t)``
            and "dlr"/"dlr-targeted" the targeted DLR loss. On two classes DLR falls back to the
            margin loss (with a warning and a note in ``result.extra["notes"]``).
        rho: the oscillation threshold of the step-size checkpoints (paper: 0.75).
        momentum: ``alpha`` of the momentum step (paper: 0.75; the first step has none).
        eot_iter: gradients averaged per step (Expectation over Transformation, for randomized
            models; AutoAttack's "rand" version uses 20).
        early_stop: samples leave the loop as soon as they are adversarial (their result is then
            the first adversarial iterate); with False every sample runs all steps.
        large_eps_schedule: L1 only: the "Mind the box" schedule (3 eps, 2 eps, eps for 30%, 30%,
            40% of the steps, each stage starting from the best point of the previous one), as
            AutoAttack's L1 version uses.
        seed, generator: the randomness of the starting points.
    """

    name = "apgd"
    requires_gradients = True
    requires_scores = True
    supports_multilabel = True  # the loop uses only the criterion's loss and success test
    supports_dense = True  # dense criteria give per-voxel losses; the loop is generic

    def __init__(
        self,
        eps: float | torch.Tensor,
        norm: str | Norm = "linf",
        *,
        steps: int = 100,
        restarts: int = 1,
        loss: str = "ce",
        rho: float = 0.75,
        momentum: float = 0.75,
        eot_iter: int = 1,
        early_stop: bool = True,
        large_eps_schedule: bool = False,
        bpda: bool = False,
        eot: int = 1,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(eps, norm, loss=loss, seed=seed, generator=generator)
        _check_int("steps", steps)
        _check_int("eot", eot)
        # against a defended model (medrobust.defenses): BPDA through non-differentiable
        # defenses, and each gradient averaged over ``eot`` draws of a randomized one (Athalye
        # et al., ICML 2018); ``eot_iter`` is AutoAttack's own repetition of whole gradient steps
        self.bpda = bool(bpda)
        self.eot = eot
        _check_int("restarts", restarts)
        _check_int("eot_iter", eot_iter)
        if not 0.0 < rho < 1.0:
            raise ValueError(f"rho must lie in (0, 1); got {rho!r}")
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must lie in (0, 1] (1 = no momentum); got {momentum!r}")
        if large_eps_schedule and self.norm.name != "l1":
            raise ValueError("large_eps_schedule is defined for norm='l1' only (Croce & Hein 2021)")
        self.norm = get_norm(self.norm.name)  # APGD-L1 sets its own sparsity
        self.steps = steps
        self.restarts = restarts
        self.rho = float(rho)
        self.momentum = float(momentum)
        self.eot_iter = eot_iter
        self.early_stop = bool(early_stop)
        self.large_eps_schedule = bool(large_eps_schedule)

    @classmethod
    def fast_config(cls) -> dict[str, Any]:
        """Small settings for quick tests."""
        return {"steps": 5, "restarts": 2}

    # ------------------------------------------------------------------ run
    def run(self, ctx: AttackContext) -> RunOutput:
        x = ctx.x
        eps = self._budget(ctx.n, x.device).to(x.dtype)
        best, _ = self._start(ctx)
        loss_fn: LossFn = ctx.criterion.loss
        for _ in range(self.restarts):
            index = (~best.success).nonzero().flatten()
            if index.numel() == 0:
                break
            self._run_once(ctx, index, eps[index], loss_fn, best)
        return self._output(ctx, best, list(ctx.criterion.notes))

    def _start(self, ctx: AttackContext) -> tuple[_Best, torch.Tensor]:
        """The clean point as everyone's first candidate; returns the clean logits too."""
        best = _Best(ctx.x, ctx.num_classes)
        logits = ctx.logits(ctx.x)
        index = ctx.all_index()
        success = ctx.is_adversarial(logits, index)
        no_loss = torch.full_like(success, float("-inf"), dtype=ctx.x.dtype)
        best.update(index, ctx.x, logits, no_loss, success)
        return best, logits

    def _output(self, ctx: AttackContext, best: _Best, notes: list[str]) -> RunOutput:
        extra: dict[str, Any] = {"loss": best.loss.cpu()}
        if notes:
            extra["notes"] = notes
        return RunOutput(best.adv, best.logits, extra=extra)

    def _run_once(self, ctx: AttackContext, index: torch.Tensor, eps: torch.Tensor,
                  loss_fn: LossFn, best: _Best) -> None:
        if not self.large_eps_schedule:
            self._apgd(ctx, index, eps, loss_fn, best, self.steps)
            return
        # "Mind the box": 3 eps, 2 eps, eps; only the last stage (within eps) counts
        n = self.steps
        iters = [math.ceil(0.3 * n), math.ceil(0.3 * n)]
        iters.append(max(n - sum(iters), 1))
        x = ctx.x[index]
        lo, hi = ctx.bounds
        span = hi - lo
        v = torch.randn(x.shape, generator=ctx.generator).to(x.device, x.dtype) * span
        x_init = x + ctx.masked(project_l1_box(ctx.masked(v, index), x, 3 * eps, lo, hi), index)
        for factor, steps in zip((3.0, 2.0, 1.0), iters, strict=True):
            e = factor * eps
            x_init = x + project_l1_box(x_init - x, x, e, lo, hi)
            x_init = self._apgd(ctx, index, e, loss_fn, best, steps, x_init=x_init,
                                record=factor == 1.0)

    def _grad(self, ctx: AttackContext, xa: torch.Tensor, index: torch.Tensor, loss_fn: LossFn
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, loss, grad = ctx.value_and_grad(xa, index, loss_fn)
        for _ in range(self.eot_iter - 1):
            logits, loss, g = ctx.value_and_grad(xa, index, loss_fn)
            grad = grad + g
        if self.eot_iter > 1:
            grad = grad / self.eot_iter
        return logits, loss, ctx.masked(grad, index)

    def _random_start(self, ctx: AttackContext, x: torch.Tensor, index: torch.Tensor,
                      eps: torch.Tensor) -> torch.Tensor:
        lo, hi = ctx.bounds
        e = batch_view(eps, x)
        if self.norm.name == "linf":
            t = ctx.masked(2 * ctx.rand(*x.shape).to(x.dtype) - 1, index)
            t = t / batch_view(flat(t).abs().amax(1).clamp_min(1e-12), t)
            return ctx.clip(x + e * t)
        if self.norm.name == "l2":
            t = ctx.masked(ctx.randn(*x.shape).to(x.dtype), index)
            t = t / batch_view(flat(t).norm(dim=1).clamp_min(1e-12), t)
            return ctx.clip(x + e * t)
        t = ctx.masked(ctx.randn(*x.shape).to(x.dtype) * (hi - lo), index)
        return x + project_l1_box(t, x, eps, lo, hi)

    def _apgd(self, ctx: AttackContext, index: torch.Tensor, eps: torch.Tensor, loss_fn: LossFn,
              best: _Best, steps: int, x_init: torch.Tensor | None = None, record: bool = True
              ) -> torch.Tensor:
        """One APGD run on the rows ``index``; updates ``best`` (when ``record``) and returns the
        highest-loss point of every row (the next stage's start in the large-eps schedule)."""
        x_all = ctx.x[index]
        lo, hi = ctx.bounds
        norm = self.norm.name
        out = x_all.clone()
        xa = self._random_start(ctx, x_all, index, eps) if x_init is None else x_init.clone()
        logits, loss, grad = self._grad(ctx, xa, index, loss_fn)
        success = ctx.is_adversarial(logits, index)
        if record:
            best.update(index, xa, logits, loss, success)
        e = batch_view(eps, x_all)
        box = ((x_all - e).clamp_min(lo), (x_all + e).clamp_max(hi)) if norm == "linf" else None
        alpha = 1.0 if norm == "l1" else 2.0
        n_fts = int(x_all[0].numel())
        st = _State(
            rows=torch.arange(index.numel(), device=x_all.device), index=index, x=x_all, eps=eps,
            box=box, xa=xa, xa_old=xa.clone(), grad=grad, grad_best=grad.clone(),
            x_best=xa.clone(), loss_best=loss.clone(), prev_loss=loss.clone(),
            step=alpha * eps.clone(), n_incr=torch.zeros_like(loss),
            reduced_last=torch.ones_like(loss, dtype=torch.bool), loss_best_last=loss.clone(),
            topk=torch.full_like(loss, 0.2), sp_old=torch.full_like(loss, float(n_fts)),
        )
        if self.early_stop and record and success.any():
            out[st.rows[success]] = xa[success]
            st.keep(~success)
        marks = checkpoints(steps, norm)
        last = 0  # the previous checkpoint
        for i in range(steps):
            if st.rows.numel() == 0:
                break
            xa_new = self._step(st, i, ctx, lo, hi, n_fts)
            logits, loss, grad = self._grad(ctx, xa_new, st.index, loss_fn)
            success = ctx.is_adversarial(logits, st.index)
            if record:
                best.update(st.index, xa_new, logits, loss, success)
            improved = loss > st.loss_best
            x_best = torch.where(batch_view(improved, xa_new), xa_new, st.x_best)
            grad_best = torch.where(batch_view(improved, grad), grad, st.grad_best)
            loss_best = torch.where(improved, loss, st.loss_best)
            n_incr = st.n_incr + (loss > st.prev_loss).to(loss.dtype)
            st.set(xa_old=st.xa, xa=xa_new, grad=grad, x_best=x_best, grad_best=grad_best,
                   loss_best=loss_best, n_incr=n_incr, prev_loss=loss)
            if i + 1 in marks:
                if norm == "l1":
                    self._checkpoint_l1(st, alpha, n_fts)
                else:
                    self._checkpoint(st, i + 1 - last)
                last = i + 1
                st.n_incr.zero_()
            if self.early_stop and record and success.any():
                out[st.rows[success]] = xa_new[success]
                st.keep(~success)
        if st.rows.numel():
            out[st.rows] = st.x_best
        return out

    def _step(self, st: _State, i: int, ctx: AttackContext, lo: float, hi: float, n_fts: int
              ) -> torch.Tensor:
        x, xa, grad = st.x, st.xa, st.grad
        step = batch_view(st.step, x)
        norm = self.norm.name
        if norm == "l1":
            g = flat(grad)
            sorted_abs = g.abs().sort(1).values
            pos = ((1.0 - st.topk) * n_fts).clamp(0, n_fts - 1).long().unsqueeze(1)
            thr = sorted_abs.gather(1, pos)
            sparse = (g.sign() * (g.abs() >= thr)).view_as(grad)
            l1 = batch_view(flat(sparse).abs().sum(1), x)
            z = xa + step * sparse / (l1 + 1e-10)
            return x + project_l1_box(z - x, x, st.eps, lo, hi)
        a = self.momentum if i > 0 else 1.0
        momentum = xa - st.xa_old
        if norm == "linf":
            lo_box, hi_box = st.box
            z = torch.minimum(torch.maximum(xa + step * grad.sign(), lo_box), hi_box)
            z = xa + (z - xa) * a + momentum * (1 - a)
            return torch.minimum(torch.maximum(z, lo_box), hi_box)
        z = xa + step * grad / batch_view(flat(grad).norm(dim=1).clamp_min(1e-12), grad)
        z = ctx.clip(x + self.norm.project(z - x, st.eps))
        z = xa + (z - xa) * a + momentum * (1 - a)
        return ctx.clip(x + self.norm.project(z - x, st.eps))

    def _checkpoint(self, st: _State, k: int) -> None:
        """Halve the step where (1) the loss rose in at most ``rho * k`` of the last ``k`` steps or
        (2) the step was not halved last time and the best loss did not improve since."""
        oscillating = st.n_incr <= k * self.rho
        stalled = (~st.reduced_last) & (st.loss_best_last >= st.loss_best)
        reduce = oscillating | stalled
        st.set(reduced_last=reduce, loss_best_last=st.loss_best.clone())
        if reduce.any():
            r = batch_view(reduce, st.xa)
            st.set(step=torch.where(reduce, st.step / 2, st.step),
                   xa=torch.where(r, st.x_best, st.xa),
                   grad=torch.where(r, st.grad_best, st.grad))

    def _checkpoint_l1(self, st: _State, alpha: float, n_fts: int) -> None:
        """Mind the box: adapt the sparsity ``k`` and the step size to the best point so far."""
        sp = flat(st.x_best - st.x).ne(0).sum(1).to(st.step.dtype)
        fell = (sp / st.sp_old.clamp_min(1.0)) < 0.95
        full = alpha * st.eps
        step = torch.where(fell, full, st.step / 1.5)
        step = torch.minimum(torch.maximum(step, full / 10.0), full)
        r = batch_view(fell, st.xa)
        st.set(topk=sp / n_fts / 1.5, sp_old=sp, step=step,
               xa=torch.where(r, st.x_best, st.xa), grad=torch.where(r, st.grad_best, st.grad))


class APGDT(APGD):
    """APGD-T (Croce & Hein, ICML 2020): APGD on the targeted DLR loss, run once per target class.

    Called without ``target`` (its use in AutoAttack), the goal is misclassification and the targets
    are, per sample, the classes with the 2nd, 3rd, ... highest clean logits, up to
    ``min(n_target_classes, K - 1)`` of them; each target's run (``restarts`` runs) attacks only the
    samples still robust. Called with ``target``, it runs APGD on the targeted DLR loss towards that
    target (success = predicted as the target). On a binary task the single other class is the
    target and the margin loss ``z_t - z_y`` replaces the DLR loss (warned, and noted in
    ``result.extra["notes"]``).

    Args: as :class:`APGD` (the loss is fixed), plus ``n_target_classes`` (paper: 9).
    """

    name = "apgd-t"
    supports_multilabel = False  # targets are ranked classes

    def __init__(
        self,
        eps: float | torch.Tensor,
        norm: str | Norm = "linf",
        *,
        steps: int = 100,
        restarts: int = 1,
        n_target_classes: int = 9,
        rho: float = 0.75,
        momentum: float = 0.75,
        eot_iter: int = 1,
        early_stop: bool = True,
        large_eps_schedule: bool = False,
        bpda: bool = False,
        eot: int = 1,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        # "dlr" under a target is the targeted DLR loss (criteria.TargetedMisclassification)
        super().__init__(eps, norm, steps=steps, restarts=restarts, loss="dlr", rho=rho,
                         momentum=momentum, eot_iter=eot_iter, early_stop=early_stop,
                         large_eps_schedule=large_eps_schedule, bpda=bpda, eot=eot, seed=seed,
                         generator=generator)
        _check_int("n_target_classes", n_target_classes)
        self.n_target_classes = n_target_classes

    @classmethod
    def fast_config(cls) -> dict[str, Any]:
        return {"steps": 5, "n_target_classes": 2}

    def run(self, ctx: AttackContext) -> RunOutput:
        if ctx.targeted:
            return super().run(ctx)
        x = ctx.x
        eps = self._budget(ctx.n, x.device).to(x.dtype)
        best, clean_logits = self._start(ctx)
        k = ctx.num_classes
        notes: list[str] = []
        if k < 3:
            notes.append(dlr_fallback_note(k))
            warnings.warn(notes[-1], stacklevel=2)
        order = clean_logits.argsort(1, descending=True)
        y = ctx.labels
        for rank in range(1, min(self.n_target_classes, k - 1) + 1):
            # (a tie in the clean logits could rank the label below ``rank``)
            target = torch.where(order[:, rank] == y, order[:, 0], order[:, rank])
            loss_fn = _targeted_loss(y, target, k)
            for _ in range(self.restarts):
                index = (~best.success).nonzero().flatten()
                if index.numel() == 0:
                    return self._output(ctx, best, notes)
                self._run_once(ctx, index, eps[index], loss_fn, best)
        return self._output(ctx, best, notes)


def _targeted_loss(labels: torch.Tensor, target: torch.Tensor, num_classes: int) -> LossFn:
    """The targeted DLR loss towards ``target`` (the margin ``z_t - z_y`` on two classes)."""

    def loss(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        y, t = labels[index], target[index]
        if num_classes < 3:
            zy = logits.gather(1, y.unsqueeze(1)).squeeze(1)
            zt = logits.gather(1, t.unsqueeze(1)).squeeze(1)
            return zt - zy
        return dlr_targeted_loss(logits, y, t)

    return loss


def _check_int(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive integer; got {v!r}")


__all__ = ["APGD", "APGDT", "checkpoints", "project_l1_box"]
