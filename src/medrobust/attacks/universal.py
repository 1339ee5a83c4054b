"""Universal adversarial perturbations: one perturbation that fools a model on most inputs.

* ``method="deepfool"`` — Moosavi-Dezfooli, Fawzi, Fawzi & Frossard, "Universal adversarial
  perturbations", CVPR 2017 (Algorithm 1): passes over the data in random order; for every input
  ``x_i`` that ``x_i + v`` does not fool yet, DeepFool's minimal perturbation ``dv_i`` sending
  ``x_i + v`` across the nearest (linearized) decision boundary is added and the sum projected
  back onto the eps-ball, ``v <- P_{p,eps}(v + dv_i)``; it stops once the fooling rate on the data
  reaches ``1 - delta`` or after ``max_passes`` passes. Targeted: the DeepFool step goes towards the
  target class's boundary (the linearized distance to ``z_t = max_{j != t} z_j``).
* ``method="sgd"`` — the batched stochastic-gradient variant of Shafahi, Najibi, Xu, Dickerson,
  Davis & Goldstein, "Universal Adversarial Training", AAAI 2020 (Algorithm 2): mini-batch
  ascent on the loss of ``x + v`` summed over the batch (cross-entropy clipped at ``beta`` so
  that samples already fooled stop pulling), steepest-ascent steps under the norm, projection.

:meth:`UniversalPerturbation.fit` returns a :class:`Universal` (``.perturbation``, ``.apply``,
``.fooling_rate`` on held-out inputs, ``save`` / ``Universal.load`` as safetensors). Called as an
attack, it fits on the batch it is given (one perturbation per target class when targeted) and
returns the batch with it added; the mask, if any, is the region allowed in *every* sample.
The fooling rate (the paper's) is the fraction of inputs whose predicted class changes; success
in an :class:`~medrobust.results.AttackResult` is measured against the labels as for every attack.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medrobust.attacks.base import AttackContext, FixedBudgetAttack, RunOutput
from medrobust.attacks.deepfool import _candidate_gradients
from medrobust.models.base import Model
from medrobust.norms import Linf, Norm, batch_view

METHODS = ("deepfool", "sgd")
FORMAT = "medrobust-universal"

__all__ = ["METHODS", "Universal", "UniversalPerturbation"]


@dataclass
class Universal:
    """A fitted universal perturbation.

    Attributes:
        perturbation: ``(1, C, *spatial)``, inside the eps-ball.
        eps, norm: its budget.
        bounds: the inputs' bounds (applied inputs are clipped to them).
        target: the target class of a targeted perturbation, else ``None``.
        info: how it was fitted (method, passes, fooling rate on the fitting data, cost).
    """

    perturbation: torch.Tensor
    eps: float
    norm: str
    bounds: tuple[float, float]
    target: int | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def apply(self, inputs: torch.Tensor) -> torch.Tensor:
        """``clip(inputs + perturbation)`` (a new tensor)."""
        if tuple(inputs.shape[1:]) != tuple(self.perturbation.shape[1:]):
            raise ValueError(
                f"inputs of shape {tuple(inputs.shape)} do not match the perturbation's "
                f"{tuple(self.perturbation.shape[1:])} (per sample)"
            )
        v = self.perturbation.to(inputs.device, inputs.dtype)
        return (inputs + v).clamp(*self.bounds)

    def fooling_rate(self, model: Model, inputs: torch.Tensor) -> float:
        """Untargeted: fraction of ``inputs`` whose predicted class changes (the paper's
        definition); targeted: fraction classified as the target."""
        pred = model.predict(self.apply(inputs))
        if self.target is not None:
            return float((pred == self.target).float().mean())
        return float((pred != model.predict(inputs)).float().mean())

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write a ``.safetensors`` file (the tensor; the rest as JSON metadata)."""
        from safetensors.torch import save_file

        p = Path(path)
        meta = {"format": FORMAT, "eps": repr(self.eps), "norm": self.norm,
                "bounds": json.dumps(list(self.bounds)),
                "target": "" if self.target is None else str(self.target),
                "info": json.dumps(self.info, default=str)}
        save_file({"perturbation": self.perturbation.detach().cpu().contiguous()}, str(p),
                  metadata=meta)
        return p

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Universal:
        """Read a file written by :meth:`save` (tensors only; nothing is unpickled)."""
        from safetensors import SafetensorError, safe_open

        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such universal-perturbation file")
        try:
            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT or "perturbation" not in f.keys():  # noqa: SIM118
                    raise ValueError(f"{p}: not a medrobust universal perturbation "
                                     f"(format {meta.get('format')!r})")
                v = f.get_tensor("perturbation")
            bounds = json.loads(meta["bounds"])
            return cls(v, float(meta["eps"]), meta["norm"], (float(bounds[0]), float(bounds[1])),
                       int(meta["target"]) if meta.get("target") else None,
                       json.loads(meta.get("info", "{}")))
        except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as err:
            raise ValueError(f"{p}: corrupt universal-perturbation file ({err})") from None


class UniversalPerturbation(FixedBudgetAttack):
    """Universal adversarial perturbation (Moosavi-Dezfooli et al., CVPR 2017; SGD variant of
    Shafahi et al., AAAI 2020).

    Args:
        eps, norm: the budget of the single perturbation (``"linf"``, ``"l2"`` or ``"l1"``); with
            one eps per sample the smallest applies (one perturbation must fit every budget).
        method: ``"deepfool"`` (the paper's Algorithm 1) or ``"sgd"``.
        delta: stop once the fooling rate on the data is at least ``1 - delta`` (paper: 0.2).
        max_passes: passes over the data (DeepFool) / epochs (SGD).
        overshoot, deepfool_steps: DeepFool's overshoot (0.02) and its iteration cap.
        batch_size, step_size, beta: the SGD variant's mini-batch, step (default ``eps / 10``) and
            the clip of the cross-entropy.
        seed, generator: the order of the data.
    """

    name = "universal"
    supports_multilabel = False

    def __init__(
        self,
        eps: float,
        norm: str | Norm = "linf",
        *,
        method: str = "deepfool",
        delta: float = 0.2,
        max_passes: int = 10,
        overshoot: float = 0.02,
        deepfool_steps: int = 10,
        batch_size: int = 32,
        step_size: float | None = None,
        beta: float = 9.0,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(eps, norm, seed=seed, generator=generator)
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}; got {method!r}")
        if not 0 <= delta < 1:
            raise ValueError(f"delta must lie in [0, 1); got {delta!r}")
        for name, v in (("max_passes", max_passes), ("deepfool_steps", deepfool_steps),
                        ("batch_size", batch_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer; got {v!r}")
        if step_size is not None and not step_size > 0:
            raise ValueError(f"step_size must be > 0; got {step_size!r}")
        self.method = method
        self.delta = float(delta)
        self.max_passes = max_passes
        self.overshoot = float(overshoot)
        self.deepfool_steps = deepfool_steps
        self.batch_size = batch_size
        self.step_size = step_size
        self.beta = float(beta)

    # ------------------------------------------------------------------ public
    def fit(self, model: Model, inputs: torch.Tensor, labels: Any,
            target: int | None = None) -> Universal:
        """Fit one perturbation on ``inputs`` (their ``labels``; towards class ``target``)."""
        if not isinstance(model, Model):
            raise TypeError(f"model must be a medrobust model; got {type(model).__name__}")
        from medrobust.attacks.base import _new_generator
        from medrobust.models.base import check_capabilities

        check_capabilities(self, model)
        model.check_inputs(inputs)
        n = int(inputs.shape[0])
        y = model.check_labels(labels, n)
        t = None if target is None else torch.full((n,), int(target), dtype=torch.long)
        x = inputs.detach().to(model.device, model.work_dtype)
        gen, _ = _new_generator(self.seed, self.generator)
        with model.attack_mode():
            k, spent = model.num_outputs(x)
            if t is not None:
                model.check_label_values(y, None, k)
                if not 0 <= int(target) < k:  # type: ignore[arg-type]
                    raise ValueError(f"target must lie in [0, {k - 1}]; got {target}")
            else:
                model.check_label_values(y, None, k)
            crit = model.default_criterion(t is not None).bind(
                y.to(x.device), None if t is None else t.to(x.device), self.loss)
            ctx = AttackContext(model, x, y.to(x.device), None if t is None else t.to(x.device),
                                crit, None, k, gen)
            ctx.forward_passes = spent
            v, info = self._fit(ctx, ctx.all_index())
        return Universal(v.cpu(), self._eps(), self.norm.name, model.bounds, target, info)

    def run(self, ctx: AttackContext) -> RunOutput:
        adv = ctx.x.clone()
        infos = []
        groups = [None] if ctx.target is None else sorted(set(ctx.target.tolist()))
        for g in groups:
            idx = ctx.all_index() if g is None else (ctx.target == g).nonzero().flatten()
            v, info = self._fit(ctx, idx)
            adv[idx] = ctx.clip(ctx.x[idx] + v)
            infos.append({"target": g, **info})
        return RunOutput(adv, None, extra={"universal": infos})

    # ------------------------------------------------------------------ fitting
    def _region(self, ctx: AttackContext, idx: torch.Tensor) -> torch.Tensor | None:
        if ctx.mask is None:
            return None
        return (ctx.mask[idx] != 0).all(0, keepdim=True).to(ctx.x.dtype)

    def _eps(self) -> float:
        e = self.eps
        return float(e.min()) if isinstance(e, torch.Tensor) else float(e)

    def _project(self, v: torch.Tensor, region: torch.Tensor | None) -> torch.Tensor:
        if region is not None:
            v = v * region
        eps = torch.full((1,), self._eps(), device=v.device, dtype=v.dtype)
        return self.norm.project(v, eps)

    def _fooled(self, ctx: AttackContext, idx: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = ctx.logits(ctx.clip(ctx.x[idx] + v))
        return ctx.is_adversarial(out, idx)

    def _fit(self, ctx: AttackContext, idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        v = torch.zeros((1, *ctx.x.shape[1:]), device=ctx.x.device, dtype=ctx.x.dtype)
        region = self._region(ctx, idx)
        fit = self._fit_deepfool if self.method == "deepfool" else self._fit_sgd
        v, passes = fit(ctx, idx, v, region)
        rate = float(self._fooled(ctx, idx, v).float().mean())
        return v, {"method": self.method, "passes": passes, "fooling_rate_fit": rate,
                   "n_fit": int(idx.numel()), "forward_passes": ctx.forward_passes,
                   "backward_passes": ctx.backward_passes}

    def _deepfool(self, ctx: AttackContext, idx: torch.Tensor, xv: torch.Tensor,
                  region: torch.Tensor | None) -> torch.Tensor:
        """DeepFool's minimal perturbation for the inputs ``xv`` (rows ``idx``), towards the
        criterion's goal, with the paper's overshoot."""
        linf = isinstance(self.norm, Linf)
        l1 = self.norm.name == "l1"
        r_tot = torch.zeros_like(xv)
        k = ctx.num_classes
        active = torch.ones(idx.numel(), dtype=torch.bool, device=xv.device)
        for _ in range(self.deepfool_steps):
            a = active.nonzero().flatten()
            if a.numel() == 0:
                break
            cur = ctx.clip(xv[a] + (1 + self.overshoot) * r_tot[a])
            logits = ctx.logits(cur)
            done = ctx.is_adversarial(logits, idx[a])
            active[a[done]] = False
            a, logits, cur = a[~done], logits[~done], cur[~done]
            if a.numel() == 0:
                break
            top = logits.argmax(1)
            if ctx.target is None:
                others = torch.arange(k, device=xv.device).expand(a.numel(), k)
                rest = others[others != top[:, None]].view(a.numel(), k - 1)
                cand = torch.cat([top[:, None], rest], 1)
            else:
                cand = torch.stack([top, ctx.target[idx[a]]], 1)
            _, f, w = _candidate_gradients(ctx, cur, cand)
            if region is not None:
                w = w * region.unsqueeze(1)
            wf = w.flatten(2)
            # the dual norm of the budget's: L1 for L-inf, L2 for L2, L-inf for L1
            wn = wf.abs().sum(2) if linf else (wf.abs().amax(2) if l1 else wf.norm(dim=2))
            dist = torch.where(wn > 0, f.abs() / (wn + 1e-8), torch.full_like(f, math.inf))
            best = dist.argmin(1)
            rows = torch.arange(a.numel(), device=xv.device)
            fl, wl = f[rows, best].abs(), w[rows, best]
            nl = wn[rows, best].clamp_min(1e-12)
            if linf:
                r = batch_view((fl + 1e-4) / nl, wl) * wl.sign()
            elif l1:  # the single coordinate with the largest gradient
                top1 = wl.flatten(1).abs().argmax(1)
                one = torch.zeros_like(wl.flatten(1))
                one[torch.arange(a.numel()), top1] = 1
                r = batch_view((fl + 1e-4) / nl, wl) * (wl.sign() * one.view_as(wl))
            else:
                r = batch_view((fl + 1e-4) / nl**2, wl) * wl
            r_tot[a] = r_tot[a] + r
        return (1 + self.overshoot) * r_tot

    def _fit_deepfool(self, ctx: AttackContext, idx: torch.Tensor, v: torch.Tensor,
                      region: torch.Tensor | None) -> tuple[torch.Tensor, int]:
        passes = 0
        for passes in range(1, self.max_passes + 1):  # noqa: B007
            order = idx[torch.randperm(idx.numel(), generator=ctx.generator).to(idx.device)]
            for i in order:
                one = i.view(1)
                if bool(self._fooled(ctx, one, v).all()):
                    continue
                dv = self._deepfool(ctx, one, ctx.x[one] + v, region)
                v = self._project(v + dv, region)
            if float(self._fooled(ctx, idx, v).float().mean()) >= 1 - self.delta:
                break
        return v, passes

    def _fit_sgd(self, ctx: AttackContext, idx: torch.Tensor, v: torch.Tensor,
                 region: torch.Tensor | None) -> tuple[torch.Tensor, int]:
        alpha = self.step_size if self.step_size is not None else self._eps() / 10
        passes = 0
        beta = self.beta

        def clipped(out: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
            return ctx.criterion.loss(out, i).clamp_max(beta)

        for passes in range(1, self.max_passes + 1):  # noqa: B007
            order = idx[torch.randperm(idx.numel(), generator=ctx.generator).to(idx.device)]
            for s in range(0, order.numel(), self.batch_size):
                b = order[s:s + self.batch_size]
                _, _, grad = ctx.value_and_grad(ctx.clip(ctx.x[b] + v), b, clipped)
                g = grad.sum(0, keepdim=True)
                if region is not None:
                    g = g * region
                v = self._project(v + alpha * self.norm.direction(g), region)
            if float(self._fooled(ctx, idx, v).float().mean()) >= 1 - self.delta:
                break
        return v, passes

