"""Key derivation: HKDF-SHA256 (RFC 5869) and scrypt (RFC 7914) for passphrases."""

from __future__ import annotations

from typing import Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

__all__ = ["HKDF_MAX_LENGTH", "SCRYPT_N", "SCRYPT_P", "SCRYPT_R", "hkdf_sha256", "scrypt_derive"]

HKDF_MAX_LENGTH: Final = 255 * 32
# scrypt cost: 2**17 * 8 * 128 bytes = 128 MiB and roughly half a second, once per start.
SCRYPT_N: Final = 2**17
SCRYPT_R: Final = 8
SCRYPT_P: Final = 1


def hkdf_sha256(ikm: bytes, *, salt: bytes | None, info: bytes, length: int) -> bytes:
    """Derive ``length`` bytes with HKDF-SHA256.

    Raises:
        ValueError: if ``length`` is outside 1..8160.
    """
    if not 1 <= length <= HKDF_MAX_LENGTH:
        raise ValueError(f"HKDF length must be 1..{HKDF_MAX_LENGTH}")
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def scrypt_derive(
    passphrase: bytes, *, salt: bytes, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P,
    length: int = 32,
) -> bytes:
    """Stretch a passphrase into a key with scrypt."""
    return Scrypt(salt=salt, length=length, n=n, r=r, p=p).derive(passphrase)
