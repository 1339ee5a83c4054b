"""Attack budgets: parse ``"0,0.5/255,1/255,8/255"`` (or numbers) safely, without ``eval``."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction

from medrobust.evaluation.errors import EvaluationError

__all__ = ["Budget", "default_budgets", "large_budget", "parse_budget", "parse_budgets"]

_NUMBER = r"[+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_FRACTION = re.compile(rf"^\s*({_NUMBER})\s*(?:/\s*({_NUMBER}))?\s*$")


@dataclass(frozen=True)
class Budget:
    """One budget: its value in the model's input units and the label it was given as."""

    value: float
    label: str

    @property
    def key(self) -> str:
        """The exact text of the float (the key of stored results)."""
        return repr(float(self.value))


def parse_budget(item: str | float | int | Budget) -> Budget:
    """A :class:`Budget` from a number or a text ``"8/255"``, ``"0.5"``, ``"1e-3"``, ``"10"``.

    Raises:
        EvaluationError: anything but a finite number >= 0 or a fraction of two such numbers.
    """
    if isinstance(item, Budget):
        return item
    if isinstance(item, bool):
        raise EvaluationError(f"malformed eps {item!r}: expected a number")
    if isinstance(item, (int, float)):
        v = float(item)
        if not math.isfinite(v) or v < 0:
            raise EvaluationError(f"malformed eps {item!r}: budgets must be finite and >= 0")
        return Budget(v, f"{v:g}")
    if not isinstance(item, str):
        raise EvaluationError(f"malformed eps {item!r}: expected a number or a text like 8/255")
    m = _FRACTION.match(item)
    if m is None:
        raise EvaluationError(
            f"malformed eps {item!r}: expected a number (e.g. 0.01, 10) or a fraction (e.g. 8/255)"
        )
    try:
        num = Fraction(m.group(1))
        den = Fraction(m.group(2)) if m.group(2) is not None else Fraction(1)
    except (ValueError, ZeroDivisionError):
        raise EvaluationError(f"malformed eps {item!r}") from None
    if den == 0:
        raise EvaluationError(f"malformed eps {item!r}: division by zero")
    try:
        v = float(num / den)
    except OverflowError:
        raise EvaluationError(f"malformed eps {item!r}: too large") from None
    if not math.isfinite(v):
        raise EvaluationError(f"malformed eps {item!r}: not a finite number")
    return Budget(v, item.strip().replace(" ", ""))


def parse_budgets(items: str | Sequence[str | float | int | Budget]) -> list[Budget]:
    """Budgets from a comma-separated text or a sequence, sorted, duplicates removed."""
    if isinstance(items, str):
        parts: Iterable[str | float | int | Budget] = [p for p in items.split(",")]
        if any(not str(p).strip() for p in parts):
            raise EvaluationError(
                f"malformed eps list {items!r}: empty item (expected e.g. 0,1/255,2/255)"
            )
    else:
        parts = list(items)
    out: dict[float, Budget] = {}
    for p in parts:
        b = parse_budget(p)
        out.setdefault(b.value, b)
    if not out:
        raise EvaluationError("malformed eps list: no budget given")
    return [out[v] for v in sorted(out)]


def default_budgets(bounds: tuple[float, float], norm: str,
                    units: str | None = None) -> list[Budget]:
    """Budgets when none are given, from the model's units and bounds.

    L-inf: Hounsfield units (``units="HU"``): 0, 1, 2, 4, 8, 16 HU (CT noise is about 10 HU, so
    these run from invisible to the noise level); otherwise 0, 1, 2, 4, 8 /255 of the span (the
    usual sweep for [0, 1] images). L2 / L1: 0, 0.1, 0.25, 0.5, 1
    times the span.
    """
    span = float(bounds[1]) - float(bounds[0])
    hu = units is not None and str(units).strip().lower() in ("hu", "hounsfield")
    if norm == "linf":
        if hu:
            return [Budget(float(v), f"{v:g}") for v in (0, 1, 2, 4, 8, 16)]
        fr = [0, 1, 2, 4, 8]
        if span == 1.0:
            return [Budget(f / 255, f"{f}/255" if f else "0") for f in fr]
        return [Budget(span * f / 255, f"{span * f / 255:g}") for f in fr]
    return [Budget(span * f, f"{span * f:g}") for f in (0.0, 0.1, 0.25, 0.5, 1.0)]


def large_budget(bounds: tuple[float, float], norm: str, numel: int) -> Budget:
    """The budget of the large-eps sanity check: the whole input range, i.e. a ball that contains
    every valid input (L-inf: ``hi - lo``; L2: ``(hi - lo) sqrt(d)``; L1: ``(hi - lo) d``)."""
    span = bounds[1] - bounds[0]
    if norm == "linf":
        v = span
    elif norm == "l2":
        v = span * math.sqrt(numel)
    else:
        v = span * numel
    return Budget(float(v), f"{v:g} (whole range)")
