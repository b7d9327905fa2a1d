"""Pushed revocation messages: what a subscriber makes of a message, including junk (anyone who
can publish on the bus can send one)."""

from __future__ import annotations

import os

import pytest

from keygrants.grants.push import SUBJECT, decode_message, entry_message, heartbeat_message
from keygrants.grants.revocation import RevocationEntry


def test_entries_and_heartbeats_round_trip() -> None:
    entry = RevocationEntry(seq=7, kind="grant", id="g_" + "a" * 26, revoked_at=10, expires_at=20)
    assert decode_message(entry_message(entry)) == entry
    assert decode_message(heartbeat_message(42, 1_800_000_000.5)) == 42


@pytest.mark.parametrize("message", [
    b"[" * 2000 + b"]" * 2000,
    b'{"type":"heartbeat","x":' + b"[" * 1900 + b"]" * 1900 + b"}",
], ids=["array", "member"])
def test_a_message_nested_too_deeply_is_junk_not_an_error(message: bytes) -> None:
    """Under the size limit, yet deep enough to exhaust the JSON parser's recursion: a
    ValueError (ignored by subscribers), never a RecursionError logged with its traceback."""
    assert len(message) <= 4096
    with pytest.raises(ValueError, match="nested too deeply"):
        decode_message(message)


def test_the_verifier_ignores_a_deeply_nested_message() -> None:
    from keygrants.client.verifier import Verifier, _Pushed

    with Verifier("https://kms") as v:
        assert _Pushed.handle(v._state, b"[" * 2000 + b"]" * 2000) is None


def test_failing_heartbeats_are_logged_once_a_minute_not_once_each(caplog) -> None:
    """A bus outage used to log a warning per heartbeat (every second, for as long as it
    lasted)."""
    import asyncio
    import logging

    from keygrants.grants.push import RevocationPublisher

    class DownBus:
        def __init__(self) -> None:
            self.attempts = 0
            self.down = True
            self.sent = asyncio.Event()

        async def connect(self) -> None:
            pass

        async def close(self) -> None:
            pass

        async def publish(self, subject: str, message: bytes) -> None:
            self.attempts += 1
            if self.down:
                raise ConnectionError("bus down")
            self.sent.set()

    async def main() -> DownBus:
        bus = DownBus()
        publisher = RevocationPublisher(bus, lambda: 7, interval=0.001)
        await publisher.start()
        try:
            for _ in range(10_000):
                if bus.attempts >= 30:
                    break
                await asyncio.sleep(0.001)
            bus.down = False
            await asyncio.wait_for(bus.sent.wait(), 30)
        finally:
            await publisher.stop()
        return bus

    with caplog.at_level(logging.WARNING, logger="keygrants.grants.push"):
        bus = asyncio.run(main())
    assert bus.attempts >= 30
    failing = [r for r in caplog.records if "could not push a revocation heartbeat" in r.message]
    assert len(failing) == 1
    assert any("pushed again after" in r.message for r in caplog.records)


@pytest.mark.anyio
async def test_entries_made_durable_together_are_one_push_of_the_newest() -> None:
    """A push is only a trigger (the receiver pulls the feed): a revoke-all's batch of 2,000
    entries used to be 2,000 messages, and subscribers dropped most of them."""
    import asyncio

    from keygrants.bus import open_bus
    from keygrants.grants.push import RevocationPublisher
    from keygrants.grants.revocation import RevocationEntry

    bus_url = f"memory://one-push-{os.urandom(4).hex()}"
    received: list[bytes] = []
    listener = open_bus(bus_url)
    await listener.connect()

    async def on_message(data: bytes) -> None:
        received.append(data)

    await listener.subscribe(SUBJECT, on_message)
    publisher = RevocationPublisher(open_bus(bus_url), lambda: 0, interval=3600)
    await publisher.start()
    try:
        batch = [RevocationEntry(kind="grant", id=f"g{i}", revoked_at=1, expires_at=2, seq=seq)
                 for i, seq in enumerate((7, 9, 8))]
        publisher.publish_entries(batch)
        deadline = asyncio.get_running_loop().time() + 10  # a guard against a hang
        while not any(b'"type":"revocation"' in m for m in received):
            assert asyncio.get_running_loop().time() < deadline, "nothing was pushed"
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # anything else published with it has arrived too
        pushed = [decode_message(m) for m in received if b'"type":"revocation"' in m]
        assert [e.seq for e in pushed] == [9]  # type: ignore[union-attr]
    finally:
        await publisher.stop()
        await listener.close()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
