"""The HTTP edge: parse, authenticate, call the service, map errors to one JSON shape.

Every endpoint is declared once in :data:`ENDPOINTS`; the dispatcher and the OpenAPI document
are both built from that table. The application is plain ASGI: no framework router or
middleware stack sits on the request path (measured: that stack cost about a quarter of the
throughput of this endpoint). Bodies are decoded with msgspec into the request structs of
:mod:`keygrants.models` (unknown fields refused, ``bytes`` as base64); every failure becomes
``{"error": {"code", "message", "request_id"}}`` with the status of its error class, and an
``X-Request-Id`` header on every response.

Cryptographic operations run inline on the event loop (they are microseconds and touch only
memory); operations that write to the store run in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import logging
import math
import re
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, MutableMapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Final, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

import anyio.to_thread
import msgspec

from keygrants import models as m
from keygrants.access import AccessService
from keygrants.api import metrics as mx
from keygrants.audit.log import EventQuery
from keygrants.audit.service import AuditService
from keygrants.auth import RequestContext
from keygrants.auth.authenticator import Authenticator, AuthRequest
from keygrants.auth.httpsig import build_target_uri, check_authority
from keygrants.auth.ratelimit import RateLimiter
from keygrants.errors import (
    AuditUnavailable,
    Forbidden,
    GrantDenied,
    InvalidRequest,
    KeygrantsError,
    MalformedBody,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    RequestTimeout,
    Unauthenticated,
    UseDpopNonce,
)
from keygrants.grant_service import GrantService
from keygrants.service import KMS

__all__ = ["ENDPOINTS", "Endpoint", "ExtraResponse", "HttpLimits", "KeygrantsApp", "QueryParam",
           "Reply", "create_app"]

log = logging.getLogger("keygrants.api")

_REQUEST_ID_RE: Final = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_MAX_QUERY: Final = 4096

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


async def run_in_threadpool(fn: Callable[..., Any], *args: Any) -> Any:
    """Run blocking work (store writes) off the event loop."""
    return await anyio.to_thread.run_sync(fn, *args)
_JSON: Final = "application/json"
#: Endpoint tags whose successful changes other nodes must reload (their caches).
_SHARED_STATE: Final = frozenset({"keys", "aliases", "principals", "policies", "issuer"})
_encoder: Final = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """Request body limits, in bytes."""

    max_body: int = 128 * 1024
    max_batch_body: int = 16 * 1024 * 1024

    @classmethod
    def for_plaintext(cls, max_plaintext: int, *, max_batch_body: int = 16 * 1024 * 1024
                      ) -> HttpLimits:
        """Room for the largest plaintext in base64 plus a context."""
        return cls(max_body=max_plaintext * 4 // 3 + 64 * 1024, max_batch_body=max_batch_body)


Handler = Callable[["_Call"], Awaitable[Any]]

_MAX_QUERY_INT: Final = 9_999_999_999  # what _query_int accepts: at most 10 decimal digits


@dataclass(frozen=True, slots=True)
class QueryParam:
    """A query parameter a handler reads, as the OpenAPI document declares it (``schema`` is
    its JSON schema). Unknown parameters are ignored; a test checks that each handler reads
    exactly the parameters its endpoint declares."""

    name: str
    description: str
    schema: Mapping[str, Any]
    required: bool = False


def _int_query(name: str, description: str, *, minimum: int = 0, maximum: int = _MAX_QUERY_INT,
               default: int | None = None, required: bool = False) -> QueryParam:
    """An integer parameter read by :func:`_query_int` (decimal digits, at most 10)."""
    schema: dict[str, Any] = {"type": "integer", "minimum": minimum, "maximum": maximum}
    if default is not None:
        schema["default"] = default
    return QueryParam(name, description, schema, required)


def _str_query(name: str, description: str, **schema: Any) -> QueryParam:
    return QueryParam(name, description, {"type": "string", **schema})


@dataclass(frozen=True, slots=True)
class ExtraResponse:
    """A status an endpoint answers besides its success ``status`` and the errors."""

    status: int
    description: str
    body: type | None = None


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One route: its handler and what the OpenAPI document says of it."""

    method: str
    path: str
    handler: Handler
    operation_id: str
    summary: str
    request: type | None = None
    response: type | None = None
    status: int = 200
    auth: bool = True
    batch: bool = False
    tag: str = "keys"
    grant: bool = False
    shares: str | None = None  # the shared state a success changes, when not named by the tag
    # what only the OpenAPI document reads:
    query: tuple[QueryParam, ...] = ()
    responses: tuple[ExtraResponse, ...] = ()
    media_type: str = _JSON  # of the success body
    dpop: bool = False  # reads a DPoP proof without a grant token (token exchange)
    response_headers: tuple[str, ...] = ()  # of the success response, besides X-Request-Id


@dataclass(slots=True)
class _Call:
    """What a handler gets: the services, the caller, path and query parameters, the body."""

    kms: KMS
    ctx: RequestContext
    params: dict[str, str]
    query: dict[str, str]
    body: Any
    audit_service: AuditService | None = None
    access_service: AccessService | None = None
    grant_service: GrantService | None = None
    request: _Request | None = None
    node_metrics: Callable[[], bytes] | None = None

    def param(self, name: str) -> str:
        return self.params[name]

    @property
    def access(self) -> AccessService:
        if self.access_service is None:
            raise NotFound("this server has no principal management")
        return self.access_service

    @property
    def grants(self) -> GrantService:
        if self.grant_service is None:
            raise NotFound("this server has no grants")
        return self.grant_service

    @property
    def audit(self) -> AuditService:
        if self.audit_service is None:
            raise NotFound("this server has no audit log")
        return self.audit_service


@dataclass(frozen=True, slots=True)
class Stream:
    """A handler result streamed in chunks (e.g. the audit export), produced off the loop."""

    media_type: str
    chunks: Iterator[bytes]


@dataclass(frozen=True, slots=True)
class Reply:
    """A handler result that sets its own status (e.g. readiness failing)."""

    status: int
    body: Any
    headers: tuple[tuple[bytes, bytes], ...] = ()


class _HeaderView(Mapping[str, str]):
    """Read-only, case-insensitive access to ASGI headers (names arrive lower-case)."""

    __slots__ = ("_raw",)

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self._raw = raw

    def __getitem__(self, name: str) -> str:
        key = name.lower().encode("latin-1")
        values = [v.decode("latin-1").strip() for k, v in self._raw if k == key]
        if not values:
            raise KeyError(name)
        return ", ".join(values)

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys(k.decode("latin-1") for k, _ in self._raw))

    def __len__(self) -> int:
        return len({k for k, _ in self._raw})


class _Request:
    """The parts of an ASGI HTTP scope the edge reads, parsed once."""

    __slots__ = ("authorization", "content_length", "dpop", "grant", "public", "repeated",
                 "request_id", "scope", "signature", "signature_input")

    def __init__(self, scope: Scope, next_id: Callable[[], str],
                 public: tuple[str, str] | None = None) -> None:
        self.scope = scope
        self.public = public  # (scheme, authority) of --public-url: replaces scheme and Host
        self.authorization: bytes | None = None
        self.content_length: bytes | None = None
        self.signature: bytes | None = None
        self.signature_input: bytes | None = None
        self.grant: bytes | None = None
        self.dpop: list[bytes] = []
        # a credential field sent twice (the first, if it was read, would be one caller and
        # the last another: a proxy that checks one and this server the other disagree)
        self.repeated: str | None = None
        given: bytes | None = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                if self.authorization is not None:
                    self.repeated = "Authorization"
                self.authorization = value
            elif name == b"content-length":
                self.content_length = value
            elif name == b"x-request-id":
                given = value
            elif name == b"signature-input":
                if self.signature_input is not None:
                    self.repeated = "Signature-Input"
                self.signature_input = value
            elif name == b"signature":
                if self.signature is not None:
                    self.repeated = "Signature"
                self.signature = value
            elif name == b"keygrants-grant":
                if self.grant is not None:
                    self.repeated = "Keygrants-Grant"
                self.grant = value
            elif name == b"dpop":
                self.dpop.append(value)
        rid = given.decode("latin-1") if given else ""
        self.request_id = rid if rid and _REQUEST_ID_RE.match(rid) else next_id()

    def headers(self) -> Mapping[str, str]:
        """The fields, looked up by lower-case name; repeated ones joined with ", " (RFC 9421
        §2.1). A view, not a copy: a signed request reads two or three fields at most."""
        return _HeaderView(self.scope["headers"])

    def dpop_proof(self) -> str | None:
        """The ``DPoP`` header; several are joined with ", " so the verifier refuses them."""
        return ",".join(p.decode("latin-1") for p in self.dpop) if self.dpop else None

    def target_uri(self) -> str:
        """The absolute request URI as the client addressed it (RFC 9421 ``@target-uri``):
        behind ``--public-url`` its scheme and authority, else the request's scheme and
        ``Host``."""
        scope = self.scope
        path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        query = scope.get("query_string", b"").decode("latin-1")
        if self.public is not None:
            try:
                return build_target_uri(self.public[0], self.public[1], path, query)
            except ValueError as exc:
                raise InvalidRequest(str(exc)) from None
        host = None
        for name, value in scope["headers"]:
            if name == b"host":
                host = value.decode("latin-1")
                break
        if host is None:
            server = scope.get("server") or ("localhost", None)
            host = server[0] if server[1] is None else f"{server[0]}:{server[1]}"
        try:
            return build_target_uri(scope.get("scheme", "http"), host, path, query)
        except ValueError as exc:  # a Host that would move the path out of @path or htu
            raise InvalidRequest(str(exc)) from None

    def client_cert(self) -> bytes | None:
        """The verified client certificate (DER), from the ASGI TLS extension."""
        tls = (self.scope.get("extensions") or {}).get("tls") or {}
        chain = tls.get("client_cert_chain") or ()
        for pem in chain:
            return ssl.PEM_cert_to_DER_cert(pem)
        return None

    def query(self) -> dict[str, str]:
        raw = self.scope.get("query_string", b"")
        if not raw:
            return {}
        if len(raw) > _MAX_QUERY:
            raise InvalidRequest("query string too long")
        return {k: v for k, v in parse_qsl(raw.decode("latin-1"), keep_blank_values=True)}


def _query_int(call: _Call, name: str, default: int | None) -> int | None:
    raw = call.query.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 10:  # not "²" or "①" (a 500)
        raise InvalidRequest(f"query parameter {name!r} must be a positive integer")
    return int(raw)


_T = TypeVar("_T")
READY_TIMEOUT: Final = 2.0
"""Seconds ``/readyz`` waits for the store before answering 503."""
BODY_TIMEOUT: Final = 60.0
"""Seconds a request body may take to arrive in full (else 408 and the connection closes;
checked every second, see :class:`_BodyDeadlines`)."""


def _from_web_page(scope: Scope) -> bool:
    """Whether a browser sent the request on a page's behalf (``Origin``, or a
    ``Sec-Fetch-Site`` other than a user's own navigation): no client of this API does."""
    for name, value in scope["headers"]:
        if name == b"origin" or (name == b"sec-fetch-site" and value != b"none"):
            return True
    return False


def _refuse_repeated(name: str) -> None:
    raise InvalidRequest(f"more than one {name} header: send it once")


def _latin1(value: bytes | None) -> str | None:
    return value.decode("latin-1") if value is not None else None


_DEADLINE_TICK: Final = 1.0
"""Seconds between two checks of the body deadlines (see :class:`_BodyDeadlines`)."""


class _BodyDeadlines:
    """The requests still reading their body, and when each must have read it all.

    One timer per event loop, every second (or every ``BODY_TIMEOUT`` if shorter), cancels the
    late ones, so a body is refused between ``BODY_TIMEOUT`` and one tick after it. An
    ``asyncio.timeout`` around every read armed and cancelled a timer per request (6 us, ~2%
    of an encrypt's CPU), though nearly every body arrives with its head.
    """

    __slots__ = ("_due", "_late")

    def __init__(self) -> None:
        # per loop (tests run one app on several): task -> loop time it must be done by
        self._due: dict[asyncio.AbstractEventLoop, dict[asyncio.Task[Any], float]] = {}
        self._late: set[asyncio.Task[Any]] = set()

    def enter(self, task: asyncio.Task[Any], loop: asyncio.AbstractEventLoop) -> None:
        due = self._due.get(loop)
        if due is None:
            due = self._due[loop] = {}
            loop.call_later(min(_DEADLINE_TICK, BODY_TIMEOUT), self._check, loop)
        due[task] = loop.time() + BODY_TIMEOUT

    def leave(self, task: asyncio.Task[Any], loop: asyncio.AbstractEventLoop) -> bool:
        """The task is done reading; returns whether it was cancelled for being late."""
        due = self._due.get(loop)
        if due is not None:
            due.pop(task, None)
        if task in self._late:
            self._late.discard(task)
            return True
        return False

    def _check(self, loop: asyncio.AbstractEventLoop) -> None:
        due = self._due.get(loop)
        if not due:
            self._due.pop(loop, None)  # the next read arms a new timer
            return
        now = loop.time()
        for task in [t for t, deadline in due.items() if deadline <= now]:
            del due[task]
            self._late.add(task)
            task.cancel()
        loop.call_later(min(_DEADLINE_TICK, BODY_TIMEOUT), self._check, loop)


async def _read_body(req: _Request, receive: Receive, limit: int,
                     deadlines: _BodyDeadlines) -> bytes:
    declared = req.content_length
    if declared is not None:
        if not declared.isdigit():
            raise InvalidRequest("invalid Content-Length")
        if int(declared) > limit:
            raise PayloadTooLarge(f"request body is larger than {limit} bytes")
    task = asyncio.current_task()
    if task is None:  # not run as a task (ASGI servers always do): a timer of its own
        try:
            async with asyncio.timeout(BODY_TIMEOUT):
                return await _receive_body(receive, limit)
        except TimeoutError:
            raise _body_timeout() from None
    loop = task.get_loop()
    cancelling = task.cancelling()
    deadlines.enter(task, loop)
    try:
        return await _receive_body(receive, limit)
    except asyncio.CancelledError:
        # ours, and not also the server's (shutting down): the client is too slow
        if deadlines.leave(task, loop) and task.uncancel() <= cancelling:
            raise _body_timeout() from None
        raise
    finally:
        deadlines.leave(task, loop)


def _body_timeout() -> RequestTimeout:
    return RequestTimeout(f"request body not received within {BODY_TIMEOUT:g} s")


async def _receive_body(receive: Receive, limit: int) -> bytes:
    message = await receive()
    if message["type"] == "http.disconnect":  # never as an empty body: it would run
        raise MalformedBody("client disconnected before sending the body")
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        if len(body) > limit:
            raise PayloadTooLarge(f"request body is larger than {limit} bytes")
        return body
    chunks = [body]
    size = len(body)
    while message.get("more_body", False):
        message = await receive()
        if message["type"] == "http.disconnect":
            raise MalformedBody("client disconnected")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _send(send: Send, status: int, body: bytes, request_id: str,
                extra: list[tuple[bytes, bytes]] | None = None) -> None:
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode()),
               (b"x-request-id", request_id.encode())]
    if extra:
        headers.extend(extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _send_error(send: Send, exc: KeygrantsError, request_id: str,
                      extra: list[tuple[bytes, bytes]] | None = None) -> None:
    """The one JSON error shape."""
    exc.request_id = request_id
    headers = list(extra or ())
    if isinstance(exc, Unauthenticated):
        error = exc.code.encode()
        headers.append((b"www-authenticate",
                        b'Signature realm="keygrants", error="' + error + b'"'))
        headers.append((b"www-authenticate", b'Bearer realm="keygrants", error="' + error + b'"'))
    elif isinstance(exc, RateLimited):
        headers.append((b"retry-after", str(max(1, math.ceil(exc.retry_after))).encode()))
    elif isinstance(exc, UseDpopNonce):
        headers.append((b"www-authenticate", b'DPoP error="use_dpop_nonce"'))
        headers.append((b"dpop-nonce", exc.nonce.encode("ascii")))
    elif isinstance(exc, RequestTimeout):
        headers.append((b"connection", b"close"))  # what is left of the body is not read
    await _send(send, exc.status, _encoder.encode(exc.to_dict()), request_id, headers)


async def _stream(send: Send, result: Stream, request_id: str,
                  extra: list[tuple[bytes, bytes]] | None) -> None:
    headers = [(b"content-type", result.media_type.encode()),
               (b"x-request-id", request_id.encode()), *(extra or ())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    batches = _batched(result.chunks)
    while True:
        chunk = await run_in_threadpool(next, batches, None)
        if chunk is None:
            break
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


def _batched(chunks: Iterator[bytes], size: int = 256 * 1024) -> Iterator[bytes]:
    buf: list[bytes] = []
    n = 0
    for c in chunks:
        buf.append(c)
        n += len(c)
        if n >= size:
            yield b"".join(buf)
            buf, n = [], 0
    if buf:
        yield b"".join(buf)


class _Route:
    """An endpoint compiled for dispatch: literal segments and parameter names."""

    __slots__ = ("decoder", "endpoint", "limit", "params", "segments")

    def __init__(self, endpoint: Endpoint, limits: HttpLimits) -> None:
        self.endpoint = endpoint
        self.segments = endpoint.path[1:].split("/")
        self.params = {i: s[1:-1] for i, s in enumerate(self.segments) if s.startswith("{")}
        self.decoder: msgspec.json.Decoder[Any] | None = (
            msgspec.json.Decoder(endpoint.request) if endpoint.request is not None else None)
        self.limit = limits.max_batch_body if endpoint.batch else limits.max_body

    def match(self, parts: list[str]) -> dict[str, str] | None:
        params: dict[str, str] = {}
        for i, seg in enumerate(self.segments):
            if i in self.params:
                if not parts[i]:
                    return None
                params[self.params[i]] = parts[i]  # ASGI paths arrive already percent-decoded
            elif seg != parts[i]:
                return None
        return params


class KeygrantsApp:
    """The ASGI application: dispatch on the endpoint table, one error shape, no framework
    layers between the server and the handlers."""

    def __init__(self, kms: KMS, authenticator: Authenticator, limits: HttpLimits,
                 lifespan: Callable[[], AbstractAsyncContextManager[None]] | None,
                 audit: AuditService | None = None, access: AccessService | None = None,
                 rate_limiter: RateLimiter | None = None,
                 grants: GrantService | None = None) -> None:
        from keygrants.api.openapi import openapi_document

        self.kms = kms
        self.grants = grants
        self.public_url: tuple[str, str] | None = None  # see create_app
        # called after a successful change to keys, aliases, principals or policies (the
        # server pushes it to the other nodes that share the store)
        self.on_change: Callable[[str], None] | None = None
        self.audit = audit
        self.access = access
        self.authenticator = authenticator
        self.rate_limiter = rate_limiter
        self.metrics = mx.Metrics()
        self.auth_failures = self.metrics.auth_failures  # per code
        self._lifespan = lifespan
        self._body_deadlines = _BodyDeadlines()
        self._routes: dict[int, list[_Route]] = {}
        for e in ENDPOINTS:
            route = _Route(e, limits)
            self._routes.setdefault(len(route.segments), []).append(route)
        # a path without parameters is found by one lookup (matching it against every route
        # of its length was 3% of a grant issuance), where the table's order leads to it
        self._static: dict[tuple[str, str], _Route] = {}
        for e in ENDPOINTS:
            if "{" not in e.path:
                found, _ = self._find(e.method, e.path)
                if found.endpoint is e:
                    self._static[(e.method, e.path)] = found
        self._openapi = _encoder.encode(openapi_document(ENDPOINTS))
        prefix = secrets.token_hex(6)
        counter = itertools.count(1)
        self._next_id = lambda: f"{prefix}{next(counter):x}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._run_lifespan(receive, send)

    async def _run_lifespan(self, receive: Receive, send: Send) -> None:
        message = await receive()
        assert message["type"] == "lifespan.startup"
        if self._lifespan is None:
            await send({"type": "lifespan.startup.complete"})
            message = await receive()
            await send({"type": "lifespan.shutdown.complete"})
            return
        try:
            async with self._lifespan():
                await send({"type": "lifespan.startup.complete"})
                message = await receive()
        except BaseException as exc:
            await send({"type": "lifespan.startup.failed", "message": str(exc)})
            raise
        await send({"type": "lifespan.shutdown.complete"})

    def _authenticate(self, req: _Request, method: str, body: bytes, source: str | None,
                      pending: list[Any], endpoint: Endpoint) -> RequestContext:
        """Who is calling (and within their rate limit)? Failures are counted and audited;
        nothing past this point runs for an unauthenticated request."""
        auth = req.authorization
        sig_input, sig = req.signature_input, req.signature

        def check() -> RequestContext:
            ctx = self.authenticator.authenticate(AuthRequest(
                method=method, target_uri=req.target_uri() if sig_input or sig else "",
                authorization=auth.decode("latin-1") if auth is not None else None,
                signature_input=_latin1(sig_input), signature=_latin1(sig),
                headers=req.headers, body=body, client_cert=req.client_cert(),
                request_id=req.request_id, source=source, pending_audit=pending),
                rate_limiter=self.rate_limiter)
            if (ctx.auth_method == "mtls" and method not in ("GET", "HEAD")
                    and _from_web_page(req.scope)):
                # a browser attaches a client certificate to any site's requests: a page
                # elsewhere could otherwise rotate or delete keys as the certificate's holder
                raise Unauthenticated("a client certificate is not accepted on a request "
                                      "made by a web page")
            return ctx

        ctx = self._guard(req, source, pending, endpoint, check)
        ctx.attributes["auth"] = ctx.auth_method or ""
        return ctx

    def _guard(self, req: _Request, source: str | None, pending: list[Any], endpoint: Endpoint,
               check: Callable[[], _T]) -> _T:
        """Run an authentication step; its failures are counted and audited."""
        try:
            return check()
        except (Unauthenticated, InvalidRequest) as exc:  # e.g. a Host no URI can be built on
            self.metrics.auth_failure(exc.code)
            anonymous = RequestContext(principal="", request_id=req.request_id, source=source,
                                       pending_audit=pending)
            self.kms.audit.record(anonymous, "auth.failure", "denied",
                                  operation=endpoint.operation_id, reason=exc.code)
            raise
        except RateLimited as exc:
            limited = RequestContext(principal=exc.principal or "", request_id=req.request_id,
                                     credential_id=exc.credential, source=source,
                                     pending_audit=pending)
            self.kms.audit.record(limited, "request.rate_limited", "denied",
                                  operation=endpoint.operation_id, reason=exc.code)
            raise

    def _present_grant(self, req: _Request, ctx: RequestContext, method: str,
                       endpoint: Endpoint) -> RequestContext:
        """Verify the ``Keygrants-Grant`` token the caller presents; refusals are audited
        (``grant.deny``) with the token only as a keyed digest."""
        assert req.grant is not None
        token = req.grant.decode("latin-1").strip()
        if not endpoint.grant:
            raise InvalidRequest(f"{endpoint.operation_id} does not accept a grant token")
        if self.grants is None:
            raise NotFound("this server has no grants")
        proof = req.dpop_proof()
        try:
            claims = self.grants.verify_presented(
                ctx, token, dpop=proof, method=method, url=req.target_uri(),
                client_cert=req.client_cert())
        except GrantDenied as exc:
            self.metrics.grant_denial(exc.code)
            self.kms.audit.record(ctx, "grant.deny", "denied", operation=endpoint.operation_id,
                                  reason=exc.code, grant_id=exc.grant_id,
                                  detail={"token": self.kms.audit.digest(token)})
            raise
        return dataclasses.replace(ctx, grant=claims)

    def _find(self, method: str, path: str,
              raw_path: bytes | None = None) -> tuple[_Route, dict[str, str]]:
        if raw_path is None or b"%" not in raw_path:
            static = self._static.get((method, path))
            if static is not None:
                return static, {}
        if raw_path is not None and b"%" in raw_path:
            # split as sent, then decode each segment: an encoded slash stays inside its
            # segment (/v1/keys/a%2Frotate names a key "a/rotate"; it is not rotate)
            parts = [unquote(s) for s in raw_path.decode("latin-1")[1:].split("/")]
        else:
            parts = path[1:].split("/")
        allowed = False
        for route in self._routes.get(len(parts), ()):
            params = route.match(parts)
            if params is None:
                continue
            if route.endpoint.method == method:
                return route, params
            allowed = True
        shown = path if len(path) <= 200 else path[:200] + "..."
        if allowed:
            raise MethodNotAllowed(f"{method} is not allowed on {shown}")
        raise NotFound(f"no route for {method} {shown}")

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        req = _Request(scope, self._next_id, self.public_url)
        request_id = req.request_id
        method: str = scope["method"]
        path: str = scope["path"]
        client = scope.get("client")
        source = client[0] if client else None
        pending: list[Any] = []
        status = 200
        ctx: RequestContext | None = None
        endpoint: Endpoint | None = None
        try:
            if path == "/openapi.json" and method == "GET":
                await _send(send, 200, self._openapi, request_id)
                return
            route, params = self._find(method, path, scope.get("raw_path"))
            endpoint = route.endpoint
            raw = b""
            signed = req.signature_input is not None or req.signature is not None
            if endpoint.auth and req.repeated is not None:
                self._guard(req, source, pending, endpoint, functools.partial(_refuse_repeated,
                                                                              req.repeated))
            if endpoint.auth and not signed:
                # a bearer token, a certificate or nothing: decided before any body is read, so
                # an unauthenticated client cannot make the server hold bodies
                ctx = self._authenticate(req, method, raw, source, pending, endpoint)
            elif endpoint.auth:
                # a signature covers the body's Content-Digest, so the body is read first; but
                # only for a signature naming a key this server knows
                self._guard(req, source, pending, endpoint,
                            lambda: self.authenticator.check_signing_keyid(
                                _latin1(req.signature_input)))
            if route.decoder is not None or req.content_length not in (None, b"0"):
                raw = await _read_body(req, receive, route.limit, self._body_deadlines)
            if endpoint.auth:
                if signed:
                    ctx = self._authenticate(req, method, raw, source, pending, endpoint)
                assert ctx is not None
                if req.grant is not None:
                    ctx = self._present_grant(req, ctx, method, endpoint)
            else:
                ctx = RequestContext(principal="", request_id=request_id, source=source)
            body = None
            if route.decoder is not None:
                try:
                    body = route.decoder.decode(raw or b"{}")
                except msgspec.ValidationError as exc:
                    raise MalformedBody(f"invalid request body: {exc}") from None
                except msgspec.DecodeError:
                    raise MalformedBody("request body is not valid JSON") from None
                except UnicodeDecodeError:  # invalid UTF-8 inside a string or a member name
                    raise MalformedBody("request body is not valid UTF-8") from None
                except RecursionError:
                    raise MalformedBody("request body is nested too deeply") from None
            call = _Call(self.kms, ctx, params, req.query(), body, self.audit, self.access,
                         self.grants, req, self._render_metrics)
            sync = getattr(endpoint.handler, "sync", None)
            if sync is not None and ctx.grant is not None and ctx.grant.max_uses is not None:
                # counting a use of a limited grant is a durable store write: off the loop
                result = await run_in_threadpool(sync, call)
            else:
                result = await endpoint.handler(call)
            status = endpoint.status
            changed = endpoint.shares or endpoint.tag
            if method != "GET" and changed in _SHARED_STATE and self.on_change is not None:
                self.on_change(changed)  # other nodes drop what they cached of it
        except KeygrantsError as exc:
            result, status = exc, exc.status
            if ctx is not None and ctx.principal and not pending:
                # authenticated but refused without an event of its own (malformed or oversize
                # body, or a hash value over its limit): still an event, so probing leaves a trace
                self.kms.audit.record(ctx, "request.rejected",
                                      "denied" if isinstance(exc, Forbidden) else "error",
                                      operation=endpoint.operation_id if endpoint else None,
                                      reason=exc.code)
        except Exception:
            log.exception("unhandled error in %s %s (request %s)", method, path, request_id)
            result = KeygrantsError()
            status = 500
            if ctx is not None and ctx.principal:  # an authenticated request leaves a trace
                with contextlib.suppress(Exception):  # (durable before the answer, as any)
                    self.kms.audit.record(ctx, "request.rejected", "error",
                                          operation=endpoint.operation_id if endpoint else None,
                                          reason=result.code)
        # Fail closed: nothing is answered before the request's audit events are durable.
        audit_index: int | None = None
        try:
            # No per-request timer: the audit log bounds every batch's commit itself and fails
            # its events when the commit overruns (AuditLog.commit_timeout).
            for future in pending:
                audit_index = await (future if isinstance(future, asyncio.Future)
                                     else asyncio.wrap_future(future))
        except Exception as exc:  # every way of not being durable is the same answer
            if not isinstance(exc, AuditUnavailable):
                log.error("audit event for request %s not durable: %r", request_id, exc)
            result, status = AuditUnavailable(), AuditUnavailable.status
            self.metrics.audit_unavailable += 1
        extra = [(b"x-audit-index", str(audit_index).encode())] if audit_index is not None else None
        try:
            if isinstance(result, KeygrantsError):
                status = result.status
                await _send_error(send, result, request_id, extra)
            elif result is None:
                status = 204
                headers = [(b"x-request-id", request_id.encode()), *(extra or ())]
                await send({"type": "http.response.start", "status": 204, "headers": headers})
                await send({"type": "http.response.body", "body": b""})
            elif isinstance(result, Reply):
                status = result.status
                await _send(send, result.status, _encoder.encode(result.body), request_id,
                            [*(extra or ()), *result.headers])
            elif isinstance(result, Stream):
                status = 200
                await _stream(send, result, request_id, extra)
            else:
                await _send(send, status, _encoder.encode(result), request_id, extra)
        finally:
            self.metrics.request(endpoint.operation_id if endpoint else mx.UNMATCHED, status,
                                 time.perf_counter() - started)

    def _render_metrics(self) -> bytes:
        return mx.render(self.metrics, self._gauges)

    def _gauges(self) -> Iterator[mx.Gauge]:
        caches = [("signature", "Signature nonces", self.authenticator.nonces)]
        if self.grants is not None:
            caches.append(("dpop", "DPoP proof ids", self.grants.dpop.replay_cache))
        for name, what, cache in caches:
            yield mx.Gauge(f"keygrants_{name}_replay_cache_entries",
                           f"{what} remembered against replay", len(cache))
            yield mx.Gauge(f"keygrants_{name}_replay_cache_capacity",
                           f"The most {what} remembered (--replay-cache-size)", cache.capacity)
        if self.audit is not None:
            yield mx.Gauge("keygrants_audit_log_size", "Events in the audit log (its Merkle "
                           "tree size) as this node knows it", self.audit.setup.log.size)


# -- handlers ---------------------------------------------------------------------------------

def _in_thread(fn: Callable[..., Any]) -> Handler:
    async def handler(call: _Call) -> Any:
        return await run_in_threadpool(fn, call)
    return handler


def _inline(fn: Callable[..., Any]) -> Handler:
    async def handler(call: _Call) -> Any:
        return fn(call)
    handler.sync = fn  # type: ignore[attr-defined]  # the edge may run it in a thread
    return handler


async def _health(call: _Call) -> Any:
    return {"status": "ok"}


async def _ready(call: _Call) -> Any:
    # Not ready either while the audit log cannot make events durable (its last commit
    # failed, or is overdue): every audited request would get 503 audit_unavailable.
    if call.audit_service is not None and not call.audit_service.setup.log.durable:
        return Reply(503, {"status": "unavailable"})
    try:
        async with asyncio.timeout(READY_TIMEOUT):  # a store that hangs is not ready
            await run_in_threadpool(call.kms.store.get_meta, "root_key")
    except (KeygrantsError, TimeoutError):
        return Reply(503, {"status": "unavailable"})
    return {"status": "ready"}


def _metrics(c: _Call) -> Any:
    assert c.node_metrics is not None
    return Stream(mx.CONTENT_TYPE, iter((c.kms.read_metrics(c.ctx, c.node_metrics),)))


def _list_keys(c: _Call) -> Any:
    limit = _query_int(c, "limit", 100)
    assert limit is not None
    return c.kms.list_keys(c.ctx, limit=limit, after=c.query.get("after"))


def _public_key(c: _Call) -> Any:
    return c.kms.get_public_key(c.ctx, c.param("key"), _query_int(c, "version", None))


def _list_aliases(c: _Call) -> Any:
    return c.kms.list_aliases(c.ctx, c.query.get("key"))


def _delete_alias(c: _Call) -> None:
    c.kms.delete_alias(c.ctx, c.param("alias"))


def _audit_search(c: _Call) -> Any:
    q = c.query
    limit = _query_int(c, "limit", 100)
    assert limit is not None
    return c.audit.search(c.ctx, EventQuery(
        principal=q.get("principal"), key_id=q.get("key"), grant_id=q.get("grant"),
        type=q.get("type"), since=q.get("since"), until=q.get("until"),
        after=_query_int(c, "after", None), limit=limit))


def _audit_inclusion(c: _Call) -> Any:
    index = _query_int(c, "index", None)
    if index is None:
        raise InvalidRequest("query parameter 'index' is required")
    return c.audit.inclusion_proof(c.ctx, index, _query_int(c, "size", None))


def _audit_consistency(c: _Call) -> Any:
    old = _query_int(c, "old", None)
    if old is None:
        raise InvalidRequest("query parameter 'old' is required")
    return c.audit.consistency_proof(c.ctx, old, _query_int(c, "new", None))


def _audit_export(c: _Call) -> Any:
    since = _query_int(c, "since", 0)
    return Stream("application/x-ndjson", c.audit.export(c.ctx, since or 0))


# -- query parameters, as the handlers above and below read them --------------------------------

_PAGE_LIMIT: Final = _int_query("limit", "Page size", minimum=1, maximum=1000, default=100)
_LIST_QUERY: Final = (
    _PAGE_LIMIT,
    _str_query("after", "The `next` of the previous page: the page starts after it"),
)
_AUDIT_FILTER: Final = 1024  # characters, no NUL (audit.log)
_AUDIT_SEARCH_QUERY: Final = (
    _str_query("principal", "Only events of this principal", maxLength=_AUDIT_FILTER),
    _str_query("key", "Only events on this key id", maxLength=_AUDIT_FILTER),
    _str_query("grant", "Only events of this grant id", maxLength=_AUDIT_FILTER),
    _str_query("type", "Only events of this type, e.g. crypto.encrypt", maxLength=_AUDIT_FILTER),
    _str_query("since", "Events at or after this RFC 3339 time (no offset: UTC)",
               format="date-time"),
    _str_query("until", "Events before this RFC 3339 time (no offset: UTC)", format="date-time"),
    _int_query("after", "Events after this sequence number (the `next` of the previous page)"),
    _PAGE_LIMIT,
)
_GRANT_STATES: Final = ("active", "pending", "exhausted", "expired", "retired", "revoked",
                        "rejected")
_LIST_GRANTS_QUERY: Final = (
    _str_query("key", "Grants on this key (id, name or alias; needs list_grants on it)"),
    _str_query("grantee", "Grants to this principal (without `key`: must be the caller)"),
    _str_query("retiring_principal",
               "Grants this principal may retire (without `key`: must be the caller)"),
    _str_query("state", "Only grants in this state", enum=list(_GRANT_STATES)),
    *_LIST_QUERY,
)


def _list_principals(c: _Call) -> Any:
    limit = _query_int(c, "limit", 100)
    assert limit is not None
    return c.access.list_principals(c.ctx, limit=limit, after=c.query.get("after"))


def _delete_principal(c: _Call) -> None:
    c.access.delete_principal(c.ctx, c.param("principal"))


def _delete_policy(c: _Call) -> None:
    c.access.delete_policy(c.ctx, c.param("name"))


_PRINCIPAL_ENDPOINTS: Final = (
    Endpoint("GET", "/v1/whoami", _inline(lambda c: c.access.whoami(c.ctx)), "whoami",
             "The authenticated caller", response=m.WhoAmI, tag="principals"),
    Endpoint("POST", "/v1/principals",
             _in_thread(lambda c: c.access.create_principal(c.ctx, c.body)), "createPrincipal",
             "Create a principal", m.CreatePrincipalRequest, m.PrincipalInfo, status=201,
             tag="principals"),
    Endpoint("GET", "/v1/principals", _in_thread(_list_principals), "listPrincipals",
             "List principals (query: limit, after)", response=m.PrincipalList, tag="principals",
             query=_LIST_QUERY),
    Endpoint("GET", "/v1/principals/{principal}",
             _in_thread(lambda c: c.access.describe_principal(c.ctx, c.param("principal"))),
             "describePrincipal", "Show a principal and its credentials",
             response=m.PrincipalInfo, tag="principals"),
    Endpoint("PATCH", "/v1/principals/{principal}",
             _in_thread(lambda c: c.access.update_principal(c.ctx, c.param("principal"), c.body)),
             "updatePrincipal", "Change display name or tags", m.UpdatePrincipalRequest,
             m.PrincipalInfo, tag="principals"),
    Endpoint("POST", "/v1/principals/{principal}/disable",
             _in_thread(lambda c: c.access.disable_principal(c.ctx, c.param("principal"))),
             "disablePrincipal", "Refuse all of a principal's credentials",
             response=m.PrincipalInfo, tag="principals"),
    Endpoint("POST", "/v1/principals/{principal}/enable",
             _in_thread(lambda c: c.access.enable_principal(c.ctx, c.param("principal"))),
             "enablePrincipal", "Accept a principal's credentials again",
             response=m.PrincipalInfo, tag="principals"),
    Endpoint("DELETE", "/v1/principals/{principal}", _in_thread(_delete_principal),
             "deletePrincipal", "Delete a principal and its credentials", status=204,
             tag="principals"),
    Endpoint("GET", "/v1/principals/{principal}/credentials",
             _in_thread(lambda c: c.access.list_credentials(c.ctx, c.param("principal"))),
             "listCredentials", "A principal's credentials", response=list[m.CredentialInfo],
             tag="principals"),
    Endpoint("POST", "/v1/principals/{principal}/keys",
             _in_thread(lambda c: c.access.add_public_key(c.ctx, c.param("principal"), c.body)),
             "addPublicKey", "Register a public key (PEM or JWK) for signed requests",
             m.AddPublicKeyRequest, m.CredentialInfo, status=201, tag="principals"),
    Endpoint("POST", "/v1/principals/{principal}/api-keys",
             _in_thread(lambda c: c.access.create_api_key(c.ctx, c.param("principal"), c.body)),
             "createApiKey", "Issue an API key (shown once)", m.CreateApiKeyRequest,
             m.ApiKeyCreated, status=201, tag="principals"),
    Endpoint("POST", "/v1/principals/{principal}/shared-secrets",
             _in_thread(lambda c: c.access.create_shared_secret(c.ctx, c.param("principal"),
                                                                 c.body)),
             "createSharedSecret", "Issue a shared secret for hmac-sha256 signatures (shown once)",
             m.CreateApiKeyRequest, m.SharedSecretCreated, status=201, tag="principals"),
    Endpoint("POST", "/v1/principals/{principal}/certificates",
             _in_thread(lambda c: c.access.add_certificate(c.ctx, c.param("principal"), c.body)),
             "addCertificate", "Map client certificates (fingerprint or subject/SAN rule)",
             m.AddCertificateRequest, m.CredentialInfo, status=201, tag="principals"),
    Endpoint("POST", "/v1/principals/{principal}/credentials/{credential}/revoke",
             _in_thread(lambda c: c.access.revoke_credential(c.ctx, c.param("principal"),
                                                              c.param("credential"))),
             "revokeCredential", "Revoke a credential (effective on the next request)",
             response=m.CredentialInfo, tag="principals"),
    Endpoint("GET", "/v1/policies", _in_thread(lambda c: c.access.list_policies(c.ctx)),
             "listPolicies", "List policies", response=list[m.PolicyInfo], tag="policies"),
    Endpoint("POST", "/v1/policy-test",
             _in_thread(lambda c: c.access.test_policy(c.ctx, c.body, c.kms.key_with_aliases)),
             "testPolicy", "Would principal P be allowed action A on key K? And why",
             m.TestPolicyRequest, m.PolicyTestResult, tag="policies"),
    Endpoint("GET", "/v1/policies/{name}",
             _in_thread(lambda c: c.access.get_policy(c.ctx, c.param("name"))), "getPolicy",
             "Show a policy", response=m.PolicyInfo, tag="policies"),
    Endpoint("PUT", "/v1/policies/{name}",
             _in_thread(lambda c: c.access.put_policy(c.ctx, c.param("name"), c.body)),
             "putPolicy", "Create or replace a Cedar policy (validated first)",
             m.PutPolicyRequest, m.PolicyInfo, tag="policies"),
    Endpoint("DELETE", "/v1/policies/{name}", _in_thread(_delete_policy), "deletePolicy",
             "Delete a policy", status=204, tag="policies"),
)


def _list_grants(c: _Call) -> Any:
    limit = _query_int(c, "limit", 100)
    assert limit is not None
    q = c.query
    return c.grants.list_grants(c.ctx, key=q.get("key"), grantee=q.get("grantee"),
                         retiring_principal=q.get("retiring_principal"), state=q.get("state"),
                         limit=limit, after=q.get("after"))


async def _create_grant(c: _Call) -> Any:
    created = await c.grants.create_async(c.ctx, c.body)
    return created if created.token is not None else Reply(202, created)


def _exchange(c: _Call) -> Any:
    req = c.request
    assert req is not None
    proof = req.dpop_proof()
    return c.grants.exchange(c.ctx, c.body, dpop=proof, method="POST", url=req.target_uri(),
                             client_cert=req.client_cert())


def _revocations(c: _Call) -> Any:
    since = _query_int(c, "since", 0) or 0
    limit = _query_int(c, "limit", 1000)
    assert limit is not None
    return c.grants.revocation_feed(since, limit)


async def _jwks(c: _Call) -> Any:
    grants = c.grants
    return Reply(200, grants.jwks(), ((b"cache-control",
                                       f"public, max-age={grants.settings.jwks_max_age}".encode()),))


_GRANT_ENDPOINTS: Final = (
    Endpoint("POST", "/v1/grants", _create_grant, "createGrant",
             "Create a grant (202 when it waits for approval); with a grant token: a sub-grant",
             m.CreateGrantRequest, m.GrantCreated, status=201, tag="grants", grant=True,
             responses=(ExtraResponse(202, "pending: the grant waits for another principal's "
                                           "approval (`token` is null)", m.GrantCreated),)),
    Endpoint("GET", "/v1/grants", _in_thread(_list_grants), "listGrants",
             "List grants (query: key, grantee, retiring_principal, state, limit, after)",
             response=m.GrantList, tag="grants", query=_LIST_GRANTS_QUERY),
    Endpoint("POST", "/v1/token-exchange", _in_thread(_exchange), "exchangeGrant",
             "RFC 8693-style token exchange: a narrower grant token for a grant token",
             m.TokenExchangeRequest, m.TokenExchangeResult, tag="grants", dpop=True),
    Endpoint("POST", "/v1/revoke-all",
             _in_thread(lambda c: c.grants.revoke_all(c.ctx, c.body)), "revokeAllGrants",
             "Revoke every grant of a principal or a key (incident response)",
             m.RevokeAllRequest, m.RevokeAllResult, tag="grants"),
    Endpoint("GET", "/v1/grants/{grant}",
             _in_thread(lambda c: c.grants.describe(c.ctx, c.param("grant"))), "describeGrant",
             "Show a grant", response=m.GrantInfo, tag="grants"),
    Endpoint("POST", "/v1/grants/{grant}/token",
             _in_thread(lambda c: c.grants.token(c.ctx, c.param("grant"))), "grantToken",
             "A fresh token for an active grant (its grantee or creator)",
             response=m.GrantCreated, tag="grants"),
    Endpoint("POST", "/v1/grants/{grant}/retire",
             _in_thread(lambda c: c.grants.retire(c.ctx, c.param("grant"))), "retireGrant",
             "Retire a grant (its grantee or retiring principal)", response=m.GrantInfo,
             tag="grants"),
    Endpoint("POST", "/v1/grants/{grant}/revoke",
             _in_thread(lambda c: c.grants.revoke(c.ctx, c.param("grant"))), "revokeGrant",
             "Revoke a grant and its sub-grants", response=m.GrantInfo, tag="grants"),
    Endpoint("POST", "/v1/grants/{grant}/approve",
             _in_thread(lambda c: c.grants.approve(c.ctx, c.param("grant"),
                                                   c.body.note if c.body else None)),
             "approveGrant", "Approve a pending (break-glass) grant: never the requester",
             m.GrantDecisionRequest, m.GrantInfo, tag="grants"),
    Endpoint("POST", "/v1/grants/{grant}/reject",
             _in_thread(lambda c: c.grants.reject(c.ctx, c.param("grant"),
                                                  c.body.note if c.body else None)),
             "rejectGrant", "Reject a pending grant", m.GrantDecisionRequest, m.GrantInfo,
             tag="grants"),
    Endpoint("POST", "/v1/issuer/rotate",
             _in_thread(lambda c: c.grants.rotate_issuer(c.ctx)), "rotateIssuerKey",
             "Start a staged rotation of the grant-token issuer key",
             response=m.IssuerKeyInfo, tag="grants", shares="issuer"),
    Endpoint("GET", "/v1/revocations", _in_thread(_revocations), "revocations",
             "Revocation feed entries after a sequence number (query: since, limit); public",
             response=m.RevocationFeed, auth=False, tag="grants",
             query=(_int_query("since", "Entries after this sequence number", default=0),
                    _int_query("limit", "Page size", minimum=1, maximum=1000, default=1000))),
    Endpoint("GET", "/.well-known/jwks.json", _jwks, "jwks",
             "Issuer keys that may verify a live grant token (with seq); public",
             response=m.JwkSet, auth=False, tag="grants", response_headers=("Cache-Control",)),
)

#: Endpoints that accept a ``Keygrants-Grant`` token in place of the caller's own policies.
_GRANT_USERS: Final = frozenset({
    "describeKey", "getPublicKey", "encrypt", "batchEncrypt", "decrypt", "batchDecrypt",
    "reEncrypt", "generateDataKey", "sign", "verify", "mac", "verifyMac", "derive",
})


ENDPOINTS: Final[Sequence[Endpoint]] = tuple(
    dataclasses.replace(e, grant=True) if e.operation_id in _GRANT_USERS else e for e in (
    Endpoint("GET", "/healthz", _health, "health", "Liveness", response=m.Health, auth=False,
             tag="system"),
    Endpoint("GET", "/metrics", _in_thread(_metrics), "metrics",
             "Prometheus metrics of this node (needs read_metrics)", tag="system",
             media_type=mx.CONTENT_TYPE),
    Endpoint("GET", "/readyz", _ready, "ready", "Readiness (store reachable, audit log durable)",
             response=m.Readiness, auth=False, tag="system",
             responses=(ExtraResponse(503, "not ready: the store does not answer (this body, "
                                           "not the error shape)", m.Readiness),)),
    Endpoint("POST", "/v1/keys", _in_thread(lambda c: c.kms.create_key(c.ctx, c.body)),
             "createKey", "Create a key", m.CreateKeyRequest, m.KeyInfo, status=201),
    Endpoint("GET", "/v1/keys", _in_thread(_list_keys), "listKeys",
             "List keys (query: limit, after)", response=m.KeyList, query=_LIST_QUERY),
    Endpoint("GET", "/v1/keys/{key}", _in_thread(lambda c: c.kms.describe_key(c.ctx, c.param("key"))),
             "describeKey", "Show a key", response=m.KeyInfo),
    Endpoint("PATCH", "/v1/keys/{key}",
             _in_thread(lambda c: c.kms.update_key(c.ctx, c.param("key"), c.body)),
             "updateKey", "Change description, rotation period or minimum decryption version",
             m.UpdateKeyRequest, m.KeyInfo),
    Endpoint("POST", "/v1/keys/{key}/rotate",
             _in_thread(lambda c: c.kms.rotate_key(c.ctx, c.param("key"))),
             "rotateKey", "Add a new key version", response=m.KeyInfo),
    Endpoint("POST", "/v1/keys/{key}/disable",
             _in_thread(lambda c: c.kms.disable_key(c.ctx, c.param("key"))),
             "disableKey", "Disable a key", response=m.KeyInfo),
    Endpoint("POST", "/v1/keys/{key}/enable",
             _in_thread(lambda c: c.kms.enable_key(c.ctx, c.param("key"))),
             "enableKey", "Enable a key", response=m.KeyInfo),
    Endpoint("POST", "/v1/keys/{key}/schedule-deletion",
             _in_thread(lambda c: c.kms.schedule_deletion(c.ctx, c.param("key"), c.body.days)),
             "scheduleKeyDeletion", "Schedule destruction after 7-30 days",
             m.ScheduleDeletionRequest, m.KeyInfo),
    Endpoint("POST", "/v1/keys/{key}/cancel-deletion",
             _in_thread(lambda c: c.kms.cancel_deletion(c.ctx, c.param("key"))),
             "cancelKeyDeletion", "Cancel a scheduled deletion", response=m.KeyInfo),
    Endpoint("GET", "/v1/keys/{key}/public-key", _inline(_public_key), "getPublicKey",
             "Public key of a signing key (query: version)", response=m.PublicKey,
             query=(_int_query("version", "The key version (default: the latest)", minimum=1),)),
    Endpoint("POST", "/v1/keys/{key}/encrypt",
             _inline(lambda c: c.kms.encrypt(c.ctx, c.param("key"), c.body.plaintext, c.body.context)),
             "encrypt", "Encrypt with the latest key version", m.EncryptRequest, m.EncryptResult,
             tag="crypto"),
    Endpoint("POST", "/v1/keys/{key}/encrypt-batch",
             _inline(lambda c: c.kms.batch_encrypt(c.ctx, c.param("key"), c.body.items)),
             "batchEncrypt", "Encrypt up to 1,000 items", m.BatchEncryptRequest, m.BatchResult,
             batch=True, tag="crypto"),
    Endpoint("POST", "/v1/decrypt",
             _inline(lambda c: c.kms.decrypt(c.ctx, c.body.ciphertext, c.body.context)),
             "decrypt", "Decrypt a native ciphertext", m.DecryptRequest, m.DecryptResult,
             tag="crypto"),
    Endpoint("POST", "/v1/decrypt-batch",
             _inline(lambda c: c.kms.batch_decrypt(c.ctx, c.body.items)),
             "batchDecrypt", "Decrypt up to 1,000 ciphertexts", m.BatchDecryptRequest,
             m.BatchResult, batch=True, tag="crypto"),
    Endpoint("POST", "/v1/re-encrypt", _inline(lambda c: c.kms.re_encrypt(c.ctx, c.body)),
             "reEncrypt", "Re-encrypt without revealing the plaintext", m.ReEncryptRequest,
             m.ReEncryptResult, tag="crypto"),
    Endpoint("POST", "/v1/keys/{key}/data-key",
             _inline(lambda c: c.kms.generate_data_key(c.ctx, c.param("key"), c.body)),
             "generateDataKey", "Generate a data key", m.DataKeyRequest, m.DataKey, tag="crypto"),
    Endpoint("POST", "/v1/keys/{key}/sign",
             _inline(lambda c: c.kms.sign(c.ctx, c.param("key"), c.body.message,
                                          c.body.message_type)),
             "sign", "Sign a message or digest", m.SignRequest, m.SignResult, tag="crypto"),
    Endpoint("POST", "/v1/keys/{key}/verify",
             _inline(lambda c: c.kms.verify(c.ctx, c.param("key"), c.body)),
             "verify", "Verify a signature", m.VerifyRequest, m.VerifyResult, tag="crypto"),
    Endpoint("POST", "/v1/keys/{key}/mac",
             _inline(lambda c: c.kms.mac(c.ctx, c.param("key"), c.body.message)),
             "mac", "HMAC-SHA256 tag", m.MacRequest, m.MacResult, tag="crypto"),
    Endpoint("POST", "/v1/keys/{key}/verify-mac",
             _inline(lambda c: c.kms.verify_mac(c.ctx, c.param("key"), c.body)),
             "verifyMac", "Verify an HMAC tag", m.VerifyMacRequest, m.VerifyResult, tag="crypto"),
    Endpoint("POST", "/v1/keys/{key}/derive",
             _inline(lambda c: c.kms.derive(c.ctx, c.param("key"), c.body)),
             "derive", "HKDF-SHA256 derivation (derivable keys)", m.DeriveRequest, m.DerivedKey,
             tag="crypto"),
    Endpoint("POST", "/v1/random", _inline(lambda c: c.kms.random(c.ctx, c.body.bytes)),
             "generateRandom", "Random bytes", m.RandomRequest, m.RandomResult, tag="crypto"),
    Endpoint("POST", "/v1/aliases",
             _in_thread(lambda c: c.kms.create_alias(c.ctx, c.body.alias, c.body.key)),
             "createAlias", "Create an alias", m.CreateAliasRequest, m.AliasInfo, status=201,
             tag="aliases"),
    Endpoint("GET", "/v1/aliases", _in_thread(_list_aliases), "listAliases",
             "List aliases (query: key)", response=list[m.AliasInfo], tag="aliases",
             query=(_str_query("key", "Only this key's aliases (id, name or alias)"),)),
    Endpoint("DELETE", "/v1/aliases/{alias}", _in_thread(_delete_alias), "deleteAlias",
             "Delete an alias", status=204, tag="aliases"),
    Endpoint("GET", "/v1/audit/checkpoint",
             _in_thread(lambda c: c.audit.latest_checkpoint(c.ctx)), "auditCheckpoint",
             "Latest signed checkpoint of the audit log", response=m.AuditCheckpoint, tag="audit"),
    Endpoint("POST", "/v1/audit/checkpoint", _in_thread(lambda c: c.audit.checkpoint_now(c.ctx)),
             "auditCheckpointNow", "Checkpoint the audit log now", response=m.AuditCheckpoint,
             tag="audit"),
    Endpoint("GET", "/v1/audit/events", _in_thread(_audit_search), "auditSearch",
             "Search events (query: principal, key, grant, type, since, until, after, limit)",
             response=m.AuditEventPage, tag="audit", query=_AUDIT_SEARCH_QUERY),
    Endpoint("GET", "/v1/audit/proof/inclusion", _in_thread(_audit_inclusion),
             "auditInclusionProof", "Inclusion proof (query: index, size)",
             response=m.InclusionProof, tag="audit",
             query=(_int_query("index", "The event's sequence number", required=True),
                    _int_query("size", "The tree size (default: the current size)", minimum=1))),
    Endpoint("GET", "/v1/audit/proof/consistency", _in_thread(_audit_consistency),
             "auditConsistencyProof", "Consistency proof (query: old, new)",
             response=m.ConsistencyProof, tag="audit",
             query=(_int_query("old", "The older tree size", minimum=1, required=True),
                    _int_query("new", "The newer tree size (default: the current size)",
                               minimum=1))),
    Endpoint("GET", "/v1/audit/export", _in_thread(_audit_export), "auditExport",
             "Export as JSON Lines with checkpoints (query: since)", tag="audit",
             media_type="application/x-ndjson",
             query=(_int_query("since", "First sequence number to export", default=0),)),
    Endpoint("POST", "/v1/audit/hash", _inline(lambda c: c.audit.digest(c.ctx, c.body.value)),
             "auditHash", "Keyed digest of a sensitive value, to search the log for it",
             m.AuditHashRequest, m.AuditDigest, tag="audit"),
    Endpoint("GET", "/v1/audit/key", _inline(lambda c: c.audit.key(c.ctx)), "auditKey",
             "The audit log's origin and checkpoint verifier key", response=m.AuditKey,
             tag="audit"),
    *_PRINCIPAL_ENDPOINTS,
    *_GRANT_ENDPOINTS,
))


def create_app(kms: KMS, authenticator: Authenticator, *,
               limits: HttpLimits | None = None,
               lifespan: Callable[[], AbstractAsyncContextManager[None]] | None = None,
               audit: AuditService | None = None, access: AccessService | None = None,
               rate_limiter: RateLimiter | None = None,
               grants: GrantService | None = None,
               public_url: str | None = None) -> KeygrantsApp:
    """Build the ASGI application.

    Args:
        kms: the service.
        authenticator: checks bearer credentials.
        limits: body size limits (defaults fit the service's plaintext limit).
        lifespan: a context manager factory run around the server's life (the scheduler).
        audit: the audit use cases behind ``/v1/audit/*`` (absent: those answer 404).
        access: principals, credentials and policies behind ``/v1/principals`` and
            ``/v1/policies`` (absent: those answer 404).
        rate_limiter: per-principal request limits (absent: none).
        grants: grants, issuer keys and the revocation feed behind ``/v1/grants``,
            ``/v1/revocations`` and ``/.well-known/jwks.json`` (absent: those answer 404);
            deleting a principal through ``access`` then revokes its grants.
        public_url: ``http(s)://host[:port]`` clients address the server by (behind a proxy
            or load balancer): signatures' ``@target-uri``/``@authority``/``@scheme`` and DPoP
            ``htu`` are checked against it instead of the request's scheme and ``Host``.

    Raises:
        ValueError: a malformed ``public_url`` (:func:`parse_public_url`).
    """
    public = parse_public_url(public_url) if public_url is not None else None
    limits = limits or HttpLimits.for_plaintext(kms.limits.max_plaintext)
    if access is not None and grants is not None and grants.principal_deleted not in access.on_delete:
        access.on_delete.append(grants.principal_deleted)  # a deleted principal's grants end
    app = KeygrantsApp(kms, authenticator, limits, lifespan, audit, access, rate_limiter, grants)
    app.public_url = public
    return app


def parse_public_url(url: str) -> tuple[str, str]:
    """``(scheme, authority)`` of a public URL ``http(s)://host[:port]`` (a final ``/`` is
    fine; a path, query, fragment or userinfo is not).

    Raises:
        ValueError: anything else, with the reason.
    """
    message = "the public URL must be http(s)://host[:port], without path, query or userinfo"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError(message) from None
    if (parts.scheme.lower() not in ("http", "https") or not parts.hostname
            or parts.path not in ("", "/") or parts.query or parts.fragment or "?" in url
            or "#" in url or "@" in parts.netloc or (port is not None and port == 0)):
        raise ValueError(message)
    try:
        check_authority(parts.netloc)
    except ValueError:
        raise ValueError(message) from None
    return parts.scheme.lower(), parts.netloc
