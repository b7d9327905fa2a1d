"""Local verification of grant tokens: :class:`Verifier` (sync) and :class:`AsyncVerifier`.

A service that receives grant tokens checks them here, without a call to the KMS per request:

- the issuer keys come from ``/.well-known/jwks.json``, cached, refreshed when the response's
  ``Cache-Control: max-age`` runs out, refetched on an unknown ``kid`` at most once per
  ``refetch_interval``; a failed fetch keeps the last good set (the issuer blinking is never
  an outage); the algorithm is pinned by each JWK, and the JWK Set's ``issuer`` is the exact
  ``iss`` tokens must carry (with ``issuer=``, a JWK Set naming another issuer is refused);
  while no keys are held, a failed fetch is tried again after at most a second;
- revocations come from ``/v1/revocations?since=SEQ``, pulled every ``poll_interval``; when
  the last complete pull is older than ``max_staleness`` the verifier fails closed
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

Fetches run in the background (a thread for :class:`Verifier`, a task for
:class:`AsyncVerifier`), at most one JWKS fetch and one feed pull at a time, the two side by
side. The call that finds one due starts it; a call waits for a fetch in flight only when it
cannot answer without it (no keys yet, an unknown ``kid`` it may bring, a view past
``max_staleness``). Otherwise calls answer from what is held, so a KMS that is slow or hangs
delays no request while the view is fresh enough to vouch for tokens.

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
from collections.abc import Awaitable, Callable, Coroutine, Mapping
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
_CACHE_SIZE: Final = 10_000
_BUS_PULL_SPACING: Final = 0.005
_BUS_RETRY: Final = 5.0  # seconds between attempts to subscribe while the bus is unreachable
#: Seconds before a failed fetch is tried again when the verifier cannot answer without it
#: (no issuer keys: a KMS that starts with this service is used as soon as it answers), and
#: at most between feed pulls that failed.
_RETRY_SOON: Final = 1.0
#: Feed pull failures other than these are bugs, not the KMS being away: logged with a trace.
_FETCH_ERRORS: Final = (KeygrantsError, ValueError, KeyError, TypeError)
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
        """Whether to fetch the JWKS: none yet, the cache hint ran out, or an unknown kid (once
        per refetch interval); never before the back-off after a failure has passed."""
        if now < self.key_retry_at:
            return False
        return (self.issuer is None or now >= self.keys_expire_at
                or (unknown_kid and now - self.last_refetch >= self.refetch_interval))

    def start_keys(self, unknown_kid: bool) -> bool:
        """Whether to start a JWKS fetch now (none is in flight); records an unknown kid's
        refetch, which limits the next one."""
        now = self.clock()
        if not self.keys_due(now, unknown_kid):
            return False
        if unknown_kid:
            self.last_refetch = now
        return True

    def feed_due(self) -> bool:
        return self.clock() >= self.next_poll

    def needs(self, unknown_kid: bool) -> tuple[bool, bool]:
        """What a call cannot answer without, so waits for if it is being fetched:
        (the JWKS, the feed). The JWKS when no keys are held or the token names an unknown
        kid; the feed when the view is not fresh (:meth:`check_fresh` would refuse)."""
        stale = self.feed_fresh_at is None or self.clock() - self.feed_fresh_at > self.max_staleness
        return unknown_kid or not self.keys, stale

    def key_fetch_failed(self, exc: Exception) -> None:
        """Keep the keys held and back off: briefly while none are held (nothing can be
        answered meanwhile, and the KMS may be starting), else ``refetch_interval`` (10 s at
        most), the fetch then being a refresh nobody waits for."""
        reason = str(exc) or type(exc).__name__
        if reason != self.key_error:
            log.warning("the JWKS could not be fetched: %s", reason,
                        exc_info=None if isinstance(exc, KeygrantsError | ValueError) else exc)
        self.key_error = reason
        backoff = _RETRY_SOON if not self.keys else 10.0
        self.key_retry_at = self.clock() + min(self.refetch_interval, backoff)

    def feed_pulled(self) -> None:
        self.next_poll = self.clock() + self.poll_interval

    def feed_pull_failed(self, exc: Exception) -> None:
        """Keep the view and try again soon: :meth:`check_fresh` decides whether it still
        vouches for tokens."""
        self.next_poll = self.clock() + min(self.poll_interval, _RETRY_SOON)
        if isinstance(exc, _FETCH_ERRORS):
            log.debug("the revocation feed could not be pulled: %s", exc)
        else:
            log.warning("pulling the revocation feed failed", exc_info=exc)

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


class _ThreadFetch:
    """One kind of fetch (the JWKS, or the feed) for :class:`Verifier`: at most one in flight,
    run in a daemon thread, so the call that starts it does not wait for it unless it has to.
    Returns a :class:`threading.Event` set when the fetch in flight has ended."""

    def __init__(self, name: str, fetch: Callable[[], None]) -> None:
        self._name = name
        self._fetch = fetch  # never raises: it records a failure in the shared state
        self._lock = threading.Lock()
        self._ended: threading.Event | None = None  # the fetch in flight, if any

    def running(self) -> threading.Event | None:
        return self._ended

    def start(self, due: Callable[[], bool]) -> threading.Event | None:
        """The fetch in flight, else a new one if ``due()`` (asked under the lock, so two
        callers never start two), else ``None``."""
        with self._lock:
            if self._ended is None and due():
                ended = self._ended = threading.Event()
                threading.Thread(target=self._run, args=(ended,), name=self._name,
                                 daemon=True).start()
            return self._ended

    def _run(self, ended: threading.Event) -> None:
        try:
            self._fetch()
        finally:
            # after the fetch has updated the state: a caller that finds none in flight then
            # sees what it fetched (or its back-off), and does not start it again
            with self._lock:
                self._ended = None
            ended.set()


class _TaskFetch:
    """:class:`_ThreadFetch` for :class:`AsyncVerifier`: the fetch runs in a task on the
    caller's event loop (one thread: no lock needed)."""

    def __init__(self, name: str, fetch: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self._name = name
        self._fetch = fetch  # never raises: it records a failure in the shared state
        self._task: asyncio.Task[None] | None = None

    def running(self) -> asyncio.Task[None] | None:
        task = self._task
        return task if task is not None and not task.done() else None

    def start(self, due: Callable[[], bool]) -> asyncio.Task[None] | None:
        task = self.running()
        if task is None and due():
            task = self._task = asyncio.get_running_loop().create_task(self._fetch(),
                                                                       name=self._name)
        return task

    async def cancel(self) -> None:
        task = self.running()
        if task is not None:
            task.cancel()
            await asyncio.wait([task])  # not await task: this caller's own cancellation stays


class Verifier:
    """Verify grant tokens locally (safe to share between threads).

    Fetches from the KMS run in background threads; :meth:`verify` blocks only when it cannot
    answer without the fetch in flight (see the module docstring).

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
        self._keys = _ThreadFetch("keygrants-verifier-jwks", self._fetch_keys)
        self._feed = _ThreadFetch("keygrants-verifier-feed", self._pull_feed)
        self._bus_url = bus_url
        self._bus_thread: threading.Thread | None = None
        self._bus_stop: Any = None
        self._closing = threading.Event()
        self._bus_start = threading.Lock()  # one bus thread, however many first verify() calls

    def __enter__(self) -> Verifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the bus thread and close the HTTP client. A fetch in flight is not waited for
        (its daemon thread ends with its last request to the KMS)."""
        with self._bus_start:  # no bus thread starts after this
            self._closing.set()  # seen by a bus thread that has not set _bus_stop yet
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
                    and not self._closing.is_set()):
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
                                             lambda: asyncio.to_thread(self._pull_for_push))

            stopped = asyncio.Event()  # set by close(), along with cancelling the task

            async def main() -> None:  # runs until close()
                warned = False
                # The flag and the event as well as the cancellation: a bus client that
                # swallows a cancellation must not keep this thread retrying.
                while not self._closing.is_set():
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
                if self._closing.is_set():  # close() ran before _bus_stop was set
                    stop()
                with contextlib.suppress(asyncio.CancelledError):
                    loop.run_until_complete(task)
            finally:
                loop.close()

        return threading.Thread(target=run, name="keygrants-verifier-bus", daemon=True)

    def _pull_for_push(self) -> None:
        """Pull the feed for a pushed message: a pull in flight may have been sent before the
        revocation the message announces, so wait for it to end, then pull (or join a pull
        started since, which is after the message)."""
        earlier = self._feed.running()
        if earlier is not None:
            earlier.wait()
        pull = self._feed.start(lambda: True)
        if pull is not None:
            pull.wait()

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

    def _fetch_keys(self) -> None:
        try:
            self.refresh_keys()
        except Exception as exc:  # the last good keys stay
            if not self._closing.is_set():
                self._state.key_fetch_failed(exc)

    def _pull_feed(self) -> None:
        try:
            self.pull_revocations()
        except Exception as exc:  # the view stays; check_fresh decides whether it vouches
            if not self._closing.is_set():
                self._state.feed_pull_failed(exc)
        else:
            self._state.feed_pulled()

    def _maintain(self, unknown_kid: bool = False) -> None:
        """Start the fetches that are due, in the background, and wait only for those this
        call cannot answer without (:meth:`_State.needs`)."""
        s = self._state
        now = s.clock()
        if not unknown_kid and now < s.next_poll and not s.keys_due(now, False):
            return  # the hot path: nothing to fetch
        keys = self._keys.start(lambda: s.start_keys(unknown_kid))
        feed = self._feed.start(s.feed_due)
        need_keys, need_feed = s.needs(unknown_kid)
        if keys is not None and need_keys:
            keys.wait()
        if feed is not None and need_feed:
            feed.wait()

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
    """:class:`Verifier` for asyncio applications (the same arguments). Fetches run in tasks
    on the event loop of the calls that start them."""

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
        self._keys = _TaskFetch("keygrants-verifier-jwks", self._fetch_keys)
        self._feed = _TaskFetch("keygrants-verifier-feed", self._pull_feed)
        self._bus_url = bus_url
        self._bus: Any = None
        self._bus_retry_at = 0.0
        self._bus_warned = False  # this failure streak has been logged
        self._subscribing: asyncio.Future[None] | None = None

    async def __aenter__(self) -> AsyncVerifier:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._subscribing is not None:
            self._subscribing.cancel()
        await self._keys.cancel()
        await self._feed.cancel()
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

            async def on_message(data: bytes) -> None:
                wait = _Pushed.handle(s, data)
                if wait is not None:
                    await _Pushed.pull_after(s, wait, self._pull_for_push)

            await bus.subscribe(SUBJECT, on_message)
        except Exception as exc:  # pulling every poll_interval still keeps it correct
            with contextlib.suppress(Exception):
                await bus.close()
            if not self._bus_warned:  # once per failure streak, as Verifier's bus thread
                self._bus_warned = True
                log.warning("revocation bus unavailable (%s); pulling the feed and trying "
                            "again every %g s", type(exc).__name__, _BUS_RETRY)
            return
        finally:
            self._subscribing = None
        self._bus_warned = False
        self._bus = bus

    async def _pull_for_push(self) -> None:
        """See :meth:`Verifier._pull_for_push`."""
        earlier = self._feed.running()
        if earlier is not None:
            await asyncio.wait([earlier])
        pull = self._feed.start(lambda: True)
        if pull is not None:
            await asyncio.wait([pull])  # not cancelled with this handler (aclose cancels it)

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

    async def _fetch_keys(self) -> None:
        try:
            await self.refresh_keys()
        except Exception as exc:  # the last good keys stay
            self._state.key_fetch_failed(exc)

    async def _pull_feed(self) -> None:
        try:
            await self.pull_revocations()
        except Exception as exc:  # the view stays; check_fresh decides whether it vouches
            self._state.feed_pull_failed(exc)
        else:
            self._state.feed_pulled()

    async def _maintain(self, unknown_kid: bool = False) -> None:
        """See :meth:`Verifier._maintain`; a call that waits and is cancelled leaves the fetch
        running for the others."""
        s = self._state
        now = s.clock()
        if not unknown_kid and now < s.next_poll and not s.keys_due(now, False):
            return  # the hot path: nothing to fetch
        keys = self._keys.start(lambda: s.start_keys(unknown_kid))
        feed = self._feed.start(s.feed_due)
        need_keys, need_feed = s.needs(unknown_kid)
        waits = [task for task, need in ((keys, need_keys), (feed, need_feed))
                 if task is not None and need]
        if waits:
            await asyncio.wait(waits)

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
