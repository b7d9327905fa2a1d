"""``--public-url``: behind a proxy, signatures and DPoP proofs are checked against the URL
clients address, not the scheme and ``Host`` the server receives."""

from __future__ import annotations

import base64
from typing import Any

import httpx
import pytest

from keygrants.api.app import create_app, parse_public_url
from keygrants.client._signing import SignatureAuth
from keygrants.crypto.signing import SigningKey
from keygrants.grants.dpop import make_proof, proof_key_thumbprint
from keygrants.models import AddPublicKeyRequest, CreatePrincipalRequest

from .conftest import ADMIN, World

pytestmark = pytest.mark.anyio

PUBLIC = "https://kms.example.com"


def behind_proxy(world: World) -> Any:
    return create_app(world.kms, world.access.authenticator, access=world.access.service,
                      grants=world.grants, public_url=PUBLIC + "/")


async def send_as_proxy(app: Any, request: httpx.Request) -> httpx.Response:
    """Forward a request signed for the public URL the way a TLS-terminating proxy does: plain
    HTTP, to another host name."""
    inner = httpx.Request(request.method, "http://10.0.0.7:8650" + request.url.raw_path.decode(),
                          content=request.content,
                          headers=[(k, v) for k, v in request.headers.items() if k != "host"])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app)) as client:
        return await client.send(inner)


def signer(world: World) -> tuple[SigningKey, str]:
    key = SigningKey.generate("ed25519")
    world.access.service.create_principal(ADMIN, CreatePrincipalRequest(id="proxied"))
    cred = world.access.service.add_public_key(
        ADMIN, "proxied", AddPublicKeyRequest(public_key=key.public_key().public_pem()))
    return key, f"proxied/{cred.id}"


async def test_signatures_are_checked_against_the_public_url(world: World) -> None:
    key, keyid = signer(world)
    app = behind_proxy(world)
    request = httpx.Request("GET", PUBLIC + "/v1/whoami?x=1")
    SignatureAuth(keyid, key).sign(request)
    r = await send_as_proxy(app, request)
    assert r.status_code == 200, r.text
    assert r.json()["principal"] == "proxied"
    # what the server receives (scheme http, Host 10.0.0.7:8650) is not what the client signed
    inner = httpx.Request("GET", "http://10.0.0.7:8650/v1/whoami?x=1")
    SignatureAuth(keyid, key).sign(inner)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app)) as client:
        refused = await client.send(inner)
    assert (refused.status_code, refused.json()["error"]["code"]) == (401, "signature_invalid")
    # without --public-url the same proxied request is refused: the reason for the option
    r = await send_as_proxy(world.app, request)
    assert (r.status_code, r.json()["error"]["code"]) == (401, "signature_invalid")


async def test_dpop_proofs_are_checked_against_the_public_url(world: World) -> None:
    app = behind_proxy(world)
    key = SigningKey.generate("ed25519")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://10.0.0.7:8650") as http:
        created = await http.post("/v1/grants", headers=world.auth, json={
            "key": "enc", "grantee": "svc", "operations": ["decrypt"],
            "dpop_jkt": proof_key_thumbprint(key)})
        token = created.json()["token"]
        headers = {"Authorization": f"Bearer {world.api_key}", "Keygrants-Grant": token}
        body = {"ciphertext": base64.b64encode(world.ciphertext).decode(),
                "context": world.CONTEXT}
        internal = make_proof(key, method="POST", url="http://10.0.0.7:8650/v1/decrypt",
                              access_token=token)
        r = await http.post("/v1/decrypt", json=body, headers={**headers, "DPoP": internal})
        assert r.json()["error"]["code"] == "pop_invalid"
        public = make_proof(key, method="POST", url=PUBLIC + "/v1/decrypt", access_token=token)
        r = await http.post("/v1/decrypt", json=body, headers={**headers, "DPoP": public})
        assert r.status_code == 200, r.text
        # the Host header plays no part any more (not even a malformed one)
        again = make_proof(key, method="POST", url=PUBLIC + "/v1/decrypt", access_token=token)
        r = await http.post("/v1/decrypt", json=body,
                            headers={**headers, "DPoP": again, "Host": "evil/v1/keys#"})
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("url, expected", [
    ("https://kms.example.com", ("https", "kms.example.com")),
    ("HTTPS://kms.example.com:8443/", ("https", "kms.example.com:8443")),
    ("http://[::1]:8650", ("http", "[::1]:8650")),
])
def test_public_urls_that_are_accepted(url: str, expected: tuple[str, str]) -> None:
    assert parse_public_url(url) == expected


@pytest.mark.parametrize("url", [
    "", "kms.example.com", "ftp://kms.example.com", "https://", "https://kms.example.com/v1",
    "https://kms.example.com?x=1", "https://kms.example.com#f", "https://user@kms.example.com",
    "https://kms.example.com:99999", "https://kms.example.com:0", "https://kms example.com",
    "https://kms.example.com:port",
])
def test_public_urls_that_are_refused(url: str) -> None:
    with pytest.raises(ValueError, match="host\\[:port\\]"):
        parse_public_url(url)
