"""medrobust: adversarial robustness for medical-imaging models."""

from medrobust.evaluation import evaluate
from medrobust.models import Classifier
from medrobust.norms import L1, L2, Linf, get_norm
from medrobust.results import AttackResult

__version__ = "0.1.0"

__all__ = ["AttackResult", "Classifier", "L1", "L2", "Linf", "evaluate", "get_norm", "__version__"]
