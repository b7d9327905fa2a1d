"""The KMS use cases, against every store implementation."""

from __future__ import annotations

import hashlib
import os

import pytest
from cryptography.hazmat.primitives import serialization

from keygrants import models as m
from keygrants.auth import RequestContext
from keygrants.errors import (
    AlreadyExists,
    Forbidden,
    InvalidCiphertext,
    InvalidKeyUsage,
    InvalidRequest,
    KeyDestroyed,
    KeyDisabled,
    KeyNotFound,
    KeyPendingDeletion,
    KeyStateError,
    KeyVersionError,
    PayloadTooLarge,
)
from keygrants.keys.ciphertext import HEADER_SIZE
from keygrants.service import KMS, Limits

SIGNING = ["ed25519", "ecdsa-p256", "rsa-pss-3072"]


def create(kms: KMS, ctx: RequestContext, name: str, **kw: object) -> m.KeyInfo:
    return kms.create_key(ctx, m.CreateKeyRequest(name=name, **kw))  # type: ignore[arg-type]


# -- key management ---------------------------------------------------------------------------

def test_create_key_defaults(kms: KMS, admin: RequestContext) -> None:
    info = create(kms, admin, "payments")
    assert (info.spec, info.purpose, info.state) == ("aes-256-gcm", "encrypt-decrypt", "enabled")
    assert info.latest_version == 1 and info.min_decryption_version == 1
    assert info.rotation_period is None and info.next_rotation_at is None
    assert kms.describe_key(admin, info.id) == kms.describe_key(admin, "payments")


@pytest.mark.parametrize("name", ["", " x", "a/b", "a b", "x" * 129, "-lead",
                                  "3f1c2b4e-8f8a-4c59-9d1e-1a2b3c4d5e6f", "é"])
def test_create_key_rejects_bad_names(kms: KMS, admin: RequestContext, name: str) -> None:
    with pytest.raises(InvalidRequest):
        create(kms, admin, name)
    assert kms.list_keys(admin).keys == []


def test_create_key_rejects_bad_options(kms: KMS, admin: RequestContext) -> None:
    with pytest.raises(InvalidRequest, match="unknown key spec"):
        create(kms, admin, "k", spec="des")
    with pytest.raises(InvalidRequest, match="rotation_period"):
        create(kms, admin, "k", rotation_period=59)
    with pytest.raises(InvalidRequest, match="derivable"):
        create(kms, admin, "k", spec="ed25519", derivable=True)
    with pytest.raises(InvalidRequest, match="description"):
        create(kms, admin, "k", description="x" * 1025)
    assert kms.list_keys(admin).keys == []


def test_names_and_aliases_share_one_namespace(kms: KMS, admin: RequestContext) -> None:
    a = create(kms, admin, "a")
    create(kms, admin, "b")
    with pytest.raises(AlreadyExists):
        create(kms, admin, "a")
    with pytest.raises(AlreadyExists):
        kms.create_alias(admin, "b", "a")
    kms.create_alias(admin, "alpha", "a")
    with pytest.raises(AlreadyExists):
        create(kms, admin, "alpha")
    assert kms.describe_key(admin, "alpha").id == a.id
    assert kms.describe_key(admin, "a").aliases == ["alpha"]
    ct = kms.encrypt(admin, "alpha", b"x").ciphertext
    assert kms.decrypt(admin, ct).key_id == a.id
    kms.delete_alias(admin, "alpha")
    with pytest.raises(KeyNotFound):
        kms.encrypt(admin, "alpha", b"x")


def test_list_keys_paginates_by_name(kms: KMS, admin: RequestContext) -> None:
    for n in ["c", "a", "e", "b", "d"]:
        create(kms, admin, n)
    page = kms.list_keys(admin, limit=2)
    assert [k.name for k in page.keys] == ["a", "b"] and page.next == "b"
    page = kms.list_keys(admin, limit=2, after=page.next)
    assert [k.name for k in page.keys] == ["c", "d"]
    page = kms.list_keys(admin, limit=2, after=page.next)
    assert [k.name for k in page.keys] == ["e"] and page.next is None
    with pytest.raises(InvalidRequest):
        kms.list_keys(admin, limit=0)


def test_unknown_key(kms: KMS, admin: RequestContext) -> None:
    for ref in ["nope", "3f1c2b4e-8f8a-4c59-9d1e-1a2b3c4d5e6f", ""]:
        with pytest.raises(KeyNotFound):
            kms.encrypt(admin, ref, b"x")


def test_only_admin_is_authorized(kms: KMS, admin: RequestContext) -> None:
    create(kms, admin, "k")
    other = RequestContext(principal="svc-billing")
    with pytest.raises(Forbidden):
        kms.encrypt(other, "k", b"x")
    with pytest.raises(Forbidden):
        create(kms, other, "k2")
    with pytest.raises(Forbidden):
        kms.random(other, 8)


# -- encryption -------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["aes-256-gcm", "chacha20-poly1305"])
def test_encrypt_decrypt_with_context(kms: KMS, admin: RequestContext, spec: str) -> None:
    info = create(kms, admin, "k", spec=spec)
    res = kms.encrypt(admin, "k", b"secret", {"tenant": "42", "app": "billing"})
    assert res.key_id == info.id and res.key_version == 1
    assert res.ciphertext[0] == 1 and res.ciphertext[1:17] == bytes.fromhex(info.id.replace("-", ""))
    out = kms.decrypt(admin, res.ciphertext, {"app": "billing", "tenant": "42"})  # order-free
    assert out.plaintext == b"secret" and out.key_version == 1
    for bad in [None, {}, {"tenant": "43", "app": "billing"}, {"tenant": "42"},
                {"tenant": "42", "app": "billing", "x": "y"}]:
        with pytest.raises(InvalidCiphertext):
            kms.decrypt(admin, res.ciphertext, bad)


def test_decrypt_failures_are_opaque(kms: KMS, admin: RequestContext) -> None:
    create(kms, admin, "k")
    create(kms, admin, "other")
    ct = kms.encrypt(admin, "k", b"secret").ciphertext
    other = kms.encrypt(admin, "other", b"secret").ciphertext
    forged = other[:HEADER_SIZE - 12] + ct[HEADER_SIZE - 12:]  # other key's id, this body
    cases = [ct[:-1], ct[:HEADER_SIZE], b"", b"\x02" + ct[1:], forged,
             ct[:HEADER_SIZE] + bytes([ct[HEADER_SIZE] ^ 1]) + ct[HEADER_SIZE + 1:],
             ct[:17] + (99).to_bytes(4, "big") + ct[21:]]
    messages = set()
    for bad in cases:
        with pytest.raises(InvalidCiphertext) as exc:
            kms.decrypt(admin, bad)
        messages.add(exc.value.message)
    assert messages == {"invalid ciphertext"}


def test_plaintext_limit(store: object, clock: object, admin: RequestContext) -> None:
    kms = KMS(store, os.urandom(32), clock=clock, limits=Limits(max_plaintext=16))  # type: ignore[arg-type]
    create(kms, admin, "k")
    kms.encrypt(admin, "k", b"x" * 16)
    with pytest.raises(PayloadTooLarge):
        kms.encrypt(admin, "k", b"x" * 17)


def test_bad_context_is_a_request_error(kms: KMS, admin: RequestContext) -> None:
    create(kms, admin, "k")
    with pytest.raises(InvalidRequest):
        kms.encrypt(admin, "k", b"x", {"a": 1})  # type: ignore[dict-item]
    with pytest.raises(InvalidRequest):
        kms.encrypt(admin, "k", b"x", {str(i): "v" for i in range(65)})
    ct = kms.encrypt(admin, "k", b"x").ciphertext
    with pytest.raises(InvalidRequest):
        kms.decrypt(admin, ct, {"": "v"})


def test_rotation_keeps_old_ciphertext_decryptable(kms: KMS, admin: RequestContext) -> None:
    create(kms, admin, "k")
    old = kms.encrypt(admin, "k", b"v1", {"a": "b"}).ciphertext
    assert kms.rotate_key(admin, "k").latest_version == 2
    new = kms.encrypt(admin, "k", b"v2", {"a": "b"})
    assert new.key_version == 2
    assert kms.decrypt(admin, old, {"a": "b"}).plaintext == b"v1"
    assert kms.decrypt(admin, old, {"a": "b"}).key_version == 1


def test_min_decryption_version(kms: KMS, admin: RequestContext) -> None:
    create(kms, admin, "k")
    old = kms.encrypt(admin, "k", b"v1").ciphertext
    kms.rotate_key(admin, "k")
    info = kms.update_key(admin, "k", m.UpdateKeyRequest(min_decryption_version=2))
    assert info.min_decryption_version == 2
    with pytest.raises(InvalidCiphertext):
        kms.decrypt(admin, old)
    with pytest.raises(KeyVersionError):
        kms.update_key(admin, "k", m.UpdateKeyRequest(min_decryption_version=3))
    kms.update_key(admin, "k", m.UpdateKeyRequest(min_decryption_version=1))
    assert kms.decrypt(admin, old).plaintext == b"v1"


def test_re_encrypt_to_latest_and_to_another_key(kms: KMS, admin: RequestContext) -> None:
    a = create(kms, admin, "a")
    b = create(kms, admin, "b", spec="chacha20-poly1305")
    ct = kms.encrypt(admin, "a", b"data", {"t": "1"}).ciphertext
    kms.rotate_key(admin, "a")
    same = kms.re_encrypt(admin, m.ReEncryptRequest(ciphertext=ct, context={"t": "1"}))
    assert (same.key_id, same.key_version, same.source_key_version) == (a.id, 2, 1)
    assert not hasattr(same, "plaintext")
    assert kms.decrypt(admin, same.ciphertext, {"t": "1"}).plaintext == b"data"
    moved = kms.re_encrypt(admin, m.ReEncryptRequest(
        ciphertext=ct, context={"t": "1"}, destination_key="b", destination_context={"t": "2"}))
    assert moved.key_id == b.id and moved.source_key_id == a.id
    assert kms.decrypt(admin, moved.ciphertext, {"t": "2"}).plaintext == b"data"
    create(kms, admin, "s", spec="ed25519")
    with pytest.raises(InvalidKeyUsage):
        kms.re_encrypt(admin, m.ReEncryptRequest(ciphertext=ct, context={"t": "1"},
                                                 destination_key="s"))
    with pytest.raises(InvalidCiphertext):
        kms.re_encrypt(admin, m.ReEncryptRequest(ciphertext=ct, context={"t": "9"}))


def test_re_encrypt_destination_errors_are_precise(kms: KMS, admin: RequestContext) -> None:
    """An empty destination re-encrypted under the source key; a destination that does not
    encrypt got the generic usage message, not the documented one."""
    create(kms, admin, "a")
    create(kms, admin, "m", spec="hmac-sha256")
    ct = kms.encrypt(admin, "a", b"data").ciphertext
    with pytest.raises(InvalidRequest, match="destination_key is empty"):
        kms.re_encrypt(admin, m.ReEncryptRequest(ciphertext=ct, destination_key=""))
    with pytest.raises(InvalidKeyUsage) as usage:
        kms.re_encrypt(admin, m.ReEncryptRequest(ciphertext=ct, destination_key="m"))
    assert usage.value.message == "the destination key is not an encryption key"
    assert kms.re_encrypt(admin, m.ReEncryptRequest(ciphertext=ct)).key_id == \
        kms.describe_key(admin, "a").id


@pytest.mark.parametrize("size", [16, 32, 64])
def test_data_keys(kms: KMS, admin: RequestContext, size: int) -> None:
    create(kms, admin, "k")
    dk = kms.generate_data_key(admin, "k", m.DataKeyRequest(bytes=size, context={"f": "x"}))
    assert dk.plaintext is not None and len(dk.plaintext) == size
    assert kms.decrypt(admin, dk.ciphertext, {"f": "x"}).plaintext == dk.plaintext
    bare = kms.generate_data_key(admin, "k", m.DataKeyRequest(bytes=size, include_plaintext=False))
    assert bare.plaintext is None
    assert len(kms.decrypt(admin, bare.ciphertext).plaintext) == size


def test_data_key_size_is_checked(kms: KMS, admin: RequestContext) -> None:
    create(kms, admin, "k")
    with pytest.raises(InvalidRequest):
        kms.generate_data_key(admin, "k", m.DataKeyRequest(bytes=24))


def test_batches(kms: KMS, admin: RequestContext) -> None:
    create(kms, admin, "k")
    items = [m.BatchEncryptItem(plaintext=f"p{i}".encode(), context={"i": str(i)}) for i in range(5)]
    enc = kms.batch_encrypt(admin, "k", items)
    assert all(r.error is None for r in enc.results)
    cts = [r.ciphertext for r in enc.results]
    dec_items = [m.BatchDecryptItem(ciphertext=c, context={"i": str(i)})  # type: ignore[arg-type]
                 for i, c in enumerate(cts)]
    dec_items[2] = m.BatchDecryptItem(ciphertext=cts[2], context={"i": "wrong"})  # type: ignore[arg-type]
    dec = kms.batch_decrypt(admin, dec_items)
    assert [r.plaintext for r in dec.results] == [b"p0", b"p1", None, b"p3", b"p4"]
    assert dec.results[2].error is not None and dec.results[2].error.code == "invalid_ciphertext"
    with pytest.raises(InvalidRequest):
        kms.batch_encrypt(admin, "k", [])
    with pytest.raises(PayloadTooLarge):
        kms.batch_encrypt(admin, "k", [m.BatchEncryptItem(plaintext=b"")] * 1001)
    kms.batch_encrypt(admin, "k", [m.BatchEncryptItem(plaintext=b"")] * 1000)


# -- signing, MAC, derive ---------------------------------------------------------------------

@pytest.mark.parametrize("spec", SIGNING)
def test_sign_verify(kms: KMS, admin: RequestContext, spec: str) -> None:
    create(kms, admin, "s", spec=spec)
    sig = kms.sign(admin, "s", b"message")
    ok = kms.verify(admin, "s", m.VerifyRequest(message=b"message", signature=sig.signature))
    assert ok.valid and ok.key_version == 1
    bad = kms.verify(admin, "s", m.VerifyRequest(message=b"messagf", signature=sig.signature))
    assert not bad.valid and bad.key_version is None
    pub = kms.get_public_key(admin, "s")
    loaded = serialization.load_pem_public_key(pub.pem.encode())
    assert pub.jwk["kid"] == f"{pub.key_id}:1" and pub.jwk["use"] == "sig"
    assert loaded is not None
    # After rotation, old signatures still verify (every live version is tried).
    kms.rotate_key(admin, "s")
    again = kms.verify(admin, "s", m.VerifyRequest(message=b"message", signature=sig.signature))
    assert again.valid and again.key_version == 1
    assert kms.sign(admin, "s", b"m").key_version == 2


@pytest.mark.parametrize("spec", ["ecdsa-p256", "rsa-pss-3072"])
def test_sign_digest(kms: KMS, admin: RequestContext, spec: str) -> None:
    create(kms, admin, "s", spec=spec)
    digest = hashlib.sha256(b"message").digest()
    sig = kms.sign(admin, "s", digest, "digest").signature
    assert kms.verify(admin, "s", m.VerifyRequest(message=b"message", signature=sig)).valid
    assert kms.verify(admin, "s", m.VerifyRequest(message=digest, signature=sig,
                                                  message_type="digest")).valid
    with pytest.raises(InvalidRequest):
        kms.sign(admin, "s", b"short", "digest")


def test_ed25519_refuses_digest_mode(kms: KMS, admin: RequestContext) -> None:
    create(kms, admin, "s", spec="ed25519")
    with pytest.raises(InvalidRequest):
        kms.sign(admin, "s", hashlib.sha256(b"m").digest(), "digest")


def test_mac(kms: KMS, admin: RequestContext) -> None:
    create(kms, admin, "h", spec="hmac-sha256")
    tag = kms.mac(admin, "h", b"msg").mac
    assert len(tag) == 32
    assert kms.verify_mac(admin, "h", m.VerifyMacRequest(message=b"msg", mac=tag)).valid
    assert not kms.verify_mac(admin, "h", m.VerifyMacRequest(message=b"msg", mac=tag[:16])).valid
    assert not kms.verify_mac(admin, "h", m.VerifyMacRequest(message=b"msh", mac=tag)).valid
    kms.rotate_key(admin, "h")
    assert kms.verify_mac(admin, "h", m.VerifyMacRequest(message=b"msg", mac=tag)).key_version == 1
    with pytest.raises(KeyVersionError):
        kms.verify_mac(admin, "h", m.VerifyMacRequest(message=b"msg", mac=tag, key_version=7))


@pytest.mark.parametrize(("spec", "op"), [
    ("aes-256-gcm", lambda k, c: k.sign(c, "k", b"m")),
    ("aes-256-gcm", lambda k, c: k.mac(c, "k", b"m")),
    ("ed25519", lambda k, c: k.encrypt(c, "k", b"m")),
    ("ed25519", lambda k, c: k.generate_data_key(c, "k", m.DataKeyRequest())),
    ("hmac-sha256", lambda k, c: k.encrypt(c, "k", b"m")),
    ("hmac-sha256", lambda k, c: k.get_public_key(c, "k")),
    ("aes-256-gcm", lambda k, c: k.derive(c, "k", m.DeriveRequest(context={"a": "b"}))),
])
def test_operation_must_match_purpose(kms: KMS, admin: RequestContext, spec: str, op: object) -> None:
    create(kms, admin, "k", spec=spec)
    with pytest.raises(InvalidKeyUsage):
        op(kms, admin)  # type: ignore[operator]


@pytest.mark.parametrize("spec", ["aes-256-gcm", "chacha20-poly1305", "hmac-sha256"])
def test_derive(kms: KMS, admin: RequestContext, spec: str) -> None:
    create(kms, admin, "d", spec=spec, derivable=True)
    create(kms, admin, "e", spec=spec, derivable=True)
    a = kms.derive(admin, "d", m.DeriveRequest(context={"tenant": "1"}, length=48))
    assert len(a.derived) == 48
    assert kms.derive(admin, "d", m.DeriveRequest(context={"tenant": "1"}, length=48)) == a
    assert kms.derive(admin, "d", m.DeriveRequest(context={"tenant": "2"}, length=48)).derived != a.derived
    assert kms.derive(admin, "e", m.DeriveRequest(context={"tenant": "1"}, length=48)).derived != a.derived
    salted = kms.derive(admin, "d", m.DeriveRequest(context={"tenant": "1"}, length=48, salt=b"s"))
    assert salted.derived != a.derived
    kms.rotate_key(admin, "d")
    assert kms.derive(admin, "d", m.DeriveRequest(context={"tenant": "1"}, length=48,
                                                  key_version=1)) == a
    with pytest.raises(InvalidRequest):
        kms.derive(admin, "d", m.DeriveRequest(context={}, length=0))
    with pytest.raises(InvalidRequest):
        kms.derive(admin, "d", m.DeriveRequest(context={}, length=1025))


def test_random(kms: KMS, admin: RequestContext) -> None:
    a, b = kms.random(admin, 32).random, kms.random(admin, 32).random
    assert len(a) == 32 and a != b
    for n in (0, 1025):
        with pytest.raises(InvalidRequest):
            kms.random(admin, n)


# -- states -----------------------------------------------------------------------------------

def test_disable_enable(kms: KMS, admin: RequestContext) -> None:
    create(kms, admin, "k")
    ct = kms.encrypt(admin, "k", b"x").ciphertext
    assert kms.disable_key(admin, "k").state == "disabled"
    with pytest.raises(KeyDisabled):
        kms.encrypt(admin, "k", b"x")
    with pytest.raises(KeyDisabled):
        kms.decrypt(admin, ct)
    kms.rotate_key(admin, "k")  # rotation of a disabled key is allowed
    assert kms.enable_key(admin, "k").state == "enabled"
    assert kms.decrypt(admin, ct).plaintext == b"x"


def test_deletion_window_cancel_and_destroy(kms: KMS, admin: RequestContext, clock: object) -> None:
    create(kms, admin, "k")
    ct = kms.encrypt(admin, "k", b"x").ciphertext
    for days in (6, 31):
        with pytest.raises(InvalidRequest):
            kms.schedule_deletion(admin, "k", days)
    kms.disable_key(admin, "k")
    info = kms.schedule_deletion(admin, "k", 7)
    assert info.state == "pending_deletion" and info.deletion_date is not None
    with pytest.raises(KeyPendingDeletion):
        kms.decrypt(admin, ct)
    with pytest.raises(KeyStateError):
        kms.enable_key(admin, "k")
    with pytest.raises(KeyStateError):
        kms.rotate_key(admin, "k")
    assert kms.cancel_deletion(admin, "k").state == "disabled"  # the state it had before
    kms.enable_key(admin, "k")
    kms.schedule_deletion(admin, "k", 7)
    assert kms.cancel_deletion(admin, "k").state == "enabled"
    assert kms.decrypt(admin, ct).plaintext == b"x"

    kms.schedule_deletion(admin, "k", 7)
    clock.advance(7 * 86400 - 10)  # type: ignore[attr-defined]
    assert kms.run_due() == (0, 0)
    clock.advance(20)  # type: ignore[attr-defined]
    assert kms.run_due() == (0, 1)
    assert kms.describe_key(admin, "k").state == "destroyed"
    with pytest.raises(KeyDestroyed):
        kms.decrypt(admin, ct)
    with pytest.raises(KeyStateError):
        kms.cancel_deletion(admin, "k")
    assert all(v.sealed == b"" for v in kms.store.get_versions(kms.describe_key(admin, "k").id))


def test_enabling_a_destroyed_key_says_it_is_destroyed(kms: KMS, admin: RequestContext,
                                                      clock: object) -> None:
    """It said 'cancel the deletion first', for a key whose deletion cannot be cancelled."""
    create(kms, admin, "k")
    kms.schedule_deletion(admin, "k", 7)
    with pytest.raises(KeyStateError) as pending:
        kms.enable_key(admin, "k")
    assert pending.value.message == "key 'k' is pending deletion; cancel the deletion first"
    clock.advance(8 * 86400)  # type: ignore[attr-defined]
    assert kms.run_due() == (0, 1)
    with pytest.raises(KeyDestroyed) as destroyed:
        kms.enable_key(admin, "k")
    assert destroyed.value.message == "key 'k' has been destroyed"


def test_scheduled_rotation(kms: KMS, admin: RequestContext, clock: object) -> None:
    info = create(kms, admin, "k", rotation_period=3600)
    assert info.next_rotation_at is not None
    create(kms, admin, "manual")
    clock.advance(3599)  # type: ignore[attr-defined]
    assert kms.run_due() == (0, 0)
    clock.advance(1)  # type: ignore[attr-defined]
    assert kms.run_due() == (1, 0)
    after = kms.describe_key(admin, "k")
    assert after.latest_version == 2
    assert after.next_rotation_at is not None and after.next_rotation_at > info.next_rotation_at
    assert kms.describe_key(admin, "manual").latest_version == 1
    assert kms.run_due() == (0, 0)
    # A disabled key is not rotated; turning the period off stops rotation.
    kms.update_key(admin, "k", m.UpdateKeyRequest(rotation_period=0))
    clock.advance(10 * 3600)  # type: ignore[attr-defined]
    assert kms.run_due() == (0, 0)


def test_scheduler_state_survives_restart(store: object, clock: object, admin: RequestContext) -> None:
    root = os.urandom(32)
    first = KMS(store, root, clock=clock)  # type: ignore[arg-type]
    create(first, admin, "k", rotation_period=60)
    ct = first.encrypt(admin, "k", b"x").ciphertext
    clock.advance(61)  # type: ignore[attr-defined]
    second = KMS(store, root, clock=clock)  # type: ignore[arg-type]  # a restarted server
    assert second.run_due() == (1, 0)
    assert second.decrypt(admin, ct).plaintext == b"x"
    assert second.encrypt(admin, "k", b"y").key_version == 2


def test_wrong_root_key_cannot_use_keys(store: object, clock: object, admin: RequestContext) -> None:
    first = KMS(store, os.urandom(32), clock=clock)  # type: ignore[arg-type]
    create(first, admin, "k")
    second = KMS(store, os.urandom(32), clock=clock)  # type: ignore[arg-type]
    with pytest.raises(InvalidCiphertext):
        second.encrypt(admin, "k", b"x")


def test_material_never_in_results(kms: KMS, admin: RequestContext) -> None:
    import msgspec

    create(kms, admin, "k")
    info = kms.describe_key(admin, "k")
    versions = kms.store.get_versions(info.id)
    encoded = msgspec.json.encode(info)
    assert versions[0].sealed not in encoded
    assert b"sealed" not in encoded



def test_unknown_key_ids_in_ciphertext_are_remembered(kms: KMS, admin: RequestContext) -> None:
    import uuid as _uuid

    create(kms, admin, "k")
    ct = bytearray(kms.encrypt(admin, "k", b"x").ciphertext)
    ct[1:17] = _uuid.uuid4().bytes
    calls = 0
    real_get = kms.store.get_key

    def counting_get(key_id: str):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        return real_get(key_id)

    kms.store.get_key = counting_get  # type: ignore[method-assign]
    for _ in range(3):
        with pytest.raises(InvalidCiphertext):
            kms.decrypt(admin, bytes(ct))
    assert calls == 1  # the store was asked once, then the miss was remembered
