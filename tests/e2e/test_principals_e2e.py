"""End to end: principals, signed requests from the CLI, API keys, policies and mTLS against a
real server process."""

from __future__ import annotations

import ipaddress
import json
import stat
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from tests.certs import certificate

from keygrants.client import Client
from keygrants.errors import KeygrantsError

pytestmark = pytest.mark.e2e

POLICY = '''permit(principal in Keygrants::Group::"payments",
       action in [Keygrants::Action::"encrypt", Keygrants::Action::"decrypt"],
       resource) when { resource.name == "payments" &&
                        context.encryption_context.contains("tenant=42") };'''


def ok(result) -> bytes:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result.stdout


def error_code(result) -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    return str(json.loads(result.stderr)["error"]["code"])


def test_a_principal_signs_cli_requests_with_its_own_key(start_server, tmp_path: Path) -> None:
    server = start_server(tmp_path / "data")
    ok(server.cli("key", "create", "payments"))
    ok(server.cli("key", "create", "other"))
    ok(server.cli("principal", "create", "svc-billing", "--tag", "payments"))
    key_file = tmp_path / "svc.pem"
    ok(server.cli("principal", "keygen", "svc-billing", "--out", str(key_file)))
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    ok(server.cli("policy", "set", "billing", "--text", POLICY))

    signer = {"KEYGRANTS_PRINCIPAL": "svc-billing", "KEYGRANTS_KEY_FILE": str(key_file),
              "KEYGRANTS_DATA_DIR": str(tmp_path / "nowhere")}  # no admin token to fall back on
    me = json.loads(ok(server.cli("whoami", "--json", env=signer)))
    assert (me["principal"], me["auth_method"]) == ("svc-billing", "signature")
    ct = ok(server.cli("encrypt", "-k", "payments", "-c", "tenant=42", input=b"secret", env=signer))
    assert ok(server.cli("decrypt", "-c", "tenant=42", input=ct, env=signer)) == b"secret"
    assert error_code(server.cli("encrypt", "-k", "payments", "-c", "tenant=7", "--json",
                                 input=b"x", env=signer)) == "forbidden"
    assert error_code(server.cli("encrypt", "-k", "other", "-c", "tenant=42", "--json",
                                 input=b"x", env=signer)) == "forbidden"
    assert error_code(server.cli("principal", "create", "mallory", "--json",
                                 env=signer)) == "forbidden"

    # policy test explains, and its exit status says allowed (0) or denied (3)
    allowed = server.cli("policy", "test", "-p", "svc-billing", "-a", "encrypt", "-k", "payments",
                         "-c", "tenant=42")
    assert allowed.returncode == 0 and b"billing#1" in allowed.stdout
    assert server.cli("policy", "test", "-p", "svc-billing", "-a", "encrypt", "-k", "payments"
                      ).returncode == 3

    # an API key works as a bearer token until revoked
    created = json.loads(ok(server.cli("principal", "api-key", "svc-billing", "--json")))
    bearer = {"KEYGRANTS_TOKEN": created["api_key"]}
    assert json.loads(ok(server.cli("whoami", "--json", env=bearer)))["auth_method"] == "api_key"
    ok(server.cli("principal", "revoke", "svc-billing", created["credential"]["id"]))
    assert error_code(server.cli("whoami", "--json", env=bearer)) == "credential_revoked"

    # a shared secret in a key file signs with hmac-sha256
    secret_file = tmp_path / "svc.secret"
    ok(server.cli("principal", "shared-secret", "svc-billing", "--out", str(secret_file)))
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    hmac_signer = dict(signer, KEYGRANTS_KEY_FILE=str(secret_file))
    me = json.loads(ok(server.cli("whoami", "--json", env=hmac_signer)))
    assert (me["auth_method"], me["credential"].startswith("ss_")) == ("signature", True)

    shown = json.loads(ok(server.cli("principal", "show", "svc-billing", "--json")))
    assert sorted(c["state"] for c in shown["credentials"]) == ["active", "active", "revoked"]
    ok(server.cli("principal", "disable", "svc-billing"))
    assert error_code(server.cli("whoami", "--json", env=signer)) == "principal_disabled"

    # everything survives a restart (principals, keys, policies in the store)
    assert server.stop() == 0
    server = start_server(tmp_path / "data")
    ok(server.cli("principal", "enable", "svc-billing"))
    assert ok(server.cli("decrypt", "-c", "tenant=42", input=ct, env=signer)) == b"secret"
    listed = json.loads(ok(server.cli("principal", "list", "--json")))
    assert [p["id"] for p in listed["principals"]] == ["admin", "svc-billing"]
    shown = json.loads(ok(server.cli("principal", "show", "svc-billing", "--json")))
    assert shown["last_seen_at"] is not None  # usage was flushed at the earlier stop


def test_the_replay_cache_size_is_an_option(start_server, tmp_path: Path) -> None:
    """``--replay-cache-size`` bounds the signature replay cache: one principal may hold a
    quarter of it, and the next signature within its window is refused (never a nonce
    forgotten); another principal is not affected."""
    server = start_server(tmp_path / "data", args=("--replay-cache-size", "1000"))
    keys = {}
    for name in ("svc-a", "svc-b"):
        ok(server.cli("principal", "create", name))
        keys[name] = tmp_path / f"{name}.pem"
        ok(server.cli("principal", "keygen", name, "--out", str(keys[name])))
    with Client(server.url, principal="svc-a", key_file=str(keys["svc-a"])) as a:
        for _ in range(250):
            assert a.whoami().principal == "svc-a"
        with pytest.raises(KeygrantsError) as refused:
            a.whoami()
        assert refused.value.code == "nonce_replayed"
        assert "in flight" in refused.value.message
    with Client(server.url, principal="svc-b", key_file=str(keys["svc-b"])) as b:
        assert b.whoami().principal == "svc-b"
    bad = start_server(tmp_path / "other", args=("--replay-cache-size", "10"), ready=False)
    assert bad.wait_exit() == 2 and "--replay-cache-size" in bad.output()


# -- mTLS -------------------------------------------------------------------------------------

def _write(path: Path, cert: x509.Certificate, key) -> tuple[str, str]:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return str(path.with_suffix(".crt")), str(path.with_suffix(".key"))


def test_mtls_client_certificates_map_to_principals(start_server, tmp_path: Path) -> None:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = certificate("test-ca", ca_key, "test-ca", ca_key, ca=True)
    ca_file, _ = _write(tmp_path / "ca", ca, ca_key)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert, server_key_file = _write(tmp_path / "server", certificate(
        "127.0.0.1", ca_key, "test-ca", server_key,
        san=x509.IPAddress(ipaddress.ip_address("127.0.0.1"))), server_key)
    svc_key = ec.generate_private_key(ec.SECP256R1())
    svc = _write(tmp_path / "svc", certificate("svc", ca_key, "test-ca", svc_key,
                                         san=x509.DNSName("svc.internal")), svc_key)
    stranger_key = ec.generate_private_key(ec.SECP256R1())
    stranger = _write(tmp_path / "stranger", certificate("stranger", ca_key, "test-ca", stranger_key,
                                                   san=x509.DNSName("stranger.internal")),
                      stranger_key)
    rogue_ca_key = ec.generate_private_key(ec.SECP256R1())
    rogue_key = ec.generate_private_key(ec.SECP256R1())
    rogue = _write(tmp_path / "rogue", certificate("svc", rogue_ca_key, "rogue-ca", rogue_key,
                                             san=x509.DNSName("svc.internal")), rogue_key)

    data = tmp_path / "data"
    server = start_server(data, args=("--tls-cert", server_cert, "--tls-key", server_key_file,
                                      "--client-ca", ca_file), verify=ca_file)
    token = (data / "admin.token").read_text().strip()
    with Client(server.url, token=token, verify=ca_file) as admin:
        admin.create_principal("svc")
        admin.add_certificate("svc", match="san-dns:svc.internal")

    with Client(server.url, token="", cert=svc, verify=ca_file) as c:
        me = c.whoami()
        assert (me.principal, me.auth_method) == ("svc", "mtls")
    for cert, code in ((None, "unauthenticated"), (stranger, "unknown_key")):
        r = httpx.get(f"{server.url}/v1/whoami", verify=_context(ca_file, cert))
        assert (r.status_code, r.json()["error"]["code"]) == (401, code)
    with pytest.raises(httpx.TransportError):  # a certificate from another CA fails the handshake
        httpx.get(f"{server.url}/v1/whoami", verify=_context(ca_file, rogue))


def _context(ca_file: str, cert: tuple[str, str] | None):
    import ssl

    context = ssl.create_default_context(cafile=ca_file)
    if cert is not None:
        context.load_cert_chain(*cert)
    return context
