"""The KMS use cases: authorize, act, persist, over a store and an unsealed root key.

:class:`KMS` is synchronous and thread-safe. Cryptographic operations run from an in-memory
cache of unsealed key versions and never touch the store; management operations write through
to the store (durably) under one lock and then update the cache. The HTTP edge calls the
cryptographic operations inline and the writes in a worker thread.

Every method takes the caller's :class:`~keygrants.auth.RequestContext` first, and asks the
:class:`Authorizer` before it acts: the admin-only authorizer of this release is where the
policy engine slots in.
"""

from __future__ import annotations

import functools
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Protocol, TypeVar

import msgspec

from keygrants import models as m
from keygrants.audit.events import Result
from keygrants.audit.recorder import AuditRecorder, NoAudit
from keygrants.auth import ADMIN_PRINCIPAL, RequestContext
from keygrants.crypto import Aead, random_bytes
from keygrants.errors import (
    AliasNotFound,
    AlreadyExists,
    AuditUnavailable,
    Conflict,
    Forbidden,
    InvalidCiphertext,
    InvalidKeyUsage,
    InvalidRequest,
    KeyDestroyed,
    KeyDisabled,
    KeygrantsError,
    KeyNotFound,
    KeyPendingDeletion,
    KeyStateError,
    KeyVersionError,
    PayloadTooLarge,
)
from keygrants.keys.ciphertext import Ciphertext
from keygrants.keys.context import canonical_context
from keygrants.keys.keyring import KeyVersions
from keygrants.keys.material import KeyMaterial, generate_material
from keygrants.keys.model import NAME_PATTERN, Key, KeyVersion
from keygrants.keys.sealing import seal_key_version, unseal_key_version
from keygrants.keys.specs import SPECS, KeySpec, get_spec
from keygrants.keys.tags import check_tags
from keygrants.store.base import Store

__all__ = ["KMS", "AdminOnlyAuthorizer", "Authorizer", "Limits"]

_NAME_RE: Final = re.compile(NAME_PATTERN)
DATA_KEY_SIZES: Final = frozenset({16, 32, 64})
MIN_ROTATION_PERIOD: Final = 60
MAX_ROTATION_PERIOD: Final = 10 * 366 * 86400
MIN_DELETION_DAYS: Final = 7
MAX_DELETION_DAYS: Final = 30
MAX_DESCRIPTION_LENGTH: Final = 1024
MAX_LIST_LIMIT: Final = 1000
_MAX_UNKNOWN_KIDS: Final = 4096
_KEY_WRITE_ATTEMPTS: Final = 2  # the first, and one retry after a concurrent change


@dataclass(frozen=True, slots=True)
class Limits:
    """Input limits; every one is enforced before any work is done."""

    max_plaintext: int = 64 * 1024
    max_batch_items: int = 1000
    max_random_bytes: int = 1024
    max_derive_bytes: int = 1024
    max_message: int = 64 * 1024

    def __post_init__(self) -> None:
        for name in ("max_plaintext", "max_batch_items", "max_random_bytes",
                     "max_derive_bytes", "max_message"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")


class Authorizer(Protocol):
    """Decides whether a caller may perform an action on a key (``None`` for global ones).

    ``aliases`` are the key's aliases, ``context`` the encryption context of a cryptographic
    operation (policies may condition on both).
    """

    def authorize(self, ctx: RequestContext, action: str, key: Key | None, *,
                  aliases: frozenset[str] = frozenset(),
                  context: Mapping[str, str] | None = None) -> None:
        """Return if allowed; raise :class:`~keygrants.errors.Forbidden` otherwise."""


class AdminOnlyAuthorizer:
    """Allows everything to the admin principal and nothing to anyone else."""

    def authorize(self, ctx: RequestContext, action: str, key: Key | None, *,
                  aliases: frozenset[str] = frozenset(),
                  context: Mapping[str, str] | None = None) -> None:
        if ctx.principal != ADMIN_PRINCIPAL:
            raise Forbidden()


@dataclass(frozen=True, slots=True)
class _Loaded:
    """A key's metadata with its unsealed versions (``None`` once destroyed)."""

    key: Key
    versions: KeyVersions | None
    aliases: frozenset[str] = frozenset()


def _uuid(key_id: str) -> uuid.UUID:
    return uuid.UUID(key_id)


def _phantom(ref: str) -> Key:
    """A stand-in for a key that does not exist, for the authorize-before-revealing check."""
    try:
        key_id = str(uuid.UUID(ref))
    except (ValueError, TypeError, AttributeError):
        key_id = ""
    name = ref if isinstance(ref, str) and len(ref) <= 160 else ""
    return Key(id=key_id, name=name, spec="", purpose="", state="enabled", created_at=0,
               updated_at=0)


def _dt(ts: int | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC)


F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")
SCHEDULER: Final = RequestContext(principal="system:scheduler", request_id="scheduler")


def _nothing_done(result: object) -> bool:
    """A batch result whose every item failed (refused by the grant, an invalid ciphertext)."""
    return isinstance(result, m.BatchResult) and all(r.error is not None for r in result.results)


# A refusal travels from the guard that meets it to the use case's audit event in the
# request's attributes, under these names, which :func:`_audited` takes out again (they are
# not event detail): how many refusals, the distinct ids of the existing keys refused (at most
# one more than an event lists), and the policy statements that decided the first refusal.
_REFUSED: Final = "_refused"
_REFUSED_KEYS: Final = "_refused_keys"
_REFUSED_POLICY: Final = "_refused_policy"
_BATCH_KEYS_SHOWN: Final = 20
_NO_KEYS: Final[list[str]] = []  # never changed


def _note_refusal(ctx: RequestContext, key_id: str | None, *, count: int = 1) -> None:
    """Count ``count`` policy refusals for the request's audit event; ``key_id`` names an
    existing key (never a phantom: an event names only keys that exist)."""
    attributes = ctx.attributes
    noted = attributes.get(_REFUSED)
    attributes[_REFUSED] = str(count if noted is None else int(noted) + count)
    if noted is None and "policy" in attributes:
        attributes[_REFUSED_POLICY] = attributes["policy"]
    if key_id:
        known = attributes.get(_REFUSED_KEYS)
        if known is None:
            attributes[_REFUSED_KEYS] = key_id
        elif key_id not in known.split(",") and known.count(",") < _BATCH_KEYS_SHOWN:
            attributes[_REFUSED_KEYS] = f"{known},{key_id}"


def _take_refusals(ctx: RequestContext) -> tuple[int, list[str]]:
    """The refusals noted for this request (how many, which keys), removed from its attributes;
    the policy statements that refused replace the last decision's (the event is a denial)."""
    attributes = ctx.attributes
    count = attributes.pop(_REFUSED)
    policy = attributes.pop(_REFUSED_POLICY, None)
    if policy is not None:
        attributes["policy"] = policy
    keys = attributes.pop(_REFUSED_KEYS, "")
    return int(count), keys.split(",") if keys else []


def _listed(ids: Sequence[str]) -> str:
    """Key ids for an event's detail, sorted, at most ``_BATCH_KEYS_SHOWN`` of them."""
    ids = sorted(ids)
    return ",".join(ids[:_BATCH_KEYS_SHOWN]) + (",…" if len(ids) > _BATCH_KEYS_SHOWN else "")


def _audited(event_type: str, operation: str) -> Callable[[F], F]:
    """Record the outcome of a use case: ``ok`` with the key and version it acted on, or
    ``denied``/``error`` with the error code. State changes also record a ``requested``
    event before they touch the store (see :meth:`KMS._intent`).

    A policy refusal makes the event ``denied``, naming the refused key when it exists: also
    when the caller was answered as for a key that does not exist (an invalid ciphertext),
    and for a batch in which only some items were refused (``detail.denied`` counts them)."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(self: KMS, ctx: RequestContext, *args: Any, **kwargs: Any) -> Any:
            try:
                try:
                    result = fn(self, ctx, *args, **kwargs)
                finally:
                    refused, refused_keys = (_take_refusals(ctx) if _REFUSED in ctx.attributes
                                             else (0, _NO_KEYS))
                if ctx.grant is not None and not _nothing_done(result):
                    # a limited grant's use is counted only now that the operation succeeded
                    # (a batch whose every item failed did nothing: it counts no use)
                    finish = getattr(self._authorizer, "finish_use", None)
                    if finish is not None:
                        finish(ctx)
            except KeygrantsError as exc:
                if not isinstance(exc, AuditUnavailable):
                    self.audit.record(
                        ctx, event_type, "denied" if refused or isinstance(exc, Forbidden)
                        else "error", operation=operation, reason=exc.code,
                        key_id=refused_keys[0] if len(refused_keys) == 1 else None,
                        detail={"denied_keys": _listed(refused_keys)} if len(refused_keys) > 1
                        else None)
                raise
            key_id = getattr(result, "key_id", None) or getattr(result, "id", None)
            version = getattr(result, "key_version", None) or getattr(result, "latest_version", None)
            outcome: Result = "ok"
            reason = None
            detail = None
            if isinstance(result, m.BatchResult):
                failed = sum(1 for r in result.results if r.error is not None)
                detail = {"items": str(len(result.results)), "failed": str(failed)}
                # the keys the batch used: one is the event's key (and version, if one);
                # several are listed in the detail (a search by key finds single-key ones)
                used = {(r.key_id, r.key_version) for r in result.results if r.key_id}
                ids = sorted({kid for kid, _ in used})
                if refused:
                    # some items were refused: a denial, which names the refused key (a
                    # search by key finds it); the keys the other items used are listed
                    outcome, reason, version = "denied", Forbidden.code, None
                    detail["denied"] = str(refused)
                    key_id = refused_keys[0] if len(refused_keys) == 1 else None
                    if len(refused_keys) > 1:
                        detail["denied_keys"] = _listed(refused_keys)
                    if ids and ids != [key_id]:
                        detail["keys"] = _listed(ids)
                elif len(ids) == 1:
                    key_id = ids[0]
                    version = next(iter(used))[1] if len(used) == 1 else None
                elif ids:
                    detail["keys"] = _listed(ids)
            self.audit.record(ctx, event_type, outcome, operation=operation,
                              key_id=key_id, key_version=version, reason=reason, detail=detail)
            return result
        return wrapper  # type: ignore[return-value]
    return decorate


def _check_description(description: str) -> None:
    if len(description) > MAX_DESCRIPTION_LENGTH or "\x00" in description:
        raise InvalidRequest(f"description must be at most {MAX_DESCRIPTION_LENGTH} characters "
                             "without NUL")


class KMS:
    """The key management service.

    Args:
        store: durable storage.
        root_key: the unsealed 32-byte root key that seals key material.
        clock: returns the current Unix time (injected in tests).
        limits: input limits.
        authorizer: the policy decision point.
        audit: where audit events go (nothing is recorded without one).
    """

    def __init__(self, store: Store, root_key: bytes, *, clock: Callable[[], float] = time.time,
                 limits: Limits | None = None, authorizer: Authorizer | None = None,
                 audit: AuditRecorder | None = None) -> None:
        self.store = store
        self.audit: AuditRecorder = audit or NoAudit()
        self.limits = limits or Limits()
        self._root = Aead("aes-256-gcm", root_key)
        self._clock = clock
        self._authorizer = authorizer or AdminOnlyAuthorizer()
        self.authorizer: Authorizer = self._authorizer
        self._write_lock = threading.RLock()
        self._cache: dict[str, _Loaded] = {}
        self._generation = 0  # bumped by every cache write (see _load_fresh)
        self._by_kid: dict[bytes, _Loaded] = {}  # the same entries by raw key id (decrypt path)
        # key ids that named no key, bounded, oldest first (a multi-node deployment must also
        # clear it when another node publishes a new key)
        self._unknown_kids: dict[bytes, None] = {}
        self._refs: dict[str, str] = {}

    def _now(self) -> int:
        return int(self._clock())

    def forget_cached(self) -> None:
        """Drop every cached key (another node changed keys in the shared store): each is
        read and unsealed again on its next use."""
        with self._write_lock:
            self._generation += 1
            self._cache.clear()
            self._by_kid.clear()
            self._refs.clear()
            self._unknown_kids.clear()

    def use_authorizer(self, authorizer: Authorizer) -> None:
        """Replace the policy decision point (the grant authorizer wraps the policy one)."""
        self._authorizer = self.authorizer = authorizer

    def _intent(self, ctx: RequestContext, event_type: str, operation: str, key_id: str | None,
                **detail: str) -> None:
        """Make a ``requested`` event durable before a state change is applied: if the audit
        log cannot take it, the change does not happen (fail-closed)."""
        self.audit.record(ctx, event_type, "requested", operation=operation, key_id=key_id,
                          detail=detail or None, wait=True)

    # -- loading and resolution ------------------------------------------------------------

    def _load(self, key: Key) -> _Loaded:
        """Unseal a key's versions and cache them (writers: under the write lock)."""
        return self._put(self._build(key))

    def _build(self, key: Key) -> _Loaded:
        versions: KeyVersions | None = None
        if key.state != "destroyed":
            spec = get_spec(key.spec)
            kid = _uuid(key.id)
            materials = [
                KeyMaterial(spec, kid, v.version, unseal_key_version(self._root, kid, v.version,
                                                                    v.sealed))
                for v in self.store.get_versions(key.id)
            ]
            versions = KeyVersions(kid, materials, min_decryption_version=key.min_decryption_version)
        return _Loaded(key, versions, frozenset(a.alias for a in self.store.list_aliases(key.id)))

    def _put(self, loaded: _Loaded) -> _Loaded:
        self._generation += 1
        self._cache[loaded.key.id] = loaded
        self._by_kid[_uuid(loaded.key.id).bytes] = loaded
        return loaded

    def _cached(self, key: Key) -> _Loaded:
        """Replace the cached metadata, keeping unsealed versions when they still match."""
        old = self._cache.get(key.id)
        if (old is None or old.versions is None or key.state == "destroyed"
                or old.key.latest_version != key.latest_version):
            return self._load(key)
        old.versions.min_decryption_version = key.min_decryption_version
        return self._put(_Loaded(key, old.versions, old.aliases))

    def _resolve(self, ref: str) -> _Loaded:
        """A key by id, name or alias, loaded (from the cache when possible)."""
        key_id = self._refs.get(ref)
        if key_id is not None:
            loaded = self._cache.get(key_id)
            if loaded is not None:
                return loaded
        if not isinstance(ref, str) or not ref or len(ref) > 160 or "\x00" in ref:
            raise KeyNotFound()
        key: Key | None = None
        try:
            key = self.store.get_key(str(uuid.UUID(ref)))
        except ValueError:
            key = self.store.find_key(ref)
        if key is None:
            raise KeyNotFound(f"key {ref!r} not found")
        loaded = self._cache.get(key.id) or self._load_fresh(key.id)
        self._refs[ref] = key.id
        return loaded

    def _load_fresh(self, key_id: str) -> _Loaded:
        """Load a key missing from the cache without the write lock (this runs on the event
        loop, and a writer holding that lock may be waiting for the loop's audit commit), but
        cache it only if no write happened since the store was read, so a load racing a state
        change (a disable) cannot put the older state back."""
        loaded: _Loaded | None = None
        for _ in range(3):
            generation = self._generation
            key = self.store.get_key(key_id)
            if key is None:
                raise KeyNotFound()
            loaded = self._build(key)
            if self._generation == generation:
                return self._cache.get(key_id) or self._put(loaded)
        assert loaded is not None
        return loaded  # writes keep racing: answer from this fresh read without caching it

    def _resolve_kid(self, kid: bytes) -> _Loaded | None:
        loaded = self._by_kid.get(kid)
        if loaded is not None:
            return loaded
        if kid in self._unknown_kids:
            return None  # a forged or foreign key id: no store query on the event loop again
        try:
            return self._load_fresh(str(uuid.UUID(bytes=kid)))
        except KeyNotFound:
            if len(self._unknown_kids) >= _MAX_UNKNOWN_KIDS:
                self._unknown_kids.pop(next(iter(self._unknown_kids)))
            self._unknown_kids[kid] = None
            return None

    def key_with_aliases(self, ref: str) -> tuple[Key, frozenset[str]]:
        """A key and its aliases by reference, for ``policy test`` (no authorization here)."""
        loaded = self._resolve(ref)
        return loaded.key, loaded.aliases

    def _forget_refs(self, key_id: str) -> None:
        for ref in [r for r, k in self._refs.items() if k == key_id]:
            self._refs.pop(ref, None)

    # -- guards ----------------------------------------------------------------------------

    @staticmethod
    def _usable(loaded: _Loaded, operation: str) -> KeyVersions:
        key = loaded.key
        if key.state == "disabled":
            raise KeyDisabled(f"key {key.name!r} is disabled")
        if key.state == "pending_deletion":
            raise KeyPendingDeletion(f"key {key.name!r} is pending deletion")
        if key.state == "destroyed" or loaded.versions is None:
            raise KeyDestroyed(f"key {key.name!r} has been destroyed")
        spec = SPECS[key.spec]
        if operation in spec.operations or (operation == "derive" and key.derivable):
            return loaded.versions
        if operation == "derive" and spec.symmetric:
            raise InvalidKeyUsage(f"key {key.name!r} was not created derivable: derive needs a key "
                                  'created with --derivable ("derivable": true), which cannot be '
                                  "set later")
        if operation == "re_encrypt":
            # only a destination key gets here: a source key that is not an encryption key
            # makes an invalid ciphertext (see _open)
            raise InvalidKeyUsage("the destination key is not an encryption key")
        raise InvalidKeyUsage(
            f"{operation} is not allowed for key {key.name!r} (spec {key.spec}, purpose "
            f"{key.purpose})"
        )

    def _resolve_for(self, ctx: RequestContext, action: str, ref: str) -> _Loaded:
        """Resolve a key the caller wants to act on. A key that does not exist is reported as
        missing only to a caller who could act on a key of that name: others get
        ``Forbidden``, so key names cannot be probed (authorize before revealing)."""
        try:
            loaded = self._resolve(ref)
        except KeyNotFound:
            self._authorizer.authorize(ctx, action, _phantom(ref))
            raise
        self._authorizer.authorize(ctx, action, loaded.key, aliases=loaded.aliases)
        return loaded

    def _authorized(self, ctx: RequestContext, operation: str, ref: str,
                    context: Mapping[str, str] | None = None) -> tuple[Key, KeyVersions]:
        try:
            loaded = self._resolve(ref)
        except KeyNotFound:
            self._refuse_unknown_key(ctx, operation, ref, [context])
            raise
        try:
            self._authorizer.authorize(ctx, operation, loaded.key, aliases=loaded.aliases,
                                       context=context)
        except Forbidden:
            _note_refusal(ctx, loaded.key.id)
            raise
        return loaded.key, self._usable(loaded, operation)

    def _check_plaintext(self, data: bytes, what: str = "plaintext") -> None:
        if len(data) > self.limits.max_plaintext:
            raise PayloadTooLarge(f"{what} is larger than {self.limits.max_plaintext} bytes")

    def _check_message(self, data: bytes) -> None:
        if len(data) > self.limits.max_message:
            raise PayloadTooLarge(f"message is larger than {self.limits.max_message} bytes")

    # -- key management --------------------------------------------------------------------

    def info(self, key: Key) -> m.KeyInfo:
        """The public view of a key."""
        return m.KeyInfo(
            id=key.id, name=key.name, spec=key.spec, purpose=key.purpose,
            description=key.description, state=key.state, derivable=key.derivable,
            created_at=_dt(key.created_at), updated_at=_dt(key.updated_at),  # type: ignore[arg-type]
            latest_version=key.latest_version, min_decryption_version=key.min_decryption_version,
            rotation_period=key.rotation_period, next_rotation_at=_dt(key.next_rotation_at),
            deletion_date=_dt(key.deletion_date), tags=list(key.tags),
            aliases=[a.alias for a in self.store.list_aliases(key.id)],
        )

    @staticmethod
    def _check_name(name: str, what: str = "name") -> None:
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise InvalidRequest(
                f"{what} must be 1-128 characters of letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        try:
            uuid.UUID(name)
        except ValueError:
            return
        raise InvalidRequest(f"{what} must not look like a key id (UUID)")

    @staticmethod
    def _check_rotation_period(period: int | None) -> None:
        if period is not None and not MIN_ROTATION_PERIOD <= period <= MAX_ROTATION_PERIOD:
            raise InvalidRequest(
                f"rotation_period must be between {MIN_ROTATION_PERIOD} seconds and 10 years"
            )

    def _new_version(self, spec: KeySpec, kid: uuid.UUID, version: int, now: int) -> KeyVersion:
        secret = generate_material(spec)
        material = KeyMaterial(spec, kid, version, secret)
        public = material.public_key().public_der() if spec.purpose == "sign-verify" else None
        return KeyVersion(key_id=str(kid), version=version, created_at=now,
                          sealed=seal_key_version(self._root, kid, version, secret),
                          public_key_der=public)

    @_audited("key.create", "create_key")
    def create_key(self, ctx: RequestContext, req: m.CreateKeyRequest) -> m.KeyInfo:
        """Create a key with its first version.

        Raises:
            InvalidRequest: for a bad name, spec, rotation period or description.
            AlreadyExists: if the name is in use.
        """
        self._check_name(req.name)
        tags = check_tags(req.tags)
        try:
            spec = get_spec(req.spec)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        self._authorizer.authorize(ctx, "create_key", Key(
            id="", name=req.name, spec=spec.name, purpose=spec.purpose, tags=tags, created_at=0,
            updated_at=0))
        self._check_rotation_period(req.rotation_period)
        _check_description(req.description)
        if req.derivable and not spec.symmetric:
            raise InvalidRequest("only symmetric keys (aes-256-gcm, chacha20-poly1305, "
                                 "hmac-sha256) can be derivable")
        now = self._now()
        kid = uuid.uuid4()
        key = Key(
            id=str(kid), name=req.name, spec=spec.name, purpose=spec.purpose,
            description=req.description, derivable=req.derivable, created_at=now, updated_at=now,
            rotation_period=req.rotation_period, tags=tags,
            next_rotation_at=None if req.rotation_period is None else now + req.rotation_period,
        )
        with self._write_lock:
            version = self._new_version(spec, kid, 1, now)
            self._intent(ctx, "key.create", "create_key", key.id, name=key.name, spec=key.spec)
            self.store.create_key(key, version)
            self._unknown_kids.pop(kid.bytes, None)
            self._load(key)
        return self.info(key)

    @_audited("key.describe", "describe_key")
    def describe_key(self, ctx: RequestContext, ref: str) -> m.KeyInfo:
        """A key's metadata."""
        loaded = self._resolve_for(ctx, "describe_key", ref)
        return self.info(self.store.get_key(loaded.key.id) or loaded.key)

    @_audited("key.list", "list_keys")
    def list_keys(self, ctx: RequestContext, *, limit: int = 100,
                  after: str | None = None) -> m.KeyList:
        """One page of keys ordered by name."""
        self._authorizer.authorize(ctx, "list_keys", None)
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise InvalidRequest(f"limit must be 1..{MAX_LIST_LIMIT}")
        keys = self.store.list_keys(limit=limit + 1, after=after)
        more = len(keys) > limit
        keys = keys[:limit]
        return m.KeyList(keys=[self.info(k) for k in keys],
                         next=keys[-1].name if more and keys else None)

    def _retry_on_conflict(self, key_id: str, act: Callable[[Key], T]) -> T:
        """Run ``act`` on the key as stored. The store writes keys with a compare-and-set, so
        if another node changed the key since it was read, the write raises ``Conflict``:
        read it again and run ``act`` once more (it checks the key's state afresh), and
        report a second ``Conflict`` to the caller rather than write over the change.

        The write lock serialises writers of this process only, hence the compare-and-set.
        """
        for attempt in range(1, _KEY_WRITE_ATTEMPTS + 1):
            key = self.store.get_key(key_id)
            if key is None:
                raise KeyNotFound()
            try:
                return act(key)
            except AlreadyExists:
                raise  # a Conflict too, but not a lost compare-and-set
            except Conflict:
                if attempt == _KEY_WRITE_ATTEMPTS:
                    raise Conflict(f"key {key.name!r} is being changed concurrently; "
                                   "try again") from None
        raise AssertionError("unreachable")

    def _modify(self, ctx: RequestContext, ref: str, action: str, event_type: str,
                change: Callable[[Key, int], Key]) -> m.KeyInfo:
        def apply(current: Key) -> Key:
            now = self._now()
            updated = change(current, now)
            if updated is current:
                return current
            updated = msgspec.structs.replace(updated, updated_at=max(now, current.updated_at))
            self._intent(ctx, event_type, action, current.id, state=updated.state)
            self.store.update_key(updated, expected=current)
            self._cached(updated)
            return updated

        with self._write_lock:
            loaded = self._resolve_for(ctx, action, ref)
            updated = self._retry_on_conflict(loaded.key.id, apply)
        return self.info(updated)

    @staticmethod
    def _not_destroyed(key: Key) -> None:
        if key.state == "destroyed":
            raise KeyDestroyed(f"key {key.name!r} has been destroyed")

    @_audited("key.update", "update_key")
    def update_key(self, ctx: RequestContext, ref: str, req: m.UpdateKeyRequest) -> m.KeyInfo:
        """Change description, rotation period (0 = off) or minimum decryption version."""
        if req.description is not None:
            _check_description(req.description)
        period = req.rotation_period
        if period is not None and period != 0:
            self._check_rotation_period(period)
        tags = None if req.tags is None else check_tags(req.tags)
        if tags is not None:
            # policies may match on tags: the caller must be allowed to update the key as it
            # will be, not only as it is (no retagging a key out of a forbid or into a permit)
            loaded = self._resolve_for(ctx, "update_key", ref)
            self._authorizer.authorize(ctx, "update_key",
                                       msgspec.structs.replace(loaded.key, tags=tags),
                                       aliases=loaded.aliases)

        def change(key: Key, now: int) -> Key:
            self._not_destroyed(key)
            changes: dict[str, object] = {}
            if req.description is not None:
                changes["description"] = req.description
            if tags is not None:
                changes["tags"] = tags
            if period is not None:
                changes["rotation_period"] = period or None
                changes["next_rotation_at"] = now + period if period else None
            if req.min_decryption_version is not None:
                v = req.min_decryption_version
                if not 1 <= v <= key.latest_version:
                    raise KeyVersionError(
                        f"min_decryption_version must be between 1 and the latest version "
                        f"({key.latest_version})"
                    )
                changes["min_decryption_version"] = v
            return msgspec.structs.replace(key, **changes) if changes else key

        return self._modify(ctx, ref, "update_key", "key.update", change)

    @_audited("key.rotate", "rotate_key")
    def rotate_key(self, ctx: RequestContext, ref: str) -> m.KeyInfo:
        """Add a new version; encryption uses it from now on, old versions still decrypt."""
        def rotate(key: Key) -> Key:
            if key.state in ("pending_deletion", "destroyed"):
                raise KeyStateError(f"key {key.name!r} is {key.state.replace('_', ' ')}")
            return self._rotate(ctx, key)

        with self._write_lock:
            loaded = self._resolve_for(ctx, "rotate_key", ref)
            return self.info(self._retry_on_conflict(loaded.key.id, rotate))

    def _rotate(self, ctx: RequestContext, key: Key) -> Key:
        now = self._now()
        version = self._new_version(get_spec(key.spec), _uuid(key.id), key.latest_version + 1, now)
        self._intent(ctx, "key.rotate", "rotate_key", key.id, version=str(version.version))
        updated = msgspec.structs.replace(
            key, latest_version=version.version, updated_at=max(now, key.updated_at),
            next_rotation_at=None if key.rotation_period is None else now + key.rotation_period,
        )
        self.store.add_version(updated, version, expected=key)
        self._load(updated)
        return updated

    @_audited("key.disable", "disable_key")
    def disable_key(self, ctx: RequestContext, ref: str) -> m.KeyInfo:
        """Refuse every cryptographic operation until enabled again."""
        def change(key: Key, now: int) -> Key:
            if key.state in ("pending_deletion", "destroyed"):
                raise KeyStateError(f"key {key.name!r} is {key.state.replace('_', ' ')}")
            return key if key.state == "disabled" else msgspec.structs.replace(key, state="disabled")
        return self._modify(ctx, ref, "disable_key", "key.disable", change)

    @_audited("key.enable", "enable_key")
    def enable_key(self, ctx: RequestContext, ref: str) -> m.KeyInfo:
        """Allow cryptographic operations again."""
        def change(key: Key, now: int) -> Key:
            self._not_destroyed(key)
            if key.state == "pending_deletion":
                raise KeyStateError(f"key {key.name!r} is pending deletion; cancel the deletion "
                                    "first")
            return key if key.state == "enabled" else msgspec.structs.replace(key, state="enabled")
        return self._modify(ctx, ref, "enable_key", "key.enable", change)

    @_audited("key.schedule_deletion", "schedule_key_deletion")
    def schedule_deletion(self, ctx: RequestContext, ref: str, days: int = 30) -> m.KeyInfo:
        """Make the key unusable now and destroy its material after ``days`` (7 to 30)."""
        if not MIN_DELETION_DAYS <= days <= MAX_DELETION_DAYS:
            raise InvalidRequest(f"days must be between {MIN_DELETION_DAYS} and {MAX_DELETION_DAYS}")

        def change(key: Key, now: int) -> Key:
            if key.state in ("pending_deletion", "destroyed"):
                raise KeyStateError(f"key {key.name!r} is already {key.state.replace('_', ' ')}")
            return msgspec.structs.replace(key, state="pending_deletion", previous_state=key.state,
                                           deletion_date=now + days * 86400)
        return self._modify(ctx, ref, "schedule_key_deletion", "key.schedule_deletion", change)

    @_audited("key.cancel_deletion", "cancel_key_deletion")
    def cancel_deletion(self, ctx: RequestContext, ref: str) -> m.KeyInfo:
        """Restore a key pending deletion to the state it had before."""
        def change(key: Key, now: int) -> Key:
            if key.state != "pending_deletion":
                raise KeyStateError(f"key {key.name!r} is not pending deletion")
            return msgspec.structs.replace(key, state=key.previous_state or "disabled",
                                           previous_state=None, deletion_date=None)
        return self._modify(ctx, ref, "cancel_key_deletion", "key.cancel_deletion", change)

    @_audited("alias.create", "create_alias")
    def create_alias(self, ctx: RequestContext, alias: str, ref: str) -> m.AliasInfo:
        """Name a key with an extra alias."""
        self._check_name(alias, "alias")
        with self._write_lock:
            loaded = self._resolve_for(ctx, "create_alias", ref)
            self._intent(ctx, "alias.create", "create_alias", loaded.key.id, alias=alias)
            self.store.create_alias(alias, loaded.key.id)
            current = self._cache.get(loaded.key.id, loaded)
            self._put(_Loaded(current.key, current.versions, current.aliases | {alias}))
        return m.AliasInfo(alias=alias, key_id=loaded.key.id)

    @_audited("alias.delete", "delete_alias")
    def delete_alias(self, ctx: RequestContext, alias: str) -> None:
        """Remove an alias (the key is untouched). Policies decide on the key the alias names
        (aliases can carry policy meaning, so removing one is an act on that key).

        Raises:
            AliasNotFound: if there is no such alias (for a caller who may delete aliases).
        """
        with self._write_lock:
            target = next((a.key_id for a in self.store.list_aliases() if a.alias == alias), None)
            if target is None:
                self._authorizer.authorize(ctx, "delete_alias", _phantom(alias))
                raise AliasNotFound()
            loaded = self._resolve_for(ctx, "delete_alias", target)
            self._intent(ctx, "alias.delete", "delete_alias", loaded.key.id, alias=alias)
            self.store.delete_alias(alias)
            self._refs.pop(alias, None)
            for loaded in list(self._cache.values()):
                if alias in loaded.aliases:
                    self._put(_Loaded(loaded.key, loaded.versions, loaded.aliases - {alias}))

    @_audited("alias.list", "list_aliases")
    def list_aliases(self, ctx: RequestContext, ref: str | None = None) -> list[m.AliasInfo]:
        """All aliases (which needs ``list_keys``: they name every key), or those of one key
        (``list_aliases`` on that key)."""
        key_id = None
        if ref is not None:
            loaded = self._resolve_for(ctx, "list_aliases", ref)
            key_id = loaded.key.id
        else:
            self._authorizer.authorize(ctx, "list_keys", None)
        return [m.AliasInfo(alias=a.alias, key_id=a.key_id) for a in self.store.list_aliases(key_id)]

    # -- scheduler -------------------------------------------------------------------------

    def run_due(self) -> tuple[int, int]:
        """Rotate keys whose period has elapsed and destroy keys whose deletion date has
        passed. Safe to call from any number of processes; returns ``(rotated, destroyed)``.

        A key changed meanwhile (on any node) is read again and acted on only if still due:
        a deletion cancelled after the key was listed is never carried out."""
        rotated = destroyed = 0
        now = self._now()
        for due in self.store.keys_due(now):
            with self._write_lock:
                try:
                    done = self._retry_on_conflict(due.id, lambda key: self._run_due_key(key, now))
                except AuditUnavailable:
                    raise
                except KeygrantsError:
                    continue  # gone, or still changing: the next run looks again
                rotated += done == "rotated"
                destroyed += done == "destroyed"
        return rotated, destroyed

    def _run_due_key(self, key: Key, now: int) -> str | None:
        """Rotate or destroy one key if it is due as stored now; what was done, if anything."""
        if key.state == "enabled" and key.next_rotation_at is not None and key.next_rotation_at <= now:
            event, operation = "key.rotate", "rotate_key"
        elif (key.state == "pending_deletion" and key.deletion_date is not None
                and key.deletion_date <= now):
            event, operation = "key.destroy", "destroy_key"
        else:
            return None  # changed since it was listed (rotated, cancelled, ...)
        try:
            if operation == "rotate_key":
                updated = self._rotate(SCHEDULER, key)
                self.audit.record(SCHEDULER, event, "ok", operation=operation, key_id=key.id,
                                  key_version=updated.latest_version)
                return "rotated"
            self._intent(SCHEDULER, event, operation, key.id)
            # the store destroys it only if still pending deletion and due (else Conflict)
            dead = self.store.destroy_key(key.id, now=now)
            self._put(_Loaded(dead, None))
        except Conflict:
            # the requested event has an outcome; then look at the key again
            self.audit.record(SCHEDULER, event, "error", operation=operation, key_id=key.id,
                              reason=Conflict.code)
            raise
        self.audit.record(SCHEDULER, event, "ok", operation=operation, key_id=key.id)
        return "destroyed"

    # -- encryption ------------------------------------------------------------------------

    @_audited("crypto.encrypt", "encrypt")
    def encrypt(self, ctx: RequestContext, ref: str, plaintext: bytes,
                context: Mapping[str, str] | None = None) -> m.EncryptResult:
        """Encrypt under the key's latest version."""
        key, versions = self._authorized(ctx, "encrypt", ref, context)
        self._check_plaintext(plaintext)
        latest = versions.latest
        return m.EncryptResult(ciphertext=latest.encrypt(plaintext, context), key_id=key.id,
                               key_version=latest.version)

    def _open(self, ctx: RequestContext, ciphertext: bytes, context: Mapping[str, str] | None,
              operation: str = "decrypt") -> tuple[bytes, Key, int]:
        """Decrypt for ``operation``, deciding the policy before revealing whether the key
        named in the ciphertext exists. An unknown key id is decided as a phantom key with that
        id and nothing else known: refused, ``Forbidden``; allowed, an invalid ciphertext. A
        caller refused an existing key gets that same answer (the phantom's), so that no
        caller can tell a key it may not use from one that does not exist."""
        canonical_context(context)  # a malformed context is a request error, not a bad ciphertext
        ct = Ciphertext.from_bytes(ciphertext)
        loaded = self._resolve_kid(ct.kid)
        if loaded is None:
            self._refuse_unknown_key(ctx, operation, str(uuid.UUID(bytes=ct.kid)), [context])
            raise InvalidCiphertext()
        try:
            self._authorizer.authorize(ctx, operation, loaded.key, aliases=loaded.aliases,
                                       context=context)
        except Forbidden:
            _note_refusal(ctx, loaded.key.id)  # audited as the denial it is, whatever the answer
            self._authorizer.authorize(ctx, operation, _phantom(loaded.key.id), context=context)
            raise InvalidCiphertext() from None
        if loaded.key.purpose != "encrypt-decrypt":
            raise InvalidCiphertext()  # a forged header must not reveal other keys' specs
        versions = self._usable(loaded, operation)
        plaintext = versions.for_decrypt(ct.version).open_matched(ciphertext, context)
        return plaintext, loaded.key, ct.version

    def _refuse_unknown_key(self, ctx: RequestContext, operation: str, ref: str,
                            contexts: Sequence[Mapping[str, str] | None]) -> None:
        """Before a key reference is reported unknown: raise the refusal of a caller whom the
        policy refuses a key of that name (or id) under every one of ``contexts`` (a batch has
        several)."""
        phantom = _phantom(ref)
        refusal: Forbidden | None = None
        for context in contexts:
            try:
                self._authorizer.authorize(ctx, operation, phantom, context=context)
            except Forbidden as exc:
                if refusal is None:
                    refusal = exc
                continue
            return
        if refusal is not None:
            _note_refusal(ctx, None)
            raise refusal

    @_audited("crypto.decrypt", "decrypt")
    def decrypt(self, ctx: RequestContext, ciphertext: bytes,
                context: Mapping[str, str] | None = None) -> m.DecryptResult:
        """Decrypt a native ciphertext; any cryptographic failure is ``InvalidCiphertext``."""
        plaintext, key, version = self._open(ctx, ciphertext, context)
        return m.DecryptResult(plaintext=plaintext, key_id=key.id, key_version=version)

    @_audited("crypto.re_encrypt", "re_encrypt")
    def re_encrypt(self, ctx: RequestContext, req: m.ReEncryptRequest) -> m.ReEncryptResult:
        """Decrypt and encrypt again (to the latest version, or to another key)."""
        if req.destination_key is not None and not req.destination_key:
            # a script whose destination variable is empty must not keep the source key
            raise InvalidRequest("destination_key is empty: name a key, or leave it out (or null) "
                                 "to re-encrypt under the source key")
        plaintext, source, version = self._open(ctx, req.ciphertext, req.context, "re_encrypt")
        dest_ref = source.id if req.destination_key is None else req.destination_key
        context = req.destination_context if req.destination_context is not None else req.context
        dest, dest_versions = self._authorized(ctx, "re_encrypt", dest_ref, context)
        latest = dest_versions.latest
        return m.ReEncryptResult(
            ciphertext=latest.encrypt(plaintext, context), key_id=dest.id,
            key_version=latest.version, source_key_id=source.id, source_key_version=version,
        )

    @_audited("crypto.generate_data_key", "generate_data_key")
    def generate_data_key(self, ctx: RequestContext, ref: str, req: m.DataKeyRequest) -> m.DataKey:
        """A fresh data key, encrypted under the key (and in plaintext unless declined)."""
        if req.bytes not in DATA_KEY_SIZES:
            raise InvalidRequest("data keys are 16, 32 or 64 bytes")
        key, versions = self._authorized(ctx, "generate_data_key", ref, req.context)
        data_key = random_bytes(req.bytes)
        latest = versions.latest
        return m.DataKey(
            ciphertext=latest.encrypt(data_key, req.context), key_id=key.id,
            key_version=latest.version, plaintext=data_key if req.include_plaintext else None,
        )

    @_audited("crypto.encrypt_batch", "encrypt")
    def batch_encrypt(self, ctx: RequestContext, ref: str,
                      items: Sequence[m.BatchEncryptItem]) -> m.BatchResult:
        """Encrypt up to ``max_batch_items`` items; failures are reported per item.

        Each item is decided on its own context, whatever its position: a malformed context,
        a context the policy refuses, a plaintext over the limit is that item's error. The
        whole batch fails only for the key: unknown, refused for every item, or in a state or
        of a purpose that does not encrypt.
        """
        self._check_batch(items)
        canonicals: list[bytes | KeygrantsError] = []
        contexts: dict[bytes | None, Mapping[str, str] | None] = {}  # a decision per context
        for item in items:
            try:
                canonical = canonical_context(item.context)
            except KeygrantsError as exc:
                canonicals.append(exc)
                continue
            canonicals.append(canonical)
            contexts.setdefault(canonical, item.context)
        # decided in canonical order, not the items': no answer depends on a position (with
        # every context malformed, the key itself is decided, as for one encrypt)
        order: list[bytes | None] = [*sorted(c for c in contexts if c is not None)] or [None]
        try:
            loaded = self._resolve(ref)
        except KeyNotFound:
            self._refuse_unknown_key(ctx, "encrypt", ref, [contexts.get(c) for c in order])
            raise
        refusals: dict[bytes | None, Forbidden] = {}
        policy = None
        for decided in order:
            try:
                self._authorizer.authorize(ctx, "encrypt", loaded.key, aliases=loaded.aliases,
                                           context=contexts.get(decided))
            except Forbidden as exc:
                refusals[decided] = exc
                if policy is None:
                    policy = ctx.attributes.get("policy")
        if refusals:
            if policy is not None:
                ctx.attributes["policy"] = policy  # the statements that refused, for the event
            refused = sum(1 for c in canonicals if isinstance(c, bytes) and c in refusals)
            _note_refusal(ctx, loaded.key.id, count=max(refused, 1))
            if len(refusals) == len(order):
                raise refusals[order[0]]  # nothing in the batch is the caller's to encrypt
        versions = self._usable(loaded, "encrypt")
        key = loaded.key
        latest = versions.latest
        results: list[m.BatchItemResult] = []
        for item, parsed in zip(items, canonicals, strict=True):
            error: KeygrantsError | None = (parsed if isinstance(parsed, KeygrantsError)
                                            else refusals.get(parsed))
            if error is None:
                try:
                    self._check_plaintext(item.plaintext)
                    ciphertext = latest.encrypt(item.plaintext, item.context)
                except KeygrantsError as exc:
                    error = exc
                else:
                    results.append(m.BatchItemResult(ciphertext=ciphertext, key_id=key.id,
                                                     key_version=latest.version))
                    continue
            results.append(m.BatchItemResult(error=m.BatchItemError(code=error.code,
                                                                    message=error.message)))
        return m.BatchResult(results=results)

    @_audited("crypto.decrypt_batch", "decrypt")
    def batch_decrypt(self, ctx: RequestContext,
                      items: Sequence[m.BatchDecryptItem]) -> m.BatchResult:
        """Decrypt up to ``max_batch_items`` ciphertexts; failures are reported per item."""
        self._check_batch(items)
        results: list[m.BatchItemResult] = []
        for item in items:
            try:
                plaintext, key, version = self._open(ctx, item.ciphertext, item.context)
                results.append(m.BatchItemResult(plaintext=plaintext, key_id=key.id,
                                                 key_version=version))
            except KeygrantsError as exc:
                results.append(m.BatchItemResult(error=m.BatchItemError(code=exc.code,
                                                                        message=exc.message)))
        if all(r.error is not None and r.error.code == Forbidden.code for r in results):
            raise Forbidden()  # nothing in the batch was the caller's to decrypt
        return m.BatchResult(results=results)

    def _check_batch(self, items: Sequence[object]) -> None:
        if not items:
            raise InvalidRequest("a batch needs at least one item")
        if len(items) > self.limits.max_batch_items:
            raise PayloadTooLarge(f"a batch holds at most {self.limits.max_batch_items} items")

    # -- signing and MAC -------------------------------------------------------------------

    @_audited("crypto.sign", "sign")
    def sign(self, ctx: RequestContext, ref: str, message: bytes,
             message_type: m.MessageType = "raw") -> m.SignResult:
        """Sign with the latest version."""
        key, versions = self._authorized(ctx, "sign", ref)
        self._check_message(message)
        latest = versions.latest
        try:
            signature = latest.sign(message, prehashed=message_type == "digest")
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        return m.SignResult(signature=signature, key_id=key.id, key_version=latest.version,
                            algorithm=latest.spec.algorithm)

    def _candidates(self, versions: KeyVersions, version: int | None) -> list[KeyMaterial]:
        if version is None:
            return [versions.by_version[v] for v in sorted(versions.by_version, reverse=True)
                    if v >= versions.min_decryption_version]
        material = versions.by_version.get(version)
        if material is None or version < versions.min_decryption_version:
            raise KeyVersionError(f"key version {version} does not exist or is retired")
        return [material]

    @_audited("crypto.verify", "verify")
    def verify(self, ctx: RequestContext, ref: str, req: m.VerifyRequest) -> m.VerifyResult:
        """Check a signature against one version, or every live version newest first."""
        key, versions = self._authorized(ctx, "verify", ref)
        self._check_message(req.message)
        prehashed = req.message_type == "digest"
        for material in self._candidates(versions, req.key_version):
            try:
                ok = material.verify(req.message, req.signature, prehashed=prehashed)
            except ValueError as exc:
                raise InvalidRequest(str(exc)) from None
            if ok:
                return m.VerifyResult(valid=True, key_id=key.id, key_version=material.version)
        return m.VerifyResult(valid=False, key_id=key.id)

    @_audited("key.get_public_key", "get_public_key")
    def get_public_key(self, ctx: RequestContext, ref: str,
                       version: int | None = None) -> m.PublicKey:
        """The PEM and JWK of a signing key version (the latest by default)."""
        key, versions = self._authorized(ctx, "get_public_key", ref)
        material = versions.latest if version is None else self._candidates(versions, version)[0]
        public = material.public_key()
        return m.PublicKey(key_id=key.id, key_version=material.version,
                           algorithm=material.spec.algorithm, pem=public.public_pem(),
                           jwk=public.jwk(kid=f"{key.id}:{material.version}"))

    @_audited("crypto.mac", "mac")
    def mac(self, ctx: RequestContext, ref: str, message: bytes) -> m.MacResult:
        """HMAC-SHA256 with the latest version."""
        key, versions = self._authorized(ctx, "mac", ref)
        self._check_message(message)
        latest = versions.latest
        return m.MacResult(mac=latest.mac(message), key_id=key.id, key_version=latest.version)

    @_audited("crypto.verify_mac", "verify_mac")
    def verify_mac(self, ctx: RequestContext, ref: str, req: m.VerifyMacRequest) -> m.VerifyResult:
        """Check a tag in constant time against one version, or every live version."""
        key, versions = self._authorized(ctx, "verify_mac", ref)
        self._check_message(req.message)
        for material in self._candidates(versions, req.key_version):
            if material.verify_mac(req.message, req.mac):
                return m.VerifyResult(valid=True, key_id=key.id, key_version=material.version)
        return m.VerifyResult(valid=False, key_id=key.id)

    # -- derive and random -----------------------------------------------------------------

    @_audited("crypto.derive", "derive")
    def derive(self, ctx: RequestContext, ref: str, req: m.DeriveRequest) -> m.DerivedKey:
        """HKDF-SHA256 output bound to the key version and the caller's context."""
        if not 1 <= req.length <= self.limits.max_derive_bytes:
            raise InvalidRequest(f"length must be 1..{self.limits.max_derive_bytes}")
        if req.salt is not None and len(req.salt) > 1024:
            raise InvalidRequest("salt is longer than 1024 bytes")
        # the context is the policy's to see, as for encrypt: it names what is derived for
        key, versions = self._authorized(ctx, "derive", ref, req.context)
        material = (versions.latest if req.key_version is None
                    else self._candidates(versions, req.key_version)[0])
        derived = material.derive(req.context, salt=req.salt, length=req.length)
        return m.DerivedKey(derived=derived, key_id=key.id, key_version=material.version)

    @_audited("metrics.read", "read_metrics")
    def read_metrics(self, ctx: RequestContext, render: Callable[[], bytes]) -> bytes:
        """This node's Prometheus metrics (``render`` builds them), for the admin or a
        principal allowed ``read_metrics``."""
        self._authorizer.authorize(ctx, "read_metrics", None)
        return render()

    @_audited("crypto.random", "generate_random")
    def random(self, ctx: RequestContext, n: int) -> m.RandomResult:
        """``n`` bytes from the server's CSPRNG."""
        self._authorizer.authorize(ctx, "generate_random", None)
        if not 1 <= n <= self.limits.max_random_bytes:
            raise InvalidRequest(f"bytes must be 1..{self.limits.max_random_bytes}")
        return m.RandomResult(random=random_bytes(n))
