"""Grants through the SDK: create, present (``Keygrants-Grant``), prove possession (DPoP, with
the server's nonce), delegate, exchange, end, approve; the AsyncClient in process, the Client
against a real server with signed requests."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from keygrants import errors
from keygrants import models as m
from keygrants.client import AsyncClient, Client, load_dpop_key
from keygrants.crypto.signing import SigningKey
from keygrants.grant_service import GrantSettings
from keygrants.grants.dpop import proof_key_thumbprint

from .conftest import InProcess, LiveServer, build_in_process

pytestmark = pytest.mark.anyio

CONTEXT = {"tenant": "t1"}
SVC_ENCRYPT = """permit(principal == Keygrants::Principal::"svc", action == Keygrants::Action::"encrypt",
       resource) when { resource.name == "enc" };"""
SVC_BREAK_GLASS = """@approval("required")
permit(principal == Keygrants::Principal::"svc", action == Keygrants::Action::"create_grant",
       resource) when { resource.name == "enc" };"""


@dataclass
class Recorder:
    """An ASGI transport that keeps every request it forwards (to see retries and headers)."""

    app: object
    requests: list[httpx.Request] = field(default_factory=list)

    def transport(self) -> httpx.AsyncBaseTransport:
        inner = httpx.ASGITransport(app=self.app)  # type: ignore[arg-type]
        seen = self.requests

        class Recording(httpx.AsyncBaseTransport):
            async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
                seen.append(request)
                return await inner.handle_async_request(request)

        return Recording()


@dataclass
class Setup:
    world: InProcess
    admin: AsyncClient
    svc_key: str  # API key of principal "svc", which no policy allows anything

    def svc(self, **kwargs: object) -> AsyncClient:
        return self.world.client(self.svc_key, **kwargs)  # type: ignore[arg-type]


async def _setup(world: InProcess) -> AsyncIterator[Setup]:
    async with world.client() as admin:
        await admin.create_key("enc")
        await admin.create_key("enc2")
        await admin.create_principal("svc")
        await admin.create_principal("svc2")
        svc_key = (await admin.create_api_key("svc")).api_key
        yield Setup(world, admin, svc_key)


@pytest.fixture
async def s(in_process: InProcess) -> AsyncIterator[Setup]:
    async for setup in _setup(in_process):
        yield setup


def _claims(proof: str) -> dict[str, object]:
    import base64

    part = proof.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))  # type: ignore[no-any-return]


# -- create and present ------------------------------------------------------------------------

async def test_a_grant_lets_a_principal_without_policy_encrypt_and_decrypt(s: Setup) -> None:
    created = await s.admin.create_grant("enc", "svc", ["encrypt", "decrypt"], ttl=600,
                                         context_subset=CONTEXT, name="batch job")
    assert isinstance(created, m.GrantCreated)
    assert created.token is not None
    info = created.grant
    assert (info.grantee, info.operations, info.state, info.name, info.context_subset) == (
        "svc", ["decrypt", "encrypt"], "active", "batch job", CONTEXT)
    assert info.expires_at - info.not_before == timedelta(seconds=600)
    token = created.token
    async with s.svc() as svc:
        enc = await svc.encrypt("enc", b"secret", context=CONTEXT, grant=token)
        assert (await svc.decrypt(enc.ciphertext, context=CONTEXT, grant=token)).plaintext == b"secret"
        with pytest.raises(errors.Forbidden) as denied:
            await svc.encrypt("enc", b"secret", context=CONTEXT)  # no grant: its own policy
        assert denied.value.code == "forbidden"
        with pytest.raises(errors.ContextMismatch):
            await svc.encrypt("enc", b"secret", context={"tenant": "t2"}, grant=token)
        with pytest.raises(errors.KeyNotGranted):
            await svc.encrypt("enc2", b"secret", context=CONTEXT, grant=token)
        with pytest.raises(errors.OperationNotGranted):
            await svc.generate_data_key("enc", context=CONTEXT, grant=token)
    async with s.admin as admin:
        with pytest.raises(errors.WrongGrantee):  # the grantee must authenticate as itself
            await admin.encrypt("enc", b"x", context=CONTEXT, grant=token)


async def test_the_client_default_grant_applies_to_crypto_calls_only(s: Setup) -> None:
    token = (await s.admin.create_grant("enc", "svc", ["encrypt", "describe"])).token
    assert token is not None
    async with s.svc(grant=token) as svc:
        assert (await svc.encrypt("enc", b"x")).key_version == 1
        assert (await svc.describe_key("enc")).name == "enc"
        assert (await svc.whoami()).principal == "svc"  # no grant header: 400 if there were one
        with pytest.raises(errors.Forbidden) as denied:
            await svc.encrypt("enc", b"x", grant="")  # "" opts out of the default
        assert denied.value.code == "forbidden"
        with pytest.raises(errors.Forbidden) as denied:  # never an implicit sub-grant
            await svc.create_grant("enc", "svc2", ["encrypt"])
        assert denied.value.code == "forbidden"


async def test_every_crypto_operation_takes_a_grant(s: Setup) -> None:
    await s.admin.create_key("sig", spec="ed25519")
    await s.admin.create_key("mac", spec="hmac-sha256")
    await s.admin.create_key("der", derivable=True)
    tokens = {}
    for key, ops in (("enc", ["encrypt", "decrypt", "re_encrypt", "generate_data_key"]),
                     ("sig", ["sign", "verify", "describe"]),
                     ("mac", ["mac", "verify_mac"]), ("der", ["derive"])):
        created = await s.admin.create_grant(key, "svc", ops)
        assert created.token is not None
        tokens[key] = created.token
    async with s.svc() as svc:
        g = tokens["enc"]
        ct = (await svc.encrypt("enc", b"m", grant=g)).ciphertext
        assert (await svc.decrypt(ct, grant=g)).plaintext == b"m"
        assert (await svc.re_encrypt(ct, grant=g)).key_version == 1
        assert (await svc.generate_data_key("enc", grant=g)).plaintext is not None
        batch = await svc.batch_encrypt("enc", [(b"a", None), (b"b", None)], grant=g)
        cts = [r.ciphertext for r in batch.results]
        assert all(cts)
        done = await svc.batch_decrypt([(c, None) for c in cts if c is not None], grant=g)
        assert [r.plaintext for r in done.results] == [b"a", b"b"]
        g = tokens["sig"]
        sig = (await svc.sign("sig", b"m", grant=g)).signature
        assert (await svc.verify("sig", b"m", sig, grant=g)).valid
        assert (await svc.get_public_key("sig", grant=g)).pem.startswith("-----BEGIN")
        assert (await svc.describe_key("sig", grant=g)).spec == "ed25519"
        tag = (await svc.mac("mac", b"m", grant=tokens["mac"])).mac
        assert (await svc.verify_mac("mac", b"m", tag, grant=tokens["mac"])).valid
        assert len((await svc.derive("der", {"a": "b"}, grant=tokens["der"])).derived) == 32


async def test_a_two_use_grant_is_exhausted_on_the_third(s: Setup) -> None:
    created = await s.admin.create_grant("enc", "svc", ["encrypt"], max_uses=2)
    async with s.svc(grant=created.token) as svc:
        await svc.encrypt("enc", b"1")
        await svc.encrypt("enc", b"2")
        with pytest.raises(errors.GrantExhausted):
            await svc.encrypt("enc", b"3")
        info = await svc.describe_grant(created.grant.id)  # the grantee may see its grant
    assert (info.uses, info.max_uses, info.state) == (2, 2, "exhausted")


async def test_a_token_with_spaces_is_refused_before_sending(s: Setup) -> None:
    with pytest.raises(ValueError, match="grant token"):
        s.svc(grant="a b")
    async with s.svc() as svc:
        with pytest.raises(ValueError, match="grant token"):
            await svc.encrypt("enc", b"x", grant="tok\x00en")


# -- proof of possession -------------------------------------------------------------------

async def test_a_dpop_bound_grant_needs_its_key(s: Setup) -> None:
    key = SigningKey.generate("ed25519")
    created = await s.admin.create_grant("enc", "svc", ["encrypt", "decrypt"],
                                         dpop_jkt=proof_key_thumbprint(key))
    assert created.grant.dpop_jkt == proof_key_thumbprint(key)
    async with s.svc(grant=created.token, dpop_key=key) as svc:
        ct = (await svc.encrypt("enc", b"bound")).ciphertext
        assert (await svc.decrypt(ct)).plaintext == b"bound"
    async with s.svc(grant=created.token) as svc:
        with pytest.raises(errors.PopRequired) as info:
            await svc.encrypt("enc", b"bound")
        assert info.value.code == "pop_required"
    async with s.svc(grant=created.token, dpop_key=SigningKey.generate("ed25519")) as svc:
        with pytest.raises(errors.PopInvalid, match="another key"):
            await svc.encrypt("enc", b"bound")


async def test_p256_proof_keys_work_too(s: Setup) -> None:
    key = SigningKey.generate("ecdsa-p256-sha256")
    created = await s.admin.create_grant("enc", "svc", ["encrypt"],
                                         dpop_jkt=proof_key_thumbprint(key))
    async with s.svc(grant=created.token, dpop_key=key) as svc:
        assert (await svc.encrypt("enc", b"x")).key_version == 1


async def test_an_rsa_proof_key_is_refused_by_the_constructor(s: Setup) -> None:
    with pytest.raises(ValueError):
        s.svc(dpop_key=SigningKey.generate("rsa-pss-3072-sha256"))


async def test_the_server_nonce_is_retried_once_then_reused() -> None:
    world = build_in_process(GrantSettings(require_dpop_nonce=True))
    async for s in _setup(world):
        key = SigningKey.generate("ed25519")
        created = await s.admin.create_grant("enc", "svc", ["encrypt"],
                                             dpop_jkt=proof_key_thumbprint(key))
        recorder = Recorder(world.app)
        # the recording transport is not an in-process one httpx knows: opt in to http://
        async with AsyncClient("http://test", allow_insecure_http=True, token=s.svc_key,
                               grant=created.token, dpop_key=key,
                               transport=recorder.transport()) as svc:
            await svc.encrypt("enc", b"1")
            assert len(recorder.requests) == 2  # refused with a nonce, then sent again with it
            first, second = (_claims(r.headers["DPoP"]) for r in recorder.requests)
            assert "nonce" not in first
            assert isinstance(second["nonce"], str)
            assert first["jti"] != second["jti"]
            assert second["htu"] == "http://test/v1/keys/enc/encrypt"
            assert second["htm"] == "POST"
            await svc.encrypt("enc", b"2")
            assert len(recorder.requests) == 3  # the remembered nonce is still good
            assert _claims(recorder.requests[2].headers["DPoP"])["nonce"] == second["nonce"]


async def test_a_refused_nonce_is_retried_only_once() -> None:
    world = build_in_process(GrantSettings(require_dpop_nonce=True))
    async for s in _setup(world):
        key = SigningKey.generate("ed25519")
        created = await s.admin.create_grant("enc", "svc", ["encrypt"],
                                             dpop_jkt=proof_key_thumbprint(key))
        calls: list[httpx.Request] = []

        def always_nonce(request: httpx.Request) -> httpx.Response:
            calls.append(request)
            return httpx.Response(401, headers={"DPoP-Nonce": f"n{len(calls)}"}, json={"error": {
                "code": "use_dpop_nonce", "message": "DPoP nonce required", "request_id": "r"}})

        async with AsyncClient("http://test", token=s.svc_key, grant=created.token, dpop_key=key,
                               transport=httpx.MockTransport(always_nonce)) as svc:
            with pytest.raises(errors.UseDpopNonce):
                await svc.encrypt("enc", b"1")
        assert len(calls) == 2
        assert _claims(calls[1].headers["DPoP"])["nonce"] == "n1"


# -- delegation and exchange ---------------------------------------------------------------

async def test_a_grant_with_create_grant_delegates_a_narrower_sub_grant(s: Setup) -> None:
    parent = await s.admin.create_grant("enc", "svc", ["encrypt", "decrypt", "create_grant"],
                                        ttl=600, max_uses=10)
    assert parent.token is not None
    svc2_key = (await s.admin.create_api_key("svc2")).api_key
    async with s.svc() as svc:
        child = await svc.create_grant("enc", "svc2", ["encrypt"], ttl=60, max_uses=1,
                                       grant=parent.token)
        assert (child.grant.parent_id, child.grant.depth, child.grant.issuer) == (
            parent.grant.id, 1, "svc")
        with pytest.raises(errors.AttenuationViolated):
            await svc.create_grant("enc", "svc2", ["encrypt"], ttl=6000, grant=parent.token)
    async with s.world.client(svc2_key, grant=child.token) as svc2:
        await svc2.encrypt("enc", b"x")
        with pytest.raises(errors.GrantExhausted):
            await svc2.encrypt("enc", b"x")


async def test_exchange_trades_a_token_for_a_narrower_one(s: Setup) -> None:
    created = await s.admin.create_grant("enc", "svc", ["encrypt", "decrypt"], ttl=600)
    assert created.token is not None
    async with s.svc() as svc:
        ex = await svc.exchange_grant(created.token, scope=["encrypt"], ttl=60, max_uses=1,
                                      context_equals=CONTEXT)
        assert isinstance(ex, m.TokenExchangeResult)
        assert (ex.scope, ex.issued_token_type, ex.token_type) == (
            "encrypt", m.GRANT_TOKEN_TYPE_URI, "N_A")
        assert 0 < ex.expires_in <= 60
        ct = (await svc.encrypt("enc", b"x", context=CONTEXT, grant=ex.access_token)).ciphertext
        with pytest.raises(errors.OperationNotGranted):
            await svc.decrypt(ct, context=CONTEXT, grant=ex.access_token)
        child = await svc.describe_grant(ex.grant_id)
        assert (child.parent_id, child.max_uses, child.context_equals) == (
            created.grant.id, 1, CONTEXT)
        with pytest.raises(errors.AttenuationViolated):
            await svc.exchange_grant(created.token, scope="encrypt sign")


async def test_grant_tokens_never_show_in_a_repr(s: Setup) -> None:
    """A grant token is a bearer secret until it expires: logs and tracebacks that show a
    result must not hand it out (as for plaintexts, API keys and shared secrets)."""
    import msgspec

    created = await s.admin.create_grant("enc", "svc", ["encrypt"], ttl=600)
    assert created.token is not None
    async with s.svc() as svc:
        ex = await svc.exchange_grant(created.token, ttl=60)
    request = m.TokenExchangeRequest(subject_token=created.token)
    for obj, token in ((created, created.token), (ex, ex.access_token), (request, created.token)):
        text = repr(obj)
        assert "<redacted>" in text and token not in text and token[:20] not in text, text
    assert "token=None" in repr(m.GrantCreated(grant=created.grant))  # nothing to hide
    assert created.grant.id in repr(created)  # the rest still shows
    # only the repr: the wire keeps every token
    assert msgspec.json.decode(msgspec.json.encode(request))["subject_token"] == created.token
    assert msgspec.json.decode(msgspec.json.encode(ex))["access_token"] == ex.access_token
    assert msgspec.json.decode(msgspec.json.encode(created))["token"] == created.token


async def test_exchanging_a_dpop_bound_token_proves_possession(s: Setup) -> None:
    key = SigningKey.generate("ed25519")
    created = await s.admin.create_grant("enc", "svc", ["encrypt"], ttl=600,
                                         dpop_jkt=proof_key_thumbprint(key))
    assert created.token is not None
    async with s.svc() as svc:
        with pytest.raises(errors.PopRequired):
            await svc.exchange_grant(created.token)
    async with s.svc(dpop_key=key) as svc:
        ex = await svc.exchange_grant(created.token, ttl=30)
        assert (await svc.describe_grant(ex.grant_id)).dpop_jkt == proof_key_thumbprint(key)
        assert (await svc.encrypt("enc", b"x", grant=ex.access_token)).key_version == 1


# -- listing, ending, revocation -----------------------------------------------------------

async def test_list_describe_retire_revoke_and_the_feed(s: Setup) -> None:
    a = await s.admin.create_grant("enc", "svc", ["encrypt"], retiring_principal="svc2")
    b = await s.admin.create_grant("enc", "svc", ["encrypt"])
    c = await s.admin.create_grant("enc2", "svc2", ["encrypt"])
    page = await s.admin.list_grants(key="enc")
    assert isinstance(page, m.GrantList)
    assert {g.id for g in page.grants} == {a.grant.id, b.grant.id}
    first = await s.admin.list_grants(limit=1)
    assert len(first.grants) == 1 and first.next == first.grants[0].id
    rest = await s.admin.list_grants(after=first.next)
    assert {g.id for g in first.grants + rest.grants} == {a.grant.id, b.grant.id, c.grant.id}
    assert (await s.admin.describe_grant(a.grant.id)).retiring_principal == "svc2"
    async with s.svc() as svc:
        mine = await svc.list_grants(grantee="svc", state="active")
        assert {g.id for g in mine.grants} == {a.grant.id, b.grant.id}
        with pytest.raises(errors.Forbidden):
            await svc.list_grants()  # another principal's grants, or all: not without policy
        retired = await svc.retire_grant(a.grant.id)
        assert (retired.state, retired.ended_by) == ("retired", "svc")
        with pytest.raises(errors.GrantRetired):
            await svc.encrypt("enc", b"x", grant=a.token)
        with pytest.raises(errors.GrantStateError):
            await svc.retire_grant(a.grant.id)
    revoked = await s.admin.revoke_grant(b.grant.id)
    assert (revoked.state, revoked.ended_by) == ("revoked", "admin")
    async with s.svc(grant=b.token) as svc:
        with pytest.raises(errors.GrantRevoked):
            await svc.encrypt("enc", b"x")
    feed = await s.admin.revocations()
    assert isinstance(feed, m.RevocationFeed)
    assert [(e.kind, e.id, e.reason) for e in feed.entries] == [
        ("grant", a.grant.id, "retired"), ("grant", b.grant.id, "revoked")]
    assert feed.latest == feed.entries[-1].seq and not feed.more
    later = await s.admin.revocations(since=feed.entries[0].seq, limit=1)
    assert [e.id for e in later.entries] == [b.grant.id]
    assert (await s.admin.list_grants(state="revoked")).grants[0].id == b.grant.id
    with pytest.raises(errors.GrantNotFound):
        await s.admin.describe_grant("g_" + "0" * 26)
    with pytest.raises(ValueError):
        await s.admin.describe_grant("../keys")


async def test_revoke_all_by_principal_and_by_key(s: Setup) -> None:
    a = await s.admin.create_grant("enc", "svc", ["encrypt"])
    await s.admin.create_grant("enc2", "svc", ["encrypt"])
    c = await s.admin.create_grant("enc", "svc2", ["encrypt"])
    done = await s.admin.revoke_all_grants(principal="svc")
    assert isinstance(done, m.RevokeAllResult)
    assert done.revoked == 2
    async with s.svc(grant=a.token) as svc:
        with pytest.raises(errors.GrantRevoked):
            await svc.encrypt("enc", b"x")
    by_key = await s.admin.revoke_all_grants(key="enc")
    assert by_key.revoked == 1 and by_key.seq > done.seq
    assert (await s.admin.describe_grant(c.grant.id)).state == "revoked"
    feed = await s.admin.revocations(since=0)
    key_id = (await s.admin.describe_key("enc")).id
    wholesale = [(e.kind, e.id) for e in feed.entries if e.kind != "grant"]
    assert wholesale[-2:] == [("principal", "svc"), ("key", key_id)]
    # each wholesale entry comes with one entry per grant it revoked
    assert c.grant.id in {e.id for e in feed.entries if e.kind == "grant"}
    with pytest.raises(errors.InvalidRequest):
        await s.admin.revoke_all_grants()
    with pytest.raises(errors.InvalidRequest):
        await s.admin.revoke_all_grants(principal="svc", key="enc")


# -- break-glass ---------------------------------------------------------------------------

async def test_a_pending_grant_decodes_then_is_approved_or_rejected(s: Setup) -> None:
    await s.admin.put_policy("svc-encrypt", SVC_ENCRYPT)
    await s.admin.put_policy("svc-break-glass", SVC_BREAK_GLASS)
    async with s.svc() as svc:
        pending = await svc.create_grant("enc", "svc", ["encrypt"], justification="incident 42")
        assert pending.token is None  # 202: waiting for approval
        assert (pending.grant.state, pending.grant.requires_approval,
                pending.grant.justification) == ("pending", True, "incident 42")
        with pytest.raises(errors.GrantPending):
            await svc.grant_token(pending.grant.id)
        with pytest.raises(errors.SelfApproval):
            await svc.approve_grant(pending.grant.id)
        other = await svc.create_grant("enc", "svc", ["encrypt"], justification="incident 43")
    approved = await s.admin.approve_grant(pending.grant.id, note="ok for one hour")
    assert (approved.state, approved.decided_by) == ("active", "admin")
    rejected = await s.admin.reject_grant(other.grant.id, note="no")
    assert (rejected.state, rejected.decided_by) == ("rejected", "admin")
    with pytest.raises(errors.GrantStateError):
        await s.admin.approve_grant(other.grant.id)
    async with s.svc() as svc:
        fresh = await svc.grant_token(pending.grant.id)
        assert fresh.token is not None and fresh.grant.id == pending.grant.id
        await s.admin.delete_policy("svc-encrypt")
        assert (await svc.encrypt("enc", b"x", grant=fresh.token)).key_version == 1
        with pytest.raises(errors.GrantStateError):  # rejected: never usable
            await svc.grant_token(other.grant.id)


async def test_a_202_without_a_token_decodes() -> None:
    body = {"grant": {
        "id": "g_1", "key_id": "k", "grantee": "svc", "operations": ["encrypt"],
        "state": "pending", "issuer": "svc", "created_at": "2030-01-01T00:00:00Z",
        "not_before": "2030-01-01T00:00:00Z", "expires_at": "2030-01-01T00:05:00Z",
        "uses": 0, "requires_approval": True}, "token": None}
    transport = httpx.MockTransport(lambda r: httpx.Response(202, json=body))
    async with AsyncClient("http://test", token="t", grant="", transport=transport) as c:
        created = await c.create_grant("k", "svc", ["encrypt"])
    assert created.token is None and created.grant.state == "pending"
    assert created.grant.created_at == datetime(2030, 1, 1, tzinfo=UTC)


# -- issuer keys ---------------------------------------------------------------------------

async def test_rotate_issuer_key_and_public_jwks(s: Setup) -> None:
    before = await s.admin.jwks()
    assert [k["kty"] for k in before["keys"]] == ["OKP"]
    rotated = await s.admin.rotate_issuer_key()
    assert isinstance(rotated, m.IssuerKeyInfo)
    assert rotated.alg == "EdDSA" and rotated.activate_at > rotated.created_at
    async with s.world.client("") as anonymous:  # public: no credentials
        after = await anonymous.jwks()
        assert {k["kid"] for k in after["keys"]} == {before["keys"][0]["kid"], rotated.kid}
        assert after["seq"] > before["seq"]
        assert (await anonymous.revocations()).entries == []
    async with s.svc() as svc:
        with pytest.raises(errors.Forbidden):
            await svc.rotate_issuer_key()


# -- environment ---------------------------------------------------------------------------

async def test_grant_and_proof_key_come_from_the_environment(s: Setup, tmp_path: Path,
                                                             monkeypatch) -> None:
    key = SigningKey.generate("ed25519")
    key_file = tmp_path / "dpop.pem"
    key_file.write_bytes(key.private_pem())
    key_file.chmod(0o600)
    created = await s.admin.create_grant("enc", "svc", ["encrypt"],
                                         dpop_jkt=proof_key_thumbprint(key))
    monkeypatch.setenv("KEYGRANTS_GRANT", created.token or "")
    monkeypatch.setenv("KEYGRANTS_DPOP_KEY_FILE", str(key_file))
    transport = httpx.ASGITransport(app=s.world.app)
    async with AsyncClient("http://test", token=s.svc_key, transport=transport) as svc:
        assert (await svc.encrypt("enc", b"x")).key_version == 1
    # an explicit grant (or "") means the environment is not read, the proof key included
    async with AsyncClient("http://test", token=s.svc_key, transport=transport,
                           grant=created.token) as svc:
        with pytest.raises(errors.PopRequired):
            await svc.encrypt("enc", b"x")
    assert proof_key_thumbprint(load_dpop_key(key_file)) == proof_key_thumbprint(key)
    key_file.write_text("not a key")
    with pytest.raises(ValueError, match="DPoP proof key"):
        AsyncClient("http://test", token=s.svc_key, transport=transport)


# -- the synchronous client against a real server ------------------------------------------

def test_sync_client_with_signed_requests_and_a_dpop_bound_grant(live_server: LiveServer) -> None:
    signer, proof_key = SigningKey.generate("ed25519"), SigningKey.generate("ecdsa-p256-sha256")
    with Client(live_server.url, token=live_server.token, grant="") as admin:
        admin.create_key("sync-grants")
        admin.create_principal("sync-svc")
        admin.add_public_key("sync-svc", signer.public_key().public_pem())
        created = admin.create_grant("sync-grants", "sync-svc", ["encrypt", "decrypt"],
                                     ttl=300, max_uses=5, dpop_jkt=proof_key_thumbprint(proof_key),
                                     not_before=datetime.now(UTC))
        assert created.token is not None
        grant_id = created.grant.id
        assert admin.list_grants(key="sync-grants").grants[0].id == grant_id
        assert admin.describe_grant(grant_id).max_uses == 5
        assert admin.jwks()["keys"]
    with Client(live_server.url, principal="sync-svc", signing_key=signer, grant=created.token,
                dpop_key=proof_key) as svc:
        assert svc.whoami().auth_method == "signature"
        ct = svc.encrypt("sync-grants", b"over tcp", context=CONTEXT).ciphertext
        assert svc.decrypt(ct, context=CONTEXT).plaintext == b"over tcp"
        ex = svc.exchange_grant(created.token, scope="decrypt", max_uses=1)
        assert svc.decrypt(ct, context=CONTEXT, grant=ex.access_token).plaintext == b"over tcp"
        assert svc.grant_token(grant_id).token
        with pytest.raises(errors.Forbidden):
            svc.encrypt("sync-grants", b"x", grant="")
        with pytest.raises(errors.SelfApproval):
            svc.approve_grant(grant_id)
        with pytest.raises(errors.SelfApproval):
            svc.reject_grant(grant_id, note="no")
        assert svc.retire_grant(grant_id).state == "retired"
        with pytest.raises(errors.GrantRetired):
            svc.encrypt("sync-grants", b"x")
    with Client(live_server.url, token=live_server.token, grant="") as admin:
        again = admin.create_grant("sync-grants", "sync-svc", ["encrypt"])
        assert admin.revoke_grant(again.grant.id).state == "revoked"
        assert admin.revoke_all_grants(principal="sync-svc").revoked == 0  # none live
        feed = admin.revocations()
        assert {grant_id, again.grant.id} <= {e.id for e in feed.entries}
        assert admin.rotate_issuer_key().kid in {k["kid"] for k in admin.jwks()["keys"]}
