"""ASGI middleware that demands a grant per route: :class:`GrantMiddleware` (Starlette,
FastAPI or any ASGI app), over a local :class:`~keygrants.client.verifier.AsyncVerifier`.

Each :class:`GrantRule` names a method and path (exact, or a prefix ending in ``*``), the
operation the grant must allow, optionally an audience it must name and a function that
reads the encryption context from the request, and optionally the key the grant must be for.
A request matching a rule must present a grant token (``Keygrants-Grant: <token>``, or
``Authorization: Bearer|DPoP <token>``) that verifies locally; its
:class:`~keygrants.grants.model.GrantClaims` then sit in ``scope["state"]["grant"]``
(Starlette's ``request.state.grant``) for the handler. Refusals are answered here in the
KMS's one error shape: 401 ``unauthenticated`` (no token), 403 with the grant's code, 503
``verifier_unavailable`` (fail-closed). Requests that match no rule pass through untouched.

WebSocket handshakes are checked like ``GET`` requests (DPoP proofs name the ``http``/``https``
URL of the ``ws``/``wss`` one); a refused handshake is answered with the error response when
the server supports the ``websocket.http.response`` extension, else closed with code 1008
(policy violation) before it is accepted. A connection of any other type (not ``http``,
``websocket`` or ``lifespan``) whose path matches a rule is refused: its protocol is unknown
here, so it is never passed to the application.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

from keygrants.auth.httpsig import check_authority
from keygrants.client.verifier import AsyncVerifier
from keygrants.errors import (
    AudienceMismatch,
    GrantMalformed,
    InvalidRequest,
    KeygrantsError,
    Unauthenticated,
)
from keygrants.grants.model import GrantClaims

__all__ = ["GrantMiddleware", "GrantRule", "token_from_headers"]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
_MAX_TOKEN_HEADER = 8192 + 16
_WS_CLOSE_POLICY_VIOLATION = 1008  # RFC 6455 §7.4.1
_HTTP_SCHEMES = {"ws": "http", "wss": "https"}  # a WebSocket's URL for DPoP ``htu``
log = logging.getLogger("keygrants.asgi")


@dataclass(frozen=True, slots=True)
class GrantRule:
    """A route that needs a grant.

    Attributes:
        path: an exact path, or a prefix ending in ``*`` (``/v1/invoices/*``).
        operation: the operation the grant must include (``decrypt``, ...), or ``None``.
        method: the HTTP method, or ``None`` for any.
        audience: an audience the token's ``aud`` must include (besides the verifier's).
        context: reads the encryption context the grant's constraints are checked against
            from the request's headers (lower-case names) and path; ``None``: no context.
        key: the id of the key the grant must be for (``key_not_granted`` otherwise); ``None``
            accepts a grant for any key, so a grant on an unrelated key with the operation
            would pass: set it whenever the route serves one key's data.
    """

    path: str
    operation: str | None = None
    method: str | None = None
    audience: str | None = None
    context: Callable[[Mapping[str, str], str], Mapping[str, str] | None] | None = None
    key: str | None = None

    def matches(self, method: str, path: str) -> bool:
        """``path`` is the request path below the application's root (mount prefixes
        included: write rules as the client's paths). A ``GET`` rule covers ``HEAD``, which
        frameworks answer with the GET handler."""
        if self.method is not None:
            wanted = self.method.upper()
            if wanted != method and not (wanted == "GET" and method == "HEAD"):
                return False
        return self.matches_path(path)

    def matches_path(self, path: str) -> bool:
        """Whether ``path`` is this rule's, whatever the method."""
        if self.path.endswith("*"):
            return fnmatch.fnmatchcase(path, self.path)
        return path == self.path


def token_from_headers(headers: Mapping[str, str]) -> str | None:
    """The grant token of a request: ``Keygrants-Grant``, else ``Authorization: Bearer`` or
    ``DPoP`` (RFC 9449); ``None`` when there is none.

    Raises:
        GrantMalformed: a token over 8 KiB.
    """
    token = headers.get("keygrants-grant")
    if token is None:
        scheme, _, value = headers.get("authorization", "").partition(" ")
        if scheme.lower() in ("bearer", "dpop") and value:
            token = value
    if token is None:
        return None
    if len(token) > _MAX_TOKEN_HEADER:  # sent, but too long to be one of ours: not "no token"
        raise GrantMalformed("grant token over 8 KiB")
    return token.strip()


def error_body(exc: KeygrantsError) -> bytes:
    return json.dumps(exc.to_dict(), separators=(",", ":")).encode()


def check_audience(claims: GrantClaims, audience: str | None) -> None:
    if audience is not None and audience not in claims.audiences:
        raise AudienceMismatch()


class GrantMiddleware:
    """Enforce :class:`GrantRule` s on an ASGI app.

    Args:
        app: the application.
        verifier: the local verifier (one per process; it caches keys, revocations, tokens).
        rules: the protected routes, first match wins.
        public_url: the scheme and host clients use (``https://api.example.com``), for DPoP
            ``htu`` (with the request path as received; ``ws``/``wss`` count as ``http``/
            ``https``); default: the request's scheme and ``Host`` header (client-controlled:
            set this in production).
    """

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]],
                 verifier: AsyncVerifier, rules: Sequence[GrantRule], *,
                 public_url: str | None = None) -> None:
        self.app = app
        self.verifier = verifier
        self.rules = tuple(rules)
        self.public_url = _http_url(public_url.rstrip("/")) if public_url else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self.app(scope, receive, send)
            return
        if kind not in ("http", "websocket"):
            # a protocol this middleware cannot answer in: refused (never served) on a rule's path
            if "path" in scope and any(r.matches_path(_route_path(scope)) for r in self.rules):
                log.warning("refused a %r connection to a path that needs a grant", str(kind)[:32])
                return
            await self.app(scope, receive, send)
            return
        # a WebSocket handshake is a GET (RFC 6455 §4.1)
        method, path = (scope["method"] if kind == "http" else "GET"), _route_path(scope)
        rule = next((r for r in self.rules if r.matches(method, path)), None)
        if rule is None:
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        try:
            token = token_from_headers(headers)
            if token is None:
                raise Unauthenticated("a grant token is required")
            claims = await self.verifier.verify(
                token, operation=rule.operation,
                context=rule.context(headers, path) if rule.context else None,
                dpop_proof=headers.get("dpop"), method=method, url=self._url(scope, headers),
                client_cert=_client_cert(scope), key=rule.key)
            check_audience(claims, rule.audience)
        except KeygrantsError as exc:
            if kind == "websocket":
                await _refuse_websocket(scope, receive, send, exc)
            else:
                await _reply(send, exc)
            return
        scope.setdefault("state", {})["grant"] = claims
        await self.app(scope, receive, send)

    def _url(self, scope: Scope, headers: Mapping[str, str]) -> str:
        """The URL the client called, for DPoP ``htu``: its path as sent (``raw_path``, still
        percent-encoded), behind ``public_url`` or the request's scheme and ``Host``."""
        scheme = str(scope.get("scheme", "http"))
        base = self.public_url or request_base(_HTTP_SCHEMES.get(scheme, scheme),
                                               headers.get("host", "localhost"))
        raw = scope.get("raw_path")
        return base + (raw.decode("latin-1") if isinstance(raw, bytes) else str(scope["path"]))


def base_url(scheme: str, host: str) -> str:
    """``scheme://host`` for a DPoP ``htu``, from the request's ``Host`` header.

    Raises:
        InvalidRequest: the Host is not ``host[:port]``: one that carries a path (``h/x#``)
            would move the real path out of the URL the proof is checked against.
    """
    try:
        return f"{scheme}://{check_authority(host)}"
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None


def request_base(scheme: str, host: str) -> str:
    """:func:`base_url`, or ``""`` for a ``Host`` it refuses: the URL only matters to a DPoP
    proof, which then cannot match it (``pop_invalid``), while a grant that is not bound to a
    proof is judged without it (it was refused 400 for a header it does not use)."""
    try:
        return base_url(scheme, host)
    except InvalidRequest:
        return ""


def _http_url(url: str) -> str:
    """``url`` with a ``ws``/``wss`` scheme given as ``http``/``https`` (what DPoP compares)."""
    scheme, sep, rest = url.partition("://")
    if sep and scheme.lower() in _HTTP_SCHEMES:
        return f"{_HTTP_SCHEMES[scheme.lower()]}://{rest}"
    return url


def _headers(scope: Scope) -> dict[str, str]:
    """The request's headers by lower-case name; a repeated one joined with ``", "`` as WSGI
    servers do, so two ``DPoP`` proofs (or two tokens) are refused, never one of them picked."""
    headers: dict[str, str] = {}
    for k, v in scope.get("headers", ()):
        name, value = k.decode("latin-1").lower(), v.decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers


def _route_path(scope: Scope) -> str:
    """The request path without the server's ``root_path`` (ASGI puts it in ``path``), exactly
    as Starlette routes it: ``root_path`` is only stripped as whole segments, so with
    ``root_path`` ``/v1`` the path ``/v1beta/x`` (a request target ``beta/x``) stays as it is."""
    path, root = str(scope["path"]), str(scope.get("root_path", ""))
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root):] or "/"
    return path


def _client_cert(scope: Scope) -> bytes | None:
    chain = ((scope.get("extensions") or {}).get("tls") or {}).get("client_cert_chain") or ()
    for pem in chain:
        return pem_to_der(pem)
    return None


def pem_to_der(pem: object) -> bytes | None:
    """The DER bytes of a PEM certificate the server handed over; ``None`` when it is not one
    (a grant bound to a certificate is then refused as lacking one, never a server error)."""
    try:
        return ssl.PEM_cert_to_DER_cert(str(pem))
    except (ValueError, TypeError):
        return None


def _response(exc: KeygrantsError) -> tuple[list[tuple[bytes, bytes]], bytes]:
    body = error_body(exc)
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    if exc.status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="keygrants-grant"'))
    return headers, body


async def _reply(send: Send, exc: KeygrantsError) -> None:
    headers, body = _response(exc)
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _refuse_websocket(scope: Scope, receive: Receive, send: Send,
                            exc: KeygrantsError) -> None:
    """Refuse a WebSocket handshake: the error response where the server supports it
    (``websocket.http.response``), else a close with 1008 before accepting (the server then
    answers the handshake with 403)."""
    if (await receive())["type"] != "websocket.connect":
        return  # the client is gone
    if "websocket.http.response" in (scope.get("extensions") or {}):
        headers, body = _response(exc)
        await send({"type": "websocket.http.response.start", "status": exc.status,
                    "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body})
        return
    await send({"type": "websocket.close", "code": _WS_CLOSE_POLICY_VIOLATION,
                "reason": exc.code})
