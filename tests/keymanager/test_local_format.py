"""The KeyManager's formats pinned byte for byte, and systematic negative tests.

Local v1 (``local_encrypt``)::  0x01 | data key id (16) | nonce (12) | AES-256-GCM ct || tag
                                AAD = canonical context (none when empty)
Field v1 (``encrypt_field``)::  0x02 | data key id (16) | nonce (12) | AES-256-GCM(type || value)
                                AAD = 0x02 || canonical context
Envelope v1 (``encrypt``)::     0x01 | A | algorithm (A) | W (uint16 BE) | wrapped key (W) | nonce
                                | AES-256-GCM ct || tag;  AAD = header || canonical context

A deterministic provider (fixed data key and wrapped blob) and the ``rng`` seam (fixed nonce)
make every byte reproducible; an independent reference built from ``hashlib`` and ``AESGCM``
checks each pin.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keygrants.errors import DecryptionError, InvalidCiphertext
from keygrants.keymanager import (
    ENVELOPE_ALGORITHM,
    EnvelopeCiphertext,
    KeyManager,
    LocalCiphertext,
    data_key_id,
)
from keygrants.providers.models import EncryptedData

pytestmark = pytest.mark.anyio

KEY = bytes(range(0x40, 0x60))
WRAPPED = b"wrapped-data-key"
NONCE = bytes.fromhex("c0c1c2c3c4c5c6c7c8c9cacb")
PLAINTEXT = b"attack at dawn"
CONTEXT = {"b": "2", "a": "1"}
CANONICAL = b'{"a":"1","b":"2"}'

DATA_KEY_ID = bytes.fromhex("dd96ec48aedcc09aa8395bea9b2abf7f")
PINNED_LOCAL = bytes.fromhex(
    "01"  # format: local v1
    "dd96ec48aedcc09aa8395bea9b2abf7f"  # data key id
    "c0c1c2c3c4c5c6c7c8c9cacb"  # nonce
    "3e3044af19f11d8a00994057dccd"  # ciphertext
    "65d00208afffc4e86ce8c0605028d305"  # tag
)
PINNED_LOCAL_CONTEXT = bytes.fromhex(
    "01dd96ec48aedcc09aa8395bea9b2abf7fc0c1c2c3c4c5c6c7c8c9cacb"
    "3e3044af19f11d8a00994057dccdad45a6cea18f9dfb46e7057f4c3e1037"
)
PINNED_FIELD = bytes.fromhex(
    "02dd96ec48aedcc09aa8395bea9b2abf7fc0c1c2c3c4c5c6c7c8c9cacb"
    "5e2c55a216f543f785b6a0703e3c717333ead61f36b1"
)
PINNED_ENVELOPE = bytes.fromhex(
    "01"  # format: envelope v1
    "09" "544553545f57524150"  # algorithm name length, "TEST_WRAP"
    "0010" "777261707065642d646174612d6b6579"  # wrapped key length, "wrapped-data-key"
    "c0c1c2c3c4c5c6c7c8c9cacb"  # nonce
    "3e3044af19f11d8a00994057dccd"  # ciphertext
    "d2248984ebc3f16b6aadade203bf80b8"  # tag
)


def _reference_data_key_id() -> bytes:
    h = hashlib.sha256(b"keygrants data key id v1\x00")
    for part in (b"fixed", b"k1", b"TEST_WRAP", b'{"purpose":"keygrants-data-key"}', WRAPPED):
        h.update(len(part).to_bytes(4, "big") + part)
    return h.digest()[:16]


def _reference_local(fmt: int, plaintext: bytes, canonical: bytes) -> bytes:
    aad = canonical if fmt == 1 else bytes([fmt]) + canonical
    return bytes([fmt]) + DATA_KEY_ID + NONCE + AESGCM(KEY).encrypt(NONCE, plaintext, aad)


@pytest.fixture
async def km(fixed_cls: Any) -> KeyManager:
    manager = KeyManager({"fixed": fixed_cls(KEY, WRAPPED)}, rng=lambda n: NONCE)
    await manager.initialize()
    return manager


# -- pins -----------------------------------------------------------------------------------------

async def test_data_key_id_is_pinned(km: KeyManager) -> None:
    assert _reference_data_key_id() == DATA_KEY_ID
    assert km.current_data_key_id == DATA_KEY_ID.hex()
    wrapped = km.export_data_keys()[0]
    assert wrapped["id"] == DATA_KEY_ID.hex()
    # Timestamps are not part of the id: any serialization of the wrapped key keeps it.
    enc = EncryptedData.from_dict(wrapped["wrapped_key"])
    later = EncryptedData(enc.ciphertext, enc.key_reference, enc.algorithm, context=enc.context)
    assert data_key_id(later) == DATA_KEY_ID


async def test_local_format_is_pinned(km: KeyManager) -> None:
    ct = km.local_encrypt(PLAINTEXT)
    assert ct == _reference_local(1, PLAINTEXT, b"") == PINNED_LOCAL
    ctx_ct = km.local_encrypt(PLAINTEXT, context=CONTEXT)
    assert ctx_ct == _reference_local(1, PLAINTEXT, CANONICAL) == PINNED_LOCAL_CONTEXT
    assert km.local_decrypt(PINNED_LOCAL) == PLAINTEXT
    assert km.local_decrypt(PINNED_LOCAL_CONTEXT, context={"a": "1", "b": "2"}) == PLAINTEXT
    parsed = LocalCiphertext.from_bytes(ct)
    assert (parsed.format, parsed.data_key_id, parsed.nonce) == (1, DATA_KEY_ID, NONCE)
    assert parsed.to_bytes() == ct and len(ct) == len(PLAINTEXT) + 45
    assert KeyManager.data_key_id_of(ct) == DATA_KEY_ID.hex()


async def test_field_format_is_pinned(km: KeyManager) -> None:
    ct = await km.encrypt_field("hello", context=CONTEXT)
    assert ct == _reference_local(2, b"\x01hello", CANONICAL) == PINNED_FIELD
    assert await km.decrypt_field(PINNED_FIELD, context=CONTEXT) == "hello"
    assert _reference_local(2, b'\x03{"a":[1,2]}', b"") == await km.encrypt_field(
        {"a": [1, 2]}, field_type="json")
    assert _reference_local(2, b"\x02\x00\xff", b"") == await km.encrypt_field(
        b"\x00\xff", field_type="bytes")


async def test_envelope_format_is_pinned(fixed_cls: Any) -> None:
    provider = fixed_cls(KEY, WRAPPED)
    provider.expected_context = CONTEXT
    km = KeyManager({"fixed": provider}, rng=lambda n: NONCE)
    enc = await km.encrypt(PLAINTEXT, context=CONTEXT)
    header = b"\x01\x09TEST_WRAP\x00\x10" + WRAPPED
    assert enc.ciphertext == header + NONCE + AESGCM(KEY).encrypt(NONCE, PLAINTEXT, header + CANONICAL)
    assert enc.ciphertext == PINNED_ENVELOPE
    assert enc.algorithm == ENVELOPE_ALGORITHM and enc.context == CONTEXT
    assert enc.key_reference.provider == "fixed" and enc.key_reference.key_id == "k1"
    env = EnvelopeCiphertext.from_bytes(enc.ciphertext)
    assert (env.algorithm, env.wrapped_key, env.header, env.nonce) == ("TEST_WRAP", WRAPPED, header, NONCE)
    assert await km.decrypt(enc) == PLAINTEXT
    assert not km.is_initialized  # the per-request path needs no cached data key


# -- negatives --------------------------------------------------------------------------------------

def _flips(data: bytes) -> list[bytes]:
    return [data[:i] + bytes([data[i] ^ bit]) + data[i + 1:] for i in range(len(data))
            for bit in (0x01, 0x80)]


async def test_local_every_flipped_bit_fails(km: KeyManager) -> None:
    """Format byte, data key id, nonce, ciphertext and tag: every bit of every region."""
    for ct, ctx in ((PINNED_LOCAL, None), (PINNED_LOCAL_CONTEXT, CONTEXT)):
        for bad in _flips(ct):
            with pytest.raises(DecryptionError):
                km.local_decrypt(bad, context=ctx)
            with pytest.raises(DecryptionError):
                await km.local_decrypt_fetching(bad, context=ctx)


async def test_local_truncation_extension_and_context(km: KeyManager) -> None:
    for n in range(len(PINNED_LOCAL)):
        with pytest.raises(DecryptionError):
            km.local_decrypt(PINNED_LOCAL[:n])
    with pytest.raises(DecryptionError):
        km.local_decrypt(PINNED_LOCAL + b"\x00")
    for ctx in ({"a": "1"}, {"a": "1", "b": "3"}, {**CONTEXT, "c": "3"}, None):
        with pytest.raises(DecryptionError):
            km.local_decrypt(PINNED_LOCAL_CONTEXT, context=ctx)
    with pytest.raises(DecryptionError):
        km.local_decrypt(PINNED_LOCAL, context=CONTEXT)


async def test_formats_never_cross(km: KeyManager) -> None:
    """A field never opens as local data and the other way round, even with the byte swapped."""
    with pytest.raises(DecryptionError):
        km.local_decrypt(PINNED_FIELD, context=CONTEXT)
    with pytest.raises(DecryptionError):
        km.local_decrypt(b"\x01" + PINNED_FIELD[1:], context=CONTEXT)
    with pytest.raises(DecryptionError):
        await km.decrypt_field(PINNED_LOCAL)
    with pytest.raises(DecryptionError):
        await km.decrypt_field(b"\x02" + PINNED_LOCAL[1:])
    with pytest.raises(DecryptionError):
        await km.decrypt_field(PINNED_FIELD, context=CONTEXT, field_type="bytes")


async def test_field_every_flipped_bit_fails(km: KeyManager) -> None:
    for bad in _flips(PINNED_FIELD):
        with pytest.raises(DecryptionError):
            await km.decrypt_field(bad, context=CONTEXT)
    for n in range(len(PINNED_FIELD)):
        with pytest.raises(DecryptionError):
            await km.decrypt_field(PINNED_FIELD[:n], context=CONTEXT)


async def test_another_data_key_does_not_open_it(fixed_cls: Any) -> None:
    other = KeyManager({"fixed": fixed_cls(bytes(32), WRAPPED)}, rng=lambda n: NONCE)
    await other.initialize()
    # Same wrapped blob, so the same id, but another key: the tag fails.
    assert other.current_data_key_id == DATA_KEY_ID.hex()
    with pytest.raises(DecryptionError):
        other.local_decrypt(PINNED_LOCAL)


async def test_envelope_every_flipped_bit_and_truncation_fails(fixed_cls: Any) -> None:
    provider = fixed_cls(KEY, WRAPPED)
    provider.expected_context = CONTEXT
    km = KeyManager({"fixed": provider})
    enc = await km.encrypt(PLAINTEXT, context=CONTEXT)

    def variant(ct: bytes) -> EncryptedData:
        return EncryptedData(ct, enc.key_reference, enc.algorithm, context=CONTEXT)

    for bad in _flips(enc.ciphertext):
        with pytest.raises(DecryptionError):
            await km.decrypt(variant(bad))
    for n in range(len(enc.ciphertext)):
        with pytest.raises(DecryptionError):
            await km.decrypt(variant(enc.ciphertext[:n]))
    for ctx in ({"a": "1"}, {}):
        with pytest.raises(DecryptionError):
            await km.decrypt(enc, context=ctx)


async def test_the_error_is_one_opaque_message(km: KeyManager) -> None:
    messages = set()
    for bad in (b"", PINNED_LOCAL[:-1], b"\x03" + PINNED_LOCAL[1:], _flips(PINNED_LOCAL)[40],
                PINNED_LOCAL_CONTEXT, b"\x01" + bytes(16) + PINNED_LOCAL[17:]):
        try:
            km.local_decrypt(bad)
        except DecryptionError as exc:
            assert isinstance(exc, InvalidCiphertext) and exc.code == "decryption_failed"
            messages.add(str(exc))
    assert messages == {"decryption failed"}


def test_envelope_header_bounds() -> None:
    from keygrants.errors import EncryptionError

    with pytest.raises(EncryptionError):
        EnvelopeCiphertext.build_header("x" * 65, b"w")
    with pytest.raises(EncryptionError):
        EnvelopeCiphertext.build_header("é", b"w")
    with pytest.raises(EncryptionError):
        EnvelopeCiphertext.build_header("A", b"w" * 8193)
    with pytest.raises(EncryptionError):
        EnvelopeCiphertext.build_header("A", b"")
    bad_alg = b"\x01\x00" + bytes(40)
    with pytest.raises(DecryptionError):
        EnvelopeCiphertext.from_bytes(bad_alg)
    non_ascii = b"\x01\x01\xff\x00\x01w" + bytes(28)
    with pytest.raises(DecryptionError):
        EnvelopeCiphertext.from_bytes(non_ascii)
