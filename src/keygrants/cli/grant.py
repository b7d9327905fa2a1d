"""``keygrants grant …``, ``keygrants issuer …`` and ``keygrants revocations``.

A grant token is a bearer secret until it expires: commands print it alone on stdout (the
human-readable table goes to stderr), so ``TOKEN=$(keygrants grant create …)`` captures just
the token, and ``-`` reads a token argument from stdin so it stays out of the process list.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Final

import click

from keygrants import models as m
from keygrants.cli._common import (
    GRANT_TTL,
    LONG_TIMEOUT,
    State,
    common,
    emit,
    parse_context,
    print_table,
    read_dpop_key,
    read_stdin_line,
)
from keygrants.errors import Forbidden, InvalidRequest
from keygrants.grants.dpop import proof_key_thumbprint
from keygrants.grants.model import GRANT_OPERATIONS

__all__ = ["grant", "issuer", "revocations"]

_STATES: Final = ("active", "pending", "exhausted", "expired", "retired", "revoked", "rejected")


def _ts(value: datetime | int | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        value = datetime.fromtimestamp(value, UTC)
    return value.isoformat()


def _operations(values: tuple[str, ...], option: str) -> list[str]:
    """``--ops decrypt,encrypt --ops sign``: comma lists, repeatable, checked here so a typo is
    named before anything is sent."""
    ops = list(dict.fromkeys(o.strip() for v in values for o in v.split(",") if o.strip()))
    if not ops:
        raise InvalidRequest(f"{option} needs at least one operation")
    unknown = [o for o in ops if o not in GRANT_OPERATIONS]
    if unknown:
        raise InvalidRequest(f"unknown operation{'s' if len(unknown) > 1 else ''} "
                             f"{', '.join(repr(o) for o in unknown)} in {option}; known: "
                             f"{', '.join(sorted(GRANT_OPERATIONS))}")
    return ops


def _pairs(values: tuple[str, ...], option: str) -> dict[str, str] | None:
    try:
        return parse_context(values)
    except InvalidRequest as exc:
        raise InvalidRequest(f"{option}: {exc.message}") from None


def _jkt(dpop_jkt: str | None, dpop_key_file: str | None) -> str | None:
    """The thumbprint to bind: given, or of the key in a file (public PEM or JWK, or the PEM
    private key; only the thumbprint leaves this process)."""
    from keygrants.auth.credentials import load_public_key

    if dpop_jkt is not None and dpop_key_file is not None:
        raise InvalidRequest("give --dpop-jkt or --dpop-key-file, not both")
    if dpop_key_file is None:
        return dpop_jkt
    try:
        with open(dpop_key_file, "rb") as f:
            text = f.read(64 * 1024).decode("utf-8", "replace")
    except OSError as exc:
        raise InvalidRequest(f"cannot read {dpop_key_file}: {exc.strerror}") from None
    if "PRIVATE KEY" in text:
        return proof_key_thumbprint(read_dpop_key(dpop_key_file))
    try:
        return proof_key_thumbprint(load_public_key(text))
    except ValueError as exc:
        raise InvalidRequest(f"{dpop_key_file}: {exc}") from None


def _token_arg(token: str) -> str:  # never named "token": that is --token, the credential
    """A token argument, or ``-``: the first line of stdin."""
    if token != "-":
        return token
    return read_stdin_line("token").strip()


def _show_grant(g: m.GrantInfo, *, err: bool = False) -> None:
    from rich.table import Table

    table = Table(show_header=False, box=None)
    uses = f"{g.uses} of {g.max_uses}" if g.max_uses is not None else f"{g.uses} (unlimited)"
    rows: list[tuple[str, str | None]] = [
        ("id", g.id), ("key", g.key_id), ("grantee", g.grantee),
        ("operations", ", ".join(g.operations)), ("state", g.state), ("uses", uses),
        ("not before", _ts(g.not_before)), ("expires", _ts(g.expires_at)),
        ("context equals", _kv(g.context_equals)), ("context subset", _kv(g.context_subset)),
        ("audiences", ", ".join(g.audiences) or None), ("dpop jkt", g.dpop_jkt),
        ("x5t#S256", g.x5t_s256), ("name", g.name), ("retiring principal", g.retiring_principal),
        ("justification", g.justification), ("issuer", g.issuer), ("created", _ts(g.created_at)),
        ("parent", f"{g.parent_id} (depth {g.depth})" if g.parent_id else None),
        ("requires approval", "yes" if g.requires_approval else None),
        ("decided", f"by {g.decided_by} at {_ts(g.decided_at)}" if g.decided_by else None),
        ("ended", f"by {g.ended_by} at {_ts(g.ended_at)}" if g.ended_by else None),
    ]
    for k, v in rows:
        if v is not None:
            table.add_row(k, v)
    print_table(table, stderr=err)


def _kv(pairs: dict[str, str] | None) -> str | None:
    return None if pairs is None else ", ".join(f"{k}={v}" for k, v in pairs.items()) or "{}"


def _emit_token(state: State, created: m.GrantCreated) -> None:
    """``--json``: ``{"grant_id", "token", "state"}``; otherwise the grant on stderr and the
    token alone on stdout (nothing there while the grant waits for approval)."""
    g = created.grant
    if state.as_json:
        emit(state, {"grant_id": g.id, "token": created.token, "state": g.state}, "")
        return
    _show_grant(g, err=True)
    if created.token is None:
        click.echo(f"Grant {g.id} waits for approval; once approved, its grantee or creator "
                   f"gets the token with: keygrants grant token {g.id}", err=True)
    else:
        click.echo(created.token)


# -- grant ---------------------------------------------------------------------------------------

@click.group()
def grant() -> None:
    """Create, inspect and end grants: scoped, short-lived rights on one key (docs/grants.md)."""


@grant.command("create")
@click.option("--key", "-k", "key", required=True, help="Key id, name or alias.")
@click.option("--grantee", required=True, help="The principal that may use the grant.")
@click.option("--ops", "ops", multiple=True, required=True, metavar="OP[,OP...]",
              help="Granted operations, comma-separated or repeated: "
              + ", ".join(sorted(GRANT_OPERATIONS)) + ".")
@click.option("--context-equals", multiple=True, metavar="KEY=VALUE",
              help="The encryption context must be exactly these pairs (repeatable).")
@click.option("--context-subset", multiple=True, metavar="KEY=VALUE",
              help="The encryption context must contain these pairs (repeatable).")
@click.option("--ttl", default=None, type=GRANT_TTL,
              help="Lifetime, e.g. 90s, 5m, 1h [default: the server's, 5m].")
@click.option("--uses", default=None, type=click.IntRange(1), help="At most N uses [default: "
              "unlimited; a sub-grant of a limited grant needs N, at most the uses it has "
              "left, which it takes from it].")
@click.option("--audience", "audiences", multiple=True, help="A token audience (repeatable) "
              "[default: this KMS].")
@click.option("--dpop-jkt", default=None, metavar="JKT", help="Bind to the DPoP key with this "
              "RFC 7638 thumbprint.")
@click.option("--dpop-key-file", default=None, type=click.Path(dir_okay=False),
              help="Bind to this DPoP key: a PEM or JWK public key, or the PEM private key "
              "(only its thumbprint is sent).")
@click.option("--x5t", "x5t_s256", default=None, metavar="S256",
              help="Bind to the client certificate with this base64url SHA-256 thumbprint.")
@click.option("--name", default=None, help="Free text.")
@click.option("--retiring-principal", default=None,
              help="A principal that may retire the grant besides the grantee.")
@click.option("--justification", default=None, help="Why (recorded; shown to approvers).")
@click.option("--parent-grant", default=None, metavar="TOKEN", envvar="KEYGRANTS_PARENT_GRANT",
              help="Delegate: create a sub-grant of this grant (it must carry create_grant); "
                   "- reads it from stdin (keeps it out of the process list).")
@click.option("--parent-dpop-key-file", default=None, type=click.Path(dir_okay=False),
              help="The PEM private key proving possession of a DPoP-bound --parent-grant.")
@common
def grant_create(state: State, key: str, grantee: str, ops: tuple[str, ...],
                 context_equals: tuple[str, ...], context_subset: tuple[str, ...],
                 ttl: int | None, uses: int | None, audiences: tuple[str, ...],
                 dpop_jkt: str | None, dpop_key_file: str | None, x5t_s256: str | None,
                 name: str | None, retiring_principal: str | None, justification: str | None,
                 parent_grant: str | None, parent_dpop_key_file: str | None) -> None:
    """Grant GRANTEE the --ops on KEY; print the grant token (pending grants have none yet)."""
    operations = _operations(ops, "--ops")
    equals = _pairs(context_equals, "--context-equals")
    subset = _pairs(context_subset, "--context-subset")
    jkt = _jkt(dpop_jkt, dpop_key_file)
    if parent_grant is not None:
        parent_grant = _token_arg(parent_grant)
    if parent_dpop_key_file is not None:
        if parent_grant is None:
            raise InvalidRequest("--parent-dpop-key-file goes with --parent-grant")
        state.dpop_key = read_dpop_key(parent_dpop_key_file)
    with state.client() as c:
        created = c.create_grant(key, grantee, operations, context_equals=equals,
                                 context_subset=subset, ttl=ttl, max_uses=uses,
                                 audiences=audiences, dpop_jkt=jkt, x5t_s256=x5t_s256, name=name,
                                 retiring_principal=retiring_principal,
                                 justification=justification, grant=parent_grant)
    _emit_token(state, created)


@grant.command("list")
@click.option("--key", "-k", "key", default=None, help="Only this key's grants (needs "
              "list_grants on it).")
@click.option("--grantee", default=None, help="Only grants to this principal.")
@click.option("--retiring-principal", default=None, help="Only grants this principal may retire.")
@click.option("--state", "grant_state", default=None, type=click.Choice(_STATES))
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 1000))
@click.option("--after", default=None, help="Continue after this grant id.")
@common
def grant_list(state: State, key: str | None, grantee: str | None,
               retiring_principal: str | None, grant_state: str | None, limit: int,
               after: str | None) -> None:
    """List grants (without --key: your own, via --grantee or --retiring-principal; the admin
    sees all)."""
    try:
        with state.client() as c:
            page = c.list_grants(key=key, grantee=grantee, retiring_principal=retiring_principal,
                                 state=grant_state, limit=limit, after=after)
    except Forbidden as exc:
        # Only the admin may list every grant: say how anyone else lists their own.
        if exc.code == Forbidden.code and not (key or grantee or retiring_principal):
            exc.message = (f"{exc.message}: to list your own grants, pass --grantee <your "
                           "principal id> (or --retiring-principal); keygrants whoami shows it")
        raise

    def show() -> None:
        from rich.table import Table

        table = Table("id", "key", "grantee", "operations", "state", "uses", "expires")
        for g in page.grants:
            table.add_row(g.id, g.key_id, g.grantee, ",".join(g.operations), g.state,
                          f"{g.uses}/{g.max_uses if g.max_uses is not None else '-'}",
                          _ts(g.expires_at))
        print_table(table)
        if page.next:
            click.echo(f"more: --after {page.next}")

    emit(state, page, show)


@grant.command("show")
@click.argument("grant_id", metavar="ID")
@common
def grant_show(state: State, grant_id: str) -> None:
    """Show a grant (never its token)."""
    with state.client() as c:
        info = c.describe_grant(grant_id)
    emit(state, info, lambda: _show_grant(info))


@grant.command("token")
@click.argument("grant_id", metavar="ID")
@common
def grant_token(state: State, grant_id: str) -> None:
    """Print a fresh token for an active grant (its grantee or creator), e.g. after approval."""
    with state.client() as c:
        created = c.grant_token(grant_id)
    _emit_token(state, created)


def _ended(verb: str, doc: str) -> None:
    @grant.command(verb, help=doc)
    @click.argument("grant_id", metavar="ID")
    @common
    def command(state: State, grant_id: str) -> None:
        with state.client() as c:
            info = c.retire_grant(grant_id) if verb == "retire" else c.revoke_grant(grant_id)
        emit(state, info, f"{info.id}: {info.state}")


_ended("retire", "End a grant as its grantee or retiring principal (sub-grants are revoked).")
_ended("revoke", "Revoke a grant and its sub-grants (revoke_grant on its key).")


@grant.command("revoke-all")
@click.option("--principal", default=None, help="Every grant held by this principal.")
@click.option("--key", "-k", "key", default=None, help="Every grant on this key.")
@common
def grant_revoke_all(state: State, principal: str | None, key: str | None) -> None:
    """Incident response: revoke every grant of one principal or one key."""
    if (principal is None) == (key is None):
        raise InvalidRequest("give exactly one of --principal or --key")
    with state.client(timeout=LONG_TIMEOUT) as c:  # many grants take a while to end
        result = c.revoke_all_grants(principal=principal, key=key)
    # seq is the revoke-all entry itself; the revoked grants' own entries follow it
    emit(state, result, f"revoked {result.revoked} grant(s); revoke-all entry {result.seq} in "
                        "the revocation feed")


def _decision(verb: str, doc: str) -> None:
    @grant.command(verb, help=doc)
    @click.argument("grant_id", metavar="ID")
    @click.option("--note", default=None, help="Recorded with the decision.")
    @common
    def command(state: State, grant_id: str, note: str | None) -> None:
        with state.client() as c:
            info = (c.approve_grant(grant_id, note) if verb == "approve"
                    else c.reject_grant(grant_id, note))
        extra = f", until {_ts(info.expires_at)}" if info.state == "active" else ""
        emit(state, info, f"{info.id}: {info.state}{extra}")


_decision("approve", "Approve a pending (break-glass) grant; never the requester or grantee.")
_decision("reject", "Reject a pending grant.")


@grant.command("exchange")
@click.argument("subject_token", metavar="TOKEN", envvar="KEYGRANTS_GRANT")
@click.option("--scope", "scope", multiple=True, metavar="OP[,OP...]",
              help="Operations of the new token [default: the same, without create_grant].")
@click.option("--ttl", default=None, type=GRANT_TTL, help="Lifetime of the new token.")
@click.option("--uses", default=None, type=click.IntRange(1), help="At most N uses, taken out of "
              "TOKEN's [default: unlimited; for a limited TOKEN, every use it has left, which "
              "leaves TOKEN none].")
@click.option("--context-equals", multiple=True, metavar="KEY=VALUE")
@click.option("--context-subset", multiple=True, metavar="KEY=VALUE")
@click.option("--audience", "audiences", multiple=True, help="Audience (repeatable).")
@click.option("--dpop-jkt", default=None, metavar="JKT",
              help="Bind the new token to another DPoP key [default: the subject's binding].")
@click.option("--dpop-key-file", envvar="KEYGRANTS_DPOP_KEY_FILE", show_envvar=True,
              default=None, type=click.Path(dir_okay=False),
              help="PEM private key proving possession of a DPoP-bound TOKEN.")
@common
def grant_exchange(state: State, subject_token: str, scope: tuple[str, ...], ttl: int | None,
                   uses: int | None, context_equals: tuple[str, ...],
                   context_subset: tuple[str, ...], audiences: tuple[str, ...],
                   dpop_jkt: str | None, dpop_key_file: str | None) -> None:
    """Trade grant TOKEN (default: KEYGRANTS_GRANT; '-': read it from stdin) for a narrower
    one; print the new token."""
    subject = _token_arg(subject_token)
    if dpop_key_file:
        state.dpop_key = read_dpop_key(dpop_key_file)
    ops = _operations(scope, "--scope") if scope else None
    with state.client() as c:
        result = c.exchange_grant(subject, scope=ops, audience=list(audiences) or None,
                                  context_equals=_pairs(context_equals, "--context-equals"),
                                  context_subset=_pairs(context_subset, "--context-subset"),
                                  ttl=ttl, max_uses=uses, dpop_jkt=dpop_jkt)
    if not state.as_json:
        click.echo(f"Grant {result.grant_id}: {result.scope}, expires in {result.expires_in}s",
                   err=True)
    emit(state, result, result.access_token)


# -- issuer keys and the revocation feed ---------------------------------------------------------

@click.group()
def issuer() -> None:
    """The keys that sign grant tokens."""


@issuer.command("rotate")
@common
def issuer_rotate(state: State) -> None:
    """Publish a new issuer key; it signs after one JWKS refresh interval."""
    with state.client() as c:
        info = c.rotate_issuer_key()
    emit(state, info, f"issuer key {info.kid} ({info.alg}) published; signs from "
                      f"{_ts(info.activate_at)}")


@issuer.command("jwks")
@common
def issuer_jwks(state: State) -> None:
    """Print the JWKS: every key that may verify a live grant token (public)."""
    import msgspec

    with state.client() as c:
        jwks = c.jwks()
    emit(state, jwks, msgspec.json.format(msgspec.json.encode(jwks), indent=2).decode())


@click.command()
@click.option("--since", default=0, show_default=True, type=click.IntRange(0),
              help="Entries after this sequence number.")
@click.option("--limit", default=1000, show_default=True, type=click.IntRange(1, 1000))
@common
def revocations(state: State, since: int, limit: int) -> None:
    """The revocation feed: ended grants, and revoke-all entries (public)."""
    with state.client() as c:
        feed = c.revocations(since, limit)

    def show() -> None:
        from rich.table import Table

        table = Table("seq", "kind", "id", "reason", "revoked at")
        for e in feed.entries:
            table.add_row(str(e.seq), e.kind, e.id, e.reason or "-", _ts(e.revoked_at))
        print_table(table)
        if feed.more:
            click.echo(f"more: --since {feed.next_since}")
        else:
            click.echo(f"next: --since {feed.next_since}")

    emit(state, feed, show)
