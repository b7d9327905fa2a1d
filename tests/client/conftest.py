"""Fixtures for the SDK: an in-process app for AsyncClient, a real uvicorn server for Client."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from keygrants.access import open_access
from keygrants.api.app import KeygrantsApp, create_app
from keygrants.auth import ensure_admin_token
from keygrants.client import AsyncClient, Client
from keygrants.grant_service import GrantAuthorizer, GrantService, GrantSettings
from keygrants.server import ServerConfig, build_server
from keygrants.service import KMS
from keygrants.store.memory import MemoryStore


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class InProcess:
    app: KeygrantsApp
    token: str
    grants: GrantService

    def client(self, token: str | None = None, **kwargs: Any) -> AsyncClient:
        """An AsyncClient over the app (admin token unless given; ``grant=""`` keeps a
        developer's KEYGRANTS_GRANT out unless the test passes its own)."""
        kwargs.setdefault("grant", "")
        return AsyncClient("http://test", token=self.token if token is None else token,
                           transport=httpx.ASGITransport(app=self.app), **kwargs)


def build_in_process(settings: GrantSettings | None = None) -> InProcess:
    """A memory-store app with principals, policies and grants (as tests/api builds it)."""
    store = MemoryStore()
    token = ensure_admin_token(store)
    assert token is not None
    root = os.urandom(32)
    access = open_access(store, root)
    kms = KMS(store, root, authorizer=access.authorizer)
    grants = GrantService(kms, access.authorizer, root_key=root, settings=settings)
    kms.use_authorizer(GrantAuthorizer(access.authorizer, grants))
    app = create_app(kms, access.authenticator, access=access.service, grants=grants)
    return InProcess(app, token, grants)


@pytest.fixture
def in_process() -> InProcess:
    return build_in_process()


@pytest.fixture
async def aclient(in_process: InProcess) -> AsyncIterator[AsyncClient]:
    async with in_process.client() as client:
        yield client


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LiveServer:
    url: str
    token: str
    data_dir: Path


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """``build_server`` on a SQLite data dir, served by uvicorn in a thread on a free port.

    The listening socket is bound here and handed to uvicorn, so no other process can take
    the port between choosing and listening.
    """
    data_dir = tmp_path_factory.mktemp("server") / "data"
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    built = build_server(ServerConfig(data_dir=data_dir, listen=f"127.0.0.1:{port}"))
    config = uvicorn.Config(built.app, lifespan="on", log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("the uvicorn server thread did not start")
        time.sleep(0.02)
    try:
        yield LiveServer(url=f"http://127.0.0.1:{port}",
                         token=built.admin_token_path.read_text().strip(), data_dir=data_dir)
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
        assert not thread.is_alive(), "the uvicorn server thread did not stop"


@pytest.fixture
def client(live_server: LiveServer) -> Iterator[Client]:
    with Client(live_server.url, token=live_server.token, timeout=10) as c:
        yield c
