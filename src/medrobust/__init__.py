"""medrobust: adversarial robustness for medical-imaging models."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from medrobust.models import BlackBox, Classifier, Detector, Ensemble, Segmenter
from medrobust.norms import L1, L2, Linf, get_norm
from medrobust.results import AttackResult
from medrobust.transfer import TransferResult, transfer

__version__ = "0.1.0"

if TYPE_CHECKING:
    from medrobust.evaluation import evaluate


def __getattr__(name: str) -> Any:
    # The evaluation engine (scipy, matplotlib) is imported on first use, so that
    # `import medrobust` and the CLI start quickly.
    if name == "evaluate":
        from medrobust.evaluation import evaluate

        return evaluate
    raise AttributeError(f"module 'medrobust' has no attribute {name!r}")


__all__ = [
    "AttackResult",
    "BlackBox",
    "Classifier",
    "Detector",
    "Ensemble",
    "L1",
    "L2",
    "Linf",
    "Segmenter",
    "TransferResult",
    "evaluate",
    "get_norm",
    "transfer",
    "__version__",
]
