"""``keygrants audit …``: checkpoints, proofs, search, export, digests and offline verify."""

from __future__ import annotations

import base64
import contextlib
import sqlite3
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import click
import msgspec

from keygrants.audit.setup import AUDIT_DB_FILE, VKEY_META, is_postgres_url
from keygrants.audit.verify import (
    VerifyReport,
    postgres_vkey,
    stored_meta,
    verify_database,
    verify_export,
    verify_postgres,
)
from keygrants.cli._common import DATA_DIR_ENV, State, common, emit, fail, read_stdin_line
from keygrants.client import Client
from keygrants.errors import Forbidden, InvalidRequest, KeygrantsError, KeyNotFound

__all__ = ["audit"]

_SHOWN = 50
_PROGRESS_MIN_EVENTS = 100_000  # a database verification shows a progress bar above this
_EXPORT_MODE = 0o600  # an export file's mode: owner read/write only, like an audit sink file


@click.group()
def audit() -> None:
    """Inspect, export and verify the tamper-evident audit log."""


@audit.command("checkpoint")
@click.option("--now", is_flag=True, help="Make a checkpoint of everything so far first.")
@common
def audit_checkpoint(state: State, now: bool) -> None:
    """Print the latest signed checkpoint (a C2SP signed note)."""
    with state.client() as c:
        cp = c.audit_checkpoint(now=now)
    emit(state, cp, cp.note.rstrip("\n"))


@audit.command("key")
@common
def audit_key(state: State) -> None:
    """Print the audit verifier key (vkey); pin it for `audit verify --vkey`."""
    with state.client() as c:
        key = c.audit_key()
    emit(state, key, key.vkey)


@audit.command("hash")
@click.argument("value")
@common
def audit_hash(state: State, value: str) -> None:
    """Print the digest under which the log records VALUE (a token, a key), to search for it;
    - reads VALUE from the first line of stdin (keeps a secret out of the process list)."""
    if value == "-":
        value = read_stdin_line("value")
    with state.client() as c:
        digest = c.audit_hash(value)
    emit(state, digest, digest.digest)


@audit.command("search")
@click.option("--principal", default=None)
@click.option("--key", "key_id", default=None, help="Key id, name or alias (a name or alias is "
              "looked up: the key as it is now).")
@click.option("--grant", default=None, help="Grant id.")
@click.option("--type", "event_type", default=None, help="Event type, e.g. crypto.decrypt.")
@click.option("--since", default=None, help="RFC 3339 UTC time, e.g. 2026-11-22T00:00:00Z.")
@click.option("--until", default=None, help="RFC 3339 UTC time (exclusive).")
@click.option("--after", default=None, type=click.IntRange(0), help="Continue after this seq.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 1000))
@common
def audit_search(state: State, principal: str | None, key_id: str | None, grant: str | None,
                 event_type: str | None, since: str | None, until: str | None,
                 after: int | None, limit: int) -> None:
    """Search audit events (one JSON event per line; --json for the page object)."""
    with state.client() as c:
        if key_id is not None:
            key_id = _key_id(c, key_id)
        page = c.audit_search(principal=principal, key=key_id, grant=grant, type=event_type,
                              since=since, until=until, after=after, limit=limit)

    def text() -> None:
        for event in page.events:
            click.echo(msgspec.json.encode(event).decode())
        if page.next is not None:
            click.echo(f"more: --after {page.next}", err=True)

    emit(state, page, text)


def _key_id(c: Client, ref: str) -> str:
    """Events record keys by id: a key id is used as given (a deleted key's events stay
    searchable), a name or alias is looked up, as the server resolves references."""
    try:
        return str(uuid.UUID(ref))
    except ValueError:
        pass
    try:
        return c.describe_key(ref).id
    except KeyNotFound:
        raise InvalidRequest(f"--key: no key named {ref!r}; events record keys by id, and a "
                             "deleted key's events are found by its id") from None
    except Forbidden:
        raise InvalidRequest(f"--key: cannot look up the key named {ref!r} (forbidden); give "
                             "its id") from None


@audit.group("proof")
def audit_proof() -> None:
    """RFC 6962 inclusion and consistency proofs."""


@audit_proof.command("inclusion")
@click.argument("index", type=click.IntRange(0))
@click.option("--size", default=None, type=click.IntRange(1), help="Tree size [default: now].")
@common
def audit_proof_inclusion(state: State, index: int, size: int | None) -> None:
    """Inclusion proof of event INDEX."""
    with state.client() as c:
        proof = c.audit_inclusion_proof(index, size=size)
    emit(state, proof, "\n".join([f"index {proof.index}", f"size {proof.size}",
                                  f"leaf {base64.b64encode(proof.leaf_hash).decode()}",
                                  *(base64.b64encode(h).decode() for h in proof.proof)]))


@audit_proof.command("consistency")
@click.argument("old_size", type=click.IntRange(1))
@click.argument("new_size", type=click.IntRange(1), required=False)
@common
def audit_proof_consistency(state: State, old_size: int, new_size: int | None) -> None:
    """Consistency proof from OLD_SIZE to NEW_SIZE [default: now]."""
    with state.client() as c:
        proof = c.audit_consistency_proof(old_size, new_size)
    emit(state, proof, "\n".join([f"old {proof.old_size}", f"new {proof.new_size}",
                                  *(base64.b64encode(h).decode() for h in proof.proof)]))


@audit.command("export")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, allow_dash=True),
              help="File to write (JSON Lines), or - for stdout.")
@click.option("--since", default=0, show_default=True, type=click.IntRange(0),
              help="Start at this event (rounded down to the checkpoint before it).")
@common
def audit_export(state: State, out_path: str, since: int) -> None:
    """Export the log with its checkpoints, for `audit verify`."""
    with state.client() as c:
        if out_path == "-":
            written = c.audit_export(sys.stdout.buffer, since=since)
        else:
            written = _export_to_file(c, Path(out_path), since)
    if out_path != "-":
        emit(state, {"out": out_path, "bytes": written}, f"wrote {written} bytes to {out_path}")


def _export_to_file(c: Client, out: Path, since: int) -> int:
    """Export into a new temporary file next to ``out`` and put it in place only once the
    export is complete: a failed export leaves an earlier one at ``out`` as it was.

    An export names principals, key ids and source addresses, so the file is 0600 (as audit
    sink files are) whatever the umask, and replacing an existing ``out`` never widens its
    mode: one that allows less (0400) keeps it, one that allows group or others more is
    narrowed to 0600."""
    import os
    import tempfile

    try:
        fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    except OSError as exc:
        raise InvalidRequest(f"cannot write {out}: {exc.strerror or exc}") from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            written = c.audit_export(f, since=since)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _export_mode(out))
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise InvalidRequest(f"cannot write {out}: {exc.strerror or exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return written


def _export_mode(out: Path) -> int:
    """0600, or less when an existing ``out`` allows its owner less (never group or others)."""
    import os
    import stat

    try:
        existing = stat.S_IMODE(os.stat(out).st_mode)
    except FileNotFoundError:
        return _EXPORT_MODE
    return existing & _EXPORT_MODE


def _progress_lines(f: BinaryIO, total: int, quiet: bool) -> Iterator[bytes]:
    if quiet or total < 4 * 1024 * 1024:
        yield from f
        return
    from rich.progress import Progress

    with Progress(transient=True) as progress:
        task = progress.add_task("verifying", total=total)
        done = 0
        for line in f:
            done += len(line)
            if done % (1 << 20) < len(line):
                progress.update(task, completed=done)
            yield line


def _stored_vkey(data_dir: Path) -> str:
    db_path = data_dir / "keygrants.db"
    try:
        vkey = stored_meta(db_path, VKEY_META)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    if vkey is None:
        raise InvalidRequest(f"{db_path} records no audit key")
    return vkey.decode()


def _event_count(count: Callable[[], int]) -> int | None:
    try:
        return count()
    except Exception:  # only the progress bar needs it
        return None


@contextlib.contextmanager
def _db_progress(total: int | None, quiet: bool) -> Iterator[Callable[[int], None] | None]:
    """A progress bar over events for a database verification (large logs only)."""
    if quiet or total is None or total < _PROGRESS_MIN_EVENTS or not sys.stderr.isatty():
        yield None
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task("verifying", total=total)
        yield lambda done: bar.update(task, completed=done)


@audit.command("verify")
@click.argument("file", required=False, type=click.Path(exists=True, dir_okay=False))
@click.option("--data-dir", "data_dir", envvar=DATA_DIR_ENV, default=None,
              type=click.Path(file_okay=False), help="Verify <data-dir>/audit.db in place.")
@click.option("--store", "store_url", default=None, metavar="URL",
              help="Verify the audit log in a PostgreSQL store (postgresql://…), read-only.")
@click.option("--vkey", default=None, help="Pinned audit verifier key (from `audit key`).")
@click.option("--checkpoint", "anchor_file", default=None, metavar="FILE",
              type=click.Path(exists=True, dir_okay=False),
              help="A signed checkpoint kept outside the log (`audit checkpoint` saved earlier): "
                   "the log must still hold its events, unchanged.")
@click.option("--allow-unsigned", default=0, show_default=True, type=click.IntRange(min=0),
              help="Accept up to this many events after the last checkpoint (a live log).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report.")
def audit_verify(file: str | None, data_dir: str | None, store_url: str | None, vkey: str | None,
                 anchor_file: str | None, allow_unsigned: int, as_json: bool) -> None:
    """Verify an export FILE, a data directory's audit.db, or the audit log of a PostgreSQL
    store (--store URL), offline.

    Exit status 0 when the log is intact and every event is covered by a verified checkpoint,
    1 when an alteration was found (each is listed), 4 when nothing was altered but more than
    --allow-unsigned events are covered by no signature (make one with `audit checkpoint
    --now` first).
    """
    anchor = None
    try:
        if anchor_file is not None:
            try:
                with open(anchor_file, "rb") as f:
                    anchor = _checkpoint_note(f.read(65536))
            except OSError as exc:
                raise InvalidRequest(f"cannot read {anchor_file}: {exc.strerror or exc}") from None
        if file is not None and store_url is not None:
            raise InvalidRequest("give one of FILE and --store, not both")
        if file is None and store_url is None and data_dir is None:
            raise InvalidRequest("give an export FILE, --data-dir DIR or --store URL")
        if file is not None:
            path = Path(file)
            try:
                export = path.open("rb")
            except OSError as exc:
                raise InvalidRequest(f"cannot read {file}: {exc.strerror or exc}") from None
            with export:
                report = verify_export(_progress_lines(export, path.stat().st_size, as_json),
                                       vkey=vkey, anchor=anchor)
        elif store_url is not None:
            if not is_postgres_url(store_url):
                raise InvalidRequest("--store takes a postgresql:// URL; a SQLite data directory's "
                                     "log is verified with --data-dir")
            key = vkey or postgres_vkey(store_url)
            with _db_progress(_event_count(lambda: _postgres_count(store_url)), as_json) as progress:
                report = verify_postgres(store_url, vkey=key, progress=progress, anchor=anchor)
        else:
            assert data_dir is not None
            directory = Path(data_dir)
            db_path = directory / AUDIT_DB_FILE
            if not db_path.exists():
                raise InvalidRequest(f"no {AUDIT_DB_FILE} in {directory} (a server on a PostgreSQL "
                                     "store keeps its log there: use --store URL)")
            key = vkey or _stored_vkey(directory)
            with _db_progress(_event_count(lambda: _sqlite_count(db_path)), as_json) as progress:
                report = verify_database(db_path, vkey=key, progress=progress, anchor=anchor)
    except KeygrantsError as exc:
        fail(as_json, exc)
        return
    except ValueError as exc:
        fail(as_json, InvalidRequest(str(exc)))
        return
    unsigned = report.unsigned > allow_unsigned
    _print_report(report, as_json, unsigned=unsigned)
    if not report.ok:
        sys.exit(1)
    if unsigned:
        sys.exit(4)


def _checkpoint_note(saved: bytes) -> bytes:
    """The signed note of a saved `audit checkpoint` (its text, or its ``--json`` output),
    ending in exactly one newline as the note format has it."""
    if saved.lstrip().startswith(b"{"):
        try:
            note = msgspec.json.decode(saved).get("note")
        except (msgspec.DecodeError, AttributeError):
            note = None
        if isinstance(note, str):
            saved = note.encode()
    return saved.rstrip(b"\r\n") + b"\n"


def _sqlite_count(path: Path) -> int:
    db = sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True)
    try:
        return int(db.execute("SELECT coalesce(max(seq) + 1, 0) FROM events").fetchone()[0])
    finally:
        db.close()


def _postgres_count(url: str) -> int:
    from keygrants.audit.pglog import connect

    with connect(url, read_only=True) as conn:
        row = conn.execute("SELECT coalesce(max(seq) + 1, 0) FROM events").fetchone()
        return int(row[0]) if row else 0


def _print_report(report: VerifyReport, as_json: bool, *, unsigned: bool = False) -> None:
    if as_json:
        click.echo(msgspec.json.encode({
            "ok": report.ok and not unsigned, "events": report.events,
            "checkpoints": report.checkpoints, "start": report.start,
            "last_checkpoint_size": report.last_checkpoint_size, "unsigned": report.unsigned,
            "anchored": report.anchored, "problem_count": report.problem_count,
            "problems": report.problems, "notes": report.notes}).decode())
        return
    for note in report.notes:
        click.echo(f"note: {note}")
    for problem in report.problems[:_SHOWN]:
        click.echo(f"ALTERED: {problem}")
    if report.problem_count > _SHOWN:
        click.echo(f"... and {report.problem_count - _SHOWN} more (--json lists up to 1000)")
    if report.unsigned:
        click.echo(f"{'UNSIGNED' if unsigned else 'note'}: {report.unsigned} event(s) after the "
                   "last verified checkpoint are covered by no signature")
    if report.anchored:
        click.echo("note: the checkpoint kept outside the log (--checkpoint) matches it")
    verdict = ("OK" if report.ok and not unsigned else
               "UNSIGNED" if report.ok else f"FAILED ({report.problem_count} problem(s))")
    click.echo(f"{verdict}: {report.events} event(s), {report.checkpoints} checkpoint(s) "
               f"verified from event {report.start}")
