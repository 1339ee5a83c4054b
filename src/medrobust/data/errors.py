"""The one exception the data layer raises for bad input."""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """A data file or folder is missing, unreadable, or holds something other than expected.

    The message always names the file (or folder) and says what is wrong with it, so that the
    command line can print it as is, without a traceback.
    """
