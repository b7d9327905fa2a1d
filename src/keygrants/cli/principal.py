"""``keygrants principal …``, ``keygrants policy …`` and ``keygrants whoami``."""

from __future__ import annotations

import os
import sys
from datetime import datetime
from pathlib import Path

import click

from keygrants import models as m
from keygrants._files import write_private_file
from keygrants.cli._common import (
    EXPIRES_IN,
    LONG_TIMEOUT,
    State,
    common,
    emit,
    parse_context,
    print_table,
    read_file,
    read_input,
    tags_update,
)
from keygrants.errors import InvalidRequest, ServerUnreachable

__all__ = ["policy", "principal", "whoami"]


def _ts(value: object) -> str:
    return "-" if value is None else value.isoformat()  # type: ignore[attr-defined]


def _show_principal(p: m.PrincipalInfo) -> None:
    from rich.table import Table

    table = Table(show_header=False, box=None)
    for k, v in (("id", p.id), ("display name", p.display_name or "-"),
                 ("tags", ", ".join(p.tags) or "-"), ("enabled", "yes" if p.enabled else "no"),
                 ("built-in", "yes" if p.builtin else "no"), ("created", _ts(p.created_at)),
                 ("last seen", _ts(p.last_seen_at))):
        table.add_row(k, v)
    print_table(table)
    if p.credentials is not None:
        _show_credentials(p.credentials)


def _show_credentials(creds: list[m.CredentialInfo]) -> None:
    from rich.table import Table

    table = Table("id", "kind", "state", "label", "expires", "last used")
    for c in creds:
        table.add_row(c.id, c.kind + (f" ({c.algorithm})" if c.algorithm else "")
                      + (f" {c.match}" if c.match else ""), c.state, c.label or "-",
                      _ts(c.expires_at), _ts(c.last_used_at))
    print_table(table)



_MAX_CERT_FILE = 1024 * 1024  # a PEM certificate (chain) is far smaller


def _check_writable(out: str) -> None:
    """Refuse an --out path whose directory is missing or not writable, before anything is
    made that cannot be made again."""
    directory = Path(out).parent
    if not directory.is_dir():
        raise InvalidRequest(f"cannot write {out}: no directory {directory}")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise InvalidRequest(f"cannot write {out}: the directory {directory} is not writable")


@click.command()
@common
def whoami(state: State) -> None:
    """Show who the configured credentials authenticate as."""
    with state.client() as c:
        me = c.whoami()
    emit(state, me, f"{me.principal} (credential {me.credential}, via {me.auth_method})")


@click.group()
def principal() -> None:
    """Manage principals (services and people) and their credentials."""


@principal.command("create")
@click.argument("name")
@click.option("--display-name", default="", help="A human-readable name.")
@click.option("--tag", "tags", multiple=True, help="A tag that policies can match (repeatable).")
@common
def principal_create(state: State, name: str, display_name: str, tags: tuple[str, ...]) -> None:
    """Create principal NAME (no credentials yet; see add-key, keygen, api-key, add-cert)."""
    with state.client() as c:
        p = c.create_principal(name, display_name=display_name, tags=tags)
    emit(state, p, f"Created principal {p.id}")


@principal.command("list")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 1000))
@click.option("--after", default=None, help="Continue after this principal id.")
@common
def principal_list(state: State, limit: int, after: str | None) -> None:
    """List principals."""
    with state.client() as c:
        page = c.list_principals(limit=limit, after=after)

    def show() -> None:
        from rich.table import Table

        table = Table("id", "display name", "tags", "enabled", "last seen")
        for p in page.principals:
            table.add_row(p.id, p.display_name or "-", ", ".join(p.tags) or "-",
                          "yes" if p.enabled else "no", _ts(p.last_seen_at))
        print_table(table)
        if page.next:
            click.echo(f"more: --after {page.next}")
    emit(state, page, show)


@principal.command("show")
@click.argument("name")
@common
def principal_show(state: State, name: str) -> None:
    """Show a principal and its credentials."""
    with state.client() as c:
        p = c.describe_principal(name)
    emit(state, p, lambda: _show_principal(p))


@principal.command("update")
@click.argument("name")
@click.option("--display-name", default=None)
@click.option("--tag", "tags", multiple=True, help="Replace the tags with these (repeatable).")
@click.option("--clear-tags", is_flag=True, help="Remove every tag.")
@common
def principal_update(state: State, name: str, display_name: str | None, tags: tuple[str, ...],
                     clear_tags: bool) -> None:
    """Change a principal's display name or tags."""
    new_tags = tags_update(tags, clear_tags)
    with state.client() as c:
        p = c.update_principal(name, display_name=display_name, tags=new_tags)
    emit(state, p, lambda: _show_principal(p))


@principal.command("disable")
@click.argument("name")
@common
def principal_disable(state: State, name: str) -> None:
    """Refuse every credential of NAME from the next request on."""
    with state.client() as c:
        p = c.disable_principal(name)
    emit(state, p, f"Disabled principal {p.id}")


@principal.command("enable")
@click.argument("name")
@common
def principal_enable(state: State, name: str) -> None:
    """Accept NAME's credentials again."""
    with state.client() as c:
        p = c.enable_principal(name)
    emit(state, p, f"Enabled principal {p.id}")


@principal.command("delete")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@common
def principal_delete(state: State, name: str, yes: bool) -> None:
    """Delete NAME and all its credentials."""
    if not yes and not state.as_json:
        click.confirm(f"Delete principal {name} and all its credentials?", abort=True)
    with state.client(timeout=LONG_TIMEOUT) as c:  # its grants are revoked first
        c.delete_principal(name)
    emit(state, {"deleted": name}, f"Deleted principal {name}")


@principal.command("add-key")
@click.argument("name")
@click.option("--public-key", "public_key_file", required=True,
              type=click.Path(dir_okay=False, allow_dash=True),
              help="PEM public key or JWK (JSON) file, '-' for stdin.")
@click.option("--label", default="")
@click.option("--expires-in", default=None, type=EXPIRES_IN, help="e.g. 90d, 12h.")
@common
def principal_add_key(state: State, name: str, public_key_file: str, label: str,
                      expires_in: int | None) -> None:
    """Register a public key (Ed25519 or ECDSA P-256) for NAME's signed requests."""
    text = read_input(public_key_file).decode("utf-8", "replace")
    with state.client() as c:
        cred = c.add_public_key(name, text, label=label,
                                expires_in=expires_in or None)
    emit(state, cred, f"Registered key {cred.id} (keyid {cred.keyid})")


@principal.command("keygen")
@click.argument("name")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False),
              help="Where to write the private key (PEM, mode 0600).")
@click.option("--algorithm", type=click.Choice(["ed25519", "ecdsa-p256-sha256"]),
              default="ed25519", show_default=True)
@click.option("--label", default="")
@click.option("--expires-in", default=None, type=EXPIRES_IN)
@click.option("--force", is_flag=True, help="Overwrite an existing --out file.")
@common
def principal_keygen(state: State, name: str, out: str, algorithm: str, label: str,
                     expires_in: int | None, force: bool) -> None:
    """Create a key pair locally, write the private key to --out (0600) and register the
    public half for NAME. Then `KEYGRANTS_PRINCIPAL=NAME KEYGRANTS_KEY_FILE=FILE keygrants …`
    signs every request as NAME."""
    from keygrants.crypto.signing import SigningKey

    path = Path(out)
    if path.exists() and not force:
        raise InvalidRequest(f"{out} exists; pass --force to overwrite it")
    staged = path.with_name(path.name + ".new")
    if staged.exists():  # kept by an earlier keygen whose registration may have happened
        raise InvalidRequest(f"{staged} exists: a key kept by an earlier keygen; check "
                             f"`keygrants principal credentials {name} --json` for its keyid, then "
                             f"move it to {out} or delete it")
    key = SigningKey.generate(algorithm)  # type: ignore[arg-type]
    try:  # durable before the public half is registered
        write_private_file(staged, key.private_pem())
    except OSError as exc:
        raise InvalidRequest(f"cannot write {out}: {exc.strerror or exc}") from None
    try:
        with state.client() as c:
            cred = c.add_public_key(name, key.public_key().public_pem(), label=label,
                                    expires_in=expires_in or None)
    except ServerUnreachable as exc:
        if not _outcome_unknown(exc):
            staged.unlink(missing_ok=True)  # nothing was sent
            raise
        # The server may have registered the public half: deleting the private one would
        # leave a registered key nobody holds, so it stays where it was staged.
        from keygrants.auth.credentials import jwk_thumbprint

        keyid = f"{name}/{jwk_thumbprint(key.public_key().jwk())}"
        exc.message += (f". The private key is kept in {staged}: if `keygrants principal "
                        f"credentials {name} --json` lists keyid {keyid}, move it to {out}; "
                        "otherwise delete it")
        raise
    except BaseException:
        staged.unlink(missing_ok=True)  # nothing half-made; an existing --out file is untouched
        raise
    try:
        os.replace(staged, path)
    except OSError as exc:
        raise InvalidRequest(f"registered key {cred.id}, but cannot move {staged} to {out}: "
                             f"{exc.strerror or exc}") from None
    emit(state, cred, f"Wrote {out} (mode 0600) and registered key {cred.id}\n"
                      f"Use: KEYGRANTS_PRINCIPAL={name} KEYGRANTS_KEY_FILE={out} keygrants …")


def _outcome_unknown(exc: ServerUnreachable) -> bool:
    """Whether the request may have reached the server: ``no_response``, or (from an SDK
    without it) any transport failure other than a connection never made."""
    if exc.code == "no_response":
        return True
    import httpx

    cause = exc.__cause__
    return isinstance(cause, httpx.TransportError) and not isinstance(
        cause, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout))


@principal.command("api-key")
@click.argument("name")
@click.option("--label", default="")
@click.option("--expires-in", default=None, type=EXPIRES_IN)
@common
def principal_api_key(state: State, name: str, label: str, expires_in: int | None) -> None:
    """Issue an API key for NAME. It is printed once; store it like a password."""
    with state.client() as c:
        created = c.create_api_key(name, label=label,
                                   expires_in=expires_in or None)
    if not state.as_json:
        click.echo(f"API key {created.credential.id} (shown once):", err=True)
    emit(state, created, created.api_key)


@principal.command("shared-secret")
@click.argument("name")
@click.option("--out", "out", type=click.Path(dir_okay=False), default=None,
              help="Write the secret to this file (mode 0600) instead of printing it.")
@click.option("--label", default="")
@click.option("--expires-in", default=None, type=EXPIRES_IN)
@click.option("--force", is_flag=True, help="Overwrite an existing --out file.")
@common
def principal_shared_secret(state: State, name: str, out: str | None, label: str,
                            expires_in: int | None, force: bool) -> None:
    """Issue a shared secret for hmac-sha256 request signatures (shown once). With --out,
    `KEYGRANTS_PRINCIPAL=NAME KEYGRANTS_KEY_FILE=FILE keygrants …` signs with it."""
    if out is not None:
        if Path(out).exists() and not force:
            raise InvalidRequest(f"{out} exists; pass --force to overwrite it")
        _check_writable(out)  # before the secret exists: it is shown once
    with state.client() as c:
        created = c.create_shared_secret(name, label=label,
                                         expires_in=expires_in or None)
    if out is not None:
        try:
            write_private_file(Path(out), (created.shared_secret + "\n").encode())
        except OSError as exc:
            raise InvalidRequest(
                f"cannot write {out}: {exc.strerror or exc}; the secret {created.credential.id} "
                f"is lost: revoke it with keygrants principal revoke {name} "
                f"{created.credential.id}") from None
        emit(state, created.credential, f"Wrote {out} (mode 0600): keyid {created.credential.keyid}")
        return
    if not state.as_json:
        click.echo(f"Shared secret {created.credential.id}, keyid {created.credential.keyid} "
                   "(shown once):", err=True)
    emit(state, created, created.shared_secret)


@principal.command("add-cert")
@click.argument("name")
@click.option("--cert", "cert_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A PEM client certificate: match its SHA-256 fingerprint.")
@click.option("--match", default=None, help="sha256:<hex>, subject:<RFC 4514 name>, "
              "san-dns:<name>, san-uri:<uri> or san-email:<address>.")
@click.option("--label", default="")
@click.option("--expires-in", default=None, type=EXPIRES_IN)
@common
def principal_add_cert(state: State, name: str, cert_file: str | None, match: str | None,
                       label: str, expires_in: int | None) -> None:
    """Map mTLS client certificates to NAME (by fingerprint or subject/SAN rule)."""
    certificate = None
    if cert_file:
        certificate = read_file(cert_file, _MAX_CERT_FILE).decode("utf-8", "replace")
    with state.client() as c:
        cred = c.add_certificate(name, match=match, certificate=certificate, label=label,
                                 expires_in=expires_in or None)
    emit(state, cred, f"Added certificate match {cred.match} ({cred.id})")


@principal.command("credentials")
@click.argument("name")
@common
def principal_credentials(state: State, name: str) -> None:
    """List NAME's credentials."""
    with state.client() as c:
        creds = c.list_credentials(name)
    emit(state, creds, lambda: _show_credentials(creds))


@principal.command("revoke")
@click.argument("name")
@click.argument("credential")
@common
def principal_revoke(state: State, name: str, credential: str) -> None:
    """Revoke one of NAME's credentials (refused from the next request on)."""
    with state.client() as c:
        cred = c.revoke_credential(name, credential)
    emit(state, cred, f"Revoked {cred.id}")


# -- policies ---------------------------------------------------------------------------------

@click.group()
def policy() -> None:
    """Manage Cedar policies (deny by default; see docs/policy.md)."""


@policy.command("set")
@click.argument("name")
@click.option("--file", "policy_file", type=click.Path(dir_okay=False, allow_dash=True),
              default=None, help="Read the policy from FILE ('-' for stdin).")
@click.option("--text", default=None, help="The policy text itself.")
@click.option("--description", default="")
@common
def policy_set(state: State, name: str, policy_file: str | None, text: str | None,
               description: str) -> None:
    """Create or replace policy NAME (validated; on error the old one stays)."""
    if (policy_file is None) == (text is None):
        raise InvalidRequest("give --file or --text")
    body = text if text is not None else read_input(policy_file).decode("utf-8")
    with state.client() as c:
        info = c.put_policy(name, body, description=description)
    emit(state, info, f"Policy {info.name} saved ({info.statements} statement(s))")


@policy.command("get")
@click.argument("name")
@common
def policy_get(state: State, name: str) -> None:
    """Print policy NAME."""
    with state.client() as c:
        info = c.get_policy(name)
    emit(state, info, info.text.rstrip("\n"))


@policy.command("list")
@common
def policy_list(state: State) -> None:
    """List policies."""
    with state.client() as c:
        items = c.list_policies()

    def show() -> None:
        from rich.table import Table

        table = Table("name", "statements", "updated", "description")
        for p in items:
            table.add_row(p.name, str(p.statements), _ts(p.updated_at), p.description or "-")
        print_table(table)
    emit(state, items, show)


@policy.command("delete")
@click.argument("name")
@common
def policy_delete(state: State, name: str) -> None:
    """Delete policy NAME."""
    with state.client() as c:
        c.delete_policy(name)
    emit(state, {"deleted": name}, f"Deleted policy {name}")


def _policy_time(text: str | None) -> int | None:
    """``--at``: Unix seconds, or an RFC 3339 time with its offset (``Z`` for UTC)."""
    if text is None:
        return None
    if text.isdigit():
        return int(text)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter("expected RFC 3339 (2026-12-07T10:00:00Z) or Unix seconds",
                                 param_hint="--at") from None
    if when.tzinfo is None:
        raise click.BadParameter("give the time's offset (Z for UTC)", param_hint="--at")
    return int(when.timestamp())


@policy.command("test")
@click.option("--principal", "-p", "who", required=True)
@click.option("--action", "-a", required=True, help="e.g. decrypt, create_grant, list_keys.")
@click.option("--key", "-k", default=None, help="Key id, name or alias (key actions).")
@click.option("--target", "-t", default=None, metavar="PRINCIPAL",
              help="The principal acted on (principal actions, e.g. manage_credentials).")
@click.option("--context", "-c", "context", multiple=True, metavar="KEY=VALUE")
@click.option("--source", type=click.Choice(["signature", "api_key", "mtls", "admin_token"]),
              default="signature", show_default=True)
@click.option("--at", "at", default=None, metavar="TIME",
              help="Decide as at this time: RFC 3339 (2026-12-07T10:00:00Z) or Unix seconds. "
                   "Default: now.")
@click.option("--grant-ttl", type=int, default=None, help="create_grant: TTL in seconds (300).")
@click.option("--grant-uses", type=int, default=None, help="create_grant: max uses (0 = unlimited).")
@click.option("--grant-pop", is_flag=True, help="create_grant: proof-of-possession bound.")
@click.option("--grant-ops", default=None, metavar="OPS",
              help="create_grant: the grant's operations, comma-separated.")
@click.option("--grant-audience", "grant_audiences", multiple=True, metavar="AUD",
              help="create_grant: an audience of the grant (repeatable; none = the KMS).")
@click.option("--grant-grantee", default=None, metavar="PRINCIPAL",
              help="create_grant: the grantee.")
@common
def policy_test(state: State, who: str, action: str, key: str | None, target: str | None,
                context: tuple[str, ...], source: str, at: str | None, grant_ttl: int | None,
                grant_uses: int | None, grant_pop: bool, grant_ops: str | None,
                grant_audiences: tuple[str, ...], grant_grantee: str | None) -> None:
    """Would principal P be allowed action A on key K (or on principal T) with context C, now
    or at TIME? Explains which statement decided. Exit status 0 when allowed, 3 when denied.

    For create_grant, the --grant-* options describe the grant being created; any of them
    makes the test carry one (without, a policy that reads context.grant does not permit)."""
    grant = None
    if (grant_ttl is not None or grant_uses is not None or grant_pop or grant_ops is not None
            or grant_audiences or grant_grantee is not None):
        ops = [o.strip() for o in grant_ops.split(",") if o.strip()] if grant_ops else []
        grant = m.GrantFactsRequest(
            ttl=300 if grant_ttl is None else grant_ttl,
            uses=0 if grant_uses is None else grant_uses, pop=grant_pop, operations=ops,
            audiences=list(grant_audiences), grantee=grant_grantee or "")
    with state.client() as c:
        result = c.test_policy(who, action, key=key, context=parse_context(context),
                               source=source, grant=grant, target=target,
                               time=_policy_time(at))
    emit(state, result, result.explanation)
    if not result.allowed:
        sys.exit(3)
