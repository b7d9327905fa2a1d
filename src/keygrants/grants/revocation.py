"""The revocation feed: a numbered log of revoked grants, principals and keys.

An entry revokes one grant (``kind="grant"``; ``reason`` ``revoked`` or ``retired``), or every
grant issued to a principal (``kind="principal"``) or for a key (``kind="key"``) up to its
``revoked_at`` (a grant issued later is not covered). ``expires_at`` is when every token the
entry covers has expired: after it the entry can be dropped. Sequence numbers are assigned by
the store, strictly increasing; a reader that has applied everything up to ``seq`` asks for
``?since=seq`` and gets what follows (DESIGN.md "Revocation feed").

:class:`RevocationView` is the in-memory set a token check consults: O(1) per token.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Final, Literal

import msgspec

from keygrants.errors import GrantRetired, GrantRevoked
from keygrants.grants.model import GrantClaims

__all__ = ["REVOCATION_KINDS", "RevocationEntry", "RevocationView"]

RevocationKind = Literal["grant", "principal", "key"]
REVOCATION_KINDS: Final = frozenset({"grant", "principal", "key"})


class RevocationEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One feed entry (``seq`` is 0 until the store numbers it)."""

    kind: RevocationKind
    id: str
    revoked_at: int
    expires_at: int
    reason: str = "revoked"
    seq: int = 0


class RevocationView:
    """The revocations that still cover a live token, indexed for the token check."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._grants: dict[str, RevocationEntry] = {}
        self._principals: dict[str, int] = {}
        self._keys: dict[str, int] = {}
        self._expiry: dict[tuple[str, str], int] = {}
        self.seq = 0

    def apply(self, entries: Iterable[RevocationEntry]) -> None:
        """Add entries (in any order; ``seq`` only moves forward)."""
        with self._lock:
            for e in entries:
                if e.kind == "grant":
                    self._grants[e.id] = e
                else:
                    table = self._principals if e.kind == "principal" else self._keys
                    table[e.id] = max(table.get(e.id, 0), e.revoked_at)
                key = (e.kind, e.id)
                self._expiry[key] = max(self._expiry.get(key, 0), e.expires_at)
                self.seq = max(self.seq, e.seq)

    def prune(self, now: int) -> int:
        """Drop entries whose tokens have all expired; return how many."""
        with self._lock:
            gone = [k for k, exp in self._expiry.items() if exp <= now]
            for kind, ident in gone:
                del self._expiry[(kind, ident)]
                if kind == "grant":
                    self._grants.pop(ident, None)
                elif kind == "principal":
                    self._principals.pop(ident, None)
                else:
                    self._keys.pop(ident, None)
            return len(gone)

    def check(self, claims: GrantClaims) -> None:
        """Raise :class:`GrantRevoked` (or :class:`GrantRetired`) if an entry covers the token:
        its grant, its parent grant, its grantee or its key."""
        entry = self._grants.get(claims.grant_id)
        if entry is not None:
            raise GrantRetired() if entry.reason == "retired" else GrantRevoked()
        if claims.parent_id is not None and claims.parent_id in self._grants:
            raise GrantRevoked()
        at = self._principals.get(claims.grantee)
        if at is not None and claims.issued_at <= at:
            raise GrantRevoked()
        at = self._keys.get(claims.key_id)
        if at is not None and claims.issued_at <= at:
            raise GrantRevoked()

    def wholesale_at(self, grantee: str, key_id: str) -> int:
        """The latest revocation time covering every grant of ``grantee`` or of ``key_id``
        (0 for none): a token for them must be issued after it to be usable."""
        return max(self._principals.get(grantee, 0), self._keys.get(key_id, 0))

    def __len__(self) -> int:
        return len(self._expiry)
