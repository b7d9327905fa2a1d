"""The SDK's request signer, checked by the server-side verifier."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from keygrants.auth.httpsig import (
    Message,
    NonceCache,
    ParsedSignature,
    RequestVerifier,
    build_target_uri,
    content_digest,
    parse_signatures,
)
from keygrants.client._signing import SignatureAuth, load_signing_key, target_uri
from keygrants.crypto.signing import SigningKey, VerifyingKey
from keygrants.errors import DigestMismatch, NonceReplayed, SignatureInvalid, UnknownCredential

NOW = 1_800_000_000.0
SECRET = b"m" * 32


class Server:
    """What a keygrants server does with a signed request, in miniature."""

    def __init__(self, keys: dict[str, tuple[str, VerifyingKey | bytes]]) -> None:
        self.keys = keys
        self.now = NOW
        self.verifier = RequestVerifier(resolve_key=self.resolve, nonce_cache=NonceCache())

    def resolve(self, keyid: str) -> tuple[str, VerifyingKey | bytes]:
        if keyid not in self.keys:
            raise UnknownCredential()
        return self.keys[keyid]

    def verify(self, request: httpx.Request, body: bytes | None = None) -> ParsedSignature:
        # Rebuild the message from what travels on the wire: request line, Host, headers.
        url = request.url
        path, _, query = url.raw_path.decode("ascii").partition("?")
        headers: dict[str, str] = {}
        for name, value in request.headers.multi_items():
            name = name.lower()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        message = Message(method=request.method,
                          target_uri=build_target_uri(url.scheme, headers["host"], path, query),
                          headers=headers)
        return self.verifier.verify(message, request.content if body is None else body,
                                    signature_input=headers.get("signature-input"),
                                    signature=headers.get("signature"), now=self.now)


def signed(auth: SignatureAuth, request: httpx.Request) -> httpx.Request:
    flow = auth.sync_auth_flow(request)
    out = next(flow)
    with pytest.raises(StopIteration):
        flow.send(httpx.Response(200))
    return out


@pytest.fixture(params=["ed25519", "ecdsa-p256-sha256", "hmac-sha256"])
def setup(request: pytest.FixtureRequest) -> tuple[SignatureAuth, Server]:
    alg = request.param
    if alg == "hmac-sha256":
        auth = SignatureAuth("alice/mac", SECRET, clock=lambda: NOW)
        return auth, Server({"alice/mac": ("hmac-sha256", SECRET)})
    key = SigningKey.generate(alg)
    auth = SignatureAuth("alice/k", key, clock=lambda: NOW)
    return auth, Server({"alice/k": (alg, key.public_key())})


def test_get_without_body_round_trip(setup: tuple[SignatureAuth, Server]) -> None:
    auth, server = setup
    request = signed(auth, httpx.Request("GET", "http://127.0.0.1:8650/v1/keys?limit=10"))
    assert "content-digest" not in request.headers
    parsed = server.verify(request)
    assert parsed.label == "sig1"
    assert [c.name for c in parsed.params.components] == ["@method", "@target-uri"]
    assert parsed.params.created == int(NOW) and parsed.params.expires == int(NOW) + 60
    assert parsed.params.keyid == auth.keyid and parsed.params.nonce
    with pytest.raises(NonceReplayed):
        server.verify(request)


def test_post_with_body_round_trip_and_tampering(setup: tuple[SignatureAuth, Server]) -> None:
    auth, server = setup
    body = b'{"plaintext": "aGVsbG8="}'
    request = signed(auth, httpx.Request("POST", "http://127.0.0.1:8650/v1/keys/k/encrypt",
                                         content=body, headers={"Content-Type": "application/json"}))
    assert request.headers["content-digest"] == content_digest(body)
    with pytest.raises(DigestMismatch):
        server.verify(request, body=body.replace(b"aGVs", b"aGVx"))
    parsed = server.verify(request)            # the forgery did not spend the nonce
    assert [c.name for c in parsed.params.components] == ["@method", "@target-uri",
                                                          "content-digest"]


@pytest.mark.parametrize("url", [
    "https://kms.example.com/v1/keys",          # default port dropped by httpx and the server
    "HTTP://KMS.Example.COM:8650/v1/keys",      # case folded
    "http://kms.example.com",                   # empty path: "/" on the wire
    "http://kms.example.com/p?",                # empty query
    "http://h/v1/keys/a%20b?x=a b&y=%2F&z=é",   # percent-encoding as sent
    "http://[::1]:8650/v1/x",
])
def test_target_uri_matches_the_servers_reconstruction(url: str) -> None:
    auth = SignatureAuth("alice/mac", SECRET, clock=lambda: NOW)
    server = Server({"alice/mac": ("hmac-sha256", SECRET)})
    request = signed(auth, httpx.Request("GET", url))
    server.verify(request)
    assert target_uri(request) in (str(request.url), str(request.url).rstrip("?"),
                                   str(request.url) + "/")


def test_every_request_gets_a_fresh_nonce_and_the_clock_sets_the_window() -> None:
    now = [NOW]
    auth = SignatureAuth("alice/mac", SECRET, lifetime=30, clock=lambda: now[0])
    seen = set()
    for _ in range(20):
        request = signed(auth, httpx.Request("GET", "http://h/x"))
        parsed = parse_signatures(request.headers["signature-input"], request.headers["signature"])
        seen.add(parsed[0].params.nonce)
        assert parsed[0].params.expires == parsed[0].params.created + 30
        now[0] += 1.7
    assert len(seen) == 20


def test_stale_signature_headers_are_replaced() -> None:
    auth = SignatureAuth("alice/mac", SECRET, clock=lambda: NOW)
    request = httpx.Request("GET", "http://h/x", headers={
        "Signature-Input": 'evil=("@method");created=1', "Signature": "evil=:AAAA:",
        "Content-Digest": "sha-256=:AAAA:"})
    out = signed(auth, request)
    assert out.headers.get_list("signature-input") == [out.headers["signature-input"]]
    assert "evil" not in out.headers["signature"]
    assert "content-digest" not in out.headers
    Server({"alice/mac": ("hmac-sha256", SECRET)}).verify(out)


def test_tampering_after_signing_is_detected() -> None:
    key = SigningKey.generate("ed25519")
    auth = SignatureAuth("alice/k", key, clock=lambda: NOW)
    server = Server({"alice/k": ("ed25519", key.public_key())})
    request = signed(auth, httpx.Request("POST", "http://h/v1/keys/k/encrypt", content=b"{}"))
    moved = httpx.Request("POST", "http://h/v1/keys/other/encrypt", content=b"{}",
                          headers=request.headers)
    with pytest.raises(SignatureInvalid):
        server.verify(moved)
    value = request.headers["signature"]
    request.headers["Signature"] = value[:9] + ("B" if value[9] != "B" else "C") + value[10:]
    with pytest.raises(SignatureInvalid):
        server.verify(request)


def test_clients_sign_through_httpx_transports() -> None:
    key = SigningKey.generate("ecdsa-p256-sha256")
    server = Server({"alice/k": ("ecdsa-p256-sha256", key.public_key())})

    def handler(request: httpx.Request) -> httpx.Response:
        try:
            server.verify(request)
        except SignatureInvalid as exc:
            return httpx.Response(401, json={"error": exc.message})
        return httpx.Response(200, json={"ok": True})

    auth = SignatureAuth("alice/k", key, clock=lambda: NOW)
    with httpx.Client(base_url="http://127.0.0.1:8650", auth=auth,
                      transport=httpx.MockTransport(handler)) as client:
        assert client.post("/v1/keys/k/encrypt", json={"plaintext": "aGk="}).status_code == 200
        assert client.get("/v1/keys", params={"limit": "5", "after": "a b"}).status_code == 200


@pytest.mark.anyio
async def test_async_clients_sign_too() -> None:
    key = SigningKey.generate("ed25519")
    server = Server({"alice/k": ("ed25519", key.public_key())})

    async def handler(request: httpx.Request) -> httpx.Response:
        await request.aread()
        server.verify(request)
        return httpx.Response(200)

    auth = SignatureAuth("alice/k", key, clock=lambda: NOW)
    async with httpx.AsyncClient(base_url="http://h", auth=auth,
                                 transport=httpx.MockTransport(handler)) as client:
        response = await client.put("/v1/x", content=b"streamed body")
        assert response.status_code == 200


def test_constructor_refuses_mismatched_keys() -> None:
    ed = SigningKey.generate("ed25519")
    assert SignatureAuth("k", ed).alg == "ed25519"
    assert SignatureAuth("k", SECRET).alg == "hmac-sha256"
    assert "m" * 8 not in repr(SignatureAuth("k", SECRET))
    for args, kwargs in (((ed,), {"alg": "ecdsa-p256-sha256"}), ((SECRET,), {"alg": "ed25519"}),
                         ((ed,), {"lifetime": 0})):
        with pytest.raises(ValueError):
            SignatureAuth("k", *args, **kwargs)


def test_load_signing_key(tmp_path: Path) -> None:
    for algorithm in ("ed25519", "ecdsa-p256-sha256"):
        key = SigningKey.generate(algorithm)
        path = tmp_path / f"{algorithm}.pem"
        path.write_bytes(key.private_pem())
        path.chmod(0o600)
        assert key.private_pem().startswith(b"-----BEGIN PRIVATE KEY-----")
        loaded = load_signing_key(path)
        assert loaded.algorithm == algorithm
        assert loaded.public_key().public_der() == key.public_key().public_der()
    rsa_path = tmp_path / "rsa.pem"
    rsa_path.write_bytes(rsa.generate_private_key(public_exponent=65537, key_size=2048)
                         .private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    public = tmp_path / "public.pem"
    public.write_text(SigningKey.generate("ed25519").public_key().public_pem())
    for bad in (rsa_path, garbage, public):
        with pytest.raises(ValueError) as info:
            load_signing_key(bad)
        if bad != rsa_path:  # pyca's own words were shown ("Are you sure this is a private key?")
            assert str(info.value) == (f"{bad} is not an unencrypted Ed25519 or ECDSA P-256 "
                                       "private key (PEM)")
    with pytest.raises(OSError):
        load_signing_key(tmp_path / "missing.pem")
