"""The hazmat tier: thin, typed wrappers over pyca/cryptography.

This package is the only place in keygrants that calls cryptographic primitives. Everything
else (ciphertext formats, key versions, sealing, grants) is a recipe built on these functions.
"""

from __future__ import annotations

from keygrants.crypto.aead import KEY_SIZE, NONCE_SIZE, TAG_SIZE, Aead, AeadAlgorithm
from keygrants.crypto.kdf import hkdf_sha256, scrypt_derive
from keygrants.crypto.mac import hmac_sha256, verify_hmac_sha256
from keygrants.crypto.random import nonce_bytes, random_bytes
from keygrants.crypto.signing import SigningAlgorithm, SigningKey, VerifyingKey, b64url

__all__ = [
    "KEY_SIZE",
    "NONCE_SIZE",
    "TAG_SIZE",
    "Aead",
    "AeadAlgorithm",
    "SigningAlgorithm",
    "SigningKey",
    "VerifyingKey",
    "b64url",
    "hkdf_sha256",
    "hmac_sha256",
    "nonce_bytes",
    "random_bytes",
    "scrypt_derive",
    "verify_hmac_sha256",
]
