"""Read one image or volume in its own units and write a changed version back in the same format.

This is the format-dispatching layer under ``medrobust attack``: DICOM (``.dcm``, via
:mod:`medrobust.data.dicom`), NIfTI (``.nii`` / ``.nii.gz``, via :mod:`medrobust.data.nifti`),
PNG (Pillow) and NumPy (``.npy``). Format specifics stay in the data modules; what this module
adds is the *storage grid* of each file: the set of values the file can hold.

A file stores numbers of some type (DICOM's ``int16``, a PNG's ``uint8``, ...), mapped to the
user's units by ``value = stored * slope + intercept`` (DICOM's rescale, NIfTI's ``scl_slope``, a
PNG's ``1/255``). An adversarial image computed in float must be snapped to that grid before it
can be written, and rounding can push a perturbation past its budget. :meth:`Grid.snap` rounds and
then re-projects onto the budget *on the grid*, so that the file written satisfies
``|written - clean| <= eps`` exactly (``linf``), or ``||written - clean|| <= eps`` (``l2``, ``l1``),
with no tolerance.

A DICOM series (a folder of slices) is read as one volume and written back as a new folder of
slices under the original file names, each slice on its own rescale grid.

Layout: images are returned as ``(1, C, *spatial)`` float32 tensors. A PNG is ``(1, C, H, W)``
(``C`` = 1 gray, 3 RGB; an alpha channel is kept unchanged and not attacked); an ``.npy`` array is
read as ``(H, W)``, ``(C, H, W)`` / ``(D, H, W)`` (resolved by ``spatial_dims``) or
``(C, D, H, W)``; DICOM and NIfTI as their loaders give them.

Writing is atomic and never overwrites by accident: :func:`write_image` writes to a hidden
temporary file in the destination folder, and :func:`commit` moves it into place (refusing an
existing file unless ``overwrite``). A changed image says so: with ``derivation=`` (a text such as
``"medrobust 0.1.0: pgd linf eps=5 HU"``) a DICOM gets a derived identity
(:func:`medrobust.data.dicom.mark_derived`), a NIfTI header that text as its ``descrip``, a PNG a
``medrobust`` text chunk (``.npy`` has no place for it).

:func:`peek_size` reads only a file's header, so that an input too large to hold is refused before
it is read whole.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medrobust._files import apply_umask
from medrobust.data.errors import DataError
from medrobust.data.streamed import materialize

__all__ = [
    "FORMATS",
    "Grid",
    "ImageFile",
    "Rescale",
    "commit",
    "commit_dir",
    "format_of",
    "peek_size",
    "read_image",
    "rescale_for",
    "temp_path",
    "write_image",
]

#: the formats :func:`read_image` and :func:`write_image` handle, with their file name endings
FORMATS: dict[str, tuple[str, ...]] = {
    "dicom": (".dcm", ".dicom"),
    "nifti": (".nii.gz", ".nii"),
    "png": (".png",),
    "npy": (".npy",),
}


def format_of(path: str | os.PathLike[str], *, sniff: bool = True) -> str | None:
    """The format of ``path`` from its name (``None`` if unknown); with ``sniff``, a file with
    another name that starts with the DICOM preamble is ``"dicom"``."""
    name = Path(path).name.lower()
    for fmt, endings in FORMATS.items():
        if any(name.endswith(e) for e in endings):
            return fmt
    if sniff:
        from medrobust.data.dicom import is_dicom_file

        if is_dicom_file(path):
            return "dicom"
    return None


def peek_size(path: str | os.PathLike[str]) -> tuple[int, tuple[int, ...]]:
    """``(number of values, stored shape)`` of an image file or DICOM series folder, from its
    header only (the pixel data are not read).

    Raises:
        DataError: an unreadable header.
    """
    p = Path(path).expanduser()
    fmt = "dicom" if p.is_dir() else format_of(p)
    try:
        if fmt == "png":
            import warnings

            from PIL import Image

            limit = Image.MAX_IMAGE_PIXELS
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # Pillow's decompression-bomb warning
                    Image.MAX_IMAGE_PIXELS = None  # the caller applies its own limit
                    with Image.open(p) as im:
                        w, h = im.size
                        bands = len(im.getbands())
            finally:
                Image.MAX_IMAGE_PIXELS = limit
            return w * h * bands, (h, w, bands)
        if fmt == "npy":
            arr = np.load(p, mmap_mode="r", allow_pickle=False)
            shape = tuple(int(v) for v in arr.shape)
            return int(np.prod(shape)), shape
        if fmt == "nifti":
            import nibabel as nib

            header: Any = nib.load(str(p)).header
            shape = tuple(int(v) for v in header.get_data_shape())
            return int(np.prod(shape)), shape
        if fmt == "dicom":
            import pydicom

            files = [p] if p.is_file() else sorted(
                f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
            total, shape = 0, ()
            for f in files:
                if p.is_dir() and not (f.suffix.lower() == ".dcm" or _sniff_dicom(f)):
                    continue
                ds = pydicom.dcmread(f, stop_before_pixels=True)
                one = (int(ds.get("NumberOfFrames", 1) or 1), int(ds.get("Rows", 0)),
                       int(ds.get("Columns", 0)), int(ds.get("SamplesPerPixel", 1)))
                total += int(np.prod(one))
                shape = one
            return total, shape
    except Exception as e:
        raise DataError(f"{p}: cannot read the header ({type(e).__name__}: {e})") from e
    raise DataError(f"{p}: unknown image format")


def _sniff_dicom(path: Path) -> bool:
    from medrobust.data.dicom import is_dicom_file

    return is_dicom_file(path)


# --------------------------------------------------------------------------- the storage grid
@dataclass
class Grid:
    """The values a file can store.

    Integer storage (``float_dtype is None``): ``value = stored * slope + intercept`` with
    ``stored`` an integer in ``[stored_min, stored_max]``; ``slope`` and ``intercept`` are scalars
    or arrays broadcastable to the image (one per DICOM slice). Float storage: any value of
    ``float_dtype``.
    """

    slope: float | np.ndarray = 1.0
    intercept: float | np.ndarray = 0.0
    stored_min: float = -math.inf
    stored_max: float = math.inf
    float_dtype: np.dtype[Any] | None = None
    description: str = ""

    @property
    def step(self) -> float:
        """The smallest change the file can hold (0 for float storage)."""
        if self.float_dtype is not None:
            return 0.0
        return float(np.min(np.abs(np.asarray(self.slope, dtype=np.float64))))

    def value_range(self) -> tuple[float, float]:
        """The lowest and highest value the file can hold (over all slices)."""
        if self.float_dtype is not None:
            info = np.finfo(self.float_dtype)
            return float(info.min), float(info.max)
        s = np.asarray(self.slope, dtype=np.float64)
        b = np.asarray(self.intercept, dtype=np.float64)
        a, c = self.stored_min * s + b, self.stored_max * s + b
        return float(np.max(np.minimum(a, c))), float(np.min(np.maximum(a, c)))

    def exact(self, values: np.ndarray) -> np.ndarray:
        """``values`` (read from the file, maybe as float32) as the exact float64 grid values."""
        v = np.asarray(values, dtype=np.float64)
        if self.float_dtype is not None:
            return v.astype(self.float_dtype).astype(np.float64)
        s = np.asarray(self.slope, dtype=np.float64)
        b = np.asarray(self.intercept, dtype=np.float64)
        stored = np.clip(np.rint((v - b) / s), self.stored_min, self.stored_max)
        return stored * s + b

    def snap(
        self,
        clean: np.ndarray,
        adversarial: np.ndarray,
        eps: float,
        norm: str = "linf",
        bounds: tuple[float, float] = (-math.inf, math.inf),
    ) -> np.ndarray:
        """The grid value nearest ``adversarial`` whose change from ``clean`` stays within the
        budget and within ``bounds`` (``clean`` must be on the grid and within ``bounds``).

        ``linf``: round to the nearest stored value, then clip the change to the largest whole
        number of grid steps ``<= eps`` (so ``max |written - clean| <= eps``; in the file's
        stored units exactly, in float units up to the rounding of ``k * slope``, 1e-12
        relative: 8 levels of 1/255 are 8/255).
        ``l2``/``l1``: round to nearest; if that exceeds ``eps``, round every change toward zero
        (which never increases any norm), scaling the change down first if the float change itself
        was over budget.
        """
        c = np.asarray(clean, dtype=np.float64)
        d = np.asarray(adversarial, dtype=np.float64) - c
        lo, hi = float(bounds[0]), float(bounds[1])
        if self.float_dtype is not None:
            return self._snap_float(c, d, eps, norm, lo, hi)
        s = np.broadcast_to(np.asarray(self.slope, dtype=np.float64), c.shape)
        b = np.broadcast_to(np.asarray(self.intercept, dtype=np.float64), c.shape)
        s0 = np.rint((c - b) / s)
        steps = d / s  # change in stored units (may be negative for a negative slope)
        # the stored range and the bounds, as limits on the stored change
        v_lo, v_hi = (lo - b) / s, (hi - b) / s
        st_lo = np.maximum(np.ceil(np.minimum(v_lo, v_hi) - 1e-9), self.stored_min) - s0
        st_hi = np.minimum(np.floor(np.maximum(v_lo, v_hi) + 1e-9), self.stored_max) - s0
        if norm == "linf":
            k = np.floor(eps / np.abs(s) * (1 + 1e-12))
            r = np.clip(np.rint(steps), -k, k)
        else:
            r = np.rint(steps)
            if _norm(r * s, norm) > eps:
                total = _norm(d, norm)
                scale = min(1.0, eps / total) if total > 0 else 1.0
                r = np.trunc(steps * scale)
        r = np.clip(r, np.minimum(st_lo, 0), np.maximum(st_hi, 0))
        out = (s0 + r) * s + b
        return out

    def _snap_float(
        self, c: np.ndarray, d: np.ndarray, eps: float, norm: str, lo: float, hi: float
    ) -> np.ndarray:
        dt = self.float_dtype
        assert dt is not None
        scale = 1.0
        for _ in range(60):
            dd = d * scale
            if norm == "linf":
                dd = np.clip(dd, -eps, eps)
            out = np.clip(c + dd, lo, hi).astype(dt)
            # move every element whose stored change exceeds the budget one ulp toward clean
            for _ in range(4):
                delta = out.astype(np.float64) - c
                bad = np.abs(delta) > eps if norm == "linf" else np.zeros(c.shape, dtype=bool)
                bad |= (out.astype(np.float64) < lo) | (out.astype(np.float64) > hi)
                if not bad.any():
                    break
                out = np.where(bad, np.nextafter(out, c.astype(dt)), out)
            delta = out.astype(np.float64) - c
            ok_bounds = bool(((c + delta >= lo) & (c + delta <= hi)).all())
            if norm == "linf":
                if (np.abs(delta) <= eps).all() and ok_bounds:
                    return out.astype(np.float64)
            elif _norm(delta, norm) <= eps and ok_bounds:
                return out.astype(np.float64)
            scale *= 1 - 1e-6 if scale > 0.5 else 0.5
        return c.copy()


def _norm(d: np.ndarray, norm: str) -> float:
    if norm == "linf":
        return float(np.max(np.abs(d))) if d.size else 0.0
    if norm == "l2":
        return float(np.sqrt(np.sum(np.square(d))))
    if norm == "l1":
        return float(np.sum(np.abs(d)))
    raise ValueError(f"unknown norm {norm!r}")


# --------------------------------------------------------------------------- one file in memory
@dataclass
class ImageFile:
    """One image or volume read from a file, with what is needed to write it back.

    Attributes:
        path: the file read.
        format: ``"dicom"``, ``"nifti"``, ``"png"`` or ``"npy"``.
        values: float32 ``(1, C, *spatial)`` in the file's units (exact grid values).
        units: what the values mean (``"HU"`` for CT DICOM, ``"intensity"`` for PNG), or ``None``
            when the file does not say (NIfTI, ``.npy``: the caller states it).
        grid: the values the file can store (:class:`Grid`).
        shape: the stored array's own shape (to write back).
        meta: the template the writer needs (DICOM datasets, NIfTI affine/header, PNG mode and
            text chunks, ``.npy`` dtype).
        description: a short human description (``"DICOM CT int16, 128x128"``).
        exact: the clean values as float64 when float32 ``values`` are not exact (a float64
            ``.npy``); ``None`` when :meth:`Grid.exact` recovers them.
    """

    path: Path
    format: str
    values: torch.Tensor
    units: str | None
    grid: Grid
    shape: tuple[int, ...]
    meta: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    exact: np.ndarray | None = field(default=None, repr=False)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.values.shape[2:])

    @property
    def channels(self) -> int:
        return int(self.values.shape[1])

    def exact_values(self) -> np.ndarray:
        """The clean values as float64, exactly on the grid, shaped like :attr:`values`."""
        if self.exact is not None:
            return self.exact
        return self.grid.exact(self.values.numpy())


def read_image(
    path: str | os.PathLike[str],
    *,
    units: str | None = None,
    spatial_dims: int | None = None,
) -> ImageFile:
    """Read one image or volume (DICOM file or series folder, NIfTI, PNG, ``.npy``).

    Args:
        path: the file.
        units: for NIfTI and ``.npy``, the units the values are in (the file does not say).
        spatial_dims: 2 or 3; decides how a 3-axis ``.npy`` array is read
            (``(C, H, W)`` or ``(D, H, W)``).

    Raises:
        DataError: missing or unreadable file, unknown format, unsupported layout.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{p}: file not found")
    fmt = "dicom" if p.is_dir() else format_of(p)
    if fmt is None:
        raise DataError(
            f"{p}: unknown image format; expected "
            + ", ".join(e for ends in FORMATS.values() for e in ends)
        )
    if p.is_dir() and fmt != "dicom":
        raise DataError(f"{p}: is a folder")
    if fmt == "dicom":
        return _read_dicom(p)
    if fmt == "nifti":
        return _read_nifti(p, units)
    if fmt == "png":
        return _read_png(p)
    return _read_npy(p, units, spatial_dims)


def _read_dicom(p: Path) -> ImageFile:
    from medrobust.data.dicom import _stored_range, load_dicom

    data = load_dicom(p)
    meta = data.meta
    datasets = meta["datasets"]
    rescale = meta.get("rescale") or [(1.0, 0.0)]
    lo_s, hi_s = meta.get("stored_range", (-math.inf, math.inf))
    _, _, dtype = _stored_range(datasets[0])
    x = materialize(data.images)
    frames = int(datasets[0].get("NumberOfFrames", 1) or 1)
    if len(rescale) > 1:  # one (slope, intercept) per slice of a series: (1, 1, D, 1, 1)
        view = (1, 1, len(rescale)) + (1,) * (x.dim() - 3)
        slope: float | np.ndarray = np.array([r[0] for r in rescale]).reshape(view)
        intercept: float | np.ndarray = np.array([r[1] for r in rescale]).reshape(view)
    else:
        slope, intercept = float(rescale[0][0]), float(rescale[0][1])
    grid = Grid(slope=slope, intercept=intercept, stored_min=float(lo_s), stored_max=float(hi_s),
                description=f"DICOM {dtype.name} stored values")
    ds0 = datasets[0]
    shape = "x".join(str(s) for s in x.shape[2:])
    what = f"{len(datasets)} slices" if len(datasets) > 1 else (
        f"{frames} frames" if frames > 1 else "1 slice")
    desc = f"DICOM {ds0.get('Modality', '?')} {dtype.name}, {shape} ({what})"
    return ImageFile(
        path=p, format="dicom", values=x.contiguous(), units=data.units, grid=grid,
        shape=tuple(x.shape), meta=meta, description=desc,
    )


def _read_nifti(p: Path, units: str | None) -> ImageFile:
    from medrobust.data.nifti import load_nifti

    data = load_nifti(p, units=units or "unknown")
    meta = data.meta
    on_disk = np.dtype(meta.get("on_disk_dtype", "<f4"))
    slope, inter = meta.get("slope_inter", (None, None))
    if np.issubdtype(on_disk, np.integer):
        s = 1.0 if slope is None or not np.isfinite(slope) or slope == 0 else float(slope)
        i = 0.0 if inter is None or not np.isfinite(inter) else float(inter)
        info = np.iinfo(on_disk)
        grid = Grid(slope=s, intercept=i, stored_min=float(info.min), stored_max=float(info.max),
                    description=f"NIfTI {on_disk.name} stored values")
    else:
        # float on disk: write_nifti stores the values as they are (no scaling)
        grid = Grid(float_dtype=np.dtype(on_disk.name), description=f"NIfTI {on_disk.name}")
    x = materialize(data.images)
    shape = tuple(int(s) for s in meta["header"].get_data_shape())
    desc = f"NIfTI {on_disk.name}, {'x'.join(str(s) for s in shape)}"
    return ImageFile(
        path=p, format="nifti", values=x.contiguous(), units=units, grid=grid, shape=shape,
        meta=meta, description=desc,
    )


_PNG_MODES = {"L": 1, "I;16": 1, "I;16B": 1, "I;16L": 1, "I": 1, "RGB": 3, "LA": 1, "RGBA": 3}


def _read_png(p: Path) -> ImageFile:
    from PIL import Image

    try:
        with Image.open(p) as im:
            im.load()
            mode = im.mode
            info = dict(im.info)
            arr = np.asarray(im)
    except Exception as e:
        raise DataError(f"{p}: not a readable PNG ({type(e).__name__}: {e})") from e
    if mode not in _PNG_MODES:
        raise DataError(
            f"{p}: PNG mode {mode!r} is not supported (gray L / 16-bit I;16, RGB, LA, RGBA); "
            "a palette image cannot be attacked in its own pixels"
        )
    alpha = None
    if mode in ("LA", "RGBA"):
        alpha = arr[..., -1].copy()
        arr = arr[..., :-1]
        if mode == "LA":
            arr = arr[..., 0]
    if mode.startswith("I"):
        maxval = 65535.0 if (mode != "I" or arr.max(initial=0) > 255) else 255.0
        if mode == "I" and arr.min(initial=0) < 0:
            raise DataError(f"{p}: 32-bit signed PNG with negative values is not supported")
        bits = 16 if maxval > 255 else 8
    else:
        maxval, bits = 255.0, 8
    a = arr.astype(np.float64)
    t = torch.from_numpy(a / maxval).to(torch.float32)
    t = t.permute(2, 0, 1).unsqueeze(0) if t.dim() == 3 else t.reshape(1, 1, *t.shape)
    grid = Grid(slope=1.0 / maxval, intercept=0.0, stored_min=0.0, stored_max=maxval,
                description=f"{bits}-bit PNG levels (1/{int(maxval)})")
    text = {k: v for k, v in info.items() if isinstance(k, str) and isinstance(v, str)}
    meta = {"format": "png", "mode": mode, "maxval": maxval, "alpha": alpha, "text": text,
            "dpi": info.get("dpi"), "bits": bits}
    desc = f"PNG {mode} ({bits}-bit), {arr.shape[1]}x{arr.shape[0]}"
    return ImageFile(
        path=p, format="png", values=t.contiguous(), units="intensity", grid=grid,
        shape=tuple(arr.shape), meta=meta, description=desc,
    )


def _read_npy(p: Path, units: str | None, spatial_dims: int | None) -> ImageFile:
    try:
        arr = np.load(p, allow_pickle=False)
    except Exception as e:
        raise DataError(f"{p}: not a readable .npy array ({type(e).__name__}: {e})") from e
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "biuf":
        raise DataError(f"{p}: expected a numeric array; got dtype {getattr(arr, 'dtype', '?')}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise DataError(f"{p}: array holds NaN or infinite values")
    sd = spatial_dims or (3 if arr.ndim >= 4 else 2)
    shape = tuple(int(s) for s in arr.shape)
    a = arr.astype(np.float64) if arr.dtype.kind != "f" else arr
    if arr.ndim == 2:
        x = a.reshape(1, 1, *shape)
    elif arr.ndim == 3:
        x = a.reshape(1, *shape) if sd == 2 else a.reshape(1, 1, *shape)
    elif arr.ndim == 4:
        x = a.reshape(1, *shape) if sd == 3 else a
        if sd == 2 and shape[0] != 1:
            raise DataError(f"{p}: a 4-axis array for a 2D model must be (1, C, H, W); got {shape}")
    elif arr.ndim == 5 and shape[0] == 1:
        x = a
    else:
        raise DataError(
            f"{p}: array of shape {shape} is not one image (H, W), (C, H, W) or volume "
            "(D, H, W), (C, D, H, W)"
        )
    if arr.dtype.kind == "f":
        grid = Grid(float_dtype=np.dtype(arr.dtype.name), description=f"npy {arr.dtype.name}")
    elif arr.dtype.kind == "b":
        raise DataError(f"{p}: a boolean array cannot be perturbed")
    else:
        info = np.iinfo(arr.dtype)
        grid = Grid(slope=1.0, intercept=0.0, stored_min=float(info.min),
                    stored_max=float(info.max), description=f"npy {arr.dtype.name} values")
    t = torch.from_numpy(np.ascontiguousarray(x)).to(torch.float32)
    meta = {"format": "npy", "dtype": arr.dtype.str, "fortran": bool(np.isfortran(arr))}
    desc = f"npy {arr.dtype.name}, {'x'.join(str(s) for s in shape)}"
    return ImageFile(
        path=p, format="npy", values=t.contiguous(), units=units, grid=grid, shape=shape,
        meta=meta, description=desc, exact=np.asarray(x, dtype=np.float64),
    )


# --------------------------------------------------------------------------- writing
def temp_path(final: str | os.PathLike[str]) -> Path:
    """A fresh hidden file name beside ``final`` (same folder, same ending)."""
    out = Path(final)
    name = out.name
    ending = next((e for ends in FORMATS.values() for e in ends if name.lower().endswith(e)),
                  out.suffix)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp" + ending, dir=out.parent)
    os.close(fd)
    return Path(tmp)


def write_image(path: str | os.PathLike[str], values: np.ndarray, image: ImageFile, *,
                derivation: str | None = None, keep_uids: bool = False) -> Path:
    """Write ``values`` (grid values from :meth:`Grid.snap`, shaped like ``image.values``) to
    ``path`` in ``image``'s format, keeping everything but the pixel data.

    ``derivation``: a text saying how the image was made (see the module docstring); a DICOM
    then gets a derived identity (new UIDs unless ``keep_uids``). ``path`` is written directly
    (use :func:`temp_path` + :func:`commit` for an atomic, no-clobber write). Returns ``path``.
    """
    out = Path(path)
    v = np.asarray(values, dtype=np.float64)
    if not np.isfinite(v).all():
        raise DataError(f"{out}: image holds NaN or infinite values; nothing written")
    if image.format == "dicom":
        from medrobust.data.dicom import write_dicom

        if len(image.meta.get("datasets", [])) > 1 and out.exists():
            raise DataError(f"{out}: a DICOM series is written into a new folder; it exists")
        # one file, or a new folder of slices for a series
        write_dicom(out, v, image.meta, derivation=derivation, keep_uids=keep_uids)
        return out
    if image.format == "nifti":
        from medrobust.data.nifti import write_nifti

        meta = image.meta
        if derivation is not None:
            header = meta["header"].copy()
            header["descrip"] = derivation.encode("ascii", "replace")[:79]
            meta = {**meta, "header": header}
        return write_nifti(out, v, meta)
    if image.format == "png":
        return _write_png(out, v, image, derivation)
    if image.format == "npy":
        return _write_npy(out, v, image)
    raise DataError(f"{out}: cannot write format {image.format!r}")


def _stored_ints(v: np.ndarray, grid: Grid) -> np.ndarray:
    s = np.asarray(grid.slope, dtype=np.float64)
    b = np.asarray(grid.intercept, dtype=np.float64)
    return np.clip(np.rint((v - b) / s), grid.stored_min, grid.stored_max)


def _write_png(out: Path, v: np.ndarray, image: ImageFile, derivation: str | None = None) -> Path:
    from PIL import Image, PngImagePlugin

    meta = image.meta
    stored = _stored_ints(v, image.grid)[0]  # (C, H, W)
    hwc = np.moveaxis(stored, 0, -1)
    mode = meta["mode"]
    if mode in ("L", "LA"):
        arr = hwc[..., 0].astype(np.uint8)
    elif mode.startswith("I"):
        arr = hwc[..., 0].astype(np.uint16 if meta["bits"] == 16 else np.uint8)
    else:
        arr = hwc.astype(np.uint8)
    if meta.get("alpha") is not None:
        alpha = meta["alpha"].astype(np.uint8)
        arr = np.dstack([arr, alpha]) if arr.ndim == 2 else np.dstack([arr, alpha])
    if mode.startswith("I") and meta["bits"] == 16:
        im = Image.fromarray(arr.astype(np.uint16))
    elif mode == "I":
        im = Image.fromarray(arr.astype(np.uint8), mode="L").convert("I")
    else:
        im = Image.fromarray(arr, mode=mode)
    info = PngImagePlugin.PngInfo()
    text = dict(meta.get("text") or {})
    if derivation is not None:
        text["medrobust"] = derivation
    for k, val in text.items():
        with contextlib.suppress(Exception):
            info.add_text(k, val)
    kwargs: dict[str, Any] = {"pnginfo": info}
    if meta.get("dpi"):
        kwargs["dpi"] = meta["dpi"]
    try:
        im.save(out, format="PNG", **kwargs)
    except Exception as e:
        raise DataError(f"{out}: writing the PNG failed ({type(e).__name__}: {e})") from e
    return out


def _write_npy(out: Path, v: np.ndarray, image: ImageFile) -> Path:
    dtype = np.dtype(image.meta["dtype"])
    if dtype.kind == "f":
        arr = v.astype(dtype)
    else:
        arr = _stored_ints(v, image.grid).astype(dtype)
    arr = arr.reshape(image.shape)
    if image.meta.get("fortran"):
        arr = np.asfortranarray(arr)
    try:
        with open(out, "wb") as f:
            np.save(f, arr, allow_pickle=False)
    except OSError as e:
        raise DataError(f"{out}: writing failed ({e})") from e
    return out


def commit_dir(tmp: str | os.PathLike[str], final: str | os.PathLike[str],
               overwrite: bool) -> None:
    """Move the finished folder ``tmp`` to ``final`` (a DICOM series); an existing ``final`` is
    replaced only with ``overwrite`` (moved aside first, deleted once the new one is in place)."""
    t, f = Path(tmp), Path(final)
    apply_umask(t)
    if f.exists() or f.is_symlink():
        if not overwrite:
            raise FileExistsError(str(f))
        trash = Path(tempfile.mkdtemp(prefix=f".{f.name}.old-", dir=f.parent))
        os.rename(f, trash / "d")
        try:
            os.rename(t, f)
        except BaseException:
            os.rename(trash / "d", f)
            raise
        import shutil

        shutil.rmtree(trash, ignore_errors=True)
        return
    os.rename(t, f)


def commit(tmp: str | os.PathLike[str], final: str | os.PathLike[str], overwrite: bool) -> None:
    """Move the finished file ``tmp`` to ``final``; without ``overwrite`` an existing ``final``
    is never replaced (``FileExistsError``), even if it appeared while we were writing."""
    t, f = Path(tmp), Path(final)
    apply_umask(t)  # temporary files are private; the result gets the usual mode
    if overwrite:
        os.replace(t, f)
        return
    try:
        os.link(t, f)  # atomic, fails if f exists
    except FileExistsError:
        raise
    except OSError:  # no hard links on this file system
        if f.exists():
            raise FileExistsError(str(f)) from None
        os.replace(t, f)
        return
    os.unlink(t)


# --------------------------------------------------------------------------- rescaling
@dataclass(frozen=True)
class Rescale:
    """An affine map from a file's values to a model's: ``model = file * scale + offset``.

    ``medrobust attack --rescale`` uses it for integer images stored in other units than the
    model's (a uint8 ``.npy`` straight from MedMNIST for a [0, 1] model, a raw MR NIfTI): the
    attack runs in the model's units on :meth:`grid`, the file's own storage grid mapped through
    the rescale, and the result is mapped back with :meth:`to_file` and stored in the file's type.
    """

    scale: float
    offset: float
    source: tuple[float, float]
    description: str

    def to_model(self, values: np.ndarray) -> np.ndarray:
        return np.asarray(values, dtype=np.float64) * self.scale + self.offset

    def to_file(self, values: np.ndarray) -> np.ndarray:
        return (np.asarray(values, dtype=np.float64) - self.offset) / self.scale

    def grid(self, grid: Grid) -> Grid:
        """``grid`` in the model's units."""
        if grid.float_dtype is not None:
            raise DataError("a float image needs no rescale")
        s = np.asarray(grid.slope, dtype=np.float64) * self.scale
        b = np.asarray(grid.intercept, dtype=np.float64) * self.scale + self.offset
        return Grid(slope=s if s.ndim else float(s), intercept=b if b.ndim else float(b),
                    stored_min=grid.stored_min, stored_max=grid.stored_max,
                    description=f"{grid.description}, rescaled ({self.description})")


def rescale_for(image: ImageFile, bounds: tuple[float, float], mode: str = "auto") -> Rescale:
    """The :class:`Rescale` that maps ``image`` (integer storage) onto ``bounds``.

    ``mode``: ``"dtype"`` maps the stored type's whole range (0..255 for uint8) onto the bounds,
    ``"minmax"`` the image's own lowest and highest value; ``"auto"`` is ``"dtype"`` for 8-bit
    images and ``"minmax"`` for wider types (a raw MR NIfTI uses a small part of int16).

    Raises:
        DataError: a float image, a constant image with ``minmax``, an unknown mode.
    """
    if image.grid.float_dtype is not None:
        raise DataError(
            f"{image.path}: --rescale maps integer images; this one is stored as "
            f"{image.grid.float_dtype} (give it in the model's units)"
        )
    if mode not in ("auto", "dtype", "minmax"):
        raise DataError(f"unknown rescale mode {mode!r}; expected auto, dtype or minmax")
    if mode == "auto":
        mode = "dtype" if image.grid.stored_max - image.grid.stored_min <= 255 else "minmax"
    if mode == "dtype":
        src = image.grid.value_range()
    else:
        v = image.exact_values()
        src = (float(v.min()), float(v.max()))
    if not src[1] > src[0]:
        raise DataError(f"{image.path}: the image is constant ({src[0]:g}); nothing to rescale")
    lo, hi = float(bounds[0]), float(bounds[1])
    scale = (hi - lo) / (src[1] - src[0])
    return Rescale(scale=scale, offset=lo - src[0] * scale, source=src,
                   description=f"{mode}: [{src[0]:g}, {src[1]:g}] -> [{lo:g}, {hi:g}]")
