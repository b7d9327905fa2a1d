"""Grants: the grant record and its checks, grant tokens, issuer keys, the revocation feed and
DPoP proofs. Pure: no I/O, time passed in (the use cases are in :mod:`keygrants.grant_service`).

The SDK and other services need only :func:`decode_grant_token` (with the JWKS), the
:class:`RevocationView` and :func:`make_proof` from here; see ``docs/grants.md``.
"""

from __future__ import annotations

from keygrants.grants.dpop import DpopProof, DpopVerifier, make_proof, proof_key_thumbprint
from keygrants.grants.issuer import IssuerKey, IssuerKeyring
from keygrants.grants.model import (
    GRANT_OPERATIONS,
    Grant,
    GrantClaims,
    check_attenuation,
    check_context,
)
from keygrants.grants.revocation import RevocationEntry, RevocationView
from keygrants.grants.token import (
    GRANT_TOKEN_TYPE,
    IssuerPublicKey,
    decode_grant_token,
    encode_grant_token,
)

__all__ = [
    "GRANT_OPERATIONS",
    "GRANT_TOKEN_TYPE",
    "DpopProof",
    "DpopVerifier",
    "Grant",
    "GrantClaims",
    "IssuerKey",
    "IssuerKeyring",
    "IssuerPublicKey",
    "RevocationEntry",
    "RevocationView",
    "check_attenuation",
    "check_context",
    "decode_grant_token",
    "encode_grant_token",
    "make_proof",
    "proof_key_thumbprint",
]
