"""Grant use cases: create, show, list, retire, revoke, approve, exchange; present and use.

:class:`GrantService` issues grants and their tokens, keeps the issuer keys (staged
rollover), the revocation feed and its in-memory view, and checks a presented grant token.
:class:`GrantAuthorizer` is the KMS's authorizer once grants exist: a request that carries a
verified grant is decided by the grant alone (key, operation, encryption context, uses); any
other request by the policy authorizer it wraps.

Who may do what:

- create: policy ``create_grant`` on the key with the requested limits as ``context.grant``
  (a statement marked ``@approval("required")`` makes the grant pending: break-glass), and the
  creator must itself be allowed every granted operation on the key (a grant never exceeds
  its creator's rights). With a grant token carrying ``create_grant`` presented instead:
  a sub-grant that strictly attenuates it (delegation), no policy involved.
- show: the creator, the grantee, the retiring principal, or ``list_grants`` on the key.
- retire: the grantee or the retiring principal. Revoke: ``revoke_grant`` on the key (and
  the creator of a delegated grant). Revoke-all: ``revoke_grants`` on the principal, or
  ``revoke_grant`` on the key. Approve/reject: ``approve_grant`` on the key, never the
  requester or the grantee (two-person rule).

Every state change is audited with a durable ``requested`` event before it is applied
(fail-closed) and appended to the revocation feed when it ends a grant.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import hmac
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, TypeVar

import anyio.to_thread
import msgspec

from keygrants import models as m
from keygrants.access import PolicyAuthorizer
from keygrants.audit.events import decode_event
from keygrants.audit.log import AuditLog, EventQuery
from keygrants.audit.recorder import AuditRecorder, NoAudit
from keygrants.auth import ADMIN_PRINCIPAL, RequestContext
from keygrants.auth.httpsig import DEFAULT_NONCE_CACHE_SIZE
from keygrants.auth.model import PRINCIPAL_NAME_PATTERN, Principal
from keygrants.crypto import Aead
from keygrants.crypto.signing import SigningKey, b64url
from keygrants.errors import (
    AlreadyExists,
    AttenuationViolated,
    AuditUnavailable,
    Conflict,
    ContextMismatch,
    Forbidden,
    GrantDenied,
    GrantExhausted,
    GrantExpired,
    GrantNotFound,
    GrantPending,
    GrantRetired,
    GrantRevoked,
    GrantStateError,
    GrantUnknownKey,
    InvalidRequest,
    KeygrantsError,
    KeyNotFound,
    KeyNotGranted,
    OperationNotGranted,
    PopInvalid,
    PopRequired,
    PrincipalNotFound,
    SelfApproval,
    WrongGrantee,
)
from keygrants.grants.dpop import DpopVerifier
from keygrants.grants.issuer import IssuerKey, IssuerKeyring, issuer_secret_name, new_issuer_key
from keygrants.grants.model import (
    CRYPTO_OPERATIONS,
    GRANT_OPERATIONS,
    MAX_LEEWAY,
    OPERATION_ACTIONS,
    Grant,
    GrantClaims,
    check_attenuation,
    check_constraint_map,
    check_context,
    is_grant_id,
    new_grant_id,
)
from keygrants.grants.revocation import RevocationEntry, RevocationView
from keygrants.grants.token import decode_grant_token, encode_grant_token
from keygrants.keys.model import Key
from keygrants.keys.sealing import seal_named_secret, unseal_named_secret
from keygrants.keys.specs import SPECS
from keygrants.policy import GrantFacts
from keygrants.service import KMS, Authorizer, _phantom

__all__ = ["CONTEXT_OPERATIONS", "GrantAuthorizer", "GrantService", "GrantSettings"]

#: Operations that take an encryption context: the only ones a context constraint can bind.
CONTEXT_OPERATIONS: Final = frozenset({"encrypt", "decrypt", "re_encrypt", "generate_data_key"})
ISSUER_META: Final = "grant_issuer"
_PRINCIPAL_RE: Final = re.compile(PRINCIPAL_NAME_PATTERN)
_THUMBPRINT_RE: Final = re.compile(r"^[A-Za-z0-9_-]{43}$")
_AUDIENCE_RE: Final = re.compile(r"^[\x21-\x7e]{1,256}$")
MAX_AUDIENCES: Final = 16
MAX_NAME: Final = 256
MAX_JUSTIFICATION: Final = 1024
MAX_LIST_LIMIT: Final = 1000
_USE_COUNTED: Final = "grant_use"  # in the request's audit detail: "counted"
#: Grants a revoke-all ends per store transaction: each transaction stays well within the
#: store's bound on one call, whatever the number of grants.
_END_BATCH: Final = 2000
_VERIFIED_CACHE: Final = 10_000

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger("keygrants.grants")


@dataclass(frozen=True, slots=True)
class GrantSettings:
    """Grant and issuer-key settings (seconds unless named otherwise).

    ``issuer`` is the tokens' ``iss`` and the audience the KMS accepts (default: a stable
    ``urn:keygrants:<id>`` stored with the data, shared by every node on the same store).
    ``max_ttl`` caps every grant (policy may cap lower) and sets how long an old issuer key
    stays published after a rotation. ``jwks_max_age`` is the JWKS refresh hint, and the wait
    between publishing a new issuer key and signing with it.
    """

    issuer: str | None = None
    default_ttl: int = 300
    max_ttl: int = 86400
    leeway: int = 30
    max_depth: int = 3
    max_uses: int = 1_000_000
    jwks_max_age: int = 300
    issuer_rotation_period: int = 30 * 86400
    break_glass_ttl: int = 900
    dpop_max_age: int = 60
    require_dpop_nonce: bool = False
    dpop_replay_cache_size: int = DEFAULT_NONCE_CACHE_SIZE

    def __post_init__(self) -> None:
        for name in ("default_ttl", "max_ttl", "max_depth", "max_uses", "jwks_max_age",
                     "issuer_rotation_period", "break_glass_ttl", "dpop_max_age",
                     "dpop_replay_cache_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        if not 0 <= self.leeway <= MAX_LEEWAY:
            raise ValueError(f"leeway must be 0..{MAX_LEEWAY} seconds")
        if self.default_ttl > self.max_ttl:
            raise ValueError("default_ttl must not exceed max_ttl")


def _epoch(when: datetime, name: str) -> int:
    """Seconds since the epoch of a time that names its offset (a naive one would be read in
    the server's own time zone)."""
    if when.tzinfo is None or when.utcoffset() is None:
        raise InvalidRequest(f"{name} must name its offset, e.g. 2026-11-22T10:00:00Z")
    try:
        return int(when.timestamp())
    except (ValueError, OverflowError, OSError):
        raise InvalidRequest(f"{name} is out of range") from None


def _dt(ts: int | None) -> datetime | None:
    return None if ts is None else _utc(ts)


@functools.lru_cache(maxsize=1024)
def _utc(ts: int) -> datetime:
    """A grant's times as datetimes (immutable, so shared): the grants answered within one
    second repeat the same few, and converting was 2% of an issuance's CPU."""
    return datetime.fromtimestamp(ts, UTC)


def grant_info(g: Grant, now: int) -> m.GrantInfo:
    """The public view of a grant."""
    return m.GrantInfo(
        id=g.id, key_id=g.key_id, grantee=g.grantee, operations=sorted(g.operations),
        state=g.effective_state(now), issuer=g.issuer,
        created_at=_dt(g.created_at), not_before=_dt(g.not_before),  # type: ignore[arg-type]
        expires_at=_dt(g.expires_at), uses=g.uses, max_uses=g.max_uses,  # type: ignore[arg-type]
        context_equals=g.context_equals, context_subset=g.context_subset,
        audiences=list(g.audiences), dpop_jkt=g.cnf_jkt, x5t_s256=g.cnf_x5t, name=g.name,
        retiring_principal=g.retiring_principal, justification=g.justification,
        parent_id=g.parent_id, depth=g.depth, requires_approval=g.requires_approval,
        decided_by=g.decided_by, decided_at=_dt(g.decided_at), ended_at=_dt(g.ended_at),
        ended_by=g.ended_by)


def _uses_advice(parent: Grant) -> str:
    """Why a sub-grant of a limited grant was refused for its uses, and what to give."""
    left = max(0, (parent.max_uses or 0) - parent.uses)
    return (f"the parent grant has {left} use(s) left: a sub-grant of it must be limited to "
            f"at most {left} (--uses N, max_uses)")


def _audited(event_type: str, operation: str) -> Callable[[F], F]:
    """Record a grant use case's outcome, with the grant id it acted on."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(self: GrantService, ctx: RequestContext, *args: Any, **kwargs: Any) -> Any:
            target = args[0] if args and is_grant_id(args[0]) else None
            try:
                result = fn(self, ctx, *args, **kwargs)
            except KeygrantsError as exc:
                denial = exc if isinstance(exc, GrantDenied) else None
                self.audit.record(ctx, event_type, "denied" if isinstance(exc, Forbidden)
                                  else "error", operation=operation, reason=exc.code,
                                  grant_id=target or (denial.grant_id if denial else None),
                                  detail=denial.audit_detail if denial else None)
                raise
            info = result.grant if isinstance(result, m.GrantCreated) else result
            grant_id = getattr(info, "id", None) or getattr(result, "grant_id", None) or target
            key_id = getattr(info, "key_id", None)
            detail = None
            if isinstance(info, m.GrantInfo) and info.requires_approval:
                detail = {"severity": "high", "state": info.state}
            elif isinstance(result, m.RevokeAllResult):
                detail = {"grants": str(result.revoked)}
            self.audit.record(ctx, event_type, "ok", operation=operation, key_id=key_id,
                              grant_id=grant_id, detail=detail)
            return result
        return wrapper  # type: ignore[return-value]
    return decorate


def _no_new_operations(operations: object, parent: Grant) -> None:
    """A sub-grant asking for an operation its parent lacks is told so first (an inherited
    context constraint made it a puzzling "constraints apply only to ..." error)."""
    if isinstance(operations, list) and (
            {op for op in operations if op in GRANT_OPERATIONS} - set(parent.operations)):
        raise AttenuationViolated("a sub-grant cannot add operations")  # (a typo: 400 below)


class GrantService:
    """Grants over the KMS's store and keys.

    Args:
        kms: the key service (its store holds the grants; its keys are what grants cover).
        policy: the policy authorizer (``None``: admin only).
        root_key: seals the issuer keys.
        settings: limits and timings.
        audit: where events go.
        clock: returns the current Unix time.
    """

    def __init__(self, kms: KMS, policy: PolicyAuthorizer | None, *, root_key: bytes,
                 settings: GrantSettings | None = None, audit: AuditRecorder | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.kms = kms
        self.store = kms.store
        self.policy = policy
        self.settings = s = settings or GrantSettings()
        self.audit: AuditRecorder = audit or NoAudit()
        audit_log = getattr(audit, "log", None)
        self._audit_log: AuditLog | None = audit_log if isinstance(audit_log, AuditLog) else None
        self._clock = clock
        self._root = Aead("aes-256-gcm", root_key)
        self._lock = threading.RLock()
        self.issuer = s.issuer or self._stored_issuer()
        self.audience = self.issuer
        # the proof window is DpopVerifier's (max_age + its 5 s leeway), not the grant leeway:
        # a proof the KMS accepts must not be refused by the service's Verifier, nor the reverse
        self.dpop = DpopVerifier(max_age=s.dpop_max_age,
                                 max_replay_entries=s.dpop_replay_cache_size,
                                 require_nonce=s.require_dpop_nonce, clock=clock)
        self.revocations = RevocationView()
        self._verified: dict[str, GrantClaims] = {}  # token → claims, oldest first (bounded)
        self._synced = 0  # feed entries up to here have been pulled from the store
        # set by the server when it pushes revocations on a bus (called from any thread)
        self.on_revocations: Callable[[Sequence[RevocationEntry]], None] | None = None
        self._sync_lock = threading.Lock()
        self.sync_revocations()
        self._keyring_read_at = float("-inf")  # last reload for an unknown kid (clock time)
        self.keyring = self._load_keyring()
        if self.keyring.signer(self._now()) is None:
            self._add_issuer_key(self._now(), activate_now=True)

    def _now(self) -> int:
        return int(self._clock())

    def _stored_issuer(self) -> str:
        candidate = f"urn:keygrants:{secrets.token_hex(8)}"
        self.store.set_meta_if_absent(ISSUER_META, candidate.encode())
        stored = self.store.get_meta(ISSUER_META)
        assert stored is not None
        return stored.decode()

    # -- issuer keys -------------------------------------------------------------------------

    def _load_keyring(self) -> IssuerKeyring:
        now = self._now()
        keys = self.store.list_issuer_keys()
        signers: dict[str, SigningKey] = {}
        for k in keys:
            if k.live(now):
                raw = unseal_named_secret(self._root, issuer_secret_name(k.kid), k.sealed)
                signers[k.kid] = SigningKey.from_private_bytes("ed25519", raw)
        return IssuerKeyring(keys, signers)

    def reload_issuer_keys(self) -> None:
        """Read the issuer keys again from the store (another node rotated them)."""
        with self._lock:
            self.keyring = self._load_keyring()

    def _reload_for_unknown_kid(self) -> bool:
        """Reload the issuer keys when a token names a kid this node does not know: another
        node sharing the store may have published it since this node last read them. At most
        once a second, so tokens with made-up kids cannot turn into a store read each. It
        may run on the event loop (a bounded stall: one store read and unseal at most once a
        second); a rotation pushed over the bus reloads in a worker thread before it is needed."""
        now = self._clock()
        if now - self._keyring_read_at < 1.0:
            return False
        self._keyring_read_at = now
        self.reload_issuer_keys()
        return True

    def _add_issuer_key(self, now: int, *, activate_now: bool = False) -> IssuerKey | None:
        """Publish a new issuer key (staged unless ``activate_now``); ``None`` if another node
        rotated at the same moment (its key is then loaded instead)."""
        s = self.settings
        with self._lock:
            current = self._load_keyring()
            activate_at = now if activate_now else now + s.jwks_max_age
            key, signing = new_issuer_key(current.seq + 1, now, activate_at)
            sealed = seal_named_secret(self._root, issuer_secret_name(key.kid),
                                       signing.private_bytes())
            key = msgspec.structs.replace(key, sealed=sealed)
            retire = current.plan_retirements(now, activate_at, s.max_ttl, s.leeway)
            try:
                self.store.add_issuer_key(key, retire)
            except Conflict:
                self.keyring = self._load_keyring()
                return None
            self.keyring = self._load_keyring()
            return key

    @_audited("issuer.rotate", "rotate_issuer_key")
    def rotate_issuer(self, ctx: RequestContext) -> m.IssuerKeyInfo:
        """Start a staged rotation now: publish the next key, which signs after one JWKS
        refresh interval; older keys retire once their last token has expired."""
        if self.policy is not None:
            self.policy.authorize(ctx, "rotate_issuer_key", None)
        elif ctx.principal != ADMIN_PRINCIPAL:
            raise Forbidden()
        now = self._now()
        self.audit.record(ctx, "issuer.rotate", "requested", operation="rotate_issuer_key",
                          wait=True)
        key = self._add_issuer_key(now)
        if key is None:
            pending = self.keyring.pending(now)
            if pending is None:
                raise Conflict("another rotation is in progress; try again")
            key = pending
        return m.IssuerKeyInfo(kid=key.kid, alg=key.alg, created_at=key.created_at,
                               activate_at=key.activate_at, seq=key.seq)

    def jwks(self) -> dict[str, object]:
        """The JWKS document: every key that may verify a live token, ``seq``, and the
        ``issuer`` its tokens carry (an extra JWK Set member, RFC 7517 §5, that verifiers pin
        as the exact ``iss``)."""
        return {**self.keyring.jwks(self._now()), "issuer": self.issuer}

    def run_due(self) -> None:
        """Scheduled work: rotate the issuer key when its period is up, drop retired keys and
        expired feed entries, pull feed entries other nodes wrote. Safe on every node."""
        now = self._now()
        self.keyring = self._load_keyring()
        if self.keyring.rotation_due(now, self.settings.issuer_rotation_period):
            first = self.keyring.signer(now) is None
            if self._add_issuer_key(now, activate_now=first) is not None:
                self.audit.record(RequestContext(principal="system:scheduler",
                                                 request_id="scheduler"),
                                  "issuer.rotate", "ok", operation="rotate_issuer_key")
        self.store.delete_issuer_keys(retired_before=now)
        self.store.prune_revocations(now)
        self.revocations.prune(now)
        self.sync_revocations()

    # -- revocation feed ----------------------------------------------------------------------

    def sync_revocations(self) -> None:
        """Apply feed entries this process has not seen (written by another node). The
        cursor is this method's own: entries this process wrote itself advance the view's
        ``seq`` but not the cursor, so a lower-numbered entry from another node is not
        skipped."""
        with self._sync_lock:
            while True:
                entries = self.store.revocations_since(self._synced, limit=1000)
                if not entries:
                    return
                self.revocations.apply(entries)
                self._synced = entries[-1].seq

    @property
    def synced_seq(self) -> int:
        """How far this process has pulled the feed from the store."""
        return self._synced

    def revocation_feed(self, since: int, limit: int = 1000) -> m.RevocationFeed:
        """Entries after ``since`` (public, like a CRL: grant ids carry no secret)."""
        if not 1 <= limit <= 1000:
            raise InvalidRequest("limit must be 1..1000")
        # Read first: every entry numbered up to it was committed before the read below, so a
        # complete answer covers it even where the newest entries were pruned.
        covered = self.store.latest_revocation_seq()
        entries = self.store.revocations_since(since, limit=limit + 1)
        more = len(entries) > limit
        entries = entries[:limit]
        latest = self.store.latest_revocation_seq()
        last = entries[-1].seq if entries else 0
        next_since = last if more else max(since, covered, last)
        return m.RevocationFeed(
            entries=[m.RevocationEntryInfo(seq=e.seq, kind=e.kind, id=e.id,
                                           revoked_at=e.revoked_at, expires_at=e.expires_at,
                                           reason=e.reason) for e in entries],
            latest=latest, more=more, next_since=next_since)

    def _publish(self, entries: Sequence[RevocationEntry]) -> None:
        """Apply new feed entries here and push them to subscribers (``on_revocations``)."""
        self.revocations.apply(entries)
        if self.on_revocations is not None:
            self.on_revocations(entries)

    # -- presenting a grant ------------------------------------------------------------------

    def verify_presented(self, ctx: RequestContext, token: str, *, dpop: str | None = None,
                         method: str = "", url: str = "",
                         client_cert: bytes | None = None) -> GrantClaims:
        """Check a grant token presented by an authenticated caller: signature and header,
        claims, grantee, revocation, and its proof-of-possession binding.

        Raises:
            GrantDenied: a subclass with the precise code.
        """
        now = self._now()
        claims = self._decode(token, now)
        try:
            if not hmac.compare_digest(claims.grantee.encode(), ctx.principal.encode()):
                raise WrongGrantee()
            self.revocations.check(claims)
            if claims.cnf_jkt is not None:
                self.dpop.verify(dpop, method=method, url=url, access_token=token,
                                 expected_jkt=claims.cnf_jkt, holder=claims.grantee)
            elif claims.cnf_x5t is not None:
                if client_cert is None:
                    raise PopRequired("this grant is bound to a client certificate")
                if not hmac.compare_digest(b64url(hashlib.sha256(client_cert).digest()),
                                           claims.cnf_x5t):
                    raise PopInvalid("the client certificate is not the one the grant is bound to")
        except GrantDenied as exc:
            exc.grant_id = claims.grant_id  # the token is ours: its refusal names the grant
            raise
        return claims

    def _decode(self, token: str, now: int) -> GrantClaims:
        """Verify a token's signature and claims, or reuse an earlier verification of the very
        same token string while its window and its issuer key are still good (the signature
        check is most of a token's cost; the checks that can change are redone)."""
        keys = self.keyring.verification_keys(now)
        cached = self._verified.get(token)
        if cached is not None:
            leeway = self.settings.leeway
            if cached.kid in keys and cached.not_before - leeway <= now < cached.expires_at + leeway:
                return cached
            self._verified.pop(token, None)  # the loop and worker threads share the cache
        try:
            claims = decode_grant_token(token, keys, issuer=self.issuer, audience=self.audience,
                                        now=now, leeway=self.settings.leeway)
        except GrantUnknownKey:
            if not self._reload_for_unknown_kid():
                raise
            claims = decode_grant_token(token, self.keyring.verification_keys(now),
                                        issuer=self.issuer, audience=self.audience, now=now,
                                        leeway=self.settings.leeway)
        if len(self._verified) >= _VERIFIED_CACHE:
            with contextlib.suppress(StopIteration, RuntimeError):  # changed meanwhile
                self._verified.pop(next(iter(self._verified)), None)  # the oldest
        self._verified[token] = claims
        return claims

    def authorize_use(self, ctx: RequestContext, claims: GrantClaims, action: str,
                      key: Key | None, context: Mapping[str, str] | None) -> None:
        """Decide a request by its grant: the operation, the key, the encryption context.
        A limited grant's use is counted by :meth:`finish_use` once the operation has
        succeeded, so a refused or failed request counts nothing.

        Raises:
            GrantDenied: with the precise code.
        """
        if not claims.covers(action):
            raise OperationNotGranted(f"the grant does not allow {action}")
        if key is None or key.id != claims.key_id:
            raise KeyNotGranted()
        if action in CONTEXT_OPERATIONS:
            check_context(context, equals=claims.context_equals, subset=claims.context_subset)
        elif context and (claims.context_equals is not None or claims.context_subset is not None):
            raise ContextMismatch()
        ctx.attributes["policy"] = f"grant:{claims.grant_id}"

    def finish_use(self, ctx: RequestContext) -> None:
        """After a successful operation with a limited grant, count its one use (durably,
        atomically, after a durable ``grant.use requested`` event); before the result leaves.

        Raises:
            GrantDenied: when no use was left (the result is then discarded).
            AuditUnavailable: when the event could not be made durable.
        """
        claims = ctx.grant
        if claims is None or claims.max_uses is None or _USE_COUNTED in ctx.attributes:
            return
        self._consume(ctx, claims)
        ctx.attributes[_USE_COUNTED] = "counted"

    def _consume(self, ctx: RequestContext, claims: GrantClaims) -> None:
        self.audit.record(ctx, "grant.use", "requested", operation="use_grant",
                          key_id=claims.key_id, grant_id=claims.grant_id, wait=True)
        now = self._now()
        if self.store.consume_grant_use(claims.grant_id, now) is not None:
            return
        g = self.store.get_grant(claims.grant_id)
        if g is None or g.state == "revoked":
            raise GrantRevoked()
        state = g.effective_state(now)
        if state == "retired":
            raise GrantRetired()
        if state == "expired":
            raise GrantExpired()
        if state == "pending" or state == "rejected":
            raise GrantPending()
        raise GrantExhausted()

    # -- creating ----------------------------------------------------------------------------

    def _check_request(self, req: m.CreateGrantRequest, now: int) -> Grant:
        """Validate a create request into a provisional grant (key and issuer not set)."""
        s = self.settings
        ops = req.operations
        if not ops or len(ops) > len(GRANT_OPERATIONS) or len(set(ops)) != len(ops):
            raise InvalidRequest("operations must be a non-empty list without repeats")
        unknown = set(ops) - GRANT_OPERATIONS
        if unknown:
            raise InvalidRequest(f"unknown operations: {', '.join(sorted(unknown)[:5])}; known: "
                                 f"{', '.join(sorted(GRANT_OPERATIONS))}")
        if not isinstance(req.grantee, str) or not _PRINCIPAL_RE.fullmatch(req.grantee):
            raise InvalidRequest("grantee must be a principal id")
        ttl = s.default_ttl if req.ttl is None else req.ttl
        if not 1 <= ttl <= s.max_ttl:
            raise InvalidRequest(f"ttl must be 1..{s.max_ttl} seconds")
        not_before = now if req.not_before is None else _epoch(req.not_before, "not_before")
        # every token expires within max_ttl of its issue: issuer-key retirement and wholesale
        # revocation entries are timed on that
        if not now - s.leeway <= not_before or not_before + ttl > now + s.max_ttl:
            raise InvalidRequest("not_before must be from now, and not_before + ttl at most the "
                                 f"maximum TTL ({s.max_ttl} s) from now")
        if req.max_uses is not None and not 1 <= req.max_uses <= s.max_uses:
            raise InvalidRequest(f"max_uses must be 1..{s.max_uses}")
        audiences = tuple(dict.fromkeys(req.audiences))
        if len(audiences) > MAX_AUDIENCES or not all(_AUDIENCE_RE.fullmatch(a) for a in audiences):
            raise InvalidRequest(f"audiences: at most {MAX_AUDIENCES} printable strings of 1-256 "
                                 "characters")
        for name, value in (("dpop_jkt", req.dpop_jkt), ("x5t_s256", req.x5t_s256)):
            if value is not None and not _THUMBPRINT_RE.fullmatch(value):
                raise InvalidRequest(f"{name} must be a base64url SHA-256 thumbprint (43 characters)")
        if req.dpop_jkt is not None and req.x5t_s256 is not None:
            raise InvalidRequest("bind a grant to a DPoP key or a certificate, not both")
        equals = check_constraint_map(req.context_equals, "context_equals")
        subset = check_constraint_map(req.context_subset, "context_subset")
        if equals is not None and subset is not None and not subset.items() <= equals.items():
            # a context equal to one map holds every pair of the other only if they agree: a
            # grant no request could satisfy, with a live token, was made silently
            raise InvalidRequest("context_equals and context_subset contradict each other: the "
                                 "context must equal context_equals, so context_subset may only "
                                 "repeat pairs of it (give one of the two)")
        if (equals is not None or subset is not None) and not set(ops) <= (
                CONTEXT_OPERATIONS | {"describe", "create_grant"}):
            raise InvalidRequest("encryption context constraints apply only to grants whose "
                                 "operations take a context (encrypt, decrypt, re_encrypt, "
                                 "generate_data_key, and describe and create_grant)")
        if req.name is not None and not 1 <= len(req.name) <= MAX_NAME:
            raise InvalidRequest(f"name must be 1..{MAX_NAME} characters")
        if req.justification is not None and not 1 <= len(req.justification) <= MAX_JUSTIFICATION:
            raise InvalidRequest(f"justification must be 1..{MAX_JUSTIFICATION} characters")
        if req.retiring_principal is not None and not _PRINCIPAL_RE.fullmatch(req.retiring_principal):
            raise InvalidRequest("retiring_principal must be a principal id")
        return Grant(
            id=new_grant_id(), key_id="", grantee=req.grantee, operations=tuple(sorted(ops)),
            issuer="", created_at=now, not_before=not_before, expires_at=not_before + ttl,
            context_equals=equals, context_subset=subset, max_uses=req.max_uses,
            audiences=audiences, cnf_jkt=req.dpop_jkt, cnf_x5t=req.x5t_s256, name=req.name,
            retiring_principal=req.retiring_principal, justification=req.justification)

    def _key_for(self, ctx: RequestContext, ref: str, grant: Grant) -> tuple[Key, frozenset[str]]:
        """Resolve the key, deciding ``create_grant`` before revealing whether it exists."""
        try:
            key, aliases = self.kms.key_with_aliases(ref)
        except KeyNotFound:
            self._decide_create(ctx, _phantom(ref), frozenset(), grant)
            raise
        return key, aliases

    def _decide_create(self, ctx: RequestContext, key: Key, aliases: frozenset[str],
                       grant: Grant) -> bool:
        """Policy on ``create_grant``; returns whether approval is required."""
        if self.policy is None:
            if ctx.principal != ADMIN_PRINCIPAL:
                raise Forbidden()
            return False
        facts = GrantFacts(ttl=grant.expires_at - grant.not_before, uses=grant.max_uses or 0,
                           pop=grant.cnf_jkt is not None or grant.cnf_x5t is not None,
                           operations=frozenset(grant.operations),
                           audiences=frozenset(grant.audiences), grantee=grant.grantee)
        decision = self.policy.decide(ctx, "create_grant", key, aliases=aliases, grant=facts)
        return decision is not None and decision.requires_approval

    def _within_creator_rights(self, ctx: RequestContext, key: Key, aliases: frozenset[str],
                               grant: Grant) -> None:
        """The creator must be allowed every granted operation itself (on the constraint's
        context, for operations that take one)."""
        if self.policy is None or ctx.principal == ADMIN_PRINCIPAL:
            return
        context = grant.context_equals if grant.context_equals is not None else grant.context_subset
        saved = ctx.attributes.get("policy")
        for op in grant.operations:
            for action in sorted(OPERATION_ACTIONS[op]):
                self.policy.authorize(ctx, action, key, aliases=aliases,
                                      context=context if op in CONTEXT_OPERATIONS else None)
        if saved is not None:
            ctx.attributes["policy"] = saved

    @staticmethod
    def _check_key_allows(key: Key, grant: Grant) -> None:
        if key.state in ("pending_deletion", "destroyed"):
            raise InvalidRequest(f"key {key.name!r} is {key.state.replace('_', ' ')}")
        spec = SPECS[key.spec]
        allowed = spec.operations | ({"derive"} if key.derivable else set())
        bad = sorted(set(grant.operations) & CRYPTO_OPERATIONS - allowed)
        if bad:
            raise InvalidRequest(f"key {key.name!r} ({key.spec}) does not support "
                                 f"{', '.join(bad)}")

    def _check_principal(self, principal_id: str, what: str) -> None:
        if self.policy is not None:  # the directory mirrors the store in memory
            exists = self.policy.directory.principal(principal_id) is not None
        else:
            exists = self.store.get_principal(principal_id) is not None
        if not exists:
            raise PrincipalNotFound(f"{what} {principal_id!r} not found")

    def _prepare(self, ctx: RequestContext, req: m.CreateGrantRequest, now: int) -> Grant:
        """Everything a create decides before it writes: the request's limits, the key, the
        policy (or the parent grant), the principals. Reads only memory for a top-level grant."""
        parent = self._delegating_parent(ctx, req.key) if ctx.grant is not None else None
        if parent is not None and req.ttl is None:
            # the default lifetime fits in the parent's, as an exchange's does: a sub-grant of
            # a parent with less than the default left was refused for a TTL nobody asked for
            start = now if req.not_before is None else _epoch(req.not_before, "not_before")
            req = msgspec.structs.replace(req, ttl=max(1, min(self.settings.default_ttl,
                                                              parent.expires_at - start)))
        if parent is not None:
            _no_new_operations(req.operations, parent)
        grant = self._check_request(req, now)
        if parent is not None:
            key, aliases = self.kms.key_with_aliases(parent.key_id)
            pending = False
        else:
            key, aliases = self._key_for(ctx, req.key, grant)
            pending = self._decide_create(ctx, key, aliases, grant)
            self._within_creator_rights(ctx, key, aliases, grant)
        self._check_key_allows(key, grant)
        self._check_principal(grant.grantee, "grantee")
        if grant.retiring_principal is not None:
            self._check_principal(grant.retiring_principal, "retiring principal")
        grant = msgspec.structs.replace(
            grant, key_id=key.id, issuer=ctx.principal, state="pending" if pending else "active",
            requires_approval=pending, trace=ctx.trace_id if ctx.trace_id else None)
        if parent is not None:
            grant = msgspec.structs.replace(grant, parent_id=parent.id, depth=parent.depth + 1)
            self._check_child(grant, parent)
        return grant

    def create(self, ctx: RequestContext, req: m.CreateGrantRequest) -> m.GrantCreated:
        """Create a grant (or, when the caller presents a grant token, a sub-grant of it)."""
        now = self._now()
        try:
            grant = self._prepare(ctx, req, now)
        except KeygrantsError as exc:
            self._creation_refused(ctx, exc)
            raise
        return self._insert(ctx, grant, now)

    def _creation_refused(self, ctx: RequestContext, exc: KeygrantsError,
                          grant: Grant | None = None) -> None:
        if not isinstance(exc, AuditUnavailable):
            self.audit.record(ctx, "grant.create", "denied" if isinstance(exc, Forbidden)
                              else "error", operation="create_grant", reason=exc.code,
                              grant_id=grant.id if grant else None,
                              key_id=grant.key_id if grant else None)

    def _creation_event(self, ctx: RequestContext, grant: Grant) -> None:
        """The one event of a creation, recorded before the grant is stored (see
        docs/grants.md: a failed insert adds an ``error`` event for the same grant id)."""
        detail = {"grantee": grant.grantee, "state": grant.state,
                  "operations": ",".join(grant.operations), "expires_at": str(grant.expires_at)}
        if grant.max_uses is not None:
            detail["max_uses"] = str(grant.max_uses)
        if grant.parent_id is not None:
            detail["parent"] = grant.parent_id
        if grant.requires_approval:
            detail["severity"] = "high"
        self.audit.record(ctx, "grant.create", "ok", operation="create_grant",
                          key_id=grant.key_id, grant_id=grant.id, detail=detail)

    async def create_async(self, ctx: RequestContext, req: m.CreateGrantRequest) -> m.GrantCreated:
        """:meth:`create` for the event loop: the checks run inline (memory only), the audit
        intent joins the loop's group commit, the insert joins the store's, and the loop never
        blocks on either. Sub-grants (which read their parent from the store) run
        :meth:`create` in a worker thread."""
        if ctx.grant is not None:
            return await anyio.to_thread.run_sync(self.create, ctx, req)
        now = self._now()
        grant: Grant | None = None
        try:
            grant = self._prepare(ctx, req, now)
            # The audit event and the insert are made durable side by side (one fsync wait
            # instead of two in a row). The token is signed only once both are; if the event
            # fails, the row is deleted again, and a row whose creation event never became
            # durable (a crash in between) never gets a token (see token()).
            pending = ctx.pending_audit
            if pending is None:  # called outside the HTTP edge: the event joins a list here
                durable: list[Any] = []
                self._creation_event(dataclasses.replace(ctx, pending_audit=durable), grant)
            else:  # joins the edge's list (a copy of the context was 2% of the CPU)
                mark = len(pending)
                self._creation_event(ctx, grant)
                durable = pending[mark:]
            submitted = self.store.submit_create_grant(grant)
            stored = (submitted if isinstance(submitted, asyncio.Future)
                      else asyncio.wrap_future(submitted))
            try:
                for future in durable:
                    await (future if isinstance(future, asyncio.Future)
                           else asyncio.wrap_future(future))
            except BaseException:
                await asyncio.gather(stored, return_exceptions=True)
                await anyio.to_thread.run_sync(self._undo_insert, grant.id)
                raise
            try:
                await stored
            except AlreadyExists:
                raise Conflict("grant id collision; retry") from None
        except KeygrantsError as exc:
            self._creation_refused(ctx, exc, grant)
            raise
        token = self._sign(grant, now) if grant.state == "active" else None
        return m.GrantCreated(grant=grant_info(grant, now), token=token)

    def _reserve_uses(self, child: Grant, now: int) -> None:
        """A sub-grant of a limited grant takes its uses out of the parent's, atomically, so
        exchanges and delegations can never multiply them. (Uses reserved for a child whose
        insert then fails are lost: the safe direction.)"""
        if child.parent_id is None:
            return
        parent = self.store.get_grant(child.parent_id)
        if parent is None or parent.max_uses is None:
            return
        if child.max_uses is None:
            raise AttenuationViolated(_uses_advice(parent))
        if self.store.consume_grant_use(parent.id, now, child.max_uses) is None:
            raise AttenuationViolated(f"the parent grant has fewer than {child.max_uses} "
                                      "use(s) left: give fewer uses (--uses, max_uses)")

    def _undo_insert(self, grant_id: str) -> None:
        try:
            self.store.delete_grant(grant_id)
        except KeygrantsError:
            log.error("could not delete grant %s whose creation was not audited; it never "
                      "gets a token", grant_id)

    def _creation_audited(self, grant: Grant) -> bool:
        """Whether the grant's creation event is in the audit log (without an audit log:
        yes). Only a crash between the insert and the event can leave one out."""
        audit_log = self._audit_log
        if audit_log is None:
            return True
        events = audit_log.search(EventQuery(grant_id=grant.id, type="grant.create", limit=10))
        return any(decode_event(e).result == "ok" for e in events)

    def _delegating_parent(self, ctx: RequestContext, ref: str) -> Grant:
        claims: GrantClaims = ctx.grant
        if "create_grant" not in claims.operations:
            raise OperationNotGranted("the grant does not allow create_grant")
        parent = self.store.get_grant(claims.grant_id)
        if parent is None:
            raise GrantRevoked()
        if ref != parent.key_id:
            try:
                key, _ = self.kms.key_with_aliases(ref)
            except KeyNotFound:
                raise KeyNotGranted() from None  # a grant holder learns nothing of other keys
            if key.id != parent.key_id:
                raise KeyNotGranted()
        self._check_parent_live(parent)
        return parent

    def _check_parent_live(self, parent: Grant) -> None:
        state = parent.effective_state(self._now())
        if state == "rejected":
            raise GrantStateError("the grant was rejected")
        if state != "active":
            raise {"revoked": GrantRevoked, "retired": GrantRetired, "expired": GrantExpired,
                   "exhausted": GrantExhausted}.get(state, GrantPending)()

    def _check_child(self, child: Grant, parent: Grant) -> None:
        if child.depth > self.settings.max_depth:
            raise AttenuationViolated(f"delegation is limited to depth {self.settings.max_depth}")
        if child.requires_approval:
            raise AttenuationViolated("a sub-grant cannot need approval")
        if parent.max_uses is not None and (
                child.max_uses is None or child.max_uses > parent.max_uses - parent.uses):
            raise AttenuationViolated(_uses_advice(parent))  # what to give, not only "too many"
        check_attenuation(child, parent)

    def _insert(self, ctx: RequestContext, grant: Grant, now: int) -> m.GrantCreated:
        """Record the creation durably, reserve a sub-grant's uses from its parent, store the
        grant (fail-closed), then sign."""
        self._creation_event(dataclasses.replace(ctx, pending_audit=None), grant)
        try:
            self._reserve_uses(grant, now)
            self.store.create_grant(grant)
        except KeygrantsError as exc:
            self._creation_refused(ctx, exc, grant)
            if isinstance(exc, AlreadyExists):
                raise Conflict("grant id collision; retry") from None
            raise
        token = self._sign(grant, now) if grant.state == "active" else None
        return m.GrantCreated(grant=grant_info(grant, now), token=token)

    def _sign(self, grant: Grant, now: int) -> str:
        signer = self.keyring.signer(now)
        if signer is None:
            self.keyring = self._load_keyring()
            signer = self.keyring.signer(now)
            if signer is None:
                self._add_issuer_key(now, activate_now=True)
                signer = self.keyring.signer(now)
                assert signer is not None
        key, signing = signer
        # A revoke-all covers tokens issued up to its second; a grant made later in that same
        # second must not be caught by it, so its token is dated after the revocation.
        issued_at = max(now, self.revocations.wholesale_at(grant.grantee, grant.key_id) + 1)
        return encode_grant_token(grant, issuer=self.issuer,
                                  audiences=grant.audiences or (self.audience,),
                                  issued_at=issued_at, alg=key.alg, kid=key.kid, key=signing)

    @_audited("grant.exchange", "exchange_grant")
    def exchange(self, ctx: RequestContext, req: m.TokenExchangeRequest, *,
                 dpop: str | None = None, method: str = "", url: str = "",
                 client_cert: bytes | None = None) -> m.TokenExchangeResult:
        """RFC 8693-shaped: trade the caller's grant token for a narrower one (same grantee),
        e.g. per request or per tenant."""
        if req.grant_type != m.TOKEN_EXCHANGE_GRANT_TYPE:
            raise InvalidRequest(f"grant_type must be {m.TOKEN_EXCHANGE_GRANT_TYPE}")
        if (req.subject_token_type != m.GRANT_TOKEN_TYPE_URI
                or req.requested_token_type != m.GRANT_TOKEN_TYPE_URI):
            raise InvalidRequest(f"token types must be {m.GRANT_TOKEN_TYPE_URI}")
        try:
            claims = self.verify_presented(ctx, req.subject_token, dpop=dpop, method=method,
                                           url=url, client_cert=client_cert)
        except GrantDenied as exc:  # findable by the token's digest, as a refused use is
            exc.audit_detail = {"token": self.audit.digest(req.subject_token)}
            raise
        parent = self.store.get_grant(claims.grant_id)
        if parent is None:
            raise GrantRevoked()
        self._check_parent_live(parent)
        now = self._now()
        ops = req.scope.split() if req.scope is not None else [
            op for op in parent.operations if op != "create_grant"]
        remaining = parent.expires_at - now
        create = m.CreateGrantRequest(
            key=parent.key_id, grantee=ctx.principal, operations=ops,
            context_equals=req.context_equals if req.context_equals is not None
            else parent.context_equals,
            context_subset=req.context_subset if req.context_subset is not None
            else parent.context_subset,
            ttl=min(req.ttl, remaining) if req.ttl is not None else max(1, min(
                remaining, self.settings.default_ttl)),
            max_uses=req.max_uses if req.max_uses is not None else (
                None if parent.max_uses is None else max(1, parent.max_uses - parent.uses)),
            audiences=req.audience if req.audience is not None else list(parent.audiences),
            dpop_jkt=req.dpop_jkt if req.dpop_jkt is not None else parent.cnf_jkt,
            x5t_s256=None if req.dpop_jkt is not None else parent.cnf_x5t)
        if remaining <= 0:
            raise GrantExpired()
        _no_new_operations(ops, parent)
        child = self._check_request(create, now)
        child = msgspec.structs.replace(child, key_id=parent.key_id, issuer=ctx.principal,
                                        parent_id=parent.id, depth=parent.depth + 1,
                                        not_before=max(now, parent.not_before))
        child = msgspec.structs.replace(child, expires_at=min(child.expires_at, parent.expires_at))
        self._check_child(child, parent)
        created = self._insert(ctx, child, now)
        assert created.token is not None
        return m.TokenExchangeResult(
            access_token=created.token, issued_token_type=m.GRANT_TOKEN_TYPE_URI,
            token_type="N_A",  # noqa: S106 - RFC 8693: "not applicable", not a secret
            expires_in=child.expires_at - now, scope=" ".join(child.operations),
            grant_id=child.id)

    # -- reading -----------------------------------------------------------------------------

    def _get(self, ctx: RequestContext, grant_id: str) -> Grant:
        """The grant, or for one that does not exist: ``grant_not_found`` for the admin and
        ``Forbidden`` for everyone else, the answer for a grant that exists and is not theirs
        (deciding on a stand-in key told a caller allowed some keys but not others which ids
        exist on those others)."""
        g = self.store.get_grant(grant_id) if is_grant_id(grant_id) else None
        if g is None:
            if ctx.principal != ADMIN_PRINCIPAL:
                ctx.attributes["policy"] = "deny:unknown-grant"
                raise Forbidden()
            raise GrantNotFound()
        return g

    @staticmethod
    def _only(ctx: RequestContext, allowed: tuple[str | None, ...], who: str) -> None:
        """Allow only the named principals (the grant's own parties), recording why."""
        if ctx.principal in allowed:
            ctx.attributes["policy"] = f"grant-party:{who}"
            return
        ctx.attributes["policy"] = f"deny:not-{who}"
        raise Forbidden()

    def _may_see(self, ctx: RequestContext, g: Grant) -> None:
        if ctx.principal in (g.issuer, g.grantee, g.retiring_principal):
            ctx.attributes["policy"] = "grant-party"
            return
        self._authorize_on_key(ctx, "list_grants", g.key_id)

    def _authorize_on_key(self, ctx: RequestContext, action: str, key_id: str) -> None:
        if self.policy is None:
            if ctx.principal != ADMIN_PRINCIPAL:
                raise Forbidden()
            return
        try:
            key, aliases = self.kms.key_with_aliases(key_id)
        except KeyNotFound:
            key, aliases = _phantom(key_id), frozenset()
        self.policy.authorize(ctx, action, key, aliases=aliases)

    @_audited("grant.describe", "describe_grant")
    def describe(self, ctx: RequestContext, grant_id: str) -> m.GrantInfo:
        """A grant (its creator, grantee, retiring principal, or ``list_grants`` on its key)."""
        g = self._get(ctx, grant_id)
        self._may_see(ctx, g)
        return grant_info(g, self._now())

    @_audited("grant.list", "list_grants")
    def list_grants(self, ctx: RequestContext, *, key: str | None = None, grantee: str | None = None,
             retiring_principal: str | None = None, state: str | None = None,
             limit: int = 100, after: str | None = None) -> m.GrantList:
        """One page of grants. With ``key``: needs ``list_grants`` on it. Without: the
        caller's own (``grantee`` or ``retiring_principal`` must be the caller), or admin."""
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise InvalidRequest(f"limit must be 1..{MAX_LIST_LIMIT}")
        if state is not None and state not in ("active", "pending", "exhausted", "expired",
                                               "retired", "revoked", "rejected"):
            raise InvalidRequest("unknown state")
        key_id = None
        if key is not None:
            try:
                k, _ = self.kms.key_with_aliases(key)
            except KeyNotFound:
                self._authorize_on_key(ctx, "list_grants", key)
                raise
            key_id = k.id
            self._authorize_on_key(ctx, "list_grants", k.id)
        elif ctx.principal != ADMIN_PRINCIPAL and ctx.principal not in (grantee, retiring_principal):
            raise Forbidden()
        now = self._now()
        grants = self.store.list_grants(now=now, limit=limit + 1, after=after, key_id=key_id,
                                        grantee=grantee, retiring_principal=retiring_principal,
                                        state=state)
        more = len(grants) > limit
        grants = grants[:limit]
        return m.GrantList(grants=[grant_info(g, now) for g in grants],
                           next=grants[-1].id if more and grants else None)

    @_audited("grant.token", "issue_grant_token")
    def token(self, ctx: RequestContext, grant_id: str) -> m.GrantCreated:
        """A fresh token for an active grant, for its grantee or creator (after approval, or
        when the first token was lost). Same grant, same window, same uses."""
        g = self._get(ctx, grant_id)
        self._only(ctx, (g.grantee, g.issuer), "grantee-or-creator")
        if not self._creation_audited(g):
            raise GrantRevoked("this grant's creation was never audited; it is not usable")
        now = self._now()
        state = g.effective_state(now)
        if state != "active":
            self._check_parent_live(g)
        if g.created_at <= self.revocations.wholesale_at(g.grantee, g.key_id):
            # a revoke-all covers this grant and has not ended it yet (it is still running,
            # or failed part way): a token minted now would be dated after it. A grant of the
            # revocation's own second may have been made before it: refused too.
            raise GrantRevoked()
        return m.GrantCreated(grant=grant_info(g, now), token=self._sign(g, now))

    # -- ending ------------------------------------------------------------------------------

    def _descendants(self, grant_ids: Sequence[str], now: int) -> list[str]:
        out: list[str] = []
        frontier = list(grant_ids)
        for _ in range(self.settings.max_depth + 1):
            if not frontier:
                break
            # one query per level, not per grant; grants past their expiry but within the
            # leeway are still accepted: revoked too
            frontier = self.store.live_grant_ids(now=now - self.settings.leeway,
                                                 parent_ids=frontier)
            out.extend(frontier)
        return out

    def _end(self, ctx: RequestContext, g: Grant, state: str, reason: str, event: str) -> m.GrantInfo:
        now = self._now()
        if g.state not in ("active", "pending"):
            raise GrantStateError(f"the grant is already {g.state}")
        if now >= g.expires_at + MAX_LEEWAY:
            # No token of it, nor of a sub-grant (none outlives it), is accepted anywhere any
            # more, whatever leeway a verifier gives (at most MAX_LEEWAY): it ended by itself.
            # Before that a verifier with a longer leeway than ours may still accept it, so it
            # can be revoked. (One out of uses is ended on purpose: its sub-grants, which took
            # those uses, may still be live.)
            raise GrantStateError("the grant has already expired")
        self.audit.record(ctx, event, "requested", operation=event.split(".")[1] + "_grant",
                          key_id=g.key_id, grant_id=g.id, wait=True)
        expiry = g.expires_at + self.settings.leeway
        ended = msgspec.structs.replace(g, state=state, ended_at=now, ended_by=ctx.principal)
        feed = [RevocationEntry(kind="grant", id=g.id, revoked_at=now, expires_at=expiry,
                                reason=reason)]
        try:
            entries = self.store.update_grant(ended, expected_state=g.state, feed=feed)
        except Conflict:
            raise GrantStateError("the grant changed meanwhile; read it again") from None
        children = self._descendants([g.id], now)
        if children:
            entries += self.store.end_grants(children, state="revoked", now=now, by=ctx.principal,
                                             feed=(), entry_leeway=self.settings.leeway)
        self._publish(entries)
        return grant_info(ended, now)

    @_audited("grant.retire", "retire_grant")
    def retire(self, ctx: RequestContext, grant_id: str) -> m.GrantInfo:
        """End a grant by its grantee or retiring principal (its sub-grants are revoked)."""
        g = self._get(ctx, grant_id)
        self._only(ctx, (g.grantee, g.retiring_principal), "grantee-or-retiring-principal")
        return self._end(ctx, g, "retired", "retired", "grant.retire")

    @_audited("grant.revoke", "revoke_grant")
    def revoke(self, ctx: RequestContext, grant_id: str) -> m.GrantInfo:
        """Revoke a grant and its sub-grants (``revoke_grant`` on the key; or the creator of a
        delegated grant)."""
        g = self._get(ctx, grant_id)
        if not (g.parent_id is not None and ctx.principal == g.issuer):
            self._authorize_on_key(ctx, "revoke_grant", g.key_id)
        return self._end(ctx, g, "revoked", "revoked", "grant.revoke")

    @_audited("grant.revoke_all", "revoke_all_grants")
    def revoke_all(self, ctx: RequestContext, req: m.RevokeAllRequest) -> m.RevokeAllResult:
        """Incident response: revoke every grant of a principal, or of a key, issued up to
        now, with one feed entry that covers them all (and per-grant entries for their
        sub-grants held by others)."""
        if (req.principal is None) == (req.key is None):
            raise InvalidRequest("give exactly one of principal or key")
        now = self._now()
        kind: str
        if req.principal is not None:
            kind, subject = "principal", req.principal
            if self.policy is not None:
                target = self.store.get_principal(subject) if _PRINCIPAL_RE.fullmatch(subject) else None
                # authorize before revealing: a missing principal is decided as a provisional
                # one with that id and no tags
                self.policy.authorize(ctx, "revoke_grants", None, target=target or Principal(
                    id=subject, display_name="", tags=(), enabled=True, builtin=False,
                    created_at=0, updated_at=0))
                if target is None:
                    raise PrincipalNotFound()
            elif ctx.principal != ADMIN_PRINCIPAL:
                raise Forbidden()
        else:
            assert req.key is not None
            try:
                key, _ = self.kms.key_with_aliases(req.key)
            except KeyNotFound:
                self._authorize_on_key(ctx, "revoke_grant", req.key)
                raise
            kind, subject = "key", key.id
            self._authorize_on_key(ctx, "revoke_grant", key.id)
        return self._revoke_all(ctx, kind, subject, now)

    def principal_deleted(self, ctx: RequestContext, principal_id: str) -> None:
        """A principal is being deleted (its deletion was authorized): revoke every grant it
        holds, with their sub-grants, and every token issued to it up to now. Otherwise a
        principal created later with the same id would hold them."""
        self._revoke_all(ctx, "principal", principal_id, self._now())

    def _revoke_all(self, ctx: RequestContext, kind: str, subject: str,
                    now: int) -> m.RevokeAllResult:
        """Revoke every grant of a principal or a key issued up to ``now``, and their
        sub-grants, in this order so that the revocation takes effect at once however many
        grants there are:

        1. one wholesale feed entry, committed and pushed on its own: every token issued up to
           now is refused from here on, by this server and by every verifier;
        2. the grants (listed now, so a grant created meanwhile is included), then their
           sub-grants, ended in batches of :data:`_END_BATCH`, each batch with one entry per
           grant, kept until that grant's own expiry: a token minted later in this second
           carries a later issue time (see :meth:`_sign`) and is refused by its grant's entry.

        A failure in step 2 leaves the wholesale entry and the batches done; a retry ends the
        grants still live (no grant created before the revocation can mint a token meanwhile:
        see :meth:`token`).
        """
        self.audit.record(ctx, "grant.revoke_all", "requested", operation="revoke_all_grants",
                          key_id=subject if kind == "key" else None, detail={kind: subject},
                          wait=True)
        wholesale = RevocationEntry(kind=kind, id=subject, revoked_at=now,  # type: ignore[arg-type]
                                    expires_at=now + self.settings.max_ttl + self.settings.leeway)
        first = self.store.end_grants((), state="revoked", now=now, by=ctx.principal,
                                      feed=[wholesale])
        self._publish(first)
        live = now - self.settings.leeway
        ids = (self.store.live_grant_ids(now=live, grantee=subject) if kind == "principal"
               else self.store.live_grant_ids(now=live, key_id=subject))
        seen = set(ids)
        ending = [*ids, *(c for c in self._descendants(ids, now) if c not in seen)]
        revoked = 0
        for start in range(0, len(ending), _END_BATCH):
            entries = self.store.end_grants(ending[start:start + _END_BATCH], state="revoked",
                                            now=now, by=ctx.principal, feed=(),
                                            entry_leeway=self.settings.leeway)
            revoked += len(entries)
            self._publish(entries)
        return m.RevokeAllResult(revoked=revoked, seq=first[0].seq)

    # -- break-glass -------------------------------------------------------------------------

    def _decide_pending(self, ctx: RequestContext, grant_id: str, note: str | None) -> Grant:
        if note is not None and not 1 <= len(note) <= MAX_JUSTIFICATION:
            raise InvalidRequest(f"note must be 1..{MAX_JUSTIFICATION} characters")
        g = self._get(ctx, grant_id)
        if ctx.principal in (g.issuer, g.grantee):
            ctx.attributes["policy"] = "deny:two-person-rule"
            raise SelfApproval()
        self._authorize_on_key(ctx, "approve_grant", g.key_id)
        state = g.effective_state(self._now())
        if state != "pending":
            raise GrantStateError(f"the grant is {state}, not pending"
                                  + (" (a request expires at the end of its requested window)"
                                     if state == "expired" else ""))
        return g

    @_audited("grant.approve", "approve_grant")
    def approve(self, ctx: RequestContext, grant_id: str, note: str | None = None) -> m.GrantInfo:
        """Approve a pending (break-glass) grant: it becomes active from now, for at most the
        break-glass TTL. The grantee then fetches its token."""
        g = self._decide_pending(ctx, grant_id, note)
        now = self._now()
        ttl = min(g.expires_at - g.not_before, self.settings.break_glass_ttl)
        approved = msgspec.structs.replace(g, state="active", not_before=now, expires_at=now + ttl,
                                           decided_by=ctx.principal, decided_at=now)
        self.audit.record(ctx, "grant.approve", "requested", operation="approve_grant",
                          key_id=g.key_id, grant_id=g.id, wait=True,
                          detail={"severity": "high", **({"note": note} if note else {})})
        try:
            self.store.update_grant(approved, expected_state="pending")
        except Conflict:
            raise GrantStateError("the grant changed meanwhile") from None
        return grant_info(approved, now)

    @_audited("grant.reject", "reject_grant")
    def reject(self, ctx: RequestContext, grant_id: str, note: str | None = None) -> m.GrantInfo:
        """Reject a pending grant (it never becomes usable)."""
        g = self._decide_pending(ctx, grant_id, note)
        now = self._now()
        rejected = msgspec.structs.replace(g, state="rejected", decided_by=ctx.principal,
                                           decided_at=now)
        self.audit.record(ctx, "grant.reject", "requested", operation="reject_grant",
                          key_id=g.key_id, grant_id=g.id, wait=True,
                          detail={"note": note} if note else None)
        try:
            self.store.update_grant(rejected, expected_state="pending")
        except Conflict:
            raise GrantStateError("the grant changed meanwhile") from None
        return grant_info(rejected, now)


class GrantAuthorizer:
    """The KMS's authorizer: a request carrying a verified grant is decided by
    :meth:`GrantService.authorize_use`; any other by the wrapped authorizer."""

    def __init__(self, inner: Authorizer, grants: GrantService) -> None:
        self.inner = inner
        self.grants = grants

    def authorize(self, ctx: RequestContext, action: str, key: Key | None, *,
                  aliases: frozenset[str] = frozenset(),
                  context: Mapping[str, str] | None = None) -> None:
        claims = ctx.grant
        if claims is None:
            self.inner.authorize(ctx, action, key, aliases=aliases, context=context)
            return
        self.grants.authorize_use(ctx, claims, action, key, context)

    def finish_use(self, ctx: RequestContext) -> None:
        """Called by the KMS after an operation succeeded: count a limited grant's use."""
        self.grants.finish_use(ctx)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
