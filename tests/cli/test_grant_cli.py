"""``keygrants grant …``, ``issuer …``, ``revocations`` and ``--grant``/``--dpop-key-file`` on the
cryptographic commands: the CLI in process (CliRunner) against a real server (build_server
served by uvicorn in a thread), plus the local errors that need no server."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from keygrants.cli import main
from keygrants.crypto.signing import SigningKey
from keygrants.grants.dpop import proof_key_thumbprint
from keygrants.server import ServerConfig, build_server

_names = itertools.count()
CT = "AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"


def fresh(prefix: str) -> str:
    """Tests share one server; each gets names no other test uses."""
    return f"{prefix}-{next(_names)}"


def one_line_error(result: Result) -> str:
    assert result.exit_code == 1, (result.output, result.exception)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


@dataclass
class Server:
    url: str
    data_dir: Path

    def run(self, *args: str, token: str | None = None, input: str | None = None,
            env: dict[str, str | None] | None = None) -> Result:
        """``keygrants ARGS`` as admin (the data dir's admin.token) unless given a token."""
        base: dict[str, str | None] = {
            "KEYGRANTS_ADDR": self.url, "KEYGRANTS_DATA_DIR": str(self.data_dir),
            "KEYGRANTS_TOKEN": token, "KEYGRANTS_PRINCIPAL": None, "KEYGRANTS_KEY_FILE": None,
            "KEYGRANTS_GRANT": None, "KEYGRANTS_DPOP_KEY_FILE": None,
        }
        return CliRunner().invoke(main, list(args), input=input, env=base | (env or {}))

    def ok(self, *args: str, **kwargs: object) -> Result:
        result = self.run(*args, **kwargs)  # type: ignore[arg-type]
        assert result.exit_code == 0, (args, result.output, result.exception)
        return result

    def json(self, *args: str, **kwargs: object) -> object:
        return json.loads(self.ok(*args, "--json", **kwargs).stdout)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, uvicorn_thread: Any) -> Iterator[Server]:
    data_dir = tmp_path_factory.mktemp("grant-cli") / "data"
    with uvicorn_thread(lambda port: build_server(ServerConfig(
            data_dir=data_dir, listen=f"127.0.0.1:{port}")).app, lifespan="on") as port:
        yield Server(f"http://127.0.0.1:{port}", data_dir)


@dataclass
class Parties:
    key: str  # an AES key
    svc: str  # a principal no policy allows anything ...
    svc_token: str  # ... and its API key


@pytest.fixture
def parties(server: Server) -> Parties:
    key, svc = fresh("enc"), fresh("svc")
    server.ok("key", "create", key)
    server.ok("principal", "create", svc)
    api_key = server.ok("principal", "api-key", svc).stdout.strip()
    return Parties(key, svc, api_key)


def _create(server: Server, parties: Parties, *extra: str, token: str | None = None) -> dict[str, str]:
    out = server.json("grant", "create", "--key", parties.key, "--grantee", parties.svc, *extra, token=token)
    assert isinstance(out, dict)
    return out


# -- create and use ------------------------------------------------------------------------------

def test_create_json_then_encrypt_and_decrypt_with_the_grant(server: Server, parties: Parties) -> None:
    created = _create(server, parties, "--ops", "encrypt,decrypt", "--context-subset", "tenant=t1",
                      "--ttl", "5m", "--uses", "10", "--name", "nightly")
    assert list(created) == ["grant_id", "token", "state"]
    assert created["state"] == "active" and created["grant_id"].startswith("g_")
    token = created["token"]
    ct = server.ok("encrypt", "-k", parties.key, "-c", "tenant=t1", "--grant", token,
                   token=parties.svc_token, input="grant me").stdout.strip()
    plain = server.ok("decrypt", "-c", "tenant=t1", token=parties.svc_token, input=ct,
                      env={"KEYGRANTS_GRANT": token})  # the env var works as well
    assert plain.stdout == "grant me"
    line = one_line_error(server.run("encrypt", "-k", parties.key, "-c", "tenant=t1",
                                     token=parties.svc_token, input="x"))
    assert line.endswith("(forbidden)")
    line = one_line_error(server.run("encrypt", "-k", parties.key, "-c", "tenant=t2", "--grant", token,
                                     token=parties.svc_token, input="x"))
    assert line.endswith("(context_mismatch)")
    info = server.json("grant", "show", created["grant_id"])
    assert (info["uses"], info["max_uses"], info["name"], info["context_subset"]) == (
        2, 10, "nightly", {"tenant": "t1"})
    assert info["expires_at"] > info["not_before"]


def test_create_prints_the_table_on_stderr_and_only_the_token_on_stdout(server: Server,
                                                                        parties: Parties) -> None:
    result = server.ok("grant", "create", "-k", parties.key, "--grantee", parties.svc, "--ops", "encrypt",
                       "--ops", "decrypt", "--audience", "urn:test", "--retiring-principal",
                       parties.svc, "--justification", "ticket 7")
    token = result.stdout.strip()
    assert result.stdout == token + "\n" and token.count(".") == 2
    for text in ("grantee", parties.svc, "decrypt, encrypt", "urn:test", "ticket 7", "expires"):
        assert text in result.stderr


def test_a_dpop_bound_grant_needs_the_key_file(server: Server, parties: Parties,
                                               tmp_path: Path) -> None:
    key = SigningKey.generate("ed25519")
    private, public = tmp_path / "dpop.pem", tmp_path / "dpop.pub.pem"
    private.write_bytes(key.private_pem())
    private.chmod(0o600)
    public.write_text(key.public_key().public_pem())
    created = _create(server, parties, "--ops", "encrypt", "--dpop-key-file", str(public))
    info = server.json("grant", "show", created["grant_id"])
    assert info["dpop_jkt"] == proof_key_thumbprint(key)
    by_private = _create(server, parties, "--ops", "encrypt", "--dpop-key-file", str(private))
    assert server.json("grant", "show", by_private["grant_id"])["dpop_jkt"] == info["dpop_jkt"]
    grant = created["token"]
    ok = server.ok("encrypt", "-k", parties.key, "--grant", grant, "--dpop-key-file", str(private),
                   token=parties.svc_token, input="x")
    assert ok.stdout.strip()
    server.ok("encrypt", "-k", parties.key, token=parties.svc_token, input="x",
              env={"KEYGRANTS_GRANT": grant, "KEYGRANTS_DPOP_KEY_FILE": str(private)})
    line = one_line_error(server.run("encrypt", "-k", parties.key, "--grant", grant,
                                     token=parties.svc_token, input="x"))
    assert line.endswith("(pop_required)")
    line = one_line_error(server.run("encrypt", "-k", parties.key, "--grant", grant, "--dpop-key-file",
                                     str(public), token=parties.svc_token, input="x"))
    assert line == (f"Error: DPoP key file {public} is a public key; give the private key "
                    "(invalid_request)")


# -- list, show, end -----------------------------------------------------------------------------

def test_list_and_show(server: Server, parties: Parties) -> None:
    a = _create(server, parties, "--ops", "encrypt")
    b = _create(server, parties, "--ops", "decrypt", "--uses", "1")
    page = server.json("grant", "list", "--key", parties.key)
    assert {g["id"] for g in page["grants"]} == {a["grant_id"], b["grant_id"]}
    mine = server.json("grant", "list", "--grantee", parties.svc, "--state", "active",
                       token=parties.svc_token)
    assert {g["id"] for g in mine["grants"]} == {a["grant_id"], b["grant_id"]}
    one = server.json("grant", "list", "--key", parties.key, "--limit", "1")
    assert len(one["grants"]) == 1 and one["next"] == one["grants"][0]["id"]
    text = server.ok("grant", "list", "--key", parties.key, "--limit", "1").stdout
    assert one["grants"][0]["id"] in text and f"more: --after {one['next']}" in text
    shown = server.ok("grant", "show", b["grant_id"]).stdout
    assert "0 of 1" in shown and "decrypt" in shown and parties.svc in shown
    assert server.json("grant", "show", a["grant_id"], token=parties.svc_token)["id"] == a["grant_id"]
    assert one_line_error(server.run("grant", "show", "g_" + "0" * 26)).endswith(
        "(grant_not_found)")


HINT = ("forbidden: to list your own grants, pass --grantee <your principal id> (or "
        "--retiring-principal); keygrants whoami shows it")


def test_list_without_a_filter_tells_a_service_how_to_list_its_own(server: Server,
                                                                   parties: Parties) -> None:
    line = one_line_error(server.run("grant", "list", token=parties.svc_token))
    assert line == f"Error: {HINT} (forbidden)"
    result = server.run("grant", "list", "--json", token=parties.svc_token)
    assert result.exit_code == 1
    err = json.loads(result.stderr)["error"]
    assert (err["code"], err["message"]) == ("forbidden", HINT) and err["request_id"]


@pytest.mark.parametrize("args", [[], ["--state", "active"]])
def test_only_an_unfiltered_forbidden_list_gets_the_hint(invoke, stub, args: list[str]) -> None:
    forbidden = (403, {"error": {"code": "forbidden", "message": "forbidden", "request_id": "r"}})
    stub.answers["/v1/grants"] = forbidden
    env = {"KEYGRANTS_ADDR": stub.addr, "KEYGRANTS_TOKEN": "t"}
    assert one_line_error(invoke(["grant", "list", *args], env=env)) == f"Error: {HINT} (forbidden)"
    for given in (["--key", "k"], ["--grantee", "svc"], ["--retiring-principal", "svc"]):
        line = one_line_error(invoke(["grant", "list", *args, *given], env=env))
        assert line == "Error: forbidden (forbidden)"
    stub.answers["/v1/grants"] = (403, {"error": {
        "code": "grant_denied", "message": "denied", "request_id": "r"}})
    assert one_line_error(invoke(["grant", "list", *args], env=env)) == (
        "Error: denied (grant_denied)")


def test_retire_revoke_and_revoke_all(server: Server, parties: Parties) -> None:
    a = _create(server, parties, "--ops", "encrypt")
    b = _create(server, parties, "--ops", "encrypt")
    c = _create(server, parties, "--ops", "encrypt")
    d = _create(server, parties, "--ops", "encrypt")
    assert server.ok("grant", "revoke", a["grant_id"]).stdout == f"{a['grant_id']}: revoked\n"
    line = one_line_error(server.run("encrypt", "-k", parties.key, "--grant", a["token"],
                                     token=parties.svc_token, input="x"))
    assert line.endswith("(grant_revoked)")
    retired = server.json("grant", "retire", b["grant_id"], token=parties.svc_token)
    assert (retired["state"], retired["ended_by"]) == ("retired", parties.svc)
    assert one_line_error(server.run("grant", "revoke", b["grant_id"])).endswith("(grant_state)")
    result = server.ok("grant", "revoke-all", "--principal", parties.svc)
    seq = server.json("revocations", "--since", "0")["entries"]
    entry = next(e["seq"] for e in seq if e["kind"] == "principal" and e["id"] == parties.svc)
    assert result.stdout == (f"revoked 2 grant(s); revoke-all entry {entry} in the revocation "
                             "feed\n")
    for g in (c, d):
        assert server.json("grant", "show", g["grant_id"])["state"] == "revoked"
    by_key = server.json("grant", "revoke-all", "--key", parties.key)
    assert by_key["revoked"] == 0 and by_key["seq"] > 0
    for args in ([], ["--principal", parties.svc, "--key", parties.key]):
        line = one_line_error(server.run("grant", "revoke-all", *args))
        assert line == "Error: give exactly one of --principal or --key (invalid_request)"


# -- break-glass ---------------------------------------------------------------------------------

def test_pending_grants_are_approved_or_rejected(server: Server, parties: Parties) -> None:
    svc, key = parties.svc, parties.key
    allow = (f'permit(principal == Keygrants::Principal::"{svc}", action == '
             f'Keygrants::Action::"encrypt", resource) when {{ resource.name == "{key}" }};')
    glass = (f'@approval("required")\npermit(principal == Keygrants::Principal::"{svc}", action '
             f'== Keygrants::Action::"create_grant", resource) when {{ resource.name == "{key}" }};')
    server.ok("policy", "set", fresh("allow"), "--text", allow)
    server.ok("policy", "set", fresh("glass"), "--text", glass)
    pending = server.run("grant", "create", "-k", key, "--grantee", svc, "--ops", "encrypt",
                         "--justification", "incident 42", token=parties.svc_token)
    assert pending.exit_code == 0, pending.output
    assert pending.stdout == ""  # no token until approved
    assert "waits for approval" in pending.stderr and "keygrants grant token g_" in pending.stderr
    other = _create(server, parties, "--ops", "encrypt", token=parties.svc_token)
    assert (other["state"], other["token"]) == ("pending", None)
    waiting = server.json("grant", "list", "--grantee", svc, "--state", "pending",
                          token=parties.svc_token)
    (first,) = {g["id"] for g in waiting["grants"]} - {other["grant_id"]}
    line = one_line_error(server.run("grant", "approve", first, token=parties.svc_token))
    assert line.endswith("(self_approval)")
    approved = server.ok("grant", "approve", first, "--note", "go").stdout
    assert approved.startswith(f"{first}: active, until ")
    assert server.json("grant", "reject", other["grant_id"], "--note", "no")["state"] == "rejected"
    token = server.ok("grant", "token", first, token=parties.svc_token).stdout.strip()
    assert server.ok("encrypt", "-k", key, "--grant", token, token=parties.svc_token,
                     input="x").stdout
    again = server.json("grant", "token", first, token=parties.svc_token)
    assert (again["grant_id"], again["state"]) == (first, "active") and again["token"]
    line = one_line_error(server.run("grant", "token", other["grant_id"], token=parties.svc_token))
    assert line.endswith("the grant was rejected (grant_state)")


# -- exchange and delegation ---------------------------------------------------------------------

def test_exchange_prints_a_narrower_token(server: Server, parties: Parties) -> None:
    created = _create(server, parties, "--ops", "encrypt,decrypt", "--ttl", "10m")
    result = server.ok("grant", "exchange", created["token"], "--scope", "encrypt", "--ttl", "1m",
                       "--uses", "1", "--context-subset", "tenant=t1", token=parties.svc_token)
    narrow = result.stdout.strip()
    assert result.stdout == narrow + "\n" and "encrypt, expires in" in result.stderr
    ct = server.ok("encrypt", "-k", parties.key, "-c", "tenant=t1", "--grant", narrow,
                   token=parties.svc_token, input="x").stdout
    line = one_line_error(server.run("decrypt", "-c", "tenant=t1", "--grant", narrow,
                                     token=parties.svc_token, input=ct))
    assert line.endswith("(operation_not_granted)")
    from_stdin = server.json("grant", "exchange", "-", "--scope", "decrypt", token=parties.svc_token,
                             input=created["token"] + "\n")
    assert from_stdin["scope"] == "decrypt" and from_stdin["issued_token_type"].startswith("urn:")
    from_env = server.ok("grant", "exchange", token=parties.svc_token,
                         env={"KEYGRANTS_GRANT": created["token"]})
    assert from_env.stdout.count(".") == 2
    line = one_line_error(server.run("grant", "exchange", created["token"], "--scope", "sign",
                                     token=parties.svc_token))
    assert line.endswith("(attenuation_violated)")


def test_a_limited_parent_says_how_many_uses_a_sub_grant_may_take(server: Server,
                                                                   parties: Parties) -> None:
    parent = _create(server, parties, "--ops", "encrypt,create_grant", "--uses", "10", "--ttl",
                     "10m")
    other = fresh("svc")
    server.ok("principal", "create", other)
    create = ("grant", "create", "-k", parties.key, "--grantee", other, "--ops", "encrypt",
              "--ttl", "1m", "--parent-grant", parent["token"])
    expected = ("Error: the parent grant has 10 use(s) left: a sub-grant of it must be limited "
                "to at most 10 (--uses N, max_uses) (attenuation_violated)")
    assert one_line_error(server.run(*create, token=parties.svc_token)) == expected
    assert one_line_error(server.run(*create, "--uses", "11", token=parties.svc_token)) == expected
    exchange = ("grant", "exchange", parent["token"], "--scope", "encrypt")
    assert one_line_error(server.run(*exchange, "--uses", "11", token=parties.svc_token)) == expected
    server.ok(*create, "--uses", "3", token=parties.svc_token)  # 7 left
    one = server.json(*exchange, "--uses", "1", token=parties.svc_token)
    assert server.json("grant", "show", one["grant_id"])["max_uses"] == 1
    # without --uses, an exchange takes every use left (documented), leaving the parent none
    rest = server.json(*exchange, token=parties.svc_token)
    assert server.json("grant", "show", rest["grant_id"])["max_uses"] == 6
    assert server.json("grant", "show", parent["grant_id"])["state"] == "exhausted"


def test_tables_print_whole_ids_on_a_narrow_console(server: Server, parties: Parties) -> None:
    """Ids are copied from tables (principal revoke NAME CREDENTIAL, grant show ID): never cut."""
    created = _create(server, parties, "--ops", "encrypt", "--uses", "10")
    key_id = server.json("key", "show", parties.key)["id"]
    cred_id = server.json("principal", "credentials", parties.svc)[0]["id"]
    listings = [(("key", "list", "--limit", "1000"), key_id),
                (("principal", "credentials", parties.svc), cred_id),
                (("grant", "list", "--key", parties.key), created["grant_id"])]
    for args, wanted in listings:
        for columns in ("40", "80"):  # not a terminal: the table's own width, one row a line
            out = server.ok(*args, env={"COLUMNS": columns, "TTY_COMPATIBLE": None}).stdout
            assert "…" not in out, out
            assert any(wanted in line for line in out.splitlines()), out
        # a terminal narrower than the table: cells fold, never cut
        out = server.ok(*args, env={"COLUMNS": "60", "TTY_COMPATIBLE": "1",
                                    "NO_COLOR": "1"}).stdout
        out = re.sub(r"\x1b\[[0-9;]*m", "", out)
        assert "…" not in out, out
        assert max(len(line) for line in out.splitlines()) <= 60, out
        assert wanted in "".join(_column_cells(out, args)), out


def _column_cells(table: str, args: tuple[str, ...]) -> list[str]:
    """The id column's cells of a boxed table, top to bottom (folded parts in order)."""
    index = 2 if args[:2] == ("key", "list") else 1  # key list: name, then id
    return [line.split("│")[index].strip() for line in table.splitlines() if "│" in line]


def test_delegation_with_parent_grant(server: Server, parties: Parties, tmp_path: Path) -> None:
    key = SigningKey.generate("ed25519")
    key_file = tmp_path / "parent.pem"
    key_file.write_bytes(key.private_pem())
    key_file.chmod(0o600)
    parent = _create(server, parties, "--ops", "encrypt,create_grant", "--dpop-jkt",
                     proof_key_thumbprint(key))
    other = fresh("svc")
    server.ok("principal", "create", other)
    line = one_line_error(server.run("grant", "create", "-k", parties.key, "--grantee", other,
                                     "--ops", "encrypt", "--parent-grant", parent["token"],
                                     token=parties.svc_token))
    assert line.endswith("(pop_required)")
    child = server.json("grant", "create", "-k", parties.key, "--grantee", other, "--ops",
                        "encrypt", "--ttl", "1m", "--dpop-key-file", str(key_file),
                        "--parent-grant", parent["token"], "--parent-dpop-key-file",
                        str(key_file), token=parties.svc_token)
    info = server.json("grant", "show", child["grant_id"])
    assert (info["parent_id"], info["depth"], info["issuer"]) == (parent["grant_id"], 1, parties.svc)
    # the parent token kept out of the process list: from stdin, or from the environment
    for how in ({"input": parent["token"] + "\n", "args": ("--parent-grant", "-")},
                {"env": {"KEYGRANTS_PARENT_GRANT": parent["token"]}, "args": ()}):
        sub = server.json("grant", "create", "-k", parties.key, "--grantee", other, "--ops",
                          "encrypt", "--ttl", "1m", "--dpop-key-file", str(key_file),
                          *how["args"], "--parent-dpop-key-file", str(key_file),
                          token=parties.svc_token, **{k: v for k, v in how.items() if k != "args"})
        assert server.json("grant", "show", sub["grant_id"])["parent_id"] == parent["grant_id"]


# -- issuer keys and the feed --------------------------------------------------------------------

def test_issuer_rotate_jwks_and_revocations(server: Server, parties: Parties) -> None:
    before = json.loads(server.ok("issuer", "jwks").stdout)
    rotated = server.json("issuer", "rotate")
    assert rotated["alg"] == "EdDSA" and rotated["seq"] == before["seq"] + 1
    text = server.ok("issuer", "rotate").stdout
    assert text.startswith("issuer key ") and "published; signs from " in text
    after = server.json("issuer", "jwks")
    assert rotated["kid"] in {k["kid"] for k in after["keys"]}
    g = _create(server, parties, "--ops", "encrypt")
    server.ok("grant", "revoke", g["grant_id"])
    feed = server.json("revocations", "--since", "0")
    assert g["grant_id"] in {e["id"] for e in feed["entries"]}
    latest = feed["latest"]
    assert server.json("revocations", "--since", str(latest))["entries"] == []
    table = server.ok("revocations", "--since", str(latest - 1)).stdout
    assert g["grant_id"] in table and "revoked" in table
    if latest > 1:
        assert server.ok("revocations", "--limit", "1").stdout.rstrip().endswith("more: --since 1")


# -- local errors (no server) --------------------------------------------------------------------

@pytest.mark.parametrize(("args", "message"), [
    (["--ops", "frobnicate"], "Error: unknown operation 'frobnicate' in --ops; known: "
     "create_grant, decrypt, derive, describe, encrypt, generate_data_key, mac, re_encrypt, "
     "sign, verify, verify_mac (invalid_request)"),
    (["--ops", "encrypt,nope,decrypt,zap"], "unknown operations 'nope', 'zap' in --ops"),
    (["--ops", ","], "Error: --ops needs at least one operation (invalid_request)"),
    (["--ops", "encrypt", "--context-subset", "tenant"],
     "Error: --context-subset: context must be KEY=VALUE, got 'tenant' (invalid_request)"),
    (["--ops", "encrypt", "--dpop-jkt", "x", "--dpop-key-file", "f"],
     "Error: give --dpop-jkt or --dpop-key-file, not both (invalid_request)"),
    (["--ops", "encrypt", "--dpop-key-file", "/nonexistent/key.pem"],
     "Error: cannot read /nonexistent/key.pem"),
    (["--ops", "encrypt", "--parent-dpop-key-file", "f"],
     "Error: --parent-dpop-key-file goes with --parent-grant (invalid_request)"),
], ids=lambda a: " ".join(a) if isinstance(a, list) else "")
def test_bad_create_options_are_one_line_errors_before_any_request(invoke, args: list[str],
                                                                  message: str) -> None:
    result = invoke(["grant", "create", "-k", "k", "--grantee", "svc", *args])
    assert message in one_line_error(result)
    err = json.loads(invoke(["grant", "create", "-k", "k", "--grantee", "svc", *args,
                             "--json"]).stderr)["error"]
    assert err["code"] == "invalid_request" and err["request_id"] is None


def test_usage_errors_exit_2(invoke) -> None:
    for args in (["grant", "create", "-k", "k", "--grantee", "svc"],  # --ops is required
                 ["grant", "create", "-k", "k", "--grantee", "svc", "--ops", "x", "--uses", "0"],
                 ["grant", "create", "-k", "k", "--grantee", "svc", "--ops", "encrypt", "--ttl",
                  "5 minutes"],  # a duration is checked by the option parser (was exit 1)
                 ["grant", "list", "--state", "sleeping"], ["grant", "show"],
                 ["revocations", "--since", "-1"]):
        result = invoke(args)
        assert result.exit_code == 2, (args, result.output)
        assert "Usage:" in result.stderr


def test_exchange_without_a_token_and_offline_commands(invoke, closed_addr) -> None:
    assert invoke(["grant", "exchange"]).exit_code == 2  # no TOKEN, no KEYGRANTS_GRANT
    assert one_line_error(invoke(["grant", "exchange", "-"], input="")) == (
        "Error: no token on stdin (invalid_request)")
    for args in (["grant", "list"], ["grant", "exchange", "t"], ["issuer", "jwks"],
                 ["revocations"], ["encrypt", "-k", "k", "--grant", "t"]):
        line = one_line_error(invoke(args, input="x"))
        assert line.endswith("(server_unreachable)") and closed_addr in line


def test_a_grant_token_with_spaces_is_refused_locally(invoke) -> None:
    line = one_line_error(invoke(["encrypt", "-k", "k", "--grant", "a b"], input="x"))
    assert "grant token contains spaces" in line and line.endswith("(invalid_request)")


def test_the_grant_header_reaches_the_server(invoke, stub) -> None:
    stub.answers["/v1/keys/k/encrypt"] = (200, {"ciphertext": CT, "key_id": "id",
                                                "key_version": 1})
    env = {"KEYGRANTS_ADDR": stub.addr}
    assert invoke(["encrypt", "-k", "k", "--grant", "tok.en.x"], input="x", env=env).exit_code == 0
    assert stub.requests[-1]["headers"]["keygrants-grant"] == "tok.en.x"
    assert "dpop" not in stub.requests[-1]["headers"]
    assert invoke(["encrypt", "-k", "k"], input="x", env=env | {"KEYGRANTS_GRANT": "e.n.v"}
                  ).exit_code == 0
    assert stub.requests[-1]["headers"]["keygrants-grant"] == "e.n.v"
    stub.answers["/v1/keys"] = (200, {"keys": [], "next": None})
    assert invoke(["key", "list"], env=env | {"KEYGRANTS_GRANT": "e.n.v"}).exit_code == 0
    assert "keygrants-grant" not in stub.requests[-1]["headers"]  # only crypto commands send it



def test_audit_hash_reads_a_secret_from_stdin(server: Server) -> None:
    """VALUE is a secret (a token, a key): `-` keeps it out of the process list."""
    given = server.ok("audit", "hash", "kg_ak_not-a-real-key").stdout.strip()
    assert given.startswith("hmac-sha256:")
    assert server.ok("audit", "hash", "-", input="kg_ak_not-a-real-key\n").stdout.strip() == given
    line = one_line_error(server.run("audit", "hash", "-", input=""))
    assert line == "Error: no value on stdin (invalid_request)"
