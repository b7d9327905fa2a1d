"""Revocations pushed on a message bus: the messages, and the publisher a server runs.

Subject ``keygrants.revocations``, JSON messages:

- ``{"type": "revocation", "seq", "kind", "id", "revoked_at", "expires_at", "reason"}``: a
  feed entry, as ``/v1/revocations`` serves it, published as soon as it is durable; of entries
  made durable together (a revoke-all's batch of up to 2,000) only the newest is published:
  the message is a trigger, and the pull it causes fetches them all;
- ``{"type": "heartbeat", "latest": SEQ, "time": UNIX}``: every second, the feed's newest
  sequence number, so a subscriber that missed a push pulls the feed when ``latest`` is ahead
  of what it has seen.

A message is only a trigger: subscribers (verifiers, other nodes) pull the feed from the KMS
or the shared store when one arrives and never apply a message's content, because anyone who
can publish on the bus could forge one. Pub/sub delivery is at most once; the feed is the
record.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

from keygrants.grants.revocation import RevocationEntry

__all__ = ["CHANGES_SUBJECT", "SUBJECT", "RevocationPublisher", "change_message",
           "decode_message", "entry_message", "heartbeat_message"]

SUBJECT: Final = "keygrants.revocations"
#: Changes to keys, aliases, principals, policies or issuer keys, for the other nodes on one
#: store: ``{"type": "change", "what": <what changed>, "node": <random id of the sender>}``;
#: a receiver drops its cached keys, or reads principals, credentials and policies, or the
#: issuer keys again.
CHANGES_SUBJECT: Final = "keygrants.changes"
log = logging.getLogger("keygrants.grants.push")
HEARTBEAT_FAILURE_REPORT: Final = 60.0  # seconds between warnings while heartbeats fail


def entry_message(e: RevocationEntry) -> bytes:
    return json.dumps({"type": "revocation", "seq": e.seq, "kind": e.kind, "id": e.id,
                       "revoked_at": e.revoked_at, "expires_at": e.expires_at,
                       "reason": e.reason}, separators=(",", ":")).encode()


def change_message(what: str, node: str) -> bytes:
    return json.dumps({"type": "change", "what": what, "node": node},
                      separators=(",", ":")).encode()


def heartbeat_message(latest: int, now: float) -> bytes:
    return json.dumps({"type": "heartbeat", "latest": latest, "time": int(now)},
                      separators=(",", ":")).encode()


def decode_message(data: bytes) -> RevocationEntry | int:
    """A pushed entry, or a heartbeat's ``latest``.

    Raises:
        ValueError: for anything else (a subscriber ignores it).
    """
    if len(data) > 4096:
        raise ValueError("message too large")
    try:
        msg: Any = json.loads(data)
    except RecursionError:  # nested too deeply: anyone who can publish could send one
        raise ValueError("message nested too deeply") from None
    if not isinstance(msg, dict):
        raise ValueError("not an object")
    if msg.get("type") == "heartbeat" and isinstance(msg.get("latest"), int):
        return int(msg["latest"])
    if msg.get("type") == "revocation" and msg.get("kind") in ("grant", "principal", "key"):
        return RevocationEntry(seq=int(msg["seq"]), kind=msg["kind"], id=str(msg["id"]),
                               revoked_at=int(msg["revoked_at"]),
                               expires_at=int(msg["expires_at"]),
                               reason=str(msg.get("reason", "revoked")))
    raise ValueError("unknown message")


class RevocationPublisher:
    """Publishes feed entries and heartbeats on a bus from a server's event loop.

    :meth:`publish_entries` may be called from any thread (the revoke use cases run in worker
    threads): it hands the entries to the loop. A bus that is down loses pushes (logged, never
    the message body); subscribers recover from the feed on the next heartbeat.
    """

    def __init__(self, bus: Any, latest: Callable[[], int], *, interval: float = 1.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.bus = bus
        self._latest = latest
        self._interval = interval
        self._clock = clock
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.bus.connect()
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._heartbeats())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])  # never swallows a cancellation of the caller
        await self.bus.close()

    def publish_change(self, what: str, node: str) -> None:
        """Tell the other nodes that ``what`` (an endpoint tag) changed; from the loop."""
        loop = self._loop
        if loop is not None:
            loop.create_task(self._send_to(CHANGES_SUBJECT, [change_message(what, node)]))

    def publish_entries(self, entries: Sequence[RevocationEntry]) -> None:
        """Push the newest of ``entries`` (made durable together): subscribers pull the feed
        on it and get every one. One message per entry used to flood them during a large
        revoke-all (2,000 per batch: "too slow; dropping messages")."""
        loop = self._loop
        if loop is None or not entries:
            return
        messages = [entry_message(max(entries, key=lambda e: e.seq))]
        loop.call_soon_threadsafe(lambda: loop.create_task(self._send(messages)))

    async def _send(self, messages: list[bytes]) -> None:
        await self._send_to(SUBJECT, messages)

    async def _send_to(self, subject: str, messages: list[bytes]) -> None:
        for message in messages:
            try:
                await self.bus.publish(subject, message)
            except Exception as exc:  # the feed is the record; a lost push is recovered
                log.warning("could not push a revocation: %s", type(exc).__name__)

    async def _heartbeats(self) -> None:
        failing_since: float | None = None  # while heartbeats fail: logged once a minute
        failures = 0
        next_report = 0.0
        while True:
            try:
                latest = await asyncio.to_thread(self._latest)
                await self.bus.publish(SUBJECT, heartbeat_message(latest, self._clock()))
                if failing_since is not None:
                    log.warning("revocation heartbeats pushed again after %d failure(s)",
                                failures)
                    failing_since, failures = None, 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                now = time.monotonic()
                failures += 1
                if failing_since is None:
                    failing_since = now
                if now >= next_report:  # one line a minute, not one per heartbeat
                    log.warning("could not push a revocation heartbeat: %s (%d failure(s) so "
                                "far; verifiers fall back to polling)", type(exc).__name__,
                                failures)
                    next_report = now + HEARTBEAT_FAILURE_REPORT
            await asyncio.sleep(self._interval)
