"""Medical data in: MedMNIST, DICOM, NIfTI, image folders and built-in phantoms.

Every source returns an :class:`ImageData`; :func:`load_dataset` picks the source from a name or
a path. Large data are streamed: ``ImageData.images`` is then an :class:`ImageSource` read batch
by batch (:mod:`medrobust.data.streamed`). Bad input raises :class:`DataError` (a
``ValueError``) naming the file and the problem.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from medrobust.data.base import TASKS, ImageData
from medrobust.data.dicom import (
    CT_HU_RANGE,
    WINDOW_PRESETS,
    Window,
    apply_window,
    get_window,
    is_dicom_file,
    load_dicom,
    write_dicom,
)
from medrobust.data.errors import DataError
from medrobust.data.folders import is_image_folder, load_image_folder
from medrobust.data.medmnist import (
    MEDMNIST_INFO,
    default_cache_dir,
    download_medmnist,
    is_medmnist_name,
    load_medmnist,
    load_npz,
)
from medrobust.data.nifti import fit_shape, iter_msd, load_msd, load_nifti, write_nifti
from medrobust.data.phantoms import PhantomSource, make_phantoms, phantom_from_name
from medrobust.data.streamed import (
    ArraySource,
    FileSource,
    ImageSource,
    IndexedSource,
    is_streamed,
    iter_chunks,
    materialize,
    value_range,
)

__all__ = [
    "ArraySource",
    "CT_HU_RANGE",
    "DataError",
    "FileSource",
    "ImageData",
    "ImageSource",
    "IndexedSource",
    "MEDMNIST_INFO",
    "PhantomSource",
    "TASKS",
    "WINDOW_PRESETS",
    "Window",
    "apply_window",
    "default_cache_dir",
    "download_medmnist",
    "fit_shape",
    "get_window",
    "is_streamed",
    "iter_chunks",
    "iter_msd",
    "load_dataset",
    "load_dicom",
    "load_image_folder",
    "load_medmnist",
    "load_msd",
    "load_nifti",
    "load_npz",
    "make_phantoms",
    "materialize",
    "value_range",
    "write_dicom",
    "write_nifti",
]


def _is_phantom(name: str) -> bool:
    head = name.strip().lower().replace("_", "-").split("-")[0]
    return head in ("phantom", "phantom2d", "phantom3d")


def load_dataset(
    name_or_path: str | os.PathLike[str], split: str = "test", **kw: Any
) -> ImageData:
    """Load data from a name or a path, choosing the source:

    * ``phantom``, ``phantom3d``, ``phantom-ct``, ``phantom3d-ct``, ``phantom-seg``, ... :
      built-in phantoms (:func:`~medrobust.data.phantoms.phantom_from_name`; ``split`` picks
      a disjoint stream);
    * a MedMNIST name (``pneumoniamnist``, ``adrenalmnist3d_64``) that is not an existing path:
      :func:`load_medmnist` (local file or download);
    * an ``.npz`` file: :func:`load_npz`;
    * a ``.dcm`` file, a DICOM file without suffix, or a folder of DICOM files:
      :func:`load_dicom` (``split`` is ignored);
    * a ``.nii`` / ``.nii.gz`` file: :func:`load_nifti` (``split`` is ignored);
    * a folder with ``dataset.json`` or ``imagesTr/`` + ``labelsTr/`` (Medical Segmentation
      Decathlon): :func:`load_msd` (all training cases, padded to one shape);
    * a folder of class subfolders holding images: :func:`load_image_folder` (``split`` used when
      ``<folder>/<split>`` exists).

    Keyword arguments go to the chosen loader.

    Raises:
        DataError: a path that does not exist, or a name/path no source recognises.
    """
    s = os.fspath(name_or_path)
    p = Path(s).expanduser()
    if not p.exists():
        if _is_phantom(s):
            try:
                return phantom_from_name(s, split, **kw)
            except ValueError as e:
                raise DataError(str(e)) from e
        if is_medmnist_name(s):
            return load_medmnist(s, split, **kw)
        raise DataError(
            f"{s}: no such file or folder, and not a dataset name (MedMNIST subsets such as "
            "'pneumoniamnist' or 'adrenalmnist3d_64', or 'phantom', 'phantom3d', 'phantom-ct')"
        )
    lower = p.name.lower()
    if p.is_file():
        if lower.endswith(".npz"):
            return load_npz(p, split, **kw)
        if lower.endswith(".nii") or lower.endswith(".nii.gz"):
            return load_nifti(p, **kw)
        if lower.endswith(".dcm") or is_dicom_file(p):
            return load_dicom(p, **kw)
        raise DataError(f"{p}: unrecognised file type (expected .npz, .dcm, .nii or .nii.gz)")
    if (p / "dataset.json").is_file() or ((p / "imagesTr").is_dir() and (p / "labelsTr").is_dir()):
        return load_msd(p, **kw)
    files = [f for f in p.iterdir() if f.is_file() and not f.name.startswith(".")]
    if any(f.suffix.lower() == ".dcm" or is_dicom_file(f) for f in files):
        return load_dicom(p, **kw)
    if is_image_folder(p) or (p / split).is_dir():
        return load_image_folder(p, split, **kw)
    raise DataError(
        f"{p}: folder holds no DICOM series, no MSD dataset.json and no class subfolders of images"
    )
