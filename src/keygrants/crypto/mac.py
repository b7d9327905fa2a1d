"""HMAC-SHA256 generation and constant-time verification."""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, hmac

__all__ = ["hmac_sha256", "verify_hmac_sha256"]


def hmac_sha256(key: bytes, message: bytes) -> bytes:
    """Return the 32-byte HMAC-SHA256 tag of ``message``."""
    h = hmac.HMAC(key, hashes.SHA256())
    h.update(message)
    return h.finalize()


def verify_hmac_sha256(key: bytes, message: bytes, tag: bytes) -> bool:
    """Check a full-length tag in constant time; truncated tags are refused."""
    if len(tag) != 32:
        return False
    h = hmac.HMAC(key, hashes.SHA256())
    h.update(message)
    try:
        h.verify(tag)
    except InvalidSignature:
        return False
    return True
