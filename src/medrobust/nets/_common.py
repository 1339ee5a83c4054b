"""Argument checks shared by the reference networks."""

from __future__ import annotations


def check_args(name: str, in_channels: int, num_classes: int, spatial_dims: int) -> None:
    """Raise ``ValueError`` with a clear message when a network argument is invalid."""
    for arg, value, least in (("in_channels", in_channels, 1), ("num_classes", num_classes, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name}: {arg} must be an integer >= {least}; got {value!r}")
    if spatial_dims not in (2, 3):
        raise ValueError(f"{name}: spatial_dims must be 2 or 3; got {spatial_dims!r}")
