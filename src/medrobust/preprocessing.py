"""Differentiable preprocessing that lives inside the model wrapper, serialisable to JSON.

A :class:`medrobust.Classifier` takes a ``preprocess`` callable that runs before normalization, so
that an attack's budget stays in the user's units (DESIGN.md, principle 1): a CT scan is attacked
in Hounsfield units, and the intensity window that maps HU to [0, 1] is part of the model. Every
step here is an ``nn.Module`` that

* is differentiable (the window's clamp passes gradients inside the window, as ``torch.clamp``
  does; the resize is ``torch.nn.functional.interpolate``, bilinear/trilinear),
* works on any rank ``(N, C, *spatial)`` (1, 2 or 3 spatial axes),
* serialises to a JSON-ready dict with ``to_config()`` and back with :func:`from_config`.

Config format: a step is ``{"type": "window", "lo": ..., "hi": ...}`` or
``{"type": "resize", "size": [H, W], "mode": "auto"}``; a chain is
``{"type": "compose", "steps": [step, ...]}`` (a plain list of steps is accepted too).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class PreprocessingError(ValueError):
    """A preprocessing config or argument that cannot be used."""


def _finite(value: Any, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise PreprocessingError(f"{name} must be a number; got {value!r}") from None
    if not math.isfinite(v):
        raise PreprocessingError(f"{name} must be finite; got {value!r}")
    return v


class IntensityWindow(nn.Module):
    """Map the intensity window ``[lo, hi]`` linearly to ``[0, 1]`` and clamp outside it.

    Give either ``center``/``width`` (the radiology convention, e.g. lung window centre -600 HU,
    width 1500 HU) or ``lo``/``hi``. ``lo = center - width / 2``, ``hi = center + width / 2``.
    The clamp passes gradients inside the window and zero gradient outside, like a display window.
    """

    def __init__(
        self,
        center: float | None = None,
        width: float | None = None,
        *,
        lo: float | None = None,
        hi: float | None = None,
    ) -> None:
        super().__init__()
        if (center is None) != (width is None):
            raise PreprocessingError("window: give both center and width, or lo and hi")
        if center is not None and width is not None:
            if lo is not None or hi is not None:
                raise PreprocessingError("window: give center/width or lo/hi, not both")
            c, w = _finite(center, "window center"), _finite(width, "window width")
            lo_, hi_ = c - w / 2.0, c + w / 2.0
        else:
            if lo is None or hi is None:
                raise PreprocessingError("window: give center and width, or lo and hi")
            lo_, hi_ = _finite(lo, "window lo"), _finite(hi, "window hi")
        if not hi_ > lo_:
            raise PreprocessingError(f"window: needs lo < hi (width > 0); got [{lo_:g}, {hi_:g}]")
        self.lo = lo_
        self.hi = hi_

    @property
    def center(self) -> float:
        return (self.lo + self.hi) / 2.0

    @property
    def width(self) -> float:
        return self.hi - self.lo

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp((x - self.lo) / (self.hi - self.lo), 0.0, 1.0)

    def to_config(self) -> dict[str, Any]:
        return {"type": "window", "lo": self.lo, "hi": self.hi}

    def extra_repr(self) -> str:
        return f"lo={self.lo:g}, hi={self.hi:g}"


_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


class Resize(nn.Module):
    """Resize ``(N, C, *spatial)`` to ``size`` with ``torch.nn.functional.interpolate``.

    ``mode="auto"`` picks linear / bilinear / trilinear from the number of spatial axes;
    ``"nearest"`` and ``"area"`` are accepted too. ``align_corners=False``. Inputs already of
    the target size pass through unchanged.
    """

    def __init__(self, size: int | Sequence[int], mode: str = "auto") -> None:
        super().__init__()
        dims = [size] if isinstance(size, int) else list(size)
        if not dims or len(dims) > 3 or any(
            isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in dims
        ):
            raise PreprocessingError(
                f"resize: size must be 1 to 3 positive integers; got {size!r}"
            )
        if mode not in ("auto", "nearest", "area", "linear", "bilinear", "trilinear"):
            raise PreprocessingError(f"resize: unknown mode {mode!r}")
        self.size = tuple(int(s) for s in dims)
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = x.dim() - 2
        size = self.size * spatial if len(self.size) == 1 else self.size
        if len(size) != spatial:
            raise ValueError(
                f"resize to {list(self.size)} got an input of shape {tuple(x.shape)} "
                f"({spatial} spatial axes)"
            )
        if tuple(x.shape[2:]) == tuple(size):
            return x
        mode = _MODES[spatial] if self.mode == "auto" else self.mode
        if mode in ("nearest", "area"):
            return F.interpolate(x, size=size, mode=mode)
        return F.interpolate(x, size=size, mode=mode, align_corners=False)

    def to_config(self) -> dict[str, Any]:
        return {"type": "resize", "size": list(self.size), "mode": self.mode}

    def extra_repr(self) -> str:
        return f"size={list(self.size)}, mode={self.mode}"


class Compose(nn.Module):
    """Apply preprocessing steps in order."""

    def __init__(self, steps: Iterable[nn.Module] = ()) -> None:
        super().__init__()
        self.steps = nn.ModuleList(list(steps))
        for s in self.steps:
            if not hasattr(s, "to_config"):
                raise PreprocessingError(
                    f"compose: step {type(s).__name__} cannot be serialised (no to_config())"
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for step in self.steps:
            x = step(x)
        return x

    def __len__(self) -> int:
        return len(self.steps)

    def to_config(self) -> dict[str, Any]:
        return {"type": "compose", "steps": [s.to_config() for s in self.steps]}  # type: ignore[operator]


def from_config(config: dict[str, Any] | Sequence[dict[str, Any]] | None) -> nn.Module | None:
    """Rebuild a preprocessing step or chain from its ``to_config()`` dict.

    ``None`` and an empty chain give ``None`` (no preprocessing). Raises
    :class:`PreprocessingError` for an unknown step type or invalid arguments.
    """
    if config is None:
        return None
    if isinstance(config, (list, tuple)):
        config = {"type": "compose", "steps": list(config)}
    if not isinstance(config, dict):
        raise PreprocessingError(
            f"preprocessing config must be an object or a list; got {type(config).__name__}"
        )
    kind = config.get("type")
    args = {k: v for k, v in config.items() if k != "type"}
    try:
        if kind == "compose":
            steps = args.pop("steps", [])
            if args:
                raise PreprocessingError(f"compose: unknown key(s) {sorted(args)}")
            if not isinstance(steps, (list, tuple)):
                raise PreprocessingError("compose: 'steps' must be a list")
            built = [from_config(s) for s in steps]
            modules = [b for b in built if b is not None]
            return Compose(modules) if modules else None
        if kind == "window":
            return IntensityWindow(**args)
        if kind == "resize":
            return Resize(**args)
    except TypeError as err:  # unexpected keyword
        raise PreprocessingError(f"{kind}: invalid arguments {sorted(args)} ({err})") from None
    raise PreprocessingError(
        f"unknown preprocessing step type {kind!r}; expected 'window', 'resize' or 'compose'"
    )


def to_config(preprocess: nn.Module | None) -> dict[str, Any] | None:
    """The JSON config of a preprocessing module (``None`` for none)."""
    if preprocess is None:
        return None
    if not hasattr(preprocess, "to_config"):
        raise PreprocessingError(
            f"{type(preprocess).__name__} cannot be serialised; use the steps in "
            "medrobust.preprocessing (IntensityWindow, Resize, Compose)"
        )
    return preprocess.to_config()  # type: ignore[no-any-return, operator]


def output_size(preprocess: nn.Module | None) -> tuple[int, ...] | None:
    """The spatial size the last :class:`Resize` in ``preprocess`` produces, if any."""
    if preprocess is None:
        return None
    steps = list(preprocess.steps) if isinstance(preprocess, Compose) else [preprocess]
    for step in reversed(steps):
        if isinstance(step, Resize):
            return step.size
    return None


__all__ = [
    "Compose",
    "IntensityWindow",
    "PreprocessingError",
    "Resize",
    "from_config",
    "output_size",
    "to_config",
]
