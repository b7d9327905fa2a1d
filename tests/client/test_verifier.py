"""Local verification: Verifier / AsyncVerifier against a real KMS app, and the ASGI and WSGI
middleware over them."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest

from keygrants import errors
from keygrants.asgi import GrantMiddleware, GrantRule
from keygrants.client import Client
from keygrants.client.verifier import AsyncVerifier, Verifier
from keygrants.crypto.signing import SigningKey
from keygrants.grants.dpop import make_proof, proof_key_thumbprint
from keygrants.wsgi import GrantWSGIMiddleware

from .conftest import InProcess, LiveServer, build_in_process

pytestmark = pytest.mark.anyio


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


class Switch(httpx.AsyncBaseTransport):
    """The in-process app, or a KMS that does not answer."""

    def __init__(self, app: Any) -> None:
        self.inner = httpx.ASGITransport(app=app)
        self.down = False
        self.requests: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request.url.path)
        if self.down:
            raise httpx.ConnectError("down", request=request)
        return await self.inner.handle_async_request(request)


async def setup(kms: InProcess, **grant: Any) -> tuple[str, str]:
    """A principal ``svc`` and a grant for it on key ``enc``: (grant id, token)."""
    async with kms.client() as admin:
        try:
            await admin.create_key("enc")
            await admin.create_principal("svc")
        except errors.AlreadyExists:
            pass
        created = await admin.create_grant("enc", "svc", grant.pop("ops", ["decrypt"]), **grant)
    assert created.token is not None
    return created.grant.id, created.token


async def fetched(v: AsyncVerifier) -> None:
    """Let the fetches a call started in the background (tasks) end."""
    tasks = [task for task in (v._keys.running(), v._feed.running()) if task is not None]
    if tasks:
        await asyncio.wait(tasks)


def verifier(kms: InProcess, clock: Clock, **kwargs: Any) -> tuple[AsyncVerifier, Switch]:
    switch = Switch(kms.app)
    # a test double of a transport, not one httpx knows to be in-process: opt in to http://
    return AsyncVerifier("http://kms", transport=switch, allow_insecure_http=True, clock=clock,
                         **kwargs), switch


async def test_a_grant_verifies_locally_with_its_operation_and_context() -> None:
    kms, clock = build_in_process(), Clock()
    grant_id, token = await setup(kms, context_subset={"tenant": "42"}, ttl=300)
    v, switch = verifier(kms, clock)
    claims = await v.verify(token, operation="decrypt", context={"tenant": "42", "x": "1"})
    assert (claims.grant_id, claims.grantee, claims.operations) == (grant_id, "svc",
                                                                   frozenset({"decrypt"}))
    with pytest.raises(errors.OperationNotGranted):
        await v.verify(token, operation="encrypt", context={"tenant": "42"})
    with pytest.raises(errors.ContextMismatch):
        await v.verify(token, operation="decrypt", context={"tenant": "43"})
    with pytest.raises(errors.ContextMismatch):  # a constrained grant needs the context
        await v.verify(token, operation="decrypt")
    fetched = len(switch.requests)
    for _ in range(5):  # cached: no more requests, the same answer
        assert (await v.verify(token, context={"tenant": "42"})).grant_id == grant_id
    assert len(switch.requests) == fetched
    clock.now += 300 + 31
    with pytest.raises(errors.GrantExpired):
        await v.verify(token, context={"tenant": "42"})
    await v.aclose()


async def test_audience_is_checked_when_the_verifier_has_one() -> None:
    kms, clock = build_in_process(), Clock()
    _, mine = await setup(kms, audiences=["svc-ledger"])
    _, other = await setup(kms, audiences=["svc-billing"])
    v, _ = verifier(kms, clock, audience="svc-ledger")
    assert (await v.verify(mine)).audiences == ("svc-ledger",)
    with pytest.raises(errors.AudienceMismatch):
        await v.verify(other)
    await v.aclose()


async def test_revocations_are_pulled_and_a_stale_view_fails_closed() -> None:
    kms, clock = build_in_process(), Clock()
    grant_id, token = await setup(kms)
    v, switch = verifier(kms, clock, max_staleness=60, poll_interval=5)
    await v.verify(token)
    async with kms.client() as admin:
        await admin.revoke_grant(grant_id)
    await v.verify(token)  # within the poll interval the verifier has not pulled yet
    clock.now += 5
    # the pull is due: this call starts it in the background and answers from the view held
    assert (await v.verify(token)).grant_id == grant_id
    await fetched(v)
    with pytest.raises(errors.GrantRevoked):
        await v.verify(token)
    _, fresh = await setup(kms)
    switch.down = True  # the KMS stops answering: keys and feed are kept...
    clock.now += 30
    assert (await v.verify(fresh)).grantee == "svc"
    clock.now += 31  # ...until the feed is older than max_staleness: fail closed
    with pytest.raises(errors.VerifierUnavailable):
        await v.verify(fresh)
    switch.down = False
    clock.now += 5
    assert (await v.verify(fresh)).grantee == "svc"
    await v.aclose()


async def test_no_keys_yet_is_unavailable_not_a_pass() -> None:
    kms, clock = build_in_process(), Clock()
    _, token = await setup(kms)
    v, switch = verifier(kms, clock)
    switch.down = True
    with pytest.raises(errors.VerifierUnavailable):
        await v.verify(token)
    await v.aclose()


async def test_an_unknown_kid_refetches_the_jwks_at_most_once_per_interval() -> None:
    kms, clock = build_in_process(), Clock()
    _, old = await setup(kms)
    v, switch = verifier(kms, clock, refetch_interval=10)
    await v.verify(old)
    # a key that signs at once (staged rotations give verifiers one JWKS interval to see it
    # first; an unknown kid happens when a key activates before a verifier's next refresh)
    kms.grants._add_issuer_key(int(time.time()), activate_now=True)
    _, new = await setup(kms)
    clock.now += 1
    assert (await v.verify(new)).grantee == "svc"  # refetched on the unknown kid
    jwks_fetches = switch.requests.count("/.well-known/jwks.json")
    forged = new.split(".")[0][:-4] + "AAAA." + ".".join(new.split(".")[1:])
    for _ in range(3):
        with pytest.raises(errors.GrantDenied):
            await v.verify(forged)
    assert switch.requests.count("/.well-known/jwks.json") <= jwks_fetches + 1
    await v.aclose()


async def test_tokens_of_another_kms_are_refused() -> None:
    kms, other, clock = build_in_process(), build_in_process(), Clock()
    _, foreign = await setup(other)
    v, _ = verifier(kms, clock)
    with pytest.raises(errors.GrantUnknownKey):
        await v.verify(foreign)
    await v.aclose()


async def test_dpop_bound_grants_need_the_proof() -> None:
    kms, clock = build_in_process(), Clock()
    key = SigningKey.generate("ed25519")
    _, token = await setup(kms, dpop_jkt=proof_key_thumbprint(key))
    v, _ = verifier(kms, clock)
    url = "https://api.example/v1/reports"
    with pytest.raises(errors.PopRequired):
        await v.verify(token, method="GET", url=url)
    proof = make_proof(key, method="GET", url=url, access_token=token, iat=int(clock.now))
    assert (await v.verify(token, dpop_proof=proof, method="GET", url=url)).cnf_jkt
    with pytest.raises(errors.PopReplayed):
        await v.verify(token, dpop_proof=proof, method="GET", url=url)
    await v.aclose()


def test_the_sync_verifier_against_a_real_server(live_server: LiveServer) -> None:
    with Client(live_server.url, token=live_server.token, grant="") as admin:
        admin.create_key("verified")
        admin.create_principal("svc-sync")
        created = admin.create_grant("verified", "svc-sync", ["encrypt"], ttl=120)
        assert created.token is not None
        with Verifier(live_server.url, poll_interval=0.01, max_staleness=30) as v:
            assert v.verify(created.token, operation="encrypt").grantee == "svc-sync"
            admin.revoke_grant(created.grant.id)
            # a verify after the poll interval starts a pull (in the background): the ones
            # after it refuse the token
            deadline = time.monotonic() + 10  # not a timing assertion: only ends a failure
            while True:
                try:
                    v.verify(created.token, operation="encrypt")
                except errors.GrantRevoked:
                    break
                assert time.monotonic() < deadline, "the revocation was never pulled"
                time.sleep(0.01)


# -- middleware ---------------------------------------------------------------------------------

async def echo(scope: Any, receive: Any, send: Any) -> None:
    grant = scope.get("state", {}).get("grant")
    body = json.dumps({"grant": grant.grant_id if grant else None}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


async def test_asgi_middleware_enforces_grants_per_route() -> None:
    kms, clock = build_in_process(), Clock()
    grant_id, token = await setup(kms, context_subset={"tenant": "42"})
    v, _ = verifier(kms, clock)
    app = GrantMiddleware(echo, v, [
        GrantRule("/reports/*", operation="decrypt", method="GET",
                  context=lambda headers, path: {"tenant": headers.get("x-tenant", "")}),
        GrantRule("/admin", operation="encrypt"),
    ])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://svc") as http:
        ok = await http.get("/reports/7", headers={"Keygrants-Grant": token, "X-Tenant": "42"})
        assert (ok.status_code, ok.json()) == (200, {"grant": grant_id})
        bearer = await http.get("/reports/7", headers={"Authorization": f"Bearer {token}",
                                                       "X-Tenant": "42"})
        assert bearer.status_code == 200
        missing = await http.get("/reports/7")
        assert (missing.status_code, missing.json()["error"]["code"]) == (401, "unauthenticated")
        tenant = await http.get("/reports/7", headers={"Keygrants-Grant": token, "X-Tenant": "43"})
        assert (tenant.status_code, tenant.json()["error"]["code"]) == (403, "context_mismatch")
        op = await http.get("/admin", headers={"Keygrants-Grant": token})
        assert op.json()["error"]["code"] == "operation_not_granted"
        open_route = await http.get("/health")
        assert (open_route.status_code, open_route.json()) == (200, {"grant": None})
        # a Host carrying a path only matters to a DPoP-bound grant (whose proof names the
        # URL; test_middleware.py): this grant does not use it
        smuggled = await http.get("/reports/7", headers={"Keygrants-Grant": token, "X-Tenant": "42",
                                                         "Host": "svc/admin#"})
        assert (smuggled.status_code, smuggled.json()) == (200, {"grant": grant_id})
    await v.aclose()


def test_wsgi_middleware_enforces_grants(live_server: LiveServer) -> None:
    with Client(live_server.url, token=live_server.token, grant="") as admin:
        admin.create_key("wsgi-key", spec="ed25519")
        admin.create_principal("svc-wsgi")
        token = admin.create_grant("wsgi-key", "svc-wsgi", ["sign"], ttl=120).token
    assert token is not None

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        grant = environ.get("keygrants.grant")
        return [(grant.grantee if grant else "-").encode()]

    calls: list[str] = []

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        calls.append(status)

    with Verifier(live_server.url) as v:
        wrapped = GrantWSGIMiddleware(app, v, [GrantRule("/sign", operation="sign")])
        env = {"REQUEST_METHOD": "POST", "PATH_INFO": "/sign", "HTTP_HOST": "svc",
               "wsgi.url_scheme": "http"}
        assert wrapped({**env, "HTTP_KEYGRANTS_GRANT": token}, start_response) == [b"svc-wsgi"]
        refused = wrapped(env, start_response)
        assert json.loads(refused[0])["error"]["code"] == "unauthenticated"
        assert wrapped({**env, "PATH_INFO": "/other"}, start_response) == [b"-"]
    assert calls == ["200 OK", "401 Unauthorized", "200 OK"]


def _self_signed_pem(name: str) -> str:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _x5t(pem: str) -> str:
    import hashlib
    import ssl

    from keygrants.crypto.signing import b64url
    return b64url(hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).digest())


async def test_asgi_middleware_checks_a_certificate_bound_grant() -> None:
    kms, clock = build_in_process(), Clock()
    pem, other = _self_signed_pem("svc"), _self_signed_pem("thief")
    _, token = await setup(kms, x5t_s256=_x5t(pem))
    v, _ = verifier(kms, clock)
    app = GrantMiddleware(echo, v, [GrantRule("/r", operation="decrypt")])
    statuses: list[tuple[int, bytes]] = []

    async def call(chain: list[str] | None) -> None:
        scope: dict[str, Any] = {"type": "http", "method": "GET", "path": "/r",
                                 "headers": [(b"keygrants-grant", token.encode())]}
        if chain is not None:
            scope["extensions"] = {"tls": {"client_cert_chain": chain}}
        started: list[int] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b""}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                started.append(message["status"])
            elif message["type"] == "http.response.body":
                statuses.append((started[0], message["body"]))

        await app(scope, receive, send)

    for chain in ([pem], [other], None, ["not a certificate"]):
        await call(chain)
    codes = [(status, json.loads(body).get("error", {}).get("code")) for status, body in statuses]
    assert codes == [(200, None), (403, "pop_invalid"), (403, "pop_required"),
                     (403, "pop_required")]
    await v.aclose()


def test_wsgi_middleware_checks_a_certificate_bound_grant(live_server: LiveServer) -> None:
    pem, other = _self_signed_pem("svc"), _self_signed_pem("thief")
    with Client(live_server.url, token=live_server.token, grant="") as admin:
        admin.create_key("wsgi-mtls", spec="ed25519")
        admin.create_principal("svc-mtls")
        token = admin.create_grant("wsgi-mtls", "svc-mtls", ["sign"], ttl=120,
                                   x5t_s256=_x5t(pem)).token
    assert token is not None

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [environ["keygrants.grant"].grantee.encode()]

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        pass

    env = {"REQUEST_METHOD": "POST", "PATH_INFO": "/sign", "HTTP_HOST": "svc",
           "wsgi.url_scheme": "https", "HTTP_KEYGRANTS_GRANT": token}
    with Verifier(live_server.url) as v:
        wrapped = GrantWSGIMiddleware(app, v, [GrantRule("/sign", operation="sign")])
        assert wrapped({**env, "SSL_CLIENT_CERT": pem}, start_response) == [b"svc-mtls"]
        codes = [json.loads(wrapped(e, start_response)[0])["error"]["code"]
                 for e in ({**env, "SSL_CLIENT_CERT": other}, env)]
        assert codes == ["pop_invalid", "pop_required"]
        # a server that hands the certificate over some other way
        custom = GrantWSGIMiddleware(app, v, [GrantRule("/sign", operation="sign")],
                                     client_cert=lambda environ: environ["my.cert"])
        from keygrants.asgi import pem_to_der
        assert custom({**env, "my.cert": pem_to_der(pem)}, start_response) == [b"svc-mtls"]


# -- regressions from review ---------------------------------------------------------------------

async def test_rules_match_below_the_root_path_and_get_covers_head() -> None:
    kms, clock = build_in_process(), Clock()
    _, token = await setup(kms)
    v, _ = verifier(kms, clock)
    app = GrantMiddleware(echo, v, [GrantRule("/reports/*", operation="decrypt", method="GET")])
    responses: list[int] = []

    async def call(scope: dict[str, Any]) -> None:
        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b""}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                responses.append(message["status"])

        await app(scope, receive, send)

    base = {"type": "http", "scheme": "http", "headers": [(b"host", b"svc")]}
    await call({**base, "method": "GET", "path": "/api/reports/42", "root_path": "/api"})
    await call({**base, "method": "HEAD", "path": "/reports/42"})
    await call({**base, "method": "HEAD", "path": "/reports/42",
                "headers": [(b"host", b"svc"), (b"keygrants-grant", token.encode())]})
    assert responses == [401, 401, 200]
    await v.aclose()


async def test_limited_grants_and_other_keys_are_refused_locally() -> None:
    kms, clock = build_in_process(), Clock()
    _, limited = await setup(kms, max_uses=1)
    _, other_key = await setup(kms)
    v, _ = verifier(kms, clock)
    with pytest.raises(errors.GrantDenied, match="only be used at the KMS"):
        await v.verify(limited)
    claims = await v.verify(other_key)
    with pytest.raises(errors.KeyNotGranted):
        await v.verify(other_key, key="some-other-key-id")
    assert (await v.verify(other_key, key=claims.key_id)).key_id == claims.key_id
    await v.aclose()


async def test_servers_apply_the_store_never_a_bus_message() -> None:
    from keygrants.grants.push import entry_message
    from keygrants.grants.revocation import RevocationEntry
    from keygrants.server import _peer_revocations

    kms = build_in_process()
    _, token = await setup(kms)
    forged = RevocationEntry(seq=1, kind="principal", id="svc", revoked_at=2**40,
                             expires_at=2**40)
    await _peer_revocations(kms.grants)(entry_message(forged))
    from keygrants.auth import RequestContext

    claims = kms.grants.verify_presented(RequestContext(principal="svc"), token)
    assert claims.grantee == "svc"  # the forged wholesale revocation was not applied
