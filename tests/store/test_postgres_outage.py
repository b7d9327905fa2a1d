"""The PostgreSQL store (and the audit log beside it) when the database stops answering:
calls end with ``StoreError`` within their deadline, inserts queued during an outage fail
rather than wait their turn, service follows the database back, and closing never hangs.

A loopback TCP proxy between the store and PostgreSQL on 127.0.0.1:5432 simulates the
outages: ``hang`` stops forwarding without closing anything (a stalled disk, a black-holed
network), ``cut`` closes every connection and refuses new ones. Needs PostgreSQL (skipped
without it, except in CI). The outcomes are asserted (an error, a thread that ended within a
generous join), never a duration."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from keygrants.audit.note import NoteSigner
from keygrants.audit.pglog import PostgresAuditLog
from keygrants.crypto import SigningKey
from keygrants.errors import AuditUnavailable, KeygrantsError, StoreError
from keygrants.grants.model import Grant, new_grant_id
from keygrants.store import postgres
from keygrants.store.postgres import OPERATION_TIMEOUT, PostgresStore

# How long a thread gets before the test calls it stuck: well past every deadline of the
# fixed code, far below the hang the unfixed code waits for (the whole outage).
JOIN = OPERATION_TIMEOUT + 10


class Proxy:
    """Forwards 127.0.0.1:<port> to PostgreSQL; ``hang()``, ``cut()`` and ``up()`` switch."""

    def __init__(self, target: tuple[str, int]) -> None:
        self._target = target
        self._mode = "up"
        self._cond = threading.Condition()
        self._socks: set[socket.socket] = set()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port: int = self._listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self._mode == "cut":
                client.close()
                continue
            try:
                server = socket.create_connection(self._target, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._cond:
                self._socks.update((client, server))
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                with self._cond:
                    while self._mode == "hang":
                        self._cond.wait()
                    if self._mode == "cut":
                        break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def _set(self, mode: str) -> None:
        with self._cond:
            self._mode = mode
            if mode == "cut":
                for s in self._socks:
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_RDWR)
                self._socks.clear()
            self._cond.notify_all()

    def up(self) -> None:
        self._set("up")

    def hang(self) -> None:
        self._set("hang")

    def cut(self) -> None:
        self._set("cut")

    def close(self) -> None:
        self.cut()  # ends every stuck call (of a version that has no deadline, too)
        self._closed = True
        self._listener.close()


@pytest.fixture
def proxy(postgres_url: str) -> Iterator[Proxy]:
    p = Proxy(("127.0.0.1", 5432))
    yield p
    p.close()


def through(url: str, proxy: Proxy) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"postgres@127.0.0.1:{proxy.port}"))


@pytest.fixture
def store(postgres_url: str, proxy: Proxy) -> Iterator[PostgresStore]:
    s = PostgresStore(through(postgres_url, proxy), min_connections=1, max_connections=2)
    yield s
    s.close()


def grant() -> Grant:
    return Grant(id=new_grant_id(), key_id="k1", grantee="svc", operations=("decrypt",),
                 issuer="admin", created_at=100, not_before=100, expires_at=10**10, max_uses=5)


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[BaseException | object]]:
    """Run ``fn`` in a daemon thread; its outcome (result or exception) lands in the list."""
    outcome: list[BaseException | object] = []

    def run() -> None:
        try:
            outcome.append(fn())
        except BaseException as exc:
            outcome.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, outcome


def test_calls_fail_with_store_error_while_postgresql_hangs(store: PostgresStore,
                                                            proxy: Proxy) -> None:
    g = grant()
    store.create_grant(g)
    proxy.hang()
    # a read (what /readyz does), a limited grant's use, an insert: each ends, with StoreError
    calls: list[Callable[[], Any]] = [lambda: store.get_meta("root_key"),
                                      lambda: store.consume_grant_use(g.id, 200),
                                      lambda: store.create_grant(grant())]
    for call in calls:
        t, outcome = in_thread(call)
        t.join(JOIN)
        assert not t.is_alive(), "the call still waits on the hung database"
        assert isinstance(outcome[0], StoreError), outcome
    proxy.up()
    # once PostgreSQL answers again, so does the store (the probe goes through)
    deadline = time.monotonic() + JOIN
    while True:
        try:
            assert store.get_grant(g.id) is not None
            break
        except StoreError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_queued_inserts_fail_instead_of_waiting_their_turn_during_an_outage(
        store: PostgresStore, proxy: Proxy) -> None:
    store.get_meta("warm")
    proxy.cut()
    futures = [store.submit_create_grant(grant()) for _ in range(12)]  # 6 per pooled connection
    done, waiting = concurrent.futures.wait(futures, timeout=JOIN)
    assert not waiting, f"{len(waiting)} insert(s) still queued"
    assert all(isinstance(f.exception(), StoreError) for f in done)


def test_service_follows_postgresql_back_after_a_long_cut(store: PostgresStore,
                                                          proxy: Proxy) -> None:
    store.get_meta("warm")
    proxy.cut()
    # long enough for an uncapped backoff (1, 2, 4, 8, 16 s) to schedule the next attempt
    # far beyond the restore
    until = time.monotonic() + 16
    while time.monotonic() < until:
        with contextlib.suppress(StoreError):
            store.get_meta("x")
        time.sleep(0.5)
    proxy.up()
    t, outcome = in_thread(lambda: store.get_meta("x"))
    t.join(6)
    assert not t.is_alive() and outcome == [None], outcome


def test_reconnection_delays_stay_capped() -> None:
    attempt = postgres._CappedBackoff(timeout=3600)
    delays = []
    for _ in range(12):
        attempt.update_delay(time.monotonic())
        delays.append(attempt.delay)
    assert max(delays) <= postgres._RECONNECT_DELAY_MAX


def test_closing_while_postgresql_hangs_returns(postgres_url: str, proxy: Proxy) -> None:
    """What a server's shutdown does: close the audit log, then the store, while a commit
    and an insert are stuck on a database that stopped answering."""
    url = through(postgres_url, proxy)
    store = PostgresStore(url, min_connections=1, max_connections=2)
    audit = PostgresAuditLog(url, signer=NoteSigner("test.pg/1", SigningKey.generate("ed25519")),
                             origin="test.pg/1", checkpoint_interval=60)
    event = {"type": "crypto.encrypt", "result": "ok", "principal": "p", "operation": "encrypt",
             "request_id": "r", "node": "n"}
    audit.append(event)

    async def from_loop() -> int:
        return await audit.submit(event)  # type: ignore[misc, no-any-return]

    proxy.hang()
    stuck_commit, commit_outcome = in_thread(lambda: asyncio.run(from_loop()))
    stuck_append, append_outcome = in_thread(lambda: audit.append(event, timeout=60))
    insert = store.submit_create_grant(grant())
    time.sleep(0.5)  # both commits and the insert are on the wire now

    def shut_down() -> None:
        try:
            audit.close(timeout=2)
        finally:
            store.close()

    t, outcome = in_thread(shut_down)
    t.join(JOIN)
    assert not t.is_alive(), "closing waits on the hung database"
    assert outcome == [None], outcome
    for thread, got in ((stuck_commit, commit_outcome), (stuck_append, append_outcome)):
        thread.join(JOIN)
        assert not thread.is_alive()
        assert isinstance(got[0], AuditUnavailable), got
    assert isinstance(insert.exception(timeout=JOIN), KeygrantsError)
