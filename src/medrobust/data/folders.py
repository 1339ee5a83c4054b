"""Image folders: PNG/JPEG (and other Pillow formats), one subfolder per class.

``root/<class>/<image>`` (``root/<split>/<class>/<image>`` when ``root/<split>`` exists). Classes
are the subfolder names in sorted order; images are read with Pillow, as gray (one channel) when
every image is gray and as RGB otherwise (or as ``mode`` says), scaled to [0, 1] (8-bit /255,
16-bit gray /65535), channel-first. Images must share one size unless ``size`` is given, which
resizes every image (bilinear) to it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from medrobust.data.base import ImageData
from medrobust.data.errors import DataError
from medrobust.data.streamed import FileSource

__all__ = ["IMAGE_EXTENSIONS", "is_image_folder", "load_image_folder"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")


def _class_dirs(root: Path) -> list[Path]:
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _images_in(folder: Path, extensions: Sequence[str]) -> list[Path]:
    exts = {e.lower() for e in extensions}
    return sorted(
        f for f in folder.rglob("*")
        if f.is_file() and f.suffix.lower() in exts and not f.name.startswith(".")
    )


def is_image_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder whose subfolders hold image files."""
    p = Path(path)
    if not p.is_dir():
        return False
    return any(_images_in(d, IMAGE_EXTENSIONS) for d in _class_dirs(p))


def _read(path: Path, mode: str, size: tuple[int, int] | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr16 = np.asarray(im, dtype=np.float64)
                if size is not None:
                    im2 = Image.fromarray(arr16.astype(np.float32), mode="F")
                    arr16 = np.asarray(
                        im2.resize((size[1], size[0]), Image.Resampling.BILINEAR),
                        dtype=np.float64,
                    )
                gray = np.clip(arr16 / 65535.0, 0.0, 1.0)
                if mode == "RGB":
                    return np.repeat(gray[None], 3, axis=0)
                return gray[None]
            conv = im.convert("L" if mode == "L" else "RGB")
            if size is not None:
                conv = conv.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            arr = np.asarray(conv, dtype=np.float64) / 255.0
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{path}: unreadable or corrupt image ({type(e).__name__}: {e})") from e
    return arr[None] if arr.ndim == 2 else np.moveaxis(arr, -1, 0)


def _is_gray(path: Path) -> bool:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{path}: unreadable or corrupt image ({type(e).__name__}: {e})") from e


def load_image_folder(
    root: str | os.PathLike[str],
    split: str | None = None,
    *,
    size: int | tuple[int, int] | None = None,
    mode: str | None = None,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    limit: int | None = None,
    class_names: Sequence[str] | None = None,
    stream: bool = False,
) -> ImageData:
    """Load ``root/<class>/*.png`` (or ``root/<split>/<class>/...``) into one ImageData.

    Args:
        root: the folder.
        split: a subfolder of ``root`` to use when it exists (``"train"``, ``"test"``, ...).
        size: resize every image to ``size`` (int: square; or (H, W)).
        mode: ``"L"`` (gray) or ``"RGB"``; default gray when every image is gray, else RGB.
        extensions: file suffixes taken as images.
        limit: keep only the first ``limit`` images (in class, then file-name order).
        class_names: the classes (subfolder names), in label order; default all subfolders,
            sorted.
        stream: read each batch's files when the batch is used
            (:class:`~medrobust.data.streamed.FileSource`) instead of every file now; the rows
            equal those of ``stream=False``; every image must then have the first one's size
            (or pass ``size``). Pass ``mode`` too to skip opening every file's header.

    Returns:
        ImageData (N, 1 or 3, H, W) float32 in [0, 1], labels int64 (N,), ``units="intensity"``,
        task ``"binary"`` for two classes else ``"multi-class"``; ``meta``: ``paths``, ``split``.

    Raises:
        DataError: missing folder, no class folders or no images, unreadable images,
            differing sizes without ``size``.
    """
    r = Path(root).expanduser()
    if not r.is_dir():
        raise DataError(f"{r}: folder not found")
    base = r / split if split is not None and (r / split).is_dir() else r
    if class_names is None:
        dirs = _class_dirs(base)
        names = [d.name for d in dirs]
    else:
        names = list(class_names)
        dirs = [base / n for n in names]
        for d in dirs:
            if not d.is_dir():
                raise DataError(f"{d}: class folder not found")
    if not dirs:
        raise DataError(f"{base}: no class subfolders (expected <root>/<class>/<image files>)")
    files: list[tuple[Path, int]] = []
    for k, d in enumerate(dirs):
        files += [(f, k) for f in _images_in(d, extensions)]
    if limit is not None:
        files = files[: max(0, int(limit))]
    if not files:
        raise DataError(f"{base}: no image files ({', '.join(extensions)}) in the class folders")
    if mode is None:
        mode = "L" if all(_is_gray(f) for f, _ in files) else "RGB"
    if mode not in ("L", "RGB"):
        raise ValueError(f"mode must be 'L' or 'RGB'; got {mode!r}")
    hw = (size, size) if isinstance(size, int) else (tuple(size) if size is not None else None)
    labels = torch.tensor([k for _, k in files], dtype=torch.int64)
    meta = {"format": "image-folder", "paths": [str(f) for f, _ in files], "split": split}
    if stream:
        chosen = mode

        def read(f: Path) -> torch.Tensor:
            return torch.from_numpy(_read(f, chosen, hw).astype(np.float32))  # type: ignore[arg-type]

        src = FileSource([f for f, _ in files], read, known_range=(0.0, 1.0), error=DataError)
        return ImageData(images=src, labels=labels, bounds=(0.0, 1.0), units="intensity",
                         task="binary" if len(names) == 2 else "multi-class", class_names=names,
                         spacing=None, source=str(base), meta={**meta, "stream": True})
    arrays = [_read(f, mode, hw) for f, _ in files]  # type: ignore[arg-type]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        first = arrays[0].shape
        odd = next(f for (f, _), a in zip(files, arrays, strict=True) if a.shape != first)
        raise DataError(
            f"{odd}: image size {next(s for s in shapes if s != first)[1:]} differs from "
            f"{first[1:]} of {files[0][0]}; pass size= to resize"
        )
    images = torch.from_numpy(np.stack(arrays).astype(np.float32))
    return ImageData(
        images=images,
        labels=labels,
        bounds=(0.0, 1.0),
        units="intensity",
        task="binary" if len(names) == 2 else "multi-class",
        class_names=names,
        spacing=None,
        source=str(base),
        meta=meta,
    )
