"""NIfTI in and out (nibabel): volumes with their affine and header, and segmentation pairs.

Axes. Arrays keep nibabel's voxel-index order ``(i, j, k)``: a 3D volume becomes
``(1, 1, I, J, K)`` and a 4D one ``(1, T, I, J, K)`` (the 4th axis as channels). ``spacing`` is the
header's voxel size in mm for ``(i, j, k)``. The affine and header are kept in ``meta`` so that
:func:`write_nifti` writes an image back in the same space.

Values are the file's scaled values (``scl_slope``/``scl_inter`` applied) as float32. NIfTI does
not say what a value means, so ``units`` is an argument (``"HU"`` for CT; the default
``"MR signal (arbitrary units)"`` fits MRI), and the default ``bounds`` are the data's own
(min, max): pass explicit bounds when a range has a physical meaning.

Segmentation sets in the Medical Segmentation Decathlon layout (``dataset.json``,
``imagesTr/``, ``labelsTr/``), such as Task04_Hippocampus, load in two ways, because their cases
have different shapes:

* :func:`load_msd` stacks the cases into one :class:`ImageData` after centre-padding (or
  centre-cropping) every case to one shape (default: the largest extent on each axis, so nothing
  is cropped). Padding uses the case's minimum intensity and the background label 0; each case's
  original shape and offset are kept in ``meta`` (``shapes``, ``offsets``) so a prediction can be
  cut back to the original voxels with :func:`fit_shape`.
* :func:`iter_msd` yields one :class:`ImageData` per case at its own shape, with its affine and
  header, for per-case evaluation or writing back.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medrobust._files import apply_umask
from medrobust.data.base import ImageData
from medrobust.data.errors import DataError
from medrobust.data.streamed import materialize

__all__ = [
    "fit_shape",
    "iter_msd",
    "load_msd",
    "load_nifti",
    "msd_cases",
    "read_nifti_array",
    "write_nifti",
]


def _nib() -> Any:
    try:
        import nibabel
    except ImportError as e:  # pragma: no cover - nibabel is a declared dependency
        raise ImportError("NIfTI support needs nibabel: pip install nibabel") from e
    return nibabel


def _is_nifti(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def read_nifti_array(
    path: str | os.PathLike[str], *, dtype: type[np.generic] = np.float32
) -> tuple[np.ndarray, Any]:
    """Read a NIfTI file's (scaled) voxel values and the image object (affine, header).

    Raises:
        DataError: missing, not NIfTI, corrupt or truncated file, NaN or infinite voxels.
    """
    nib = _nib()
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    try:
        img = nib.load(str(p))
    except Exception as e:
        raise DataError(f"{p}: not a readable NIfTI file ({type(e).__name__}: {e})") from e
    try:
        arr = np.asarray(img.dataobj, dtype=dtype)
    except Exception as e:  # EOFError, zlib.error, OSError, ValueError on short files
        raise DataError(f"{p}: corrupt or truncated NIfTI ({type(e).__name__}: {e})") from e
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise DataError(f"{p}: {bad} voxels are NaN or infinite")
    return arr, img


def _slope_inter(img: Any) -> tuple[float | None, float | None]:
    """The scaling nibabel applied on load (it moves scl_slope/scl_inter to the array proxy)."""
    slope = getattr(img.dataobj, "slope", None)
    inter = getattr(img.dataobj, "inter", None)
    slope = None if slope is None or not np.isfinite(slope) else float(slope)
    inter = None if inter is None or not np.isfinite(inter) else float(inter)
    if slope == 1.0 and inter in (0.0, None):
        return None, None
    return slope, inter


def _layout(arr: np.ndarray, path: Path) -> torch.Tensor:
    """(I,J,K) -> (1,1,I,J,K); (I,J,K,T) -> (1,T,I,J,K); (I,J) -> (1,1,I,J)."""
    t = torch.from_numpy(np.ascontiguousarray(arr))
    if arr.ndim == 2:
        return t.reshape(1, 1, *arr.shape)
    if arr.ndim == 3:
        return t.reshape(1, 1, *arr.shape)
    if arr.ndim == 4:
        return t.permute(3, 0, 1, 2).unsqueeze(0).contiguous()
    raise DataError(f"{path}: {arr.ndim}D NIfTI is not supported (2D, 3D or 4D)")


def load_nifti(
    path: str | os.PathLike[str],
    *,
    units: str = "MR signal (arbitrary units)",
    bounds: tuple[float, float] | None = None,
    label: int = -1,
    class_names: Sequence[str] | None = None,
    task: str = "binary",
    mask: str | os.PathLike[str] | None = None,
    mask_class_names: Sequence[str] | None = None,
) -> ImageData:
    """Read one NIfTI volume (``.nii`` / ``.nii.gz``).

    Args:
        path: the file.
        units: what a voxel value means (``"HU"`` for CT).
        bounds: the value range; default the volume's (min, max).
        label, class_names, task: classification target of the volume (``-1``: unlabelled).
        mask: a label volume of the same shape; then ``task="segmentation"`` and ``labels`` is
            the (1, I, J, K) integer mask, ``class_names`` = ``mask_class_names`` (default
            ``"0"``..``"K"`` from the largest label).

    Returns:
        ImageData (1, C, I, J, K) float32; ``meta``: ``affine`` (4x4 numpy), ``header`` (a copy
        of the nibabel header), ``path``, ``on_disk_dtype``, ``slope_inter``.
    """
    p = Path(path).expanduser()
    arr, img = read_nifti_array(p)
    images = _layout(arr, p)
    if bounds is None:
        bounds = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 1.0)
    meta: dict[str, Any] = {
        "format": "nifti",
        "affine": np.asarray(img.affine, dtype=np.float64).copy(),
        "header": img.header.copy(),
        "path": str(p),
        "on_disk_dtype": np.dtype(img.get_data_dtype()).str,
        "slope_inter": _slope_inter(img),
        "labelled": label >= 0 or mask is not None,
    }
    zooms = tuple(float(z) for z in img.header.get_zooms()[: min(arr.ndim, 3)])
    if mask is not None:
        m = _read_mask(Path(mask).expanduser(), arr.shape[:3], mask_class_names)
        names = list(mask_class_names) if mask_class_names is not None else [
            str(i) for i in range(max(int(m.max()) + 1, 2))
        ]
        labels = m.unsqueeze(0)
        task = "segmentation"
        meta["mask_path"] = str(mask)
    else:
        labels = torch.tensor([int(label)], dtype=torch.int64)
        names = list(class_names) if class_names is not None else []
    return ImageData(
        images=images,
        labels=labels,
        bounds=(float(bounds[0]), float(bounds[1])),
        units=units,
        task=task,
        class_names=names,
        spacing=zooms,
        source=str(p),
        meta=meta,
    )


def _read_mask(
    path: Path, shape: tuple[int, ...], class_names: Sequence[str] | None
) -> torch.Tensor:
    m, _ = read_nifti_array(path, dtype=np.float64)
    if m.shape != tuple(shape):
        raise DataError(f"{path}: mask shape {m.shape} differs from the image's {tuple(shape)}")
    if not np.all(m == np.round(m)):
        raise DataError(f"{path}: mask values must be whole numbers")
    mi = m.astype(np.int64)
    if mi.size and mi.min() < 0:
        raise DataError(f"{path}: negative mask values ({int(mi.min())})")
    if class_names is not None and mi.size and mi.max() >= len(class_names):
        raise DataError(
            f"{path}: mask labels outside the class range 0..{len(class_names) - 1} "
            f"(found {int(mi.max())})"
        )
    return torch.from_numpy(mi)


def write_nifti(
    path: str | os.PathLike[str],
    image: torch.Tensor | np.ndarray,
    template_meta: dict[str, Any] | ImageData,
    *,
    dtype: str | np.dtype[Any] | None = None,
) -> Path:
    """Write a volume back as NIfTI with the template's affine and header.

    Args:
        path: ``.nii`` or ``.nii.gz``.
        image: the volume in the units it was loaded in, any shape that squeezes to the
            template's (``(1, 1, I, J, K)``, ``(I, J, K)``, 4D as ``(1, T, I, J, K)``).
        template_meta: ``meta`` of :func:`load_nifti` / :func:`iter_msd` (or the ImageData).
        dtype: the on-disk type; default the template's. Integer types: values are rounded and
            clipped to the type's range (with the template's ``scl_slope``/``scl_inter`` inverted
            when it had them). Use ``"float32"`` to keep a perturbation exactly.

    The file is written under a temporary name in the same folder and renamed when complete.

    Raises:
        DataError: NaN values, a shape that does not fit the template, a bad file name.
    """
    nib = _nib()
    meta = template_meta.meta if isinstance(template_meta, ImageData) else template_meta
    out = Path(path).expanduser()
    if not _is_nifti(out):
        raise DataError(f"{out}: a NIfTI file name must end in .nii or .nii.gz")
    if "affine" not in meta or "header" not in meta:
        raise DataError(f"{out}: template_meta holds no affine/header (use load_nifti's meta)")
    x = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if not np.isfinite(x).all():
        raise DataError(f"{out}: image holds NaN or infinite values; nothing written")
    header = meta["header"].copy()
    shape = tuple(int(s) for s in header.get_data_shape())
    if x.size != int(np.prod(shape)):
        raise DataError(f"{out}: image of shape {x.shape} does not fit the template's {shape}")
    if len(shape) == 4:
        x = np.moveaxis(x.reshape(shape[3], *shape[:3]), 0, -1)
    else:
        x = x.reshape(shape)
    target = np.dtype(dtype) if dtype is not None else np.dtype(meta.get("on_disk_dtype", "<f4"))
    slope, inter = meta.get("slope_inter", (None, None))
    if np.issubdtype(target, np.integer):
        s = 1.0 if slope is None or not np.isfinite(slope) or slope == 0 else float(slope)
        i = 0.0 if inter is None or not np.isfinite(inter) else float(inter)
        info = np.iinfo(target)
        stored = np.clip(np.rint((x.astype(np.float64) - i) / s), info.min, info.max)
        data = stored.astype(target)
    else:
        s, i = 1.0, 0.0
        data = x.astype(target)
    header.set_data_dtype(target)
    img = nib.Nifti1Image(data, meta["affine"], header) if not isinstance(
        header, nib.Nifti2Header
    ) else nib.Nifti2Image(data, meta["affine"], header)
    img.header.set_slope_inter(s if (s, i) != (1.0, 0.0) else np.nan,
                               i if (s, i) != (1.0, 0.0) else np.nan)
    out.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if out.name.lower().endswith(".nii.gz") else ".nii"
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp" + suffix, dir=out.parent)
    os.close(fd)
    try:
        img.to_filename(tmp)
        apply_umask(tmp)
        os.replace(tmp, out)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{out}: writing failed ({type(e).__name__}: {e})") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


# ----------------------------------------------------------------------------- MSD folders


def msd_cases(root: str | os.PathLike[str]) -> tuple[list[tuple[Path, Path]], dict[str, Any]]:
    """The (image, label) pairs of an MSD-style folder's training set, and its ``dataset.json``.

    Pairs come from ``dataset.json``'s ``"training"`` list, sorted by file name; without a
    ``dataset.json``, from matching file names in ``imagesTr/`` and ``labelsTr/``.
    """
    r = Path(root).expanduser()
    if not r.is_dir():
        raise DataError(f"{r}: folder not found")
    desc_path = r / "dataset.json"
    desc: dict[str, Any] = {}
    pairs: list[tuple[Path, Path]] = []
    if desc_path.is_file():
        try:
            desc = json.loads(desc_path.read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"{desc_path}: unreadable dataset.json ({e})") from e
        for entry in desc.get("training", []):
            try:
                pairs.append((r / entry["image"], r / entry["label"]))
            except (KeyError, TypeError) as e:
                raise DataError(f"{desc_path}: bad 'training' entry {entry!r}") from e
    else:
        img_dir, lab_dir = r / "imagesTr", r / "labelsTr"
        if not img_dir.is_dir() or not lab_dir.is_dir():
            raise DataError(f"{r}: no dataset.json and no imagesTr/ + labelsTr/ folders")
        for f in sorted(img_dir.iterdir()):
            if _is_nifti(f) and not f.name.startswith("."):
                pairs.append((f, lab_dir / f.name))
    pairs.sort(key=lambda ab: ab[0].name)
    if not pairs:
        raise DataError(f"{r}: no training cases")
    return pairs, desc


def _desc_units(desc: dict[str, Any]) -> str:
    modality = " ".join(str(v) for v in (desc.get("modality") or {}).values()).upper()
    if "CT" in modality.split():
        return "HU"
    if "MR" in modality or "T1" in modality or "T2" in modality or "FLAIR" in modality:
        return "MR signal (arbitrary units)"
    return "intensity (scanner units)"


def _desc_classes(desc: dict[str, Any]) -> list[str] | None:
    labels = desc.get("labels")
    if not isinstance(labels, dict) or not labels:
        return None
    try:
        items = sorted((int(k), str(v)) for k, v in labels.items())
    except ValueError:
        return None
    return [v.lower() for _, v in items]


def _select(
    pairs: list[tuple[Path, Path]],
    limit: int | None,
    indices: Sequence[int] | None,
) -> list[tuple[int, tuple[Path, Path]]]:
    chosen = list(enumerate(pairs))
    if indices is not None:
        chosen = [(int(i), pairs[int(i)]) for i in indices]
    if limit is not None:
        chosen = chosen[: max(0, int(limit))]
    return chosen


def iter_msd(
    root: str | os.PathLike[str],
    *,
    limit: int | None = None,
    indices: Sequence[int] | None = None,
) -> Iterator[ImageData]:
    """One :class:`ImageData` per case of an MSD folder, each at its own shape.

    Each item: images (1, 1, I, J, K) float32, labels (1, I, J, K) int64 mask,
    ``task="segmentation"``, ``class_names`` from ``dataset.json``, ``meta`` with the affine,
    header and ``case`` (the image's file name without suffix).
    """
    pairs, desc = msd_cases(root)
    names = _desc_classes(desc)
    units = _desc_units(desc)
    for _, (img_path, lab_path) in _select(pairs, limit, indices):
        d = load_nifti(img_path, units=units, mask=lab_path, mask_class_names=names)
        d.meta["case"] = img_path.name.split(".")[0]
        yield d


def fit_shape(
    x: torch.Tensor, shape: Sequence[int], value: float = 0.0
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Centre-pad and/or centre-crop the last ``len(shape)`` axes of ``x`` to ``shape``.

    Returns the result and the offset of the input's first voxel in the output per axis
    (negative where it was cropped): ``fit_shape(y, original_shape)`` with the result of a
    prediction undoes it.
    """
    shape = tuple(int(s) for s in shape)
    k = len(shape)
    src = tuple(int(s) for s in x.shape[-k:])
    # symmetric rounding, so that fit_shape(fit_shape(x, big)[0], small) returns x exactly
    offsets = tuple(
        (t - s) // 2 if t >= s else -((s - t) // 2) for s, t in zip(src, shape, strict=True)
    )
    # crop
    sl = [slice(None)] * (x.dim() - k)
    for s, t, o in zip(src, shape, offsets, strict=True):
        sl.append(slice(-o, -o + t) if t < s else slice(None))
    x = x[tuple(sl)]
    # pad (F.pad wants last axis first)
    pad: list[int] = []
    for s, t, o in reversed(list(zip(src, shape, offsets, strict=True))):
        pad += [o, t - s - o] if t > s else [0, 0]
    if any(pad):
        if x.dtype.is_floating_point:
            x = torch.nn.functional.pad(x, pad, value=value)
        else:
            x = torch.nn.functional.pad(x.to(torch.float64), pad, value=value).to(x.dtype)
    return x.contiguous(), offsets


def load_msd(
    root: str | os.PathLike[str],
    *,
    shape: Sequence[int] | None = None,
    limit: int | None = None,
    indices: Sequence[int] | None = None,
    normalize: str = "none",
) -> ImageData:
    """Stack the cases of an MSD folder (image + mask pairs) into one segmentation ImageData.

    Args:
        root: the task folder (holding ``dataset.json``, ``imagesTr/``, ``labelsTr/``).
        shape: the common spatial shape; default the largest extent per axis over the cases
            loaded. Cases are centre-padded (image with its own minimum, mask with 0) or
            centre-cropped to it.
        limit, indices: load only some cases (in ``dataset.json``'s order sorted by name).
        normalize: ``"none"`` keeps each case's values (units from ``dataset.json``);
            ``"percentile"`` maps each case's 0.5th..99.5th percentile to [0, 1] and clips, and
            ``"minmax"`` its min..max, giving ``units="intensity"``, ``bounds=(0, 1)``. MSD
            cases can differ in scale by orders of magnitude (Task04: uint8 cases up to ~120,
            float32 cases up to ~1.7e6), so normalize before training on them together.

    Returns:
        ImageData: images (N, 1, I, J, K) float32, labels (N, I, J, K) int64, task
        ``"segmentation"``, bounds = (min, max) over the cases, ``meta`` with ``cases``,
        ``shapes`` (original), ``offsets`` (see :func:`fit_shape`), ``affines``, ``headers``,
        ``paths``.
    """
    r = Path(root).expanduser()
    cases = list(iter_msd(r, limit=limit, indices=indices))
    if not cases:
        raise DataError(f"{r}: no cases selected")
    shapes = [c.spatial_shape for c in cases]
    target = tuple(int(s) for s in shape) if shape is not None else tuple(
        max(s[a] for s in shapes) for a in range(len(shapes[0]))
    )
    if normalize not in ("none", "minmax", "percentile"):
        raise ValueError(f"normalize must be 'none', 'minmax' or 'percentile'; got {normalize!r}")
    imgs, labs, offsets = [], [], []
    for c in cases:
        if normalize != "none":
            v = materialize(c.images)
            if normalize == "percentile":
                lo, hi = torch.quantile(v.flatten().double(), torch.tensor([0.005, 0.995],
                                                                           dtype=torch.float64))
            else:
                lo, hi = v.min().double(), v.max().double()
            scale = float(hi - lo) if float(hi - lo) > 0 else 1.0
            c.images = ((v.double() - float(lo)) / scale).clamp(0, 1).to(torch.float32)
        vol = materialize(c.images)
        im, off = fit_shape(vol, target, value=float(vol.min()))
        lb, _ = fit_shape(c.labels, target, value=0)
        imgs.append(im)
        labs.append(lb)
        offsets.append(off)
    images = torch.cat(imgs)
    labels = torch.cat(labs)
    names = cases[0].class_names
    norm = normalize != "none"
    return ImageData(
        images=images,
        labels=labels,
        bounds=(0.0, 1.0) if norm else (float(images.min()), float(images.max())),
        units="intensity" if norm else cases[0].units,
        task="segmentation",
        class_names=list(names),
        spacing=cases[0].spacing,
        source=str(r),
        meta={
            "format": "msd",
            "normalize": normalize,
            "cases": [c.meta["case"] for c in cases],
            "shapes": shapes,
            "offsets": offsets,
            "affines": [c.meta["affine"] for c in cases],
            "headers": [c.meta["header"] for c in cases],
            "paths": [(c.meta["path"], c.meta["mask_path"]) for c in cases],
            "spacings": [c.spacing for c in cases],
        },
    )
