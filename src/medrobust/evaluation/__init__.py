"""Robustness evaluation: sweeps of attacks and budgets, the per-sample worst case, sanity checks
against gradient masking, a resumable results store, ``results.json`` and the HTML report.

Start with :func:`evaluate`.
"""

from medrobust.evaluation.budgets import Budget, parse_budget, parse_budgets
from medrobust.evaluation.engine import EvaluationResult, evaluate, unit_seed
from medrobust.evaluation.errors import EvaluationError, ResultsStoreError
from medrobust.evaluation.schema import SCHEMA_VERSION, stable_view

__all__ = [
    "Budget",
    "EvaluationError",
    "EvaluationResult",
    "ResultsStoreError",
    "SCHEMA_VERSION",
    "evaluate",
    "parse_budget",
    "parse_budgets",
    "stable_view",
    "unit_seed",
]
