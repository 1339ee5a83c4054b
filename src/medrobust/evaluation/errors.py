"""The exceptions of the evaluation engine."""

from __future__ import annotations

__all__ = ["EvaluationError", "ResultsStoreError"]


class EvaluationError(ValueError):
    """An evaluation that cannot run as asked: unknown attack, malformed budgets, a model that
    does not match the data, an output folder that holds other results, ...

    The message is one line that says what is wrong and how to fix it, so that the command line
    can print it as is.
    """


class ResultsStoreError(EvaluationError):
    """The per-batch results database (``results.sqlite``) cannot be read or written."""
