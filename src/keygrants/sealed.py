"""Sealed secrets: encrypt a secret to a service's X25519 public key, optionally signed.

A sealed secret can be stored or cached anywhere (a config repository, a database, an
environment variable) and opened only by the holder of the recipient's private key. With a
sender key it also proves who sealed it.

Construction: HPKE (RFC 9180) base mode, single shot, with DHKEM(X25519, HKDF-SHA256),
HKDF-SHA256 and AES-256-GCM (:mod:`keygrants.crypto.hpke`); an optional Ed25519 signature by
the sender over the whole envelope. See :class:`SealedEnvelope` for the byte layout.

Binding:

- HPKE ``info`` = ``"keygrants sealed v1" 0x00 || header || canonical context``: the version,
  the flags, the sender's public key and the context (RFC 8785, see
  :mod:`keygrants.keys.context`) all feed the key schedule, so changing any of them, or
  opening with another context, fails.
- The signature covers a label, the recipient's public key, the context and every envelope
  byte before it. Because the sender's key is also in ``info``, a signature cannot be stripped
  and replaced by another party's: the payload would no longer open.

Any failure to open (wrong recipient, wrong context, wrong or missing sender key, a flipped
bit, truncation, an unknown version) raises one opaque
:class:`~keygrants.errors.InvalidCiphertext` with the same message.
"""

from __future__ import annotations

import hmac
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from keygrants.crypto import SigningKey, VerifyingKey
from keygrants.crypto.hpke import (
    HPKE_ENC_SIZE,
    HPKE_OVERHEAD,
    HpkePrivateKey,
    HpkePublicKey,
    hpke_open,
    hpke_seal,
)
from keygrants.errors import InvalidCiphertext, PayloadTooLarge
from keygrants.keys.context import canonical_context

__all__ = [
    "ED25519_PUBLIC_KEY_SIZE",
    "ED25519_SIGNATURE_SIZE",
    "FLAG_SIGNED",
    "MAX_SEALED_PAYLOAD",
    "MAX_SEALED_SIZE",
    "SEALED_V1",
    "HpkePrivateKey",
    "HpkePublicKey",
    "SealedEnvelope",
    "ed25519_public_raw",
    "open_sealed",
    "seal",
    "sealed_sender",
]

SEALED_V1: Final = 0x01
FLAG_SIGNED: Final = 0x01
ED25519_PUBLIC_KEY_SIZE: Final = 32
ED25519_SIGNATURE_SIZE: Final = 64
MAX_SEALED_PAYLOAD: Final = 1024 * 1024
_UNSIGNED_HEADER: Final = 2
_SIGNED_HEADER: Final = 2 + ED25519_PUBLIC_KEY_SIZE
MAX_SEALED_SIZE: Final = _SIGNED_HEADER + HPKE_OVERHEAD + MAX_SEALED_PAYLOAD + ED25519_SIGNATURE_SIZE
_INFO_LABEL: Final = b"keygrants sealed v1\x00"
_SIGNATURE_LABEL: Final = b"keygrants sealed v1 signature\x00"
_OPEN_FAILED: Final = "invalid sealed secret"


@dataclass(frozen=True, slots=True)
class SealedEnvelope:
    """A parsed v1 sealed envelope (nothing in it is verified by parsing).

    Byte layout::

        offset  size   field
        0       1      format version, 0x01 (suite: KEM 0x0020, KDF 0x0001, AEAD 0x0002)
        1       1      flags: 0x00 anonymous, 0x01 signed by an Ed25519 sender key
        2       32     sender's Ed25519 public key (raw, RFC 8032)     -- signed only
        h       32     HPKE enc: the ephemeral X25519 public key
        h+32    n+16   HPKE AES-256-GCM ciphertext of the payload || tag
        end-64  64     Ed25519 signature                                -- signed only

        h = 2 (anonymous) or 34 (signed); the header is bytes [0, h).
        info      = "keygrants sealed v1" 0x00 || header || canonical context
        signed    = "keygrants sealed v1 signature" 0x00 || recipient public key (32)
                    || uint32 BE len(canonical context) || canonical context
                    || every envelope byte before the signature

    Attributes:
        header: bytes ``[0, h)``.
        sender: the sender's raw Ed25519 public key, or ``None`` when anonymous.
        hpke: ``enc || ciphertext || tag``.
        signature: the Ed25519 signature, or ``None``.
    """

    header: bytes
    sender: bytes | None
    hpke: bytes
    signature: bytes | None

    @classmethod
    def from_bytes(cls, data: bytes) -> SealedEnvelope:
        """Parse; anything that cannot be a v1 envelope raises ``InvalidCiphertext``."""
        if not isinstance(data, bytes) or not 2 <= len(data) <= MAX_SEALED_SIZE:
            raise InvalidCiphertext(_OPEN_FAILED)
        if data[0] != SEALED_V1 or data[1] not in (0, FLAG_SIGNED):
            raise InvalidCiphertext(_OPEN_FAILED)
        if data[1] == FLAG_SIGNED:
            if len(data) < _SIGNED_HEADER + HPKE_OVERHEAD + ED25519_SIGNATURE_SIZE:
                raise InvalidCiphertext(_OPEN_FAILED)
            return cls(header=data[:_SIGNED_HEADER], sender=data[2:_SIGNED_HEADER],
                       hpke=data[_SIGNED_HEADER:-ED25519_SIGNATURE_SIZE],
                       signature=data[-ED25519_SIGNATURE_SIZE:])
        if len(data) < _UNSIGNED_HEADER + HPKE_OVERHEAD:
            raise InvalidCiphertext(_OPEN_FAILED)
        return cls(header=data[:_UNSIGNED_HEADER], sender=None, hpke=data[_UNSIGNED_HEADER:],
                   signature=None)

    @property
    def enc(self) -> bytes:
        """The HPKE encapsulated key."""
        return self.hpke[:HPKE_ENC_SIZE]

    def to_bytes(self) -> bytes:
        """Serialize."""
        return self.header + self.hpke + (self.signature or b"")


def ed25519_public_raw(key: VerifyingKey | bytes) -> bytes:
    """The raw 32-byte form of an Ed25519 public key.

    Raises:
        ValueError: for another algorithm or a wrong length.
    """
    if isinstance(key, VerifyingKey):
        if key.algorithm != "ed25519":
            raise ValueError("the sender key must be an Ed25519 key")
        return key.public_raw()
    if not isinstance(key, bytes) or len(key) != ED25519_PUBLIC_KEY_SIZE:
        raise ValueError(f"a raw Ed25519 public key is {ED25519_PUBLIC_KEY_SIZE} bytes")
    return key


def _recipient(key: HpkePublicKey | bytes) -> HpkePublicKey:
    if isinstance(key, HpkePublicKey):
        return key
    if isinstance(key, bytes):
        return HpkePublicKey.from_raw(key)
    raise TypeError("recipient_public_key must be an HpkePublicKey or 32 raw bytes")


def _info(header: bytes, ctx: bytes) -> bytes:
    return _INFO_LABEL + header + ctx


def _signed_message(recipient: bytes, ctx: bytes, body: bytes) -> bytes:
    return _SIGNATURE_LABEL + recipient + struct.pack(">I", len(ctx)) + ctx + body


def seal(payload: bytes, recipient_public_key: HpkePublicKey | bytes, *,
         sender_key: SigningKey | None = None,
         context: Mapping[str, str] | None = None) -> bytes:
    """Seal ``payload`` so that only the holder of the recipient's private key can open it.

    Args:
        payload: the secret, at most :data:`MAX_SEALED_PAYLOAD` bytes.
        recipient_public_key: the recipient's X25519 public key (or its 32 raw bytes).
        sender_key: an Ed25519 :class:`~keygrants.crypto.SigningKey`; when given, the envelope
            is signed and names the sender's public key.
        context: a string-to-string map bound to the envelope; opening needs the same one.

    Returns:
        The v1 envelope (see :class:`SealedEnvelope`).

    Raises:
        PayloadTooLarge: if ``payload`` exceeds the limit.
        InvalidRequest: if ``context`` is not a valid encryption context.
        TypeError, ValueError: for keys of the wrong kind.
    """
    if not isinstance(payload, bytes):
        raise TypeError("payload must be bytes")
    if len(payload) > MAX_SEALED_PAYLOAD:
        raise PayloadTooLarge(f"a sealed payload is at most {MAX_SEALED_PAYLOAD} bytes")
    recipient = _recipient(recipient_public_key)
    ctx = canonical_context(context)
    if sender_key is None:
        header = bytes([SEALED_V1, 0])
        return header + hpke_seal(recipient, payload, info=_info(header, ctx))
    if not isinstance(sender_key, SigningKey) or sender_key.algorithm != "ed25519":
        raise ValueError("sender_key must be an Ed25519 SigningKey")
    header = bytes([SEALED_V1, FLAG_SIGNED]) + ed25519_public_raw(sender_key.public_key())
    body = header + hpke_seal(recipient, payload, info=_info(header, ctx))
    return body + sender_key.sign(_signed_message(recipient.raw(), ctx, body))


def sealed_sender(sealed: bytes) -> bytes | None:
    """The raw Ed25519 public key a signed envelope names, or ``None`` if it is anonymous.

    Nothing is verified: use it to pick the sender's key from your own trust store, then pass
    that key to :func:`open_sealed`.

    Raises:
        InvalidCiphertext: if ``sealed`` is not a v1 envelope.
    """
    return SealedEnvelope.from_bytes(sealed).sender


def open_sealed(sealed: bytes, recipient_private_key: HpkePrivateKey, *,
                sender_public_key: VerifyingKey | bytes | None = None,
                context: Mapping[str, str] | None = None) -> bytes:
    """Open an envelope made by :func:`seal`.

    With ``sender_public_key`` the envelope must be signed by exactly that key. Without it
    only anonymous envelopes open: a signed envelope is refused rather than opened
    unauthenticated (find the sender with :func:`sealed_sender`).

    Args:
        sealed: the envelope.
        recipient_private_key: the recipient's X25519 private key.
        sender_public_key: the expected sender's Ed25519 public key (or its 32 raw bytes).
        context: the context the envelope was sealed with.

    Returns:
        The payload.

    Raises:
        InvalidCiphertext: for every failure, with one message.
        InvalidRequest: if ``context`` is not a valid encryption context.
        TypeError, ValueError: for keys of the wrong kind.
    """
    if not isinstance(recipient_private_key, HpkePrivateKey):
        raise TypeError("recipient_private_key must be an HpkePrivateKey")
    expected = None if sender_public_key is None else ed25519_public_raw(sender_public_key)
    ctx = canonical_context(context)
    env = SealedEnvelope.from_bytes(sealed)
    if (env.sender is None) != (expected is None):
        raise InvalidCiphertext(_OPEN_FAILED)
    if env.sender is not None and expected is not None and env.signature is not None:
        if not hmac.compare_digest(env.sender, expected):
            raise InvalidCiphertext(_OPEN_FAILED)
        recipient = recipient_private_key.public_key().raw()
        message = _signed_message(recipient, ctx, env.header + env.hpke)
        if not VerifyingKey.from_raw("ed25519", expected).verify(message, env.signature):
            raise InvalidCiphertext(_OPEN_FAILED)
    try:
        return hpke_open(recipient_private_key, env.hpke, info=_info(env.header, ctx))
    except InvalidCiphertext:
        raise InvalidCiphertext(_OPEN_FAILED) from None
