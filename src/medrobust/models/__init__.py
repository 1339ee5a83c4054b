"""Model kinds under attack: one contract, several wrappers.

Every model kind (a :class:`Classifier`; next a segmenter, a detector, a black box, an ensemble)
lives in its own module of this package and is re-exported here.
"""

from __future__ import annotations

from medrobust.models.classifier import Classifier, LossFn

__all__ = ["Classifier", "LossFn"]
