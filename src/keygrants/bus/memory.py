"""``memory://NAME``: a process-local bus, for tests and single-process setups.

Every :class:`MemoryBus` opened with the same NAME in one process shares messages, across
threads and event loops: each handler runs on the loop that subscribed it.
"""

from __future__ import annotations

import re
import threading
from typing import Final

from keygrants.bus import (
    BusError,
    Handler,
    _check_message,
    _check_subject,
    _Dispatcher,
    _parse_url,
)

__all__ = ["MemoryBus"]

_NAME: Final = re.compile(r"[A-Za-z0-9_.-]+")

# (bus name, subject) -> live subscriptions, shared by every MemoryBus in the process.
_lock = threading.Lock()
_routes: dict[tuple[str, str], list[_Dispatcher]] = {}


def _remove_route(key: tuple[str, str], dispatcher: _Dispatcher) -> None:
    with _lock:
        subscribers = _routes.get(key, [])
        if dispatcher in subscribers:
            subscribers.remove(dispatcher)
        if not subscribers:
            _routes.pop(key, None)


class _MemorySubscription:
    def __init__(self, bus: MemoryBus, key: tuple[str, str], dispatcher: _Dispatcher) -> None:
        self._bus = bus
        self._key = key
        self._dispatcher = dispatcher

    async def unsubscribe(self) -> None:
        _remove_route(self._key, self._dispatcher)
        self._bus._subscriptions.discard(self)
        await self._dispatcher.stop()


class MemoryBus:
    """The in-process bus behind ``memory://NAME`` (NAME: ``[A-Za-z0-9_.-]+``).

    Raises:
        ValueError: for a malformed URL.
    """

    def __init__(self, url: str) -> None:
        parts = _parse_url(url, "memory")
        if parts.path or parts.port is not None or not _NAME.fullmatch(parts.netloc):
            raise ValueError("a memory bus URL is memory://NAME (NAME: letters, digits, _ . -)")
        self.url = url
        self.name = parts.netloc
        self._connected = False
        self._closed = False
        self._subscriptions: set[_MemorySubscription] = set()

    def __repr__(self) -> str:
        return f"MemoryBus({self.url!r})"

    async def connect(self) -> None:
        if self._closed:
            raise BusError(f"the bus {self.url} is closed")
        self._connected = True

    async def publish(self, subject: str, data: bytes) -> None:
        _check_subject(subject)
        data = _check_message(data)
        self._check_usable()
        with _lock:
            subscribers = list(_routes.get((self.name, subject), ()))
        for dispatcher in subscribers:
            dispatcher.offer_threadsafe(data)

    async def subscribe(self, subject: str, handler: Handler) -> _MemorySubscription:
        _check_subject(subject)
        self._check_usable()
        key = (self.name, subject)
        dispatcher = _Dispatcher(subject, handler, bus_url=self.url)
        with _lock:
            _routes.setdefault(key, []).append(dispatcher)
        subscription = _MemorySubscription(self, key, dispatcher)
        self._subscriptions.add(subscription)
        return subscription

    async def close(self) -> None:
        self._closed = True
        self._connected = False
        for subscription in list(self._subscriptions):
            await subscription.unsubscribe()

    def _check_usable(self) -> None:
        if self._closed:
            raise BusError(f"the bus {self.url} is closed")
        if not self._connected:
            raise BusError(f"the bus {self.url} is not connected")
