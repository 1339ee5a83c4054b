"""Per-batch results in SQLite (``results.sqlite`` in the output folder): what makes a run
resumable.

Every finished unit of work — the clean pass over one batch, or one attack at one budget over one
batch — is written in its own transaction, keyed by ``(config_hash, unit, eps_key, batch)``:

* ``config_hash``: a hash of everything that changes the numbers of that unit (the model's weights,
  the data, the batch size, the seed, the norm, the direction, the attack's name and arguments);
* ``unit``: ``"clean"`` or the attack's key;
* ``eps_key``: the budget (``repr`` of the float), or ``"min-norm"`` for a minimum-norm attack;
* ``batch``: the batch index.

A process killed with SIGKILL loses at most the unit it was computing (SQLite's journal rolls
back a half-written transaction), and a rerun of the same command finds every stored unit and
skips it. The payload is a small ``.npz`` of per-sample vectors (predictions, success flags,
norms, PSNR, SSIM), never images.
"""

from __future__ import annotations

import io
import sqlite3
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from medrobust.evaluation.errors import ResultsStoreError

__all__ = ["DB_NAME", "ResultsStore"]

DB_NAME = "results.sqlite"
_FORMAT = "medrobust-results"
_FORMAT_VERSION = "1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
    config_hash TEXT NOT NULL,
    unit TEXT NOT NULL,
    eps_key TEXT NOT NULL,
    batch INTEGER NOT NULL,
    n INTEGER NOT NULL,
    payload BLOB NOT NULL,
    run_id TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (config_hash, unit, eps_key, batch)
);
"""


def _pack(arrays: Mapping[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})  # type: ignore[arg-type]
    return buf.getvalue()


def _unpack(blob: bytes, where: str) -> dict[str, np.ndarray]:
    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except Exception as err:
        raise ResultsStoreError(
            f"{where}: a stored batch cannot be read ({type(err).__name__}: {err}); the results "
            "database is corrupted: move it away or rerun with overwrite"
        ) from err


class ResultsStore:
    """The SQLite database of per-batch results.

    Args:
        path: the database file, created when missing; ``None`` keeps everything in memory (an
            evaluation without an output folder).
        run_id: identifies the process writing rows (stored with each row, so that a test or a
            user can see which run computed what).

    Raises:
        ResultsStoreError: the file is not a SQLite database, is damaged, or belongs to something
            else than medrobust.
    """

    def __init__(self, path: str | Path | None, run_id: str = "") -> None:
        self.path = None if path is None else Path(path)
        self.run_id = run_id
        where = ":memory:" if self.path is None else str(self.path)
        self._where = where
        try:
            self.conn = sqlite3.connect(where, timeout=30.0)
        except sqlite3.Error as err:
            raise ResultsStoreError(f"{where}: cannot open the results database ({err})") from err
        try:
            self._check_and_init()
        except sqlite3.DatabaseError as err:
            self.conn.close()
            raise ResultsStoreError(
                f"{where}: the results database is corrupted or not a SQLite file ({err}); move "
                "it away or rerun with overwrite"
            ) from err

    def _check_and_init(self) -> None:
        cur = self.conn.cursor()
        row = cur.execute("PRAGMA quick_check").fetchone()
        if row is None or row[0] != "ok":
            raise sqlite3.DatabaseError(f"integrity check failed: {row[0] if row else 'no answer'}")
        tables = {r[0] for r in cur.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if tables and not {"meta", "batches"} <= tables:
            raise ResultsStoreError(
                f"{self._where}: a SQLite database that is not a medrobust results database "
                f"(tables {sorted(tables)}); move it away or rerun with overwrite"
            )
        with self.conn:
            self.conn.executescript(_SCHEMA)
            fmt = dict(self.conn.execute("SELECT key, value FROM meta").fetchall())
            if not fmt:
                self.conn.executemany(
                    "INSERT INTO meta (key, value) VALUES (?, ?)",
                    [("format", _FORMAT), ("format_version", _FORMAT_VERSION)],
                )
            elif fmt.get("format") != _FORMAT:
                raise ResultsStoreError(
                    f"{self._where}: not a medrobust results database (format "
                    f"{fmt.get('format')!r}); move it away or rerun with overwrite"
                )
            elif fmt.get("format_version") != _FORMAT_VERSION:
                raise ResultsStoreError(
                    f"{self._where}: results database format {fmt.get('format_version')!r}, this "
                    f"medrobust reads {_FORMAT_VERSION!r}; rerun with overwrite"
                )

    # ------------------------------------------------------------------------------ rows
    def get(self, config_hash: str, unit: str, eps_key: str, batch: int
            ) -> dict[str, np.ndarray] | None:
        """The stored arrays of one unit, or ``None`` when it has not been computed."""
        try:
            row = self.conn.execute(
                "SELECT payload FROM batches WHERE config_hash=? AND unit=? AND eps_key=? AND "
                "batch=?",
                (config_hash, unit, eps_key, int(batch)),
            ).fetchone()
        except sqlite3.DatabaseError as err:
            raise ResultsStoreError(
                f"{self._where}: cannot read the results database ({err}); it may be corrupted: "
                "move it away or rerun with overwrite"
            ) from err
        if row is None:
            return None
        return _unpack(row[0], self._where)

    def put(self, config_hash: str, unit: str, eps_key: str, batch: int,
            arrays: Mapping[str, np.ndarray]) -> None:
        """Store one unit in its own transaction (replacing an older row with the same key)."""
        n = int(next(iter(arrays.values())).shape[0]) if arrays else 0
        try:
            with self.conn:
                self.conn.execute(
                    "INSERT OR REPLACE INTO batches (config_hash, unit, eps_key, batch, n, payload,"
                    " run_id, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (config_hash, unit, eps_key, int(batch), n, _pack(arrays), self.run_id,
                     time.time()),
                )
        except sqlite3.Error as err:
            raise ResultsStoreError(
                f"{self._where}: cannot write to the results database ({err})"
            ) from err

    def count(self, config_hash: str | None = None, run_id: str | None = None) -> int:
        """The number of stored units (of one configuration, or written by one run)."""
        sql, args = "SELECT COUNT(*) FROM batches WHERE 1=1", []
        if config_hash is not None:
            sql += " AND config_hash=?"
            args.append(config_hash)
        if run_id is not None:
            sql += " AND run_id=?"
            args.append(run_id)
        return int(self.conn.execute(sql, args).fetchone()[0])

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
