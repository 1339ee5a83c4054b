"""Progress of long work: a tqdm bar in a terminal, a plain line per step when output is redirected.

Library code reports progress only where a caller switched it on, so ``import medrobust`` and a
plain attack call print nothing. The command line switches it on (:func:`shown`); a long loop adds
one line::

    for step in progress.track(range(self.binary_search_steps), "C&W binary search"):
        ...

and an engine that drives its own loop takes a callback::

    tick = progress.callback("evaluate", total=n_units)
    tick(1, "batch 3/10 pgd eps=2/255")   # one unit done
    tick.close()

Where the stream (stderr by default) is a terminal, the bar is tqdm's. Otherwise one line per
step, ``desc: 3/10 (30%) note``, at most one line every ``interval`` seconds (the first and the
last step always), so a log file shows that the run is alive without filling up.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any, TypeVar

__all__ = ["Progress", "callback", "enabled", "shown", "track"]

T = TypeVar("T")

_STATE = {"on": False, "interval": 10.0}


def enabled() -> bool:
    """Whether progress is shown (:func:`shown`, or ``MEDROBUST_PROGRESS=1`` in the environment)."""
    return bool(_STATE["on"]) or os.environ.get("MEDROBUST_PROGRESS", "") == "1"


@contextlib.contextmanager
def shown(on: bool = True, interval: float | None = None) -> Iterator[None]:
    """Show progress of the work inside the block (``on=False``: hide it); ``interval`` is the
    least number of seconds between two lines when the output is not a terminal."""
    before = dict(_STATE)
    _STATE["on"] = bool(on)
    if interval is not None:
        _STATE["interval"] = float(interval)
    try:
        yield
    finally:
        _STATE.update(before)


class Progress:
    """One task's progress: ``update(n, note)`` after each step, ``close()`` at the end."""

    def __init__(self, desc: str, total: int | None, *, unit: str = "step",
                 show: bool | None = None, file: IO[str] | None = None,
                 interval: float | None = None, leave: bool = False) -> None:
        self.desc = desc
        self.total = total
        self.unit = unit
        self.count = 0
        self.file = file if file is not None else sys.stderr
        self.show = enabled() if show is None else bool(show)
        self.interval = float(_STATE["interval"]) if interval is None else float(interval)
        self._last = -float("inf")
        self._bar: Any = None
        self._closed = False
        if self.show and _isatty(self.file):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, leave=leave, file=self.file,
                             dynamic_ncols=True)

    def update(self, n: int = 1, note: str = "") -> None:
        """``n`` more steps done; ``note`` says what (shown beside the bar or on the line)."""
        self.count += int(n)
        if not self.show:
            return
        if self._bar is not None:
            if note:
                self._bar.set_postfix_str(note, refresh=False)
            self._bar.update(int(n))
            return
        now = time.monotonic()
        last = self.total is not None and self.count >= self.total
        if self.count == int(n) or last or now - self._last >= self.interval:
            self._last = now
            self._line(note)

    def _line(self, note: str) -> None:
        if self.total:
            where = f"{self.count}/{self.total} ({100 * self.count / self.total:.0f}%)"
        else:
            where = f"{self.count} {self.unit}s"
        text = f"{self.desc}: {where}" + (f" {note}" if note else "")
        print(text, file=self.file, flush=True)

    def close(self) -> None:
        """End the task (the bar disappears; a redirected stream keeps its lines)."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()

    def __call__(self, n: int = 1, note: str = "") -> None:
        self.update(n, note)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def track(iterable: Iterable[T], desc: str, total: int | None = None, *, unit: str = "step",
          show: bool | None = None, file: IO[str] | None = None) -> Iterator[T]:
    """Yield the items of ``iterable``, showing one step per item (when progress is shown)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    bar = Progress(desc, total, unit=unit, show=show, file=file)
    try:
        for item in iterable:
            yield item
            bar.update(1)
    finally:
        bar.close()


def callback(desc: str, total: int | None = None, *, unit: str = "step",
             show: bool | None = None, file: IO[str] | None = None) -> Progress:
    """A :class:`Progress` to call as ``tick(n=1, note="")`` from a loop one does not own (the
    evaluation engine's units); ``tick.close()`` at the end."""
    return Progress(desc, total, unit=unit, show=show, file=file)


def _isatty(f: Any) -> bool:
    try:
        return bool(f.isatty())
    except (AttributeError, ValueError):
        return False
