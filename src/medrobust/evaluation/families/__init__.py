"""The registered evaluation families (see :mod:`medrobust.evaluation.families.base`).

Importing this package registers every family; a new family adds its module and one import line
here.
"""

from medrobust.evaluation.families import ensemble as _ensemble  # noqa: F401
from medrobust.evaluation.families import single as _single  # noqa: F401
from medrobust.evaluation.families.base import (
    FAMILIES,
    MIN_NORM_KEY,
    Family,
    UnitJob,
    UnitOutput,
    family_of,
    merge_records,
    register_family,
)
from medrobust.evaluation.families.ensemble import (
    PRESETS,
    ComponentDef,
    EnsembleSpec,
    build_ensemble_spec,
    is_preset,
    register_preset,
)

__all__ = [
    "ComponentDef",
    "EnsembleSpec",
    "FAMILIES",
    "Family",
    "MIN_NORM_KEY",
    "PRESETS",
    "UnitJob",
    "UnitOutput",
    "build_ensemble_spec",
    "family_of",
    "is_preset",
    "merge_records",
    "register_family",
    "register_preset",
]
