"""The durable audit log: group commit, checkpoints, proofs, search, digests, canonical form.

Every log test runs on both backends: SQLite (``audit.db``) and PostgreSQL (a fresh database
per test on 127.0.0.1:5432; skipped without one, except in CI). Two PostgreSQL logs on one
database are two nodes of one service: one tree."""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest
import rfc8785

from keygrants.audit.events import AuditEvent, Digester, canonical_bytes, decode_event, event_bytes
from keygrants.audit.log import AuditLog, EventQuery
from keygrants.audit.merkle import leaf_hash, root_from_leaves, verify_consistency, verify_inclusion
from keygrants.audit.note import Checkpoint, NoteSigner, open_note
from keygrants.crypto import SigningKey
from keygrants.errors import AuditUnavailable, InvalidRequest

ORIGIN = "test.log/1"


@pytest.fixture
def signer() -> NoteSigner:
    return NoteSigner(ORIGIN, SigningKey.generate("ed25519"))


MakeLog = Callable[..., AuditLog]


@pytest.fixture(params=["sqlite", "postgresql"])
def make_log(request: pytest.FixtureRequest, tmp_path: Path,
             signer: NoteSigner) -> Iterator[MakeLog]:
    """``make_log(name="audit", **options)``: a log on the backend of this run (on SQLite
    one file per name; on PostgreSQL the test's one database, whatever the name: two logs
    opened on it are two nodes sharing one tree)."""
    backend: str = request.param
    opened: list[AuditLog] = []

    def make(name: str = "audit", **options: object) -> AuditLog:
        options.setdefault("signer", signer)
        options.setdefault("origin", ORIGIN)
        log: AuditLog
        if backend == "sqlite":
            log = AuditLog(tmp_path / f"{name}.db", **options)  # type: ignore[arg-type]
        else:
            from keygrants.audit.pglog import PostgresAuditLog

            url = request.getfixturevalue("postgres_url")
            log = PostgresAuditLog(url, **options)  # type: ignore[arg-type]
        opened.append(log)
        return log

    yield make
    for log in opened:
        log.close()


@pytest.fixture
def log(make_log: MakeLog) -> AuditLog:
    return make_log(checkpoint_interval=0.05)


def stored_rows(log: AuditLog) -> list[tuple[int, bytes, bytes]]:
    return [(int(r[0]), bytes(r[1]), bytes(r[2])) for r in
            log._query("SELECT seq, data, leaf FROM events ORDER BY seq")]


def fields(i: int = 0, **kw: object) -> dict[str, object]:
    return {"type": "crypto.encrypt", "result": "ok", "principal": f"p{i % 3}",
            "key_id": f"k{i % 2}", "operation": "encrypt", "request_id": f"r{i}", **kw}


def test_appends_are_gapless_durable_and_canonical(log: AuditLog) -> None:
    seqs = [log.append(fields(i)) for i in range(5)]
    assert seqs == [0, 1, 2, 3, 4]
    rows = stored_rows(log)
    assert [r[0] for r in rows] == seqs
    for seq, data, leaf in rows:
        event = decode_event(data)
        assert event.seq == seq
        assert bytes(data) == canonical_bytes(event)
        assert bytes(leaf) == leaf_hash(bytes(data))


def test_concurrent_submitters_share_group_commits(log: AuditLog) -> None:
    seqs: list[int] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        for i in range(n):
            s = log.append(fields(i))
            with lock:
                seqs.append(s)

    threads = [threading.Thread(target=worker, args=(200,)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(seqs) == list(range(1600))
    assert log.size == 1600


def test_checkpoints_are_signed_and_cover_every_event(log: AuditLog, signer: NoteSigner) -> None:
    for i in range(10):
        log.append(fields(i))
    cp = log.checkpoint_now()
    body = open_note(cp.note, [signer.verifier()])
    parsed = Checkpoint.parse(body)
    assert parsed.size == cp.size == 10 and parsed.origin == ORIGIN
    leaves = [leaf for _, _, leaf in log.iter_events()]
    assert parsed.root == root_from_leaves(leaves)


def test_a_checkpoint_is_made_on_its_own_after_events_stop(log: AuditLog) -> None:
    log.append(fields())
    deadline = 200
    while deadline and (log.latest_checkpoint() is None or log.latest_checkpoint().size < 1):
        threading.Event().wait(0.02)
        deadline -= 1
    latest = log.latest_checkpoint()
    assert latest is not None and latest.size == 1


def test_reopening_continues_the_same_tree(make_log: MakeLog) -> None:
    first = make_log("a")
    for i in range(7):
        first.append(fields(i))
    first.close()
    second = make_log("a")
    assert second.size == 7 and second.append(fields(7)) == 7
    assert second.latest_checkpoint() is not None


def _execute(log: AuditLog, tmp_path: Path, sql: str, params: tuple[object, ...]) -> None:
    """Write the closed log's tables directly, as someone with access to its database can."""
    from keygrants.audit.pglog import PostgresAuditLog, connect

    if isinstance(log, PostgresAuditLog):
        with connect(log._url) as conn:
            conn.execute(sql.replace("?", "%s"), params)
    else:
        import sqlite3

        with sqlite3.connect(log.path) as db:
            db.execute(sql, params)


@pytest.mark.parametrize("tamper", ["rewrite", "truncate"])
def test_a_log_altered_before_its_newest_checkpoint_is_refused_at_start(
        make_log: MakeLog, tmp_path: Path, tamper: str) -> None:
    """The tree is rebuilt from the stored leaves at start: an event rewritten together with
    its leaf, or events removed before the newest checkpoint, used to be taken as they were
    and signed again by the next checkpoint."""
    first = make_log("t")
    for i in range(10):
        first.append(fields(i))
    first.checkpoint_now()
    for i in range(10, 13):
        first.append(fields(i))
    original = first.event_data(4)
    first.close()
    if tamper == "rewrite":
        assert original is not None and b'"p1"' in original
        forged = original.replace(b'"p1"', b'"eve"')
        _execute(first, tmp_path, "UPDATE events SET data = ?, leaf = ? WHERE seq = ?",
                 (forged, leaf_hash(forged), 4))
    else:
        _execute(first, tmp_path, "DELETE FROM events WHERE seq >= ?", (8,))
    with pytest.raises(AuditUnavailable, match="newest signed checkpoint"):
        make_log("t")


def test_proofs_verify_against_checkpoints(log: AuditLog) -> None:
    for i in range(13):
        log.append(fields(i))
    cp = Checkpoint.parse(open_note(log.checkpoint_now().note, [log._signer.verifier()]))
    for index in range(13):
        proof = log.inclusion_proof(index, 13)
        data = log.event_data(index)
        assert data is not None
        assert verify_inclusion(leaf_hash(data), index, 13, proof, cp.root)
    old_root = root_from_leaves([leaf for _, _, leaf in log.iter_events()][:5])
    assert verify_consistency(5, 13, old_root, cp.root, log.consistency_proof(5, 13))
    with pytest.raises(InvalidRequest):
        log.inclusion_proof(13, 13)
    with pytest.raises(InvalidRequest):
        log.consistency_proof(5, 14)


def test_search_filters_and_pages(log: AuditLog) -> None:
    for i in range(12):
        log.append(fields(i))
    log.append(fields(99, type="key.rotate", key_id="k9", grant_id="g1"))
    by_principal = [decode_event(e) for e in log.search(EventQuery(principal="p1", limit=100))]
    assert [e.seq for e in by_principal] == [1, 4, 7, 10]
    page = [decode_event(e) for e in log.search(EventQuery(principal="p1", after=4, limit=2))]
    assert [e.seq for e in page] == [7, 10]
    assert [decode_event(e).seq for e in log.search(EventQuery(grant_id="g1"))] == [12]
    assert [decode_event(e).seq for e in log.search(EventQuery(type="key.rotate", key_id="k9"))] == [12]
    first_time = decode_event(log.event_data(3) or b"").time
    assert all(decode_event(e).time >= first_time for e in log.search(EventQuery(since=first_time)))
    with pytest.raises(InvalidRequest):
        log.search(EventQuery(limit=0))


def test_search_time_bounds_compare_times_not_text(log: AuditLog) -> None:
    """Bounds were compared with the stored ``…SS.ffffffZ`` strings as text: ``since=…00Z``
    missed an event at ``…00.5Z``, an exclusive ``until=…10Z`` kept one at ``…10.25Z``, and
    an offset was ignored."""
    for i, when in enumerate(("2026-11-22T00:00:00.500000Z", "2026-11-22T00:00:10.250000Z",
                              "2026-11-22T00:00:20.000000Z")):
        log.append(fields(i, time=when))

    def seqs(**bounds: str) -> list[int]:
        return [decode_event(e).seq for e in log.search(EventQuery(**bounds))]  # type: ignore[arg-type]

    assert seqs(since="2026-11-22T00:00:00Z") == [0, 1, 2]
    assert seqs(since="2026-11-22T00:00:00.6Z") == [1, 2]
    assert seqs(until="2026-11-22T00:00:10Z") == [0]
    assert seqs(since="2026-11-22T05:00:10+05:00") == [1, 2]  # 00:00:10Z
    assert seqs(since="2026-11-22T00:00:10", until="2026-11-22T00:00:20Z") == [1]  # no offset: UTC
    assert seqs(since="0001-01-01T00:00:00Z", until="9999-12-31T23:59:59Z") == [0, 1, 2]
    for bad in ({"since": "yesterday"}, {"until": "2026-13-01T00:00:00Z"},
                {"principal": "a\x00b"}, {"type": "t" * 1025}):
        with pytest.raises(InvalidRequest):
            log.search(EventQuery(**bad))  # type: ignore[arg-type]


def test_invalid_events_are_refused_without_consuming_a_sequence_number(log: AuditLog) -> None:
    with pytest.raises(InvalidRequest):
        log.append({"type": "x", "result": "maybe"})
    with pytest.raises(InvalidRequest):
        log.append({"type": "x", "result": "ok", "secret": "no such field"})
    with pytest.raises(InvalidRequest):
        log.append({"type": "x", "result": "ok", "detail": {"Bad Key": "v"}})
    assert log.append(fields()) == 0


def test_a_failing_store_fails_closed_and_recovers(log: AuditLog) -> None:
    log.append(fields())
    log.failing = True
    with pytest.raises(AuditUnavailable):
        log.append(fields(1))
    assert log.size == 1
    log.failing = False
    assert log.append(fields(2)) == 1  # the failed batch left no gap


def test_a_stopped_writer_fails_closed(make_log: MakeLog) -> None:
    log = make_log("a")
    log.close()
    with pytest.raises(AuditUnavailable):
        log.append(fields())


def test_event_bytes_equal_the_struct_encoding_and_rfc8785() -> None:
    rng = random.Random(7)
    alphabet = ["a", "é", "\u2028", "😀", "\n", '"', "\\", "\x01", "/", "<"]
    for seq in range(300):
        f = fields(seq, detail={f"k{i}": "".join(rng.choice(alphabet) for _ in range(5))
                                 for i in range(rng.randint(0, 3))},
                   reason=rng.choice([None, "invalid_ciphertext"]), key_version=rng.choice([None, 3]),
                   time="2026-11-22T00:00:00.000000Z")
        data = event_bytes(seq, f)
        assert data == canonical_bytes(AuditEvent(seq=seq, **f))  # type: ignore[arg-type]
        assert data == rfc8785.dumps(msgspec.json.decode(data))


def test_digests_are_keyed_and_hide_the_value() -> None:
    d1, d2 = Digester(b"k" * 32), Digester(b"j" * 32)
    token = "kg_admin_supersecret"
    assert d1.digest(token).startswith("hmac-sha256:") and token not in d1.digest(token)
    assert d1.digest(token) == d1.digest(token.encode()) != d2.digest(token)
    with pytest.raises(ValueError):
        Digester(b"short")


def test_several_event_loops_each_get_every_event_committed(log: AuditLog) -> None:
    import asyncio

    done: list[int] = []

    def loop_thread(n: int) -> None:
        async def run() -> None:
            for i in range(n):
                await asyncio.wait_for(log.submit(fields(i)), timeout=10)  # type: ignore[arg-type]
            done.append(n)
        asyncio.run(run())

    threads = [threading.Thread(target=loop_thread, args=(60,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert done == [60, 60, 60, 60]
    assert log.size == 240


def test_a_loop_batch_is_split_at_max_batch(make_log: MakeLog) -> None:
    import asyncio

    log = make_log("b", max_batch=10)

    async def run() -> list[int]:
        return list(await asyncio.gather(*(log.submit(fields(i)) for i in range(35))))  # type: ignore[arg-type]

    assert sorted(asyncio.run(run())) == list(range(35))


def test_a_large_loop_batch_is_stored_whole_and_in_order(make_log: MakeLog) -> None:
    """A loop's batch of 250 events is stored whole, in order, each with its own data and leaf
    hash."""
    import asyncio

    log = make_log("big")

    async def run() -> list[int]:
        return list(await asyncio.gather(*(log.submit(fields(i)) for i in range(250))))  # type: ignore[arg-type]

    assert asyncio.run(run()) == list(range(250))
    stored = list(log.iter_events())
    assert [seq for seq, _, _ in stored] == list(range(250))
    for seq, data, leaf in stored:
        assert json.loads(data)["request_id"] == f"r{seq}" and leaf == leaf_hash(data)
    assert event_bytes(7, {**fields(7), "time": json.loads(stored[7][1])["time"]}) == stored[7][1]


def test_blocking_calls_are_refused_on_a_loop_committing(log: AuditLog) -> None:
    import asyncio

    gate = threading.Event()
    assert log._committer is not None
    log._committer.submit(gate.wait, 10)  # the COMMIT queues behind this on the one commit thread

    async def run() -> None:
        fut = log.submit(fields())
        for _ in range(100):
            if log._inflight_loop is not None:
                break
            await asyncio.sleep(0)
        assert log._inflight_loop is asyncio.get_running_loop()
        with pytest.raises(RuntimeError, match="worker thread"):
            log.append(fields())
        gate.set()
        assert await fut == 0  # type: ignore[misc]

    asyncio.run(run())


class _SlowCommit:
    """The log's connection, with COMMITs on the commit thread held until ``gate`` opens."""

    def __init__(self, real: object, gate: threading.Event) -> None:
        self._real, self._gate = real, gate

    def execute(self, sql: str, *args: object) -> object:
        if sql == "COMMIT" and threading.current_thread().name.startswith("keygrants-audit-commit"):
            self._gate.wait(30)
        return self._real.execute(sql, *args)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self._real, name)


def test_a_commit_past_its_deadline_fails_new_requests_at_once(tmp_path: Path,
                                                                signer: NoteSigner) -> None:
    """Fail-closed, and promptly: once the watchdog has failed the requests of an overdue
    commit, the requests that arrive meanwhile fail at once. They used to queue behind the
    commit with no deadline, waiting for as long as the disk hung."""
    import asyncio

    log = AuditLog(tmp_path / "slow.db", signer=signer, origin=ORIGIN, checkpoint_interval=3600)
    gate = threading.Event()
    log._db = _SlowCommit(log._db, gate)  # type: ignore[assignment]
    log.commit_timeout = 0.2

    async def scenario() -> tuple[BaseException | None, BaseException | None]:
        first = log.submit(fields(0))
        done, _ = await asyncio.wait({first}, timeout=10)
        assert done, "the watchdog did not fail the overdue commit's request"
        second = log.submit(fields(1))  # the commit is still hanging
        done, _ = await asyncio.wait({second}, timeout=3)
        gate.set()
        # the commit completes on this loop (its callback releases the log): wait for it, so
        # that close() does not run while the commit thread still uses the connection
        for _ in range(1000):
            if log._inflight_loop is None:
                break
            await asyncio.sleep(0.01)
        assert done, "a request behind the hanging commit got no answer"
        return first.exception(), second.exception()

    try:
        first, second = asyncio.run(scenario())
    finally:
        gate.set()
    log.close()
    assert isinstance(first, AuditUnavailable) and isinstance(second, AuditUnavailable)


def test_close_from_a_stopped_loops_thread_waits_for_its_commit(tmp_path: Path,
                                                                signer: NoteSigner) -> None:
    """A loop that stopped with a commit in flight leaves the log's (reentrant) lock to its
    thread: close() from that thread must let the commit thread finish with the connection
    before using and closing it (used concurrently, the sqlite3 module can crash)."""
    import asyncio

    log = AuditLog(tmp_path / "stopped.db", signer=signer, origin=ORIGIN, checkpoint_interval=3600)
    gate = threading.Event()
    log._db = _SlowCommit(log._db, gate)  # type: ignore[assignment]
    log.commit_timeout = 0.2

    async def scenario() -> BaseException | None:
        future = log.submit(fields(0))
        await asyncio.wait({future}, timeout=5)
        return future.exception() if future.done() else None

    assert isinstance(asyncio.run(scenario()), AuditUnavailable)  # failed by the watchdog
    # ... and the commit is still held
    assert log._inflight_loop is not None
    opener = threading.Timer(0.3, gate.set)
    opener.start()
    log.close()
    opener.join()
    assert log._closed


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_log_file_deleted_or_replaced_under_the_log_fails_closed(tmp_path: Path,
                                                                   signer: NoteSigner,
                                                                   how: str) -> None:
    """SQLite in WAL mode goes on writing to a deleted file: the events after it were
    acknowledged and lost. The checkpointer notices within half an interval."""
    import time

    path = tmp_path / "audit.db"
    log = AuditLog(path, signer=signer, origin=ORIGIN, checkpoint_interval=0.1)
    try:
        log.append(fields())
        assert log.durable
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        if how == "replaced":
            path.write_bytes(b"")  # e.g. a restore copied over it
        deadline = time.monotonic() + 10  # a guard against a hang, not a timing
        while log.durable and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not log.durable
        with pytest.raises(AuditUnavailable):
            log.append(fields(1))
        assert log.size == 1
    finally:
        log.close()
