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
from medrobust.attacks.detection import DAGDetection
from medrobust.attacks.gradient import BIM, FGSM, MIFGSM, PGD, GradientAttack
from medrobust.attacks.minimal import EAD, LBFGS, CarliniWagnerL2, DeepFool
from medrobust.attacks.sparse import JSMA, OnePixel
from medrobust.attacks.spatial import StAdv

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
    "dagdetection": DAGDetection,
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
    "Attack",
    "AttackContext",
    "BIM",
    "CarliniWagnerL2",
    "DAGDetection",
    "DeepFool",
    "EAD",
    "FGSM",
    "FixedBudgetAttack",
    "GradientAttack",
    "LBFGS",
    "JSMA",
    "MIFGSM",
    "MinimumNormAttack",
    "OnePixel",
    "PGD",
    "RunOutput",
    "StAdv",
    "get_attack",
    "register",
]
