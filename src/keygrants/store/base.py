"""The store port: durable persistence of keys, versions, aliases, principals, credentials,
policies, grants, issuer keys, the revocation feed and server metadata.

Every method that writes returns only after the write is durable. Implementations raise
:class:`~keygrants.errors.AlreadyExists` for a taken name or alias,
:class:`~keygrants.errors.Conflict` when a compare-and-set loses a race, and
:class:`~keygrants.errors.StoreError` when the backend fails; they never raise their driver's
exceptions to the caller.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from typing import Protocol, runtime_checkable

import msgspec

from keygrants.auth.model import Credential, Policy, Principal
from keygrants.grants.issuer import IssuerKey
from keygrants.grants.model import Grant
from keygrants.grants.revocation import RevocationEntry
from keygrants.keys.model import Key, KeyVersion

__all__ = ["Alias", "Store", "ended_grant_entries"]


class Alias(tuple[str, str]):
    """``(alias, key_id)``."""

    __slots__ = ()

    @property
    def alias(self) -> str:
        """The alias name."""
        return self[0]

    @property
    def key_id(self) -> str:
        """The key it points to."""
        return self[1]


@runtime_checkable
class Store(Protocol):
    """Durable storage for the KMS core."""

    # -- metadata --------------------------------------------------------------------------
    def get_meta(self, name: str) -> bytes | None:
        """A server metadata value (sealed root key, admin token hash, ...)."""

    def set_meta_if_absent(self, name: str, value: bytes) -> bool:
        """Set a metadata value unless present; return whether this call set it."""

    def set_meta(self, name: str, value: bytes) -> None:
        """Set a metadata value."""

    # -- keys ------------------------------------------------------------------------------
    def create_key(self, key: Key, first_version: KeyVersion) -> None:
        """Insert a new key with its first version, atomically.

        Raises:
            AlreadyExists: if the name is taken by a key or an alias.
        """

    def get_key(self, key_id: str) -> Key | None:
        """A key by id."""

    def find_key(self, name: str) -> Key | None:
        """A key by name or alias."""

    def list_keys(self, *, limit: int, after: str | None = None) -> list[Key]:
        """Keys ordered by name, those after ``after``."""

    def update_key(self, key: Key, *, expected: Key) -> None:
        """Replace a key's metadata (same id) if the stored key still equals ``expected``,
        the copy the caller changed: a compare-and-set on the whole record, so a change made
        meanwhile by another node (even within the same second) is never overwritten.

        Raises:
            KeyNotFound: if the key does not exist.
            Conflict: if the stored key differs from ``expected``.
        """

    def add_version(self, key: Key, version: KeyVersion, *, expected: Key) -> None:
        """Insert a new version and move the key to it, atomically, if the stored key still
        equals ``expected`` (as :meth:`update_key`).

        Only ``latest_version``, ``next_rotation_at`` and ``updated_at`` are taken from
        ``key``. Its ``latest_version`` must equal ``version.version`` and the stored one must
        be ``version.version - 1``.

        Raises:
            KeyNotFound: if the key does not exist.
            Conflict: when another writer rotated or changed the key first.
        """

    def get_versions(self, key_id: str) -> list[KeyVersion]:
        """All stored versions of a key, oldest first."""

    def destroy_key(self, key_id: str, *, now: int) -> Key:
        """Delete every version's sealed material and mark the key ``destroyed``, atomically,
        but only if it is still pending deletion with its deletion date at or before ``now``
        (a deletion cancelled meanwhile, on any node, is never carried out).

        Returns:
            The key as stored: state ``destroyed``, ``previous_state`` cleared,
            ``updated_at`` at least ``now``.

        Raises:
            KeyNotFound: if the key does not exist.
            Conflict: if it is not pending deletion or its deletion date is still ahead.
        """

    def keys_due(self, now: int) -> list[Key]:
        """Keys whose rotation or deletion time has come."""

    # -- aliases ---------------------------------------------------------------------------
    def create_alias(self, alias: str, key_id: str) -> None:
        """Point a new alias at a key.

        Raises:
            AlreadyExists: if the alias is taken by a key name or another alias.
            KeyNotFound: if the key does not exist.
        """

    def delete_alias(self, alias: str) -> None:
        """Remove an alias.

        Raises:
            AliasNotFound: if there is no such alias.
        """

    def list_aliases(self, key_id: str | None = None) -> list[Alias]:
        """Aliases, optionally of one key, ordered by alias."""

    # -- principals and credentials ------------------------------------------------------
    def create_principal(self, principal: Principal) -> None:
        """Insert a principal.

        Raises:
            AlreadyExists: if the id is taken.
        """

    def get_principal(self, principal_id: str) -> Principal | None:
        """A principal by id."""

    def list_principals(self, *, limit: int, after: str | None = None) -> list[Principal]:
        """Principals ordered by id, those after ``after``."""

    def update_principal(self, principal: Principal, *, expected: Principal) -> None:
        """Replace a principal's record if the stored one still equals ``expected`` (the copy
        the caller changed), ``last_seen_at`` aside: that one only :meth:`record_usage`
        writes, and it is neither compared nor written here.

        Raises:
            PrincipalNotFound: if it does not exist.
            Conflict: if the stored principal differs from ``expected``.
        """

    def delete_principal(self, principal_id: str) -> None:
        """Delete a principal and all its credentials, atomically.

        Raises:
            PrincipalNotFound: if it does not exist.
        """

    def add_credential(self, credential: Credential) -> None:
        """Insert a credential of an existing principal.

        Raises:
            AlreadyExists: if the credential id is taken.
            PrincipalNotFound: if the principal does not exist.
        """

    def get_credential(self, credential_id: str) -> Credential | None:
        """A credential by id."""

    def list_credentials(self, principal_id: str | None = None) -> list[Credential]:
        """Credentials of one principal (or of all), ordered by principal then creation."""

    def update_credential(self, credential: Credential, *, expected: Credential) -> None:
        """Replace a credential's record (revocation, expiry) if the stored one still equals
        ``expected``, ``last_used_at`` aside (only :meth:`record_usage` writes it).

        Raises:
            CredentialNotFound: if it does not exist.
            Conflict: if the stored credential differs from ``expected``.
        """

    def record_usage(self, principals: Mapping[str, int], credentials: Mapping[str, int]) -> None:
        """Raise last-seen / last-used times (never lowers them); unknown ids are ignored."""

    # -- policies --------------------------------------------------------------------------
    def put_policy(self, policy: Policy) -> None:
        """Create or replace a named policy."""

    def get_policy(self, name: str) -> Policy | None:
        """A policy by name."""

    def list_policies(self) -> list[Policy]:
        """All policies ordered by name."""

    def delete_policy(self, name: str) -> None:
        """Delete a policy.

        Raises:
            PolicyNotFound: if there is no such policy.
        """

    # -- grants ----------------------------------------------------------------------------
    def create_grant(self, grant: Grant) -> None:
        """Insert a grant.

        Raises:
            AlreadyExists: if the id is taken.
        """

    def submit_create_grant(self, grant: Grant) -> Future[None] | asyncio.Future[None]:
        """Start :meth:`create_grant` without waiting: the future completes once the grant is
        durable (or fails with the same errors). For the event loop, which must not block;
        called on a running loop a store may answer with an ``asyncio.Future`` of that loop."""

    def delete_grant(self, grant_id: str) -> None:
        """Remove a grant (only to undo a creation whose audit event failed); no error if it
        does not exist."""

    def get_grant(self, grant_id: str) -> Grant | None:
        """A grant by id."""

    def list_grants(self, *, now: int, limit: int, after: str | None = None,
                    key_id: str | None = None, grantee: str | None = None,
                    retiring_principal: str | None = None, state: str | None = None
                    ) -> list[Grant]:
        """Grants ordered by id, those after ``after``, filtered; ``state`` is the effective
        state at ``now`` (``expired`` and ``exhausted`` are computed, not stored)."""

    def live_grant_ids(self, *, now: int, grantee: str | None = None, key_id: str | None = None,
                       parent_id: str | None = None,
                       parent_ids: Sequence[str] | None = None) -> list[str]:
        """Ids of grants in state ``active`` or ``pending`` that have not expired at ``now``,
        of one grantee, key or parent, or of any of ``parent_ids`` (exactly one filter is
        given; ``parent_ids`` may be long: one level of a revoke-all's sub-grants)."""

    def consume_grant_use(self, grant_id: str, now: int, n: int = 1) -> Grant | None:
        """Count ``n`` uses of a limited grant, atomically: only when it is ``active``, not
        expired at ``now`` and has ``n`` uses left (``n`` > 1 reserves a sub-grant's uses).
        Return the updated grant, or ``None`` when nothing was counted (the caller reads the
        grant to tell why).

        Raises:
            ValueError: if ``n`` is below 1.
        """

    def update_grant(self, grant: Grant, *, expected_state: str,
                     feed: Sequence[RevocationEntry] = ()) -> list[RevocationEntry]:
        """Save a grant's state, window and decision/end fields if its stored state is still
        ``expected_state``, and append ``feed`` entries, in one transaction; return the
        entries with their sequence numbers.

        Raises:
            GrantNotFound: if it does not exist.
            Conflict: if its state changed meanwhile.
        """

    def end_grants(self, grant_ids: Sequence[str], *, state: str, now: int, by: str,
                   feed: Sequence[RevocationEntry],
                   entry_leeway: int | None = None) -> list[RevocationEntry]:
        """Set ``state`` (``revoked``) on those of ``grant_ids`` still active or pending and
        append ``feed`` and, with ``entry_leeway``, one ``grant`` entry for each grant ended
        here (see :func:`ended_grant_entries`), in one transaction; return the numbered
        entries, ``feed`` first."""

    # -- revocation feed ---------------------------------------------------------------------
    def revocations_since(self, seq: int, *, limit: int) -> list[RevocationEntry]:
        """Feed entries with a sequence number above ``seq``, oldest first."""

    def latest_revocation_seq(self) -> int:
        """The newest entry's sequence number (0 for none). Pruned entries leave gaps a
        reader need not fill: every token they covered has expired."""

    def prune_revocations(self, now: int) -> int:
        """Drop entries whose tokens have all expired at ``now``; return how many."""

    # -- issuer keys ---------------------------------------------------------------------------
    def list_issuer_keys(self) -> list[IssuerKey]:
        """Every stored issuer key, by ``seq``."""

    def add_issuer_key(self, key: IssuerKey, retire: Sequence[tuple[str, int]]) -> None:
        """Insert a new issuer key and set the others' ``retire_at``, atomically.

        Raises:
            Conflict: if ``key.seq`` is taken (another node rotated first).
        """

    def delete_issuer_keys(self, *, retired_before: int) -> int:
        """Delete keys retired before the given time (their tokens have all expired)."""

    def close(self) -> None:
        """Release the backend."""


def _check_uses(n: int) -> None:
    """``consume_grant_use`` counts at least one use: a count below 1 would give uses back."""
    if n < 1:
        raise ValueError("n must be at least 1")


def _same_principal(stored: Principal, expected: Principal) -> bool:
    """Equal for a compare-and-set: ``last_seen_at`` moves with every request and is not the
    caller's to change."""
    return msgspec.structs.replace(stored, last_seen_at=expected.last_seen_at) == expected


def _same_credential(stored: Credential, expected: Credential) -> bool:
    """As :func:`_same_principal`, for ``last_used_at``."""
    return msgspec.structs.replace(stored, last_used_at=expected.last_used_at) == expected


def _destroyable(key: Key, now: int) -> bool:
    """Whether the scheduler may destroy the key now: still pending deletion, and due."""
    return (key.state == "pending_deletion" and key.deletion_date is not None
            and key.deletion_date <= now)


def _destroyed(key: Key, now: int) -> Key:
    return msgspec.structs.replace(key, state="destroyed", previous_state=None,
                                   updated_at=max(now, key.updated_at))


def ended_grant_entries(ended: Sequence[Grant], *, now: int,
                        leeway: int | None) -> list[RevocationEntry]:
    """The feed entries of grants a revocation ended (none without ``leeway``): one per grant,
    kept until the grant's own expiry plus ``leeway``, when no token of it is accepted."""
    if leeway is None:
        return []
    return [RevocationEntry(kind="grant", id=g.id, revoked_at=now, expires_at=g.expires_at + leeway)
            for g in ended]
