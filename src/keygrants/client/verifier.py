"""Local verification of grant tokens: :class:`Verifier` (sync) and :class:`AsyncVerifier`.

A service that receives grant tokens checks them here, without a call to the KMS per request:

- the issuer keys come from ``/.well-known/jwks.json``, cached, refreshed when the response's
  ``Cache-Control: max-age`` runs out, refetched on an unknown ``kid`` at most once per
  ``refetch_interval``; a failed fetch keeps the last good set (the issuer blinking is never
  an outage); the algorithm is pinned by each JWK, and the JWK Set's ``issuer`` is the exact
  ``iss`` tokens must carry (with ``issuer=``, a JWK Set naming another issuer is refused);
- revocations come from ``/v1/revocations?since=SEQ``, pulled every ``poll_interval``; when
  the last successful pull is older than ``max_staleness`` the verifier fails closed
  (:class:`~keygrants.errors.VerifierUnavailable`) instead of accepting a token that may have
  been revoked; an entry is kept until ``leeway`` after its ``expires_at``, so as long as
  this verifier accepts a token it still holds the entries that revoke it (the KMS sets
  ``expires_at`` with its own leeway, which may be shorter); a feed whose ``latest`` goes
  back below what was seen (the KMS's store restored or replaced) is pulled again from the
  start;
- a token is checked as the KMS checks it (:func:`keygrants.grants.decode_grant_token`: header,
  signature, ``typ``, ``iss``, ``aud``, ``nbf``/``exp`` with leeway), then against the
  revocation view, the requested operation and encryption context, and its proof of
  possession (a DPoP proof with its own bounded ``jti`` replay cache, or the mTLS certificate);
- a verified token is cached (bounded, keyed by the token string) until it expires, so seeing
  it again costs a dictionary lookup plus the checks that can change (revocation, window,
  issuer key, binding).

With ``bus_url`` (``nats://…``, ``redis://…``; see docs/bus.md) the verifier also subscribes
to the revocations the KMS pushes (:mod:`keygrants.grants.push`). A message is only a trigger:
a pushed entry or a heartbeat naming a sequence number it has not seen makes it pull the feed
from the KMS at once (at most one pull per 5 ms). A message's content is never applied and
never makes the view fresh (anyone who can publish on the bus could forge one), so
``poll_interval`` and ``max_staleness`` bound staleness exactly as without a bus.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

import httpx

from keygrants.client._connection import off_network, server_url, tls_verify
from keygrants.crypto.signing import b64url
from keygrants.errors import (
    GrantDenied,
    GrantUnknownKey,
    KeygrantsError,
    KeyNotGranted,
    OperationNotGranted,
    PopInvalid,
    PopRequired,
    ServerUnreachable,
    VerifierUnavailable,
)
from keygrants.grants.dpop import DpopVerifier
from keygrants.grants.model import MAX_LEEWAY, GrantClaims, check_context
from keygrants.grants.push import SUBJECT, decode_message
from keygrants.grants.revocation import RevocationEntry, RevocationView
from keygrants.grants.token import IssuerPublicKey, decode_grant_token, issuer_key_from_jwk

__all__ = ["AsyncVerifier", "Verifier"]

JWKS_PATH: Final = "/.well-known/jwks.json"
REVOCATIONS_PATH: Final = "/v1/revocations"
_DEFAULT_MAX_AGE: Final = 300
_MAX_JWKS_BYTES: Final = 256 * 1024
#: Feed pages (1,000 entries each from keygrants) one ``verify`` pulls at most once the view
#: is fresh; the rest of a backlog is pulled by the next calls.
CATCH_UP_PAGES: Final = 4
_CACHE_SIZE: Final = 10_000
_BUS_PULL_SPACING: Final = 0.005
_BUS_RETRY: Final = 5.0  # seconds between attempts to subscribe while the bus is unreachable
log = logging.getLogger("keygrants.verifier")


def _max_age(headers: httpx.Headers) -> int:
    for part in headers.get("cache-control", "").split(","):
        name, _, value = part.strip().partition("=")
        if name.lower() == "max-age" and value.isascii() and value.isdigit():
            return min(int(value), 86400)
    return _DEFAULT_MAX_AGE


class _State:
    """What both verifiers share: keys, the revocation view, the caches and the checks."""

    def __init__(self, *, audience: str | None, issuer: str | None, max_staleness: float,
                 leeway: int, refetch_interval: float, poll_interval: float,
                 clock: Callable[[], float]) -> None:
        if max_staleness <= 0 or poll_interval <= 0 or poll_interval > max_staleness:
            raise ValueError("need 0 < poll_interval <= max_staleness")
        if not 0 <= leeway <= MAX_LEEWAY:
            raise ValueError(f"leeway must be 0..{MAX_LEEWAY} seconds")
        if issuer is not None and (not issuer or not issuer.isprintable() or " " in issuer):
            raise ValueError("issuer must be the KMS's issuer URI (e.g. urn:keygrants:…)")
        self.audience = audience
        self.expected_issuer = issuer
        self.max_staleness = max_staleness
        self.leeway = leeway
        self.refetch_interval = refetch_interval
        self.poll_interval = poll_interval
        self.clock = clock
        self.issuer: str | None = None
        self.keys: dict[str, IssuerPublicKey] = {}
        self.jwks_seq = -1
        self.keys_expire_at = 0.0
        self.last_refetch = -1e18
        self.key_retry_at = 0.0  # no JWKS fetch before this (after a failure)
        self.key_error: str | None = None  # why the last JWKS fetch failed
        self.last_bus_pull = -1e18
        self.revocations = RevocationView()
        self.feed_seq = 0
        self.feed_fresh_at: float | None = None  # when the feed was last pulled completely
        self.next_poll = 0.0
        self.dpop = DpopVerifier(clock=clock)  # the KMS's window: 60 s + 5 s leeway
        self.verified: dict[str, GrantClaims] = {}
        self.lock = threading.Lock()

    def keys_due(self, now: float, unknown_kid: bool) -> bool:
        """Whether to fetch the JWKS: none yet (but not more than once per refetch interval
        after a failure), the cache hint ran out, or an unknown kid (once per interval)."""
        if now < self.key_retry_at:
            return False
        return (self.issuer is None or now >= self.keys_expire_at
                or (unknown_kid and now - self.last_refetch >= self.refetch_interval))

    def key_fetch_failed(self, exc: Exception) -> None:
        reason = str(exc) or type(exc).__name__
        if reason != self.key_error:
            log.warning("the JWKS could not be fetched: %s", reason)
        self.key_error = reason
        self.key_retry_at = self.clock() + min(self.refetch_interval, 10.0)

    # -- applying fetched documents ------------------------------------------------------------

    def apply_jwks(self, doc: object, max_age: int) -> None:
        if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
            raise ValueError("not a JWK Set")
        issuer = doc.get("issuer")
        if not isinstance(issuer, str) or not issuer:
            raise ValueError("the JWK Set names no issuer")
        if self.expected_issuer is not None and issuer != self.expected_issuer:
            raise ValueError(f"the JWK Set names the issuer {issuer[:256]!r}, not the expected "
                             f"{self.expected_issuer!r}")
        if self.issuer is not None and issuer != self.issuer:
            raise ValueError("the JWK Set names another issuer than before")
        keys = {}
        for jwk in doc["keys"]:
            key = issuer_key_from_jwk(jwk) if isinstance(jwk, dict) else None
            if key is not None:
                keys[key.kid] = key
        seq = doc.get("seq")
        with self.lock:
            self.issuer = issuer
            self.keys = keys
            self.jwks_seq = seq if isinstance(seq, int) else self.jwks_seq
            self.keys_expire_at = self.clock() + max_age
            self.key_error = None

    def pages_per_call(self) -> int | None:
        """How many feed pages one ``verify`` may pull: all of them until the view is fresh
        the first time (it cannot vouch for a token before); then :data:`CATCH_UP_PAGES`, so
        that a backlog (after a revoke-all of many grants) is caught up over several calls
        instead of stalling one request for seconds. The view answers meanwhile from what it
        has, within ``max_staleness`` of its last complete pull, as between two polls."""
        return None if self.feed_fresh_at is None else CATCH_UP_PAGES

    def apply_feed(self, doc: object, started: float) -> bool:
        """Apply one page; return whether more follow."""
        if not isinstance(doc, dict) or not isinstance(doc.get("entries"), list):
            raise ValueError("not a revocation feed")
        latest = doc.get("latest")
        if type(latest) is int and 0 <= latest < self.feed_seq:
            # The KMS numbers entries from a lower value than it did (its store was restored
            # or replaced): asking for what follows feed_seq would miss every new revocation.
            # Pull it all again; the entries held stay (they are still true, and expire).
            log.warning("the revocation feed went back from seq %d to %d; pulling it again "
                        "from the start", self.feed_seq, latest)
            self.feed_seq = 0
            return True
        entries = []
        for e in doc["entries"]:
            entries.append(RevocationEntry(seq=int(e["seq"]), kind=e["kind"], id=str(e["id"]),
                                           revoked_at=int(e["revoked_at"]),
                                           expires_at=int(e["expires_at"]),
                                           reason=str(e.get("reason", "revoked"))))
        self.revocations.apply(entries)
        if entries:
            self.feed_seq = max(self.feed_seq, entries[-1].seq)
        more = bool(doc.get("more"))
        covered = doc.get("next_since")
        if not more and type(covered) is int and covered > self.feed_seq:
            # past entries the KMS has already dropped (their tokens expired): otherwise every
            # heartbeat naming the newest number would make this verifier ask for them again
            self.feed_seq = covered
        if not more:
            self.feed_fresh_at = started
            # Kept until this verifier's own leeway after expires_at: it accepts a token until
            # exp + leeway, and the KMS's expires_at (exp + the KMS's leeway) may be earlier.
            self.revocations.prune(int(self.clock()) - self.leeway)
        return more

    # -- the checks ----------------------------------------------------------------------------

    def check_fresh(self) -> None:
        now = self.clock()
        if self.issuer is None or not self.keys:
            raise VerifierUnavailable("no issuer keys yet (the JWKS could not be fetched"
                                      + (f": {self.key_error})" if self.key_error else ")"))
        if self.feed_fresh_at is None or now - self.feed_fresh_at > self.max_staleness:
            raise VerifierUnavailable("the revocation feed is older than the staleness bound")

    def decode(self, token: str) -> GrantClaims:
        now = int(self.clock())
        cached = self.verified.get(token)
        if cached is not None:
            if (cached.kid in self.keys
                    and cached.not_before - self.leeway <= now < cached.expires_at + self.leeway):
                return cached
            self.verified.pop(token, None)
        assert self.issuer is not None
        claims = decode_grant_token(token, self.keys, issuer=self.issuer, audience=self.audience,
                                    now=now, leeway=self.leeway)
        if len(self.verified) >= _CACHE_SIZE:
            with contextlib.suppress(StopIteration, RuntimeError):  # changed meanwhile
                self.verified.pop(next(iter(self.verified)), None)
        self.verified[token] = claims
        return claims

    def finish(self, token: str, claims: GrantClaims, *, operation: str | None,
               context: Mapping[str, str] | None, dpop_proof: str | None, method: str | None,
               url: str | None, client_cert: bytes | None, key: str | None) -> GrantClaims:
        self.revocations.check(claims)
        if claims.max_uses is not None:
            # uses are counted by the KMS only: a verifier cannot honour the limit
            raise GrantDenied("a limited-use grant can only be used at the KMS")
        if key is not None and not hmac.compare_digest(claims.key_id.encode(), key.encode()):
            raise KeyNotGranted()
        if operation is not None and operation not in claims.operations:
            raise OperationNotGranted(f"the grant does not allow {operation}")
        if context is not None or claims.context_equals is not None \
                or claims.context_subset is not None:
            # a constrained grant with no context given fails closed (the empty context)
            check_context(context, equals=claims.context_equals, subset=claims.context_subset)
        if claims.cnf_jkt is not None:
            if method is None or url is None:
                raise PopRequired("a DPoP-bound grant needs method= and url= to check its proof")
            self.dpop.verify(dpop_proof, method=method, url=url, access_token=token,
                             expected_jkt=claims.cnf_jkt, holder=claims.grantee)
        elif claims.cnf_x5t is not None:
            if client_cert is None:
                raise PopRequired("this grant is bound to a client certificate")
            digest = hashlib.sha256(client_cert).digest()
            if not hmac.compare_digest(b64url(digest), claims.cnf_x5t):
                raise PopInvalid("the client certificate is not the one the grant is bound to")
        return claims


def _kms_url(base_url: str, own_transport: bool, allow_insecure_http: bool) -> str:
    return server_url(base_url, allow_insecure_http=allow_insecure_http,
                      own_transport=own_transport, what="base_url",
                      opt_in="pass allow_insecure_http=True")


def _check_bus(bus_url: str | None) -> None:
    if bus_url is not None:
        from keygrants.bus import open_bus

        open_bus(bus_url)  # a malformed URL fails here, before any connection


class _Pushed:
    """What a pushed message means: only whether to pull the feed now. A message body is
    never applied and never makes the view fresh (anyone who can publish on the bus could
    forge one): the feed, pulled from the KMS over HTTP(S), is the only source of truth."""

    @staticmethod
    def handle(s: _State, data: bytes) -> float | None:
        """``None``: nothing to pull; else how long to wait before pulling (0: now). Pulls
        are at least ``_BUS_PULL_SPACING`` apart, so a flood of messages, forged or not, costs
        at most one pull per spacing; a message that is news but comes too soon is pulled
        for once the spacing is up, never dropped (it used to be, and the revocation then
        waited for the next heartbeat: ~1 s)."""
        try:
            msg = decode_message(data)
        except (ValueError, KeyError, TypeError, OverflowError):
            return None  # not ours, or malformed: ignored
        # a heartbeat behind what was seen means the feed went back (see apply_feed): pull too
        if not (msg != s.feed_seq if isinstance(msg, int) else msg.seq > s.feed_seq):
            return None
        wait = s.last_bus_pull + _BUS_PULL_SPACING - s.clock()
        return max(wait, 0.0)

    @staticmethod
    async def pull_after(s: _State, wait: float, pull: Callable[[], Awaitable[None]]) -> None:
        """Wait out the spacing (handlers run one at a time, so this also holds back the next
        message, which the pull then covers), then pull."""
        if wait > 0:
            await asyncio.sleep(wait)
        s.last_bus_pull = s.clock()
        await pull()


class Verifier:
    """Verify grant tokens locally (blocking I/O; safe to share between threads).

    Args:
        base_url: the KMS, e.g. ``https://kms.internal:8650`` (``http://`` only to a loopback
            host unless ``allow_insecure_http``, or with a ``transport`` of your own).
        audience: the audience this service must find in ``aud`` (``None``: not checked; pass
            your service's name so tokens meant for others are refused).
        issuer: the KMS's issuer URI (its tokens' ``iss``, the JWK Set's ``issuer``); a JWK
            Set naming another one is refused. ``None``: the first JWK Set fetched decides.
        bus_url: subscribe to pushed revocations (``nats://…``, ``redis://…``): a message makes
            the verifier pull the feed at once (it never trusts a message's content).
        max_staleness: seconds after the last complete pull of the revocation feed beyond
            which every verification fails closed.
        leeway: clock leeway for ``nbf``/``exp``.
        poll_interval: seconds between revocation feed pulls (default: a fifth of
            ``max_staleness``).
        refetch_interval: an unknown ``kid`` refetches the JWKS at most this often.
        verify_tls: TLS verification (``True``, or a CA bundle path, ``str`` or
            ``os.PathLike``).
        timeout: seconds per HTTP request to the KMS.
        transport: an ``httpx`` transport (tests); it decides what goes on the wire, so
            ``http://`` is then not checked.
        allow_insecure_http: allow ``http://`` to a host that is not loopback: anyone on the
            path could then hand the verifier forged issuer keys or hide revocations.

    Raises:
        ValueError: a bad option; a ``base_url`` without a scheme, with another one than
            ``https``/``http``, malformed, or ``http://`` to a host that is not loopback
            without the opt-in.
    """

    def __init__(self, base_url: str, *, audience: str | None = None, bus_url: str | None = None,
                 max_staleness: float = 60, leeway: int = 30, poll_interval: float | None = None,
                 refetch_interval: float = 10,
                 verify_tls: bool | str | os.PathLike[str] = True, timeout: float = 5.0,
                 clock: Callable[[], float] = time.time,
                 transport: httpx.BaseTransport | None = None, issuer: str | None = None,
                 allow_insecure_http: bool = False) -> None:
        _check_bus(bus_url)
        base_url = _kms_url(base_url, off_network(transport), allow_insecure_http)
        self._state = _State(audience=audience, issuer=issuer, max_staleness=max_staleness,
                             leeway=leeway, refetch_interval=refetch_interval,
                             poll_interval=poll_interval or max_staleness / 5, clock=clock)
        self._http = httpx.Client(base_url=base_url, verify=tls_verify(verify_tls),
                                  timeout=timeout, transport=transport)
        self._io = threading.Lock()
        self._bus_url = bus_url
        self._bus_thread: threading.Thread | None = None
        self._bus_stop: Any = None
        self._bus_closing = threading.Event()
        self._bus_start = threading.Lock()  # one bus thread, however many first verify() calls

    def __enter__(self) -> Verifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._bus_start:  # no bus thread starts after this
            self._bus_closing.set()  # seen by a bus thread that has not set _bus_stop yet
        stop, thread = self._bus_stop, self._bus_thread
        if stop is not None:
            with contextlib.suppress(RuntimeError):  # its loop already ended
                stop()
        if thread is not None:
            thread.join(timeout=5)
        self._http.close()

    def _start_bus(self) -> None:
        """Subscribe in a background thread with its own event loop (once; while the bus
        cannot be reached, tried again every 5 s: pulling the feed keeps the view correct)."""
        with self._bus_start:
            if (self._bus_url is not None and self._bus_thread is None
                    and not self._bus_closing.is_set()):
                self._bus_thread = self._bus_thread_for(self._bus_url)
                self._bus_thread.start()  # connecting happens in the thread, off the request path

    def _bus_thread_for(self, url: str) -> threading.Thread:
        """The bus thread, not started: it subscribes, and runs until :meth:`close`."""
        from keygrants.bus import open_bus

        def run() -> None:
            loop = asyncio.new_event_loop()

            async def on_message(data: bytes) -> None:
                wait = _Pushed.handle(self._state, data)
                if wait is not None:
                    await _Pushed.pull_after(self._state, wait,
                                             lambda: asyncio.to_thread(self._pull_quietly))

            stopped = asyncio.Event()  # set by close(), along with cancelling the task

            async def main() -> None:  # runs until close()
                warned = False
                # The flag and the event as well as the cancellation: a bus client that
                # swallows a cancellation must not keep this thread retrying.
                while not self._bus_closing.is_set():
                    bus = None
                    try:
                        bus = open_bus(url)
                        await bus.connect()
                        await bus.subscribe(SUBJECT, on_message)
                    except Exception as exc:
                        if bus is not None:
                            with contextlib.suppress(Exception):
                                await bus.close()
                        if not warned:
                            warned = True
                            log.warning("revocation bus unavailable (%s); pulling the feed and "
                                        "trying again every %g s", type(exc).__name__,
                                        _BUS_RETRY)
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(stopped.wait(), _BUS_RETRY)
                        continue
                    try:
                        await stopped.wait()
                    finally:
                        await bus.close()

            try:
                task = loop.create_task(main())

                def stop() -> None:
                    stopped.set()
                    task.cancel()

                self._bus_stop = lambda: loop.call_soon_threadsafe(stop)
                if self._bus_closing.is_set():  # close() ran before _bus_stop was set
                    stop()
                with contextlib.suppress(asyncio.CancelledError):
                    loop.run_until_complete(task)
            finally:
                loop.close()

        return threading.Thread(target=run, name="keygrants-verifier-bus", daemon=True)

    def _pull_quietly(self) -> None:
        with self._io, contextlib.suppress(KeygrantsError, ValueError, KeyError, TypeError):
            self.pull_revocations()

    def _get(self, path: str, params: dict[str, Any] | None = None) -> httpx.Response:
        try:
            r = self._http.get(path, params=params)
        except httpx.HTTPError as exc:
            raise ServerUnreachable(f"cannot reach the KMS: {type(exc).__name__}") from exc
        if r.status_code != 200 or len(r.content) > _MAX_JWKS_BYTES * 16:
            raise ServerUnreachable(f"the KMS answered {r.status_code} for {path}")
        return r

    def refresh_keys(self) -> None:
        """Fetch the JWKS now (a failure keeps the keys already held)."""
        s = self._state
        r = self._get(JWKS_PATH)
        if len(r.content) > _MAX_JWKS_BYTES:
            raise ServerUnreachable("the JWKS is too large")
        s.apply_jwks(r.json(), _max_age(r.headers))

    def pull_revocations(self, *, max_pages: int | None = None) -> bool:
        """Pull the feed entries after the last one seen: every page, or at most
        ``max_pages``. Return whether the pull is complete (only a complete pull makes the
        view fresh)."""
        s = self._state
        started = s.clock()
        pages = 0
        while s.apply_feed(self._get(REVOCATIONS_PATH, {"since": s.feed_seq}).json(), started):
            pages += 1
            if max_pages is not None and pages >= max_pages:
                return False
        return True

    def _maintain(self, unknown_kid: bool = False) -> None:
        """Refresh what is due, keeping the last good state when the KMS does not answer."""
        s = self._state
        now = s.clock()
        due_keys = s.keys_due(now, unknown_kid)
        if not due_keys and now < s.next_poll:
            return  # the hot path: nothing to fetch
        with self._io:
            try:
                if s.keys_due(s.clock(), unknown_kid):
                    if unknown_kid:
                        s.last_refetch = s.clock()
                    self.refresh_keys()
            except (KeygrantsError, ValueError) as exc:
                s.key_fetch_failed(exc)  # keep the last known-good keys; back off
            try:
                if s.clock() >= s.next_poll:  # re-checked: a request that waited on the
                    # lock finds the pull another one just made
                    complete = self.pull_revocations(max_pages=s.pages_per_call())
                    s.next_poll = s.clock() + (s.poll_interval if complete else 0.0)
            except (KeygrantsError, ValueError, KeyError, TypeError):
                s.next_poll = s.clock() + min(s.poll_interval, 1.0)  # staleness decides

    def verify(self, token: str, *, operation: str | None = None,
               context: Mapping[str, str] | None = None, dpop_proof: str | None = None,
               method: str | None = None, url: str | None = None,
               client_cert: bytes | None = None, key: str | None = None) -> GrantClaims:
        """Return the verified grant, or raise the typed refusal.

        Raises:
            GrantDenied: a subclass with the precise code (as the KMS would refuse it).
            VerifierUnavailable: when the verifier cannot vouch for any token (fail-closed).
        """
        s = self._state
        if self._bus_thread is None and self._bus_url is not None:
            self._start_bus()
        self._maintain()
        s.check_fresh()
        try:
            claims = s.decode(token)
        except GrantUnknownKey:
            self._maintain(unknown_kid=True)  # maybe a key published since the last fetch
            claims = s.decode(token)
        return s.finish(token, claims, operation=operation, context=context,
                        dpop_proof=dpop_proof, method=method, url=url, client_cert=client_cert,
                        key=key)


class AsyncVerifier:
    """:class:`Verifier` for asyncio applications (the same arguments)."""

    def __init__(self, base_url: str, *, audience: str | None = None, bus_url: str | None = None,
                 max_staleness: float = 60, leeway: int = 30, poll_interval: float | None = None,
                 refetch_interval: float = 10,
                 verify_tls: bool | str | os.PathLike[str] = True, timeout: float = 5.0,
                 clock: Callable[[], float] = time.time,
                 transport: httpx.AsyncBaseTransport | None = None, issuer: str | None = None,
                 allow_insecure_http: bool = False) -> None:
        _check_bus(bus_url)
        base_url = _kms_url(base_url, off_network(transport), allow_insecure_http)
        self._state = _State(audience=audience, issuer=issuer, max_staleness=max_staleness,
                             leeway=leeway, refetch_interval=refetch_interval,
                             poll_interval=poll_interval or max_staleness / 5, clock=clock)
        self._http = httpx.AsyncClient(base_url=base_url, verify=tls_verify(verify_tls),
                                       timeout=timeout, transport=transport)
        self._io = asyncio.Lock()
        self._bus_url = bus_url
        self._bus: Any = None
        self._bus_retry_at = 0.0
        self._subscribing: asyncio.Future[None] | None = None

    async def __aenter__(self) -> AsyncVerifier:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._subscribing is not None:
            self._subscribing.cancel()
        if self._bus is not None:
            await self._bus.close()
            self._bus = None
        await self._http.aclose()

    async def _subscribe(self) -> None:
        """Subscribe to pushed revocations (once; retried every 5 s while it fails)."""
        from keygrants.bus import open_bus

        s = self._state
        self._bus_retry_at = s.clock() + _BUS_RETRY
        bus = open_bus(self._bus_url or "")
        try:
            await bus.connect()

            async def pull() -> None:
                async with self._io:
                    with contextlib.suppress(KeygrantsError, ValueError, KeyError, TypeError):
                        await self.pull_revocations()

            async def on_message(data: bytes) -> None:
                wait = _Pushed.handle(s, data)
                if wait is not None:
                    await _Pushed.pull_after(s, wait, pull)

            await bus.subscribe(SUBJECT, on_message)
        except Exception:  # pulling every poll_interval still keeps it correct
            with contextlib.suppress(Exception):
                await bus.close()
            return
        finally:
            self._subscribing = None
        self._bus = bus

    async def _get(self, path: str, params: dict[str, Any] | None = None) -> httpx.Response:
        try:
            r = await self._http.get(path, params=params)
        except httpx.HTTPError as exc:
            raise ServerUnreachable(f"cannot reach the KMS: {type(exc).__name__}") from exc
        if r.status_code != 200:
            raise ServerUnreachable(f"the KMS answered {r.status_code} for {path}")
        return r

    async def refresh_keys(self) -> None:
        """Fetch the JWKS now (a failure keeps the keys already held)."""
        r = await self._get(JWKS_PATH)
        if len(r.content) > _MAX_JWKS_BYTES:
            raise ServerUnreachable("the JWKS is too large")
        self._state.apply_jwks(r.json(), _max_age(r.headers))

    async def pull_revocations(self, *, max_pages: int | None = None) -> bool:
        """Pull the feed entries after the last one seen (see :meth:`Verifier.pull_revocations`)."""
        s = self._state
        started = s.clock()
        pages = 0
        while s.apply_feed((await self._get(REVOCATIONS_PATH, {"since": s.feed_seq})).json(),
                           started):
            pages += 1
            if max_pages is not None and pages >= max_pages:
                return False
        return True

    async def _maintain(self, unknown_kid: bool = False) -> None:
        s = self._state
        now = s.clock()
        due_keys = s.keys_due(now, unknown_kid)
        if not due_keys and now < s.next_poll:
            return  # the hot path: nothing to fetch
        async with self._io:
            try:
                if s.keys_due(s.clock(), unknown_kid):
                    if unknown_kid:
                        s.last_refetch = s.clock()
                    await self.refresh_keys()
            except (KeygrantsError, ValueError) as exc:
                s.key_fetch_failed(exc)
            try:
                if s.clock() >= s.next_poll:  # re-checked: a request that waited on the
                    # lock finds the pull another one just made
                    complete = await self.pull_revocations(max_pages=s.pages_per_call())
                    s.next_poll = s.clock() + (s.poll_interval if complete else 0.0)
            except (KeygrantsError, ValueError, KeyError, TypeError):
                s.next_poll = s.clock() + min(s.poll_interval, 1.0)

    async def verify(self, token: str, *, operation: str | None = None,
                     context: Mapping[str, str] | None = None, dpop_proof: str | None = None,
                     method: str | None = None, url: str | None = None,
                     client_cert: bytes | None = None, key: str | None = None) -> GrantClaims:
        """Return the verified grant, or raise the typed refusal (see :meth:`Verifier.verify`)."""
        s = self._state
        if (self._bus_url is not None and self._bus is None and self._subscribing is None
                and s.clock() >= self._bus_retry_at):
            self._subscribing = asyncio.ensure_future(self._subscribe())  # off the request path
        await self._maintain()
        s.check_fresh()
        try:
            claims = s.decode(token)
        except GrantUnknownKey:
            await self._maintain(unknown_kid=True)
            claims = s.decode(token)
        return s.finish(token, claims, operation=operation, context=context,
                        dpop_proof=dpop_proof, method=method, url=url, client_cert=client_cert,
                        key=key)
