"""Principal, credential and policy records, as the store keeps them.

A **principal** is a service or a person. It proves who it is with one of several
**credentials**, each with its own id, validity window and revocation, so that a credential
can be rotated without downtime:

- ``public_key``: an Ed25519 or ECDSA P-256 public key (SubjectPublicKeyInfo DER) that signs
  requests (RFC 9421). Its id is the key's RFC 7638 JWK thumbprint, so a client derives the
  signature ``keyid`` (``<principal>/<thumbprint>``) from its private key file alone.
- ``shared_secret``: a server-generated 256-bit secret for ``hmac-sha256`` request signatures,
  stored sealed under the root key (the server must be able to recompute the MAC).
- ``api_key``: a server-generated bearer secret, stored only as a keyed hash.
- ``mtls``: a client-certificate match, by SHA-256 fingerprint or by subject/SAN rule.

Times are Unix seconds.
"""

from __future__ import annotations

from typing import Final, Literal

import msgspec

__all__ = [
    "CREDENTIAL_KINDS",
    "PRINCIPAL_NAME_PATTERN",
    "Credential",
    "CredentialKind",
    "Policy",
    "Principal",
]

CredentialKind = Literal["public_key", "shared_secret", "api_key", "mtls"]
CREDENTIAL_KINDS: Final[tuple[CredentialKind, ...]] = ("public_key", "shared_secret", "api_key",
                                                      "mtls")

PRINCIPAL_NAME_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$"


class Principal(msgspec.Struct, frozen=True, kw_only=True):
    """A service or a person. ``id`` is its name (``svc-billing``); ``builtin`` marks the
    ``admin`` principal, which cannot be disabled or deleted."""

    id: str
    display_name: str = ""
    tags: tuple[str, ...] = ()
    enabled: bool = True
    builtin: bool = False
    created_at: int
    updated_at: int
    last_seen_at: int | None = None


class Credential(msgspec.Struct, frozen=True, kw_only=True):
    """One way for a principal to authenticate.

    ``algorithm`` and ``public_key_der`` are set for public keys, ``secret_digest`` (keyed
    HMAC-SHA256 of the API key) for API keys, ``sealed_secret`` for shared secrets,
    ``match`` for mTLS (``sha256:<hex>``,
    ``subject:<RFC 4514 name>``, ``san-dns:<name>``, ``san-uri:<uri>`` or
    ``san-email:<address>``).
    """

    id: str
    principal_id: str
    kind: CredentialKind
    label: str = ""
    algorithm: str | None = None
    public_key_der: bytes | None = None
    secret_digest: bytes | None = None
    sealed_secret: bytes | None = None
    match: str | None = None
    not_before: int
    expires_at: int | None = None
    created_at: int
    last_used_at: int | None = None
    revoked_at: int | None = None


class Policy(msgspec.Struct, frozen=True, kw_only=True):
    """A named Cedar policy text (one or more statements)."""

    name: str
    text: str
    description: str = ""
    created_at: int
    updated_at: int
