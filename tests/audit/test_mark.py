"""The audit log's high-water mark kept outside it (in the store), a lost or damaged log at
open, and the log's readiness signal (``durable``) that ``/readyz`` reports."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from keygrants.audit.log import AuditLog
from keygrants.audit.note import NoteSigner, format_vkey
from keygrants.audit.setup import MARK_META
from keygrants.audit.verify import verify_database
from keygrants.crypto import SigningKey
from keygrants.errors import AuditUnavailable
from keygrants.store.sqlite import SQLiteStore

ORIGIN = "test.log/mark"
KEY = SigningKey.generate("ed25519")
VKEY = format_vkey(ORIGIN, KEY.public_key())


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def signer() -> NoteSigner:
    return NoteSigner(ORIGIN, KEY)


def fields(i: int) -> dict[str, object]:
    return {"type": "key.rotate", "result": "ok", "principal": "admin", "key_id": "k",
            "operation": "rotate", "request_id": f"r{i}"}


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def written_log(path: Path, signer: NoteSigner, events: int) -> list[bytes]:
    """A log of ``events`` events and a checkpoint; the notes it handed to on_checkpoint."""
    marks: list[bytes] = []
    log = AuditLog(path, signer=signer, origin=ORIGIN, checkpoint_interval=0.05,
                   on_checkpoint=marks.append)
    for i in range(events):
        log.append(fields(i))
    log.checkpoint_now()
    wait_for(lambda: bool(marks) and marks[-1] == log.latest_checkpoint().note)  # type: ignore[union-attr]
    log.close()
    return marks


def truncate(path: Path, keep: int) -> None:
    """Remove the events from ``keep`` on, and the checkpoints that covered them: what the
    log alone cannot tell from a shorter history."""
    with sqlite3.connect(path) as db:
        db.execute("DELETE FROM events WHERE seq >= ?", (keep,))
        db.execute("DELETE FROM checkpoints WHERE size > ?", (keep,))
    db.close()


def test_the_checkpointer_hands_each_newer_checkpoint_to_the_mark(tmp_path: Path,
                                                                  signer: NoteSigner) -> None:
    marks = written_log(tmp_path / "audit.db", signer, 5)
    log = AuditLog(tmp_path / "audit.db", signer=signer, origin=ORIGIN, create=False,
                   mark=marks[-1])
    latest = log.latest_checkpoint()
    assert latest is not None and latest.size == 5 and marks[-1] == latest.note
    log.close()


def test_a_log_shorter_than_its_mark_is_refused(tmp_path: Path, signer: NoteSigner) -> None:
    path = tmp_path / "audit.db"
    mark = written_log(path, signer, 10)[-1]
    truncate(path, 6)
    AuditLog(path, signer=signer, origin=ORIGIN).close()  # the log alone sees nothing wrong
    with pytest.raises(AuditUnavailable, match=r"holds 6 event\(s\).*checkpoint of 10: "
                                               r"events 6\.\.9 were removed"):
        AuditLog(path, signer=signer, origin=ORIGIN, create=False, mark=mark)


def test_an_emptied_log_is_refused_against_its_mark(tmp_path: Path, signer: NoteSigner) -> None:
    path = tmp_path / "audit.db"
    mark = written_log(path, signer, 3)[-1]
    truncate(path, 0)
    with pytest.raises(AuditUnavailable, match="holds 0 event"):
        AuditLog(path, signer=signer, origin=ORIGIN, create=False, mark=mark)


def test_a_rewritten_log_is_refused_against_its_mark(tmp_path: Path, signer: NoteSigner) -> None:
    mark = written_log(tmp_path / "a.db", signer, 4)[-1]
    other = tmp_path / "b.db"
    log = AuditLog(other, signer=signer, origin=ORIGIN)
    for i in range(6):
        log.append({**fields(i), "principal": "someone-else"})
    log.close()
    with pytest.raises(AuditUnavailable, match="rewritten"):
        AuditLog(other, signer=signer, origin=ORIGIN, create=False, mark=mark)


def test_a_mark_of_another_key_is_refused(tmp_path: Path, signer: NoteSigner) -> None:
    mark = written_log(tmp_path / "audit.db", signer, 2)[-1]
    stranger = NoteSigner(ORIGIN, SigningKey.generate("ed25519"))
    with pytest.raises(AuditUnavailable, match="not validly signed"):
        AuditLog(tmp_path / "audit.db", signer=stranger, origin=ORIGIN, mark=mark)


@pytest.mark.parametrize("how", ["missing", "empty"])
def test_a_log_started_before_is_not_created_again(tmp_path: Path, signer: NoteSigner,
                                                   how: str) -> None:
    path = tmp_path / "audit.db"
    if how == "empty":
        path.write_bytes(b"")
    with pytest.raises(AuditUnavailable, match=rf"audit\.db is {how}, but this service has "
                                                "written to it before"):
        AuditLog(path, signer=signer, origin=ORIGIN, create=False)
    assert path.exists() == (how == "empty")  # nothing created
    assert not (tmp_path / "audit.db-wal").exists()


def test_a_damaged_log_is_a_clear_error(tmp_path: Path, signer: NoteSigner) -> None:
    path = tmp_path / "audit.db"
    written_log(path, signer, 3)
    with path.open("r+b") as f:
        f.write(b"garbage" * 20)
    with pytest.raises(AuditUnavailable, match=r"cannot be read .*restore it from your backup"):
        AuditLog(path, signer=signer, origin=ORIGIN)


def test_verify_reads_the_mark_of_the_store_beside_the_log(tmp_path: Path,
                                                           signer: NoteSigner) -> None:
    path = tmp_path / "audit.db"
    mark = written_log(path, signer, 8)[-1]
    store = SQLiteStore(tmp_path / "keygrants.db")
    store.set_meta(MARK_META, mark)
    store.close()
    vkey = VKEY
    assert verify_database(path, vkey=vkey).ok
    truncate(path, 5)
    report = verify_database(path, vkey=vkey)
    assert not report.ok
    assert any("the checkpoint recorded in keygrants.db covers 8 events but the log holds 5"
               in p for p in report.problems), report.problems
    assert verify_database(path, vkey=vkey, use_store_mark=False).ok


def test_verify_reports_an_unreadable_database(tmp_path: Path, signer: NoteSigner) -> None:
    path = tmp_path / "audit.db"
    path.write_bytes(b"not a database" * 100)
    report = verify_database(path, vkey=VKEY)
    assert not report.ok and "cannot be read" in report.problems[0]


def test_durable_is_false_after_a_failed_commit_until_the_log_recovers(
        tmp_path: Path, signer: NoteSigner) -> None:
    log = AuditLog(tmp_path / "audit.db", signer=signer, origin=ORIGIN, checkpoint_interval=0.05)
    try:
        log.append(fields(0))
        assert log.durable
        log.failing = True
        with pytest.raises(AuditUnavailable):
            log.append(fields(1))
        assert not log.durable
        time.sleep(0.2)  # the checkpointer's probe write fails too
        assert not log.durable
        log.failing = False
        wait_for(lambda: log.durable)  # recovered with no request to prove it
        assert log.append(fields(2)) == 1
    finally:
        log.close()
    assert not log.durable


@pytest.mark.anyio
async def test_readyz_is_503_while_the_audit_log_cannot_make_events_durable(
        tmp_path: Path) -> None:
    from keygrants.server import ServerConfig, build_server

    built = build_server(ServerConfig(data_dir=tmp_path / "data", scheduler_interval=3600))
    log = built.audit.log
    try:
        transport = httpx.ASGITransport(app=built.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            assert (await client.get("/readyz")).status_code == 200
            log.failing = True
            with pytest.raises(AuditUnavailable):
                log.append(fields(0))
            reply = await client.get("/readyz")
            assert reply.status_code == 503 and reply.json() == {"status": "unavailable"}
            log.failing = False
            deadline = time.monotonic() + 10
            while (await client.get("/readyz")).status_code != 200:
                assert time.monotonic() < deadline, "not ready again after the log recovered"
                time.sleep(0.05)
    finally:
        log.close()
        built.kms.store.close()
