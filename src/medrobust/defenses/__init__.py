"""Defenses: input transforms in front of a model, detection, adversarial training, smoothing.

Build an input-transform defense by name and attach it to a model::

    from medrobust.defenses import get_defense
    model = mr.Classifier(net, bounds=(0, 1), defense=[get_defense("median", size=3),
                                                       get_defense("jpeg", quality=75)])

Evaluate it adaptively: every gradient attack takes ``bpda=True`` (the backward pass of each
non-differentiable defense replaced by its approximation) and ``eot=N`` (gradients averaged over N
draws of the defense's randomness), as Athalye et al. (ICML 2018) showed is necessary.

Defenses are registered by name (:data:`DEFENSES`, :func:`register_defense`) so a model folder
(``model.json``) rebuilds only registered defenses (:func:`defense_from_config`); learned ones
(``dae``, ``hgd``, ``defensegan``: :mod:`medrobust.defenses.learned`) keep their weights in the
folder's ``defense.safetensors``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from medrobust.defenses.base import (
    Defense,
    DefenseChain,
    DefenseError,
    as_chain,
    bpda,
)
from medrobust.defenses.learned import (
    DenoisingAutoencoder,
    GeneratorProjection,
    HighLevelGuidedDenoiser,
)
from medrobust.defenses.transforms import (
    BitDepthReduction,
    GaussianNoise,
    GaussianSmoothing,
    JPEGCompression,
    MedianSmoothing,
    RandomResizePad,
    TotalVariationMinimization,
)

DEFENSES: dict[str, Callable[..., Defense]] = {
    "median": MedianSmoothing,
    "gaussian": GaussianSmoothing,
    "jpeg": JPEGCompression,
    "bitdepth": BitDepthReduction,
    "tvm": TotalVariationMinimization,
    "resize-pad": RandomResizePad,
    "noise": GaussianNoise,
    "dae": DenoisingAutoencoder,
    "hgd": HighLevelGuidedDenoiser,
    "defensegan": GeneratorProjection,
}
"""Registered defenses: name -> class (called with the options)."""


def register_defense(name: str, factory: Callable[..., Defense]) -> None:
    """Register a defense class under ``name`` (a model folder can then name it)."""
    if not isinstance(name, str) or not name:
        raise DefenseError(f"a defense name must be a non-empty string; got {name!r}")
    DEFENSES[name] = factory


def get_defense(name: str, **options: Any) -> Defense:
    """Build the registered defense ``name`` with ``options`` (e.g. ``get_defense("jpeg",
    quality=50)``); a clear :class:`DefenseError` for an unknown name or a bad option."""
    key = str(name).lower()
    if key not in DEFENSES:
        raise DefenseError(f"unknown defense {name!r}; known: {', '.join(sorted(DEFENSES))}")
    try:
        return DEFENSES[key](**options)
    except TypeError as err:
        raise DefenseError(f"defense {name!r}: {err}") from None


def defense_from_config(config: Any) -> DefenseChain | None:
    """Rebuild defenses from their ``config()`` (``model.json``): a dict ``{"name", "options"}``,
    a list of them, or ``None``. Only registered names are built."""
    if config is None or config == []:
        return None
    items = config if isinstance(config, list) else [config]
    built = []
    for item in items:
        if not isinstance(item, Mapping) or not isinstance(item.get("name"), str):
            raise DefenseError(f"a defense entry must be {{'name': ..., 'options': {{...}}}}; got "
                               f"{item!r}")
        opts = item.get("options") or {}
        if not isinstance(opts, Mapping):
            raise DefenseError(f"defense {item['name']!r}: 'options' must be an object")
        built.append(get_defense(item["name"], **dict(opts)))
    return as_chain(built)


_LAZY = {
    "FeatureSqueezing": "medrobust.defenses.detection",
    "SmoothedClassifier": "medrobust.defenses.smoothing",
    "adversarial_example_generator": "medrobust.defenses.training",
}


def __getattr__(name: str) -> Any:
    # detection, smoothing and training import the attacks, which import the models: loaded on
    # first use so that `medrobust.models` can import this package without a cycle.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'medrobust.defenses' has no attribute {name!r}")


__all__ = [
    "BitDepthReduction",
    "DEFENSES",
    "Defense",
    "DefenseChain",
    "DefenseError",
    "DenoisingAutoencoder",
    "FeatureSqueezing",
    "GaussianNoise",
    "GaussianSmoothing",
    "GeneratorProjection",
    "HighLevelGuidedDenoiser",
    "JPEGCompression",
    "MedianSmoothing",
    "RandomResizePad",
    "SmoothedClassifier",
    "TotalVariationMinimization",
    "adversarial_example_generator",
    "as_chain",
    "bpda",
    "defense_from_config",
    "get_defense",
    "register_defense",
]
