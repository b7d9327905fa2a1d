"""The message-bus contract, run against every implementation: memory, NATS, Redis.

The NATS and Redis cases use the brokers on 127.0.0.1:4222 and 127.0.0.1:6379; when one is
not reachable (or its client library is missing) they skip locally and fail when ``CI=true``.
The reconnection cases start a broker of their own on a free loopback port. Every test uses a
random subject (and memory bus name), so parallel runs on the shared brokers never cross.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from keygrants import errors
from keygrants.bus import MAX_MESSAGE_BYTES, MAX_SUBJECT_LENGTH, Bus, BusError, Subscription, open_bus

pytestmark = pytest.mark.anyio

WAIT = 30.0  # upper bound of every wait; a healthy run takes a fraction of it
SERVERS = {"nats": ("127.0.0.1", 4222), "redis": ("127.0.0.1", 6379)}
LIBRARIES = {"nats": "nats", "redis": "redis"}  # the module each scheme needs
BINARIES = {"nats": ("/usr/sbin/nats-server", "/usr/bin/nats-server", "/usr/local/bin/nats-server"),
            "redis": ("/usr/bin/redis-server", "/usr/sbin/redis-server", "/usr/local/bin/redis-server")}

MakeBus = Callable[..., Awaitable[Bus]]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# -- helpers --------------------------------------------------------------------------------

def need(condition: object, message: str) -> None:
    """Skip when ``condition`` is false, unless ``CI=true``: then fail (CI must run these)."""
    if condition:
        return
    if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes"):
        pytest.fail(f"{message} (CI=true: the bus tests must run, not skip)", pytrace=False)
    pytest.skip(message)


def need_library(kind: str) -> None:
    need(importlib.util.find_spec(LIBRARIES[kind]),
         f"{LIBRARIES[kind]} is not installed (pip install 'keygrants[{kind}]')")


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), 2):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def eventually(predicate: Callable[[], bool], what: str | Callable[[], str]) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {WAIT}s waiting for {what() if callable(what) else what}")
        await asyncio.sleep(0.01)


class Inbox:
    """A handler that records every message it is given."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []

    async def __call__(self, data: bytes) -> None:
        self.messages.append(data)

    async def wait_for(self, count: int) -> None:
        await eventually(lambda: len(self.messages) >= count, f"{count} messages")


async def flushed(publisher: Bus, subject: str, inbox: Inbox) -> None:
    """Publish a marker and wait until ``inbox`` (subscribed to ``subject``) has it: whatever
    was published before on the publisher's connection has been delivered by then."""
    marker = b"marker-" + secrets.token_bytes(8)
    await publisher.publish(subject, marker)
    await eventually(lambda: marker in inbox.messages, "the marker message")


# -- fixtures -------------------------------------------------------------------------------

@pytest.fixture(params=["memory", "nats", "redis"])
def bus_url(request: pytest.FixtureRequest) -> str:
    """Every implementation; the NATS and Redis ones on the shared brokers."""
    kind: str = request.param
    if kind == "memory":
        return f"memory://t-{secrets.token_hex(8)}"
    need_library(kind)
    host, port = SERVERS[kind]
    need(reachable(host, port), f"{kind} at {host}:{port} is not reachable")
    return f"{kind}://{host}:{port}"


@pytest.fixture
def subject() -> str:
    return f"kg.test.{secrets.token_hex(8)}"


@pytest.fixture
async def buses() -> AsyncIterator[MakeBus]:
    """``await make(url)`` opens and connects a bus; every one is closed at the end."""
    opened: list[Bus] = []

    async def make(url: str, connect_timeout: float = 5.0) -> Bus:
        bus = open_bus(url, connect_timeout=connect_timeout)
        opened.append(bus)
        await asyncio.wait_for(bus.connect(), WAIT)
        return bus

    yield make
    for bus in opened:
        await asyncio.wait_for(bus.close(), WAIT)


# -- delivery -------------------------------------------------------------------------------

async def test_a_subscriber_receives_every_message_exactly_and_in_order(
        bus_url: str, subject: str, buses: MakeBus) -> None:
    subscriber, publisher = await buses(bus_url), await buses(bus_url)
    inbox = Inbox()
    await subscriber.subscribe(subject, inbox)
    sent = [b"", bytes(range(256)), b"\x00\r\n"] + [
        i.to_bytes(2, "big") + os.urandom(i * 7) for i in range(97)]
    for message in sent:
        await publisher.publish(subject, message)
    await inbox.wait_for(len(sent))
    assert inbox.messages == sent
    assert all(type(m) is bytes for m in inbox.messages)


async def test_a_bus_receives_its_own_messages(bus_url: str, subject: str, buses: MakeBus) -> None:
    bus = await buses(bus_url)
    inbox = Inbox()
    await bus.subscribe(subject, inbox)
    await bus.publish(subject, b"to myself")
    await inbox.wait_for(1)
    assert inbox.messages == [b"to myself"]


async def test_every_subscriber_receives_every_message(bus_url: str, subject: str,
                                                       buses: MakeBus) -> None:
    first, second, publisher = await buses(bus_url), await buses(bus_url), await buses(bus_url)
    inboxes = [Inbox(), Inbox(), Inbox()]
    await first.subscribe(subject, inboxes[0])
    await first.subscribe(subject, inboxes[1])  # two on one bus
    await second.subscribe(subject, inboxes[2])
    sent = [b"m%d" % i for i in range(10)]
    for message in sent:
        await publisher.publish(subject, message)
    for inbox in inboxes:
        await inbox.wait_for(len(sent))
        assert inbox.messages == sent


async def test_messages_stay_on_their_subject(bus_url: str, subject: str, buses: MakeBus) -> None:
    subscriber, publisher = await buses(bus_url), await buses(bus_url)
    inbox = Inbox()
    await subscriber.subscribe(subject, inbox)
    await publisher.publish(subject + ".child", b"child")
    await publisher.publish(f"kg.test.{secrets.token_hex(8)}", b"elsewhere")
    await flushed(publisher, subject, inbox)
    assert len(inbox.messages) == 1 and inbox.messages[0].startswith(b"marker-")


async def test_handlers_run_one_at_a_time_on_the_subscribing_loop(
        bus_url: str, subject: str, buses: MakeBus) -> None:
    subscriber, publisher = await buses(bus_url), await buses(bus_url)
    loop = asyncio.get_running_loop()
    active, most, seen = 0, 0, []

    async def handler(data: bytes) -> None:
        nonlocal active, most
        assert asyncio.get_running_loop() is loop
        active += 1
        most = max(most, active)
        await asyncio.sleep(0)  # let a concurrent call in, if there were one
        await asyncio.sleep(0)
        seen.append(data)
        active -= 1

    await subscriber.subscribe(subject, handler)
    sent = [b"%d" % i for i in range(30)]
    for message in sent:
        await publisher.publish(subject, message)
    # (the count in the message says how many arrived, should this ever time out again: a
    # CI run once saw it do so on the shared NATS server, not reproduced in 40 runs since)
    await eventually(lambda: len(seen) == len(sent),
                     lambda: f"30 messages ({len(seen)} arrived: {seen[:3]}…)")
    assert seen == sent and most == 1


async def test_bytes_like_messages_arrive_as_bytes(bus_url: str, subject: str,
                                                   buses: MakeBus) -> None:
    bus = await buses(bus_url)
    inbox = Inbox()
    await bus.subscribe(subject, inbox)
    await bus.publish(subject, bytearray(b"array"))
    await bus.publish(subject, memoryview(b"view"))
    await inbox.wait_for(2)
    assert inbox.messages == [b"array", b"view"]
    with pytest.raises(TypeError):
        await bus.publish(subject, "text")  # type: ignore[arg-type]


# -- unsubscribe, failing handlers, close -----------------------------------------------------

async def test_unsubscribe_stops_delivery(bus_url: str, subject: str, buses: MakeBus) -> None:
    subscriber, publisher = await buses(bus_url), await buses(bus_url)
    inbox, control = Inbox(), Inbox()
    subscription = await subscriber.subscribe(subject, inbox)
    await subscriber.subscribe(subject, control)
    await publisher.publish(subject, b"before")
    await inbox.wait_for(1)
    await subscription.unsubscribe()
    await subscription.unsubscribe()  # idempotent
    await publisher.publish(subject, b"after")
    await flushed(publisher, subject, control)
    assert control.messages[:2] == [b"before", b"after"]
    assert inbox.messages == [b"before"]


async def test_a_handler_may_unsubscribe_itself(bus_url: str, subject: str, buses: MakeBus) -> None:
    subscriber, publisher = await buses(bus_url), await buses(bus_url)
    control, got = Inbox(), []
    mine: list[Subscription] = []

    async def once(data: bytes) -> None:
        got.append(data)
        await mine[0].unsubscribe()

    mine.append(await subscriber.subscribe(subject, once))
    await subscriber.subscribe(subject, control)
    for message in (b"1", b"2", b"3"):
        await publisher.publish(subject, message)
    await flushed(publisher, subject, control)
    assert control.messages[:3] == [b"1", b"2", b"3"]
    assert got == [b"1"]


async def test_a_failing_handler_keeps_its_subscription_and_the_log_keeps_the_body_out(
        bus_url: str, subject: str, buses: MakeBus, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="keygrants")
    subscriber, publisher = await buses(bus_url), await buses(bus_url)
    got: list[bytes] = []

    async def handler(data: bytes) -> None:
        got.append(data)
        if data.startswith(b"boom"):
            raise ValueError(f"cannot parse {data!r}")
        if data == b"cancelled":  # e.g. an inner task of the handler's was cancelled
            raise asyncio.CancelledError

    await subscriber.subscribe(subject, handler)
    sent = [b"one", b"boom TOP-SECRET-BODY", b"two", b"cancelled", b"three"]
    for message in sent:
        await publisher.publish(subject, message)
    await eventually(lambda: len(got) == len(sent), "every message")
    assert got == sent
    failures = [r.getMessage() for r in caplog.records
                if r.levelno == logging.ERROR and subject in r.getMessage()]
    assert len(failures) == 2
    assert "ValueError" in failures[0] and "CancelledError" in failures[1]
    assert "TOP-SECRET-BODY" not in caplog.text


async def test_a_bus_must_be_connected_and_open(bus_url: str, subject: str) -> None:
    bus = open_bus(bus_url)
    with pytest.raises(BusError):
        await bus.publish(subject, b"x")
    with pytest.raises(BusError):
        await bus.subscribe(subject, Inbox())
    await asyncio.wait_for(bus.connect(), WAIT)
    await asyncio.wait_for(bus.connect(), WAIT)  # a no-op when connected
    await bus.publish(subject, b"x")
    await asyncio.wait_for(bus.close(), WAIT)
    await asyncio.wait_for(bus.close(), WAIT)  # idempotent
    with pytest.raises(BusError) as info:
        await bus.publish(subject, b"x")
    assert info.value.code == "bus_unavailable" and info.value.status == 503
    with pytest.raises(BusError):
        await bus.subscribe(subject, Inbox())
    with pytest.raises(BusError):
        await bus.connect()  # a closed bus stays closed


async def test_close_ends_every_subscription(bus_url: str, subject: str, buses: MakeBus) -> None:
    subscriber, publisher = await buses(bus_url), await buses(bus_url)
    inbox, control = Inbox(), Inbox()
    subscription = await subscriber.subscribe(subject, inbox)
    await publisher.subscribe(subject, control)
    await publisher.publish(subject, b"before")
    await inbox.wait_for(1)
    await asyncio.wait_for(subscriber.close(), WAIT)
    await subscription.unsubscribe()  # after close: a no-op
    await publisher.publish(subject, b"after")
    await flushed(publisher, subject, control)
    assert inbox.messages == [b"before"]


# -- limits and validation --------------------------------------------------------------------

async def test_messages_are_limited_to_one_mebibyte(bus_url: str, subject: str,
                                                    buses: MakeBus) -> None:
    subscriber, publisher = await buses(bus_url), await buses(bus_url)
    inbox = Inbox()
    await subscriber.subscribe(subject, inbox)
    largest = os.urandom(MAX_MESSAGE_BYTES)
    with pytest.raises(ValueError, match="limited"):
        await publisher.publish(subject, largest + b"!")
    await publisher.publish(subject, largest)
    await flushed(publisher, subject, inbox)
    assert inbox.messages[0] == largest and len(inbox.messages) == 2


@pytest.mark.parametrize("bad", ["", "a b", "a.*", "a.>", "*", ">", "a..b", ".a", "a.", "ä",
                                 "a/b", "a:b", "x" * (MAX_SUBJECT_LENGTH + 1)])
async def test_subjects_are_validated(bus_url: str, buses: MakeBus, bad: str) -> None:
    bus = await buses(bus_url)
    with pytest.raises(ValueError, match="subject"):
        await bus.publish(bad, b"x")
    with pytest.raises(ValueError, match="subject"):
        await bus.subscribe(bad, Inbox())


async def test_the_longest_subject_works(bus_url: str, buses: MakeBus) -> None:
    bus = await buses(bus_url)
    longest = "kg.t-" + secrets.token_hex(4) + "_" * (MAX_SUBJECT_LENGTH - 13)
    assert len(longest) == MAX_SUBJECT_LENGTH
    inbox = Inbox()
    await bus.subscribe(longest, inbox)
    await bus.publish(longest, b"ok")
    await inbox.wait_for(1)


# -- URLs, connecting, credentials ------------------------------------------------------------

@pytest.mark.parametrize("url", [
    "", "nats", "127.0.0.1:4222", "ftp://127.0.0.1", "http://127.0.0.1:4222", "NATS-X://h",
    "memory://", "memory://a/b", "memory://a b", "memory://a?x=1", "memory://a:1", "memory://u@a",
    "nats://", "nats://:4222", "nats://127.0.0.1:notaport", "nats://127.0.0.1:99999",
    "nats://127.0.0.1:4222/path", "nats://127.0.0.1:4222?x=1", "nats://127.0.0.1#f",
    "redis://", "redis://:secret@", "redis://:secret@127.0.0.1:port", "redis://127.0.0.1:6379/db",
    "redis://127.0.0.1:6379/0/1", "redis://127.0.0.1:6379/0?ssl=true", "redis://127.0.0.1/-1",
])
def test_open_bus_refuses_unknown_schemes_and_malformed_urls(url: str) -> None:
    kind = url.partition("://")[0]
    if kind in LIBRARIES:
        need_library(kind)
    with pytest.raises(ValueError) as info:
        open_bus(url)
    assert "secret" not in str(info.value)


def test_open_bus_refuses_a_non_positive_timeout() -> None:
    for timeout in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="connect_timeout"):
            open_bus("memory://x", connect_timeout=timeout)


@pytest.mark.parametrize(("url", "shown"), [
    ("memory://Name_1.x-y", "memory://Name_1.x-y"),
    ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
    ("nats://user:secret@127.0.0.1:4222", "nats://127.0.0.1:4222"),
    ("nats://secret@127.0.0.1", "nats://127.0.0.1"),  # a token
    ("redis://:secret@127.0.0.1:6379", "redis://127.0.0.1:6379"),
    ("redis://app:secret@[::1]:6380/3", "redis://app@[::1]:6380/3"),
    ("redis://127.0.0.1", "redis://127.0.0.1"),
])
def test_the_url_attribute_has_no_password(url: str, shown: str) -> None:
    kind = url.partition("://")[0]
    if kind in LIBRARIES:
        need_library(kind)
    bus = open_bus(url)
    assert bus.url == shown
    assert "secret" not in repr(bus)


@pytest.mark.parametrize("kind", ["nats", "redis"])
async def test_connecting_to_a_closed_port_raises_bus_error(
        kind: str, caplog: pytest.LogCaptureFixture) -> None:
    need_library(kind)
    caplog.set_level(logging.DEBUG, logger="keygrants")
    password = "pw-" + secrets.token_hex(8)
    user = "user" if kind == "nats" else ""
    bus = open_bus(f"{kind}://{user}:{password}@127.0.0.1:{free_port()}", connect_timeout=1.0)
    with pytest.raises(BusError) as info:
        await asyncio.wait_for(bus.connect(), WAIT)  # a hang would be TimeoutError, not BusError
    assert info.value.code == "bus_unavailable"
    assert bus.url in str(info.value)
    assert password not in str(info.value) and password not in caplog.text
    with pytest.raises(BusError):
        await bus.publish("kg.test", b"x")
    await asyncio.wait_for(bus.close(), WAIT)


async def test_a_refused_redis_password_is_not_repeated(caplog: pytest.LogCaptureFixture) -> None:
    need_library("redis")
    host, port = SERVERS["redis"]
    need(reachable(host, port), f"redis at {host}:{port} is not reachable")
    caplog.set_level(logging.DEBUG, logger="keygrants")
    password = "pw-" + secrets.token_hex(8)
    bus = open_bus(f"redis://:{password}@{host}:{port}", connect_timeout=5.0)
    with pytest.raises(BusError) as info:
        await asyncio.wait_for(bus.connect(), WAIT)
    assert password not in str(info.value) and password not in caplog.text
    await bus.close()


@pytest.mark.parametrize("kind", ["nats", "redis"])
def test_a_missing_client_library_names_the_extra(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    library = LIBRARIES[kind]
    for name in [n for n in sys.modules if n == library or n.startswith(library + ".")] + [library]:
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: the import fails
    monkeypatch.delitem(sys.modules, f"keygrants.bus.{kind}", raising=False)
    with pytest.raises(BusError, match=rf"pip install 'keygrants\[{kind}\]'"):
        open_bus(f"{kind}://127.0.0.1:1")


def test_bus_error_is_a_keygrants_error() -> None:
    assert issubclass(BusError, errors.KeygrantsError)
    assert BusError.__doc__
    rebuilt = errors.error_from_code("bus_unavailable", "down", request_id="r")
    assert isinstance(rebuilt, BusError) and rebuilt.status == 503


# -- the memory bus ---------------------------------------------------------------------------

async def test_memory_buses_share_only_within_one_name(subject: str, buses: MakeBus) -> None:
    name = f"memory://t-{secrets.token_hex(8)}"
    here, same, other = await buses(name), await buses(name), await buses(name + "-other")
    inbox, stranger = Inbox(), Inbox()
    await here.subscribe(subject, inbox)
    await other.subscribe(subject, stranger)
    await same.publish(subject, b"hello")
    await flushed(same, subject, inbox)
    assert inbox.messages[0] == b"hello" and stranger.messages == []


async def test_the_memory_bus_delivers_to_a_subscriber_on_another_thread(subject: str,
                                                                          buses: MakeBus) -> None:
    url = f"memory://t-{secrets.token_hex(8)}"
    ready, done = threading.Event(), threading.Event()
    received: list[bytes] = []
    failures: list[BaseException] = []

    async def subscriber() -> None:
        bus = open_bus(url)
        await bus.connect()
        loop = asyncio.get_running_loop()

        async def handler(data: bytes) -> None:
            assert asyncio.get_running_loop() is loop
            received.append(data)

        await bus.subscribe(subject, handler)
        ready.set()
        deadline = time.monotonic() + WAIT
        while len(received) < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await bus.close()

    def run() -> None:
        try:
            asyncio.run(subscriber())
        except BaseException as exc:
            failures.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert await asyncio.to_thread(ready.wait, WAIT), "the subscriber thread did not start"
    publisher = await buses(url)
    for message in (b"a", b"b", b"c"):
        await publisher.publish(subject, message)
    assert await asyncio.to_thread(done.wait, WAIT), "the subscriber thread did not finish"
    thread.join(WAIT)
    assert failures == [] and received == [b"a", b"b", b"c"]


# -- reconnection, on a broker of the test's own ----------------------------------------------

class Broker:
    """A nats-server or redis-server of the test's own: loopback, free port, temp dir."""

    def __init__(self, kind: str, binary: str, workdir: Path) -> None:
        self.kind = kind
        self.binary = binary
        self.port = free_port()
        self.workdir = workdir
        self.log_path = workdir / f"{kind}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{self.kind}://127.0.0.1:{self.port}"

    def start(self) -> None:
        assert self.proc is None
        if self.kind == "nats":
            argv = [self.binary, "-a", "127.0.0.1", "-p", str(self.port)]
        else:
            argv = [self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
                    "--appendonly", "no", "--dir", str(self.workdir)]
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + WAIT
        while not reachable("127.0.0.1", self.port):
            if self.proc.poll() is not None:
                self.proc = None
                pytest.fail(f"{self.kind} server exited at start:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"{self.kind} server did not listen within {WAIT}s:\n{self.log_tail()}")
            time.sleep(0.05)

    def kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.kill()
            proc.wait(WAIT)

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""


@pytest.fixture(params=[pytest.param("nats", marks=pytest.mark.nats), "redis"])
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Broker]:
    kind: str = request.param
    binary = shutil.which(f"{kind}-server") or next(
        (p for p in BINARIES[kind] if os.access(p, os.X_OK)), None)
    need(binary, f"{kind}-server is not installed")
    need_library(kind)
    assert binary is not None
    server = Broker(kind, binary, tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


async def test_both_sides_reconnect_after_the_broker_restarts(broker: Broker, subject: str,
                                                              buses: MakeBus) -> None:
    subscriber, publisher = await buses(broker.url), await buses(broker.url)
    inbox = Inbox()
    await subscriber.subscribe(subject, inbox)

    async def first_delivery() -> None:
        # a broker just started under load has once taken a while to route the very first
        # message; publish until one arrives (what this test checks comes after)
        while not inbox.messages:
            await publisher.publish(subject, b"before")
            await asyncio.sleep(0.2)

    await asyncio.wait_for(first_delivery(), WAIT)

    broker.kill()

    async def publishing_fails() -> None:
        while True:
            try:
                await publisher.publish(subject, b"lost")
            except BusError:
                return
            await asyncio.sleep(0.05)

    await asyncio.wait_for(publishing_fails(), WAIT)  # it says so rather than buffering or hanging

    broker.start()

    async def delivered_again() -> None:
        attempt = 0
        while not any(m.startswith(b"after-") for m in inbox.messages):
            attempt += 1
            with contextlib.suppress(BusError):  # until the publisher has reconnected
                await publisher.publish(subject, b"after-%d" % attempt)
            await asyncio.sleep(0.1)

    await asyncio.wait_for(delivered_again(), WAIT)
    assert inbox.messages[0] == b"before"
