"""Attack ensembles run in sequence, as AutoAttack (Croce & Hein, "Reliable evaluation of
adversarial robustness with an ensemble of diverse parameter-free attacks", ICML 2020) runs them:
each attack only sees the samples still robust after the attacks before it, a sample counts as
broken by the first attack that breaks it (recorded per sample), and the result is the per-sample
worst case over the components.

Presets (:data:`PRESETS`, extend with :func:`register_preset`):

* ``standard`` — L-inf and L2: APGD-CE; APGD-T (targeted DLR over the top ``min(9, K - 1)``
  classes; with fewer than 4 classes, where the targeted DLR loss is undefined, the margin loss,
  i.e. on K = 2 the single other class with the margin loss); FAB-T (same targets); Square (5000
  queries). L1: APGD-CE, APGD-T and FAB-T under L1 (Croce & Hein, "Mind the box", NeurIPS 2021,
  for APGD-L1).
* ``standard-rand`` — for randomized models: APGD-CE and APGD-DLR with Expectation over
  Transformation over 20 draws (``eot=20``, passed when the attack takes it; otherwise the preset
  says so in ``notes``).
* ``plus`` — more restarts (5) for APGD-CE, APGD-DLR, FAB and Square, then APGD-T, FAB-T and a
  targeted Square over the top 9 classes, as AutoAttack's "plus" version.

Targeted components are run once per target rank (the ``r``-th most likely class of the clean
logits), each on the samples still robust, as AutoAttack's ``n_target_classes`` loop. A minimum-norm
component (FAB) breaks a sample at ``eps`` only when its perturbation is within ``eps``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from medrobust.attacks import ATTACKS, Attack, FixedBudgetAttack
from medrobust.evaluation.budgets import Budget
from medrobust.evaluation.errors import EvaluationError
from medrobust.evaluation.families.base import (
    UnitJob,
    UnitOutput,
    register_family,
    whole_range_budget,
)
from medrobust.evaluation.families.single import STATS, FixedBudgetFamily, empty_record
from medrobust.evaluation.metrics import Proportion, psnr, ssim
from medrobust.evaluation.specs import AttackSpec, build_attack
from medrobust.evaluation.util import accepts, jsonable, sha256_json, unit_seed
from medrobust.norms import get_norm, measure_all

__all__ = [
    "FALLBACK",
    "PRESETS",
    "Component",
    "ComponentDef",
    "EnsembleFamily",
    "EnsembleSpec",
    "build_ensemble_spec",
    "register_preset",
]


@dataclass(frozen=True)
class ComponentDef:
    """One attack of a preset: a label, the registered attack, its arguments, and the number of
    top classes to target in turn (0: untargeted)."""

    label: str
    attack: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    targets: int = 0


Preset = Callable[[str, int], list[ComponentDef]]
"""``preset(norm, num_classes) -> components``."""


def _norm_key(name: str) -> str:
    return name.strip().lower().replace("-", "").replace("_", "")


def _standard(norm: str, k: int) -> list[ComponentDef]:
    nt = min(9, k - 1)
    comps = [
        ComponentDef("apgd-ce", "apgd", {"loss": "ce"}),
        ComponentDef("apgd-t", "apgd-t", {"loss": "dlr-targeted"}, targets=nt),
        ComponentDef("fab-t", "fab-t", {}, targets=nt),
    ]
    if norm != "l1":
        comps.append(ComponentDef("square", "square", {"queries": 5000}))
    return comps


def _standard_rand(norm: str, k: int) -> list[ComponentDef]:
    return [
        ComponentDef("apgd-ce", "apgd", {"loss": "ce", "eot": 20}),
        ComponentDef("apgd-dlr", "apgd", {"loss": "dlr", "eot": 20}),
    ]


def _plus(norm: str, k: int) -> list[ComponentDef]:
    nt = min(9, k - 1)
    comps = [
        ComponentDef("apgd-ce", "apgd", {"loss": "ce", "restarts": 5}),
        ComponentDef("apgd-dlr", "apgd", {"loss": "dlr", "restarts": 5}),
        ComponentDef("fab", "fab", {"restarts": 5}),
    ]
    if norm != "l1":
        comps.append(ComponentDef("square", "square", {"queries": 5000, "restarts": 5}))
    comps += [
        ComponentDef("apgd-t", "apgd-t", {"loss": "dlr-targeted"}, targets=nt),
        ComponentDef("fab-t", "fab-t", {}, targets=nt),
    ]
    if norm != "l1":
        comps.append(ComponentDef("square-t", "square", {"queries": 5000}, targets=nt))
    return comps


def _fallback(norm: str, k: int) -> list[ComponentDef]:
    """What the engine runs when a sanity check fails and the attacks asked for hold no
    alternative that sidesteps gradient masking: a margin/DLR-loss gradient attack (scale-free,
    unlike CE on saturated logits) and, when registered, the gradient-free Square."""
    comps = [ComponentDef("apgd-dlr", "apgd", {"loss": "dlr"}) if "apgd" in ATTACKS
             else ComponentDef("pgd-margin", "pgd", {"loss": "margin", "restarts": 2})]
    if "square" in ATTACKS and norm != "l1":
        comps.append(ComponentDef("square", "square", {"queries": 5000}))
    return comps


PRESETS: dict[str, Preset] = {
    "standard": _standard,
    "standardrand": _standard_rand,
    "plus": _plus,
}
FALLBACK = "masking-fallback"
_FALLBACK_PRESETS: dict[str, Preset] = {"maskingfallback": _fallback}
"""Ensemble presets by normalized name (case, ``-`` and ``_`` ignored)."""


def register_preset(name: str, preset: Preset) -> None:
    """Make an ensemble available to ``evaluate(attacks=name)``."""
    PRESETS[_norm_key(name)] = preset


def is_preset(name: str) -> bool:
    """A preset's name, or a preset's name with ``-fast`` (reduced steps and queries: each
    component's ``fast_config()``, for tests and quick looks — not for numbers to quote)."""
    key = _norm_key(name)
    return key in PRESETS or (key.endswith("fast") and key[:-4] in PRESETS)


@dataclass
class Component:
    """A resolved component: the attack class and its arguments for this evaluation."""

    label: str
    attack: str
    cls: type[Attack]
    kwargs: dict[str, Any]
    targets: int
    minimization: bool
    gradient_free: bool
    loops_targets: bool = False
    """The attack loops over the top classes itself (``n_target_classes``, as APGD-T and FAB-T
    do): it is called untargeted, once."""

    def build(self, eps: float | None, norm: str, seed: int, large: bool = False,
              large_step: float | None = None) -> Attack:
        kw = dict(self.kwargs)
        if self.minimization and eps is not None and eps > 0 and accepts(self.cls, "eps"):
            kw["eps"] = float(eps)  # FAB with a budget: stop a sample once broken within it
        return build_attack(self.cls, kw, eps, norm, seed, self.minimization, False,
                            large_step, large)


@dataclass
class EnsembleSpec(AttackSpec):
    """An ensemble: its components, run in sequence on the samples still robust."""

    components: list[Component] = field(default_factory=list)

    def build(self, eps: float | None, norm: str, seed: int, large: bool = False,
              **override: Any) -> Attack:
        raise TypeError("an ensemble is run by its family, not built as one attack")

    def describe(self, norm: str) -> dict[str, Any]:
        comps = []
        for c in self.components:
            cfg = c.build(None if c.minimization else 1.0, norm, 0).config()
            for k in ("eps", "seed", "generator"):
                cfg.pop(k, None)
            comps.append({"label": c.label, "attack": c.attack, "targets": c.targets,
                          "gradient_free": c.gradient_free, "minimization": c.minimization,
                          "kwargs": jsonable(c.kwargs), "config": jsonable(cfg)})
        out: dict[str, Any] = {"name": self.name, "kind": self.kind, "single_step": False,
                               "gradient_free": False, "kwargs": jsonable(self.kwargs),
                               "components": comps, "key": self.key}
        if self.notes:
            out["notes"] = list(self.notes)
        return out


def _is_gradient_free(cls: type[Attack], name: str) -> bool:
    flag = getattr(cls, "requires_gradients", None)
    if flag is not None:
        return not bool(flag)
    return _norm_key(name) in ("square", "onepixel")


def _resolve_loss(loss: str, k: int, notes: list[str], label: str) -> str:
    from medrobust.criteria import LOSSES

    want = loss
    if loss == "dlr" and k < 3:
        loss = "margin"
        notes.append(f"{label}: the DLR loss needs 3 or more classes; the margin loss is used "
                     f"on this {k}-class task")
    elif loss == "dlr-targeted" and k < 4:
        loss = "margin"
        notes.append(f"{label}: the targeted DLR loss needs 4 or more classes; the targeted "
                     f"margin loss is used on this {k}-class task")
    if loss not in LOSSES:
        notes.append(f"{label}: loss {want!r} is not available in this medrobust; the margin "
                     "loss is used")
        loss = "margin"
    return loss


def build_ensemble_spec(
    name: str, norm: str, num_classes: int,
    per_attack: Mapping[str, Mapping[str, Any]] | None = None,
    common: Mapping[str, Any] | None = None,
) -> EnsembleSpec:
    """Resolve a preset for this norm and number of classes.

    ``per_attack`` maps an attack name (``apgd``, ``square``) or a component label
    (``apgd-ce``) to arguments that replace the preset's (e.g. reduced steps and queries for a
    quick run); ``common`` arguments (the CLI's ``--steps``) go to every component that takes
    them.
    """
    key = _norm_key(name)
    table = {**PRESETS, **_FALLBACK_PRESETS}
    fast = key.endswith("fast") and key[:-4] in table
    if fast:
        key = key[:-4]
    if key not in table:
        raise EvaluationError(f"unknown ensemble {name!r}; available: {', '.join(PRESETS)}")
    defs = table[key](norm, num_classes)
    overrides = {_norm_key(k): dict(v) for k, v in (per_attack or {}).items()}
    missing = sorted({d.attack for d in defs if _norm_key(d.attack) not in ATTACKS})
    if missing:
        raise EvaluationError(
            f"the {name!r} ensemble needs the attacks {', '.join(missing)}, which are not "
            f"registered in medrobust.attacks (available: {', '.join(sorted(ATTACKS))})"
        )
    notes: list[str] = []
    comps: list[Component] = []
    for d in defs:
        cls = ATTACKS[_norm_key(d.attack)]
        kw: dict[str, Any] = {}
        minimization = not issubclass(cls, FixedBudgetAttack)
        if not minimization and accepts(cls, "early_stop"):
            kw["early_stop"] = True
        loops = bool(d.targets) and accepts(cls, "n_target_classes")
        if loops:
            kw["n_target_classes"] = max(1, min(d.targets, num_classes - 1))
        for k, v in d.kwargs.items():
            if k == "loss" and accepts(cls, k):
                v = _resolve_loss(str(v), num_classes, notes, d.label)
            if k == "eot" and accepts(cls, "eot_iter"):  # AutoAttack's rand version: eot_iter
                kw["eot_iter"] = v
            elif accepts(cls, k):
                kw[k] = v
            elif k == "eot":
                notes.append(f"{d.label}: {cls.__name__} takes no EOT argument; run without "
                             f"Expectation over Transformation (eot={v} asked) — a randomized "
                             "model is then attacked with single draws")
            elif k in ("queries", "restarts") and not (fast and k == "queries"):
                alias = {"queries": ("n_queries", "max_queries", "queries"),
                         "restarts": ("restarts", "n_restarts")}[k]
                for a in alias:
                    if accepts(cls, a):
                        kw[a] = v
                        break
        if fast and hasattr(cls, "fast_config"):
            kw.update(cls.fast_config())
        for k, v in (common or {}).items():  # the user's --steps / --queries win
            if v is not None and accepts(cls, k):
                kw[k] = v
        kw.update(overrides.get(_norm_key(d.attack), {}))
        kw.update(overrides.get(_norm_key(d.label), {}))
        bad = [k for k in kw if k in ("eps", "norm", "seed", "generator")]
        if bad:
            raise EvaluationError(f"{d.label}: {', '.join(bad)} are set by the evaluation")
        if loops:  # never more targets than other classes
            kw["n_target_classes"] = max(1, min(int(kw["n_target_classes"]), num_classes - 1))
        targets = int(kw["n_target_classes"]) if loops else d.targets
        c = Component(d.label, d.attack, cls, kw, max(0, min(targets, num_classes - 1)),
                      minimization, _is_gradient_free(cls, d.attack), loops_targets=loops)
        try:
            c.build(None if minimization else 0.0, norm, 0)
        except (TypeError, ValueError) as err:
            raise EvaluationError(f"{name} ensemble, {d.label}: invalid arguments {kw}: "
                                  f"{err}") from None
        comps.append(c)
    ident = [{"label": c.label, "attack": c.attack, "kwargs": jsonable(c.kwargs),
              "targets": c.targets} for c in comps]
    if fast:
        ident.append({"fast": True})
    spec = EnsembleSpec(
        name=name.strip().lower(), cls=None, kwargs={}, key=f"{key}:{sha256_json(ident)[:12]}",
        minimization=False, single_step=False, kind="ensemble", components=comps,
    )
    spec.notes = notes
    return spec


def _large_eps_component(spec: EnsembleSpec) -> int:
    """The component the unbounded sanity check runs: the first iterative gradient attack."""
    for i, c in enumerate(spec.components):
        if c.gradient_free or c.minimization:
            continue
        if int(getattr(c.build(1.0, "linf", 0), "steps", 2) or 2) > 1:
            return i
    return 0


class EnsembleFamily(FixedBudgetFamily):
    """Runs an :class:`EnsembleSpec` in sequence; one unit per budget."""

    name = "ensemble"

    def run(self, spec: AttackSpec, job: UnitJob) -> UnitOutput:
        assert isinstance(spec, EnsembleSpec)
        a = len(spec.components)
        if job.idx.numel() == 0:
            rec = empty_record(False)
            rec["broken_by"] = np.zeros(0, dtype=np.int8)
            for k in ("cost_forward", "cost_backward", "cost_attacked", "time_s"):
                rec[k] = np.zeros(a)
            return UnitOutput(rec, job.x[:0])
        idx = job.idx
        x, y = job.x[idx], job.y[idx].cpu()
        logits = job.clean_logits[idx.cpu()]
        clean_pred = logits.argmax(1)
        order = logits.argsort(1, descending=True)
        adv = x.clone()
        pred = clean_pred.clone()
        broken = torch.full((x.shape[0],), -1, dtype=torch.int8)
        broken[clean_pred != y] = -2  # misclassified when clean: not attacked
        active = (clean_pred == y).nonzero().flatten()
        fwd, bwd, seen, secs = (np.zeros(a) for _ in range(4))
        measure = get_norm(job.norm).measure
        eps = job.eps
        check = _large_eps_component(spec) if job.large else None
        for i, c in enumerate(spec.components):
            if check is not None and i != check:
                continue  # the unbounded sanity check runs one gradient component
            if eps is not None and eps == 0:
                break  # a zero budget changes nothing: every correct sample stays robust
            t0 = time.perf_counter()
            ranks: list[int | None] = ([None] if c.targets == 0 or c.loops_targets
                                       else list(range(1, c.targets + 1)))
            for r in ranks:
                if active.numel() == 0:
                    break
                seen[i] += active.numel()
                xs, ys = x[active], y[active]
                tgt = None if r is None else order[active, r]
                atk = c.build(eps, job.norm, unit_seed(job.seed, c.label, str(r), i),
                              large=job.large, large_step=spec.large_step)
                with whole_range_budget(job.large):
                    res = atk(job.clf, xs, ys, target=tgt)
                fwd[i] += res.forward_passes
                bwd[i] += res.backward_passes
                ok = res.predictions != ys
                if c.minimization and eps is not None:
                    d = measure((res.adversarial.detach() - xs).double()).float().cpu()
                    ok &= d <= eps * (1 + 1e-6) + 1e-12
                if ok.any():
                    hit = active[ok]
                    adv[hit] = res.adversarial.detach()[ok].to(adv.dtype)
                    pred[hit] = res.predictions[ok]
                    broken[hit] = i
                    active = active[~ok]
            secs[i] += time.perf_counter() - t0
        delta = adv - x
        norms = measure_all(delta)
        fooled = broken >= 0
        nan = torch.full((x.shape[0],), float("nan"))
        rec = {
            "idx": idx.cpu().numpy().astype(np.int64),
            "pred": pred.numpy().astype(np.int64),
            "success": (pred != y).numpy(),
            "broken_by": broken.numpy(),
            "cost_forward": fwd, "cost_backward": bwd, "cost_attacked": seen, "time_s": secs,
        }
        stats = {"linf": norms["linf"].cpu().float(), "l2": norms["l2"].cpu().float(),
                 "psnr": psnr(x, adv, job.span), "ssim": ssim(x, adv, job.span)}
        for k in STATS:
            rec[k] = torch.where(fooled, stats[k], nan).numpy().astype(np.float32)
        return UnitOutput(rec, adv)

    def entry(self, spec: AttackSpec, rec: dict[str, np.ndarray], budget: Budget,
              clean_correct: np.ndarray) -> dict[str, Any]:
        assert isinstance(spec, EnsembleSpec)
        labels = [c.label for c in spec.components]
        by = rec["broken_by"].astype(np.int64)
        n = clean_correct.shape[0]
        broken_at = np.full(n, -1, dtype=np.int64)
        broken_at[rec["idx"]] = by
        counts = {lab: int((broken_at == i).sum()) for i, lab in enumerate(labels)}
        after = []
        alive = clean_correct.copy()
        for i, lab in enumerate(labels):
            alive &= broken_at != i
            after.append({"attack": lab, "robust_accuracy": Proportion.of(alive).to_dict()})
        cost = []
        for i, lab in enumerate(labels):
            f, b, s = (float(rec[k][i]) for k in ("cost_forward", "cost_backward",
                                                  "cost_attacked"))
            cost.append({"attack": lab, "forward_passes": int(f), "backward_passes": int(b),
                         "samples_attacked": int(s),
                         "queries_per_sample": None if s == 0 else f / s})
        return {"broken_by": counts, "robust_after": after, "cost": cost}

    def block(self, spec: AttackSpec, collected: Any, budgets: list[Budget],
              clean_correct: np.ndarray) -> dict[str, Any]:
        assert isinstance(spec, EnsembleSpec)
        comps = [{"attack": c.label, "registry_name": c.attack, "targets": c.targets,
                  "gradient_free": c.gradient_free, "minimum_norm": c.minimization}
                 for c in spec.components]
        return {"components": comps, "notes": list(spec.notes)}


register_family(EnsembleFamily())
