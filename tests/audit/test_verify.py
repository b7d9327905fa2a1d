"""Offline verification finds every kind of alteration, in an export and in a database."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from keygrants.audit.log import AuditLog
from keygrants.audit.note import NoteSigner, format_vkey, sign_note
from keygrants.audit.verify import export_lines, verify_database, verify_export
from keygrants.cli import main
from keygrants.crypto import SigningKey

ORIGIN = "verify.test/1"
Lines = list[bytes]


def build_log(tmp_path_factory: pytest.TempPathFactory,
              every: int) -> tuple[Path, NoteSigner, Lines]:
    """A log of 30 events with a checkpoint at 1 (the first commit) and every ``every``."""
    path = tmp_path_factory.mktemp("audit") / "audit.db"
    signer = NoteSigner(ORIGIN, SigningKey.generate("ed25519"))
    log = AuditLog(path, signer=signer, origin=ORIGIN, checkpoint_interval=3600)
    for i in range(30):
        log.append({"type": "crypto.encrypt", "result": "ok", "principal": "svc",
                    "request_id": f"r{i}"})
        if (i + 1) % every == 0:
            log.checkpoint_now()
    lines = list(export_lines(log, vkey=vkey_of(signer)))
    log.close()
    return path, signer, lines


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, NoteSigner, Lines]:
    """Checkpoints at 1, 10, 20 and 30."""
    return build_log(tmp_path_factory, 10)


def vkey_of(signer: NoteSigner) -> str:
    return signer.verifier().vkey()


def index_of(lines: Lines, kind: str, n: int) -> int:
    """Position of the n-th (0-based) event line or of the checkpoint for size n."""
    for i, raw in enumerate(lines):
        rec = json.loads(raw)
        if kind == "event" and rec["kind"] == "event" and rec["seq"] == n:
            return i
        if kind == "checkpoint" and rec["kind"] == "checkpoint" and rec["size"] == n:
            return i
    raise AssertionError(f"no {kind} {n}")


def edit_event(lines: Lines, seq: int, change: Callable[[dict], None], *, keep_leaf: bool) -> Lines:
    out = list(lines)
    i = index_of(out, "event", seq)
    rec = json.loads(out[i])
    change(rec["event"])
    if not keep_leaf:
        del rec["leaf"]
    out[i] = json.dumps(rec, separators=(",", ":")).encode() + b"\n"
    return out


def test_an_intact_export_verifies(built) -> None:
    _, signer, lines = built
    report = verify_export(lines, vkey=vkey_of(signer))
    assert report.ok, report.problems
    assert (report.events, report.checkpoints, report.last_checkpoint_size) == (30, 4, 30)


def test_an_edited_event_is_pinpointed(built) -> None:
    _, signer, lines = built
    tampered = edit_event(lines, 14, lambda e: e.update(principal="mallory"), keep_leaf=True)
    report = verify_export(tampered, vkey=vkey_of(signer))
    assert not report.ok
    assert any(p.startswith("event 14 altered") for p in report.problems)
    assert any("checkpoint at size 20: root hash mismatch: events 10..19" in p
               for p in report.problems)


def test_an_edited_event_with_its_leaf_dropped_is_located_between_checkpoints(built) -> None:
    _, signer, lines = built
    tampered = edit_event(lines, 14, lambda e: e.update(result="denied"), keep_leaf=False)
    report = verify_export(tampered, vkey=vkey_of(signer))
    assert report.problems == ["checkpoint at size 20: root hash mismatch: events 10..19 were "
                               "altered, inserted, deleted or reordered",
                               "checkpoint at size 30: root hash mismatch: events 10..29 were "
                               "altered, inserted, deleted or reordered"]


def test_a_deleted_event_in_the_middle_is_pinpointed(built) -> None:
    _, signer, lines = built
    tampered = [line for i, line in enumerate(lines) if i != index_of(lines, "event", 12)]
    report = verify_export(tampered, vkey=vkey_of(signer))
    assert any(p.startswith("event 12 missing: deleted") for p in report.problems)


def test_a_truncated_tail_after_a_checkpoint_is_found(built) -> None:
    _, signer, lines = built
    cut = index_of(lines, "event", 25)
    tampered = [*lines[:cut], lines[index_of(lines, "checkpoint", 30)]]
    report = verify_export(tampered, vkey=vkey_of(signer))
    assert any("checkpoint at size 30 but only 25 events precede it" in p and "truncated" in p
               for p in report.problems)


def test_reordered_events_are_found(built) -> None:
    _, signer, lines = built
    a, b = index_of(lines, "event", 5), index_of(lines, "event", 6)
    tampered = list(lines)
    tampered[a], tampered[b] = tampered[b], tampered[a]
    report = verify_export(tampered, vkey=vkey_of(signer))
    assert any("out of order" in p or "missing" in p for p in report.problems)
    assert any("checkpoint at size 10: root hash mismatch" in p for p in report.problems)


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, NoteSigner, Lines]:
    """A checkpoint every 5 (and at 1): several follow any alteration."""
    return build_log(tmp_path_factory, 5)


def mismatches(good: int, *sizes: int) -> list[str]:
    return [f"checkpoint at size {size}: root hash mismatch: events {good}..{size - 1} were "
            "altered, inserted, deleted or reordered" for size in sizes]


def test_a_swapped_pair_is_reported_once_not_for_every_later_event(dense) -> None:
    """Swapping events 6 and 7 used to flag event 6 as missing and every later event, all in
    place, as out of order ("event 8 out of order: expected 9", ... to the end)."""
    _, signer, lines = dense
    a, b = index_of(lines, "event", 6), index_of(lines, "event", 7)
    tampered = list(lines)
    tampered[a], tampered[b] = tampered[b], tampered[a]
    report = verify_export(tampered, vkey=vkey_of(signer))
    assert report.problems == ["event 6 out of order: expected 8 (events reordered or duplicated)",
                               *mismatches(5, 10, 15, 20, 25, 30)]


def test_a_duplicated_event_is_reported_once_not_for_every_later_event(dense) -> None:
    """A repeated event 10 used to make every event after it "out of order", and every later
    checkpoint "out of place" (the extra leaf counted as a position)."""
    _, signer, lines = dense
    i = index_of(lines, "event", 10)
    tampered = [*lines[:i + 1], lines[i], *lines[i + 1:]]
    report = verify_export(tampered, vkey=vkey_of(signer))
    assert report.problems == ["event 10 out of order: expected 11 (events reordered or duplicated)",
                               *mismatches(10, 15, 20, 25, 30)]


def test_a_deleted_event_is_not_blamed_on_later_events(dense) -> None:
    """After deleting event 12, every later checkpoint used to claim that an event still present
    ("events 14..14", "19..19", ...) had been removed (truncated)."""
    _, signer, lines = dense
    tampered = [line for i, line in enumerate(lines) if i != index_of(lines, "event", 12)]
    report = verify_export(tampered, vkey=vkey_of(signer))
    assert report.problems == ["event 12 missing: deleted from the log (next present is 13)",
                               *mismatches(10, 15, 20, 25, 30)]


def test_a_deleted_row_is_not_blamed_on_later_events_in_place(dense, tmp_path: Path) -> None:
    path, signer, _ = dense
    deleted = copy_db(path, tmp_path / "deleted.db")
    with sqlite3.connect(deleted) as db:
        db.execute("DELETE FROM events WHERE seq = 7")
    report = verify_database(deleted, vkey=vkey_of(signer))
    assert report.problems == ["event 7 missing: deleted from the log (next present is 8)",
                               *mismatches(5, 10, 15, 20, 25, 30)]


def test_a_truncated_tail_is_still_reported_after_a_deleted_event(dense) -> None:
    _, signer, lines = dense
    cut = {index_of(lines, "event", n) for n in (12, 27, 28, 29)}
    tampered = [line for i, line in enumerate(lines) if i not in cut]
    report = verify_export(tampered, vkey=vkey_of(signer))
    assert report.problems == ["event 12 missing: deleted from the log (next present is 13)",
                               *mismatches(10, 15, 20, 25),
                               "checkpoint at size 30 but only 26 events precede it: events "
                               "27..29 were removed (truncated)"]


def test_an_event_deleted_just_before_a_checkpoint_is_missing_not_truncated(dense) -> None:
    _, signer, lines = dense
    tampered = [line for i, line in enumerate(lines) if i != index_of(lines, "event", 14)]
    report = verify_export(tampered, vkey=vkey_of(signer))
    assert report.problems == ["event 14 missing: deleted from the log (next present is 15)",
                               *mismatches(10, 15, 20, 25, 30)]


def test_a_forged_checkpoint_is_found(built) -> None:
    _, signer, lines = built
    i = index_of(lines, "checkpoint", 20)
    rec = json.loads(lines[i])
    body, _, sig = rec["note"].partition("\n\n")
    forged_body = body.replace("\n20\n", "\n19\n")
    rec["note"] = forged_body + "\n\n" + sig
    tampered = list(lines)
    tampered[i] = json.dumps(rec).encode() + b"\n"
    report = verify_export(tampered, vkey=vkey_of(signer))
    assert any(p.startswith("checkpoint on line") and "signature invalid" in p
               for p in report.problems)


def test_a_checkpoint_signed_by_another_key_is_found(built) -> None:
    _, signer, lines = built
    i = index_of(lines, "checkpoint", 20)
    rec = json.loads(lines[i])
    body = rec["note"].partition("\n\n")[0] + "\n"
    impostor = NoteSigner(ORIGIN, SigningKey.generate("ed25519"))
    rec["note"] = sign_note(body.encode(), impostor).decode()
    tampered = list(lines)
    tampered[i] = json.dumps(rec).encode() + b"\n"
    report = verify_export(tampered, vkey=vkey_of(signer))
    assert any("signature invalid" in p for p in report.problems)


def test_a_whole_log_resigned_by_an_attacker_fails_against_the_pinned_key(built) -> None:
    _, signer, lines = built
    impostor = NoteSigner(ORIGIN, SigningKey.generate("ed25519"))
    header = json.loads(lines[0])
    header["vkey"] = vkey_of(impostor)
    tampered = [json.dumps(header).encode() + b"\n", *lines[1:]]
    assert not verify_export(tampered, vkey=vkey_of(signer)).ok
    unpinned = verify_export(tampered)  # trusting the file's own key is flagged in notes
    assert any("pin it with --vkey" in n for n in unpinned.notes)


def test_an_export_from_the_middle_verifies(built, tmp_path: Path) -> None:
    path, signer, _ = built
    log = AuditLog(path, signer=signer, origin=ORIGIN)
    try:
        lines = list(export_lines(log, vkey=vkey_of(signer), since=15))
    finally:
        log.close()
    report = verify_export(lines, vkey=vkey_of(signer))
    assert report.ok, report.problems
    assert (report.start, report.events) == (10, 20)


def test_not_an_export_is_refused() -> None:
    with pytest.raises(ValueError, match="not a keygrants audit export"):
        verify_export([b"hello\n"])


def copy_db(src: Path, dst: Path) -> Path:
    s = sqlite3.connect(src)
    d = sqlite3.connect(dst)
    s.backup(d)
    s.close()
    d.close()
    return dst


def test_database_verification_finds_edits_deletions_and_truncation(built, tmp_path: Path) -> None:
    path, signer, _ = built
    assert verify_database(path, vkey=vkey_of(signer)).ok
    edited = copy_db(path, tmp_path / "edited.db")
    with sqlite3.connect(edited) as db:
        db.execute("UPDATE events SET data = replace(data, 'svc', 'eve') WHERE seq = 3")
    assert any(p.startswith("event 3 altered") for p in
               verify_database(edited, vkey=vkey_of(signer)).problems)
    deleted = copy_db(path, tmp_path / "deleted.db")
    with sqlite3.connect(deleted) as db:
        db.execute("DELETE FROM events WHERE seq = 17")
    assert any(p.startswith("event 17 missing") for p in
               verify_database(deleted, vkey=vkey_of(signer)).problems)
    truncated = copy_db(path, tmp_path / "truncated.db")
    with sqlite3.connect(truncated) as db:
        db.execute("DELETE FROM events WHERE seq >= 26")
    assert any("checkpoint at size 30 but only 26 events" in p for p in
               verify_database(truncated, vkey=vkey_of(signer)).problems)


def test_cli_verify_reports_and_exits_non_zero(built, tmp_path: Path) -> None:
    _, signer, lines = built
    good = tmp_path / "good.jsonl"
    good.write_bytes(b"".join(lines))
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"".join(edit_event(lines, 2, lambda e: e.update(principal="x"), keep_leaf=True)))
    runner = CliRunner()
    ok = runner.invoke(main, ["audit", "verify", str(good), "--vkey", vkey_of(signer)])
    assert ok.exit_code == 0 and ok.stdout.startswith("OK: 30 event(s), 4 checkpoint(s)")
    failed = runner.invoke(main, ["audit", "verify", str(bad), "--vkey", vkey_of(signer), "--json"])
    assert failed.exit_code == 1
    report = json.loads(failed.stdout)
    assert report["ok"] is False and report["problem_count"] >= 1
    assert any(p.startswith("event 2 altered") for p in report["problems"])
    assert format_vkey(ORIGIN, signer.verifier().public_key) == vkey_of(signer)


def checkpoint_note(lines: Lines, size: int) -> bytes:
    return str(json.loads(lines[index_of(lines, "checkpoint", size)])["note"]).encode()


def test_a_checkpoint_kept_elsewhere_catches_a_rollback_and_a_rewrite(built, tmp_path: Path) -> None:
    """Whoever can write the log can remove events together with the checkpoints that signed
    them, or rewrite history that a restarted server then signs again: the log alone still
    verifies. A checkpoint saved outside it earlier (`audit checkpoint`) does not match."""
    _, signer, lines = built
    kept = checkpoint_note(lines, 30)
    assert verify_export(lines, vkey=vkey_of(signer), anchor=kept).anchored
    rolled_back = lines[:index_of(lines, "checkpoint", 20) + 1]  # events 20..29 and their checkpoint gone
    assert verify_export(rolled_back, vkey=vkey_of(signer)).ok  # unnoticed without the anchor
    report = verify_export(rolled_back, vkey=vkey_of(signer), anchor=kept)
    assert any("events 20..29 were removed (rolled back)" in p for p in report.problems)
    # the same signer over another history (what a server restarted on an edited log signs)
    other = AuditLog(tmp_path / "other.db", signer=signer, origin=ORIGIN, checkpoint_interval=3600)
    for i in range(30):
        other.append({"type": "crypto.encrypt", "result": "ok", "principal": "mallory" if i == 12
                      else "svc", "request_id": f"r{i}"})
        if (i + 1) % 10 == 0:
            other.checkpoint_now()
    rewritten = list(export_lines(other, vkey=vkey_of(signer)))
    other.close()
    assert verify_export(rewritten, vkey=vkey_of(signer)).ok
    report = verify_export(rewritten, vkey=vkey_of(signer), anchor=checkpoint_note(lines, 20))
    assert any("history rewritten" in p for p in report.problems)
    forged = kept.replace(b"\n30\n", b"\n31\n")
    assert any("--checkpoint: signature invalid" in p for p in
               verify_export(lines, vkey=vkey_of(signer), anchor=forged).problems)


def test_cli_verify_refuses_events_no_signature_covers(built, tmp_path: Path) -> None:
    """An export with no checkpoint (made up entirely, or its checkpoints dropped) used to
    verify as OK with exit status 0: only a note said that nothing was signed."""
    _, signer, lines = built
    unsigned = tmp_path / "unsigned.jsonl"
    unsigned.write_bytes(b"".join(raw for raw in lines if b'"kind":"checkpoint"' not in raw))
    runner = CliRunner()
    refused = runner.invoke(main, ["audit", "verify", str(unsigned), "--vkey", vkey_of(signer)])
    assert refused.exit_code == 4, refused.output
    assert "UNSIGNED: 30 event(s)" in refused.output and refused.output.splitlines()[-1].startswith(
        "UNSIGNED:")
    live = runner.invoke(main, ["audit", "verify", str(unsigned), "--vkey", vkey_of(signer),
                                "--allow-unsigned", "30"])
    assert live.exit_code == 0, live.output
    kept = tmp_path / "kept.note"
    kept.write_bytes(checkpoint_note(lines, 30))
    good = tmp_path / "good.jsonl"
    good.write_bytes(b"".join(lines[:index_of(lines, "checkpoint", 20) + 1]))
    rolled = runner.invoke(main, ["audit", "verify", str(good), "--vkey", vkey_of(signer),
                                  "--checkpoint", str(kept)])
    assert rolled.exit_code == 1 and "rolled back" in rolled.output
    # saved without its final newline, or as `audit checkpoint --json` prints it: the same
    note = checkpoint_note(lines, 30).decode()
    for saved in (note.rstrip("\n"), json.dumps({"size": 30, "note": note})):
        kept.write_text(saved)
        again = runner.invoke(main, ["audit", "verify", str(good), "--vkey", vkey_of(signer),
                                     "--checkpoint", str(kept)])
        assert again.exit_code == 1 and "rolled back" in again.output, again.output
