"""The grant record, its token claims, and the pure checks on both.

A grant says "principal P may perform operations O with key K, while the encryption context
satisfies C, between ``not_before`` and ``expires_at``, at most N times, bound to this
proof-of-possession key, for these audiences". :class:`Grant` is the stored record;
:class:`GrantClaims` is what a verified grant token carries. Constraints follow AWS KMS:
``encryption_context_equals`` requires the request's context to be exactly that map,
``encryption_context_subset`` requires it to contain every pair of that map (and allows more).
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import Final, Literal

import msgspec

from keygrants.crypto.random import nonce_bytes
from keygrants.errors import AttenuationViolated, ContextMismatch, InvalidRequest
from keygrants.keys.context import canonical_context

__all__ = [
    "CRYPTO_OPERATIONS",
    "GRANT_ID_PATTERN",
    "GRANT_OPERATIONS",
    "MAX_LEEWAY",
    "OPERATION_ACTIONS",
    "Grant",
    "GrantClaims",
    "GrantState",
    "check_attenuation",
    "check_constraint_map",
    "check_context",
    "is_grant_id",
    "new_grant_id",
]

GrantState = Literal["active", "pending", "exhausted", "expired", "retired", "revoked", "rejected"]

#: Operations a grant can name that are cryptographic operations on its key.
CRYPTO_OPERATIONS: Final = frozenset({
    "encrypt", "decrypt", "re_encrypt", "generate_data_key", "sign", "verify", "mac",
    "verify_mac", "derive",
})
#: Every operation a grant can name: the key's operations, ``describe`` (key metadata and the
#: public key) and ``create_grant`` (delegation: sub-grants of this grant).
GRANT_OPERATIONS: Final = CRYPTO_OPERATIONS | {"describe", "create_grant"}

#: The most clock leeway the KMS or a verifier may give a token's ``nbf``/``exp`` (seconds):
#: past ``exp`` + this, no one accepts a grant's token any more.
MAX_LEEWAY: Final = 300

#: The service actions a grant operation covers when the grant token is presented.
OPERATION_ACTIONS: Final[Mapping[str, frozenset[str]]] = {
    **{op: frozenset({op}) for op in CRYPTO_OPERATIONS},
    "describe": frozenset({"describe_key", "get_public_key"}),
    "create_grant": frozenset({"create_grant"}),
}

#: ``g_`` and 26 base32 characters (128 bits: creation time in ms, then 80 random bits).
GRANT_ID_PATTERN: Final = r"^g_[a-z2-7]{26}$"
_GRANT_ID_RE: Final = re.compile(GRANT_ID_PATTERN)


_B32: Final = "abcdefghijklmnopqrstuvwxyz234567"
_B32_PAIRS: Final = [a + b for a in _B32 for b in _B32]  # two characters (10 bits) a lookup


def new_grant_id(now_ms: int | None = None) -> str:
    """A fresh grant id (also the token's ``jti``): 48 bits of Unix time in milliseconds, then
    80 random bits, in lower-case RFC 4648 base32 (what ``base64.b32encode`` spells; it is pure
    Python, and 10x slower).

    Time first, so ids sort by creation: every index keyed by grant id then grows at its end
    instead of at a random page. With random ids each insert dirtied a page anywhere in four
    B-trees (the store's primary key, its per-key and per-grantee indexes, the audit log's
    per-grant index); as they outgrew the page cache every commit wrote more pages, and grant
    issuance slowed from round to round (2,400 to 2,200 grants/s, p99 15 to 26 ms, over
    three 5 s rounds; 2,600-2,770 grants/s, p99 ~10 ms, steady, with these ids). 80 random
    bits keep ids unguessable and, within one millisecond, unique (a collision is refused by
    the store's primary key, and the request asked to retry).
    """
    ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    if not 0 <= ms < 1 << 48:
        raise ValueError("the grant id time must fit in 48 bits of milliseconds")
    n = ((ms << 80) | int.from_bytes(nonce_bytes(10), "big")) << 2  # 130 bits: 26 groups of 5
    return "g_" + "".join([_B32_PAIRS[(n >> shift) & 1023] for shift in range(120, -1, -10)])


def is_grant_id(value: object) -> bool:
    """Whether ``value`` is shaped like a grant id (checked before any lookup)."""
    return isinstance(value, str) and _GRANT_ID_RE.fullmatch(value) is not None


class Grant(msgspec.Struct, frozen=True, kw_only=True):
    """A stored grant. ``state`` holds the states that are set by an action (``active``,
    ``pending``, ``retired``, ``revoked``, ``rejected``); :meth:`effective_state` adds the
    ones that follow from time and use (``expired``, ``exhausted``)."""

    id: str
    key_id: str
    grantee: str
    operations: tuple[str, ...]
    issuer: str
    created_at: int
    not_before: int
    expires_at: int
    state: str = "active"
    context_equals: dict[str, str] | None = None
    context_subset: dict[str, str] | None = None
    max_uses: int | None = None
    uses: int = 0
    audiences: tuple[str, ...] = ()
    cnf_jkt: str | None = None
    cnf_x5t: str | None = None
    name: str | None = None
    retiring_principal: str | None = None
    justification: str | None = None
    parent_id: str | None = None
    depth: int = 0
    requires_approval: bool = False
    decided_by: str | None = None
    decided_at: int | None = None
    ended_at: int | None = None
    ended_by: str | None = None
    trace: str | None = None

    def effective_state(self, now: int) -> GrantState:
        """The state a caller sees at time ``now``."""
        if self.state == "pending" and now >= self.expires_at:
            return "expired"  # a request not decided within its requested window
        if self.state != "active":
            return self.state  # type: ignore[return-value]
        if self.max_uses is not None and self.uses >= self.max_uses:
            return "exhausted"
        if now >= self.expires_at:
            return "expired"
        return "active"


class GrantClaims(msgspec.Struct, frozen=True, kw_only=True):
    """What a verified grant token says (DESIGN.md "Grant token")."""

    grant_id: str
    issuer: str
    grantee: str
    audiences: tuple[str, ...]
    issued_at: int
    not_before: int
    expires_at: int
    key_id: str
    operations: frozenset[str]
    context_equals: dict[str, str] | None = None
    context_subset: dict[str, str] | None = None
    max_uses: int | None = None
    cnf_jkt: str | None = None
    cnf_x5t: str | None = None
    parent_id: str | None = None
    trace: str | None = None
    kid: str = ""

    def covers(self, action: str) -> bool:
        """Whether the grant allows the service action ``action``."""
        return any(action in OPERATION_ACTIONS.get(op, ()) for op in self.operations)


def check_context(context: Mapping[str, str] | None, *, equals: Mapping[str, str] | None,
                  subset: Mapping[str, str] | None) -> None:
    """Raise :class:`ContextMismatch` unless ``context`` satisfies the constraints.

    ``equals``: the context must be exactly that map. ``subset``: the context must contain
    every pair of that map. Both may be present (then both must hold).
    """
    given = context or {}
    if equals is not None and dict(given) != dict(equals):
        raise ContextMismatch()
    if subset is not None:
        for k, v in subset.items():
            if given.get(k) != v:
                raise ContextMismatch()


def _context_implies(child_eq: Mapping[str, str] | None, child_sub: Mapping[str, str] | None,
                     parent_eq: Mapping[str, str] | None,
                     parent_sub: Mapping[str, str] | None) -> bool:
    """Whether every context the child accepts is accepted by the parent."""
    if parent_eq is not None and (child_eq is None or dict(child_eq) != dict(parent_eq)):
        return False
    if parent_sub is not None:
        # the child accepts a context only if it contains child_sub (or equals child_eq):
        # each pair the parent demands must be demanded by the child too
        demanded = dict(child_eq) if child_eq is not None else dict(child_sub or {})
        if child_eq is None and child_sub is None:
            return False
        for k, v in parent_sub.items():
            if demanded.get(k) != v:
                return False
    return True


def check_attenuation(child: Grant, parent: Grant | GrantClaims) -> None:
    """Raise :class:`AttenuationViolated` unless ``child`` is at most what ``parent`` allows:
    same key, operations a subset (``create_grant`` only if the parent has it), context at
    least as tight, a window inside the parent's, no more uses, audiences a subset (and none
    added when the parent has none), and the parent's proof-of-possession binding kept."""
    p_ops = parent.operations
    p_key = parent.key_id
    if child.key_id != p_key:
        raise AttenuationViolated("a sub-grant must be for the parent's key")
    if not set(child.operations) <= set(p_ops):
        raise AttenuationViolated("a sub-grant cannot add operations")
    if not _context_implies(child.context_equals, child.context_subset, parent.context_equals,
                            parent.context_subset):
        raise AttenuationViolated("a sub-grant's encryption context must be at least as tight")
    if child.not_before < parent.not_before or child.expires_at > parent.expires_at:
        raise AttenuationViolated("a sub-grant cannot outlive its parent")
    p_max = parent.max_uses
    if p_max is not None:
        used = parent.uses if isinstance(parent, Grant) else 0
        if child.max_uses is None or child.max_uses > max(0, p_max - used):
            raise AttenuationViolated("a sub-grant cannot have more uses than its parent has left")
    # no audiences means "the KMS only": a sub-grant may not add any then, and may not drop
    # to "the KMS only" from a parent whose audiences do not include the KMS
    p_aud = parent.audiences
    if not set(child.audiences) <= set(p_aud) or (p_aud and not child.audiences):
        raise AttenuationViolated("a sub-grant's audiences must be among the parent's")
    if parent.cnf_jkt is not None and child.cnf_jkt is None and child.cnf_x5t is None:
        raise AttenuationViolated("a sub-grant of a bound grant must be bound too")
    if parent.cnf_x5t is not None and child.cnf_jkt is None and child.cnf_x5t is None:
        raise AttenuationViolated("a sub-grant of a bound grant must be bound too")


def check_constraint_map(value: Mapping[str, str] | None, what: str) -> dict[str, str] | None:
    """Validate an encryption-context constraint map (the limits of a context).

    Raises:
        InvalidRequest: naming ``what`` when the map is not a valid encryption context.
    """
    if value is None:
        return None
    try:
        canonical_context(value)
    except InvalidRequest as exc:
        raise InvalidRequest(f"{what}: {exc.message}") from None
    return dict(value)
