"""MedMNIST v3 (MedMNIST v2 and MedMNIST+): every 2D and 3D subset, at every released size.

The facts below (file names, MD5 checksums, tasks, class names, split sizes, licenses) are copied
from ``medmnist/info.py`` of the MedMNIST package (repository ``MedMNIST/MedMNIST``, version
3.0.2), so that this module needs neither the ``medmnist`` package nor torchvision. The files live
on Zenodo, record 10519652: ``https://zenodo.org/records/10519652/files/<file>?download=1``.

File names: ``<flag>.npz`` for 28 px (28 voxels for 3D) and ``<flag>_<size>.npz`` for 64, 128 and
224 (2D) or 64 (3D). Each file holds ``{train,val,test}_{images,labels}``: uint8 images, (N, H, W)
gray, (N, H, W, 3) RGB or (N, D, H, W) 3D, and uint8 labels (N, 1), or (N, 14) for ChestMNIST.

Where a file is looked for, in order: the ``root`` argument, the folder in the environment
variable ``MEDROBUST_DATA``, the cache folder (``cache_dir`` argument, else ``MEDROBUST_CACHE``,
else ``~/.cache/medrobust``). When it is in none of them it is downloaded into the cache folder
(``download=True``, the default): written to a temporary file in that folder, checked against the
official MD5, and only then renamed to its final name. The server can be replaced (for a mirror or
a test) with the ``base_url`` argument or the ``MEDROBUST_MEDMNIST_URL`` environment variable.

Loading streams the one split asked for out of the zip archive, so ``limit`` (the first n) or
``indices`` keep memory at the size of what was asked for, even for the 224 px files.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from medrobust._files import apply_umask
from medrobust.data.base import ImageData
from medrobust.data.errors import DataError
from medrobust.data.streamed import ArraySource

__all__ = [
    "MEDMNIST_INFO",
    "MEDMNIST_URL",
    "MedMNISTInfo",
    "SPLITS",
    "default_cache_dir",
    "download_medmnist",
    "file_sha256",
    "find_medmnist",
    "is_medmnist_name",
    "load_medmnist",
    "load_npz",
    "medmnist_filename",
    "medmnist_md5",
    "medmnist_url",
    "parse_medmnist_name",
]

#: The official download location (Zenodo record 10519652); ``{file}`` is the file name.
MEDMNIST_URL = "https://zenodo.org/records/10519652/files/{file}?download=1"
SPLITS = ("train", "val", "test")
SIZES_2D = (28, 64, 128, 224)
SIZES_3D = (28, 64)

_TASK_MAP = {
    "binary-class": "binary",
    "multi-class": "multi-class",
    "multi-label, binary-class": "multi-label",
    "ordinal-regression": "ordinal",
}


@dataclass(frozen=True)
class MedMNISTInfo:
    """What MedMNIST's ``INFO`` table says about one subset.

    Attributes:
        flag: the subset's name, e.g. ``"pneumoniamnist"``.
        python_class: the class name in the ``medmnist`` package.
        medmnist_task: the task as MedMNIST writes it (``"binary-class"``, ...).
        labels: class names, in label order.
        n_channels: 1 (gray) or 3 (RGB).
        n_samples: images per split at every size: train, val, test.
        license: ``"CC BY 4.0"`` (``"CC BY-NC 4.0"`` for DermaMNIST).
        md5: official MD5 of the file per size (28, 64, 128, 224 for 2D; 28, 64 for 3D).
    """

    flag: str
    python_class: str
    medmnist_task: str
    labels: tuple[str, ...]
    n_channels: int
    n_samples: tuple[int, int, int]
    license: str
    md5: dict[int, str]

    @property
    def task(self) -> str:
        """The task in :data:`medrobust.data.TASKS` terms."""
        return _TASK_MAP[self.medmnist_task]

    @property
    def is_3d(self) -> bool:
        return self.flag.endswith("3d")

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(sorted(self.md5))


_ORGANS = (
    "bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver",
    "lung-left", "lung-right", "pancreas", "spleen",
)


def _md5(m28: str, m64: str, m128: str | None = None, m224: str | None = None) -> dict[int, str]:
    out = {28: m28, 64: m64}
    if m128 is not None and m224 is not None:
        out[128] = m128
        out[224] = m224
    return out


_CC = "CC BY 4.0"
# Copied from medmnist/info.py (MedMNIST 3.0.2): flag -> facts.
MEDMNIST_INFO: dict[str, MedMNISTInfo] = {
    i.flag: i
    for i in (
        MedMNISTInfo(
            "pathmnist", "PathMNIST", "multi-class",
            ("adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
             "normal colon mucosa", "cancer-associated stroma",
             "colorectal adenocarcinoma epithelium"),
            3, (89996, 10004, 7180), _CC,
            _md5("a8b06965200029087d5bd730944a56c1", "55aa9c1e0525abe5a6b9d8343a507616",
                 "ac42d08fb904d92c244187169d1fd1d9", "2c51a510bcdc9cf8ddb2af93af1eadec"),
        ),
        MedMNISTInfo(
            "chestmnist", "ChestMNIST", "multi-label, binary-class",
            ("atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule",
             "pneumonia", "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis",
             "pleural", "hernia"),
            1, (78468, 11219, 22433), _CC,
            _md5("02c8a6516a18b556561a56cbdd36c4a8", "9de6cd0b934ebb5b7426cfba5efbae16",
                 "db107e5590b27930b62dbaf558aebee3", "45bd33e6f06c3e8cdb481c74a89152aa"),
        ),
        MedMNISTInfo(
            "dermamnist", "DermaMNIST", "multi-class",
            ("actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
             "benign keratosis-like lesions", "dermatofibroma", "melanoma", "melanocytic nevi",
             "vascular lesions"),
            3, (7007, 1003, 2005), "CC BY-NC 4.0",
            _md5("0744692d530f8e62ec473284d019b0c7", "b70a2f5635c6199aeaa28c31d7202e1f",
                 "2defd784463fa5243564e855ed717de1", "8974907d8e169bef5f5b96bc506ae45d"),
        ),
        MedMNISTInfo(
            "octmnist", "OCTMNIST", "multi-class",
            ("choroidal neovascularization", "diabetic macular edema", "drusen", "normal"),
            1, (97477, 10832, 1000), _CC,
            _md5("c68d92d5b585d8d81f7112f81e2d0842", "e229e9440236b774d9f0dfef9d07bdaf",
                 "0a97e76651ace45c5d943ee3f65b63ae", "abc493b6d529d5de7569faaef2773ba3"),
        ),
        MedMNISTInfo(
            "pneumoniamnist", "PneumoniaMNIST", "binary-class", ("normal", "pneumonia"),
            1, (4708, 524, 624), _CC,
            _md5("28209eda62fecd6e6a2d98b1501bb15f", "8f4eceb4ccffa70c672198ea285246c6",
                 "05b46931834c231683c68f40c47b2971", "d6a3c71de1b945ea11211b03746c1fe1"),
        ),
        MedMNISTInfo(
            "retinamnist", "RetinaMNIST", "ordinal-regression", ("0", "1", "2", "3", "4"),
            3, (1080, 120, 400), _CC,
            _md5("bd4c0672f1bba3e3a89f0e4e876791e4", "afda852cc34dcda56f86ad2b2457dbcc",
                 "e48e916a24454daf90583d4e6efb1a18", "eae7e3b6f3fcbda4ae613ebdcbe35348"),
        ),
        MedMNISTInfo(
            "breastmnist", "BreastMNIST", "binary-class", ("malignant", "normal, benign"),
            1, (546, 78, 156), _CC,
            _md5("750601b1f35ba3300ea97c75c52ff8f6", "742edef2a1fd1524b2efff4bd7ba9364",
                 "363e4b3f8d712e9b5de15470a2aaadf1", "b56378a6eefa9fed602bb16d192d4c8b"),
        ),
        MedMNISTInfo(
            "bloodmnist", "BloodMNIST", "multi-class",
            ("basophil", "eosinophil", "erythroblast",
             "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)",
             "lymphocyte", "monocyte", "neutrophil", "platelet"),
            3, (11959, 1712, 3421), _CC,
            _md5("7053d0359d879ad8a5505303e11de1dc", "2b94928a2ae4916078ca51e05b6b800b",
                 "adace1e0ed228fccda1f39692059dd4c", "b718ff6835fcbdb22ba9eacccd7b2601"),
        ),
        MedMNISTInfo(
            "tissuemnist", "TissueMNIST", "multi-class",
            ("Collecting Duct, Connecting Tubule", "Distal Convoluted Tubule",
             "Glomerular endothelial cells", "Interstitial endothelial cells", "Leukocytes",
             "Podocytes", "Proximal Tubule Segments", "Thick Ascending Limb"),
            1, (165466, 23640, 47280), _CC,
            _md5("ebe78ee8b05294063de985d821c1c34b", "123ece2eba09d0aa5d698fda57103344",
                 "61b955355d7425a89687b06cca3ce0c2", "b077128c4a949f0a4eb01517f9037b9c"),
        ),
        MedMNISTInfo(
            "organamnist", "OrganAMNIST", "multi-class", _ORGANS,
            1, (34561, 6491, 17778), _CC,
            _md5("68e3f8846a6bd62f0c9bf841c0d9eacc", "2dcccc29b88e6da5a01161ef20cda288",
                 "eeae80d0a227a8d099027e1b3cfd3b60", "50747347e05c87dd3aaf92c49f9f3170"),
        ),
        MedMNISTInfo(
            "organcmnist", "OrganCMNIST", "multi-class", _ORGANS,
            1, (12975, 2392, 8216), _CC,
            _md5("b9ceb9546e10131b32923c5bbeaea2b1", "3ce34a8724ea6f548e6db4744d03b6a9",
                 "773c1f009daa3fe5d9a2a201b2a7ed94", "050f5e875dc056f6768abf94ec9995d1"),
        ),
        MedMNISTInfo(
            "organsmnist", "OrganSMNIST", "multi-class", _ORGANS,
            1, (13932, 2452, 8827), _CC,
            _md5("9ab87b696fb54e2a387ebe992d6ed5f1", "53a6d115339d874c25e309a994ff46d3",
                 "ded0c5fa01a95dc4978b956f613e9b8e", "b354719e553fbbb2513d5533f52a4cb1"),
        ),
        MedMNISTInfo(
            "organmnist3d", "OrganMNIST3D", "multi-class",
            ("liver", "kidney-right", "kidney-left", "femur-right", "femur-left", "bladder",
             "heart", "lung-right", "lung-left", "spleen", "pancreas"),
            1, (971, 161, 610), _CC,
            _md5("a0c5a1ff56af4f155c46d46fbb45a2fe", "58a2205adf14a9d0a189cb06dc78bf10"),
        ),
        MedMNISTInfo(
            "nodulemnist3d", "NoduleMNIST3D", "binary-class", ("benign", "malignant"),
            1, (1158, 165, 310), _CC,
            _md5("8755a7e9e05a4d9ce80a24c3e7a256f3", "c47c5b7d457bf6332200d2ea6d64ecd8"),
        ),
        MedMNISTInfo(
            "adrenalmnist3d", "AdrenalMNIST3D", "binary-class", ("normal", "hyperplasia"),
            1, (1188, 98, 298), _CC,
            _md5("bbd3c5a5576322bc4cdfea780653b1ce", "17721accfe9fb005146a47d33bc54b2f"),
        ),
        MedMNISTInfo(
            "fracturemnist3d", "FractureMNIST3D", "multi-class",
            ("buckle rib fracture", "nondisplaced rib fracture", "displaced rib fracture"),
            1, (1027, 103, 240), _CC,
            _md5("6aa7b0143a6b42da40027a9dda61302f", "f01d7e6316aedf4210da0da5b7437b42"),
        ),
        MedMNISTInfo(
            "vesselmnist3d", "VesselMNIST3D", "binary-class", ("vessel", "aneurysm"),
            1, (1335, 191, 382), _CC,
            _md5("b41fd4f7e7e2feedddb201585ecafa1b", "6bb274a8846e1097066dcd64e2c4520f"),
        ),
        MedMNISTInfo(
            "synapsemnist3d", "SynapseMNIST3D", "binary-class",
            ("inhibitory synapse", "excitatory synapse"),
            1, (1230, 177, 352), _CC,
            _md5("1235b78a3cd6280881dd7850a78eadb6", "43bd14ebf3af9d3dd072446fedc14d5e"),
        ),
    )
}

_NAME_RE = re.compile(r"^([a-z0-9]+?)(?:_(\d+))?$")


def parse_medmnist_name(name: str, size: int | None = None) -> tuple[str, int]:
    """Split ``"adrenalmnist3d_64"`` into ``("adrenalmnist3d", 64)``; the size defaults to 28.

    Raises:
        DataError: unknown subset, a size MedMNIST does not release, or two different sizes.
    """
    raw = name.strip().lower()
    if raw.endswith(".npz"):
        raw = raw[: -len(".npz")]
    m = _NAME_RE.match(raw)
    if m is None or m.group(1) not in MEDMNIST_INFO:
        raise DataError(
            f"{name!r} is not a MedMNIST subset; known: {', '.join(sorted(MEDMNIST_INFO))}"
        )
    flag = m.group(1)
    name_size = int(m.group(2)) if m.group(2) else None
    if name_size is not None and size is not None and name_size != size:
        raise DataError(f"{name!r} names size {name_size} but size={size} was asked for")
    chosen = name_size or size or 28
    info = MEDMNIST_INFO[flag]
    if chosen not in info.md5:
        raise DataError(
            f"{flag} has no size {chosen}; MedMNIST releases sizes {list(info.sizes)}"
        )
    return flag, chosen


def is_medmnist_name(name: str) -> bool:
    """Whether ``name`` names a MedMNIST subset (and size), e.g. ``"pneumoniamnist_64"``."""
    try:
        parse_medmnist_name(name)
    except DataError:
        return False
    return True


def medmnist_filename(flag: str, size: int | None = None) -> str:
    """``<flag>.npz`` at 28, ``<flag>_<size>.npz`` otherwise."""
    flag, size = parse_medmnist_name(flag, size)
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def medmnist_md5(flag: str, size: int | None = None) -> str:
    """The official MD5 of the file, from MedMNIST's metadata."""
    flag, size = parse_medmnist_name(flag, size)
    return MEDMNIST_INFO[flag].md5[size]


def medmnist_url(flag: str, size: int | None = None, base_url: str | None = None) -> str:
    """The file's download URL: official Zenodo, or ``base_url`` / ``MEDROBUST_MEDMNIST_URL``.

    ``base_url`` may hold ``{file}`` (replaced by the file name); otherwise the file name is
    appended after a ``/``.
    """
    fname = medmnist_filename(flag, size)
    base = base_url or os.environ.get("MEDROBUST_MEDMNIST_URL") or MEDMNIST_URL
    if "{file}" in base:
        return base.format(file=fname)
    return base.rstrip("/") + "/" + fname


def default_cache_dir() -> Path:
    """``$MEDROBUST_CACHE`` if set, else ``~/.cache/medrobust``."""
    env = os.environ.get("MEDROBUST_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "medrobust"


def find_medmnist(
    name: str,
    size: int | None = None,
    root: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path | None:
    """The local file for ``name``: in ``root``, then ``$MEDROBUST_DATA``, then the cache."""
    flag, sz = parse_medmnist_name(name, size)
    fname = medmnist_filename(flag, sz)
    folders: list[Path] = []
    if root is not None:
        folders.append(Path(root).expanduser())
    if os.environ.get("MEDROBUST_DATA"):
        folders.append(Path(os.environ["MEDROBUST_DATA"]).expanduser())
    folders.append(Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir())
    for folder in folders:
        candidate = folder / fname
        if candidate.is_file():
            return candidate
    return None


def download_medmnist(
    name: str,
    size: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    base_url: str | None = None,
    timeout: float = 60.0,
) -> Path:
    """Download one MedMNIST file into the cache folder, checking its official MD5.

    The bytes go to a temporary file in the cache folder; only when their MD5 equals the
    official one is it renamed to ``<flag>[_<size>].npz``. On a mismatch or any failure the
    temporary file is removed and :class:`DataError` is raised: nothing is left behind.

    Returns:
        The path of the verified file.
    """
    flag, sz = parse_medmnist_name(name, size)
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = folder / medmnist_filename(flag, sz)
    url = medmnist_url(flag, sz, base_url)
    expected = MEDMNIST_INFO[flag].md5[sz]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the cache folder {folder}: {e}") from e
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=folder)
    tmp = Path(tmp_name)
    try:
        md5 = hashlib.md5()
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310
                    while True:
                        chunk = resp.read(1 << 20)
                        if not chunk:
                            break
                        md5.update(chunk)
                        out.write(chunk)
            except (urllib.error.URLError, OSError, ValueError) as e:
                raise DataError(f"downloading {target.name} from {url} failed: {e}") from e
        got = md5.hexdigest()
        if got != expected:
            raise DataError(
                f"downloaded {target.name} from {url} is corrupt: MD5 {got}, expected the "
                f"official {expected}; the file was discarded"
            )
        apply_umask(tmp)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The sha256 of a file (memoized by path, size and modification time)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def _read_npy_header(f: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype[Any]]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f"unsupported .npy version {version}")


def _read_rows(
    zf: zipfile.ZipFile, member: str, rows: np.ndarray | None, chunk_bytes: int = 64 << 20
) -> tuple[np.ndarray, int]:
    """Rows ``rows`` (sorted, unique; None = all) of an ``.npy`` member, streamed.

    Returns the array and the member's total number of rows. Only the bytes up to the last row
    asked for are decompressed, and only the rows asked for are kept.
    """
    with zf.open(member) as f:
        shape, fortran, dtype = _read_npy_header(f)
        if dtype.hasobject:
            raise ValueError("holds Python objects (pickles are never loaded)")
        if len(shape) == 0:
            raise ValueError("is a scalar, not an array of samples")
        n = shape[0]
        if fortran and len(shape) > 1:
            arr = np.frombuffer(f.read(), dtype=dtype)
            if arr.size != int(np.prod(shape)):
                raise ValueError("is truncated")
            full = arr.reshape(shape, order="F")
            return (np.ascontiguousarray(full if rows is None else full[rows])), n
        row_items = int(np.prod(shape[1:], dtype=np.int64))
        row_bytes = row_items * dtype.itemsize
        want = np.arange(n) if rows is None else rows
        if want.size and (want[0] < 0 or want[-1] >= n):
            raise IndexError(f"indices outside 0..{n - 1}")
        out = np.empty((want.size, *shape[1:]), dtype=dtype)
        if want.size == 0:
            return out, n
        stop = int(want[-1]) + 1
        per_chunk = max(1, chunk_bytes // max(row_bytes, 1))
        pos = 0  # next row index to read
        k = 0  # next output slot
        while pos < stop:
            count = min(per_chunk, stop - pos)
            buf = f.read(count * row_bytes)
            if len(buf) != count * row_bytes:
                raise ValueError(f"is truncated (row {pos + len(buf) // max(row_bytes, 1)} of {n})")
            block = np.frombuffer(buf, dtype=dtype).reshape((count, *shape[1:]))
            lo = int(np.searchsorted(want, pos))
            hi = int(np.searchsorted(want, pos + count))
            if hi > lo:
                out[k : k + hi - lo] = block[want[lo:hi] - pos]
                k += hi - lo
            pos += count
        return out, n


def _to_images(arr: np.ndarray, path: Path, info: MedMNISTInfo | None) -> torch.Tensor:
    """uint8 (N,H,W) / (N,H,W,3) / (N,D,H,W) -> float32 channel-first in [0, 1]."""
    if arr.dtype == np.uint8:
        x = torch.from_numpy(np.ascontiguousarray(arr)).to(torch.float32).div_(255.0)
    elif np.issubdtype(arr.dtype, np.floating):
        x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        if not torch.isfinite(x).all():
            raise DataError(f"{path}: images hold NaN or infinite values")
        if x.numel() and (x.min() < 0 or x.max() > 1):
            raise DataError(
                f"{path}: float images must lie in [0, 1]; found "
                f"[{float(x.min()):.4g}, {float(x.max()):.4g}]"
            )
    else:
        raise DataError(
            f"{path}: images must be uint8 (0..255) or float in [0, 1]; got {arr.dtype}"
        )
    if info is not None:
        is_3d, rgb = info.is_3d, info.n_channels == 3
    else:  # an npz of unknown provenance: infer the layout
        is_3d = arr.ndim == 4 and arr.shape[-1] not in (3,)
        rgb = arr.ndim == 4 and arr.shape[-1] == 3 and not is_3d
    if is_3d and arr.ndim == 4:
        return x.unsqueeze(1)
    if rgb and arr.ndim == 4 and arr.shape[-1] == 3:
        return x.permute(0, 3, 1, 2).contiguous()
    if not is_3d and not rgb and arr.ndim == 3:
        return x.unsqueeze(1)
    raise DataError(
        f"{path}: images have shape {arr.shape}, which does not fit a "
        f"{'3D' if is_3d else ('RGB' if rgb else 'gray')} MedMNIST subset"
    )


def _to_labels(arr: np.ndarray, path: Path, task: str, n_classes: int) -> torch.Tensor:
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise DataError(f"{path}: labels must be integers; got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or not np.all(arr == np.round(arr)):
            raise DataError(f"{path}: labels must be whole numbers")
    lab = torch.from_numpy(np.asarray(arr).astype(np.int64))
    if task == "multi-label":
        if lab.dim() != 2 or lab.shape[1] != n_classes:
            raise DataError(
                f"{path}: multi-label labels must be (N, {n_classes}); got {tuple(lab.shape)}"
            )
        if lab.numel() and ((lab < 0) | (lab > 1)).any():
            raise DataError(f"{path}: multi-label labels must be 0 or 1")
        return lab
    if lab.dim() == 2 and lab.shape[1] == 1:
        lab = lab[:, 0]
    if lab.dim() != 1:
        raise DataError(f"{path}: labels must be (N,) or (N, 1); got {tuple(lab.shape)}")
    if lab.numel():
        lo, hi = int(lab.min()), int(lab.max())
        if lo < 0 or hi >= n_classes:
            raise DataError(
                f"{path}: labels outside the class range 0..{n_classes - 1} "
                f"(found {lo}..{hi})"
            )
    return lab


def _stream_threshold() -> int:
    raw = os.environ.get("MEDROBUST_STREAM_BYTES", "")
    try:
        return int(float(raw)) if raw else 1 << 30
    except ValueError:
        raise DataError(f"MEDROBUST_STREAM_BYTES must be a number of bytes; got {raw!r}") from None


def _split_bytes(zf: zipfile.ZipFile, member: str, rows: np.ndarray | None) -> int:
    """The float32 bytes of a split's images (from the member's header: nothing decompressed
    beyond it)."""
    with zf.open(member) as f:
        shape, _, _ = _read_npy_header(f)
    n = int(shape[0]) if rows is None else int(rows.size)
    return 4 * n * int(np.prod(shape[1:], dtype=np.int64))


def _stream_images(p: Path, member: str, info: MedMNISTInfo | None, limit: int | None,
                   cache_dir: str | os.PathLike[str] | None) -> tuple[ArraySource, int]:
    """The images of a split as a memory-mapped source (extracted into the cache first)."""
    from medrobust.data.extract import extracted_member

    sha = file_sha256(p)
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    npy = extracted_member(p, member, sha, folder)
    try:
        arr = np.load(npy, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{npy}: cannot map the extracted array ({e})") from e
    if arr.dtype.hasobject or arr.ndim == 0:
        raise DataError(f"{p}: {member} is not an array of samples")
    n_total = int(arr.shape[0])
    if limit is not None:
        arr = arr[: max(0, int(limit))]

    def convert(a: np.ndarray) -> torch.Tensor:
        return _to_images(a, p, info)

    fp = hashlib.sha256(f"npz|{sha}|{member}|{len(arr)}".encode()).hexdigest()
    return ArraySource(arr, convert, fp, known_range=(0.0, 1.0)), n_total


def load_npz(
    path: str | os.PathLike[str],
    split: str = "test",
    *,
    info: MedMNISTInfo | None = None,
    limit: int | None = None,
    indices: Sequence[int] | np.ndarray | torch.Tensor | None = None,
    class_names: Sequence[str] | None = None,
    task: str | None = None,
    stream: bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> ImageData:
    """Load one split of a MedMNIST-format ``.npz`` (``{split}_images``, ``{split}_labels``).

    Args:
        path: the ``.npz`` file.
        split: ``"train"``, ``"val"`` or ``"test"``.
        info: the subset's facts; guessed from the file name when it is ``<flag>[_size].npz``.
        limit: load only the first ``limit`` samples of the split (after ``indices``).
        indices: load only these samples (any order; returned in the order given).
        class_names, task: for files that are not a MedMNIST subset (default: classes
            ``"0"``..``"K-1"`` from the largest label, task ``"binary"`` for two classes,
            else ``"multi-class"``).
        stream: read the images on demand: the split's images are extracted once, uncompressed,
            into the cache (:func:`medrobust.data.extract.extracted_member`) and memory-mapped;
            ``images`` is then an :class:`~medrobust.data.streamed.ArraySource` whose batches
            equal the tensor ``stream=False`` gives. Default (``None``): stream when the split's
            images take more than ``$MEDROBUST_STREAM_BYTES`` (default 1 GiB) as float32 and no
            ``indices`` are given.
        cache_dir: where streamed splits are extracted (default :func:`default_cache_dir`).

    Returns:
        ImageData with images float32 in [0, 1] ((N,1,H,W), (N,3,H,W) or (N,1,D,H,W)), labels
        int64 (N,) ((N, L) for multi-label), ``units="intensity"``, ``bounds=(0.0, 1.0)`` and
        ``meta`` with ``dataset``, ``size``, ``split``, ``sha256``, ``path``, ``n_total``,
        ``indices`` (or None) and, for a known subset, ``license`` and ``medmnist_task``.

    Raises:
        DataError: missing/corrupt/truncated file, missing arrays, bad shapes or labels.
    """
    p = Path(path).expanduser()
    if split not in SPLITS:
        raise DataError(f"{p}: unknown split {split!r}; expected one of {SPLITS}")
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    size: int | None = None
    if info is None and is_medmnist_name(p.name):
        flag, size = parse_medmnist_name(p.name)
        info = MEDMNIST_INFO[flag]
    rows: np.ndarray | None = None
    if indices is not None:
        req = torch.as_tensor(indices).reshape(-1).to(torch.int64).numpy()
        if limit is not None:
            req = req[: max(0, int(limit))]
        rows = np.unique(req)
    elif limit is not None:
        rows = np.arange(max(0, int(limit)))

    img_key, lab_key = f"{split}_images", f"{split}_labels"
    try:
        with zipfile.ZipFile(p) as zf:
            names = {n[: -len(".npy")] for n in zf.namelist() if n.endswith(".npy")}
            missing = [k for k in (img_key, lab_key) if k not in names]
            if missing:
                raise DataError(
                    f"{p}: no array {' or '.join(repr(m) for m in missing)}; the file holds "
                    f"{sorted(names) or 'no arrays'} (a MedMNIST npz holds "
                    f"{{train,val,test}}_{{images,labels}})"
                )
            if rows is not None and indices is None:
                # limit: clip to the split's length, read from the labels' header
                with zf.open(lab_key + ".npy") as f:
                    n_lab = _read_npy_header(f)[0][0]
                rows = rows[rows < n_lab]
            if stream is None:
                stream = indices is None and _split_bytes(zf, img_key + ".npy", rows) > \
                    _stream_threshold()
            if stream:
                if indices is not None:
                    raise DataError(f"{p}: stream=True reads contiguous rows; load a subset "
                                    "given by indices with stream=False")
                labs, n_lab = _read_rows(zf, lab_key + ".npy", rows)
            else:
                imgs, n_img = _read_rows(zf, img_key + ".npy", rows)
                labs, n_lab = _read_rows(zf, lab_key + ".npy", rows)
    except DataError:
        raise
    except IndexError as e:
        raise DataError(f"{p}: {e}") from e
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError) as e:
        msg = str(e) or type(e).__name__
        raise DataError(f"{p}: corrupt or truncated npz ({msg})") from e
    except Exception as e:  # zlib.error and other decoder failures
        raise DataError(f"{p}: corrupt or truncated npz ({type(e).__name__}: {e})") from e
    if stream:
        images_src, n_img = _stream_images(p, img_key + ".npy", info, limit, cache_dir)
    if n_img != n_lab:
        raise DataError(f"{p}: {n_img} {split} images but {n_lab} labels")

    if info is not None:
        names_ = list(info.labels)
        task_ = info.task
    else:
        task_ = task or ("multi-label" if labs.ndim == 2 and labs.shape[1] > 1 else "")
        if class_names is not None:
            names_ = list(class_names)
        elif task_ == "multi-label":
            names_ = [str(i) for i in range(labs.shape[1])]
        else:
            k = int(labs.max()) + 1 if labs.size else 2
            names_ = [str(i) for i in range(max(k, 2))]
        task_ = task_ or ("binary" if len(names_) == 2 else "multi-class")
    images: torch.Tensor | ArraySource = images_src if stream else _to_images(imgs, p, info)
    labels = _to_labels(labs, p, task_, len(names_))
    if indices is not None and rows is not None:
        # back to the order asked for (duplicates allowed)
        order = torch.as_tensor(np.searchsorted(rows, req))
        images, labels = images[order], labels[order]
        sel: list[int] | None = [int(i) for i in req]
    else:
        sel = None
    if info is not None and size is None:
        size = int(images.shape[-1])
    meta: dict[str, Any] = {
        "dataset": info.flag if info is not None else p.stem,
        "size": size if size is not None else int(images.shape[-1]),
        "split": split,
        "sha256": file_sha256(p),
        "path": str(p),
        "n_total": int(n_img),
        "indices": sel,
        "limit": limit,
        "stream": bool(stream),
    }
    if info is not None:
        meta["license"] = info.license
        meta["medmnist_task"] = info.medmnist_task
    return ImageData(
        images=images,
        labels=labels,
        bounds=(0.0, 1.0),
        units="intensity",
        task=task_,
        class_names=names_,
        spacing=None,
        source=str(p),
        meta=meta,
    )


def load_medmnist(
    name: str | os.PathLike[str],
    split: str = "test",
    *,
    size: int | None = None,
    root: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    base_url: str | None = None,
    limit: int | None = None,
    indices: Sequence[int] | np.ndarray | torch.Tensor | None = None,
    stream: bool | None = None,
) -> ImageData:
    """Load a MedMNIST subset by name (``"pneumoniamnist"``, ``"adrenalmnist3d_64"``) or path.

    Args:
        name: a subset name, optionally with ``_<size>``, or a path to an ``.npz``.
        split: ``"train"``, ``"val"`` or ``"test"``.
        size: 28, 64, 128 or 224 (3D: 28 or 64), if not in the name.
        root: a folder to look in first (then ``$MEDROBUST_DATA``, then the cache).
        cache_dir: where downloads go (default ``$MEDROBUST_CACHE`` or ``~/.cache/medrobust``).
        download: download the file when it is found nowhere (MD5-checked).
        base_url: another server than Zenodo (also ``$MEDROBUST_MEDMNIST_URL``).
        limit, indices: load only part of the split (see :func:`load_npz`).
        stream: memory-map the split from an uncompressed copy in the cache instead of loading
            it (see :func:`load_npz`; default: only for splits over 1 GiB as float32).

    Raises:
        DataError: unknown name, file absent with ``download=False``, failed download, bad file.
    """
    s = os.fspath(name)
    if s.lower().endswith(".npz") and (os.sep in s or "/" in s or Path(s).exists()):
        return load_npz(s, split, limit=limit, indices=indices, stream=stream,
                        cache_dir=cache_dir)
    flag, sz = parse_medmnist_name(s, size)
    path = find_medmnist(flag, sz, root=root, cache_dir=cache_dir)
    if path is None:
        fname = medmnist_filename(flag, sz)
        where = [str(Path(x).expanduser()) for x in (root, os.environ.get("MEDROBUST_DATA")) if x]
        where.append(str(Path(cache_dir).expanduser() if cache_dir else default_cache_dir()))
        how = (f"put {fname} in a folder and set MEDROBUST_DATA to that folder, or give the "
               "file's path instead of the name")
        if not download:
            raise DataError(
                f"{fname}: not found in {', '.join(where)} (downloading is off); {how}"
            )
        try:
            path = download_medmnist(flag, sz, cache_dir=cache_dir, base_url=base_url)
        except DataError as err:
            raise DataError(
                f"{fname}: not found in {', '.join(where)}, and {err}; {how}"
            ) from err
    data = load_npz(path, split, info=MEDMNIST_INFO[flag], limit=limit, indices=indices,
                    stream=stream, cache_dir=cache_dir)
    data.meta["size"] = sz
    return data
