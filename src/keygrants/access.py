"""Access use cases: principals, their credentials, policies, and the policy authorizer.

:class:`AccessService` manages principals and credentials (writes are durable before the
in-memory :class:`~keygrants.auth.directory.Directory` is updated, so a revocation takes
effect on the next request) and named Cedar policies (validated on write; a refused policy
leaves the old set in force). :class:`PolicyAuthorizer` is the KMS's policy decision point:
deny by default, the built-in ``admin`` principal exempt (no policy can lock it out), every
decision handed to the audit trail with the statements that made it.
"""

from __future__ import annotations

import contextlib
import functools
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, TypeVar

import msgspec

from keygrants import models as m
from keygrants.audit.events import MAX_DETAIL_VALUE
from keygrants.audit.recorder import AuditRecorder, NoAudit
from keygrants.auth import ADMIN_PRINCIPAL, ADMIN_TOKEN_META, RequestContext
from keygrants.auth.authenticator import KEYID_SEPARATOR, Authenticator, AuthSettings
from keygrants.auth.credentials import (
    api_key_digest,
    certificate_der_from_pem,
    certificate_fingerprint,
    generate_api_key,
    generate_shared_secret,
    jwk_thumbprint,
    load_public_key,
    normalize_match,
    parse_shared_secret,
)
from keygrants.auth.directory import Directory
from keygrants.auth.model import PRINCIPAL_NAME_PATTERN, Credential, Policy, Principal
from keygrants.crypto import Aead, random_bytes
from keygrants.errors import (
    AlreadyExists,
    Conflict,
    CredentialNotFound,
    Forbidden,
    InvalidRequest,
    KeygrantsError,
    PolicyNotFound,
    PrincipalNotFound,
)
from keygrants.keys.context import canonical_context
from keygrants.keys.model import Key
from keygrants.keys.sealing import seal_named_secret, unseal_named_secret
from keygrants.keys.tags import check_tags
from keygrants.policy import (
    ACTIONS,
    Decision,
    GrantFacts,
    KeyFacts,
    PolicyEngine,
    PrincipalFacts,
    RequestFacts,
)
from keygrants.store.base import Store

__all__ = ["Access", "AccessService", "PolicyAuthorizer", "open_access", "reload_access"]

API_KEY_HMAC_META: Final = "api_key_hmac_key"
_PRINCIPAL_RE: Final = re.compile(PRINCIPAL_NAME_PATTERN)
MAX_LABEL: Final = 128
MAX_DISPLAY_NAME: Final = 256
MAX_CREDENTIALS: Final = 20
MAX_LIST_LIMIT: Final = 1000
MAX_POLICY_DESCRIPTION: Final = 1024
_FACTS_CACHE: Final = 4096
_DECISION_CACHE: Final = 8192
_WRITE_ATTEMPTS: Final = 2  # the first, and one retry after a change made on another node
_MAX_CREDENTIAL_LIFETIME: Final = 10 * 366 * 86400

F = TypeVar("F", bound=Callable[..., Any])


def _dt(ts: int | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC)


def _event_text(text: str) -> str:
    """``text`` as an audit detail value: at most ``MAX_DETAIL_VALUE`` characters, marked
    when cut."""
    if len(text) <= MAX_DETAIL_VALUE:
        return text
    return text[:MAX_DETAIL_VALUE - 20] + f"...({len(text)} chars)"


def _audited(event_type: str, operation: str) -> Callable[[F], F]:
    """Record each access use case's outcome (``ok``, ``denied`` or ``error``)."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(self: AccessService, ctx: RequestContext, *args: Any, **kwargs: Any) -> Any:
            target = str(args[0]) if args and isinstance(args[0], str) else None
            # a caller's id of any length is recorded, shortened to what an event holds (an
            # over-long one made the event invalid: 503 audit_unavailable, and no trace)
            detail = {"target": _event_text(target)} if target else None
            try:
                result = fn(self, ctx, *args, **kwargs)
            except KeygrantsError as exc:
                self.audit.record(ctx, event_type, "denied" if isinstance(exc, Forbidden)
                                  else "error", operation=operation, reason=exc.code, detail=detail)
                raise
            self.audit.record(ctx, event_type, "ok", operation=operation, detail=detail)
            return result
        return wrapper  # type: ignore[return-value]
    return decorate


class PolicyAuthorizer:
    """The KMS's policy decision point over a swappable :class:`PolicyEngine`.

    Facts about principals and keys are built once per record version and cached (the
    directory's, the store's and the key's records are immutable, so identity tells when they
    change). The principal-administration actions are decided on their target principal.
    """

    def __init__(self, directory: Directory, engine: PolicyEngine,
                 clock: Callable[[], float] = time.time) -> None:
        self.directory = directory
        self.engine = engine
        self._clock = clock
        self._principal_facts: dict[str, tuple[Principal, PrincipalFacts]] = {}
        self._key_facts: dict[str, tuple[Key, frozenset[str], KeyFacts]] = {}
        self._target_facts: dict[str, tuple[Principal, PrincipalFacts]] = {}
        self._memo: tuple[PolicyEngine | None, int, dict[tuple[Any, ...], Decision]] = (
            None, 0, {})
        self.decisions = {"allow": 0, "deny": 0}

    def _principal(self, principal_id: str) -> PrincipalFacts | None:
        record = self.directory.principal(principal_id)
        if record is None:
            return None
        cached = self._principal_facts.get(principal_id)
        if cached is not None and cached[0] is record:
            return cached[1]
        facts = PrincipalFacts(id=record.id, tags=frozenset(record.tags))
        if len(self._principal_facts) >= _FACTS_CACHE:
            self._principal_facts.clear()
        self._principal_facts[principal_id] = (record, facts)
        return facts

    def _key(self, key: Key, aliases: frozenset[str]) -> KeyFacts:
        cached = self._key_facts.get(key.id) if key.id else None
        if cached is not None and cached[0] is key and cached[1] == aliases:
            return cached[2]
        facts = KeyFacts(id=key.id, name=key.name, aliases=aliases, spec=key.spec,
                         purpose=key.purpose, state=key.state, tags=frozenset(key.tags))
        if key.id:
            if len(self._key_facts) >= _FACTS_CACHE:
                self._key_facts.clear()
            self._key_facts[key.id] = (key, aliases, facts)
        return facts

    def _target(self, target: Principal) -> PrincipalFacts:
        cached = self._target_facts.get(target.id)
        if cached is not None and cached[0] is target:
            return cached[1]
        facts = PrincipalFacts(id=target.id, tags=frozenset(target.tags))
        if len(self._target_facts) >= _FACTS_CACHE:
            self._target_facts.clear()
        self._target_facts[target.id] = (target, facts)
        return facts

    def authorize(self, ctx: RequestContext, action: str, key: Key | None, *,
                  aliases: frozenset[str] = frozenset(),
                  context: Mapping[str, str] | None = None,
                  grant: GrantFacts | None = None,
                  target: Principal | None = None) -> None:
        """Allow or raise :class:`Forbidden`; the deciding statements go into the request's
        audit attributes (``policy``).

        ``key`` is the resource of a key-scoped action, ``target`` that of a principal-scoped
        one (the principal acted on; for ``create_principal`` a provisional record with the
        requested id and tags).

        Raises:
            Forbidden: when the policies do not allow it.
            ValueError: when the resource the action needs is missing.
        """
        self.decide(ctx, action, key, aliases=aliases, context=context, grant=grant,
                    target=target)

    def decide(self, ctx: RequestContext, action: str, key: Key | None, *,
               aliases: frozenset[str] = frozenset(),
               context: Mapping[str, str] | None = None,
               grant: GrantFacts | None = None,
               target: Principal | None = None) -> Decision | None:
        """:meth:`authorize`, returning the allowing decision (``None`` for the built-in
        admin, which no policy decides), e.g. to read :attr:`Decision.requires_approval`."""
        if ctx.principal == ADMIN_PRINCIPAL:
            ctx.attributes["policy"] = "builtin:admin"
            return None
        principal = self._principal(ctx.principal) if ctx.principal else None
        if principal is None:
            self.decisions["deny"] += 1
            ctx.attributes["policy"] = "deny:unknown-principal"
            raise Forbidden()
        resource: KeyFacts | PrincipalFacts | None = None
        kind = ACTIONS.get(action)
        if kind == "key":
            if key is None:
                raise ValueError(f"action {action!r} needs a key")
            resource = self._key(key, aliases)
        elif kind == "principal":
            if target is None:
                raise ValueError(f"action {action!r} needs a target principal")
            resource = self._target(target)
            if resource.id == principal.id:
                if resource != principal:
                    # The caller as it is and as it would be (its own tags changed) share one
                    # Cedar uid, which is one entity: no request can ask that question.
                    self.decisions["deny"] += 1
                    ctx.attributes["policy"] = "deny:self-as-other-facts"
                    raise Forbidden()
                resource = principal
        decision = self._decide(principal, action, resource, ctx.auth_method or "signature",
                                context, grant)
        if decision.allowed:
            self.decisions["allow"] += 1
            ctx.attributes["policy"] = ",".join(decision.reasons)[:500]
            return decision
        self.decisions["deny"] += 1
        ctx.attributes["policy"] = ("deny:" + ",".join(decision.reasons))[:500] \
            if decision.reasons else "deny:default"
        raise Forbidden()


    def _decide(self, principal: PrincipalFacts, action: str,
                resource: KeyFacts | PrincipalFacts | None,
                source: str, context: Mapping[str, str] | None,
                grant: GrantFacts | None) -> Decision:
        """The engine's decision, memoized for the current second: every input of a decision
        is in the cache key, including the time (policies see it in whole seconds), so a hit
        is the same decision the engine would make now. The memo is one ``(engine, second,
        decisions)`` tuple, read once per call, so a decision made by an engine that has just
        been replaced can never land in the new engine's memo."""
        engine = self.engine
        now = int(self._clock())
        memo = self._memo
        if memo[0] is not engine or memo[1] != now:
            memo = self._memo = (engine, now, {})  # another policy set, or another second
        decisions = memo[2]
        key = (principal, action, resource, source, grant,
               None if context is None else tuple(sorted(context.items())))
        decision = decisions.get(key)
        if decision is None:
            decision = engine.decide(principal, action, resource,
                                     RequestFacts(source=source, now=now,
                                                  encryption_context=context, grant=grant))
            if len(decisions) < _DECISION_CACHE:  # beyond: a flood of distinct requests
                decisions[key] = decision
        return decision


class AccessService:
    """Principals, credentials and policies (synchronous; writes run in a worker thread)."""

    def __init__(self, store: Store, directory: Directory, authorizer: PolicyAuthorizer, *,
                 api_key_hmac_key: bytes, audit: AuditRecorder | None = None,
                 clock: Callable[[], float] = time.time, sealer: Aead | None = None) -> None:
        self.store = store
        self._sealer = sealer
        self.directory = directory
        self.authorizer = authorizer
        self.audit: AuditRecorder = audit or NoAudit()
        self._hmac_key = api_key_hmac_key
        self._clock = clock
        self._lock = threading.RLock()
        # called with (ctx, principal id) once a deletion is authorized, before the principal
        # goes: the grant service revokes its grants there (wired by create_app)
        self.on_delete: list[Callable[[RequestContext, str], None]] = []

    def _now(self) -> int:
        return int(self._clock())

    def _allow(self, ctx: RequestContext, action: str) -> None:
        self.authorizer.authorize(ctx, action, None)

    def _allow_on(self, ctx: RequestContext, action: str, principal_id: str) -> Principal:
        """Authorize ``action`` on principal ``principal_id`` and return its record.

        Authorize before revealing: a principal that does not exist is decided as a
        provisional one with that id and no tags, so a caller who could not act on it gets
        ``Forbidden`` either way and only one who could learns it is missing.

        Raises:
            Forbidden: when the policies do not allow the action on that principal.
            PrincipalNotFound: when it does not exist (and the caller may act on it).
        """
        p = self._stored(principal_id)
        if p is None:
            if isinstance(principal_id, str) and principal_id:
                self.authorizer.authorize(ctx, action, None,
                                          target=_provisional(principal_id, ()))
            raise PrincipalNotFound(f"principal {principal_id!r} not found")
        self.authorizer.authorize(ctx, action, None, target=p)
        return p

    def _allow_current(self, ctx: RequestContext, action: str, principal_id: str) -> Principal:
        """Under the lock: the principal as it is now, authorized again (it may have been
        re-tagged since :meth:`_allow_on`; a decision on unchanged facts is memoized)."""
        current = self._get(principal_id)
        self.authorizer.authorize(ctx, action, None, target=current)
        return current

    def _intent(self, ctx: RequestContext, event_type: str, operation: str, **detail: str) -> None:
        self.audit.record(ctx, event_type, "requested", operation=operation,
                          detail=detail or None, wait=True)

    # -- views -------------------------------------------------------------------------------

    def _credential_info(self, c: Credential) -> m.CredentialInfo:
        now = self._now()
        state = ("revoked" if c.revoked_at is not None
                 else "expired" if c.expires_at is not None and c.expires_at <= now
                 else "pending" if c.not_before > now else "active")
        jwk = None
        if c.kind == "public_key":
            jwk = self.directory.verifying_key(c).jwk(kid=c.id)
        return m.CredentialInfo(
            id=c.id, principal=c.principal_id, kind=c.kind, label=c.label,
            not_before=_dt(c.not_before), created_at=_dt(c.created_at),  # type: ignore[arg-type]
            expires_at=_dt(c.expires_at), last_used_at=_dt(c.last_used_at),
            revoked_at=_dt(c.revoked_at), algorithm=c.algorithm, public_key_jwk=jwk,
            keyid=(f"{c.principal_id}{KEYID_SEPARATOR}{c.id}"
                   if c.kind in ("public_key", "shared_secret") else None),
            match=c.match, state=state)

    def _principal_info(self, p: Principal, *, with_credentials: bool = False) -> m.PrincipalInfo:
        creds = None
        if with_credentials:
            creds = [self._credential_info(c) for c in self.store.list_credentials(p.id)]
        current = self.directory.principal(p.id) or p
        return m.PrincipalInfo(
            id=p.id, display_name=p.display_name, tags=list(p.tags), enabled=p.enabled,
            builtin=p.builtin, created_at=_dt(p.created_at),  # type: ignore[arg-type]
            updated_at=_dt(p.updated_at),  # type: ignore[arg-type]
            last_seen_at=_dt(current.last_seen_at), credentials=creds)

    def _stored(self, principal_id: object) -> Principal | None:
        """The stored principal, ``None`` for an id no principal can have (not a string, or
        with a NUL, which PostgreSQL text cannot hold)."""
        if not isinstance(principal_id, str) or "\x00" in principal_id:
            return None
        return self.store.get_principal(principal_id)

    def _get(self, principal_id: str) -> Principal:
        p = self._stored(principal_id)
        if p is None:
            raise PrincipalNotFound(f"principal {principal_id!r} not found")
        return p

    # -- principals --------------------------------------------------------------------------

    @staticmethod
    def _check_display_name(name: str) -> None:
        if len(name) > MAX_DISPLAY_NAME or any(ord(c) < 0x20 for c in name):
            raise InvalidRequest(f"display_name must be at most {MAX_DISPLAY_NAME} printable "
                                 "characters")

    @_audited("principal.create", "create_principal")
    def create_principal(self, ctx: RequestContext, req: m.CreatePrincipalRequest) -> m.PrincipalInfo:
        """Create a principal (no credentials yet).

        Raises:
            InvalidRequest: for a bad id, display name or tags.
            AlreadyExists: if the id is taken.
        """
        # the id and tags are the resource the policies see: check their form first
        if not isinstance(req.id, str) or not _PRINCIPAL_RE.fullmatch(req.id):
            raise InvalidRequest("principal id must be 1-128 characters of letters, digits and "
                                 "'._@-', starting with a letter or digit")
        tags = check_tags(req.tags)
        self.authorizer.authorize(ctx, "create_principal", None,
                                  target=_provisional(req.id, tags))
        if req.id.startswith("system"):
            raise InvalidRequest("principal ids starting with 'system' are reserved")
        self._check_display_name(req.display_name)
        now = self._now()
        p = Principal(id=req.id, display_name=req.display_name, tags=tags,
                      created_at=now, updated_at=now)
        with self._lock:
            if self.store.get_principal(p.id) is not None:
                raise AlreadyExists(f"principal {p.id!r} already exists")
            self._intent(ctx, "principal.create", "create_principal", target=p.id)
            self.store.create_principal(p)
            self.directory.put_principal(p)
        return self._principal_info(p)

    @_audited("principal.list", "list_principals")
    def list_principals(self, ctx: RequestContext, *, limit: int = 100,
                        after: str | None = None) -> m.PrincipalList:
        """One page of principals ordered by id."""
        self._allow(ctx, "list_principals")
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise InvalidRequest(f"limit must be 1..{MAX_LIST_LIMIT}")
        page = self.store.list_principals(limit=limit + 1, after=after)
        more = len(page) > limit
        page = page[:limit]
        return m.PrincipalList(principals=[self._principal_info(p) for p in page],
                               next=page[-1].id if more and page else None)

    @_audited("principal.describe", "describe_principal")
    def describe_principal(self, ctx: RequestContext, principal_id: str) -> m.PrincipalInfo:
        """A principal with its credentials."""
        return self._principal_info(self._allow_on(ctx, "describe_principal", principal_id),
                                    with_credentials=True)

    def _change(self, ctx: RequestContext, principal_id: str, event_type: str, operation: str,
                change: Callable[[Principal], Principal]) -> m.PrincipalInfo:
        # The lock serialises this process only: the store's compare-and-set catches a change
        # made by another node since the read, and then the change is made again, once, on
        # the principal as it is now (a rename never re-enables a principal disabled there).
        with self._lock:
            for attempt in range(1, _WRITE_ATTEMPTS + 1):
                current = self._allow_current(ctx, operation, principal_id)
                self._only_admin_changes_admin(ctx, current)
                updated = change(current)
                if updated == current:
                    return self._principal_info(current)
                if set(updated.tags) != set(current.tags):
                    self._allow_retag(ctx, operation, updated)
                updated = msgspec.structs.replace(updated, updated_at=max(self._now(),
                                                                          current.updated_at))
                self._intent(ctx, event_type, operation, target=principal_id)
                try:
                    self.store.update_principal(updated, expected=current)
                    break
                except Conflict:
                    if attempt == _WRITE_ATTEMPTS:
                        raise Conflict(f"principal {principal_id!r} is being changed "
                                       "concurrently; try again") from None
            self.directory.put_principal(updated)
        return self._principal_info(updated)

    @_audited("principal.update", "update_principal")
    def update_principal(self, ctx: RequestContext, principal_id: str,
                         req: m.UpdatePrincipalRequest) -> m.PrincipalInfo:
        """Change display name or tags."""
        self._allow_on(ctx, "update_principal", principal_id)
        if req.display_name is not None:
            self._check_display_name(req.display_name)
        tags = None if req.tags is None else check_tags(req.tags)

        def change(p: Principal) -> Principal:
            changes: dict[str, object] = {}
            if req.display_name is not None:
                changes["display_name"] = req.display_name
            if tags is not None:
                changes["tags"] = tags
            return msgspec.structs.replace(p, **changes) if changes else p
        return self._change(ctx, principal_id, "principal.update", "update_principal", change)

    @_audited("principal.disable", "update_principal")
    def disable_principal(self, ctx: RequestContext, principal_id: str) -> m.PrincipalInfo:
        """Refuse every credential of the principal from the next request on.

        Raises:
            Forbidden: for the built-in admin (lockout-free design).
        """
        self._allow_on(ctx, "update_principal", principal_id)

        def change(p: Principal) -> Principal:
            if p.builtin:
                raise Forbidden("the built-in admin principal cannot be disabled")
            return msgspec.structs.replace(p, enabled=False)
        return self._change(ctx, principal_id, "principal.disable", "update_principal", change)

    @_audited("principal.enable", "update_principal")
    def enable_principal(self, ctx: RequestContext, principal_id: str) -> m.PrincipalInfo:
        """Accept the principal's credentials again."""
        self._allow_on(ctx, "update_principal", principal_id)
        return self._change(ctx, principal_id, "principal.enable", "update_principal",
                            lambda p: msgspec.structs.replace(p, enabled=True))

    @_audited("principal.delete", "delete_principal")
    def delete_principal(self, ctx: RequestContext, principal_id: str) -> None:
        """Delete a principal and every credential it has; its grants are revoked first (see
        :attr:`on_delete`), so that a principal created later with the same id holds none.

        Raises:
            Forbidden: for the built-in admin.
        """
        self._allow_on(ctx, "delete_principal", principal_id)
        with self._lock:
            p = self._allow_current(ctx, "delete_principal", principal_id)
            if p.builtin:
                raise Forbidden("the built-in admin principal cannot be deleted")
            self._intent(ctx, "principal.delete", "delete_principal", target=principal_id)
        # The grants are revoked outside the lock (a principal with many grants must not hold
        # up every other principal change), then once more under it for any grant created
        # meanwhile (few, if any). A failure leaves the principal in place.
        for hook in self.on_delete:
            hook(ctx, principal_id)
        with self._lock:
            self._allow_current(ctx, "delete_principal", principal_id)
            for hook in self.on_delete:
                hook(ctx, principal_id)
            self.store.delete_principal(principal_id)
            self.directory.remove_principal(principal_id)

    # -- credentials -------------------------------------------------------------------------

    def _window(self, not_before: int | None, expires_at: int | None,
                expires_in: int | None) -> tuple[int, int | None]:
        now = self._now()
        if expires_in is not None:
            if expires_at is not None:
                raise InvalidRequest("give expires_at or expires_in, not both")
            if not 1 <= expires_in <= 10 * 366 * 86400:
                raise InvalidRequest("expires_in must be 1 second to 10 years")
            expires_at = now + expires_in
        start = now if not_before is None else not_before
        if not 0 <= start <= now + 366 * 86400:
            raise InvalidRequest("not_before must be within a year from now")
        if expires_at is not None and expires_at <= max(start, now):
            raise InvalidRequest("expires_at must be after not_before and in the future")
        if expires_at is not None and expires_at > now + _MAX_CREDENTIAL_LIFETIME:
            raise InvalidRequest("expires_at must be within 10 years from now")
        return start, expires_at

    def _allow_retag(self, ctx: RequestContext, action: str, updated: Principal) -> None:
        """Policies may match on the target's tags: the caller must be allowed to act on the
        principal as it will be, not only as it is (no re-tagging into a group it may not
        administer). A principal cannot change its own tags: its tags decide what it may do,
        and one Cedar request cannot tell the caller as it is from itself as it will be."""
        if ctx.principal == updated.id and ctx.principal != ADMIN_PRINCIPAL:
            ctx.attributes["policy"] = "deny:own-tags"
            raise Forbidden("a principal cannot change its own tags")
        self.authorizer.authorize(ctx, action, None, target=updated)

    @staticmethod
    def _only_admin_changes_admin(ctx: RequestContext, target: Principal) -> None:
        """The built-in admin is exempt from policy, so whoever could add a credential to it,
        or change it, could act as it: only the admin itself may."""
        if target.builtin and ctx.principal != ADMIN_PRINCIPAL:
            raise Forbidden("only the admin may change the built-in admin principal")

    def _add(self, ctx: RequestContext, principal_id: str, credential: Credential,
             check: Callable[[], None] | None = None) -> Credential:
        if len(credential.label) > MAX_LABEL or any(ord(c) < 0x20 for c in credential.label):
            raise InvalidRequest(f"label must be at most {MAX_LABEL} printable characters")
        with self._lock:
            self._only_admin_changes_admin(
                ctx, self._allow_current(ctx, "manage_credentials", principal_id))
            if check is not None:
                check()
            live = [c for c in self.store.list_credentials(principal_id) if c.revoked_at is None]
            if len(live) >= MAX_CREDENTIALS:
                raise InvalidRequest(f"a principal has at most {MAX_CREDENTIALS} unrevoked "
                                     "credentials; revoke one first")
            self._intent(ctx, "credential.add", "manage_credentials", target=principal_id,
                         credential=credential.id, kind=credential.kind)
            self.store.add_credential(credential)
            self.directory.put_credential(credential)
        return credential

    @_audited("credential.add_key", "manage_credentials")
    def add_public_key(self, ctx: RequestContext, principal_id: str,
                       req: m.AddPublicKeyRequest) -> m.CredentialInfo:
        """Register an Ed25519 or ECDSA P-256 public key; its id is its JWK thumbprint and
        its signature ``keyid`` is ``<principal>/<thumbprint>``.

        Raises:
            InvalidRequest: for a key that is not an accepted public key.
            AlreadyExists: if that key is already registered.
        """
        self._allow_on(ctx, "manage_credentials", principal_id)
        try:
            key = load_public_key(req.public_key)
        except ValueError as exc:
            raise InvalidRequest(f"public_key: {exc}") from None
        start, expires = self._window(req.not_before, req.expires_at, req.expires_in)
        now = self._now()
        cred = Credential(id=jwk_thumbprint(key.jwk()), principal_id=principal_id,
                          kind="public_key", label=req.label, algorithm=key.algorithm,
                          public_key_der=key.public_der(), not_before=start, expires_at=expires,
                          created_at=now)
        if self.store.get_credential(cred.id) is not None:
            raise AlreadyExists("that public key is already registered")
        return self._credential_info(self._add(ctx, principal_id, cred))

    @_audited("credential.add_api_key", "manage_credentials")
    def create_api_key(self, ctx: RequestContext, principal_id: str,
                       req: m.CreateApiKeyRequest) -> m.ApiKeyCreated:
        """Issue an API key (returned once; the store keeps only its keyed hash)."""
        self._allow_on(ctx, "manage_credentials", principal_id)
        start, expires = self._window(req.not_before, req.expires_at, req.expires_in)
        cred_id, api_key = generate_api_key()
        cred = Credential(id=cred_id, principal_id=principal_id, kind="api_key", label=req.label,
                          secret_digest=api_key_digest(self._hmac_key, api_key),
                          not_before=start, expires_at=expires, created_at=self._now())
        return m.ApiKeyCreated(credential=self._credential_info(self._add(ctx, principal_id, cred)),
                               api_key=api_key)

    @_audited("credential.add_shared_secret", "manage_credentials")
    def create_shared_secret(self, ctx: RequestContext, principal_id: str,
                             req: m.CreateApiKeyRequest) -> m.SharedSecretCreated:
        """Issue a shared secret for ``hmac-sha256`` request signatures (returned once; kept
        sealed under the root key, since verifying a MAC needs the secret itself).

        Raises:
            InvalidRequest: when this server cannot seal secrets.
        """
        self._allow_on(ctx, "manage_credentials", principal_id)
        if self._sealer is None:
            raise InvalidRequest("this server cannot issue shared secrets")
        start, expires = self._window(req.not_before, req.expires_at, req.expires_in)
        cred_id, text = generate_shared_secret()
        parsed = parse_shared_secret(text)
        assert parsed is not None
        cred = Credential(id=cred_id, principal_id=principal_id, kind="shared_secret",
                          label=req.label, algorithm="hmac-sha256",
                          sealed_secret=seal_named_secret(self._sealer, _secret_name(cred_id),
                                                          parsed[1]),
                          not_before=start, expires_at=expires, created_at=self._now())
        return m.SharedSecretCreated(
            credential=self._credential_info(self._add(ctx, principal_id, cred)),
            shared_secret=text)

    @_audited("credential.add_certificate", "manage_credentials")
    def add_certificate(self, ctx: RequestContext, principal_id: str,
                        req: m.AddCertificateRequest) -> m.CredentialInfo:
        """Map client certificates to the principal by fingerprint or subject/SAN rule.

        Raises:
            InvalidRequest: for a bad rule or certificate.
            AlreadyExists: if another credential has the same rule.
        """
        self._allow_on(ctx, "manage_credentials", principal_id)
        if (req.match is None) == (req.certificate is None):
            raise InvalidRequest("give either match or certificate")
        try:
            if req.certificate is not None:
                if len(req.certificate) > 65536:
                    raise ValueError("certificate is too large")
                match = certificate_fingerprint(certificate_der_from_pem(req.certificate.encode()))
            else:
                assert req.match is not None
                match = normalize_match(req.match)
        except ValueError as exc:
            raise InvalidRequest(f"certificate match: {exc}") from None
        start, expires = self._window(req.not_before, req.expires_at, req.expires_in)
        cred = Credential(id="mc_" + random_bytes(8).hex(), principal_id=principal_id,
                          kind="mtls", label=req.label, match=match, not_before=start,
                          expires_at=expires, created_at=self._now())

        def unique() -> None:  # under the lock: two adds cannot map one certificate twice
            taken = self.directory.credential_for_match(match)
            if taken is not None and taken.revoked_at is None:
                raise AlreadyExists("another credential already has that certificate match")
        return self._credential_info(self._add(ctx, principal_id, cred, unique))

    @_audited("credential.list", "describe_principal")
    def list_credentials(self, ctx: RequestContext, principal_id: str) -> list[m.CredentialInfo]:
        """A principal's credentials, revoked ones included."""
        self._allow_on(ctx, "describe_principal", principal_id)
        return [self._credential_info(c) for c in self.store.list_credentials(principal_id)]

    @_audited("credential.revoke", "manage_credentials")
    def revoke_credential(self, ctx: RequestContext, principal_id: str,
                          credential_id: str) -> m.CredentialInfo:
        """Revoke a credential; it is refused from the next request on (idempotent)."""
        self._allow_on(ctx, "manage_credentials", principal_id)
        with self._lock:
            self._only_admin_changes_admin(
                ctx, self._allow_current(ctx, "manage_credentials", principal_id))
            for attempt in range(1, _WRITE_ATTEMPTS + 1):
                cred = self.store.get_credential(credential_id)
                if cred is None or cred.principal_id != principal_id:
                    raise CredentialNotFound(f"principal {principal_id!r} has no credential "
                                             f"{credential_id!r}")
                if cred.revoked_at is not None:
                    return self._credential_info(cred)
                self._intent(ctx, "credential.revoke", "manage_credentials", target=principal_id,
                             credential=credential_id)
                revoked = msgspec.structs.replace(cred, revoked_at=self._now())
                try:
                    self.store.update_credential(revoked, expected=cred)
                except Conflict:  # changed on another node meanwhile: look again
                    if attempt == _WRITE_ATTEMPTS:
                        raise Conflict(f"credential {credential_id!r} is being changed "
                                       "concurrently; try again") from None
                    continue
                self.directory.put_credential(revoked)
                return self._credential_info(revoked)
        raise AssertionError("unreachable")

    @_audited("principal.whoami", "whoami")
    def whoami(self, ctx: RequestContext) -> m.WhoAmI:
        """The authenticated caller (no policy needed to ask who you are); audited like every
        authenticated request, so a credential being tried leaves a trace."""
        p = self.directory.principal(ctx.principal)
        return m.WhoAmI(principal=ctx.principal, credential=ctx.credential_id,
                        auth_method=ctx.auth_method, tags=list(p.tags) if p else [])

    # -- policies ----------------------------------------------------------------------------

    def _policy_info(self, p: Policy) -> m.PolicyInfo:
        return m.PolicyInfo(name=p.name, text=p.text, description=p.description,
                            statements=PolicyEngine.validate(p.name, p.text),
                            created_at=_dt(p.created_at),  # type: ignore[arg-type]
                            updated_at=_dt(p.updated_at))  # type: ignore[arg-type]

    @_audited("policy.put", "put_policy")
    def put_policy(self, ctx: RequestContext, name: str, req: m.PutPolicyRequest) -> m.PolicyInfo:
        """Create or replace a policy after validating it against the schema.

        Raises:
            PolicyInvalid: for a syntax or schema error (with its position); the policy in
                force stays.
        """
        self._allow(ctx, "put_policy")
        if len(req.description) > MAX_POLICY_DESCRIPTION:
            raise InvalidRequest(f"description is longer than {MAX_POLICY_DESCRIPTION} characters")
        PolicyEngine.validate(name, req.text)
        with self._lock:
            engine = self.authorizer.engine.with_policy(name, req.text)
            now = self._now()
            old = self.store.get_policy(name)
            policy = Policy(name=name, text=req.text, description=req.description,
                            created_at=old.created_at if old else now, updated_at=now)
            self._intent(ctx, "policy.put", "put_policy", target=name,
                         digest=self.audit.digest(req.text))
            self.store.put_policy(policy)
            self.authorizer.engine = engine
        return self._policy_info(policy)

    @_audited("policy.get", "get_policy")
    def get_policy(self, ctx: RequestContext, name: str) -> m.PolicyInfo:
        """One policy."""
        self._allow(ctx, "get_policy")
        p = self.store.get_policy(name)
        if p is None:
            raise PolicyNotFound(f"policy {name!r} not found")
        return self._policy_info(p)

    @_audited("policy.list", "list_policies")
    def list_policies(self, ctx: RequestContext) -> list[m.PolicyInfo]:
        """Every policy, by name."""
        self._allow(ctx, "list_policies")
        return [self._policy_info(p) for p in self.store.list_policies()]

    @_audited("policy.delete", "delete_policy")
    def delete_policy(self, ctx: RequestContext, name: str) -> None:
        """Delete a policy; what it allowed is denied from the next request on."""
        self._allow(ctx, "delete_policy")
        with self._lock:
            if self.store.get_policy(name) is None:
                raise PolicyNotFound(f"policy {name!r} not found")
            engine = self.authorizer.engine.without_policy(name)
            self._intent(ctx, "policy.delete", "delete_policy", target=name)
            self.store.delete_policy(name)
            self.authorizer.engine = engine

    @_audited("policy.test", "test_policy")
    def test_policy(self, ctx: RequestContext, req: m.TestPolicyRequest,
                    resolve_key: Callable[[str], tuple[Key, frozenset[str]]]) -> m.PolicyTestResult:
        """Would ``req.principal`` be allowed ``req.action`` on ``req.key``? And why.

        ``resolve_key`` looks a key reference up (the KMS's resolver).
        """
        self._allow(ctx, "test_policy")
        if req.action not in ACTIONS:
            raise InvalidRequest(f"unknown action {req.action!r}; one of: "
                                 f"{', '.join(sorted(ACTIONS))}")
        if req.source not in ("signature", "api_key", "mtls", "admin_token"):
            raise InvalidRequest("source must be signature, api_key, mtls or admin_token")
        canonical_context(req.context)  # the encryption-context limits, as for a real request
        p = self.directory.principal(req.principal)
        if p is None:
            raise PrincipalNotFound(f"principal {_event_text(req.principal)!r} not found")
        if p.id == ADMIN_PRINCIPAL:
            return m.PolicyTestResult(allowed=True, reasons=["builtin:admin"], errors=[],
                                      explanation="allowed: the built-in admin principal is not "
                                                  "subject to policy")
        caller = PrincipalFacts(id=p.id, tags=frozenset(p.tags))
        resource: KeyFacts | PrincipalFacts | None = None
        if ACTIONS[req.action] == "key":
            if req.key is None:
                raise InvalidRequest(f"action {req.action!r} needs a key")
            key, aliases = resolve_key(req.key)
            resource = KeyFacts(id=key.id, name=key.name, aliases=aliases, spec=key.spec,
                                purpose=key.purpose, state=key.state, tags=frozenset(key.tags))
        elif ACTIONS[req.action] == "principal":
            if not isinstance(req.target, str) or not req.target:
                raise InvalidRequest(f"action {req.action!r} needs a target principal")
            # a principal that does not exist is decided as the service decides it: a
            # provisional principal with that id and no tags
            t = self.directory.principal(req.target)
            resource = (caller if req.target == p.id
                        else PrincipalFacts(id=req.target, tags=frozenset(t.tags if t else ())))
        if req.time is not None and not 0 <= req.time < 2**63:
            raise InvalidRequest("time must be a Unix time in seconds, 0 to 2**63-1")
        if req.grant is not None and not (0 <= req.grant.ttl < 2**63 and 0 <= req.grant.uses < 2**63):
            raise InvalidRequest("grant.ttl and grant.uses must be 0 to 2**63-1")
        try:
            grant = None
            if req.grant is not None:
                g = req.grant
                grant = GrantFacts(ttl=g.ttl, uses=g.uses, pop=g.pop,
                                   operations=frozenset(g.operations),
                                   audiences=frozenset(g.audiences), grantee=g.grantee)
            facts = RequestFacts(source=req.source,
                                 now=req.time if req.time is not None else self._now(),
                                 encryption_context=req.context, grant=grant)
        except (TypeError, ValueError) as exc:
            raise InvalidRequest(f"policy test: {exc}") from None
        decision = self.authorizer.engine.decide(caller, req.action, resource, facts)
        return m.PolicyTestResult(allowed=decision.allowed, reasons=list(decision.reasons),
                                  errors=list(decision.errors), explanation=decision.explain())


@dataclass(slots=True)
class Access:
    """Everything authentication and authorization need, assembled at start."""

    directory: Directory
    authenticator: Authenticator
    authorizer: PolicyAuthorizer
    service: AccessService


def _provisional(principal_id: str, tags: tuple[str, ...]) -> Principal:
    """A stand-in for a principal that does not exist (yet), for authorization."""
    return Principal(id=principal_id, tags=tags, created_at=0, updated_at=0)


def _secret_name(credential_id: str) -> str:
    return f"credential:{credential_id}"


def _secret(store: Store, root: Aead, name: str) -> bytes:
    fresh = random_bytes(32)
    if store.set_meta_if_absent(name, seal_named_secret(root, name, fresh)):
        return fresh
    stored = store.get_meta(name)
    assert stored is not None
    return unseal_named_secret(root, name, stored)


def ensure_admin_principal(store: Store, now: int) -> None:
    """Create the built-in ``admin`` principal on first start."""
    if store.get_principal(ADMIN_PRINCIPAL) is None:
        with contextlib.suppress(AlreadyExists):  # another node created it first
            store.create_principal(Principal(
                id=ADMIN_PRINCIPAL, display_name="Built-in administrator", builtin=True,
                created_at=now, updated_at=now))


def reload_access(access: Access, store: Store) -> None:
    """Read principals, credentials, policies and the admin token's digest again (another
    node changed them in the shared store, or restarted with ``--reset-admin-token``)."""
    access.directory.reload()
    access.authorizer.engine = PolicyEngine({p.name: p.text for p in store.list_policies()})
    digest = store.get_meta(ADMIN_TOKEN_META)
    if digest is not None:
        access.authenticator.set_admin_digest(digest)


def open_access(store: Store, root_key: bytes, *, audit: AuditRecorder | None = None,
                settings: AuthSettings | None = None,
                clock: Callable[[], float] = time.time) -> Access:
    """Load principals, credentials and policies and build the access layer.

    The admin token must exist (:func:`keygrants.auth.ensure_admin_token`).
    """
    admin_digest = store.get_meta(ADMIN_TOKEN_META)
    if admin_digest is None:
        raise ValueError("no admin token configured; call ensure_admin_token first")
    ensure_admin_principal(store, int(clock()))
    root = Aead("aes-256-gcm", root_key)
    hmac_key = _secret(store, root, API_KEY_HMAC_META)

    def open_secret(credential: Credential) -> bytes:
        assert credential.sealed_secret is not None
        return unseal_named_secret(root, _secret_name(credential.id), credential.sealed_secret)

    directory = Directory(store, open_secret)
    engine = PolicyEngine({p.name: p.text for p in store.list_policies()})
    authorizer = PolicyAuthorizer(directory, engine, clock)
    authenticator = Authenticator(directory, admin_digest, hmac_key, settings, clock)
    service = AccessService(store, directory, authorizer, api_key_hmac_key=hmac_key, audit=audit,
                            clock=clock, sealer=root)
    return Access(directory, authenticator, authorizer, service)
