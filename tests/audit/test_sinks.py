"""Secondary audit sinks: the shipper's at-least-once delivery, JSONL files, NATS JetStream.

One contract suite runs against every sink (memory, JSONL file, NATS). The NATS cases start
their own ``nats-server`` (JetStream, temp store dir) on a free loopback port and never touch
the one on 4222; a missing nats-server or nats-py skips them locally and fails them when
``CI=true``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from keygrants.audit.events import decode_event
from keygrants.audit.log import AuditLog
from keygrants.audit.note import NoteSigner
from keygrants.audit.sinks import (
    AuditSink,
    JsonlFileSink,
    MemorySink,
    NatsSink,
    Shipper,
    SinkEvent,
    open_sink,
)
from keygrants.crypto import SigningKey

ORIGIN = "test.log"
WAIT = 30.0  # upper bound of every wait; a healthy run takes a fraction of it
NATS_CANDIDATES = ("/usr/sbin/nats-server", "/usr/bin/nats-server", "/usr/local/bin/nats-server")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# -- helpers --------------------------------------------------------------------------------

def need(condition: object, message: str) -> None:
    """Skip when ``condition`` is false, unless ``CI=true``: then fail (CI must run these)."""
    if condition:
        return
    if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes"):
        pytest.fail(f"{message} (CI=true: the NATS sink tests must run, not skip)", pytrace=False)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def eventually(predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
def make_log(tmp_path: Path) -> Iterator[Callable[[], AuditLog]]:
    """Opens the AuditLog on ``tmp_path/audit.db`` (again, after a close: a restart)."""
    signer = NoteSigner(ORIGIN, SigningKey.generate("ed25519"))
    opened: list[AuditLog] = []

    def make() -> AuditLog:
        log = AuditLog(tmp_path / "audit.db", signer=signer, origin=ORIGIN, checkpoint_interval=0.2)
        opened.append(log)
        return log

    yield make
    for log in opened:
        log.close()


def append(log: AuditLog, n: int) -> list[int]:
    return [log.append({"type": "t.x", "result": "ok", "request_id": f"r{log.size}"})
            for _ in range(n)]


def shipper(log: AuditLog, sink: AuditSink, **kw: Any) -> Shipper:
    options: dict[str, Any] = {"poll_interval": 0.02, "min_backoff": 0.05, "max_backoff": 0.5}
    return Shipper(log, sink, **(options | kw))


async def caught_up(log: AuditLog, sink: AuditSink, timeout: float = WAIT) -> None:
    await eventually(lambda: log.get_cursor(sink.name) == log.size,
                     f"sink {sink.name} to deliver {log.size} events", timeout)


def log_events(log: AuditLog) -> list[bytes]:
    return [data for _, data, _ in log.iter_events()]


# -- nats-server ----------------------------------------------------------------------------

class NatsServer:
    """A nats-server with JetStream of the test's own: loopback, free port, temp store."""

    def __init__(self, binary: str, port: int, store_dir: Path) -> None:
        self.binary = binary
        self.port = port
        self.store_dir = store_dir
        self.log_path = store_dir.parent / "nats-server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        assert self.proc is None
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                [self.binary, "-a", "127.0.0.1", "-p", str(self.port), "-js",
                 "-sd", str(self.store_dir)], stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + WAIT
        while True:
            if self.proc.poll() is not None:
                self.proc = None
                pytest.fail(f"nats-server exited at start:\n{self.log_tail()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                return
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"nats-server did not listen within {WAIT}s:\n{self.log_tail()}")
            time.sleep(0.05)

    def stop(self) -> None:
        """A graceful stop (SIGTERM), killed if it does not finish in time."""
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)  # in case it was frozen
            proc.kill()
            proc.wait(10)

    def freeze(self) -> None:
        """SIGSTOP: connections stay open, nothing is answered (a hung broker)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    binary = shutil.which("nats-server") or next(
        (p for p in NATS_CANDIDATES if os.access(p, os.X_OK)), None)
    need(binary, "nats-server is not installed (apt-get install nats-server)")
    need(importlib.util.find_spec("nats"), "nats-py is not installed (pip install 'keygrants[nats]')")
    assert binary is not None
    (tmp_path / "nats").mkdir()
    server = NatsServer(binary, free_port(), tmp_path / "nats")
    server.start()
    try:
        yield server
    finally:
        server.kill()


@dataclass
class Received:
    """A message read back from the stream."""

    msg_id: str | None
    data: bytes


async def read_stream(url: str, stream: str = "KEYGRANTS_AUDIT",
                      subject: str = "keygrants.audit") -> list[Received]:
    """Everything in the stream, in stream order, through an ephemeral pull consumer."""
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    nc = await asyncio.wait_for(nats.connect(url, connect_timeout=5, allow_reconnect=False,
                                             max_reconnect_attempts=1), WAIT)
    try:
        js = nc.jetstream(timeout=5)
        deadline = time.monotonic() + WAIT
        while True:  # just after a restart JetStream may still be recovering the stream
            try:
                info = await js.stream_info(stream)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        sub = await js.pull_subscribe(subject, stream=stream, config=ConsumerConfig(
            ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL))
        received: list[Received] = []
        while len(received) < info.state.messages:
            msgs = await sub.fetch(batch=500, timeout=5)
            received += [Received((m.headers or {}).get("Nats-Msg-Id"), m.data) for m in msgs]
        with contextlib.suppress(nats.errors.TimeoutError):  # nothing more than the count said
            received += [Received(None, m.data) for m in await sub.fetch(batch=1, timeout=0.3)]
        await sub.unsubscribe()
        return received
    finally:
        await nc.close()


def assert_once_in_order(received: list[Received], log: AuditLog) -> None:
    seqs = [decode_event(r.data).seq for r in received]
    assert seqs == list(range(log.size)), "every sequence number exactly once, in order"
    assert [r.data for r in received] == log_events(log)
    assert [r.msg_id for r in received] == [f"{ORIGIN}:{s}" for s in seqs]


# -- the contract suite: memory, JSONL file, NATS ------------------------------------------

@dataclass
class SinkCase:
    """One sink implementation: ``make()`` opens it on the same destination every time (as a
    restarted server would); ``read()`` returns the canonical bytes that arrived, in order."""

    make: Callable[[], AuditSink]
    read: Callable[[], Awaitable[list[bytes]]]


def read_jsonl(path: Path, backups: int) -> list[bytes]:
    files = [path.with_name(f"{path.name}.{i}") for i in range(backups, 0, -1)] + [path]
    lines: list[bytes] = []
    for f in files:
        if f.exists():
            data = f.read_bytes()
            assert not data or data.endswith(b"\n")
            lines += data.splitlines()
    return lines


@pytest.fixture(params=["memory", "file", pytest.param("nats", marks=pytest.mark.nats)])
def sink_case(request: pytest.FixtureRequest, tmp_path: Path) -> SinkCase:
    if request.param == "memory":
        memory = MemorySink()

        async def read_memory() -> list[bytes]:
            return [e.data for e in memory.events]

        return SinkCase(lambda: memory, read_memory)
    if request.param == "file":
        path = tmp_path / "out" / "audit.jsonl"

        async def read_file() -> list[bytes]:
            return read_jsonl(path, 5)

        return SinkCase(lambda: JsonlFileSink(path, max_bytes=4000), read_file)  # rotates
    server: NatsServer = request.getfixturevalue("nats_server")

    async def read_nats() -> list[bytes]:
        return [r.data for r in await read_stream(server.url)]

    return SinkCase(lambda: NatsSink(server.url), read_nats)


@pytest.mark.anyio
async def test_delivers_every_event_once_in_order(sink_case: SinkCase,
                                                  make_log: Callable[[], AuditLog]) -> None:
    log = make_log()
    append(log, 25)  # before the shipper starts
    sink = sink_case.make()
    s = shipper(log, sink, batch_size=7).start()
    for _ in range(25):  # while it runs, from the event loop like a request would
        await log.submit({"type": "t.x", "result": "ok"})
        await asyncio.sleep(0.001)
    await caught_up(log, sink)
    await s.stop()
    assert await sink_case.read() == log_events(log)
    assert [decode_event(d).seq for d in await sink_case.read()] == list(range(50))


@pytest.mark.anyio
async def test_resumes_from_the_cursor_after_a_restart(sink_case: SinkCase,
                                                       make_log: Callable[[], AuditLog]) -> None:
    log = make_log()
    append(log, 10)
    first = shipper(log, sink_case.make()).start()
    await caught_up(log, first.sink)
    await first.stop()
    log.close()

    log = make_log()  # a new process on the same audit.db
    assert log.get_cursor(first.sink.name) == 10
    append(log, 10)
    second = shipper(log, sink_case.make()).start()
    await caught_up(log, second.sink)
    await second.stop()
    assert [decode_event(d).seq for d in await sink_case.read()] == list(range(20))


@pytest.mark.anyio
async def test_stop_delivers_what_is_durable(sink_case: SinkCase,
                                             make_log: Callable[[], AuditLog]) -> None:
    log = make_log()
    sink = sink_case.make()
    s = shipper(log, sink, poll_interval=3600.0).start()  # stop() must not wait out the poll
    await asyncio.sleep(0.05)
    append(log, 5)
    await s.stop(timeout=WAIT)
    assert log.get_cursor(sink.name) == 5
    assert len(await sink_case.read()) == 5


# -- the shipper ------------------------------------------------------------------------------

@pytest.mark.anyio
async def test_a_failing_sink_never_blocks_appends_and_catches_up(
        make_log: Callable[[], AuditLog], caplog: pytest.LogCaptureFixture) -> None:
    log = make_log()
    sink = MemorySink()
    sink.failing = True
    s = shipper(log, sink).start()
    with caplog.at_level(logging.INFO, logger="keygrants.audit.sinks"):
        seqs = [await log.submit({"type": "t.x", "result": "ok"}) for _ in range(20)]
        assert seqs == list(range(20))
        await eventually(lambda: any("delivery failed" in r.getMessage() for r in caplog.records),
                         "a warning about the failing sink")
        assert log.get_cursor(sink.name) == 0
        assert sink.events == []
        assert s.failures >= 1
        sink.failing = False
        await caught_up(log, sink)
        await eventually(lambda: s.failures == 0, "the shipper to count itself healthy")
        assert any("delivering again" in r.getMessage() for r in caplog.records)
    await s.stop()
    assert [e.seq for e in sink.events] == list(range(20))


def test_backoff_doubles_up_to_the_cap(make_log: Callable[[], AuditLog]) -> None:
    s = Shipper(make_log(), MemorySink(), min_backoff=0.1, max_backoff=3.0)
    assert [s.backoff(n) for n in (1, 2, 3, 4, 5, 6, 1000)] == [0.1, 0.2, 0.4, 0.8, 1.6, 3.0, 3.0]


class HangingSink(MemorySink):
    async def deliver(self, origin: str, events: Any) -> None:
        await asyncio.Event().wait()


class CancellingSink(MemorySink):
    """Raises CancelledError once, as a client library may for its own reasons."""

    async def deliver(self, origin: str, events: Any) -> None:
        if not self.deliveries:
            self.deliveries += 1
            raise asyncio.CancelledError
        await super().deliver(origin, events)


class SwallowingSink(MemorySink):
    """Hangs; when cancelled, swallows the cancellation and fails instead (as nats-py's
    connect can on Python 3.11)."""

    async def deliver(self, origin: str, events: Any) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise ConnectionError("cannot connect") from None


@pytest.mark.anyio
async def test_stop_ends_when_the_sink_swallows_the_cancellation(
        make_log: Callable[[], AuditLog]) -> None:
    log = make_log()
    append(log, 3)
    sink = SwallowingSink()
    s = shipper(log, sink, min_backoff=0.05, max_backoff=0.05).start()
    await asyncio.sleep(0.1)
    stopping = asyncio.ensure_future(s.stop(timeout=0.2))
    done, _ = await asyncio.wait({stopping}, timeout=WAIT)  # wait_for would wait for good
    assert done, "stop() did not end: the shipper went on retrying"
    assert log.get_cursor(sink.name) == 0


@pytest.mark.anyio
async def test_a_cancelled_error_from_a_sink_is_a_failure_not_the_end(
        make_log: Callable[[], AuditLog]) -> None:
    log = make_log()
    append(log, 3)
    sink = CancellingSink()
    s = shipper(log, sink).start()
    await caught_up(log, sink)
    await s.stop()
    assert [e.seq for e in sink.events] == [0, 1, 2]


@pytest.mark.anyio
async def test_stop_is_bounded_when_the_sink_hangs(make_log: Callable[[], AuditLog]) -> None:
    log = make_log()
    append(log, 3)
    sink = HangingSink()
    s = shipper(log, sink).start()
    await asyncio.sleep(0.1)
    await asyncio.wait_for(s.stop(timeout=0.2), WAIT)
    assert log.get_cursor(sink.name) == 0  # not acknowledged: shipped again after a restart


def test_shipper_rejects_bad_settings(make_log: Callable[[], AuditLog]) -> None:
    log = make_log()
    for kw in ({"batch_size": 0}, {"poll_interval": 0}, {"min_backoff": 0},
               {"min_backoff": 2.0, "max_backoff": 1.0}):
        with pytest.raises(ValueError):
            Shipper(log, MemorySink(), **kw)


# -- JSONL files ------------------------------------------------------------------------------

@pytest.mark.anyio
async def test_jsonl_rotates_by_size_and_keeps_backups(tmp_path: Path,
                                                       make_log: Callable[[], AuditLog]) -> None:
    log = make_log()
    append(log, 40)
    limit = 3 * max(len(d) + 1 for d in log_events(log))  # three lines a file
    path = tmp_path / "out" / "audit.jsonl"
    sink = JsonlFileSink(path, max_bytes=limit, backups=2)
    s = shipper(log, sink, batch_size=8).start()
    await caught_up(log, sink)
    await s.stop()
    names = sorted(p.name for p in path.parent.iterdir())
    assert names == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    for p in path.parent.iterdir():
        assert p.stat().st_size <= limit
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
    kept = read_jsonl(path, 2)
    seqs = [json.loads(x)["seq"] for x in kept]
    assert seqs == list(range(40 - len(seqs), 40))  # the newest, contiguous, in order
    assert len(seqs) == 3 + 3 + 1  # two full backups and the current file (40 = 13 * 3 + 1)
    assert kept == log_events(log)[-len(kept):]


@pytest.mark.anyio
async def test_jsonl_cuts_a_partial_last_line(tmp_path: Path,
                                              make_log: Callable[[], AuditLog]) -> None:
    log = make_log()
    append(log, 4)
    path = tmp_path / "audit.jsonl"
    sink = JsonlFileSink(path)
    await sink.deliver(ORIGIN, [SinkEvent(0, log_events(log)[0])])
    await sink.close()
    with path.open("ab") as f:  # a crash in the middle of the next line
        f.write(log_events(log)[1][:17])
    await JsonlFileSink(path).deliver(ORIGIN, [SinkEvent(i, d) for i, d in
                                               enumerate(log_events(log)) if i])
    assert path.read_bytes().splitlines() == log_events(log)


@pytest.mark.anyio
async def test_jsonl_a_failed_write_leaves_nothing_to_repeat(
        tmp_path: Path, make_log: Callable[[], AuditLog], monkeypatch: pytest.MonkeyPatch) -> None:
    log = make_log()
    append(log, 6)
    path = tmp_path / "audit.jsonl"
    sink = JsonlFileSink(path)
    s = shipper(log, sink, batch_size=3)
    real_fsync = os.fsync
    calls = {"n": 0}

    def flaky_fsync(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # the second batch's fsync: a full disk, say
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr("keygrants.audit.sinks.os.fsync", flaky_fsync)
    s.start()
    await caught_up(log, sink)
    await s.stop()
    assert path.read_bytes().splitlines() == log_events(log)
    assert calls["n"] >= 3


def test_jsonl_rejects_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        JsonlFileSink(tmp_path / "a", max_bytes=0)
    with pytest.raises(ValueError, match="backups"):
        JsonlFileSink(tmp_path / "a", backups=0)


# -- opening by URI ---------------------------------------------------------------------------

def test_open_sink_by_uri(tmp_path: Path) -> None:
    f = open_sink(f"file://{tmp_path}/a%20b.jsonl?max_bytes=4096&backups=3")
    assert isinstance(f, JsonlFileSink)
    assert (f.path, f.max_bytes, f.backups) == (tmp_path / "a b.jsonl", 4096, 3)
    assert f.name == f"file://{tmp_path}/a b.jsonl"
    assert open_sink(f"file://{tmp_path}/x.jsonl?name=archive").name == "archive"
    d = open_sink(f"file://{tmp_path}/d.jsonl")
    assert isinstance(d, JsonlFileSink)
    assert (d.max_bytes, d.backups) == (100 * 1024 * 1024, 5)


@pytest.mark.parametrize("uri", [
    "ftp://x/y", "audit.jsonl", "file://host/x.jsonl", "file:///x.jsonl?backups=two",
    "file:///x.jsonl?colour=red", "file:///x.jsonl?backups=1&backups=2", "file:///x.jsonl?backups=0",
    # a relative path (it landed wherever the server was started), a directory
    "file:relative.jsonl", "file:./audit.jsonl", "file:///var/log/keygrants/",
])
def test_open_sink_rejects_bad_file_uris(uri: str) -> None:
    with pytest.raises(ValueError):
        open_sink(uri)


def test_open_sink_nats(tmp_path: Path) -> None:
    need(importlib.util.find_spec("nats"), "nats-py is not installed")
    n = open_sink("nats://alice:s3cret@nats.internal:4333?stream=AUDIT_B&subject=audit.b")
    assert isinstance(n, NatsSink)
    assert (n.stream, n.subject) == ("AUDIT_B", "audit.b")
    assert n.name == "nats://nats.internal:4333/AUDIT_B"
    default = open_sink("nats://127.0.0.1")
    assert isinstance(default, NatsSink)
    assert (default.name, default.stream, default.subject) == (
        "nats://127.0.0.1:4222/KEYGRANTS_AUDIT", "KEYGRANTS_AUDIT", "keygrants.audit")
    for bad in ("nats://h?stream=a.b", "nats://h?subject=audit.*", "nats://h/path",
                "nats://h?ack_timeout=-1", "nats://h:99999", "nats://"):
        with pytest.raises(ValueError):
            open_sink(bad)
    with pytest.raises(ValueError) as err:
        open_sink("redis://bob:hunter2@h")
    assert "hunter2" not in str(err.value)


@pytest.mark.anyio
async def test_nats_warnings_never_show_credentials(
        make_log: Callable[[], AuditLog], caplog: pytest.LogCaptureFixture) -> None:
    need(importlib.util.find_spec("nats"), "nats-py is not installed")
    log = make_log()
    append(log, 2)
    sink = NatsSink(f"nats://alice:s3cret@127.0.0.1:{free_port()}", connect_timeout=0.5)
    s = shipper(log, sink).start()
    with caplog.at_level(logging.DEBUG):
        await eventually(lambda: any("delivery failed" in r.getMessage() for r in caplog.records),
                         "a delivery failure to be logged")
        await s.stop(timeout=0.5)
    assert caplog.records
    assert not any("s3cret" in r.getMessage() for r in caplog.records)
    assert log.get_cursor(sink.name) == 0


# -- NATS: dedupe and the outage ------------------------------------------------------------

@pytest.mark.nats
@pytest.mark.anyio
async def test_nats_drops_resent_events(nats_server: NatsServer,
                                        make_log: Callable[[], AuditLog]) -> None:
    """A cursor write lost after JetStream acknowledged (a crash in between): the events go
    out again with the same message ids, and JetStream keeps one copy."""
    log = make_log()
    append(log, 30)
    sink = NatsSink(nats_server.url)
    s = shipper(log, sink).start()
    await caught_up(log, sink)
    await s.stop()
    log.set_cursor(sink.name, 5)
    again = NatsSink(nats_server.url)
    s = shipper(log, again).start()
    await caught_up(log, again)
    await s.stop()
    assert_once_in_order(await read_stream(nats_server.url), log)


@pytest.mark.nats
@pytest.mark.anyio
@pytest.mark.parametrize("how", ["terminate", "kill", "freeze"])
async def test_nats_outage_every_event_arrives_exactly_once(
        how: str, nats_server: NatsServer, make_log: Callable[[], AuditLog]) -> None:
    """NATS goes away (stopped, killed, or frozen with publishes unanswered: their acks are
    lost but they may still be stored) while audited requests keep coming; once it is back,
    every event is in the stream exactly once, in order."""
    down, up = {"terminate": (nats_server.stop, nats_server.start),
                "kill": (nats_server.kill, nats_server.start),
                "freeze": (nats_server.freeze, nats_server.thaw)}[how]
    log = make_log()
    sink = NatsSink(nats_server.url, connect_timeout=1.0, ack_timeout=1.0)
    s = shipper(log, sink, batch_size=20).start()
    appended: list[int] = []
    running = True

    async def requests() -> None:  # audited requests, all along: before, during, after
        while running:
            appended.extend(await asyncio.gather(
                *(log.submit({"type": "t.x", "result": "ok"}) for _ in range(5))))
            await asyncio.sleep(0.002)

    traffic = asyncio.create_task(requests())
    try:
        await eventually(lambda: (s.cursor or 0) >= 100, "events shipped before the outage")
        await asyncio.to_thread(down)
        stopped_at = log.size
        await eventually(lambda: log.size >= stopped_at + 500, "appends during the outage")
        shipped_during = s.cursor or 0
        await eventually(lambda: s.failures >= 2, "deliveries failing during the outage")
        assert (s.cursor or 0) == shipped_during, "nothing is acknowledged while NATS is down"
        await asyncio.to_thread(up)
        await eventually(lambda: (s.cursor or 0) > stopped_at + 500, "shipping after the restart")
    finally:
        running = False
        await asyncio.wait_for(traffic, WAIT)
    assert appended == list(range(len(appended)))  # every request got its durable event
    await caught_up(log, sink)
    await s.stop()
    assert_once_in_order(await read_stream(nats_server.url), log)


# -- the server -------------------------------------------------------------------------------

async def _run_lifespan(app: Any, during: Callable[[], Awaitable[None]]) -> None:
    """Drive the ASGI lifespan protocol: startup, ``during()``, shutdown."""
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    started = asyncio.Event()
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "lifespan.startup.complete":
            started.set()

    await inbox.put({"type": "lifespan.startup"})
    task = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}}, inbox.get, send))
    await asyncio.wait_for(started.wait(), WAIT)
    await during()
    await inbox.put({"type": "lifespan.shutdown"})
    await asyncio.wait_for(task, WAIT)
    assert sent[-1]["type"] == "lifespan.shutdown.complete"


@pytest.mark.anyio
async def test_the_server_ships_to_its_audit_sinks(tmp_path: Path) -> None:
    from keygrants.server import ServerConfig, build_server

    out = tmp_path / "sink" / "audit.jsonl"
    built = build_server(ServerConfig(data_dir=tmp_path / "data", scheduler_interval=3600,
                                      audit_sinks=[f"file://{out}"]))

    async def during() -> None:
        await eventually(lambda: out.exists() and out.stat().st_size > 0, "server.start shipped")

    await _run_lifespan(built.app, during)
    types = [json.loads(line)["type"] for line in out.read_bytes().splitlines()]
    assert types[0] == "server.start"
    assert types[-1] == "server.stop"  # stopping drains what is durable


def test_server_cli_takes_audit_sinks_and_rejects_bad_ones(tmp_path: Path) -> None:
    from keygrants.cli import main

    help_text = CliRunner().invoke(main, ["server", "--help"]).output
    assert "--audit-sink URI" in help_text
    result = CliRunner().invoke(main, ["server", "--data-dir", str(tmp_path / "d"),
                                       "--listen", f"127.0.0.1:{free_port()}",
                                       "--audit-sink", "file:///tmp/x.jsonl?backups=0"])
    assert result.exit_code == 2
    assert "backups" in result.output
    assert not (tmp_path / "d").exists()  # refused before touching anything


def test_file_sinks_on_a_shared_log_are_named_per_node(tmp_path: Path) -> None:
    """On a PostgreSQL store the nodes share the log and its sink cursors; a file is one
    node's own, so its cursor is too (a node that was down resumed from another node's
    position and its own file had a gap)."""
    from keygrants.server import per_node_file_sinks

    default, named = JsonlFileSink(tmp_path / "a.jsonl"), JsonlFileSink(tmp_path / "b.jsonl", name="mine")
    other = MemorySink()
    per_node_file_sinks([default, named, other], "node-7")
    assert default.name == f"file://node-7{tmp_path / 'a.jsonl'}"
    assert (named.name, other.name) == ("mine", "memory")
