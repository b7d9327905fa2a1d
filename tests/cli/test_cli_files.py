"""Files, stores and references the CLI is given that do not work out: one ``Error: …`` line and
exit status 1, never a traceback, and nothing half-made."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest
from click.testing import Result

from keygrants.client import Client
from keygrants.crypto.signing import SigningKey
from keygrants.errors import InvalidRequest

KEY_ID = "2af59eba-048a-45a2-8873-976fe0c14ef4"
KEY_INFO = {
    "id": KEY_ID, "name": "payments", "spec": "aes-256-gcm", "purpose": "encrypt-decrypt",
    "description": "", "state": "enabled", "derivable": False,
    "created_at": "2026-12-07T00:01:22Z", "updated_at": "2026-12-07T00:01:22Z",
    "latest_version": 1, "min_decryption_version": 1, "rotation_period": None,
    "next_rotation_at": None, "deletion_date": None, "tags": [], "aliases": [],
}
NO_EVENTS = (200, {"events": [], "next": None})


def one_line_error(result: Result) -> str:
    assert result.exit_code == 1, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception  # not a traceback
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


# -- files ------------------------------------------------------------------------------------

def test_a_missing_key_file_is_one_line(invoke, stub) -> None:
    env = {"KEYGRANTS_ADDR": stub.addr, "KEYGRANTS_PRINCIPAL": "svc-billing",
           "KEYGRANTS_KEY_FILE": "nofile.pem"}
    line = one_line_error(invoke(["whoami"], env=env))
    assert line == ("Error: cannot read the key file nofile.pem: No such file or directory "
                    "(invalid_request)")
    assert stub.requests == []


def test_the_sdk_names_an_unreadable_key_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    with pytest.raises(InvalidRequest) as info:
        Client("http://127.0.0.1:1", principal="svc", key_file=str(missing))
    assert info.value.message == f"cannot read the key file {missing}: No such file or directory"


def test_keygen_into_a_missing_directory_registers_nothing(invoke, stub, tmp_path: Path) -> None:
    out = tmp_path / "nonexistent" / "k.pem"
    line = one_line_error(invoke(["principal", "keygen", "svc-billing", "--out", str(out)],
                                 env={"KEYGRANTS_ADDR": stub.addr}))
    assert line == f"Error: cannot write {out}: No such file or directory (invalid_request)"
    assert stub.requests == []  # the key was never registered
    assert not out.parent.exists()


def test_a_shared_secret_into_a_missing_directory_is_refused_first(invoke, stub,
                                                                   tmp_path: Path) -> None:
    out = tmp_path / "nonexistent" / "ss"
    line = one_line_error(invoke(["principal", "shared-secret", "svc", "--out", str(out)],
                                 env={"KEYGRANTS_ADDR": stub.addr}))
    assert line == (f"Error: cannot write {out}: no directory {out.parent} (invalid_request)")
    assert stub.requests == []  # no secret made that could never be shown


def test_audit_export_into_a_missing_directory(invoke, stub, tmp_path: Path) -> None:
    out = tmp_path / "nonexistent" / "a.jsonl"
    line = one_line_error(invoke(["audit", "export", "--out", str(out)],
                                 env={"KEYGRANTS_ADDR": stub.addr}))
    assert line == f"Error: cannot write {out}: No such file or directory (invalid_request)"
    result = invoke(["audit", "export", "--out", str(out), "--json"],
                    env={"KEYGRANTS_ADDR": stub.addr})
    assert json.loads(result.stderr)["error"]["code"] == "invalid_request"


def test_keygen_still_writes_its_key(invoke, stub, tmp_path: Path) -> None:
    stub.answers["/v1/principals/svc/keys"] = (201, {
        "id": "c1", "principal": "svc", "kind": "public_key", "label": "",
        "not_before": "2026-12-07T00:01:22Z", "created_at": "2026-12-07T00:01:22Z"})
    out = tmp_path / "k.pem"
    result = invoke(["principal", "keygen", "svc", "--out", str(out)],
                    env={"KEYGRANTS_ADDR": stub.addr})
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "k.pem.new").exists()
    assert SigningKey.from_pem(out.read_bytes()).algorithm == "ed25519"


# -- audit search --key -----------------------------------------------------------------------

def test_audit_search_resolves_a_key_name(invoke, stub) -> None:
    stub.answers["/v1/keys/payments"] = (200, KEY_INFO)
    stub.answers["/v1/audit/events"] = NO_EVENTS
    assert invoke(["audit", "search", "--key", "payments"],
                  env={"KEYGRANTS_ADDR": stub.addr}).exit_code == 0
    assert [r["path"] for r in stub.requests] == ["/v1/keys/payments", "/v1/audit/events"]
    assert stub.requests[-1]["query"]["key"] == KEY_ID


def test_audit_search_takes_a_key_id_as_given(invoke, stub) -> None:
    stub.answers["/v1/audit/events"] = NO_EVENTS
    assert invoke(["audit", "search", "--key", KEY_ID.upper()],
                  env={"KEYGRANTS_ADDR": stub.addr}).exit_code == 0
    assert [r["path"] for r in stub.requests] == ["/v1/audit/events"]  # no lookup: a deleted
    assert stub.requests[-1]["query"]["key"] == KEY_ID                  # key's id works too


def test_audit_search_refuses_an_unknown_key_name(invoke, stub) -> None:
    stub.answers["/v1/keys/nope"] = (404, {"error": {
        "code": "key_not_found", "message": "key not found", "request_id": "r"}})
    line = one_line_error(invoke(["audit", "search", "--key", "nope"],
                                 env={"KEYGRANTS_ADDR": stub.addr}))
    assert line.startswith("Error: --key: no key named 'nope'")
    assert [r["path"] for r in stub.requests] == ["/v1/keys/nope"]


# -- audit verify --store ---------------------------------------------------------------------

@pytest.mark.parametrize("vkey", [None, "pinned"], ids=["stored-vkey", "pinned-vkey"])
def test_audit_verify_names_an_unreachable_database(invoke, closed_addr, vkey) -> None:
    host_port = closed_addr.removeprefix("http://")
    url = f"postgresql://postgres:secretpw@{host_port}/keygrants"
    args = ["audit", "verify", "--store", url] + (["--vkey", vkey] if vkey else [])
    line = one_line_error(invoke(args))
    assert line.startswith(f"Error: cannot reach the database at {host_port}: ")
    assert "refused" in line.lower() and line.endswith("(store_unavailable)")
    assert "secretpw" not in line


def test_audit_verify_names_a_missing_database(invoke, postgres_url) -> None:
    name = f"kg_missing_{secrets.token_hex(6)}"
    url = postgres_url.replace("postgres@", "postgres:secretpw@").rsplit("/", 1)[0] + "/" + name
    line = one_line_error(invoke(["audit", "verify", "--store", url]))
    assert line.startswith("Error: cannot reach the database at 127.0.0.1:5432: ")
    assert f'database "{name}" does not exist' in line and "secretpw" not in line


# -- server start -----------------------------------------------------------------------------

def test_a_short_passphrase_leaves_no_database_behind(invoke, closed_addr, tmp_path: Path) -> None:
    data_dir = tmp_path / "d3"
    result = invoke(["server", "--data-dir", str(data_dir), "--listen",
                     closed_addr.removeprefix("http://")],
                    env={"KEYGRANTS_PASSPHRASE": "short"})
    line = one_line_error(result)
    assert line == "Error: the passphrase must be at least 12 characters (seal_error)"
    # the (new) directory may stay, with nothing in it but the lock file of the refused start
    assert [p.name for p in data_dir.iterdir()] in ([], [".lock"])
