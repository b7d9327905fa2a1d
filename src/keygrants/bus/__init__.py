"""A small message bus for pushing events (grant revocations) from servers to verifiers.

Buses are opened by URL and registered by scheme, built-ins through :func:`register_bus` like
any plugin: ``memory://NAME`` (process-local), ``nats://host:port`` (core NATS),
``redis://[:password@]host:port[/db]`` (Redis PUBLISH / SUBSCRIBE).

Delivery is at most once and fire-and-forget: a message published while a subscriber is
disconnected, or while it is too far behind, is lost. Consumers that must not miss an event
detect gaps themselves (for instance by a sequence number in each message) and resynchronise
from the source of truth. See ``docs/bus.md``.

A bus is used from the event loop that connected it; subscription handlers run on the loop
that called :meth:`Bus.subscribe`.
"""

from __future__ import annotations

import asyncio
import logging
import re
import traceback
from collections.abc import Awaitable, Callable
from typing import Final, Protocol
from urllib.parse import SplitResult, urlsplit

from keygrants.errors import KeygrantsError

__all__ = [
    "MAX_MESSAGE_BYTES",
    "MAX_SUBJECT_LENGTH",
    "Bus",
    "BusError",
    "BusFactory",
    "Handler",
    "Subscription",
    "open_bus",
    "register_bus",
]

MAX_MESSAGE_BYTES: Final = 1024 * 1024
"""The largest message body, in bytes (the default ``max_payload`` of a NATS server)."""
MAX_SUBJECT_LENGTH: Final = 128
"""The longest subject, in characters."""

# Dot-separated tokens of [A-Za-z0-9_-]: valid, wildcard-free NATS subjects and Redis channels.
_SUBJECT: Final = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")
# A subscriber that falls this far behind loses messages (at-most-once, like a NATS slow consumer).
_MAX_PENDING_MESSAGES: Final = 65_536
_MAX_PENDING_BYTES: Final = 64 * 1024 * 1024

log = logging.getLogger(__name__)

Handler = Callable[[bytes], Awaitable[None]]


class BusError(KeygrantsError):
    """Raised when the message bus cannot be reached, is closed, or a publish fails."""

    code = "bus_unavailable"
    status = 503
    default_message = "message bus unavailable"


class Subscription(Protocol):
    """A live subscription, returned by :meth:`Bus.subscribe`."""

    async def unsubscribe(self) -> None:
        """Stop delivery: once this returns the handler is not called again (idempotent)."""
        ...


class Bus(Protocol):
    """Publish / subscribe on subjects; see the module docstring for the delivery semantics."""

    url: str
    """The URL the bus was opened with, without credentials."""

    async def connect(self) -> None:
        """Connect to the broker (a no-op when connected).

        Raises:
            BusError: when the broker is not reachable within the connect timeout, or the bus
                was closed.
        """
        ...

    async def publish(self, subject: str, data: bytes) -> None:
        """Send ``data`` to the current subscribers of ``subject``, without waiting for them.

        Raises:
            ValueError: for an invalid subject or a message over :data:`MAX_MESSAGE_BYTES`.
            BusError: when the bus is not connected, closed, or the broker is down.
        """
        ...

    async def subscribe(self, subject: str, handler: Handler) -> Subscription:
        """Call ``handler`` for each message on ``subject``, one at a time and in order.

        The subscription is registered with the broker when this returns. A handler that
        raises is logged (without the message) and keeps receiving later messages.

        Raises:
            ValueError: for an invalid subject.
            BusError: when the bus is not connected or closed.
        """
        ...

    async def close(self) -> None:
        """End every subscription and disconnect (idempotent; a closed bus stays closed)."""
        ...


BusFactory = Callable[[str, float], Bus]
_FACTORIES: dict[str, BusFactory] = {}


def register_bus(scheme: str, factory: BusFactory) -> None:
    """Register ``factory(url, connect_timeout) -> Bus`` for a URL scheme."""
    _FACTORIES[scheme] = factory


def open_bus(url: str, *, connect_timeout: float = 5.0) -> Bus:
    """Open a bus by URL; nothing is connected until :meth:`Bus.connect`.

    Args:
        url: ``memory://NAME`` (process-local: every bus opened with the same NAME in one
            process shares messages; for tests and single-process setups),
            ``nats://host:port``, or ``redis://[:password@]host:port[/db]``.
        connect_timeout: seconds :meth:`Bus.connect` may take.

    Raises:
        ValueError: for an unknown scheme or a malformed URL.
        BusError: when the client library for the scheme is not installed.
    """
    if not connect_timeout > 0:
        raise ValueError("connect_timeout must be positive")
    scheme, sep, _ = url.partition("://")
    factory = _FACTORIES.get(scheme) if sep else None
    if factory is None:
        shown = f"unknown bus URL scheme {scheme!r}" if sep else "a bus URL looks like scheme://..."
        raise ValueError(f"{shown}; known schemes: {', '.join(sorted(_FACTORIES))}")
    return factory(url, connect_timeout)


# -- helpers shared by the implementations ------------------------------------------------------

def _check_subject(subject: str) -> None:
    """Raise ``ValueError`` unless ``subject`` is dot-separated ``[A-Za-z0-9_-]`` tokens."""
    if not isinstance(subject, str) or len(subject) > MAX_SUBJECT_LENGTH \
            or not _SUBJECT.fullmatch(subject):
        raise ValueError(f"invalid bus subject (dot-separated tokens of [A-Za-z0-9_-], at most "
                         f"{MAX_SUBJECT_LENGTH} characters): {str(subject)[:MAX_SUBJECT_LENGTH]!r}")


def _check_message(data: bytes) -> bytes:
    """Return ``data`` as ``bytes``; raise ``ValueError`` beyond :data:`MAX_MESSAGE_BYTES`."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"a bus message is bytes, not {type(data).__name__}")
    if memoryview(data).nbytes > MAX_MESSAGE_BYTES:
        raise ValueError(f"a bus message is limited to {MAX_MESSAGE_BYTES} bytes")
    return bytes(data)


def _parse_url(url: str, scheme: str) -> SplitResult:
    """Split a ``scheme://[userinfo@]host[:port][/path]`` URL, checking host and port.

    Error messages never repeat the URL (it may hold a password).
    """
    try:
        parts = urlsplit(url)
        _ = parts.port  # reading it raises ValueError for a bad port
    except ValueError:
        raise ValueError(f"malformed {scheme}:// URL (bad host or port)") from None
    if parts.scheme != scheme or not parts.hostname:
        raise ValueError(f"a {scheme}:// URL needs a host")
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise ValueError(f"a {scheme}:// URL takes no query or fragment")
    return parts


def _redact_url(parts: SplitResult, *, keep_username: bool) -> str:
    """The URL without its password (and without the username unless ``keep_username``)."""
    host = parts.netloc.rpartition("@")[2]
    user = parts.username if keep_username and parts.username else ""
    netloc = f"{user}@{host}" if user else host
    return f"{parts.scheme}://{netloc}{parts.path}"


def _describe(exc: BaseException, *secrets: str | None) -> str:
    """``Type: message`` for logs and errors; only the type when the message holds a secret."""
    message = str(exc)
    if any(secret and secret in message for secret in secrets):
        return type(exc).__name__
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


class _Dispatcher:
    """Runs one subscription's handler over a bounded queue, in a task on the caller's loop.

    Messages are offered without blocking the receiving side; the handler is awaited for one
    message at a time, in order. When the queue is full, new messages are dropped (logged).
    """

    def __init__(self, subject: str, handler: Handler, *, bus_url: str) -> None:
        self.subject = subject
        self._handler = handler
        self._bus_url = bus_url
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(_MAX_PENDING_MESSAGES)
        self._pending_bytes = 0
        self._dropping = False
        self._stopped = False
        self.loop = asyncio.get_running_loop()
        self._task = self.loop.create_task(self._run(), name=f"keygrants-bus {subject}")

    @property
    def stopped(self) -> bool:
        return self._stopped

    def offer(self, data: bytes) -> None:
        """Queue ``data`` for the handler (call on :attr:`loop`)."""
        if self._stopped:
            return
        if self._queue.full() or self._pending_bytes + len(data) > _MAX_PENDING_BYTES:
            if not self._dropping:
                log.warning("bus %s: the subscriber on %s is too slow; dropping messages",
                            self._bus_url, self.subject)
            self._dropping = True
            return
        self._dropping = False
        self._pending_bytes += len(data)
        self._queue.put_nowait(data)

    def offer_threadsafe(self, data: bytes) -> None:
        """:meth:`offer` from any thread or event loop."""
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            self.offer(data)
            return
        try:
            self.loop.call_soon_threadsafe(self.offer, data)
        except RuntimeError:  # the subscriber's loop is closed: nobody is listening
            self._stopped = True

    async def stop(self) -> None:
        """Stop delivery; a handler running now is cancelled, unless this is called from it."""
        self._stopped = True
        if self._task is asyncio.current_task():
            return  # the handler unsubscribes itself: _run ends once it returns
        self._task.cancel()
        # asyncio.wait, not await: a cancellation of *our* caller must still propagate.
        await asyncio.wait([self._task])

    async def _run(self) -> None:
        while not self._stopped:
            data = await self._queue.get()
            self._pending_bytes -= len(data)
            try:
                await self._handler(data)
            except asyncio.CancelledError as exc:
                task = asyncio.current_task()
                if self._stopped or (task is not None and task.cancelling()):
                    raise  # stop() or the loop shutting down
                self._log_failure(exc)  # the handler's own, e.g. from a cancelled inner task
            except Exception as exc:
                self._log_failure(exc)

    def _log_failure(self, exc: BaseException) -> None:
        # Neither the exception's message nor its chain: either may quote the message body.
        frames = "".join(traceback.format_tb(exc.__traceback__))
        log.error("bus %s: a handler for %s raised %s; the subscription continues\n%s",
                  self._bus_url, self.subject, type(exc).__name__, frames.rstrip())


# -- built-in schemes --------------------------------------------------------------------------

def _missing(exc: ImportError, library: str, extra: str) -> BusError | None:
    if (exc.name or "").split(".")[0] != library:
        return None
    return BusError(f"the {extra}:// bus needs {library}: pip install 'keygrants[{extra}]'")


def _open_memory(url: str, connect_timeout: float) -> Bus:
    from keygrants.bus.memory import MemoryBus

    return MemoryBus(url)


def _open_nats(url: str, connect_timeout: float) -> Bus:
    try:
        from keygrants.bus.nats import NatsBus
    except ImportError as exc:
        error = _missing(exc, "nats", "nats")
        if error is None:
            raise
        raise error from exc
    return NatsBus(url, connect_timeout=connect_timeout)


def _open_redis(url: str, connect_timeout: float) -> Bus:
    try:
        from keygrants.bus.redis import RedisBus
    except ImportError as exc:
        error = _missing(exc, "redis", "redis")
        if error is None:
            raise
        raise error from exc
    return RedisBus(url, connect_timeout=connect_timeout)


register_bus("memory", _open_memory)
register_bus("nats", _open_nats)
register_bus("redis", _open_redis)
