"""``keygrants seal-keygen`` / ``seal`` / ``unseal``: offline, PEM key files, one-line errors."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import Result
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519

from keygrants.crypto.hpke import HpkePrivateKey
from keygrants.sealed import open_sealed

Invoke = Callable[..., Result]


@pytest.fixture
def keys(tmp_path: Path, invoke: Invoke) -> Path:
    """A recipient pair ``svc``/``svc.pub`` and a sender pair ``alice``/``alice.pub``."""
    assert invoke(["seal-keygen", str(tmp_path / "svc")]).exit_code == 0
    assert invoke(["seal-keygen", "--type", "ed25519", str(tmp_path / "alice")]).exit_code == 0
    return tmp_path


def _one_line_error(result: Result, needle: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and needle in lines[0], result.stderr


def test_keygen_writes_a_private_0600_and_a_public_pem(tmp_path: Path, invoke: Invoke) -> None:
    result = invoke(["seal-keygen", "--json", str(tmp_path / "svc")])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    priv, pub = tmp_path / "svc", tmp_path / "svc.pub"
    assert info["private_key_file"] == str(priv) and info["public_key_file"] == str(pub)
    assert priv.stat().st_mode & 0o777 == 0o600
    key = HpkePrivateKey.from_pem(priv.read_bytes())
    assert base64.b64decode(info["public_key"]) == key.public_key().raw()
    assert pub.read_text() == key.public_key().pem()
    assert priv.read_text() not in result.stdout
    again = invoke(["seal-keygen", str(priv)])
    _one_line_error(again, "refusing to overwrite")
    assert HpkePrivateKey.from_pem(priv.read_bytes()).public_key() == key.public_key()
    assert invoke(["seal-keygen", "--force", str(priv)]).exit_code == 0
    assert HpkePrivateKey.from_pem(priv.read_bytes()).public_key() != key.public_key()


def test_seal_unseal_round_trip(keys: Path, invoke: Invoke) -> None:
    sealed = invoke(["seal", "--to", str(keys / "svc.pub"), "-c", "env=prod"], input=b"s3cret\x00")
    assert sealed.exit_code == 0, sealed.output
    assert base64.b64decode(sealed.stdout.strip())[:2] == b"\x01\x00"
    opened = invoke(["unseal", "--key", str(keys / "svc"), "-c", "env=prod"], input=sealed.stdout)
    assert opened.exit_code == 0, opened.output
    assert opened.stdout_bytes == b"s3cret\x00"
    # The library opens what the CLI sealed.
    key = HpkePrivateKey.from_pem((keys / "svc").read_bytes())
    assert open_sealed(base64.b64decode(sealed.stdout), key, context={"env": "prod"}) == b"s3cret\x00"


def test_signed_round_trip_and_json(keys: Path, invoke: Invoke, tmp_path: Path) -> None:
    (tmp_path / "payload").write_bytes(b"token")
    sealed = invoke(["seal", "--json", "--to", str(keys / "svc.pub"), "--sign-with",
                     str(keys / "alice"), "--in", str(tmp_path / "payload")])
    assert sealed.exit_code == 0, sealed.output
    out = json.loads(sealed.stdout)
    assert out["sender"] is not None
    (tmp_path / "sealed.b64").write_text(out["sealed"] + "\n")
    opened = invoke(["unseal", "--json", "--key", str(keys / "svc"), "--from",
                     str(keys / "alice.pub"), "--in", str(tmp_path / "sealed.b64")])
    assert opened.exit_code == 0, opened.output
    body = json.loads(opened.stdout)
    assert base64.b64decode(body["payload"]) == b"token" and body["sender"] == out["sender"]


def test_unseal_failures_are_one_line(keys: Path, invoke: Invoke) -> None:
    signed = invoke(["seal", "--to", str(keys / "svc.pub"), "--sign-with", str(keys / "alice"),
                     "-c", "a=1"], input=b"x").stdout
    anonymous = invoke(["seal", "--to", str(keys / "svc.pub")], input=b"x").stdout
    key = str(keys / "svc")
    _one_line_error(invoke(["unseal", "--key", key, "-c", "a=1"], input=signed), "pass --from")
    _one_line_error(invoke(["unseal", "--key", key, "--from", str(keys / "alice.pub")],
                           input=anonymous), "not signed")
    _one_line_error(invoke(["unseal", "--key", key, "--from", str(keys / "alice.pub"),
                            "-c", "a=2"], input=signed), "invalid sealed secret")
    _one_line_error(invoke(["unseal", "--key", key], input="not base64!"), "base64")
    as_json = invoke(["unseal", "--json", "--key", key], input=anonymous[:-8] + "AAAAAAA=")
    assert as_json.exit_code == 1
    assert json.loads(as_json.stderr)["error"]["code"] == "invalid_ciphertext"


def test_key_file_errors(keys: Path, invoke: Invoke, tmp_path: Path) -> None:
    _one_line_error(invoke(["seal", "--to", str(keys / "alice.pub")], input=b"x"),
                    "not an X25519 public key")
    _one_line_error(invoke(["seal", "--to", str(tmp_path / "missing.pub")], input=b"x"),
                    "cannot read")
    _one_line_error(invoke(["seal", "--to", str(keys / "svc.pub"), "--sign-with",
                            str(keys / "svc")], input=b"x"), "not an unencrypted Ed25519")
    os.chmod(keys / "svc", 0o644)
    _one_line_error(invoke(["unseal", "--key", str(keys / "svc")], input="AQA="), "chmod 600")
    _one_line_error(invoke(["seal", "--to", str(keys / "svc.pub"), "-c", "novalue"], input=b"x"),
                    "KEY=VALUE")
    big = invoke(["seal", "--to", str(keys / "svc.pub")], input=b"x" * (1024 * 1024 + 1))
    _one_line_error(big, "at most")


def test_a_public_key_given_as_a_private_one_is_named_before_its_mode(keys: Path,
                                                                      invoke: Invoke) -> None:
    """Public keys are written 0644: saying chmod 600 first sent the user on a detour."""
    for option, public in (("--key", keys / "svc.pub"), ("--sign-with", keys / "alice.pub")):
        assert public.stat().st_mode & 0o777 == 0o644
        args = (["unseal", "--key", str(public)] if option == "--key" else
                ["seal", "--to", str(keys / "svc.pub"), "--sign-with", str(public)])
        result = invoke(args, input=b"AQA=")
        assert result.exit_code == 1 and result.stderr == (
            f"Error: key file {public} ({option}) is a public key; give the private key "
            "(invalid_request)\n")


def test_sign_with_an_exposed_key_says_chmod(keys: Path, invoke: Invoke) -> None:
    os.chmod(keys / "alice", 0o640)
    _one_line_error(invoke(["seal", "--to", str(keys / "svc.pub"), "--sign-with",
                            str(keys / "alice")], input=b"x"), "chmod 600")


def test_standard_pem_keys_interoperate(tmp_path: Path, invoke: Invoke) -> None:
    """Keys written as OpenSSL writes them (PKCS#8 / SPKI PEM) work in both directions."""
    rk, sk = x25519.X25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()

    def write(path: Path, data: bytes, mode: int) -> str:
        path.write_bytes(data)
        path.chmod(mode)
        return str(path)

    pkcs8 = (serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
             serialization.NoEncryption())
    spki = (serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    r_priv = write(tmp_path / "r.pem", rk.private_bytes(*pkcs8), 0o600)
    r_pub = write(tmp_path / "r.pub", rk.public_key().public_bytes(*spki), 0o644)
    s_priv = write(tmp_path / "s.pem", sk.private_bytes(*pkcs8), 0o600)
    s_pub = write(tmp_path / "s.pub", sk.public_key().public_bytes(*spki), 0o644)
    sealed = invoke(["seal", "--to", r_pub, "--sign-with", s_priv], input=b"interop")
    assert sealed.exit_code == 0, sealed.output
    opened = invoke(["unseal", "--key", r_priv, "--from", s_pub], input=sealed.stdout)
    assert opened.exit_code == 0 and opened.stdout_bytes == b"interop"
