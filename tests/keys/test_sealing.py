"""Sealing key version material under the root key (AAD = 0x01 || key id || version)."""

from __future__ import annotations

import struct
import uuid

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keygrants.crypto import Aead
from keygrants.errors import InvalidCiphertext
from keygrants.keys import seal_key_version, unseal_key_version

ROOT_KEY = bytes(range(100, 132))
KEY_ID = uuid.UUID("0f0e0d0c-0b0a-0908-0706-050403020100")
VERSION = 3
SECRET = bytes(range(32))


@pytest.fixture
def root() -> Aead:
    return Aead("aes-256-gcm", ROOT_KEY)


@pytest.fixture
def blob(root: Aead) -> bytes:
    return seal_key_version(root, KEY_ID, VERSION, SECRET)


@pytest.mark.parametrize("secret", [b"", SECRET, bytes(1200)])
def test_roundtrip(root: Aead, secret: bytes) -> None:
    blob = seal_key_version(root, KEY_ID, VERSION, secret)
    assert unseal_key_version(root, KEY_ID, VERSION, blob) == secret


def test_layout_matches_independent_reference(blob: bytes) -> None:
    # 0x01 | nonce (12) | ciphertext || tag, AAD = 0x01 || key id || uint32 BE version.
    assert blob[0] == 0x01
    assert len(blob) == 1 + 12 + len(SECRET) + 16
    aad = b"\x01" + KEY_ID.bytes + struct.pack(">I", VERSION)
    assert AESGCM(ROOT_KEY).decrypt(blob[1:13], blob[13:], aad) == SECRET


def test_blob_does_not_contain_the_secret(blob: bytes) -> None:
    assert SECRET not in blob


def test_fresh_nonce_per_seal(root: Aead) -> None:
    a = seal_key_version(root, KEY_ID, VERSION, SECRET)
    b = seal_key_version(root, KEY_ID, VERSION, SECRET)
    assert a[1:13] != b[1:13]


@pytest.mark.parametrize(
    ("key_id", "version"),
    [
        pytest.param(uuid.UUID(int=KEY_ID.int ^ 1), VERSION, id="other-key-id"),
        pytest.param(KEY_ID, VERSION + 1, id="next-version"),
        pytest.param(KEY_ID, VERSION - 1, id="previous-version"),
        pytest.param(uuid.UUID(int=KEY_ID.int ^ 1), VERSION + 1, id="both"),
    ],
)
def test_blob_moved_to_another_slot_fails(root: Aead, blob: bytes, key_id: uuid.UUID,
                                          version: int) -> None:
    with pytest.raises(InvalidCiphertext):
        unseal_key_version(root, key_id, version, blob)


@pytest.mark.parametrize(
    "other",
    [
        pytest.param(Aead("aes-256-gcm", bytes(range(101, 133))), id="other-aes-root"),
        pytest.param(Aead("chacha20-poly1305", ROOT_KEY), id="same-bytes-chacha-root"),
    ],
)
def test_other_root_key_fails(blob: bytes, other: Aead) -> None:
    with pytest.raises(InvalidCiphertext):
        unseal_key_version(other, KEY_ID, VERSION, blob)


def test_every_bit_flip_fails(root: Aead, blob: bytes) -> None:
    for position in range(len(blob)):
        for bit in range(8):
            tampered = bytearray(blob)
            tampered[position] ^= 1 << bit
            with pytest.raises(InvalidCiphertext):
                unseal_key_version(root, KEY_ID, VERSION, bytes(tampered))


def test_every_truncation_and_extension_fails(root: Aead, blob: bytes) -> None:
    for length in range(len(blob)):
        with pytest.raises(InvalidCiphertext):
            unseal_key_version(root, KEY_ID, VERSION, blob[:length])
    with pytest.raises(InvalidCiphertext):
        unseal_key_version(root, KEY_ID, VERSION, blob + b"\x00")
