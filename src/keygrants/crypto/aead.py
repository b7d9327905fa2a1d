"""Authenticated encryption: AES-256-GCM and ChaCha20-Poly1305 behind one small interface.

This module is the hazmat tier: it calls pyca/cryptography and nothing else in keygrants may
call an AEAD primitive directly. Every failed open raises the one opaque
:class:`~keygrants.errors.InvalidCiphertext`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from keygrants.errors import InvalidCiphertext

__all__ = ["KEY_SIZE", "NONCE_SIZE", "TAG_SIZE", "Aead", "AeadAlgorithm"]

AeadAlgorithm = Literal["aes-256-gcm", "chacha20-poly1305"]

KEY_SIZE: Final = 32
NONCE_SIZE: Final = 12
TAG_SIZE: Final = 16


class Aead:
    """A keyed AEAD with 96-bit nonces and 128-bit tags.

    The underlying cipher object is built once, so a hot path pays only for the seal/open.

    Args:
        algorithm: ``"aes-256-gcm"`` or ``"chacha20-poly1305"``.
        key: 32 bytes of key material.

    Raises:
        ValueError: on a key of the wrong size or an unknown algorithm.
    """

    __slots__ = ("_cipher", "algorithm")

    def __init__(self, algorithm: AeadAlgorithm, key: bytes) -> None:
        if len(key) != KEY_SIZE:
            raise ValueError(f"{algorithm} needs a {KEY_SIZE}-byte key, got {len(key)}")
        self.algorithm = algorithm
        self._cipher: AESGCM | ChaCha20Poly1305
        if algorithm == "aes-256-gcm":
            self._cipher = AESGCM(key)
        elif algorithm == "chacha20-poly1305":
            self._cipher = ChaCha20Poly1305(key)
        else:
            raise ValueError(f"unknown AEAD algorithm {algorithm!r}")

    def seal(self, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        """Encrypt and authenticate; returns ciphertext || tag."""
        if len(nonce) != NONCE_SIZE:
            raise ValueError(f"nonce must be {NONCE_SIZE} bytes")
        return self._cipher.encrypt(nonce, plaintext, aad)

    def unchecked(self) -> tuple[Callable[[bytes, bytes, bytes | None], bytes],
                                 Callable[[bytes, bytes, bytes | None], bytes]]:
        """``(seal, open)`` without this wrapper's checks or error mapping, for a caller whose
        own format already fixes the nonce and lengths (the KeyManager's hot path, where the
        wrapper's frame is a tenth of the call). ``open`` raises whatever the backend raises;
        the caller must turn every exception into its one opaque error."""
        return self._cipher.encrypt, self._cipher.decrypt

    def open(self, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        """Verify and decrypt ciphertext || tag.

        Raises:
            InvalidCiphertext: for any failure (wrong key, nonce, AAD, tag, length).
        """
        if len(nonce) != NONCE_SIZE or len(ciphertext) < TAG_SIZE:
            raise InvalidCiphertext()
        try:
            return self._cipher.decrypt(nonce, ciphertext, aad)
        except InvalidTag:
            raise InvalidCiphertext() from None
