"""The in-memory keyring: encrypt with the latest version, decrypt with any allowed one."""

from __future__ import annotations

import uuid

import pytest

from keygrants.errors import InvalidCiphertext
from keygrants.keys import Ciphertext, KeyMaterial, Keyring, KeyVersions, get_spec

KEY_ID = uuid.UUID("11111111-2222-3333-4444-555555555555")
OTHER_ID = uuid.UUID("66666666-7777-8888-9999-aaaaaaaaaaaa")
CONTEXT = {"tenant": "acme"}


def _version(version: int, key_id: uuid.UUID = KEY_ID) -> KeyMaterial:
    secret = bytes([version]) * 16 + key_id.bytes  # distinct per key and version
    return KeyMaterial(get_spec("aes-256-gcm"), key_id, version, secret)


V1, V2, V3 = _version(1), _version(2), _version(3)


def _ring(*, min_decryption_version: int = 1) -> Keyring:
    ring = Keyring()
    # Out of order on purpose: "latest" is the highest version, not the last given.
    ring.put(KeyVersions(KEY_ID, [V2, V3, V1], min_decryption_version=min_decryption_version))
    return ring


def test_encrypts_with_the_latest_version() -> None:
    ring = _ring()
    ct = Ciphertext.from_bytes(ring.encrypt(KEY_ID, b"hello", CONTEXT))
    assert (ct.key_id, ct.version) == (KEY_ID, 3)


def test_roundtrip() -> None:
    ring = _ring()
    assert ring.decrypt(ring.encrypt(KEY_ID, b"hello", CONTEXT), CONTEXT) == b"hello"


@pytest.mark.parametrize("old", [V1, V2, V3], ids=["v1", "v2", "v3"])
def test_decrypts_every_loaded_version(old: KeyMaterial) -> None:
    assert _ring().decrypt(old.encrypt(b"old", CONTEXT), CONTEXT) == b"old"


def test_refuses_versions_below_min_decryption_version() -> None:
    ring = _ring(min_decryption_version=2)
    with pytest.raises(InvalidCiphertext):
        ring.decrypt(V1.encrypt(b"old", CONTEXT), CONTEXT)
    assert ring.decrypt(V2.encrypt(b"ok", CONTEXT), CONTEXT) == b"ok"
    assert ring.decrypt(V3.encrypt(b"ok", CONTEXT), CONTEXT) == b"ok"


def test_unknown_version_is_invalid_ciphertext() -> None:
    ring = Keyring()
    ring.put(KeyVersions(KEY_ID, [V1, V2]))
    with pytest.raises(InvalidCiphertext):
        ring.decrypt(V3.encrypt(b"future"), None)


def test_unknown_key_is_invalid_ciphertext() -> None:
    foreign = _version(1, OTHER_ID)
    with pytest.raises(InvalidCiphertext):
        _ring().decrypt(foreign.encrypt(b"x"), None)


def test_dropped_key_no_longer_decrypts() -> None:
    ring = _ring()
    data = ring.encrypt(KEY_ID, b"x")
    ring.drop(KEY_ID)
    assert ring.get(KEY_ID) is None
    with pytest.raises(InvalidCiphertext):
        ring.decrypt(data)
    ring.drop(KEY_ID)  # dropping twice is harmless


def test_put_replaces_a_keys_versions() -> None:
    ring = _ring()
    ring.put(KeyVersions(KEY_ID, [V3], min_decryption_version=3))
    with pytest.raises(InvalidCiphertext):
        ring.decrypt(V2.encrypt(b"x"))
    assert ring.decrypt(V3.encrypt(b"x")) == b"x"


def test_keys_are_independent() -> None:
    ring = _ring()
    other = _version(1, OTHER_ID)
    ring.put(KeyVersions(OTHER_ID, [other]))
    a, b = ring.encrypt(KEY_ID, b"a"), ring.encrypt(OTHER_ID, b"b")
    assert Ciphertext.from_bytes(b).key_id == OTHER_ID
    assert (ring.decrypt(a), ring.decrypt(b)) == (b"a", b"b")


def test_decrypt_with_wrong_context_is_invalid_ciphertext() -> None:
    ring = _ring()
    data = ring.encrypt(KEY_ID, b"x", CONTEXT)
    with pytest.raises(InvalidCiphertext):
        ring.decrypt(data, {"tenant": "evil"})
    with pytest.raises(InvalidCiphertext):
        ring.decrypt(data)


@pytest.mark.parametrize("data", [b"", b"garbage", bytes(49), b"\x01" + bytes(48)])
def test_garbage_is_invalid_ciphertext(data: bytes) -> None:
    with pytest.raises(InvalidCiphertext):
        _ring().decrypt(data)


def test_key_versions_need_at_least_one_version() -> None:
    with pytest.raises(ValueError):
        KeyVersions(KEY_ID, [])


def test_for_decrypt() -> None:
    versions = KeyVersions(KEY_ID, [V1, V2, V3], min_decryption_version=2)
    assert versions.latest is V3
    assert versions.for_decrypt(2) is V2
    for retired_or_unknown in (0, 1, 4):
        with pytest.raises(InvalidCiphertext):
            versions.for_decrypt(retired_or_unknown)
