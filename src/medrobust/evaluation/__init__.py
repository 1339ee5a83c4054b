"""Robustness evaluation: sweeps of attacks and budgets (and the AutoAttack-style ``standard``
ensemble), the per-sample worst case, pre-flight and sanity checks against gradient masking, a
resumable results store, ``results.json`` and the HTML report.

Start with :func:`evaluate`. The pipeline and its extension point (a new attack family or task
type) are described in :mod:`medrobust.evaluation.engine` and
:mod:`medrobust.evaluation.families.base`.
"""

from medrobust.evaluation.budgets import Budget, parse_budget, parse_budgets
from medrobust.evaluation.engine import evaluate
from medrobust.evaluation.errors import EvaluationError, ResultsStoreError
from medrobust.evaluation.families import (
    PRESETS,
    ComponentDef,
    Family,
    register_family,
    register_preset,
)
from medrobust.evaluation.result import EvaluationResult
from medrobust.evaluation.schema import SCHEMA_VERSION, read_results, stable_view, upgrade
from medrobust.evaluation.util import unit_seed

__all__ = [
    "Budget",
    "ComponentDef",
    "EvaluationError",
    "EvaluationResult",
    "Family",
    "PRESETS",
    "ResultsStoreError",
    "SCHEMA_VERSION",
    "evaluate",
    "parse_budget",
    "parse_budgets",
    "read_results",
    "register_family",
    "register_preset",
    "stable_view",
    "unit_seed",
    "upgrade",
]
