"""Cutting cubes out of volumes and pasting them back (with CT-GAN's padding at the edges)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["check_location", "cut_cube", "paste_cube"]


def check_location(location: Sequence[int], shape: Sequence[int]) -> tuple[int, int, int]:
    """``(z, y, x)`` voxel indices inside a ``(D, H, W)`` volume, or a ``ValueError`` saying so."""
    if len(location) != 3:
        raise ValueError(f"the location must be three voxel indices z,y,x; got {list(location)}")
    loc = tuple(int(v) for v in location)
    if any(v != float(o) for v, o in zip(loc, location, strict=True)):
        raise ValueError(f"the location must be integer voxel indices; got {list(location)}")
    for axis, (v, s) in enumerate(zip(loc, shape, strict=True)):
        if not 0 <= v < s:
            raise ValueError(
                f"location {list(loc)} lies outside the volume of shape (slices, rows, columns) = "
                f"{tuple(shape)}: index {axis} ({'zyx'[axis]}={v}) must be in [0, {s - 1}]"
            )
    return loc  # type: ignore[return-value]


def _window(loc: int, cube: int, size: int) -> tuple[int, int, int, int]:
    """(src_lo, src_hi, dst_lo, dst_hi) of the cube centred on ``loc`` along one axis."""
    lo = loc - cube // 2
    hi = lo + cube
    s_lo, s_hi = max(lo, 0), min(hi, size)
    return s_lo, s_hi, s_lo - lo, s_hi - lo


def cut_cube(volume: torch.Tensor, location: Sequence[int], cube: int, fill: float) -> torch.Tensor:
    """The ``cube``^3 block of ``volume`` (D, H, W) centred on ``location`` (index ``cube // 2``
    of the block); parts outside the volume are ``fill`` (CT-GAN pads with air)."""
    out = torch.full((cube, cube, cube), float(fill), dtype=volume.dtype)
    win = [_window(v, cube, s) for v, s in zip(location, volume.shape, strict=True)]
    (a0, a1, b0, b1), (c0, c1, d0, d1), (e0, e1, f0, f1) = win
    out[b0:b1, d0:d1, f0:f1] = volume[a0:a1, c0:c1, e0:e1]
    return out


def paste_cube(
    volume: torch.Tensor, block: torch.Tensor, location: Sequence[int], weight: torch.Tensor
) -> torch.Tensor:
    """A copy of ``volume`` with ``weight * block + (1 - weight) * volume`` in the cube at
    ``location`` (the part inside the volume)."""
    out = volume.clone()
    cube = block.shape[0]
    win = [_window(v, cube, s) for v, s in zip(location, volume.shape, strict=True)]
    (a0, a1, b0, b1), (c0, c1, d0, d1), (e0, e1, f0, f1) = win
    w = weight[b0:b1, d0:d1, f0:f1].to(volume.dtype)
    old = out[a0:a1, c0:c1, e0:e1]
    out[a0:a1, c0:c1, e0:e1] = w * block[b0:b1, d0:d1, f0:f1].to(volume.dtype) + (1 - w) * old
    return out
