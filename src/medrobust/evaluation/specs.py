"""What an evaluation runs: one :class:`AttackSpec` per entry of ``attacks``.

A spec is the attack's identity in the results store (``key``: the name plus a hash of every
argument), the family that runs it (``family``: a key of
:data:`medrobust.evaluation.families.FAMILIES`) and what the sanity checks need to know about it.
A single registered attack is an :class:`AttackSpec`; an ensemble (``"standard"``) is an
:class:`~medrobust.evaluation.families.ensemble.EnsembleSpec`, a spec with components.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from medrobust.attacks import Attack
from medrobust.evaluation.util import accepts, jsonable

__all__ = ["LARGE_EPS_STEPS", "RESERVED", "AttackSpec"]

LARGE_EPS_STEPS = 100
"""The fewest steps an iterative attack takes in the unbounded (large-eps) sanity check; with
steps of a fiftieth of the window it can travel across the window twice."""

RESERVED = ("eps", "norm", "seed", "generator")
"""Arguments the engine sets itself; an ``attack_kwargs`` entry may not override them."""


@dataclass
class AttackSpec:
    """One attack of an evaluation: its registry name, the extra arguments, and what kind it is.

    Attributes:
        name: the key in :data:`medrobust.attacks.ATTACKS` (or a preset's name for an ensemble).
        cls: the attack class (``None`` for an ensemble).
        kwargs: extra constructor arguments (``eps``, ``norm`` and ``seed`` are the engine's).
        key: ``name`` plus a hash of ``kwargs``: the attack's identity in the results database.
        minimization: not a fixed-budget attack: run once per batch and judged against every
            budget by the norm of its perturbation.
        single_step: one gradient step (FGSM) — the baseline of the "iterative beats single-step"
            check.
        kind: the family that runs it: "fixed-budget", "minimum-norm", "unbounded" (another kind
            of budget) or "ensemble".
        gradient_free: the attack uses no gradient (Square): a success where the gradient attacks
            failed is a sign of gradient masking.
        large_step: the step of the unbounded sanity check (set by the engine).
    """

    name: str
    cls: type[Attack] | None
    kwargs: dict[str, Any]
    key: str
    minimization: bool
    single_step: bool
    kind: str = "fixed-budget"
    gradient_free: bool = False
    large_step: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def family(self) -> str:
        return self.kind

    def build(self, eps: float | None, norm: str, seed: int, large: bool = False,
              **override: Any) -> Attack:
        """The attack object for one unit of work.

        ``large`` marks the unbounded sanity check (a budget holding the whole input range). There
        an iterative attack starts from the clean input and takes at least ``LARGE_EPS_STEPS``
        steps of ``large_step`` (a fiftieth of the model's intensity window, or of the bounds):
        its default step, a fraction of eps, would otherwise jump across the whole range (and a
        random start lands anywhere in it), where a saturating intensity window has zero gradient,
        and the check would flag the model for the attack's configuration.
        """
        assert self.cls is not None
        return build_attack(self.cls, self.kwargs, eps, norm, seed, self.minimization,
                            self.single_step, self.large_step if large else None, large,
                            **override)

    def describe(self, norm: str) -> dict[str, Any]:
        """The attack's full configuration (its defaults included) for ``results.json``."""
        cfg = self.build(None if self.minimization else 1.0, norm, 0).config()
        for k in ("eps", "seed", "generator"):
            cfg.pop(k, None)
        out = {
            "name": self.name,
            "kind": self.kind,
            "single_step": self.single_step,
            "gradient_free": self.gradient_free,
            "kwargs": jsonable(self.kwargs),
            "config": jsonable(cfg),
            "key": self.key,
        }
        if self.notes:
            out["notes"] = list(self.notes)
        return out


def build_attack(cls: type[Attack], kwargs: dict[str, Any], eps: float | None, norm: str,
                 seed: int, minimization: bool, single_step: bool, large_step: float | None,
                 large: bool, **override: Any) -> Attack:
    """Build ``cls`` for one unit: the engine's ``eps``/``norm``/``seed`` over ``kwargs``."""
    kw = dict(kwargs)
    kw.update(override)
    kw["seed"] = int(seed)
    if not minimization or accepts(cls, "norm"):
        kw["norm"] = norm
    if not minimization:
        kw["eps"] = float(eps if eps is not None else 0.0)
    if large and not single_step:
        if accepts(cls, "random_start"):
            kw["random_start"] = False
        if accepts(cls, "steps"):
            kw["steps"] = max(int(kw.get("steps") or 0), LARGE_EPS_STEPS)
        if large_step is not None and accepts(cls, "step_size"):
            kw["step_size"] = large_step
    return cls(**kw)
