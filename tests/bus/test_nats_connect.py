"""Stopping a NATS connect that is still retrying.

nats-py retries the first connection in a loop, and on Python 3.11 a cancellation that lands
as its inner ``asyncio.wait_for(open_connection)`` fails is swallowed, so one cancel could
leave the connect running for good (and a Verifier's close() waiting for its bus thread). The
first tests use a coroutine that swallows a cancellation, so they do not depend on hitting
that instant; the last one cancels real connects to a port nothing listens on.
"""

from __future__ import annotations

import asyncio
import random
import socket

import pytest

pytestmark = pytest.mark.anyio  # nats-py is a test dependency: no skip when it is missing

@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


BOUND = 5.0  # seconds any of these may take; each ends in milliseconds when it works


class SwallowsACancel:
    """Swallows the first cancellation, as nats-py's retry loop can, then waits for good."""

    def __init__(self) -> None:
        self.swallowed = 0
        self.ended = False

    async def __call__(self) -> None:
        try:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.swallowed += 1
            await asyncio.sleep(3600)
        finally:
            self.ended = True


async def test_a_cancelled_caller_ends_a_connect_that_swallowed_the_first_cancel() -> None:
    from keygrants.bus.nats import _bounded

    inner = SwallowsACancel()
    outer = asyncio.ensure_future(_bounded(inner(), 3600))
    await asyncio.sleep(0.01)
    outer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(outer, BOUND)  # asyncio.wait_for(inner(), ...) would hang here
    assert inner.swallowed == 1 and inner.ended


async def test_a_timed_out_connect_is_ended_even_when_it_swallows_the_cancel() -> None:
    from keygrants.bus.nats import _bounded

    inner = SwallowsACancel()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(_bounded(inner(), 0.05), BOUND)
    assert inner.swallowed == 1 and inner.ended


async def test_the_connects_own_result_and_error_come_through() -> None:
    from keygrants.bus.nats import _bounded

    async def fails() -> None:
        raise OSError("refused")

    async def works() -> None:
        await asyncio.sleep(0)

    with pytest.raises(OSError, match="refused"):
        await _bounded(fails(), BOUND)
    await _bounded(works(), BOUND)


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_cancelling_a_real_connect_to_a_closed_port_always_ends_it() -> None:
    """Cancels at random instants of the retry loop (refused connections, 1 s back-off)."""
    from keygrants.bus.nats import NatsBus

    rng = random.Random(9421)
    before = asyncio.all_tasks()
    for _ in range(40):
        bus = NatsBus(f"nats://127.0.0.1:{closed_port()}", connect_timeout=30)
        attempt = asyncio.ensure_future(bus.connect())
        await asyncio.sleep(rng.uniform(0, 0.03))
        attempt.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(attempt, BOUND)
        await bus.close()
    await asyncio.sleep(0)
    leftovers = asyncio.all_tasks() - before
    assert not leftovers, leftovers
