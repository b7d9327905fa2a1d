"""A data directory is used by one server at a time, and an earlier deployment whose store,
seal key or audit log went missing (or was emptied, truncated or damaged) is refused at start
with a clear message, creating nothing: never taken for a first start, never continued."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from tests.e2e.conftest import CLI_TIMEOUT, ServerProcess, StartServer, clean_env

from keygrants.store.sqlite import SQLiteStore


def ok(result) -> bytes:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result.stdout


def snapshot(data_dir: Path) -> dict[str, bytes]:
    """Every file's content, but the lock's (the pid of the last server that took it)."""
    return {p.name: p.read_bytes() for p in sorted(data_dir.iterdir()) if p.name != ".lock"}


def refused(start_server: StartServer, data_dir: Path, *needles: str) -> str:
    server = start_server(data_dir, ready=False)
    assert server.wait_exit() != 0, server.output()
    out = server.output()
    assert "Traceback" not in out, out
    for needle in needles:
        assert needle in out, out
    return out


def used_dir(start_server: StartServer, tmp_path: Path, rotations: int = 3) -> tuple[Path, bytes]:
    """A data directory a server ran on (a key rotated a few times), stopped cleanly."""
    data_dir = tmp_path / "data"
    server = start_server(data_dir)
    ok(server.cli("key", "create", "k"))
    for _ in range(rotations):
        ok(server.cli("key", "rotate", "k"))
    ct = ok(server.cli("encrypt", "-k", "k", input=b"kept")).strip()
    assert server.stop() == 0
    return data_dir, ct


def test_a_second_server_on_the_same_data_dir_is_refused(start_server: StartServer,
                                                         tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    first: ServerProcess = start_server(data_dir)
    ok(first.cli("key", "create", "k"))
    refused(start_server, data_dir, f"data directory {data_dir} is in use by another keygrants "
                                    f"server (pid {first.proc.pid})")
    # the first one is unharmed: its audit log still takes events
    for _ in range(3):
        ok(first.cli("key", "rotate", "k"))
    ct = ok(first.cli("encrypt", "-k", "k", input=b"still serving")).strip()
    assert first.stop() == 0
    again = start_server(data_dir)  # the lock went with the first process
    assert ok(again.cli("decrypt", input=ct)) == b"still serving"
    assert again.stop() == 0


@pytest.mark.parametrize("how", ["missing", "empty"])
def test_a_lost_store_is_not_taken_for_a_first_start(start_server: StartServer, tmp_path: Path,
                                                     how: str) -> None:
    data_dir, _ = used_dir(start_server, tmp_path, rotations=1)
    db = data_dir / "keygrants.db"
    if how == "missing":
        db.unlink()
    else:
        db.write_bytes(b"")
    before = snapshot(data_dir)
    out = refused(start_server, data_dir, f"keygrants.db is {how}", "seal.key", "admin.token",
                  "restore keygrants.db from your backup")
    assert "Initialized a new data directory" not in out
    assert snapshot(data_dir) == before  # no database, seal key or admin token made


def test_a_store_without_a_root_key_in_a_used_dir_is_refused(start_server: StartServer,
                                                             tmp_path: Path) -> None:
    data_dir, _ = used_dir(start_server, tmp_path, rotations=0)
    (data_dir / "keygrants.db").unlink()
    SQLiteStore(data_dir / "keygrants.db").close()  # a valid store without a root key
    before = snapshot(data_dir)
    refused(start_server, data_dir, "holds no root key", "seal.key")
    after = snapshot(data_dir)
    assert after.keys() == before.keys() and after["admin.token"] == before["admin.token"]
    assert after["seal.key"] == before["seal.key"]


def test_a_missing_seal_key_is_not_replaced(start_server: StartServer, tmp_path: Path) -> None:
    data_dir, ct = used_dir(start_server, tmp_path, rotations=0)
    seal_key = (data_dir / "seal.key").read_bytes()
    (data_dir / "seal.key").unlink()
    refused(start_server, data_dir, "seal.key is missing: restore it from your backup")
    assert not (data_dir / "seal.key").exists()
    (data_dir / "seal.key").write_bytes(seal_key)
    (data_dir / "seal.key").chmod(0o600)
    server = start_server(data_dir)
    assert ok(server.cli("decrypt", input=ct)) == b"kept"


def test_a_moved_data_dir_with_an_exposed_seal_key_is_told_only_the_chmod(
        start_server: StartServer, tmp_path: Path) -> None:
    """The refusal of a 0644 seal.key in a moved directory also said to start with the old
    directory's key file: chmod is all it takes."""
    data_dir, ct = used_dir(start_server, tmp_path, rotations=0)
    moved = tmp_path / "moved"
    shutil.copytree(data_dir, moved)
    (moved / "seal.key").chmod(0o644)
    out = refused(start_server, moved, "chmod 600")
    assert str(data_dir) not in out, out
    (moved / "seal.key").chmod(0o600)
    server = start_server(moved)
    assert ok(server.cli("decrypt", input=ct)) == b"kept"


def test_a_second_memory_store_start_on_one_data_dir_is_refused_plainly(
        start_server: StartServer, tmp_path: Path) -> None:
    """The second start reported the first start's audit log as badly signed (a memory store
    makes a new audit key each time), and the check it suggested failed as well."""
    data_dir = tmp_path / "data"
    first = start_server(data_dir, args=("--store", "memory:"))
    assert first.stop() == 0
    log = (data_dir / "audit.db").read_bytes()
    second = start_server(data_dir, ready=False, args=("--store", "memory:"))
    assert second.wait_exit() == 1, second.output()
    out = second.output()
    assert "a memory: store keeps nothing" in out and "an empty --data-dir" in out, out
    assert "not validly signed" not in out and "Traceback" not in out, out
    assert (data_dir / "audit.db").read_bytes() == log
    again = start_server(tmp_path / "fresh", args=("--store", "memory:"))
    assert again.stop() == 0


@pytest.mark.parametrize("how", ["missing", "empty", "truncated"])
def test_a_lost_or_truncated_audit_log_is_refused(start_server: StartServer, tmp_path: Path,
                                                  how: str) -> None:
    data_dir, ct = used_dir(start_server, tmp_path)
    audit = data_dir / "audit.db"
    kept = tmp_path / "audit.db.backup"
    shutil.copy(audit, kept)
    if how == "missing":
        audit.unlink()
    elif how == "empty":
        audit.write_bytes(b"")
    else:  # the events and checkpoints of the last rotations gone, the rest intact
        with sqlite3.connect(audit) as db:
            (size,) = db.execute("SELECT max(size) FROM checkpoints").fetchone()
            db.execute("DELETE FROM events WHERE seq >= ?", (size - 3,))
            db.execute("DELETE FROM checkpoints WHERE size > ?", (size - 3,))
        db.close()
    before = snapshot(data_dir)
    needle = {"missing": "audit.db is missing", "empty": "audit.db is empty",
              "truncated": "were removed"}[how]
    refused(start_server, data_dir, needle)
    assert snapshot(data_dir) == before

    verify = subprocess.run([sys.executable, "-m", "keygrants", "audit", "verify", "--data-dir",
                             str(data_dir)], capture_output=True, env=clean_env(),
                            timeout=CLI_TIMEOUT, check=False)
    if how == "truncated":  # the offline verifier reads the same mark from keygrants.db
        assert verify.returncode == 1, verify
        assert b"the checkpoint recorded in keygrants.db covers" in verify.stdout, verify.stdout
    else:
        assert verify.returncode != 0, verify

    shutil.copy(kept, audit)  # restored from the backup: starts again
    server = start_server(data_dir)
    assert ok(server.cli("decrypt", input=ct)) == b"kept"


def test_a_damaged_audit_log_is_a_clear_error(start_server: StartServer, tmp_path: Path) -> None:
    data_dir, _ = used_dir(start_server, tmp_path, rotations=0)
    audit = data_dir / "audit.db"
    with audit.open("r+b") as f:
        f.write(b"this is not a SQLite database at all")
    refused(start_server, data_dir, "audit.db cannot be read", "restore it from your backup")
