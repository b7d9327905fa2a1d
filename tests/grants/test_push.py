"""Pushed revocation messages: what a subscriber makes of a message, including junk (anyone who
can publish on the bus can send one)."""

from __future__ import annotations

import pytest

from keygrants.grants.push import decode_message, entry_message, heartbeat_message
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
