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
