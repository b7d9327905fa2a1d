"""PostgreSQL-specific behaviour of the store; the shared contract runs in the other suites.

Every test takes ``postgres_url`` (tests/conftest.py): a fresh database on 127.0.0.1:5432,
dropped afterwards. Without a reachable server the tests skip, or fail when ``CI=true``.
"""

from __future__ import annotations

import secrets
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from keygrants.errors import AlreadyExists, StoreError
from keygrants.grants.model import Grant, new_grant_id
from keygrants.grants.revocation import RevocationEntry
from keygrants.keys.model import Key, KeyVersion
from keygrants.store import open_store

try:
    import psycopg

    from keygrants.store.postgres import SCHEMA_VERSION, PostgresStore
except ImportError:  # the postgres_url fixture skips every test (or fails it when CI=true)
    pass


@contextmanager
def opened(url: str, **kw: int) -> Iterator[PostgresStore]:
    store = PostgresStore(url, **kw)
    try:
        yield store
    finally:
        store.close()


def run_together(n: int, fn: Callable[[int], None]) -> None:
    """Run ``fn(0)`` ... ``fn(n - 1)`` in threads released at once; re-raise the first error."""
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def body(i: int) -> None:
        barrier.wait()
        try:
            fn(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def applied_versions(url: str) -> list[int]:
    with psycopg.connect(url) as conn:
        return [r[0] for r in conn.execute("SELECT version FROM schema_version ORDER BY version")]


def make_key(name: str) -> tuple[Key, KeyVersion]:
    kid = str(uuid.uuid4())
    return (Key(id=kid, name=name, spec="aes-256-gcm", purpose="encrypt-decrypt", created_at=100,
                updated_at=100),
            KeyVersion(key_id=kid, version=1, created_at=100, sealed=b"sealed-1"))


def grant(**kw: object) -> Grant:
    fields: dict[str, object] = dict(id=new_grant_id(), key_id="k1", grantee="svc",
                                     operations=("decrypt",), issuer="admin", created_at=100,
                                     not_before=100, expires_at=1000)
    fields.update(kw)
    return Grant(**fields)  # type: ignore[arg-type]


def unused_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- opening and migrations -------------------------------------------------------------------

def test_migrations_apply_once_and_reopening_keeps_the_data(postgres_url: str) -> None:
    key, v1 = make_key("k")
    with opened(postgres_url) as store:
        store.create_key(key, v1)
        store.set_meta("m", b"v")
    with opened(postgres_url) as again:
        assert again.get_key(key.id) == key and again.get_versions(key.id) == [v1]
        assert again.get_meta("m") == b"v"
    assert applied_versions(postgres_url) == list(range(1, SCHEMA_VERSION + 1))


def test_stores_opening_a_fresh_database_together_migrate_it_once(postgres_url: str) -> None:
    stores: list[PostgresStore] = []
    lock = threading.Lock()

    def open_one(_: int) -> None:
        store = PostgresStore(postgres_url, max_connections=2)
        with lock:
            stores.append(store)

    try:
        run_together(6, open_one)
        assert len(stores) == 6
        key, v1 = make_key("k")
        stores[0].create_key(key, v1)
        assert all(s.get_key(key.id) == key for s in stores)
    finally:
        for s in stores:
            s.close()
    assert applied_versions(postgres_url) == list(range(1, SCHEMA_VERSION + 1))


def test_a_schema_newer_than_this_code_is_refused(postgres_url: str) -> None:
    with opened(postgres_url):
        pass
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (SCHEMA_VERSION + 1,))
    with pytest.raises(StoreError, match="newer than this keygrants knows"):
        PostgresStore(postgres_url)


def test_open_store_knows_both_schemes(postgres_url: str) -> None:
    for url in (postgres_url, postgres_url.replace("postgresql://", "postgres://", 1)):
        store = open_store(url)
        assert isinstance(store, PostgresStore)
        store.close()


def test_an_unreachable_server_is_a_store_error_without_the_password(postgres_url: str) -> None:
    password = "pw-" + secrets.token_hex(8)
    url = f"postgresql://keygrants:{password}@127.0.0.1:{unused_port()}/keygrants"
    with pytest.raises(StoreError, match=r"cannot open PostgreSQL at keygrants@127\.0\.0\.1") as info:
        open_store(url)
    chain: list[BaseException] = []
    exc: BaseException | None = info.value
    while exc is not None and len(chain) < 10:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    assert all(password not in f"{e!s} {e!r}" for e in chain)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_a_malformed_url_is_a_value_error_without_the_password(postgres_url: str) -> None:
    password = "pw-" + secrets.token_hex(8)
    with pytest.raises(ValueError, match="malformed PostgreSQL URL") as info:
        PostgresStore(f"postgresql://keygrants:{password}@127.0.0.1/kg?no_such_option=1")
    assert password not in str(info.value) and info.value.__cause__ is None


def test_repr_and_location_hide_the_password(postgres_url: str) -> None:
    url = postgres_url.replace("postgres@", "postgres:ignored-by-trust-auth@", 1)
    with opened(url) as store:
        assert "ignored-by-trust-auth" not in repr(store) + store.location
        assert store.location.startswith("postgres@127.0.0.1:5432/kg_test_")


def test_sessions_turn_synchronous_commit_back_on(postgres_url: str) -> None:
    name = postgres_url.rsplit("/", 1)[1]
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{name}" SET synchronous_commit = off')
    with opened(postgres_url) as store, store._pool.connection() as conn:
        row = conn.execute("SHOW synchronous_commit").fetchone()
        assert row is not None and row[0] == "on"


# -- driver errors never reach the caller -----------------------------------------------------

def test_driver_errors_become_store_errors(postgres_url: str) -> None:
    with opened(postgres_url) as store:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute("DROP TABLE grants")
        with pytest.raises(StoreError):
            store.create_grant(grant())
        with pytest.raises(StoreError):
            store.get_grant(new_grant_id())
        with pytest.raises(StoreError):
            store.submit_create_grant(grant()).result(timeout=30)


def test_a_closed_store_refuses_work(postgres_url: str) -> None:
    store = PostgresStore(postgres_url)
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.create_grant(grant())
    with pytest.raises(StoreError, match="closed"):
        store.submit_create_grant(grant())
    store.close()  # twice is fine


def test_submitted_grants_are_durable_when_the_future_completes(postgres_url: str) -> None:
    g = grant()
    with opened(postgres_url) as store:
        store.submit_create_grant(g).result(timeout=30)
        with pytest.raises(AlreadyExists):
            store.submit_create_grant(g).result(timeout=30)
    with opened(postgres_url) as again:
        assert again.get_grant(g.id) == g


# -- concurrency, as several server processes see it ------------------------------------------

def test_consume_is_exact_across_two_stores_under_40_threads(postgres_url: str) -> None:
    g = grant(max_uses=17)
    counted: list[int] = []
    with opened(postgres_url) as a, opened(postgres_url) as b:
        a.create_grant(g)

        def race(i: int) -> None:
            store = a if i % 2 else b
            while store.consume_grant_use(g.id, 500) is not None:
                counted.append(i)

        run_together(40, race)
        got = b.get_grant(g.id)
    assert len(counted) == 17
    assert got is not None and got.uses == 17


def test_a_key_name_and_an_alias_cannot_both_take_one_name(postgres_url: str) -> None:
    with opened(postgres_url) as a, opened(postgres_url) as b:
        target, tv = make_key("target")
        a.create_key(target, tv)
        for round_ in range(10):
            name = f"name-{round_}"
            won: list[str] = []

            def take(i: int, name: str = name, won: list[str] = won) -> None:
                try:
                    if i % 2:
                        a.create_key(*make_key(name))
                        won.append("key")
                    else:
                        b.create_alias(name, target.id)
                        won.append("alias")
                except AlreadyExists:
                    pass

            run_together(4, take)
            assert len(won) == 1


def test_feed_numbers_from_two_stores_are_unique_and_gapless(postgres_url: str) -> None:
    numbers: list[int] = []
    lock = threading.Lock()
    with opened(postgres_url) as a, opened(postgres_url) as b:

        def append(i: int) -> None:
            store = a if i % 2 else b
            for j in range(5):
                entries = store.end_grants([], state="revoked", now=0, by="x", feed=[
                    RevocationEntry(kind="grant", id=f"g{i}-{j}-{k}", revoked_at=1, expires_at=9)
                    for k in range(2)])
                with lock:
                    numbers.extend(e.seq for e in entries)

        run_together(10, append)
        assert sorted(numbers) == list(range(1, 101))
        assert [e.seq for e in a.revocations_since(0, limit=1000)] == list(range(1, 101))
        assert b.latest_revocation_seq() == 100


def test_the_feed_high_water_mark_survives_pruning_and_reopening(postgres_url: str) -> None:
    with opened(postgres_url) as store:
        store.end_grants([], state="revoked", now=0, by="a", feed=[
            RevocationEntry(kind="grant", id=f"g{i}", revoked_at=i, expires_at=10) for i in range(3)])
        assert store.prune_revocations(10) == 3
        assert store.revocations_since(0, limit=10) == []
    with opened(postgres_url) as again:
        assert again.latest_revocation_seq() == 3
        later = again.end_grants([], state="revoked", now=0, by="a", feed=[
            RevocationEntry(kind="key", id="k", revoked_at=1, expires_at=99)])
        assert later[0].seq == 4


def test_names_sort_by_code_point_whatever_the_database_collation(postgres_url: str) -> None:
    names = ["b", "B", "a", "_x", "Z9", "a-b", "a.b"]
    with opened(postgres_url) as store:
        for n in names:
            store.create_key(*make_key(n))
        assert [k.name for k in store.list_keys(limit=100)] == sorted(names)
        assert [k.name for k in store.list_keys(limit=100, after="Z9")] == [
            n for n in sorted(names) if n > "Z9"]


def test_nul_characters_are_refused_before_the_store(postgres_url: str) -> None:
    """PostgreSQL text cannot hold NUL: the service answers as SQLite would (not found, or a
    request error), never store_unavailable."""
    import os

    from keygrants.auth import RequestContext
    from keygrants.errors import InvalidRequest, KeyNotFound
    from keygrants.models import CreateKeyRequest
    from keygrants.service import KMS
    from keygrants.store import open_store

    store = open_store(postgres_url)
    kms = KMS(store, os.urandom(32))
    admin = RequestContext(principal="admin")
    with pytest.raises(KeyNotFound):
        kms.describe_key(admin, "ab\x00cd")
    with pytest.raises(InvalidRequest):
        kms.create_key(admin, CreateKeyRequest(name="k", description="a\x00b"))
    store.close()
