"""The Batch API's durable store: file and batch records in SQLite, file contents sealed beside it.

A data directory (``--data-dir``, mode 0700) holds::

    store.db      SQLite (WAL, secure_delete): files, batches, and a check value sealed
                  under the master key
    files/<id>    each file's contents, sealed (serving.api.batch_api.sealed)
    data.key      the master key, unless SKINGPT4_DATA_KEY gives it

The database holds no photo, question or answer: a file's name and a batch's metadata are
sealed under the master key, a file's data key is wrapped by it. Deleting a file removes its
row (``secure_delete`` overwrites the freed pages) and its sealed bytes. Records belong to a
tenant (a digest of the API key that created them); lookups by another tenant find nothing.

A master key that does not open the store (another store's key, a malformed one, a key file
that is missing while the store holds sealed records) is refused before anything in the folder
changes (:func:`check_data_key`; ``skingpt4 serve`` runs it before its engine starts).

Every method is blocking and must be called from one thread (the service runs them on a
single-thread executor, off the event loop).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sqlite3
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.api.batch_api import sealed
from serving.api.metrics import NO_TENANT

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    purpose TEXT NOT NULL,
    filename TEXT NOT NULL,          -- sealed
    bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER,
    data_key BLOB NOT NULL,          -- wrapped by the master key
    visible INTEGER NOT NULL         -- 0 while a batch still writes it
);
CREATE INDEX IF NOT EXISTS files_by_tenant ON files (tenant, created_at, id);
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    status TEXT NOT NULL,
    record TEXT NOT NULL,            -- the batch object as JSON, metadata aside
    metadata TEXT,                   -- sealed JSON
    output_file TEXT NOT NULL,       -- ids of the files its records go to
    error_file TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS batches_by_tenant ON batches (tenant, created_at, id);
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""
UNFINISHED = ("validating", "in_progress", "finalizing", "cancelling")
DB_FILE = "store.db"
KEY_CHECK = "key_check"  # meta row: KEY_CHECK_TEXT sealed under the master key
KEY_CHECK_TEXT = "skingpt4 data key check"


def tenant_of(key: str | None) -> str:
    """A tenant's name in the store: a digest of its API key (the key itself is never stored)."""
    return "open" if key is None else "key_" + hashlib.sha256(key.encode()).hexdigest()[:32]


def tenant_key_id(tenant: str) -> str:
    """The metrics' and access log's id of a tenant's key
    (:func:`serving.api.metrics.key_id`: the same digest, shorter)."""
    return tenant[4:16] if tenant.startswith("key_") else NO_TENANT


class DataKeyError(ValueError):
    """A master key that cannot serve the store: malformed, missing, or not the key its
    records were sealed with. The message is one line naming the key's source and the folder."""


def check_data_key(data_dir: Path, key_file: Path | None = None,
                   environ: Mapping[str, str] = os.environ) -> bytes | None:
    """The master key of the store in ``data_dir`` (``SKINGPT4_DATA_KEY``, else the key file),
    checked against the store without changing anything in the folder: it must be well formed
    and open the store's check value (or, in a store written before check values, its first
    sealed record). None when the key file does not exist yet and the store holds nothing
    sealed: a first start, which creates the key. Raises :class:`DataKeyError`."""
    data_dir = Path(data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise DataKeyError(f"the data folder {data_dir} is a file, not a folder")
    sample = _sealed_sample(data_dir / DB_FILE)
    given = environ.get(sealed.KEY_ENV)
    path = Path(key_file) if key_file else data_dir / sealed.KEY_FILE
    source = sealed.KEY_ENV if given else f"the data key in {path}"
    try:
        if given:
            master = sealed.decode_key(given, sealed.KEY_ENV)
        elif path.exists():
            master = sealed.read_key_file(path)
        elif sample is None:
            return None
        else:
            raise DataKeyError(
                f"the data key file {path} does not exist, but the store in {data_dir} holds "
                f"records sealed with a key: give that key ({sealed.KEY_ENV}, or "
                "--data-key-file); a new key would not open them")
    except DataKeyError:
        raise
    except (OSError, ValueError) as exc:
        raise DataKeyError(f"{exc}; it is the master key of the store in {data_dir}") from None
    if sample is not None and not _opens(master, sample):
        raise DataKeyError(
            f"{source} does not open the store in {data_dir}: its records were sealed with "
            f"another key; start with the key it was created with ({sealed.KEY_ENV}, or "
            "--data-key-file), or give another --data-dir")
    return master


_SAMPLES = (  # (table, query of (kind, ...)) in the order they are tried
    ("meta", f"SELECT name, value FROM meta WHERE name = '{KEY_CHECK}'"),
    ("files", "SELECT 'file', id, data_key FROM files ORDER BY created_at, id LIMIT 1"),
    ("batches", "SELECT 'metadata', id, metadata FROM batches WHERE metadata IS NOT NULL "
                "ORDER BY created_at, id LIMIT 1"),
)


def _sealed_sample(db_path: Path) -> tuple[str, ...] | None:
    """Something sealed under the store's master key, read without writing: its check value,
    else its first file's wrapped key, else its first batch's metadata; None if it holds none
    (or does not exist)."""
    if not db_path.exists():
        return None
    # Without a -wal file the database is whole on disk: read it as immutable, which creates
    # nothing beside it. With one (a server running, or killed), read-only through the WAL.
    wal = db_path.with_name(db_path.name + "-wal")
    uri = db_path.resolve().as_uri() + ("?mode=ro" if wal.exists() else "?immutable=1")
    try:
        db = sqlite3.connect(uri, uri=True)
        try:
            tables = {r[0] for r in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            for table, sql in _SAMPLES:
                if table in tables and (row := db.execute(sql).fetchone()) is not None:
                    return tuple(row)
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise DataKeyError(f"the store {db_path} cannot be read ({exc})") from None
    return None


def _opens(master: bytes, sample: tuple[str, ...]) -> bool:
    kind = sample[0]
    try:
        if kind == KEY_CHECK:
            return sealed.open_text(master, sample[1], KEY_CHECK) == KEY_CHECK_TEXT
        if kind == "file":
            sealed.unwrap_key(master, sample[2], sample[1])
        else:
            sealed.open_text(master, sample[2], "metadata:" + sample[1])
    except (sealed.SealedError, ValueError):
        return False
    return True


def new_file_id() -> str:
    return "file-" + secrets.token_hex(12)


def new_batch_id() -> str:
    return "batch_" + secrets.token_hex(16)


@dataclass(frozen=True)
class FileRow:
    id: str
    tenant: str
    purpose: str
    filename: str
    bytes: int
    created_at: int
    expires_at: int | None
    data_key: bytes  # unwrapped

    def to_dict(self) -> dict:
        """OpenAI's file object."""
        return {"id": self.id, "object": "file", "bytes": self.bytes,
                "created_at": self.created_at, "filename": self.filename,
                "purpose": self.purpose, "status": "processed", "expires_at": self.expires_at,
                "status_details": None}


class Store:
    def __init__(self, data_dir: Path, key_file: Path | None = None) -> None:
        """Open (or create) the store; :class:`DataKeyError`, with nothing changed, for a
        master key that does not fit it."""
        self.data_dir = Path(data_dir)
        master = check_data_key(self.data_dir, key_file)
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.files_dir = self.data_dir / "files"
        self.files_dir.mkdir(mode=0o700, exist_ok=True)
        self.master = master or sealed.load_master_key(self.data_dir, key_file)
        self.db = sqlite3.connect(self.data_dir / DB_FILE, check_same_thread=False,
                                  isolation_level=None)
        os.chmod(self.data_dir / DB_FILE, 0o600)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA secure_delete=ON")
        self.db.executescript(SCHEMA)
        self.db.execute("INSERT OR IGNORE INTO meta VALUES (?, ?)",
                        (KEY_CHECK, sealed.seal_text(self.master, KEY_CHECK_TEXT, KEY_CHECK)))
        self.remove_orphans()

    def close(self) -> None:
        self.db.close()

    def path(self, file_id: str) -> Path:
        return self.files_dir / file_id

    # --- files ---------------------------------------------------------------------------------

    def remove_orphans(self) -> int:
        """Remove sealed contents with no record (an upload cut off by a crash)."""
        known = {row[0] for row in self.db.execute("SELECT id FROM files")}
        removed = 0
        for path in self.files_dir.iterdir():
            if path.name not in known:
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def add_file(self, file_id: str, tenant: str, purpose: str, filename: str, nbytes: int,
                 data_key: bytes, expires_at: int | None, *, visible: bool = True,
                 created_at: int | None = None) -> FileRow:
        created_at = int(time.time()) if created_at is None else created_at
        self.db.execute(
            "INSERT INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (file_id, tenant, purpose, sealed.seal_text(self.master, filename, "name:" + file_id),
             nbytes, created_at, expires_at, sealed.wrap_key(self.master, data_key, file_id),
             int(visible)),
        )
        return FileRow(file_id, tenant, purpose, filename, nbytes, created_at, expires_at, data_key)

    def show_file(self, file_id: str, nbytes: int, expires_at: int | None) -> None:
        """Publish a file a batch has written: its size and expiry."""
        self.db.execute("UPDATE files SET visible = 1, bytes = ?, expires_at = ? WHERE id = ?",
                        (nbytes, expires_at, file_id))

    def file(self, file_id: str, tenant: str | None = None, *, hidden: bool = False) -> FileRow | None:
        """The file ``file_id`` of ``tenant`` (None: any), if it exists and has not expired."""
        row = self.db.execute(
            "SELECT * FROM files WHERE id = ? AND (visible = 1 OR ?)", (file_id, hidden)
        ).fetchone()
        if row is None or (tenant is not None and row[1] != tenant):
            return None
        if row[6] is not None and row[6] <= time.time():
            return None
        return self._file_row(row)

    def _file_row(self, row) -> FileRow:
        file_id = row[0]
        return FileRow(file_id, row[1], row[2],
                       sealed.open_text(self.master, row[3], "name:" + file_id), row[4], row[5],
                       row[6], sealed.unwrap_key(self.master, row[7], file_id))

    def list_files(self, tenant: str, purpose: str | None, after: str | None, limit: int,
                   order: str) -> tuple[list[FileRow], bool]:
        """A page of ``tenant``'s files (``order``: ``asc`` or ``desc`` by creation) after the
        file ``after``; and whether more follow."""
        now = int(time.time())
        sql = ("SELECT * FROM files WHERE tenant = ? AND visible = 1 "
               "AND (expires_at IS NULL OR expires_at > ?)")
        params: list[Any] = [tenant, now]
        if purpose:
            sql += " AND purpose = ?"
            params.append(purpose)
        cmp = ">" if order == "asc" else "<"
        if after:
            anchor = self.db.execute("SELECT created_at FROM files WHERE id = ? AND tenant = ?",
                                     (after, tenant)).fetchone()
            if anchor is not None:
                sql += f" AND (created_at, id) {cmp} (?, ?)"
                params += [anchor[0], after]
        direction = "ASC" if order == "asc" else "DESC"
        sql += f" ORDER BY created_at {direction}, id {direction} LIMIT ?"
        rows = self.db.execute(sql, [*params, limit + 1]).fetchall()
        return [self._file_row(r) for r in rows[:limit]], len(rows) > limit

    def tenant_usage(self, tenant: str) -> tuple[int, int]:
        """(files, bytes) that ``tenant`` holds, files still being written included."""
        count, total = self.db.execute(
            "SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM files WHERE tenant = ?", (tenant,)
        ).fetchone()
        return count, total

    def census(self) -> tuple[list[tuple[str, str, int]], list[tuple[str, int, int]]]:
        """What the store holds, for the metrics: ``(status, tenant, batches)`` and
        ``(tenant, files, bytes)``."""
        batches = self.db.execute(
            "SELECT status, tenant, COUNT(*) FROM batches GROUP BY status, tenant").fetchall()
        files = self.db.execute(
            "SELECT tenant, COUNT(*), COALESCE(SUM(bytes), 0) FROM files GROUP BY tenant"
        ).fetchall()
        return batches, files

    def delete_file(self, file_id: str) -> None:
        """The record (its wrapped key with it) and the sealed bytes."""
        self.db.execute("DELETE FROM files WHERE id = ?", (file_id,))
        self.path(file_id).unlink(missing_ok=True)

    def expired_files(self, now: float) -> list[str]:
        return [r[0] for r in self.db.execute(
            "SELECT id FROM files WHERE expires_at IS NOT NULL AND expires_at <= ?", (now,))]

    def file_in_use(self, file_id: str) -> bool:
        """Whether an unfinished batch reads or writes ``file_id``."""
        marks = ",".join("?" * len(UNFINISHED))
        return self.db.execute(
            f"SELECT 1 FROM batches WHERE status IN ({marks}) AND "
            "(json_extract(record, '$.input_file_id') = ? OR output_file = ? OR error_file = ?)",
            (*UNFINISHED, file_id, file_id, file_id),
        ).fetchone() is not None

    # --- batches -------------------------------------------------------------------------------

    def add_batch(self, tenant: str, batch: dict, output_file: str, error_file: str) -> None:
        record = {k: v for k, v in batch.items() if k != "metadata"}
        self.db.execute(
            "INSERT INTO batches VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (batch["id"], tenant, batch["created_at"], batch["status"], json.dumps(record),
             self._seal_metadata(batch["id"], batch.get("metadata")), output_file, error_file),
        )

    def _seal_metadata(self, batch_id: str, metadata: dict | None) -> str | None:
        if metadata is None:
            return None
        return sealed.seal_text(self.master, json.dumps(metadata), "metadata:" + batch_id)

    def batch(self, batch_id: str, tenant: str | None = None) -> dict | None:
        row = self.db.execute("SELECT * FROM batches WHERE id = ?", (batch_id,)).fetchone()
        if row is None or (tenant is not None and row[1] != tenant):
            return None
        return self._batch(row)

    def batch_files(self, batch_id: str) -> tuple[str, str, str]:
        """(tenant, output file id, error file id) of a batch."""
        row = self.db.execute("SELECT tenant, output_file, error_file FROM batches WHERE id = ?",
                              (batch_id,)).fetchone()
        return row[0], row[1], row[2]

    def _batch(self, row) -> dict:
        batch = json.loads(row[4])
        metadata = (json.loads(sealed.open_text(self.master, row[5], "metadata:" + row[0]))
                    if row[5] is not None else None)
        return batch | {"metadata": metadata}

    def update_batch(self, batch_id: str, **fields: Any) -> dict:
        """Set ``fields`` of the batch object; returns it."""
        row = self.db.execute("SELECT record FROM batches WHERE id = ?", (batch_id,)).fetchone()
        record = json.loads(row[0]) | fields
        self.db.execute("UPDATE batches SET record = ?, status = ? WHERE id = ?",
                        (json.dumps(record), record["status"], batch_id))
        return self.batch(batch_id)

    def list_batches(self, tenant: str, after: str | None, limit: int) -> tuple[list[dict], bool]:
        """A page of ``tenant``'s batches, newest first, after the batch ``after``."""
        sql, params = "SELECT * FROM batches WHERE tenant = ?", [tenant]
        if after:
            anchor = self.db.execute("SELECT created_at FROM batches WHERE id = ? AND tenant = ?",
                                     (after, tenant)).fetchone()
            if anchor is not None:
                sql += " AND (created_at, id) < (?, ?)"
                params += [anchor[0], after]
        rows = self.db.execute(sql + " ORDER BY created_at DESC, id DESC LIMIT ?",
                               [*params, limit + 1]).fetchall()
        return [self._batch(r) for r in rows[:limit]], len(rows) > limit

    def unfinished_batches(self) -> list[tuple[str, str]]:
        """(id, tenant) of the batches not yet in a final status, oldest first."""
        marks = ",".join("?" * len(UNFINISHED))
        return [(r[0], r[1]) for r in self.db.execute(
            f"SELECT id, tenant FROM batches WHERE status IN ({marks}) ORDER BY created_at, id",
            UNFINISHED)]
