"""Credential formats: public keys (PEM or JWK), API keys and mTLS certificate matches.

Shared secrets (for ``hmac-sha256`` request signatures) look the same with ``kg_ss_``; the
server keeps them sealed under the root key, since it must recompute the MAC.

API key layout (a typed prefix, so secret scanners recognise a leaked key)::

    kg_ak_<16 hex: credential id suffix>_<43 base64url: 256-bit secret>

The server stores only ``HMAC-SHA256(api_key_hmac_key, whole key)``: a high-entropy key needs
no slow hash, and the keyed hash means a stolen database alone does not let anyone test
guesses. The credential id is ``ak_<16 hex>``, so a presented key is looked up by id and its
digest compared in constant time.

mTLS matches are ``sha256:<64 hex>`` (the DER certificate's fingerprint),
``subject:<RFC 4514 name>``, ``san-dns:<name>``, ``san-uri:<uri>`` or ``san-email:<address>``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from keygrants.crypto import hmac_sha256, verify_hmac_sha256
from keygrants.crypto.signing import SigningAlgorithm, VerifyingKey, b64url

__all__ = [
    "API_KEY_PREFIX",
    "MAX_PUBLIC_KEY_TEXT",
    "ParsedApiKey",
    "api_key_digest",
    "certificate_fingerprint",
    "certificate_matches",
    "generate_api_key",
    "generate_shared_secret",
    "jwk_thumbprint",
    "load_public_key",
    "normalize_match",
    "parse_api_key",
    "parse_shared_secret",
    "verify_api_key",
]

API_KEY_PREFIX: Final = "kg_ak_"
SHARED_SECRET_PREFIX: Final = "kg_ss_"
_SHARED_SECRET_RE: Final = re.compile(r"^kg_ss_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")
_API_KEY_RE: Final = re.compile(r"^kg_ak_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")
MAX_PUBLIC_KEY_TEXT: Final = 8192
MAX_MATCH_LENGTH: Final = 512
_MATCH_KINDS: Final = ("sha256", "subject", "san-dns", "san-uri", "san-email")
PUBLIC_KEY_ALGORITHMS: Final[tuple[SigningAlgorithm, ...]] = ("ed25519", "ecdsa-p256-sha256")


class ParsedApiKey(tuple[str, str]):
    """``(credential id, whole key)`` of a well-formed API key."""

    __slots__ = ()

    @property
    def credential_id(self) -> str:
        return self[0]

    @property
    def key(self) -> str:
        return self[1]


def generate_api_key() -> tuple[str, str]:
    """A fresh ``(credential id, API key)``."""
    suffix = secrets.token_hex(8)
    return f"ak_{suffix}", f"{API_KEY_PREFIX}{suffix}_{secrets.token_urlsafe(32)}"


def generate_shared_secret() -> tuple[str, str]:
    """A fresh ``(credential id, shared secret text)`` for ``hmac-sha256`` signatures."""
    suffix = secrets.token_hex(8)
    return f"ss_{suffix}", f"{SHARED_SECRET_PREFIX}{suffix}_{secrets.token_urlsafe(32)}"


def parse_shared_secret(text: str) -> tuple[str, bytes] | None:
    """``(credential id, 32 secret bytes)`` of a well-formed shared secret, else ``None``.

    The MAC key is the decoded 256-bit part; the id travels in the signature's ``keyid``.
    """
    m = _SHARED_SECRET_RE.match(text.strip())
    if m is None:
        return None
    return f"ss_{m.group(1)}", base64.urlsafe_b64decode(m.group(2) + "=")


def parse_api_key(token: str) -> ParsedApiKey | None:
    """The credential id of a well-formed API key, ``None`` for anything else."""
    m = _API_KEY_RE.match(token)
    return None if m is None else ParsedApiKey((f"ak_{m.group(1)}", token))


def api_key_digest(hmac_key: bytes, api_key: str) -> bytes:
    """The keyed hash the store keeps."""
    return hmac_sha256(hmac_key, api_key.encode("ascii"))


def verify_api_key(hmac_key: bytes, api_key: str, digest: bytes) -> bool:
    """Constant-time check of a presented key against its stored digest."""
    return verify_hmac_sha256(hmac_key, api_key.encode("ascii"), digest)


def jwk_thumbprint(jwk: dict[str, str]) -> str:
    """RFC 7638 JWK SHA-256 thumbprint (base64url) of an OKP or EC public key."""
    members = ("crv", "kty", "x") if jwk["kty"] == "OKP" else ("crv", "kty", "x", "y")
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True)
    return b64url(hashlib.sha256(canonical.encode("ascii")).digest())


def load_public_key(text: str) -> VerifyingKey:
    """An Ed25519 or ECDSA P-256 public key from PEM (SubjectPublicKeyInfo) or a JWK.

    Raises:
        ValueError: for anything else (other key types and curves, private keys, garbage).
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError("public key is empty")
    if len(text) > MAX_PUBLIC_KEY_TEXT:
        raise ValueError(f"public key text is longer than {MAX_PUBLIC_KEY_TEXT} characters")
    text = text.strip()
    if text.startswith("{"):
        text = _jwk_to_pem(text)
    elif "PRIVATE KEY" in text:
        raise ValueError("that is a private key; register only the public half")
    for algorithm in PUBLIC_KEY_ALGORITHMS:
        try:
            return VerifyingKey.from_pem(algorithm, text)
        except ValueError:
            continue
        except Exception as exc:  # the PEM loader raises several types for garbage
            raise ValueError("not a PEM public key or JWK") from exc
    raise ValueError("only Ed25519 and ECDSA P-256 public keys are accepted")


def _jwk_to_pem(text: str) -> str:
    from joserfc.jwk import JWKRegistry

    try:
        data = json.loads(text)
    except ValueError:
        raise ValueError("public key JWK is not valid JSON") from None
    if not isinstance(data, dict) or data.get("kty") not in ("OKP", "EC"):
        raise ValueError("only OKP (Ed25519) and EC (P-256) JWKs are accepted")
    if "d" in data:
        raise ValueError("that JWK holds a private key; register only the public half")
    if data.get("crv") not in ("Ed25519", "P-256"):
        raise ValueError("only Ed25519 and P-256 JWKs are accepted")
    try:
        key = JWKRegistry.import_key(data)
        pem = key.as_pem(private=False)  # type: ignore[union-attr]  # kty checked above
    except Exception as exc:
        raise ValueError("invalid JWK") from exc
    return pem.decode("ascii") if isinstance(pem, bytes) else str(pem)


def normalize_match(match: str) -> str:
    """Check an mTLS match rule and return its canonical form.

    Raises:
        ValueError: for an unknown kind or a malformed value.
    """
    if not isinstance(match, str) or not 3 <= len(match) <= MAX_MATCH_LENGTH:
        raise ValueError("match must be 3-512 characters")
    kind, sep, value = match.partition(":")
    if not sep or kind not in _MATCH_KINDS or not value or value != value.strip():
        raise ValueError(f"match must be one of {', '.join(k + ':…' for k in _MATCH_KINDS)}")
    if any(ord(c) < 0x20 for c in value):
        raise ValueError("match must not contain control characters")
    if kind == "sha256":
        hexv = value.replace(":", "").lower()
        if not re.fullmatch(r"[0-9a-f]{64}", hexv):
            raise ValueError("sha256: takes the certificate's 64-hex-digit SHA-256 fingerprint")
        return f"sha256:{hexv}"
    if kind == "subject":
        try:
            value = x509.Name.from_rfc4514_string(value).rfc4514_string()
        except ValueError:
            raise ValueError("subject: takes an RFC 4514 name, e.g. CN=billing,O=Example") from None
    if kind == "san-dns":
        value = value.lower()
    return f"{kind}:{value}"


def certificate_fingerprint(der: bytes) -> str:
    """``sha256:<hex>`` of a DER certificate."""
    return "sha256:" + hashlib.sha256(der).hexdigest()


def certificate_matches(der: bytes) -> list[str]:
    """Every match rule a certificate satisfies, most specific (fingerprint) first.

    Raises:
        ValueError: if the bytes are not a certificate.
    """
    cert = x509.load_der_x509_certificate(der)
    out = [certificate_fingerprint(der), f"subject:{cert.subject.rfc4514_string()}"]
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return out
    out += [f"san-dns:{n.lower()}" for n in san.get_values_for_type(x509.DNSName)]
    out += [f"san-uri:{n}" for n in san.get_values_for_type(x509.UniformResourceIdentifier)]
    out += [f"san-email:{n}" for n in san.get_values_for_type(x509.RFC822Name)]
    return out


def certificate_der_from_pem(pem: bytes) -> bytes:
    """The DER form of a PEM certificate (``keygrants principal add-cert --cert FILE``).

    Raises:
        ValueError: if the bytes are not a PEM certificate.
    """
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:  # pyca's reason is its ASN.1 parser's debug output
        raise ValueError("not a PEM X.509 certificate (-----BEGIN CERTIFICATE----- ...)") from None
    return cert.public_bytes(serialization.Encoding.DER)
