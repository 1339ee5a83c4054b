"""Arrays of a compressed ``.npz`` extracted once into medrobust's cache, to be memory-mapped.

A member of a compressed ``.npz`` cannot be memory-mapped (``np.load(..., mmap_mode="r")`` on an
npz decompresses the whole member into memory). :func:`extracted_member` copies the member's bytes,
decompressed and streamed (never whole in memory), into ``<cache>/extracted/<sha>/<member>``, an
uncompressed ``.npy`` that ``np.load(path, mmap_mode="r")`` maps: every later run reads only the
rows it uses.

Files are data: the copy is written to a temporary file in the same folder and renamed into place
(several ranks extracting at once each write their own temporary file; the last rename wins with
the same bytes). Next to it, ``<member>.medrobust.json`` records what medrobust wrote (the source's
sha256, the member, the size); a file at the target path without that record was not written by
medrobust and is never overwritten: the call fails and names it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from medrobust.data.errors import DataError

__all__ = ["RECORD_SUFFIX", "extracted_member"]

RECORD_SUFFIX = ".medrobust.json"


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def extracted_member(npz: str | os.PathLike[str], member: str, source_sha256: str,
                     cache_dir: str | os.PathLike[str]) -> Path:
    """The path of ``member`` (e.g. ``"test_images.npy"``) of ``npz`` as an uncompressed ``.npy``
    in ``cache_dir/extracted/<sha256[:16]>/``, extracting it first when needed.

    Args:
        npz: the ``.npz`` file.
        member: the array's name inside it (with ``.npy``).
        source_sha256: the npz file's sha256 (names the folder; recorded).
        cache_dir: medrobust's cache folder.

    Raises:
        DataError: the cache cannot be written, the member is missing or corrupt, or a file
            medrobust did not write is in the way.
    """
    src = Path(npz)
    folder = Path(cache_dir).expanduser() / "extracted" / source_sha256[:16]
    target = folder / member
    record = folder / (member + RECORD_SUFFIX)
    try:
        with zipfile.ZipFile(src) as zf:
            info = zf.getinfo(member)
            want = {"source": str(src.name), "source_sha256": source_sha256, "member": member,
                    "bytes": int(info.file_size)}
            mine = _read_record(record)
            if target.exists():
                if mine is None or mine.get("source_sha256") != source_sha256 or \
                        mine.get("member") != member:
                    raise DataError(
                        f"{target}: exists but was not written by medrobust for {src.name} (no "
                        f"matching {record.name}); medrobust does not overwrite it: remove it or "
                        "set MEDROBUST_CACHE to another folder"
                    )
                if target.stat().st_size == info.file_size:
                    return target
            if record.exists() and mine is None:
                raise DataError(f"{record}: exists but is not a medrobust record; medrobust does "
                                "not overwrite it: remove it or set MEDROBUST_CACHE to another "
                                "folder")
            folder.mkdir(parents=True, exist_ok=True)
            if mine != want:  # claim the path before writing to it
                _write_atomic(record, (json.dumps(want, indent=1) + "\n").encode())
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{member}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as out, zf.open(member) as f:
                    shutil.copyfileobj(f, out, 16 << 20)
                    out.flush()
                    os.fsync(out.fileno())
                if Path(tmp).stat().st_size != info.file_size:
                    raise DataError(f"{src}: {member} is truncated")
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
    except KeyError:
        raise DataError(f"{src}: no member {member!r}") from None
    except DataError:
        raise
    except (zipfile.BadZipFile, EOFError) as err:
        raise DataError(f"{src}: corrupt or truncated npz ({err})") from err
    except OSError as err:
        raise DataError(f"{folder}: cannot extract {member} of {src.name} into the cache "
                        f"({err.strerror or err})") from err
    except Exception as err:  # zlib.error and other decoder failures
        raise DataError(f"{src}: corrupt or truncated npz ({type(err).__name__}: {err})") from err
    return target


def _read_record(path: Path) -> dict[str, object] | None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None
