"""HPKE (RFC 9180) single-shot base mode, and the X25519 key pairs it uses.

One suite, fixed: DHKEM(X25519, HKDF-SHA256) (KEM id ``0x0020``), HKDF-SHA256 (KDF id
``0x0001``), AES-256-GCM (AEAD id ``0x0002``). :func:`hpke_seal` returns the encapsulated key
(32 bytes) followed by the AEAD ciphertext and tag; the application binds its data through
``info`` (the key schedule input), and the AEAD's associated data is empty, as in
pyca/cryptography's public single-shot API.

This module is the hazmat tier for HPKE: nothing else in keygrants calls
:mod:`cryptography.hazmat.primitives.hpke` or X25519 directly. Every failed open raises the
one opaque :class:`~keygrants.errors.InvalidCiphertext`.
"""

from __future__ import annotations

from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.hpke import AEAD, KDF, KEM, Suite

from keygrants.crypto.aead import TAG_SIZE
from keygrants.errors import InvalidCiphertext

__all__ = [
    "HPKE_AEAD_ID",
    "HPKE_ENC_SIZE",
    "HPKE_KDF_ID",
    "HPKE_KEM_ID",
    "HPKE_OVERHEAD",
    "X25519_KEY_SIZE",
    "HpkePrivateKey",
    "HpkePublicKey",
    "hpke_open",
    "hpke_seal",
]

HPKE_KEM_ID: Final = 0x0020  # DHKEM(X25519, HKDF-SHA256)
HPKE_KDF_ID: Final = 0x0001  # HKDF-SHA256
HPKE_AEAD_ID: Final = 0x0002  # AES-256-GCM
HPKE_ENC_SIZE: Final = 32
HPKE_OVERHEAD: Final = HPKE_ENC_SIZE + TAG_SIZE
X25519_KEY_SIZE: Final = 32

_SUITE: Final = Suite(KEM.X25519, KDF.HKDF_SHA256, AEAD.AES_256_GCM)


class HpkePublicKey:
    """An X25519 public key that secrets can be sealed to."""

    __slots__ = ("_key",)

    def __init__(self, key: x25519.X25519PublicKey) -> None:
        self._key = key

    @classmethod
    def from_raw(cls, data: bytes) -> HpkePublicKey:
        """Load the 32-byte RFC 7748 encoding.

        Raises:
            ValueError: if ``data`` is not 32 bytes.
        """
        if not isinstance(data, bytes) or len(data) != X25519_KEY_SIZE:
            raise ValueError(f"an X25519 public key is {X25519_KEY_SIZE} bytes")
        return cls(x25519.X25519PublicKey.from_public_bytes(data))

    @classmethod
    def from_pem(cls, pem: bytes | str) -> HpkePublicKey:
        """Load a PEM SubjectPublicKeyInfo (``openssl pkey -pubout`` writes one).

        Raises:
            ValueError: if it is not an X25519 public key.
        """
        data = pem.encode() if isinstance(pem, str) else pem
        key = serialization.load_pem_public_key(data)
        if not isinstance(key, x25519.X25519PublicKey):
            raise ValueError("not an X25519 public key")
        return cls(key)

    def raw(self) -> bytes:
        """The 32-byte RFC 7748 encoding."""
        return self._key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def pem(self) -> str:
        """PEM SubjectPublicKeyInfo."""
        return self._key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode("ascii")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HpkePublicKey) and self.raw() == other.raw()

    def __hash__(self) -> int:
        return hash(self.raw())

    def __repr__(self) -> str:
        return f"HpkePublicKey({self.raw().hex()})"


class HpkePrivateKey:
    """An X25519 private key that opens secrets sealed to its public key."""

    __slots__ = ("_key",)

    def __init__(self, key: x25519.X25519PrivateKey) -> None:
        self._key = key

    @classmethod
    def generate(cls) -> HpkePrivateKey:
        """A fresh key pair from the OS CSPRNG."""
        return cls(x25519.X25519PrivateKey.generate())

    @classmethod
    def from_raw(cls, data: bytes) -> HpkePrivateKey:
        """Load the 32-byte RFC 7748 scalar.

        Raises:
            ValueError: if ``data`` is not 32 bytes.
        """
        if not isinstance(data, bytes) or len(data) != X25519_KEY_SIZE:
            raise ValueError(f"an X25519 private key is {X25519_KEY_SIZE} bytes")
        return cls(x25519.X25519PrivateKey.from_private_bytes(data))

    @classmethod
    def from_pem(cls, pem: bytes | str) -> HpkePrivateKey:
        """Load an unencrypted PEM PKCS#8 key (``openssl genpkey -algorithm x25519``).

        Raises:
            ValueError: if it is not an unencrypted X25519 private key.
        """
        data = pem.encode() if isinstance(pem, str) else pem
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except TypeError:  # encrypted PEM
            raise ValueError("encrypted private keys are not supported") from None
        if not isinstance(key, x25519.X25519PrivateKey):
            raise ValueError("not an X25519 private key")
        return cls(key)

    def private_pem(self) -> bytes:
        """Unencrypted PEM PKCS#8; the caller keeps it in a 0600 file or seals it."""
        return self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def public_key(self) -> HpkePublicKey:
        """The matching public key."""
        return HpkePublicKey(self._key.public_key())

    def __repr__(self) -> str:
        return f"HpkePrivateKey(public={self.public_key().raw().hex()})"


def hpke_seal(public_key: HpkePublicKey, plaintext: bytes, *, info: bytes) -> bytes:
    """Seal ``plaintext`` to ``public_key``; returns ``enc (32) || ciphertext || tag (16)``.

    A fresh ephemeral key is drawn for every call, so sealing the same plaintext twice gives
    unrelated outputs.
    """
    return _SUITE.encrypt(plaintext, public_key._key, info=info)


def hpke_open(private_key: HpkePrivateKey, sealed: bytes, *, info: bytes) -> bytes:
    """Open what :func:`hpke_seal` made for this key with the same ``info``.

    Raises:
        InvalidCiphertext: for any failure (wrong key, wrong info, any flipped bit, truncation).
    """
    if len(sealed) < HPKE_OVERHEAD:
        raise InvalidCiphertext()
    try:
        return _SUITE.decrypt(sealed, private_key._key, info=info)
    except (InvalidTag, ValueError):
        raise InvalidCiphertext() from None
