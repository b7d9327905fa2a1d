"""The ``keygrants`` command line: thin wrappers that parse options and call the SDK.

Connection settings come from ``--addr``/``KEYGRANTS_ADDR`` and one identity: a token
(``--token``/``--token-file``/``KEYGRANTS_TOKEN``/``KEYGRANTS_TOKEN_FILE``) or a signing key
(``KEYGRANTS_PRINCIPAL`` + ``KEYGRANTS_KEY_FILE``), never both; with neither, the admin token
file in ``--data-dir``/``KEYGRANTS_DATA_DIR`` (``./keygrants-data`` for a loopback address
only). ``--ca-file`` and ``--client-cert``/``--client-key`` set up TLS. Every command takes
``--json``: results are printed as JSON on stdout, and failures as the HTTP API's JSON error
shape on stderr. Without ``--json`` a failure is one line on stderr. Exit status: 0 success,
1 failure (or an invalid signature/tag), 2 usage error.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import click
import msgspec

from keygrants import models as m
from keygrants._version import __version__
from keygrants.auth.httpsig import DEFAULT_NONCE_CACHE_SIZE
from keygrants.cli._common import (
    DATA_DIR_ENV,
    ROTATION_PERIOD,
    State,
    b64,
    common,
    context_option,
    emit,
    fail,
    grant_options,
    in_option,
    key_option,
    parse_context,
    print_table,
    read_input,
    tags_update,
    unb64,
)
from keygrants.client import Client
from keygrants.durations import format_duration
from keygrants.errors import KeygrantsError

__all__ = ["main"]

def _duration(text: str, option: str, *, allow_zero: bool = False) -> int:
    from keygrants.durations import parse_duration

    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise ValueError(f"{option}: {exc}") from None
    if seconds < (0 if allow_zero else 1):
        raise ValueError(f"{option} must be positive")
    return seconds


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
@click.option("--seal", default=None, envvar="KEYGRANTS_SEAL",
              help="Root key provider URI: local:passphrase (uses "
              "KEYGRANTS_PASSPHRASE), local:///path/seal.key, or any key provider (aws-kms:, "
              "vault:, pkcs11:, gcp-kms:, keygrants:; see docs/providers.md) [default: the local "
              "seal the data directory was made with (another provider must be given here "
              "every start: the URI recorded in the store is not trusted); on first start "
              "<data-dir>/seal.key, or the passphrase when KEYGRANTS_PASSPHRASE is set].")
@click.option("--store", default=None, help="Store URL [default: sqlite in the data dir].")
@click.option("--max-plaintext", default=64 * 1024, show_default=True, type=click.IntRange(1),
              help="Largest plaintext, or message to sign or MAC, accepted, in bytes.")
@click.option("--scheduler-interval", default=30.0, show_default=True,
              type=click.FloatRange(0.05), help="Seconds between scheduled rotation/deletion "
              "checks.")
@click.option("--reset-admin-token", is_flag=True, help="Issue a new admin token (the old one "
              "stops working) and write it to <data-dir>/admin.token.")
@click.option("--access-log", is_flag=True, help="Log every request (never bodies or tokens).")
@click.option("--audit-sink", "audit_sinks", multiple=True, metavar="URI", help="Also ship audit "
              "events to file:///path/audit.jsonl[?max_bytes=N&backups=N] or "
              "nats://host:port[?stream=S&subject=S] (repeatable; see docs/audit.md).")
@click.option("--node-id", default=None, envvar="KEYGRANTS_NODE_ID",
              help="Node name stamped on audit events [default: host name].")
@click.option("--auth", "auth_methods", default=None, metavar="LIST",
              help="Accepted authentication methods, comma-separated, of signature, api_key, "
              "mtls [default: signature,api_key, plus mtls with --client-ca]. The admin token "
              "always works.")
@click.option("--max-clock-skew", default=60, show_default=True, type=click.IntRange(1, 3600),
              help="Seconds a signature's 'created' may differ from the server clock.")
@click.option("--replay-cache-size", default=DEFAULT_NONCE_CACHE_SIZE, show_default=True,
              type=click.IntRange(1000, 100_000_000),
              help="Entries in each replay cache (signature nonces, DPoP proofs), about 110 "
              "bytes each; one principal may hold a quarter of it.")
@click.option("--rate-limit", default=1000.0, show_default=True, type=click.FloatRange(0),
              help="Requests per second per principal (token bucket; 0 = no limit; the admin "
              "principal is exempt).")
@click.option("--rate-burst", default=2000, show_default=True, type=click.IntRange(1),
              help="Burst size of the per-principal rate limit.")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Serve HTTPS with this PEM certificate (chain).")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The PEM private key of --tls-cert.")
@click.option("--client-ca", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Verify client certificates against these CA certificates (enables mTLS "
              "authentication).")
@click.option("--issuer", default=None, metavar="URI", help="The grant tokens' iss (and the "
              "audience the server accepts) [default: urn:keygrants:<id> made once per store].")
@click.option("--grant-default-ttl", default="5m", show_default=True, metavar="DURATION",
              help="TTL of a grant created without one.")
@click.option("--grant-max-ttl", default="1d", show_default=True, metavar="DURATION",
              help="Longest grant lifetime (policy may allow less); also how long a rotated "
              "issuer key stays published.")
@click.option("--grant-leeway", default="30s", show_default=True, metavar="DURATION",
              help="Clock leeway for a grant token's nbf/exp.")
@click.option("--jwks-max-age", default="5m", show_default=True, metavar="DURATION",
              help="JWKS refresh hint (Cache-Control), and the wait between publishing a new "
              "issuer key and signing with it.")
@click.option("--issuer-rotation-period", default="30d", show_default=True, metavar="DURATION",
              help="Scheduled issuer key rotation.")
@click.option("--break-glass-ttl", default="15m", show_default=True, metavar="DURATION",
              help="Longest lifetime of an approved break-glass grant, from its approval.")
@click.option("--max-delegation-depth", default=3, show_default=True, type=click.IntRange(1, 10),
              help="How deep sub-grants may nest.")
@click.option("--bus", default=None, metavar="URL", help="Push revocations to verifiers on a "
              "message bus: nats://host:port, redis://host:port[/db] (see docs/bus.md).")
@click.option("--bus-heartbeat", default=1.0, show_default=True, type=click.FloatRange(0.05, 60),
              help="Seconds between revocation heartbeats on the bus.")
@click.option("--public-url", default=None, metavar="URL", envvar="KEYGRANTS_PUBLIC_URL",
              help="http(s)://host[:port] clients address the server by (behind a proxy): "
              "signatures and DPoP proofs are checked against it instead of the request's "
              "scheme and Host.")
@click.option("--max-connections", default=1024, show_default=True,
              type=click.IntRange(1, 1_000_000),
              help="Open connections (and requests in progress) served at once; beyond, 503.")
@click.option("--require-dpop-nonce", is_flag=True, help="DPoP proofs must carry a server nonce "
              "(RFC 9449 section 8).")
def server(listen: str, data_dir: str, seal: str | None, store: str | None, max_plaintext: int,
           scheduler_interval: float, reset_admin_token: bool, access_log: bool,
           audit_sinks: tuple[str, ...], node_id: str | None, auth_methods: str | None,
           max_clock_skew: int, replay_cache_size: int, rate_limit: float, rate_burst: int,
           tls_cert: str | None, tls_key: str | None, client_ca: str | None, issuer: str | None,
           grant_default_ttl: str, grant_max_ttl: str, grant_leeway: str, jwks_max_age: str,
           issuer_rotation_period: str, break_glass_ttl: str, max_delegation_depth: int,
           bus: str | None, bus_heartbeat: float, public_url: str | None,
           max_connections: int, require_dpop_nonce: bool) -> None:
    """Run the keygrants server (SQLite in the data directory by default)."""
    import logging

    from keygrants.auth.authenticator import AuthSettings
    from keygrants.grant_service import GrantSettings
    from keygrants.server import ServerConfig, parse_listen, serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        parse_listen(listen)
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if client_ca is not None and tls_cert is None:
            raise ValueError("--client-ca needs --tls-cert and --tls-key")
        if auth_methods is None:
            methods = {"signature", "api_key"} | ({"mtls"} if client_ca else set())
        else:
            methods = {m.strip() for m in auth_methods.split(",") if m.strip()}
        if "mtls" in methods and client_ca is None:
            raise ValueError("--auth mtls needs --client-ca")
        if public_url is not None:
            from keygrants.api.app import parse_public_url

            try:
                parse_public_url(public_url)
            except ValueError as exc:
                raise ValueError(f"--public-url: {exc}") from None
        auth = AuthSettings(methods=frozenset(methods | {"admin_token"}), max_skew=max_clock_skew,
                            nonce_cache_size=replay_cache_size)
        if issuer is not None and not (0 < len(issuer) <= 256 and issuer.isprintable()
                                       and " " not in issuer):
            raise ValueError("--issuer must be 1-256 printable characters without spaces")
        grant_settings = GrantSettings(
            issuer=issuer, default_ttl=_duration(grant_default_ttl, "--grant-default-ttl"),
            max_ttl=_duration(grant_max_ttl, "--grant-max-ttl"),
            leeway=_duration(grant_leeway, "--grant-leeway", allow_zero=True),
            jwks_max_age=_duration(jwks_max_age, "--jwks-max-age"),
            issuer_rotation_period=_duration(issuer_rotation_period, "--issuer-rotation-period"),
            break_glass_ttl=_duration(break_glass_ttl, "--break-glass-ttl"),
            max_depth=max_delegation_depth, require_dpop_nonce=require_dpop_nonce,
            dpop_replay_cache_size=replay_cache_size)
        config = ServerConfig(data_dir=Path(data_dir), listen=listen, seal=seal, store=store,
                              max_plaintext=max_plaintext, scheduler_interval=scheduler_interval,
                              reset_admin_token=reset_admin_token, access_log=access_log,
                              audit_sinks=list(audit_sinks), auth=auth, rate_limit=rate_limit,
                              rate_burst=rate_burst,
                              tls_cert=Path(tls_cert) if tls_cert else None,
                              tls_key=Path(tls_key) if tls_key else None,
                              client_ca=Path(client_ca) if client_ca else None,
                              grants=grant_settings, bus=bus, bus_heartbeat=bus_heartbeat,
                              public_url=public_url, max_connections=max_connections)
        if node_id:
            config.node_id = node_id
        serve(config)
    except KeygrantsError as exc:
        fail(False, exc)
    except OSError as exc:
        click.echo(f"Error: cannot listen on {listen}: {exc.strerror or exc}", err=True)
        sys.exit(1)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


# -- keys ---------------------------------------------------------------------------------------

@main.group()
def key() -> None:
    """Create and manage keys."""


def _show_key(info: m.KeyInfo) -> None:
    from rich.table import Table

    table = Table(show_header=False, box=None)
    rows: list[tuple[str, str]] = [
        ("id", info.id), ("name", info.name), ("spec", info.spec), ("purpose", info.purpose),
        ("state", info.state), ("latest version", str(info.latest_version)),
        ("min decryption version", str(info.min_decryption_version)),
        ("derivable", "yes" if info.derivable else "no"),
        ("rotation period",
         format_duration(info.rotation_period) if info.rotation_period else "off"),
        ("next rotation", info.next_rotation_at.isoformat() if info.next_rotation_at else "-"),
        ("deletion date", info.deletion_date.isoformat() if info.deletion_date else "-"),
        ("aliases", ", ".join(info.aliases) or "-"),
        ("tags", ", ".join(info.tags) or "-"),
        ("description", info.description or "-"),
        ("created", info.created_at.isoformat()), ("updated", info.updated_at.isoformat()),
    ]
    for k, v in rows:
        table.add_row(k, v)
    print_table(table)


@key.command("create")
@click.argument("name")
@click.option("--spec", default="aes-256-gcm", show_default=True,
              type=click.Choice(["aes-256-gcm", "chacha20-poly1305", "hmac-sha256", "ed25519",
                                 "ecdsa-p256", "rsa-pss-3072"]), help="Key type.")
@click.option("--rotation-period", default=None, type=ROTATION_PERIOD,
              help="Rotate on schedule, e.g. 30d, 12h (60 s to 10 years).")
@click.option("--description", default="", help="Free text.")
@click.option("--derivable", is_flag=True, help="Allow HKDF derivation (symmetric keys only).")
@click.option("--tag", "tags", multiple=True, help="A tag that policies can match (repeatable).")
@common
def key_create(state: State, name: str, spec: str, rotation_period: int | None,
               description: str, derivable: bool, tags: tuple[str, ...]) -> None:
    """Create a key NAME."""
    with state.client() as c:
        info = c.create_key(name, spec=spec, description=description,
                            rotation_period=rotation_period or None,
                            derivable=derivable, tags=tags)
    emit(state, info, lambda: _show_key(info))


@key.command("list")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 1000))
@click.option("--after", default=None, help="Continue after this key name.")
@common
def key_list(state: State, limit: int, after: str | None) -> None:
    """List keys."""
    with state.client() as c:
        page = c.list_keys(limit=limit, after=after)

    def text() -> None:
        from rich.table import Table

        table = Table("name", "id", "spec", "state", "version", "rotation")
        for k in page.keys:
            table.add_row(k.name, k.id, k.spec, k.state, str(k.latest_version),
                          format_duration(k.rotation_period) if k.rotation_period else "off")
        print_table(table)
        if page.next:
            click.echo(f"more: --after {page.next}")

    emit(state, page, text)


@key.command("show")
@click.argument("key_ref", metavar="KEY")
@common
def key_show(state: State, key_ref: str) -> None:
    """Show a key's metadata."""
    with state.client() as c:
        info = c.describe_key(key_ref)
    emit(state, info, lambda: _show_key(info))


@key.command("update")
@click.argument("key_ref", metavar="KEY")
@click.option("--description", default=None)
@click.option("--rotation-period", default=None, type=ROTATION_PERIOD,
              help="e.g. 30d (60 s to 10 years), or 'off'.")
@click.option("--min-decryption-version", default=None, type=click.IntRange(1))
@click.option("--tag", "tags", multiple=True, help="Replace the tags with these (repeatable).")
@click.option("--clear-tags", is_flag=True, help="Remove every tag.")
@common
def key_update(state: State, key_ref: str, description: str | None,
               rotation_period: int | None, min_decryption_version: int | None,
               tags: tuple[str, ...], clear_tags: bool) -> None:
    """Change a key's description, rotation period, minimum decryption version or tags."""
    new_tags = tags_update(tags, clear_tags)
    with state.client() as c:
        info = c.update_key(key_ref, description=description,
                            rotation_period=rotation_period,
                            min_decryption_version=min_decryption_version, tags=new_tags)
    emit(state, info, lambda: _show_key(info))


def _key_action(name: str, doc: str, call: Callable[[Client, str], m.KeyInfo],
                message: Callable[[m.KeyInfo], str]) -> None:
    @key.command(name, help=doc)
    @click.argument("key_ref", metavar="KEY")
    @common
    def command(state: State, key_ref: str) -> None:
        with state.client() as c:
            info = call(c, key_ref)
        emit(state, info, message(info))


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
def key_schedule_deletion(state: State, key_ref: str, days: int) -> None:
    """Schedule a key's destruction (it is unusable at once; cancel restores it)."""
    with state.client() as c:
        info = c.schedule_key_deletion(key_ref, days=days)
    assert info.deletion_date is not None
    emit(state, info, f"{info.name}: pending deletion, destroyed after "
                       f"{info.deletion_date.isoformat()}")


@key.command("alias")
@click.argument("alias")
@click.argument("key_ref", metavar="KEY")
@common
def key_alias(state: State, alias: str, key_ref: str) -> None:
    """Create ALIAS for KEY."""
    with state.client() as c:
        info = c.create_alias(alias, key_ref)
    emit(state, info, f"{info.alias} -> {info.key_id}")


@key.command("unalias")
@click.argument("alias")
@common
def key_unalias(state: State, alias: str) -> None:
    """Delete an alias (the key is untouched)."""
    with state.client() as c:
        c.delete_alias(alias)
    emit(state, {"deleted": alias}, f"deleted alias {alias}")


@key.command("aliases")
@click.option("--key", "key_ref", default=None, help="Only this key's aliases.")
@common
def key_aliases(state: State, key_ref: str | None) -> None:
    """List aliases."""
    with state.client() as c:
        aliases = c.list_aliases(key_ref)
    emit(state, aliases, "\n".join(f"{a.alias} -> {a.key_id}" for a in aliases))


# -- cryptographic operations -------------------------------------------------------------------

@main.command()
@key_option
@context_option
@in_option
@common
@grant_options
def encrypt(state: State, key: str, context: tuple[str, ...], in_file: str | None) -> None:
    """Encrypt stdin (or --in FILE); print base64 ciphertext."""
    data = read_input(in_file)
    with state.client() as c:
        result = c.encrypt(key, data, context=parse_context(context))
    emit(state, result, b64(result.ciphertext))


@main.command()
@context_option
@in_option
@common
@grant_options
def decrypt(state: State, context: tuple[str, ...], in_file: str | None) -> None:
    """Decrypt base64 ciphertext from stdin (or --in FILE); write the plaintext bytes."""
    ciphertext = unb64(read_input(in_file), "ciphertext")
    with state.client() as c:
        result = c.decrypt(ciphertext, context=parse_context(context))
    if state.as_json:
        emit(state, result, "")
    else:
        out = sys.stdout.buffer
        out.write(result.plaintext)
        out.flush()


@main.command("re-encrypt")
@context_option
@click.option("--to-key", default=None, help="Destination key [default: the same key, latest "
              "version].")
@click.option("--to-context", multiple=True, metavar="KEY=VALUE",
              help="Destination context [default: the source context].")
@in_option
@common
@grant_options
def re_encrypt(state: State, context: tuple[str, ...], to_key: str | None,
               to_context: tuple[str, ...], in_file: str | None) -> None:
    """Re-encrypt base64 ciphertext from stdin without revealing the plaintext."""
    ciphertext = unb64(read_input(in_file), "ciphertext")
    with state.client() as c:
        result = c.re_encrypt(ciphertext, context=parse_context(context), destination_key=to_key,
                              destination_context=parse_context(to_context) if to_context else None)
    emit(state, result, b64(result.ciphertext))


@main.command("data-key")
@key_option
@click.option("--bytes", "size", default=32, show_default=True, type=click.Choice(["16", "32", "64"]))
@context_option
@click.option("--no-plaintext", is_flag=True, help="Return only the encrypted data key.")
@common
@grant_options
def data_key(state: State, key: str, size: str, context: tuple[str, ...],
             no_plaintext: bool) -> None:
    """Generate a data key; print 'plaintext <b64>' and 'ciphertext <b64>'."""
    with state.client() as c:
        result = c.generate_data_key(key, size=int(size), context=parse_context(context),
                                     include_plaintext=not no_plaintext)
    lines = ([] if result.plaintext is None else [f"plaintext {b64(result.plaintext)}"])
    lines.append(f"ciphertext {b64(result.ciphertext)}")
    emit(state, result, "\n".join(lines))


@main.command()
@key_option
@click.option("--digest", is_flag=True, help="Input is a 32-byte SHA-256 digest, not a message.")
@in_option
@common
@grant_options
def sign(state: State, key: str, digest: bool, in_file: str | None) -> None:
    """Sign stdin (or --in FILE); print the base64 signature."""
    data = read_input(in_file)
    with state.client() as c:
        result = c.sign(key, data, message_type="digest" if digest else "raw")
    emit(state, result, b64(result.signature))


def _verdict(state: State, result: m.VerifyResult) -> None:
    emit(state, result, "valid" if result.valid else "invalid")
    if not result.valid:
        sys.exit(1)


@main.command()
@key_option
@click.option("--signature", "-s", required=True, help="Base64 signature.")
@click.option("--digest", is_flag=True, help="Input is a 32-byte SHA-256 digest.")
@click.option("--key-version", default=None, type=click.IntRange(1),
              help="Version that signed [default: try every live version].")
@in_option
@common
@grant_options
def verify(state: State, key: str, signature: str, digest: bool, key_version: int | None,
           in_file: str | None) -> None:
    """Verify a signature over stdin (or --in FILE); exit 1 if invalid."""
    data = read_input(in_file)
    sig = unb64(signature, "signature")
    with state.client() as c:
        result = c.verify(key, data, sig, message_type="digest" if digest else "raw",
                          key_version=key_version)
    _verdict(state, result)


@main.command()
@key_option
@in_option
@common
@grant_options
def mac(state: State, key: str, in_file: str | None) -> None:
    """HMAC-SHA256 of stdin (or --in FILE); print the base64 tag."""
    data = read_input(in_file)
    with state.client() as c:
        result = c.mac(key, data)
    emit(state, result, b64(result.mac))


@main.command("verify-mac")
@key_option
@click.option("--mac", "tag", required=True, help="Base64 tag.")
@click.option("--key-version", default=None, type=click.IntRange(1))
@in_option
@common
@grant_options
def verify_mac(state: State, key: str, tag: str, key_version: int | None,
               in_file: str | None) -> None:
    """Verify an HMAC tag over stdin (or --in FILE); exit 1 if invalid."""
    data = read_input(in_file)
    with state.client() as c:
        result = c.verify_mac(key, data, unb64(tag, "mac"), key_version=key_version)
    _verdict(state, result)


@main.command()
@key_option
@context_option
@click.option("--length", default=32, show_default=True, type=click.IntRange(1, 1024))
@click.option("--salt", default=None, help="Base64 salt.")
@click.option("--key-version", default=None, type=click.IntRange(1))
@common
@grant_options
def derive(state: State, key: str, context: tuple[str, ...], length: int, salt: str | None,
           key_version: int | None) -> None:
    """Derive bytes with HKDF-SHA256 from a derivable key; print base64."""
    with state.client() as c:
        result = c.derive(key, parse_context(context) or {}, length=length,
                          salt=None if salt is None else unb64(salt, "salt"),
                          key_version=key_version)
    emit(state, result, b64(result.derived))


@main.command()
@click.option("--bytes", "n", default=32, show_default=True, type=click.IntRange(1, 1024))
@click.option("--hex", "as_hex", is_flag=True, help="Print hex instead of base64.")
@common
def random(state: State, n: int, as_hex: bool) -> None:
    """Random bytes from the server's CSPRNG."""
    with state.client() as c:
        result = c.random(n)
    emit(state, result, result.random.hex() if as_hex else b64(result.random))


@main.command("public-key")
@key_option
@click.option("--version", "key_version", default=None, type=click.IntRange(1))
@click.option("--format", "fmt", default="pem", show_default=True, type=click.Choice(["pem", "jwk"]))
@common
@grant_options
def public_key(state: State, key: str, key_version: int | None, fmt: str) -> None:
    """Print a signing key's public key (PEM or JWK)."""
    with state.client() as c:
        result = c.get_public_key(key, version=key_version)
    text = (result.pem.rstrip("\n") if fmt == "pem"
            else msgspec.json.encode(result.jwk).decode())
    emit(state, result, text)


# -- command groups defined in their own modules ----------------------------------------------
# Each module defines one click group or command and is registered here with one line.
from keygrants.cli.audit import audit  # noqa: E402
from keygrants.cli.principal import policy, principal, whoami  # noqa: E402

main.add_command(audit)
main.add_command(principal)
main.add_command(policy)
main.add_command(whoami)
from keygrants.cli.operator import operator  # noqa: E402

main.add_command(operator)
from keygrants.cli.grant import grant, issuer, revocations  # noqa: E402

main.add_command(grant)
main.add_command(issuer)
main.add_command(revocations)
from keygrants.cli.seal import register as _register_seal  # noqa: E402

_register_seal(main)  # seal, unseal, seal-keygen
