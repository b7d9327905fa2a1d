"""WSGI counterpart of :mod:`keygrants.asgi`: :class:`GrantWSGIMiddleware` (Flask, Django or
any WSGI app) over a local :class:`~keygrants.client.verifier.Verifier`.

The same :class:`~keygrants.asgi.GrantRule` s and answers; the verified
:class:`~keygrants.grants.model.GrantClaims` are in ``environ["keygrants.grant"]``.

WSGI has no standard place for the client's certificate, which an mTLS-bound grant needs:
:func:`environ_client_cert` reads ``SSL_CLIENT_CERT`` (PEM: Apache mod_ssl with
``SSLOptions +ExportCertData`` under mod_wsgi, or a variable the front server sets) and the
TLS socket gunicorn passes as ``gunicorn.socket``; pass ``client_cert=`` for anything else.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from keygrants.asgi import (
    GrantRule,
    check_audience,
    error_body,
    pem_to_der,
    request_base,
    token_from_headers,
)
from keygrants.client.verifier import Verifier
from keygrants.errors import KeygrantsError, Unauthenticated

__all__ = ["GrantWSGIMiddleware", "environ_client_cert"]

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]
_REASONS = {401: "Unauthorized", 403: "Forbidden", 503: "Service Unavailable"}


def environ_client_cert(environ: dict[str, Any]) -> bytes | None:
    """The client's certificate (DER) from ``SSL_CLIENT_CERT`` or gunicorn's TLS socket."""
    pem = environ.get("SSL_CLIENT_CERT")
    if pem:
        return pem_to_der(pem)
    sock = environ.get("gunicorn.socket")
    if isinstance(sock, ssl.SSLSocket):
        return sock.getpeercert(binary_form=True)
    return None


class GrantWSGIMiddleware:
    """Enforce grant rules on a WSGI app (see :class:`keygrants.asgi.GrantMiddleware`).

    ``client_cert`` returns the DER certificate the client presented on this request, for
    grants bound to one (default :func:`environ_client_cert`).
    """

    def __init__(self, app: WSGIApp, verifier: Verifier, rules: Sequence[GrantRule], *,
                 public_url: str | None = None,
                 client_cert: Callable[[dict[str, Any]], bytes | None] = environ_client_cert
                 ) -> None:
        self.app = app
        self.verifier = verifier
        self.rules = tuple(rules)
        self.public_url = public_url.rstrip("/") if public_url else None
        self.client_cert = client_cert

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "/")
        rule = next((r for r in self.rules if r.matches(method, path)), None)
        if rule is None:
            return self.app(environ, start_response)
        headers = {k[5:].replace("_", "-").lower(): str(v) for k, v in environ.items()
                   if k.startswith("HTTP_")}
        try:
            token = token_from_headers(headers)
            if token is None:
                raise Unauthenticated("a grant token is required")
            base = self.public_url or request_base(environ.get("wsgi.url_scheme", "http"),
                                                   headers.get("host",
                                                               environ.get("SERVER_NAME", "")))
            raw = environ.get("REQUEST_URI") or environ.get("RAW_URI")  # as sent, encoded
            sent = str(raw).split("?", 1)[0] if raw else environ.get("SCRIPT_NAME", "") + path
            claims = self.verifier.verify(
                token, operation=rule.operation,
                context=rule.context(headers, path) if rule.context else None,
                dpop_proof=headers.get("dpop"), method=method, url=base + sent,
                client_cert=self.client_cert(environ), key=rule.key)
            check_audience(claims, rule.audience)
        except KeygrantsError as exc:
            body = error_body(exc)
            response_headers = [("Content-Type", "application/json"),
                                ("Content-Length", str(len(body)))]
            if exc.status == 401:
                response_headers.append(("WWW-Authenticate", 'Bearer realm="keygrants-grant"'))
            start_response(f"{exc.status} {_REASONS.get(exc.status, 'Error')}", response_headers)
            return [body]
        environ["keygrants.grant"] = claims
        return self.app(environ, start_response)
