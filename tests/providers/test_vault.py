"""``vault:`` specifics against a real OpenBao dev server with TLS: auth (token, AppRole),
namespaces, mounts, TLS verification, the Transit mechanism that binds the context."""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING

import hvac
import pytest

from keygrants.errors import KeyNotFoundError, KMSError, ProviderConnectionError, UnsupportedOperation
from keygrants.keys.context import canonical_context
from keygrants.providers import open_provider
from keygrants.providers.vault import VaultTransitProvider

if TYPE_CHECKING:
    from conftest import OpenBao

pytestmark = pytest.mark.anyio

TOKEN = "kg-root-token-7c0a4e"


@pytest.fixture(autouse=True)
def _no_vault_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("VAULT_TOKEN", "BAO_TOKEN", "VAULT_ROLE_ID", "VAULT_SECRET_ID", "VAULT_CACERT"):
        monkeypatch.delenv(var, raising=False)


def uri(bao: OpenBao, key: str = "enc", **query: str) -> str:
    q = "&".join(f"{k}={v}" for k, v in {"ca": bao.ca, **query}.items())
    return f"vault://127.0.0.1:{bao.port}/{key}?{q}"


@pytest.mark.parametrize(("text", "message"), [
    ("vault://h:8200/k?token=s.abc", "must not appear in the URI"),
    ("vault://h:8200/k?secret_id=abc", "must not appear in the URI"),
    ("vault://h:8200/k?tls=maybe", "true or false"),
    ("vault://h:8200/k?mount=../sys", "invalid mount"),
    ("vault://h:8200/bad%2Fname", "invalid Transit key name"),
    ("vault://h:8200/k?auth=ldap", "auth must be"),
    ("vault://h:8200/k?auth=approle&role_id=r", "AppRole needs"),
    ("vault://h:8200/k", "no token"),
])
def test_bad_configuration_fails_at_construction(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        open_provider(text)


def test_token_from_the_environment_and_a_clean_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAULT_TOKEN", "s.from-env")
    p = open_provider("vault://vault.internal:8200/k?namespace=team-a&mount=kv/transit")
    assert p.uri == "vault://vault.internal:8200/k?mount=kv%2Ftransit&namespace=team-a"
    assert "s.from-env" not in repr(p)
    assert isinstance(p, VaultTransitProvider) and p._client.url.startswith("https://")


async def test_approle(openbao: OpenBao) -> None:
    p = open_provider(uri(openbao), role_id=openbao.role_id, secret_id=openbao.secret_id)
    await p.initialize()
    enc = await p.encrypt(b"secret", context={"t": "1"})
    assert await p.decrypt(enc) == b"secret"
    pair = await p.generate_data_key(context={"t": "1"})
    assert await p.decrypt(pair.encrypted_key) == pair.plaintext_key
    assert openbao.secret_id not in p.uri and "auth=approle" in p.uri
    with pytest.raises(KMSError, match="denied") as info:  # the policy covers "enc" only
        await p.encrypt(b"secret", key_id="other")
    assert openbao.secret_id not in str(info.value)
    await p.close()


async def test_approle_from_the_environment(openbao: OpenBao,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAULT_ROLE_ID", openbao.role_id)
    monkeypatch.setenv("VAULT_SECRET_ID", openbao.secret_id)
    p = open_provider(uri(openbao))
    assert await p.decrypt(await p.encrypt(b"secret")) == b"secret"
    assert openbao.role_id not in p.uri  # it came from the environment: it stays there
    await p.close()


async def test_approle_with_a_wrong_secret_id(openbao: OpenBao) -> None:
    wrong = "00000000-0000-4000-8000-000000000000"
    p = open_provider(uri(openbao), role_id=openbao.role_id, secret_id=wrong)
    with pytest.raises(KMSError) as info:
        await p.initialize()
    assert wrong not in str(info.value) and openbao.role_id not in str(info.value)
    await p.close()


async def test_a_bad_token_is_a_kms_error_without_the_token(openbao: OpenBao) -> None:
    p = open_provider(uri(openbao), token="s.not-a-real-token")
    with pytest.raises(KMSError) as info:
        await p.encrypt(b"secret")
    assert "s.not-a-real-token" not in str(info.value)
    await p.close()


async def test_namespace(openbao: OpenBao) -> None:
    inside = open_provider(uri(openbao, "ns-only", namespace="team-a"), token=TOKEN)
    await inside.initialize()
    assert await inside.decrypt(await inside.encrypt(b"secret")) == b"secret"
    outside = open_provider(uri(openbao, "ns-only"), token=TOKEN)
    with pytest.raises(KeyNotFoundError):
        await outside.initialize()
    await inside.close()
    await outside.close()


async def test_mount_path(openbao: OpenBao) -> None:
    custom = open_provider(uri(openbao, mount="kg-transit"), token=TOKEN)
    default = open_provider(uri(openbao), token=TOKEN)
    enc = await custom.encrypt(b"secret")
    assert await custom.decrypt(enc) == b"secret"
    with pytest.raises(Exception) as info:  # same key name, another mount: another key
        await default.decrypt(enc)
    assert type(info.value).__name__ == "DecryptionError"
    await custom.close()
    await default.close()


async def test_tls_is_verified_by_default(openbao: OpenBao) -> None:
    p = open_provider(f"vault://127.0.0.1:{openbao.port}/enc", token=TOKEN)
    with pytest.raises(ProviderConnectionError, match="TLS verification"):
        await p.initialize()
    await p.close()


async def test_ca_from_vault_cacert(openbao: OpenBao, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAULT_CACERT", openbao.ca)
    p = open_provider(f"vault://127.0.0.1:{openbao.port}/enc", token=TOKEN)
    await p.initialize()
    await p.close()


async def test_the_context_is_bound_as_associated_data(openbao: OpenBao) -> None:
    """Pins the mechanism: Transit's AEAD ``associated_data`` = base64(RFC 8785 context), not
    the key-derivation ``context`` parameter."""
    p = open_provider(uri(openbao), token=TOKEN)
    ctx = {"tenant": "42", "a": "b"}
    enc = await p.encrypt(b"secret", context=ctx)
    aad = base64.b64encode(canonical_context(ctx)).decode()
    transit = openbao.root.secrets.transit
    out = transit.decrypt_data("enc", ciphertext=enc.ciphertext.decode(), associated_data=aad)
    assert base64.b64decode(out["data"]["plaintext"]) == b"secret"
    with pytest.raises(hvac.exceptions.InvalidRequest):
        transit.decrypt_data("enc", ciphertext=enc.ciphertext.decode())
    await p.close()


async def test_derived_keys_are_refused(openbao: OpenBao) -> None:
    p = open_provider(uri(openbao, "derived"), token=TOKEN)
    with pytest.raises(UnsupportedOperation, match="derived"):
        await p.encrypt(b"secret", context={"a": "b"})
    await p.close()


async def test_encrypting_to_a_missing_key_does_not_create_it(openbao: OpenBao) -> None:
    p = open_provider(uri(openbao), token=TOKEN)  # root may create keys: the provider must not
    with pytest.raises(KeyNotFoundError):
        await p.encrypt(b"secret", key_id="never-created")
    with pytest.raises(hvac.exceptions.InvalidPath):
        openbao.root.secrets.transit.read_key("never-created")
    await p.close()


async def test_rotation_policy(openbao: OpenBao) -> None:
    transit = openbao.root.secrets.transit
    transit.create_key("rotating", key_type="aes256-gcm96", auto_rotate_period="720h")
    p = open_provider(uri(openbao, "rotating"), token=TOKEN)
    policy = await p.get_rotation_policy()
    assert policy.enabled and policy.rotation_period_days == 30
    assert policy.last_rotation is not None and policy.next_rotation is not None
    assert not (await p.get_rotation_policy("enc")).enabled
    await p.close()


async def test_an_expired_approle_token_is_renewed_by_logging_in_again(openbao: OpenBao) -> None:
    p = open_provider(uri(openbao), role_id=openbao.role_id, secret_id=openbao.secret_id)
    first = await p.encrypt(b"secret")
    assert isinstance(p, VaultTransitProvider)
    openbao.root.auth.token.revoke(p._client.token)  # as if it had expired
    again = await p.encrypt(b"secret")  # 403, then one login, then the call again
    assert await p.decrypt(first) == await p.decrypt(again) == b"secret"
    openbao.root.auth.token.revoke(p._client.token)
    import asyncio  # several calls meet the 403 at once: they all go on after the login
    together = await asyncio.gather(*(p.encrypt(b"secret") for _ in range(5)))
    assert [await p.decrypt(e) for e in together] == [b"secret"] * 5
    await p.close()


async def test_the_per_request_calls_verify_tls_too(openbao: OpenBao) -> None:
    """Key metadata goes through hvac, the Transit calls through the async client: both
    verify the server's certificate (here against the public bundle, so both refuse)."""
    p = open_provider(f"vault://127.0.0.1:{openbao.port}/enc", token=TOKEN)
    assert isinstance(p, VaultTransitProvider)
    with pytest.raises(ProviderConnectionError, match="TLS verification"):
        await p._post("encrypt", "/v1/transit/encrypt/enc", {"plaintext": "eA=="})
    await p.close()


async def test_each_event_loop_gets_its_own_connections(openbao: OpenBao) -> None:
    import asyncio
    import threading

    p = open_provider(uri(openbao), token=TOKEN)
    enc = await p.encrypt(b"secret")
    results: list[bytes] = []

    async def on_another_loop() -> bytes:
        try:
            return await p.decrypt(enc)
        finally:
            await p.release_loop()  # this loop ends: its connections with it

    def other_loop() -> None:
        results.append(asyncio.run(on_another_loop()))

    t = threading.Thread(target=other_loop)
    t.start()
    t.join(30)
    assert results == [b"secret"]
    assert await p.decrypt(enc) == b"secret"
    await p.close()


class _Redirector:
    """Two loopback HTTP servers: one answers every request with a 307 to the other, which
    records whatever reaches it (a standby in client-redirect mode and its active node)."""

    def __init__(self, status: int) -> None:
        import http.server
        import threading

        self.reached: list[dict[str, str]] = []
        reached = self.reached

        class Target(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                reached.append(dict(self.headers))
                self.send_response(200)
                self.end_headers()

            do_POST = do_PUT = do_GET

            def log_message(self, *args: object) -> None:
                pass

        self.target = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Target)
        location = f"http://127.0.0.1:{self.target.server_address[1]}"

        class Standby(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(status)
                self.send_header("Location", location + self.path)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_POST = do_PUT = do_GET

            def log_message(self, *args: object) -> None:
                pass

        self.standby = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Standby)
        self.port = self.standby.server_address[1]
        for server in (self.target, self.standby):
            threading.Thread(target=server.serve_forever, daemon=True).start()

    def close(self) -> None:
        for server in (self.target, self.standby):
            server.shutdown()
            server.server_close()


@pytest.mark.parametrize("status", [307, 302])
async def test_a_redirect_is_refused_on_both_paths_and_the_token_never_follows(
        status: int) -> None:
    redirector = _Redirector(status)
    try:
        p = open_provider(f"vault://127.0.0.1:{redirector.port}/enc?tls=false", token=TOKEN)
        assert isinstance(p, VaultTransitProvider)
        # the hvac path (key metadata, key management, login)
        with pytest.raises(ProviderConnectionError, match=rf"redirect \(HTTP {status} to "
                           rf"127\.0\.0\.1:\d+\).*not followed") as caught:
            await p.encrypt(b"secret")
        assert TOKEN not in str(caught.value)
        # the per-request path (Transit calls through aiohttp)
        with pytest.raises(ProviderConnectionError, match=f"redirect \\(HTTP {status}"):
            await p._post("encrypt", "/v1/transit/encrypt/enc", {"plaintext": "eA=="})
        await p.close()
        assert redirector.reached == []  # nothing, let alone the token, went to the target
    finally:
        redirector.close()
