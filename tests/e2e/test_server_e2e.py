"""End to end: a real server process, driven by the CLI as separate processes."""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import stat
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.e2e

PASSPHRASE = "correct horse battery staple"


def ok(result) -> bytes:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result.stdout


def json_failure(result) -> dict[str, object]:
    """exit 1 and the API's JSON error shape on stderr (for --json commands)."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stdout == b""
    body = json.loads(result.stderr)
    assert list(body) == ["error"]
    assert set(body["error"]) == {"code", "message", "request_id"}
    return body["error"]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def tamper(ciphertext_b64: bytes) -> bytes:
    raw = bytearray(base64.b64decode(ciphertext_b64))
    raw[-1] ^= 0x01
    return base64.b64encode(bytes(raw))


def test_lifecycle_across_a_restart(start_server, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    server = start_server(data_dir)
    assert "Admin token written to" in server.stdout()

    key = json.loads(ok(server.cli("key", "create", "payments", "--json")))
    plaintext = b"card 4111 1111 1111 1111\n"
    ct1 = ok(server.cli("encrypt", "-k", "payments", "--context", "tenant=acme",
                        input=plaintext)).strip()
    assert ok(server.cli("decrypt", "--context", "tenant=acme", input=ct1)) == plaintext
    err = json_failure(server.cli("decrypt", "--context", "tenant=other", "--json", input=ct1))
    assert (err["code"], err["message"]) == ("invalid_ciphertext", "invalid ciphertext")

    assert ok(server.cli("key", "rotate", "payments")).decode().strip() == (
        "payments: now at version 2")
    ct2 = ok(server.cli("encrypt", "-k", "payments", "-c", "tenant=acme", input=b"v2")).strip()
    old = json.loads(ok(server.cli("decrypt", "-c", "tenant=acme", "--json", input=ct1)))
    assert (base64.b64decode(old["plaintext"]), old["key_version"]) == (plaintext, 1)
    token = (data_dir / "admin.token").read_text()

    assert server.stop(signal.SIGTERM) == 0
    assert "keygrants stopped" in server.stdout()

    again = start_server(data_dir)
    assert "Admin token written to" not in again.stdout()
    assert "Initialized a new data directory" not in again.stdout()
    assert (data_dir / "admin.token").read_text() == token
    shown = json.loads(ok(again.cli("key", "show", "payments", "--json")))
    assert (shown["id"], shown["latest_version"]) == (key["id"], 2)
    assert ok(again.cli("decrypt", "-c", "tenant=acme", input=ct1)) == plaintext
    assert ok(again.cli("decrypt", "-c", "tenant=acme", input=ct2)) == b"v2"

    err = json_failure(again.cli("decrypt", "-c", "tenant=acme", "--json", input=tamper(ct1)))
    assert err["code"] == "invalid_ciphertext"
    assert err["request_id"]
    plain = again.cli("decrypt", "-c", "tenant=acme", input=tamper(ct2))
    assert plain.returncode == 1
    assert plain.stderr.decode().strip() == "Error: invalid ciphertext (invalid_ciphertext)"
    assert again.stop(signal.SIGINT) == 0
    assert "keygrants stopped" in again.stdout()


def test_data_dir_permissions(start_server, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o755)
    os.chmod(data_dir, 0o755)  # a too-open directory is tightened at start
    server = start_server(data_dir)
    assert mode(data_dir) == 0o700
    assert mode(data_dir / "admin.token") == 0o600
    assert mode(data_dir / "keygrants.db") == 0o600
    assert mode(data_dir / "seal.key") == 0o600
    token = (data_dir / "admin.token").read_text().strip()
    assert token.startswith("kg_admin_")
    assert ok(server.cli("random", "--token", token, "--bytes", "8"))


def test_no_plaintext_key_material_in_the_database(start_server, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    server = start_server(data_dir)
    ok(server.cli("key", "create", "vault"))
    ok(server.cli("key", "create", "tags", "--spec", "hmac-sha256", "--derivable"))
    marker = b"PLAINTEXT-MARKER-" + secrets.token_hex(16).encode()
    ct = ok(server.cli("encrypt", "-k", "vault", input=marker)).strip()
    assert ok(server.cli("decrypt", input=ct)) == marker
    data_keys = []
    for size in ("16", "32", "64"):
        result = json.loads(ok(server.cli("data-key", "-k", "vault", "--bytes", size, "--json")))
        data_keys.append(base64.b64decode(result["plaintext"]))
        assert ok(server.cli("decrypt", input=result["ciphertext"].encode())) == data_keys[-1]
    derived = base64.b64decode(ok(server.cli("derive", "-k", "tags", "-c", "u=1")).strip())
    secrets_to_find = {
        "plaintext": marker,
        "plaintext base64": base64.b64encode(marker),
        "derived": derived,
        "admin token": (data_dir / "admin.token").read_text().strip().encode(),
        "seal key": (data_dir / "seal.key").read_bytes(),
    }
    for i, dk in enumerate(data_keys):
        secrets_to_find[f"data key {i}"] = dk
        secrets_to_find[f"data key {i} base64"] = base64.b64encode(dk)
        secrets_to_find[f"data key {i} hex"] = dk.hex().encode()

    def assert_absent() -> None:
        files = sorted(data_dir.glob("keygrants.db*"))
        assert data_dir / "keygrants.db" in files
        for path in files:
            content = path.read_bytes()
            for what, secret in secrets_to_find.items():
                assert secret not in content, f"{what} found in {path.name}"

    assert_absent()  # while running: the WAL holds the recent writes
    assert server.stop() == 0
    assert_absent()  # after the checkpoint on close


def test_passphrase_sealed_data_dir(start_server, tmp_path: Path) -> None:
    data_dir = tmp_path / "sealed"
    server = start_server(data_dir, env={"KEYGRANTS_PASSPHRASE": PASSPHRASE})
    assert not (data_dir / "seal.key").exists()
    key_id = json.loads(ok(server.cli("key", "create", "k", "--json")))["id"]
    ct = ok(server.cli("encrypt", "-k", "k", input=b"sealed by passphrase")).strip()
    assert server.stop() == 0

    again = start_server(data_dir, env={"KEYGRANTS_PASSPHRASE": PASSPHRASE})
    assert json.loads(ok(again.cli("key", "show", "k", "--json")))["id"] == key_id
    assert ok(again.cli("decrypt", input=ct)) == b"sealed by passphrase"
    assert again.stop() == 0

    for env in ({"KEYGRANTS_PASSPHRASE": "a wrong passphrase!"},
                {"KEYGRANTS_PASSPHRASE": "short"},
                {}):
        refused = start_server(data_dir, env=env, ready=False)
        status = refused.wait_exit()
        assert status != 0, refused.output()
        assert "passphrase" in refused.output().lower(), refused.output()
        assert "Traceback" not in refused.output()

    last = start_server(data_dir, env={"KEYGRANTS_PASSPHRASE": PASSPHRASE})
    assert ok(last.cli("decrypt", input=ct)) == b"sealed by passphrase"


def test_a_refused_start_leaves_a_passphrase_sealed_dir_unchanged(start_server,
                                                                  tmp_path: Path) -> None:
    data_dir = tmp_path / "sealed"
    server = start_server(data_dir, env={"KEYGRANTS_PASSPHRASE": PASSPHRASE})
    assert server.stop() == 0
    before = sorted(p.name for p in data_dir.iterdir())
    refused = start_server(data_dir, ready=False)
    assert refused.wait_exit() != 0
    assert "passphrase" in refused.output()
    assert sorted(p.name for p in data_dir.iterdir()) == before  # no seal.key appeared


def test_access_log_has_a_line_per_request_and_no_credentials(start_server,
                                                              tmp_path: Path) -> None:
    """``--access-log`` logged nothing: uvicorn's access logger was left at the server's
    ``warning`` level, which drops its INFO lines."""
    data = tmp_path / "data"
    server = start_server(data, args=("--access-log",))
    token = (data / "admin.token").read_text().strip()
    assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200
    r = httpx.post(f"{server.url}/v1/keys", json={"name": "logged"}, timeout=10,
                   headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 201
    assert server.stop() == 0
    out = server.output()
    assert '"GET /healthz HTTP/1.1" 200' in out and '"POST /v1/keys HTTP/1.1" 201' in out, out
    assert token not in out
    quiet = start_server(tmp_path / "quiet")
    assert httpx.get(f"{quiet.url}/healthz", timeout=10).status_code == 200
    assert quiet.stop() == 0
    assert "/healthz" not in quiet.output()  # off by default


def test_a_reset_admin_token_is_in_the_audit_log(start_server, tmp_path: Path) -> None:
    """``--reset-admin-token`` replaced the most powerful credential without a trace."""
    data = tmp_path / "data"
    first = start_server(data)
    assert first.stop() == 0
    second = start_server(data, args=("--reset-admin-token",))
    token = (data / "admin.token").read_text().strip()
    r = httpx.get(f"{second.url}/v1/audit/events", params={"type": "server.start"},
                  headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert r.status_code == 200, r.text
    starts = [e["detail"] for e in r.json()["events"]]
    assert [d.get("admin_token") for d in starts] == [None, "reset"], starts
    assert token not in r.text
    assert second.stop() == 0


def test_an_exposed_admin_token_is_warned_about(start_server, tmp_path: Path) -> None:
    """seal.key that others may read is refused; admin.token, as powerful, was accepted
    without a word (the data directory is tightened at every start)."""
    data_dir = tmp_path / "data"
    first = start_server(data_dir)
    assert first.stop() == 0
    assert "Warning" not in first.output()
    os.chmod(data_dir, 0o755)
    os.chmod(data_dir / "admin.token", 0o644)
    second = start_server(data_dir)
    assert second.stop() == 0
    out = second.stdout()
    token = data_dir.resolve() / "admin.token"
    assert (f"Warning: {token} is accessible by group or others (mode 644); run: chmod 600 "
            f"{token}") in out, out
    assert mode(data_dir) == 0o700
