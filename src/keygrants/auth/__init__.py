"""Authentication of callers.

In this release the one credential is the admin token: ``kg_admin_`` followed by 43
base64url characters (256 bits). The server keeps only its SHA-256 digest (a high-entropy
token needs no slow hash) and compares digests in constant time. The request context that
authentication produces is what the policy and audit layers consume.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from keygrants.errors import Unauthenticated

if TYPE_CHECKING:
    from keygrants.store.base import Store

__all__ = [
    "ADMIN_PRINCIPAL",
    "ADMIN_TOKEN_PREFIX",
    "AdminTokenAuthenticator",
    "RequestContext",
    "ensure_admin_token",
    "generate_admin_token",
]

ADMIN_PRINCIPAL: Final = "admin"
ADMIN_TOKEN_PREFIX: Final = "kg_admin_"
ADMIN_TOKEN_META: Final = "admin_token_sha256"
MAX_TOKEN_LENGTH: Final = 512


@dataclass(frozen=True, slots=True)
class RequestContext:
    """Who is asking, and the request's identifiers for audit and tracing.

    ``auth_method`` is how the caller proved who it is (``signature``, ``api_key``, ``mtls``,
    ``admin_token``); ``attributes`` collects facts for the request's audit events (the
    authentication method, the policy statements that decided). ``pending_audit`` is set by
    the HTTP edge: audit events recorded for this request put
    their durability futures there and the edge awaits them before it answers. ``grant`` is
    the verified :class:`~keygrants.grants.model.GrantClaims` of a grant token the caller
    presented: then the grant, not the caller's policies, decides what the request may do.
    """

    principal: str
    request_id: str = ""
    credential_id: str | None = None
    source: str | None = None
    trace_id: str | None = None
    auth_method: str | None = None
    attributes: dict[str, str] = field(default_factory=dict)
    pending_audit: list[Any] | None = None
    grant: Any = None


def generate_admin_token() -> str:
    """A fresh admin token."""
    return ADMIN_TOKEN_PREFIX + secrets.token_urlsafe(32)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def ensure_admin_token(store: Store) -> str | None:
    """Create the admin token on first start; return it then, ``None`` if one exists."""
    token = generate_admin_token()
    if store.set_meta_if_absent(ADMIN_TOKEN_META, _digest(token)):
        return token
    return None


def reset_admin_token(store: Store) -> str:
    """Replace the admin token (the old one stops working at once)."""
    token = generate_admin_token()
    store.set_meta(ADMIN_TOKEN_META, _digest(token))
    return token


class AdminTokenAuthenticator:
    """Checks a bearer token against the stored admin token digest."""

    def __init__(self, store: Store) -> None:
        self._store = store
        digest = store.get_meta(ADMIN_TOKEN_META)
        if digest is None:
            raise ValueError("no admin token configured; call ensure_admin_token first")
        self._digest = digest

    def authenticate(self, token: str | None, *, request_id: str = "",
                     source: str | None = None, pending_audit: list[Any] | None = None
                     ) -> RequestContext:
        """Return the admin context for a valid token.

        Raises:
            Unauthenticated: for a missing token ("authentication required") or an oversized
                or wrong one ("invalid credentials"); the code is ``unauthenticated`` for all.
        """
        if not token:
            raise Unauthenticated()
        if len(token) > MAX_TOKEN_LENGTH:
            raise Unauthenticated("invalid credentials")
        if not hmac.compare_digest(_digest(token), self._digest):
            raise Unauthenticated("invalid credentials")
        return RequestContext(principal=ADMIN_PRINCIPAL, request_id=request_id,
                              credential_id="admin-token", source=source,
                              pending_audit=pending_audit)
