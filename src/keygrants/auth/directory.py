"""The in-memory directory of principals and credentials that authentication reads.

Authentication runs on the event loop for every request, so it never reads the store: the
directory loads every principal and credential at start and the access service updates it
after each durable write (a revocation therefore takes effect on the very next request). Usage
times (last seen, last used) are kept here and written to the store in batches by
:meth:`Directory.flush_usage`, so a request costs no write; they are accurate to the flush
interval.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Final

import msgspec

from keygrants.auth.model import Credential, Principal
from keygrants.crypto.signing import SigningAlgorithm, VerifyingKey
from keygrants.store.base import Store

__all__ = ["Directory"]

_PAGE: Final = 1000


class Directory:
    """Principals and credentials by id, mTLS matches by rule, parsed public keys cached."""

    def __init__(self, store: Store,
                 open_secret: Callable[[Credential], bytes] | None = None) -> None:
        self._store = store
        self._open_secret = open_secret
        self._secrets: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._principals: dict[str, Principal] = {}
        self._credentials: dict[str, Credential] = {}
        self._by_match: dict[str, Credential] = {}
        self._keys: dict[str, VerifyingKey] = {}
        self._seen: dict[str, int] = {}
        self._used: dict[str, int] = {}
        self.generation = 0  # bumped by every change (policy facts caches key on it)
        self.reload()

    def reload(self) -> None:
        """Read everything from the store again."""
        principals: dict[str, Principal] = {}
        after: str | None = None
        while True:
            page = self._store.list_principals(limit=_PAGE, after=after)
            principals.update((p.id, p) for p in page)
            if len(page) < _PAGE:
                break
            after = page[-1].id
        credentials = {c.id: c for c in self._store.list_credentials()}
        with self._lock:
            self._principals = principals
            self._credentials = {}
            self._by_match = {}
            self._keys = {}
            for c in credentials.values():
                self._index(c)
            self.generation += 1

    def _index(self, c: Credential) -> None:
        old = self._credentials.get(c.id)
        if old is not None and old.match is not None:
            held = self._by_match.get(old.match)
            if held is not None and held.id == c.id:  # not another credential's mapping
                del self._by_match[old.match]
        self._credentials[c.id] = c
        self._keys.pop(c.id, None)
        self._secrets.pop(c.id, None)
        if c.kind == "mtls" and c.match is not None:
            # A certificate may be mapped again once its earlier credential is revoked: the
            # live mapping wins, whatever order the credentials are indexed in (a revoked one
            # read after it would refuse the certificate, and let a third principal map it).
            held = self._by_match.get(c.match)
            if held is None or held.revoked_at is not None or c.revoked_at is None:
                self._by_match[c.match] = c

    # -- reads (event loop) ------------------------------------------------------------------

    def principal(self, principal_id: str) -> Principal | None:
        return self._principals.get(principal_id)

    def credential(self, credential_id: str) -> Credential | None:
        return self._credentials.get(credential_id)

    def credential_for_match(self, match: str) -> Credential | None:
        return self._by_match.get(match)

    def shared_secret(self, credential: Credential) -> bytes:
        """The unsealed MAC key of a ``shared_secret`` credential (unsealed once).

        Raises:
            ValueError: when the directory was built without a way to unseal secrets.
        """
        secret = self._secrets.get(credential.id)
        if secret is None:
            if self._open_secret is None:
                raise ValueError("this directory cannot unseal shared secrets")
            secret = self._secrets[credential.id] = self._open_secret(credential)
        return secret

    def verifying_key(self, credential: Credential) -> VerifyingKey:
        """The parsed public key of a ``public_key`` credential (parsed once)."""
        key = self._keys.get(credential.id)
        if key is None:
            assert credential.public_key_der is not None and credential.algorithm is not None
            alg: SigningAlgorithm = credential.algorithm  # type: ignore[assignment]
            key = VerifyingKey.from_der(alg, credential.public_key_der)
            self._keys[credential.id] = key
        return key

    # -- updates (after durable writes) ----------------------------------------------------

    def put_principal(self, principal: Principal) -> None:
        with self._lock:
            self._principals[principal.id] = principal
            self.generation += 1

    def remove_principal(self, principal_id: str) -> None:
        with self._lock:
            self._principals.pop(principal_id, None)
            for cid in [c.id for c in self._credentials.values() if c.principal_id == principal_id]:
                c = self._credentials.pop(cid)
                self._keys.pop(cid, None)
                self._secrets.pop(cid, None)
                indexed = self._by_match.get(c.match) if c.match is not None else None
                if indexed is not None and indexed.id == c.id:
                    del self._by_match[indexed.match]  # type: ignore[arg-type]
            self.generation += 1

    def put_credential(self, credential: Credential) -> None:
        with self._lock:
            self._index(credential)
            self.generation += 1

    # -- usage -----------------------------------------------------------------------------

    def touch(self, principal_id: str, credential_id: str | None, now: int) -> None:
        """Note a successful authentication (no I/O)."""
        self._seen[principal_id] = now
        if credential_id is not None:
            self._used[credential_id] = now

    def flush_usage(self) -> int:
        """Write pending last-seen/last-used times to the store; return how many."""
        seen, self._seen = self._seen, {}
        used, self._used = self._used, {}
        # Snapshots (list() of a dict is one C call): a touch from the event loop that still
        # wrote into a swapped-out dict must not break this iteration.
        seen = dict(list(seen.items()))
        used = dict(list(used.items()))
        if not seen and not used:
            return 0
        self._store.record_usage(seen, used)
        with self._lock:
            for pid, ts in seen.items():
                p = self._principals.get(pid)
                if p is not None and (p.last_seen_at or 0) < ts:
                    self._principals[pid] = msgspec.structs.replace(p, last_seen_at=ts)
            for cid, ts in used.items():
                c = self._credentials.get(cid)
                if c is not None and (c.last_used_at or 0) < ts:
                    fresh = self._credentials[cid] = msgspec.structs.replace(c, last_used_at=ts)
                    if c.match is not None and self._by_match.get(c.match) is c:
                        self._by_match[c.match] = fresh  # keep the match index on the record
        return len(seen) + len(used)
