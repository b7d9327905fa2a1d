"""The scale-out store: PostgreSQL through psycopg 3 and a connection pool.

Any number of server processes share one database. Every write runs in its own transaction
on a pooled connection and returns after ``COMMIT``, which with ``synchronous_commit`` on
(turned on for our sessions if the server default is ``off``) has flushed the WAL: an
acknowledged write is durable.

The SQLite store gets its concurrency guarantees from one writer at a time; here they come
from PostgreSQL locks, under the default ``READ COMMITTED`` isolation:

- a method that checks a row before writing locks it first (``SELECT ... FOR UPDATE``), so
  the loser of a compare-and-set waits for the winner, sees its row and raises ``Conflict``;
- key names and aliases share one namespace across two tables, so creating either takes a
  transaction-level advisory lock: a key and an alias of the same name cannot both win;
- the revocation feed is numbered from a one-row counter that each append locks until it
  commits, so entries become visible in sequence order (a reader that has seen ``n`` never
  later finds a smaller number appear) and the counter keeps the high-water mark after
  pruning;
- the schema is migrated at open inside one transaction under an advisory lock, so servers
  starting together apply each migration exactly once.

Every call is bounded (``OPERATION_TIMEOUT``, waiting for a connection included): a
PostgreSQL that stops answering without closing the connection (a stalled disk, a network
that drops packets) would otherwise hold the calling thread for as long as TCP keeps the
connection, which can be a quarter of an hour. ``statement_timeout`` only helps while the
server runs and keepalives only while its kernel no longer acknowledges, so a watchdog thread
shuts down the socket of a call that overran its deadline; the call fails with ``StoreError``
and the pool replaces the connection. After a call found PostgreSQL unreachable (no
connection came in time, or a call overran), the others fail at once while one call at a time
tries again, and the pool reconnects at least every ``_RECONNECT_DELAY_MAX`` seconds, so
service follows the database back within about a second.

Destroying a key overwrites its sealed versions with empty values, but PostgreSQL keeps old
row versions until vacuum and in its WAL and backups; the material there is still sealed by
the root key.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Final, TypeVar

import msgspec
import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import TupleRow
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout
from psycopg_pool.base import AttemptWithBackoff

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

__all__ = ["SCHEMA_VERSION", "PostgresStore", "watchdog"]

log = logging.getLogger("keygrants.store")

T = TypeVar("T")
_Conn = psycopg.Connection[TupleRow]

CONNECT_TIMEOUT: Final = 10
"""Seconds to wait for a new connection to the server (libpq ``connect_timeout``)."""
OPERATION_TIMEOUT: Final = 10.0
"""Seconds one call may take in all (waiting for a connection, its statements, retries) before
it fails with ``StoreError``; its connection is then dropped."""
ACQUIRE_TIMEOUT: Final = 5.0
"""Seconds a call waits for a free pooled connection before failing with ``StoreError``."""
_STATEMENT_TIMEOUT_MS: Final = int(OPERATION_TIMEOUT * 800)  # the server's clean error first
_IDLE_IN_TRANSACTION_MS: Final = int(OPERATION_TIMEOUT * 3000)  # locks of a vanished client
_TCP_SETTINGS: Final = (("keepalives", 1), ("keepalives_idle", 10), ("keepalives_interval", 5),
                        ("keepalives_count", 3), ("tcp_user_timeout", 20_000))
_RECONNECT_DELAY_MAX: Final = 1.0  # seconds between the pool's attempts during an outage
_CLOSE_GRACE: Final = 2.0  # seconds calls still running at close get before being cut off
_LOG_EVERY: Final = 30.0  # seconds between two "error connecting" warnings of the pool
_NOT_TEXT: Final = "a value is not valid Unicode text (a lone surrogate?)"
_IDS_PER_QUERY: Final = 10_000  # ids passed as one array parameter
_WRITE_ATTEMPTS: Final = 3  # a deadlock victim's transaction rolled back whole: run it again

# Advisory lock keys, scoped to the database; "kg" in the high bytes to stay clear of others.
_MIGRATION_LOCK: Final = 0x6B67_0001
_NAMES_LOCK: Final = 0x6B67_0002

_MIGRATIONS: Final[tuple[str, ...]] = (
    """
    CREATE TABLE meta (name TEXT COLLATE "C" PRIMARY KEY, value BYTEA NOT NULL);
    CREATE TABLE keys (
        id TEXT COLLATE "C" PRIMARY KEY,
        name TEXT COLLATE "C" NOT NULL UNIQUE,
        spec TEXT NOT NULL,
        purpose TEXT NOT NULL,
        description TEXT NOT NULL,
        state TEXT NOT NULL,
        derivable BOOLEAN NOT NULL,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        rotation_period BIGINT,
        next_rotation_at BIGINT,
        deletion_date BIGINT,
        previous_state TEXT,
        min_decryption_version BIGINT NOT NULL,
        latest_version BIGINT NOT NULL,
        tags JSONB NOT NULL DEFAULT '[]'
    );
    CREATE INDEX keys_next_rotation ON keys (next_rotation_at) WHERE state = 'enabled';
    CREATE INDEX keys_deletion ON keys (deletion_date) WHERE state = 'pending_deletion';
    CREATE TABLE key_versions (
        key_id TEXT COLLATE "C" NOT NULL REFERENCES keys (id),
        version BIGINT NOT NULL,
        created_at BIGINT NOT NULL,
        sealed BYTEA NOT NULL,
        public_key_der BYTEA,
        PRIMARY KEY (key_id, version)
    );
    CREATE TABLE aliases (
        alias TEXT COLLATE "C" PRIMARY KEY,
        key_id TEXT COLLATE "C" NOT NULL REFERENCES keys (id)
    );
    CREATE INDEX aliases_key ON aliases (key_id, alias);
    CREATE TABLE principals (
        id TEXT COLLATE "C" PRIMARY KEY,
        display_name TEXT NOT NULL,
        tags JSONB NOT NULL,
        enabled BOOLEAN NOT NULL,
        builtin BOOLEAN NOT NULL,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        last_seen_at BIGINT
    );
    CREATE TABLE credentials (
        id TEXT COLLATE "C" PRIMARY KEY,
        principal_id TEXT COLLATE "C" NOT NULL REFERENCES principals (id),
        kind TEXT NOT NULL,
        label TEXT NOT NULL,
        algorithm TEXT,
        public_key_der BYTEA,
        secret_digest BYTEA,
        sealed_secret BYTEA,
        match TEXT,
        not_before BIGINT NOT NULL,
        expires_at BIGINT,
        created_at BIGINT NOT NULL,
        last_used_at BIGINT,
        revoked_at BIGINT
    );
    CREATE INDEX credentials_principal ON credentials (principal_id, created_at, id);
    CREATE TABLE policies (
        name TEXT COLLATE "C" PRIMARY KEY,
        text TEXT NOT NULL,
        description TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL
    );
    CREATE TABLE grants (
        id TEXT COLLATE "C" PRIMARY KEY,
        key_id TEXT COLLATE "C" NOT NULL,
        grantee TEXT COLLATE "C" NOT NULL,
        state TEXT NOT NULL,
        expires_at BIGINT NOT NULL,
        max_uses BIGINT,
        uses BIGINT NOT NULL,
        retiring_principal TEXT COLLATE "C",
        parent_id TEXT COLLATE "C",
        record BYTEA NOT NULL
    );
    CREATE INDEX grants_key ON grants (key_id, id);
    CREATE INDEX grants_grantee ON grants (grantee, id);
    CREATE INDEX grants_parent ON grants (parent_id) WHERE parent_id IS NOT NULL;
    CREATE TABLE revocations (
        seq BIGINT PRIMARY KEY,
        kind TEXT NOT NULL,
        subject TEXT NOT NULL,
        revoked_at BIGINT NOT NULL,
        expires_at BIGINT NOT NULL,
        reason TEXT NOT NULL
    );
    CREATE INDEX revocations_expiry ON revocations (expires_at);
    CREATE TABLE revocation_counter (
        id BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (id),
        last_seq BIGINT NOT NULL
    );
    INSERT INTO revocation_counter (last_seq) VALUES (0);
    CREATE TABLE issuer_keys (
        seq BIGINT PRIMARY KEY,
        kid TEXT COLLATE "C" NOT NULL UNIQUE,
        alg TEXT NOT NULL,
        public_raw BYTEA NOT NULL,
        sealed BYTEA NOT NULL,
        created_at BIGINT NOT NULL,
        activate_at BIGINT NOT NULL,
        retire_at BIGINT
    );
    """,
)
SCHEMA_VERSION: Final = len(_MIGRATIONS)

_KEY_COLUMNS: Final = (
    "id", "name", "spec", "purpose", "description", "state", "derivable", "created_at",
    "updated_at", "rotation_period", "next_rotation_at", "deletion_date", "previous_state",
    "min_decryption_version", "latest_version", "tags",
)
_KEY_SELECT: Final = f"SELECT {', '.join(_KEY_COLUMNS)} FROM keys"
_PRINCIPAL_COLUMNS: Final = ("id", "display_name", "tags", "enabled", "builtin", "created_at",
                             "updated_at", "last_seen_at")
_CREDENTIAL_COLUMNS: Final = tuple(Credential.__struct_fields__)
# what update_* writes: neither the id nor the usage times, which only record_usage moves
_PRINCIPAL_UPDATED: Final = _PRINCIPAL_COLUMNS[1:-1]
_CREDENTIAL_UPDATED: Final = tuple(c for c in _CREDENTIAL_COLUMNS if c not in ("id", "last_used_at"))
_POLICY_COLUMNS: Final = tuple(Policy.__struct_fields__)
_GRANT_SELECT: Final = "SELECT state, record, uses FROM grants"


def _marks(columns: Sequence[str]) -> str:
    return ", ".join("%s" for _ in columns)


def _key_from_row(row: tuple[Any, ...]) -> Key:
    values = dict(zip(_KEY_COLUMNS, row, strict=True))
    values["tags"] = tuple(values["tags"])
    return Key(**values)


def _key_params(key: Key) -> tuple[Any, ...]:
    return tuple(Jsonb(list(key.tags)) if c == "tags" else getattr(key, c) for c in _KEY_COLUMNS)


def _principal_from_row(row: tuple[Any, ...]) -> Principal:
    values = dict(zip(_PRINCIPAL_COLUMNS, row, strict=True))
    values["tags"] = tuple(values["tags"])
    return Principal(**values)


def _principal_params(p: Principal) -> tuple[Any, ...]:
    return (p.id, p.display_name, Jsonb(list(p.tags)), p.enabled, p.builtin, p.created_at,
            p.updated_at, p.last_seen_at)


def _credential_from_row(row: tuple[Any, ...]) -> Credential:
    return Credential(**dict(zip(_CREDENTIAL_COLUMNS, row, strict=True)))


def _policy_from_row(row: tuple[Any, ...]) -> Policy:
    return Policy(**dict(zip(_POLICY_COLUMNS, row, strict=True)))


_grant_encoder: Final = msgspec.msgpack.Encoder()
_grant_decoder: Final = msgspec.msgpack.Decoder(Grant)


def _grant_params(g: Grant) -> tuple[Any, ...]:
    return (g.id, g.key_id, g.grantee, g.state, g.expires_at, g.max_uses, g.uses,
            g.retiring_principal, g.parent_id, _grant_encoder.encode(g))


def _grant_from_row(row: tuple[Any, ...]) -> Grant:
    """The record, with the columns a statement may have changed (state, uses) applied."""
    record = _grant_decoder.decode(row[1])
    return msgspec.structs.replace(record, state=row[0], uses=row[2])


def _parse_url(url: str) -> dict[str, str]:
    try:
        return {k: str(v) for k, v in conninfo_to_dict(url).items() if v is not None}
    except psycopg.Error:
        # the driver's message may quote the URL, password included
        raise ValueError("malformed PostgreSQL URL; expected "
                         "postgresql://user[:password]@host[:port]/database[?option=value]") from None


def _describe(params: Mapping[str, str]) -> str:
    """Where the store points, for messages: never the password."""
    user = params.get("user")
    host = params.get("host") or params.get("hostaddr") or "localhost"
    port = params.get("port")
    where = f"{user}@{host}" if user else host
    if port:
        where += f":{port}"
    return f"{where}/{params.get('dbname') or user or ''}"


def _reason(exc: BaseException, password: str | None) -> str:
    """The driver's message on one line, with the password blanked should it ever appear."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text.replace(password, "***") if password else text


def _ensure_synchronous_commit(conn: _Conn) -> None:
    # A server configured with synchronous_commit=off would acknowledge writes that a crash
    # can lose; our sessions turn it back on (stronger settings such as remote_apply stay).
    row = conn.execute("SHOW synchronous_commit").fetchone()
    if row is not None and row[0] == "off":
        conn.execute("SET synchronous_commit = on")


class _Watched:
    __slots__ = ("deadline", "fd", "overdue", "owner")

    def __init__(self, deadline: float, fd: int, owner: object) -> None:
        self.deadline = deadline
        self.fd = fd
        self.owner = owner
        self.overdue = False


class _Watchdog:
    """Shuts down the socket of a connection whose call overran its deadline (one thread for
    the process, started on first use).

    The socket is duplicated while watched, so the descriptor shut down is always the call's,
    even if the driver closed its own in the meantime and the number was reused."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._watched: dict[int, _Watched] = {}
        self._next = 0
        self._wake_at = math.inf
        self._thread: threading.Thread | None = None

    @contextmanager
    def watch(self, conn: psycopg.Connection[Any], deadline: float, *,
              owner: object = None) -> Iterator[_Watched]:
        """Watch ``conn`` for the duration of the block; ``.overdue`` tells whether it was cut."""
        entry = _Watched(deadline, os.dup(conn.fileno()), owner)
        with self._cond:
            self._next += 1
            key = self._next
            self._watched[key] = entry
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="keygrants-pg-watchdog",
                                                daemon=True)
                self._thread.start()
            if deadline < self._wake_at:
                self._cond.notify()
        try:
            yield entry
        finally:
            with self._cond:  # under the lock: never cut once the call is over
                self._watched.pop(key, None)
            os.close(entry.fd)

    def hurry(self, owner: object, deadline: float) -> None:
        """Give the calls of ``owner`` under way at most until ``deadline``."""
        with self._cond:
            for entry in self._watched.values():
                if entry.owner is owner and entry.deadline > deadline:
                    entry.deadline = deadline
            self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                for entry in self._watched.values():
                    if entry.deadline <= now and not entry.overdue:
                        entry.overdue = True
                        _shut_down(entry.fd)
                self._wake_at = min((e.deadline for e in self._watched.values() if not e.overdue),
                                    default=math.inf)
                self._cond.wait(None if self._wake_at == math.inf else self._wake_at - now)


def _shut_down(fd: int) -> None:
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed by the peer: the call fails anyway
        pass


#: The process's one watchdog, shared by the PostgreSQL store and the PostgreSQL audit log.
watchdog: Final = _Watchdog()


class _CappedBackoff(AttemptWithBackoff):
    """The pool's reconnection delays, doubling only up to ``_RECONNECT_DELAY_MAX``: doubling
    without end (1, 2, 4 … 32 s) made service come back up to a minute after the database."""

    INITIAL_DELAY = _RECONNECT_DELAY_MAX / 2

    def update_delay(self, now: float) -> None:
        super().update_delay(now)
        self.delay = min(self.delay, _RECONNECT_DELAY_MAX)


class _Pool(ConnectionPool[_Conn]):
    def _add_connection(self, attempt: AttemptWithBackoff | None, growing: bool = False) -> None:
        super()._add_connection(attempt or _CappedBackoff(timeout=self.reconnect_timeout),
                                growing=growing)


class _QuietReconnects(logging.Filter):
    """With reconnection attempts every second for each lost connection, the pool's warning
    would flood the log during an outage: one, then one every ``_LOG_EVERY`` seconds."""

    def __init__(self) -> None:
        super().__init__()
        self._last = -math.inf

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("error connecting in"):
            return True
        now = time.monotonic()
        if now - self._last < _LOG_EVERY:
            return False
        self._last = now
        return True


_pool_log = logging.getLogger("psycopg.pool")
if not any(isinstance(f, _QuietReconnects) for f in _pool_log.filters):
    _pool_log.addFilter(_QuietReconnects())


class PostgresStore:
    """Implements :class:`~keygrants.store.base.Store` on a PostgreSQL database.

    Opening connects once, migrates the schema and opens a connection pool; calls from many
    threads each use their own pooled connection.

    Args:
        url: a libpq connection URL or string, e.g.
            ``postgresql://keygrants:secret@db.internal:5432/keygrants?sslmode=verify-full``.
        min_connections: connections the pool keeps open.
        max_connections: the most connections the pool opens.
        connect_timeout: seconds to wait for a connection (libpq counts whole seconds,
            at least 2), unless the URL sets ``connect_timeout`` itself.

    Raises:
        ValueError: if the URL is malformed or the pool bounds are wrong.
        StoreError: if the server cannot be reached, refuses the login, or holds a schema
            newer than this version of keygrants knows.
    """

    def __init__(self, url: str, *, min_connections: int = 1, max_connections: int = 10,
                 connect_timeout: int = CONNECT_TIMEOUT) -> None:
        if not 1 <= min_connections <= max_connections:
            raise ValueError("need 1 <= min_connections <= max_connections")
        params = _parse_url(url)
        params.setdefault("connect_timeout", str(connect_timeout))
        for name, value in _TCP_SETTINGS:  # settings the URL gives win
            params.setdefault(name, str(value))
        self.location = _describe(params)
        """``user@host:port/database``, for messages (no password)."""
        password = params.get("password")
        try:
            # the migration runs without the pool's statement timeouts: a second node waits
            # for the first one's migration under the advisory lock
            with psycopg.connect(make_conninfo("", **params), autocommit=True) as conn:
                self._migrate(conn)
        except KeygrantsError:
            raise
        except psycopg.Error as exc:
            # from None: the driver's exception may carry the connection and its password
            raise StoreError(f"cannot open PostgreSQL at {self.location}: "
                             f"{_reason(exc, password)}") from None
        # The server's own limits, before the client's deadline: a slow statement then ends
        # with a clean error and its connection stays usable; the options the URL gives win.
        options = (f"-c statement_timeout={_STATEMENT_TIMEOUT_MS} "
                   f"-c lock_timeout={_STATEMENT_TIMEOUT_MS} "
                   f"-c idle_in_transaction_session_timeout={_IDLE_IN_TRANSACTION_MS}")
        params["options"] = f"{options} {params['options']}" if params.get("options") else options
        self._pool: ConnectionPool[_Conn] = _Pool(
            make_conninfo("", **params), min_size=min_connections, max_size=max_connections,
            kwargs={"autocommit": True}, configure=_ensure_synchronous_commit,
            timeout=ACQUIRE_TIMEOUT, reconnect_timeout=math.inf, name="keygrants-store",
            open=False)
        try:
            self._pool.open(wait=True, timeout=float(connect_timeout))
        except psycopg.Error:
            self._pool.close()
            raise StoreError(f"cannot open a connection pool to PostgreSQL at {self.location}") from None
        self._writer = ThreadPoolExecutor(max_workers=max_connections,
                                          thread_name_prefix="keygrants-postgres")
        self._closing = threading.Lock()
        self._closed = False
        self._health = threading.Lock()
        self._unreachable = False  # the last call found PostgreSQL unreachable
        self._probing = False  # while unreachable: the one call trying again is under way

    def __repr__(self) -> str:
        return f"PostgresStore({self.location!r})"

    def _migrate(self, conn: _Conn) -> None:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, "
                         "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
            row = conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()
            current = 0 if row is None else int(row[0])
            if current > SCHEMA_VERSION:
                raise StoreError(f"the PostgreSQL schema at {self.location} is version {current}, "
                                 f"newer than this keygrants knows ({SCHEMA_VERSION}); upgrade it")
            for number, script in enumerate(_MIGRATIONS[current:], start=current + 1):
                conn.execute(script)  # several statements, so no parameters
                conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (number,))

    def _admit(self) -> bool:
        """Let a call through, or fail it at once while PostgreSQL is known to be unreachable
        and another call is finding out whether it is back. Returns whether this call is that
        probe (it must then call ``_settle``)."""
        if self._closed:
            raise StoreError("store is closed")
        with self._health:
            if not self._unreachable:
                return False
            if self._probing:
                raise StoreError(f"PostgreSQL at {self.location} is unreachable; "
                                 "failing fast until it answers again")
            self._probing = True
            return True

    def _settle(self, *, reachable: bool) -> None:
        with self._health:
            self._probing = False
            if reachable == self._unreachable:
                self._unreachable = not reachable
                if reachable:
                    log.warning("store: PostgreSQL at %s answers again", self.location)
                else:
                    log.error("store: PostgreSQL at %s is unreachable; failing calls fast until "
                              "it answers again", self.location)

    def _call(self, fn: Callable[[_Conn], T], *, deadline: float, write: bool,
              one_statement: bool = False) -> T:
        """Run ``fn`` on a pooled connection by ``deadline``.

        An answer from PostgreSQL (a result or an error it sent) shows it reachable; no
        connection in time, or a call cut off at its deadline, shows it unreachable. A lost
        connection alone (PostgreSQL ended that session) shows neither; under a read it is
        replaced once, as a read can run again, never under a write (it may have committed)."""
        probe = self._admit()
        outcome = "lost"
        try:
            for attempt in (1, 2):
                wait = min(ACQUIRE_TIMEOUT, deadline - time.monotonic())
                try:
                    if wait <= 0:
                        raise PoolTimeout()
                    with self._pool.connection(timeout=wait) as conn, \
                            watchdog.watch(conn, deadline, owner=self) as watched:
                        try:
                            if one_statement:
                                result = fn(conn)
                            else:
                                with conn.transaction():
                                    result = fn(conn)
                        except (KeygrantsError, psycopg.Error) as exc:
                            if watched.overdue:
                                outcome = "unreachable"
                                raise StoreError(f"PostgreSQL at {self.location} did not "
                                                 "answer in time") from exc
                            if not (conn.broken or conn.closed):
                                outcome = "answered"
                            elif not write and attempt == 1:
                                continue
                            raise
                        outcome = "answered"
                        return result
                except PoolClosed:
                    raise StoreError("store is closed") from None
                except PoolTimeout as exc:
                    outcome = "unreachable"
                    raise StoreError(f"no connection to PostgreSQL at {self.location} came free "
                                     "in time") from exc
            raise AssertionError("unreachable")
        finally:
            if outcome == "answered":
                if probe or self._unreachable:
                    self._settle(reachable=True)
            elif outcome == "unreachable" or probe:
                self._settle(reachable=False)

    def _read(self, fn: Callable[[_Conn], T]) -> T:
        try:
            return self._call(fn, deadline=time.monotonic() + OPERATION_TIMEOUT, write=False,
                              one_statement=True)
        except KeygrantsError:
            raise
        except psycopg.Error as exc:
            raise StoreError("read failed") from exc
        except UnicodeError as exc:
            raise StoreError(_NOT_TEXT) from exc

    def _write(self, fn: Callable[[_Conn], T], *, one_statement: bool = False,
               deadline: float | None = None) -> T:
        """Run ``fn`` in one transaction and commit; ``fn`` may raise a KeygrantsError to roll
        back. With ``one_statement`` (``fn`` runs a single statement) the connection's
        autocommit makes that statement its own transaction, without the round trips of
        ``BEGIN`` and ``COMMIT``. A deadlock victim is rolled back whole by the server, so it
        is run again (within the same deadline)."""
        if deadline is None:
            deadline = time.monotonic() + OPERATION_TIMEOUT
        for attempt in range(1, _WRITE_ATTEMPTS + 1):
            try:
                return self._call(fn, deadline=deadline, write=True, one_statement=one_statement)
            except KeygrantsError:
                raise
            except (pg_errors.DeadlockDetected, pg_errors.SerializationFailure) as exc:
                if attempt == _WRITE_ATTEMPTS:
                    raise StoreError("write failed: lock contention") from exc
            except pg_errors.UniqueViolation as exc:
                raise AlreadyExists("name is already in use") from exc
            except psycopg.Error as exc:
                raise StoreError("write failed") from exc
            except UnicodeError as exc:
                raise StoreError(_NOT_TEXT) from exc
        raise AssertionError("unreachable")

    # -- metadata --------------------------------------------------------------------------

    def get_meta(self, name: str) -> bytes | None:
        row = self._read(lambda db: db.execute(
            "SELECT value FROM meta WHERE name = %s", (name,)).fetchone())
        return None if row is None else bytes(row[0])

    def set_meta_if_absent(self, name: str, value: bytes) -> bool:
        return self._write(lambda db: db.execute(
            "INSERT INTO meta (name, value) VALUES (%s, %s) ON CONFLICT (name) DO NOTHING",
            (name, value)).rowcount == 1, one_statement=True)

    def set_meta(self, name: str, value: bytes) -> None:
        self._write(lambda db: db.execute(
            "INSERT INTO meta (name, value) VALUES (%s, %s) "
            "ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value", (name, value)), one_statement=True)

    # -- keys ------------------------------------------------------------------------------

    def create_key(self, key: Key, first_version: KeyVersion) -> None:
        def go(db: _Conn) -> None:
            db.execute("SELECT pg_advisory_xact_lock(%s)", (_NAMES_LOCK,))
            if db.execute("SELECT 1 FROM aliases WHERE alias = %s", (key.name,)).fetchone():
                raise AlreadyExists(f"name {key.name!r} is already in use")
            db.execute(f"INSERT INTO keys ({', '.join(_KEY_COLUMNS)}) VALUES ({_marks(_KEY_COLUMNS)})",
                       _key_params(key))
            self._insert_version(db, first_version)
        self._write(go)

    @staticmethod
    def _insert_version(db: _Conn, v: KeyVersion) -> None:
        db.execute(
            "INSERT INTO key_versions (key_id, version, created_at, sealed, public_key_der) "
            "VALUES (%s, %s, %s, %s, %s)",
            (v.key_id, v.version, v.created_at, v.sealed, v.public_key_der))

    def get_key(self, key_id: str) -> Key | None:
        row = self._read(lambda db: db.execute(f"{_KEY_SELECT} WHERE id = %s", (key_id,)).fetchone())
        return None if row is None else _key_from_row(row)

    def find_key(self, name: str) -> Key | None:
        # an alias first, as in SQLite (the shared namespace lets at most one of them match)
        row = self._read(lambda db: db.execute(
            f"SELECT {', '.join(_KEY_COLUMNS)} FROM ("
            "SELECT 0 AS pick, * FROM keys WHERE id = (SELECT key_id FROM aliases WHERE alias = %s) "
            "UNION ALL SELECT 1, * FROM keys WHERE name = %s) AS found ORDER BY pick LIMIT 1",
            (name, name)).fetchone())
        return None if row is None else _key_from_row(row)

    def list_keys(self, *, limit: int, after: str | None = None) -> list[Key]:
        rows = self._read(lambda db: db.execute(
            f"{_KEY_SELECT} WHERE name > %s ORDER BY name LIMIT %s", (after or "", limit)).fetchall())
        return [_key_from_row(r) for r in rows]

    def update_key(self, key: Key, *, expected: Key) -> None:
        def go(db: _Conn) -> None:
            self._check_key(db, key.id, expected)
            sets = ", ".join(f"{c} = %s" for c in _KEY_COLUMNS[1:])
            db.execute(f"UPDATE keys SET {sets} WHERE id = %s", (*_key_params(key)[1:], key.id))
        self._write(go)

    @staticmethod
    def _stored_key(db: _Conn, key_id: str) -> Key:
        """The key, locked until the transaction ends (a concurrent writer waits, then sees
        this one's change and fails its compare-and-set)."""
        row = db.execute(f"{_KEY_SELECT} WHERE id = %s FOR UPDATE", (key_id,)).fetchone()
        if row is None:
            raise KeyNotFound()
        return _key_from_row(row)

    @classmethod
    def _check_key(cls, db: _Conn, key_id: str, expected: Key) -> Key:
        """The compare-and-set of every key write (inside its transaction)."""
        current = cls._stored_key(db, key_id)
        if current != expected:
            raise Conflict("the key changed concurrently; retry")
        return current

    def add_version(self, key: Key, version: KeyVersion, *, expected: Key) -> None:
        def go(db: _Conn) -> None:
            current = self._stored_key(db, key.id)
            if current.latest_version != version.version - 1 or key.latest_version != version.version:
                raise Conflict("the key was rotated concurrently; retry")
            self._check_key(db, key.id, expected)
            self._insert_version(db, version)
            db.execute("UPDATE keys SET latest_version = %s, next_rotation_at = %s, updated_at = %s "
                       "WHERE id = %s", (key.latest_version, key.next_rotation_at, key.updated_at,
                                         key.id))
        self._write(go)

    def get_versions(self, key_id: str) -> list[KeyVersion]:
        rows = self._read(lambda db: db.execute(
            "SELECT key_id, version, created_at, sealed, public_key_der FROM key_versions "
            "WHERE key_id = %s ORDER BY version", (key_id,)).fetchall())
        return [KeyVersion(key_id=r[0], version=r[1], created_at=r[2], sealed=bytes(r[3]),
                           public_key_der=None if r[4] is None else bytes(r[4])) for r in rows]

    def destroy_key(self, key_id: str, *, now: int) -> Key:
        def go(db: _Conn) -> Key:
            current = self._stored_key(db, key_id)
            if not _destroyable(current, now):
                raise Conflict("the key is no longer due for destruction")
            dead = _destroyed(current, now)
            db.execute("UPDATE key_versions SET sealed = '' WHERE key_id = %s", (key_id,))
            db.execute("UPDATE keys SET state = %s, previous_state = NULL, updated_at = %s "
                       "WHERE id = %s", (dead.state, dead.updated_at, key_id))
            return dead
        return self._write(go)

    def keys_due(self, now: int) -> list[Key]:
        rows = self._read(lambda db: db.execute(
            f"{_KEY_SELECT} WHERE (state = 'enabled' AND next_rotation_at <= %s) "
            "OR (state = 'pending_deletion' AND deletion_date <= %s)", (now, now)).fetchall())
        return [_key_from_row(r) for r in rows]

    # -- aliases ---------------------------------------------------------------------------

    def create_alias(self, alias: str, key_id: str) -> None:
        def go(db: _Conn) -> None:
            db.execute("SELECT pg_advisory_xact_lock(%s)", (_NAMES_LOCK,))
            if (db.execute("SELECT 1 FROM keys WHERE name = %s", (alias,)).fetchone()
                    or db.execute("SELECT 1 FROM aliases WHERE alias = %s", (alias,)).fetchone()):
                raise AlreadyExists(f"name {alias!r} is already in use")
            if not db.execute("SELECT 1 FROM keys WHERE id = %s FOR SHARE", (key_id,)).fetchone():
                raise KeyNotFound()
            db.execute("INSERT INTO aliases (alias, key_id) VALUES (%s, %s)", (alias, key_id))
        self._write(go)

    def delete_alias(self, alias: str) -> None:
        def go(db: _Conn) -> None:
            if db.execute("DELETE FROM aliases WHERE alias = %s", (alias,)).rowcount == 0:
                raise AliasNotFound()
        self._write(go, one_statement=True)

    def list_aliases(self, key_id: str | None = None) -> list[Alias]:
        def go(db: _Conn) -> list[tuple[Any, ...]]:
            if key_id is None:
                return db.execute("SELECT alias, key_id FROM aliases ORDER BY alias").fetchall()
            return db.execute("SELECT alias, key_id FROM aliases WHERE key_id = %s ORDER BY alias",
                              (key_id,)).fetchall()
        return [Alias((a, k)) for a, k in self._read(go)]

    # -- principals and credentials ------------------------------------------------------

    def create_principal(self, principal: Principal) -> None:
        self._write(lambda db: db.execute(
            f"INSERT INTO principals ({', '.join(_PRINCIPAL_COLUMNS)}) "
            f"VALUES ({_marks(_PRINCIPAL_COLUMNS)})", _principal_params(principal)), one_statement=True)

    def get_principal(self, principal_id: str) -> Principal | None:
        row = self._read(lambda db: db.execute(
            f"SELECT {', '.join(_PRINCIPAL_COLUMNS)} FROM principals WHERE id = %s",
            (principal_id,)).fetchone())
        return None if row is None else _principal_from_row(row)

    def list_principals(self, *, limit: int, after: str | None = None) -> list[Principal]:
        rows = self._read(lambda db: db.execute(
            f"SELECT {', '.join(_PRINCIPAL_COLUMNS)} FROM principals WHERE id > %s "
            "ORDER BY id LIMIT %s", (after or "", limit)).fetchall())
        return [_principal_from_row(r) for r in rows]

    def update_principal(self, principal: Principal, *, expected: Principal) -> None:
        def go(db: _Conn) -> None:
            row = db.execute(f"SELECT {', '.join(_PRINCIPAL_COLUMNS)} FROM principals "
                             "WHERE id = %s FOR UPDATE", (principal.id,)).fetchone()
            if row is None:
                raise PrincipalNotFound()
            if not _same_principal(_principal_from_row(row), expected):
                raise Conflict("the principal changed concurrently; retry")
            sets = ", ".join(f"{c} = %s" for c in _PRINCIPAL_UPDATED)
            db.execute(f"UPDATE principals SET {sets} WHERE id = %s",
                       (*_principal_params(principal)[1:len(_PRINCIPAL_UPDATED) + 1], principal.id))
        self._write(go)

    def delete_principal(self, principal_id: str) -> None:
        def go(db: _Conn) -> None:
            # the principal row first, then its credentials: the order record_usage locks in
            if not db.execute("SELECT 1 FROM principals WHERE id = %s FOR UPDATE",
                              (principal_id,)).fetchone():
                raise PrincipalNotFound()
            db.execute("DELETE FROM credentials WHERE principal_id = %s", (principal_id,))
            db.execute("DELETE FROM principals WHERE id = %s", (principal_id,))
        self._write(go)

    def add_credential(self, credential: Credential) -> None:
        def go(db: _Conn) -> None:
            # FOR SHARE: a concurrent delete_principal waits for this insert, then removes it too
            if not db.execute("SELECT 1 FROM principals WHERE id = %s FOR SHARE",
                              (credential.principal_id,)).fetchone():
                raise PrincipalNotFound()
            inserted = db.execute(
                f"INSERT INTO credentials ({', '.join(_CREDENTIAL_COLUMNS)}) "
                f"VALUES ({_marks(_CREDENTIAL_COLUMNS)}) ON CONFLICT (id) DO NOTHING",
                tuple(getattr(credential, c) for c in _CREDENTIAL_COLUMNS)).rowcount
            if inserted == 0:
                raise AlreadyExists(f"credential {credential.id!r} already exists")
        self._write(go)

    def get_credential(self, credential_id: str) -> Credential | None:
        row = self._read(lambda db: db.execute(
            f"SELECT {', '.join(_CREDENTIAL_COLUMNS)} FROM credentials WHERE id = %s",
            (credential_id,)).fetchone())
        return None if row is None else _credential_from_row(row)

    def list_credentials(self, principal_id: str | None = None) -> list[Credential]:
        select = f"SELECT {', '.join(_CREDENTIAL_COLUMNS)} FROM credentials"
        order = " ORDER BY principal_id, created_at, id"

        def go(db: _Conn) -> list[tuple[Any, ...]]:
            if principal_id is None:
                return db.execute(select + order).fetchall()
            return db.execute(select + " WHERE principal_id = %s" + order, (principal_id,)).fetchall()
        return [_credential_from_row(r) for r in self._read(go)]

    def update_credential(self, credential: Credential, *, expected: Credential) -> None:
        def go(db: _Conn) -> None:
            row = db.execute(f"SELECT {', '.join(_CREDENTIAL_COLUMNS)} FROM credentials "
                             "WHERE id = %s FOR UPDATE", (credential.id,)).fetchone()
            if row is None:
                raise CredentialNotFound()
            if not _same_credential(_credential_from_row(row), expected):
                raise Conflict("the credential changed concurrently; retry")
            sets = ", ".join(f"{c} = %s" for c in _CREDENTIAL_UPDATED)
            db.execute(f"UPDATE credentials SET {sets} WHERE id = %s",
                       (*(getattr(credential, c) for c in _CREDENTIAL_UPDATED), credential.id))
        self._write(go)

    def record_usage(self, principals: Mapping[str, int], credentials: Mapping[str, int]) -> None:
        def go(db: _Conn) -> None:
            # sorted, principals before credentials: concurrent callers lock rows in one order
            with db.cursor() as cur:
                cur.executemany("UPDATE principals SET last_seen_at = %s WHERE id = %s AND "
                                "(last_seen_at IS NULL OR last_seen_at < %s)",
                                [(ts, pid, ts) for pid, ts in sorted(principals.items())])
                cur.executemany("UPDATE credentials SET last_used_at = %s WHERE id = %s AND "
                                "(last_used_at IS NULL OR last_used_at < %s)",
                                [(ts, cid, ts) for cid, ts in sorted(credentials.items())])
        if principals or credentials:
            self._write(go)

    # -- policies --------------------------------------------------------------------------

    def put_policy(self, policy: Policy) -> None:
        self._write(lambda db: db.execute(
            f"INSERT INTO policies ({', '.join(_POLICY_COLUMNS)}) VALUES ({_marks(_POLICY_COLUMNS)}) "
            "ON CONFLICT (name) DO UPDATE SET text = EXCLUDED.text, "
            "description = EXCLUDED.description, updated_at = EXCLUDED.updated_at",
            tuple(getattr(policy, c) for c in _POLICY_COLUMNS)), one_statement=True)

    def get_policy(self, name: str) -> Policy | None:
        row = self._read(lambda db: db.execute(
            f"SELECT {', '.join(_POLICY_COLUMNS)} FROM policies WHERE name = %s", (name,)).fetchone())
        return None if row is None else _policy_from_row(row)

    def list_policies(self) -> list[Policy]:
        rows = self._read(lambda db: db.execute(
            f"SELECT {', '.join(_POLICY_COLUMNS)} FROM policies ORDER BY name").fetchall())
        return [_policy_from_row(r) for r in rows]

    def delete_policy(self, name: str) -> None:
        def go(db: _Conn) -> None:
            if db.execute("DELETE FROM policies WHERE name = %s", (name,)).rowcount == 0:
                raise PolicyNotFound()
        self._write(go, one_statement=True)

    # -- grants ------------------------------------------------------------------------------

    def create_grant(self, grant: Grant, *, deadline: float | None = None) -> None:
        self._write(lambda db: db.execute(
            "INSERT INTO grants (id, key_id, grantee, state, expires_at, max_uses, uses, "
            "retiring_principal, parent_id, record) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            _grant_params(grant)), one_statement=True, deadline=deadline)

    def submit_create_grant(self, grant: Grant) -> Future[None]:
        # The deadline runs from now: an insert queued behind others during an outage fails
        # when its time is up (or at once while PostgreSQL is known unreachable), not after
        # waiting its turn for the whole queue.
        deadline = time.monotonic() + OPERATION_TIMEOUT
        with self._closing:
            if self._closed:
                raise StoreError("store is closed")
            return self._writer.submit(self.create_grant, grant, deadline=deadline)

    def delete_grant(self, grant_id: str) -> None:
        self._write(lambda db: db.execute("DELETE FROM grants WHERE id = %s", (grant_id,)),
                    one_statement=True)

    def get_grant(self, grant_id: str) -> Grant | None:
        row = self._read(lambda db: db.execute(f"{_GRANT_SELECT} WHERE id = %s",
                                               (grant_id,)).fetchone())
        return None if row is None else _grant_from_row(row)

    def list_grants(self, *, now: int, limit: int, after: str | None = None,
                    key_id: str | None = None, grantee: str | None = None,
                    retiring_principal: str | None = None, state: str | None = None
                    ) -> list[Grant]:
        where: list[str] = ["id > %s"]
        params: list[object] = [after or ""]
        for column, value in (("key_id", key_id), ("grantee", grantee),
                              ("retiring_principal", retiring_principal)):
            if value is not None:
                where.append(f"{column} = %s")
                params.append(value)
        if state == "active":
            where.append("state = 'active' AND expires_at > %s AND (max_uses IS NULL OR uses < max_uses)")
            params.append(now)
        elif state == "exhausted":
            where.append("state = 'active' AND max_uses IS NOT NULL AND uses >= max_uses")
        elif state == "expired":
            where.append("((state = 'active' AND (max_uses IS NULL OR uses < max_uses)) "
                         "OR state = 'pending') AND expires_at <= %s")
            params.append(now)
        elif state == "pending":
            where.append("state = 'pending' AND expires_at > %s")
            params.append(now)
        elif state is not None:
            where.append("state = %s")
            params.append(state)
        sql = f"{_GRANT_SELECT} WHERE {' AND '.join(where)} ORDER BY id LIMIT %s"
        rows = self._read(lambda db: db.execute(sql, (*params, limit)).fetchall())
        return [_grant_from_row(r) for r in rows]

    def live_grant_ids(self, *, now: int, grantee: str | None = None, key_id: str | None = None,
                       parent_id: str | None = None,
                       parent_ids: Sequence[str] | None = None) -> list[str]:
        if parent_ids is not None:
            ids = list(parent_ids)

            def children(db: _Conn) -> list[str]:
                return [r[0] for start in range(0, len(ids), _IDS_PER_QUERY)
                        for r in db.execute(
                            "SELECT id FROM grants WHERE parent_id = ANY(%s) AND state IN "
                            "('active', 'pending') AND expires_at > %s",
                            (ids[start:start + _IDS_PER_QUERY], now)).fetchall()]
            return sorted(self._read(children))
        column, value = next((c, v) for c, v in (("grantee", grantee), ("key_id", key_id),
                                                 ("parent_id", parent_id)) if v is not None)
        rows = self._read(lambda db: db.execute(
            f"SELECT id FROM grants WHERE {column} = %s AND state IN ('active', 'pending') "
            "AND expires_at > %s ORDER BY id", (value, now)).fetchall())
        return [r[0] for r in rows]

    def consume_grant_use(self, grant_id: str, now: int, n: int = 1) -> Grant | None:
        _check_uses(n)
        # One statement: a racing UPDATE waits for the row lock, then re-checks the WHERE
        # clause against the committed row, so uses never pass max_uses.
        row = self._write(lambda db: db.execute(
            "UPDATE grants SET uses = uses + %s WHERE id = %s AND state = 'active' "
            "AND expires_at > %s AND max_uses IS NOT NULL AND uses + %s <= max_uses "
            "RETURNING state, record, uses", (n, grant_id, now, n)).fetchone(), one_statement=True)
        return None if row is None else _grant_from_row(row)

    @staticmethod
    def _append_feed(db: _Conn, feed: Sequence[RevocationEntry]) -> list[RevocationEntry]:
        if not feed:
            return []
        # The counter row stays locked until commit: appends commit in sequence order.
        row = db.execute("UPDATE revocation_counter SET last_seq = last_seq + %s "
                         "RETURNING last_seq", (len(feed),)).fetchone()
        assert row is not None
        first = int(row[0]) - len(feed) + 1
        out = [msgspec.structs.replace(e, seq=first + i) for i, e in enumerate(feed)]
        with db.cursor() as cur:
            cur.executemany(
                "INSERT INTO revocations (seq, kind, subject, revoked_at, expires_at, reason) "
                "VALUES (%s, %s, %s, %s, %s, %s)",
                [(e.seq, e.kind, e.id, e.revoked_at, e.expires_at, e.reason) for e in out])
        return out

    def update_grant(self, grant: Grant, *, expected_state: str,
                     feed: Sequence[RevocationEntry] = ()) -> list[RevocationEntry]:
        def go(db: _Conn) -> list[RevocationEntry]:
            row = db.execute(f"{_GRANT_SELECT} WHERE id = %s FOR UPDATE", (grant.id,)).fetchone()
            if row is None:
                raise GrantNotFound()
            current = _grant_from_row(row)
            if current.state != expected_state:
                raise Conflict("the grant changed meanwhile")
            updated = msgspec.structs.replace(
                current, state=grant.state, not_before=grant.not_before,
                expires_at=grant.expires_at, decided_by=grant.decided_by,
                decided_at=grant.decided_at, ended_at=grant.ended_at, ended_by=grant.ended_by)
            db.execute("UPDATE grants SET state = %s, expires_at = %s, record = %s WHERE id = %s",
                       (updated.state, updated.expires_at, _grant_encoder.encode(updated), grant.id))
            return self._append_feed(db, feed)
        return self._write(go)

    def end_grants(self, grant_ids: Sequence[str], *, state: str, now: int, by: str,
                   feed: Sequence[RevocationEntry],
                   entry_leeway: int | None = None) -> list[RevocationEntry]:
        def go(db: _Conn) -> list[RevocationEntry]:
            # ORDER BY id: concurrent callers lock the rows in the same order
            rows = db.execute(f"{_GRANT_SELECT} WHERE id = ANY(%s) AND state IN ('active', 'pending') "
                              "ORDER BY id FOR UPDATE", (list(grant_ids),)).fetchall()
            ended = [msgspec.structs.replace(_grant_from_row(r), state=state, ended_at=now, ended_by=by)
                     for r in rows]
            with db.cursor() as cur:
                cur.executemany("UPDATE grants SET state = %s, record = %s WHERE id = %s",
                                [(state, _grant_encoder.encode(g), g.id) for g in ended])
            return self._append_feed(db, [*feed, *ended_grant_entries(ended, now=now,
                                                                      leeway=entry_leeway)])
        return self._write(go)

    # -- revocation feed -------------------------------------------------------------------

    def revocations_since(self, seq: int, *, limit: int) -> list[RevocationEntry]:
        rows = self._read(lambda db: db.execute(
            "SELECT seq, kind, subject, revoked_at, expires_at, reason FROM revocations "
            "WHERE seq > %s ORDER BY seq LIMIT %s", (seq, limit)).fetchall())
        return [RevocationEntry(seq=r[0], kind=r[1], id=r[2], revoked_at=r[3], expires_at=r[4],
                                reason=r[5]) for r in rows]

    def latest_revocation_seq(self) -> int:
        # the counter keeps the high-water mark even when the newest rows were pruned
        row = self._read(lambda db: db.execute("SELECT last_seq FROM revocation_counter").fetchone())
        return 0 if row is None else int(row[0])

    def prune_revocations(self, now: int) -> int:
        return self._write(lambda db: db.execute(
            "DELETE FROM revocations WHERE expires_at <= %s", (now,)).rowcount, one_statement=True)

    # -- issuer keys -------------------------------------------------------------------------

    def list_issuer_keys(self) -> list[IssuerKey]:
        rows = self._read(lambda db: db.execute(
            "SELECT kid, alg, public_raw, sealed, seq, created_at, activate_at, retire_at "
            "FROM issuer_keys ORDER BY seq").fetchall())
        return [IssuerKey(kid=r[0], alg=r[1], public_raw=bytes(r[2]), sealed=bytes(r[3]), seq=r[4],
                          created_at=r[5], activate_at=r[6], retire_at=r[7]) for r in rows]

    def add_issuer_key(self, key: IssuerKey, retire: Sequence[tuple[str, int]]) -> None:
        def go(db: _Conn) -> None:
            # Insert first: a concurrent insert of the same seq makes this one wait for it,
            # then do nothing, so exactly one rotation wins.
            inserted = db.execute(
                "INSERT INTO issuer_keys (seq, kid, alg, public_raw, sealed, created_at, "
                "activate_at, retire_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (seq) DO NOTHING",
                (key.seq, key.kid, key.alg, key.public_raw, key.sealed, key.created_at,
                 key.activate_at, key.retire_at)).rowcount
            if inserted == 0:
                raise Conflict("another issuer key rotation won")
            with db.cursor() as cur:
                cur.executemany("UPDATE issuer_keys SET retire_at = %s WHERE kid = %s AND seq <> %s",
                                [(at, kid, key.seq) for kid, at in retire])
        self._write(go)

    def delete_issuer_keys(self, *, retired_before: int) -> int:
        return self._write(lambda db: db.execute(
            "DELETE FROM issuer_keys WHERE retire_at IS NOT NULL AND retire_at < %s",
            (retired_before,)).rowcount, one_statement=True)

    def close(self) -> None:
        """Close the pool; calls still under way get ``_CLOSE_GRACE`` seconds more, then
        fail (closing never waits on a database that stopped answering)."""
        with self._closing:
            if self._closed:
                return
            self._closed = True  # queued inserts fail at once
        watchdog.hurry(self, time.monotonic() + _CLOSE_GRACE)
        self._writer.shutdown(wait=True)
        self._pool.close(timeout=_CLOSE_GRACE)
