"""The verifiers while the KMS is slow, hung or down: fetches run in the background, a call
waits only for what it cannot answer without, a cold start uses the KMS as soon as it answers,
and an unreachable bus is logged by both verifiers."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import httpx
import pytest

from keygrants import errors
from keygrants.bus import BusError
from keygrants.client.verifier import JWKS_PATH, REVOCATIONS_PATH, AsyncVerifier, Verifier

from .conftest import FakeKMS

pytestmark = pytest.mark.anyio
#: Seconds a held request waits for its gate to open before failing as on a timeout, and a
#: test for a held request to arrive. Not a timing assertion: it only ends a test that fails
#: (on the old code every call waited for the held fetch itself).
HOLD_LIMIT = 10.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class Gate:
    """FakeKMS's endpoints behind a gate. While it is shut, a request waits at it, as at a KMS
    that accepts connections and does not answer, until it opens; after HOLD_LIMIT it fails as
    on a timeout and is counted in ``gave_up``. While ``down``, a request past the gate fails
    (at once if the gate is open)."""

    def __init__(self, kms: FakeKMS, *, jwks_max_age: int | None = None) -> None:
        self.kms = kms
        self.jwks_max_age = jwks_max_age
        self.down = False
        self.arrived: list[str] = []  # every request's path, served or not
        self.held: list[str] = []  # the paths of the requests waiting now
        self.gave_up = 0
        self._open = threading.Event()
        self._open.set()
        self._changed = threading.Condition()

    def shut(self) -> None:
        self._open.clear()

    def open(self) -> None:
        self._open.set()

    def wait_held(self, count: int) -> list[str]:
        with self._changed:
            self._changed.wait_for(lambda: len(self.held) >= count, HOLD_LIMIT)
            return sorted(self.held)

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self._handle)

    def _handle(self, request: httpx.Request) -> httpx.Response:
        self.arrived.append(request.url.path)
        if not self._open.is_set():
            with self._changed:
                self.held.append(request.url.path)
                self._changed.notify_all()
            opened = self._open.wait(HOLD_LIMIT)
            with self._changed:
                self.held.remove(request.url.path)
                self.gave_up += not opened
            if not opened:
                raise httpx.ReadTimeout("no answer", request=request)
        return self.serve(request)

    def serve(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        response = self.kms._handle(request)
        if request.url.path == JWKS_PATH and self.jwks_max_age is not None:
            response.headers["cache-control"] = f"max-age={self.jwks_max_age}"
        return response


class AsyncGate(Gate):
    """:class:`Gate` for :class:`AsyncVerifier`: a held request waits on the event loop."""

    def __init__(self, kms: FakeKMS, *, jwks_max_age: int | None = None) -> None:
        super().__init__(kms, jwks_max_age=jwks_max_age)
        self._async_open = asyncio.Event()
        self._async_open.set()

    def shut(self) -> None:
        self._async_open.clear()

    def open(self) -> None:
        self._async_open.set()

    async def wait_held_async(self, count: int) -> list[str]:
        deadline = time.monotonic() + HOLD_LIMIT
        while len(self.held) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        return sorted(self.held)

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self._handle_async)

    async def _handle_async(self, request: httpx.Request) -> httpx.Response:
        self.arrived.append(request.url.path)
        if not self._async_open.is_set():
            self.held.append(request.url.path)
            try:
                await asyncio.wait_for(self._async_open.wait(), HOLD_LIMIT)
            except TimeoutError:
                self.gave_up += 1
                raise httpx.ReadTimeout("no answer", request=request) from None
            finally:
                self.held.remove(request.url.path)
        return self.serve(request)


async def fetched(v: AsyncVerifier) -> None:
    """Let the fetches calls started in the background (tasks) end."""
    tasks = [task for task in (v._keys.running(), v._feed.running()) if task is not None]
    if tasks:
        await asyncio.wait(tasks)


def fetched_sync(v: Verifier) -> None:
    """Wait for the fetches calls started in the background (threads) to end."""
    for ended in (v._keys.running(), v._feed.running()):
        if ended is not None:
            assert ended.wait(HOLD_LIMIT), "a fetch never ended"


# -- #1: a hung KMS delays no call while the view is fresh ----------------------------------------

async def test_a_hung_kms_delays_no_call_while_the_view_is_fresh() -> None:
    """A call used to wait for every fetch due, its own or another's (one timeout, then the
    next after a 1 s back-off), with the JWKS fetch and the feed pull one after the other."""
    clock = Clock()
    kms = FakeKMS(clock)
    grant, token = kms.mint(ttl=3600)
    gate = AsyncGate(kms, jwks_max_age=10)
    v = AsyncVerifier("http://kms", audience="svc", poll_interval=5, max_staleness=60,
                      clock=clock, transport=gate.transport())
    assert (await v.verify(token)).grant_id == grant.id  # cold: fetched, and waited for
    gate.shut()
    clock.now += 11  # the JWKS's max-age and the poll interval are up; the view is fresh
    assert (await v.verify(token)).grant_id == grant.id  # starts both fetches, waits for none
    # both are in flight at once (they used to run one after the other)
    assert await gate.wait_held_async(2) == [JWKS_PATH, REVOCATIONS_PATH]
    for _ in range(5):  # while they hang: every call answers from what is held...
        assert (await v.verify(token)).grant_id == grant.id
    assert len(gate.arrived) == 2 + 2  # ...and none starts another fetch
    # a revocation pulled once the KMS answers is enforced
    kms.revoke(grant)
    gate.open()
    await fetched(v)
    with pytest.raises(errors.GrantRevoked):
        await v.verify(token)
    assert gate.gave_up == 0
    await v.aclose()


async def test_failed_fetches_are_retried_in_the_background_until_the_view_goes_stale() -> None:
    clock = Clock()
    kms = FakeKMS(clock)
    grant, token = kms.mint(ttl=3600)
    gate = AsyncGate(kms)
    v = AsyncVerifier("http://kms", audience="svc", poll_interval=5, max_staleness=60,
                      clock=clock, transport=gate.transport())
    await v.verify(token)
    gate.shut()
    clock.now += 5
    await v.verify(token)  # the pull hangs...
    assert await gate.wait_held_async(1) == [REVOCATIONS_PATH]
    gate.down = True
    gate.open()
    await fetched(v)  # ...and fails; it is tried again a second later, hanging again
    gate.down = False
    gate.shut()
    clock.now += 1
    assert (await v.verify(token)).grant_id == grant.id
    assert await gate.wait_held_async(1) == [REVOCATIONS_PATH]
    # past max_staleness (the last complete pull was at +0) a call cannot answer: it waits
    # for the pull in flight, and answers with what it brings
    clock.now += 55
    waiting = asyncio.ensure_future(v.verify(token))
    for _ in range(10):
        await asyncio.sleep(0)
    assert not waiting.done()
    kms.revoke(grant)
    gate.open()
    with pytest.raises(errors.GrantRevoked):
        await waiting
    await v.aclose()


async def test_calls_that_cannot_answer_share_the_fetch_in_flight() -> None:
    """A cold start: every call waits, for one JWKS fetch and one feed pull, side by side."""
    clock = Clock()
    kms = FakeKMS(clock)
    grant, token = kms.mint()
    gate = AsyncGate(kms)
    gate.shut()
    v = AsyncVerifier("http://kms", audience="svc", clock=clock, transport=gate.transport())
    calls = [asyncio.ensure_future(v.verify(token)) for _ in range(5)]
    assert await gate.wait_held_async(2) == [JWKS_PATH, REVOCATIONS_PATH]
    assert not any(call.done() for call in calls)
    gate.open()
    assert [(await call).grant_id for call in calls] == [grant.id] * 5
    assert sorted(gate.arrived) == [JWKS_PATH, REVOCATIONS_PATH]
    await v.aclose()


def test_the_sync_verifier_answers_from_its_view_while_the_kms_hangs() -> None:
    clock = Clock()
    kms = FakeKMS(clock)
    grant, token = kms.mint(ttl=3600)
    gate = Gate(kms, jwks_max_age=10)
    with Verifier("http://kms", audience="svc", poll_interval=5, max_staleness=60, clock=clock,
                  transport=gate.transport()) as v:
        assert v.verify(token).grant_id == grant.id
        gate.shut()
        clock.now += 11
        assert v.verify(token).grant_id == grant.id  # starts both fetches, waits for none
        assert gate.wait_held(2) == [JWKS_PATH, REVOCATIONS_PATH]
        answered: list[str] = []

        def other_caller() -> None:  # another thread, while the fetches hang
            answered.append(v.verify(token).grant_id)

        callers = [threading.Thread(target=other_caller) for _ in range(4)]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join(HOLD_LIMIT)
        assert answered == [grant.id] * 4
        assert len(gate.arrived) == 2 + 2  # no second fetch of either kind
        kms.revoke(grant)
        gate.open()
        fetched_sync(v)
        with pytest.raises(errors.GrantRevoked):
            v.verify(token)
        assert gate.gave_up == 0


def test_the_sync_verifier_waits_only_when_its_view_is_stale() -> None:
    clock = Clock()
    kms = FakeKMS(clock)
    grant, token = kms.mint(ttl=3600)
    gate = Gate(kms)
    with Verifier("http://kms", audience="svc", poll_interval=5, max_staleness=60, clock=clock,
                  transport=gate.transport()) as v:
        v.verify(token)
        gate.shut()
        clock.now += 61
        outcome: list[object] = []
        caller = threading.Thread(target=lambda: outcome.append(v.verify(token).grant_id))
        caller.start()
        assert gate.wait_held(1) == [REVOCATIONS_PATH]
        assert outcome == []  # it waits for the pull (answering would need a fresh view)
        gate.open()
        caller.join(HOLD_LIMIT)
        assert outcome == [grant.id]  # with what the pull brought


def test_a_backlog_is_pulled_in_the_background_while_calls_answer_from_the_view() -> None:
    """A revoke-all of many grants used to make the one verify() that polled next pull the
    whole backlog (seconds), later four pages per call; now one pull in the background takes
    it all, and calls answer from the view held meanwhile. A first pull, which the verifier
    cannot answer without, is waited for."""
    clock = Clock()
    kms = FakeKMS(clock)
    kms.page_size = 2
    for grant, _ in [kms.mint() for _ in range(5)]:
        kms.revoke(grant)
    _, token = kms.mint()
    gate = Gate(kms)
    with Verifier("http://kms", audience="svc", poll_interval=1, clock=clock,
                  transport=gate.transport()) as v:
        v.verify(token)  # the first pull: all three pages, waited for
        assert gate.arrived.count(REVOCATIONS_PATH) == 3
        late = [kms.mint() for _ in range(9)]
        for grant, _ in late:
            kms.revoke(grant)  # five more pages
        gate.shut()
        clock.now += 1
        assert v.verify(late[0][1]).grant_id == late[0][0].id  # not pulled yet
        assert gate.wait_held(1) == [REVOCATIONS_PATH]
        gate.open()
        fetched_sync(v)
        assert gate.arrived.count(REVOCATIONS_PATH) == 3 + 5  # the backlog, in one pull
        for _, revoked in late:
            with pytest.raises(errors.GrantRevoked):
                v.verify(revoked)


# -- #2: a cold start uses the KMS as soon as it answers ------------------------------------------

async def test_a_cold_verifier_uses_the_kms_a_second_after_a_failed_first_fetch() -> None:
    """It refused every call for 10 s (the back-off of a refresh) after a failed first fetch,
    even once the KMS answered again."""
    clock = Clock()
    kms = FakeKMS(clock)
    grant, token = kms.mint()
    gate = AsyncGate(kms)
    gate.down = True  # the KMS is not up yet
    v = AsyncVerifier("http://kms", audience="svc", clock=clock, transport=gate.transport())
    with pytest.raises(errors.VerifierUnavailable, match="no issuer keys yet"):
        await v.verify(token)
    tries = len(gate.arrived)
    for _ in range(3):  # within the second, no call tries again: a down KMS is not hammered
        clock.now += 0.25
        with pytest.raises(errors.VerifierUnavailable):
            await v.verify(token)
    assert len(gate.arrived) == tries == 2
    gate.down = False
    clock.now += 0.25  # a second after the failure
    assert (await v.verify(token)).grant_id == grant.id
    await v.aclose()


def test_a_cold_sync_verifier_uses_the_kms_a_second_after_a_failed_first_fetch() -> None:
    clock = Clock()
    kms = FakeKMS(clock)
    grant, token = kms.mint()
    gate = Gate(kms)
    gate.down = True
    with Verifier("http://kms", audience="svc", clock=clock, transport=gate.transport()) as v:
        with pytest.raises(errors.VerifierUnavailable, match="no issuer keys yet"):
            v.verify(token)
        clock.now += 0.5
        with pytest.raises(errors.VerifierUnavailable):
            v.verify(token)
        assert len(gate.arrived) == 2
        gate.down = False
        clock.now += 0.5
        assert v.verify(token).grant_id == grant.id


async def test_a_verifier_holding_keys_still_backs_off_a_failed_refresh() -> None:
    """The short retry is for a verifier without keys: with keys, a failed refresh (nobody
    waits for it) is tried again after refetch_interval."""
    clock = Clock()
    kms = FakeKMS(clock)
    grant, token = kms.mint(ttl=3600)
    gate = AsyncGate(kms, jwks_max_age=30)
    v = AsyncVerifier("http://kms", audience="svc", max_staleness=3600, poll_interval=600,
                      clock=clock, transport=gate.transport())
    await v.verify(token)
    gate.down = True
    clock.now += 30
    await v.verify(token)
    await fetched(v)
    for _ in range(9):
        clock.now += 1
        assert (await v.verify(token)).grant_id == grant.id
        await fetched(v)
    assert gate.arrived.count(JWKS_PATH) == 2  # the first fetch and the failed refresh
    clock.now += 1
    await v.verify(token)
    await fetched(v)
    assert gate.arrived.count(JWKS_PATH) == 3
    await v.aclose()


# -- #5: an unreachable bus is logged, once, by both verifiers --------------------------------------

class DeadBus:
    """A bus whose broker cannot be reached."""

    url = "dead://broker"

    def __init__(self, attempts: list[float]) -> None:
        self.attempts = attempts

    async def connect(self) -> None:
        self.attempts.append(time.monotonic())
        raise BusError("connection refused")

    async def subscribe(self, subject: str, handler: Any) -> Any:
        raise AssertionError("not connected")

    async def close(self) -> None:
        pass


@pytest.fixture
def dead_bus(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """``dead://`` bus URLs open a :class:`DeadBus`; the list of its connect attempts."""
    from keygrants import bus

    attempts: list[float] = []
    monkeypatch.setitem(bus._FACTORIES, "dead", lambda url, timeout: DeadBus(attempts))
    return attempts


def bus_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "keygrants.verifier" and r.levelno >= logging.WARNING]


async def test_the_async_verifier_logs_an_unreachable_bus_once(
        dead_bus: list[float], caplog: pytest.LogCaptureFixture) -> None:
    """It said nothing (Verifier logs a warning): a wrong bus URL silently fell back to
    poll_interval."""
    clock = Clock()
    kms = FakeKMS(clock)
    _, token = kms.mint(ttl=3600)
    v = AsyncVerifier("http://kms", audience="svc", bus_url="dead://broker", clock=clock,
                      transport=kms.transport())
    with caplog.at_level(logging.WARNING, logger="keygrants.verifier"):
        for _ in range(3):  # three attempts, 5 s apart
            await v.verify(token)
            subscribing = v._subscribing  # None if it ended while the call waited for a fetch
            if subscribing is not None:
                await subscribing
            clock.now += 5
    assert len(dead_bus) == 3
    assert bus_warnings(caplog) == ["revocation bus unavailable (BusError); pulling the feed and "
                                    "trying again every 5 s"]
    await v.aclose()


def test_the_sync_verifier_logs_an_unreachable_bus_the_same_way(
        dead_bus: list[float], caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from keygrants.client import verifier as verifier_module

    monkeypatch.setattr(verifier_module, "_BUS_RETRY", 0.01)
    clock = Clock()
    kms = FakeKMS(clock)
    _, token = kms.mint(ttl=3600)
    with caplog.at_level(logging.WARNING, logger="keygrants.verifier"), \
            Verifier("http://kms", audience="svc", bus_url="dead://broker", clock=clock,
                     transport=kms.transport()) as v:
        v.verify(token)
        deadline = time.monotonic() + HOLD_LIMIT
        while len(dead_bus) < 3:
            assert time.monotonic() < deadline, "the bus was not tried again"
            time.sleep(0.01)
    assert bus_warnings(caplog) == ["revocation bus unavailable (BusError); pulling the feed and "
                                    "trying again every 0.01 s"]
