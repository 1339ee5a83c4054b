"""Does this model fit this data? Checked up front, one clear line per mismatch, with the fix.

A model folder (``model.json``, :mod:`medrobust.modelstore`) records what its network takes: the
channels, the spatial size (or a resize in its preprocessing), the units and bounds, the classes.
:func:`check_model_data` compares that with what is about to be fed to it (a data set, an image
file) and raises :class:`MismatchError` (a ``ValueError``) naming what differs and how to fix it,
instead of running silently on the wrong thing (a 64x64 image on a 28-px model, BreastMNIST's
images under PneumoniaMNIST's class names, [0, 1] pixels on a model that takes Hounsfield units).

:func:`check_eps` refuses a budget that contains every valid input (an L-inf eps at or above the
bounds' span): such a "robustness" figure measures nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "MAX_PIXELS",
    "MismatchError",
    "check_eps",
    "check_evaluation",
    "check_input_size",
    "check_pixel_limit",
    "check_model_data",
    "model_resizes",
]

#: Inputs with more pixels (voxels times channels) than this are refused before they are read
#: whole (a 12000 x 12000 PNG would take gigabytes as float); 2**27, e.g. 512 x 512 x 512.
MAX_PIXELS = 2**27


class MismatchError(ValueError):
    """A model and the data given to it do not fit together; the message says how to fix it."""


def _canonical_units(units: Any) -> str:
    s = str(units).strip().lower().replace(" ", "")
    aliases = {"hu": "hu", "hounsfield": "hu", "hounsfieldunits": "hu", "intensity": "intensity",
               "[0,1]": "intensity", "0-1": "intensity"}
    return aliases.get(s, s)


def _resizes(steps: Any) -> bool:
    if isinstance(steps, list):
        return any(_resizes(s) for s in steps)
    if isinstance(steps, Mapping):
        if steps.get("type") == "resize":
            return True
        if steps.get("type") == "compose":
            return _resizes(steps.get("steps") or [])
    return False


def model_resizes(meta: Mapping[str, Any]) -> bool:
    """Whether the model folder's preprocessing resizes its inputs (any input size is then fine)."""
    pre = meta.get("preprocessing") or {}
    return isinstance(pre, Mapping) and _resizes(pre.get("steps"))


def _size_text(size: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in size)


def check_pixel_limit(n_values: int, where: str = "the input") -> None:
    """Refuse an input of more than :data:`MAX_PIXELS` values (count them from its header)."""
    if int(n_values) > MAX_PIXELS:
        raise MismatchError(
            f"{where} holds {int(n_values):,} values, over the limit of {MAX_PIXELS:,}: crop or "
            "downsample it first"
        )


def check_input_size(meta: Mapping[str, Any], spatial_shape: Sequence[int],
                     where: str = "the data", channels: int | None = None) -> None:
    """Refuse an input whose spatial size differs from the size recorded in ``model.json`` (unless
    the model's preprocessing resizes), or that holds more than :data:`MAX_PIXELS` values.

    ``spatial_shape`` can come from a file's header, so the check runs before the file is read.
    """
    shape = [int(s) for s in spatial_shape]
    check_pixel_limit(math.prod(shape) * int(channels or 1), where)
    inp = meta.get("input") or {}
    size = inp.get("size") if isinstance(inp, Mapping) else None
    if not isinstance(size, list) or not size or model_resizes(meta):
        return
    want = [int(s) for s in size]
    if len(want) == 1 and len(shape) > 1:
        want = want * len(shape)
    if len(want) == len(shape) and want != shape:
        raise MismatchError(
            f"the model takes {_size_text(want)} inputs but {where} is {_size_text(shape)}: "
            f"resize it to {_size_text(want)}, or use a model whose folder declares a resize "
            "(medrobust train --input-size)"
        )


def _generic(names: Sequence[str]) -> bool:
    return all(str(n).strip().isdigit() for n in names)


def check_model_data(
    meta: Mapping[str, Any],
    *,
    channels: int | None = None,
    spatial_shape: Sequence[int] | None = None,
    units: str | None = None,
    value_range: tuple[float, float] | None = None,
    class_names: Sequence[str] | None = None,
    num_classes: int | None = None,
    where: str = "the data",
) -> None:
    """Raise :class:`MismatchError` when data described by the arguments cannot go into the model
    described by ``meta`` (a ``model.json`` dict). Only what is given is checked:

    * ``channels``: the number of input channels;
    * ``spatial_shape``: the size recorded in the folder (see :func:`check_input_size`);
    * ``units`` and ``value_range``: the same units; values of [0, 1] data on a model with a wide
      range such as Hounsfield units, or values far outside the model's bounds;
    * ``class_names`` / ``num_classes``: the same number of classes, with the same names
      (names that are only indices, such as ``"0"``, ``"1"``, are not compared).
    """
    inp = meta.get("input") or {}
    inp = inp if isinstance(inp, Mapping) else {}
    want_c = inp.get("channels")
    if channels is not None and isinstance(want_c, int) and want_c != int(channels):
        fix = ("convert the images to gray" if want_c == 1 else
               f"give {want_c}-channel images" if int(channels) == 1 else
               f"give {want_c}-channel images")
        raise MismatchError(
            f"the model takes {want_c}-channel inputs but {where} has {int(channels)} "
            f"channel(s): {fix}, or use a model trained on {int(channels)}-channel data"
        )
    if spatial_shape is not None:
        want_d = inp.get("spatial_dims")
        if isinstance(want_d, int) and want_d != len(spatial_shape):
            raise MismatchError(
                f"the model takes {want_d}D inputs but {where} is {len(spatial_shape)}D "
                f"({_size_text(spatial_shape)}): use a {len(spatial_shape)}D model"
            )
        check_input_size(meta, spatial_shape, where, channels)
    m_units = inp.get("units")
    bounds = inp.get("bounds")
    if units and m_units and _canonical_units(units) != _canonical_units(m_units):
        raise MismatchError(
            f"the model takes inputs in {m_units} but {where} is in {units}: give the data in "
            f"{m_units} (or use a model trained on {units})"
        )
    if value_range is not None and isinstance(bounds, list) and len(bounds) == 2:
        lo, hi = float(bounds[0]), float(bounds[1])
        vlo, vhi = float(value_range[0]), float(value_range[1])
        span = hi - lo
        if span > 10.0 and vlo >= -1e-6 and vhi <= 1.0 + 1e-6:
            raise MismatchError(
                f"the model takes {m_units or 'values'} in [{lo:g}, {hi:g}] but {where} lies in "
                f"[{vlo:g}, {vhi:g}], like [0, 1] intensities: give the data in the model's units"
                + (" (HU for CT)" if _canonical_units(m_units) == "hu" else "")
            )
        if vlo < lo - 0.5 * span or vhi > hi + 0.5 * span:
            raise MismatchError(
                f"{where} lies in [{vlo:g}, {vhi:g}], far outside the model's bounds "
                f"[{lo:g}, {hi:g}] {m_units or ''}".rstrip()
                + ": give it in the model's units (medrobust attack --rescale maps integer "
                "images into them)"
            )
    names = meta.get("class_names")
    k = len(names) if isinstance(names, list) and names else meta.get("num_classes")
    given_k = len(class_names) if class_names else num_classes
    if isinstance(k, int) and given_k is not None and k >= 2 and int(given_k) != k:
        raise MismatchError(
            f"the model has {k} classes but {where} has {int(given_k)}: use a model trained "
            "on this data set"
        )
    if isinstance(names, list) and names and class_names and len(class_names) == len(names):
        if not (_generic(names) or _generic(class_names)) and [
            str(n).strip().lower() for n in names
        ] != [str(n).strip().lower() for n in class_names]:
            raise MismatchError(
                f"the model's classes ({', '.join(map(str, names))}) differ from {where}'s "
                f"({', '.join(map(str, class_names))}): use a model trained on this data set"
            )


def check_eps(eps: float, norm: str, bounds: tuple[float, float], numel: int,
              flag: str = "eps") -> None:
    """Refuse a budget that contains every valid input: L-inf ``eps >= hi - lo``; L2 above
    ``(hi - lo) * sqrt(numel)``; L1 above ``(hi - lo) * numel`` (the norms of an all-ones input
    times the span)."""
    span = float(bounds[1]) - float(bounds[0])
    norm = str(norm).lower()
    if norm == "linf":
        limit, word = span, "at or above"
        bad = float(eps) >= span
    else:
        limit = span * (math.sqrt(numel) if norm == "l2" else float(numel))
        word = "above"
        bad = float(eps) > limit
    if bad:
        raise MismatchError(
            f"{flag} {float(eps):g} is {word} {limit:g}, the {norm} size of the whole input range "
            f"[{float(bounds[0]):g}, {float(bounds[1]):g}]: every input is then reachable and the "
            "result means nothing; give the budget in the model's units (e.g. 8/255 for [0, 1] "
            "images, a few HU for CT)"
        )


def check_evaluation(model: Any, data: Any) -> None:
    """:func:`check_model_data` for ``evaluate(model, data)``: ``model`` a loaded model folder or
    its path (a bare :class:`~medrobust.Classifier` records nothing to compare, and passes),
    ``data`` an :class:`~medrobust.data.ImageData`."""
    import json
    import os
    from pathlib import Path

    from medrobust.data.streamed import value_range as _value_range

    meta: Any = getattr(model, "metadata", None)
    if isinstance(model, (str, os.PathLike)):
        try:
            meta = json.loads((Path(model) / "model.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return  # the loader reports a missing or broken folder
    images = getattr(data, "images", None)
    if not isinstance(meta, Mapping) or images is None or images.numel() == 0:
        return
    check_model_data(
        meta,
        channels=int(images.shape[1]),
        spatial_shape=tuple(int(s) for s in images.shape[2:]),
        units=getattr(data, "units", None),
        value_range=_value_range(images),
        class_names=list(getattr(data, "class_names", None) or []) or None,
        where="the data",
    )
