"""The server's background threads (SQLite commits, WAL copies, audit checkpoints) run under
the batch scheduling policy on Linux, so their wake-ups do not preempt the event loop."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from pathlib import Path

import pytest

from keygrants._threads import as_background_thread
from keygrants.audit.log import AuditLog
from keygrants.audit.note import NoteSigner
from keygrants.crypto import SigningKey
from keygrants.store.sqlite import SQLiteStore

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_BATCH is Linux's")


def _policy(name: str) -> int:
    for _ in range(200):
        for t in threading.enumerate():
            if t.name.startswith(name) and t.native_id is not None:
                return os.sched_getscheduler(t.native_id)
        threading.Event().wait(0.01)
    raise AssertionError(f"no thread named {name}*")


@linux
def test_the_stores_commit_and_wal_threads_are_batch_threads(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "store.db"))
    try:
        store._group.run(lambda db: db.execute("SELECT 1"))
        assert _policy("sqlite-group-commit") == os.SCHED_BATCH
        assert _policy("sqlite-wal-checkpoint") == os.SCHED_BATCH
    finally:
        store.close()
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the caller's own policy is untouched


@linux
def test_the_audit_logs_commit_and_checkpoint_threads_are_batch_threads(tmp_path: Path) -> None:
    signer = NoteSigner("test.log/1", SigningKey.generate("ed25519"))
    log = AuditLog(tmp_path / "audit.db", signer=signer, origin="test.log/1",
                   checkpoint_interval=0.05)
    try:
        async def one() -> int:
            return await log.submit({"type": "t.x", "result": "ok"})  # type: ignore[misc]
        assert asyncio.run(one()) == 0  # committed on the commit thread
        assert _policy("keygrants-audit-commit") == os.SCHED_BATCH
        assert _policy("keygrants-audit-checkpoint") == os.SCHED_BATCH
    finally:
        log.close()


@linux
def test_a_refused_policy_change_leaves_the_thread_as_it_was(monkeypatch) -> None:
    def refuse(*_: object) -> None:
        raise PermissionError("not allowed here")

    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    result: list[int] = []
    t = threading.Thread(target=lambda: (as_background_thread(),
                                         result.append(os.sched_getscheduler(0))))
    t.start()
    t.join()
    assert result == [os.SCHED_OTHER]
