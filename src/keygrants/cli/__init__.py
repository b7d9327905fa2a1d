"""The ``keygrants`` command line: thin wrappers that parse options and call the SDK.

Connection settings come from ``--addr``/``KEYGRANTS_ADDR`` and ``--token``/``KEYGRANTS_TOKEN``,
falling back to the admin token file in ``--data-dir``/``KEYGRANTS_DATA_DIR``
(``./keygrants-data``). Every command takes ``--json``: results are printed as JSON on stdout,
and failures as the HTTP API's JSON error shape on stderr. Without ``--json`` a failure is one
line on stderr. Exit status: 0 success, 1 failure (or an invalid signature/tag), 2 usage error.
"""

from __future__ import annotations

import base64
import binascii
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, TypeVar

import click
import msgspec

from keygrants import models as m
from keygrants._version import __version__
from keygrants.client import Client
from keygrants.durations import format_duration, parse_duration
from keygrants.errors import InvalidRequest, KeygrantsError

__all__ = ["main"]

F = TypeVar("F", bound=Callable[..., Any])
MAX_INPUT: Final = 16 * 1024 * 1024
DATA_DIR_ENV: Final = "KEYGRANTS_DATA_DIR"


class _State:
    """Options shared by every command."""

    def __init__(self, addr: str | None, token: str | None, data_dir: str | None,
                 as_json: bool) -> None:
        self.addr = addr
        self.token = token
        self.data_dir = data_dir
        self.as_json = as_json

    def client(self) -> Client:
        token = self.token or os.environ.get("KEYGRANTS_TOKEN")
        if not token:
            data_dir = Path(self.data_dir or os.environ.get(DATA_DIR_ENV) or "./keygrants-data")
            token_file = data_dir / "admin.token"
            try:
                token = token_file.read_text().strip()
            except OSError:
                token = None
        return Client(self.addr, token=token or "")


def _fail(state_json: bool, exc: KeygrantsError) -> None:
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
                  help="Bearer token.")
    @click.option("--addr", envvar="KEYGRANTS_ADDR", default=None, show_envvar=True,
                  help="Server address [default: http://127.0.0.1:8650].")
    @functools.wraps(fn)
    def wrapper(addr: str | None, token: str | None, data_dir: str | None, as_json: bool,
                **kwargs: Any) -> Any:
        state = _State(addr, token, data_dir, as_json)
        try:
            return fn(state, **kwargs)
        except KeygrantsError as exc:
            _fail(as_json, exc)
        except ValueError as exc:
            _fail(as_json, InvalidRequest(str(exc)))
        return None

    return wrapper  # type: ignore[return-value]


def _emit(state: _State, result: Any, text: str | Callable[[], None]) -> None:
    if state.as_json:
        click.echo(msgspec.json.format(msgspec.json.encode(result), indent=2).decode())
    elif isinstance(text, str):
        click.echo(text)
    else:
        text()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str | bytes, what: str) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    cleaned = b"".join(raw.split())  # tolerate line breaks and trailing newlines
    try:
        return base64.b64decode(cleaned, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{what} is not valid base64") from None


def _read_input(path: str | None) -> bytes:
    if path and path != "-":
        with open(path, "rb") as f:
            data = f.read(MAX_INPUT + 1)
    else:
        data = sys.stdin.buffer.read(MAX_INPUT + 1)
    if len(data) > MAX_INPUT:
        raise InvalidRequest(f"input is larger than {MAX_INPUT} bytes")
    return data


def _context(pairs: tuple[str, ...]) -> dict[str, str] | None:
    out: dict[str, str] = {}
    for pair in pairs:
        k, sep, v = pair.partition("=")
        if not sep or not k:
            raise InvalidRequest(f"context must be KEY=VALUE, got {pair!r}")
        if k in out:
            raise InvalidRequest(f"context key {k!r} given twice")
        out[k] = v
    return out or None


def _duration(text: str | None) -> int | None:
    if text is None:
        return None
    if text.lower() in ("off", "none", "0"):
        return 0
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None


_context_option = click.option("--context", "-c", "context", multiple=True, metavar="KEY=VALUE",
                               help="Encryption context entry (repeatable).")
_in_option = click.option("--in", "in_file", type=click.Path(dir_okay=False, allow_dash=True),
                          default=None, help="Read input from FILE instead of stdin.")
_key_option = click.option("--key", "-k", "key", required=True, help="Key id, name or alias.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="keygrants")
def main() -> None:
    """keygrants: key management with scoped, short-lived, audited key grants."""


# -- server -------------------------------------------------------------------------------------

@main.command()
@click.option("--listen", default="127.0.0.1:8650", show_default=True, envvar="KEYGRANTS_LISTEN",
              help="HOST:PORT to listen on.")
@click.option("--data-dir", default="./keygrants-data", show_default=True, envvar=DATA_DIR_ENV,
              type=click.Path(file_okay=False), help="Where the database, seal key and admin "
              "token live.")
@click.option("--seal", default=None, help="Root key provider URI: local:passphrase (uses "
              "KEYGRANTS_PASSPHRASE) or local:///path/seal.key [default: <data-dir>/seal.key, or "
              "passphrase when KEYGRANTS_PASSPHRASE is set].")
@click.option("--store", default=None, help="Store URL [default: sqlite in the data dir].")
@click.option("--max-plaintext", default=64 * 1024, show_default=True, type=click.IntRange(1),
              help="Largest plaintext or message accepted, in bytes.")
@click.option("--scheduler-interval", default=30.0, show_default=True,
              type=click.FloatRange(0.05), help="Seconds between scheduled rotation/deletion "
              "checks.")
@click.option("--reset-admin-token", is_flag=True, help="Issue a new admin token (the old one "
              "stops working) and write it to <data-dir>/admin.token.")
@click.option("--access-log", is_flag=True, help="Log every request (never bodies or tokens).")
def server(listen: str, data_dir: str, seal: str | None, store: str | None, max_plaintext: int,
           scheduler_interval: float, reset_admin_token: bool, access_log: bool) -> None:
    """Run the keygrants server (SQLite in the data directory by default)."""
    import logging

    from keygrants.server import ServerConfig, parse_listen, serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        parse_listen(listen)
        serve(ServerConfig(data_dir=Path(data_dir), listen=listen, seal=seal, store=store,
                           max_plaintext=max_plaintext, scheduler_interval=scheduler_interval,
                           reset_admin_token=reset_admin_token, access_log=access_log))
    except KeygrantsError as exc:
        _fail(False, exc)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


# -- keys ---------------------------------------------------------------------------------------

@main.group()
def key() -> None:
    """Create and manage keys."""


def _show_key(info: m.KeyInfo) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=False, box=None)
    rows: list[tuple[str, str]] = [
        ("id", info.id), ("name", info.name), ("spec", info.spec), ("purpose", info.purpose),
        ("state", info.state), ("latest version", str(info.latest_version)),
        ("min decryption version", str(info.min_decryption_version)),
        ("derivable", "yes" if info.derivable else "no"),
        ("rotation period", format_duration(info.rotation_period) if info.rotation_period else "off"),
        ("next rotation", info.next_rotation_at.isoformat() if info.next_rotation_at else "-"),
        ("deletion date", info.deletion_date.isoformat() if info.deletion_date else "-"),
        ("aliases", ", ".join(info.aliases) or "-"),
        ("description", info.description or "-"),
        ("created", info.created_at.isoformat()), ("updated", info.updated_at.isoformat()),
    ]
    for k, v in rows:
        table.add_row(k, v)
    Console().print(table)


@key.command("create")
@click.argument("name")
@click.option("--spec", default="aes-256-gcm", show_default=True,
              type=click.Choice(["aes-256-gcm", "chacha20-poly1305", "hmac-sha256", "ed25519",
                                 "ecdsa-p256", "rsa-pss-3072"]), help="Key type.")
@click.option("--rotation-period", default=None, help="Rotate on schedule, e.g. 30d, 12h.")
@click.option("--description", default="", help="Free text.")
@click.option("--derivable", is_flag=True, help="Allow HKDF derivation (symmetric keys only).")
@common
def key_create(state: _State, name: str, spec: str, rotation_period: str | None,
               description: str, derivable: bool) -> None:
    """Create a key NAME."""
    period = _duration(rotation_period) or None
    with state.client() as c:
        info = c.create_key(name, spec=spec, description=description, rotation_period=period,
                            derivable=derivable)
    _emit(state, info, lambda: _show_key(info))


@key.command("list")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 1000))
@click.option("--after", default=None, help="Continue after this key name.")
@common
def key_list(state: _State, limit: int, after: str | None) -> None:
    """List keys."""
    with state.client() as c:
        page = c.list_keys(limit=limit, after=after)

    def text() -> None:
        from rich.console import Console
        from rich.table import Table

        table = Table("name", "id", "spec", "state", "version", "rotation")
        for k in page.keys:
            table.add_row(k.name, k.id, k.spec, k.state, str(k.latest_version),
                          format_duration(k.rotation_period) if k.rotation_period else "off")
        Console().print(table)
        if page.next:
            click.echo(f"more: --after {page.next}")

    _emit(state, page, text)


@key.command("show")
@click.argument("key_ref", metavar="KEY")
@common
def key_show(state: _State, key_ref: str) -> None:
    """Show a key's metadata."""
    with state.client() as c:
        info = c.describe_key(key_ref)
    _emit(state, info, lambda: _show_key(info))


@key.command("update")
@click.argument("key_ref", metavar="KEY")
@click.option("--description", default=None)
@click.option("--rotation-period", default=None, help="e.g. 30d, or 'off'.")
@click.option("--min-decryption-version", default=None, type=click.IntRange(1))
@common
def key_update(state: _State, key_ref: str, description: str | None,
               rotation_period: str | None, min_decryption_version: int | None) -> None:
    """Change a key's description, rotation period or minimum decryption version."""
    with state.client() as c:
        info = c.update_key(key_ref, description=description,
                            rotation_period=_duration(rotation_period),
                            min_decryption_version=min_decryption_version)
    _emit(state, info, lambda: _show_key(info))


def _key_action(name: str, doc: str, call: Callable[[Client, str], m.KeyInfo],
                message: Callable[[m.KeyInfo], str]) -> None:
    @key.command(name, help=doc)
    @click.argument("key_ref", metavar="KEY")
    @common
    def command(state: _State, key_ref: str) -> None:
        with state.client() as c:
            info = call(c, key_ref)
        _emit(state, info, message(info))


_key_action("rotate", "Add a new version; encryption uses it from now on.",
            lambda c, k: c.rotate_key(k), lambda i: f"{i.name}: now at version {i.latest_version}")
_key_action("disable", "Disable a key.", lambda c, k: c.disable_key(k),
            lambda i: f"{i.name}: {i.state}")
_key_action("enable", "Enable a key.", lambda c, k: c.enable_key(k),
            lambda i: f"{i.name}: {i.state}")
_key_action("cancel-deletion", "Cancel a scheduled deletion.",
            lambda c, k: c.cancel_key_deletion(k), lambda i: f"{i.name}: {i.state}")


@key.command("schedule-deletion")
@click.argument("key_ref", metavar="KEY")
@click.option("--days", default=30, show_default=True, type=click.IntRange(7, 30),
              help="Waiting period before the material is destroyed.")
@common
def key_schedule_deletion(state: _State, key_ref: str, days: int) -> None:
    """Schedule a key's destruction (it is unusable at once; cancel restores it)."""
    with state.client() as c:
        info = c.schedule_key_deletion(key_ref, days=days)
    assert info.deletion_date is not None
    _emit(state, info, f"{info.name}: pending deletion, destroyed after "
                       f"{info.deletion_date.isoformat()}")


@key.command("alias")
@click.argument("alias")
@click.argument("key_ref", metavar="KEY")
@common
def key_alias(state: _State, alias: str, key_ref: str) -> None:
    """Create ALIAS for KEY."""
    with state.client() as c:
        info = c.create_alias(alias, key_ref)
    _emit(state, info, f"{info.alias} -> {info.key_id}")


@key.command("unalias")
@click.argument("alias")
@common
def key_unalias(state: _State, alias: str) -> None:
    """Delete an alias (the key is untouched)."""
    with state.client() as c:
        c.delete_alias(alias)
    _emit(state, {"deleted": alias}, f"deleted alias {alias}")


@key.command("aliases")
@click.option("--key", "key_ref", default=None, help="Only this key's aliases.")
@common
def key_aliases(state: _State, key_ref: str | None) -> None:
    """List aliases."""
    with state.client() as c:
        aliases = c.list_aliases(key_ref)
    _emit(state, aliases, "\n".join(f"{a.alias} -> {a.key_id}" for a in aliases))


# -- cryptographic operations -------------------------------------------------------------------

@main.command()
@_key_option
@_context_option
@_in_option
@common
def encrypt(state: _State, key: str, context: tuple[str, ...], in_file: str | None) -> None:
    """Encrypt stdin (or --in FILE); print base64 ciphertext."""
    data = _read_input(in_file)
    with state.client() as c:
        result = c.encrypt(key, data, context=_context(context))
    _emit(state, result, _b64(result.ciphertext))


@main.command()
@_context_option
@_in_option
@common
def decrypt(state: _State, context: tuple[str, ...], in_file: str | None) -> None:
    """Decrypt base64 ciphertext from stdin (or --in FILE); write the plaintext bytes."""
    ciphertext = _unb64(_read_input(in_file), "ciphertext")
    with state.client() as c:
        result = c.decrypt(ciphertext, context=_context(context))
    if state.as_json:
        _emit(state, result, "")
    else:
        out = sys.stdout.buffer
        out.write(result.plaintext)
        out.flush()


@main.command("re-encrypt")
@_context_option
@click.option("--to-key", default=None, help="Destination key [default: the same key, latest "
              "version].")
@click.option("--to-context", multiple=True, metavar="KEY=VALUE",
              help="Destination context [default: the source context].")
@_in_option
@common
def re_encrypt(state: _State, context: tuple[str, ...], to_key: str | None,
               to_context: tuple[str, ...], in_file: str | None) -> None:
    """Re-encrypt base64 ciphertext from stdin without revealing the plaintext."""
    ciphertext = _unb64(_read_input(in_file), "ciphertext")
    with state.client() as c:
        result = c.re_encrypt(ciphertext, context=_context(context), destination_key=to_key,
                              destination_context=_context(to_context) if to_context else None)
    _emit(state, result, _b64(result.ciphertext))


@main.command("data-key")
@_key_option
@click.option("--bytes", "size", default=32, show_default=True, type=click.Choice(["16", "32", "64"]))
@_context_option
@click.option("--no-plaintext", is_flag=True, help="Return only the encrypted data key.")
@common
def data_key(state: _State, key: str, size: str, context: tuple[str, ...],
             no_plaintext: bool) -> None:
    """Generate a data key; print 'plaintext <b64>' and 'ciphertext <b64>'."""
    with state.client() as c:
        result = c.generate_data_key(key, size=int(size), context=_context(context),
                                     include_plaintext=not no_plaintext)
    lines = ([] if result.plaintext is None else [f"plaintext {_b64(result.plaintext)}"])
    lines.append(f"ciphertext {_b64(result.ciphertext)}")
    _emit(state, result, "\n".join(lines))


@main.command()
@_key_option
@click.option("--digest", is_flag=True, help="Input is a 32-byte SHA-256 digest, not a message.")
@_in_option
@common
def sign(state: _State, key: str, digest: bool, in_file: str | None) -> None:
    """Sign stdin (or --in FILE); print the base64 signature."""
    data = _read_input(in_file)
    with state.client() as c:
        result = c.sign(key, data, message_type="digest" if digest else "raw")
    _emit(state, result, _b64(result.signature))


def _verdict(state: _State, result: m.VerifyResult) -> None:
    _emit(state, result, "valid" if result.valid else "invalid")
    if not result.valid:
        sys.exit(1)


@main.command()
@_key_option
@click.option("--signature", "-s", required=True, help="Base64 signature.")
@click.option("--digest", is_flag=True, help="Input is a 32-byte SHA-256 digest.")
@click.option("--key-version", default=None, type=click.IntRange(1),
              help="Version that signed [default: try every live version].")
@_in_option
@common
def verify(state: _State, key: str, signature: str, digest: bool, key_version: int | None,
           in_file: str | None) -> None:
    """Verify a signature over stdin (or --in FILE); exit 1 if invalid."""
    data = _read_input(in_file)
    sig = _unb64(signature, "signature")
    with state.client() as c:
        result = c.verify(key, data, sig, message_type="digest" if digest else "raw",
                          key_version=key_version)
    _verdict(state, result)


@main.command()
@_key_option
@_in_option
@common
def mac(state: _State, key: str, in_file: str | None) -> None:
    """HMAC-SHA256 of stdin (or --in FILE); print the base64 tag."""
    data = _read_input(in_file)
    with state.client() as c:
        result = c.mac(key, data)
    _emit(state, result, _b64(result.mac))


@main.command("verify-mac")
@_key_option
@click.option("--mac", "tag", required=True, help="Base64 tag.")
@click.option("--key-version", default=None, type=click.IntRange(1))
@_in_option
@common
def verify_mac(state: _State, key: str, tag: str, key_version: int | None,
               in_file: str | None) -> None:
    """Verify an HMAC tag over stdin (or --in FILE); exit 1 if invalid."""
    data = _read_input(in_file)
    with state.client() as c:
        result = c.verify_mac(key, data, _unb64(tag, "mac"), key_version=key_version)
    _verdict(state, result)


@main.command()
@_key_option
@_context_option
@click.option("--length", default=32, show_default=True, type=click.IntRange(1, 1024))
@click.option("--salt", default=None, help="Base64 salt.")
@click.option("--key-version", default=None, type=click.IntRange(1))
@common
def derive(state: _State, key: str, context: tuple[str, ...], length: int, salt: str | None,
           key_version: int | None) -> None:
    """Derive bytes with HKDF-SHA256 from a derivable key; print base64."""
    with state.client() as c:
        result = c.derive(key, _context(context) or {}, length=length,
                          salt=None if salt is None else _unb64(salt, "salt"),
                          key_version=key_version)
    _emit(state, result, _b64(result.derived))


@main.command()
@click.option("--bytes", "n", default=32, show_default=True, type=click.IntRange(1, 1024))
@click.option("--hex", "as_hex", is_flag=True, help="Print hex instead of base64.")
@common
def random(state: _State, n: int, as_hex: bool) -> None:
    """Random bytes from the server's CSPRNG."""
    with state.client() as c:
        result = c.random(n)
    _emit(state, result, result.random.hex() if as_hex else _b64(result.random))


@main.command("public-key")
@_key_option
@click.option("--version", "key_version", default=None, type=click.IntRange(1))
@click.option("--format", "fmt", default="pem", show_default=True, type=click.Choice(["pem", "jwk"]))
@common
def public_key(state: _State, key: str, key_version: int | None, fmt: str) -> None:
    """Print a signing key's public key (PEM or JWK)."""
    with state.client() as c:
        result = c.get_public_key(key, version=key_version)
    text = (result.pem.rstrip("\n") if fmt == "pem"
            else msgspec.json.encode(result.jwk).decode())
    _emit(state, result, text)
