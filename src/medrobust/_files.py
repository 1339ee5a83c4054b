"""Small file-system helpers shared by the writers."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def apply_umask(path: str | os.PathLike[str]) -> None:
    """Give a file or folder made by ``tempfile.mkstemp``/``mkdtemp`` (0600/0700) the usual
    permissions (0666/0777 with the process umask applied), recursively for folders, before it is
    renamed into place."""
    mask = os.umask(0)
    os.umask(mask)
    root = Path(path)
    items = [root, *root.rglob("*")] if root.is_dir() else [root]
    for p in items:
        with contextlib.suppress(OSError):
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


# --------------------------------------------------------------------------- what medrobust wrote
#: The manifest of the files medrobust wrote: inside a folder it wrote (every file, recursively),
#: or in the folder of a single output file (the files written there). ``--overwrite`` replaces a
#: file or folder only when this manifest lists it with the same content (sha256).
MANIFEST = ".medrobust-written.json"
_MANIFEST_FORMAT = "medrobust-written"


def sha256_of(path: str | os.PathLike[str]) -> str:
    """The sha256 of a file's bytes."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, str]:
    """The files listed in ``folder``'s manifest (relative path -> sha256); ``{}`` if none."""
    import json

    p = Path(folder) / MANIFEST
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict) or doc.get("format") != _MANIFEST_FORMAT:
        return {}
    files = doc.get("files")
    if not isinstance(files, dict):
        return {}
    return {str(k): str(v) for k, v in files.items()}


def _write_manifest(folder: Path, files: dict[str, str]) -> None:
    import json
    import tempfile

    text = json.dumps({"format": _MANIFEST_FORMAT, "files": dict(sorted(files.items()))},
                      indent=1) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f"{MANIFEST}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        apply_umask(tmp)
        os.replace(tmp, folder / MANIFEST)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _all_files(folder: Path) -> list[str]:
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if (p.is_file() or p.is_symlink()) and p.name != MANIFEST
    )


def mark_folder_written(folder: str | os.PathLike[str]) -> None:
    """Record every file now in ``folder`` (recursively) as written by medrobust."""
    root = Path(folder)
    _write_manifest(root, {name: sha256_of(root / name) for name in _all_files(root)})


def mark_file_written(path: str | os.PathLike[str]) -> None:
    """Record the single output ``path`` in its folder's manifest (other entries are kept)."""
    p = Path(path)
    files = read_manifest(p.parent)
    files[p.name] = sha256_of(p)
    _write_manifest(p.parent, files)


def foreign_files(folder: str | os.PathLike[str]) -> list[str]:
    """The files in ``folder`` (recursively) that medrobust did not write, or that changed since:
    those its manifest does not list with the same sha256. Empty folders hold none."""
    root = Path(folder)
    listed = read_manifest(root)
    out = []
    for name in _all_files(root):
        p = root / name
        if p.is_symlink() or listed.get(name) != sha256_of(p):
            out.append(name)
    return out


def file_written_by_medrobust(path: str | os.PathLike[str]) -> bool:
    """Whether the file ``path`` is listed, unchanged, in its folder's manifest."""
    p = Path(path)
    if p.is_symlink() or not p.is_file():
        return False
    return read_manifest(p.parent).get(p.name) == sha256_of(p)


def few(names: list[str], n: int = 4) -> str:
    """``a, b, c (and 5 more)``."""
    return ", ".join(names[:n]) + (f" (and {len(names) - n} more)" if len(names) > n else "")


def overlaps(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether ``a`` and ``b`` are the same path or one lies inside the other (resolved)."""
    ra, rb = Path(a).expanduser().resolve(), Path(b).expanduser().resolve()
    return ra == rb or ra in rb.parents or rb in ra.parents
