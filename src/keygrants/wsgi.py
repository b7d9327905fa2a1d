"""WSGI counterpart of :mod:`keygrants.asgi`: :class:`GrantWSGIMiddleware` (Flask, Django or
any WSGI app) over a local :class:`~keygrants.client.verifier.Verifier`.

The same :class:`~keygrants.asgi.GrantRule` s and answers; the verified
:class:`~keygrants.grants.model.GrantClaims` are in ``environ["keygrants.grant"]``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from keygrants.asgi import GrantRule, check_audience, error_body, token_from_headers
from keygrants.client.verifier import Verifier
from keygrants.errors import KeygrantsError, Unauthenticated

__all__ = ["GrantWSGIMiddleware"]

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]
_REASONS = {401: "Unauthorized", 403: "Forbidden", 503: "Service Unavailable"}


class GrantWSGIMiddleware:
    """Enforce grant rules on a WSGI app (see :class:`keygrants.asgi.GrantMiddleware`)."""

    def __init__(self, app: WSGIApp, verifier: Verifier, rules: Sequence[GrantRule], *,
                 public_url: str | None = None) -> None:
        self.app = app
        self.verifier = verifier
        self.rules = tuple(rules)
        self.public_url = public_url.rstrip("/") if public_url else None

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
            base = self.public_url or (f"{environ.get('wsgi.url_scheme', 'http')}://"
                                       f"{headers.get('host', environ.get('SERVER_NAME', ''))}")
            raw = environ.get("REQUEST_URI") or environ.get("RAW_URI")  # as sent, encoded
            sent = str(raw).split("?", 1)[0] if raw else environ.get("SCRIPT_NAME", "") + path
            claims = self.verifier.verify(
                token, operation=rule.operation,
                context=rule.context(headers, path) if rule.context else None,
                dpop_proof=headers.get("dpop"), method=method, url=base + sent)
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
