"""Images served batch by batch: the memory of a run does not grow with the data set.

An :class:`~medrobust.data.ImageData` holds its images either as one tensor (small data, as
always) or as an :class:`ImageSource`: an object with the tensor's ``shape``, ``dtype``, ``len``
and indexing, whose ``source[a:b]`` (or ``source[index_tensor]``) reads, decodes or generates
only those rows and returns an ordinary tensor. Everything that walks the data in batches (the
evaluation runner, the gallery, training) works on both unchanged.

Sources:

* :class:`ArraySource` — rows of a NumPy array, typically an uncompressed ``.npy`` opened with
  ``mmap_mode="r"`` (a MedMNIST split extracted once into medrobust's cache,
  :mod:`medrobust.data.extract`), converted per batch;
* :class:`FileSource` — one file per sample (image folders), read per batch;
* :class:`~medrobust.data.phantoms.PhantomSource` — phantoms generated per block of indices from
  a seed;
* :class:`IndexedSource` — a subset (``ImageData.subset``) of another source, still lazy.

Whole-data statistics never load the data: :func:`value_range` and :meth:`ImageSource.fingerprint`
come from what the source knows (a phantom's clamp, uint8 pixels / 255, the source file's
checksum), so each rank of a distributed run reads only the batches it computes. What would
need a pass over the data (:func:`value_range` of a source of unknown range, :func:`iter_chunks`)
is done chunk by chunk.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "ArraySource",
    "FileSource",
    "ImageSource",
    "IndexedSource",
    "Images",
    "is_streamed",
    "iter_chunks",
    "materialize",
    "value_range",
]

CHUNK_BYTES = 64 << 20  # bytes per chunk of a whole-data pass


class ImageSource(ABC):
    """Rows ``(N, C, *spatial)`` read on demand. Subclasses implement :meth:`rows` and
    :meth:`fingerprint` (and :meth:`known_range` when the range is known without reading)."""

    def __init__(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> None:
        self._shape = torch.Size(int(s) for s in shape)
        self._dtype = dtype

    # ----------------------------------------------------------------- what subclasses give
    @abstractmethod
    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` (``0 <= start <= stop <= len``) as a new tensor."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A sha256 naming this content (the same rows give the same fingerprint), computed
        without reading the rows."""

    def known_range(self) -> tuple[float, float] | None:
        """Bounds every value is known to lie in (finite), or ``None`` when only a pass over
        the data can tell."""
        return None

    # ----------------------------------------------------------------- the tensor's face
    @property
    def shape(self) -> torch.Size:
        return self._shape

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def dim(self) -> int:
        return len(self._shape)

    def size(self, d: int | None = None) -> Any:
        return self._shape if d is None else self._shape[d]

    def numel(self) -> int:
        return int(np.prod(self._shape, dtype=np.int64))

    def __len__(self) -> int:
        return int(self._shape[0])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={tuple(self._shape)}, dtype={self._dtype})"

    def __iter__(self) -> Iterator[torch.Tensor]:
        for chunk in iter_chunks(self):
            yield from chunk

    def __getitem__(self, index: Any) -> torch.Tensor:
        if isinstance(index, tuple):
            if not index:
                return self.to_tensor()
            head, rest = index[0], index[1:]
            out = self[head]
            if not rest:
                return out
            if isinstance(head, (int, np.integer)):
                return out[rest]
            return out[(slice(None), *rest)]
        n = len(self)
        if isinstance(index, torch.Tensor) and index.dim() == 0 and index.dtype != torch.bool:
            index = int(index)
        if isinstance(index, (int, np.integer)) and not isinstance(index, bool):
            i = int(index)
            if not -n <= i < n:
                raise IndexError(f"index {i} is out of range for {n} samples")
            i %= n
            return self.rows(i, i + 1)[0]
        if isinstance(index, slice):
            start, stop, step = index.indices(n)
            if step == 1:
                return self.rows(start, max(start, stop))
            return self.gather(torch.arange(start, stop, step))
        if index is None or index is Ellipsis:
            return self.to_tensor()[index]
        return self.gather(index)

    def gather(self, index: Any) -> torch.Tensor:
        """Rows ``index`` (ints, any order, repeats allowed; or a boolean mask), read in runs of
        consecutive indices."""
        idx = torch.as_tensor(np.asarray(index) if isinstance(index, list) else index)
        if idx.dtype == torch.bool:
            if idx.shape != (len(self),):
                raise IndexError(f"a mask of shape {tuple(idx.shape)} for {len(self)} samples")
            idx = idx.nonzero().flatten()
        idx = idx.reshape(-1).to(torch.int64)
        n = len(self)
        if idx.numel() and (int(idx.min()) < -n or int(idx.max()) >= n):
            raise IndexError(f"indices outside 0..{n - 1}")
        idx = idx % max(n, 1)
        uniq, inverse = torch.unique(idx, sorted=True, return_inverse=True)
        parts = []
        u = uniq.tolist()
        i = 0
        while i < len(u):
            j = i
            while j + 1 < len(u) and u[j + 1] == u[j] + 1:
                j += 1
            parts.append(self.rows(u[i], u[j] + 1))
            i = j + 1
        got = torch.cat(parts) if parts else torch.empty((0, *self._shape[1:]), dtype=self.dtype)
        return got[inverse]

    def to_tensor(self) -> torch.Tensor:
        """Every row in one tensor (what a small data set holds; avoid for large ones)."""
        return self.rows(0, len(self))

    def to(self, *args: Any, **kw: Any) -> torch.Tensor:
        """``to_tensor().to(...)``: the whole data set in memory."""
        return self.to_tensor().to(*args, **kw)

    def chunk_rows(self) -> int:
        """Rows per chunk of a whole-data pass (about :data:`CHUNK_BYTES`)."""
        row = max(1, int(np.prod(self._shape[1:], dtype=np.int64)) * self._dtype.itemsize)
        return max(1, CHUNK_BYTES // row)


Images = torch.Tensor | ImageSource  # what ImageData.images holds


def is_streamed(images: Any) -> bool:
    """Whether ``images`` is an :class:`ImageSource` (read on demand) rather than a tensor."""
    return isinstance(images, ImageSource)


def materialize(images: Images) -> torch.Tensor:
    """The images as one tensor (a source is read whole)."""
    return images.to_tensor() if isinstance(images, ImageSource) else images


def iter_chunks(images: Images, rows: int | None = None) -> Iterator[torch.Tensor]:
    """The images in consecutive chunks of ``rows`` rows (default: about 64 MiB each)."""
    n = int(images.shape[0])
    if rows is None:
        per = images.chunk_rows() if isinstance(images, ImageSource) else max(1, n)
    else:
        per = max(1, int(rows))
    for start in range(0, n, per):
        yield images[start:min(n, start + per)]


def value_range(images: Images) -> tuple[float, float]:
    """(min, max) of a tensor; for a source, the range it is known to lie in when it knows one
    (no data read), else the exact range computed chunk by chunk. NaN in the data gives NaN."""
    if isinstance(images, ImageSource):
        known = images.known_range()
        if known is not None:
            return float(known[0]), float(known[1])
    lo, hi = float("inf"), float("-inf")
    for chunk in iter_chunks(images):
        if chunk.numel() == 0:
            continue
        if not bool(torch.isfinite(chunk).all()):
            bad = chunk[~torch.isfinite(chunk)]
            if bool(torch.isnan(bad).any()):
                return float("nan"), float("nan")
        lo = min(lo, float(chunk.min()))
        hi = max(hi, float(chunk.max()))
    return lo, hi


# --------------------------------------------------------------------------- sources
class ArraySource(ImageSource):
    """Rows of a NumPy array (usually ``np.load(path, mmap_mode="r")``), each block passed through
    ``convert`` (array rows -> float tensor rows, e.g. uint8 HWC -> float32 CHW / 255).

    Args:
        array: the array, first axis the samples.
        convert: rows (a NumPy array) -> tensor (rows, C, *spatial).
        fingerprint: the content's sha256 (e.g. of the file it was extracted from and the
            conversion).
        known_range: the range ``convert`` guarantees, if any.
    """

    def __init__(self, array: np.ndarray, convert: Callable[[np.ndarray], torch.Tensor],
                 fingerprint: str, known_range: tuple[float, float] | None = None) -> None:
        self.array = array
        self.convert = convert
        self._fp = fingerprint
        self._range = known_range
        first = convert(np.array(array[:1])) if len(array) else None
        row_shape = tuple(first.shape[1:]) if first is not None else tuple(array.shape[1:])
        dtype = first.dtype if first is not None else torch.float32
        super().__init__((len(array), *row_shape), dtype)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self.convert(np.array(self.array[start:stop]))

    def fingerprint(self) -> str:
        return self._fp

    def known_range(self) -> tuple[float, float] | None:
        return self._range


class FileSource(ImageSource):
    """One file per sample, read with ``read`` (path -> tensor (C, *spatial)) when its batch is
    asked for. Every file must give ``shape`` (taken from the first file unless given); one that
    does not is named in the error.

    The fingerprint is taken from the files' paths, sizes and modification times (not their
    bytes: that would read every file on every rank); ``known_range`` is what ``read`` returns
    (e.g. (0, 1) for 8-bit images / 255)."""

    def __init__(self, paths: Sequence[str | Path], read: Callable[[Path], torch.Tensor],
                 shape: Sequence[int] | None = None,
                 known_range: tuple[float, float] | None = None,
                 error: type[Exception] = ValueError) -> None:
        self.paths = [Path(p) for p in paths]
        self.read = read
        self._range = known_range
        self._error = error
        if shape is None:
            if not self.paths:
                raise error("a file source needs at least one file")
            shape = tuple(read(self.paths[0]).shape)
        super().__init__((len(self.paths), *shape))

    def rows(self, start: int, stop: int) -> torch.Tensor:
        out = torch.empty((max(0, stop - start), *self.shape[1:]), dtype=self.dtype)
        for k, p in enumerate(self.paths[start:stop]):
            t = self.read(p)
            if tuple(t.shape) != tuple(self.shape[1:]):
                raise self._error(
                    f"{p}: shape {tuple(t.shape)} differs from {tuple(self.shape[1:])} of "
                    f"{self.paths[0]}; every sample of a streamed folder must have one shape"
                )
            out[k] = t
        return out

    def fingerprint(self) -> str:
        h = hashlib.sha256(f"files|{tuple(self.shape)}|".encode())
        for p in self.paths:
            try:
                st = p.stat()
                h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(f"{p}|missing\n".encode())
        return h.hexdigest()

    def known_range(self) -> tuple[float, float] | None:
        return self._range


class IndexedSource(ImageSource):
    """Rows ``index`` of another source (a subset that stays lazy)."""

    def __init__(self, base: ImageSource, index: torch.Tensor | slice | Sequence[int]) -> None:
        n = len(base)
        if isinstance(index, slice):
            idx = torch.arange(n)[index]
        else:
            idx = torch.as_tensor(np.asarray(index) if isinstance(index, list) else index)
            if idx.dtype == torch.bool:
                idx = idx.nonzero().flatten()
            idx = idx.reshape(-1).to(torch.int64)
            if idx.numel() and (int(idx.min()) < -n or int(idx.max()) >= n):
                raise IndexError(f"indices outside 0..{n - 1}")
            idx = idx % max(n, 1)
        self.base = base
        self.index = idx
        super().__init__((int(idx.numel()), *base.shape[1:]), base.dtype)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        sel = self.index[start:stop]
        if sel.numel() and bool((sel[1:] - sel[:-1] == 1).all()):
            a = int(sel[0])
            return self.base.rows(a, a + int(sel.numel()))
        return self.base.gather(sel)

    def fingerprint(self) -> str:
        h = hashlib.sha256(f"subset|{self.base.fingerprint()}|".encode())
        h.update(self.index.numpy().astype("<i8").tobytes())
        return h.hexdigest()

    def known_range(self) -> tuple[float, float] | None:
        return self.base.known_range()
