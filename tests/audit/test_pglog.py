"""The audit log on PostgreSQL as several nodes see it: one tree for all of them, verified in
place (``audit verify --store``), alterations made in the database found. Needs PostgreSQL
on 127.0.0.1:5432 (skipped without it, except in CI)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator

import psycopg
import pytest
from click.testing import CliRunner

from keygrants.audit.events import decode_event
from keygrants.audit.merkle import leaf_hash, root_from_leaves
from keygrants.audit.note import Checkpoint, NoteSigner, format_vkey, open_note
from keygrants.audit.pglog import PostgresAuditLog
from keygrants.audit.verify import verify_postgres
from keygrants.cli import main
from keygrants.crypto import SigningKey

ORIGIN = "test.pg/1"


def fields(i: int, node: str) -> dict[str, object]:
    return {"type": "crypto.encrypt", "result": "ok", "principal": f"p{i % 3}",
            "operation": "encrypt", "request_id": f"{node}-{i}", "node": node}


@pytest.fixture
def signer() -> NoteSigner:
    return NoteSigner(ORIGIN, SigningKey.generate("ed25519"))


@pytest.fixture
def nodes(postgres_url: str, signer: NoteSigner) -> Iterator[list[PostgresAuditLog]]:
    logs = [PostgresAuditLog(postgres_url, signer=signer, origin=ORIGIN, checkpoint_interval=0.05)
            for _ in range(2)]
    yield logs
    for log in logs:
        log.close()


def vkey(signer: NoteSigner) -> str:
    return format_vkey(ORIGIN, signer.verifier().public_key)


def test_two_nodes_append_to_one_gapless_tree(nodes: list[PostgresAuditLog], signer: NoteSigner,
                                              postgres_url: str) -> None:
    seqs: dict[str, list[int]] = {"a": [], "b": []}

    def from_threads(log: PostgresAuditLog, node: str) -> None:
        for i in range(60):
            seqs[node].append(log.append(fields(i, node)))

    async def from_a_loop(log: PostgresAuditLog, node: str) -> None:
        got = await asyncio.gather(*(log.submit(fields(i, node)) for i in range(60, 160)))  # type: ignore[misc]
        seqs[node].extend(got)  # type: ignore[arg-type]

    workers = [threading.Thread(target=from_threads, args=(nodes[0], "a")),
               threading.Thread(target=from_threads, args=(nodes[1], "b")),
               threading.Thread(target=lambda: asyncio.run(from_a_loop(nodes[0], "a"))),
               threading.Thread(target=lambda: asyncio.run(from_a_loop(nodes[1], "b")))]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert len(seqs["a"]) == len(seqs["b"]) == 160
    assert sorted(seqs["a"] + seqs["b"]) == list(range(320))  # gapless, no number twice
    for node, mine in seqs.items():  # each node's events are where its answers said
        for seq in mine[:5]:
            assert decode_event(nodes[0].event_data(seq) or b"").node == node

    # a checkpoint from either node signs the one tree
    cp = Checkpoint.parse(open_note(nodes[1].checkpoint_now().note, [signer.verifier()]))
    leaves = [leaf for _, _, leaf in nodes[0].iter_events()]
    assert cp.size == 320 and cp.root == root_from_leaves(leaves)
    assert nodes[1].size == 320 and nodes[0].size <= 320  # A learns B's on its next batch
    assert len(nodes[0].inclusion_proof(319, 320)) > 0  # B's events proven through A

    report = verify_postgres(postgres_url, vkey=vkey(signer))
    assert report.ok, report.problems
    assert report.events == 320


def _tamper(url: str, sql: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"SET search_path TO keygrants_audit; {sql}")


def test_verify_store_finds_alterations_made_in_the_database(nodes: list[PostgresAuditLog],
                                                             signer: NoteSigner,
                                                             postgres_url: str) -> None:
    for i in range(30):
        nodes[i % 2].append(fields(i, "ab"[i % 2]))
        if i % 10 == 9:
            nodes[0].checkpoint_now()
    assert verify_postgres(postgres_url, vkey=vkey(signer)).ok

    _tamper(postgres_url, "UPDATE events SET data = convert_to(replace(convert_from(data, "
                          "'UTF8'), '\"p1\"', '\"p2\"'), 'UTF8') WHERE seq = 4")
    problems = verify_postgres(postgres_url, vkey=vkey(signer)).problems
    assert any(p.startswith("event 4 altered") for p in problems)

    _tamper(postgres_url, "DELETE FROM events WHERE seq = 17")
    problems = verify_postgres(postgres_url, vkey=vkey(signer)).problems
    assert any(p.startswith("event 17 missing") for p in problems)

    _tamper(postgres_url, "DELETE FROM events WHERE seq >= 26")
    problems = verify_postgres(postgres_url, vkey=vkey(signer)).problems
    assert any("checkpoint at size 30 but only 25 events" in p for p in problems)  # 17 too

    other = NoteSigner(ORIGIN, SigningKey.generate("ed25519"))
    assert not verify_postgres(postgres_url, vkey=vkey(other)).ok  # pinned to another key


def test_cli_verify_store(nodes: list[PostgresAuditLog], signer: NoteSigner,
                          postgres_url: str) -> None:
    for i in range(12):
        nodes[i % 2].append(fields(i, "ab"[i % 2]))
    nodes[1].checkpoint_now()
    runner = CliRunner()
    ok = runner.invoke(main, ["audit", "verify", "--store", postgres_url, "--vkey", vkey(signer)])
    assert ok.exit_code == 0, ok.output
    assert ok.stdout.startswith("OK: 12 event(s)")
    _tamper(postgres_url, "UPDATE events SET leaf = '\\x00'::bytea WHERE seq = 3")
    bad = runner.invoke(main, ["audit", "verify", "--store", postgres_url, "--vkey", vkey(signer),
                               "--json"])
    assert bad.exit_code == 1
    assert any(p.startswith("event 3") for p in json.loads(bad.stdout)["problems"])
    # no audit key recorded in this bare database (no store), and a non-PostgreSQL URL
    missing = runner.invoke(main, ["audit", "verify", "--store", postgres_url])
    assert missing.exit_code == 1 and "audit key" in missing.output
    sqlite = runner.invoke(main, ["audit", "verify", "--store", "sqlite:///tmp/x.db"])
    assert sqlite.exit_code == 1 and "--data-dir" in sqlite.output


def test_leaf_hashes_are_those_of_the_stored_bytes(nodes: list[PostgresAuditLog]) -> None:
    nodes[0].append(fields(0, "a"))
    nodes[1].append(fields(1, "b"))
    for _, data, leaf in nodes[1].iter_events():
        assert leaf == leaf_hash(data)


def _kill_connections(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(url.rsplit("/", 1)[0] + "/postgres", autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE datname = %s AND pid <> pg_backend_pid()", (name,))


def test_a_dropped_connection_fails_one_batch_and_the_log_reconnects(
        nodes: list[PostgresAuditLog], postgres_url: str) -> None:
    from keygrants.errors import AuditUnavailable

    log = nodes[0]
    assert log.append(fields(0, "a")) == 0
    _kill_connections(postgres_url)  # a PostgreSQL restart, as the nodes see it
    outcomes = []
    for i in range(1, 4):
        try:
            outcomes.append(log.append(fields(i, "a")))
        except AuditUnavailable:
            outcomes.append("failed")
    assert outcomes[0] == "failed" and outcomes[-1] != "failed"  # fail closed, then recover
    committed = [seq for seq in outcomes if seq != "failed"]
    assert committed == list(range(1, 1 + len(committed)))  # the failed batch left no gap
    log.event_data(0)  # the read connection was dropped too: it reconnects (no exception)


def test_a_database_that_lost_committed_events_stops_the_log(
        nodes: list[PostgresAuditLog], postgres_url: str) -> None:
    from keygrants.errors import AuditUnavailable

    for i in range(5):
        nodes[0].append(fields(i, "a"))
    _tamper(postgres_url, "DELETE FROM events WHERE seq >= 3")  # a lagging replica took over
    with pytest.raises(AuditUnavailable):
        nodes[0].append(fields(5, "a"))


def test_rows_whose_leaf_is_not_their_hash_are_not_adopted(
        nodes: list[PostgresAuditLog], postgres_url: str) -> None:
    from keygrants.errors import AuditUnavailable

    nodes[0].append(fields(0, "a"))
    nodes[1].append(fields(1, "b"))
    _tamper(postgres_url, "INSERT INTO events (seq, time, type, data, leaf) VALUES "
                          "(2, 't', 'x', '\\x7b7d'::bytea, '\\x00'::bytea)")
    with pytest.raises(AuditUnavailable):
        nodes[0].append(fields(2, "a"))


def test_checkpoint_times_never_go_back_between_nodes_with_skewed_clocks(
        postgres_url: str, signer: NoteSigner) -> None:
    import time

    ahead = PostgresAuditLog(postgres_url, signer=signer, origin=ORIGIN,
                             clock=lambda: time.time() + 100)  # this node's clock runs fast
    behind = PostgresAuditLog(postgres_url, signer=signer, origin=ORIGIN)
    try:
        for i in range(4):
            (ahead if i % 2 else behind).append(fields(i, "x"))
            (ahead if i % 2 else behind).checkpoint_now()
            behind.append(fields(i, "y"))
            behind.checkpoint_now()  # after the fast node's checkpoint: never dated before it
        times = [cp.time for cp in behind.checkpoints()]
        assert times == sorted(times) and len(times) >= 4
        report = verify_postgres(postgres_url, vkey=vkey(signer))
        assert report.ok, report.problems
    finally:
        ahead.close()
        behind.close()


def test_the_log_does_not_keep_the_url_where_it_could_be_shown(nodes: list[PostgresAuditLog],
                                                                postgres_url: str) -> None:
    """``path`` (what an AuditLog reports of where it lives) names the schema, not the URL,
    which may carry a password."""
    log = nodes[0]
    assert log.path == "postgresql (keygrants_audit)"
    assert postgres_url not in log.path
