"""Fixtures for the HTTP edge: an in-process app over httpx.ASGITransport, with a few keys."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import httpx
import pytest

from keygrants.access import Access, open_access
from keygrants.api.app import HttpLimits, KeygrantsApp, create_app
from keygrants.audit.service import AuditService
from keygrants.audit.setup import AuditSetup, open_audit
from keygrants.auth import ADMIN_PRINCIPAL, RequestContext, ensure_admin_token
from keygrants.grant_service import GrantAuthorizer, GrantService
from keygrants.models import (
    CreateApiKeyRequest,
    CreateGrantRequest,
    CreateKeyRequest,
    CreatePrincipalRequest,
    PutPolicyRequest,
)
from keygrants.service import KMS
from keygrants.store.memory import MemoryStore

ADMIN = RequestContext(principal=ADMIN_PRINCIPAL, request_id="fixture")


@dataclass
class World:
    """An app with keys in every state and purpose the endpoint cases need.

    ``enc`` (AES, alias ``enc-alias``), ``enc2`` (ChaCha20), ``sig`` (Ed25519), ``mac`` (HMAC),
    ``der`` (derivable AES), ``off`` (disabled) and ``doomed`` (pending deletion);
    ``ciphertext`` is ``PLAINTEXT`` under ``enc`` with ``CONTEXT``; ``signature`` and ``tag``
    are over ``MESSAGE``.
    """

    CONTEXT: ClassVar[dict[str, str]] = {"tenant": "t1", "purpose": "test"}
    PLAINTEXT: ClassVar[bytes] = b"attack at dawn"
    MESSAGE: ClassVar[bytes] = b"a message to sign"

    store: MemoryStore
    kms: KMS
    app: KeygrantsApp
    token: str
    audit: AuditSetup
    access: Access
    grants: GrantService
    ids: dict[str, str] = field(default_factory=dict)
    ciphertext: bytes = b""
    signature: bytes = b""
    tag: bytes = b""
    sealed: dict[str, bytes] = field(default_factory=dict)  # ciphertext under "off", "doomed"
    api_key: str = ""  # of principal "svc" (tags: payments), which policy "svc-encrypt" lets
    api_key_id: str = ""  # encrypt under "enc" only
    grant_id: str = ""  # admin → svc: encrypt/decrypt under "enc", 100 uses, 1 hour
    grant_token: str = ""
    admin_grant_id: str = ""  # admin → admin: encrypt under "enc", 1 hour (to exchange, retire)
    admin_grant_token: str = ""
    pending_grant_id: str = ""  # svc's break-glass request for encrypt under "enc"

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def snapshot(self) -> Any:
        """Everything the store holds (to prove a request wrote nothing)."""
        keys = self.store.list_keys(limit=100_000)
        return (
            keys,
            [(k.id, self.store.get_versions(k.id)) for k in keys],
            self.store.list_aliases(),
            self.store.list_principals(limit=100_000),
            self.store.list_credentials(),
            self.store.list_policies(),
            self.store.list_grants(now=0, limit=100_000),
            self.store.list_issuer_keys(),
            self.store.revocations_since(0, limit=100_000),
        )


def build_world(*, limits: HttpLimits | None = None) -> World:
    store = MemoryStore()
    token = ensure_admin_token(store)
    assert token is not None
    root_key = os.urandom(32)
    audit = open_audit(store, root_key, path=":memory:", node="test",
                       checkpoint_interval=0.05)
    access = open_access(store, root_key, audit=audit.recorder)
    kms = KMS(store, root_key, audit=audit.recorder, authorizer=access.authorizer)
    grants = GrantService(kms, access.authorizer, root_key=root_key, audit=audit.recorder)
    kms.use_authorizer(GrantAuthorizer(access.authorizer, grants))
    app = create_app(kms, access.authenticator, limits=limits,
                     audit=AuditService(audit, kms.authorizer), access=access.service,
                     grants=grants)
    w = World(store=store, kms=kms, app=app, token=token, audit=audit, access=access,
              grants=grants)
    for name, spec, derivable in [
        ("enc", "aes-256-gcm", False),
        ("enc2", "chacha20-poly1305", False),
        ("sig", "ed25519", False),
        ("mac", "hmac-sha256", False),
        ("der", "aes-256-gcm", True),
        ("off", "aes-256-gcm", False),
        ("doomed", "aes-256-gcm", False),
    ]:
        info = kms.create_key(ADMIN, CreateKeyRequest(name=name, spec=spec, derivable=derivable))
        w.ids[name] = info.id
    kms.create_alias(ADMIN, "enc-alias", "enc")
    w.ciphertext = kms.encrypt(ADMIN, "enc", World.PLAINTEXT, World.CONTEXT).ciphertext
    w.signature = kms.sign(ADMIN, "sig", World.MESSAGE).signature
    w.tag = kms.mac(ADMIN, "mac", World.MESSAGE).mac
    for name in ("off", "doomed"):
        w.sealed[name] = kms.encrypt(ADMIN, name, b"sealed before the state change").ciphertext
    kms.disable_key(ADMIN, "off")
    kms.schedule_deletion(ADMIN, "doomed", 7)
    access.service.create_principal(ADMIN, CreatePrincipalRequest(id="svc", tags=["payments"]))
    created = access.service.create_api_key(ADMIN, "svc", CreateApiKeyRequest(label="fixture"))
    w.api_key, w.api_key_id = created.api_key, created.credential.id
    access.service.put_policy(ADMIN, "svc-encrypt", PutPolicyRequest(text=SVC_POLICY))
    created_grant = grants.create(ADMIN, CreateGrantRequest(
        key="enc", grantee="svc", operations=["encrypt", "decrypt"], ttl=3600, max_uses=100))
    assert created_grant.token is not None
    w.grant_id, w.grant_token = created_grant.grant.id, created_grant.token
    admin_grant = grants.create(ADMIN, CreateGrantRequest(
        key="enc", grantee=ADMIN_PRINCIPAL, operations=["encrypt"], ttl=3600))
    assert admin_grant.token is not None
    w.admin_grant_id, w.admin_grant_token = admin_grant.grant.id, admin_grant.token
    # a break-glass request by svc, left pending (the policy that made it so is removed)
    access.service.put_policy(ADMIN, "svc-break-glass", PutPolicyRequest(text=BREAK_GLASS_POLICY))
    pending = grants.create(RequestContext(principal="svc", request_id="fixture",
                                           auth_method="api_key"),
                            CreateGrantRequest(key="enc", grantee="svc", operations=["encrypt"],
                                               justification="incident 42"))
    assert pending.token is None and pending.grant.state == "pending"
    w.pending_grant_id = pending.grant.id
    access.service.delete_policy(ADMIN, "svc-break-glass")
    audit.log.checkpoint_now()
    return w


BREAK_GLASS_POLICY = """@approval("required")
permit(principal == Keygrants::Principal::"svc", action == Keygrants::Action::"create_grant",
       resource) when { resource.name == "enc" };"""

SVC_POLICY = """permit(principal == Keygrants::Principal::"svc", action == Keygrants::Action::"encrypt",
       resource) when { resource.name == "enc" };"""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def world() -> Iterator[World]:
    w = build_world()
    yield w
    w.audit.log.close()


@pytest.fixture
def make_world() -> Callable[..., World]:
    """``build_world`` for tests that need other body limits."""
    return build_world


@pytest.fixture
async def http(world: World) -> AsyncIterator[httpx.AsyncClient]:
    """An unauthenticated client: every test says which credentials it sends."""
    transport = httpx.ASGITransport(app=world.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client
