"""The synchronous Client against a real server (build_server + uvicorn on a loopback port)."""

from __future__ import annotations

import hashlib
import itertools

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils

from keygrants import models as m
from keygrants.client import Client
from keygrants.errors import (
    AliasNotFound,
    InvalidCiphertext,
    InvalidRequest,
    KeyDisabled,
    KeyNotFound,
    KeyPendingDeletion,
    ServerUnreachable,
    Unauthenticated,
)

_names = itertools.count()


def fresh(prefix: str) -> str:
    """Tests share one server; each key gets a name no other test uses."""
    return f"{prefix}-{next(_names)}"


SPECS = {
    "aes-256-gcm": "encrypt-decrypt",
    "chacha20-poly1305": "encrypt-decrypt",
    "hmac-sha256": "mac",
    "ed25519": "sign-verify",
    "ecdsa-p256": "sign-verify",
    "rsa-pss-3072": "sign-verify",
}


@pytest.fixture(scope="module")
def signers(live_server) -> dict[str, str]:
    """One key per signing spec (RSA key generation is slow: make each once)."""
    with Client(live_server.url, token=live_server.token) as c:
        return {spec: c.create_key(fresh(spec), spec=spec).name
                for spec in ("ed25519", "ecdsa-p256", "rsa-pss-3072")}


def test_server_health(client: Client, live_server) -> None:
    import httpx

    assert httpx.get(f"{live_server.url}/readyz", timeout=5).json() == {"status": "ready"}
    assert (live_server.data_dir / "admin.token").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("spec", [s for s in SPECS if s != "rsa-pss-3072"])
def test_create_key_of_each_spec(client: Client, spec: str) -> None:
    info = client.create_key(fresh("spec"), spec=spec)
    assert isinstance(info, m.KeyInfo)
    assert (info.spec, info.purpose, info.state, info.latest_version) == (
        spec, SPECS[spec], "enabled", 1)
    assert client.describe_key(info.id) == client.describe_key(info.name)


def test_rsa_key_from_the_shared_fixture(client: Client, signers: dict[str, str]) -> None:
    info = client.describe_key(signers["rsa-pss-3072"])
    assert (info.spec, info.purpose) == ("rsa-pss-3072", "sign-verify")


def test_encrypt_decrypt_with_context(client: Client) -> None:
    name = fresh("enc")
    key = client.create_key(name)
    ctx = {"tenant": "acme", "table": "users"}
    result = client.encrypt(name, b"\x00binary\xffdata", context=ctx)
    assert isinstance(result, m.EncryptResult)
    assert result.key_id == key.id
    plain = client.decrypt(result.ciphertext, context=ctx)
    assert isinstance(plain, m.DecryptResult)
    assert plain.plaintext == b"\x00binary\xffdata"
    assert client.decrypt(result.ciphertext, context=dict(reversed(list(ctx.items())))).plaintext
    with pytest.raises(InvalidCiphertext):
        client.decrypt(result.ciphertext, context={"tenant": "other", "table": "users"})
    with pytest.raises(InvalidCiphertext):
        client.decrypt(result.ciphertext)
    assert client.decrypt(client.encrypt(name, b"").ciphertext).plaintext == b""


def test_rotate_then_decrypt_old_ciphertext(client: Client) -> None:
    name = fresh("rot")
    client.create_key(name, spec="chacha20-poly1305")
    old = client.encrypt(name, b"v1 data", context={"a": "b"})
    assert client.rotate_key(name).latest_version == 2
    new = client.encrypt(name, b"v2 data")
    assert (old.key_version, new.key_version) == (1, 2)
    assert client.decrypt(old.ciphertext, context={"a": "b"}).key_version == 1
    assert client.decrypt(new.ciphertext).plaintext == b"v2 data"
    moved = client.re_encrypt(old.ciphertext, context={"a": "b"})
    assert (moved.key_version, moved.source_key_version) == (2, 1)
    client.update_key(name, min_decryption_version=2)
    with pytest.raises(InvalidCiphertext):
        client.decrypt(old.ciphertext, context={"a": "b"})
    assert client.decrypt(moved.ciphertext, context={"a": "b"}).plaintext == b"v1 data"


def _verify_locally(spec: str, pem: str, message: bytes, signature: bytes, *,
                    prehashed: bool = False) -> None:
    """Check a server signature with cryptography and the published public key."""
    public = serialization.load_pem_public_key(pem.encode())
    algorithm = utils.Prehashed(hashes.SHA256()) if prehashed else hashes.SHA256()
    if spec == "ed25519":
        assert isinstance(public, ed25519.Ed25519PublicKey)
        public.verify(signature, message)
    elif spec == "ecdsa-p256":
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert public.curve.name == "secp256r1"
        public.verify(signature, message, ec.ECDSA(algorithm))
    else:
        assert isinstance(public, rsa.RSAPublicKey)
        assert public.key_size == 3072
        public.verify(signature, message,
                      padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32), algorithm)


@pytest.mark.parametrize("spec", ["ed25519", "ecdsa-p256", "rsa-pss-3072"])
def test_sign_verify_each_signing_spec(client: Client, signers: dict[str, str], spec: str) -> None:
    name = signers[spec]
    message = b"sign me " + spec.encode()
    signed = client.sign(name, message)
    assert isinstance(signed, m.SignResult)
    verdict = client.verify(name, message, signed.signature)
    assert isinstance(verdict, m.VerifyResult)
    assert verdict.valid
    assert not client.verify(name, message + b"!", signed.signature).valid
    public = client.get_public_key(name)
    assert isinstance(public, m.PublicKey)
    _verify_locally(spec, public.pem, message, signed.signature)
    with pytest.raises(InvalidSignature):
        _verify_locally(spec, public.pem, message + b"!", signed.signature)


@pytest.mark.parametrize("spec", ["ecdsa-p256", "rsa-pss-3072"])
def test_sign_verify_digest_mode(client: Client, signers: dict[str, str], spec: str) -> None:
    name = signers[spec]
    message = b"a long document " * 100
    digest = hashlib.sha256(message).digest()
    signed = client.sign(name, digest, message_type="digest")
    # a digest signature is a signature over the message: both modes verify it
    assert client.verify(name, digest, signed.signature, message_type="digest").valid
    assert client.verify(name, message, signed.signature).valid
    assert client.verify(name, message, client.sign(name, message).signature,
                         message_type="raw", key_version=1).valid
    _verify_locally(spec, client.get_public_key(name, version=1).pem, digest, signed.signature,
                    prehashed=True)
    with pytest.raises(InvalidRequest):
        client.sign(name, digest[:31], message_type="digest")


def test_ed25519_refuses_digest_mode(client: Client, signers: dict[str, str]) -> None:
    with pytest.raises(InvalidRequest):
        client.sign(signers["ed25519"], hashlib.sha256(b"m").digest(), message_type="digest")


def test_public_key_pem_of_a_rotated_key(client: Client) -> None:
    name = fresh("sig-rot")
    client.create_key(name, spec="ecdsa-p256")
    v1 = client.get_public_key(name)
    old_signature = client.sign(name, b"m").signature
    client.rotate_key(name)
    v2 = client.get_public_key(name)
    assert (v1.key_version, v2.key_version) == (1, 2)
    assert v1.pem != v2.pem
    assert client.get_public_key(name, version=1).pem == v1.pem
    assert client.verify(name, b"m", old_signature).key_version == 1
    _verify_locally("ecdsa-p256", v1.pem, b"m", old_signature)


def test_mac_and_verify_mac(client: Client) -> None:
    name = fresh("mac")
    client.create_key(name, spec="hmac-sha256")
    tag = client.mac(name, b"payload")
    assert isinstance(tag, m.MacResult)
    assert client.verify_mac(name, b"payload", tag.mac).valid
    assert not client.verify_mac(name, b"payload!", tag.mac).valid
    assert not client.verify_mac(name, b"payload", tag.mac[:-1] + bytes([tag.mac[-1] ^ 1])).valid
    client.rotate_key(name)
    assert client.verify_mac(name, b"payload", tag.mac).key_version == 1
    assert client.mac(name, b"payload").mac != tag.mac


def test_derive_from_a_derivable_key(client: Client) -> None:
    name = fresh("derivable")
    client.create_key(name, spec="hmac-sha256", derivable=True)
    a = client.derive(name, {"user": "alice"}, length=32)
    assert isinstance(a, m.DerivedKey)
    assert client.derive(name, {"user": "alice"}, length=32).derived == a.derived
    assert client.derive(name, {"user": "bob"}, length=32).derived != a.derived
    assert client.derive(name, {"user": "alice"}, length=32, salt=b"s").derived != a.derived
    assert len(client.derive(name, {}, length=1024).derived) == 1024


def test_random(client: Client) -> None:
    first, second = client.random(32), client.random(32)
    assert isinstance(first, m.RandomResult)
    assert len(first.random) == 32
    assert first.random != second.random
    assert len(client.random(1).random) == 1


def test_aliases(client: Client) -> None:
    name, alias = fresh("aliased"), fresh("alias")
    key = client.create_key(name)
    created = client.create_alias(alias, name)
    assert isinstance(created, m.AliasInfo)
    assert created.key_id == key.id
    assert [(a.alias, a.key_id) for a in client.list_aliases(name)] == [(alias, key.id)]
    assert alias in {a.alias for a in client.list_aliases()}
    ct = client.encrypt(alias, b"via alias")
    assert ct.key_id == key.id
    assert client.decrypt(ct.ciphertext).plaintext == b"via alias"
    client.delete_alias(alias)
    with pytest.raises(KeyNotFound):
        client.encrypt(alias, b"x")
    with pytest.raises(AliasNotFound):
        client.delete_alias(alias)


def test_batch_encrypt_and_decrypt(client: Client) -> None:
    name = fresh("batch")
    client.create_key(name)
    items = [(f"item {i}".encode(), {"i": str(i)} if i % 2 else None) for i in range(50)]
    encrypted = client.batch_encrypt(name, items)
    assert isinstance(encrypted, m.BatchResult)
    assert len(encrypted.results) == 50
    pairs = [(r.ciphertext, ctx) for r, (_, ctx) in zip(encrypted.results, items, strict=True)]
    assert all(isinstance(ct, bytes) for ct, _ in pairs)
    decrypted = client.batch_decrypt(pairs)  # type: ignore[arg-type]
    assert [r.plaintext for r in decrypted.results] == [p for p, _ in items]
    bad = client.batch_decrypt([(pairs[1][0], None), pairs[2]])  # type: ignore[list-item]
    assert bad.results[0].error is not None
    assert bad.results[0].error.code == "invalid_ciphertext"
    assert bad.results[1].plaintext == b"item 2"


def test_re_encrypt_to_another_key(client: Client) -> None:
    source, dest = fresh("src"), fresh("dst")
    src_info = client.create_key(source)
    dst_info = client.create_key(dest, spec="chacha20-poly1305")
    ct = client.encrypt(source, b"moving", context={"from": "a"})
    moved = client.re_encrypt(ct.ciphertext, context={"from": "a"}, destination_key=dest,
                              destination_context={"to": "b"})
    assert isinstance(moved, m.ReEncryptResult)
    assert (moved.key_id, moved.source_key_id) == (dst_info.id, src_info.id)
    assert client.decrypt(moved.ciphertext, context={"to": "b"}).plaintext == b"moving"
    with pytest.raises(InvalidCiphertext):
        client.decrypt(moved.ciphertext, context={"from": "a"})
    kept = client.re_encrypt(ct.ciphertext, context={"from": "a"}, destination_key=dest)
    assert client.decrypt(kept.ciphertext, context={"from": "a"}).plaintext == b"moving"


@pytest.mark.parametrize("size", [16, 32, 64])
def test_data_key_with_and_without_plaintext(client: Client, size: int) -> None:
    name = fresh("dk")
    client.create_key(name)
    with_plain = client.generate_data_key(name, size=size, context={"file": "x"})
    assert isinstance(with_plain, m.DataKey)
    assert with_plain.plaintext is not None
    assert len(with_plain.plaintext) == size
    assert client.decrypt(with_plain.ciphertext, context={"file": "x"}).plaintext == with_plain.plaintext
    without = client.generate_data_key(name, size=size, include_plaintext=False)
    assert without.plaintext is None
    assert len(client.decrypt(without.ciphertext).plaintext) == size


def test_schedule_and_cancel_deletion(client: Client) -> None:
    name = fresh("del")
    client.create_key(name)
    ct = client.encrypt(name, b"keep me").ciphertext
    info = client.schedule_key_deletion(name, days=7)
    assert info.state == "pending_deletion"
    assert info.deletion_date is not None
    assert (info.deletion_date - info.updated_at).days == 7
    with pytest.raises(KeyPendingDeletion):
        client.decrypt(ct)
    with pytest.raises(KeyPendingDeletion):
        client.encrypt(name, b"x")
    restored = client.cancel_key_deletion(name)
    assert (restored.state, restored.deletion_date) == ("enabled", None)
    assert client.decrypt(ct).plaintext == b"keep me"


def test_disable_and_enable(client: Client) -> None:
    name = fresh("toggle")
    client.create_key(name)
    ct = client.encrypt(name, b"data").ciphertext
    assert client.disable_key(name).state == "disabled"
    with pytest.raises(KeyDisabled):
        client.decrypt(ct)
    with pytest.raises(KeyDisabled):
        client.generate_data_key(name)
    assert client.describe_key(name).state == "disabled"
    assert client.enable_key(name).state == "enabled"
    assert client.decrypt(ct).plaintext == b"data"


def test_list_keys_pages(client: Client) -> None:
    prefix = fresh("page")
    for suffix in ("a", "b", "c"):
        client.create_key(f"{prefix}-{suffix}")
    first = client.list_keys(limit=2, after=f"{prefix}-")
    assert [k.name for k in first.keys] == [f"{prefix}-a", f"{prefix}-b"]
    second = client.list_keys(limit=2, after=first.next)
    assert second.keys[0].name == f"{prefix}-c"


def test_wrong_token_and_closed_port(live_server, closed_port: int) -> None:
    with Client(live_server.url, token="kg_admin_nope") as wrong, pytest.raises(Unauthenticated):
        wrong.random()
    with Client(f"http://127.0.0.1:{closed_port}", token="t", timeout=5) as dead, \
            pytest.raises(ServerUnreachable):
        dead.random()


def test_client_reads_addr_and_token_from_the_environment(live_server, monkeypatch) -> None:
    for name in ("KEYGRANTS_PRINCIPAL", "KEYGRANTS_KEY_FILE", "KEYGRANTS_GRANT",
                 "KEYGRANTS_DPOP_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KEYGRANTS_ADDR", live_server.url + "/\n")
    monkeypatch.setenv("KEYGRANTS_TOKEN", live_server.token + "\n")
    with Client() as c:
        assert c.addr == live_server.url
        assert len(c.random(8).random) == 8
