"""Request authentication: who is calling, proven by which credential.

Schemes, each enabled per deployment (:class:`AuthSettings`), tried in this order:

1. **HTTP Message Signature** (RFC 9421; primary): a ``Signature-Input``/``Signature`` pair
   whose ``keyid`` is ``<principal>/<JWK thumbprint>`` of a registered public key (``ed25519``,
   ``ecdsa-p256-sha256``) or ``<principal>/ss_…`` of a shared secret (``hmac-sha256``).
2. **Bearer token**: the admin token (``kg_admin_…``) or an API key (``kg_ak_…``).
3. **mTLS**: a verified client certificate that matches a credential (fingerprint or
   subject/SAN rule).

Every failure raises a subclass of :class:`~keygrants.errors.Unauthenticated` with a precise
code and no further detail. The built-in ``admin`` principal always accepts the admin token:
no configuration can lock the operator out.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from keygrants.auth import ADMIN_PRINCIPAL, ADMIN_TOKEN_PREFIX, MAX_TOKEN_LENGTH, RequestContext, _digest
from keygrants.auth.credentials import certificate_matches, parse_api_key, verify_api_key
from keygrants.auth.directory import Directory
from keygrants.auth.httpsig import (
    DEFAULT_NONCE_CACHE_SIZE,
    MAX_SIGNATURE_INPUT_LENGTH,
    Message,
    NonceCache,
    RequestVerifier,
)
from keygrants.auth.model import Credential
from keygrants.auth.ratelimit import RateLimiter
from keygrants.crypto.signing import VerifyingKey
from keygrants.errors import (
    CredentialExpired,
    CredentialRevoked,
    HeaderTooLarge,
    KeygrantsError,
    PrincipalDisabled,
    RateLimited,
    SignatureInvalid,
    Unauthenticated,
    UnknownCredential,
)

__all__ = ["AUTH_METHODS", "AuthRequest", "AuthSettings", "Authenticator"]

log = logging.getLogger("keygrants.auth")
_KEYID: Final = re.compile(r';keyid="([^"]{1,512})"')  # the first signature's, before parsing

AUTH_METHODS: Final = ("signature", "api_key", "mtls", "admin_token")
KEYID_SEPARATOR: Final = "/"


@dataclass(frozen=True, slots=True)
class AuthSettings:
    """Which schemes are accepted and the signature checks' bounds.

    ``admin_token`` is always accepted (lockout-free); ``mtls`` needs a server with
    ``--client-ca``.
    """

    methods: frozenset[str] = frozenset({"signature", "api_key", "admin_token"})
    max_skew: int = 60
    max_signature_lifetime: int = 300
    require_nonce: bool = True
    nonce_cache_size: int = DEFAULT_NONCE_CACHE_SIZE

    def __post_init__(self) -> None:
        unknown = self.methods - set(AUTH_METHODS)
        if unknown:
            raise ValueError(f"unknown authentication method(s): {', '.join(sorted(unknown))}")
        if not 1 <= self.max_skew <= 3600:
            raise ValueError("max_skew must be 1..3600 seconds")
        if not 1 <= self.max_signature_lifetime <= 3600:
            raise ValueError("max_signature_lifetime must be 1..3600 seconds")
        if self.nonce_cache_size < 1:
            raise ValueError("nonce_cache_size must be positive")


@dataclass(slots=True)
class AuthRequest:
    """What authentication reads from a request. ``headers`` is built only for signed
    requests (lower-case names, repeated fields joined with ``", "``)."""

    method: str
    target_uri: str
    authorization: str | None = None
    signature_input: str | None = None
    signature: str | None = None
    headers: Callable[[], Mapping[str, str]] | None = None
    body: bytes = b""
    client_cert: bytes | None = None
    request_id: str = ""
    source: str | None = None
    trace_id: str | None = None
    pending_audit: list[Any] | None = field(default=None)


class Authenticator:
    """Turns a request into a :class:`RequestContext` or raises ``Unauthenticated``.

    Args:
        directory: principals and credentials (in memory).
        admin_digest: SHA-256 of the admin token.
        api_key_hmac_key: the sealed key under which API keys are hashed.
        settings: accepted schemes and bounds.
        clock: Unix time (injected in tests).
    """

    def __init__(self, directory: Directory, admin_digest: bytes, api_key_hmac_key: bytes,
                 settings: AuthSettings | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.directory = directory
        self.settings = settings or AuthSettings()
        self._admin_digest = admin_digest
        self._api_key_hmac_key = api_key_hmac_key
        self._clock = clock
        self.nonces = NonceCache(max_entries=self.settings.nonce_cache_size)
        self._verifier = RequestVerifier(
            resolve_key=self._signing_key, nonce_cache=self.nonces,
            max_skew=self.settings.max_skew, max_lifetime=self.settings.max_signature_lifetime,
            require_nonce=self.settings.require_nonce,
            # a principal's keys share one quota of the replay cache: several keys must not
            # let one principal fill it and lock every other signer out
            nonce_owner=lambda keyid: keyid.rpartition(KEYID_SEPARATOR)[0] or keyid)

    def check_signing_keyid(self, signature_input: str | None) -> None:
        """Before a signed request's body is read: its ``Signature-Input`` must name a key this
        server knows (whose state is checked later, after the signature verifies), so a client
        without one cannot make the server read and hold bodies.

        Raises:
            Unauthenticated: signatures are not accepted, the header is missing or names no
                key, or the key is unknown (``unknown_key``).
            HeaderTooLarge: the header is over its limit.
        """
        if "signature" not in self.settings.methods:
            raise Unauthenticated("signature authentication is not enabled")
        if signature_input is None:
            raise SignatureInvalid("missing Signature-Input")
        if len(signature_input) > MAX_SIGNATURE_INPUT_LENGTH:
            raise HeaderTooLarge("Signature-Input header too large")
        found = _KEYID.search(signature_input)
        if found is None:
            raise SignatureInvalid("missing keyid parameter")
        self._signing_credential(found.group(1))

    def set_admin_digest(self, digest: bytes) -> None:
        """Swap the admin token (``--reset-admin-token``)."""
        self._admin_digest = digest

    def authenticate(self, req: AuthRequest, *,
                     rate_limiter: RateLimiter | None = None) -> RequestContext:
        """Identify the caller, and spend one token of its rate limit.

        Raises:
            Unauthenticated: ``unauthenticated`` when no credential was presented, or the
                precise subclass for a presented credential that fails.
            RateLimited: the authenticated principal is over its rate limit (for a signature,
                checked before its nonce is recorded, so refused requests do not fill the
                replay cache).
        """
        ctx = self._authenticate(req, rate_limiter)
        if rate_limiter is not None and ctx.auth_method != "signature":
            try:
                rate_limiter.take(ctx.principal)
            except RateLimited as exc:
                exc.credential = ctx.credential_id
                raise
        return ctx

    def _authenticate(self, req: AuthRequest, rate_limiter: RateLimiter | None) -> RequestContext:
        methods = self.settings.methods
        now = self._clock()
        if req.signature_input is not None or req.signature is not None:
            if "signature" not in methods:
                raise Unauthenticated("signature authentication is not enabled")
            return self._by_signature(req, now, rate_limiter)
        if req.authorization is not None:
            scheme, _, token = req.authorization.partition(" ")
            token = token.strip()
            if scheme.lower() != "bearer" or not token:
                raise Unauthenticated("unsupported authorization scheme")
            if len(token) > MAX_TOKEN_LENGTH:
                raise HeaderTooLarge("authorization header too large")
            if token.startswith(ADMIN_TOKEN_PREFIX):
                if not hmac.compare_digest(_digest(token), self._admin_digest):
                    raise UnknownCredential("invalid credentials")
                return self._context(req, ADMIN_PRINCIPAL, "admin-token", "admin_token")
            if "api_key" not in methods:
                raise Unauthenticated("API key authentication is not enabled")
            return self._by_api_key(req, token, now)
        if req.client_cert is not None and "mtls" in methods:
            return self._by_certificate(req, now)
        raise Unauthenticated()

    # -- schemes -----------------------------------------------------------------------------

    def _signing_credential(self, keyid: str) -> Credential:
        principal_id, sep, thumbprint = keyid.rpartition(KEYID_SEPARATOR)
        cred = self.directory.credential(thumbprint) if sep else None
        if (cred is None or cred.kind not in ("public_key", "shared_secret")
                or cred.principal_id != principal_id):
            raise UnknownCredential()
        return cred

    def _signing_key(self, keyid: str) -> tuple[str, VerifyingKey | bytes]:
        # The credential's state is checked only after the signature verifies (see
        # _by_signature): only the key's holder learns that it was revoked or expired.
        cred = self._signing_credential(keyid)
        if cred.kind == "shared_secret":
            return "hmac-sha256", self.directory.shared_secret(cred)
        assert cred.algorithm is not None
        return cred.algorithm, self.directory.verifying_key(cred)

    def _by_signature(self, req: AuthRequest, now: float,
                      rate_limiter: RateLimiter | None) -> RequestContext:
        headers = req.headers() if req.headers is not None else {}
        message = Message(method=req.method, target_uri=req.target_uri, headers=headers)

        def verified(keyid: str) -> None:
            cred = self._signing_credential(keyid)
            self._usable(cred, now)
            if rate_limiter is not None:
                try:
                    rate_limiter.take(cred.principal_id)
                except RateLimited as exc:
                    exc.credential = cred.id
                    raise

        try:
            parsed = self._verifier.verify(message, req.body, signature_input=req.signature_input,
                                           signature=req.signature, now=now,
                                           before_nonce=verified)
        except KeygrantsError:
            raise
        except (TypeError, ValueError, UnicodeError):
            # input the parser should have refused with a code of its own: a 401, never a 500
            log.exception("signature verification raised unexpectedly")
            raise SignatureInvalid() from None
        keyid = parsed.params.keyid
        assert keyid is not None
        principal_id, _, thumbprint = keyid.rpartition(KEYID_SEPARATOR)
        return self._context(req, principal_id, thumbprint, "signature", now)

    def _by_api_key(self, req: AuthRequest, token: str, now: float) -> RequestContext:
        parsed = parse_api_key(token)
        if parsed is None:
            raise UnknownCredential("invalid credentials")
        cred = self.directory.credential(parsed.credential_id)
        if (cred is None or cred.kind != "api_key" or cred.secret_digest is None
                or not verify_api_key(self._api_key_hmac_key, token, cred.secret_digest)):
            raise UnknownCredential("invalid credentials")
        self._usable(cred, now)
        return self._context(req, cred.principal_id, cred.id, "api_key", now)

    def _by_certificate(self, req: AuthRequest, now: float) -> RequestContext:
        assert req.client_cert is not None
        try:
            matches = certificate_matches(req.client_cert)
        except ValueError:
            raise UnknownCredential("unreadable client certificate") from None
        for match in matches:
            cred = self.directory.credential_for_match(match)
            if cred is not None:
                self._usable(cred, now)
                return self._context(req, cred.principal_id, cred.id, "mtls", now)
        raise UnknownCredential("client certificate matches no principal")

    # -- checks ------------------------------------------------------------------------------

    def _usable(self, cred: Credential, now: float) -> None:
        if cred.revoked_at is not None:
            raise CredentialRevoked()
        if now < cred.not_before or (cred.expires_at is not None and now >= cred.expires_at):
            raise CredentialExpired()
        principal = self.directory.principal(cred.principal_id)
        if principal is None:
            raise UnknownCredential()
        if not principal.enabled:
            raise PrincipalDisabled()

    def _context(self, req: AuthRequest, principal: str, credential: str, method: str,
                 now: float | None = None) -> RequestContext:
        if principal != ADMIN_PRINCIPAL or method != "admin_token":
            self.directory.touch(principal, credential, int(now if now is not None else
                                                            self._clock()))
        return RequestContext(principal=principal, request_id=req.request_id,
                              credential_id=credential, source=req.source,
                              trace_id=req.trace_id, auth_method=method,
                              pending_audit=req.pending_audit)
