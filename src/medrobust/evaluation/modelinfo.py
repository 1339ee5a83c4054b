"""What is evaluated: the model (a Classifier, a loaded model folder or its path), checked against
the data before any attack runs, and the intensity window images are displayed with."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medrobust.data.base import ImageData
from medrobust.data.streamed import value_range
from medrobust.evaluation.errors import EvaluationError
from medrobust.evaluation.util import file_sha256, state_dict_sha256
from medrobust.models import Classifier

__all__ = ["CLASSIFICATION_TASKS", "ModelInfo", "check_model_data", "display_window",
           "meta_positive_class", "resolve_model"]

CLASSIFICATION_TASKS = ("binary", "multi-class", "ordinal", "multi-label")


@dataclass
class ModelInfo:
    """The classifier under evaluation and what is known about it."""

    classifier: Classifier
    metadata: dict[str, Any]
    source: str | None
    weights_sha256: str
    weights_file_sha256: str | None


def resolve_model(model: Any, device: str | torch.device | None = None) -> ModelInfo:
    """A :class:`ModelInfo` from a :class:`Classifier`, a loaded model folder, or a folder path
    (loaded with :func:`medrobust.modelstore.load_model`)."""
    meta: dict[str, Any] = {}
    source: str | None = None
    file_sha: str | None = None
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        try:
            from medrobust import modelstore
        except ImportError as err:  # pragma: no cover - the model folder module is missing
            raise EvaluationError(f"cannot load model folders here ({err})") from err
        try:
            model = modelstore.load_model(path, device=device)
        except ValueError as err:
            raise EvaluationError(str(err)) from err
    if isinstance(model, Classifier):
        clf = model
    elif hasattr(model, "classifier") and hasattr(model, "metadata"):
        clf = model.classifier
        meta = dict(model.metadata or {})
        if getattr(model, "path", None) is not None:
            source = str(model.path)
            wfile = Path(model.path) / str(meta.get("weights", "weights.safetensors"))
            if wfile.is_file():
                file_sha = file_sha256(wfile)
        if clf is None:
            raise EvaluationError(
                f"{source or 'the model'}: a {meta.get('task', 'segmentation')} model; evaluate "
                "needs a classifier"
            )
    else:
        raise EvaluationError(
            f"model must be a medrobust.Classifier or a saved model folder; got "
            f"{type(model).__name__}"
        )
    return ModelInfo(clf, meta, source, state_dict_sha256(clf.module), file_sha)


def meta_positive_class(meta: Mapping[str, Any]) -> int | None:
    for where in (meta, meta.get("extra") or {}):
        if isinstance(where, Mapping) and where.get("positive_class") is not None:
            return int(where["positive_class"])
    return None


def display_window(clf: Classifier, meta: Mapping[str, Any], data: ImageData
                   ) -> tuple[float, float]:
    """The intensity range to display images with: the model's intensity window when it has one
    (CT in HU), else a ``window`` (center, width) in the data's metadata, else the bounds."""
    pre = (meta.get("preprocessing") or {}).get("steps") if meta else None
    stack: list[Any] = [pre]
    while stack:
        s = stack.pop(0)
        if isinstance(s, list):
            stack.extend(s)
        elif isinstance(s, Mapping):
            if s.get("type") == "window" and "lo" in s and "hi" in s:
                return float(s["lo"]), float(s["hi"])
            if s.get("type") == "compose":
                stack.extend(s.get("steps") or [])
    mods: list[Any] = [clf.preprocess]
    while mods:
        m = mods.pop(0)
        if m is None:
            continue
        if hasattr(m, "lo") and hasattr(m, "hi"):
            return float(m.lo), float(m.hi)
        if hasattr(m, "steps"):
            mods.extend(list(m.steps))
    lo, hi = float(data.bounds[0]), float(data.bounds[1])
    win = data.meta.get("window") if data.meta else None
    if isinstance(win, (list, tuple)) and len(win) == 2:
        c, w = float(win[0]), float(win[1])
        # only a window that fits the data's range (a CT window on [0, 1] data is ignored)
        if 0 < w <= hi - lo and c - w / 2 < hi and c + w / 2 > lo:
            return c - w / 2, c + w / 2
    return lo, hi


def check_model_data(info: ModelInfo, data: ImageData) -> int:
    """Raise a clear :class:`EvaluationError` when the model cannot be evaluated on ``data``;
    return the number of classes."""
    clf, meta = info.classifier, info.metadata
    if not isinstance(data, ImageData):
        raise EvaluationError(f"data must be a medrobust ImageData; got {type(data).__name__}")
    if len(data) == 0:
        raise EvaluationError("the data set is empty")
    if data.task not in CLASSIFICATION_TASKS:
        raise EvaluationError(
            f"data task {data.task!r} is not supported by evaluate yet (expected one of "
            f"{', '.join(CLASSIFICATION_TASKS)})"
        )
    multilabel = bool(getattr(clf, "multilabel", False))
    if multilabel != (data.task == "multi-label"):
        raise EvaluationError(
            "a multi-label model needs multi-label data (labels (N, findings) of 0/1)"
            if multilabel else
            "multi-label data needs a multi-label model: Classifier(..., task='multilabel')"
        )
    if multilabel:
        if data.labels.dim() != 2 or not bool(((data.labels == 0) | (data.labels == 1)).all()):
            raise EvaluationError(
                f"multi-label labels must be 0/1 of shape (N, findings); got shape "
                f"{tuple(data.labels.shape)}"
            )
    elif data.labels.dim() != 1 or data.labels.is_floating_point():
        raise EvaluationError(
            f"labels must be one class index per sample; got shape {tuple(data.labels.shape)} "
            f"and dtype {data.labels.dtype}"
        )
    inp = meta.get("input") or {}
    want_c = inp.get("channels")
    if isinstance(want_c, int) and want_c != data.channels:
        raise EvaluationError(
            f"the model takes {want_c}-channel inputs but the data has {data.channels} "
            f"channel(s) (shape {tuple(data.images.shape[1:])})"
        )
    want_dims = inp.get("spatial_dims")
    if isinstance(want_dims, int) and want_dims != len(data.spatial_shape):
        raise EvaluationError(
            f"the model takes {want_dims}D inputs but the data is {len(data.spatial_shape)}D "
            f"(shape {tuple(data.images.shape[1:])})"
        )
    units = inp.get("units")
    if units and data.units and str(units) != str(data.units):
        raise EvaluationError(
            f"the model takes inputs in {units!r} but the data is in {data.units!r}"
        )
    lo, hi = clf.bounds
    if float(data.bounds[0]) < lo - 1e-6 or float(data.bounds[1]) > hi + 1e-6:
        raise EvaluationError(
            f"the data's range [{data.bounds[0]:g}, {data.bounds[1]:g}] {data.units} is not "
            f"inside the model's bounds [{lo:g}, {hi:g}]"
        )
    xmin, xmax = value_range(data.images)  # chunk by chunk, or known to a streamed source
    if not (math.isfinite(xmin) and math.isfinite(xmax)):
        raise EvaluationError("the images contain NaN or Inf values")
    if xmin < lo or xmax > hi:
        raise EvaluationError(
            f"the images lie in [{xmin:g}, {xmax:g}], outside the model's bounds [{lo:g}, {hi:g}]"
        )
    try:
        with clf.attack_mode():
            out = clf.logits(data.images[:1].to(dtype=clf.dtype))
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise EvaluationError(
            f"the model does not accept the data's inputs of shape "
            f"{tuple(data.images.shape[1:])}: {first}"
        ) from None
    k = int(out.shape[1])
    if multilabel:
        if int(data.labels.shape[1]) != k:
            raise EvaluationError(f"the model has {k} findings but the labels have "
                                  f"{int(data.labels.shape[1])}")
        return k
    if data.class_names and len(data.class_names) != k:
        raise EvaluationError(
            f"the model has {k} classes but the data has {len(data.class_names)} "
            f"({', '.join(map(str, data.class_names[:8]))})"
        )
    ymin, ymax = int(data.labels.min()), int(data.labels.max())
    if ymin < 0 or ymax >= k:
        raise EvaluationError(
            f"labels lie in [{ymin}, {ymax}] but the model has {k} classes"
        )
    return k
