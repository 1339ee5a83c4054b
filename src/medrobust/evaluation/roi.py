"""The region of interest (ROI) of a dense evaluation: where the perturbation is allowed.

A segmenter's or a detector's evaluation may confine every attack to a region (the core's
``mask=``, e.g. a box around the structure, as an attacker who edits only the lesion's
neighbourhood). Three forms:

* ``None``: the whole volume;
* a mask tensor shared by every case: ``(*spatial)``, ``(C or 1, *spatial)`` or
  ``(1, C or 1, *spatial)``, nonzero where the perturbation is allowed;
* ``"box"`` or ``"box:M"``: per case, the bounding box of the foreground (label > 0) of the case's
  label map grown by ``M`` voxels on every side (default 4), clipped to the volume; a case without
  foreground gets the whole volume.

:func:`parse_roi` validates the argument once, :meth:`Roi.mask` builds a batch's mask from its
label maps, :meth:`Roi.describe` is what ``results.json`` and the report state.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from medrobust.data.streamed import ImageSource
from medrobust.evaluation.errors import EvaluationError
from medrobust.evaluation.util import tensor_sha256

__all__ = ["DEFAULT_BOX_MARGIN", "Roi", "parse_roi"]

DEFAULT_BOX_MARGIN = 4
"""Voxels added on every side of the foreground's bounding box by ``roi="box"``."""

_BOX = re.compile(r"^\s*box\s*(?::\s*(\d+)\s*)?$", re.IGNORECASE)


@dataclass(frozen=True)
class Roi:
    """A validated region of interest (see the module docstring)."""

    kind: str  # "none", "mask" or "box"
    shared: torch.Tensor | None = None  # (1, C or 1, *spatial) for kind "mask"
    margin: int = DEFAULT_BOX_MARGIN

    def mask(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        """The mask of a batch ``x`` ``(n, C, *spatial)`` with label maps ``(n, *spatial)``
        (``None`` for the whole volume); float, 1 where the perturbation is allowed."""
        if self.kind == "none":
            return None
        if self.kind == "mask":
            assert self.shared is not None
            return self.shared.to(device=x.device, dtype=x.dtype)
        return box_mask(labels, self.margin).unsqueeze(1).to(device=x.device, dtype=x.dtype)

    def key(self) -> str:
        """A text that identifies the ROI in the results store's unit hash."""
        if self.kind == "mask":
            assert self.shared is not None
            return f"mask:{tensor_sha256(self.shared)[:16]}"
        return "box:" + str(self.margin) if self.kind == "box" else "none"

    def describe(self, labels: torch.Tensor | None = None) -> dict[str, Any]:
        """``{"kind", "text", "margin", "fraction"}``: what the report states (``fraction``: the
        mean share of voxels inside the ROI, over ``labels``' cases when given)."""
        if self.kind == "none":
            return {"kind": "none", "text": "whole volume (no ROI mask)", "fraction": 1.0}
        if self.kind == "mask":
            assert self.shared is not None
            share = float((self.shared != 0).float().mean())
            return {"kind": "mask", "fraction": share,
                    "text": f"a mask given by the user, shared by every case ({100 * share:.1f}% "
                            "of the voxels)"}
        frac: float | None = (None if labels is None
                              else float(box_mask(labels, self.margin).float().mean()))
        text = (f"per case, the bounding box of the foreground grown by {self.margin} voxels"
                + ("" if frac is None else f" (on average {100 * frac:.1f}% of the voxels)"))
        return {"kind": "box", "margin": self.margin, "fraction": frac, "text": text}


def box_mask(labels: torch.Tensor, margin: int) -> torch.Tensor:
    """Per case, a boolean ``(n, *spatial)`` box around ``labels > 0`` grown by ``margin``
    (the whole volume where a case has no foreground)."""
    fg = labels > 0
    out = torch.zeros_like(fg)
    spatial = fg.shape[1:]
    for i in range(fg.shape[0]):
        pts = fg[i].nonzero()
        if pts.numel() == 0:
            out[i] = True
            continue
        lo = (pts.min(0).values - margin).clamp_min(0).tolist()
        hi = (pts.max(0).values + margin + 1).tolist()
        sl = [slice(int(a), min(int(b), int(s))) for a, b, s in zip(lo, hi, spatial, strict=True)]
        out[(i, *sl)] = True  # type: ignore[index]
    return out


def parse_roi(roi: Any, images: torch.Tensor | ImageSource) -> Roi:
    """Validate ``roi`` for ``images`` ``(N, C, *spatial)``.

    Raises:
        EvaluationError: an unknown text, a mask of the wrong shape, NaN, or an empty mask.
    """
    if roi is None:
        return Roi("none")
    if isinstance(roi, str):
        m = _BOX.match(roi)
        if m is None:
            raise EvaluationError(
                f"unknown roi {roi!r}; expected 'box' or 'box:<margin in voxels>' (a box around "
                "each case's foreground), a mask tensor, or None (the whole volume)"
            )
        return Roi("box", margin=int(m.group(1)) if m.group(1) else DEFAULT_BOX_MARGIN)
    if not isinstance(roi, torch.Tensor):
        raise EvaluationError(
            f"roi must be None, 'box[:margin]' or a mask tensor; got {type(roi).__name__}"
        )
    spatial = tuple(images.shape[2:])
    c = int(images.shape[1])
    t = roi.detach().to("cpu")
    while t.dim() < len(spatial) + 2:
        t = t.unsqueeze(0)
    ok = (t.dim() == len(spatial) + 2 and t.shape[0] == 1 and t.shape[1] in (1, c)
          and tuple(t.shape[2:]) == spatial)
    if not ok:
        raise EvaluationError(
            f"roi mask has shape {tuple(roi.shape)}; expected one mask for every case, "
            f"{spatial}, (1, {spatial}) or (1, {c} or 1, {spatial}) like the images "
            f"{tuple(images.shape)}"
        )
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise EvaluationError("roi mask contains NaN or Inf")
    t = (t != 0).float()
    if not bool(t.any()):
        raise EvaluationError("roi mask is empty: no voxel may be perturbed")
    return Roi("mask", shared=t)
