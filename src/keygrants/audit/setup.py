"""Opening the audit log of a server: its keys (sealed under the root key) and database.

The audit signing key (Ed25519, signs checkpoints) and the audit HMAC key (digests of
sensitive values) are generated on first start and kept in the store's metadata sealed under
the root key, like key material. The public half is also stored in clear as a signed-note
verifier key (``vkey``), so ``keygrants audit verify --data-dir`` can check a log without
unsealing anything; pin that vkey elsewhere (it is printed by ``keygrants audit key``) to
detect an attacker who replaced the whole database.

With an ``audit.db`` (a SQLite store), the store also keeps the log's high-water mark: the
newest durable checkpoint's signed note (``audit_mark``), updated by the log's checkpointer
within about an interval of each checkpoint and at stop. A log that no longer holds that
checkpoint's events with its root (deleted, emptied, truncated, rolled back together with its
own checkpoints) is refused at start, and once the store holds the audit keys a missing or
empty ``audit.db`` is refused rather than started afresh. Nodes sharing a PostgreSQL log keep
no mark (the log and the store are one database: they are rolled back together).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeGuard

from keygrants.audit.events import Digester
from keygrants.audit.log import AuditLog
from keygrants.audit.note import NoteSigner, format_vkey
from keygrants.audit.recorder import LogRecorder
from keygrants.crypto import Aead, SigningKey, random_bytes
from keygrants.keys.sealing import seal_named_secret, unseal_named_secret
from keygrants.store.base import Store

__all__ = ["AUDIT_DB_FILE", "MARK_META", "AuditSetup", "is_postgres_url", "open_audit"]

AUDIT_DB_FILE: Final = "audit.db"
_SIGNING_META: Final = "audit_signing_key"
_HMAC_META: Final = "audit_hmac_key"
_ORIGIN_META: Final = "audit_origin"
VKEY_META: Final = "audit_vkey"
MARK_META: Final = "audit_mark"


@dataclass(slots=True)
class AuditSetup:
    """The opened audit log and what the server needs from it."""

    log: AuditLog
    recorder: LogRecorder
    digester: Digester
    vkey: str
    origin: str


def _secret(store: Store, root: Aead, name: str, make: bytes) -> bytes:
    blob = seal_named_secret(root, name, make)
    if store.set_meta_if_absent(name, blob):
        return make
    stored = store.get_meta(name)
    assert stored is not None
    return unseal_named_secret(root, name, stored)


def is_postgres_url(url: str | None) -> TypeGuard[str]:
    return url is not None and url.split(":", 1)[0] in ("postgresql", "postgres")


def open_audit(store: Store, root_key: bytes, *, path: str | Path, node: str,
               checkpoint_interval: float = 1.0, store_url: str | None = None) -> AuditSetup:
    """Open (creating on first start) the audit keys and log: in ``path`` (SQLite), or in
    the store's database when ``store_url`` is PostgreSQL (one log for every node on it).

    Raises:
        InvalidCiphertext: if the stored audit keys do not open with this root key.
        AuditUnavailable: if the log cannot be opened, or is missing, damaged or shorter
            than the mark the store keeps (SQLite).
    """
    root = Aead("aes-256-gcm", root_key)
    origin_raw = store.get_meta(_ORIGIN_META)
    started_before = origin_raw is not None  # then its audit.db must still be there
    if origin_raw is None:
        store.set_meta_if_absent(_ORIGIN_META, f"keygrants.audit/{uuid.uuid4()}".encode())
        origin_raw = store.get_meta(_ORIGIN_META)
    assert origin_raw is not None
    origin = origin_raw.decode()
    signing = SigningKey.from_private_bytes(
        "ed25519", _secret(store, root, _SIGNING_META, SigningKey.generate("ed25519").private_bytes()))
    hmac_key = _secret(store, root, _HMAC_META, random_bytes(32))
    signer = NoteSigner(origin, signing)
    vkey = format_vkey(origin, signing.public_key())
    store.set_meta_if_absent(VKEY_META, vkey.encode())
    digester = Digester(hmac_key)
    log: AuditLog
    if is_postgres_url(store_url):
        from keygrants.audit.pglog import PostgresAuditLog

        log = PostgresAuditLog(store_url, signer=signer, origin=origin,
                               checkpoint_interval=checkpoint_interval)
    else:
        def record_mark(note: bytes) -> None:
            store.set_meta(MARK_META, note)

        log = AuditLog(path, signer=signer, origin=origin, checkpoint_interval=checkpoint_interval,
                       create=not started_before, mark=store.get_meta(MARK_META),
                       on_checkpoint=record_mark)
    return AuditSetup(log=log, recorder=LogRecorder(log, digester, node=node), digester=digester,
                      vkey=vkey, origin=origin)
