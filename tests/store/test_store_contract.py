"""The Store contract, run against every implementation (memory, SQLite, PostgreSQL)."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import msgspec
import pytest

from keygrants.auth.model import Credential, Policy, Principal
from keygrants.errors import (
    AliasNotFound,
    AlreadyExists,
    Conflict,
    CredentialNotFound,
    KeyNotFound,
    PolicyNotFound,
    PrincipalNotFound,
    StoreError,
)
from keygrants.keys.model import Key, KeyVersion
from keygrants.store import open_store
from keygrants.store.base import Store
from keygrants.store.sqlite import _MIGRATIONS as _SQLITE_MIGRATIONS
from keygrants.store.sqlite import SQLiteStore


def make_key(name: str, **kw: object) -> tuple[Key, KeyVersion]:
    kid = str(uuid.uuid4())
    key = Key(id=kid, name=name, spec="aes-256-gcm", purpose="encrypt-decrypt", created_at=100,
              updated_at=100, **kw)  # type: ignore[arg-type]
    return key, KeyVersion(key_id=kid, version=1, created_at=100, sealed=b"sealed-1")


def test_meta(store: Store) -> None:
    assert store.get_meta("x") is None
    assert store.set_meta_if_absent("x", b"1")
    assert not store.set_meta_if_absent("x", b"2")
    assert store.get_meta("x") == b"1"
    store.set_meta("x", b"3")
    assert store.get_meta("x") == b"3"


def test_create_get_find(store: Store) -> None:
    key, v1 = make_key("payments", description="d", rotation_period=60, next_rotation_at=160)
    store.create_key(key, v1)
    assert store.get_key(key.id) == key
    assert store.find_key("payments") == key
    assert store.find_key("missing") is None
    assert store.get_versions(key.id) == [v1]
    dup, dv = make_key("payments")
    with pytest.raises(AlreadyExists):
        store.create_key(dup, dv)
    assert store.get_key(dup.id) is None and store.get_versions(dup.id) == []


def test_list_order_and_pages(store: Store) -> None:
    for n in ["b", "a", "c"]:
        store.create_key(*make_key(n))
    assert [k.name for k in store.list_keys(limit=10)] == ["a", "b", "c"]
    assert [k.name for k in store.list_keys(limit=1, after="a")] == ["b"]


def test_update_compare_and_set(store: Store) -> None:
    key, v1 = make_key("k")
    store.create_key(key, v1)
    changed = msgspec.structs.replace(key, state="disabled", updated_at=101)
    store.update_key(changed, expected=key)
    assert store.get_key(key.id) == changed
    with pytest.raises(Conflict):
        store.update_key(msgspec.structs.replace(key, updated_at=102), expected=key)
    assert store.get_key(key.id) == changed
    ghost = make_key("ghost")[0]
    with pytest.raises(KeyNotFound):
        store.update_key(ghost, expected=ghost)


def test_add_version_is_atomic_and_ordered(store: Store) -> None:
    key, v1 = make_key("k")
    store.create_key(key, v1)
    v2 = KeyVersion(key_id=key.id, version=2, created_at=101, sealed=b"sealed-2")
    rotated = msgspec.structs.replace(key, latest_version=2)
    store.add_version(rotated, v2, expected=key)
    assert store.get_key(key.id).latest_version == 2  # type: ignore[union-attr]
    assert [v.version for v in store.get_versions(key.id)] == [1, 2]
    stale = KeyVersion(key_id=key.id, version=2, created_at=102, sealed=b"other")
    with pytest.raises(Conflict):
        store.add_version(rotated, stale, expected=rotated)
    assert store.get_versions(key.id)[1].sealed == b"sealed-2"


def test_concurrent_rotations_one_winner(store: Store) -> None:
    key, v1 = make_key("k")
    store.create_key(key, v1)
    outcomes: list[str] = []

    def rotate(i: int) -> None:
        v = KeyVersion(key_id=key.id, version=2, created_at=101, sealed=f"s{i}".encode())
        try:
            store.add_version(msgspec.structs.replace(key, latest_version=2), v, expected=key)
            outcomes.append("won")
        except Conflict:
            outcomes.append("lost")

    threads = [threading.Thread(target=rotate, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["lost"] * 7 + ["won"]
    assert len(store.get_versions(key.id)) == 2


def test_destroy_wipes_material(store: Store) -> None:
    key, v1 = make_key("k", state="pending_deletion", previous_state="enabled", deletion_date=150)
    store.create_key(key, v1)
    dead = store.destroy_key(key.id, now=150)
    assert dead == msgspec.structs.replace(key, state="destroyed", previous_state=None,
                                           updated_at=150)
    assert store.get_key(key.id) == dead
    assert [v.sealed for v in store.get_versions(key.id)] == [b""]


def test_keys_due(store: Store) -> None:
    rot, v = make_key("rot", rotation_period=60, next_rotation_at=160)
    store.create_key(rot, v)
    dis, v = make_key("dis", state="disabled", rotation_period=60, next_rotation_at=160)
    store.create_key(dis, v)
    gone, v = make_key("gone", state="pending_deletion", deletion_date=200)
    store.create_key(gone, v)
    store.create_key(*make_key("plain"))
    assert store.keys_due(159) == []
    assert [k.name for k in store.keys_due(160)] == ["rot"]
    assert sorted(k.name for k in store.keys_due(200)) == ["gone", "rot"]


def test_aliases(store: Store) -> None:
    key, v1 = make_key("k")
    store.create_key(key, v1)
    other, ov = make_key("other")
    store.create_key(other, ov)
    store.create_alias("a2", key.id)
    store.create_alias("a1", key.id)
    store.create_alias("b", other.id)
    assert store.find_key("a1") == key
    assert [a.alias for a in store.list_aliases()] == ["a1", "a2", "b"]
    assert [(a.alias, a.key_id) for a in store.list_aliases(key.id)] == [("a1", key.id),
                                                                           ("a2", key.id)]
    for taken in ("a1", "k"):
        with pytest.raises(AlreadyExists):
            store.create_alias(taken, other.id)
    with pytest.raises(KeyNotFound):
        store.create_alias("x", str(uuid.uuid4()))
    store.delete_alias("a1")
    assert store.find_key("a1") is None
    with pytest.raises(AliasNotFound):
        store.delete_alias("a1")


def test_sqlite_is_durable_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "kg.db"
    s = SQLiteStore(path)
    key, v1 = make_key("k")
    s.create_key(key, v1)
    s.set_meta("m", b"v")
    s.close()
    again = SQLiteStore(path)
    assert again.get_key(key.id) == key and again.get_meta("m") == b"v"
    assert again.get_versions(key.id) == [v1]
    mode = path.stat().st_mode & 0o777
    assert mode == 0o600
    journal = again._db.execute("PRAGMA journal_mode").fetchone()[0]
    sync = again._db.execute("PRAGMA synchronous").fetchone()[0]
    assert (journal, sync) == ("wal", 2)  # WAL with synchronous=FULL
    again.close()


def test_open_store_by_url(tmp_path: Path) -> None:
    s = open_store(f"sqlite://{tmp_path / 'x.db'}")
    assert isinstance(s, SQLiteStore)
    s.close()
    with pytest.raises(ValueError, match="unknown store URL scheme"):
        open_store("mysql://x")
    with pytest.raises(ValueError, match="needs a path"):
        open_store("sqlite:")


# -- principals, credentials, policies ----------------------------------------------------------

def _principal(pid: str, **kw: object) -> Principal:
    return Principal(id=pid, created_at=100, updated_at=100, **kw)  # type: ignore[arg-type]


def _credential(cid: str, pid: str, **kw: object) -> Credential:
    base: dict[str, object] = {"kind": "api_key", "secret_digest": b"d" * 32, "not_before": 100,
                               "created_at": 100}
    base.update(kw)
    return Credential(id=cid, principal_id=pid, **base)  # type: ignore[arg-type]


def test_principal_crud(store: Store) -> None:
    p = _principal("svc-billing", display_name="Billing", tags=("payments", "team=a"))
    store.create_principal(p)
    assert store.get_principal("svc-billing") == p
    with pytest.raises(AlreadyExists):
        store.create_principal(p)
    store.create_principal(_principal("alice"))
    assert [x.id for x in store.list_principals(limit=10)] == ["alice", "svc-billing"]
    assert [x.id for x in store.list_principals(limit=10, after="alice")] == ["svc-billing"]
    disabled = msgspec.structs.replace(p, enabled=False, updated_at=101)
    store.update_principal(disabled, expected=p)
    assert store.get_principal("svc-billing") == disabled
    with pytest.raises(PrincipalNotFound):
        store.update_principal(_principal("ghost"), expected=_principal("ghost"))
    with pytest.raises(PrincipalNotFound):
        store.delete_principal("ghost")


def test_credentials_follow_their_principal(store: Store) -> None:
    store.create_principal(_principal("svc"))
    pk = _credential("thumb", "svc", kind="public_key", algorithm="ed25519",
                     public_key_der=b"\x30" * 44, secret_digest=None)
    ak = _credential("ak1", "svc", created_at=101)
    store.add_credential(pk)
    store.add_credential(ak)
    assert store.get_credential("thumb") == pk
    assert store.list_credentials("svc") == [pk, ak]
    with pytest.raises(AlreadyExists):
        store.add_credential(pk)
    with pytest.raises(PrincipalNotFound):
        store.add_credential(_credential("x", "ghost"))
    revoked = msgspec.structs.replace(ak, revoked_at=150)
    store.update_credential(revoked, expected=ak)
    assert store.get_credential("ak1") == revoked
    with pytest.raises(CredentialNotFound):
        store.update_credential(_credential("nope", "svc"), expected=_credential("nope", "svc"))
    store.delete_principal("svc")
    assert store.get_credential("thumb") is None and store.list_credentials() == []


def test_record_usage_only_moves_forward(store: Store) -> None:
    store.create_principal(_principal("svc"))
    store.add_credential(_credential("ak1", "svc"))
    store.record_usage({"svc": 200, "ghost": 1}, {"ak1": 200, "ghost": 1})
    store.record_usage({"svc": 150}, {"ak1": 150})
    p, c = store.get_principal("svc"), store.get_credential("ak1")
    assert p is not None and p.last_seen_at == 200
    assert c is not None and c.last_used_at == 200


def test_policies(store: Store) -> None:
    pol = Policy(name="billing", text="permit(principal, action, resource);", created_at=1,
                 updated_at=1)
    store.put_policy(pol)
    assert store.get_policy("billing") == pol
    newer = msgspec.structs.replace(pol, text="forbid(principal, action, resource);", updated_at=2)
    store.put_policy(newer)
    assert store.list_policies() == [newer]
    store.delete_policy("billing")
    assert store.get_policy("billing") is None
    with pytest.raises(PolicyNotFound):
        store.delete_policy("billing")


def test_key_tags_round_trip(store: Store) -> None:
    key, v1 = make_key("tagged", tags=("pci", "team=payments"))
    store.create_key(key, v1)
    assert store.get_key(key.id) == key
    retagged = msgspec.structs.replace(key, tags=(), updated_at=101)
    store.update_key(retagged, expected=key)
    assert store.get_key(key.id) == retagged


def test_sqlite_migrates_a_version_1_database(tmp_path: Path) -> None:
    import sqlite3

    from keygrants.store.sqlite import _MIGRATIONS

    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(_MIGRATIONS[0] + "; PRAGMA user_version=1;")
    db.execute("INSERT INTO keys (id, name, spec, purpose, description, state, derivable, "
               "created_at, updated_at, min_decryption_version, latest_version) VALUES "
               "('k1', 'old', 'aes-256-gcm', 'encrypt-decrypt', '', 'enabled', 0, 1, 1, 1, 1)")
    db.commit()
    db.close()
    store = SQLiteStore(path)
    try:
        old = store.find_key("old")
        assert old is not None and old.tags == ()
        store.create_principal(_principal("p"))
        assert store.get_principal("p") is not None
    finally:
        store.close()


# -- compare-and-set between nodes (two store objects on one database) ---------------------------

def test_rotation_does_not_undo_a_concurrent_disable(store: Store, second_node: Store) -> None:
    key, v1 = make_key("k", rotation_period=60, next_rotation_at=160)
    store.create_key(key, v1)
    seen = store.get_key(key.id)  # node A (a rotation, or the scheduler) reads the key
    assert seen is not None
    other = second_node.get_key(key.id)  # node B disables it meanwhile
    assert other is not None
    second_node.update_key(msgspec.structs.replace(other, state="disabled"), expected=other)
    v2 = KeyVersion(key_id=key.id, version=2, created_at=101, sealed=b"sealed-2")
    with pytest.raises(Conflict):
        store.add_version(msgspec.structs.replace(seen, latest_version=2, next_rotation_at=220), v2,
                          expected=seen)
    after = store.get_key(key.id)
    assert after is not None and after.state == "disabled" and after.latest_version == 1
    assert store.get_versions(key.id) == [v1]


def test_add_version_writes_only_the_rotation(store: Store) -> None:
    key, v1 = make_key("k", description="old", rotation_period=60, next_rotation_at=160)
    store.create_key(key, v1)
    v2 = KeyVersion(key_id=key.id, version=2, created_at=170, sealed=b"sealed-2")
    # fields of the caller's copy other than the rotation's are not written
    rotated = msgspec.structs.replace(key, latest_version=2, next_rotation_at=230, updated_at=170,
                                      description="stale", state="disabled")
    store.add_version(rotated, v2, expected=key)
    assert store.get_key(key.id) == msgspec.structs.replace(
        key, latest_version=2, next_rotation_at=230, updated_at=170)


def test_cancelled_deletion_is_not_carried_out(store: Store, second_node: Store) -> None:
    key, v1 = make_key("k", state="pending_deletion", previous_state="enabled", deletion_date=150)
    store.create_key(key, v1)
    assert [k.id for k in store.keys_due(200)] == [key.id]  # node A's scheduler sees it due
    pending = second_node.get_key(key.id)  # node B cancels the deletion meanwhile
    assert pending is not None
    second_node.update_key(msgspec.structs.replace(pending, state="enabled", previous_state=None,
                                                   deletion_date=None, updated_at=190),
                           expected=pending)
    with pytest.raises(Conflict):
        store.destroy_key(key.id, now=200)
    after = store.get_key(key.id)
    assert after is not None and after.state == "enabled"
    assert store.get_versions(key.id) == [v1]


def test_destroy_only_when_due(store: Store) -> None:
    key, v1 = make_key("k", state="pending_deletion", previous_state="enabled", deletion_date=150)
    store.create_key(key, v1)
    with pytest.raises(Conflict):
        store.destroy_key(key.id, now=149)
    live, lv = make_key("live")
    store.create_key(live, lv)
    with pytest.raises(Conflict):
        store.destroy_key(live.id, now=10_000)
    with pytest.raises(KeyNotFound):
        store.destroy_key(str(uuid.uuid4()), now=10_000)
    assert store.get_key(key.id) == key and store.get_versions(key.id) == [v1]
    assert store.get_versions(live.id) == [lv]


def test_two_changes_in_one_second_do_not_lose_one(store: Store, second_node: Store) -> None:
    key, v1 = make_key("k")
    store.create_key(key, v1)
    seen_a, seen_b = store.get_key(key.id), second_node.get_key(key.id)
    assert seen_a is not None and seen_b is not None
    # both in second 100: updated_at stays 100, yet B's stale copy must not win
    store.update_key(msgspec.structs.replace(seen_a, state="disabled"), expected=seen_a)
    with pytest.raises(Conflict):
        second_node.update_key(msgspec.structs.replace(seen_b, description="new"), expected=seen_b)
    after = store.get_key(key.id)
    assert after is not None and (after.state, after.description) == ("disabled", "")


def test_principal_update_is_compare_and_set(store: Store, second_node: Store) -> None:
    p = _principal("svc", display_name="Svc")
    store.create_principal(p)
    stale = second_node.get_principal("svc")  # node B reads, to rename
    assert stale is not None
    store.update_principal(msgspec.structs.replace(p, enabled=False), expected=p)  # A disables
    with pytest.raises(Conflict):
        second_node.update_principal(msgspec.structs.replace(stale, display_name="renamed"),
                                     expected=stale)
    after = store.get_principal("svc")
    assert after is not None and not after.enabled and after.display_name == "Svc"


def test_update_principal_leaves_last_seen_alone(store: Store, second_node: Store) -> None:
    p = _principal("svc")
    store.create_principal(p)
    second_node.record_usage({"svc": 500}, {})  # a request seen after the read
    renamed = msgspec.structs.replace(p, display_name="renamed", updated_at=101)
    store.update_principal(renamed, expected=p)  # not a conflict: usage is not the caller's
    assert store.get_principal("svc") == msgspec.structs.replace(renamed, last_seen_at=500)


def test_credential_update_is_compare_and_set(store: Store, second_node: Store) -> None:
    store.create_principal(_principal("svc"))
    cred = _credential("ak1", "svc", expires_at=1000)
    store.add_credential(cred)
    second_node.record_usage({}, {"ak1": 500})
    stale = second_node.get_credential("ak1")
    assert stale is not None
    revoked = msgspec.structs.replace(cred, revoked_at=150)
    store.update_credential(revoked, expected=cred)  # usage moved meanwhile: no conflict
    assert store.get_credential("ak1") == msgspec.structs.replace(revoked, last_used_at=500)
    with pytest.raises(Conflict):  # but a stale copy does not undo the revocation
        second_node.update_credential(msgspec.structs.replace(stale, expires_at=2000),
                                      expected=stale)
    after = store.get_credential("ak1")
    assert after is not None and after.revoked_at == 150 and after.expires_at == 1000


def test_alias_taken_by_an_alias_wins_over_an_unknown_key(store: Store) -> None:
    key, v1 = make_key("k")
    store.create_key(key, v1)
    store.create_alias("a", key.id)
    with pytest.raises(AlreadyExists):
        store.create_alias("a", str(uuid.uuid4()))


def test_text_that_is_not_unicode_is_a_store_answer(store: Store) -> None:
    # a lone surrogate cannot be encoded for SQLite or PostgreSQL: never the driver's error
    try:
        found = store.find_key("a\ud800b")
    except StoreError:
        pass
    else:
        assert found is None
    with pytest.raises((StoreError, AlreadyExists, KeyNotFound)):
        store.create_alias("a\ud800b", str(uuid.uuid4()))


def test_sqlite_migration_reads_the_version_inside_its_transaction(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes open a fresh file together: the second to take the write lock finds
    the schema migrated by the first instead of migrating it again."""
    import sqlite3

    path = tmp_path / "fresh.db"
    connect = sqlite3.connect
    raced: list[bool] = []

    def first_opener(*args: object, **kw: object) -> sqlite3.Connection:
        conn = connect(*args, **kw)  # type: ignore[arg-type]
        if raced:
            return conn

        def trace(statement: str) -> None:
            # just before this opener's first write transaction takes the lock, another
            # process opens the same file and migrates it
            if not raced and statement.lstrip().upper().startswith("BEGIN IMMEDIATE"):
                raced.append(True)
                SQLiteStore(path).close()

        conn.set_trace_callback(trace)
        return conn

    monkeypatch.setattr(sqlite3, "connect", first_opener)
    store = SQLiteStore(path)
    monkeypatch.undo()
    try:
        assert raced
        store._db.set_trace_callback(None)
        assert store._db.execute("PRAGMA user_version").fetchone()[0] == len(_SQLITE_MIGRATIONS)
        store.create_principal(_principal("p"))
    finally:
        store.close()


def test_sqlite_failed_migration_leaves_no_transaction(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sqlite3

    from keygrants.store import sqlite as sqlite_module

    path = tmp_path / "bad.db"
    monkeypatch.setattr(sqlite_module, "_MIGRATIONS",
                        (*_SQLITE_MIGRATIONS[:1], "CREATE TABLE meta (x TEXT);"))
    with pytest.raises(StoreError):
        SQLiteStore(path)
    monkeypatch.undo()
    other = sqlite3.connect(path, isolation_level=None, timeout=0)
    try:
        other.execute("BEGIN IMMEDIATE")  # nobody holds the write lock
        other.execute("ROLLBACK")
        # the failed migration rolled back whole: version 1 stands, the next open finishes
        assert other.execute("PRAGMA user_version").fetchone()[0] == 1
    finally:
        other.close()
    store = SQLiteStore(path)
    store.close()
