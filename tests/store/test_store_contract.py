"""The Store contract, run against every implementation (memory, SQLite)."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import msgspec
import pytest

from keygrants.errors import AliasNotFound, AlreadyExists, Conflict, KeyNotFound
from keygrants.keys.model import Key, KeyVersion
from keygrants.store import open_store
from keygrants.store.base import Store
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
    store.update_key(changed, expected_updated_at=100)
    assert store.get_key(key.id) == changed
    with pytest.raises(Conflict):
        store.update_key(msgspec.structs.replace(key, updated_at=102), expected_updated_at=100)
    with pytest.raises(KeyNotFound):
        store.update_key(make_key("ghost")[0])


def test_add_version_is_atomic_and_ordered(store: Store) -> None:
    key, v1 = make_key("k")
    store.create_key(key, v1)
    v2 = KeyVersion(key_id=key.id, version=2, created_at=101, sealed=b"sealed-2")
    rotated = msgspec.structs.replace(key, latest_version=2)
    store.add_version(rotated, v2)
    assert store.get_key(key.id).latest_version == 2  # type: ignore[union-attr]
    assert [v.version for v in store.get_versions(key.id)] == [1, 2]
    stale = KeyVersion(key_id=key.id, version=2, created_at=102, sealed=b"other")
    with pytest.raises(Conflict):
        store.add_version(rotated, stale)
    assert store.get_versions(key.id)[1].sealed == b"sealed-2"


def test_concurrent_rotations_one_winner(store: Store) -> None:
    key, v1 = make_key("k")
    store.create_key(key, v1)
    outcomes: list[str] = []

    def rotate(i: int) -> None:
        v = KeyVersion(key_id=key.id, version=2, created_at=101, sealed=f"s{i}".encode())
        try:
            store.add_version(msgspec.structs.replace(key, latest_version=2), v)
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
    key, v1 = make_key("k")
    store.create_key(key, v1)
    dead = msgspec.structs.replace(key, state="destroyed")
    store.destroy_key(dead)
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
