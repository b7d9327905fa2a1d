"""``keygrants:`` specifics against a real keygrants server."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from keygrants.client import Client
from keygrants.errors import KMSError, ProviderConnectionError, UnsupportedOperation
from keygrants.providers import open_provider
from keygrants.providers.base import ProviderSeal

if TYPE_CHECKING:
    from conftest import KeygrantsServer

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def _no_token_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEYGRANTS_TOKEN", raising=False)


def uri(server: KeygrantsServer, key: str = "enc", extra: str = "") -> str:
    return f"keygrants://127.0.0.1:{server.port}/{key}?tls=false{extra}"


@pytest.mark.parametrize(("text", "message"), [
    ("keygrants://h:8650/k?token=abc", "must not appear in the URI"),
    ("keygrants://h:8650/k", "no token"),
    ("keygrants://h:8650/k?tls=sometimes", "true or false"),
    ("keygrants:h/k", "URI must be"),
])
def test_bad_configuration_fails_at_construction(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        open_provider(text)


async def test_an_alias_is_kept_next_to_the_key_id(keygrants_server: KeygrantsServer) -> None:
    p = open_provider(uri(keygrants_server, "enc-alias"), token=keygrants_server.token)
    enc = await p.encrypt(b"secret", context={"a": "b"})
    with Client(keygrants_server.addr, token=keygrants_server.token) as c:
        key_id = c.describe_key("enc").id
    assert enc.key_reference.key_id == key_id and enc.key_reference.key_alias == "enc-alias"
    assert await p.decrypt(enc) == b"secret"
    await p.close()


async def test_token_from_a_named_environment_variable(keygrants_server: KeygrantsServer,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UPSTREAM_KG_TOKEN", keygrants_server.token)
    p = open_provider(uri(keygrants_server, extra="&token_env=UPSTREAM_KG_TOKEN"))
    assert "token_env=UPSTREAM_KG_TOKEN" in p.uri
    await p.initialize()
    await p.close()


async def test_a_bad_token_is_a_kms_error_without_the_token(
        keygrants_server: KeygrantsServer) -> None:
    p = open_provider(uri(keygrants_server), token="kg_not_a_valid_token")
    with pytest.raises(KMSError, match="denied") as info:
        await p.encrypt(b"secret")
    assert "kg_not_a_valid_token" not in str(info.value)
    await p.close()


async def test_tls_is_the_default(keygrants_server: KeygrantsServer) -> None:
    """Without tls=false the provider speaks HTTPS, which a plain-HTTP server cannot answer:
    the error says so, and what to write instead."""
    p = open_provider(f"keygrants://127.0.0.1:{keygrants_server.port}/enc?timeout=3",
                      token=keygrants_server.token)
    with pytest.raises(ProviderConnectionError) as info:
        await p.encrypt(b"secret")
    assert str(info.value) == (
        f"keygrants: the server at https://127.0.0.1:{keygrants_server.port} does not speak "
        "TLS (it answered the TLS handshake in plain text); for a plain-HTTP server add "
        "?tls=false to the URI")
    await p.close()


async def test_nothing_listening_gets_no_tls_hint(keygrants_server: KeygrantsServer,
                                                  closed_port: int) -> None:
    p = open_provider(f"keygrants://127.0.0.1:{closed_port}/enc?timeout=3",
                      token=keygrants_server.token)
    with pytest.raises(ProviderConnectionError) as info:
        await p.encrypt(b"secret")
    assert str(info.value) == f"keygrants: cannot reach https://127.0.0.1:{closed_port}"
    await p.close()


async def test_initialize_checks_purpose_and_state(keygrants_server: KeygrantsServer) -> None:
    with Client(keygrants_server.addr, token=keygrants_server.token) as c:
        c.create_key("switched-off")
        c.disable_key("switched-off")
    off = open_provider(uri(keygrants_server, "switched-off"), token=keygrants_server.token)
    with pytest.raises(KMSError, match="disabled"):
        await off.initialize()
    signing = open_provider(uri(keygrants_server, "sig"), token=keygrants_server.token)
    with pytest.raises(UnsupportedOperation):
        await signing.initialize()
    await off.close()
    await signing.close()


async def test_rotation_policy(keygrants_server: KeygrantsServer) -> None:
    with Client(keygrants_server.addr, token=keygrants_server.token) as c:
        c.create_key("rotating", rotation_period=30 * 86400)
    p = open_provider(uri(keygrants_server, "rotating"), token=keygrants_server.token)
    policy = await p.get_rotation_policy()
    assert policy.enabled and policy.rotation_period_days == 30 and policy.next_rotation
    assert not (await p.get_rotation_policy("enc")).enabled
    await p.close()


@pytest.mark.parametrize(("seconds", "days"), [(3600, 1), (86400, 1), (36 * 3600, 2)])
async def test_a_rotation_period_is_reported_in_whole_days_rounded_up(
        keygrants_server: KeygrantsServer, seconds: int, days: int) -> None:
    name = f"rotating-{seconds}s"
    with Client(keygrants_server.addr, token=keygrants_server.token) as c:
        c.create_key(name, rotation_period=seconds)
    p = open_provider(uri(keygrants_server, name), token=keygrants_server.token)
    policy = await p.get_rotation_policy()
    assert policy.enabled and policy.rotation_period_days == days  # an hour is not 0 days
    await p.close()


async def test_holds_key_trusts_the_server_key_id_once_known(
        keygrants_server: KeygrantsServer) -> None:
    from keygrants.providers.models import KeyReference

    p = open_provider(uri(keygrants_server, "enc-alias"), token=keygrants_server.token)
    with Client(keygrants_server.addr, token=keygrants_server.token) as c:
        enc_id, other_id = c.describe_key("enc").id, c.describe_key("other").id
    # the same alias at another server names another key id
    elsewhere = KeyReference(provider="keygrants", key_id=other_id, key_alias="enc-alias")
    assert p.holds_key(elsewhere) is True  # before any call, the alias is all it knows
    await p.initialize()
    assert p.holds_key(elsewhere) is None
    assert p.holds_key(KeyReference(provider="keygrants", key_id=enc_id)) is True
    await p.close()


def test_as_a_seal_each_call_gets_a_client_of_its_own_event_loop(
        keygrants_server: KeygrantsServer) -> None:
    """ProviderSeal runs every call on a fresh event loop; httpx clients belong to one."""
    seal = ProviderSeal(open_provider(uri(keygrants_server), token=keygrants_server.token))
    blobs = [seal.wrap(bytes([i]) * 32, aad=b"aad") for i in range(3)]
    assert [seal.unwrap(b, aad=b"aad") for b in blobs] == [bytes([i]) * 32 for i in range(3)]


async def test_a_principal_signing_its_requests_uses_the_provider(
        keygrants_server: KeygrantsServer, tmp_path) -> None:
    from keygrants.crypto.signing import SigningKey

    key = SigningKey.generate("ed25519")
    key_file = tmp_path / "svc.pem"
    key_file.write_bytes(key.private_pem())
    key_file.chmod(0o600)
    name = f"svc-provider-{tmp_path.name[-6:]}"
    with Client(keygrants_server.addr, token=keygrants_server.token) as admin:
        admin.create_principal(name)
        admin.add_public_key(name, key.public_key().public_pem())
        admin.put_policy(f"{name}-enc", f'''permit(principal == Keygrants::Principal::"{name}",
            action in [Keygrants::Action::"describe_key", Keygrants::Action::"encrypt",
                       Keygrants::Action::"decrypt"], resource) when {{ resource.name == "enc" }};''')
    p = open_provider(uri(keygrants_server, extra=f"&principal={name}&key_file={key_file}"))
    assert f"principal={name}" in p.uri
    enc = await p.encrypt(b"secret", context={"tenant": "42"})
    assert await p.decrypt(enc, context={"tenant": "42"}) == b"secret"
    other = open_provider(uri(keygrants_server, "other", f"&principal={name}&key_file={key_file}"))
    with pytest.raises(KMSError):
        await other.encrypt(b"no", context={})
    await p.close()
    await other.close()
    with pytest.raises(ValueError, match="go together"):
        open_provider(uri(keygrants_server, extra=f"&principal={name}"))


async def test_a_grant_scopes_what_the_provider_may_do(keygrants_server: KeygrantsServer,
                                                       tmp_path, monkeypatch) -> None:
    from keygrants.crypto.signing import SigningKey
    from keygrants.grants.dpop import proof_key_thumbprint

    name = f"svc-granted-{tmp_path.name[-6:]}"
    dpop = SigningKey.generate("ed25519")
    dpop_file = tmp_path / "dpop.pem"
    dpop_file.write_bytes(dpop.private_pem())
    dpop_file.chmod(0o600)
    with Client(keygrants_server.addr, token=keygrants_server.token) as admin:
        admin.create_principal(name)
        api_key = admin.create_api_key(name).api_key  # no policy: only the grant lets it act
        grant = admin.create_grant("enc", name, ["describe", "encrypt", "decrypt"], ttl=600,
                                   context_subset={"tenant": "42"},
                                   dpop_jkt=proof_key_thumbprint(dpop)).token
    assert grant is not None
    monkeypatch.setenv("PAYMENTS_GRANT", grant)
    p = open_provider(uri(keygrants_server, extra=f"&grant_env=PAYMENTS_GRANT"
                                               f"&dpop_key_file={dpop_file}"), token=api_key)
    assert "grant_env=PAYMENTS_GRANT" in p.uri and grant not in p.uri
    await p.initialize()
    enc = await p.encrypt(b"secret", context={"tenant": "42", "order": "7"})
    assert await p.decrypt(enc, context={"tenant": "42", "order": "7"}) == b"secret"
    with pytest.raises(KMSError):
        await p.encrypt(b"other tenant", context={"tenant": "43"})
    await p.close()
    ungranted = open_provider(uri(keygrants_server), token=api_key)
    with pytest.raises(KMSError):
        await ungranted.encrypt(b"no grant", context={"tenant": "42"})
    await ungranted.close()
    with pytest.raises(ValueError, match="not set"):
        open_provider(uri(keygrants_server, extra="&grant_env=NO_SUCH_VARIABLE"), token=api_key)
    with pytest.raises(ValueError, match="must not appear in the URI"):
        open_provider(uri(keygrants_server, extra=f"&grant={grant}"), token=api_key)
