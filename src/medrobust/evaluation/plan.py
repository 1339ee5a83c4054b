"""Step 1 of the pipeline: from the user's attack names to specs, and from specs, budgets and
batches to the list of units of work.

A unit is ``(spec, eps_key, batch)``: one attack (or ensemble) at one budget (or at every budget,
for a minimum-norm attack) on one fixed slice of the data. Its results are stored under
``(config_hash, spec.key, eps_key, batch)``; the clean pass of each batch is the unit
``("clean", "", batch)`` and always comes first, since every other unit reads its logits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from medrobust.attacks import ATTACKS, FixedBudgetAttack, MinimumNormAttack
from medrobust.evaluation.budgets import Budget
from medrobust.evaluation.errors import EvaluationError
from medrobust.evaluation.families import build_ensemble_spec, family_of, is_preset
from medrobust.evaluation.specs import RESERVED, AttackSpec
from medrobust.evaluation.util import accepts, jsonable, sha256_json

__all__ = ["CLEAN_UNIT", "Plan", "Unit", "build_attack_specs", "make_plan"]

CLEAN_UNIT = "clean"


def _key(name: str) -> str:
    return str(name).strip().lower().replace("-", "").replace("_", "")


def split_names(attacks: Sequence[str] | str) -> list[str]:
    if isinstance(attacks, str):
        return [a for a in attacks.split(",")]
    return [str(a) for a in attacks]


def build_attack_specs(
    attacks: Sequence[str] | str, norm: str,
    attack_kwargs: Mapping[str, Mapping[str, Any]] | None,
    common_kwargs: Mapping[str, Any] | None = None, num_classes: int = 2,
) -> list[AttackSpec]:
    """Resolve attack and ensemble names and check their arguments by building each once.

    ``attack_kwargs`` maps an attack name to its extra arguments (also applied to an ensemble's
    components of that attack); ``common_kwargs`` are given to every attack whose constructor
    takes them (the CLI's ``--steps``). Fixed-budget attacks stop early on success
    (``early_stop=True``) unless told otherwise: the success flags and the robust accuracy are the
    same, the run is faster, and the perturbation statistics are those of the first successful
    iterate.
    """
    names = split_names(attacks)
    if not names:
        raise EvaluationError("no attack given; expected one or more of " + ", ".join(ATTACKS))
    per_attack = {_key(k): dict(v) for k, v in (attack_kwargs or {}).items()}
    used: set[str] = set()
    specs: list[AttackSpec] = []
    seen: set[str] = set()
    for raw in names:
        name = _key(raw)
        if not name:
            raise EvaluationError(f"malformed attack list {attacks!r}: empty name")
        if name in seen:
            raise EvaluationError(f"attack {name!r} given twice")
        seen.add(name)
        if is_preset(name) and name not in ATTACKS:
            ens = build_ensemble_spec(str(raw).strip(), norm, num_classes, per_attack,
                                       common_kwargs)
            used.update(_key(c.attack) for c in ens.components)
            used.update(_key(c.label) for c in ens.components)
            specs.append(ens)
            continue
        if name not in ATTACKS:
            from medrobust.evaluation.families import PRESETS

            raise EvaluationError(
                f"unknown attack {str(raw).strip()!r}; available: {', '.join(sorted(ATTACKS))}"
                f"; ensembles: {', '.join(sorted(PRESETS))}"
            )
        cls = ATTACKS[name]
        kw: dict[str, Any] = {}
        minimization = not issubclass(cls, FixedBudgetAttack)
        kind = ("fixed-budget" if not minimization else
                "minimum-norm" if issubclass(cls, MinimumNormAttack) else "unbounded")
        if not minimization and accepts(cls, "early_stop"):
            kw["early_stop"] = True
        for k, v in (common_kwargs or {}).items():
            if v is not None and accepts(cls, k):
                kw[k] = v
        kw.update(per_attack.get(name, {}))
        used.add(name)
        bad = [k for k in kw if k in RESERVED]
        if bad:
            raise EvaluationError(
                f"attack {name!r}: {', '.join(bad)} are set by the evaluation (give eps= and "
                "norm= to evaluate, and seed= for the run)"
            )
        key = f"{name}:{sha256_json(jsonable(kw))[:12]}"
        gf = getattr(cls, "requires_gradients", None)
        spec = AttackSpec(name, cls, kw, key, minimization, single_step=False, kind=kind,
                          gradient_free=(gf is not None and not gf) or name == "square")
        try:
            atk = spec.build(None if minimization else 0.0, norm, 0)
        except (TypeError, ValueError) as err:
            raise EvaluationError(f"attack {name!r}: invalid arguments {kw}: {err}") from None
        spec.single_step = (not minimization) and int(getattr(atk, "steps", 0) or 0) == 1
        specs.append(spec)
    unknown = sorted(k for k in per_attack if k not in ATTACKS and k not in used)
    if unknown:  # a typo; arguments of known attacks that are not evaluated are ignored
        raise EvaluationError(f"attack_kwargs for unknown attack(s): {', '.join(unknown)}")
    return specs


@dataclass(frozen=True)
class Unit:
    """One unit of work: ``spec`` (``None`` for the clean pass) at ``budget`` on ``batch``."""

    spec: AttackSpec | None
    eps_key: str
    budget: Budget | None
    batch: int
    large: bool = False

    @property
    def name(self) -> str:
        return CLEAN_UNIT if self.spec is None else self.spec.key

    def describe(self) -> str:
        if self.spec is None:
            return "clean"
        return (f"{self.spec.name} eps=" + ("min-norm" if self.budget is None
                                            else self.budget.label))


@dataclass
class Plan:
    """The units of an evaluation, batch by batch, with the slices of the data."""

    n: int
    batch_size: int
    per_batch: list[tuple[AttackSpec | None, str, Budget | None, bool]]

    @property
    def batches(self) -> int:
        return (self.n + self.batch_size - 1) // self.batch_size

    def slice(self, b: int) -> slice:
        return slice(b * self.batch_size, min(self.n, (b + 1) * self.batch_size))

    def units(self, b: int) -> list[Unit]:
        return [Unit(s, k, bud, b, large) for s, k, bud, large in self.per_batch]

    def __len__(self) -> int:
        return self.batches * len(self.per_batch)


def make_plan(specs: list[AttackSpec], budgets: list[Budget], big: Budget | None, n: int,
              batch_size: int, clean: bool = True) -> Plan:
    """Every unit: per batch, the clean pass (unless ``clean=False``: a follow-up plan that
    reads the clean pass of an earlier one) and then each spec's units (its family decides)."""
    per: list[tuple[AttackSpec | None, str, Budget | None, bool]] = (
        [(None, "", None, False)] if clean else [])
    for s in specs:
        for eps_key, bud in family_of(s).units(s, budgets, big):
            per.append((s, eps_key, bud, bud is not None and bud is big))
    return Plan(n, batch_size, per)
