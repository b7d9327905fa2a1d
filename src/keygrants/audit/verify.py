"""Exporting the audit log, and verifying an export or a database offline.

Export format (JSON Lines, ``keygrants-audit-export/1``)::

    {"kind":"header","format":"keygrants-audit-export/1","origin":O,"vkey":V,
     "start":S,"frontier":[b64...]}
    {"kind":"checkpoint","size":S,"note":"..."}          (only when S > 0: authenticates the frontier)
    {"kind":"event","seq":N,"leaf":b64,"event":{...}}     one per event, in order
    {"kind":"checkpoint","size":N+1,"note":"..."}         right after the event it completes

An export that starts mid-log (``--since``) starts at the newest checkpoint at or before the
requested sequence number and carries the tree's frontier (its perfect-subtree roots) at that
size, so the verifier can continue the tree without the earlier events; the checkpoint that
follows the header authenticates that frontier.

Verification recomputes every leaf from the event's exact bytes (the canonical JSON the log
hashed) and the tree from the leaves, checks every checkpoint's signature with the audit key
(pin it with ``--vkey``) and that its root equals the recomputed root at its size, which
proves consistency between successive checkpoints. It reports where the log was altered:

- a missing or out-of-order sequence number (a deleted or reordered event);
- an event that no longer matches its recorded leaf hash (an edited event);
- a checkpoint whose root no longer matches (an alteration between it and the previous good
  checkpoint);
- a checkpoint whose signature fails (forged, or signed by another key);
- a checkpoint that claims more events than the log holds (a truncated tail);
- fewer events, or other ones, than the checkpoint recorded outside the log: one saved
  elsewhere (``--checkpoint``) or, for an ``audit.db`` next to its ``keygrants.db``, the
  high-water mark the server keeps in the store (a log deleted, emptied, truncated or rolled
  back together with its own checkpoints).
"""

from __future__ import annotations

import base64
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import msgspec

from keygrants.audit.log import AuditLog
from keygrants.audit.merkle import CompactTree, leaf_hash
from keygrants.audit.note import Checkpoint, InvalidNote, NoteVerifier, open_note, parse_vkey
from keygrants.audit.setup import MARK_META, VKEY_META
from keygrants.errors import StoreError

__all__ = ["EXPORT_FORMAT", "STORE_FILE", "VerifyReport", "export_lines", "postgres_vkey",
           "stored_mark", "stored_meta", "verify_database", "verify_export", "verify_postgres"]

EXPORT_FORMAT: Final = "keygrants-audit-export/1"
MAX_LINE: Final = 64 * 1024
_PROGRESS_EVERY: Final = 10_000
MAX_PROBLEMS: Final = 1000  # beyond this only the count grows: a mangled file is one verdict
STORE_FILE: Final = "keygrants.db"  # the store beside an audit.db in a data directory
_MARK_LABEL: Final = f"the checkpoint recorded in {STORE_FILE}"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def export_lines(log: AuditLog, *, vkey: str, since: int = 0,
                 upto: int | None = None) -> Iterator[bytes]:
    """The export of ``log`` from ``since`` on (see the module docstring), line by line; with
    ``upto``, only the events before it (a checkpoint's size: everything exported is signed)."""
    start, start_note = 0, None
    if since > 0:
        for cp in log.checkpoints():
            if cp.size <= since:
                start, start_note = cp.size, cp.note
    tree = CompactTree()
    if start:
        for seq, _, leaf in log.iter_events():
            if seq >= start:
                break
            tree.append(leaf)
    enc = msgspec.json.encode
    yield enc({"kind": "header", "format": EXPORT_FORMAT, "origin": log.origin, "vkey": vkey,
               "start": start, "frontier": [_b64(h) for h in tree.frontier()]}) + b"\n"
    if start_note is not None:
        yield enc({"kind": "checkpoint", "size": start, "note": start_note.decode()}) + b"\n"
    checkpoints = {cp.size: cp.note for cp in log.checkpoints(since_size=start + 1)}
    for seq, data, leaf in log.iter_events(since=start):
        if upto is not None and seq >= upto:
            break
        yield (b'{"kind":"event","seq":' + str(seq).encode() + b',"leaf":"' + _b64(leaf).encode()
               + b'","event":' + data + b"}\n")
        note = checkpoints.get(seq + 1)
        if note is not None:
            yield enc({"kind": "checkpoint", "size": seq + 1, "note": note.decode()}) + b"\n"


@dataclass(slots=True)
class VerifyReport:
    """The outcome of a verification."""

    events: int = 0
    checkpoints: int = 0
    start: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    last_checkpoint_size: int | None = None

    problem_count: int = 0
    unsigned: int = 0  # events after the last verified checkpoint: no signature covers them
    anchored: bool = False  # a checkpoint kept elsewhere (--checkpoint) matched the log

    @property
    def ok(self) -> bool:
        """Whether no alteration was found."""
        return self.problem_count == 0

    def add(self, problem: str) -> None:
        """Record a problem (the first :data:`MAX_PROBLEMS` are kept verbatim)."""
        self.problem_count += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(problem)


class _Line(msgspec.Struct, forbid_unknown_fields=True):
    kind: str
    seq: int | None = None
    leaf: str | None = None
    event: msgspec.Raw = msgspec.Raw()
    size: int | None = None
    note: str | None = None
    format: str | None = None
    origin: str | None = None
    vkey: str | None = None
    start: int | None = None
    frontier: list[str] | None = None


class _EventLine(msgspec.Struct, tag="event", tag_field="kind", forbid_unknown_fields=True):
    seq: int
    event: msgspec.Raw
    leaf: bytes | None = None  # base64 in the file, decoded by msgspec


class _CheckpointLine(msgspec.Struct, tag="checkpoint", tag_field="kind",
                      forbid_unknown_fields=True):
    note: str
    size: int | None = None


_decode_record: Final = msgspec.json.Decoder(_EventLine | _CheckpointLine).decode


class _Seq(msgspec.Struct):
    seq: int


_seq_of: Final = msgspec.json.Decoder(_Seq).decode


class _Engine:
    """Replays events and checkpoints in log order and records what does not add up."""

    def __init__(self, verifier: NoteVerifier, origin: str, report: VerifyReport,
                 progress: Callable[[int], None] | None) -> None:
        self.verifier = verifier
        self.origin = origin
        self.report = report
        self.progress = progress
        self.tree = CompactTree()
        self.expected = 0  # the sequence number after the highest one read: the log's position
        self.good_size = 0  # the last checkpoint that verified against the recomputed tree
        self.since_good = 0  # events read since that checkpoint (or the start)
        # Gaps in the sequence numbers, (first, end, next present), reported at the next
        # checkpoint or the end: an event that turns up later was moved, not deleted.
        self.gaps: list[tuple[int, int, int]] = []
        # Checkpoints that claim more events than precede them, (size, events read, position):
        # a deleted tail if nothing follows, a deleted event if an event past them does.
        self.ahead: list[tuple[int, int, int]] = []
        self.last_time: int | None = None
        self.anchors: list[tuple[str, Checkpoint]] = []  # (label, checkpoint) not yet reached

    def set_anchor(self, note: bytes, label: str = "--checkpoint") -> None:
        """A checkpoint kept outside the log (``keygrants audit checkpoint`` saved earlier, or
        the store's high-water mark): the log must still hold its events, with the same root
        at its size. It catches a rollback that removed checkpoints as well as events, which
        the log alone cannot."""
        try:
            anchor = Checkpoint.parse(open_note(note, [self.verifier]))
        except InvalidNote:
            self.problem(f"{label}: signature invalid (forged, altered, or signed by another "
                         "key)")
            return
        if anchor.origin != self.origin:
            self.problem(f"{label}: origin {anchor.origin!r} is not this log's")
            return
        self.anchors.append((label, anchor))
        self._check_anchors(self.expected - 1)

    @property
    def anchor(self) -> Checkpoint | None:
        """The first outside checkpoint not reached yet."""
        return self.anchors[0][1] if self.anchors else None

    def _check_anchors(self, passed: int) -> None:
        """Check the outside checkpoints whose size the log's position went past, from
        ``passed`` to :attr:`expected` (a deleted or duplicated event leaves the tree out of
        step with the sequence numbers, so that is a mismatch too)."""
        for label, anchor in list(self.anchors):
            if not passed < anchor.size <= self.expected:
                continue
            if self.tree.size != anchor.size or anchor.root != self.tree.root():
                self.problem(f"{label} at size {anchor.size}: root hash mismatch: the log's "
                             f"first {anchor.size} events are not the ones that checkpoint "
                             "signed (history rewritten)")
            elif label == "--checkpoint":
                self.report.anchored = True
            self.anchors.remove((label, anchor))

    def problem(self, text: str) -> None:
        self.report.add(text)

    def start_at(self, size: int, frontier: list[bytes]) -> None:
        self.tree = CompactTree.from_frontier(size, frontier)
        self.expected = self.good_size = size
        self.report.start = size
        self._check_anchors(size - 1)

    def _fill_gap(self, seq: int) -> None:
        """An event turned up late: it is out of order, no longer missing."""
        for i, (first, end, present) in enumerate(self.gaps):
            if first <= seq < end:
                self.gaps[i:i + 1] = [(a, b, present) for a, b in ((first, seq), (seq + 1, end))
                                      if a < b]
                return

    def _report_gaps(self) -> None:
        for first, end, present in self.gaps:
            missing = f"event {first}" if end == first + 1 else f"events {first}..{end - 1}"
            self.problem(f"{missing} missing: deleted from the log (next present is {present})")
        self.gaps.clear()

    def _place_ahead(self, seq: int | None) -> None:
        """Judge the checkpoints that came before events they cover, now that event ``seq``
        (``None``: the end of the log) follows them."""
        for size, count, position in self.ahead:
            if seq is None:
                self.problem(f"checkpoint at size {size} but only {count} events precede it: "
                             f"events {position}..{size - 1} were removed (truncated)")
            elif seq < size:
                self.problem(f"checkpoint at size {size} is out of place (after event "
                             f"{position - 1})")
            else:  # the events before it were deleted (reported as missing, just before)
                self.problem(f"checkpoint at size {size}: root hash mismatch: events "
                             f"{self.good_size}..{size - 1} were altered, inserted, deleted or "
                             "reordered")
        self.ahead.clear()

    def event(self, seq: int, data: bytes, recorded_leaf: bytes | None) -> None:
        passed = self.expected
        if seq < self.expected:
            self._fill_gap(seq)
            self.problem(f"event {seq} out of order: expected {self.expected} "
                         "(events reordered or duplicated)")
        else:
            if seq > self.expected:
                self.gaps.append((self.expected, seq, seq))
                if len(self.gaps) > MAX_PROBLEMS or self.ahead:  # no need to wait
                    self._report_gaps()
            self.expected = seq + 1
        self._place_ahead(seq)
        try:
            named = _seq_of(data).seq
        except (msgspec.DecodeError, msgspec.ValidationError):
            self.problem(f"event {seq}: not a valid audit event")
        else:
            if named != seq:
                self.problem(f"event {seq}: its content names sequence number {named}")
        computed = leaf_hash(data)  # the leaf is over the exact bytes: any change shows
        if recorded_leaf is not None and recorded_leaf != computed:
            self.problem(f"event {seq} altered: its content no longer matches its recorded leaf hash")
        self.tree.append(computed)
        if self.anchors:
            self._check_anchors(passed)
        self.since_good += 1
        self.report.events += 1
        if self.progress is not None and self.report.events % _PROGRESS_EVERY == 0:
            self.progress(self.report.events)

    def checkpoint(self, size: int | None, note: bytes, where: str) -> None:
        self.report.checkpoints += 1
        self._report_gaps()  # whatever is still missing here was not just moved further on
        try:
            body = open_note(note, [self.verifier])
            cp = Checkpoint.parse(body)
        except InvalidNote:
            self.problem(f"checkpoint {where}: signature invalid (forged, altered, or signed "
                         "by another key)")
            return
        if size is not None and cp.size != size:
            self.problem(f"checkpoint {where}: labelled size {size} but signed for {cp.size}")
        if cp.origin != self.origin:
            self.problem(f"checkpoint {where}: origin {cp.origin!r} is not this log's")
            return
        if cp.time is not None:
            if self.last_time is not None and cp.time < self.last_time:
                self.problem(f"checkpoint at size {cp.size}: its time goes backwards")
            self.last_time = cp.time
        self.report.last_checkpoint_size = cp.size
        # Placed by sequence numbers, not by the count of events read: a deleted or duplicated
        # event is reported where it is, and the checkpoints after it show as root mismatches.
        if cp.size > self.expected:
            self.ahead.append((cp.size, self.tree.size, self.expected))
            return
        if cp.size < self.expected:
            self.problem(f"checkpoint at size {cp.size} is out of place (after event "
                         f"{self.expected - 1})")
            return
        if self.tree.size != cp.size or cp.root != self.tree.root():
            self.problem(f"checkpoint at size {cp.size}: root hash mismatch: events "
                         f"{self.good_size}..{cp.size - 1} were altered, inserted, deleted or "
                         "reordered")
            return
        self.good_size = cp.size
        self.since_good = 0

    def finish(self) -> VerifyReport:
        self._report_gaps()
        self._place_ahead(None)
        for label, anchor in self.anchors:
            if anchor.size > self.expected:
                self.problem(f"{label} covers {anchor.size} events but the log holds "
                             f"{self.expected}: events {self.expected}..{anchor.size - 1} were "
                             "removed (rolled back)")
            else:
                self.report.notes.append(f"{label} at size {anchor.size} precedes the "
                                         f"export's start ({self.report.start}): not checked")
        self.report.unsigned = self.since_good
        return self.report


def _verifier(header_vkey: str | None, pinned: str | None, report: VerifyReport) -> NoteVerifier:
    if pinned is not None and header_vkey is not None and header_vkey != pinned:
        report.add("the log names a different audit key than the pinned --vkey")
    vkey = pinned or header_vkey
    if vkey is None:
        raise ValueError("no audit verifier key: pass --vkey")
    if pinned is None:
        report.notes.append("trusting the audit key recorded with the log; pin it with --vkey")
    return parse_vkey(vkey)


def verify_export(lines: Iterable[bytes], *, vkey: str | None = None,
                  progress: Callable[[int], None] | None = None,
                  anchor: bytes | None = None) -> VerifyReport:
    """Verify an export (an iterable of its lines); ``anchor`` is a signed checkpoint kept
    outside the log, which the log must still match.

    Raises:
        ValueError: if the input is not an export at all (no valid header).
    """
    report = VerifyReport()
    it = iter(lines)
    try:
        header = msgspec.json.decode(next(it), type=_Line)
    except (StopIteration, msgspec.DecodeError, msgspec.ValidationError):
        raise ValueError("not a keygrants audit export: no header line") from None
    if header.kind != "header" or header.format != EXPORT_FORMAT or header.origin is None:
        raise ValueError(f"not a {EXPORT_FORMAT} file")
    engine = _Engine(_verifier(header.vkey, vkey, report), header.origin, report, progress)
    if anchor is not None:
        engine.set_anchor(anchor)
    try:
        frontier = [base64.b64decode(h, validate=True) for h in header.frontier or []]
        engine.start_at(header.start or 0, frontier)
    except ValueError:
        report.add("header: invalid frontier")
    if (header.start or 0) > 0:
        report.notes.append(f"export starts at event {header.start}")
    for number, raw in enumerate(it, start=2):
        if len(raw) < 3 and not raw.strip():  # blank lines (no copy of every line to check)
            continue
        if len(raw) > MAX_LINE:
            report.add(f"line {number}: longer than {MAX_LINE} bytes")
            continue
        try:
            record = _decode_record(raw)
        except (msgspec.DecodeError, msgspec.ValidationError):
            report.add(f"line {number}: not valid JSON of the export format")
            continue
        if type(record) is _EventLine:
            engine.event(record.seq, bytes(record.event), record.leaf)
        else:
            assert isinstance(record, _CheckpointLine)
            engine.checkpoint(record.size, record.note.encode(), f"on line {number}")
    return engine.finish()


def _as_bytes(value: object) -> bytes:
    """A column as bytes, whatever type an editor of the file left in it."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    return str(value).encode()


def stored_meta(store_path: str | Path, name: str) -> bytes | None:
    """A meta value of a SQLite store (``keygrants.db``), read only (``None`` if absent).

    Raises:
        ValueError: if the store cannot be read.
    """
    try:
        db = sqlite3.connect(f"file:{Path(store_path).resolve()}?mode=ro", uri=True)
        try:
            row = db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise ValueError(f"cannot read {store_path}: {exc}") from None
    return None if row is None else _as_bytes(row[0])


def stored_mark(store_path: str | Path) -> bytes | None:
    """The audit log's high-water mark a SQLite store (``keygrants.db``) keeps: the newest
    checkpoint the server recorded there, as a signed note (``None`` if it has none).

    Raises:
        ValueError: if the store cannot be read.
    """
    return stored_meta(store_path, MARK_META)


def verify_database(path: str | Path, *, vkey: str, origin: str | None = None,
                    progress: Callable[[int], None] | None = None,
                    anchor: bytes | None = None, use_store_mark: bool = True) -> VerifyReport:
    """Verify an ``audit.db`` in place (read-only), events against their stored leaf hashes
    and the tree against every stored checkpoint; with ``use_store_mark``, also against the
    high-water mark of the ``keygrants.db`` beside it, if there is one (a log shorter than
    that mark was truncated or rolled back). A database that cannot be read (damaged, not
    an audit log) is reported as a problem, after whatever could be checked before."""
    report = VerifyReport()
    marks: list[tuple[str, bytes]] = []
    if use_store_mark:
        store = Path(path).resolve().parent / STORE_FILE
        if store.exists():
            try:
                mark = stored_mark(store)
            except ValueError as exc:
                report.notes.append(f"{exc}: its record of the log's length is not checked")
            else:
                if mark is not None:
                    marks.append((_MARK_LABEL, mark))
    uri = f"file:{Path(path).resolve()}?mode=ro"
    try:
        db = sqlite3.connect(uri, uri=True)
    except sqlite3.Error as exc:
        report.add(f"the audit database cannot be opened: {exc}")
        return report
    try:
        return _verify_rows(db.execute("SELECT size, note FROM checkpoints ORDER BY size"),
                            db.execute("SELECT seq, data, leaf FROM events ORDER BY seq"),
                            vkey=vkey, origin=origin, progress=progress, anchor=anchor,
                            marks=marks, report=report)
    except sqlite3.DatabaseError as exc:
        report.add(f"the audit database cannot be read ({exc}): it is damaged or not an audit "
                   "log; the events after the last one reported were not checked")
        return report
    finally:
        db.close()


def verify_postgres(url: str, *, vkey: str, origin: str | None = None,
                    progress: Callable[[int], None] | None = None,
                    anchor: bytes | None = None) -> VerifyReport:
    """Verify the audit log kept in a PostgreSQL store (schema ``keygrants_audit``), read-only
    in one snapshot, streaming the events.

    Raises:
        StoreError: if the database cannot be reached (where, and the driver's reason).
        ValueError: if the database cannot be read or holds no audit log.
    """
    import psycopg

    from keygrants.audit.pglog import SCHEMA, connect

    try:
        conn = connect(url, read_only=True)
    except psycopg.Error as exc:
        raise _unreachable(url, exc) from None  # the driver's error may carry the password
    try:
        with conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            found = conn.execute("SELECT to_regclass(%s)", (f"{SCHEMA}.events",)).fetchone()
            if found is None or found[0] is None:
                raise ValueError("this database holds no keygrants audit log")
            checkpoints = conn.execute("SELECT size, note FROM checkpoints ORDER BY size").fetchall()
            with conn.cursor(name="keygrants_audit_verify") as events:
                events.itersize = 10_000
                events.execute("SELECT seq, data, leaf FROM events ORDER BY seq")
                return _verify_rows(checkpoints, events, vkey=vkey, origin=origin,
                                    progress=progress, anchor=anchor)
    except psycopg.Error as exc:
        raise ValueError(f"cannot read the audit log: {type(exc).__name__}: {exc}") from None
    finally:
        conn.close()


def postgres_vkey(url: str) -> str:
    """The audit verifier key a PostgreSQL store recorded (trust it only as far as the store).

    Raises:
        StoreError: if the database cannot be reached (where, and the driver's reason).
        ValueError: if it cannot be read or records no audit key.
    """
    import psycopg

    try:
        conn = psycopg.connect(url, connect_timeout=10, autocommit=True)
    except psycopg.Error as exc:
        raise _unreachable(url, exc) from None  # the driver's error may carry the password
    try:
        with conn:
            row = conn.execute("SELECT value FROM meta WHERE name = %s", (VKEY_META,)).fetchone()
    except psycopg.Error as exc:
        raise ValueError(f"cannot read the store's audit key: "
                         f"{_driver_reason(url, exc)}") from None
    if row is None:
        raise ValueError("the store records no audit key")
    return bytes(row[0]).decode()


def _driver_reason(url: str, exc: BaseException) -> str:
    """The driver's message on one line, the password blanked should it appear in it."""
    from psycopg.conninfo import conninfo_to_dict

    text = " ".join(str(exc).split()) or type(exc).__name__
    try:
        password = conninfo_to_dict(url).get("password")
    except Exception:  # a malformed URL: the driver's message was about it
        password = None
    return text.replace(str(password), "***") if password else text


def _unreachable(url: str, exc: BaseException) -> StoreError:
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(url)
    except Exception:
        return StoreError("cannot connect to the database: malformed PostgreSQL URL")
    host = params.get("host") or params.get("hostaddr") or "localhost"
    port = params.get("port") or "5432"
    return StoreError(f"cannot reach the database at {host}:{port}: {_driver_reason(url, exc)}")


def _verify_rows(checkpoint_rows: Iterable[Any], event_rows: Iterable[Any], *, vkey: str,
                 origin: str | None, progress: Callable[[int], None] | None,
                 anchor: bytes | None = None, marks: Iterable[tuple[str, bytes]] = (),
                 report: VerifyReport | None = None) -> VerifyReport:
    """Check stored rows: ``(size, note)`` checkpoints and ``(seq, data, leaf)`` events, each
    in order. Filling ``report`` if given (so a read error part-way keeps what was found)."""
    report = report if report is not None else VerifyReport()
    verifier = _verifier(None, vkey, report)
    checkpoints = sorted(((int(size), _as_bytes(note)) for size, note in checkpoint_rows),
                         key=lambda row: row[0])
    engine = _Engine(verifier, origin or verifier.name, report, progress)
    if anchor is not None:
        engine.set_anchor(anchor)
    for label, note in marks:
        engine.set_anchor(note, label)
    due = 0  # checkpoints[due:] are not replayed yet
    for seq, data, leaf in event_rows:
        # a checkpoint of size N sits before event N, even when event N - 1 was deleted
        while due < len(checkpoints) and checkpoints[due][0] <= int(seq):
            size, note = checkpoints[due]
            engine.checkpoint(size, note, f"at size {size}")
            due += 1
        engine.event(int(seq), _as_bytes(data), _as_bytes(leaf))
    for size, note in checkpoints[due:]:
        engine.checkpoint(size, note, f"at size {size}")
    return engine.finish()
