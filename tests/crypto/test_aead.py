"""Aead: constructor checks, nonce and length checks, and the one opaque failure."""

from __future__ import annotations

import pytest

from keygrants.crypto import Aead
from keygrants.errors import InvalidCiphertext

ALGORITHMS = ["aes-256-gcm", "chacha20-poly1305"]
KEY = bytes(range(32))
NONCE = bytes(12)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("size", [0, 16, 24, 31, 33, 64])
def test_refuses_wrong_key_size(algorithm: str, size: int) -> None:
    with pytest.raises(ValueError):
        Aead(algorithm, bytes(size))  # type: ignore[arg-type]


@pytest.mark.parametrize("algorithm", ["aes-128-gcm", "xchacha20-poly1305", ""])
def test_refuses_unknown_algorithm(algorithm: str) -> None:
    with pytest.raises(ValueError):
        Aead(algorithm, KEY)  # type: ignore[arg-type]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_roundtrip(algorithm: str) -> None:
    aead = Aead(algorithm, KEY)  # type: ignore[arg-type]
    assert aead.algorithm == algorithm
    sealed = aead.seal(NONCE, b"plaintext", b"aad")
    assert len(sealed) == len(b"plaintext") + 16
    assert aead.open(NONCE, sealed, b"aad") == b"plaintext"
    assert aead.open(NONCE, aead.seal(NONCE, b"", b""), b"") == b""


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("size", [0, 8, 11, 13, 16, 24])
def test_wrong_nonce_size(algorithm: str, size: int) -> None:
    aead = Aead(algorithm, KEY)  # type: ignore[arg-type]
    sealed = aead.seal(NONCE, b"x", b"")
    with pytest.raises(ValueError):
        aead.seal(bytes(size), b"x", b"")
    with pytest.raises(InvalidCiphertext):
        aead.open(bytes(size), sealed, b"")


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_failures_are_opaque_and_identical(algorithm: str) -> None:
    aead = Aead(algorithm, KEY)  # type: ignore[arg-type]
    sealed = aead.seal(NONCE, b"secret", b"aad")
    other = Aead(algorithm, bytes(32))  # type: ignore[arg-type]
    attempts = {
        "wrong key": lambda: other.open(NONCE, sealed, b"aad"),
        "wrong aad": lambda: aead.open(NONCE, sealed, b"aaD"),
        "wrong nonce": lambda: aead.open(b"\x01" + NONCE[1:], sealed, b"aad"),
        "flipped tag": lambda: aead.open(NONCE, sealed[:-1] + bytes([sealed[-1] ^ 1]), b"aad"),
        "truncated": lambda: aead.open(NONCE, sealed[:-1], b"aad"),
        "shorter than a tag": lambda: aead.open(NONCE, sealed[:15], b"aad"),
        "empty": lambda: aead.open(NONCE, b"", b"aad"),
        "nonce size": lambda: aead.open(NONCE[:8], sealed, b"aad"),
    }
    messages = set()
    for name, attempt in attempts.items():
        with pytest.raises(InvalidCiphertext) as info:
            attempt()
        # Nothing chained: no InvalidTag (or anything else) leaks through __cause__/__context__.
        assert info.value.__cause__ is None, name
        assert info.value.__context__ is None or info.value.__suppress_context__, name
        messages.add(str(info.value))
    assert messages == {"invalid ciphertext"}
