"""The embedded default store: SQLite in WAL mode with ``synchronous=FULL``.

Every write runs in its own ``BEGIN IMMEDIATE`` transaction and returns after the commit,
which in WAL mode with ``synchronous=FULL`` has fsynced the log: an acknowledged write
survives a crash or power loss. One connection is shared behind a lock; reads on the request
hot path come from the service's in-memory cache, not from here.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final, TypeVar

from keygrants.errors import AliasNotFound, AlreadyExists, Conflict, KeyNotFound, StoreError
from keygrants.keys.model import Key, KeyVersion
from keygrants.store.base import Alias

__all__ = ["SCHEMA_VERSION", "SQLiteStore"]

SCHEMA_VERSION: Final = 1
T = TypeVar("T")

_MIGRATIONS: Final[tuple[str, ...]] = (
    """
    CREATE TABLE meta (name TEXT PRIMARY KEY, value BLOB NOT NULL);
    CREATE TABLE keys (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        spec TEXT NOT NULL,
        purpose TEXT NOT NULL,
        description TEXT NOT NULL,
        state TEXT NOT NULL,
        derivable INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        rotation_period INTEGER,
        next_rotation_at INTEGER,
        deletion_date INTEGER,
        previous_state TEXT,
        min_decryption_version INTEGER NOT NULL,
        latest_version INTEGER NOT NULL
    );
    CREATE INDEX keys_next_rotation ON keys (next_rotation_at) WHERE state = 'enabled';
    CREATE INDEX keys_deletion ON keys (deletion_date) WHERE state = 'pending_deletion';
    CREATE TABLE key_versions (
        key_id TEXT NOT NULL REFERENCES keys (id),
        version INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        sealed BLOB NOT NULL,
        public_key_der BLOB,
        PRIMARY KEY (key_id, version)
    );
    CREATE TABLE aliases (
        alias TEXT PRIMARY KEY,
        key_id TEXT NOT NULL REFERENCES keys (id)
    );
    CREATE INDEX aliases_key ON aliases (key_id);
    """,
)

_KEY_COLUMNS: Final = (
    "id", "name", "spec", "purpose", "description", "state", "derivable", "created_at",
    "updated_at", "rotation_period", "next_rotation_at", "deletion_date", "previous_state",
    "min_decryption_version", "latest_version",
)
_KEY_SELECT: Final = f"SELECT {', '.join(_KEY_COLUMNS)} FROM keys"


def _key_from_row(row: tuple[Any, ...]) -> Key:
    values = dict(zip(_KEY_COLUMNS, row, strict=True))
    values["derivable"] = bool(values["derivable"])
    return Key(**values)


def _key_params(key: Key) -> tuple[Any, ...]:
    return tuple(getattr(key, c) for c in _KEY_COLUMNS)


class SQLiteStore:
    """Implements :class:`~keygrants.store.base.Store` on one SQLite database file.

    Args:
        path: the database file; its directory must exist. ``":memory:"`` for tests.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                       timeout=10.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA busy_timeout=10000")
            self._migrate()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open SQLite database at {self.path}") from exc
        if self.path != ":memory:":
            for suffix in ("", "-wal", "-shm"):
                p = Path(self.path + suffix)
                if p.exists():
                    p.chmod(0o600)

    def _migrate(self) -> None:
        (current,) = self._db.execute("PRAGMA user_version").fetchone()
        for number, script in enumerate(_MIGRATIONS[current:], start=current + 1):
            self._db.executescript(f"BEGIN IMMEDIATE; {script}; PRAGMA user_version={number}; COMMIT;")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StoreError("cannot begin a transaction") from exc
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._db.execute("ROLLBACK")
                raise StoreError("commit failed") from exc

    def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            try:
                return fn(self._db)
            except sqlite3.Error as exc:
                raise StoreError("read failed") from exc

    def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            with self._tx() as db:
                return fn(db)
        except sqlite3.IntegrityError as exc:
            raise AlreadyExists("name is already in use") from exc
        except sqlite3.Error as exc:
            raise StoreError("write failed") from exc

    # -- metadata --------------------------------------------------------------------------

    def get_meta(self, name: str) -> bytes | None:
        row = self._read(lambda db: db.execute(
            "SELECT value FROM meta WHERE name = ?", (name,)).fetchone())
        return None if row is None else bytes(row[0])

    def set_meta_if_absent(self, name: str, value: bytes) -> bool:
        def go(db: sqlite3.Connection) -> bool:
            cur = db.execute("INSERT OR IGNORE INTO meta (name, value) VALUES (?, ?)", (name, value))
            return cur.rowcount == 1
        return self._write(go)

    def set_meta(self, name: str, value: bytes) -> None:
        self._write(lambda db: db.execute(
            "INSERT INTO meta (name, value) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET value = excluded.value", (name, value)))

    # -- keys ------------------------------------------------------------------------------

    def create_key(self, key: Key, first_version: KeyVersion) -> None:
        def go(db: sqlite3.Connection) -> None:
            if db.execute("SELECT 1 FROM aliases WHERE alias = ?", (key.name,)).fetchone():
                raise AlreadyExists(f"name {key.name!r} is already in use")
            placeholders = ", ".join("?" for _ in _KEY_COLUMNS)
            db.execute(f"INSERT INTO keys ({', '.join(_KEY_COLUMNS)}) VALUES ({placeholders})",
                       _key_params(key))
            self._insert_version(db, first_version)
        self._write(go)

    @staticmethod
    def _insert_version(db: sqlite3.Connection, v: KeyVersion) -> None:
        db.execute(
            "INSERT INTO key_versions (key_id, version, created_at, sealed, public_key_der) "
            "VALUES (?, ?, ?, ?, ?)", (v.key_id, v.version, v.created_at, v.sealed, v.public_key_der))

    def get_key(self, key_id: str) -> Key | None:
        row = self._read(lambda db: db.execute(f"{_KEY_SELECT} WHERE id = ?", (key_id,)).fetchone())
        return None if row is None else _key_from_row(row)

    def find_key(self, name: str) -> Key | None:
        def go(db: sqlite3.Connection) -> tuple[Any, ...] | None:
            row: tuple[Any, ...] | None = db.execute(
                f"{_KEY_SELECT} WHERE id = (SELECT key_id FROM aliases WHERE alias = ?)", (name,)
            ).fetchone()
            if row is None:
                row = db.execute(f"{_KEY_SELECT} WHERE name = ?", (name,)).fetchone()
            return row
        row = self._read(go)
        return None if row is None else _key_from_row(row)

    def list_keys(self, *, limit: int, after: str | None = None) -> list[Key]:
        rows = self._read(lambda db: db.execute(
            f"{_KEY_SELECT} WHERE name > ? ORDER BY name LIMIT ?", (after or "", limit)).fetchall())
        return [_key_from_row(r) for r in rows]

    def update_key(self, key: Key, *, expected_updated_at: int | None = None) -> None:
        def go(db: sqlite3.Connection) -> None:
            row = db.execute("SELECT updated_at FROM keys WHERE id = ?", (key.id,)).fetchone()
            if row is None:
                raise KeyNotFound()
            if expected_updated_at is not None and row[0] != expected_updated_at:
                raise Conflict("the key changed concurrently; retry")
            self._update_key_row(db, key)
        self._write(go)

    @staticmethod
    def _update_key_row(db: sqlite3.Connection, key: Key) -> None:
        sets = ", ".join(f"{c} = ?" for c in _KEY_COLUMNS[1:])
        db.execute(f"UPDATE keys SET {sets} WHERE id = ?",
                   (*_key_params(key)[1:], key.id))

    def add_version(self, key: Key, version: KeyVersion) -> None:
        def go(db: sqlite3.Connection) -> None:
            row = db.execute("SELECT latest_version FROM keys WHERE id = ?", (key.id,)).fetchone()
            if row is None:
                raise KeyNotFound()
            if row[0] != version.version - 1 or key.latest_version != version.version:
                raise Conflict("the key was rotated concurrently; retry")
            self._insert_version(db, version)
            self._update_key_row(db, key)
        self._write(go)

    def get_versions(self, key_id: str) -> list[KeyVersion]:
        rows = self._read(lambda db: db.execute(
            "SELECT key_id, version, created_at, sealed, public_key_der FROM key_versions "
            "WHERE key_id = ? ORDER BY version", (key_id,)).fetchall())
        return [KeyVersion(key_id=r[0], version=r[1], created_at=r[2], sealed=bytes(r[3]),
                           public_key_der=None if r[4] is None else bytes(r[4])) for r in rows]

    def destroy_key(self, key: Key) -> None:
        def go(db: sqlite3.Connection) -> None:
            db.execute("UPDATE key_versions SET sealed = X'' WHERE key_id = ?", (key.id,))
            self._update_key_row(db, key)
        self._write(go)
        # Overwrite freed pages too, so the destroyed material does not linger in the file.
        self._read(lambda db: db.execute("PRAGMA wal_checkpoint(TRUNCATE)"))

    def keys_due(self, now: int) -> list[Key]:
        rows = self._read(lambda db: db.execute(
            f"{_KEY_SELECT} WHERE (state = 'enabled' AND next_rotation_at <= ?) "
            "OR (state = 'pending_deletion' AND deletion_date <= ?)", (now, now)).fetchall())
        return [_key_from_row(r) for r in rows]

    # -- aliases ---------------------------------------------------------------------------

    def create_alias(self, alias: str, key_id: str) -> None:
        def go(db: sqlite3.Connection) -> None:
            if db.execute("SELECT 1 FROM keys WHERE name = ?", (alias,)).fetchone():
                raise AlreadyExists(f"name {alias!r} is already in use")
            if not db.execute("SELECT 1 FROM keys WHERE id = ?", (key_id,)).fetchone():
                raise KeyNotFound()
            db.execute("INSERT INTO aliases (alias, key_id) VALUES (?, ?)", (alias, key_id))
        self._write(go)

    def delete_alias(self, alias: str) -> None:
        def go(db: sqlite3.Connection) -> None:
            if db.execute("DELETE FROM aliases WHERE alias = ?", (alias,)).rowcount == 0:
                raise AliasNotFound()
        self._write(go)

    def list_aliases(self, key_id: str | None = None) -> list[Alias]:
        def go(db: sqlite3.Connection) -> list[Any]:
            if key_id is None:
                return db.execute("SELECT alias, key_id FROM aliases ORDER BY alias").fetchall()
            return db.execute("SELECT alias, key_id FROM aliases WHERE key_id = ? ORDER BY alias",
                              (key_id,)).fetchall()
        return [Alias((a, k)) for a, k in self._read(go)]

    def close(self) -> None:
        with self._lock:
            self._db.close()
