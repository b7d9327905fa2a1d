"""Secondary audit sinks: copies of the audit log shipped elsewhere, asynchronously.

``audit.db`` is the record: a request is answered only after its event is durable there, and
nothing here can slow or fail a request. A :class:`Shipper` task per sink reads durable events
after the sink's cursor (kept in ``audit.db``), hands them to the sink in order, in batches,
and moves the cursor only once the sink has acknowledged the batch. A failing sink is retried
with capped exponential backoff while the log keeps growing, and a restart resumes from the
last acknowledged sequence: delivery is at-least-once. A batch acknowledged by the sink whose
cursor write was lost (a crash in between) is sent again; the NATS sink's message ids
(``<origin>:<seq>``) let JetStream drop such re-sends within its duplicate window, and a
reader of the JSONL files dedupes by ``seq``.

Sinks are opened by URI, registered by scheme (:func:`register_sink`)::

    file:///var/log/keygrants/audit.jsonl?max_bytes=104857600&backups=5
    nats://127.0.0.1:4222?stream=KEYGRANTS_AUDIT&subject=keygrants.audit

Every sink has a ``name`` that keys its cursor: the destination without credentials
(``file:///var/log/keygrants/audit.jsonl``, ``nats://127.0.0.1:4222/KEYGRANTS_AUDIT``), or
``?name=`` to choose one. A new name starts from the first event of the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import itertools
import logging
import math
import os
import re
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final, NamedTuple, Protocol
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

from keygrants.audit.log import AuditLog

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient
    from nats.js.client import JetStreamContext

__all__ = [
    "AuditSink",
    "JsonlFileSink",
    "MemorySink",
    "NatsSink",
    "Shipper",
    "SinkEvent",
    "open_sink",
    "register_sink",
]

log = logging.getLogger("keygrants.audit.sinks")

DEFAULT_BATCH: Final = 1000
DEFAULT_POLL_INTERVAL: Final = 0.05
DEFAULT_MIN_BACKOFF: Final = 0.1
DEFAULT_MAX_BACKOFF: Final = 30.0
DEFAULT_STOP_TIMEOUT: Final = 5.0
DEFAULT_MAX_BYTES: Final = 100 * 1024 * 1024
DEFAULT_BACKUPS: Final = 5
MAX_BACKUPS: Final = 1000
DEFAULT_NATS_URL: Final = "nats://127.0.0.1:4222"
DEFAULT_STREAM: Final = "KEYGRANTS_AUDIT"
DEFAULT_SUBJECT: Final = "keygrants.audit"
DEFAULT_DUPLICATE_WINDOW: Final = 120.0
MSG_ID_HEADER: Final = "Nats-Msg-Id"
_STREAM_NAME: Final = re.compile(r"^[A-Za-z0-9_-]{1,255}$")
_SUBJECT: Final = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
_USERINFO: Final = re.compile(r"//[^/@\s]*@")
_MAX_LOGGED_ERROR: Final = 300


class SinkEvent(NamedTuple):
    """One durable event as shipped: its sequence number and canonical JSON bytes."""

    seq: int
    data: bytes


class AuditSink(Protocol):
    """A destination for audit events.

    ``name`` identifies the destination (it keys the delivery cursor in ``audit.db`` and
    appears in logs, so it never holds credentials).
    """

    name: str

    async def deliver(self, origin: str, events: Sequence[SinkEvent]) -> None:
        """Store ``events`` (consecutive, in order) durably; returning acknowledges all of them.

        Raises:
            Exception: anything, when not all of them are acknowledged; the shipper retries
                the whole batch (events already stored may be sent again).
        """
        ...

    async def close(self) -> None:
        """Release connections and files (the sink may be used again afterwards)."""
        ...


def _safe(exc: BaseException) -> str:
    """An error for the log: its type and message, credentials in URLs masked, bounded."""
    text = _USERINFO.sub("//***@", f"{type(exc).__name__}: {exc}")
    return text[:_MAX_LOGGED_ERROR]


# -- the shipper ------------------------------------------------------------------------------

class Shipper:
    """Ships the durable events of ``log`` to ``sink``, at least once, in order.

    Args:
        log: the primary audit log.
        sink: where events go.
        batch_size: most events per delivery.
        poll_interval: seconds between looks at the log when caught up (a look reads only the
            in-memory tree size).
        min_backoff, max_backoff: the first and the largest delay between failed attempts.
    """

    def __init__(self, log: AuditLog, sink: AuditSink, *, batch_size: int = DEFAULT_BATCH,
                 poll_interval: float = DEFAULT_POLL_INTERVAL,
                 min_backoff: float = DEFAULT_MIN_BACKOFF,
                 max_backoff: float = DEFAULT_MAX_BACKOFF) -> None:
        if batch_size < 1 or poll_interval <= 0 or not 0 < min_backoff <= max_backoff:
            raise ValueError("need batch_size >= 1, poll_interval > 0, 0 < min_backoff <= max_backoff")
        self.log = log
        self.sink = sink
        self._batch_size = batch_size
        self._poll = poll_interval
        self._min_backoff = min_backoff
        self._max_backoff = max_backoff
        self._cursor: int | None = None
        self._failures = 0
        self._stopping = False
        self._wake = asyncio.Event()  # set by stop(): no waiting out a poll or a backoff
        self._task: asyncio.Task[None] | None = None

    @property
    def cursor(self) -> int | None:
        """The next sequence number to deliver (``None`` until read from the log)."""
        return self._cursor

    @property
    def failures(self) -> int:
        """Consecutive failed attempts (0 while deliveries succeed)."""
        return self._failures

    def backoff(self, attempt: int) -> float:
        """Delay after the ``attempt``-th consecutive failure (1-based): doubling, capped."""
        return min(self._max_backoff, self._min_backoff * 2.0 ** min(attempt - 1, 64))

    def start(self) -> Shipper:
        """Run :meth:`run` as a task on the running event loop."""
        if self._task is None or self._task.done():
            self._stopping = False
            self._wake.clear()
            self._task = asyncio.get_running_loop().create_task(
                self.run(), name=f"keygrants-audit-sink:{self.sink.name}")
        return self

    async def stop(self, *, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        """Deliver what is durable now for up to ``timeout`` seconds, then stop and close the
        sink (what is left is shipped after the next start)."""
        self._stopping = True
        self._wake.set()
        task = self._task
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout)
            except TimeoutError:
                task.cancel()
                log.warning("audit sink %s: stopped with %d event(s) not yet delivered",
                            self.sink.name, max(0, self.log.size - (self._cursor or 0)))
            with contextlib.suppress(asyncio.CancelledError):
                await task
        try:
            await self.sink.close()
        except Exception as exc:
            log.warning("audit sink %s: close failed: %s", self.sink.name, _safe(exc))

    async def run(self) -> None:
        """Ship until cancelled (or, after :meth:`stop`, until caught up)."""
        while True:
            if self._cursor is not None and self._cursor >= self.log.size:
                if self._stopping:
                    return
                await self._sleep(self._poll)
                continue
            try:
                await self._ship_one_batch()
            except (Exception, asyncio.CancelledError) as exc:
                task = asyncio.current_task()
                if task is None or task.cancelling():
                    # Cancelled by stop(), also when the sink swallowed the cancellation and
                    # failed instead (nats-py can); a CancelledError a sink raises of its own
                    # accord is a failure.
                    raise asyncio.CancelledError from exc
                self._failures += 1
                delay = self.backoff(self._failures)
                # Once at the first failure and then about every max_backoff: an outage
                # should not flood the log.
                first_or_capped = self._failures == 1 or delay >= self._max_backoff
                (log.warning if first_or_capped else log.debug)(
                    "audit sink %s: delivery failed (attempt %d, %d event(s) waiting), "
                    "retrying in %.1fs: %s", self.sink.name, self._failures,
                    max(0, self.log.size - (self._cursor or 0)), delay, _safe(exc))
                # stop() wakes a backoff once, for a last attempt; no busy retries after that
                await (asyncio.sleep(delay) if self._stopping else self._sleep(delay))
                continue
            if self._failures:
                log.info("audit sink %s: delivering again after %d failed attempt(s)",
                         self.sink.name, self._failures)
                self._failures = 0

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    async def _ship_one_batch(self) -> None:
        if self._cursor is None:
            self._cursor = await asyncio.to_thread(self.log.get_cursor, self.sink.name)
            if self._cursor >= self.log.size:
                return
        batch = await asyncio.to_thread(self._read, self._cursor)
        if not batch or batch[0].seq != self._cursor:  # the log is gapless: a broken database
            raise RuntimeError(f"event {self._cursor} is missing from the audit log")
        await self.sink.deliver(self.log.origin, batch)
        after = batch[-1].seq + 1
        await asyncio.to_thread(self.log.set_cursor, self.sink.name, after)
        self._cursor = after

    def _read(self, since: int) -> list[SinkEvent]:
        events = self.log.iter_events(since=since, chunk=self._batch_size)
        return [SinkEvent(seq, data) for seq, data, _ in itertools.islice(events, self._batch_size)]


# -- memory -----------------------------------------------------------------------------------

class MemorySink:
    """Keeps shipped events in a list (tests, embedding); ``failing = True`` makes every
    delivery fail, as an unreachable destination would."""

    def __init__(self, name: str = "memory") -> None:
        self.name = name
        self.events: list[SinkEvent] = []
        self.failing = False
        self.deliveries = 0

    async def deliver(self, origin: str, events: Sequence[SinkEvent]) -> None:
        """Append ``events`` unless failing."""
        if self.failing:
            raise ConnectionError("the memory sink is failing")
        self.deliveries += 1
        self.events.extend(events)

    async def close(self) -> None:
        """Nothing to release."""


# -- JSONL files ------------------------------------------------------------------------------

class JsonlFileSink:
    """Appends one event per line (its canonical JSON) to a file, rotating by size.

    A batch is written and fsynced before it is acknowledged. When the next line would make
    the file larger than ``max_bytes``, the file becomes ``path.1`` (``path.1`` becomes
    ``path.2``, ..., and ``path.<backups>`` is dropped). Files are created with mode 0600. A
    partial last line (a crash during a write) is cut off when the file is opened again; the
    events it held are re-sent, as the cursor had not moved.

    Args:
        path: the current file.
        max_bytes: the size a file may reach before rotation (a single longer line still
            gets a file of its own).
        backups: rotated files kept (at least 1).
        name: the cursor name (default ``file://<absolute path>``).

    Raises:
        ValueError: for a ``max_bytes`` or ``backups`` out of range.
    """

    def __init__(self, path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_BYTES,
                 backups: int = DEFAULT_BACKUPS, name: str | None = None) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be positive")
        if not 1 <= backups <= MAX_BACKUPS:
            raise ValueError(f"backups must be 1..{MAX_BACKUPS}")
        self.path = Path(path).absolute()
        self.max_bytes = max_bytes
        self.backups = backups
        self.name = name or f"file://{self.path}"
        self._lock = threading.Lock()  # a cancelled delivery's thread may still be writing
        self._file: IO[bytes] | None = None
        self._size = 0

    async def deliver(self, origin: str, events: Sequence[SinkEvent]) -> None:
        """Append and fsync ``events``, one line each."""
        await asyncio.to_thread(self._write, events)

    async def close(self) -> None:
        """Close the current file."""
        await asyncio.to_thread(self._close_locked)

    def _close_locked(self) -> None:
        with self._lock:
            self._close()

    def _write(self, events: Sequence[SinkEvent]) -> None:
        with self._lock:
            f = self._open()
            start = self._size
            try:
                for event in events:
                    line = event.data + b"\n"
                    if self._size and self._size + len(line) > self.max_bytes:
                        f.flush()
                        os.fsync(f.fileno())
                        self._rotate()
                        f = self._open()
                        start = 0
                    f.write(line)
                    self._size += len(line)
                f.flush()
                os.fsync(f.fileno())
            except BaseException:
                self._discard_tail(start)
                raise

    def _open(self) -> IO[bytes]:
        if self._file is not None:
            return self._file
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        created = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            size = _cut_partial_line(fd, self.path)
            if created:
                _fsync_dir(self.path.parent)
            self._file = os.fdopen(fd, "ab")
        except BaseException:
            os.close(fd)
            raise
        self._size = size
        return self._file

    def _close(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            f.close()

    def _rotate(self) -> None:
        self._close()
        for i in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        _fsync_dir(self.path.parent)

    def _discard_tail(self, size: int) -> None:
        """After a failed write: drop the unacknowledged part, so a retry does not repeat it."""
        with contextlib.suppress(OSError):
            self._close()
        with contextlib.suppress(OSError):
            os.truncate(self.path, size)


def _cut_partial_line(fd: int, path: Path) -> int:
    """Truncate the file after its last newline; returns the resulting size."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return size
    end = size
    keep = 0
    while end > 0:
        start = max(0, end - 65536)
        chunk = os.pread(fd, end - start, start)
        nl = chunk.rfind(b"\n")
        if nl >= 0:
            keep = start + nl + 1
            break
        end = start
    os.ftruncate(fd, keep)
    os.fsync(fd)
    log.warning("audit sink file://%s: cut %d byte(s) of a partial last line", path, size - keep)
    return keep


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- NATS JetStream ---------------------------------------------------------------------------

class NatsSink:
    """Publishes each event to a JetStream stream, acknowledged by JetStream.

    Every message carries the event's canonical JSON and a ``Nats-Msg-Id`` header
    ``<origin>:<seq>``, so JetStream stores a re-sent event only once within the stream's
    duplicate window; a reader dedupes by that id (or by ``seq``) beyond it. The stream is
    created if absent (file storage, the one subject, ``duplicate_window`` seconds).

    The sink owns its reconnection: a lost connection, or an acknowledgement that does not
    come within ``ack_timeout``, drops the connection, the batch fails, and the shipper's next
    attempt (after its backoff) connects again. Nothing is buffered across connections, so
    the stream holds events in sequence order.

    Args:
        url: ``nats://[user:password@]host:port`` (credentials never appear in logs).
        stream: the JetStream stream.
        subject: the subject events are published on.
        connect_timeout: seconds to connect (and to look up or create the stream).
        ack_timeout: seconds to wait for JetStream to acknowledge a batch.
        duplicate_window: the stream's duplicate window, when this sink creates it.
        name: the cursor name (default ``nats://host:port/<stream>``).

    Raises:
        ValueError: for a malformed URL, stream or subject, or when nats-py is missing.
    """

    def __init__(self, url: str = DEFAULT_NATS_URL, *, stream: str = DEFAULT_STREAM,
                 subject: str = DEFAULT_SUBJECT, connect_timeout: float = 2.0,
                 ack_timeout: float = 5.0, duplicate_window: float = DEFAULT_DUPLICATE_WINDOW,
                 name: str | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme != "nats" or not parts.hostname or parts.path not in ("", "/") \
                or parts.query or parts.fragment:
            raise ValueError("the NATS URL must be nats://[user:password@]host[:port]")
        try:
            port = parts.port or 4222
        except ValueError as exc:
            raise ValueError("the NATS URL has an invalid port") from exc
        if not _STREAM_NAME.match(stream):
            raise ValueError(f"invalid JetStream stream name {stream!r}")
        if not _SUBJECT.match(subject):
            raise ValueError(f"invalid NATS subject {subject!r} (no wildcards)")
        if connect_timeout <= 0 or ack_timeout <= 0 or duplicate_window <= 0:
            raise ValueError("timeouts and the duplicate window must be positive")
        if importlib.util.find_spec("nats") is None:
            raise ValueError("the nats: audit sink needs nats-py: pip install 'keygrants[nats]'")
        self._url = url
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        self.stream = stream
        self.subject = subject
        self.connect_timeout = connect_timeout
        self.ack_timeout = ack_timeout
        self.duplicate_window = duplicate_window
        self.name = name or f"nats://{host}:{port}/{stream}"
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._lost = asyncio.Event()

    async def deliver(self, origin: str, events: Sequence[SinkEvent]) -> None:
        """Publish ``events`` in order; return once JetStream acknowledged every one."""
        from nats.js.errors import APIError

        js = await self._connected()
        futures: list[asyncio.Future[Any]] = []
        try:
            for event in events:
                futures.append(await js.publish_async(
                    self.subject, event.data, stream=self.stream,
                    headers={MSG_ID_HEADER: f"{origin}:{event.seq}"}))
            await self._acknowledged(futures)
        except BaseException as exc:
            for fut in futures:
                fut.cancel()
            if not isinstance(exc, APIError):  # JetStream said no; the connection is fine
                await self._drop()
            raise

    async def close(self) -> None:
        """Close the connection."""
        await self._drop()

    async def _acknowledged(self, futures: list[asyncio.Future[Any]]) -> None:
        acks: asyncio.Future[Any] = asyncio.gather(*futures, return_exceptions=True)
        lost: asyncio.Future[Any] = asyncio.ensure_future(self._lost.wait())
        try:
            done, _ = await asyncio.wait((acks, lost), timeout=self.ack_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
        if acks not in done:  # deliver() cancels the futures, which completes ``acks``
            raise ConnectionError("the connection to NATS was lost" if lost in done else
                                  f"JetStream did not acknowledge within {self.ack_timeout}s")
        for outcome in acks.result():
            if isinstance(outcome, asyncio.CancelledError):  # not ours to propagate
                raise ConnectionError("a publish was cancelled by the NATS client")
            if isinstance(outcome, BaseException):
                raise outcome

    async def _connected(self) -> JetStreamContext:
        if self._nc is not None and self._js is not None and self._nc.is_connected \
                and not self._lost.is_set():
            return self._js
        await self._drop()
        from nats.aio.client import Client
        from nats.errors import Error as NatsError

        lost = self._lost = asyncio.Event()
        seen: list[Exception] = []

        async def on_lost() -> None:
            lost.set()

        async def on_error(exc: Exception) -> None:
            seen.append(exc)
            log.debug("audit sink %s: %s", self.name, _safe(exc))

        # nats-py reconnection stays off: a reconnecting client buffers publishes and flushes
        # them on the new connection, behind newer re-sends; the shipper retries instead.
        # (max_reconnect_attempts=1 bounds the first connect to two quick tries.)
        nc = Client()
        try:
            await asyncio.wait_for(nc.connect(
                servers=[self._url], name="keygrants-audit", allow_reconnect=False,
                max_reconnect_attempts=1, reconnect_time_wait=0,
                connect_timeout=math.ceil(self.connect_timeout), disconnected_cb=on_lost,
                closed_cb=on_lost, error_cb=on_error), self.connect_timeout)
        except (OSError, TimeoutError, NatsError) as exc:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), self.connect_timeout)
            cause = _safe(seen[-1]) if seen else f"no connection within {self.connect_timeout}s"
            raise ConnectionError(f"cannot connect to NATS: {cause}") from exc
        self._nc = nc
        js = nc.jetstream(timeout=self.connect_timeout)
        try:
            await self._ensure_stream(js)
        except BaseException:
            await self._drop()
            raise
        self._js = nc.jetstream(timeout=self.ack_timeout)
        return self._js

    async def _ensure_stream(self, js: JetStreamContext) -> None:
        from nats.js.api import StorageType, StreamConfig
        from nats.js.errors import BadRequestError, NotFoundError

        try:
            await js.stream_info(self.stream)
            return
        except NotFoundError:
            pass
        config = StreamConfig(name=self.stream, subjects=[self.subject], storage=StorageType.FILE,
                              duplicate_window=self.duplicate_window)
        try:
            await js.add_stream(config)
            log.info("audit sink %s: created stream %s", self.name, self.stream)
        except BadRequestError:  # created meanwhile by another server
            await js.stream_info(self.stream)

    async def _drop(self) -> None:
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None and not nc.is_closed:
            try:
                await asyncio.wait_for(nc.close(), self.connect_timeout)
            except Exception as exc:
                log.debug("audit sink %s: close: %s", self.name, _safe(exc))


# -- opening by URI ---------------------------------------------------------------------------

_SINKS: dict[str, Callable[[str], AuditSink]] = {}


def register_sink(scheme: str, factory: Callable[[str], AuditSink]) -> None:
    """Register ``factory(uri) -> AuditSink`` for a URI scheme."""
    _SINKS[scheme] = factory


def open_sink(uri: str) -> AuditSink:
    """Open a secondary audit sink by URI (nothing is connected or written yet).

    Raises:
        ValueError: for an unknown scheme or a malformed URI.
    """
    scheme, sep, _ = uri.partition(":")
    factory = _SINKS.get(scheme) if sep else None
    if factory is None:
        raise ValueError(f"unknown audit sink {_USERINFO.sub('//***@', uri)!r}; "
                         f"known schemes: {', '.join(sorted(_SINKS))}")
    return factory(uri)


def _options(query: str, allowed: dict[str, type]) -> dict[str, Any]:
    try:
        raw = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError as exc:
        raise ValueError(f"malformed audit sink options: {exc}") from None
    options: dict[str, Any] = {}
    for key, values in raw.items():
        kind = allowed.get(key)
        if kind is None:
            raise ValueError(f"unknown audit sink option {key!r}; known: {', '.join(sorted(allowed))}")
        if len(values) != 1:
            raise ValueError(f"audit sink option {key!r} given more than once")
        try:
            options[key] = kind(values[0])
        except ValueError:
            raise ValueError(f"audit sink option {key!r} must be a {kind.__name__}") from None
    return options


def _open_file(uri: str) -> AuditSink:
    parts = urlsplit(uri)
    # an absolute path naming a file: a relative one (file:audit.jsonl) landed wherever the
    # server was started from, and one ending in "/" wrote events into a file named after
    # the directory
    if (parts.netloc not in ("", "localhost") or not parts.path.startswith("/")
            or parts.path.endswith("/") or parts.fragment):
        raise ValueError("a file audit sink is file:///absolute/path.jsonl[?max_bytes=N&backups=N]")
    options = _options(parts.query, {"max_bytes": int, "backups": int, "name": str})
    return JsonlFileSink(unquote(parts.path), **options)


def _open_nats(uri: str) -> AuditSink:
    parts = urlsplit(uri)
    options = _options(parts.query, {"stream": str, "subject": str, "name": str,
                                     "connect_timeout": float, "ack_timeout": float,
                                     "duplicate_window": float})
    url = urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", parts.fragment))
    return NatsSink(url, **options)


register_sink("file", _open_file)
register_sink("nats", _open_nats)
