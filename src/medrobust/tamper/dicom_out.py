"""Writing a tampered volume as a DICOM series that says what it is (derived, never the original).

Every slice gets a new SOPInstanceUID, the series a new SeriesInstanceUID, ``ImageType``
DERIVED\\SECONDARY, a ``DerivationDescription`` and a ``SourceImageSequence`` pointing at the slice
it came from; the pixel data are written by :func:`medrobust.data.dicom.write_dicom` (rescale
inverted, values clipped to the stored range). The identity change lives in :func:`derive` only,
so that it can be replaced by the shared DICOM-derivation function of :mod:`medrobust.data.dicom`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["derive", "write_tampered_series"]


def derive(datasets: list[Any], description: str) -> list[Any]:
    """Copies of ``datasets`` with a derived identity (:func:`medrobust.data.dicom.mark_derived`:
    new SOP and Series UIDs, ``DERIVED\\SECONDARY``, ``DerivationDescription``,
    ``SourceImageSequence``) and a series description that says the series was tampered with."""
    from medrobust.data.dicom import mark_derived

    out = mark_derived(datasets, description)
    for ds, ds0 in zip(out, datasets, strict=True):
        ds.SeriesDescription = ("TAMPERED " + str(ds0.get("SeriesDescription", "")))[:64]
    return out


def write_tampered_series(
    out: str | os.PathLike[str], volume_hu: torch.Tensor, meta: dict[str, Any], description: str
) -> list[Path]:
    """Write ``volume_hu`` (D, H, W) into the new folder ``out`` as a derived copy of the series
    whose ``load_dicom`` metadata is ``meta``."""
    from medrobust.data.dicom import write_dicom

    derived = dict(meta)
    derived["datasets"] = derive(list(meta["datasets"]), description)
    return write_dicom(out, volume_hu, derived)
