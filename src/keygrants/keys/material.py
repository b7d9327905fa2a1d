"""Unsealed key version material, ready to use.

A :class:`KeyMaterial` holds one key version's secret in memory with its primitive object
built once (an ``AESGCM`` instance, a private key), so the hot path does no parsing.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Final, TypeVar, cast

from keygrants.crypto import (
    NONCE_SIZE,
    Aead,
    AeadAlgorithm,
    SigningAlgorithm,
    SigningKey,
    VerifyingKey,
    hkdf_sha256,
    hmac_sha256,
    nonce_bytes,
    random_bytes,
    verify_hmac_sha256,
)
from keygrants.errors import InvalidCiphertext
from keygrants.keys.ciphertext import HEADER_SIZE, Ciphertext, header_bytes
from keygrants.keys.context import canonical_context
from keygrants.keys.specs import KeySpec

__all__ = ["HMAC_KEY_SIZE", "SYMMETRIC_KEY_SIZE", "KeyMaterial", "generate_material"]

T = TypeVar("T")

SYMMETRIC_KEY_SIZE: Final = 32
HMAC_KEY_SIZE: Final = 32
_DERIVE_INFO_PREFIX: Final = b"keygrants derive v1\x00"


def generate_material(spec: KeySpec) -> bytes:
    """Fresh secret material for ``spec``, in the form :class:`KeyMaterial` loads."""
    if spec.symmetric:
        return random_bytes(SYMMETRIC_KEY_SIZE)
    return SigningKey.generate(cast(SigningAlgorithm, spec.algorithm)).private_bytes()


class KeyMaterial:
    """One key version's usable material.

    Args:
        spec: the key's spec.
        key_id: the key's id (bound into ciphertext headers).
        version: the version number.
        secret: the material as made by :func:`generate_material`.
    """

    __slots__ = ("_aead", "_kid", "_mac_key", "_secret", "_signer", "key_id", "spec", "version")

    def __init__(self, spec: KeySpec, key_id: uuid.UUID, version: int, secret: bytes) -> None:
        self.spec = spec
        self.key_id = key_id
        self._kid = key_id.bytes
        self.version = version
        self._secret = secret
        self._aead: Aead | None = None
        self._signer: SigningKey | None = None
        self._mac_key: bytes | None = None
        if spec.purpose == "encrypt-decrypt":
            self._aead = Aead(cast(AeadAlgorithm, spec.algorithm), secret)
        elif spec.purpose == "sign-verify":
            self._signer = SigningKey.from_private_bytes(
                cast(SigningAlgorithm, spec.algorithm), secret
            )
        else:
            self._mac_key = secret

    def _require(self, handle: T | None, kind: str) -> T:
        if handle is None:
            raise ValueError(f"{self.spec.name} is not {kind} key")
        return handle

    # -- encrypt-decrypt -------------------------------------------------------------------

    def encrypt(self, plaintext: bytes, context: Mapping[str, str] | None = None, *,
                nonce: bytes | None = None) -> bytes:
        """Encrypt to the native ciphertext format (``nonce`` is for deterministic tests)."""
        aead = self._require(self._aead, "an encryption")
        if nonce is None:
            nonce = nonce_bytes(NONCE_SIZE)
        header = header_bytes(self.key_id, self.version, nonce)
        aad = header + canonical_context(context) if context else header
        return header + aead.seal(nonce, plaintext, aad)

    def decrypt_parsed(self, ct: Ciphertext, context: Mapping[str, str] | None = None) -> bytes:
        """Decrypt a parsed ciphertext made by this key version.

        Raises:
            InvalidCiphertext: on any failure, including a ciphertext that names another key
                or version.
        """
        aead = self._require(self._aead, "an encryption")
        if ct.kid != self._kid or ct.version != self.version:
            raise InvalidCiphertext()
        aad = ct.header + canonical_context(context) if context else ct.header
        return aead.open(ct.nonce, ct.body, aad)

    def decrypt_native(self, data: bytes, context: Mapping[str, str] | None = None) -> bytes:
        """Decrypt serialized native ciphertext made by this version, without building a
        :class:`Ciphertext` (the hot path; the caller has matched the key id and version).

        Raises:
            InvalidCiphertext: on any failure.
        """
        if data[1:17] != self._kid or int.from_bytes(data[17:21], "big") != self.version:
            raise InvalidCiphertext()
        return self.open_matched(data, context)

    def open_matched(self, data: bytes, context: Mapping[str, str] | None = None) -> bytes:
        """:meth:`decrypt_native` for a caller that found this version by the ciphertext's
        own key id and version (the keyring, the service) and so skips re-checking them."""
        aead = self._aead
        if aead is None:
            raise ValueError(f"{self.spec.name} is not an encryption key")
        header = data[:HEADER_SIZE]
        return aead.open(data[21:HEADER_SIZE], data[HEADER_SIZE:],
                         header + canonical_context(context) if context else header)

    # -- sign-verify -----------------------------------------------------------------------

    def sign(self, message: bytes, *, prehashed: bool = False) -> bytes:
        """Sign a message or a SHA-256 digest."""
        return self._require(self._signer, "a signing").sign(message, prehashed=prehashed)

    def public_key(self) -> VerifyingKey:
        """The public half of a signing key."""
        return self._require(self._signer, "a signing").public_key()

    def verify(self, message: bytes, signature: bytes, *, prehashed: bool = False) -> bool:
        """Check a signature."""
        return self.public_key().verify(message, signature, prehashed=prehashed)

    # -- mac and derive --------------------------------------------------------------------

    def mac(self, message: bytes) -> bytes:
        """HMAC-SHA256 tag."""
        return hmac_sha256(self._require(self._mac_key, "a MAC"), message)

    def verify_mac(self, message: bytes, tag: bytes) -> bool:
        """Constant-time tag check."""
        return verify_hmac_sha256(self._require(self._mac_key, "a MAC"), message, tag)

    def derive(self, context: Mapping[str, str] | None, *, salt: bytes | None,
               length: int) -> bytes:
        """HKDF-SHA256 from this version's secret.

        ``info`` is a fixed label, the key id and version, then the canonical context, so the
        same context under another key or version yields unrelated bytes.
        """
        if not self.spec.symmetric:
            raise ValueError("only symmetric keys can derive")
        info = (_DERIVE_INFO_PREFIX + self.key_id.bytes + self.version.to_bytes(4, "big")
                + canonical_context(context))
        return hkdf_sha256(self._secret, salt=salt, info=info, length=length)

    def secret_bytes(self) -> bytes:
        """The raw secret, only for sealing it under the root key."""
        return self._secret
