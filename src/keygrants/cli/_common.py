"""Shared plumbing of the CLI commands: connection options, output, input parsing.

Command modules import from here; ``keygrants.cli`` assembles them into one ``main`` group.
"""

from __future__ import annotations

import base64
import binascii
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

import click
import msgspec

from keygrants.client import Client
from keygrants.crypto.signing import SigningKey
from keygrants.durations import parse_duration
from keygrants.errors import InvalidRequest, KeygrantsError

if TYPE_CHECKING:
    from rich.table import Table

__all__ = [
    "DATA_DIR_ENV",
    "MAX_INPUT",
    "State",
    "b64",
    "common",
    "context_option",
    "emit",
    "fail",
    "grant_options",
    "in_option",
    "key_option",
    "parse_context",
    "parse_duration_option",
    "print_table",
    "read_dpop_key",
    "read_input",
    "read_stdin_line",
    "unb64",
]

F = TypeVar("F", bound=Callable[..., Any])
MAX_INPUT: Final = 16 * 1024 * 1024
DATA_DIR_ENV: Final = "KEYGRANTS_DATA_DIR"


class State:
    """Options shared by every command (``grant``/``dpop_key``: set by :func:`grant_options`)."""

    def __init__(self, addr: str | None, token: str | None, data_dir: str | None,
                 as_json: bool) -> None:
        self.addr = addr
        self.token = token
        self.data_dir = data_dir
        self.as_json = as_json
        self.grant: str | None = None
        self.dpop_key: SigningKey | None = None

    def client(self) -> Client:
        # The grant options are read by click (--grant/KEYGRANTS_GRANT, ...) for the commands
        # that take them; "" keeps the SDK from reading them again for every other command.
        grants: dict[str, Any] = {"grant": self.grant or "", "dpop_key": self.dpop_key}
        token = self.token or os.environ.get("KEYGRANTS_TOKEN")
        if not token and os.environ.get("KEYGRANTS_PRINCIPAL"):
            return Client(self.addr, **grants)  # signs every request with KEYGRANTS_KEY_FILE
        if not token:
            data_dir = Path(self.data_dir or os.environ.get(DATA_DIR_ENV) or "./keygrants-data")
            token_file = data_dir / "admin.token"
            try:
                token = token_file.read_text().strip()
            except OSError:
                token = None
        return Client(self.addr, token=token or "", **grants)


def fail(state_json: bool, exc: KeygrantsError) -> None:
    if state_json:
        click.echo(msgspec.json.encode(exc.to_dict()).decode(), err=True)
    else:
        code = f" ({exc.code})" if exc.code else ""
        click.echo(f"Error: {exc.message}{code}", err=True)
    sys.exit(1)


def common(fn: F) -> F:
    """Add --addr, --token, --data-dir and --json, and turn errors into exit status 1."""

    @click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")
    @click.option("--data-dir", envvar=DATA_DIR_ENV, default=None,
                  help="Data directory whose admin.token is used when no token is given.")
    @click.option("--token", envvar="KEYGRANTS_TOKEN", default=None, show_envvar=True,
                  help="Bearer token: an API key or the admin token.")
    @click.option("--addr", envvar="KEYGRANTS_ADDR", default=None, show_envvar=True,
                  help="Server address [default: http://127.0.0.1:8650].")
    @functools.wraps(fn)
    def wrapper(addr: str | None, token: str | None, data_dir: str | None, as_json: bool,
                **kwargs: Any) -> Any:
        state = State(addr, token, data_dir, as_json)
        try:
            return fn(state, **kwargs)
        except KeygrantsError as exc:
            fail(as_json, exc)
        except ValueError as exc:
            fail(as_json, InvalidRequest(str(exc)))
        return None

    return wrapper  # type: ignore[return-value]


def read_dpop_key(path: str) -> SigningKey:
    """A DPoP proof key: a PEM private key file (Ed25519 or P-256)."""
    from keygrants.client import load_dpop_key

    try:
        return load_dpop_key(path)
    except OSError as exc:
        raise InvalidRequest(f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None


def grant_options(fn: F) -> F:
    """Add --grant and --dpop-key-file (a cryptographic command presenting a grant)."""

    @click.option("--dpop-key-file", envvar="KEYGRANTS_DPOP_KEY_FILE", show_envvar=True,
                  default=None, type=click.Path(dir_okay=False),
                  help="PEM private key (Ed25519 or P-256) proving possession of a DPoP-bound "
                  "grant.")
    @click.option("--grant", "grant", envvar="KEYGRANTS_GRANT", show_envvar=True, default=None,
                  metavar="TOKEN", help="Present this grant token (Keygrants-Grant) alongside "
                  "your own credentials.")
    @functools.wraps(fn)
    def wrapper(state: State, grant: str | None, dpop_key_file: str | None, **kwargs: Any) -> Any:
        state.grant = grant
        if dpop_key_file:
            state.dpop_key = read_dpop_key(dpop_key_file)
        return fn(state, **kwargs)

    return wrapper  # type: ignore[return-value]


def emit(state: State, result: Any, text: str | Callable[[], None]) -> None:
    if state.as_json:
        click.echo(msgspec.json.format(msgspec.json.encode(result), indent=2).decode())
    elif isinstance(text, str):
        click.echo(text)
    else:
        text()


def print_table(table: Table, *, stderr: bool = False) -> None:
    """Print ``table`` without cutting any cell short: ids are copied from it.

    When the output is not a terminal (a pipe, a file, a CI log) the table is printed at its
    natural width, one row a line, whatever the width of the terminal (80 columns when there is
    none); on a terminal narrower than the table, cells are folded, never truncated with an
    ellipsis.
    """
    from rich.console import Console
    from rich.measure import Measurement

    console = Console(stderr=stderr)
    if console.is_terminal:
        for column in table.columns:
            column.overflow = "fold"
    else:
        natural = Measurement.get(console, console.options.update(width=1 << 20), table).maximum
        console = Console(stderr=stderr, width=max(console.width, natural))
    console.print(table)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str | bytes, what: str) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    cleaned = b"".join(raw.split())  # tolerate line breaks and trailing newlines
    try:
        return base64.b64decode(cleaned, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{what} is not valid base64") from None


def read_file(path: str, limit: int) -> bytes:
    """A file's bytes, at most ``limit`` of them: reading stops one byte past the limit.

    Raises:
        InvalidRequest: unreadable (with the system's reason), or larger than ``limit``.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise InvalidRequest(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise InvalidRequest(f"{path} is larger than {limit} bytes")
    return data


def read_input(path: str | None) -> bytes:
    if path and path != "-":
        return read_file(path, MAX_INPUT)
    data = sys.stdin.buffer.read(MAX_INPUT + 1)
    if len(data) > MAX_INPUT:
        raise InvalidRequest(f"input is larger than {MAX_INPUT} bytes")
    return data


MAX_STDIN_LINE: Final = 64 * 1024


def read_stdin_line(what: str) -> str:
    """The first line of stdin without its line end: a secret given as ``-`` (kept out of the
    process list).

    Raises:
        InvalidRequest: the line is empty or longer than :data:`MAX_STDIN_LINE` characters.
    """
    line = sys.stdin.readline(MAX_STDIN_LINE + 1)
    if len(line) > MAX_STDIN_LINE:
        raise InvalidRequest(f"the {what} on stdin is longer than {MAX_STDIN_LINE} characters")
    line = line.rstrip("\r\n")
    if not line.strip():
        raise InvalidRequest(f"no {what} on stdin")
    return line


def parse_context(pairs: tuple[str, ...]) -> dict[str, str] | None:
    out: dict[str, str] = {}
    for pair in pairs:
        k, sep, v = pair.partition("=")
        if not sep or not k:
            raise InvalidRequest(f"context must be KEY=VALUE, got {pair!r}")
        if k in out:
            raise InvalidRequest(f"context key {k!r} given twice")
        out[k] = v
    return out or None


def parse_duration_option(text: str | None) -> int | None:
    if text is None:
        return None
    if text.lower() in ("off", "none", "0"):
        return 0
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None


context_option = click.option("--context", "-c", "context", multiple=True, metavar="KEY=VALUE",
                               help="Encryption context entry (repeatable).")
in_option = click.option("--in", "in_file", type=click.Path(dir_okay=False, allow_dash=True),
                          default=None, help="Read input from FILE instead of stdin.")
key_option = click.option("--key", "-k", "key", required=True, help="Key id, name or alias.")


