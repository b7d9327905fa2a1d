"""Sealing key version material at rest under the root key.

Sealed blob layout::

    offset  size  field
    0       1     format version, 0x01
    1       12    AES-256-GCM nonce
    13      n+16  ciphertext || tag

AAD = ``0x01 || key id (16 bytes) || version (uint32 BE)``, so a sealed blob moved to another
key or version does not open.
"""

from __future__ import annotations

import struct
import uuid
from typing import Final

from keygrants.crypto import NONCE_SIZE, Aead, nonce_bytes
from keygrants.errors import InvalidCiphertext

__all__ = ["SEALED_V1", "seal_key_version", "seal_named_secret", "unseal_key_version", "unseal_named_secret"]

SEALED_V1: Final = 0x01
_AAD = struct.Struct(">B16sI")


def _aad(key_id: uuid.UUID, version: int) -> bytes:
    return _AAD.pack(SEALED_V1, key_id.bytes, version)


def seal_key_version(root: Aead, key_id: uuid.UUID, version: int, secret: bytes, *,
                     nonce: bytes | None = None) -> bytes:
    """Seal one version's secret under the root key (``nonce`` only for deterministic tests)."""
    if nonce is None:
        nonce = nonce_bytes(NONCE_SIZE)
    return bytes([SEALED_V1]) + nonce + root.seal(nonce, secret, _aad(key_id, version))


def unseal_key_version(root: Aead, key_id: uuid.UUID, version: int, blob: bytes) -> bytes:
    """Open a sealed secret.

    Raises:
        InvalidCiphertext: if the blob was altered, moved, or sealed under another root key.
    """
    if len(blob) < 1 + NONCE_SIZE or blob[0] != SEALED_V1:
        raise InvalidCiphertext()
    return root.open(blob[1 : 1 + NONCE_SIZE], blob[1 + NONCE_SIZE :], _aad(key_id, version))


_NAMED_AAD_PREFIX: Final = b"\x02keygrants named secret\x00"


def seal_named_secret(root: Aead, name: str, secret: bytes) -> bytes:
    """Seal a server secret (the audit keys, ...) under the root key, bound to its name."""
    nonce = nonce_bytes(NONCE_SIZE)
    return bytes([SEALED_V1]) + nonce + root.seal(nonce, secret, _NAMED_AAD_PREFIX + name.encode())


def unseal_named_secret(root: Aead, name: str, blob: bytes) -> bytes:
    """Open a secret sealed by :func:`seal_named_secret`.

    Raises:
        InvalidCiphertext: if the blob was altered, renamed or sealed under another root key.
    """
    if len(blob) < 1 + NONCE_SIZE or blob[0] != SEALED_V1:
        raise InvalidCiphertext()
    return root.open(blob[1 : 1 + NONCE_SIZE], blob[1 + NONCE_SIZE :],
                     _NAMED_AAD_PREFIX + name.encode())
