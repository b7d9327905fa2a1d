"""CLI argument handling that needs no server: usage errors, one-line and JSON errors, durations,
unreachable servers, and where the token comes from (checked against a mock transport)."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from keygrants.cli import main

CT = base64.b64encode(b"\x01" + b"\x00" * 60).decode()  # well-formed base64, never sent


def command_paths(group: click.Group = main, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for name, command in group.commands.items():
        yield (*prefix, name)
        if isinstance(command, click.Group):
            yield from command_paths(command, (*prefix, name))


ALL_COMMANDS = sorted(command_paths())


def one_line_error(result) -> str:
    """The failure contract without --json: exit 1, nothing on stdout, one 'Error:' line."""
    assert result.exit_code == 1, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    return lines[0]


def json_error(result) -> dict[str, object]:
    """The failure contract with --json: exit 1, the API's error shape on stderr."""
    assert result.exit_code == 1, (result.output, result.exception)
    assert result.stdout == ""
    body = json.loads(result.stderr)
    assert list(body) == ["error"]
    assert set(body["error"]) == {"code", "message", "request_id"}
    assert isinstance(body["error"]["code"], str)
    assert isinstance(body["error"]["message"], str)
    return body["error"]


# -- help ---------------------------------------------------------------------------------------

def test_the_command_tree_is_what_the_docs_describe() -> None:
    assert {"server", "key", "encrypt", "decrypt", "re-encrypt", "data-key", "sign", "verify",
            "mac", "verify-mac", "derive", "random", "public-key"} <= {p[0] for p in ALL_COMMANDS}
    assert len(ALL_COMMANDS) >= 25


@pytest.mark.parametrize("path", [(), *ALL_COMMANDS], ids=lambda p: " ".join(p) or "main")
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_for_every_command_exits_0(invoke, path: tuple[str, ...], flag: str) -> None:
    result = invoke([*path, flag])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Usage: ")
    assert result.stderr == ""


def test_version(invoke) -> None:
    result = invoke(["--version"])
    assert result.exit_code == 0
    assert result.stdout.startswith("keygrants, version ")


# -- usage errors (exit 2) ----------------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ["no-such-command"],
    ["encrypt"],  # --key is required
    ["key", "create"],  # NAME is required
    ["key", "create", "k", "--spec", "des"],
    ["data-key", "-k", "k", "--bytes", "17"],
    ["random", "--bytes", "0"],
    ["random", "--bytes", "1025"],
    ["derive", "-k", "k", "--length", "0"],
    ["key", "schedule-deletion", "k", "--days", "6"],
    ["key", "list", "--limit", "0"],
    ["verify", "-k", "k"],  # --signature is required
    ["public-key", "-k", "k", "--format", "der"],
    ["server", "--listen", "nonsense"],
    ["server", "--listen", "127.0.0.1:99999"],
    ["server", "--max-plaintext", "0"],
], ids=lambda a: " ".join(a))
def test_usage_errors_exit_2(invoke, args: list[str]) -> None:
    result = invoke(args)
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Usage:" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("command", [["key", "update", "k"], ["principal", "update", "p"]],
                         ids=lambda c: " ".join(c[:2]))
def test_tag_and_clear_tags_together_are_a_usage_error(invoke, stub, command: list[str]) -> None:
    """One of the two would be dropped (every tag was, --tag's too, with exit 0)."""
    env = {"KEYGRANTS_ADDR": stub.addr, "KEYGRANTS_TOKEN": "t"}
    for args in (["--tag", "a", "--clear-tags"], ["--clear-tags", "--tag", "a", "--tag", "b"]):
        result = invoke([*command, *args], env=env)
        assert result.exit_code == 2, (result.output, result.exception)
        assert "Usage:" in result.stderr and result.stdout == ""
        assert ("Error: --tag and --clear-tags cannot be used together: --tag replaces every "
                "tag, --clear-tags removes them all") in result.stderr
    assert stub.requests == []
    # each alone still does what it says (the stub has no answer: the request is what counts)
    for args in (["--clear-tags"], ["--tag", "a", "--tag", "b"]):
        invoke([*command, *args], env=env)
    assert [r["body"]["tags"] for r in stub.requests] == [[], ["a", "b"]]


# -- key references -----------------------------------------------------------------------------

@pytest.mark.parametrize("ref", ["", "a/b", "..", "a?b", "a#b"])
def test_an_unusable_destination_key_is_refused_locally(invoke, stub, ref: str) -> None:
    """--to-key "" was sent as "no destination": re-encrypted under the source key, exit 0."""
    env = {"KEYGRANTS_ADDR": stub.addr, "KEYGRANTS_TOKEN": "t"}
    line = one_line_error(invoke(["re-encrypt", "--to-key", ref], input=CT, env=env))
    assert line == f"Error: invalid key or alias reference {ref!r} (invalid_request)"
    assert json_error(invoke(["re-encrypt", "--to-key", ref, "--json"], input=CT, env=env)) == {
        "code": "invalid_request", "message": f"invalid key or alias reference {ref!r}",
        "request_id": None}
    assert stub.requests == []
    invoke(["re-encrypt", "--to-key", "other"], input=CT, env=env)
    invoke(["re-encrypt"], input=CT, env=env)
    assert [r["body"].get("destination_key") for r in stub.requests] == ["other", None]


@pytest.mark.parametrize(("ref", "sent"), [("a%2Fb", "a%252Fb"), ("100%", "100%25"),
                                           ("a b", "a%20b"), ("k.v_1-x", "k.v_1-x")])
def test_key_references_are_sent_percent_encoded(invoke, stub, ref: str, sent: str) -> None:
    """The server decodes the path once: unencoded, 'a%2Fb' was looked up (and reported) as
    'a/b'."""
    env = {"KEYGRANTS_ADDR": stub.addr, "KEYGRANTS_TOKEN": "t"}
    invoke(["key", "show", ref], env=env)
    invoke(["encrypt", "-k", ref], input="x", env=env)
    invoke(["key", "rotate", ref], env=env)
    assert [r["path"] for r in stub.requests] == [
        f"/v1/keys/{sent}", f"/v1/keys/{sent}/encrypt", f"/v1/keys/{sent}/rotate"]


# -- contexts -----------------------------------------------------------------------------------

CONTEXT_COMMANDS = [
    (["encrypt", "-k", "k"], "data"),
    (["decrypt"], CT),
    (["re-encrypt"], CT),
    (["data-key", "-k", "k"], None),
    (["derive", "-k", "k"], None),
]


@pytest.mark.parametrize(("args", "stdin"), CONTEXT_COMMANDS, ids=lambda a: str(a))
@pytest.mark.parametrize("pairs", [["bad"], ["=value"], ["a=1", "a=2"], ["ok=1", "novalue"]])
def test_bad_context_is_one_line_invalid_request(invoke, args, stdin, pairs: list[str]) -> None:
    context = [arg for pair in pairs for arg in ("--context", pair)]
    line = one_line_error(invoke([*args, *context], input=stdin))
    assert line.endswith("(invalid_request)")
    assert "context" in line


def test_bad_destination_context_is_refused(invoke) -> None:
    line = one_line_error(invoke(["re-encrypt", "--to-context", "x"], input=CT))
    assert line == "Error: context must be KEY=VALUE, got 'x' (invalid_request)"


def test_context_values_may_be_empty_or_contain_equals(invoke) -> None:
    # parsed fine, so the command gets as far as the (closed) server
    result = invoke(["encrypt", "-k", "k", "-c", "a=", "-c", "b=x=y"], input="data")
    assert one_line_error(result).endswith("(server_unreachable)")


@pytest.mark.parametrize(("args", "stdin"), CONTEXT_COMMANDS, ids=lambda a: str(a))
def test_json_errors_go_to_stderr_in_the_api_error_shape(invoke, args, stdin) -> None:
    err = json_error(invoke([*args, "--context", "bad", "--json"], input=stdin))
    assert err["code"] == "invalid_request"
    assert err["message"] == "context must be KEY=VALUE, got 'bad'"
    assert err["request_id"] is None


# -- base64 inputs ------------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "stdin", "what"), [
    (["decrypt"], "not base64!", "ciphertext"),
    (["decrypt"], "QUJ", "ciphertext"),
    (["re-encrypt"], "%%%%", "ciphertext"),
    (["verify", "-k", "k", "--signature", "!!"], "message", "signature"),
    (["verify-mac", "-k", "k", "--mac", "a"], "message", "mac"),
    (["derive", "-k", "k", "--salt", "*"], None, "salt"),
])
def test_invalid_base64_is_one_line_invalid_request(invoke, args, stdin, what: str) -> None:
    line = one_line_error(invoke(args, input=stdin))
    assert line == f"Error: {what} is not valid base64 (invalid_request)"


def test_base64_input_may_be_wrapped_over_lines(invoke) -> None:
    wrapped = "\n".join(CT[i:i + 10] for i in range(0, len(CT), 10)) + "\n"
    assert one_line_error(invoke(["decrypt"], input=wrapped)).endswith("(server_unreachable)")


# -- durations ----------------------------------------------------------------------------------

def usage_error(result) -> str:
    """The usage-error contract: exit 2, nothing on stdout, the option parser's 'Error:' line."""
    assert result.exit_code == 2, (result.output, result.exception)
    assert result.stdout == ""
    assert result.stderr.startswith("Usage: ")
    return result.stderr.splitlines()[-1]


# every option taking a duration, on every command that has it
DURATION_OPTIONS = [
    (["key", "create", "k"], "--rotation-period"),
    (["key", "update", "k"], "--rotation-period"),
    (["principal", "add-key", "p", "--public-key", "-"], "--expires-in"),
    (["principal", "keygen", "p", "--out", "never-written.pem"], "--expires-in"),
    (["principal", "api-key", "p"], "--expires-in"),
    (["principal", "shared-secret", "p"], "--expires-in"),
    (["principal", "add-cert", "p", "--match", "san-dns:x"], "--expires-in"),
    (["grant", "create", "-k", "k", "--grantee", "g", "--ops", "encrypt"], "--ttl"),
    (["grant", "exchange", "t"], "--ttl"),
]


@pytest.mark.parametrize(("args", "option"), DURATION_OPTIONS, ids=lambda a: " ".join(a)
                         if isinstance(a, list) else a)
@pytest.mark.parametrize("text", ["5x", "1d2", "h", "-1h", "1.5h", "1 h", "1h 30m", "d1", "1y",
                                  "", "   "])
def test_malformed_durations_are_usage_errors(invoke, stub, args: list[str], option: str,
                                              text: str) -> None:
    """Checked by the option parser, like any other option value (they were exit 1,
    invalid_request): nothing is sent."""
    result = invoke([*args, option, text], input="x",
                    env={"KEYGRANTS_ADDR": stub.addr, "KEYGRANTS_TOKEN": "t"})
    line = usage_error(result)
    assert line == (f"Error: Invalid value for '{option}': invalid duration "
                    f"{text.strip().lower()!r}; use e.g. 90s, 15m, 12h, 30d, 2w")
    assert "--json" not in line
    assert stub.requests == []


@pytest.mark.parametrize(("args", "option", "text", "bounds"), [
    (["key", "create", "k"], "--rotation-period", "59s", "60 seconds and 10 years, or off"),
    (["key", "create", "k"], "--rotation-period", "1", "60 seconds and 10 years, or off"),
    (["key", "update", "k"], "--rotation-period", "3660d1s", "60 seconds and 10 years, or off"),
    (["key", "update", "k"], "--rotation-period", "523w", "60 seconds and 10 years, or off"),
    (["principal", "api-key", "p"], "--expires-in", "3661d", "1 second and 10 years"),
    (["principal", "add-key", "p", "--public-key", "-"], "--expires-in", "316224001",
     "1 second and 10 years"),
], ids=lambda a: " ".join(a) if isinstance(a, list) else a)
def test_durations_out_of_range_are_usage_errors(invoke, stub, args: list[str], option: str,
                                                 text: str, bounds: str) -> None:
    result = invoke([*args, option, text], input="x",
                    env={"KEYGRANTS_ADDR": stub.addr, "KEYGRANTS_TOKEN": "t"})
    assert usage_error(result) == (f"Error: Invalid value for '{option}': {text} is out of range: "
                                   f"must be between {bounds}")
    assert stub.requests == []


@pytest.mark.parametrize("args", [["grant", "create", "-k", "k", "--grantee", "g", "--ops", "e"],
                                  ["grant", "exchange", "t"]], ids=lambda a: " ".join(a[:2]))
def test_a_zero_grant_ttl_is_a_usage_error(invoke, stub, args: list[str]) -> None:
    for text in ("0", "0s", "0m0s"):
        result = invoke([*args, "--ttl", text],
                        env={"KEYGRANTS_ADDR": stub.addr, "KEYGRANTS_TOKEN": "t"})
        assert usage_error(result) == (f"Error: Invalid value for '--ttl': {text} is out of "
                                       "range: must be at least 1 second")
    assert stub.requests == []


def test_the_duration_bounds_are_the_servers() -> None:
    from keygrants import access, service
    from keygrants.cli import _common

    assert _common.MIN_ROTATION_PERIOD == service.MIN_ROTATION_PERIOD
    assert _common.MAX_ROTATION_PERIOD == service.MAX_ROTATION_PERIOD
    assert _common.MAX_CREDENTIAL_LIFETIME == access._MAX_CREDENTIAL_LIFETIME


@pytest.mark.parametrize(("text", "seconds"), [
    ("90s", 90), ("15m", 900), ("12h", 43200), ("30d", 2592000), ("2w", 1209600),
    ("1d12h", 129600), ("3600", 3600), ("1W", 604800), ("60", 60), ("3660d", 316224000),
    (" 1h ", 3600),
])
def test_good_rotation_periods_are_sent_in_seconds(invoke, stub, text: str, seconds: int) -> None:
    env = {"KEYGRANTS_ADDR": stub.addr, "KEYGRANTS_TOKEN": "t"}
    invoke(["key", "create", "k", "--rotation-period", text], env=env)
    invoke(["key", "update", "k", "--rotation-period", text], env=env)
    assert [r["body"]["rotation_period"] for r in stub.requests] == [seconds, seconds]


@pytest.mark.parametrize("text", ["off", "none", "OFF", "0", "0s"])
def test_rotation_off(invoke, stub, text: str) -> None:
    """create: no schedule (the field left out); update: turned off (0)."""
    env = {"KEYGRANTS_ADDR": stub.addr, "KEYGRANTS_TOKEN": "t"}
    invoke(["key", "create", "k", "--rotation-period", text], env=env)
    invoke(["key", "update", "k", "--rotation-period", text], env=env)
    created, updated = (r["body"] for r in stub.requests)
    assert created.get("rotation_period") is None
    assert updated["rotation_period"] == 0


@pytest.mark.parametrize(("text", "sent"), [("1s", 1), ("90d", 7776000), ("3660d", 316224000),
                                            ("off", None), ("0", None)])
def test_expires_in_is_sent_in_seconds(invoke, stub, text: str, sent: int | None) -> None:
    invoke(["principal", "api-key", "p", "--expires-in", text],
           env={"KEYGRANTS_ADDR": stub.addr, "KEYGRANTS_TOKEN": "t"})
    assert stub.requests[-1]["body"].get("expires_in") == sent


@pytest.mark.parametrize("args", [["grant", "create", "-k", "k", "--grantee", "g", "--ops",
                                   "encrypt"], ["grant", "exchange", "t"]],
                         ids=lambda a: " ".join(a[:2]))
def test_grant_ttl_is_sent_in_seconds(invoke, stub, args: list[str]) -> None:
    invoke([*args, "--ttl", "1h30m"], env={"KEYGRANTS_ADDR": stub.addr, "KEYGRANTS_TOKEN": "t"})
    assert stub.requests[-1]["body"]["ttl"] == 5400


# -- an unreachable server ----------------------------------------------------------------------

OFFLINE_COMMANDS = [
    (["random"], None),
    (["key", "list"], None),
    (["key", "show", "k"], None),
    (["key", "rotate", "k"], None),
    (["key", "alias", "a", "k"], None),
    (["encrypt", "-k", "k", "-c", "a=b"], "plaintext"),
    (["decrypt"], CT),
    (["sign", "-k", "k"], "message"),
    (["public-key", "-k", "k"], None),
]


@pytest.mark.parametrize(("args", "stdin"), OFFLINE_COMMANDS, ids=lambda a: str(a))
def test_unreachable_server_is_exit_1_server_unreachable(invoke, closed_addr, args, stdin) -> None:
    line = one_line_error(invoke(args, input=stdin))
    assert line.endswith("(server_unreachable)")
    assert closed_addr in line
    err = json_error(invoke([*args, "--json"], input=stdin))
    assert err["code"] == "server_unreachable"


def test_addr_option_overrides_the_environment(invoke, closed_addr) -> None:
    result = invoke(["random", "--addr", closed_addr], env={"KEYGRANTS_ADDR": "127.0.0.1:1"})
    assert closed_addr in one_line_error(result)


@pytest.mark.parametrize("command", [["encrypt", "-k", "k"], ["decrypt"], ["sign", "-k", "k"],
                                     ["mac", "-k", "k"]])
def test_a_missing_input_file_is_a_clean_error(invoke, tmp_path: Path, command) -> None:
    result = invoke([*command, "--in", str(tmp_path / "missing.bin")])
    assert isinstance(result.exception, SystemExit)
    assert result.exit_code in (1, 2)
    assert "missing.bin" in result.stderr
    assert "Traceback" not in result.output


def test_input_over_16_mib_is_refused_before_any_request(invoke) -> None:
    limit = 16 * 1024 * 1024
    line = one_line_error(invoke(["encrypt", "-k", "k"], input=b"x" * (limit + 1)))
    assert line == f"Error: input is larger than {limit} bytes (invalid_request)"


# -- where the token comes from, and what is printed (against a stub server) -------------------

RANDOM = (200, {"random": base64.b64encode(b"\x00\x01\xfe\xff").decode()})


def test_token_precedence_option_then_env_then_data_dir(invoke, stub, tmp_path) -> None:
    stub.answers["/v1/random"] = RANDOM
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "admin.token").write_text("from-file\n")
    env = {"KEYGRANTS_ADDR": stub.addr}
    assert invoke(["random", "--data-dir", str(data_dir)], env=env).exit_code == 0
    assert invoke(["random"], env=env | {"KEYGRANTS_DATA_DIR": str(data_dir)}).exit_code == 0
    assert invoke(["random"], env=env | {"KEYGRANTS_DATA_DIR": str(data_dir),
                                         "KEYGRANTS_TOKEN": "from-env"}).exit_code == 0
    assert invoke(["random", "--token", "from-option"],
                  env=env | {"KEYGRANTS_DATA_DIR": str(data_dir), "KEYGRANTS_TOKEN": "from-env"}
                  ).exit_code == 0
    assert invoke(["random"], env=env).exit_code == 0  # no token anywhere: no header at all
    assert stub.tokens == ["Bearer from-file", "Bearer from-file", "Bearer from-env",
                           "Bearer from-option", None]


def test_outputs(invoke, stub) -> None:
    env = {"KEYGRANTS_ADDR": stub.addr}
    stub.answers["/v1/random"] = RANDOM
    stub.answers["/v1/decrypt"] = (200, {"plaintext": base64.b64encode(b"\x00raw\xff").decode(),
                                         "key_id": "id", "key_version": 1})
    result = invoke(["random", "--hex"], env=env)
    assert (result.exit_code, result.stdout) == (0, "0001feff\n")
    result = invoke(["random"], env=env)
    assert result.stdout == "AAH+/w==\n"
    result = invoke(["random", "--json", "--bytes", "4"], env=env)
    assert json.loads(result.stdout) == {"random": "AAH+/w=="}
    assert stub.requests[-1]["body"] == {"bytes": 4}
    result = invoke(["decrypt", "-c", "a=b"], input=CT, env=env)
    assert result.exit_code == 0
    assert result.stdout_bytes == b"\x00raw\xff"
    assert stub.requests[-1]["body"] == {"ciphertext": CT, "context": {"a": "b"}}


def test_an_invalid_signature_exits_1(invoke, stub) -> None:
    stub.answers["/v1/keys/k/verify"] = (200, {"valid": False, "key_id": "id", "key_version": None})
    sig = base64.b64encode(b"sig").decode()
    result = invoke(["verify", "-k", "k", "--signature", sig], input="message",
                    env={"KEYGRANTS_ADDR": stub.addr})
    assert (result.exit_code, result.stdout) == (1, "invalid\n")
    sent = stub.requests[-1]["body"]
    assert (sent["message"], sent["signature"]) == (base64.b64encode(b"message").decode(), sig)


def test_server_errors_keep_their_code_and_request_id(invoke, stub) -> None:
    stub.answers["/v1/keys/k/encrypt"] = (400, {"error": {
        "code": "invalid_ciphertext", "message": "invalid ciphertext", "request_id": "req-1"}})
    env = {"KEYGRANTS_ADDR": stub.addr}
    line = one_line_error(invoke(["encrypt", "-k", "k"], input="x", env=env))
    assert line == "Error: invalid ciphertext (invalid_ciphertext)"
    err = json_error(invoke(["encrypt", "-k", "k", "--json"], input="x", env=env))
    assert err == {"code": "invalid_ciphertext", "message": "invalid ciphertext",
                   "request_id": "req-1"}


def test_policy_test_sends_the_target_the_time_and_the_whole_grant(invoke, stub) -> None:
    # the CLI could not test a principal-scoped action (no target), a time window, or a grant's
    # operations, audiences and grantee: the server takes them all
    env = {"KEYGRANTS_ADDR": stub.addr}
    stub.answers["/v1/policy-test"] = (200, {"allowed": False, "reasons": [], "errors": [],
                                             "explanation": "denied: no policy permits this"})
    result = invoke(["policy", "test", "-p", "hd1", "-a", "manage_credentials", "-t", "svc-a",
                     "--at", "2026-12-07T10:00:00Z"], env=env)
    assert (result.exit_code, result.stdout) == (3, "denied: no policy permits this\n")
    sent = stub.requests[-1]["body"]
    assert (sent["target"], sent["time"], sent.get("grant")) == ("svc-a", 1_796_637_600, None)
    result = invoke(["policy", "test", "-p", "lead", "-a", "create_grant", "-k", "payments-eu",
                     "--grant-ops", "decrypt, encrypt", "--grant-audience", "svc-ledger",
                     "--grant-grantee", "svc-ledger", "--grant-pop", "--at", "1796637600"],
                    env=env)
    assert result.exit_code == 3
    sent = stub.requests[-1]["body"]
    assert sent["time"] == 1_796_637_600
    assert sent["grant"] == {"ttl": 300, "uses": 0, "pop": True, "operations": ["decrypt", "encrypt"],
                             "audiences": ["svc-ledger"], "grantee": "svc-ledger"}
    for bad in ("yesterday", "2026-12-07T10:00:00"):  # no offset: which zone?
        result = invoke(["policy", "test", "-p", "a", "-a", "encrypt", "--at", bad], env=env)
        assert result.exit_code == 2 and "--at" in result.output, result.output
