"""Fixtures for the SDK: an in-process app for AsyncClient, a real uvicorn server for Client."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from keygrants.access import open_access
from keygrants.api.app import KeygrantsApp, create_app
from keygrants.auth import ensure_admin_token
from keygrants.client import AsyncClient, Client
from keygrants.crypto.signing import SigningKey
from keygrants.grant_service import GrantAuthorizer, GrantService, GrantSettings
from keygrants.grants.model import Grant, new_grant_id
from keygrants.grants.token import encode_grant_token
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
def live_server(tmp_path_factory: pytest.TempPathFactory,
                uvicorn_thread: Any) -> Iterator[LiveServer]:
    """``build_server`` on a SQLite data dir, served by uvicorn in a thread on a free port."""
    data_dir = tmp_path_factory.mktemp("server") / "data"
    built: list[Any] = []

    def app(port: int) -> Any:
        built.append(build_server(ServerConfig(data_dir=data_dir, listen=f"127.0.0.1:{port}")))
        return built[0].app

    with uvicorn_thread(app, lifespan="on") as port:
        yield LiveServer(url=f"http://127.0.0.1:{port}",
                         token=built[0].admin_token_path.read_text().strip(), data_dir=data_dir)


@pytest.fixture
def client(live_server: LiveServer) -> Iterator[Client]:
    with Client(live_server.url, token=live_server.token, timeout=10) as c:
        yield c


class FakeKMS:
    """A KMS's public endpoints only (the JWKS and the revocation feed) over
    ``httpx.MockTransport``, with its own issuer key and clock: for verifier tests that need to
    shape the feed (prune it, number it) or mint tokens a real KMS would not."""

    ISSUER = "urn:keygrants:fake-kms"

    def __init__(self, clock: Any, *, leeway: int = 30) -> None:
        self.clock = clock
        self.leeway = leeway  # the KMS's: a feed entry expires at the token's exp plus this
        self.signing = SigningKey.generate("ed25519")
        self.entries: list[dict[str, Any]] = []
        self.latest = 0
        self.requests: list[str] = []
        self.next_since = False
        self.page_size: int | None = None  # entries per feed page (None: all on one)

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self._handle)

    def _handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(str(request.url))
        if request.url.path == "/.well-known/jwks.json":
            jwk = self.signing.public_key().jwk() | {"kid": "k1", "use": "sig"}
            return httpx.Response(200, json={"keys": [jwk], "issuer": self.ISSUER, "seq": 1})
        since = int(request.url.params.get("since", "0"))
        now = self.clock()  # the KMS drops what has expired, as its stores do
        entries = [e for e in self.entries if e["seq"] > since and e["expires_at"] > now]
        more = self.page_size is not None and len(entries) > self.page_size
        entries = entries[:self.page_size] if more else entries
        doc: dict[str, Any] = {"entries": entries, "latest": self.latest, "more": more}
        if self.next_since:  # as the KMS answers now (an older one did not)
            doc["next_since"] = max(since, self.latest)
        return httpx.Response(200, json=doc)

    def mint(self, *, ttl: int = 300, key_id: str = "payments",
             ops: tuple[str, ...] = ("decrypt",), **fields: Any) -> tuple[Grant, str]:
        """A grant for ``svc`` (audience ``svc``) and its token, issued now."""
        now = int(self.clock())
        grant = Grant(id=new_grant_id(), key_id=key_id, grantee="svc", operations=ops,
                      issuer="admin", created_at=now, not_before=now, expires_at=now + ttl,
                      **fields)
        token = encode_grant_token(grant, issuer=self.ISSUER, audiences=("svc",),
                                   issued_at=now, alg="EdDSA", kid="k1", key=self.signing)
        return grant, token

    def revoke(self, grant: Grant, *, seq: int | None = None) -> None:
        """Append the grant's feed entry (``seq``: the next number, unless given)."""
        self.latest = self.latest + 1 if seq is None else seq
        self.entries.append({"seq": self.latest, "kind": "grant", "id": grant.id,
                             "revoked_at": int(self.clock()),
                             "expires_at": grant.expires_at + self.leeway, "reason": "revoked"})
