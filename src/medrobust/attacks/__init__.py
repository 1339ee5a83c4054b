"""Attacks. Every attack is called as ``attack(model, inputs, labels, target=None, mask=None)`` and
returns an :class:`~medrobust.results.AttackResult`.

``ATTACKS`` maps normalized names (lower case, without ``-`` and ``_``) to classes so that the CLI
and the evaluation engine can build an attack by name (:func:`get_attack`): ``"apgd-t"``,
``"APGD_T"`` and ``"apgdt"`` are the same attack.
"""

from __future__ import annotations

from typing import Any

from medrobust.attacks.apgd import APGD, APGDT
from medrobust.attacks.base import (
    Attack,
    AttackContext,
    FixedBudgetAttack,
    MinimumNormAttack,
    RunOutput,
)
from medrobust.attacks.decision import HopSkipJump
from medrobust.attacks.dense import DAG, CosPGD
from medrobust.attacks.detection import DAGDetection
from medrobust.attacks.detection_pgd import PGDDetection
from medrobust.attacks.fab import FAB, FABT
from medrobust.attacks.gradient import BIM, DIFGSM, FGSM, MIFGSM, PGD, TIFGSM, GradientAttack
from medrobust.attacks.minimal import ALMA, DDN, EAD, FMN, LBFGS, CarliniWagnerL2, DeepFool
from medrobust.attacks.patch import AdversarialPatch
from medrobust.attacks.rp2 import RP2
from medrobust.attacks.score import SimBA
from medrobust.attacks.sparse import JSMA, OnePixel
from medrobust.attacks.spatial import StAdv
from medrobust.attacks.square import Square
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
    "ddn": DDN,
    "fmn": FMN,
    "alma": ALMA,
    "jsma": JSMA,
    "onepixel": OnePixel,
    "stadv": StAdv,
    "dagdetection": DAGDetection,
    "pgddetection": PGDDetection,
    "hopskipjump": HopSkipJump,
    "simba": SimBA,
    "difgsm": DIFGSM,
    "tifgsm": TIFGSM,
    "universal": UniversalPerturbation,
    "patch": AdversarialPatch,
    "rp2": RP2,
    "dag": DAG,
    "cospgd": CosPGD,
}


def normalize_name(name: str) -> str:
    """The registry key of an attack name: lower case, ``-`` and ``_`` removed."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"an attack name must be a non-empty string; got {name!r}")
    return name.strip().lower().replace("-", "").replace("_", "")


def register(name: str, cls: type[Attack]) -> None:
    """Make ``cls`` available to :func:`get_attack` under ``name`` (normalized as
    :func:`get_attack` does, so ``"apgd-t"`` registers the key ``"apgdt"``)."""
    ATTACKS[normalize_name(name)] = cls


register("apgd", APGD)
register("apgd-t", APGDT)
register("fab", FAB)
register("fab-t", FABT)
register("square", Square)


def get_attack(name: str, **kwargs: Any) -> Attack:
    """Build an attack by name (case, ``-`` and ``_`` ignored), e.g.
    ``get_attack("pgd", eps=8/255)`` or ``get_attack("apgd-t", eps=8/255)``."""
    key = normalize_name(name)
    if key not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; expected one of {sorted(ATTACKS)}")
    return ATTACKS[key](**kwargs)


__all__ = [
    "ALMA",
    "APGD",
    "APGDT",
    "ATTACKS",
    "AdversarialPatch",
    "Attack",
    "AttackContext",
    "BIM",
    "CarliniWagnerL2",
    "CosPGD",
    "DAG",
    "DAGDetection",
    "DDN",
    "DIFGSM",
    "DeepFool",
    "EAD",
    "FAB",
    "FABT",
    "FGSM",
    "FMN",
    "FixedBudgetAttack",
    "GradientAttack",
    "HopSkipJump",
    "LBFGS",
    "JSMA",
    "MIFGSM",
    "MinimumNormAttack",
    "OnePixel",
    "PGD",
    "PGDDetection",
    "RP2",
    "RunOutput",
    "SimBA",
    "Square",
    "StAdv",
    "TIFGSM",
    "UniversalPerturbation",
    "get_attack",
    "normalize_name",
    "register",
]
