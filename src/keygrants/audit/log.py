"""The durable audit log: an append-only RFC 6962 Merkle log in SQLite, with group commit.

Group commit happens where the requests are. On the server's event loop, :meth:`AuditLog.submit`
queues the event and returns an ``asyncio.Future``; the first event of a loop iteration
schedules one flush callback on that loop, which gives every event queued by then consecutive
sequence numbers, appends their leaf hashes to the tree and inserts them in one transaction;
a commit thread then runs only the ``COMMIT`` (one fsync, WAL with ``synchronous=FULL``, makes
the whole batch durable) while the loop goes on serving and gathering the next batch, and the
futures resolve back on their loop. Measured here, a writer thread doing all of it cost twice
the throughput (the GIL changing hands for every batch's Python work).
From any other thread (state changes applied in worker threads, the scheduler, tools),
:meth:`AuditLog.append` commits synchronously under the same lock. Callers act, or answer,
only after their event is durable; every failure is :class:`~keygrants.errors.AuditUnavailable`.

A signed checkpoint (tree size, root hash, time; a C2SP signed note) is written in the same
transaction as the first batch that comes at least ``checkpoint_interval`` seconds after the
previous checkpoint, and by a background checkpointer when events stopped flowing with the
last ones not yet covered, so every event is covered by a checkpoint within about a second.

Database (``audit.db``, separate from the key store so its fsyncs never wait on key writes)::

    events(seq PK, time, type, principal, key_id, grant_id, data, leaf)
        indexed by principal, key_id and grant_id (each with seq); every index costs commit
        time on the request path (measured: five indexes doubled it), so type is filtered
        while scanning and time ranges are narrowed to sequence ranges with the checkpoints
    checkpoints(size PK, time, note)
    cursors(sink PK, seq)         -- delivery positions of the secondary sinks
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from keygrants._files import file_identity
from keygrants._threads import as_background_thread
from keygrants.audit.events import event_bytes, format_time
from keygrants.audit.merkle import (
    CompactTree,
    SubtreeCache,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
)
from keygrants.audit.note import Checkpoint, InvalidNote, NoteSigner, open_note, sign_note
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
CREATE INDEX IF NOT EXISTS events_key ON events (key_id, seq) WHERE key_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS events_grant ON events (grant_id, seq) WHERE grant_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS checkpoints (
    size INTEGER PRIMARY KEY,
    time INTEGER NOT NULL,
    note BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS cursors (sink TEXT PRIMARY KEY, seq INTEGER NOT NULL);
"""

MAX_QUERY_LIMIT: Final = 1000
_MAX_DEFERRALS: Final = 4
_WAL_CHECKPOINT_EVERY: Final = 0.5  # seconds (why so often: keygrants.store.sqlite)
_TIME_MARGIN: Final = 60  # seconds of clock skew between submit and checkpoint we tolerate


@dataclass(frozen=True, slots=True)
class CheckpointRecord:
    """A stored checkpoint: its tree size, time and signed note text."""

    size: int
    time: int
    note: bytes


@dataclass(frozen=True, slots=True)
class _Staged:
    """A numbered, encoded batch waiting for its COMMIT."""

    tree: CompactTree
    rows: list[tuple[Any, ...]]
    accepted: list[tuple[_Pending, int]]
    checkpoint: CheckpointRecord | None
    now: float


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


_MAX_FILTER: Final = 1024
_LAST_SECOND: Final = 253402300799.0  # 9999-12-31T23:59:59Z


def _query_time(text: str, name: str) -> float:
    """A search bound as Unix time. Stored times are compared as text in one fixed form
    (``format_time``), so a bound is brought to that form first: compared as given, a
    ``…00Z`` bound missed ``…00.5Z`` and an offset was ignored. No offset means UTC."""
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return min(max(when.timestamp(), 0.0), _LAST_SECOND)  # no event lies outside
    except (ValueError, OverflowError, OSError):
        raise InvalidRequest(f"{name} must be an RFC 3339 time, e.g. 2026-11-22T00:00:00Z") from None


def _resolve(items: list[tuple[_Pending, int | BaseException]]) -> None:
    """Resolve futures (called on the thread that owns them: the loop for asyncio futures)."""
    for item, outcome in items:
        fut = item.future
        if fut.done():
            continue
        if isinstance(outcome, BaseException):
            fut.set_exception(outcome)
        else:
            fut.set_result(outcome)


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
        create: ``False`` for a log that was started before: a missing or empty file is then
            refused (a lost log), not started afresh from event 0.
        mark: the newest checkpoint recorded outside the log (a signed note; the server keeps
            it in the store): the log must still hold its events, with its root, or the open
            is refused (a log deleted, truncated or rolled back with its own checkpoints).
        on_checkpoint: called with each newer durable checkpoint's note, from the
            checkpointer thread (at most every half interval) and at close: where the mark
            is kept up to date.

    Raises:
        AuditUnavailable: when the log cannot be opened, is damaged, or does not match its
            newest checkpoint or ``mark``.
    """

    _on_checkpoint: Callable[[bytes], None] | None
    _newest_checkpoint: CheckpointRecord | None
    _identity: tuple[int, int] | None

    def __init__(self, path: str | os.PathLike[str], *, signer: NoteSigner, origin: str,
                 clock: Callable[[], float] = time.time, checkpoint_interval: float = 1.0,
                 max_batch: int = 2048, queue_limit: int = 100_000, create: bool = True,
                 mark: bytes | None = None,
                 on_checkpoint: Callable[[bytes], None] | None = None) -> None:
        self.path = str(path)
        self._init_state(signer=signer, origin=origin, clock=clock,
                         checkpoint_interval=checkpoint_interval, max_batch=max_batch,
                         queue_limit=queue_limit)
        self._on_checkpoint = on_checkpoint
        expected = self._parse_mark(mark)
        if not create and self.path != ":memory:":
            self._refuse_missing(expected)
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None,
                                       check_same_thread=False, timeout=10.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            # Copy the WAL back into the database from the checkpointer thread, not in a
            # commit on the request path (the automatic checkpoint is only a backstop at
            # ~40 MiB).
            self._db.execute("PRAGMA wal_autocheckpoint=10000")
            self._db.executescript(_SCHEMA)
            if self.path != ":memory:":
                for suffix in ("", "-wal", "-shm"):
                    p = Path(self.path + suffix)
                    if p.exists():
                        p.chmod(0o600)
            # Reads use their own connection (WAL: they see committed data only), so they
            # never touch the writer's connection while a commit is in flight on the commit
            # thread.
            self._read_lock = threading.Lock()
            self._read_db = (self._db if self.path == ":memory:" else
                             sqlite3.connect(self.path, isolation_level=None,
                                             check_same_thread=False, timeout=10.0))
            self._sqlite_wal = self.path != ":memory:"
            self._identity = file_identity(self.path) if self._sqlite_wal else None
            newest_row = self._db.execute(
                "SELECT size, time, note FROM checkpoints ORDER BY size DESC LIMIT 1").fetchone()
            self._rebuild(newest_row, expected)
        except BaseException as exc:  # a refused start leaves nothing open
            opened = (getattr(self, "_read_db", None), getattr(self, "_db", None))
            for conn in {id(c): c for c in opened if c is not None}.values():
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            if isinstance(exc, sqlite3.DatabaseError):
                raise AuditUnavailable(
                    f"the audit log {self.path} cannot be read ({exc}): it is damaged or not an "
                    "audit log; restore it from your backup (`keygrants audit verify "
                    "--data-dir` reports what it holds)") from exc
            if isinstance(exc, sqlite3.Error):
                raise AuditUnavailable(f"cannot open the audit log {self.path}: {exc}") from exc
            if isinstance(exc, OSError):
                raise AuditUnavailable(f"cannot open the audit log {self.path}: "
                                       f"{exc.strerror or exc}") from exc
            raise
        # On a file, the loop's batches are fsynced by COMMIT on this thread while the loop
        # goes on serving (and gathering the next batch); ":memory:" has nothing to wait for.
        self._committer = (None if self.path == ":memory:" else
                           concurrent.futures.ThreadPoolExecutor(
                               max_workers=1, thread_name_prefix="keygrants-audit-commit",
                               initializer=as_background_thread))
        if newest_row is not None:
            self._checkpointed_size = int(newest_row[0])
            self._last_checkpoint_at = float(newest_row[1])
            self._checkpoint_floor = int(newest_row[1])
            self._newest_checkpoint = CheckpointRecord(int(newest_row[0]), int(newest_row[1]),
                                                       bytes(newest_row[2]))
        self._marked_size = expected[0] if expected is not None else 0
        self._push_mark()  # a log newer than the mark (or a first mark after an upgrade)
        self._start_checkpointer()

    def _refuse_missing(self, expected: tuple[int, bytes] | None) -> None:
        """A log that was started before (``create=False``) must still be there: a missing or
        empty file is a lost log, not a new one to start from event 0."""
        p = Path(self.path)
        try:
            size = p.stat().st_size
        except FileNotFoundError:
            state = "is missing"
        except OSError as exc:
            raise AuditUnavailable(f"cannot open the audit log {self.path}: "
                                   f"{exc.strerror or exc}") from exc
        else:
            wal = Path(self.path + "-wal")
            if size > 0 or (wal.exists() and wal.stat().st_size > 0):
                return
            state = "is empty"
        held = (f"; the store records a signed checkpoint of {expected[0]} event(s)"
                if expected is not None else "")
        raise AuditUnavailable(f"the audit log {self.path} {state}, but this service has "
                               f"written to it before{held}: restore it from your backup; a new "
                               "log is not started in its place (that would erase the audit "
                               "history)")

    def _parse_mark(self, mark: bytes | None) -> tuple[int, bytes] | None:
        """``(size, root)`` of the high-water mark kept outside the log (a signed checkpoint
        note), its signature checked.

        Raises:
            AuditUnavailable: the mark is not a checkpoint this log's key signed.
        """
        if mark is None:
            return None
        try:
            cp = Checkpoint.parse(open_note(mark, [self._signer.verifier()]))
        except (InvalidNote, ValueError):
            raise AuditUnavailable("the audit checkpoint recorded in the store is not validly "
                                   "signed by this log's key: run `keygrants audit verify`") from None
        if cp.origin != self.origin:
            raise AuditUnavailable("the audit checkpoint recorded in the store is not this "
                                   "log's: run `keygrants audit verify`")
        return cp.size, cp.root

    def _rebuild(self, newest_row: Any, expected: tuple[int, bytes] | None) -> None:
        """Rebuild the tree from the stored leaves, checking it against the newest stored
        checkpoint and against the mark kept outside the log (``expected``)."""
        newest = self._signed_root(None if newest_row is None else (newest_row[0], newest_row[2]))
        for (leaf,) in self._db.execute("SELECT leaf FROM events ORDER BY seq"):
            self._tree.append(bytes(leaf))
            if newest is not None and self._tree.size == newest[0]:
                self._check_signed_root(newest)
            if expected is not None and self._tree.size == expected[0]:
                self._check_mark(expected)
        if newest is not None and self._tree.size < newest[0]:
            self._check_signed_root(newest)
        if expected is not None and self._tree.size < expected[0]:
            self._check_mark(expected)

    def _check_mark(self, expected: tuple[int, bytes]) -> None:
        """The log must still hold the events of the newest checkpoint recorded outside it
        (in the store), with the same root: a log deleted, emptied, truncated or rolled back
        together with its own checkpoints is refused, not continued."""
        size, root = expected
        if self._tree.size < size:
            missing = (f"event {self._tree.size}" if self._tree.size + 1 == size
                       else f"events {self._tree.size}..{size - 1}")
            raise AuditUnavailable(
                f"the audit log {self.path} holds {self._tree.size} event(s), but the store "
                f"records a signed checkpoint of {size}: {missing} were removed (the log was "
                "truncated, replaced or restored from an older backup than keygrants.db); "
                "restore it from your backup and run `keygrants audit verify --data-dir`")
        if self._tree.root() != root:
            raise AuditUnavailable(
                f"the audit log {self.path} does not match the signed checkpoint the store "
                f"records at size {size}: its first {size} events were rewritten; run "
                "`keygrants audit verify --data-dir` before starting again")

    def _signed_root(self, row: Any) -> tuple[int, bytes] | None:
        """``(size, root)`` of a stored ``(size, note)`` checkpoint row, its signature checked.

        Raises:
            AuditUnavailable: the note is not signed by this log's key for its origin.
        """
        if row is None:
            return None
        note = row[1].encode() if isinstance(row[1], str) else bytes(row[1])
        try:
            cp = Checkpoint.parse(open_note(note, [self._signer.verifier()]))
        except (InvalidNote, ValueError):
            raise AuditUnavailable(f"the audit log's newest checkpoint (size {row[0]}) is not "
                                   "validly signed: run `keygrants audit verify`") from None
        if cp.origin != self.origin or cp.size != int(row[0]):
            raise AuditUnavailable(f"the audit log's newest checkpoint (size {row[0]}) is not "
                                   "this log's: run `keygrants audit verify`")
        return cp.size, cp.root

    def _check_signed_root(self, newest: tuple[int, bytes]) -> None:
        """At start, the tree rebuilt from the stored leaves must be the one the newest
        checkpoint signed: an edited (or shortened) log is refused, not signed again."""
        size, root = newest
        if self._tree.size != size or self._tree.root() != root:
            raise AuditUnavailable(f"the audit log does not match its newest signed checkpoint "
                                   f"(size {size}): it was altered; run `keygrants audit "
                                   "verify` before starting again")

    def _init_state(self, *, signer: NoteSigner, origin: str, clock: Callable[[], float],
                    checkpoint_interval: float, max_batch: int, queue_limit: int) -> None:
        """What every backend shares: settings, queues, locks (no database yet)."""
        if checkpoint_interval <= 0 or max_batch < 1 or queue_limit < 1:
            raise ValueError("checkpoint_interval, max_batch and queue_limit must be positive")
        self.origin = origin
        self._signer = signer
        self._clock = clock
        self._interval = checkpoint_interval
        self._max_batch = max_batch
        self._queue_limit = queue_limit
        self._pending: dict[asyncio.AbstractEventLoop, list[_Pending]] = {}
        self._lock = threading.RLock()  # one writer (or reader) of the connection at a time
        self._thread_queue: list[_Pending] = []  # events from threads, committed together
        self._thread_queue_lock = threading.Lock()
        self._closed = False
        self._inflight_loop: asyncio.AbstractEventLoop | None = None
        self._stuck = False
        self.commit_timeout = 10.0  # seconds a request may wait for its batch to be durable
        self._proof_cache: SubtreeCache = {}  # perfect subtrees never change in an append-only log
        self._tree = CompactTree()
        self._checkpointed_size = 0
        self._last_checkpoint_at = 0.0
        self._checkpoint_floor = 0  # no checkpoint is dated before the newest one
        self.failing = False  # a test seam: when True, commits fail (simulates a broken disk)
        self._stop = threading.Event()
        self._sqlite_wal = False  # the checkpointer also copies a SQLite WAL back
        self._commit_failed = False  # the last commit failed and none has succeeded since
        self._identity = None  # (device, inode) of the file opened (SQLite files only)
        self._gone = False  # the file was deleted or replaced under the running log
        self._on_checkpoint = None
        self._newest_checkpoint = None  # the newest durable checkpoint
        self._marked_size = 0  # the size of the newest checkpoint handed to on_checkpoint

    def _start_checkpointer(self) -> None:
        self._thread = threading.Thread(target=self._checkpointer, name="keygrants-audit-checkpoint",
                                        daemon=True)
        self._thread.start()

    # -- writing ---------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Number of durable events (the tree size)."""
        return self._tree.size

    @property
    def durable(self) -> bool:
        """Whether the log is making events durable: ``False`` once closed, while a commit is
        overdue, and after a failed commit until a later one (or the checkpointer's probe
        write) succeeds. Cheap (no I/O): for readiness probes."""
        return not (self._closed or self._stuck or self._commit_failed or self._gone)

    def submit(self, fields: Mapping[str, Any]) -> Waiter:
        """Queue an event (every field but ``seq``; ``time`` defaults to now).

        Returns:
            A future resolving to the event's sequence number once durable, or failing with
            :class:`~keygrants.errors.AuditUnavailable`: on a running event loop an
            ``asyncio.Future`` committed with the loop's batch; elsewhere an already
            resolved ``concurrent.futures.Future`` (the event was committed synchronously).
        """
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            done: concurrent.futures.Future[int] = concurrent.futures.Future()
            try:
                done.set_result(self.append(fields))
            except (AuditUnavailable, InvalidRequest) as exc:
                done.set_exception(exc)
            return done
        item = _Pending(dict(fields), loop.create_future())
        item.fields.setdefault("time", format_time(self._clock()))
        batch = self._pending.get(loop)
        if batch is None:
            batch = self._pending[loop] = []
            loop.call_soon(self._flush, loop, 0, 0)
        if self._closed or len(batch) >= self._queue_limit:
            _resolve([(item, AuditUnavailable("the audit log is closed or overloaded"))])
        else:
            batch.append(item)
        return item.future

    def _flush(self, loop: asyncio.AbstractEventLoop, seen: int, deferrals: int) -> None:
        """Commit the loop's batch once it stopped growing: while requests are still arriving
        (the batch grew during the last loop iteration) wait one more iteration, a few times
        at most, so one fsync covers every request in flight rather than a handful."""
        batch = self._take_batch(loop, seen, deferrals)
        if not batch:
            return
        if self._committer is None:
            self._commit(batch, force_checkpoint=False)
            return
        # Held until the commit completes (released on this loop). Another loop's commit in
        # flight makes this loop wait for it here, which only a multi-loop process ever sees.
        self._lock.acquire()
        try:
            if self._closed:
                raise AuditUnavailable("the audit log is closed")
            staged = self._stage(batch, force_checkpoint=False)
            if staged is None or not self._write(staged):
                self._lock.release()
                return
            done = loop.run_in_executor(self._committer, self._db.execute, "COMMIT")
        except BaseException as exc:
            self._lock.release()
            if not isinstance(exc, AuditUnavailable):
                log.exception("audit: staging a batch failed")
            _resolve([(item, AuditUnavailable()) for item in batch])
            if not isinstance(exc, Exception):
                raise
            return
        self._inflight_loop = loop
        # One timer per batch bounds how long requests wait for durability (fail-closed).
        watchdog = loop.call_later(self.commit_timeout, self._overdue, loop, staged)

        def finished(f: asyncio.Future[Any]) -> None:
            watchdog.cancel()
            self._committed(loop, staged, f)

        done.add_done_callback(finished)

    def _take_batch(self, loop: asyncio.AbstractEventLoop, seen: int,
                    deferrals: int) -> list[_Pending] | None:
        """The loop's batch to commit now, or ``None`` (still growing: flushed again on the
        next iteration; a commit of this loop in flight: flushed when it completes)."""
        batch = self._pending.get(loop, [])
        if len(batch) > seen and deferrals < _MAX_DEFERRALS and len(batch) < self._max_batch:
            loop.call_soon(self._flush, loop, len(batch), deferrals + 1)
            return None
        if self._stuck:
            # the last commit overran its deadline: fail closed at once rather than queue
            # (checked first: behind that commit, a request would wait for as long as it hangs)
            self._pending.pop(loop, None)
            _resolve([(item, AuditUnavailable("the audit log is not confirming commits"))
                      for item in batch])
            return None
        if self._inflight_loop is loop:
            return None  # this loop's commit in flight flushes again when it completes
        rest = batch[self._max_batch:]
        batch = batch[:self._max_batch]
        if rest:
            self._pending[loop] = rest  # flushed when this batch's commit completes
        else:
            self._pending.pop(loop, None)
        return batch

    def _not_during_own_commit(self, what: str) -> None:
        """The blocking entry points must not run on a loop whose commit is in flight: that
        loop's thread holds the (reentrant) lock, and re-entering it would use the connection
        while the commit thread is committing on it."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            return
        if running is self._inflight_loop:
            raise RuntimeError(f"{what} blocks; call it from a worker thread, not from an "
                               "event loop that is committing audit events")

    def _overdue(self, loop: asyncio.AbstractEventLoop, staged: _Staged) -> None:
        """The commit is taking too long: fail its requests, and every request that arrives
        until it completes (if it ever does, its batch is adopted: durable but unanswered)."""
        log.error("audit: a commit of %d event(s) is overdue by %.0f s; failing requests until "
                  "it completes", len(staged.rows), self.commit_timeout)
        self._stuck = True
        queued = self._pending.pop(loop, [])
        _resolve([(item, AuditUnavailable("the audit log did not confirm the event in time"))
                  for item in [*(i for i, _ in staged.accepted), *queued]])

    def _committed(self, loop: asyncio.AbstractEventLoop, staged: _Staged,
                   done: asyncio.Future[Any]) -> None:
        """Runs on the loop when the commit thread's COMMIT returns."""
        try:
            exc = done.exception()
            if exc is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                log.error("audit: a batch of %d event(s) could not be made durable: %s",
                          len(staged.rows), exc)
                self._commit_failed = True
                _resolve([(item, AuditUnavailable()) for item, _ in staged.accepted])
            else:
                self._apply(staged)
        finally:
            self._inflight_loop = None
            self._stuck = False
            self._lock.release()
        if self._pending.get(loop):
            loop.call_soon(self._flush, loop, 0, _MAX_DEFERRALS)

    def append(self, fields: Mapping[str, Any], *, timeout: float = 10.0) -> int:
        """Commit one event synchronously (for threads other than an event loop's).

        Raises:
            AuditUnavailable: if the event could not be made durable.
            InvalidRequest: if the fields are not a valid event.
        """
        self._not_during_own_commit("AuditLog.append (use submit)")
        item = _Pending(dict(fields))
        item.fields.setdefault("time", format_time(self._clock()))
        if self._closed:
            raise AuditUnavailable("the audit log is closed")
        # Group commit for threads: queue the event, then whoever holds the lock commits
        # everything queued so far. While one thread's batch fsyncs, the others queue up and
        # the next lock holder commits them together: one fsync for many writers.
        with self._thread_queue_lock:
            self._thread_queue.append(item)
        if not self._lock.acquire(timeout=timeout):
            with self._thread_queue_lock:
                if item in self._thread_queue:  # not taken by another thread's batch: withdraw
                    self._thread_queue.remove(item)
                    raise AuditUnavailable("the audit log did not confirm the event in time")
            # another thread's batch holds it: its outcome is this call's
            assert isinstance(item.future, concurrent.futures.Future)
            return wait_durable(item.future, timeout=timeout)
        try:
            with self._thread_queue_lock:
                batch, self._thread_queue = self._thread_queue, []
            if batch:
                self._commit(batch, force_checkpoint=False)
        finally:
            self._lock.release()
        assert isinstance(item.future, concurrent.futures.Future)
        return wait_durable(item.future, timeout=timeout)

    def checkpoint_now(self) -> CheckpointRecord:
        """Make a checkpoint of everything durable so far (unless one exists at this size)."""
        self._not_during_own_commit("AuditLog.checkpoint_now")
        if not self._commit([], force_checkpoint=True):
            raise AuditUnavailable("audit checkpoint failed")
        latest = self.latest_checkpoint()
        if latest is None:
            raise AuditUnavailable("no checkpoint could be made")
        return latest

    def close(self, *, timeout: float = 10.0) -> None:
        """Checkpoint what is durable and close the database (from a thread, not a loop)."""
        self._not_during_own_commit("AuditLog.close")
        if self._closed:
            return
        self._stop.set()
        self._thread.join(timeout)
        with self._lock:  # waits for a commit in flight on the loop
            if not self._closed:
                if self._committer is not None and self._inflight_loop is not None:
                    # Still in flight although we hold the lock: it is this thread's own
                    # loop's, which stopped before the commit completed. Let the commit thread
                    # finish with the connection before it is used (or closed) here.
                    self._committer.shutdown(wait=True)
                self._commit([], force_checkpoint=True)
                self._closed = True
                self._db.close()
                if self._read_db is not self._db:
                    with self._read_lock:
                        self._read_db.close()
        if self._committer is not None:
            self._committer.shutdown(wait=True)
        self._push_mark()

    def _push_mark(self) -> None:
        """Hand the newest durable checkpoint to ``on_checkpoint`` (the server keeps it in
        the store as the log's high-water mark) unless it already has it; a failure is
        logged and retried on the checkpointer's next run."""
        newest = self._newest_checkpoint
        if self._on_checkpoint is None or newest is None or newest.size <= self._marked_size:
            return
        try:
            self._on_checkpoint(newest.note)
        except Exception as exc:
            log.warning("audit: could not record the checkpoint at size %d outside the log: %s",
                        newest.size, getattr(exc, "message", None) or exc)
            return
        self._marked_size = newest.size

    def _probe(self) -> None:
        """While commits fail, try a small durable write (the header's user_version, which
        nothing reads): a log that recovers (disk space freed) says so through
        :attr:`durable` even when no request comes to prove it, as none does to a node its
        readiness probe took out of service."""
        with self._lock:
            if self._closed or not self._commit_failed:
                return
            try:
                if self.failing:
                    raise sqlite3.OperationalError("simulated audit store failure")
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    (version,) = self._db.execute("PRAGMA user_version").fetchone()
                    self._db.execute(f"PRAGMA user_version={(int(version) + 1) % (1 << 31)}")
                    self._db.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                    raise
            except sqlite3.Error:
                return
            self._commit_failed = False
            log.warning("audit: events are durable again")

    def _checkpointer(self) -> None:
        """Cover events that stopped flowing (a signed checkpoint within one interval of the
        last event) and copy the WAL into the database now and then, off the request path."""
        as_background_thread()
        wal = None
        if self._sqlite_wal:
            wal = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        last_wal = time.monotonic()
        try:
            while not self._stop.wait(self._interval / 2):
                if (self._identity is not None and not self._gone
                        and file_identity(self.path) != self._identity):
                    self._gone = True  # sticky: the events written since are lost already
                    log.error("audit: %s was deleted or replaced while the server was using "
                              "it; every audited request is refused until the server is "
                              "restarted on the right file", self.path)
                if self._tree.size > self._checkpointed_size and \
                        self._clock() - self._last_checkpoint_at >= self._interval:
                    try:
                        self._commit([], force_checkpoint=True)
                    except Exception:  # keep going; _commit logs failures
                        log.exception("audit: checkpoint failed")
                if self._commit_failed:
                    self._probe()
                self._push_mark()
                if wal is not None and time.monotonic() - last_wal >= _WAL_CHECKPOINT_EVERY:
                    last_wal = time.monotonic()
                    try:
                        wal.execute("PRAGMA wal_checkpoint(PASSIVE)")
                    except sqlite3.Error as exc:
                        log.warning("audit: WAL checkpoint failed: %s", exc)
        finally:
            if wal is not None:
                wal.close()

    def _commit(self, batch: list[_Pending], *, force_checkpoint: bool) -> bool:
        with self._lock:
            if self._closed:
                _resolve([(item, AuditUnavailable("the audit log is closed")) for item in batch])
                return False
            return self._commit_locked(batch, force_checkpoint=force_checkpoint)

    def _commit_locked(self, batch: list[_Pending], *, force_checkpoint: bool) -> bool:
        staged = self._stage(batch, force_checkpoint=force_checkpoint)
        if staged is None:
            return True
        if not self._write(staged):
            return False
        try:
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            log.error("audit: a batch of %d event(s) could not be made durable: %s",
                      len(staged.rows), exc)
            self._commit_failed = True
            _resolve([(item, AuditUnavailable()) for item, _ in staged.accepted])
            return False
        self._apply(staged)
        return True

    def _stage(self, batch: list[_Pending], *, force_checkpoint: bool) -> _Staged | None:
        """Number, encode and hash a batch on a copy of the tree (nothing durable yet)."""
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
            # never before the previous checkpoint (nodes sharing a log have their own clocks)
            at = max(int(now), self._checkpoint_floor)
            cp = Checkpoint(origin=self.origin, size=tree.size, root=tree.root(), time=at)
            checkpoint = CheckpointRecord(tree.size, at, sign_note(cp.body(), self._signer))
        if not rows and checkpoint is None:
            return None
        return _Staged(tree, rows, accepted, checkpoint, now)

    def _write(self, staged: _Staged) -> bool:
        """BEGIN and insert a staged batch (the COMMIT is the caller's); on failure roll back
        and fail its events."""
        try:
            if self.failing:
                raise sqlite3.OperationalError("simulated audit store failure")
            if self._gone:
                raise sqlite3.OperationalError(f"{self.path} was deleted or replaced")
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT INTO events (seq, time, type, principal, key_id, grant_id, data, leaf)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)", staged.rows)
                if staged.checkpoint is not None:
                    cp = staged.checkpoint
                    self._db.execute("INSERT INTO checkpoints (size, time, note) VALUES (?, ?, ?)",
                                     (cp.size, cp.time, cp.note))
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            log.error("audit: a batch of %d event(s) could not be made durable: %s",
                      len(staged.rows), exc)
            self._commit_failed = True
            _resolve([(item, AuditUnavailable()) for item, _ in staged.accepted])
            return False
        return True

    def _apply(self, staged: _Staged) -> None:
        """The batch is durable: adopt its tree and answer its submitters."""
        self._tree = staged.tree
        if self._commit_failed:
            self._commit_failed = False
            log.warning("audit: events are durable again")
        if staged.checkpoint is not None:
            self._newest_checkpoint = staged.checkpoint
            self._checkpointed_size = staged.checkpoint.size
            self._last_checkpoint_at = staged.now
            self._checkpoint_floor = max(self._checkpoint_floor, staged.checkpoint.time)
        _resolve(list(staged.accepted))

    # -- reading ---------------------------------------------------------------------------

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        if self._closed:
            raise AuditUnavailable("the audit log is closed")
        lock = self._lock if self._read_db is self._db else self._read_lock
        with lock:
            try:
                return self._read_db.execute(sql, params).fetchall()
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
                if "\x00" in value or len(value) > _MAX_FILTER:
                    raise InvalidRequest(f"{column} filter: at most {_MAX_FILTER} characters, "
                                         "no NUL")
                where.append(f"{column} = ?")
                params.append(value)
        if q.since is not None:
            since = _query_time(q.since, "since")
            # Events before a checkpoint were submitted before it was signed: start at the
            # last checkpoint signed a safe margin before `since` instead of scanning it all.
            rows = self._query("SELECT max(size) FROM checkpoints WHERE time < ?",
                               (int(since) - _TIME_MARGIN,))
            floor = int(rows[0][0] or 0)
            if floor > params[0]:
                params[0] = floor - 1
            where.append("time >= ?")
            params.append(format_time(since))
        if q.until is not None:
            where.append("time < ?")
            params.append(format_time(_query_time(q.until, "until")))
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
        """Record a sink's delivery position durably (from a thread, not a loop).

        Raises:
            AuditUnavailable: if the log is closed or the write fails.
        """
        self._not_during_own_commit("AuditLog.set_cursor")
        with self._lock:
            if self._closed:
                raise AuditUnavailable("the audit log is closed")
            try:
                self._db.execute("INSERT INTO cursors (sink, seq) VALUES (?, ?) "
                                 "ON CONFLICT (sink) DO UPDATE SET seq = excluded.seq", (sink, seq))
            except sqlite3.Error as exc:
                raise AuditUnavailable("the sink cursor could not be saved") from exc


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
