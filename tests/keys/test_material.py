"""KeyMaterial beyond encryption: signing, MAC, and the derive format (pinned)."""

from __future__ import annotations

import uuid

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from keygrants.keys import KeyMaterial, generate_material, get_spec

KEY_ID = uuid.UUID("00112233-4455-6677-8899-aabbccddeeff")
SECRET = bytes(range(32))
CONTEXT = {"b": "2", "a": "1"}

# Derived keys must never change across releases: pinned once, from the reference below.
PINNED_DERIVED = bytes.fromhex("1a3f76022e0fa8ef26080786ceb58cb883357f97670b71b9a0a0937bd2c53de3")


def _material(spec: str = "aes-256-gcm", *, key_id: uuid.UUID = KEY_ID, version: int = 7,
              secret: bytes = SECRET) -> KeyMaterial:
    return KeyMaterial(get_spec(spec), key_id, version, secret)


def test_derive_matches_independent_reference() -> None:
    # info = label || key id || uint32 BE version || canonical context.
    info = b"keygrants derive v1\x00" + KEY_ID.bytes + b"\x00\x00\x00\x07" + b'{"a":"1","b":"2"}'
    reference = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"salt", info=info).derive(SECRET)
    assert reference == PINNED_DERIVED
    assert _material().derive(CONTEXT, salt=b"salt", length=32) == PINNED_DERIVED


@pytest.mark.parametrize("spec", ["aes-256-gcm", "chacha20-poly1305", "hmac-sha256"])
def test_derive_is_bound_to_key_version_context_and_salt(spec: str) -> None:
    base = _material(spec).derive(CONTEXT, salt=None, length=32)
    assert _material(spec).derive(dict(reversed(list(CONTEXT.items()))), salt=None,
                                  length=32) == base
    variants = [
        _material(spec, key_id=uuid.UUID(int=KEY_ID.int ^ 1)).derive(CONTEXT, salt=None,
                                                                     length=32),
        _material(spec, version=8).derive(CONTEXT, salt=None, length=32),
        _material(spec, secret=bytes(32)).derive(CONTEXT, salt=None, length=32),
        _material(spec).derive({"a": "1"}, salt=None, length=32),
        _material(spec).derive(None, salt=None, length=32),
        _material(spec).derive(CONTEXT, salt=b"s", length=32),
    ]
    assert base not in variants
    assert len(set(variants)) == len(variants)


@pytest.mark.parametrize("spec", ["ed25519", "ecdsa-p256"])
def test_signing_keys_cannot_derive(spec: str) -> None:
    m = KeyMaterial(get_spec(spec), KEY_ID, 1, generate_material(get_spec(spec)))
    with pytest.raises(ValueError):
        m.derive(None, salt=None, length=32)


@pytest.mark.parametrize("spec", ["ed25519", "ecdsa-p256"])
def test_sign_and_verify(spec: str) -> None:
    m = KeyMaterial(get_spec(spec), KEY_ID, 1, generate_material(get_spec(spec)))
    signature = m.sign(b"message")
    assert m.verify(b"message", signature) is True
    assert m.verify(b"messagE", signature) is False
    assert m.public_key().verify(b"message", signature) is True


def test_mac_and_verify_mac() -> None:
    m = _material("hmac-sha256")
    tag = m.mac(b"message")
    assert len(tag) == 32
    assert m.verify_mac(b"message", tag) is True
    assert m.verify_mac(b"message", tag[:16]) is False
    assert m.verify_mac(b"messagE", tag) is False
    assert _material("hmac-sha256", secret=bytes(32)).verify_mac(b"message", tag) is False


@pytest.mark.parametrize("spec", ["aes-256-gcm", "chacha20-poly1305", "hmac-sha256"])
def test_generate_symmetric_material(spec: str) -> None:
    a, b = generate_material(get_spec(spec)), generate_material(get_spec(spec))
    assert len(a) == len(b) == 32
    assert a != b


def test_material_refuses_wrong_size_secret() -> None:
    with pytest.raises(ValueError):
        _material(secret=bytes(16))
