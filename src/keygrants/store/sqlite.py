"""The embedded default store: SQLite in WAL mode with ``synchronous=FULL``.

Every write runs in its own ``BEGIN IMMEDIATE`` transaction and returns after the commit,
which in WAL mode with ``synchronous=FULL`` has fsynced the log: an acknowledged write
survives a crash or power loss. One connection is shared behind a lock; reads on the request
hot path come from the service's in-memory cache, not from here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Final, NoReturn, TypeVar

import msgspec

from keygrants._files import file_identity
from keygrants._threads import as_background_thread
from keygrants.auth.model import Credential, Policy, Principal
from keygrants.errors import (
    AliasNotFound,
    AlreadyExists,
    Conflict,
    CredentialNotFound,
    GrantNotFound,
    KeygrantsError,
    KeyNotFound,
    PolicyNotFound,
    PrincipalNotFound,
    StoreError,
)
from keygrants.grants.issuer import IssuerKey
from keygrants.grants.model import Grant
from keygrants.grants.revocation import RevocationEntry
from keygrants.keys.model import Key, KeyVersion
from keygrants.store.base import (
    Alias,
    _check_uses,
    _destroyable,
    _destroyed,
    _same_credential,
    _same_principal,
    ended_grant_entries,
)

__all__ = ["SCHEMA_VERSION", "SQLiteStore"]

SCHEMA_VERSION: Final = 3
_GROUP_COMMIT_TIMEOUT: Final = 30.0
_IDS_PER_QUERY: Final = 500  # ids bound as one IN (...) list (SQLite caps the parameters)
_WAL_BACKSTOP_PAGES: Final = 10_000
# Seconds between copies of the WAL into the database (PASSIVE, off the request path). Small,
# frequent copies: each fsyncs what accumulated since the last, and under load a copy of a
# second's pages (or five, as the audit log had) made concurrent commits wait up to 20-35 ms
# for the disk; every 0.5 s they waited at most 10-16 ms, at the same CPU per request
# (in-process grant issuance, 16 concurrent requests, 3 runs each).
_WAL_CHECKPOINT_EVERY: Final = 0.5
log = logging.getLogger("keygrants.store")


def _copy_wal_back(path: str, stop: threading.Event, gone: threading.Event,
                   identity: tuple[int, int] | None) -> None:
    """Every half second, copy committed WAL frames into the database (PASSIVE: never waits for,
    nor blocks, writers and readers), on a connection of its own, until ``stop``; and set
    ``gone`` once ``path`` no longer names the file opened (``identity``): deleted or
    replaced under the running server, whose writes would then be lost (SQLite in WAL mode
    does not notice)."""
    as_background_thread()
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
        conn.execute("PRAGMA synchronous=FULL")  # the copy is fsynced before the WAL restarts
    except sqlite3.Error:
        conn = None  # the automatic checkpoint still bounds the WAL
    try:
        while not stop.wait(_WAL_CHECKPOINT_EVERY):
            if identity is not None and not gone.is_set() and file_identity(path) != identity:
                gone.set()
                log.error("store: %s was deleted or replaced while the server was using it; "
                          "every store call fails until the server is restarted on the right "
                          "file", path)
            if conn is None or gone.is_set():
                continue
            try:
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
            except sqlite3.Error as exc:
                log.warning("store: WAL checkpoint failed: %s", exc)
    finally:
        if conn is not None:
            conn.close()
T = TypeVar("T")


def _statements(script: str) -> list[str]:
    """A script's statements, one by one (a ``;`` inside a string or a trigger stays)."""
    out: list[str] = []
    pending = ""
    for part in script.split(";"):
        pending += part + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \t\n;"):
                out.append(pending)
            pending = ""
    return out


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
    """
    ALTER TABLE keys ADD COLUMN tags TEXT NOT NULL DEFAULT '[]';
    CREATE TABLE principals (
        id TEXT PRIMARY KEY,
        display_name TEXT NOT NULL,
        tags TEXT NOT NULL,
        enabled INTEGER NOT NULL,
        builtin INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        last_seen_at INTEGER
    );
    CREATE TABLE credentials (
        id TEXT PRIMARY KEY,
        principal_id TEXT NOT NULL REFERENCES principals (id),
        kind TEXT NOT NULL,
        label TEXT NOT NULL,
        algorithm TEXT,
        public_key_der BLOB,
        secret_digest BLOB,
        sealed_secret BLOB,
        match TEXT,
        not_before INTEGER NOT NULL,
        expires_at INTEGER,
        created_at INTEGER NOT NULL,
        last_used_at INTEGER,
        revoked_at INTEGER
    );
    CREATE INDEX credentials_principal ON credentials (principal_id, created_at);
    CREATE TABLE policies (
        name TEXT PRIMARY KEY,
        text TEXT NOT NULL,
        description TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    );
    """,
    """
    CREATE TABLE grants (
        id TEXT PRIMARY KEY,
        key_id TEXT NOT NULL,
        grantee TEXT NOT NULL,
        state TEXT NOT NULL,
        expires_at INTEGER NOT NULL,
        max_uses INTEGER,
        uses INTEGER NOT NULL,
        retiring_principal TEXT,
        parent_id TEXT,
        record BLOB NOT NULL
    );
    CREATE INDEX grants_key ON grants (key_id, id);
    CREATE INDEX grants_grantee ON grants (grantee, id);
    CREATE INDEX grants_parent ON grants (parent_id) WHERE parent_id IS NOT NULL;
    CREATE TABLE revocations (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,
        subject TEXT NOT NULL,
        revoked_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        reason TEXT NOT NULL
    );
    CREATE INDEX revocations_expiry ON revocations (expires_at);
    CREATE TABLE issuer_keys (
        seq INTEGER PRIMARY KEY,
        kid TEXT NOT NULL UNIQUE,
        alg TEXT NOT NULL,
        public_raw BLOB NOT NULL,
        sealed BLOB NOT NULL,
        created_at INTEGER NOT NULL,
        activate_at INTEGER NOT NULL,
        retire_at INTEGER
    );
    """,
)

_KEY_COLUMNS: Final = (
    "id", "name", "spec", "purpose", "description", "state", "derivable", "created_at",
    "updated_at", "rotation_period", "next_rotation_at", "deletion_date", "previous_state",
    "min_decryption_version", "latest_version", "tags",
)
_KEY_SELECT: Final = f"SELECT {', '.join(_KEY_COLUMNS)} FROM keys"


def _key_from_row(row: tuple[Any, ...]) -> Key:
    values = dict(zip(_KEY_COLUMNS, row, strict=True))
    values["derivable"] = bool(values["derivable"])
    values["tags"] = tuple(json.loads(values["tags"]))
    return Key(**values)


def _key_params(key: Key) -> tuple[Any, ...]:
    return tuple(json.dumps(list(key.tags)) if c == "tags" else getattr(key, c)
                 for c in _KEY_COLUMNS)


_PRINCIPAL_COLUMNS: Final = ("id", "display_name", "tags", "enabled", "builtin", "created_at",
                             "updated_at", "last_seen_at")
_CREDENTIAL_COLUMNS: Final = tuple(Credential.__struct_fields__)
# what update_* writes: neither the id nor the usage times, which only record_usage moves
_PRINCIPAL_UPDATED: Final = _PRINCIPAL_COLUMNS[1:-1]
_CREDENTIAL_UPDATED: Final = tuple(c for c in _CREDENTIAL_COLUMNS if c not in ("id", "last_used_at"))
_POLICY_COLUMNS: Final = tuple(Policy.__struct_fields__)


def _principal_from_row(row: tuple[Any, ...]) -> Principal:
    v = dict(zip(_PRINCIPAL_COLUMNS, row, strict=True))
    v["tags"] = tuple(json.loads(v["tags"]))
    v["enabled"], v["builtin"] = bool(v["enabled"]), bool(v["builtin"])
    return Principal(**v)


def _principal_params(p: Principal) -> tuple[Any, ...]:
    return (p.id, p.display_name, json.dumps(list(p.tags)), int(p.enabled), int(p.builtin),
            p.created_at, p.updated_at, p.last_seen_at)


def _credential_from_row(row: tuple[Any, ...]) -> Credential:
    v = dict(zip(_CREDENTIAL_COLUMNS, row, strict=True))
    for blob in ("public_key_der", "secret_digest", "sealed_secret"):
        if v[blob] is not None:
            v[blob] = bytes(v[blob])
    return Credential(**v)


_grant_encoder: Final = msgspec.msgpack.Encoder()
_grant_decoder: Final = msgspec.msgpack.Decoder(Grant)


def _grant_params(g: Grant) -> tuple[Any, ...]:
    return (g.id, g.key_id, g.grantee, g.state, g.expires_at, g.max_uses, g.uses,
            g.retiring_principal, g.parent_id, _grant_encoder.encode(g))


def _grant_from_row(row: tuple[Any, ...]) -> Grant:
    """The record, with the columns a statement may have changed (state, uses) applied."""
    record = _grant_decoder.decode(row[1])
    return msgspec.structs.replace(record, state=row[0], uses=row[2])


_GRANT_SELECT: Final = "SELECT state, record, uses FROM grants"


_NOT_TEXT: Final = "a value is not valid Unicode text (a lone surrogate?)"


def _translate(exc: BaseException) -> BaseException:
    if isinstance(exc, KeygrantsError):
        return exc
    if isinstance(exc, sqlite3.IntegrityError):
        return AlreadyExists("already exists")
    if isinstance(exc, UnicodeError):
        return StoreError(_NOT_TEXT)
    if isinstance(exc, sqlite3.Error):
        return StoreError("write failed")
    return exc


class _GroupCommit:
    """Commits writes from many threads together: one ``BEGIN IMMEDIATE`` ... ``COMMIT`` (one
    fsync) per batch, each write in its own savepoint so one failing write fails alone.

    A writer blocks until the batch holding its write has committed, so "returns after the
    write is durable" still holds; while one batch fsyncs, the next one gathers. Used for the
    per-request writes of grant issuance and limited-use counting, where one fsync per
    request would cap a 2-core machine at a few thousand requests per second.

    A writer on an event loop (:meth:`submit_async`) gets an ``asyncio.Future`` instead, and
    a batch answers each loop with one call: a ``concurrent.futures.Future`` wrapped for the
    loop cost a wake-up of the loop per write (5% of grant issuance's CPU on the loop).
    """

    def __init__(self, store: SQLiteStore) -> None:
        self._store = store
        self._cv = threading.Condition()
        self._queue: list[tuple[Callable[[sqlite3.Connection], Any], _AnyFuture]] = []
        self._thread: threading.Thread | None = None
        self._closed = False
        # writes made on each event loop during its current iteration (see submit_async)
        self._staged: dict[asyncio.AbstractEventLoop, list[tuple[Callable[[sqlite3.Connection], Any],
                                                              _AnyFuture]]] = {}

    def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        future = self.submit(fn)
        try:
            return future.result(timeout=_GROUP_COMMIT_TIMEOUT)
        except TimeoutError:
            # Report a failure only for a write that will never happen: one left in the queue
            # would commit later (a grant use counted for a call that was told it failed).
            if future.cancel():
                raise StoreError("the store did not confirm the write in time") from None
        # Its batch is running (it holds the lock for one transaction): the real outcome.
        return future.result()

    def submit(self, fn: Callable[[sqlite3.Connection], T]) -> Future[T]:
        future: Future[T] = Future()
        self._enqueue((fn, future))
        return future

    def submit_async(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """:meth:`submit` for the running event loop (must be called on it).

        The loop's writes of one iteration are handed to the commit thread together at the
        end of the iteration: handed over one by one, each woke the thread, which took it
        alone, so nearly every grant had a transaction (and an fsync) of its own, and the
        thread preempted the loop for each.
        """
        if self._closed:
            raise StoreError("store is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        staged = self._staged.get(loop)
        if staged is None:
            staged = self._staged[loop] = []
            loop.call_soon(self._hand_over, loop)
        staged.append((fn, future))
        return future

    def _hand_over(self, loop: asyncio.AbstractEventLoop) -> None:
        items = self._staged.pop(loop, [])
        try:
            self._enqueue(*items)
        except StoreError as exc:  # closed meanwhile
            _settle([(future, None, exc) for _, future in items if not future.done()])

    def _enqueue(self, *items: tuple[Callable[[sqlite3.Connection], Any], _AnyFuture]) -> None:
        with self._cv:
            if self._closed:
                raise StoreError("store is closed")
            if self._thread is None:
                thread = threading.Thread(target=self._loop, name="sqlite-group-commit",
                                          daemon=True)
                try:
                    thread.start()
                except RuntimeError as exc:  # can't start new thread: refused, tried next time
                    raise StoreError("cannot start the store's commit thread") from exc
                self._thread = thread
            self._queue.extend(items)
            self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
            thread = self._thread
        if thread is not None:
            thread.join()

    def _loop(self) -> None:
        as_background_thread()
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if not self._queue:
                    return
                batch, self._queue = self._queue, []
            self._commit(batch)

    def _commit(self, batch: list[tuple[Callable[[sqlite3.Connection], Any], _AnyFuture]]) -> None:
        store = self._store
        outcomes: list[_Outcome] = []
        with store._lock:
            db = store._db
            try:
                store._check_file()
                db.execute("BEGIN IMMEDIATE")
            except StoreError as exc:
                _settle([(future, None, exc) for _, future in batch if _start(future)])
                return
            except sqlite3.Error:
                _settle([(future, None, StoreError("cannot begin a transaction"))
                         for _, future in batch if _start(future)])
                return
            live = [(fn, future) for fn, future in batch if _start(future)]  # skip given-up ones
            i = 0
            abandoned = False
            try:
                while i < len(live) and db.in_transaction:
                    fn = live[i][0]
                    if isinstance(fn, _Insert):  # a run of inserts of one shape: one statement
                        j = i + 1
                        while (j < len(live) and isinstance(f := live[j][0], _Insert)
                               and f.head == fn.head and f.row == fn.row):
                            j += 1
                        outcomes += self._insert_run(db, live[i:j], whole=j - i == len(live))
                        i = j
                    else:
                        outcomes.append(self._one(db, *live[i]))
                        i += 1
            except _Abandoned:
                abandoned = True
            if abandoned or not db.in_transaction:
                # an error that rolled the whole transaction back (disk full, I/O), or a failed
                # write that could not be undone alone: nothing of this batch is durable, and
                # nothing after it may run outside a transaction
                outcomes = [(future, None, StoreError("write failed")) for _, future in live]
            else:
                try:
                    db.execute("COMMIT")
                except sqlite3.Error:
                    with suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                    outcomes = [(future, None, StoreError("commit failed"))
                                for future, _, _ in outcomes]
        _settle(outcomes)

    @staticmethod
    def _one(db: sqlite3.Connection, fn: Callable[[sqlite3.Connection], Any],
             future: _AnyFuture) -> _Outcome:
        """One write in a savepoint of its own, so that it fails alone."""
        try:
            db.execute("SAVEPOINT item")
            result = fn(db)
            db.execute("RELEASE item")
            return (future, result, None)
        except BaseException as exc:  # handed to the writer that caused it
            if db.in_transaction:
                try:
                    db.execute("ROLLBACK TO item")
                    db.execute("RELEASE item")
                except sqlite3.Error:
                    _abandon(db)
            return (future, None, _translate(exc))

    @classmethod
    def _insert_run(cls, db: sqlite3.Connection,
                    run: list[tuple[Callable[[sqlite3.Connection], Any], _AnyFuture]], *,
                    whole: bool) -> list[_Outcome]:
        """Consecutive inserts of one shape in one statement (:func:`_insert_rows`): grant
        issuance writes one row per request, and three statements per row (savepoint,
        insert, release) each gave the GIL back and waited to get it from the busy event
        loop again. If any row
        fails (an id taken), the run is undone and its rows are written one by one, so only
        that one fails. A run that is the ``whole`` transaction needs no savepoint of its
        own: undoing it is rolling the transaction back and beginning it again."""
        if len(run) > 1:
            inserts: list[_Insert] = [fn for fn, _ in run]  # type: ignore[misc]
            try:
                if not whole:
                    db.execute("SAVEPOINT run")
                _insert_rows(db, inserts)
                if not whole:
                    db.execute("RELEASE run")
                return [(future, None, None) for _, future in run]
            except Exception:
                if not db.in_transaction:
                    return [(future, None, StoreError("write failed")) for _, future in run]
                try:
                    if whole:
                        db.execute("ROLLBACK")
                        db.execute("BEGIN IMMEDIATE")
                    else:
                        db.execute("ROLLBACK TO run")
                        db.execute("RELEASE run")
                except sqlite3.Error:
                    _abandon(db)
        return [cls._one(db, fn, future) for fn, future in run]


class _Abandoned(Exception):
    """A failed write could not be undone alone: the whole batch fails, uncommitted."""


def _abandon(db: sqlite3.Connection) -> NoReturn:
    """Roll the whole transaction back and end the batch: committing would make durable what
    was left of the failed write, or rows already reported failed."""
    with suppress(sqlite3.Error):
        db.execute("ROLLBACK")
    raise _Abandoned


def _insert_rows(db: sqlite3.Connection, inserts: list[_Insert]) -> None:
    """Insert rows of one :class:`_Insert` shape with multi-row ``VALUES`` statements.

    Not ``executemany``: it steps each row with the GIL given up and taken back, and in the
    commit thread every taking back waited for the busy event loop; one statement per up to
    200 rows waits once (A/B on grant issuance: +5.6%).
    """
    first = inserts[0]
    per = max(1, min(200, db.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // len(first.params)))
    for start in range(0, len(inserts), per):
        chunk = inserts[start:start + per]
        db.execute(first.head + ", ".join([first.row] * len(chunk)),
                   [value for insert in chunk for value in insert.params])


class _Insert:
    """A write that is one ``INSERT INTO ... VALUES (?, ...)`` statement, batched by the
    group commit: ``head`` is everything up to ``VALUES``, ``row`` the placeholders."""

    __slots__ = ("head", "params", "row")

    def __init__(self, head: str, row: str, params: Sequence[Any]) -> None:
        self.head = head
        self.row = row
        self.params = params

    def __call__(self, db: sqlite3.Connection) -> None:
        db.execute(self.head + self.row, self.params)


_AnyFuture = Future[Any] | asyncio.Future[Any]
_Outcome = tuple[_AnyFuture, Any, BaseException | None]


def _start(future: _AnyFuture) -> bool:
    """Whether the write should run: not if its caller cancelled it already."""
    if isinstance(future, Future):
        return future.set_running_or_notify_cancel()
    return not future.cancelled()  # checked again on the loop before it is answered


def _settle(outcomes: list[_Outcome]) -> None:
    """Answer every writer: thread futures at once, loop futures with one call per loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
    for outcome in outcomes:
        future = outcome[0]
        if isinstance(future, Future):
            _answer(outcome)
        else:
            by_loop.setdefault(future.get_loop(), []).append(outcome)
    for loop, answers in by_loop.items():
        with suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            loop.call_soon_threadsafe(_answer_all, answers)


def _answer_all(outcomes: list[_Outcome]) -> None:
    for outcome in outcomes:
        _answer(outcome)


def _answer(outcome: _Outcome) -> None:
    future, result, error = outcome
    if future.done():  # an asyncio future cancelled meanwhile
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


_INSERT_GRANT: Final = ("INSERT INTO grants (id, key_id, grantee, state, expires_at, max_uses, "
                         "uses, retiring_principal, parent_id, record) VALUES ")
_GRANT_ROW: Final = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"


def _insert_grant(grant: Grant) -> _Insert:
    return _Insert(_INSERT_GRANT, _GRANT_ROW, _grant_params(grant))


class SQLiteStore:
    """Implements :class:`~keygrants.store.base.Store` on one SQLite database file.

    Args:
        path: the database file; its directory must exist. ``":memory:"`` for tests.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        self._lock = threading.RLock()
        self._group = _GroupCommit(self)
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                       timeout=10.0)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open SQLite database at {self.path}") from exc
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA busy_timeout=10000")
            # The WAL is copied back by a background thread (below) rather than by whichever
            # commit crosses 1,000 pages, so no batch of writes waits for that copy and its
            # fsync (as the audit log does); the automatic checkpoint stays as a backstop at
            # ~40 MiB.
            self._db.execute(f"PRAGMA wal_autocheckpoint={_WAL_BACKSTOP_PAGES}")
            self._migrate()
        except sqlite3.Error as exc:
            self._db.close()  # no lock or half-applied migration left behind
            raise StoreError(f"cannot open SQLite database at {self.path}") from exc
        self._wal_stop = threading.Event()
        self._gone = threading.Event()  # set when the file was deleted or replaced under us
        self._wal_thread: threading.Thread | None = None
        if self.path != ":memory:":
            for suffix in ("", "-wal", "-shm"):
                p = Path(self.path + suffix)
                if p.exists():
                    p.chmod(0o600)
            # the thread holds no reference to the store: one never closed still goes away,
            # and its thread with it
            self._wal_thread = threading.Thread(
                target=_copy_wal_back, daemon=True, name="sqlite-wal-checkpoint",
                args=(self.path, self._wal_stop, self._gone, file_identity(self.path)))
            weakref.finalize(self, self._wal_stop.set)
            self._wal_thread.start()

    def _migrate(self) -> None:
        """Apply the missing migrations, each in a write transaction that reads the schema
        version itself: a process opening the same file at the same moment waits, then finds
        the migration applied (read before the transaction, both would apply it)."""
        db = self._db
        while True:
            db.execute("BEGIN IMMEDIATE")
            try:
                (current,) = db.execute("PRAGMA user_version").fetchone()
                if current >= len(_MIGRATIONS):
                    db.execute("COMMIT")
                    return
                # statement by statement: executescript would commit this transaction first
                for statement in _statements(_MIGRATIONS[current]):
                    db.execute(statement)
                db.execute(f"PRAGMA user_version={current + 1}")
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    with suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                raise

    def _check_file(self) -> None:
        if self._gone.is_set():
            raise StoreError(f"the database {self.path} was deleted or replaced while the server "
                             "was using it: restore it and restart the server")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._check_file()
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
            self._check_file()
            try:
                return fn(self._db)
            except sqlite3.Error as exc:
                raise StoreError("read failed") from exc
            except UnicodeError as exc:
                raise StoreError(_NOT_TEXT) from exc

    def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            with self._tx() as db:
                return fn(db)
        except sqlite3.IntegrityError as exc:
            raise AlreadyExists("name is already in use") from exc
        except sqlite3.Error as exc:
            raise StoreError("write failed") from exc
        except UnicodeError as exc:
            raise StoreError(_NOT_TEXT) from exc

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

    def update_key(self, key: Key, *, expected: Key) -> None:
        def go(db: sqlite3.Connection) -> None:
            self._check_key(db, key.id, expected)
            sets = ", ".join(f"{c} = ?" for c in _KEY_COLUMNS[1:])
            db.execute(f"UPDATE keys SET {sets} WHERE id = ?", (*_key_params(key)[1:], key.id))
        self._write(go)

    @staticmethod
    def _stored_key(db: sqlite3.Connection, key_id: str) -> Key:
        row = db.execute(f"{_KEY_SELECT} WHERE id = ?", (key_id,)).fetchone()
        if row is None:
            raise KeyNotFound()
        return _key_from_row(row)

    @classmethod
    def _check_key(cls, db: sqlite3.Connection, key_id: str, expected: Key) -> Key:
        """The compare-and-set of every key write (inside its write transaction)."""
        current = cls._stored_key(db, key_id)
        if current != expected:
            raise Conflict("the key changed concurrently; retry")
        return current

    def add_version(self, key: Key, version: KeyVersion, *, expected: Key) -> None:
        def go(db: sqlite3.Connection) -> None:
            current = self._stored_key(db, key.id)
            if current.latest_version != version.version - 1 or key.latest_version != version.version:
                raise Conflict("the key was rotated concurrently; retry")
            self._check_key(db, key.id, expected)
            self._insert_version(db, version)
            db.execute("UPDATE keys SET latest_version = ?, next_rotation_at = ?, updated_at = ? "
                       "WHERE id = ?", (key.latest_version, key.next_rotation_at, key.updated_at,
                                        key.id))
        self._write(go)

    def get_versions(self, key_id: str) -> list[KeyVersion]:
        rows = self._read(lambda db: db.execute(
            "SELECT key_id, version, created_at, sealed, public_key_der FROM key_versions "
            "WHERE key_id = ? ORDER BY version", (key_id,)).fetchall())
        return [KeyVersion(key_id=r[0], version=r[1], created_at=r[2], sealed=bytes(r[3]),
                           public_key_der=None if r[4] is None else bytes(r[4])) for r in rows]

    def destroy_key(self, key_id: str, *, now: int) -> Key:
        def go(db: sqlite3.Connection) -> Key:
            current = self._stored_key(db, key_id)
            if not _destroyable(current, now):
                raise Conflict("the key is no longer due for destruction")
            dead = _destroyed(current, now)
            db.execute("UPDATE key_versions SET sealed = X'' WHERE key_id = ?", (key_id,))
            db.execute("UPDATE keys SET state = ?, previous_state = NULL, updated_at = ? "
                       "WHERE id = ?", (dead.state, dead.updated_at, key_id))
            return dead
        dead = self._write(go)
        # Overwrite freed pages too, so the destroyed material does not linger in the file.
        self._read(lambda db: db.execute("PRAGMA wal_checkpoint(TRUNCATE)"))
        return dead

    def keys_due(self, now: int) -> list[Key]:
        rows = self._read(lambda db: db.execute(
            f"{_KEY_SELECT} WHERE (state = 'enabled' AND next_rotation_at <= ?) "
            "OR (state = 'pending_deletion' AND deletion_date <= ?)", (now, now)).fetchall())
        return [_key_from_row(r) for r in rows]

    # -- aliases ---------------------------------------------------------------------------

    def create_alias(self, alias: str, key_id: str) -> None:
        def go(db: sqlite3.Connection) -> None:
            if (db.execute("SELECT 1 FROM keys WHERE name = ?", (alias,)).fetchone()
                    or db.execute("SELECT 1 FROM aliases WHERE alias = ?", (alias,)).fetchone()):
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

    # -- principals and credentials ------------------------------------------------------

    def create_principal(self, principal: Principal) -> None:
        cols = ", ".join(_PRINCIPAL_COLUMNS)
        marks = ", ".join("?" for _ in _PRINCIPAL_COLUMNS)
        self._write(lambda db: db.execute(f"INSERT INTO principals ({cols}) VALUES ({marks})",
                                          _principal_params(principal)))

    def get_principal(self, principal_id: str) -> Principal | None:
        row = self._read(lambda db: db.execute(
            f"SELECT {', '.join(_PRINCIPAL_COLUMNS)} FROM principals WHERE id = ?",
            (principal_id,)).fetchone())
        return None if row is None else _principal_from_row(row)

    def list_principals(self, *, limit: int, after: str | None = None) -> list[Principal]:
        rows = self._read(lambda db: db.execute(
            f"SELECT {', '.join(_PRINCIPAL_COLUMNS)} FROM principals WHERE id > ? "
            "ORDER BY id LIMIT ?", (after or "", limit)).fetchall())
        return [_principal_from_row(r) for r in rows]

    def update_principal(self, principal: Principal, *, expected: Principal) -> None:
        def go(db: sqlite3.Connection) -> None:
            row = db.execute(f"SELECT {', '.join(_PRINCIPAL_COLUMNS)} FROM principals WHERE id = ?",
                             (principal.id,)).fetchone()
            if row is None:
                raise PrincipalNotFound()
            if not _same_principal(_principal_from_row(row), expected):
                raise Conflict("the principal changed concurrently; retry")
            sets = ", ".join(f"{c} = ?" for c in _PRINCIPAL_UPDATED)
            db.execute(f"UPDATE principals SET {sets} WHERE id = ?",
                       (*_principal_params(principal)[1:len(_PRINCIPAL_UPDATED) + 1], principal.id))
        self._write(go)

    def delete_principal(self, principal_id: str) -> None:
        def go(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM credentials WHERE principal_id = ?", (principal_id,))
            if db.execute("DELETE FROM principals WHERE id = ?", (principal_id,)).rowcount == 0:
                raise PrincipalNotFound()
        self._write(go)

    def add_credential(self, credential: Credential) -> None:
        def go(db: sqlite3.Connection) -> None:
            if not db.execute("SELECT 1 FROM principals WHERE id = ?",
                              (credential.principal_id,)).fetchone():
                raise PrincipalNotFound()
            if db.execute("SELECT 1 FROM credentials WHERE id = ?", (credential.id,)).fetchone():
                raise AlreadyExists(f"credential {credential.id!r} already exists")
            cols = ", ".join(_CREDENTIAL_COLUMNS)
            marks = ", ".join("?" for _ in _CREDENTIAL_COLUMNS)
            db.execute(f"INSERT INTO credentials ({cols}) VALUES ({marks})",
                       tuple(getattr(credential, c) for c in _CREDENTIAL_COLUMNS))
        self._write(go)

    def get_credential(self, credential_id: str) -> Credential | None:
        row = self._read(lambda db: db.execute(
            f"SELECT {', '.join(_CREDENTIAL_COLUMNS)} FROM credentials WHERE id = ?",
            (credential_id,)).fetchone())
        return None if row is None else _credential_from_row(row)

    def list_credentials(self, principal_id: str | None = None) -> list[Credential]:
        select = f"SELECT {', '.join(_CREDENTIAL_COLUMNS)} FROM credentials"
        order = " ORDER BY principal_id, created_at, id"

        def go(db: sqlite3.Connection) -> list[Any]:
            if principal_id is None:
                return db.execute(select + order).fetchall()
            return db.execute(select + " WHERE principal_id = ?" + order, (principal_id,)).fetchall()
        return [_credential_from_row(r) for r in self._read(go)]

    def update_credential(self, credential: Credential, *, expected: Credential) -> None:
        def go(db: sqlite3.Connection) -> None:
            row = db.execute(f"SELECT {', '.join(_CREDENTIAL_COLUMNS)} FROM credentials WHERE id = ?",
                             (credential.id,)).fetchone()
            if row is None:
                raise CredentialNotFound()
            if not _same_credential(_credential_from_row(row), expected):
                raise Conflict("the credential changed concurrently; retry")
            sets = ", ".join(f"{c} = ?" for c in _CREDENTIAL_UPDATED)
            db.execute(f"UPDATE credentials SET {sets} WHERE id = ?",
                       (*(getattr(credential, c) for c in _CREDENTIAL_UPDATED), credential.id))
        self._write(go)

    def record_usage(self, principals: Mapping[str, int], credentials: Mapping[str, int]) -> None:
        def go(db: sqlite3.Connection) -> None:
            db.executemany("UPDATE principals SET last_seen_at = ? WHERE id = ? AND "
                           "(last_seen_at IS NULL OR last_seen_at < ?)",
                           [(ts, pid, ts) for pid, ts in principals.items()])
            db.executemany("UPDATE credentials SET last_used_at = ? WHERE id = ? AND "
                           "(last_used_at IS NULL OR last_used_at < ?)",
                           [(ts, cid, ts) for cid, ts in credentials.items()])
        self._write(go)

    # -- policies --------------------------------------------------------------------------

    def put_policy(self, policy: Policy) -> None:
        cols = ", ".join(_POLICY_COLUMNS)
        marks = ", ".join("?" for _ in _POLICY_COLUMNS)
        self._write(lambda db: db.execute(
            f"INSERT INTO policies ({cols}) VALUES ({marks}) ON CONFLICT (name) DO UPDATE SET "
            "text = excluded.text, description = excluded.description, "
            "updated_at = excluded.updated_at",
            tuple(getattr(policy, c) for c in _POLICY_COLUMNS)))

    def get_policy(self, name: str) -> Policy | None:
        row = self._read(lambda db: db.execute(
            f"SELECT {', '.join(_POLICY_COLUMNS)} FROM policies WHERE name = ?", (name,)).fetchone())
        return None if row is None else Policy(**dict(zip(_POLICY_COLUMNS, row, strict=True)))

    def list_policies(self) -> list[Policy]:
        rows = self._read(lambda db: db.execute(
            f"SELECT {', '.join(_POLICY_COLUMNS)} FROM policies ORDER BY name").fetchall())
        return [Policy(**dict(zip(_POLICY_COLUMNS, r, strict=True))) for r in rows]

    def delete_policy(self, name: str) -> None:
        def go(db: sqlite3.Connection) -> None:
            if db.execute("DELETE FROM policies WHERE name = ?", (name,)).rowcount == 0:
                raise PolicyNotFound()
        self._write(go)

    # -- grants ------------------------------------------------------------------------------

    def create_grant(self, grant: Grant) -> None:
        self._group.run(_insert_grant(grant))

    def submit_create_grant(self, grant: Grant) -> Future[None] | asyncio.Future[None]:
        write = _insert_grant(grant)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return self._group.submit(write)
        return self._group.submit_async(write)

    def delete_grant(self, grant_id: str) -> None:
        self._group.run(lambda db: db.execute("DELETE FROM grants WHERE id = ?", (grant_id,)))

    def get_grant(self, grant_id: str) -> Grant | None:
        row = self._read(lambda db: db.execute(f"{_GRANT_SELECT} WHERE id = ?",
                                               (grant_id,)).fetchone())
        return None if row is None else _grant_from_row(row)

    def list_grants(self, *, now: int, limit: int, after: str | None = None,
                    key_id: str | None = None, grantee: str | None = None,
                    retiring_principal: str | None = None, state: str | None = None
                    ) -> list[Grant]:
        where: list[str] = ["id > ?"]
        params: list[object] = [after or ""]
        for column, value in (("key_id", key_id), ("grantee", grantee),
                              ("retiring_principal", retiring_principal)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if state == "active":
            where.append("state = 'active' AND expires_at > ? AND (max_uses IS NULL OR uses < max_uses)")
            params.append(now)
        elif state == "exhausted":
            where.append("state = 'active' AND max_uses IS NOT NULL AND uses >= max_uses")
        elif state == "expired":
            where.append("((state = 'active' AND (max_uses IS NULL OR uses < max_uses)) "
                         "OR state = 'pending') AND expires_at <= ?")
            params.append(now)
        elif state == "pending":
            where.append("state = 'pending' AND expires_at > ?")
            params.append(now)
        elif state is not None:
            where.append("state = ?")
            params.append(state)
        sql = f"{_GRANT_SELECT} WHERE {' AND '.join(where)} ORDER BY id LIMIT ?"
        rows = self._read(lambda db: db.execute(sql, (*params, limit)).fetchall())
        return [_grant_from_row(r) for r in rows]

    def live_grant_ids(self, *, now: int, grantee: str | None = None, key_id: str | None = None,
                       parent_id: str | None = None,
                       parent_ids: Sequence[str] | None = None) -> list[str]:
        if parent_ids is not None:
            ids = list(parent_ids)

            def children(db: sqlite3.Connection) -> list[str]:
                out: list[str] = []
                for start in range(0, len(ids), _IDS_PER_QUERY):
                    chunk = ids[start:start + _IDS_PER_QUERY]
                    out += [r[0] for r in db.execute(
                        f"SELECT id FROM grants WHERE parent_id IN ({', '.join('?' * len(chunk))}) "
                        "AND state IN ('active', 'pending') AND expires_at > ?",
                        (*chunk, now)).fetchall()]
                return out
            return sorted(self._read(children))
        column, value = next((c, v) for c, v in (("grantee", grantee), ("key_id", key_id),
                                                 ("parent_id", parent_id)) if v is not None)
        rows = self._read(lambda db: db.execute(
            f"SELECT id FROM grants WHERE {column} = ? AND state IN ('active', 'pending') "
            "AND expires_at > ? ORDER BY id", (value, now)).fetchall())
        return [r[0] for r in rows]

    def consume_grant_use(self, grant_id: str, now: int, n: int = 1) -> Grant | None:
        _check_uses(n)

        def go(db: sqlite3.Connection) -> Grant | None:
            row = db.execute(
                "UPDATE grants SET uses = uses + ? WHERE id = ? AND state = 'active' "
                "AND expires_at > ? AND max_uses IS NOT NULL AND uses + ? <= max_uses "
                "RETURNING state, record, uses", (n, grant_id, now, n)).fetchone()
            return None if row is None else _grant_from_row(row)
        return self._group.run(go)

    @staticmethod
    def _append_feed(db: sqlite3.Connection, feed: Sequence[RevocationEntry]) -> list[RevocationEntry]:
        out = []
        for e in feed:
            cur = db.execute(
                "INSERT INTO revocations (kind, subject, revoked_at, expires_at, reason) "
                "VALUES (?, ?, ?, ?, ?)", (e.kind, e.id, e.revoked_at, e.expires_at, e.reason))
            assert cur.lastrowid is not None
            out.append(msgspec.structs.replace(e, seq=cur.lastrowid))
        return out

    def update_grant(self, grant: Grant, *, expected_state: str,
                     feed: Sequence[RevocationEntry] = ()) -> list[RevocationEntry]:
        def go(db: sqlite3.Connection) -> list[RevocationEntry]:
            row = db.execute(f"{_GRANT_SELECT} WHERE id = ?", (grant.id,)).fetchone()
            if row is None:
                raise GrantNotFound()
            current = _grant_from_row(row)
            if current.state != expected_state:
                raise Conflict("the grant changed meanwhile")
            updated = msgspec.structs.replace(
                current, state=grant.state, not_before=grant.not_before,
                expires_at=grant.expires_at, decided_by=grant.decided_by,
                decided_at=grant.decided_at, ended_at=grant.ended_at, ended_by=grant.ended_by)
            db.execute("UPDATE grants SET state = ?, expires_at = ?, record = ? WHERE id = ?",
                       (updated.state, updated.expires_at, _grant_encoder.encode(updated), grant.id))
            return self._append_feed(db, feed)
        return self._write(go)

    def end_grants(self, grant_ids: Sequence[str], *, state: str, now: int, by: str,
                   feed: Sequence[RevocationEntry],
                   entry_leeway: int | None = None) -> list[RevocationEntry]:
        def go(db: sqlite3.Connection) -> list[RevocationEntry]:
            ended: list[Grant] = []
            for gid in grant_ids:
                row = db.execute(f"{_GRANT_SELECT} WHERE id = ? AND state IN ('active', 'pending')",
                                 (gid,)).fetchone()
                if row is None:
                    continue
                grant = _grant_from_row(row)
                ended.append(grant)
                db.execute("UPDATE grants SET state = ?, record = ? WHERE id = ?",
                           (state, _grant_encoder.encode(msgspec.structs.replace(
                               grant, state=state, ended_at=now, ended_by=by)), gid))
            return self._append_feed(db, [*feed, *ended_grant_entries(ended, now=now,
                                                                      leeway=entry_leeway)])
        return self._write(go)

    # -- revocation feed -------------------------------------------------------------------

    def revocations_since(self, seq: int, *, limit: int) -> list[RevocationEntry]:
        rows = self._read(lambda db: db.execute(
            "SELECT seq, kind, subject, revoked_at, expires_at, reason FROM revocations "
            "WHERE seq > ? ORDER BY seq LIMIT ?", (seq, limit)).fetchall())
        return [RevocationEntry(seq=r[0], kind=r[1], id=r[2], revoked_at=r[3], expires_at=r[4],
                                reason=r[5]) for r in rows]

    def latest_revocation_seq(self) -> int:
        # sqlite_sequence keeps the high-water mark even when the newest rows were pruned
        row = self._read(lambda db: db.execute(
            "SELECT seq FROM sqlite_sequence WHERE name = 'revocations'").fetchone())
        return 0 if row is None else int(row[0])

    def prune_revocations(self, now: int) -> int:
        return self._write(lambda db: db.execute(
            "DELETE FROM revocations WHERE expires_at <= ?", (now,)).rowcount)

    # -- issuer keys -------------------------------------------------------------------------

    def list_issuer_keys(self) -> list[IssuerKey]:
        rows = self._read(lambda db: db.execute(
            "SELECT kid, alg, public_raw, sealed, seq, created_at, activate_at, retire_at "
            "FROM issuer_keys ORDER BY seq").fetchall())
        return [IssuerKey(kid=r[0], alg=r[1], public_raw=bytes(r[2]), sealed=bytes(r[3]), seq=r[4],
                          created_at=r[5], activate_at=r[6], retire_at=r[7]) for r in rows]

    def add_issuer_key(self, key: IssuerKey, retire: Sequence[tuple[str, int]]) -> None:
        def go(db: sqlite3.Connection) -> None:
            if db.execute("SELECT 1 FROM issuer_keys WHERE seq = ?", (key.seq,)).fetchone():
                raise Conflict("another issuer key rotation won")
            for kid, at in retire:
                db.execute("UPDATE issuer_keys SET retire_at = ? WHERE kid = ?", (at, kid))
            db.execute(
                "INSERT INTO issuer_keys (seq, kid, alg, public_raw, sealed, created_at, "
                "activate_at, retire_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (key.seq, key.kid, key.alg, key.public_raw, key.sealed, key.created_at,
                 key.activate_at, key.retire_at))
        self._write(go)

    def delete_issuer_keys(self, *, retired_before: int) -> int:
        return self._write(lambda db: db.execute(
            "DELETE FROM issuer_keys WHERE retire_at IS NOT NULL AND retire_at < ?",
            (retired_before,)).rowcount)

    def close(self) -> None:
        self._group.close()
        self._wal_stop.set()
        if self._wal_thread is not None:
            self._wal_thread.join()
        with self._lock:
            self._db.close()
