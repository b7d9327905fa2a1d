"""Grant tokens: compact JWS (JWT) of type ``kg+jwt``, signed by an issuer key.

Layout (DESIGN.md "Grant token")::

    header  {"alg": "EdDSA", "kid": "<issuer key id>", "typ": "kg+jwt"}
    claims  {"iss", "sub" (grantee), "aud" [..], "iat", "nbf", "exp", "jti" (grant id),
             "kg": {"v": 1, "key": key id, "ops": [..], "ctx_eq"?, "ctx_sub"?, "uses"?,
                    "parent"?},
             "cnf"?: {"jkt": DPoP key thumbprint} | {"x5t#S256": certificate thumbprint},
             "trace"?: W3C traceparent of the issuing request}

Verification is strict and ordered so each refusal has one precise code: the token's shape
(:class:`GrantMalformed`), its algorithm (``none`` in any casing, HMAC and anything but the
issuer key's own algorithm: :class:`GrantAlgorithmRejected`), header members beyond ``alg``,
``kid`` and ``typ`` (``jku``, ``x5u``, ``jwk``, ``x5c``, ``crit``, ...:
:class:`GrantHeaderRejected`), ``typ`` (:class:`GrantTypeInvalid`), ``kid``
(:class:`GrantUnknownKey`), the signature, the claims' types, ``iss`` (exact), ``aud``,
``nbf`` and ``exp`` with leeway. The algorithm comes from the issuer key, never from the
token: the header's ``alg`` must merely equal it.

The JWS is encoded and parsed here (it is a format, not a primitive: signatures are made and
checked by :mod:`keygrants.crypto.signing`) because a general JOSE library accepts headers this
format must refuse and costs several times the signature check on the verify path; the tests
cross-check every token with joserfc given the published JWKS.
"""

from __future__ import annotations

import binascii
import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import msgspec

from keygrants.crypto.signing import (
    SigningKey,
    VerifyingKey,
    b64url,
    ecdsa_p256_der_to_raw,
    ecdsa_p256_raw_to_der,
)
from keygrants.errors import (
    AudienceMismatch,
    GrantAlgorithmRejected,
    GrantClaimsInvalid,
    GrantExpired,
    GrantHeaderRejected,
    GrantMalformed,
    GrantNotYetValid,
    GrantSignatureInvalid,
    GrantTypeInvalid,
    GrantUnknownKey,
    IssuerMismatch,
)
from keygrants.grants.model import GRANT_OPERATIONS, Grant, GrantClaims, is_grant_id

__all__ = [
    "GRANT_TOKEN_TYPE",
    "JOSE_ALGORITHMS",
    "KID_PATTERN",
    "MAX_HEADER_LENGTH",
    "MAX_TOKEN_LENGTH",
    "IssuerPublicKey",
    "decode_grant_token",
    "encode_grant_token",
    "issuer_key_from_jwk",
    "token_header",
]

GRANT_TOKEN_TYPE: Final = "kg+jwt"
MAX_TOKEN_LENGTH: Final = 8192
#: The longest encoded header parsed. A valid header (``alg``, a ``kid`` of at most 64
#: characters, ``typ``) is under 140 characters encoded; the header is parsed before the
#: signature is checked, so a longer one is refused unparsed as malformed (the limit leaves
#: room for the headers refused with a precise code, such as one embedding a ``jwk``).
MAX_HEADER_LENGTH: Final = 1024
#: JOSE ``alg`` → the keygrants signing algorithm of the issuer key.
JOSE_ALGORITHMS: Final[Mapping[str, str]] = {"EdDSA": "ed25519", "ES256": "ecdsa-p256-sha256"}
KID_PATTERN: Final = r"^[A-Za-z0-9_-]{1,64}$"
_KID_RE: Final = re.compile(KID_PATTERN)
_B64URL_RE: Final = re.compile(r"^[A-Za-z0-9_-]+$")
_HEADER_MEMBERS: Final = frozenset({"alg", "kid", "typ"})
_FORBIDDEN_MEMBERS: Final = ("crit", "jku", "x5u", "jwk", "x5c", "x5t", "x5t#S256", "zip", "b64")
_MAX_AUDIENCES: Final = 16
_MAX_OPERATIONS: Final = len(GRANT_OPERATIONS)


@dataclass(frozen=True, slots=True)
class IssuerPublicKey:
    """A key that may verify grant tokens: its ``kid``, JOSE ``alg`` and public key."""

    kid: str
    alg: str
    key: VerifyingKey


def issuer_key_from_jwk(jwk: Mapping[str, object]) -> IssuerPublicKey | None:
    """An issuer key from a published JWK: ``OKP``/``Ed25519`` with ``alg`` ``EdDSA``, ``use``
    ``sig`` and a ``kid``; ``None`` for any other (a verifier ignores keys it cannot use, as
    RFC 7517 asks). The algorithm is the JWK's, so a token can never choose it."""
    kid, x = jwk.get("kid"), jwk.get("x")
    if (jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519" or jwk.get("alg") != "EdDSA"
            or jwk.get("use", "sig") != "sig" or not isinstance(kid, str)
            or not _KID_RE.fullmatch(kid) or not isinstance(x, str) or "d" in jwk):
        return None
    try:
        key = VerifyingKey.from_raw("ed25519", _b64decode(x))
    except (GrantMalformed, ValueError):
        return None
    return IssuerPublicKey(kid, "EdDSA", key)


@functools.lru_cache(maxsize=64)
def token_header(alg: str, kid: str) -> bytes:
    """The encoded protected header of every token signed by one issuer key (made once per
    key: it is the same for all of them)."""
    return b64url(msgspec.json.encode({"alg": alg, "kid": kid, "typ": GRANT_TOKEN_TYPE})).encode()


def encode_grant_token(grant: Grant, *, issuer: str, audiences: tuple[str, ...], issued_at: int,
                       alg: str, kid: str, key: SigningKey) -> str:
    """Sign ``grant`` as a token (``audiences`` is the token's ``aud``)."""
    kg: dict[str, object] = {"v": 1, "key": grant.key_id, "ops": sorted(grant.operations)}
    if grant.context_equals is not None:
        kg["ctx_eq"] = grant.context_equals
    if grant.context_subset is not None:
        kg["ctx_sub"] = grant.context_subset
    if grant.max_uses is not None:
        kg["uses"] = grant.max_uses
    if grant.parent_id is not None:
        kg["parent"] = grant.parent_id
    claims: dict[str, object] = {
        "iss": issuer, "sub": grant.grantee, "aud": list(audiences), "iat": issued_at,
        "nbf": grant.not_before, "exp": grant.expires_at, "jti": grant.id, "kg": kg,
    }
    if grant.cnf_jkt is not None:
        claims["cnf"] = {"jkt": grant.cnf_jkt}
    elif grant.cnf_x5t is not None:
        claims["cnf"] = {"x5t#S256": grant.cnf_x5t}
    if grant.trace is not None:
        claims["trace"] = grant.trace
    signing_input = token_header(alg, kid) + b"." + b64url(msgspec.json.encode(claims)).encode()
    signature = key.sign(signing_input)
    if alg == "ES256":
        signature = ecdsa_p256_der_to_raw(signature)
    return (signing_input + b"." + b64url(signature).encode()).decode("ascii")


class _Header(msgspec.Struct):
    alg: object = None
    kid: object = None
    typ: object = None


class _Kg(msgspec.Struct):
    key: str
    ops: list[str]
    v: int = 1
    ctx_eq: dict[str, str] | None = None
    ctx_sub: dict[str, str] | None = None
    uses: int | None = None
    parent: str | None = None


class _Claims(msgspec.Struct):
    iss: str
    sub: str
    aud: list[str] | str
    iat: int
    nbf: int
    exp: int
    jti: str
    kg: _Kg
    cnf: dict[str, str] | None = None
    trace: str | None = None


_claims_decoder: Final = msgspec.json.Decoder(_Claims)
_dict_decoder: Final = msgspec.json.Decoder(dict[str, object])


def _b64decode(part: str) -> bytes:
    """Strict base64url: the alphabet, no padding, and the canonical encoding only (the unused
    low bits of the last character must be zero), so one token has one spelling."""
    if not _B64URL_RE.fullmatch(part):
        raise GrantMalformed()
    data = _signed_part(part)
    if b64url(data) != part:
        raise GrantMalformed()
    return data


def _signed_part(part: str) -> bytes:
    """Decode the claims: their spelling is already fixed by the signature over it (another
    encoding of the same JSON is another signing input), so no canonical re-encoding."""
    try:
        return binascii.a2b_base64(part.encode("ascii").translate(_FROM_URLSAFE)
                                   + b"=" * (-len(part) % 4), strict_mode=True)
    except (binascii.Error, ValueError):
        raise GrantMalformed() from None


_FROM_URLSAFE: Final = bytes.maketrans(b"-_", b"+/")
# Accepted headers by their encoded form: one issuer key signs every token with the same
# header, so a verifier parses it once (bounded; only headers that passed every check).
_accepted_headers: dict[str, tuple[str, str]] = {}
_MAX_ACCEPTED_HEADERS: Final = 256


def _header(header_b64: str) -> tuple[str, str]:
    cached = _accepted_headers.get(header_b64)
    if cached is not None:
        return cached
    if len(header_b64) > MAX_HEADER_LENGTH:
        raise GrantMalformed()
    checked = _check_header(_b64decode(header_b64))
    if len(_accepted_headers) >= _MAX_ACCEPTED_HEADERS:
        _accepted_headers.clear()
    _accepted_headers[header_b64] = checked
    return checked


def _check_header(raw: bytes) -> tuple[str, str]:
    """``(alg, kid)`` of an acceptable header, else the precise refusal."""
    try:
        header = _dict_decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        # RecursionError: nested too deeply (unauthenticated input, so a refusal, never a 500)
        raise GrantMalformed("grant token header is not a JSON object") from None
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in JOSE_ALGORITHMS:
        raise GrantAlgorithmRejected()
    for member in _FORBIDDEN_MEMBERS:
        if member in header:
            raise GrantHeaderRejected(f"grant token header member {member!r} is not accepted")
    if not header.keys() <= _HEADER_MEMBERS:
        raise GrantHeaderRejected("grant token header has unexpected members")
    if header.get("typ") != GRANT_TOKEN_TYPE:
        raise GrantTypeInvalid()
    kid = header.get("kid")
    if not isinstance(kid, str) or not _KID_RE.fullmatch(kid):
        raise GrantUnknownKey()
    return alg, kid


def decode_grant_token(token: str, keys: Mapping[str, IssuerPublicKey], *, issuer: str,
                       audience: str | None, now: int, leeway: int = 30) -> GrantClaims:
    """Verify a grant token and return its claims.

    ``keys`` maps ``kid`` to every issuer key that may verify a live token; ``audience`` is
    the audience the caller must find in ``aud`` (``None``: not checked).

    Raises:
        GrantDenied: a subclass naming the first check that failed (see the module doc).
    """
    if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_LENGTH:
        raise GrantMalformed()
    parts = token.split(".")
    if len(parts) != 3:
        raise GrantMalformed()
    header_b64, claims_b64, signature_b64 = parts
    if not _B64URL_RE.fullmatch(claims_b64):  # checked before it is part of the signing input
        raise GrantMalformed()
    alg, kid = _header(header_b64)
    issuer_key = keys.get(kid)
    if issuer_key is None:
        raise GrantUnknownKey()
    if issuer_key.alg != alg:
        raise GrantAlgorithmRejected()
    signature = _b64decode(signature_b64)
    if alg == "ES256":
        if len(signature) != 64:
            raise GrantSignatureInvalid()
        signature = ecdsa_p256_raw_to_der(signature)
    signing_input = token[: len(header_b64) + 1 + len(claims_b64)].encode("ascii")
    if not issuer_key.key.verify(signing_input, signature):
        raise GrantSignatureInvalid()
    try:
        c = _claims_decoder.decode(_signed_part(claims_b64))
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
        raise GrantClaimsInvalid(f"grant token claims invalid: {exc}"[:200]) from None
    if c.iss != issuer:
        raise IssuerMismatch()
    audiences = (c.aud,) if isinstance(c.aud, str) else tuple(c.aud)
    if (not audiences or len(audiences) > _MAX_AUDIENCES or not is_grant_id(c.jti)
            or not set(c.kg.ops) <= GRANT_OPERATIONS or not c.kg.ops
            or len(c.kg.ops) > _MAX_OPERATIONS or c.nbf > c.exp or c.kg.v != 1):
        raise GrantClaimsInvalid()
    if audience is not None and audience not in audiences:
        raise AudienceMismatch()
    if now >= c.exp + leeway:
        raise GrantExpired()
    if now < c.nbf - leeway:
        raise GrantNotYetValid()
    cnf = c.cnf or {}
    return GrantClaims(
        grant_id=c.jti, issuer=c.iss, grantee=c.sub, audiences=audiences, issued_at=c.iat,
        not_before=c.nbf, expires_at=c.exp, key_id=c.kg.key, operations=frozenset(c.kg.ops),
        context_equals=c.kg.ctx_eq, context_subset=c.kg.ctx_sub, max_uses=c.kg.uses,
        cnf_jkt=cnf.get("jkt"), cnf_x5t=cnf.get("x5t#S256"), parent_id=c.kg.parent,
        trace=c.trace, kid=kid)
