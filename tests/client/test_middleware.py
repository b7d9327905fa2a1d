"""The ASGI and WSGI grant middleware at their edges: WebSocket handshakes and other connection
types, the key a rule pins, paths below a ``root_path``, repeated headers, and unauthenticated
junk that must be a 4xx refusal, never a server error (here and at the KMS itself)."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from keygrants.asgi import GrantMiddleware, GrantRule
from keygrants.client.verifier import AsyncVerifier, Verifier
from keygrants.crypto.signing import SigningKey, b64url
from keygrants.grants.dpop import make_proof, proof_key_thumbprint
from keygrants.wsgi import GrantWSGIMiddleware

from .conftest import FakeKMS, InProcess

pytestmark = pytest.mark.anyio

REPORTS = GrantRule("/reports/*", operation="decrypt", key="payments")


def deep_token(depth: int = 2000) -> str:
    """Under the token length limit, but a header nested deep enough to exhaust a parser."""
    header = b64url(('{"alg":"EdDSA","x":' + "[" * depth + "]" * depth + "}").encode())
    return f"{header}.e30.{b64url(bytes(64))}"


def async_verifier(kms: FakeKMS) -> AsyncVerifier:
    return AsyncVerifier("http://kms", audience="svc", transport=kms.transport())


class Recorder:
    """An ASGI app that records whether it was called; answers 200 (HTTP) or accepts (WS)."""

    def __init__(self) -> None:
        self.scopes: list[dict[str, Any]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.scopes.append(scope)
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
        elif scope["type"] == "websocket":
            await receive()
            await send({"type": "websocket.accept"})


async def call(app: Any, scope: dict[str, Any]) -> list[dict[str, Any]]:
    """Run one connection through ``app``; the messages it sent."""
    sent: list[dict[str, Any]] = []
    first = {"http": {"type": "http.request", "body": b""},
             "websocket": {"type": "websocket.connect"}}.get(scope["type"], {"type": "x"})

    async def receive() -> dict[str, Any]:
        return first

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


def ws_scope(path: str, headers: list[tuple[bytes, bytes]] | None = None,
             **extra: Any) -> dict[str, Any]:
    return {"type": "websocket", "scheme": "ws", "path": path, "raw_path": path.encode(),
            "headers": [(b"host", b"svc"), *(headers or [])], **extra}


# -- WebSockets and other connection types -------------------------------------------------------

def starlette_app(v: AsyncVerifier) -> GrantMiddleware:
    async def report(request: Request) -> PlainTextResponse:
        return PlainTextResponse("report")

    async def live(ws: WebSocket) -> None:
        await ws.accept()
        grant = ws.scope["state"]["grant"]
        await ws.send_text(f"tenant data for {ws.path_params['tenant']} ({grant.grantee})")
        await ws.close()

    return GrantMiddleware(Starlette(routes=[Route("/reports/{tenant}", report),
                                             WebSocketRoute("/reports/{tenant}/live", live)]),
                           v, [REPORTS], public_url="http://testserver")


def test_a_websocket_route_matching_a_rule_needs_a_grant_under_uvicorn(uvicorn_thread: Any) -> None:
    """The repro of the review, end to end: uvicorn (which offers the websocket.http.response
    extension) answers a refused handshake with the error response."""
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    kms = FakeKMS(time.time)
    _, token = kms.mint()
    _, other_key = kms.mint(key_id="sandbox")
    app = starlette_app(async_verifier(kms))
    with uvicorn_thread(lambda port: app, lifespan="off") as port:
        url = f"127.0.0.1:{port}"
        assert httpx.get(f"http://{url}/reports/42").status_code == 401
        with pytest.raises(InvalidStatus) as denied:
            connect(f"ws://{url}/reports/42/live", open_timeout=10).close()
        assert denied.value.response.status_code == 401
        assert json.loads(denied.value.response.body or b"")["error"]["code"] == "unauthenticated"
        with pytest.raises(InvalidStatus) as denied:
            connect(f"ws://{url}/reports/42/live", open_timeout=10,
                    additional_headers={"Keygrants-Grant": other_key}).close()
        assert denied.value.response.status_code == 403
        assert json.loads(denied.value.response.body or b"")["error"]["code"] == "key_not_granted"
        with connect(f"ws://{url}/reports/42/live", open_timeout=10,
                     additional_headers={"Keygrants-Grant": token}) as ws:
            assert ws.recv(timeout=10) == "tenant data for 42 (svc)"


async def test_a_refused_handshake_is_closed_with_1008_without_the_response_extension() -> None:
    kms = FakeKMS(time.time)
    _, other_key = kms.mint(key_id="sandbox")
    inner = Recorder()
    app = GrantMiddleware(inner, async_verifier(kms), [REPORTS])
    assert await call(app, ws_scope("/reports/42/live")) == [
        {"type": "websocket.close", "code": 1008, "reason": "unauthenticated"}]
    refused = await call(app, ws_scope("/reports/42/live",
                                       [(b"keygrants-grant", other_key.encode())]))
    assert refused == [{"type": "websocket.close", "code": 1008, "reason": "key_not_granted"}]
    with_extension = await call(app, ws_scope(
        "/reports/42/live", extensions={"websocket.http.response": {}}))
    assert [m["type"] for m in with_extension] == ["websocket.http.response.start",
                                                   "websocket.http.response.body"]
    assert with_extension[0]["status"] == 401
    assert json.loads(with_extension[1]["body"])["error"]["code"] == "unauthenticated"
    assert inner.scopes == []
    assert await call(app, ws_scope("/elsewhere")) == [{"type": "websocket.accept"}]


async def test_a_dpop_bound_grant_over_wss_is_checked_against_the_https_url() -> None:
    kms = FakeKMS(time.time)
    proof_key = SigningKey.generate("ed25519")
    _, token = kms.mint(cnf_jkt=proof_key_thumbprint(proof_key))
    inner = Recorder()
    app = GrantMiddleware(inner, async_verifier(kms), [REPORTS])

    def scope(proof: str) -> dict[str, Any]:
        return {**ws_scope("/reports/42/live", [(b"authorization", f"DPoP {token}".encode()),
                                                (b"dpop", proof.encode())]), "scheme": "wss"}

    wrong = make_proof(proof_key, method="GET", url="https://svc/reports/43/live",
                       access_token=token)
    assert (await call(app, scope(wrong)))[0]["reason"] == "pop_invalid"
    right = make_proof(proof_key, method="GET", url="https://svc/reports/42/live",
                       access_token=token)
    assert await call(app, scope(right)) == [{"type": "websocket.accept"}]
    assert inner.scopes[0]["state"]["grant"].cnf_jkt == proof_key_thumbprint(proof_key)
    # a public_url given as wss:// is the same https:// URL
    behind = GrantMiddleware(inner, app.verifier, [REPORTS], public_url="wss://svc")
    again = make_proof(proof_key, method="GET", url="https://svc/reports/42/live",
                       access_token=token)
    assert await call(behind, scope(again)) == [{"type": "websocket.accept"}]


async def test_other_connection_types_on_a_rules_path_fail_closed() -> None:
    kms = FakeKMS(time.time)
    inner = Recorder()
    app = GrantMiddleware(inner, async_verifier(kms),
                          [GrantRule("/reports/*", method="POST", operation="decrypt")])
    assert await call(app, {"type": "webtransport", "path": "/reports/1"}) == []
    assert inner.scopes == []  # never served, whatever the rule's method
    await call(app, {"type": "webtransport", "path": "/open"})
    await call(app, {"type": "lifespan"})
    assert [s["type"] for s in inner.scopes] == ["webtransport", "lifespan"]


# -- the key a rule pins -------------------------------------------------------------------------

async def test_a_rule_with_a_key_refuses_grants_for_other_keys() -> None:
    kms = FakeKMS(time.time)
    _, payments = kms.mint(key_id="payments")
    _, sandbox = kms.mint(key_id="sandbox")  # the same operation, no context constraint
    v = async_verifier(kms)
    app = GrantMiddleware(Recorder(), v, [REPORTS, GrantRule("/any/*", operation="decrypt")])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://svc") as http:
        ok = await http.get("/reports/42", headers={"Keygrants-Grant": payments})
        assert ok.status_code == 200
        other = await http.get("/reports/42", headers={"Keygrants-Grant": sandbox})
        assert (other.status_code, other.json()["error"]["code"]) == (403, "key_not_granted")
        unpinned = await http.get("/any/42", headers={"Keygrants-Grant": sandbox})
        assert unpinned.status_code == 200  # what a rule without key= lets through
    await v.aclose()


def wsgi_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [environ["keygrants.grant"].key_id.encode()]


def test_a_wsgi_rule_with_a_key_refuses_grants_for_other_keys() -> None:
    kms = FakeKMS(time.time)
    _, payments = kms.mint(key_id="payments")
    _, sandbox = kms.mint(key_id="sandbox")
    statuses: list[str] = []
    env = {"REQUEST_METHOD": "GET", "PATH_INFO": "/reports/42", "HTTP_HOST": "svc",
           "wsgi.url_scheme": "http"}
    with Verifier("http://kms", audience="svc", transport=kms.transport()) as v:
        app = GrantWSGIMiddleware(wsgi_app, v, [REPORTS])
        assert app({**env, "HTTP_KEYGRANTS_GRANT": payments},
                   lambda status, headers: statuses.append(status)) == [b"payments"]
        body = app({**env, "HTTP_KEYGRANTS_GRANT": sandbox},
                   lambda status, headers: statuses.append(status))
    assert json.loads(body[0])["error"]["code"] == "key_not_granted"
    assert statuses == ["200 OK", "403 Forbidden"]


# -- paths below root_path -----------------------------------------------------------------------

async def test_root_path_is_stripped_only_as_whole_segments_as_starlette_routes() -> None:
    kms = FakeKMS(time.time)
    inner = Recorder()
    app = GrantMiddleware(inner, async_verifier(kms), [
        GrantRule("/v1beta/*", operation="decrypt"), GrantRule("/reports/*"), GrantRule("/")])
    base = {"type": "http", "method": "GET", "scheme": "http", "root_path": "/v1",
            "headers": [(b"host", b"svc")]}

    async def status(path: str) -> int:
        return int((await call(app, {**base, "path": path}))[0]["status"])

    # uvicorn --root-path /v1 makes the path root_path + target: the request line
    # "GET beta/secret" is "/v1beta/secret", which Starlette routes to /v1beta/secret
    assert await status("/v1beta/secret") == 401
    assert await status("/v1/reports/1") == 401  # below the root path
    assert await status("/v1") == 401  # the root itself is "/"
    assert await status("/v1x") == 200  # /v1x: no rule
    assert [s["path"] for s in inner.scopes] == ["/v1x"]


# -- repeated headers ----------------------------------------------------------------------------

async def test_repeated_dpop_or_grant_headers_are_refused_not_one_picked() -> None:
    kms = FakeKMS(time.time)
    proof_key = SigningKey.generate("ed25519")
    _, token = kms.mint(cnf_jkt=proof_key_thumbprint(proof_key))
    _, plain = kms.mint()
    v = async_verifier(kms)
    app = GrantMiddleware(Recorder(), v, [REPORTS], public_url="http://svc")
    url = "http://svc/reports/42"

    def proof() -> str:
        return make_proof(proof_key, method="GET", url=url, access_token=token)

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://svc") as http:
        single = await http.get("/reports/42", headers={"Authorization": f"DPoP {token}",
                                                        "DPoP": proof()})
        assert single.status_code == 200
        twice = await http.get("/reports/42", headers=[("Authorization", f"DPoP {token}"),
                                                       ("DPoP", "junk"), ("DPoP", proof())])
        assert (twice.status_code, twice.json()["error"]["code"]) == (403, "pop_invalid")
        grants = await http.get("/reports/42", headers=[("Keygrants-Grant", "junk"),
                                                        ("Keygrants-Grant", plain)])
        assert (grants.status_code, grants.json()["error"]["code"]) == (403, "grant_malformed")
    await v.aclose()


# -- unauthenticated junk: a 4xx, never a 500 ----------------------------------------------------

async def test_a_deeply_nested_token_header_is_refused_by_the_asgi_middleware() -> None:
    kms = FakeKMS(time.time)
    v = async_verifier(kms)
    app = GrantMiddleware(Recorder(), v, [REPORTS])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                                 base_url="http://svc") as http:
        for headers in ({"Keygrants-Grant": deep_token()},
                        {"Authorization": f"Bearer {deep_token(2500)}"}):
            r = await http.get("/reports/42", headers=headers)
            assert (r.status_code, r.json()["error"]["code"]) == (403, "grant_malformed")
    await v.aclose()


def test_a_deeply_nested_token_header_is_refused_by_the_wsgi_middleware() -> None:
    kms = FakeKMS(time.time)
    statuses: list[str] = []
    with Verifier("http://kms", audience="svc", transport=kms.transport()) as v:
        app = GrantWSGIMiddleware(wsgi_app, v, [REPORTS])
        body = app({"REQUEST_METHOD": "GET", "PATH_INFO": "/reports/42", "HTTP_HOST": "svc",
                    "wsgi.url_scheme": "http", "HTTP_KEYGRANTS_GRANT": deep_token()},
                   lambda status, headers: statuses.append(status))
    assert (statuses, json.loads(body[0])["error"]["code"]) == (["403 Forbidden"],
                                                                 "grant_malformed")


async def test_a_deeply_nested_token_header_is_refused_by_the_kms(in_process: InProcess) -> None:
    async with in_process.client() as admin:
        await admin.create_key("enc")
    async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=in_process.app, raise_app_exceptions=False),
            base_url="http://kms") as http:
        r = await http.post("/v1/keys/enc/encrypt", json={"plaintext": "aGk="},
                            headers={"Authorization": f"Bearer {in_process.token}",
                                     "Keygrants-Grant": deep_token()})
    assert (r.status_code, r.json()["error"]["code"]) == (403, "grant_malformed")


# -- a token too long, a Host no URL can be built on ---------------------------------------------

async def test_a_token_over_8_kib_is_malformed_not_missing() -> None:
    """It was answered 401 "a grant token is required" with a challenge to send one."""
    kms = FakeKMS(time.time)
    v = async_verifier(kms)
    app = GrantMiddleware(Recorder(), v, [REPORTS])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://svc") as http:
        for headers in ({"Keygrants-Grant": "A" * 20_000},
                        {"Authorization": "Bearer " + "A" * 9_000}):
            r = await http.get("/reports/42", headers=headers)
            assert (r.status_code, r.json()["error"]["code"]) == (403, "grant_malformed")
            assert "www-authenticate" not in r.headers
        none = await http.get("/reports/42")
        assert (none.status_code, none.json()["error"]["code"]) == (401, "unauthenticated")
    await v.aclose()
    statuses: list[str] = []
    with Verifier("http://kms", audience="svc", transport=kms.transport()) as sync:
        body = GrantWSGIMiddleware(wsgi_app, sync, [REPORTS])(
            {"REQUEST_METHOD": "GET", "PATH_INFO": "/reports/42", "HTTP_HOST": "svc",
             "wsgi.url_scheme": "http", "HTTP_KEYGRANTS_GRANT": "A" * 20_000},
            lambda status, headers: statuses.append(status))
    assert (statuses, json.loads(body[0])["error"]["code"]) == (["403 Forbidden"],
                                                                 "grant_malformed")


@pytest.mark.parametrize("host", [b"", b"svc/x", b"a b", b"svc.example#frag"])
async def test_a_bad_host_matters_only_to_a_dpop_bound_grant(host: bytes) -> None:
    """The Host only feeds a DPoP proof's URL: a grant without one was refused 400."""
    kms = FakeKMS(time.time)
    _, plain = kms.mint(key_id="payments")
    proof_key = SigningKey.generate("ed25519")
    _, bound = kms.mint(key_id="payments", cnf_jkt=proof_key_thumbprint(proof_key))
    v = async_verifier(kms)
    inner = Recorder()
    app = GrantMiddleware(inner, v, [REPORTS])
    base = {"type": "http", "method": "GET", "scheme": "http", "path": "/reports/42",
            "raw_path": b"/reports/42"}
    sent = await call(app, {**base, "headers": [(b"host", host), (b"keygrants-grant",
                                                                   plain.encode())]})
    assert sent[0]["status"] == 200
    proof = make_proof(proof_key, method="GET", url="http://svc/reports/42", access_token=bound)
    sent = await call(app, {**base, "headers": [(b"host", host),
                                                (b"authorization", f"DPoP {bound}".encode()),
                                                (b"dpop", proof.encode())]})
    assert (sent[0]["status"], json.loads(sent[1]["body"])["error"]["code"]) == (403,
                                                                                 "pop_invalid")
    await v.aclose()
    statuses: list[str] = []
    with Verifier("http://kms", audience="svc", transport=kms.transport()) as sync:
        GrantWSGIMiddleware(wsgi_app, sync, [REPORTS])(
            {"REQUEST_METHOD": "GET", "PATH_INFO": "/reports/42", "HTTP_HOST": host.decode(),
             "wsgi.url_scheme": "http", "HTTP_KEYGRANTS_GRANT": plain},
            lambda status, headers: statuses.append(status))
    assert statuses == ["200 OK"]
