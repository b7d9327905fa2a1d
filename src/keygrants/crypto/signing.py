"""Digital signatures: Ed25519, ECDSA P-256/SHA-256 (DER signatures) and RSA-PSS 3072/SHA-256.

RSA-PSS uses MGF1-SHA-256 and a 32-byte salt (the digest length), the parameters of
Wycheproof's ``rsa_pss_3072_sha256_mgf1_32`` set and of AWS KMS ``RSASSA_PSS_SHA_256``.
ECDSA signatures are ASN.1 DER, as AWS KMS returns them. ``prehashed=True`` signs or checks a
SHA-256 digest the caller computed; Ed25519 signs whole messages only (RFC 8032 Ed25519ph is
not offered).
"""

from __future__ import annotations

import base64
from typing import Final, Literal, get_args

import nacl.exceptions
import nacl.signing
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils

__all__ = [
    "P256_RAW_SIGNATURE_SIZE",
    "RSA_KEY_SIZE",
    "RSA_PSS_SALT_LENGTH",
    "SigningAlgorithm",
    "SigningKey",
    "VerifyingKey",
    "b64url",
    "ecdsa_p256_der_to_raw",
    "ecdsa_p256_raw_to_der",
]

SigningAlgorithm = Literal["ed25519", "ecdsa-p256-sha256", "rsa-pss-3072-sha256"]
SIGNING_ALGORITHMS: Final = frozenset(get_args(SigningAlgorithm))

RSA_KEY_SIZE: Final = 3072
RSA_PSS_SALT_LENGTH: Final = 32
P256_RAW_SIGNATURE_SIZE: Final = 64
_P256_SCALAR_LEN: Final = 32
_SHA256_LEN: Final = 32
_ED25519_PUBLIC_LEN: Final = 32

_PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
_PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey | rsa.RSAPublicKey


def b64url(data: bytes) -> str:
    """Unpadded base64url, as JOSE uses it."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def ecdsa_p256_der_to_raw(signature: bytes) -> bytes:
    """Convert an ASN.1 DER ECDSA P-256 signature to the fixed 64-byte ``r || s`` form.

    The raw form is what JOSE ``ES256`` and RFC 9421 ``ecdsa-p256-sha256`` carry on the wire.

    Raises:
        ValueError: for bytes that are not a DER ``Ecdsa-Sig-Value`` with 256-bit ``r`` and ``s``.
    """
    r, s = utils.decode_dss_signature(signature)
    if not (0 < r < 1 << 256 and 0 < s < 1 << 256):
        raise ValueError("not a P-256 signature")
    return r.to_bytes(_P256_SCALAR_LEN, "big") + s.to_bytes(_P256_SCALAR_LEN, "big")


def ecdsa_p256_raw_to_der(signature: bytes) -> bytes:
    """Convert a 64-byte ``r || s`` ECDSA P-256 signature to the DER that :meth:`VerifyingKey.verify` takes.

    Raises:
        ValueError: for input that is not exactly 64 bytes.
    """
    if not isinstance(signature, bytes) or len(signature) != P256_RAW_SIGNATURE_SIZE:
        raise ValueError("a raw P-256 signature is 64 bytes")
    r = int.from_bytes(signature[:_P256_SCALAR_LEN], "big")
    s = int.from_bytes(signature[_P256_SCALAR_LEN:], "big")
    return utils.encode_dss_signature(r, s)


def _int_b64url(n: int) -> str:
    return b64url(n.to_bytes((n.bit_length() + 7) // 8 or 1, "big"))


def _pss() -> padding.PSS:
    return padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=RSA_PSS_SALT_LENGTH)


def _check_digest(message: bytes, prehashed: bool) -> None:
    if prehashed and len(message) != _SHA256_LEN:
        raise ValueError("a SHA-256 digest must be exactly 32 bytes")


class VerifyingKey:
    """A public key that checks signatures of one algorithm."""

    __slots__ = ("_key", "_nacl", "algorithm")

    def __init__(self, algorithm: SigningAlgorithm, key: _PublicKey) -> None:
        self.algorithm = algorithm
        self._key = key
        self._nacl: nacl.signing.VerifyKey | None = None

    @classmethod
    def from_der(cls, algorithm: SigningAlgorithm, der: bytes) -> VerifyingKey:
        """Load a DER SubjectPublicKeyInfo and check it matches ``algorithm``."""
        key = serialization.load_der_public_key(der)
        return cls(algorithm, _check_public(algorithm, key))

    @classmethod
    def from_pem(cls, algorithm: SigningAlgorithm, pem: bytes | str) -> VerifyingKey:
        """Load a PEM SubjectPublicKeyInfo and check it matches ``algorithm``."""
        data = pem.encode() if isinstance(pem, str) else pem
        key = serialization.load_pem_public_key(data)
        return cls(algorithm, _check_public(algorithm, key))

    @classmethod
    def from_raw(cls, algorithm: SigningAlgorithm, data: bytes) -> VerifyingKey:
        """Load a raw public key: the 32-byte RFC 8032 encoding, for Ed25519 only.

        Raises:
            ValueError: for another algorithm or a key that is not 32 bytes.
        """
        if algorithm != "ed25519":
            raise ValueError("raw public keys are defined for Ed25519 only")
        if not isinstance(data, bytes) or len(data) != _ED25519_PUBLIC_LEN:
            raise ValueError("an Ed25519 public key is 32 bytes")
        return cls(algorithm, ed25519.Ed25519PublicKey.from_public_bytes(data))

    def verify(self, message: bytes, signature: bytes, *, prehashed: bool = False) -> bool:
        """Return whether ``signature`` is valid for ``message``; never raises on a bad one."""
        key = self._key
        try:
            if isinstance(key, ed25519.Ed25519PublicKey):
                if prehashed:
                    raise ValueError("Ed25519 signs whole messages, not digests")
                return self._verify_ed25519(message, signature)
            elif isinstance(key, ec.EllipticCurvePublicKey):
                _check_digest(message, prehashed)
                algo = utils.Prehashed(hashes.SHA256()) if prehashed else hashes.SHA256()
                key.verify(signature, message, ec.ECDSA(algo))
            else:
                _check_digest(message, prehashed)
                algo = utils.Prehashed(hashes.SHA256()) if prehashed else hashes.SHA256()
                key.verify(signature, message, _pss(), algo)
        except InvalidSignature:
            return False
        return True

    def _verify_ed25519(self, message: bytes, signature: bytes) -> bool:
        # libsodium (PyNaCl) verifies Ed25519 about twice as fast as OpenSSL here, and this is
        # on the request path of every signed request. It is also the stricter of the two
        # (it refuses small-order public keys and non-canonical encodings).
        verifier = self._nacl
        if verifier is None:
            raw = self._key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            verifier = self._nacl = nacl.signing.VerifyKey(raw)
        try:
            verifier.verify(message, signature)
        except (nacl.exceptions.BadSignatureError, ValueError, TypeError):
            return False
        return True

    def public_raw(self) -> bytes:
        """The raw public key: the 32-byte RFC 8032 encoding, for Ed25519 only.

        Raises:
            ValueError: for an ECDSA or RSA key, which have no single raw form here.
        """
        key = self._key
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise ValueError("raw public keys are defined for Ed25519 only")
        return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def public_der(self) -> bytes:
        """DER SubjectPublicKeyInfo."""
        return self._key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def public_pem(self) -> str:
        """PEM SubjectPublicKeyInfo."""
        return self._key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode("ascii")

    def jwk(self, *, kid: str | None = None) -> dict[str, str]:
        """The public key as an RFC 7517 JWK (with ``alg`` and ``use``)."""
        key = self._key
        out: dict[str, str]
        if isinstance(key, ed25519.Ed25519PublicKey):
            raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            out = {"kty": "OKP", "crv": "Ed25519", "x": b64url(raw), "alg": "EdDSA"}
        elif isinstance(key, ec.EllipticCurvePublicKey):
            nums = key.public_numbers()
            out = {
                "kty": "EC", "crv": "P-256", "alg": "ES256",
                "x": b64url(nums.x.to_bytes(32, "big")), "y": b64url(nums.y.to_bytes(32, "big")),
            }
        else:
            rnums = key.public_numbers()
            out = {"kty": "RSA", "alg": "PS256", "n": _int_b64url(rnums.n),
                   "e": _int_b64url(rnums.e)}
        out["use"] = "sig"
        if kid is not None:
            out["kid"] = kid
        return out


class SigningKey:
    """A private key that signs with one algorithm (Ed25519 through libsodium, as PyNaCl:
    the same deterministic signature as pyca/cryptography's, about a fifth faster)."""

    __slots__ = ("_key", "_nacl", "algorithm")

    def __init__(self, algorithm: SigningAlgorithm, key: _PrivateKey) -> None:
        self.algorithm = algorithm
        self._key = key
        self._nacl: nacl.signing.SigningKey | None = None

    @classmethod
    def generate(cls, algorithm: SigningAlgorithm) -> SigningKey:
        """Generate a fresh key pair."""
        key: _PrivateKey
        if algorithm == "ed25519":
            key = ed25519.Ed25519PrivateKey.generate()
        elif algorithm == "ecdsa-p256-sha256":
            key = ec.generate_private_key(ec.SECP256R1())
        elif algorithm == "rsa-pss-3072-sha256":
            key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEY_SIZE)
        else:
            raise ValueError(f"unknown signing algorithm {algorithm!r}")
        return cls(algorithm, key)

    @classmethod
    def from_private_bytes(cls, algorithm: SigningAlgorithm, data: bytes) -> SigningKey:
        """Load material written by :meth:`private_bytes` (PKCS#8 DER)."""
        key = serialization.load_der_private_key(data, password=None)
        if not isinstance(key, (ed25519.Ed25519PrivateKey, ec.EllipticCurvePrivateKey,
                                rsa.RSAPrivateKey)):
            raise ValueError("unsupported private key type")
        _check_public(algorithm, key.public_key())
        return cls(algorithm, key)

    @classmethod
    def from_pem(cls, pem: bytes | str, *, password: bytes | None = None) -> SigningKey:
        """Load a PEM private key (PKCS#8, or the traditional SEC1/PKCS#1 forms) and detect its algorithm.

        Ed25519 maps to ``ed25519``, an ECDSA P-256 key to ``ecdsa-p256-sha256`` and a 3072-bit
        RSA key to ``rsa-pss-3072-sha256``.

        Raises:
            ValueError: for unreadable PEM, a wrong or missing ``password``, or another key type.
        """
        data = pem.encode() if isinstance(pem, str) else pem
        try:
            key = serialization.load_pem_private_key(data, password=password)
        except (TypeError, UnsupportedAlgorithm) as exc:  # missing/unexpected password, odd key type
            raise ValueError(str(exc)) from None
        algorithm: SigningAlgorithm
        if isinstance(key, ed25519.Ed25519PrivateKey):
            algorithm = "ed25519"
        elif isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
            algorithm = "ecdsa-p256-sha256"
        elif isinstance(key, rsa.RSAPrivateKey) and key.key_size == RSA_KEY_SIZE:
            algorithm = "rsa-pss-3072-sha256"
        else:
            raise ValueError("unsupported private key type (expected Ed25519, ECDSA P-256 or RSA-3072)")
        return cls(algorithm, key)

    def private_pem(self) -> bytes:
        """Unencrypted PKCS#8 PEM; write it only to a file only its owner can read."""
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def private_bytes(self) -> bytes:
        """Unencrypted PKCS#8 DER; callers must seal it before it leaves memory."""
        return self._key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def public_key(self) -> VerifyingKey:
        """The matching public key."""
        return VerifyingKey(self.algorithm, self._key.public_key())

    def sign(self, message: bytes, *, prehashed: bool = False) -> bytes:
        """Sign ``message`` (or, with ``prehashed``, a SHA-256 digest of 32 bytes).

        Raises:
            ValueError: for a digest with Ed25519, or a digest of the wrong length.
        """
        key = self._key
        if isinstance(key, ed25519.Ed25519PrivateKey):
            if prehashed:
                raise ValueError("Ed25519 signs whole messages, not digests")
            signer = self._nacl
            if signer is None:
                signer = self._nacl = nacl.signing.SigningKey(key.private_bytes_raw())
            return signer.sign(message).signature
        _check_digest(message, prehashed)
        algo = utils.Prehashed(hashes.SHA256()) if prehashed else hashes.SHA256()
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return key.sign(message, ec.ECDSA(algo))
        return key.sign(message, _pss(), algo)


def _check_public(algorithm: SigningAlgorithm, key: object) -> _PublicKey:
    if algorithm == "ed25519" and isinstance(key, ed25519.Ed25519PublicKey):
        return key
    if (algorithm == "ecdsa-p256-sha256" and isinstance(key, ec.EllipticCurvePublicKey)
            and isinstance(key.curve, ec.SECP256R1)):
        return key
    if (algorithm == "rsa-pss-3072-sha256" and isinstance(key, rsa.RSAPublicKey)
            and key.key_size == RSA_KEY_SIZE):
        return key
    raise ValueError(f"key does not match algorithm {algorithm!r}")
