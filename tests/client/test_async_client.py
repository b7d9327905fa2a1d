"""AsyncClient over httpx.ASGITransport: typed results for every operation, typed errors."""

from __future__ import annotations

import hashlib
import inspect
import io

import httpx
import pytest

from keygrants import errors
from keygrants import models as m
from keygrants.client import AsyncClient, Client
from keygrants.errors import (
    AlreadyExists,
    InvalidCiphertext,
    InvalidKeyUsage,
    InvalidRequest,
    KeyDisabled,
    KeygrantsError,
    KeyNotFound,
    KeyPendingDeletion,
    KeyStateError,
    MalformedBody,
    NotFound,
    PayloadTooLarge,
    ServerUnreachable,
    Unauthenticated,
)

pytestmark = pytest.mark.anyio

CONTEXT = {"tenant": "t1"}


def test_both_clients_offer_the_same_operations() -> None:
    def public(cls: type) -> set[str]:
        return {n for n, f in inspect.getmembers(cls, inspect.isfunction) if not n.startswith("_")}

    assert public(AsyncClient) - {"aclose"} == public(Client) - {"close"}


async def test_key_management_returns_typed_results(aclient: AsyncClient) -> None:
    info = await aclient.create_key("k1", description="first", rotation_period=86400)
    assert isinstance(info, m.KeyInfo)
    assert (info.name, info.spec, info.description, info.rotation_period) == (
        "k1", "aes-256-gcm", "first", 86400)
    assert info.next_rotation_at is not None
    await aclient.create_key("k2", spec="hmac-sha256")

    page = await aclient.list_keys(limit=1)
    assert isinstance(page, m.KeyList)
    assert [k.name for k in page.keys] == ["k1"]
    assert page.next == "k1"
    page = await aclient.list_keys(after=page.next)
    assert [k.name for k in page.keys] == ["k2"]
    assert page.next is None

    assert (await aclient.describe_key(info.id)).name == "k1"
    updated = await aclient.update_key("k1", description="second", rotation_period=0)
    assert isinstance(updated, m.KeyInfo)
    assert (updated.description, updated.rotation_period, updated.next_rotation_at) == (
        "second", None, None)

    rotated = await aclient.rotate_key("k1")
    assert isinstance(rotated, m.KeyInfo)
    assert rotated.latest_version == 2
    updated = await aclient.update_key("k1", min_decryption_version=2)
    assert updated.min_decryption_version == 2

    assert (await aclient.disable_key("k1")).state == "disabled"
    assert (await aclient.enable_key("k1")).state == "enabled"
    pending = await aclient.schedule_key_deletion("k1", days=7)
    assert isinstance(pending, m.KeyInfo)
    assert pending.state == "pending_deletion"
    assert pending.deletion_date is not None
    restored = await aclient.cancel_key_deletion("k1")
    assert (restored.state, restored.deletion_date) == ("enabled", None)

    alias = await aclient.create_alias("k1-alias", "k1")
    assert isinstance(alias, m.AliasInfo)
    assert alias.key_id == info.id
    aliases = await aclient.list_aliases()
    assert all(isinstance(a, m.AliasInfo) for a in aliases)
    assert [(a.alias, a.key_id) for a in aliases] == [("k1-alias", info.id)]
    assert await aclient.list_aliases("k2") == []
    assert (await aclient.describe_key("k1-alias")).aliases == ["k1-alias"]
    assert await aclient.delete_alias("k1-alias") is None
    assert await aclient.list_aliases() == []


async def test_encryption_operations_return_typed_results(aclient: AsyncClient) -> None:
    enc = await aclient.create_key("enc")
    other = await aclient.create_key("other", spec="chacha20-poly1305")

    result = await aclient.encrypt("enc", b"secret", context=CONTEXT)
    assert isinstance(result, m.EncryptResult)
    assert (result.key_id, result.key_version) == (enc.id, 1)
    assert isinstance(result.ciphertext, bytes)
    plain = await aclient.decrypt(result.ciphertext, context=CONTEXT)
    assert isinstance(plain, m.DecryptResult)
    assert (plain.plaintext, plain.key_id, plain.key_version) == (b"secret", enc.id, 1)

    moved = await aclient.re_encrypt(result.ciphertext, context=CONTEXT, destination_key="other",
                                     destination_context={"tenant": "t2"})
    assert isinstance(moved, m.ReEncryptResult)
    assert (moved.key_id, moved.source_key_id, moved.source_key_version) == (other.id, enc.id, 1)
    assert (await aclient.decrypt(moved.ciphertext, context={"tenant": "t2"})).plaintext == b"secret"

    data_key = await aclient.generate_data_key("enc", size=64, context=CONTEXT)
    assert isinstance(data_key, m.DataKey)
    assert data_key.plaintext is not None
    assert len(data_key.plaintext) == 64
    assert (await aclient.decrypt(data_key.ciphertext, context=CONTEXT)).plaintext == data_key.plaintext
    sealed_only = await aclient.generate_data_key("enc", include_plaintext=False)
    assert sealed_only.plaintext is None
    assert len((await aclient.decrypt(sealed_only.ciphertext)).plaintext) == 32

    batch = await aclient.batch_encrypt("enc", [(b"a", CONTEXT), (b"b", None)])
    assert isinstance(batch, m.BatchResult)
    assert all(isinstance(r, m.BatchItemResult) and r.error is None for r in batch.results)
    ciphertexts = [r.ciphertext for r in batch.results]
    assert all(isinstance(c, bytes) for c in ciphertexts)
    tampered = bytearray(ciphertexts[1])  # type: ignore[arg-type]
    tampered[-1] ^= 1
    out = await aclient.batch_decrypt([(ciphertexts[0], CONTEXT), (bytes(tampered), None)])  # type: ignore[list-item]
    assert out.results[0].plaintext == b"a"
    assert isinstance(out.results[1].error, m.BatchItemError)
    assert out.results[1].error.code == "invalid_ciphertext"


@pytest.mark.parametrize("spec", ["ed25519", "ecdsa-p256"])
async def test_signing_operations_return_typed_results(aclient: AsyncClient, spec: str) -> None:
    key = await aclient.create_key("signer", spec=spec)
    signed = await aclient.sign("signer", b"message")
    assert isinstance(signed, m.SignResult)
    assert (signed.key_id, signed.key_version) == (key.id, 1)
    verdict = await aclient.verify("signer", b"message", signed.signature)
    assert isinstance(verdict, m.VerifyResult)
    assert (verdict.valid, verdict.key_version) == (True, 1)
    assert not (await aclient.verify("signer", b"other", signed.signature)).valid
    public = await aclient.get_public_key("signer", version=1)
    assert isinstance(public, m.PublicKey)
    assert public.pem.startswith("-----BEGIN PUBLIC KEY-----")
    assert public.jwk["kid"] == f"{key.id}:1"
    if spec == "ecdsa-p256":
        digest = hashlib.sha256(b"message").digest()
        signed = await aclient.sign("signer", digest, message_type="digest")
        assert (await aclient.verify("signer", b"message", signed.signature)).valid
        assert (await aclient.verify("signer", digest, signed.signature,
                                     message_type="digest", key_version=1)).valid


async def test_mac_derive_and_random_return_typed_results(aclient: AsyncClient) -> None:
    await aclient.create_key("hmac", spec="hmac-sha256")
    tag = await aclient.mac("hmac", b"message")
    assert isinstance(tag, m.MacResult)
    assert len(tag.mac) == 32
    ok = await aclient.verify_mac("hmac", b"message", tag.mac, key_version=1)
    assert isinstance(ok, m.VerifyResult)
    assert ok.valid
    assert not (await aclient.verify_mac("hmac", b"other", tag.mac)).valid

    await aclient.create_key("root", derivable=True)
    derived = await aclient.derive("root", {"user": "u1"}, length=40, salt=b"salt")
    assert isinstance(derived, m.DerivedKey)
    assert len(derived.derived) == 40
    again = await aclient.derive("root", {"user": "u1"}, length=40, salt=b"salt", key_version=1)
    assert again.derived == derived.derived
    assert (await aclient.derive("root", {"user": "u2"}, length=40, salt=b"salt")).derived != derived.derived

    rnd = await aclient.random(48)
    assert isinstance(rnd, m.RandomResult)
    assert len(rnd.random) == 48


async def test_errors_are_rebuilt_as_their_classes(aclient: AsyncClient) -> None:
    await aclient.create_key("enc")
    await aclient.create_key("signer", spec="ed25519")
    ct = (await aclient.encrypt("enc", b"secret", context=CONTEXT)).ciphertext

    with pytest.raises(KeyNotFound) as info:
        await aclient.describe_key("missing")
    assert info.value.code == "key_not_found"
    assert info.value.request_id
    assert isinstance(info.value, NotFound)

    tampered = bytearray(ct)
    tampered[40] ^= 1
    with pytest.raises(InvalidCiphertext) as bad:
        await aclient.decrypt(bytes(tampered), context=CONTEXT)
    assert bad.value.message == "invalid ciphertext"
    with pytest.raises(InvalidCiphertext):
        await aclient.decrypt(ct, context={"tenant": "t2"})

    with pytest.raises(InvalidKeyUsage):
        await aclient.sign("enc", b"m")
    with pytest.raises(AlreadyExists):
        await aclient.create_key("enc")
    with pytest.raises(InvalidRequest) as invalid:
        await aclient.create_key("bad name")
    assert invalid.value.code == "invalid_request"
    with pytest.raises(PayloadTooLarge):
        await aclient.encrypt("enc", b"x" * (64 * 1024 + 1))
    with pytest.raises(InvalidRequest):
        await aclient.random(0)
    with pytest.raises(MalformedBody):
        await aclient.create_key("k", rotation_period=1.5)  # type: ignore[arg-type]

    await aclient.disable_key("enc")
    with pytest.raises(KeyDisabled) as disabled:
        await aclient.decrypt(ct, context=CONTEXT)
    assert isinstance(disabled.value, KeyStateError)
    with pytest.raises(KeyDisabled):
        await aclient.encrypt("enc", b"x")
    await aclient.schedule_key_deletion("enc", days=7)
    with pytest.raises(KeyPendingDeletion):
        await aclient.generate_data_key("enc")
    with pytest.raises(KeyStateError) as state:
        await aclient.rotate_key("enc")
    assert state.value.code == "key_state"


async def test_a_wrong_token_raises_unauthenticated(in_process) -> None:
    for token, code in (("kg_admin_wrong", "unknown_key"), ("", "unauthenticated")):
        async with in_process.client(token=token) as wrong:
            with pytest.raises(Unauthenticated) as info:
                await wrong.list_keys()
            assert info.value.code == code


async def test_a_closed_port_raises_server_unreachable(closed_port: int) -> None:
    async with AsyncClient(f"http://127.0.0.1:{closed_port}", token="t", timeout=5) as dead:
        with pytest.raises(ServerUnreachable) as info:
            await dead.random()
    assert info.value.code == "server_unreachable"
    assert str(closed_port) in info.value.message


async def test_key_references_that_would_change_the_path_are_refused(aclient: AsyncClient) -> None:
    for ref in ("a/b", "..", ".", "", "a?b", "a#b"):
        with pytest.raises(ValueError, match="invalid key or alias reference"):
            await aclient.describe_key(ref)
        with pytest.raises(ValueError):
            await aclient.encrypt(ref, b"x")
        with pytest.raises(ValueError):
            await aclient.delete_alias(ref)


async def test_an_empty_destination_key_is_refused(aclient: AsyncClient) -> None:
    """``destination_key=""`` was sent, and the server re-encrypted under the source key."""
    await aclient.create_key("source")
    ct = (await aclient.encrypt("source", b"x")).ciphertext
    for ref in ("", "a/b", "..", "a?b"):
        with pytest.raises(ValueError) as info:
            await aclient.re_encrypt(ct, destination_key=ref)
        assert str(info.value) == f"invalid key or alias reference {ref!r}"
    assert (await aclient.re_encrypt(ct)).key_id == (await aclient.re_encrypt(ct)).source_key_id


async def test_key_references_are_looked_up_as_given(aclient: AsyncClient) -> None:
    """Percent-encoded into the path: unencoded, the server decoded 'a%2Fb' and reported key
    'a/b' not found."""
    for ref in ("a%2Fb", "a%252Fb", "100%", "a b", "é"):
        with pytest.raises(KeyNotFound) as info:
            await aclient.describe_key(ref)
        assert info.value.message == f"key {ref!r} not found"
    created = await aclient.create_key("Plain.name_1-x")
    assert (await aclient.describe_key("Plain.name_1-x")).id == created.id
    assert (await aclient.describe_key(created.id)).name == "Plain.name_1-x"


def _recorder() -> tuple[httpx.MockTransport, list[httpx.Request]]:
    """A transport that records each request and answers 404 key_not_found."""
    sent: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(404, json={"error": {"code": "key_not_found", "message": "no",
                                                   "request_id": "r"}})
    return httpx.MockTransport(handler), sent


async def _run(client: Client | AsyncClient, call, value) -> None:
    result = call(client, value)
    if inspect.isawaitable(result):
        await result


def _clients(transport: httpx.MockTransport) -> list[Client | AsyncClient]:
    return [Client("http://test", token="t", grant="", transport=transport),
            AsyncClient("http://test", token="t", grant="", transport=transport)]


async def test_path_segments_are_percent_encoded_by_both_clients() -> None:
    transport, sent = _recorder()
    for client in _clients(transport):
        for call in (lambda c: c.describe_key("a%2Fb"), lambda c: c.rotate_key("a%2Fb"),
                     lambda c: c.encrypt("a%2Fb", b"x"), lambda c: c.delete_alias("a%2Fb"),
                     lambda c: c.describe_principal("p q"), lambda c: c.get_policy("x%y")):
            with pytest.raises(errors.KeyNotFound):
                await _run(client, lambda c, _: call(c), None)
    assert [r.url.raw_path for r in sent] == 2 * [
        b"/v1/keys/a%252Fb", b"/v1/keys/a%252Fb/rotate", b"/v1/keys/a%252Fb/encrypt",
        b"/v1/aliases/a%252Fb", b"/v1/principals/p%20q", b"/v1/policies/x%25y"]


# (the call with ``value`` in a bytes parameter, the parameter's name in the error)
BYTES_PARAMETERS = [
    (lambda c, v: c.encrypt("k", v), "plaintext"),
    (lambda c, v: c.decrypt(v), "ciphertext"),
    (lambda c, v: c.re_encrypt(v, destination_key="k"), "ciphertext"),
    (lambda c, v: c.batch_encrypt("k", [(b"ok", None), (v, None)]), "plaintext of items[1]"),
    (lambda c, v: c.batch_decrypt([(b"ok", None), (v, CONTEXT)]), "ciphertext of items[1]"),
    (lambda c, v: c.sign("k", v), "message"),
    (lambda c, v: c.sign("k", v, message_type="digest"), "message"),
    (lambda c, v: c.verify("k", v, b"sig"), "message"),
    (lambda c, v: c.verify("k", b"m", v), "signature"),
    (lambda c, v: c.mac("k", v), "message"),
    (lambda c, v: c.verify_mac("k", v, b"tag"), "message"),
    (lambda c, v: c.verify_mac("k", b"m", v), "mac"),
    (lambda c, v: c.derive("k", CONTEXT, salt=v), "salt"),
]


@pytest.mark.parametrize(("call", "name"), BYTES_PARAMETERS,
                         ids=[f"{i}-{n}" for i, (_, n) in enumerate(BYTES_PARAMETERS)])
@pytest.mark.parametrize("value", ["test", "abcd", "hello", "", 7, ["b"]], ids=repr)
async def test_a_bytes_parameter_refuses_anything_else_before_sending(call, name: str,
                                                                      value: object) -> None:
    """A str went out as the JSON string and the server read it as base64: 'test' was
    encrypted as b'\xb5\xeb-', 'abcd' signed as b'i\xb7\x1d' (or, not base64, a puzzling
    malformed_body)."""
    transport, sent = _recorder()
    for client in _clients(transport):
        with pytest.raises(TypeError) as info:
            await _run(client, call, value)
        assert str(info.value).startswith(f"{name} must be bytes, not {type(value).__name__}")
    assert sent == []


async def test_a_str_is_refused_with_a_hint() -> None:
    transport, sent = _recorder()
    async with AsyncClient("http://test", token="t", grant="", transport=transport) as c:
        with pytest.raises(TypeError, match=r"^plaintext must be bytes, not str; encode it first"):
            await c.encrypt("k", "test")
        with pytest.raises(TypeError, match=r"^ciphertext must be bytes, not str; base64-decode "):
            await c.decrypt("AQID")
        with pytest.raises(TypeError, match=r"^signature must be bytes, not str; base64-decode "):
            await c.verify("k", b"m", "AQID")
        with pytest.raises(TypeError, match=r"^value must be str, not bytes$"):
            await c.audit_hash(b"svc")  # type: ignore[arg-type]
    assert sent == []


async def test_bytes_like_values_are_the_bytes_sent(aclient: AsyncClient) -> None:
    await aclient.create_key("enc")
    await aclient.create_key("signer", spec="ed25519")
    await aclient.create_key("tagger", spec="hmac-sha256")
    await aclient.create_key("deriver", derivable=True)
    for value in (bytearray(b"card 4111"), memoryview(b"card 4111")):
        enc = await aclient.encrypt("enc", value)  # type: ignore[arg-type]
        assert (await aclient.decrypt(bytearray(enc.ciphertext))).plaintext == b"card 4111"  # type: ignore[arg-type]
        batch = await aclient.batch_encrypt("enc", [(value, None)])  # type: ignore[list-item]
        ct = batch.results[0].ciphertext
        assert ct is not None
        out = await aclient.batch_decrypt([(memoryview(ct), None)])  # type: ignore[list-item]
        assert out.results[0].plaintext == b"card 4111"
        sig = await aclient.sign("signer", value)  # type: ignore[arg-type]
        assert (await aclient.verify("signer", b"card 4111", memoryview(sig.signature))).valid  # type: ignore[arg-type]
        tag = await aclient.mac("tagger", value)  # type: ignore[arg-type]
        assert tag.mac == (await aclient.mac("tagger", b"card 4111")).mac
        assert (await aclient.verify_mac("tagger", value, bytearray(tag.mac))).valid  # type: ignore[arg-type]
        derived = await aclient.derive("deriver", CONTEXT, salt=value)  # type: ignore[arg-type]
        assert derived.derived == (await aclient.derive("deriver", CONTEXT, salt=b"card 4111")).derived


def _mock(status: int, content: bytes) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=content, headers={"content-type": "application/json"})
    return httpx.MockTransport(handler)


async def test_an_unknown_error_code_maps_to_its_status_family_and_keeps_the_code() -> None:
    body = b'{"error": {"code": "from_a_newer_server", "message": "too late", "request_id": "r1"}}'
    async with AsyncClient("http://test", token="t", transport=_mock(409, body)) as c:
        with pytest.raises(errors.Conflict) as info:
            await c.random()
    assert (info.value.code, info.value.message, info.value.request_id) == (
        "from_a_newer_server", "too late", "r1")


@pytest.mark.parametrize(("status", "content"), [(502, b"<html>bad gateway</html>"),
                                                 (500, b'{"detail": "x"}'), (503, b"[]")])
async def test_an_error_response_without_the_error_shape_is_a_keygrants_error(status,
                                                                              content) -> None:
    async with AsyncClient("http://test", token="t", transport=_mock(status, content)) as c:
        with pytest.raises(KeygrantsError) as info:
            await c.random()
    assert info.value.message == f"HTTP {status} from server"


async def test_a_success_response_of_the_wrong_shape_is_a_keygrants_error() -> None:
    async with AsyncClient("http://test", token="t",
                           transport=_mock(200, b'{"unexpected": true}')) as c:
        with pytest.raises(KeygrantsError, match="unexpected response"):
            await c.random()


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_a_redirect_is_an_error_not_a_success(status: int) -> None:
    """Operations without a result body took a redirect (an http->https proxy) for success:
    `principal delete` said "Deleted" and exited 0 while nothing was deleted."""
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, headers={"location": "https://kms.example/v1/principals/p"})

    transport = httpx.MockTransport(handler)
    async with AsyncClient("http://test", token="t", transport=transport) as c:
        with pytest.raises(KeygrantsError, match=f"HTTP {status} redirect .* nothing was done"):
            await c.delete_principal("p")
    with Client("http://test", token="t", transport=transport) as sync:
        with pytest.raises(KeygrantsError, match="redirect"):
            sync.delete_alias("a")
        out = io.BytesIO()
        with pytest.raises(KeygrantsError, match="redirect"):
            sync.audit_export(out)  # the redirect's body was written as the export
        assert out.getvalue() == b""
    async with AsyncClient("http://test", token="t", transport=transport) as c:
        out = io.BytesIO()
        with pytest.raises(KeygrantsError, match="redirect"):
            await c.audit_export(out)
