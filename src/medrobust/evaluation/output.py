"""Step 6 of the pipeline: the output folder — one run at a time, nothing half-written.

* :class:`OutputLock` — an exclusive ``fcntl.flock`` on ``.medrobust-evaluate.lock`` in the
  folder, held for the whole run. A second ``evaluate`` into the same folder is refused at once
  with a clear message. The OS drops the lock when the process ends, however it ends, so a run
  killed with SIGKILL never blocks its own resume.
* :func:`write_outputs` — ``results.json``, ``report.html`` and ``figures/*.png`` are all
  rendered in memory first, written to hidden temporary files, and only renamed into place when
  every one of them was written; ``results.json`` is renamed last. A full disk or a permission
  error leaves no temporary file behind, no ``results.json`` without its report, and becomes one
  :class:`~medrobust.evaluation.errors.EvaluationError` line.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from pathlib import Path
from types import TracebackType

from medrobust.evaluation.errors import EvaluationError
from medrobust.evaluation.store import DB_NAME

__all__ = ["FIGURES_DIR", "LOCK_NAME", "REPORT_HTML", "RESULTS_JSON", "OutputLock",
           "existing_run_hash", "prepare_out", "write_outputs"]

RESULTS_JSON = "results.json"
REPORT_HTML = "report.html"
FIGURES_DIR = "figures"
LOCK_NAME = ".medrobust-evaluate.lock"
_OUR_FILES = (RESULTS_JSON, REPORT_HTML, DB_NAME, DB_NAME + "-journal")


def _why(err: OSError) -> str:
    if err.errno == errno.ENOSPC:
        return "no space left on the device"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "permission denied"
    return err.strerror or str(err)


def write_bytes(path: Path, data: bytes) -> None:
    """The one function that writes an output file's bytes (tests patch it to inject errors)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class OutputLock:
    """An exclusive, non-blocking lock on an output folder for the duration of a run."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise EvaluationError(f"{self.path.parent}: cannot create the lock file "
                                  f"({_why(err)})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                other = os.read(fd, 64).decode("ascii", "replace").strip()
            except OSError:
                other = ""
            os.close(fd)
            raise EvaluationError(
                f"{self.path.parent}: another medrobust evaluate is writing into this folder"
                + (f" (process {other})" if other else "")
                + "; wait for it to finish, or choose another --out"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode("ascii"))
        except OSError:
            pass  # the pid is a courtesy for the message; the lock is what matters
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def prepare_out(out: Path, overwrite: bool) -> None:
    """Create the folder, check that it can be written, and with ``overwrite`` delete the
    results medrobust wrote there before (only those files)."""
    if out.exists() and not out.is_dir():
        raise EvaluationError(f"{out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".medrobust-write-test-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise EvaluationError(f"{out}: output folder is not writable ({_why(err)})") from None


def clear_previous(out: Path) -> None:
    """``overwrite``: delete the results medrobust wrote into ``out`` (only those files)."""
    try:
        for name in _OUR_FILES:
            p = out / name
            if p.is_file():
                p.unlink()
        fig = out / FIGURES_DIR
        if fig.is_dir():
            for name in ("robust_accuracy.png", "gallery.png"):
                if (fig / name).is_file():
                    (fig / name).unlink()
            if not any(fig.iterdir()):
                shutil.rmtree(fig)
    except OSError as err:
        raise EvaluationError(f"{out}: cannot remove the earlier results ({_why(err)})") from None


def existing_run_hash(out: Path) -> str | None:
    p = out / RESULTS_JSON
    if not p.is_file():
        return None
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
        return str(d.get("config_hash"))
    except (OSError, ValueError, AttributeError):
        return "unreadable"


def write_outputs(out: Path, files: dict[str, bytes]) -> None:
    """Write ``files`` (relative path -> bytes) into ``out`` all or nothing: temporaries first,
    then renames, ``results.json`` last."""
    tag = uuid.uuid4().hex[:12]
    temps: list[tuple[Path, Path]] = []
    order = sorted(files, key=lambda name: (name == RESULTS_JSON, name == REPORT_HTML, name))
    try:
        for name in order:
            dest = out / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.tmp-{tag}")
            temps.append((tmp, dest))
            write_bytes(tmp, files[name])
        for tmp, dest in temps:
            os.replace(tmp, dest)
    except OSError as err:
        for tmp, _ in temps:
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
            except OSError:
                pass
        raise EvaluationError(
            f"{out}: cannot write the results ({_why(err)}); nothing was left half-written, and "
            "the units computed so far are kept in results.sqlite: free space or fix the "
            "permissions, then rerun the same command"
        ) from None

