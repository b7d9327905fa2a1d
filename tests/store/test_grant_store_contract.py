"""The Store contract for grants, the revocation feed and issuer keys (memory, SQLite)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path
from typing import Any

import msgspec
import pytest

from keygrants.errors import AlreadyExists, Conflict, GrantNotFound, StoreError
from keygrants.grants.issuer import IssuerKey
from keygrants.grants.model import Grant, new_grant_id
from keygrants.grants.revocation import RevocationEntry
from keygrants.store.base import Store
from keygrants.store.sqlite import SQLiteStore
from keygrants.store.sqlite import _insert_grant as _insert


def grant(**kw: object) -> Grant:
    fields: dict[str, object] = dict(id=new_grant_id(), key_id="k1", grantee="svc",
                                     operations=("decrypt",), issuer="admin", created_at=100,
                                     not_before=100, expires_at=1000)
    fields.update(kw)
    return Grant(**fields)  # type: ignore[arg-type]


def test_create_get_and_every_field_round_trips(store: Store) -> None:
    g = grant(context_equals={"a": "1"}, context_subset={"b": "2"}, max_uses=3,
              audiences=("x", "y"), cnf_jkt="j" * 43, name="n", retiring_principal="ops",
              justification="why", parent_id="g_parent", depth=1, requires_approval=True,
              state="pending", trace="00-abc-def-01")
    store.create_grant(g)
    assert store.get_grant(g.id) == g
    assert store.get_grant(new_grant_id()) is None
    with pytest.raises(AlreadyExists):
        store.create_grant(g)


def test_list_filters_pages_and_effective_states(store: Store) -> None:
    active = grant(id="g_" + "a" * 26, max_uses=2)
    exhausted = grant(id="g_" + "b" * 26, max_uses=1, uses=1)
    expired = grant(id="g_" + "c" * 26, expires_at=50, key_id="k2")
    revoked = grant(id="g_" + "d" * 26, state="revoked", grantee="other", retiring_principal="ops")
    for g in (active, exhausted, expired, revoked):
        store.create_grant(g)
    ids = lambda gs: [g.id for g in gs]  # noqa: E731
    assert ids(store.list_grants(now=60, limit=10)) == ids([active, exhausted, expired, revoked])
    assert ids(store.list_grants(now=60, limit=2)) == ids([active, exhausted])
    assert ids(store.list_grants(now=60, limit=10, after=exhausted.id)) == ids([expired, revoked])
    assert ids(store.list_grants(now=60, limit=10, state="active")) == [active.id]
    assert ids(store.list_grants(now=60, limit=10, state="exhausted")) == [exhausted.id]
    assert ids(store.list_grants(now=60, limit=10, state="expired")) == [expired.id]
    assert ids(store.list_grants(now=60, limit=10, state="revoked")) == [revoked.id]
    assert ids(store.list_grants(now=60, limit=10, key_id="k2")) == [expired.id]
    assert ids(store.list_grants(now=60, limit=10, grantee="other")) == [revoked.id]
    assert ids(store.list_grants(now=60, limit=10, retiring_principal="ops")) == [revoked.id]
    assert store.live_grant_ids(now=60, grantee="svc") == [active.id, exhausted.id]
    assert store.live_grant_ids(now=60, key_id="k2") == []


def test_consume_counts_only_live_limited_grants(store: Store) -> None:
    limited = grant(max_uses=2)
    unlimited = grant()
    pending = grant(max_uses=2, state="pending")
    for g in (limited, unlimited, pending):
        store.create_grant(g)
    first = store.consume_grant_use(limited.id, 500)
    assert first is not None and first.uses == 1
    assert store.consume_grant_use(limited.id, 1000) is None  # expired at 1000
    assert store.consume_grant_use(limited.id, 500) is not None
    assert store.consume_grant_use(limited.id, 500) is None  # exhausted
    assert store.consume_grant_use(unlimited.id, 500) is None
    assert store.consume_grant_use(pending.id, 500) is None
    assert store.consume_grant_use(new_grant_id(), 500) is None
    got = store.get_grant(limited.id)
    assert got is not None and got.uses == 2


def test_consume_is_atomic_under_racing_threads(store: Store) -> None:
    g = grant(max_uses=5)
    store.create_grant(g)
    barrier = threading.Barrier(40)
    won: list[int] = []

    def race() -> None:
        barrier.wait()
        if store.consume_grant_use(g.id, 500) is not None:
            won.append(1)

    threads = [threading.Thread(target=race) for _ in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 5
    got = store.get_grant(g.id)
    assert got is not None and got.uses == 5


def test_update_is_compare_and_set_and_appends_the_feed_atomically(store: Store) -> None:
    g = grant(state="pending", max_uses=4)
    store.create_grant(g)
    approved = msgspec.structs.replace(g, state="active", not_before=200, expires_at=300,
                                       decided_by="boss", decided_at=200)
    assert store.update_grant(approved, expected_state="pending") == []
    got = store.get_grant(g.id)
    assert got is not None and (got.state, got.not_before, got.expires_at, got.decided_by) == (
        "active", 200, 300, "boss")
    with pytest.raises(Conflict):
        store.update_grant(approved, expected_state="pending")
    with pytest.raises(GrantNotFound):
        store.update_grant(grant(), expected_state="active")
    store.consume_grant_use(g.id, 250)
    ended = msgspec.structs.replace(approved, state="revoked", ended_at=260, ended_by="boss")
    entries = store.update_grant(ended, expected_state="active", feed=[
        RevocationEntry(kind="grant", id=g.id, revoked_at=260, expires_at=330)])
    assert [(e.seq, e.kind, e.id) for e in entries] == [(1, "grant", g.id)]
    got = store.get_grant(g.id)
    assert got is not None and (got.state, got.uses) == ("revoked", 1)  # the use survives


def test_end_grants_touches_only_live_ones_and_numbers_the_feed(store: Store) -> None:
    live, retired = grant(), grant(state="retired")
    store.create_grant(live)
    store.create_grant(retired)
    entries = store.end_grants([live.id, retired.id, new_grant_id()], state="revoked", now=400,
                               by="admin", feed=[
                                   RevocationEntry(kind="principal", id="svc", revoked_at=400,
                                                   expires_at=2000),
                                   RevocationEntry(kind="grant", id=live.id, revoked_at=400,
                                                   expires_at=1030)])
    assert [e.seq for e in entries] == [1, 2]
    got_live, got_retired = store.get_grant(live.id), store.get_grant(retired.id)
    assert got_live is not None and (got_live.state, got_live.ended_by) == ("revoked", "admin")
    assert got_retired is not None and got_retired.state == "retired"


def test_end_grants_adds_an_entry_per_grant_it_ended_kept_until_that_grant_expires(
        store: Store) -> None:
    short, long_, retired = grant(expires_at=700), grant(expires_at=900), grant(state="retired")
    for g in (short, long_, retired):
        store.create_grant(g)
    wholesale = RevocationEntry(kind="principal", id="svc", revoked_at=400, expires_at=90_000)
    entries = store.end_grants([short.id, long_.id, retired.id], state="revoked", now=400,
                               by="admin", feed=[wholesale], entry_leeway=30)
    got = [(e.kind, e.id, e.revoked_at, e.expires_at) for e in entries]
    assert got[0] == ("principal", "svc", 400, 90_000)  # feed first, then the grants' entries
    assert sorted(got[1:]) == sorted([("grant", short.id, 400, 730),
                                      ("grant", long_.id, 400, 930)])  # none for the retired one
    assert [e.seq for e in entries] == [1, 2, 3]
    again = store.end_grants([short.id], state="revoked", now=401, by="admin", feed=(),
                             entry_leeway=30)
    assert again == []


def test_live_children_of_many_parents_in_one_call(store: Store) -> None:
    # more parents than one SQL statement binds, so the implementation must split them
    parents = [grant(operations=("decrypt", "create_grant")) for _ in range(1_234)]
    children = [grant(parent_id=p.id, depth=1, grantee="worker") for p in parents[::3]]
    grandchild = grant(parent_id=children[-1].id, depth=2, grantee="worker")
    ended = grant(parent_id=parents[1].id, depth=1, state="revoked")
    expired = grant(parent_id=parents[2].id, depth=1, expires_at=50)
    for g in (*parents, *children, grandchild, ended, expired):
        store.create_grant(g)
    got = store.live_grant_ids(now=60, parent_ids=[p.id for p in parents])
    assert got == sorted(c.id for c in children)
    assert store.live_grant_ids(now=60, parent_ids=[children[-1].id]) == [grandchild.id]
    assert store.live_grant_ids(now=60, parent_ids=[]) == []


def test_feed_pages_prunes_and_keeps_its_high_water_mark(store: Store) -> None:
    assert store.latest_revocation_seq() == 0
    store.end_grants([], state="revoked", now=0, by="a", feed=[
        RevocationEntry(kind="grant", id=f"g{i}", revoked_at=i, expires_at=100 * (i + 1))
        for i in range(5)])
    assert [e.seq for e in store.revocations_since(0, limit=3)] == [1, 2, 3]
    assert [e.id for e in store.revocations_since(3, limit=10)] == ["g3", "g4"]
    assert store.prune_revocations(250) == 2
    assert [e.seq for e in store.revocations_since(0, limit=10)] == [3, 4, 5]
    assert store.prune_revocations(10_000) == 3
    assert store.revocations_since(0, limit=10) == []
    assert store.latest_revocation_seq() == 5
    later = store.end_grants([], state="revoked", now=0, by="a", feed=[
        RevocationEntry(kind="key", id="k", revoked_at=1, expires_at=99_999)])
    assert later[0].seq == 6  # numbers are never reused


def test_issuer_keys_insert_retire_and_conflict(store: Store) -> None:
    def key(seq: int, kid: str) -> IssuerKey:
        return IssuerKey(kid=kid, alg="EdDSA", public_raw=b"p" * 32, sealed=b"s", seq=seq,
                         created_at=seq * 10, activate_at=seq * 10)

    first = key(1, "a" * 43)
    store.add_issuer_key(first, [])
    second = key(2, "b" * 43)
    store.add_issuer_key(second, [(first.kid, 500)])
    assert store.list_issuer_keys() == [msgspec.structs.replace(first, retire_at=500), second]
    with pytest.raises(Conflict):
        store.add_issuer_key(key(2, "c" * 43), [(first.kid, 1)])
    assert store.list_issuer_keys()[0].retire_at == 500  # the losing rotation changed nothing
    assert store.delete_issuer_keys(retired_before=500) == 0
    assert store.delete_issuer_keys(retired_before=501) == 1
    assert store.list_issuer_keys() == [second]


def test_sqlite_group_commit_isolates_a_failing_write(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "kg.db")
    g = grant()
    store.create_grant(g)
    results: dict[str, object] = {}
    barrier = threading.Barrier(20)

    def create(i: int) -> None:
        barrier.wait()
        try:
            store.create_grant(g if i == 0 else grant())
            results[str(i)] = "ok"
        except AlreadyExists:
            results[str(i)] = "dup"

    threads = [threading.Thread(target=create, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.pop("0") == "dup" and set(results.values()) == {"ok"}
    assert len(store.list_grants(now=0, limit=100)) == 20
    store.close()
    with pytest.raises(StoreError):
        store.create_grant(grant())


def test_sqlite_group_commit_survives_a_caller_that_gave_up(tmp_path: Path) -> None:
    """A write whose future was cancelled before its batch started is skipped, and the commit
    thread goes on serving the others (it used to die on set_result of a cancelled future)."""
    store = SQLiteStore(tmp_path / "kg.db")
    store.create_grant(grant())  # the commit thread is running
    abandoned = grant()
    with store._lock:  # the commit thread cannot start the next batch meanwhile
        future = store.submit_create_grant(abandoned)
        assert future.cancel()
        kept = grant()
        later = store.submit_create_grant(kept)
    later.result(timeout=10)
    assert store.get_grant(abandoned.id) is None and store.get_grant(kept.id) is not None
    store.create_grant(grant())  # still serving
    store.close()


def test_sqlite_writes_from_an_event_loop_are_answered_with_one_wakeup_per_batch(
        tmp_path: Path) -> None:
    """On a running loop the store hands out the loop's own futures and answers a whole batch
    with one call_soon_threadsafe, not one per write; errors reach the writer that caused
    them."""
    store = SQLiteStore(tmp_path / "kg.db")
    store.create_grant(grant())  # the commit thread is running
    grants = [grant() for _ in range(40)]

    async def main() -> tuple[list[object], int]:
        loop = asyncio.get_running_loop()
        wakeups = 0
        real = loop.call_soon_threadsafe

        def counting(*args: Any, **kwargs: Any) -> asyncio.Handle:
            nonlocal wakeups
            wakeups += 1
            return real(*args, **kwargs)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        with store._lock:  # every write below lands in the next batch or the one after
            futures = [store.submit_create_grant(g) for g in grants]
            futures.append(store.submit_create_grant(grants[0]))  # a duplicate id
        assert all(isinstance(f, asyncio.Future) for f in futures)
        results = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 30)
        return results, wakeups

    results, wakeups = asyncio.run(main())
    assert results[:40] == [None] * 40
    assert isinstance(results[40], AlreadyExists)
    assert 1 <= wakeups <= 2  # the batch taken before the lock, if any, and the rest
    assert all(store.get_grant(g.id) == g for g in grants)
    store.close()


def test_sqlite_loop_write_cancelled_before_its_batch_is_skipped(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "kg.db")
    store.create_grant(grant())

    async def main() -> tuple[Grant, Grant]:
        abandoned, kept = grant(), grant()
        with store._lock:
            future = store.submit_create_grant(abandoned)
            assert future.cancel()
            later = store.submit_create_grant(kept)
        await asyncio.wait_for(later, 30)
        return abandoned, kept

    abandoned, kept = asyncio.run(main())
    assert store.get_grant(abandoned.id) is None and store.get_grant(kept.id) is not None
    store.close()


def test_sqlite_loop_writes_fail_cleanly_when_the_commit_fails(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "kg.db")
    store.create_grant(grant())
    reader = sqlite3.connect(tmp_path / "kg.db", isolation_level=None)

    async def main() -> list[object]:
        with store._lock:
            futures = [store.submit_create_grant(grant()) for _ in range(3)]
            # another connection holds the write lock: BEGIN IMMEDIATE fails after the timeout
            reader.execute("BEGIN IMMEDIATE")
            store._db.execute("PRAGMA busy_timeout=50")
        results = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 30)
        reader.execute("ROLLBACK")
        return results

    results = asyncio.run(main())
    assert all(isinstance(r, StoreError) for r in results), results
    store.create_grant(grant())  # serving again once the lock is free
    reader.close()
    store.close()


def test_sqlite_batched_inserts_fail_alone_and_keep_their_order_with_other_writes(
        tmp_path: Path) -> None:
    """Consecutive grant inserts go in one executemany; a taken id in the middle of the run
    fails that writer only, and writes of another kind between runs still apply in order."""
    store = SQLiteStore(tmp_path / "kg.db")
    taken = grant()
    store.create_grant(taken)
    first = [grant() for _ in range(5)]
    second = [grant() for _ in range(5)]
    with store._group._cv:  # (reentrant) the commit thread takes everything below as one batch
        futures = [store._group.submit(_insert(g)) for g in first[:2]]
        futures.append(store._group.submit(_insert(taken)))
        futures += [store._group.submit(_insert(g)) for g in first[2:]]
        futures.append(store._group.submit(
            lambda db: db.execute("DELETE FROM grants WHERE id = ?", (first[0].id,))))
        futures += [store._group.submit(_insert(g)) for g in second]
    outcomes = []
    for f in futures:
        try:
            f.result(timeout=10)
            outcomes.append("ok")
        except AlreadyExists:
            outcomes.append("dup")
    assert outcomes == ["ok", "ok", "dup", "ok", "ok", "ok", "ok"] + ["ok"] * 5
    assert store.get_grant(first[0].id) is None  # inserted, then deleted, in submission order
    assert all(store.get_grant(g.id) == g for g in [*first[1:], *second, taken])
    store.close()


def test_sqlite_a_write_that_ends_the_transaction_fails_its_whole_batch(tmp_path: Path) -> None:
    """An error that rolls the transaction back (disk full, I/O error; simulated by a write
    that ends it) fails every write of the batch, and no later write runs outside a
    transaction and gets committed behind the writers' backs."""
    store = SQLiteStore(tmp_path / "kg.db")
    store.create_grant(grant())
    before, after = grant(), grant()
    with store._group._cv:  # one batch
        futures = [store._group.submit(_insert(before)),
                   store._group.submit(lambda db: db.execute("ROLLBACK")),
                   store._group.submit(_insert(after))]
    for f in futures:
        with pytest.raises(StoreError):
            f.result(timeout=10)
    assert store.get_grant(before.id) is None and store.get_grant(after.id) is None
    store.create_grant(after)  # the next batch works
    assert store.get_grant(after.id) == after
    store.close()


def test_sqlite_a_batch_of_only_inserts_with_a_taken_id_fails_that_one_alone(
        tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "kg.db")
    taken = grant()
    store.create_grant(taken)
    rows = [grant() for _ in range(6)]
    with store._group._cv:  # one batch, nothing but inserts: no savepoint around the run
        futures = [store._group.submit(_insert(g)) for g in rows[:3]]
        futures.append(store._group.submit(_insert(taken)))
        futures += [store._group.submit(_insert(g)) for g in rows[3:]]
    errors = [f.exception(timeout=10) for f in futures]
    assert [type(e).__name__ if e else None for e in errors] == [None] * 3 + ["AlreadyExists"] + [None] * 3
    assert all(store.get_grant(g.id) == g for g in rows)
    store.close()


def test_sqlite_loop_writes_of_one_iteration_are_one_batch(tmp_path: Path) -> None:
    """Writes made on a loop during one iteration reach the commit thread together (handed
    over one by one, each woke the thread, which took it alone)."""
    store = SQLiteStore(tmp_path / "kg.db")
    store.create_grant(grant())
    batches: list[int] = []
    real_commit = store._group._commit

    def counting(batch: list[Any]) -> None:
        batches.append(len(batch))
        real_commit(batch)

    store._group._commit = counting  # type: ignore[method-assign]
    rows = [grant() for _ in range(25)]

    async def main() -> None:
        futures = [store.submit_create_grant(g) for g in rows]  # no await in between
        await asyncio.wait_for(asyncio.gather(*futures), 30)

    asyncio.run(main())
    assert batches == [25]
    assert all(store.get_grant(g.id) == g for g in rows)
    store.close()


def test_sqlite_a_batch_larger_than_one_statement_takes_is_written_whole(tmp_path: Path) -> None:
    """Inserts go in multi-row statements of at most 200 rows (and within SQLite's limit on
    variables): a batch of 450 rows spans three statements and every row arrives intact."""
    store = SQLiteStore(tmp_path / "kg.db")
    store.create_grant(grant())
    rows = [grant(name=f"n{i}", max_uses=i + 1) for i in range(450)]
    with store._group._cv:
        futures = [store._group.submit(_insert(g)) for g in rows]
    assert [f.result(timeout=10) for f in futures] == [None] * 450
    assert all(store.get_grant(g.id) == g for g in rows)
    store._db.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 25)  # two rows of ten a statement
    more = [grant() for _ in range(5)]
    with store._group._cv:
        futures = [store._group.submit(_insert(g)) for g in more]
    assert [f.result(timeout=10) for f in futures] == [None] * 5
    assert all(store.get_grant(g.id) == g for g in more)
    store.close()


class _FailingUndo:
    """The store's connection, except that one statement (an undo) fails once."""

    def __init__(self, db: sqlite3.Connection, fail: str) -> None:
        self._db, self._fail = db, fail

    def execute(self, sql: str, *args: Any) -> Any:
        if sql == self._fail:
            self._fail = ""
            raise sqlite3.OperationalError(f"simulated failure of {sql}")
        return self._db.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)


@pytest.mark.parametrize("undo, whole", [("ROLLBACK TO run", False), ("ROLLBACK TO item", False),
                                         ("ROLLBACK", True)])
def test_sqlite_a_failed_write_that_cannot_be_undone_fails_its_batch_uncommitted(
        tmp_path: Path, undo: str, whole: bool) -> None:
    """250 inserts go in two statements; the second holds a taken id, so the run is undone.
    When the undo itself fails, the first statement's 200 rows must not be committed behind
    writers told that their write failed: the whole batch fails. (``ROLLBACK TO item`` is the
    undo of a single write: the run of one insert between two other writes.)"""
    store = SQLiteStore(tmp_path / "kg.db")
    taken = grant()
    store.create_grant(taken)
    real = store._db
    store._db = _FailingUndo(real, undo)  # type: ignore[assignment]
    rows = [grant() for _ in range(250)] if undo != "ROLLBACK TO item" else [grant()]
    delete = lambda db: db.execute("DELETE FROM grants WHERE id = 'none'")  # noqa: E731
    with store._group._cv:  # one batch
        futures = [] if whole else [store._group.submit(delete)]
        futures += [store._group.submit(_insert(g)) for g in rows]
        futures.append(store._group.submit(_insert(taken)))
        if undo == "ROLLBACK TO item":
            futures.append(store._group.submit(delete))
    errors = [f.exception(timeout=10) for f in futures]
    store._db = real
    assert all(isinstance(e, StoreError) for e in errors), errors
    assert all(store.get_grant(g.id) is None for g in rows)
    store.create_grant(rows[0])  # the next batch works
    assert store.get_grant(rows[0].id) == rows[0]
    store.close()


def test_sqlite_a_commit_thread_that_cannot_start_refuses_the_write_and_is_tried_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Starting the commit thread can fail (the process's thread limit): the writers get a
    StoreError, on a loop too (their futures were left unanswered), and the next write starts
    the thread (it used to keep a thread that never started: every later write waited for
    good and close() raised)."""
    store = SQLiteStore(tmp_path / "kg.db")
    real_start = threading.Thread.start

    def start(thread: threading.Thread) -> None:
        if thread.name == "sqlite-group-commit":
            raise RuntimeError("can't start new thread")
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    with pytest.raises(StoreError, match="commit thread"):
        store.create_grant(grant())

    async def on_a_loop() -> BaseException | None:
        future = store.submit_create_grant(grant())
        done, _ = await asyncio.wait({future}, timeout=10)
        assert done, "the write was never answered"
        return future.exception()

    assert isinstance(asyncio.run(on_a_loop()), StoreError)
    monkeypatch.setattr(threading.Thread, "start", real_start)
    g = grant()
    store.create_grant(g)
    assert store.get_grant(g.id) == g
    store.close()


def test_consume_refuses_a_count_below_one(store: Store) -> None:
    g = grant(max_uses=1)
    store.create_grant(g)
    for n in (0, -5):
        with pytest.raises(ValueError):
            store.consume_grant_use(g.id, 100, n)
    assert store.get_grant(g.id) == g  # no use given back


def test_list_grants_with_limit_zero_is_empty(store: Store) -> None:
    store.create_grant(grant())
    assert store.list_grants(now=0, limit=0) == []


def test_issuer_key_ids_are_unique(store: Store) -> None:
    first = IssuerKey(kid="a" * 43, alg="EdDSA", public_raw=b"p" * 32, sealed=b"s", seq=1,
                      created_at=10, activate_at=10)
    store.add_issuer_key(first, [])
    with pytest.raises(AlreadyExists):
        store.add_issuer_key(msgspec.structs.replace(first, seq=2), [])
    assert store.list_issuer_keys() == [first]


def test_sqlite_group_commit_timeout_cancels_the_queued_write(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A caller told its write failed (no confirmation in time) must not find it committed
    later: a limited grant's use counted for a call that failed."""
    from keygrants.store import sqlite as sqlite_module

    store = SQLiteStore(tmp_path / "kg.db")
    g = grant(max_uses=1)
    store.create_grant(g)  # the commit thread is running
    monkeypatch.setattr(sqlite_module, "_GROUP_COMMIT_TIMEOUT", 0.01)
    # holding the lock, the commit thread cannot start the batch before the caller gives up
    with store._lock, pytest.raises(StoreError):
        store.consume_grant_use(g.id, 100)
    monkeypatch.undo()
    store._group.run(lambda db: None)  # every batch queued before this one is done
    got = store.get_grant(g.id)
    assert got is not None and got.uses == 0
    assert store.consume_grant_use(g.id, 100) is not None  # the use is still there to take
    store.close()


def test_sqlite_group_commit_timeout_of_a_running_write_reports_its_outcome(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write whose batch already runs when the caller's wait ends cannot be cancelled: the
    caller gets its real outcome, not a failure that is not true."""
    from concurrent.futures import Future

    store = SQLiteStore(tmp_path / "kg.db")
    store.create_grant(grant())  # the commit thread is running
    started, cancel_tried = threading.Event(), threading.Event()

    class _WaitEndsWhileRunning(Future[Any]):
        def result(self, timeout: float | None = None) -> Any:
            if timeout is not None:  # the caller's bounded wait: it ends while the write runs
                started.wait()
                raise TimeoutError
            return super().result()

        def cancel(self) -> bool:
            cancelled = super().cancel()
            cancel_tried.set()
            return cancelled

    def submit(fn: Any) -> Future[Any]:
        future = _WaitEndsWhileRunning()
        store._group._enqueue((fn, future))
        return future

    monkeypatch.setattr(store._group, "submit", submit)
    g = grant()

    def write(db: sqlite3.Connection) -> str:
        started.set()
        cancel_tried.wait(10)  # a bound only so that a regression fails instead of hanging
        _insert(g)(db)
        return "written"

    assert store._group.run(write) == "written"
    monkeypatch.undo()
    assert store.get_grant(g.id) == g
    store.close()


def test_sqlite_a_database_deleted_under_the_store_fails_every_call(tmp_path: Path) -> None:
    """SQLite in WAL mode goes on writing to a deleted file: what was written after it was
    acknowledged and lost. The store's background thread notices within a second."""
    import time

    path = tmp_path / "kg.db"
    store = SQLiteStore(path)
    try:
        store.create_grant(grant())
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        deadline = time.monotonic() + 10  # a guard against a hang, not a timing
        while time.monotonic() < deadline:
            try:
                store.get_meta("anything")
            except StoreError as exc:
                assert "deleted or replaced" in str(exc)
                break
            time.sleep(0.05)
        else:
            pytest.fail("the store did not notice its file was deleted")
        with pytest.raises(StoreError, match="deleted or replaced"):
            store.create_grant(grant())

        async def batched() -> None:
            await store.submit_create_grant(grant())  # the group commit refuses it too

        with pytest.raises(StoreError, match="deleted or replaced"):
            asyncio.run(batched())
    finally:
        store.close()
