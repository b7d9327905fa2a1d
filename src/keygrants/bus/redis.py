"""``redis://[[user]:password@]host:port[/db]``: Redis PUBLISH / SUBSCRIBE over redis-py asyncio.

Publishes go through a connection pool. Subscriptions share one dedicated connection, read by
a task that hands each message to its subscribers; when that connection drops (or an idle
PING goes unanswered) the task reconnects with a capped backoff and subscribes again to
every live subject. Messages published meanwhile are lost.

Redis pub/sub channels are global to a server: ``/db`` selects a database for the
connection but does not separate channels.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from typing import Any, Final
from urllib.parse import unquote

from redis.asyncio import Redis
from redis.asyncio.connection import Connection
from redis.exceptions import RedisError

from keygrants.bus import (
    BusError,
    Handler,
    _check_message,
    _check_subject,
    _describe,
    _Dispatcher,
    _parse_url,
    _redact_url,
)

__all__ = ["DEFAULT_PORT", "RedisBus"]

DEFAULT_PORT: Final = 6379
_DB: Final = re.compile(r"[0-9]{1,5}")
_COMMAND_TIMEOUT: Final = 10.0  # seconds for a command to be written or answered (SUBSCRIBE: confirmed)
_IDLE_PING: Final = 15.0  # an idle subscriber connection PINGs; no answer in as long again: dead
_RECONNECT_MIN: Final = 0.1  # seconds before the first reconnection attempt, doubling...
_RECONNECT_MAX: Final = 2.0  # ...up to this
_CLIENT_NAME: Final = "keygrants-bus"
# What a lost, refused or timed-out connection raises, whichever layer notices it.
_CONNECTION_ERRORS: Final = (RedisError, OSError, TimeoutError)

log = logging.getLogger(__name__)


class _RedisSubscription:
    def __init__(self, bus: RedisBus, subject: str, dispatcher: _Dispatcher) -> None:
        self._bus = bus
        self.subject = subject
        self.dispatcher = dispatcher

    async def unsubscribe(self) -> None:
        await self._bus._unsubscribe(self)


class RedisBus:
    """A :class:`~keygrants.bus.Bus` on Redis pub/sub (at-most-once delivery).

    Args:
        url: ``redis://[[user]:password@]host[:port][/db]``.
        connect_timeout: seconds :meth:`connect` (and each reconnection attempt) may take.

    Raises:
        ValueError: for a malformed URL.
    """

    def __init__(self, url: str, *, connect_timeout: float = 5.0) -> None:
        parts = _parse_url(url, "redis")
        db = parts.path.removeprefix("/")
        if db and not _DB.fullmatch(db):
            raise ValueError("the path of a redis:// URL is a database number")
        if not connect_timeout > 0:
            raise ValueError("connect_timeout must be positive")
        assert parts.hostname is not None  # _parse_url checked it
        self.url = _redact_url(parts, keep_username=True)
        self.connect_timeout = connect_timeout
        self._options: dict[str, Any] = {
            "host": parts.hostname, "port": parts.port or DEFAULT_PORT, "db": int(db or 0),
            "username": unquote(parts.username) if parts.username else None,
            "password": unquote(parts.password) if parts.password else None,
            "socket_connect_timeout": connect_timeout, "socket_keepalive": True,
            "client_name": _CLIENT_NAME,
        }
        self._password: str | None = self._options["password"]
        self._client: Redis | None = None
        self._closed = False
        # Serialises connect, subscribe, unsubscribe and re-subscribing after a reconnection.
        self._lock = asyncio.Lock()
        self._reader: asyncio.Task[None] | None = None
        self._reader_conn: Connection | None = None  # the subscriber connection, while it is up
        self._channels: dict[str, list[_RedisSubscription]] = {}
        self._confirmations: dict[str, list[asyncio.Future[None]]] = {}

    def __repr__(self) -> str:
        return f"RedisBus({self.url!r})"

    async def connect(self) -> None:
        async with self._lock:
            if self._closed:
                raise BusError(f"the bus {self.url} is closed")
            if self._client is not None:
                return
            client = Redis(socket_timeout=_COMMAND_TIMEOUT, **self._options)
            try:
                await asyncio.wait_for(client.ping(), self.connect_timeout)
            except BaseException as exc:
                await _disconnect_pool(client)
                if isinstance(exc, _CONNECTION_ERRORS):
                    raise BusError(f"cannot connect to {self.url}: {self._describe(exc)}") from exc
                raise
            self._client = client

    async def publish(self, subject: str, data: bytes) -> None:
        _check_subject(subject)
        data = _check_message(data)
        client = self._usable()
        try:
            await client.publish(subject, data)
        except _CONNECTION_ERRORS as exc:
            raise BusError(f"cannot publish to {self.url}: {self._describe(exc)}") from exc

    async def subscribe(self, subject: str, handler: Handler) -> _RedisSubscription:
        _check_subject(subject)
        self._usable()
        subscription = _RedisSubscription(self, subject, _Dispatcher(subject, handler, bus_url=self.url))
        try:
            async with self._lock:
                self._usable()
                await self._start_reader()
                conn = self._reader_conn
                if conn is None:
                    raise BusError(f"the subscriber connection to {self.url} is down (reconnecting)")
                subscribers = self._channels.setdefault(subject, [])
                subscribers.append(subscription)
                if len(subscribers) == 1:
                    # No await between the check above and this registration: a connection
                    # lost from here on fails the waiter (see _connection_lost).
                    waiter = asyncio.get_running_loop().create_future()
                    self._confirmations.setdefault(subject, []).append(waiter)
                    try:
                        await conn.send_command("SUBSCRIBE", subject)
                        await asyncio.wait_for(waiter, _COMMAND_TIMEOUT)
                    finally:
                        self._forget_waiter(subject, waiter)
            self._usable()  # close() may have run meanwhile
        except BaseException as exc:
            self._drop(subscription)
            await subscription.dispatcher.stop()
            if isinstance(exc, _CONNECTION_ERRORS):
                raise BusError(f"cannot subscribe on {self.url}: {self._describe(exc)}") from exc
            raise
        return subscription

    async def close(self) -> None:
        self._closed = True
        channels, self._channels = self._channels, {}
        for subscribers in channels.values():
            for subscription in subscribers:
                await subscription.dispatcher.stop()
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            await asyncio.wait([reader])  # its finally clause closes its connection
        self._reader_conn = None
        self._fail_confirmations(BusError(f"the bus {self.url} is closed"))
        client, self._client = self._client, None
        if client is not None:
            await _disconnect_pool(client)

    # -- internals --------------------------------------------------------------------------

    def _usable(self) -> Redis:
        if self._closed:
            raise BusError(f"the bus {self.url} is closed")
        if self._client is None:
            raise BusError(f"the bus {self.url} is not connected")
        return self._client

    def _describe(self, exc: BaseException) -> str:
        return _describe(exc, self._password)

    async def _unsubscribe(self, subscription: _RedisSubscription) -> None:
        await subscription.dispatcher.stop()
        async with self._lock:
            if not self._drop(subscription):
                return
            conn = self._reader_conn
            if conn is None or self._closed:
                return  # a re-subscription after reconnecting leaves the subject out
            try:
                await conn.send_command("UNSUBSCRIBE", subscription.subject)
            except _CONNECTION_ERRORS as exc:  # the reader notices the connection too
                log.debug("bus %s: unsubscribe: %s", self.url, self._describe(exc))

    def _drop(self, subscription: _RedisSubscription) -> bool:
        """Remove ``subscription``; True when it was the subject's last one."""
        subscribers = self._channels.get(subscription.subject, [])
        if subscription not in subscribers:
            return False
        subscribers.remove(subscription)
        if subscribers:
            return False
        del self._channels[subscription.subject]
        return True

    def _forget_waiter(self, subject: str, waiter: asyncio.Future[None]) -> None:
        waiters = self._confirmations.get(subject, [])
        if waiter in waiters:
            waiters.remove(waiter)
        if not waiters:
            self._confirmations.pop(subject, None)

    def _fail_confirmations(self, error: BusError) -> None:
        confirmations, self._confirmations = self._confirmations, {}
        for waiters in confirmations.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(error)

    async def _open_subscriber(self) -> Connection:
        conn = Connection(socket_timeout=_COMMAND_TIMEOUT, **self._options)
        try:
            await asyncio.wait_for(conn.connect(), self.connect_timeout)  # type: ignore[no-untyped-call]
        except BaseException as exc:
            with contextlib.suppress(*_CONNECTION_ERRORS):
                await conn.disconnect(nowait=True)
            if isinstance(exc, _CONNECTION_ERRORS):
                raise BusError(f"cannot connect to {self.url}: {self._describe(exc)}") from exc
            raise
        return conn

    async def _start_reader(self) -> None:
        if self._reader is None or self._reader.done():
            conn = await self._open_subscriber()
            if self._closed:  # close() ran while connecting
                await conn.disconnect(nowait=True)
                raise BusError(f"the bus {self.url} is closed")
            self._reader_conn = conn
            self._reader = asyncio.get_running_loop().create_task(
                self._read_loop(conn), name=f"keygrants-bus reader {self.url}")

    async def _read_loop(self, conn: Connection) -> None:
        """Read the subscriber connection forever, reconnecting when it is lost."""
        try:
            while True:
                try:
                    await self._pump(conn)
                except Exception as exc:  # lost, or not understood: start afresh either way
                    log.warning("bus %s: lost the subscriber connection (%s); reconnecting",
                                self.url, self._describe(exc))
                self._connection_lost()
                with contextlib.suppress(*_CONNECTION_ERRORS):
                    await conn.disconnect(nowait=True)
                conn = await self._reconnect()
        finally:
            with contextlib.suppress(*_CONNECTION_ERRORS):
                await conn.disconnect(nowait=True)

    def _connection_lost(self) -> None:
        self._reader_conn = None
        self._fail_confirmations(BusError(f"lost the connection to {self.url}"))

    async def _reconnect(self) -> Connection:
        backoff = _RECONNECT_MIN
        while True:
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _RECONNECT_MAX)
            try:
                conn = await self._open_subscriber()
            except BusError as exc:
                log.debug("bus %s: %s", self.url, exc.message)
                continue
            try:
                async with self._lock:
                    if self._channels:
                        await conn.send_command("SUBSCRIBE", *self._channels)
                    self._reader_conn = conn
            except BaseException as exc:
                with contextlib.suppress(*_CONNECTION_ERRORS):
                    await conn.disconnect(nowait=True)
                if not isinstance(exc, _CONNECTION_ERRORS):
                    raise
                log.debug("bus %s: re-subscribe: %s", self.url, self._describe(exc))
                continue
            log.info("bus %s: reconnected the subscriber connection", self.url)
            return conn

    async def _pump(self, conn: Connection) -> None:
        """Route what ``conn`` receives until it fails; PING it when idle to notice a dead peer."""
        pinged = False
        while True:
            response = await conn.read_response(timeout=_IDLE_PING, disconnect_on_error=False)
            if response is None:  # idle for _IDLE_PING seconds
                if pinged:
                    raise TimeoutError(f"no answer to PING within {_IDLE_PING}s")
                await conn.send_command("PING")
                pinged = True
                continue
            pinged = False
            self._route(response)

    def _route(self, response: object) -> None:
        if not isinstance(response, list) or len(response) < 2:
            return
        kind, channel = response[0], response[1]
        if not isinstance(kind, bytes) or not isinstance(channel, bytes):
            return
        subject = channel.decode("ascii", "replace")
        if kind == b"message" and len(response) == 3 and isinstance(response[2], bytes):
            for subscription in self._channels.get(subject, ()):
                subscription.dispatcher.offer(response[2])
        elif kind == b"subscribe":
            for waiter in self._confirmations.pop(subject, []):
                if not waiter.done():
                    waiter.set_result(None)


async def _disconnect_pool(client: Redis) -> None:
    # connection_pool.disconnect(), not aclose(): the same on every redis-py 5.x release.
    with contextlib.suppress(*_CONNECTION_ERRORS):
        await client.connection_pool.disconnect()
