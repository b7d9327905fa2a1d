"""Fixtures shared across the test suite."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, cast

import pytest

from keygrants.auth import RequestContext
from keygrants.service import KMS
from keygrants.store.base import Store
from keygrants.store.memory import MemoryStore
from keygrants.store.sqlite import SQLiteStore


class FakeClock:
    """A settable clock for the service (Unix seconds)."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty database ``kg_test_<random>`` on the PostgreSQL server at
    127.0.0.1:5432 (user ``postgres``, trust auth), dropped afterwards. Skips when the server
    cannot be reached, but fails when ``CI=true``: in CI the PostgreSQL tests must run."""
    import secrets

    admin_url = "postgresql://postgres@127.0.0.1:5432/postgres"
    try:
        import psycopg

        admin = psycopg.connect(admin_url, autocommit=True, connect_timeout=5)
    except Exception as exc:  # no driver or no server: the same verdict
        message = f"PostgreSQL at 127.0.0.1:5432 is not reachable ({type(exc).__name__})"
        if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes"):
            pytest.fail(f"{message} (CI=true: the PostgreSQL tests must run, not skip)", pytrace=False)
        pytest.skip(message)
    name = f"kg_test_{secrets.token_hex(8)}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')  # template0: nobody uses it
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                          (name,))
            admin.execute(f'DROP DATABASE IF EXISTS "{name}"')


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """Every implementation of the Store port (the contract suite runs against each);
    PostgreSQL gets a fresh database per test (see ``postgres_url``)."""
    s: Store
    if request.param == "memory":
        s = MemoryStore()
    elif request.param == "sqlite":
        s = SQLiteStore(tmp_path / "kg.db")
    else:
        url = request.getfixturevalue("postgres_url")  # skips before the driver is imported
        from keygrants.store.postgres import PostgresStore

        s = PostgresStore(url)
    yield s
    s.close()


@pytest.fixture
def admin() -> RequestContext:
    return RequestContext(principal="admin", request_id="test")


@pytest.fixture
def kms(store: Store, clock: FakeClock) -> KMS:
    return KMS(store, os.urandom(32), clock=clock)


class Meanwhile:
    """A store that, just before ``method`` writes, lets another node act (``times`` times):
    the interleaving of two nodes on one database, made deterministic."""

    def __init__(self, store: Store, method: str, act: Callable[[], object], *,
                 times: int = 1) -> None:
        self._store = store
        self._method = method
        self._act = act
        self.left = times

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if name != self._method:
            return attr

        def meanwhile(*args: Any, **kwargs: Any) -> Any:
            if self.left:
                self.left -= 1
                self._act()
            return attr(*args, **kwargs)
        return meanwhile


@pytest.fixture
def interleaved() -> Callable[..., Store]:
    """``interleaved(store, method, act, times=1)``: ``store`` as a :class:`Meanwhile`."""
    def wrap(store: Store, method: str, act: Callable[[], object], *, times: int = 1) -> Store:
        return cast(Store, Meanwhile(store, method, act, times=times))
    return wrap


@pytest.fixture
def second_node(store: Store, request: pytest.FixtureRequest) -> Iterator[Store]:
    """Another store object on the database of ``store`` (a second server node)."""
    if isinstance(store, MemoryStore):
        yield store  # one process's memory: the same object
        return
    other: Store
    if isinstance(store, SQLiteStore):
        other = SQLiteStore(Path(store.path))
    else:
        from keygrants.store.postgres import PostgresStore

        other = PostgresStore(request.getfixturevalue("postgres_url"))
    yield other
    other.close()


@contextlib.contextmanager
def _uvicorn_thread(app_for_port: Callable[[int], Any], **options: Any) -> Iterator[int]:
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    try:
        app = app_for_port(port)
    except BaseException:
        sock.close()
        raise
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, **options))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20  # a guard against a hang, not a timing
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                pytest.fail("the uvicorn server thread did not start")
            time.sleep(0.02)
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
        assert not thread.is_alive(), "the uvicorn server thread did not stop"


@pytest.fixture(scope="session")
def uvicorn_thread() -> Callable[..., AbstractContextManager[int]]:
    """``with uvicorn_thread(app_for_port, **config) as port:``: the app that
    ``app_for_port(port)`` returns, served by uvicorn in a thread on a loopback socket bound
    first (no other process can take the port between choosing and listening); ``config``
    goes to ``uvicorn.Config`` (``lifespan="on"`` for a keygrants server)."""
    return _uvicorn_thread
