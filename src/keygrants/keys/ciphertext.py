"""The native ciphertext format.

A native ciphertext names the key and version that made it, so decrypt needs no key id from
the caller::

    offset  size  field
    0       1     format version, 0x01
    1       16    key id (UUID, big-endian bytes)
    17      4     key version (uint32, big-endian)
    21      12    AEAD nonce
    33      n+16  AEAD ciphertext || 16-byte tag

The first 33 bytes are the *header*. The AEAD's associated data is
``header || canonical_context(context)`` (see :mod:`keygrants.keys.context`), so every header
byte and the context are authenticated: a flipped bit anywhere, a wrong context, a truncated
body or another key's ciphertext all fail the same way, with
:class:`~keygrants.errors.InvalidCiphertext`.
"""

from __future__ import annotations

import struct
import uuid
from typing import Final

from keygrants.crypto import NONCE_SIZE, TAG_SIZE
from keygrants.errors import InvalidCiphertext

__all__ = ["FORMAT_V1", "HEADER_SIZE", "MIN_SIZE", "Ciphertext", "header_bytes"]

FORMAT_V1: Final = 0x01
_HEADER = struct.Struct(">B16sI12s")
HEADER_SIZE: Final = _HEADER.size  # 33
MIN_SIZE: Final = HEADER_SIZE + TAG_SIZE
MAX_VERSION: Final = 2**32 - 1


def header_bytes(key_id: uuid.UUID, version: int, nonce: bytes) -> bytes:
    """The 33 header bytes of a v1 ciphertext."""
    if not 1 <= version <= MAX_VERSION:
        raise ValueError("key version must fit in uint32 and be at least 1")
    if len(nonce) != NONCE_SIZE:
        raise ValueError(f"nonce must be {NONCE_SIZE} bytes")
    return _HEADER.pack(FORMAT_V1, key_id.bytes, version, nonce)


class Ciphertext:
    """A parsed v1 native ciphertext (see the module docstring for the layout).

    ``kid`` is the raw 16-byte key id (what lookups use: building a ``uuid.UUID`` costs more
    than the AEAD open of a small message); :attr:`key_id` is the same as a UUID.
    """

    __slots__ = ("body", "header", "kid", "nonce", "version")

    def __init__(self, key_id: uuid.UUID, version: int, nonce: bytes, body: bytes) -> None:
        self.kid = key_id.bytes
        self.version = version
        self.nonce = nonce
        self.body = body
        self.header = header_bytes(key_id, version, nonce)

    @property
    def key_id(self) -> uuid.UUID:
        """The key id as a UUID."""
        return uuid.UUID(bytes=self.kid)

    @classmethod
    def from_bytes(cls, data: bytes) -> Ciphertext:
        """Parse a ciphertext; anything that cannot be one raises ``InvalidCiphertext``."""
        if len(data) < MIN_SIZE or data[0] != FORMAT_V1:
            raise InvalidCiphertext()
        version = int.from_bytes(data[17:21], "big")
        if version == 0:
            raise InvalidCiphertext()
        ct = cls.__new__(cls)
        ct.header = data[:HEADER_SIZE]
        ct.kid = data[1:17]
        ct.version = version
        ct.nonce = data[21:HEADER_SIZE]
        ct.body = data[HEADER_SIZE:]
        return ct

    def to_bytes(self) -> bytes:
        """Serialize: header || body."""
        return self.header + self.body
