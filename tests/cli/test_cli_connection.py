"""Which credentials the CLI sends, and to where: the data directory's admin token only to this
machine, one identity at a time, tokens kept out of the process list, private key files that
only their owner may read, TLS with a private CA and client certificates, malformed addresses,
and requests whose outcome is unknown."""

from __future__ import annotations

import base64
import ipaddress
import json
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from tests.certs import certificate

from keygrants.api.tls import protocol_class, server_ssl_options
from keygrants.auth.authenticator import AuthSettings
from keygrants.cli import _common
from keygrants.crypto.signing import SigningKey
from keygrants.errors import InvalidRequest
from keygrants.server import ServerConfig, build_server

RANDOM = (200, {"random": base64.b64encode(b"\x00\x01").decode()})
WHOAMI = (200, {"principal": "svc", "credential": "c1", "auth_method": "signature"})


def one_line_error(result: Result) -> str:
    assert result.exit_code == 1, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception  # not a traceback
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def private_file(path: Path, data: bytes, mode: int = 0o600) -> str:
    path.write_bytes(data)
    path.chmod(mode)
    return str(path)


# -- the data directory's admin token goes only to this machine's server ------------------------

@pytest.fixture
def quick_start_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The working directory of a quick start: ``./keygrants-data/admin.token``."""
    cwd = tmp_path / "cwd"
    (cwd / "keygrants-data").mkdir(parents=True)
    (cwd / "keygrants-data" / "admin.token").write_text("kg_admin_local\n")
    monkeypatch.chdir(cwd)
    return cwd


@pytest.fixture
def client_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The arguments of every SDK ``Client`` the CLI makes; each call then fails, so nothing is
    sent anywhere (the addresses below are not ours)."""
    calls: list[dict[str, Any]] = []

    def fake_client(addr: str | None = None, **kwargs: Any) -> Any:
        calls.append({"addr": addr, **kwargs})
        raise InvalidRequest("recorded")

    monkeypatch.setattr(_common, "Client", fake_client)
    return calls


@pytest.mark.parametrize("addr", ["https://kms.example:8443", "http://10.0.0.5:8650",
                                  "https://127.0.0.1.nip.io:8650"])
def test_the_quick_start_admin_token_is_not_sent_to_another_server(
        invoke, quick_start_dir, client_calls, addr: str) -> None:
    result = invoke(["key", "list", "--addr", addr], env={"KEYGRANTS_DATA_DIR": None,
                                                          "KEYGRANTS_ALLOW_INSECURE_HTTP": "1"})
    assert one_line_error(result) == "Error: recorded (invalid_request)"
    assert client_calls[0]["addr"] == addr
    assert client_calls[0]["token"] == ""


def test_a_data_dir_on_the_command_line_is_used_for_any_server(invoke, quick_start_dir,
                                                               client_calls) -> None:
    data_dir = str(quick_start_dir / "keygrants-data")
    invoke(["key", "list", "--addr", "https://kms.example", "--data-dir", data_dir],
           env={"KEYGRANTS_DATA_DIR": None})
    # KEYGRANTS_DATA_DIR is the server's own setting, exported where one runs: not for another
    invoke(["key", "list", "--addr", "https://kms.example"], env={"KEYGRANTS_DATA_DIR": data_dir})
    invoke(["key", "list", "--addr", "http://127.0.0.1:8650"],
           env={"KEYGRANTS_DATA_DIR": data_dir})
    assert [c["token"] for c in client_calls] == ["kg_admin_local", "", "kg_admin_local"]


def test_the_quick_start_admin_token_goes_to_a_loopback_server(invoke, stub, quick_start_dir) -> None:
    stub.answers["/v1/random"] = RANDOM
    localhost = stub.addr.replace("127.0.0.1", "localhost")
    for addr in (stub.addr, localhost):
        assert invoke(["random", "--addr", addr], env={"KEYGRANTS_DATA_DIR": None}).exit_code == 0
    assert stub.tokens == ["Bearer kg_admin_local"] * 2


UNAUTHENTICATED = (401, {"error": {"code": "unauthenticated", "message": "authentication required",
                                   "request_id": "r1"}})
NO_CREDENTIALS = ("authentication required: no credentials given (--token, --token-file, "
                  "KEYGRANTS_TOKEN, KEYGRANTS_TOKEN_FILE, KEYGRANTS_PRINCIPAL + KEYGRANTS_KEY_FILE)")


def test_a_missing_admin_token_is_named_when_the_server_asks_for_credentials(
        invoke, stub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stub.answers["/v1/whoami"] = UNAUTHENTICATED
    typo = tmp_path / "keygrants-dta"
    line = one_line_error(invoke(["whoami", "--data-dir", str(typo)],
                                 env={"KEYGRANTS_ADDR": stub.addr}))
    assert line == (f"Error: {NO_CREDENTIALS} and no admin token at {typo / 'admin.token'} "
                    "(unauthenticated)")
    # run from another directory than the server's: the default, as an absolute path
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = invoke(["whoami", "--json"], env={"KEYGRANTS_ADDR": stub.addr,
                                               "KEYGRANTS_DATA_DIR": None})
    err = json.loads(result.stderr)["error"]
    assert err == {"code": "unauthenticated", "request_id": "r1", "message":
                   f"{NO_CREDENTIALS} and no admin token at "
                   f"{elsewhere / 'keygrants-data' / 'admin.token'}"}
    assert stub.tokens == [None, None]


def test_an_empty_admin_token_file_is_named(invoke, stub, quick_start_dir: Path) -> None:
    token_file = quick_start_dir / "keygrants-data" / "admin.token"
    token_file.write_text("\n")
    stub.answers["/v1/whoami"] = UNAUTHENTICATED
    line = one_line_error(invoke(["whoami"], env={"KEYGRANTS_ADDR": stub.addr,
                                                  "KEYGRANTS_DATA_DIR": None}))
    assert line == (f"Error: {NO_CREDENTIALS} and the admin token file {token_file} is empty "
                    "(unauthenticated)")


def test_an_admin_token_not_read_for_another_server_says_why(invoke, quick_start_dir: Path,
                                                             monkeypatch) -> None:
    """KEYGRANTS_DATA_DIR is not read for a server that is not loopback: the error says so
    rather than "not found" (the rule itself is unchanged)."""
    from keygrants.errors import Unauthenticated

    class Refusing:
        def __init__(self, addr: str | None = None, **kwargs: Any) -> None:
            assert kwargs["token"] == ""

        def __enter__(self) -> Refusing:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def whoami(self) -> None:
            raise Unauthenticated(request_id="r2")

    monkeypatch.setattr(_common, "Client", Refusing)
    data_dir = quick_start_dir / "keygrants-data"
    line = one_line_error(invoke(["whoami", "--addr", "https://kms.example"],
                                 env={"KEYGRANTS_DATA_DIR": str(data_dir)}))
    assert line == (f"Error: {NO_CREDENTIALS}, and {data_dir / 'admin.token'} was not read: the "
                    "data directory's admin token is used only for a loopback server or a "
                    "--data-dir given on the command line (unauthenticated)")


@pytest.mark.parametrize("answer", ["given-token", "other-code"])
def test_other_authentication_failures_keep_the_servers_message(invoke, stub, tmp_path: Path,
                                                                answer: str) -> None:
    if answer == "given-token":  # credentials were sent: the server's word stands
        stub.answers["/v1/whoami"] = UNAUTHENTICATED
        result = invoke(["whoami", "--token", "kg_ak_x"], env={"KEYGRANTS_ADDR": stub.addr})
        assert one_line_error(result) == "Error: authentication required (unauthenticated)"
    else:  # nothing sent, but another refusal than "authentication required"
        stub.answers["/v1/whoami"] = (401, {"error": {
            "code": "signature_invalid", "message": "bad signature", "request_id": "r"}})
        result = invoke(["whoami"], env={"KEYGRANTS_ADDR": stub.addr})
        assert one_line_error(result) == "Error: bad signature (signature_invalid)"


def test_a_client_certificate_is_a_credential(tmp_path: Path) -> None:
    """With a client certificate the request is not sent without credentials: no note."""
    state = _common.State("https://kms.example", None, str(tmp_path), False,
                          client_cert="c.pem", client_key="k.pem")
    assert state._admin_token() is None
    assert state.without_credentials is None


@pytest.mark.parametrize(("addr", "loopback"), [
    ("http://127.0.0.1:8650", True), ("127.0.0.2:8650", True), ("http://[::1]:8650", True),
    ("https://LOCALHOST", True), ("http://user:pw@127.0.0.1:1", True),
    ("http://10.0.0.5:8650", False), ("https://kms.example", False),
    ("http://127.0.0.1.nip.io", False), ("http://[::1", False), ("", False),
])
def test_is_loopback(addr: str, loopback: bool) -> None:
    assert _common.is_loopback(addr) is loopback


# -- one identity: a token or a signing key, never both, never half a signing key --------------

@pytest.fixture
def svc_key(tmp_path: Path) -> str:
    return private_file(tmp_path / "svc.pem", SigningKey.generate("ed25519").private_pem())


@pytest.mark.parametrize("how", ["env", "option", "file"])
def test_a_token_and_a_signing_key_together_are_refused(invoke, stub, svc_key, tmp_path: Path,
                                                        how: str) -> None:
    env: dict[str, str | None] = {"KEYGRANTS_ADDR": stub.addr, "KEYGRANTS_PRINCIPAL": "svc",
                                  "KEYGRANTS_KEY_FILE": svc_key}
    args = ["whoami"]
    if how == "env":
        env["KEYGRANTS_TOKEN"] = "kg_admin_x"
    elif how == "option":
        args += ["--token", "kg_admin_x"]
    else:
        args += ["--token-file", private_file(tmp_path / "token", b"kg_admin_x\n")]
    line = one_line_error(invoke(args, env=env))
    assert "both a token" in line and "KEYGRANTS_PRINCIPAL" in line
    assert line.endswith("(invalid_request)")
    assert stub.requests == []


@pytest.mark.parametrize("var", ["KEYGRANTS_PRINCIPAL", "KEYGRANTS_KEY_FILE"])
def test_half_a_signing_key_is_an_error_not_the_admin_token(invoke, stub, svc_key, quick_start_dir,
                                                            var: str) -> None:
    stub.answers["/v1/whoami"] = WHOAMI
    env = {"KEYGRANTS_ADDR": stub.addr, "KEYGRANTS_DATA_DIR": None,
           var: "svc" if var == "KEYGRANTS_PRINCIPAL" else svc_key}
    line = one_line_error(invoke(["whoami"], env=env))
    assert f"{var} is set but" in line and "request signing needs both" in line
    assert stub.requests == []


def test_a_signing_key_alone_signs(invoke, stub, svc_key, quick_start_dir) -> None:
    stub.answers["/v1/whoami"] = WHOAMI
    env = {"KEYGRANTS_ADDR": stub.addr, "KEYGRANTS_DATA_DIR": None, "KEYGRANTS_PRINCIPAL": "svc",
           "KEYGRANTS_KEY_FILE": svc_key}
    assert invoke(["whoami"], env=env).exit_code == 0
    headers = stub.requests[0]["headers"]
    assert "authorization" not in headers and "signature" in headers


# -- private key files that group or others may read are refused -------------------------------

def test_a_signing_key_file_readable_by_others_is_refused(invoke, stub, svc_key) -> None:
    Path(svc_key).chmod(0o644)
    line = one_line_error(invoke(["whoami"], env={"KEYGRANTS_ADDR": stub.addr,
                                                  "KEYGRANTS_PRINCIPAL": "svc",
                                                  "KEYGRANTS_KEY_FILE": svc_key}))
    assert line == (f"Error: key file {svc_key} (KEYGRANTS_KEY_FILE) is accessible by group or "
                    f"others (mode 644); run: chmod 600 {svc_key} (invalid_request)")
    assert stub.requests == []


def test_a_shared_secret_file_readable_by_group_is_refused(invoke, stub, tmp_path: Path) -> None:
    secret = private_file(tmp_path / "ss", b"kg_ss_0123456789abcdef_c2VjcmV0\n", 0o640)
    line = one_line_error(invoke(["whoami"], env={"KEYGRANTS_ADDR": stub.addr,
                                                  "KEYGRANTS_PRINCIPAL": "svc",
                                                  "KEYGRANTS_KEY_FILE": secret}))
    assert "(mode 640); run: chmod 600" in line
    assert stub.requests == []


@pytest.mark.parametrize("how", ["option", "env"])
def test_a_dpop_key_file_readable_by_others_is_refused(invoke, stub, tmp_path: Path,
                                                       how: str) -> None:
    key = private_file(tmp_path / "dpop.pem", SigningKey.generate("ed25519").private_pem(), 0o604)
    args = ["encrypt", "-k", "k", "--grant", "g.h.s", "--token", "t"]
    env = {"KEYGRANTS_ADDR": stub.addr}
    if how == "option":
        args += ["--dpop-key-file", key]
    else:
        env["KEYGRANTS_DPOP_KEY_FILE"] = key
    line = one_line_error(invoke(args, input="x", env=env))
    assert line == (f"Error: DPoP key file {key} is accessible by group or others (mode 604); "
                    f"run: chmod 600 {key} (invalid_request)")
    assert stub.requests == []


def _public_key_files(tmp_path: Path) -> dict[str, str]:
    """A public key as PEM and as a JWK, both mode 0644 (as a .pub is written)."""
    public = SigningKey.generate("ed25519").public_key()
    return {"pem": private_file(tmp_path / "svc.pub.pem", public.public_pem().encode(), 0o644),
            "jwk": private_file(tmp_path / "svc.jwk", json.dumps(public.jwk()).encode(), 0o644)}


@pytest.mark.parametrize("form", ["pem", "jwk"])
@pytest.mark.parametrize("where", ["KEYGRANTS_KEY_FILE", "--dpop-key-file",
                                   "KEYGRANTS_DPOP_KEY_FILE", "--client-key"])
def test_a_public_key_given_as_a_private_one_is_named_before_its_mode(
        invoke, stub, tmp_path: Path, form: str, where: str) -> None:
    """A public key's mode does not matter: telling the user to chmod it first was a detour."""
    public = _public_key_files(tmp_path)[form]
    env = {"KEYGRANTS_ADDR": stub.addr}
    args = ["encrypt", "-k", "k"]
    if where == "KEYGRANTS_KEY_FILE":
        env |= {"KEYGRANTS_PRINCIPAL": "svc", "KEYGRANTS_KEY_FILE": public}
        what = f"key file {public} (KEYGRANTS_KEY_FILE)"
    elif where == "--client-key":
        cert = private_file(tmp_path / "c.crt", b"-----BEGIN CERTIFICATE-----\n", 0o644)
        args += ["--token", "t", "--client-cert", cert, "--client-key", public]
        what = f"client key file {public}"
    else:
        args += ["--token", "t", "--grant", "g.h.s"]
        if where == "--dpop-key-file":
            args += ["--dpop-key-file", public]
        else:
            env["KEYGRANTS_DPOP_KEY_FILE"] = public
        what = f"DPoP key file {public}"
    line = one_line_error(invoke(args, input="x", env=env))
    assert line == f"Error: {what} is a public key; give the private key (invalid_request)"
    assert stub.requests == []


@pytest.mark.parametrize("content", [b"not a key\n", b"{}", SigningKey.generate(
    "ed25519").private_pem().replace(b"PRIVATE KEY", b"ENCRYPTED DATA")])
def test_a_dpop_key_file_that_holds_no_key_is_named_in_our_words(invoke, stub, tmp_path: Path,
                                                                 content: bytes) -> None:
    key = private_file(tmp_path / "dpop.pem", content)
    line = one_line_error(invoke(["encrypt", "-k", "k", "--token", "t", "--grant", "g.h.s",
                                  "--dpop-key-file", key], input="x",
                                 env={"KEYGRANTS_ADDR": stub.addr}))
    assert line == (f"Error: DPoP key file {key} does not hold a DPoP proof key: expected an "
                    "unencrypted Ed25519 or P-256 private key (PEM) (invalid_request)")
    assert stub.requests == []


# -- plain http:// to another host: what a CLI user can do -------------------------------------

def test_plain_http_to_another_host_names_the_cli_opt_in(invoke, client_calls) -> None:
    line = one_line_error(invoke(["whoami", "--token", "t", "--addr", "http://10.0.0.5:8650"]))
    assert line == ("Error: refusing plain http:// to http://10.0.0.5:8650, which is not a "
                    "loopback address: anyone on the network path could read and change what is "
                    "sent and received; use https://, or set KEYGRANTS_ALLOW_INSECURE_HTTP=1 if "
                    "the path is trusted (invalid_request)")
    assert client_calls == []  # refused before a client is made
    invoke(["whoami", "--token", "t", "--addr", "http://10.0.0.5:8650"],
           env={"KEYGRANTS_ALLOW_INSECURE_HTTP": "1"})
    assert [c["addr"] for c in client_calls] == ["http://10.0.0.5:8650"]


# -- tokens out of the process list: --token - and --token-file ---------------------------------

def test_token_dash_reads_the_first_line_of_stdin(invoke, stub) -> None:
    stub.answers["/v1/keys/k/encrypt"] = (200, {"ciphertext": "AAAA", "key_id": "id",
                                                "key_version": 1})
    result = invoke(["encrypt", "-k", "k", "--token", "-"], input=b"  kg_ak_from_stdin \nplain\x00",
                    env={"KEYGRANTS_ADDR": stub.addr})
    assert result.exit_code == 0, result.output
    assert stub.tokens == ["Bearer kg_ak_from_stdin"]
    # the rest of stdin is the command's input
    assert stub.requests[0]["body"]["plaintext"] == base64.b64encode(b"plain\x00").decode()


def test_grant_dash_reads_a_line_of_stdin_after_the_token(invoke, stub) -> None:
    stub.answers["/v1/keys/k/encrypt"] = (200, {"ciphertext": "AAAA", "key_id": "id",
                                                "key_version": 1})
    result = invoke(["encrypt", "-k", "k", "--token", "-", "--grant", "-", "--in", "-"],
                    input="tok\ngr.an.t\ndata", env={"KEYGRANTS_ADDR": stub.addr})
    assert result.exit_code == 0, result.output
    assert stub.tokens == ["Bearer tok"]
    assert stub.requests[0]["headers"]["keygrants-grant"] == "gr.an.t"
    assert stub.requests[0]["body"]["plaintext"] == base64.b64encode(b"data").decode()


def test_token_file_option_and_variable(invoke, stub, tmp_path: Path) -> None:
    stub.answers["/v1/random"] = RANDOM
    token_file = private_file(tmp_path / "token", b"kg_ak_from_file\n")
    env = {"KEYGRANTS_ADDR": stub.addr}
    assert invoke(["random", "--token-file", token_file], env=env).exit_code == 0
    assert invoke(["random"], env=env | {"KEYGRANTS_TOKEN_FILE": token_file}).exit_code == 0
    assert stub.tokens == ["Bearer kg_ak_from_file"] * 2


@pytest.mark.parametrize(("args", "stdin", "env", "message"), [
    (["--token", "-"], "", {}, "Error: no token on stdin (invalid_request)"),
    (["--token", "a", "--token-file", "f"], None, {},
     "Error: give a token with --token or --token-file, not both (invalid_request)"),
    (["--token", "a", "--token-file", "f"], None,
     {"KEYGRANTS_TOKEN": "b", "KEYGRANTS_TOKEN_FILE": "g"},
     "Error: give a token with --token or --token-file, not both (invalid_request)"),
    ([], None, {"KEYGRANTS_TOKEN": "a", "KEYGRANTS_TOKEN_FILE": "f"},
     "Error: both KEYGRANTS_TOKEN and KEYGRANTS_TOKEN_FILE are set: unset one of them, or choose "
     "with --token or --token-file (invalid_request)"),
    (["--token-file", "/nonexistent/token"], None, {},
     "Error: cannot read /nonexistent/token: No such file or directory (invalid_request)"),
    (["--token", "éééé"], None, {},
     "Error: the token contains spaces, control or non-ASCII characters; check how it was copied "
     "(invalid_request)"),
])
def test_token_errors_are_one_line(invoke, stub, args, stdin, env, message: str) -> None:
    line = one_line_error(invoke(["random", *args], input=stdin,
                                 env={"KEYGRANTS_ADDR": stub.addr} | env))
    assert line == message
    assert stub.requests == []


@pytest.mark.parametrize(("args", "stdin", "env", "sent"), [
    (["--token-file", "{file}"], None, {"KEYGRANTS_TOKEN": "kg_ak_env"}, "kg_ak_file"),
    (["--token", "kg_ak_option"], None, {"KEYGRANTS_TOKEN_FILE": "{file}"}, "kg_ak_option"),
    (["--token", "-"], "kg_ak_stdin\n", {"KEYGRANTS_TOKEN_FILE": "{file}"}, "kg_ak_stdin"),
    # both variables exported: either option picks one
    (["--token", "kg_ak_option"], None,
     {"KEYGRANTS_TOKEN": "kg_ak_env", "KEYGRANTS_TOKEN_FILE": "{file}"}, "kg_ak_option"),
    (["--token-file", "{file}"], None,
     {"KEYGRANTS_TOKEN": "kg_ak_env", "KEYGRANTS_TOKEN_FILE": "/nonexistent"}, "kg_ak_file"),
], ids=["file-over-token-env", "token-over-file-env", "stdin-over-file-env",
        "token-over-both-env", "file-over-both-env"])
def test_a_token_option_beats_either_variable(invoke, stub, tmp_path: Path, args: list[str],
                                              stdin: str | None, env: dict[str, str],
                                              sent: str) -> None:
    """The walk-through exports one kind of token and then passes the other for one command."""
    stub.answers["/v1/random"] = RANDOM
    token_file = private_file(tmp_path / "token", b"kg_ak_file\n")
    args = [a.replace("{file}", token_file) for a in args]
    env = {k: v.replace("{file}", token_file) for k, v in env.items()}
    result = invoke(["random", *args], input=stdin, env={"KEYGRANTS_ADDR": stub.addr} | env)
    assert result.exit_code == 0, result.output
    assert stub.tokens == [f"Bearer {sent}"]


def test_an_empty_token_file_is_refused(invoke, stub, tmp_path: Path) -> None:
    empty = private_file(tmp_path / "empty", b"\n")
    line = one_line_error(invoke(["random", "--token-file", empty],
                                 env={"KEYGRANTS_ADDR": stub.addr}))
    assert line == f"Error: no token in {empty} (invalid_request)"


# -- malformed addresses and credentials in addresses ------------------------------------------

@pytest.mark.parametrize("addr", ["http://127.0.0.1:notaport", "http://[::1", "127.0.0.1:notaport",
                                  "http://user:secretpw@127.0.0.1:8x"])
@pytest.mark.parametrize("where", ["option", "env"])
def test_a_malformed_address_is_one_line(invoke, addr: str, where: str) -> None:
    args, env = (["key", "list", "--addr", addr], {}) if where == "option" else (
        ["key", "list"], {"KEYGRANTS_ADDR": addr})
    line = one_line_error(invoke(args, env=env))
    assert line.endswith("(invalid_request)")
    assert "Traceback" not in line and "secretpw" not in line


def test_userinfo_in_the_address_is_redacted(invoke, closed_addr) -> None:
    addr = closed_addr.replace("http://", "http://user:secretpw@")
    line = one_line_error(invoke(["key", "list", "--addr", addr]))
    assert "secretpw" not in line and "user:" not in line
    assert line.endswith("(server_unreachable)")
    err = json.loads(invoke(["key", "list", "--addr", addr, "--json"]).stderr)["error"]
    assert "secretpw" not in err["message"]


# -- principal keygen when the outcome of the registration is unknown --------------------------

KEYS_PATH = "/v1/principals/svc/keys"


def test_keygen_keeps_the_key_when_the_answer_is_lost(invoke, stub, tmp_path: Path) -> None:
    stub.drop.add(KEYS_PATH)  # the request arrives; the connection closes with no answer
    out = tmp_path / "svc.pem"
    staged = tmp_path / "svc.pem.new"
    line = one_line_error(invoke(["principal", "keygen", "svc", "--out", str(out)],
                                 env={"KEYGRANTS_ADDR": stub.addr}))
    assert [r["path"] for r in stub.requests] == [KEYS_PATH]
    assert f"The private key is kept in {staged}" in line
    assert "keygrants principal credentials svc --json" in line
    sent = stub.requests[0]["body"]["public_key"]
    public = SigningKey.from_pem(staged.read_bytes()).public_key().public_pem()
    assert sent.strip() == public.strip()
    assert stat.S_IMODE(staged.stat().st_mode) == 0o600
    assert not out.exists()
    # a second keygen does not overwrite the kept key
    line = one_line_error(invoke(["principal", "keygen", "svc", "--out", str(out)],
                                 env={"KEYGRANTS_ADDR": stub.addr}))
    assert line.startswith(f"Error: {staged} exists: a key kept by an earlier keygen")
    assert len(stub.requests) == 1
    assert SigningKey.from_pem(staged.read_bytes()).public_key().public_pem() == public


def test_keygen_removes_the_key_when_nothing_was_sent(invoke, closed_addr, tmp_path: Path) -> None:
    out = tmp_path / "svc.pem"
    line = one_line_error(invoke(["principal", "keygen", "svc", "--out", str(out)],
                                 env={"KEYGRANTS_ADDR": closed_addr}))
    assert line.endswith("(server_unreachable)")
    assert list(tmp_path.glob("svc.pem*")) == []


def test_keygen_removes_the_key_when_registration_is_refused(invoke, stub, tmp_path: Path) -> None:
    stub.answers[KEYS_PATH] = (404, {"error": {"code": "principal_not_found",
                                               "message": "no principal svc", "request_id": "r"}})
    out = tmp_path / "svc.pem"
    one_line_error(invoke(["principal", "keygen", "svc", "--out", str(out)],
                          env={"KEYGRANTS_ADDR": stub.addr}))
    assert list(tmp_path.glob("svc.pem*")) == []


# -- audit export replaces the file only after a complete export -------------------------------

EXPORT = "/v1/audit/export"


def test_a_failed_re_export_leaves_the_earlier_export(invoke, stub, closed_addr,
                                                      tmp_path: Path) -> None:
    out = tmp_path / "evidence.jsonl"
    out.write_bytes(b'{"earlier": "export"}\n')
    stub.answers[EXPORT] = (401, {"error": {"code": "unknown_key", "message": "invalid credentials",
                                            "request_id": "r"}})
    line = one_line_error(invoke(["audit", "export", "--out", str(out)],
                                 env={"KEYGRANTS_ADDR": stub.addr}))
    assert line == "Error: invalid credentials (unknown_key)"
    one_line_error(invoke(["audit", "export", "--out", str(out)],
                          env={"KEYGRANTS_ADDR": closed_addr}))
    stub.drop.add(EXPORT)
    one_line_error(invoke(["audit", "export", "--out", str(out)],
                          env={"KEYGRANTS_ADDR": stub.addr}))
    assert out.read_bytes() == b'{"earlier": "export"}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evidence.jsonl"]  # no temp file left


def test_a_complete_export_replaces_the_file(invoke, stub, tmp_path: Path) -> None:
    out = tmp_path / "evidence.jsonl"
    out.write_bytes(b"old\n")
    stub.answers[EXPORT] = (200, {"seq": 1})
    result = invoke(["audit", "export", "--out", str(out)], env={"KEYGRANTS_ADDR": stub.addr})
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == b'{"seq": 1}'
    assert result.stdout == f"wrote 10 bytes to {out}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evidence.jsonl"]
    assert stat.S_IMODE(out.stat().st_mode) & 0o600 == 0o600


# -- TLS: a private CA (--ca-file) and client certificates (--client-cert/--client-key) ---------

def _issue(path: Path, subject: str, ca_key: Any, *, san: x509.GeneralName | None,
           ca: bool = False) -> tuple[str, str]:
    """A certificate signed by ``ca_key`` (``test-ca``; itself when ``ca``) and its key, as
    ``path``.crt and ``path``.key (0600)."""
    key = ca_key if ca else ec.generate_private_key(ec.SECP256R1())
    cert = certificate(subject, ca_key, "test-ca", key, ca=ca, san=san)
    crt = path.with_suffix(".crt")
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return str(crt), private_file(path.with_suffix(".key"), pem)


@dataclass
class TlsServer:
    url: str
    data_dir: Path
    ca: str
    svc: tuple[str, str]  # a client certificate mapped to principal svc (san-dns:svc.internal)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory, uvicorn_thread: Any) -> Iterator[TlsServer]:
    """``keygrants server --tls-cert … --tls-key … --client-ca …`` (built in this process)."""
    base = tmp_path_factory.mktemp("tls-cli")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca, _ = _issue(base / "ca", "test-ca", ca_key, san=None, ca=True)
    server_cert, server_key = _issue(base / "server", "127.0.0.1", ca_key,
                                     san=x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    svc = _issue(base / "svc", "svc", ca_key, san=x509.DNSName("svc.internal"))
    data_dir = base / "data"
    auth = AuthSettings(methods=frozenset({"signature", "api_key", "mtls", "admin_token"}))
    with uvicorn_thread(lambda port: build_server(ServerConfig(
            data_dir=data_dir, listen=f"127.0.0.1:{port}", auth=auth, tls_cert=Path(server_cert),
            tls_key=Path(server_key), client_ca=Path(ca))).app, lifespan="on",
            http=protocol_class(), **server_ssl_options(server_cert, server_key, ca)) as port:
        yield TlsServer(f"https://127.0.0.1:{port}", data_dir, ca, svc)


def test_ca_file_trusts_a_private_ca(invoke, tls_server: TlsServer) -> None:
    env = {"KEYGRANTS_ADDR": tls_server.url, "KEYGRANTS_DATA_DIR": str(tls_server.data_dir)}
    line = one_line_error(invoke(["whoami"], env=env))
    assert "CERTIFICATE_VERIFY_FAILED" in line and line.endswith("(server_unreachable)")
    for extra_args, extra_env in ((["--ca-file", tls_server.ca], {}),
                                  ([], {"KEYGRANTS_CA_FILE": tls_server.ca})):
        result = invoke(["whoami", *extra_args], env=env | extra_env)
        assert result.exit_code == 0, result.output
        assert result.stdout.startswith("admin ")


def test_a_client_certificate_authenticates(invoke, tls_server: TlsServer,
                                            quick_start_dir: Path) -> None:
    admin = {"KEYGRANTS_ADDR": tls_server.url, "KEYGRANTS_DATA_DIR": str(tls_server.data_dir),
             "KEYGRANTS_CA_FILE": tls_server.ca}
    for args in (["principal", "create", "svc"],
                 ["principal", "add-cert", "svc", "--match", "san-dns:svc.internal"]):
        result = invoke(args, env=admin)
        assert result.exit_code == 0, result.output
    # this server's admin token in ./keygrants-data is not sent next to a client certificate
    (quick_start_dir / "keygrants-data" / "admin.token").write_bytes(
        (tls_server.data_dir / "admin.token").read_bytes())
    cert, key = tls_server.svc
    for args, env in ((["--client-cert", cert, "--client-key", key], {}),
                      ([], {"KEYGRANTS_CLIENT_CERT": cert, "KEYGRANTS_CLIENT_KEY": key})):
        result = invoke(["whoami", "--json", *args], env={
            "KEYGRANTS_ADDR": tls_server.url, "KEYGRANTS_CA_FILE": tls_server.ca,
            "KEYGRANTS_DATA_DIR": None} | env)
        assert result.exit_code == 0, result.output
        me = json.loads(result.stdout)
        assert (me["principal"], me["auth_method"]) == ("svc", "mtls")


def test_tls_option_errors_are_one_line(invoke, tls_server: TlsServer, tmp_path: Path) -> None:
    cert, key = tls_server.svc
    env = {"KEYGRANTS_ADDR": tls_server.url}
    cases = [
        (["--client-cert", cert], "Error: --client-cert and --client-key go together "
                                  "(KEYGRANTS_CLIENT_CERT and KEYGRANTS_CLIENT_KEY) (invalid_request)"),
        (["--ca-file", str(tmp_path / "missing.pem")],
         f"Error: cannot use the CA file {tmp_path / 'missing.pem'}: No such file or directory "
         "(invalid_request)"),
        (["--ca-file", key], f"Error: cannot use the CA file {key}: "),
        (["--client-cert", key, "--client-key", key],
         f"Error: cannot use the client certificate {key} with the key {key}: "),
    ]
    for args, start in cases:
        assert one_line_error(invoke(["whoami", *args], env=env)).startswith(start)
    exposed = private_file(tmp_path / "exposed.key", Path(key).read_bytes(), 0o644)
    line = one_line_error(invoke(["whoami", "--client-cert", cert, "--client-key", exposed],
                                 env=env))
    assert line == (f"Error: client key file {exposed} is accessible by group or others "
                    f"(mode 644); run: chmod 600 {exposed} (invalid_request)")


def test_revoke_all_and_principal_deletion_wait_longer_for_their_answer(invoke, stub,
                                                                        monkeypatch) -> None:
    """Both end every grant of a principal first, which on a large store takes longer than the
    10 s other commands wait (the CLI used to report an unreachable server while the server
    went on and revoked them)."""
    timeouts: list[float] = []

    class Recording(_common.Client):
        def __init__(self, *args: Any, timeout: float = 10.0, **kwargs: Any) -> None:
            timeouts.append(timeout)
            super().__init__(*args, timeout=timeout, **kwargs)

    monkeypatch.setattr(_common, "Client", Recording)
    stub.answers["/v1/revoke-all"] = (200, {"revoked": 0, "seq": 1})
    stub.answers["/v1/principals/svc"] = (204, None)
    stub.answers["/v1/random"] = RANDOM
    env = {"KEYGRANTS_ADDR": stub.addr, "KEYGRANTS_TOKEN": "t"}
    for args in (["grant", "revoke-all", "--principal", "svc"],
                 ["principal", "delete", "svc", "--yes"], ["random"]):
        result = invoke(args, env=env)
        assert result.exit_code == 0, result.output
    assert timeouts == [_common.LONG_TIMEOUT, _common.LONG_TIMEOUT, _common.DEFAULT_TIMEOUT]
