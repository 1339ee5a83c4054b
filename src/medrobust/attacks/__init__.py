"""Attacks. Every attack is called as ``attack(model, inputs, labels, target=None, mask=None)`` and
returns an :class:`~medrobust.results.AttackResult`.

``ATTACKS`` maps lower-case names to classes so that the CLI and the evaluation engine can build an
attack by name (:func:`get_attack`).
"""

from __future__ import annotations

from typing import Any

from medrobust.attacks.base import (
    Attack,
    AttackContext,
    FixedBudgetAttack,
    MinimumNormAttack,
    RunOutput,
)
from medrobust.attacks.decision import HopSkipJump
from medrobust.attacks.gradient import BIM, DIFGSM, FGSM, MIFGSM, PGD, TIFGSM, GradientAttack
from medrobust.attacks.minimal import EAD, LBFGS, CarliniWagnerL2, DeepFool
from medrobust.attacks.patch import AdversarialPatch
from medrobust.attacks.rp2 import RP2
from medrobust.attacks.score import SimBA
from medrobust.attacks.sparse import JSMA, OnePixel
from medrobust.attacks.spatial import StAdv
from medrobust.attacks.universal import UniversalPerturbation

ATTACKS: dict[str, type[Attack]] = {
    "fgsm": FGSM,
    "bim": BIM,
    "ifgsm": BIM,
    "pgd": PGD,
    "mifgsm": MIFGSM,
    "deepfool": DeepFool,
    "carliniwagnerl2": CarliniWagnerL2,
    "cw": CarliniWagnerL2,
    "ead": EAD,
    "lbfgs": LBFGS,
    "jsma": JSMA,
    "onepixel": OnePixel,
    "stadv": StAdv,
    "hopskipjump": HopSkipJump,
    "simba": SimBA,
    "difgsm": DIFGSM,
    "tifgsm": TIFGSM,
    "universal": UniversalPerturbation,
    "patch": AdversarialPatch,
    "rp2": RP2,
}


def register(name: str, cls: type[Attack]) -> None:
    """Make ``cls`` available to :func:`get_attack` under ``name``."""
    ATTACKS[name.lower()] = cls


def get_attack(name: str, **kwargs: Any) -> Attack:
    """Build an attack by name (case-insensitive), e.g. ``get_attack("pgd", eps=8/255)``."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; expected one of {sorted(ATTACKS)}")
    return ATTACKS[key](**kwargs)


__all__ = [
    "ATTACKS",
    "AdversarialPatch",
    "Attack",
    "AttackContext",
    "BIM",
    "CarliniWagnerL2",
    "DIFGSM",
    "DeepFool",
    "EAD",
    "FGSM",
    "FixedBudgetAttack",
    "GradientAttack",
    "HopSkipJump",
    "LBFGS",
    "JSMA",
    "MIFGSM",
    "MinimumNormAttack",
    "OnePixel",
    "PGD",
    "RP2",
    "RunOutput",
    "SimBA",
    "StAdv",
    "TIFGSM",
    "UniversalPerturbation",
    "get_attack",
    "register",
]
