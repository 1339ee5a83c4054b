"""DICOM in and out (pydicom): single images, series as volumes, Hounsfield units, windows.

Reading: :func:`load_dicom` takes one file (a 2D image, or a multi-frame file as a volume) or a
folder holding one series, whose slices are sorted into a volume along the slice normal by
``ImagePositionPatient`` (falling back to ``InstanceNumber``). Stored values are mapped through
the modality LUT, ``value = stored * RescaleSlope + RescaleIntercept``: for CT the result is in
Hounsfield units (``units="HU"``); MR gives ``"MR signal (arbitrary units)"``, PET its ``Units``
element, anything else ``"<Modality> value (rescaled)"``.

Bounds. For CT we use the clinical range ``CT_HU_RANGE = (-1024, 3071)`` (the 12-bit range of
most scanners: air at -1000, dense bone up to ~3000), widened to the data's own extremes when the
scan holds values outside it (padding outside the field of view such as -2048, metal), and never
beyond what the stored integer type can hold after rescale. So an attack bounded by ``bounds``
always produces an image :func:`write_dicom` can store. For other modalities the bounds are the
range the stored integer type (``BitsStored``, ``PixelRepresentation``) can represent after
rescale.

Input checks: a CT image without ``RescaleSlope``/``RescaleIntercept`` (whose stored values
cannot be read as HU), a ``RescaleSlope`` of 0, and pixel data that cannot be decoded (a
compressed transfer syntax without its codec) are :class:`DataError` naming the file, raised when
the file is read.

Writing: :func:`write_dicom` inverts the rescale, rounds, clips to the stored integer range and
replaces ``PixelData``; every other element is kept as read. A compressed file is written back
uncompressed (Explicit VR Little Endian). With ``derivation=`` (what ``medrobust attack`` passes),
the result is marked as a derived image by :func:`mark_derived`: new SOP Instance UIDs (and one new
Series Instance UID for a series), ``ImageType DERIVED\\SECONDARY``, a ``DerivationDescription``
and a ``SourceImageSequence`` pointing to the original instance, so that a PACS never takes it
for the original. Files are written to a temporary name and renamed when complete.

Windows: :func:`apply_window` maps values to [0, 1] with a linear ramp between
``center - width/2`` and ``center + width/2`` (pure torch, differentiable inside the window), with
presets in :data:`WINDOW_PRESETS`; :class:`Window` wraps it as an ``nn.Module``.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medrobust._files import apply_umask
from medrobust.data.base import ImageData
from medrobust.data.errors import DataError

__all__ = [
    "CT_HU_RANGE",
    "WINDOW_PRESETS",
    "Window",
    "apply_window",
    "get_window",
    "is_dicom_file",
    "load_dicom",
    "mark_derived",
    "write_dicom",
]

#: The clinical CT range in HU used as the default bounds of CT data (see the module docstring).
CT_HU_RANGE = (-1024.0, 3071.0)

#: Standard CT display windows, (center, width) in HU (as taught in radiology references such as
#: Radiopaedia "Windowing (CT)": brain W80/L40, lung W1500/L-600, mediastinum W350/L50,
#: bone W1800/L400, soft tissue W400/L40).
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "bone": (400.0, 1800.0),
    "soft_tissue": (40.0, 400.0),
}


def get_window(window: str | tuple[float, float]) -> tuple[float, float]:
    """(center, width) of a preset name (``"lung"``, ``"soft tissue"``, ...) or a custom pair."""
    if isinstance(window, str):
        key = window.strip().lower().replace(" ", "_").replace("-", "_")
        if key not in WINDOW_PRESETS:
            raise ValueError(
                f"unknown window {window!r}; presets: {', '.join(sorted(WINDOW_PRESETS))}"
            )
        return WINDOW_PRESETS[key]
    center, width = (float(v) for v in window)
    if not width > 0:
        raise ValueError(f"window width must be > 0; got {width}")
    return center, width


def apply_window(
    x: torch.Tensor, center: float | str | tuple[float, float], width: float | None = None
) -> torch.Tensor:
    """Map values (e.g. HU) to [0, 1]: 0 at ``center - width/2``, 1 at ``center + width/2``.

    ``apply_window(hu, "lung")``, ``apply_window(hu, (-600, 1500))`` or
    ``apply_window(hu, -600, 1500)``. Pure torch: differentiable, gradient ``1/width`` inside
    the window and 0 outside (where the output saturates).
    """
    if width is None:
        if isinstance(center, (int, float)):
            raise ValueError("give a width with a numeric center, or a preset name / pair")
        c, w = get_window(center)
    else:
        if isinstance(center, (str, tuple)):
            raise ValueError("give either a preset / (center, width) pair or center and width")
        c, w = get_window((float(center), float(width)))
    return ((x - (c - w / 2.0)) / w).clamp(0.0, 1.0)


class Window(torch.nn.Module):
    """:func:`apply_window` as a module (for a model's preprocessing)."""

    def __init__(self, window: str | tuple[float, float]) -> None:
        super().__init__()
        self.center, self.width = get_window(window)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_window(x, self.center, self.width)

    def extra_repr(self) -> str:
        return f"center={self.center}, width={self.width}"


def _pydicom() -> Any:
    try:
        import pydicom
    except ImportError as e:  # pragma: no cover - pydicom is a declared dependency
        raise ImportError("DICOM support needs pydicom: pip install pydicom") from e
    return pydicom


def is_dicom_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a file with the DICOM preamble (``DICM`` at byte 128)."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _read(path: Path) -> Any:
    pydicom = _pydicom()
    from pydicom.errors import InvalidDicomError

    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as e:
        raise DataError(f"{path}: not a DICOM file ({e})") from e
    except Exception as e:  # truncated or corrupt files raise many kinds of errors
        raise DataError(f"{path}: corrupt or truncated DICOM ({type(e).__name__}: {e})") from e
    return ds


def _stored_range(ds: Any) -> tuple[int, int, np.dtype[Any]]:
    """(min, max) representable by BitsStored/PixelRepresentation, and the numpy dtype."""
    bits_alloc = int(ds.BitsAllocated)
    bits_stored = int(ds.get("BitsStored", bits_alloc))
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    if bits_alloc not in (8, 16, 32):
        raise DataError(f"BitsAllocated={bits_alloc} is not supported (8, 16 or 32)")
    dtype = np.dtype(f"{'i' if signed else 'u'}{bits_alloc // 8}")
    if signed:
        return -(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1, dtype
    return 0, 2**bits_stored - 1, dtype


def _rescale(ds: Any) -> tuple[float, float]:
    slope = ds.get("RescaleSlope", None)
    intercept = ds.get("RescaleIntercept", None)
    return (float(slope) if slope not in (None, "") else 1.0,
            float(intercept) if intercept not in (None, "") else 0.0)


def _check_rescale(ds: Any, path: Path) -> None:
    """A CT needs both rescale elements (else its values are not HU); a slope of 0 maps every
    stored value to the intercept (and cannot be inverted to write the image back)."""
    modality = str(ds.get("Modality", "")).upper()
    missing = [k for k in ("RescaleSlope", "RescaleIntercept") if ds.get(k, None) in (None, "")]
    if modality == "CT" and missing and int(ds.get("SamplesPerPixel", 1)) == 1:
        raise DataError(
            f"{path}: a CT image without {' and '.join(missing)}: its stored values cannot be "
            "read as Hounsfield units; add the rescale elements the scanner used (often "
            "RescaleSlope 1, RescaleIntercept -1024)"
        )
    slope, _ = _rescale(ds)
    if slope == 0 or slope != slope:
        raise DataError(
            f"{path}: RescaleSlope is {ds.get('RescaleSlope')!r}: every stored value would map to "
            "the intercept; the file's rescale elements are broken"
        )


def _units(ds: Any) -> str:
    modality = str(ds.get("Modality", "")).upper()
    if modality == "CT":
        return "HU"
    if modality == "MR":
        return "MR signal (arbitrary units)"
    if modality == "PT" and ds.get("Units"):
        return f"PET {ds.Units}"
    rescale_type = ds.get("RescaleType")
    if rescale_type:
        return str(rescale_type)
    return f"{modality or 'DICOM'} value (rescaled)"


def _pixels(ds: Any, path: Path) -> np.ndarray:
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise DataError(f"{path}: DICOM has no pixel data (SOP class {ds.get('SOPClassUID', '?')})")
    try:
        arr = ds.pixel_array
    except Exception as e:
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        what = f"{ts.name} " if ts is not None and ts.is_compressed else ""
        detail = " ".join(str(e).split())[:300]
        raise DataError(
            f"{path}: cannot decode the {what}pixel data ({type(e).__name__}: {detail}); the file "
            "may be truncated, or compressed with a codec that is not installed"
        ) from e
    return np.asarray(arr)


def _slice_order(datasets: list[Any]) -> list[int]:
    """Order by position along the slice normal; else InstanceNumber; else as read."""
    try:
        iop = np.asarray(datasets[0].ImageOrientationPatient, dtype=np.float64)
        normal = np.cross(iop[:3], iop[3:])
        pos = [float(np.dot(normal, np.asarray(d.ImagePositionPatient, dtype=np.float64)))
               for d in datasets]
        if len(set(pos)) == len(pos):
            return sorted(range(len(datasets)), key=lambda i: pos[i])
    except (AttributeError, TypeError, ValueError, KeyError):
        pass
    try:
        inst = [int(d.InstanceNumber) for d in datasets]
        return sorted(range(len(datasets)), key=lambda i: inst[i])
    except (AttributeError, TypeError, ValueError):
        return list(range(len(datasets)))


def _bounds(ds: Any, values: torch.Tensor, units: str) -> tuple[float, float]:
    lo_s, hi_s, _ = _stored_range(ds)
    slope, intercept = _rescale(ds)
    a, b = lo_s * slope + intercept, hi_s * slope + intercept
    rep = (min(a, b), max(a, b))
    if units != "HU":
        return rep
    lo = min(CT_HU_RANGE[0], float(values.min())) if values.numel() else CT_HU_RANGE[0]
    hi = max(CT_HU_RANGE[1], float(values.max())) if values.numel() else CT_HU_RANGE[1]
    return max(lo, rep[0]), min(hi, rep[1])


def load_dicom(
    path: str | os.PathLike[str],
    *,
    label: int = -1,
    class_names: Sequence[str] | None = None,
    task: str = "binary",
    series_uid: str | None = None,
) -> ImageData:
    """Read a DICOM file or a folder holding one series.

    Args:
        path: a ``.dcm`` file, or a folder of slice files (files without the DICOM preamble,
            such as a README, are skipped).
        label: the class of the image, when known; ``-1`` (default) means unlabelled.
        class_names, task: carried into the :class:`ImageData` (DICOM files have no labels).
        series_uid: with a folder holding several series, the ``SeriesInstanceUID`` to read.

    Returns:
        ImageData with one sample: (1, 1, H, W) for one slice, (1, 1, D, H, W) for a series or a
        multi-frame file, (1, 3, H, W) for a colour image (no rescale). Values in the modality's
        units (``"HU"`` for CT), ``bounds`` as in the module docstring, ``spacing`` in mm
        ((row, col) or (slice, row, col)), and ``meta`` with ``datasets`` (the pydicom datasets,
        slice order), ``paths``, ``modality``, ``rescale`` (slope, intercept per slice),
        ``stored_range``, ``labelled``.

    Raises:
        DataError: missing file, not DICOM, corrupt or truncated, no pixel data, NaN values,
            a folder with no DICOM or with several series.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
        dicoms = [f for f in files if is_dicom_file(f) or f.suffix.lower() == ".dcm"]
        if not dicoms:
            raise DataError(f"{p}: folder holds no DICOM files")
        datasets = [_read(f) for f in dicoms]
        uids = {str(d.get("SeriesInstanceUID", "")) for d in datasets}
        if series_uid is not None:
            keep = [
                i for i, d in enumerate(datasets) if str(d.get("SeriesInstanceUID")) == series_uid
            ]
            if not keep:
                raise DataError(f"{p}: no slice of series {series_uid}; found {sorted(uids)}")
            datasets = [datasets[i] for i in keep]
            dicoms = [dicoms[i] for i in keep]
        elif len(uids) > 1:
            raise DataError(
                f"{p}: folder holds {len(uids)} series ({sorted(uids)}); pass series_uid="
            )
        order = _slice_order(datasets)
        datasets = [datasets[i] for i in order]
        paths = [dicoms[i] for i in order]
    else:
        datasets = [_read(p)]
        paths = [p]

    for d, f in zip(datasets, paths, strict=True):
        _check_rescale(d, f)
    arrays = [_pixels(d, f) for d, f in zip(datasets, paths, strict=True)]
    first = datasets[0]
    spp = int(first.get("SamplesPerPixel", 1))
    shapes = {a.shape for a in arrays}
    if len(arrays) > 1 and arrays[0].ndim != 2:
        raise DataError(f"{p}: a series of multi-frame or colour files is not supported")
    if len(shapes) > 1:
        raise DataError(f"{p}: slices of different shapes {sorted(shapes)}")
    rescale = [_rescale(d) for d in datasets]
    units = _units(first)
    if spp == 3:
        if len(arrays) != 1 or arrays[0].ndim != 3:
            raise DataError(f"{p}: colour series / multi-frame colour files are not supported")
        values = torch.from_numpy(arrays[0].astype(np.float32)).permute(2, 0, 1).unsqueeze(0)
        units = "pixel value (RGB)"
        rescale = [(1.0, 0.0)]
    else:
        vols = []
        for a, (slope, intercept) in zip(arrays, rescale, strict=True):
            vols.append(a.astype(np.float64) * slope + intercept)
        vol = np.stack(vols) if len(vols) > 1 else vols[0]
        values = torch.from_numpy(vol.astype(np.float32)).unsqueeze(0).unsqueeze(0)
    if not torch.isfinite(values).all():
        raise DataError(f"{p}: pixel data hold NaN or infinite values")

    try:
        lo_s, hi_s, _ = _stored_range(first)
    except DataError as e:
        raise DataError(f"{p}: {e}") from e
    bounds = (0.0, float(hi_s)) if spp == 3 else _bounds(first, values, units)

    spacing: tuple[float, ...] | None = None
    ps = first.get("PixelSpacing")
    if ps is not None:
        row_col = (float(ps[0]), float(ps[1]))
        if values.dim() == 5:
            dz: float | None = None
            if len(datasets) > 1:
                try:
                    a0 = np.asarray(datasets[0].ImagePositionPatient, dtype=np.float64)
                    a1 = np.asarray(datasets[1].ImagePositionPatient, dtype=np.float64)
                    dz = float(np.linalg.norm(a1 - a0))
                except (AttributeError, TypeError, ValueError):
                    dz = None
            if not dz:
                st = first.get("SpacingBetweenSlices") or first.get("SliceThickness")
                dz = float(st) if st else 1.0
            spacing = (dz, *row_col)
        else:
            spacing = row_col

    names = list(class_names) if class_names is not None else []
    return ImageData(
        images=values,
        labels=torch.tensor([int(label)], dtype=torch.int64),
        bounds=bounds,
        units=units,
        task=task,
        class_names=names,
        spacing=spacing,
        source=str(p),
        meta={
            "format": "dicom",
            "datasets": datasets,
            "paths": [str(f) for f in paths],
            "modality": str(first.get("Modality", "")),
            "rescale": rescale,
            "stored_range": (lo_s, hi_s),
            "labelled": label >= 0,
        },
    )


def mark_derived(
    datasets: Sequence[Any], description: str, *, keep_uids: bool = False
) -> list[Any]:
    """Copies of ``datasets`` (one image, or the slices of one series) marked as images derived
    from them, so that a changed image can never pass for the original in a PACS.

    Each copy gets (DICOM PS3.3 C.7.6.1, General Image module):

    * a new ``SOPInstanceUID`` (and the file meta's ``MediaStorageSOPInstanceUID`` equal to it);
    * a new ``SeriesInstanceUID``, one for all copies that shared a series;
    * ``ImageType`` ``DERIVED\\SECONDARY`` (further values, such as ``AXIAL``, kept);
    * ``DerivationDescription`` = ``description`` (cut to the 1024 characters of its VR);
    * ``SourceImageSequence``: one item referencing the original's SOP class and instance.

    Everything else is kept. ``keep_uids=True`` keeps the original SOP/Series/media UIDs (the
    copy then claims the original's identity: only for experiments that need it, never for
    files that may reach a PACS) and adds no self-referencing ``SourceImageSequence``;
    ``ImageType`` and ``DerivationDescription`` still mark it.

    Returns:
        The marked copies (the inputs are not modified).
    """
    _pydicom()  # a clear ImportError without pydicom
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import generate_uid

    text = str(description)[:1024]
    new_series: dict[str, str] = {}
    out = []
    for ds0 in datasets:
        ds = copy.deepcopy(ds0)
        image_type = list(ds0.get("ImageType", []) or [])
        image_type = ["DERIVED", "SECONDARY", *[str(v) for v in image_type[2:]]]
        ds.ImageType = image_type
        ds.DerivationDescription = text
        if not keep_uids:
            old_sop = ds0.get("SOPInstanceUID")
            old_class = ds0.get("SOPClassUID") or getattr(
                getattr(ds0, "file_meta", None), "MediaStorageSOPClassUID", None)
            sop = generate_uid()
            ds.SOPInstanceUID = sop
            if getattr(ds, "file_meta", None) is not None:
                ds.file_meta.MediaStorageSOPInstanceUID = sop
            series = str(ds0.get("SeriesInstanceUID", "") or "")
            if series not in new_series:
                new_series[series] = generate_uid()
            ds.SeriesInstanceUID = new_series[series]
            if old_sop:
                ref = Dataset()
                if old_class:
                    ref.ReferencedSOPClassUID = old_class
                ref.ReferencedSOPInstanceUID = old_sop
                ds.SourceImageSequence = DicomSequence([ref])
        out.append(ds)
    return out


def _to_stored(ds: Any, values: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    lo, hi, dtype = _stored_range(ds)
    stored = np.rint((values.astype(np.float64) - intercept) / slope)
    stored = np.clip(stored, lo, hi).astype(dtype)
    ts = getattr(ds.file_meta, "TransferSyntaxUID", None) if hasattr(ds, "file_meta") else None
    little = True if ts is None else bool(ts.is_little_endian)
    return stored.astype(dtype.newbyteorder("<" if little else ">"))


def _uncompressed(ds: Any, where: Path) -> Any:
    """``ds`` itself when its pixel data are uncompressed, else a decompressed copy (Explicit VR
    Little Endian; its pixel data are replaced by the writer anyway)."""
    meta = getattr(ds, "file_meta", None)
    ts = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    if ts is None or not ts.is_compressed:
        return ds
    out = copy.deepcopy(ds)
    try:
        out.decompress()
    except Exception as e:
        raise DataError(
            f"{where}: cannot write back the {ts.name} compressed template uncompressed "
            f"({type(e).__name__}: {e})"
        ) from e
    return out


def _write_one(ds: Any, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            ds.save_as(f)
        apply_umask(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_dicom(
    path: str | os.PathLike[str],
    image_in_units: torch.Tensor | np.ndarray,
    template_meta: dict[str, Any] | ImageData,
    *,
    derivation: str | None = None,
    keep_uids: bool = False,
) -> list[Path]:
    """Write an image (in the units :func:`load_dicom` gave) back as DICOM, pixel data changed.

    The rescale is inverted (``stored = round((value - intercept) / slope)``), values are
    clipped to the stored integer range and cast to the stored type; ``PixelData`` is replaced
    and every other element is kept as read. A compressed template is written uncompressed
    (Explicit VR Little Endian). With ``derivation`` (a text naming what changed the image), the
    files are marked as derived images with new identities (:func:`mark_derived`; ``keep_uids``
    keeps the original UIDs). Without it the UIDs are kept: the result then claims to be the
    original.

    Args:
        path: for a single-file template, the output file; for a series, an output folder
            (created if absent) receiving one file per slice under the original file names.
        image_in_units: (H, W), (1, H, W) or (1, 1, H, W) for one slice; (D, H, W) up to
            (1, 1, D, H, W) for a volume; colour: (3, H, W) or (1, 3, H, W).
        template_meta: ``data.meta`` (or the :class:`ImageData`) returned by :func:`load_dicom`.

    Returns:
        The files written. Each is written to a temporary file and renamed when complete.

    Raises:
        DataError: NaN values, a shape that does not match the template.
    """
    meta = template_meta.meta if isinstance(template_meta, ImageData) else template_meta
    if "datasets" not in meta:
        raise DataError(f"{path}: template_meta holds no DICOM datasets (use load_dicom's meta)")
    datasets = meta["datasets"]
    rescale = meta.get("rescale") or [_rescale(d) for d in datasets]
    x = image_in_units.detach().cpu().numpy() if isinstance(image_in_units, torch.Tensor) \
        else np.asarray(image_in_units)
    out = Path(path).expanduser()
    if not np.isfinite(x).all():
        raise DataError(f"{out}: image holds NaN or infinite values; nothing written")
    datasets = [_uncompressed(ds, out) for ds in datasets]
    if derivation is not None:
        datasets = mark_derived(datasets, derivation, keep_uids=keep_uids)
    first = datasets[0]
    spp = int(first.get("SamplesPerPixel", 1))
    rows, cols = int(first.Rows), int(first.Columns)
    frames = int(first.get("NumberOfFrames", 1) or 1)

    if spp == 3:
        arr = x.reshape(-1, rows, cols) if x.size == 3 * rows * cols else None
        if arr is None:
            raise DataError(f"{out}: image of shape {x.shape} does not fit {rows}x{cols}x3")
        planar = int(first.get("PlanarConfiguration", 0))
        hwc = np.moveaxis(arr, 0, -1)
        stored = _to_stored(first, hwc if planar == 0 else arr, 1.0, 0.0)
        ds = copy.deepcopy(first)
        ds.PixelData = stored.tobytes()
        out.parent.mkdir(parents=True, exist_ok=True)
        _write_one(ds, out)
        return [out]

    n_slices = len(datasets) * frames
    if x.size != n_slices * rows * cols:
        raise DataError(
            f"{out}: image of shape {x.shape} does not fit the template "
            f"({n_slices} x {rows} x {cols})"
        )
    vol = x.reshape(n_slices, rows, cols)
    if len(datasets) == 1:
        slope, intercept = rescale[0]
        stored = _to_stored(first, vol if frames > 1 else vol[0], slope, intercept)
        ds = copy.deepcopy(first)
        ds.PixelData = stored.tobytes()
        out.parent.mkdir(parents=True, exist_ok=True)
        _write_one(ds, out)
        return [out]

    # a series: one file per slice, in a folder
    names = [Path(s).name for s in meta.get("paths", [])]
    if len(names) != len(datasets) or len(set(names)) != len(names):
        names = [f"slice_{i:04d}.dcm" for i in range(len(datasets))]
    parent = out.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent))
    try:
        for i, (ds0, (slope, intercept)) in enumerate(zip(datasets, rescale, strict=True)):
            ds = copy.deepcopy(ds0)
            ds.PixelData = _to_stored(ds0, vol[i], slope, intercept).tobytes()
            ds.save_as(tmp_dir / names[i])
        apply_umask(tmp_dir)
        if not out.exists():
            os.replace(tmp_dir, out)
        else:
            if not out.is_dir():
                raise DataError(f"{out}: exists and is not a folder; a series needs a folder")
            for name in names:
                os.replace(tmp_dir / name, out / name)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return [out / n for n in names]
