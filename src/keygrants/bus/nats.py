"""``nats://[user:password@]host:port``: core NATS publish / subscribe over nats-py.

The client reconnects by itself after a lost connection (every :data:`_RECONNECT_WAIT`
seconds, until the bus is closed) and re-registers every subscription; messages published
meanwhile are lost. While it is disconnected :meth:`NatsBus.publish` raises
:class:`~keygrants.bus.BusError` rather than buffering, so a caller knows a message was not
sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Coroutine
from typing import Any, Final
from urllib.parse import unquote

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription

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

__all__ = ["DEFAULT_PORT", "NatsBus"]

DEFAULT_PORT: Final = 4222
_RECONNECT_WAIT: Final = 1  # seconds between reconnection attempts (nats-py takes whole seconds)
_PING_INTERVAL: Final = 15  # seconds; two unanswered PINGs mark the connection dead
_ROUND_TRIP_TIMEOUT: Final = 10  # seconds for the PING/PONG that confirms a SUB, or a last flush
_CLIENT_NAME: Final = "keygrants-bus"
_CANCEL_RETRY: Final = 0.05  # seconds between cancellations of a connect that did not end

log = logging.getLogger(__name__)


async def _bounded(coro: Coroutine[Any, Any, None], timeout: float) -> None:
    """Run ``coro`` for up to ``timeout`` seconds (TimeoutError after that); when it times out
    or the caller is cancelled, it is cancelled and waited for.

    Unlike ``asyncio.wait_for`` this keeps cancelling until the coroutine has ended: nats-py's
    first connection retries in a loop, and on Python 3.11 a cancellation that arrives as its
    inner ``asyncio.wait_for(open_connection)`` fails is swallowed there, so a single cancel
    could leave the connect (and whoever waits for it) running for good.
    """
    task = asyncio.ensure_future(coro)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    except asyncio.CancelledError:
        await _cancel_and_wait(task)
        raise
    if not done:
        await _cancel_and_wait(task)
        raise TimeoutError
    task.result()


async def _cancel_and_wait(task: asyncio.Future[None]) -> None:
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=_CANCEL_RETRY)
    if not task.cancelled():
        task.exception()  # retrieved: its failure is replaced by the caller's TimeoutError


class _NatsSubscription:
    def __init__(self, bus: NatsBus, sub: NatsSubscription, dispatcher: _Dispatcher) -> None:
        self._bus = bus
        self._sub = sub
        self._dispatcher = dispatcher

    async def unsubscribe(self) -> None:
        if self._dispatcher.stopped and self not in self._bus._subscriptions:
            return
        self._bus._subscriptions.discard(self)
        await self._dispatcher.stop()
        # The connection may be closed or reconnecting: then the server forgets the SUB anyway
        # (closed) or nats-py does not re-register it (reconnecting).
        with contextlib.suppress(nats.errors.Error, OSError):
            await self._sub.unsubscribe()


class NatsBus:
    """A :class:`~keygrants.bus.Bus` on core NATS (no JetStream: at-most-once delivery).

    Args:
        url: ``nats://[user:password@]host[:port]`` or ``nats://token@host[:port]``.
        connect_timeout: seconds :meth:`connect` keeps trying before it gives up.

    Raises:
        ValueError: for a malformed URL.
    """

    def __init__(self, url: str, *, connect_timeout: float = 5.0) -> None:
        parts = _parse_url(url, "nats")
        if parts.path not in ("", "/"):
            raise ValueError("a nats:// URL takes no path")
        if not connect_timeout > 0:
            raise ValueError("connect_timeout must be positive")
        # The user part alone may be a token: keep none of the user info.
        self.url = _redact_url(parts, keep_username=False)
        self.connect_timeout = connect_timeout
        self._server = url
        self._secrets = tuple(unquote(s) for s in (parts.username, parts.password) if s)
        self._nc: Client | None = None
        self._connected_once = False
        self._down = False  # disconnected, nats-py reconnecting
        self._closed = False
        self._connect_lock = asyncio.Lock()
        self._subscriptions: set[_NatsSubscription] = set()

    def __repr__(self) -> str:
        return f"NatsBus({self.url!r})"

    async def connect(self) -> None:
        async with self._connect_lock:
            if self._closed:
                raise BusError(f"the bus {self.url} is closed")
            if self._nc is not None:
                return
            errors: list[Exception] = []
            nc = Client()
            self._connected_once = False

            async def on_error(exc: Exception) -> None:
                if not self._connected_once:
                    errors.append(exc)
                # Each failed reconnection attempt reports here too: the disconnection was
                # logged once already.
                level = logging.WARNING if self._connected_once and not self._down else logging.DEBUG
                log.log(level, "bus %s: %s", self.url, _describe(exc, *self._secrets))

            try:
                # nats-py retries the first connection too (every _RECONNECT_WAIT seconds)
                # when reconnecting is on; wait_for bounds it.
                await _bounded(nc.connect(
                    servers=[self._server], name=_CLIENT_NAME, allow_reconnect=True,
                    max_reconnect_attempts=-1, reconnect_time_wait=_RECONNECT_WAIT,
                    ping_interval=_PING_INTERVAL, max_outstanding_pings=2,
                    connect_timeout=max(1, math.ceil(self.connect_timeout)),
                    error_cb=on_error, disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected, closed_cb=self._on_closed),
                    self.connect_timeout)
            except BaseException as exc:  # a cancelled connect must not leave a client retrying
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(nc.close(), self.connect_timeout)
                if not isinstance(exc, OSError | TimeoutError | nats.errors.Error):
                    raise
                cause = (_describe(errors[-1], *self._secrets) if errors
                         else f"no connection within {self.connect_timeout}s")
                raise BusError(f"cannot connect to {self.url}: {cause}") from exc
            self._connected_once = True
            self._nc = nc

    async def publish(self, subject: str, data: bytes) -> None:
        _check_subject(subject)
        data = _check_message(data)
        nc = self._connection()
        try:
            await nc.publish(subject, data)
        except nats.errors.MaxPayloadError as exc:
            raise ValueError(f"the NATS server at {self.url} takes messages up to "
                             f"{nc.max_payload} bytes") from exc
        except (OSError, nats.errors.Error) as exc:
            raise BusError(f"cannot publish to {self.url}: {_describe(exc, *self._secrets)}") from exc

    async def subscribe(self, subject: str, handler: Handler) -> _NatsSubscription:
        _check_subject(subject)
        nc = self._connection()
        dispatcher = _Dispatcher(subject, handler, bus_url=self.url)

        async def on_message(msg: Msg) -> None:
            dispatcher.offer(msg.data)

        sub: NatsSubscription | None = None
        try:
            sub = await nc.subscribe(subject, cb=on_message)
            await nc.flush(timeout=_ROUND_TRIP_TIMEOUT)  # the server has the SUB once it PONGs
        except BaseException as exc:
            await dispatcher.stop()
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
            if isinstance(exc, OSError | nats.errors.Error):
                raise BusError(f"cannot subscribe on {self.url}: "
                               f"{_describe(exc, *self._secrets)}") from exc
            raise
        subscription = _NatsSubscription(self, sub, dispatcher)
        self._subscriptions.add(subscription)
        return subscription

    async def close(self) -> None:
        self._closed = True
        subscriptions, self._subscriptions = list(self._subscriptions), set()
        for subscription in subscriptions:
            await subscription._dispatcher.stop()
        nc, self._nc = self._nc, None
        if nc is None or nc.is_closed:
            return
        try:
            if nc.is_connected:  # publishes still in the client's buffer go out first
                await nc.flush(timeout=max(1, math.ceil(self.connect_timeout)))
        except (OSError, TimeoutError, nats.errors.Error) as exc:
            log.debug("bus %s: flush before close: %s", self.url, _describe(exc, *self._secrets))
        try:
            await asyncio.wait_for(nc.close(), self.connect_timeout)
        except (OSError, TimeoutError, nats.errors.Error) as exc:
            log.debug("bus %s: close: %s", self.url, _describe(exc, *self._secrets))

    def _connection(self) -> Client:
        if self._closed:
            raise BusError(f"the bus {self.url} is closed")
        nc = self._nc
        if nc is None:
            raise BusError(f"the bus {self.url} is not connected")
        if not nc.is_connected:
            raise BusError(f"the connection to {self.url} is down (reconnecting)")
        return nc

    async def _on_disconnected(self) -> None:
        if not self._closed and self._connected_once:
            self._down = True
            log.warning("bus %s: disconnected from NATS; reconnecting", self.url)

    async def _on_reconnected(self) -> None:
        self._down = False
        log.info("bus %s: reconnected to NATS", self.url)

    async def _on_closed(self) -> None:
        if not self._closed and self._connected_once:
            log.error("bus %s: the NATS connection closed for good", self.url)
