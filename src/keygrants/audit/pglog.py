"""The audit log on PostgreSQL: one Merkle tree for every node that shares the database.

With ``--store postgresql://…`` the audit log lives in the same database, in the schema
``keygrants_audit`` (tables ``events``, ``checkpoints``, ``cursors``, as in ``audit.db``).
Several server processes append to the one tree: each batch takes a transaction-level
advisory lock, first reads the leaves and the newest checkpoint other nodes committed since
its own last batch (so its tree is the database's), then numbers, hashes and inserts its
events and, when one is due, a checkpoint, and commits (``synchronous_commit`` on: the WAL is
flushed before the commit returns). Sequence numbers are therefore gapless across nodes and
the checkpoints of all nodes sign one history: a verifier never sees two trees under one
origin.

Group commit as in :class:`~keygrants.audit.log.AuditLog`: the event loop gathers a batch,
and a commit thread runs the whole transaction (the round trips to the database, not Python
work, are its cost); the loop resumes the requests once it is durable. Threads commit
through :meth:`AuditLog.append` the same way. Every failure is
:class:`~keygrants.errors.AuditUnavailable` and nothing is acknowledged that is not committed.

A commit has a client-side deadline too (the append lock's timeout plus ``commit_timeout``):
a database that stops answering without closing the connection would otherwise hold the
commit thread, and with it :meth:`close`, for as long as TCP keeps the connection. Closing
waits at most its ``timeout`` for a commit under way, then cuts it off.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Final

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from keygrants.audit.log import _MAX_DEFERRALS, AuditLog, _Pending, _resolve, _Staged
from keygrants.audit.merkle import leaf_hash
from keygrants.audit.note import NoteSigner
from keygrants.errors import AuditUnavailable, InvalidRequest
from keygrants.store.postgres import watchdog

__all__ = ["SCHEMA", "PostgresAuditLog"]

log = logging.getLogger("keygrants.audit")

SCHEMA: Final = "keygrants_audit"
_CONNECT_TIMEOUT: Final = 10
_SCHEMA_LOCK: Final = 0x6B67_00A0  # advisory lock keys ("kg" high bytes, as the store's)
_APPEND_LOCK: Final = 0x6B67_00A1
_CLOSE_GRACE: Final = 2.0  # seconds a commit cut off at close gets to give its lock back

_DDL: Final = f"""
CREATE SCHEMA IF NOT EXISTS {SCHEMA};
CREATE TABLE IF NOT EXISTS {SCHEMA}.events (
    seq BIGINT PRIMARY KEY,
    time TEXT COLLATE "C" NOT NULL,
    type TEXT COLLATE "C" NOT NULL,
    principal TEXT COLLATE "C",
    key_id TEXT COLLATE "C",
    grant_id TEXT COLLATE "C",
    data BYTEA NOT NULL,
    leaf BYTEA NOT NULL
);
CREATE INDEX IF NOT EXISTS events_principal ON {SCHEMA}.events (principal, seq);
CREATE INDEX IF NOT EXISTS events_key ON {SCHEMA}.events (key_id, seq) WHERE key_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS events_grant ON {SCHEMA}.events (grant_id, seq)
    WHERE grant_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS {SCHEMA}.checkpoints (
    size BIGINT PRIMARY KEY,
    time BIGINT NOT NULL,
    note BYTEA NOT NULL
);
CREATE TABLE IF NOT EXISTS {SCHEMA}.cursors (sink TEXT COLLATE "C" PRIMARY KEY,
                                             seq BIGINT NOT NULL);
"""


def connect(url: str, *, read_only: bool = False,
            lock_timeout: float | None = None) -> psycopg.Connection[Any]:
    """A connection whose unqualified table names are the audit tables, with TCP keepalives
    (settings the URL gives win, its ``options`` are kept); ``lock_timeout`` bounds waiting
    for the append lock and any write (a node cut off while holding the lock must not stall
    the others forever)."""
    params = conninfo_to_dict(url)
    options = f"-c search_path={SCHEMA} -c synchronous_commit=on"
    if read_only:
        options += " -c default_transaction_read_only=on"
    if lock_timeout is not None:
        ms = int(lock_timeout * 1000)
        options += (f" -c lock_timeout={ms} -c statement_timeout={ms}"
                    f" -c idle_in_transaction_session_timeout={ms * 3}")
    params["options"] = f"{params['options']} {options}" if params.get("options") else options
    for name, value in (("connect_timeout", _CONNECT_TIMEOUT), ("keepalives", 1),
                        ("keepalives_idle", 10), ("keepalives_interval", 5),
                        ("keepalives_count", 3)):
        params.setdefault(name, value)
    return psycopg.connect(make_conninfo("", **params), autocommit=True)


class PostgresAuditLog(AuditLog):
    """:class:`~keygrants.audit.log.AuditLog` on PostgreSQL (``url``); the same interface.

    Raises:
        AuditUnavailable: if the database cannot be reached or prepared.
    """

    def __init__(self, url: str, *, signer: NoteSigner, origin: str,
                 clock: Callable[[], float] = time.time, checkpoint_interval: float = 1.0,
                 max_batch: int = 2048, queue_limit: int = 100_000) -> None:
        self.path = f"postgresql ({SCHEMA})"  # not the URL: it may hold a password
        self._init_state(signer=signer, origin=origin, clock=clock,
                         checkpoint_interval=checkpoint_interval, max_batch=max_batch,
                         queue_limit=queue_limit)
        self._url = url
        self._db: Any = None
        self._read_db: Any = None
        self._last_leaf: bytes | None = None  # the newest leaf this node knows
        try:
            self._db = self._connect()
            with self._db.transaction():
                self._db.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                self._db.execute(_DDL)
            self._read_db = connect(url)  # reads (proofs over a large log) are not bounded
            with self._lock:
                self._db.execute("SET statement_timeout = 0")  # reading a large log takes time
                newest = self._signed_root(self._db.execute(
                    "SELECT size, note FROM checkpoints ORDER BY size DESC LIMIT 1").fetchone())
                # the whole log (`audit verify` checks the data); the tree must be the one the
                # newest checkpoint signed
                self._catch_up(check_data=False, expect=newest)
                self._db.execute("RESET statement_timeout")
        except (psycopg.Error, AuditUnavailable, ValueError) as exc:
            for conn in (self._db, self._read_db):
                if conn is not None:
                    conn.close()
            detail = exc.message if isinstance(exc, AuditUnavailable) else type(exc).__name__
            raise AuditUnavailable(f"the audit log database cannot be opened: {detail}") from exc
        self._read_lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="keygrants-audit-commit")
        self._committer = self._pool
        self._start_checkpointer()

    def _connect(self) -> psycopg.Connection[Any]:
        return connect(self._url, lock_timeout=self.commit_timeout * 3)

    def _reconnect_if_broken(self) -> None:
        """After a failure: replace a connection PostgreSQL dropped (a restart, a failover),
        so the next batch can succeed; this batch has failed already (fail-closed)."""
        if (self._db.broken or self._db.closed) and not self._stop.is_set():  # not when closing
            with contextlib.suppress(psycopg.Error):
                self._db.close()
            try:
                self._db = self._connect()
            except psycopg.Error as exc:
                log.warning("audit: reconnecting to PostgreSQL failed: %s", type(exc).__name__)

    # -- writing ---------------------------------------------------------------------------

    def _catch_up(self, *, check_data: bool = True,
                  expect: tuple[int, bytes] | None = None) -> None:
        """Adopt what other nodes committed since this node's last batch (under the lock).

        Each adopted row's leaf must be the hash of its data (``check_data``), and the row
        before them must still hold this node's newest leaf: a database that lost committed
        events (a failover to a lagging replica) stops the log rather than grow a second
        history."""
        size = self._tree.size
        data_column = "data" if check_data else "NULL"
        rows = self._db.execute(f"SELECT seq, {data_column}, leaf FROM events WHERE seq >= %s "
                                "ORDER BY seq", (max(size - 1, 0),)).fetchall()
        if size > 0:
            if not rows or rows[0][0] != size - 1 or bytes(rows[0][2]) != self._last_leaf:
                raise AuditUnavailable("the audit database no longer holds events this node "
                                       f"committed (it ends before {size}): refusing to go on")
            rows = rows[1:]
        for seq, data, leaf in rows:
            leaf = bytes(leaf)
            if seq != self._tree.size:
                raise AuditUnavailable(f"the audit log has a gap at sequence {self._tree.size}")
            if check_data and leaf_hash(bytes(data)) != leaf:
                raise AuditUnavailable(f"audit event {seq} does not match its leaf hash")
            self._tree.append(leaf)
            self._last_leaf = leaf
            if expect is not None and self._tree.size == expect[0]:
                self._check_signed_root(expect)
        if expect is not None and self._tree.size < expect[0]:
            self._check_signed_root(expect)
        row = self._db.execute(
            "SELECT size, time FROM checkpoints ORDER BY size DESC LIMIT 1").fetchone()
        if row is not None:
            self._checkpoint_floor = max(self._checkpoint_floor, int(row[1]))
            if row[0] > self._checkpointed_size:
                self._checkpointed_size, self._last_checkpoint_at = int(row[0]), float(row[1])

    def _apply(self, staged: _Staged) -> None:
        if staged.rows:
            self._last_leaf = staged.rows[-1][7]
        super()._apply(staged)

    def _commit_locked(self, batch: list[_Pending], *, force_checkpoint: bool) -> bool:
        staged = None
        try:
            if self.failing:
                raise psycopg.OperationalError("simulated audit store failure")
            deadline = time.monotonic() + self.commit_timeout * 4  # lock_timeout, then some
            with watchdog.watch(self._db, deadline, owner=self), self._db.transaction():
                self._db.execute("SELECT pg_advisory_xact_lock(%s)", (_APPEND_LOCK,))
                self._catch_up()
                staged = self._stage(batch, force_checkpoint=force_checkpoint)
                if staged is None:
                    return True
                with self._db.cursor() as cur:
                    if staged.rows:
                        cur.executemany(
                            "INSERT INTO events (seq, time, type, principal, key_id, grant_id,"
                            " data, leaf) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)", staged.rows)
                    if staged.checkpoint is not None:
                        cp = staged.checkpoint
                        cur.execute("INSERT INTO checkpoints (size, time, note) VALUES (%s, %s, %s)",
                                    (cp.size, cp.time, cp.note))
        except (psycopg.Error, AuditUnavailable) as exc:
            log.error("audit: a batch of %d event(s) could not be made durable: %s",
                      len(batch), exc)
            _resolve([(item, AuditUnavailable()) for item in batch])
            self._reconnect_if_broken()
            return False
        self._apply(staged)
        return True

    def _flush(self, loop: asyncio.AbstractEventLoop, seen: int, deferrals: int) -> None:
        """Hand the loop's batch to the commit thread; resolve its futures on the loop."""
        batch = self._take_batch(loop, seen, deferrals)
        if not batch:
            return
        if self._closed:
            _resolve([(item, AuditUnavailable("the audit log is closed")) for item in batch])
            return
        # the commit thread resolves these; their outcomes are copied to the loop's futures
        proxies = [_Pending(item.fields) for item in batch]
        try:
            done = loop.run_in_executor(self._pool, functools.partial(
                self._commit, proxies, force_checkpoint=False))
        except RuntimeError:  # the commit thread was shut down: closing
            _resolve([(item, AuditUnavailable("the audit log is closed")) for item in batch])
            return
        self._inflight_loop = loop
        watchdog = loop.call_later(self.commit_timeout, self._batch_overdue, loop, batch)

        def finished(f: asyncio.Future[Any]) -> None:
            watchdog.cancel()
            self._inflight_loop = None
            self._stuck = False
            outcomes: list[tuple[_Pending, int | BaseException]] = []
            failed = f.cancelled() or f.exception() is not None
            for item, proxy in zip(batch, proxies, strict=True):
                result = proxy.future
                if not failed and result.done():
                    exc = result.exception()
                    outcomes.append((item, exc if exc is not None else result.result()))
                else:
                    outcomes.append((item, AuditUnavailable()))
            _resolve(outcomes)
            if self._pending.get(loop):
                loop.call_soon(self._flush, loop, 0, _MAX_DEFERRALS)

        done.add_done_callback(finished)

    def _batch_overdue(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending]) -> None:
        log.error("audit: a commit of %d event(s) is overdue by %.0f s; failing requests until "
                  "it completes", len(batch), self.commit_timeout)
        self._stuck = True
        queued = self._pending.pop(loop, [])
        _resolve([(item, AuditUnavailable("the audit log did not confirm the event in time"))
                  for item in [*batch, *queued]])

    def close(self, *, timeout: float = 10.0) -> None:
        """Checkpoint what is durable and close the connections (from a thread, not a loop).

        Waits at most ``timeout`` seconds for a commit under way (and as long for the final
        checkpoint), then cuts it off: a database that stopped answering never holds a
        shutdown for longer."""
        if self._closed:
            return
        deadline = time.monotonic() + timeout
        self._stop.set()  # the checkpointer stops; a connection lost now is not replaced
        self._pool.shutdown(wait=False)
        if not self._lock.acquire(timeout=timeout):
            watchdog.hurry(self, time.monotonic())  # a commit is stuck: cut it off
            if not self._lock.acquire(timeout=_CLOSE_GRACE):
                self._closed = True
                log.error("audit: closed without a final checkpoint: a commit did not end")
                return
        try:
            if not self._closed:
                try:
                    # failures are logged by _commit
                    with contextlib.suppress(psycopg.Error), \
                            watchdog.watch(self._db, deadline, owner=self):
                        self._commit([], force_checkpoint=True)
                finally:
                    self._closed = True
                    self._db.close()
        finally:
            self._lock.release()
        self._thread.join(_CLOSE_GRACE)
        if not self._read_lock.acquire(timeout=_CLOSE_GRACE):
            return  # a read stuck on a database that stopped answering keeps its connection
        try:
            self._read_db.close()
        finally:
            self._read_lock.release()

    def set_cursor(self, sink: str, seq: int) -> None:
        """Record a sink's delivery position durably (from a thread, not a loop); never moves
        it back (nodes sharing the log may ship the same sink: at-least-once, as documented)."""
        with self._lock:
            if self._closed:
                raise AuditUnavailable("the audit log is closed")
            try:
                self._db.execute("INSERT INTO cursors (sink, seq) VALUES (%s, %s) "
                                 "ON CONFLICT (sink) DO UPDATE SET seq = greatest(cursors.seq, excluded.seq)",
                                 (sink, seq))
            except psycopg.Error as exc:
                raise AuditUnavailable("the sink cursor could not be saved") from exc

    # -- reading ---------------------------------------------------------------------------

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        if self._closed:
            raise AuditUnavailable("the audit log is closed")
        with self._read_lock:
            for attempt in (1, 2):
                try:
                    return list(self._read_db.execute(sql.replace("?", "%s"), params).fetchall())
                except psycopg.Error as exc:
                    if attempt == 2 or not (self._read_db.broken or self._read_db.closed):
                        raise AuditUnavailable("the audit log cannot be read") from exc
                    with contextlib.suppress(psycopg.Error):
                        self._read_db.close()
                    try:  # PostgreSQL dropped the connection: once more on a new one
                        self._read_db = connect(self._url)
                    except psycopg.Error:
                        raise AuditUnavailable("the audit log cannot be read") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _leaves(self, upto: int) -> list[bytes]:
        leaves = [bytes(r[0]) for r in self._query(
            "SELECT leaf FROM events WHERE seq < ? ORDER BY seq", (upto,))]
        if len(leaves) < upto:
            raise InvalidRequest(f"the log has only {len(leaves)} events")
        return leaves
