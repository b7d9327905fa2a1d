"""An in-memory store for unit tests and :mod:`keygrants.testing` (not durable)."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future

import msgspec

from keygrants.auth.model import Credential, Policy, Principal
from keygrants.errors import (
    AliasNotFound,
    AlreadyExists,
    Conflict,
    CredentialNotFound,
    GrantNotFound,
    KeyNotFound,
    PolicyNotFound,
    PrincipalNotFound,
)
from keygrants.grants.issuer import IssuerKey
from keygrants.grants.model import Grant
from keygrants.grants.revocation import RevocationEntry
from keygrants.keys.model import Key, KeyVersion
from keygrants.store.base import (
    Alias,
    _check_uses,
    _destroyable,
    _destroyed,
    _same_credential,
    _same_principal,
    ended_grant_entries,
)

__all__ = ["MemoryStore"]


class MemoryStore:
    """Implements :class:`~keygrants.store.base.Store` with dicts behind one lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._meta: dict[str, bytes] = {}
        self._keys: dict[str, Key] = {}
        self._versions: dict[str, dict[int, KeyVersion]] = {}
        self._aliases: dict[str, str] = {}
        self._principals: dict[str, Principal] = {}
        self._credentials: dict[str, Credential] = {}
        self._policies: dict[str, Policy] = {}
        self._grants: dict[str, Grant] = {}
        self._feed: list[RevocationEntry] = []
        self._feed_seq = 0
        self._issuer_keys: dict[int, IssuerKey] = {}

    def get_meta(self, name: str) -> bytes | None:
        return self._meta.get(name)

    def set_meta_if_absent(self, name: str, value: bytes) -> bool:
        with self._lock:
            if name in self._meta:
                return False
            self._meta[name] = value
            return True

    def set_meta(self, name: str, value: bytes) -> None:
        with self._lock:
            self._meta[name] = value

    def _name_taken(self, name: str) -> bool:
        return name in self._aliases or any(k.name == name for k in self._keys.values())

    def create_key(self, key: Key, first_version: KeyVersion) -> None:
        with self._lock:
            if self._name_taken(key.name) or key.id in self._keys:
                raise AlreadyExists(f"name {key.name!r} is already in use")
            self._keys[key.id] = key
            self._versions[key.id] = {first_version.version: first_version}

    def get_key(self, key_id: str) -> Key | None:
        return self._keys.get(key_id)

    def find_key(self, name: str) -> Key | None:
        with self._lock:
            target = self._aliases.get(name)
            if target is not None:
                return self._keys.get(target)
            return next((k for k in self._keys.values() if k.name == name), None)

    def list_keys(self, *, limit: int, after: str | None = None) -> list[Key]:
        with self._lock:
            keys = sorted(self._keys.values(), key=lambda k: k.name)
        if after is not None:
            keys = [k for k in keys if k.name > after]
        return keys[:limit]

    def update_key(self, key: Key, *, expected: Key) -> None:
        with self._lock:
            current = self._keys.get(key.id)
            if current is None:
                raise KeyNotFound()
            if current != expected:
                raise Conflict("the key changed concurrently; retry")
            self._keys[key.id] = key

    def add_version(self, key: Key, version: KeyVersion, *, expected: Key) -> None:
        with self._lock:
            current = self._keys.get(key.id)
            if current is None:
                raise KeyNotFound()
            if current.latest_version != version.version - 1 or key.latest_version != version.version:
                raise Conflict("the key was rotated concurrently; retry")
            if current != expected:
                raise Conflict("the key changed concurrently; retry")
            self._versions[key.id][version.version] = version
            self._keys[key.id] = msgspec.structs.replace(
                current, latest_version=key.latest_version, next_rotation_at=key.next_rotation_at,
                updated_at=key.updated_at)

    def get_versions(self, key_id: str) -> list[KeyVersion]:
        with self._lock:
            return [v for _, v in sorted(self._versions.get(key_id, {}).items())]

    def destroy_key(self, key_id: str, *, now: int) -> Key:
        with self._lock:
            current = self._keys.get(key_id)
            if current is None:
                raise KeyNotFound()
            if not _destroyable(current, now):
                raise Conflict("the key is no longer due for destruction")
            self._versions[key_id] = {
                n: msgspec.structs.replace(v, sealed=b"") for n, v in self._versions[key_id].items()
            }
            dead = self._keys[key_id] = _destroyed(current, now)
            return dead

    def keys_due(self, now: int) -> list[Key]:
        with self._lock:
            return [
                k for k in self._keys.values()
                if (k.state == "enabled" and k.next_rotation_at is not None
                    and k.next_rotation_at <= now)
                or (k.state == "pending_deletion" and k.deletion_date is not None
                    and k.deletion_date <= now)
            ]

    def create_alias(self, alias: str, key_id: str) -> None:
        with self._lock:
            if self._name_taken(alias):
                raise AlreadyExists(f"name {alias!r} is already in use")
            if key_id not in self._keys:
                raise KeyNotFound()
            self._aliases[alias] = key_id

    def delete_alias(self, alias: str) -> None:
        with self._lock:
            if self._aliases.pop(alias, None) is None:
                raise AliasNotFound()

    def list_aliases(self, key_id: str | None = None) -> list[Alias]:
        with self._lock:
            return [Alias((a, k)) for a, k in sorted(self._aliases.items())
                    if key_id is None or k == key_id]

    # -- principals and credentials ------------------------------------------------------

    def create_principal(self, principal: Principal) -> None:
        with self._lock:
            if principal.id in self._principals:
                raise AlreadyExists(f"principal {principal.id!r} already exists")
            self._principals[principal.id] = principal

    def get_principal(self, principal_id: str) -> Principal | None:
        return self._principals.get(principal_id)

    def list_principals(self, *, limit: int, after: str | None = None) -> list[Principal]:
        with self._lock:
            out = sorted(self._principals.values(), key=lambda p: p.id)
        return [p for p in out if after is None or p.id > after][:limit]

    def update_principal(self, principal: Principal, *, expected: Principal) -> None:
        with self._lock:
            current = self._principals.get(principal.id)
            if current is None:
                raise PrincipalNotFound()
            if not _same_principal(current, expected):
                raise Conflict("the principal changed concurrently; retry")
            self._principals[principal.id] = msgspec.structs.replace(
                principal, last_seen_at=current.last_seen_at)

    def delete_principal(self, principal_id: str) -> None:
        with self._lock:
            if self._principals.pop(principal_id, None) is None:
                raise PrincipalNotFound()
            for cid in [c.id for c in self._credentials.values() if c.principal_id == principal_id]:
                del self._credentials[cid]

    def add_credential(self, credential: Credential) -> None:
        with self._lock:
            if credential.principal_id not in self._principals:
                raise PrincipalNotFound()
            if credential.id in self._credentials:
                raise AlreadyExists(f"credential {credential.id!r} already exists")
            self._credentials[credential.id] = credential

    def get_credential(self, credential_id: str) -> Credential | None:
        return self._credentials.get(credential_id)

    def list_credentials(self, principal_id: str | None = None) -> list[Credential]:
        with self._lock:
            creds = [c for c in self._credentials.values()
                     if principal_id is None or c.principal_id == principal_id]
        return sorted(creds, key=lambda c: (c.principal_id, c.created_at, c.id))

    def update_credential(self, credential: Credential, *, expected: Credential) -> None:
        with self._lock:
            current = self._credentials.get(credential.id)
            if current is None:
                raise CredentialNotFound()
            if not _same_credential(current, expected):
                raise Conflict("the credential changed concurrently; retry")
            self._credentials[credential.id] = msgspec.structs.replace(
                credential, last_used_at=current.last_used_at)

    def record_usage(self, principals: Mapping[str, int], credentials: Mapping[str, int]) -> None:
        with self._lock:
            for pid, ts in principals.items():
                p = self._principals.get(pid)
                if p is not None and (p.last_seen_at or 0) < ts:
                    self._principals[pid] = msgspec.structs.replace(p, last_seen_at=ts)
            for cid, ts in credentials.items():
                c = self._credentials.get(cid)
                if c is not None and (c.last_used_at or 0) < ts:
                    self._credentials[cid] = msgspec.structs.replace(c, last_used_at=ts)

    # -- policies --------------------------------------------------------------------------

    def put_policy(self, policy: Policy) -> None:
        with self._lock:
            self._policies[policy.name] = policy

    def get_policy(self, name: str) -> Policy | None:
        return self._policies.get(name)

    def list_policies(self) -> list[Policy]:
        with self._lock:
            return [p for _, p in sorted(self._policies.items())]

    def delete_policy(self, name: str) -> None:
        with self._lock:
            if self._policies.pop(name, None) is None:
                raise PolicyNotFound()

    # -- grants ------------------------------------------------------------------------------

    def create_grant(self, grant: Grant) -> None:
        with self._lock:
            if grant.id in self._grants:
                raise AlreadyExists("grant id taken")
            self._grants[grant.id] = grant

    def submit_create_grant(self, grant: Grant) -> Future[None]:
        done: Future[None] = Future()
        try:
            self.create_grant(grant)
            done.set_result(None)
        except AlreadyExists as exc:
            done.set_exception(exc)
        return done

    def delete_grant(self, grant_id: str) -> None:
        with self._lock:
            self._grants.pop(grant_id, None)

    def get_grant(self, grant_id: str) -> Grant | None:
        return self._grants.get(grant_id)

    def list_grants(self, *, now: int, limit: int, after: str | None = None,
                    key_id: str | None = None, grantee: str | None = None,
                    retiring_principal: str | None = None, state: str | None = None
                    ) -> list[Grant]:
        with self._lock:
            out: list[Grant] = []
            for gid in sorted(self._grants):
                g = self._grants[gid]
                if ((after is not None and gid <= after) or (key_id is not None and g.key_id != key_id)
                        or (grantee is not None and g.grantee != grantee)
                        or (retiring_principal is not None
                            and g.retiring_principal != retiring_principal)
                        or (state is not None and g.effective_state(now) != state)):
                    continue
                if len(out) >= limit:
                    break
                out.append(g)
            return out

    def live_grant_ids(self, *, now: int, grantee: str | None = None, key_id: str | None = None,
                       parent_id: str | None = None,
                       parent_ids: Sequence[str] | None = None) -> list[str]:
        parents = set(parent_ids) if parent_ids is not None else None
        with self._lock:
            return sorted(
                g.id for g in self._grants.values()
                if g.state in ("active", "pending") and g.expires_at > now
                and (grantee is None or g.grantee == grantee)
                and (key_id is None or g.key_id == key_id)
                and (parent_id is None or g.parent_id == parent_id)
                and (parents is None or g.parent_id in parents))

    def consume_grant_use(self, grant_id: str, now: int, n: int = 1) -> Grant | None:
        _check_uses(n)
        with self._lock:
            g = self._grants.get(grant_id)
            if (g is None or g.state != "active" or g.expires_at <= now or g.max_uses is None
                    or g.uses + n > g.max_uses):
                return None
            g = msgspec.structs.replace(g, uses=g.uses + n)
            self._grants[grant_id] = g
            return g

    def _append_feed(self, feed: Sequence[RevocationEntry]) -> list[RevocationEntry]:
        out = []
        for e in feed:
            self._feed_seq += 1
            numbered = msgspec.structs.replace(e, seq=self._feed_seq)
            self._feed.append(numbered)
            out.append(numbered)
        return out

    def update_grant(self, grant: Grant, *, expected_state: str,
                     feed: Sequence[RevocationEntry] = ()) -> list[RevocationEntry]:
        with self._lock:
            current = self._grants.get(grant.id)
            if current is None:
                raise GrantNotFound()
            if current.state != expected_state:
                raise Conflict("the grant changed meanwhile")
            self._grants[grant.id] = msgspec.structs.replace(
                current, state=grant.state, not_before=grant.not_before,
                expires_at=grant.expires_at, decided_by=grant.decided_by,
                decided_at=grant.decided_at, ended_at=grant.ended_at, ended_by=grant.ended_by)
            return self._append_feed(feed)

    def end_grants(self, grant_ids: Sequence[str], *, state: str, now: int, by: str,
                   feed: Sequence[RevocationEntry],
                   entry_leeway: int | None = None) -> list[RevocationEntry]:
        with self._lock:
            ended = []
            for gid in grant_ids:
                g = self._grants.get(gid)
                if g is not None and g.state in ("active", "pending"):
                    ended.append(g)
                    self._grants[gid] = msgspec.structs.replace(g, state=state, ended_at=now,
                                                                ended_by=by)
            return self._append_feed([*feed, *ended_grant_entries(ended, now=now,
                                                                  leeway=entry_leeway)])

    def revocations_since(self, seq: int, *, limit: int) -> list[RevocationEntry]:
        with self._lock:
            return [e for e in self._feed if e.seq > seq][:limit]

    def latest_revocation_seq(self) -> int:
        return self._feed_seq

    def prune_revocations(self, now: int) -> int:
        with self._lock:
            keep = [e for e in self._feed if e.expires_at > now]
            gone = len(self._feed) - len(keep)
            self._feed = keep
            return gone

    # -- issuer keys -------------------------------------------------------------------------

    def list_issuer_keys(self) -> list[IssuerKey]:
        with self._lock:
            return [self._issuer_keys[s] for s in sorted(self._issuer_keys)]

    def add_issuer_key(self, key: IssuerKey, retire: Sequence[tuple[str, int]]) -> None:
        with self._lock:
            if key.seq in self._issuer_keys:
                raise Conflict("another issuer key rotation won")
            if any(k.kid == key.kid for k in self._issuer_keys.values()):
                raise AlreadyExists(f"issuer key {key.kid!r} already exists")
            when = dict(retire)
            for seq, k in list(self._issuer_keys.items()):
                if k.kid in when:
                    self._issuer_keys[seq] = msgspec.structs.replace(k, retire_at=when[k.kid])
            self._issuer_keys[key.seq] = key

    def delete_issuer_keys(self, *, retired_before: int) -> int:
        with self._lock:
            gone = [s for s, k in self._issuer_keys.items()
                    if k.retire_at is not None and k.retire_at < retired_before]
            for s in gone:
                del self._issuer_keys[s]
            return len(gone)

    def close(self) -> None:
        pass
