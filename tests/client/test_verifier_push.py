"""Revocations pushed on a bus reach a local verifier without waiting for its next pull:
in process over the memory bus, and from a real server process over NATS and Redis."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from keygrants import errors
from keygrants.bus import open_bus
from keygrants.client import Client
from keygrants.client.verifier import AsyncVerifier, Verifier
from keygrants.grants.push import SUBJECT, RevocationPublisher, entry_message, heartbeat_message
from keygrants.grants.revocation import RevocationEntry

from .conftest import FakeKMS, build_in_process

pytestmark = pytest.mark.anyio
PUSH_WAIT = 10.0  # seconds a pushed revocation may take before the test fails (not a timing test)


async def until_refused(verify: Any, token: str) -> errors.KeygrantsError:
    deadline = time.monotonic() + PUSH_WAIT
    while time.monotonic() < deadline:
        try:
            await verify(token)
        except errors.GrantDenied as exc:
            return exc
        await asyncio.sleep(0.005)
    pytest.fail("the revocation did not reach the verifier")


async def test_pushed_revocations_apply_before_the_next_pull() -> None:
    kms = build_in_process()
    bus_url = f"memory://push-{uuid.uuid4().hex[:8]}"
    store = kms.grants.store
    publisher = RevocationPublisher(open_bus(bus_url), store.latest_revocation_seq, interval=0.05)
    await publisher.start()
    kms.grants.on_revocations = publisher.publish_entries
    async with kms.client() as admin:
        await admin.create_key("enc")
        await admin.create_principal("svc")
        created = await admin.create_grant("enc", "svc", ["decrypt"])
        assert created.token is not None
        # a poll interval far longer than the test: only the push can deliver the revocation
        verifier = AsyncVerifier("http://kms", allow_insecure_http=True, bus_url=bus_url, poll_interval=600,
                                 max_staleness=900, transport=httpx.ASGITransport(app=kms.app))
        await verifier.verify(created.token)
        await admin.revoke_grant(created.grant.id)
        refused = await until_refused(verifier.verify, created.token)
        assert isinstance(refused, errors.GrantRevoked)
    await verifier.aclose()
    await publisher.stop()


async def test_a_heartbeat_ahead_makes_the_verifier_pull_and_forgeries_revoke_nothing() -> None:
    kms = build_in_process()
    bus_url = f"memory://gap-{uuid.uuid4().hex[:8]}"
    async with kms.client() as admin:
        await admin.create_key("enc")
        await admin.create_principal("svc")
        first = await admin.create_grant("enc", "svc", ["decrypt"])
        second = await admin.create_grant("enc", "svc", ["decrypt"])
    assert first.token is not None and second.token is not None
    kms_requests: list[str] = []

    class Counting(httpx.AsyncBaseTransport):
        inner = httpx.ASGITransport(app=kms.app)

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            kms_requests.append(request.url.path)
            return await self.inner.handle_async_request(request)

    verifier = AsyncVerifier("http://kms", allow_insecure_http=True, bus_url=bus_url, poll_interval=600,
                             max_staleness=900, transport=Counting())
    await verifier.verify(first.token)
    bus = open_bus(bus_url)
    await bus.connect()
    # revoked without any push (as if the messages were lost)...
    async with kms.client() as admin:
        await admin.revoke_grant(first.grant.id)
        await admin.revoke_grant(second.grant.id)
    assert (await verifier.verify(second.token)).grant_id == second.grant.id
    # ...then a heartbeat says the feed is at 2: the verifier pulls and sees both
    await bus.publish(SUBJECT, heartbeat_message(2, time.time()))
    assert isinstance(await until_refused(verifier.verify, first.token), errors.GrantRevoked)
    assert isinstance(await until_refused(verifier.verify, second.token), errors.GrantRevoked)
    # a forged entry (anyone may publish on the bus) only makes the verifier pull the feed:
    # what it applies comes from the KMS, so the forgery revokes nothing
    ghost = RevocationEntry(seq=99, kind="principal", id="svc", revoked_at=int(time.time()) + 5,
                            expires_at=int(time.time()) + 3600)
    async with kms.client() as admin:
        third = await admin.create_grant("enc", "svc", ["decrypt"])
    assert third.token is not None
    feed_pulls = len(kms_requests)
    await bus.publish(SUBJECT, entry_message(ghost))
    deadline = time.monotonic() + PUSH_WAIT
    while len(kms_requests) == feed_pulls:  # the pull it triggers
        assert time.monotonic() < deadline, "the forged entry did not trigger a pull"
        await asyncio.sleep(0.005)
    assert (await verifier.verify(third.token)).grant_id == third.grant.id
    await bus.close()
    await verifier.aclose()


def test_a_malformed_bus_url_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="carrier-pigeon"):
        Verifier("https://kms", bus_url="carrier-pigeon://coop")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def reachable(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.mark.parametrize(("bus_url", "port"), [("nats://127.0.0.1:4222", 4222),
                                               ("redis://127.0.0.1:6379", 6379)],
                         ids=["nats", "redis"])
def test_a_real_server_pushes_revocations_over_the_bus(tmp_path: Path, bus_url: str,
                                                       port: int) -> None:
    if not reachable(port):
        if os.environ.get("CI") == "true":
            pytest.fail(f"{bus_url} is not reachable (CI must run this test)")
        pytest.skip(f"{bus_url} is not reachable")
    listen = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYGRANTS_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "keygrants", "server", "--listen", f"127.0.0.1:{listen}",
         "--data-dir", str(tmp_path / "data"), "--bus", bus_url, "--bus-heartbeat", "0.2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        url = f"http://127.0.0.1:{listen}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        token = (tmp_path / "data" / "admin.token").read_text().strip()
        with Client(url, token=token, grant="") as admin:
            admin.create_key("pushed")
            admin.create_principal("svc")
            created = admin.create_grant("pushed", "svc", ["encrypt"])
            assert created.token is not None
            with Verifier(url, bus_url=bus_url, poll_interval=600, max_staleness=900) as v:
                assert v.verify(created.token).grantee == "svc"
                admin.revoke_grant(created.grant.id)
                deadline = time.monotonic() + PUSH_WAIT
                while True:
                    try:
                        v.verify(created.token)
                    except errors.GrantRevoked:
                        break
                    assert time.monotonic() < deadline, "the pushed revocation never arrived"
                    time.sleep(0.005)
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def test_the_sync_verifier_subscribes_once_the_bus_comes_up(tmp_path: Path, monkeypatch: Any,
                                                            live_server: Any,
                                                            caplog: Any) -> None:
    """A bus that is down when the verifier starts is tried again; once it is up, a pushed
    heartbeat ahead of the verifier's view makes it pull (and so refuse) at once."""
    import shutil

    from tests.bus.test_bus_contract import BINARIES, Broker, need

    from keygrants.client import verifier as verifier_module

    binary = shutil.which("nats-server") or next(
        (p for p in BINARIES["nats"] if os.access(p, os.X_OK)), None)
    need(binary, "nats-server is not installed")
    assert binary is not None
    monkeypatch.setattr(verifier_module, "_BUS_RETRY", 0.2)
    broker = Broker("nats", binary, tmp_path)  # not started yet
    with Client(live_server.url, token=live_server.token, grant="") as admin:
        admin.create_key("late-bus")
        admin.create_principal("svc-late-bus")
        created = admin.create_grant("late-bus", "svc-late-bus", ["encrypt"])
        assert created.token is not None
        try:
            with Verifier(live_server.url, bus_url=broker.url, poll_interval=600,
                          max_staleness=900) as v:
                assert v.verify(created.token).grantee == "svc-late-bus"  # bus down: pulls
                revoked = admin.revoke_grant(created.grant.id)
                assert v.verify(created.token).grantee == "svc-late-bus"  # not pulled yet
                deadline = time.monotonic() + PUSH_WAIT
                while "revocation bus unavailable" not in caplog.text:  # a first attempt failed
                    assert time.monotonic() < deadline, "the verifier never tried the bus"
                    time.sleep(0.05)
                broker.start()

                async def push_until_refused() -> None:
                    bus = open_bus(broker.url)
                    await bus.connect()
                    try:
                        deadline = time.monotonic() + PUSH_WAIT
                        while True:
                            await bus.publish(SUBJECT, heartbeat_message(2**40, time.time()))
                            try:
                                await asyncio.to_thread(v.verify, created.token)
                            except errors.GrantRevoked:
                                return
                            assert time.monotonic() < deadline, "never subscribed after the bus came up"
                            await asyncio.sleep(0.05)
                    finally:
                        await bus.close()

                asyncio.run(push_until_refused())
                assert revoked.state == "revoked"
        finally:
            broker.kill()


def test_close_stops_the_bus_thread_even_right_after_it_started(live_server: Any) -> None:
    with Client(live_server.url, token=live_server.token, grant="") as admin:
        admin.create_key("closing-bus")
        admin.create_principal("svc-closing")
        token = admin.create_grant("closing-bus", "svc-closing", ["encrypt"]).token
    assert token is not None
    for _ in range(20):  # close() at various points of the thread's start
        v = Verifier(live_server.url, bus_url=f"nats://127.0.0.1:{free_port()}",
                     poll_interval=600, max_staleness=900)
        v.verify(token)  # starts the bus thread (nothing listens on that port)
        v.close()
        assert v._bus_thread is not None and not v._bus_thread.is_alive()


async def test_a_revocation_pushed_right_after_another_is_not_left_for_a_heartbeat() -> None:
    """Pulls are spaced (5 ms); a push inside that spacing is pulled for once it is up, not
    dropped. The verifier's clock stands still, so the second push always falls inside the
    spacing of the first pull; no heartbeats (they would hide a dropped push)."""
    kms = build_in_process()
    bus_url = f"memory://push-{uuid.uuid4().hex[:8]}"
    publisher = RevocationPublisher(open_bus(bus_url), kms.grants.store.latest_revocation_seq,
                                    interval=3600)
    await publisher.start()
    kms.grants.on_revocations = publisher.publish_entries
    frozen = time.time()
    async with kms.client() as admin:
        await admin.create_key("enc")
        await admin.create_principal("svc")
        made = [await admin.create_grant("enc", "svc", ["decrypt"]) for _ in range(2)]
        verifier = AsyncVerifier("http://kms", allow_insecure_http=True, bus_url=bus_url, poll_interval=600,
                                 max_staleness=900, transport=httpx.ASGITransport(app=kms.app),
                                 clock=lambda: frozen)
        for m in made:
            assert m.token is not None
            await verifier.verify(m.token)
        for m in made:  # the second push comes "at the same moment" as the first pull
            await admin.revoke_grant(m.grant.id)
            assert isinstance(await until_refused(verifier.verify, m.token or ""),
                              errors.GrantRevoked)
    await verifier.aclose()
    await publisher.stop()


def test_concurrent_first_verifies_start_one_bus_thread_and_close_stops_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Many threads make their first verify() at once. Every bus thread made is held in its
    constructor until all callers have made one (or a second has passed), so without a lock
    around the start each caller would make its own."""
    callers = 8
    made: list[threading.Thread] = []
    made_lock, all_made = threading.Lock(), threading.Event()
    real_thread = threading.Thread

    class HeldBusThread(real_thread):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if self.name == "keygrants-verifier-bus":
                with made_lock:
                    made.append(self)
                    if len(made) == callers:
                        all_made.set()
                all_made.wait(timeout=1.0)  # not a timing assertion: only holds the window open

    kms = FakeKMS(time.time)
    _, token = kms.mint()
    v = Verifier("http://kms", allow_insecure_http=True, audience="svc", bus_url=f"memory://race-{uuid.uuid4().hex[:8]}",
                 transport=kms.transport())
    barrier = threading.Barrier(callers)
    errors_seen: list[BaseException] = []

    def first_verify() -> None:
        barrier.wait(timeout=30)
        try:
            v.verify(token)
        except BaseException as exc:
            errors_seen.append(exc)

    workers = [real_thread(target=first_verify) for _ in range(callers)]
    monkeypatch.setattr(threading, "Thread", HeldBusThread)
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=30)
    monkeypatch.undo()
    assert not any(w.is_alive() for w in workers) and errors_seen == []
    v.close()
    for t in made:
        t.join(timeout=5)
    assert [t.is_alive() for t in made] == [False]  # one thread, and it stopped
