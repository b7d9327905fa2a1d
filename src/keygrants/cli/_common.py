"""Shared plumbing of the CLI commands: connection options, output, input parsing.

Command modules import from here; ``keygrants.cli`` assembles them into one ``main`` group.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import os
import re
import shlex
import ssl
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar
from urllib.parse import urlsplit

import click
import httpx
import msgspec
from click.core import ParameterSource

from keygrants._files import exposed_mode
from keygrants.client import Client
from keygrants.client._connection import (
    INSECURE_HTTP_ENV,
    insecure_http_allowed,
    is_loopback_host,
    server_url,
)
from keygrants.crypto.signing import SigningKey
from keygrants.durations import parse_duration
from keygrants.errors import InvalidRequest, KeygrantsError, Unauthenticated

if TYPE_CHECKING:
    from rich.table import Table

__all__ = [
    "DATA_DIR_ENV",
    "EXPIRES_IN",
    "GRANT_TTL",
    "LONG_TIMEOUT",
    "MAX_INPUT",
    "ROTATION_PERIOD",
    "Duration",
    "State",
    "b64",
    "check_private_file",
    "common",
    "context_option",
    "emit",
    "fail",
    "grant_options",
    "in_option",
    "key_option",
    "parse_context",
    "print_table",
    "read_dpop_key",
    "read_input",
    "read_stdin_line",
    "redact_userinfo",
    "refuse_public_key",
    "tags_update",
    "unb64",
]

F = TypeVar("F", bound=Callable[..., Any])
MAX_INPUT: Final = 16 * 1024 * 1024
DATA_DIR_ENV: Final = "KEYGRANTS_DATA_DIR"


DEFAULT_ADDR: Final = "http://127.0.0.1:8650"
TOKEN_ENV: Final = "KEYGRANTS_TOKEN"
TOKEN_FILE_ENV: Final = "KEYGRANTS_TOKEN_FILE"
PRINCIPAL_ENV: Final = "KEYGRANTS_PRINCIPAL"
KEY_FILE_ENV: Final = "KEYGRANTS_KEY_FILE"
MAX_TOKEN_FILE: Final = 64 * 1024
DEFAULT_TIMEOUT: Final = 10.0  # seconds a command waits for the server's answer
LONG_TIMEOUT: Final = 300.0  # for revoke-all and principal deletion (many grants to end)
ADMIN_TOKEN_FILE: Final = "admin.token"
CREDENTIAL_SOURCES: Final = ("--token, --token-file, KEYGRANTS_TOKEN, KEYGRANTS_TOKEN_FILE, "
                             "KEYGRANTS_PRINCIPAL + KEYGRANTS_KEY_FILE")
_MAX_KEY_FILE: Final = 64 * 1024  # a key file is far smaller: the start is enough to tell
_PUBLIC_PEM: Final = re.compile(r"-----BEGIN [A-Z0-9 ]*PUBLIC KEY-----")
_JWK_PRIVATE_MEMBERS: Final = ("d", "k")  # an OKP/EC/RSA private key; a symmetric key


class State:
    """Options shared by every command (``grant``/``dpop_key``: set by :func:`grant_options`).

    ``token`` is the token as given (``--token``/``--token-file`` or their variables, already
    read); ``data_dir`` is set only when ``--data-dir``/``KEYGRANTS_DATA_DIR`` was given.
    ``without_credentials`` is set by :meth:`client` when it sends no credential at all: why
    (no admin token found, or not read), for the error when the server asks for one.
    """

    def __init__(self, addr: str | None, token: str | None, data_dir: str | None,
                 as_json: bool, *, ca_file: str | None = None, client_cert: str | None = None,
                 client_key: str | None = None, data_dir_given: bool = False) -> None:
        self.addr = addr
        self.token = token
        self.data_dir = data_dir
        self.data_dir_given = data_dir_given
        self.as_json = as_json
        self.ca_file = ca_file
        self.client_cert = client_cert
        self.client_key = client_key
        self.grant: str | None = None
        self.dpop_key: SigningKey | None = None
        self.without_credentials: str | None = None

    def client(self, *, timeout: float = DEFAULT_TIMEOUT) -> Client:
        """A client with the one credential configured, waiting up to ``timeout`` seconds for
        an answer (:data:`LONG_TIMEOUT` for commands whose work grows with the data, such as
        revoking every grant of a principal).

        Credentials: a token (``--token``, ``--token-file``, ``KEYGRANTS_TOKEN``,
        ``KEYGRANTS_TOKEN_FILE``) or a signing key (``KEYGRANTS_PRINCIPAL`` +
        ``KEYGRANTS_KEY_FILE``), never both; with neither, the data directory's admin token,
        but only for a loopback address or an explicitly given data directory (the admin token
        of this machine's server is never sent to another one).

        Raises:
            InvalidRequest: both kinds of credentials, half a signing key, a key file readable
                by group or others or holding a public key, unusable TLS files or a malformed
                address.
            ValueError: a malformed address, or plain ``http://`` to a host that is not
                loopback without ``KEYGRANTS_ALLOW_INSECURE_HTTP=1``.
        """
        # The grant options are read by click (--grant/KEYGRANTS_GRANT, ...) for the commands
        # that take them; "" keeps the SDK from reading them again for every other command.
        options: dict[str, Any] = {"grant": self.grant or "", "dpop_key": self.dpop_key,
                                   "timeout": timeout, **self._tls_options()}
        token = self.token
        principal = os.environ.get(PRINCIPAL_ENV) or None
        key_file = os.environ.get(KEY_FILE_ENV) or None
        if principal or key_file:
            if token:
                raise InvalidRequest(
                    "both a token (--token, --token-file, KEYGRANTS_TOKEN or "
                    "KEYGRANTS_TOKEN_FILE) and a signing key (KEYGRANTS_PRINCIPAL and "
                    "KEYGRANTS_KEY_FILE) are configured; unset one of them")
            if not key_file or not principal:
                given, missing = ((PRINCIPAL_ENV, KEY_FILE_ENV) if principal
                                  else (KEY_FILE_ENV, PRINCIPAL_ENV))
                raise InvalidRequest(f"{given} is set but {missing} is not: request signing "
                                     "needs both (unset it to use a token instead)")
            check_private_file(key_file, f"key file {key_file} (KEYGRANTS_KEY_FILE)")
            return self._connect(principal=principal, key_file=key_file, **options)
        if not token:
            token = self._admin_token()
        return self._connect(token=token or "", **options)

    def explain_unauthenticated(self, exc: KeygrantsError) -> None:
        """Add to a server's bare ``unauthenticated`` answer, when nothing was sent to
        authenticate with, what the CLI looked for (the server cannot know)."""
        if self.without_credentials and exc.code == Unauthenticated.code:
            exc.message = f"{exc.message}: {self.without_credentials}"

    def _connect(self, **options: Any) -> Client:
        # The address is checked here first so that a refusal names what a CLI user can do
        # (the SDK's message names its allow_insecure_http argument); the SDK checks it again.
        try:
            server_url(self.addr or DEFAULT_ADDR,
                       allow_insecure_http=insecure_http_allowed(False), own_transport=False,
                       opt_in=f"set {INSECURE_HTTP_ENV}=1")
            return Client(self.addr, **options)
        except httpx.InvalidURL as exc:
            raise InvalidRequest(f"invalid server address {self.addr or ''!r}: {exc}") from None

    def _admin_token(self) -> str | None:
        """``admin.token`` of the data directory: one given on the command line
        (``--data-dir``), or the one of ``KEYGRANTS_DATA_DIR`` (or ``./keygrants-data``) when
        the server is on this machine (a loopback address) and no client certificate (an
        identity of its own) is presented. The variable alone does not do for another server:
        it is the server's own setting, exported on the machines that run one.

        Without a token (and without a client certificate) :attr:`without_credentials` says
        why."""
        path = Path(self.data_dir or "./keygrants-data").absolute() / ADMIN_TOKEN_FILE
        none_given = f"no credentials given ({CREDENTIAL_SOURCES})"
        if not self.data_dir_given and (self.client_cert
                                        or not is_loopback(self.addr or DEFAULT_ADDR)):
            if not self.client_cert:
                self.without_credentials = (
                    f"{none_given}, and {path} was not read: the data directory's admin token "
                    "is used only for a loopback server or a --data-dir given on the command "
                    "line")
            return None
        try:
            token = path.read_text().strip()
        except FileNotFoundError:
            self.without_credentials = f"{none_given} and no admin token at {path}"
            return None
        except OSError as exc:
            self.without_credentials = (f"{none_given} and cannot read the admin token at "
                                        f"{path}: {exc.strerror or exc}")
            return None
        if not token:
            self.without_credentials = f"{none_given} and the admin token file {path} is empty"
        return token

    def _tls_options(self) -> dict[str, Any]:
        """``verify``/``cert`` for the SDK from --ca-file, --client-cert and --client-key, each
        file tried here first so that a bad one is named."""
        options: dict[str, Any] = {}
        if self.ca_file:
            try:
                ssl.create_default_context(cafile=self.ca_file)
            except (OSError, ValueError) as exc:
                raise InvalidRequest(f"cannot use the CA file {self.ca_file}: "
                                     f"{getattr(exc, 'strerror', None) or exc}") from None
            options["verify"] = self.ca_file
        if (self.client_cert is None) != (self.client_key is None):
            raise InvalidRequest("--client-cert and --client-key go together (KEYGRANTS_CLIENT_CERT"
                                 " and KEYGRANTS_CLIENT_KEY)")
        if self.client_cert and self.client_key:
            check_private_file(self.client_key, f"client key file {self.client_key}")
            try:
                ssl.create_default_context().load_cert_chain(self.client_cert, self.client_key)
            except OSError as exc:
                raise InvalidRequest(f"cannot use the client certificate {self.client_cert} with "
                                     f"the key {self.client_key}: {exc.strerror or exc}") from None
            options["cert"] = (self.client_cert, self.client_key)
        return options


def is_loopback(addr: str) -> bool:
    """Whether ``addr`` (``[scheme://]host[:port]``) names this machine: 127.0.0.0/8, ::1 or
    localhost."""
    try:
        host = urlsplit(addr if "://" in addr else "//" + addr).hostname
    except ValueError:
        return False
    return host is not None and host != "" and is_loopback_host(host)


def redact_userinfo(text: str, addr: str | None) -> str:
    """``text`` without the user name and password of ``addr`` (``http://user:pw@host``)."""
    if not addr:
        return text
    try:
        netloc = urlsplit(addr if "://" in addr else "//" + addr).netloc
    except ValueError:
        netloc = addr.partition("://")[2] or addr
    userinfo, at, _ = netloc.rpartition("@")
    if not at or not userinfo:
        return text
    return text.replace(userinfo + "@", "***@")


def check_private_file(path: str, what: str) -> None:
    """Refuse a file given as a private key that holds a public key (whatever its mode: a
    public key's mode does not matter, so that is said first), or a private key file readable
    by group or others (``what`` names it).

    Raises:
        InvalidRequest: a public key, or an exposed file with the ``chmod`` that fixes it.
    """
    refuse_public_key(path, what)
    mode = exposed_mode(path)
    if mode is not None:
        raise InvalidRequest(f"{what} is accessible by group or others (mode {mode:o}); run: "
                             f"chmod 600 {shlex.quote(path)}")


def refuse_public_key(path: str, what: str) -> None:
    """Refuse a file given as a private key that holds a public key: PEM ``… PUBLIC KEY``, or
    a JWK without private members. An unreadable file passes (reading it will say why).

    Raises:
        InvalidRequest: ``what`` is a public key.
    """
    try:
        with open(path, "rb") as f:
            text = f.read(_MAX_KEY_FILE).decode("utf-8", "replace").strip()
    except OSError:
        return
    if "PRIVATE KEY" in text:
        return
    public = _PUBLIC_PEM.search(text) is not None
    if not public and text.startswith("{"):
        try:
            jwk = json.loads(text)
        except ValueError:
            jwk = None
        public = (isinstance(jwk, dict) and "kty" in jwk
                  and not any(member in jwk for member in _JWK_PRIVATE_MEMBERS))
    if public:
        raise InvalidRequest(f"{what} is a public key; give the private key")


def read_token(token: str | None, token_file: str | None, *, token_from_env: bool = False,
               token_file_from_env: bool = False) -> str | None:
    """The token from ``--token`` (``-``: the first line of stdin) or ``--token-file``.

    An option on the command line beats either variable (``--token-file F`` with
    ``KEYGRANTS_TOKEN`` exported reads F); ``*_from_env`` says that the value came from the
    variable.

    Raises:
        InvalidRequest: both options, or both variables, an unreadable or empty file, or a
            token that is not printable ASCII.
    """
    if token and token_file and token_from_env != token_file_from_env:
        token, token_file = (None, token_file) if token_from_env else (token, None)
    if token and token_file:
        raise InvalidRequest(f"both {TOKEN_ENV} and {TOKEN_FILE_ENV} are set: unset one of them, "
                             "or choose with --token or --token-file" if token_from_env
                             else "give a token with --token or --token-file, not both")
    if token == "-":
        token = read_stdin_line("token")
    elif token_file:
        token = read_file(token_file, MAX_TOKEN_FILE).decode("utf-8", "replace")
        if not token.strip():
            raise InvalidRequest(f"no token in {token_file}")
    if token is None:
        return None
    token = token.strip()
    if not token.isascii() or not token.isprintable() or " " in token:
        raise InvalidRequest("the token contains spaces, control or non-ASCII characters; check "
                             "how it was copied")
    return token


def fail(state_json: bool, exc: KeygrantsError) -> None:
    if state_json:
        click.echo(msgspec.json.encode(exc.to_dict()).decode(), err=True)
    else:
        code = f" ({exc.code})" if exc.code else ""
        click.echo(f"Error: {exc.message}{code}", err=True)
    sys.exit(1)


def common(fn: F) -> F:
    """Add the connection options and --json, and turn errors into exit status 1."""

    @click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")
    @click.option("--client-key", envvar="KEYGRANTS_CLIENT_KEY", show_envvar=True, default=None,
                  type=click.Path(dir_okay=False), help="PEM private key of --client-cert.")
    @click.option("--client-cert", envvar="KEYGRANTS_CLIENT_CERT", show_envvar=True, default=None,
                  type=click.Path(dir_okay=False),
                  help="PEM client certificate presented to the server (mTLS).")
    @click.option("--ca-file", envvar="KEYGRANTS_CA_FILE", show_envvar=True, default=None,
                  type=click.Path(dir_okay=False),
                  help="PEM CA certificates to verify the server's certificate with "
                  "[default: the system's].")
    @click.option("--data-dir", envvar=DATA_DIR_ENV, default=None,
                  help="Data directory whose admin.token is used when no credentials are given "
                  "[default: ./keygrants-data, for a loopback address only].")
    @click.option("--token-file", envvar=TOKEN_FILE_ENV, default=None, show_envvar=True,
                  type=click.Path(dir_okay=False), help="Read the bearer token from FILE.")
    @click.option("--token", envvar=TOKEN_ENV, default=None, show_envvar=True,
                  help="Bearer token: an API key or the admin token; '-' reads it from stdin. "
                  "Prefer the variable or --token-file: options are visible to other users.")
    @click.option("--addr", envvar="KEYGRANTS_ADDR", default=None, show_envvar=True,
                  help=f"Server address [default: {DEFAULT_ADDR}].")
    @functools.wraps(fn)
    def wrapper(addr: str | None, token: str | None, token_file: str | None,
                data_dir: str | None, ca_file: str | None, client_cert: str | None,
                client_key: str | None, as_json: bool, **kwargs: Any) -> Any:
        source = click.get_current_context().get_parameter_source
        env, command_line = ParameterSource.ENVIRONMENT, ParameterSource.COMMANDLINE
        state: State | None = None
        try:
            given_token = read_token(token, token_file, token_from_env=source("token") is env,
                                     token_file_from_env=source("token_file") is env)
            state = State(addr, given_token, data_dir, as_json, ca_file=ca_file,
                          client_cert=client_cert, client_key=client_key,
                          data_dir_given=source("data_dir") is command_line)
            return fn(state, **kwargs)
        except KeygrantsError as exc:
            if state is not None:
                state.explain_unauthenticated(exc)
            exc.message = redact_userinfo(exc.message, addr)
            fail(as_json, exc)
        except (ValueError, httpx.InvalidURL) as exc:
            fail(as_json, InvalidRequest(redact_userinfo(str(exc), addr)))
        return None

    return wrapper  # type: ignore[return-value]


def read_dpop_key(path: str) -> SigningKey:
    """A DPoP proof key: a PEM private key file (Ed25519 or P-256) that only its owner may
    read.

    Raises:
        InvalidRequest: an unreadable file, a public key, a file that is not an Ed25519 or
            P-256 private key, or a private key readable by group or others.
    """
    import warnings

    from keygrants.client import load_dpop_key

    what = f"DPoP key file {path}"
    try:
        with warnings.catch_warnings():  # the SDK's warning about the mode: refused below
            warnings.simplefilter("ignore", UserWarning)
            key = load_dpop_key(path)
    except OSError as exc:
        raise InvalidRequest(f"cannot read {path}: {exc.strerror}") from None
    except ValueError:
        refuse_public_key(path, what)
        raise InvalidRequest(f"{what} does not hold a DPoP proof key: expected an unencrypted "
                             "Ed25519 or P-256 private key (PEM)") from None
    check_private_file(path, what)  # a private key: refused, not used
    return key


def grant_options(fn: F) -> F:
    """Add --grant and --dpop-key-file (a cryptographic command presenting a grant)."""

    @click.option("--dpop-key-file", envvar="KEYGRANTS_DPOP_KEY_FILE", show_envvar=True,
                  default=None, type=click.Path(dir_okay=False),
                  help="PEM private key (Ed25519 or P-256) proving possession of a DPoP-bound "
                  "grant.")
    @click.option("--grant", "grant", envvar="KEYGRANTS_GRANT", show_envvar=True, default=None,
                  metavar="TOKEN", help="Present this grant token (Keygrants-Grant) alongside "
                  "your own credentials; '-' reads it from stdin.")
    @functools.wraps(fn)
    def wrapper(state: State, grant: str | None, dpop_key_file: str | None, **kwargs: Any) -> Any:
        state.grant = read_stdin_line("grant token").strip() if grant == "-" else grant
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
        InvalidRequest: the line is empty or longer than :data:`MAX_STDIN_LINE` bytes.
    """
    # from the byte stream: the rest of stdin stays there for the command's input (read_input)
    raw = sys.stdin.buffer.readline(MAX_STDIN_LINE + 1)
    if len(raw) > MAX_STDIN_LINE:
        raise InvalidRequest(f"the {what} on stdin is longer than {MAX_STDIN_LINE} bytes")
    line = raw.decode("utf-8", "replace").rstrip("\r\n")
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


def tags_update(tags: tuple[str, ...], clear_tags: bool) -> list[str] | None:
    """The tags an ``update`` command sets: ``--tag``s (replacing every tag), none
    (``--clear-tags``), or ``None`` to leave them.

    Raises:
        click.UsageError: both ``--tag`` and ``--clear-tags`` (one of them would be dropped).
    """
    if tags and clear_tags:
        raise click.UsageError("--tag and --clear-tags cannot be used together: --tag replaces "
                               "every tag, --clear-tags removes them all")
    if clear_tags:
        return []
    return list(tags) if tags else None


# The server's limits (keygrants.service, keygrants.access), checked again here so that a value
# out of range is a usage error like any other; the server stays the authority.
MIN_ROTATION_PERIOD: Final = 60
MAX_ROTATION_PERIOD: Final = 10 * 366 * 86400
MAX_CREDENTIAL_LIFETIME: Final = 10 * 366 * 86400
_OFF: Final = ("off", "none")

if TYPE_CHECKING:
    _IntParamType = click.ParamType[int]
else:  # generic only from click 8.4
    _IntParamType = click.ParamType


class Duration(_IntParamType):
    """An option value that is a duration (``90s``, ``15m``, ``12h``, ``30d``, ``2w``,
    ``1d12h`` or a number of seconds), converted to whole seconds when the command line is
    parsed: a malformed or out-of-range value is a usage error (exit 2), as for any other
    option.

    Args:
        minimum: the fewest seconds accepted.
        maximum: the most seconds accepted (``None``: the server decides, e.g. a grant TTL
            within its configured maximum).
        bounds: ``maximum``'s range in words, for the error (``"60 seconds and 10 years"``).
        off: ``off``, ``none`` and any zero duration are taken, as 0 (rotation off, no
            expiry).
    """

    name = "duration"

    def __init__(self, minimum: int = 1, maximum: int | None = None, *, bounds: str = "",
                 off: bool = False) -> None:
        if maximum is not None and not bounds:
            raise ValueError("a bounded duration needs its bounds in words")
        self.minimum = minimum
        self.maximum = maximum
        self.bounds = bounds
        self.off = off

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> int:
        if isinstance(value, int):  # already converted (a default, or a second pass)
            return value
        text = str(value)
        if self.off and text.strip().lower() in _OFF:
            return 0
        try:
            seconds = parse_duration(text)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        if self.off and seconds == 0:
            return 0
        if self.maximum is not None and not self.minimum <= seconds <= self.maximum:
            self.fail(f"{text.strip()} is out of range: must be between {self.bounds}", param,
                      ctx)
        if seconds < self.minimum:
            unit = "second" if self.minimum == 1 else "seconds"
            self.fail(f"{text.strip()} is out of range: must be at least {self.minimum} {unit}",
                      param, ctx)
        return seconds


ROTATION_PERIOD: Final = Duration(MIN_ROTATION_PERIOD, MAX_ROTATION_PERIOD,
                                  bounds="60 seconds and 10 years, or off", off=True)
EXPIRES_IN: Final = Duration(1, MAX_CREDENTIAL_LIFETIME, bounds="1 second and 10 years",
                             off=True)
GRANT_TTL: Final = Duration(1)


context_option = click.option("--context", "-c", "context", multiple=True, metavar="KEY=VALUE",
                               help="Encryption context entry (repeatable).")
in_option = click.option("--in", "in_file", type=click.Path(dir_okay=False, allow_dash=True),
                          default=None, help="Read input from FILE instead of stdin.")
key_option = click.option("--key", "-k", "key", required=True, help="Key id, name or alias.")


