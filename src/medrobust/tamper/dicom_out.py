"""Writing a tampered volume as a DICOM series that says what it is (derived, never the original).

Every slice gets a new SOPInstanceUID, the series a new SeriesInstanceUID, ``ImageType``
DERIVED\\SECONDARY, a ``DerivationDescription`` and a ``SourceImageSequence`` pointing at the slice
it came from; the pixel data are written by :func:`medrobust.data.dicom.write_dicom` (rescale
inverted, values clipped to the stored range). The identity change lives in :func:`derive` only,
so that it can be replaced by the shared DICOM-derivation function of :mod:`medrobust.data.dicom`.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["derive", "write_tampered_series"]


def derive(datasets: list[Any], description: str) -> list[Any]:
    """Copies of ``datasets`` with a derived identity (see the module docstring)."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import generate_uid

    series = generate_uid()
    out = []
    for ds0 in datasets:
        ds = copy.deepcopy(ds0)
        src = Dataset()
        src.ReferencedSOPClassUID = ds0.get("SOPClassUID", "")
        src.ReferencedSOPInstanceUID = ds0.get("SOPInstanceUID", "")
        ds.SourceImageSequence = DicomSequence([src])
        uid = generate_uid()
        ds.SOPInstanceUID = uid
        if hasattr(ds, "file_meta"):
            ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.SeriesInstanceUID = series
        ds.ImageType = ["DERIVED", "SECONDARY"]
        ds.DerivationDescription = description[:1024]
        ds.SeriesDescription = ("TAMPERED " + str(ds0.get("SeriesDescription", "")))[:64]
        out.append(ds)
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
