"""The durable audit log: an append-only RFC 6962 Merkle log in SQLite, with group commit.

Events are submitted from any thread and written by one writer thread, which takes every
event waiting in its queue (up to ``max_batch``), gives them consecutive sequence numbers,
appends their leaf hashes to the tree, and commits them in one transaction: one fsync
(WAL, ``synchronous=FULL``) makes a whole batch durable. Each submitter holds a future that
resolves to its event's sequence number once the batch is durable, or fails with
:class:`~keygrants.errors.AuditUnavailable`; callers act (or answer) only after that.

A signed checkpoint (tree size, root hash, time; a C2SP signed note) is written in the same
transaction as the first batch that comes at least ``checkpoint_interval`` seconds after the
previous checkpoint, and by the writer on its own when events stopped flowing with the last
ones not yet covered, so every event is covered by a checkpoint within about a second.

Database (``audit.db``, separate from the key store so its fsyncs never wait on key writes)::

    events(seq PK, time, type, principal, key_id, grant_id, data, leaf)
    checkpoints(size PK, time, note)
    cursors(sink PK, seq)         -- delivery positions of the secondary sinks
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from keygrants.audit.events import event_bytes, format_time
from keygrants.audit.merkle import (
    CompactTree,
    SubtreeCache,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
)
from keygrants.audit.note import Checkpoint, NoteSigner, sign_note
from keygrants.errors import AuditUnavailable, InvalidRequest

__all__ = ["AuditLog", "CheckpointRecord", "EventQuery"]

log = logging.getLogger("keygrants.audit")

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    time TEXT NOT NULL,
    type TEXT NOT NULL,
    principal TEXT,
    key_id TEXT,
    grant_id TEXT,
    data BLOB NOT NULL,
    leaf BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS events_principal ON events (principal, seq);
CREATE INDEX IF NOT EXISTS events_key ON events (key_id, seq);
CREATE INDEX IF NOT EXISTS events_grant ON events (grant_id, seq);
CREATE INDEX IF NOT EXISTS events_type ON events (type, seq);
CREATE INDEX IF NOT EXISTS events_time ON events (time);
CREATE TABLE IF NOT EXISTS checkpoints (
    size INTEGER PRIMARY KEY,
    time INTEGER NOT NULL,
    note BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS cursors (sink TEXT PRIMARY KEY, seq INTEGER NOT NULL);
"""

_STOP: Final = object()
_CHECKPOINT: Final = object()
MAX_QUERY_LIMIT: Final = 1000


@dataclass(frozen=True, slots=True)
class CheckpointRecord:
    """A stored checkpoint: its tree size, time and signed note text."""

    size: int
    time: int
    note: bytes


@dataclass(frozen=True, slots=True)
class EventQuery:
    """Filters for :meth:`AuditLog.search` (all optional; ``after`` is a sequence number)."""

    principal: str | None = None
    key_id: str | None = None
    grant_id: str | None = None
    type: str | None = None
    since: str | None = None
    until: str | None = None
    after: int | None = None
    limit: int = 100


Waiter = concurrent.futures.Future[int] | asyncio.Future[int]


@dataclass(slots=True)
class _Pending:
    fields: dict[str, Any]
    future: Waiter = field(default_factory=concurrent.futures.Future)


def _settle(outcomes: list[tuple[asyncio.Future[int], int | BaseException]]) -> None:
    """Resolve a batch's asyncio futures (runs on their event loop)."""
    for fut, outcome in outcomes:
        if fut.done():
            continue
        if isinstance(outcome, BaseException):
            fut.set_exception(outcome)
        else:
            fut.set_result(outcome)


def _resolve(items: list[tuple[_Pending, int | BaseException]]) -> None:
    """Resolve futures: thread futures directly, asyncio futures with one wake-up per loop
    per batch (a wake-up per event would cost a syscall each)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[int], int | BaseException]]] = {}
    for item, outcome in items:
        fut = item.future
        if isinstance(fut, asyncio.Future):
            by_loop.setdefault(fut.get_loop(), []).append((fut, outcome))
        elif isinstance(outcome, BaseException):
            fut.set_exception(outcome)
        else:
            fut.set_result(outcome)
    for loop, outcomes in by_loop.items():
        with contextlib.suppress(RuntimeError):  # a closed loop has nobody waiting
            loop.call_soon_threadsafe(_settle, outcomes)


class AuditLog:
    """The durable Merkle audit log.

    Args:
        path: the SQLite file (``":memory:"`` for tests).
        signer: signs checkpoints (the audit Ed25519 key).
        origin: the checkpoint origin line, unique to this log.
        clock: Unix time source.
        checkpoint_interval: seconds between checkpoints while events flow.
        max_batch: most events per group commit.
        queue_limit: most events waiting; beyond it submissions fail at once (fail-closed
            rather than unbounded memory).
    """

    def __init__(self, path: str | os.PathLike[str], *, signer: NoteSigner, origin: str,
                 clock: Callable[[], float] = time.time, checkpoint_interval: float = 1.0,
                 max_batch: int = 2048, queue_limit: int = 100_000) -> None:
        if checkpoint_interval <= 0 or max_batch < 1 or queue_limit < 1:
            raise ValueError("checkpoint_interval, max_batch and queue_limit must be positive")
        self.path = str(path)
        self.origin = origin
        self._signer = signer
        self._clock = clock
        self._interval = checkpoint_interval
        self._max_batch = max_batch
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_limit)
        self._lock = threading.Lock()  # guards the connection for readers vs the writer
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                   timeout=10.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        if self.path != ":memory:":
            for suffix in ("", "-wal", "-shm"):
                p = Path(self.path + suffix)
                if p.exists():
                    p.chmod(0o600)
        self._proof_cache: SubtreeCache = {}  # perfect subtrees never change in an append-only log
        self._tree = CompactTree()
        for (leaf,) in self._db.execute("SELECT leaf FROM events ORDER BY seq"):
            self._tree.append(bytes(leaf))
        row = self._db.execute("SELECT size, time FROM checkpoints ORDER BY size DESC LIMIT 1").fetchone()
        self._checkpointed_size = row[0] if row else 0
        self._last_checkpoint_at = float(row[1]) if row else 0.0
        self.failing = False  # a test seam: when True, commits fail (simulates a broken disk)
        self._thread = threading.Thread(target=self._run, name="keygrants-audit-writer",
                                        daemon=True)
        self._thread.start()

    # -- writing ---------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Number of durable events (the tree size)."""
        return self._tree.size

    def submit(self, fields: Mapping[str, Any]) -> Waiter:
        """Queue an event (every field but ``seq``; ``time`` defaults to now).

        Returns:
            A future resolving to the event's sequence number once durable, or failing with
            :class:`~keygrants.errors.AuditUnavailable`: an ``asyncio.Future`` when called
            on a running event loop, a ``concurrent.futures.Future`` otherwise.
        """
        try:
            future: Waiter = asyncio.get_running_loop().create_future()
        except RuntimeError:
            future = concurrent.futures.Future()
        item = _Pending(dict(fields), future)
        item.fields.setdefault("time", format_time(self._clock()))
        self._enqueue(item)
        return future

    def append(self, fields: Mapping[str, Any], *, timeout: float = 10.0) -> int:
        """Submit from a thread (not an event loop) and wait until durable.

        Raises:
            AuditUnavailable: if the event could not be made durable in time.
        """
        item = _Pending(dict(fields))
        item.fields.setdefault("time", format_time(self._clock()))
        self._enqueue(item)
        assert isinstance(item.future, concurrent.futures.Future)
        return wait_durable(item.future, timeout=timeout)

    def _enqueue(self, item: _Pending) -> None:
        if not self._thread.is_alive():
            _resolve([(item, AuditUnavailable("the audit writer has stopped"))])
            return
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            _resolve([(item, AuditUnavailable("the audit queue is full"))])

    def checkpoint_now(self, *, timeout: float = 10.0) -> CheckpointRecord:
        """Make a checkpoint of everything durable so far (unless one exists at this size)."""
        item = _Pending({})
        try:
            self._queue.put((_CHECKPOINT, item), timeout=timeout)
        except queue.Full:
            raise AuditUnavailable("the audit queue is full") from None
        assert isinstance(item.future, concurrent.futures.Future)
        wait_durable(item.future, timeout=timeout)
        latest = self.latest_checkpoint()
        if latest is None:
            raise AuditUnavailable("no checkpoint could be made")
        return latest

    def close(self, *, timeout: float = 10.0) -> None:
        """Write what is queued, checkpoint it, and stop the writer."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout)
        with self._lock:
            self._db.close()

    def _run(self) -> None:
        stop = False
        while not stop:
            due = self._tree.size > self._checkpointed_size
            wait = max(0.0, self._last_checkpoint_at + self._interval - self._clock()) if due else None
            try:
                first = self._queue.get(timeout=wait)
            except queue.Empty:
                self._commit([], force_checkpoint=True)
                continue
            batch: list[_Pending] = []
            waiters: list[_Pending] = []
            force = False
            item = first
            while True:
                if item is _STOP:
                    stop = True
                    force = True
                elif isinstance(item, tuple):
                    force = True
                    waiters.append(item[1])
                else:
                    batch.append(item)
                if stop or len(batch) >= self._max_batch:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            ok = self._commit(batch, force_checkpoint=force)
            _resolve([(w, self._tree.size if ok else AuditUnavailable("audit checkpoint failed"))
                      for w in waiters])

    def _commit(self, batch: list[_Pending], *, force_checkpoint: bool) -> bool:
        tree = self._tree.copy()
        rows: list[tuple[Any, ...]] = []
        accepted: list[tuple[_Pending, int]] = []
        rejected: list[tuple[_Pending, int | BaseException]] = []
        for item in batch:
            seq = tree.size
            try:
                data = event_bytes(seq, item.fields)
            except (TypeError, ValueError) as exc:
                rejected.append((item, InvalidRequest(f"invalid audit event: {exc}")))
                continue
            leaf = leaf_hash(data)
            tree.append(leaf)
            f = item.fields
            rows.append((seq, f["time"], f["type"], f.get("principal"), f.get("key_id"),
                         f.get("grant_id"), data, leaf))
            accepted.append((item, seq))
        _resolve(rejected)
        now = self._clock()
        checkpoint: CheckpointRecord | None = None
        if tree.size > self._checkpointed_size and (
                force_checkpoint or now - self._last_checkpoint_at >= self._interval):
            cp = Checkpoint(origin=self.origin, size=tree.size, root=tree.root(), time=int(now))
            checkpoint = CheckpointRecord(tree.size, int(now), sign_note(cp.body(), self._signer))
        if not rows and checkpoint is None:
            return True
        try:
            with self._lock:
                if self.failing:
                    raise sqlite3.OperationalError("simulated audit store failure")
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    self._db.executemany(
                        "INSERT INTO events (seq, time, type, principal, key_id, grant_id, data, leaf)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
                    if checkpoint is not None:
                        self._db.execute("INSERT INTO checkpoints (size, time, note) VALUES (?, ?, ?)",
                                         (checkpoint.size, checkpoint.time, checkpoint.note))
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
        except sqlite3.Error as exc:
            log.error("audit: a batch of %d event(s) could not be made durable: %s", len(rows), exc)
            _resolve([(item, AuditUnavailable()) for item, _ in accepted])
            return False
        self._tree = tree
        if checkpoint is not None:
            self._checkpointed_size = checkpoint.size
            self._last_checkpoint_at = now
        _resolve(list(accepted))
        return True

    # -- reading ---------------------------------------------------------------------------

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return self._db.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise AuditUnavailable("the audit log cannot be read") from exc

    def latest_checkpoint(self) -> CheckpointRecord | None:
        """The newest checkpoint."""
        rows = self._query("SELECT size, time, note FROM checkpoints ORDER BY size DESC LIMIT 1")
        return CheckpointRecord(rows[0][0], rows[0][1], bytes(rows[0][2])) if rows else None

    def checkpoints(self, *, since_size: int = 0) -> list[CheckpointRecord]:
        """Checkpoints at or above a tree size, oldest first."""
        return [CheckpointRecord(s, t, bytes(n)) for s, t, n in self._query(
            "SELECT size, time, note FROM checkpoints WHERE size >= ? ORDER BY size", (since_size,))]

    def event_data(self, seq: int) -> bytes | None:
        """One event's canonical bytes."""
        rows = self._query("SELECT data FROM events WHERE seq = ?", (seq,))
        return bytes(rows[0][0]) if rows else None

    def iter_events(self, *, since: int = 0, chunk: int = 5000) -> Iterator[tuple[int, bytes, bytes]]:
        """``(seq, data, stored leaf hash)`` from ``since`` on, in order."""
        while True:
            rows = self._query("SELECT seq, data, leaf FROM events WHERE seq >= ? ORDER BY seq LIMIT ?",
                               (since, chunk))
            for seq, data, leaf in rows:
                yield seq, bytes(data), bytes(leaf)
            if len(rows) < chunk:
                return
            since = rows[-1][0] + 1

    def search(self, q: EventQuery) -> list[bytes]:
        """Events matching every given filter, by sequence number, as canonical bytes."""
        if not 1 <= q.limit <= MAX_QUERY_LIMIT:
            raise InvalidRequest(f"limit must be 1..{MAX_QUERY_LIMIT}")
        where: list[str] = ["seq > ?"]
        params: list[Any] = [q.after if q.after is not None else -1]
        for column, value in (("principal", q.principal), ("key_id", q.key_id),
                              ("grant_id", q.grant_id), ("type", q.type)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if q.since is not None:
            where.append("time >= ?")
            params.append(q.since)
        if q.until is not None:
            where.append("time < ?")
            params.append(q.until)
        sql = f"SELECT data FROM events WHERE {' AND '.join(where)} ORDER BY seq LIMIT ?"
        return [bytes(r[0]) for r in self._query(sql, (*params, q.limit))]

    def _leaves(self, upto: int) -> list[bytes]:
        if upto > self._tree.size:
            raise InvalidRequest(f"the log has only {self._tree.size} events")
        return [bytes(r[0]) for r in self._query("SELECT leaf FROM events WHERE seq < ? ORDER BY seq",
                                                 (upto,))]

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        """RFC 6962 audit path of event ``index`` in the tree of ``size``."""
        if not 0 <= index < size:
            raise InvalidRequest("index must be below size")
        return inclusion_proof(self._leaves(size), index, size, cache=self._proof_cache)

    def consistency_proof(self, old_size: int, new_size: int) -> list[bytes]:
        """RFC 6962 consistency proof between two tree sizes."""
        if not 0 < old_size <= new_size:
            raise InvalidRequest("need 0 < old size <= new size")
        return consistency_proof(self._leaves(new_size), old_size, new_size,
                                 cache=self._proof_cache)

    def get_cursor(self, sink: str) -> int:
        """Next sequence number a secondary sink has to deliver."""
        rows = self._query("SELECT seq FROM cursors WHERE sink = ?", (sink,))
        return int(rows[0][0]) if rows else 0

    def set_cursor(self, sink: str, seq: int) -> None:
        """Record a sink's delivery position durably."""
        with self._lock:
            self._db.execute("INSERT INTO cursors (sink, seq) VALUES (?, ?) "
                             "ON CONFLICT (sink) DO UPDATE SET seq = excluded.seq", (sink, seq))


def wait_durable(future: concurrent.futures.Future[int], *, timeout: float = 10.0) -> int:
    """Block until an event is durable; every failure is ``AuditUnavailable``."""
    try:
        return future.result(timeout=timeout)
    except AuditUnavailable:
        raise
    except concurrent.futures.TimeoutError:
        raise AuditUnavailable("the audit log did not confirm the event in time") from None
    except InvalidRequest:
        raise
    except Exception as exc:
        raise AuditUnavailable() from exc
