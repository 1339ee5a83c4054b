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
from medrobust.models.detector import Detector, load_detector, save_detector
from medrobust.models.ensemble import Ensemble
from medrobust.models.segmenter import Segmenter, SlidingWindow

__all__ = [
    "BlackBox",
    "Capabilities",
    "Classifier",
    "Detector",
    "Ensemble",
    "LossFn",
    "Model",
    "ModelOutputError",
    "QueryBudget",
    "Segmenter",
    "SlidingWindow",
    "check_capabilities",
    "load_detector",
    "save_detector",
]
