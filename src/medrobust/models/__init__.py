"""Model kinds under attack: one contract, several wrappers.

:class:`~medrobust.models.base.Model` is the contract (bounds, preprocessing, chunked forward,
input-only gradients, eval mode restored, output kind and capability flags); each model kind lives
in its own module of this package and is re-exported here.
"""

from __future__ import annotations

from medrobust.models.base import (
    Capabilities,
    LossFn,
    Model,
    ModelOutputError,
    check_capabilities,
)
from medrobust.models.blackbox import BlackBox, QueryBudget
from medrobust.models.classifier import Classifier
from medrobust.models.ensemble import Ensemble

__all__ = [
    "BlackBox",
    "Capabilities",
    "Classifier",
    "Ensemble",
    "LossFn",
    "Model",
    "ModelOutputError",
    "QueryBudget",
    "check_capabilities",
]
