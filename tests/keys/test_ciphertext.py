"""The native ciphertext format, pinned byte for byte, and its systematic negative tests.

Layout (DESIGN.md "Formats"): ``0x01 | key id (16) | key version (uint32 BE) | nonce (12) |
AEAD ciphertext || tag``, AAD = header || RFC 8785 canonical context (empty map = no bytes).
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Callable, Mapping

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from keygrants.errors import InvalidCiphertext, InvalidRequest
from keygrants.keys import (
    HEADER_SIZE,
    Ciphertext,
    KeyMaterial,
    Keyring,
    KeyVersions,
    canonical_context,
    get_spec,
)
from keygrants.keys.context import (
    MAX_CONTEXT_BYTES,
    MAX_CONTEXT_ENTRIES,
    MAX_CONTEXT_KEY_LENGTH,
    MAX_CONTEXT_VALUE_LENGTH,
)

KEY = bytes(range(32))
KEY_ID = uuid.UUID("00112233-4455-6677-8899-aabbccddeeff")
VERSION = 7
NONCE = bytes.fromhex("a0a1a2a3a4a5a6a7a8a9aaab")
PLAINTEXT = b"attack at dawn"
CONTEXT = {"b": "2", "a": "1"}
CANONICAL_CONTEXT = b'{"a":"1","b":"2"}'

# Computed once with the independent reference below; a format change must fail here.
PINNED_AES_GCM = bytes.fromhex(
    "01"  # format version
    "00112233445566778899aabbccddeeff"  # key id
    "00000007"  # key version
    "a0a1a2a3a4a5a6a7a8a9aaab"  # nonce
    "876c084c26a022de1645e3b27014"  # ciphertext
    "1c7a5e7577e5ca745772b10190f68238"  # tag
)
PINNED_AES_GCM_NO_CONTEXT = bytes.fromhex(
    "0100112233445566778899aabbccddeeff00000007a0a1a2a3a4a5a6a7a8a9aaab"
    "876c084c26a022de1645e3b270141825595a502bc78c6d594f4aed5b235f"
)
PINNED_CHACHA20_POLY1305 = bytes.fromhex(
    "0100112233445566778899aabbccddeeff00000007a0a1a2a3a4a5a6a7a8a9aaab"
    "6ddf0c3e2e8de2ccd42f97758b940d7354f8093c68a65678c55116bcfd2b"
)


def _reference_header() -> bytes:
    return b"\x01" + KEY_ID.bytes + struct.pack(">I", VERSION) + NONCE


def _material(spec: str = "aes-256-gcm", *, key: bytes = KEY, key_id: uuid.UUID = KEY_ID,
              version: int = VERSION) -> KeyMaterial:
    return KeyMaterial(get_spec(spec), key_id, version, key)


@pytest.fixture
def material() -> KeyMaterial:
    return _material()


@pytest.fixture
def pinned() -> bytes:
    return _material().encrypt(PLAINTEXT, CONTEXT, nonce=NONCE)


# -- byte-level pin ------------------------------------------------------------------------


def test_header_layout() -> None:
    assert HEADER_SIZE == 33
    assert len(_reference_header()) == HEADER_SIZE


def test_aes_gcm_matches_independent_reference(material: KeyMaterial) -> None:
    header = _reference_header()
    reference = header + AESGCM(KEY).encrypt(NONCE, PLAINTEXT, header + CANONICAL_CONTEXT)
    assert material.encrypt(PLAINTEXT, CONTEXT, nonce=NONCE) == reference
    assert reference == PINNED_AES_GCM


def test_aes_gcm_without_context_authenticates_header_only(material: KeyMaterial) -> None:
    header = _reference_header()
    reference = header + AESGCM(KEY).encrypt(NONCE, PLAINTEXT, header)
    assert reference == PINNED_AES_GCM_NO_CONTEXT
    assert material.encrypt(PLAINTEXT, nonce=NONCE) == reference
    assert material.encrypt(PLAINTEXT, {}, nonce=NONCE) == reference


def test_chacha20_poly1305_matches_independent_reference() -> None:
    header = _reference_header()
    reference = header + ChaCha20Poly1305(KEY).encrypt(
        NONCE, PLAINTEXT, header + CANONICAL_CONTEXT
    )
    assert reference == PINNED_CHACHA20_POLY1305
    m = _material("chacha20-poly1305")
    assert m.encrypt(PLAINTEXT, CONTEXT, nonce=NONCE) == reference


def test_parse_exposes_the_header_fields() -> None:
    ct = Ciphertext.from_bytes(PINNED_AES_GCM)
    assert (ct.key_id, ct.version, ct.nonce) == (KEY_ID, VERSION, NONCE)
    assert ct.header == PINNED_AES_GCM[:HEADER_SIZE]
    assert ct.body == PINNED_AES_GCM[HEADER_SIZE:]
    assert ct.to_bytes() == PINNED_AES_GCM


# -- roundtrips ----------------------------------------------------------------------------


def _via_material(m: KeyMaterial, data: bytes, context: Mapping[str, str] | None) -> bytes:
    return m.decrypt_parsed(Ciphertext.from_bytes(data), context)


def _via_keyring(m: KeyMaterial, data: bytes, context: Mapping[str, str] | None) -> bytes:
    ring = Keyring()
    ring.put(KeyVersions(m.key_id, [m]))
    return ring.decrypt(data, context)


Decrypt = Callable[[KeyMaterial, bytes, "Mapping[str, str] | None"], bytes]
DECRYPT_PATHS = [
    pytest.param(_via_material, id="material"),
    pytest.param(_via_keyring, id="keyring"),
]


@pytest.mark.parametrize("decrypt", DECRYPT_PATHS)
@pytest.mark.parametrize("spec", ["aes-256-gcm", "chacha20-poly1305"])
@pytest.mark.parametrize("plaintext", [b"", b"x", PLAINTEXT, bytes(range(256)) * 17])
def test_roundtrip(decrypt: Decrypt, spec: str, plaintext: bytes) -> None:
    m = _material(spec)
    data = m.encrypt(plaintext, CONTEXT)
    assert len(data) == HEADER_SIZE + len(plaintext) + 16
    assert decrypt(m, data, CONTEXT) == plaintext
    assert decrypt(m, data, dict(reversed(list(CONTEXT.items())))) == plaintext


def test_fresh_nonce_per_encryption(material: KeyMaterial) -> None:
    a, b = material.encrypt(PLAINTEXT), material.encrypt(PLAINTEXT)
    assert a[21:33] != b[21:33]
    assert a != b


@pytest.mark.parametrize("decrypt", DECRYPT_PATHS)
def test_no_context_and_empty_context_are_the_same(decrypt: Decrypt,
                                                   material: KeyMaterial) -> None:
    data = material.encrypt(PLAINTEXT, None)
    assert decrypt(material, data, {}) == PLAINTEXT
    assert decrypt(material, material.encrypt(PLAINTEXT, {}), None) == PLAINTEXT


# -- systematic negative tests -------------------------------------------------------------

_REGIONS = [
    ("format_version", 0, 1),
    ("key_id", 1, 17),
    ("key_version", 17, 21),
    ("nonce", 21, 33),
    ("body", 33, 33 + len(PLAINTEXT)),
    ("tag", 33 + len(PLAINTEXT), 33 + len(PLAINTEXT) + 16),
]
BYTE_POSITIONS = [
    pytest.param(i, id=f"{name}-{i}") for name, start, end in _REGIONS for i in range(start, end)
]


def test_regions_cover_the_whole_ciphertext() -> None:
    assert _REGIONS[-1][2] == len(PINNED_AES_GCM)
    assert len(BYTE_POSITIONS) == len(PINNED_AES_GCM)


@pytest.mark.parametrize("decrypt", DECRYPT_PATHS)
@pytest.mark.parametrize("position", BYTE_POSITIONS)
def test_every_bit_flip_is_rejected(decrypt: Decrypt, material: KeyMaterial, pinned: bytes,
                                    position: int) -> None:
    for bit in range(8):
        tampered = bytearray(pinned)
        tampered[position] ^= 1 << bit
        with pytest.raises(InvalidCiphertext):
            decrypt(material, bytes(tampered), CONTEXT)


@pytest.mark.parametrize("decrypt", DECRYPT_PATHS)
def test_every_truncation_is_rejected(decrypt: Decrypt, material: KeyMaterial,
                                      pinned: bytes) -> None:
    for length in range(len(pinned)):
        with pytest.raises(InvalidCiphertext):
            decrypt(material, pinned[:length], CONTEXT)


@pytest.mark.parametrize("decrypt", DECRYPT_PATHS)
@pytest.mark.parametrize("extra", [b"\x00", b"\x01" * 16, PINNED_AES_GCM])
def test_appended_bytes_are_rejected(decrypt: Decrypt, material: KeyMaterial, pinned: bytes,
                                     extra: bytes) -> None:
    with pytest.raises(InvalidCiphertext):
        decrypt(material, pinned + extra, CONTEXT)


@pytest.mark.parametrize("decrypt", DECRYPT_PATHS)
@pytest.mark.parametrize(
    "context",
    [
        pytest.param(None, id="missing"),
        pytest.param({}, id="empty"),
        pytest.param({"a": "1", "b": "3"}, id="wrong-value"),
        pytest.param({"a": "1", "c": "2"}, id="wrong-key"),
        pytest.param({"a": "1"}, id="missing-key"),
        pytest.param({"a": "1", "b": "2", "c": "3"}, id="extra-key"),
        pytest.param({"A": "1", "b": "2"}, id="key-case"),
        pytest.param({"a": "1", "b": "2 "}, id="trailing-space"),
    ],
)
def test_wrong_context_is_rejected(decrypt: Decrypt, material: KeyMaterial, pinned: bytes,
                                   context: Mapping[str, str] | None) -> None:
    with pytest.raises(InvalidCiphertext):
        decrypt(material, pinned, context)


@pytest.mark.parametrize("decrypt", DECRYPT_PATHS)
def test_context_where_none_was_given_is_rejected(decrypt: Decrypt,
                                                  material: KeyMaterial) -> None:
    data = material.encrypt(PLAINTEXT)
    for context in ({"a": "1"}, {"a": ""}):
        with pytest.raises(InvalidCiphertext):
            decrypt(material, data, context)


def test_another_keys_ciphertext_is_rejected(material: KeyMaterial, pinned: bytes) -> None:
    other = _material(key=bytes(range(1, 33)))
    with pytest.raises(InvalidCiphertext):
        _via_material(other, pinned, CONTEXT)
    with pytest.raises(InvalidCiphertext):
        material.decrypt_parsed(Ciphertext.from_bytes(other.encrypt(PLAINTEXT, CONTEXT)),
                                CONTEXT)


def test_ciphertext_of_another_algorithm_is_rejected() -> None:
    # Same key bytes, id and version under ChaCha20-Poly1305 must not open as AES-GCM.
    with pytest.raises(InvalidCiphertext):
        _via_material(_material(), PINNED_CHACHA20_POLY1305, CONTEXT)
    with pytest.raises(InvalidCiphertext):
        _via_material(_material("chacha20-poly1305"), PINNED_AES_GCM, CONTEXT)


def test_header_rewritten_to_another_loaded_key_is_rejected(pinned: bytes) -> None:
    # A ciphertext relabelled with another key's id routes to that key and must still fail.
    other_id = uuid.UUID(int=KEY_ID.int ^ 1)
    ring = Keyring()
    ring.put(KeyVersions(KEY_ID, [_material()]))
    ring.put(KeyVersions(other_id, [_material(key_id=other_id, key=bytes(32))]))
    relabelled = pinned[:1] + other_id.bytes + pinned[17:]
    with pytest.raises(InvalidCiphertext):
        ring.decrypt(relabelled, CONTEXT)


@pytest.mark.parametrize("decrypt", DECRYPT_PATHS)
def test_version_zero_is_rejected_by_the_parser(decrypt: Decrypt, material: KeyMaterial,
                                                pinned: bytes) -> None:
    forged = pinned[:17] + bytes(4) + pinned[21:]
    with pytest.raises(InvalidCiphertext):
        decrypt(material, forged, CONTEXT)


@pytest.mark.parametrize("data", [b"", b"\x01", b"\x02" + PINNED_AES_GCM[1:],
                                  b"\x00" * 49, PINNED_AES_GCM[:48]])
def test_parser_rejects_non_ciphertext(data: bytes) -> None:
    with pytest.raises(InvalidCiphertext):
        Ciphertext.from_bytes(data)


@pytest.mark.parametrize("version", [0, -1, 2**32])
def test_encrypt_refuses_version_outside_uint32(version: int) -> None:
    with pytest.raises(ValueError):
        _material(version=version).encrypt(PLAINTEXT, nonce=NONCE)


def test_encrypt_accepts_the_largest_version() -> None:
    m = _material(version=2**32 - 1)
    data = m.encrypt(PLAINTEXT, nonce=NONCE)
    assert data[17:21] == b"\xff\xff\xff\xff"
    assert _via_keyring(m, data, None) == PLAINTEXT


@pytest.mark.parametrize("nonce", [b"", bytes(11), bytes(13)])
def test_encrypt_refuses_wrong_nonce_size(material: KeyMaterial, nonce: bytes) -> None:
    with pytest.raises(ValueError):
        material.encrypt(PLAINTEXT, nonce=nonce)


# -- canonical context ---------------------------------------------------------------------


def test_context_is_order_independent() -> None:
    assert canonical_context({"b": "2", "a": "1"}) == CANONICAL_CONTEXT
    assert canonical_context({"a": "1", "b": "2"}) == CANONICAL_CONTEXT


@pytest.mark.parametrize("context", [None, {}])
def test_empty_context_is_empty_bytes(context: Mapping[str, str] | None) -> None:
    assert canonical_context(context) == b""


def test_context_keys_sort_by_utf16_code_units() -> None:
    # RFC 8785 3.2.3: U+1F600 (UTF-16 D83D DE00) sorts before U+FF01, unlike code point order.
    context = {"\uff01": "y", "\U0001f600": "x", "\u00e9": "v", "z": "w"}
    assert canonical_context(context) == (
        b'{"z":"w","\xc3\xa9":"v","\xf0\x9f\x98\x80":"x","\xef\xbc\x81":"y"}'
    )


def test_context_strings_use_rfc8785_escaping() -> None:
    assert canonical_context({"k": 'a"b\\c\n\x1f/\u00e9\u2028'}) == (
        b'{"k":"a\\"b\\\\c\\n\\u001f/\xc3\xa9\xe2\x80\xa8"}'
    )


def _entries(n: int) -> dict[str, str]:
    return {f"k{i:03d}": "v" for i in range(n)}


def test_context_entry_limit() -> None:
    assert canonical_context(_entries(MAX_CONTEXT_ENTRIES))
    with pytest.raises(InvalidRequest):
        canonical_context(_entries(MAX_CONTEXT_ENTRIES + 1))


def test_context_key_length_limit() -> None:
    assert canonical_context({"k" * MAX_CONTEXT_KEY_LENGTH: "v"})
    with pytest.raises(InvalidRequest):
        canonical_context({"k" * (MAX_CONTEXT_KEY_LENGTH + 1): "v"})
    with pytest.raises(InvalidRequest):
        canonical_context({"": "v"})


def test_context_value_length_limit() -> None:
    assert canonical_context({"k": "v" * MAX_CONTEXT_VALUE_LENGTH})
    assert canonical_context({"k": ""}) == b'{"k":""}'
    with pytest.raises(InvalidRequest):
        canonical_context({"k": "v" * (MAX_CONTEXT_VALUE_LENGTH + 1)})


def _context_of_size(size: int) -> dict[str, str]:
    """Entries with 1024-character values, the last one trimmed to hit ``size`` bytes."""
    context: dict[str, str] = {}
    total = 2  # the braces
    i = 0
    while total < size:
        key = f"k{i:02d}"
        overhead = len(key) + 5 + (1 if context else 0)  # quotes, colon, comma
        value_len = min(MAX_CONTEXT_VALUE_LENGTH, size - total - overhead)
        context[key] = "v" * value_len
        total += overhead + value_len
        i += 1
    return context


def test_context_total_size_limit() -> None:
    at_limit = _context_of_size(MAX_CONTEXT_BYTES)
    assert len(canonical_context(at_limit)) == MAX_CONTEXT_BYTES
    with pytest.raises(InvalidRequest):
        canonical_context(_context_of_size(MAX_CONTEXT_BYTES + 1))


@pytest.mark.parametrize(
    "context",
    [
        pytest.param({"a": 1}, id="int-value"),
        pytest.param({"a": None}, id="none-value"),
        pytest.param({"a": True}, id="bool-value"),
        pytest.param({"a": ["x"]}, id="list-value"),
        pytest.param({"a": {"b": "c"}}, id="nested-map"),
        pytest.param({"a": b"x"}, id="bytes-value"),
        pytest.param({1: "a"}, id="int-key"),
        pytest.param({b"a": "a"}, id="bytes-key"),
        pytest.param([("a", "b")], id="not-a-mapping"),
        pytest.param("a=b", id="string"),
        pytest.param({"a": "\ud800"}, id="lone-surrogate"),
    ],
)
def test_context_rejects_non_string_maps(context: object) -> None:
    with pytest.raises(InvalidRequest):
        canonical_context(context)  # type: ignore[arg-type]


def test_invalid_context_is_a_request_error_not_a_ciphertext_error(
    material: KeyMaterial, pinned: bytes
) -> None:
    with pytest.raises(InvalidRequest):
        material.encrypt(PLAINTEXT, {"a": 1})  # type: ignore[dict-item]
    with pytest.raises(InvalidRequest):
        _via_material(material, pinned, {"a": 1})  # type: ignore[dict-item]
