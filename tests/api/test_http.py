"""The HTTP edge: every endpoint of ENDPOINTS, the one error shape, and bad input of every kind.

The endpoint table drives the tests: each endpoint needs an entry in ``CASES`` (a valid request
against the ``world`` fixture), and the authentication, success, unknown-key and malformed-body
tests are generated from the table and the request structs, so a new endpoint or request field
is covered (or fails a test) without editing the tests below.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from keygrants.api.app import ENDPOINTS, Endpoint, HttpLimits
from keygrants.audit.events import decode_event
from keygrants.auth import ADMIN_PRINCIPAL, RequestContext
from keygrants.errors import StoreError
from keygrants.keys.ciphertext import HEADER_SIZE
from keygrants.keys.context import MAX_CONTEXT_ENTRIES, MAX_CONTEXT_VALUE_LENGTH

pytestmark = pytest.mark.anyio

ADMIN = RequestContext(principal=ADMIN_PRINCIPAL)
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def assert_error(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """Pin the one error shape: exactly {"error": {"code", "message", "request_id"}}, all
    strings, the request id equal to the X-Request-Id header."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert list(body) == ["error"]
    err = body["error"]
    assert set(err) == {"code", "message", "request_id"}
    assert all(isinstance(v, str) for v in err.values()), err
    assert err["code"] == code, err
    assert err["message"]
    assert err["request_id"] == r.headers["x-request-id"]
    assert REQUEST_ID_RE.match(err["request_id"])
    return err


# -- one valid request per endpoint -------------------------------------------------------------

Case = Callable[[Any], tuple[str, Any]]

CASES: dict[str, Case] = {
    "health": lambda w: ("/healthz", None),
    "ready": lambda w: ("/readyz", None),
    "metrics": lambda w: ("/metrics", None),
    "createKey": lambda w: ("/v1/keys", {"name": "new-key", "spec": "ed25519"}),
    "listKeys": lambda w: ("/v1/keys?limit=2", None),
    "describeKey": lambda w: ("/v1/keys/enc-alias", None),
    "updateKey": lambda w: ("/v1/keys/enc", {"description": "changed", "rotation_period": 3600}),
    "rotateKey": lambda w: ("/v1/keys/enc/rotate", None),
    "disableKey": lambda w: ("/v1/keys/enc/disable", None),
    "enableKey": lambda w: ("/v1/keys/off/enable", None),
    "scheduleKeyDeletion": lambda w: ("/v1/keys/enc/schedule-deletion", {"days": 7}),
    "cancelKeyDeletion": lambda w: ("/v1/keys/doomed/cancel-deletion", None),
    "getPublicKey": lambda w: ("/v1/keys/sig/public-key?version=1", None),
    "encrypt": lambda w: ("/v1/keys/enc/encrypt",
                          {"plaintext": b64(w.PLAINTEXT), "context": w.CONTEXT}),
    "batchEncrypt": lambda w: ("/v1/keys/enc/encrypt-batch",
                               {"items": [{"plaintext": b64(b"one"), "context": w.CONTEXT},
                                          {"plaintext": b64(b"two")}]}),
    "decrypt": lambda w: ("/v1/decrypt", {"ciphertext": b64(w.ciphertext), "context": w.CONTEXT}),
    "batchDecrypt": lambda w: ("/v1/decrypt-batch",
                               {"items": [{"ciphertext": b64(w.ciphertext), "context": w.CONTEXT}]}),
    "reEncrypt": lambda w: ("/v1/re-encrypt",
                            {"ciphertext": b64(w.ciphertext), "context": w.CONTEXT,
                             "destination_key": "enc2", "destination_context": {"new": "ctx"}}),
    "generateDataKey": lambda w: ("/v1/keys/enc/data-key",
                                  {"bytes": 16, "context": w.CONTEXT, "include_plaintext": True}),
    "sign": lambda w: ("/v1/keys/sig/sign", {"message": b64(w.MESSAGE), "message_type": "raw"}),
    "verify": lambda w: ("/v1/keys/sig/verify",
                         {"message": b64(w.MESSAGE), "signature": b64(w.signature),
                          "message_type": "raw", "key_version": 1}),
    "mac": lambda w: ("/v1/keys/mac/mac", {"message": b64(w.MESSAGE)}),
    "verifyMac": lambda w: ("/v1/keys/mac/verify-mac",
                            {"message": b64(w.MESSAGE), "mac": b64(w.tag), "key_version": 1}),
    "derive": lambda w: ("/v1/keys/der/derive",
                         {"context": {"user": "u1"}, "length": 48, "salt": b64(b"salt"),
                          "key_version": 1}),
    "generateRandom": lambda w: ("/v1/random", {"bytes": 24}),
    "createAlias": lambda w: ("/v1/aliases", {"alias": "sig-alias", "key": "sig"}),
    "listAliases": lambda w: ("/v1/aliases?key=enc", None),
    "deleteAlias": lambda w: ("/v1/aliases/enc-alias", None),
    "auditCheckpoint": lambda w: ("/v1/audit/checkpoint", None),
    "auditCheckpointNow": lambda w: ("/v1/audit/checkpoint", None),
    "auditSearch": lambda w: ("/v1/audit/events?type=crypto.encrypt&limit=2", None),
    "auditInclusionProof": lambda w: ("/v1/audit/proof/inclusion?index=3&size=8", None),
    "auditConsistencyProof": lambda w: ("/v1/audit/proof/consistency?old=3&new=8", None),
    "auditExport": lambda w: ("/v1/audit/export", None),
    "auditHash": lambda w: ("/v1/audit/hash", {"value": "kg_admin_leaked"}),
    "auditKey": lambda w: ("/v1/audit/key", None),
    "whoami": lambda w: ("/v1/whoami", None),
    "createPrincipal": lambda w: ("/v1/principals", {"id": "svc-new", "tags": ["team-a"]}),
    "listPrincipals": lambda w: ("/v1/principals?limit=1", None),
    "describePrincipal": lambda w: ("/v1/principals/svc", None),
    "updatePrincipal": lambda w: ("/v1/principals/svc", {"display_name": "Service"}),
    "disablePrincipal": lambda w: ("/v1/principals/svc/disable", None),
    "enablePrincipal": lambda w: ("/v1/principals/svc/enable", None),
    "deletePrincipal": lambda w: ("/v1/principals/svc", None),
    "listCredentials": lambda w: ("/v1/principals/svc/credentials", None),
    "addPublicKey": lambda w: ("/v1/principals/svc/keys", {"public_key": PUBLIC_KEY_PEM,
                                                           "label": "laptop"}),
    "createApiKey": lambda w: ("/v1/principals/svc/api-keys", {"label": "ci", "expires_in": 3600}),
    "createSharedSecret": lambda w: ("/v1/principals/svc/shared-secrets", {"label": "hmac"}),
    "addCertificate": lambda w: ("/v1/principals/svc/certificates",
                                 {"match": "san-dns:svc.internal"}),
    "revokeCredential": lambda w: (f"/v1/principals/svc/credentials/{w.api_key_id}/revoke", None),
    "listPolicies": lambda w: ("/v1/policies", None),
    "testPolicy": lambda w: ("/v1/policy-test", {"principal": "svc", "action": "encrypt",
                                                   "key": "enc"}),
    "getPolicy": lambda w: ("/v1/policies/svc-encrypt", None),
    "putPolicy": lambda w: ("/v1/policies/readers", {
        "text": 'permit(principal in Keygrants::Group::"payments", '
                'action in Keygrants::Action::"read", resource);'}),
    "deletePolicy": lambda w: ("/v1/policies/svc-encrypt", None),
    "createGrant": lambda w: ("/v1/grants", {"key": "enc", "grantee": "svc",
                                             "operations": ["create_grant"], "ttl": 60}),
    "listGrants": lambda w: ("/v1/grants?key=enc&state=active", None),
    "exchangeGrant": lambda w: ("/v1/token-exchange", {"subject_token": w.admin_grant_token,
                                                       "scope": "encrypt", "ttl": 60}),
    "revokeAllGrants": lambda w: ("/v1/revoke-all", {"key": "enc"}),
    "describeGrant": lambda w: (f"/v1/grants/{w.grant_id}", None),
    "grantToken": lambda w: (f"/v1/grants/{w.grant_id}/token", None),
    "retireGrant": lambda w: (f"/v1/grants/{w.admin_grant_id}/retire", None),
    "revokeGrant": lambda w: (f"/v1/grants/{w.grant_id}/revoke", None),
    "approveGrant": lambda w: (f"/v1/grants/{w.pending_grant_id}/approve", {"note": "ok"}),
    "rejectGrant": lambda w: (f"/v1/grants/{w.pending_grant_id}/reject", {}),
    "rotateIssuerKey": lambda w: ("/v1/issuer/rotate", None),
    "revocations": lambda w: ("/v1/revocations?since=0", None),
    "jwks": lambda w: ("/.well-known/jwks.json", None),
}

PUBLIC_KEY_PEM = (
    "-----BEGIN PUBLIC KEY-----\n"
    "MCowBQYDK2VwAyEAJrQLj5P/89iXES9+vFgrIy29clF9CC/oPPsw3c5D0bs=\n"
    "-----END PUBLIC KEY-----\n"
)

# what a successful response says, beyond decoding into the endpoint's response type
CHECKS: dict[str, Callable[[Any, Any], None]] = {
    "health": lambda w, b: _eq(b, {"status": "ok"}),
    "ready": lambda w, b: _eq(b, {"status": "ready"}),
    "metrics": lambda w, b: _eq(sorted(f.name for f in text_string_to_metric_families(b)
                                       if f.name.startswith("keygrants_")),
                                ["keygrants_audit_log_size", "keygrants_audit_unavailable",
                                 "keygrants_auth_failures", "keygrants_build_info",
                                 "keygrants_dpop_replay_cache_capacity",
                                 "keygrants_dpop_replay_cache_entries", "keygrants_grant_denials",
                                 "keygrants_http_request_duration_seconds",
                                 "keygrants_http_requests",
                                 "keygrants_signature_replay_cache_capacity",
                                 "keygrants_signature_replay_cache_entries"]),
    "createKey": lambda w, b: _eq((b.name, b.spec, b.purpose, b.state, b.latest_version),
                                  ("new-key", "ed25519", "sign-verify", "enabled", 1)),
    "listKeys": lambda w, b: _eq(([k.name for k in b.keys], b.next), (["der", "doomed"], "doomed")),
    "describeKey": lambda w, b: _eq((b.id, b.aliases), (w.ids["enc"], ["enc-alias"])),
    "updateKey": lambda w, b: _eq((b.description, b.rotation_period), ("changed", 3600)),
    "rotateKey": lambda w, b: _eq(b.latest_version, 2),
    "disableKey": lambda w, b: _eq(b.state, "disabled"),
    "enableKey": lambda w, b: _eq(b.state, "enabled"),
    "scheduleKeyDeletion": lambda w, b: _eq(b.state, "pending_deletion"),
    "cancelKeyDeletion": lambda w, b: _eq((b.state, b.deletion_date), ("enabled", None)),
    "getPublicKey": lambda w, b: _eq((b.key_id, b.algorithm, b.pem.startswith("-----BEGIN PUBLIC")),
                                     (w.ids["sig"], "ed25519", True)),
    "encrypt": lambda w, b: _eq((b.key_id, b.key_version), (w.ids["enc"], 1)),
    "batchEncrypt": lambda w, b: _eq([r.error for r in b.results], [None, None]),
    "decrypt": lambda w, b: _eq(b.plaintext, w.PLAINTEXT),
    "batchDecrypt": lambda w, b: _eq([r.plaintext for r in b.results], [w.PLAINTEXT]),
    "reEncrypt": lambda w, b: _eq((b.key_id, b.source_key_id), (w.ids["enc2"], w.ids["enc"])),
    "generateDataKey": lambda w, b: _eq(len(b.plaintext), 16),
    "sign": lambda w, b: _eq(b.key_id, w.ids["sig"]),
    "verify": lambda w, b: _eq((b.valid, b.key_version), (True, 1)),
    "mac": lambda w, b: _eq(b.mac, w.tag),
    "verifyMac": lambda w, b: _eq(b.valid, True),
    "derive": lambda w, b: _eq(len(b.derived), 48),
    "generateRandom": lambda w, b: _eq(len(b.random), 24),
    "createAlias": lambda w, b: _eq((b.alias, b.key_id), ("sig-alias", w.ids["sig"])),
    "listAliases": lambda w, b: _eq([(a.alias, a.key_id) for a in b], [("enc-alias", w.ids["enc"])]),
    "deleteAlias": lambda w, b: _eq(b, None),
    "auditCheckpoint": lambda w, b: _eq((b.size >= 1, b.note.startswith(w.audit.origin + "\n")),
                                        (True, True)),
    "auditCheckpointNow": lambda w, b: _eq(b.size, w.audit.log.size),
    "auditSearch": lambda w, b: _eq(([e.type for e in b.events], b.next is not None),
                                    (["crypto.encrypt"] * 2, True)),
    "auditInclusionProof": lambda w, b: _eq((b.index, b.size, len(b.proof)), (3, 8, 3)),
    "auditConsistencyProof": lambda w, b: _eq((b.old_size, b.new_size, len(b.proof) > 0),
                                              (3, 8, True)),
    "auditExport": lambda w, b: _eq((b[0]["kind"], b[0]["vkey"], b[1]["kind"], b[1]["seq"]),
                                    ("header", w.audit.vkey, "event", 0)),
    "auditHash": lambda w, b: _eq(b.digest, w.audit.digester.digest("kg_admin_leaked")),
    "auditKey": lambda w, b: _eq((b.origin, b.vkey), (w.audit.origin, w.audit.vkey)),
    "whoami": lambda w, b: _eq((b.principal, b.auth_method), ("admin", "admin_token")),
    "createPrincipal": lambda w, b: _eq((b.id, b.tags, b.enabled), ("svc-new", ["team-a"], True)),
    "listPrincipals": lambda w, b: _eq(([p.id for p in b.principals], b.next), (["admin"], "admin")),
    "describePrincipal": lambda w, b: _eq([c.id for c in b.credentials], [w.api_key_id]),
    "updatePrincipal": lambda w, b: _eq(b.display_name, "Service"),
    "disablePrincipal": lambda w, b: _eq(b.enabled, False),
    "enablePrincipal": lambda w, b: _eq(b.enabled, True),
    "deletePrincipal": lambda w, b: _eq(w.store.get_principal("svc"), None),
    "listCredentials": lambda w, b: _eq([(c.kind, c.state) for c in b], [("api_key", "active")]),
    "addPublicKey": lambda w, b: _eq((b.kind, b.algorithm, b.keyid), (
        "public_key", "ed25519", f"svc/{b.id}")),
    "createApiKey": lambda w, b: _eq((b.api_key.startswith("kg_ak_"), b.credential.kind),
                                     (True, "api_key")),
    "addCertificate": lambda w, b: _eq((b.kind, b.match), ("mtls", "san-dns:svc.internal")),
    "createSharedSecret": lambda w, b: _eq(
        (b.shared_secret.startswith("kg_ss_"), b.credential.kind, b.credential.keyid),
        (True, "shared_secret", f"svc/{b.credential.id}")),
    "revokeCredential": lambda w, b: _eq((b.id, b.state), (w.api_key_id, "revoked")),
    "listPolicies": lambda w, b: _eq([(p.name, p.statements) for p in b], [("svc-encrypt", 1)]),
    "testPolicy": lambda w, b: _eq((b.allowed, b.reasons), (True, ["svc-encrypt#1"])),
    "getPolicy": lambda w, b: _eq(b.name, "svc-encrypt"),
    "putPolicy": lambda w, b: _eq((b.name, b.statements), ("readers", 1)),
    "deletePolicy": lambda w, b: _eq(w.store.get_policy("svc-encrypt"), None),
    "createGrant": lambda w, b: _eq((b.grant.state, b.grant.operations, b.token.count(".")),
                                    ("active", ["create_grant"], 2)),
    "listGrants": lambda w, b: _eq(sorted(g.id for g in b.grants),
                                   sorted([w.grant_id, w.admin_grant_id])),
    "exchangeGrant": lambda w, b: _eq((b.scope, b.token_type, b.expires_in <= 60),
                                      ("encrypt", "N_A", True)),
    "revokeAllGrants": lambda w, b: _eq((b.revoked, b.seq), (3, 1)),
    "describeGrant": lambda w, b: _eq((b.id, b.grantee, b.max_uses), (w.grant_id, "svc", 100)),
    "grantToken": lambda w, b: _eq((b.grant.id, b.token.count(".")), (w.grant_id, 2)),
    "retireGrant": lambda w, b: _eq((b.id, b.state), (w.admin_grant_id, "retired")),
    "revokeGrant": lambda w, b: _eq((b.id, b.state), (w.grant_id, "revoked")),
    "approveGrant": lambda w, b: _eq((b.state, b.decided_by is not None), ("active", True)),
    "rejectGrant": lambda w, b: _eq((b.state, b.decided_by is not None), ("rejected", True)),
    "rotateIssuerKey": lambda w, b: _eq(b.seq, 2),
    "revocations": lambda w, b: _eq((b.entries, b.latest), ([], 0)),
    "jwks": lambda w, b: _eq((len(b["keys"]), b["keys"][0]["alg"], b["seq"]), (1, "EdDSA", 1)),
}


def _eq(actual: Any, expected: Any) -> None:
    assert actual == expected


def case_for(endpoint: Endpoint, world: Any) -> tuple[str, Any]:
    return CASES[endpoint.operation_id](world)


def request_for(endpoint: Endpoint, world: Any) -> tuple[str, Any]:
    """The endpoint's case, or (for an endpoint that has none yet) its path with every
    parameter set to "x" and an empty body: enough for checks that come before the handler."""
    if endpoint.operation_id in CASES:
        return case_for(endpoint, world)
    return re.sub(r"{\w+}", "x", endpoint.path), ({} if endpoint.request is not None else None)


async def send(http: httpx.AsyncClient, endpoint: Endpoint, url: str, body: Any,
               headers: dict[str, str] | None = None) -> httpx.Response:
    if body is None:
        return await http.request(endpoint.method, url, headers=headers)
    return await http.request(endpoint.method, url, json=body, headers=headers)


ENDPOINT_IDS = [e.operation_id for e in ENDPOINTS]
AUTHENTICATED = [e for e in ENDPOINTS if e.auth]
# the tests that need valid input run for the endpoints that have a case; the test below fails
# for any endpoint that has none
WITH_CASE = [e for e in ENDPOINTS if e.operation_id in CASES]
WITH_BODY = [e for e in WITH_CASE if e.request is not None]
WITH_KEY = [e for e in WITH_CASE if "{key}" in e.path]


def test_every_endpoint_has_a_case_and_a_check() -> None:
    operations = [e.operation_id for e in ENDPOINTS]
    assert len(set(operations)) == len(operations)
    missing = sorted(set(operations) - set(CASES) | set(operations) - set(CHECKS))
    assert not missing, f"endpoints without an entry in CASES and CHECKS: {missing}"
    assert set(CASES) == set(CHECKS) == set(operations), "CASES or CHECKS name a removed endpoint"


# -- authentication -----------------------------------------------------------------------------

@pytest.mark.parametrize("endpoint", AUTHENTICATED, ids=lambda e: e.operation_id)
@pytest.mark.parametrize(("authorization", "status", "code"), [
    (None, 401, "unauthenticated"), ("Bearer kg_admin_wrong", 401, "unknown_key"),
    ("Bearer kg_ak_0123456789abcdef_" + "A" * 43, 401, "unknown_key"),
    ("Bearer ", 401, "unauthenticated"), ("Basic YTpi", 401, "unauthenticated"),
    ("Bearer " + "x" * 600, 431, "header_too_large"),
], ids=["none", "wrong", "wrong-api-key", "empty", "basic", "oversized"])
async def test_authenticated_endpoints_refuse_bad_credentials(world, http, endpoint: Endpoint,
                                                              authorization: str | None,
                                                              status: int, code: str) -> None:
    url, body = request_for(endpoint, world)
    before = world.snapshot()
    headers = {} if authorization is None else {"Authorization": authorization}
    r = await send(http, endpoint, url, body, headers)
    assert_error(r, status, code)
    if status == 401:
        challenges = r.headers.get_list("www-authenticate")
        assert [c.split()[0] for c in challenges] == ["Signature", "Bearer"]
        assert all(f'error="{code}"' in c for c in challenges)
    assert world.snapshot() == before


async def test_a_wrong_token_reveals_nothing_of_the_right_one(world, http) -> None:
    no_token = assert_error(await http.get("/v1/keys"), 401, "unauthenticated")
    wrong = assert_error(await http.get("/v1/keys", headers={"Authorization": "Bearer " + world.token
                                                             + "x"}), 401, "unknown_key")
    assert world.token not in json.dumps([no_token, wrong])


def test_only_system_endpoints_are_unauthenticated() -> None:
    assert {e.path for e in ENDPOINTS if not e.auth} == {
        "/healthz", "/readyz", "/v1/revocations", "/.well-known/jwks.json"}


# -- success ------------------------------------------------------------------------------------

@pytest.mark.parametrize("endpoint", WITH_CASE, ids=lambda e: e.operation_id)
async def test_every_endpoint_succeeds_with_valid_input(world, http, endpoint: Endpoint) -> None:
    url, body = case_for(endpoint, world)
    r = await send(http, endpoint, url, body, world.auth if endpoint.auth else None)
    assert r.status_code == endpoint.status, r.text
    assert REQUEST_ID_RE.match(r.headers["x-request-id"])
    if endpoint.status == 204:
        assert r.content == b""
        result = None
    elif r.headers["content-type"] == "application/x-ndjson":
        result = [json.loads(line) for line in r.content.splitlines()]
    elif r.headers["content-type"].startswith("text/plain"):
        result = r.text
    else:
        assert r.headers["content-type"] == "application/json"
        result = (msgspec.json.decode(r.content, type=endpoint.response)
                  if endpoint.response is not None else r.json())
    CHECKS[endpoint.operation_id](world, result)


async def test_health_and_ready_need_no_credentials(http) -> None:
    for path, status in [("/healthz", "ok"), ("/readyz", "ready")]:
        r = await http.get(path)
        assert r.status_code == 200
        assert r.json() == {"status": status}


async def test_ready_reports_503_when_the_store_fails(world, http, monkeypatch) -> None:
    def broken(name: str) -> bytes | None:
        raise StoreError("disk on fire")

    monkeypatch.setattr(world.store, "get_meta", broken)
    r = await http.get("/readyz")
    assert r.status_code == 503
    assert r.json() == {"status": "unavailable"}
    assert (await http.get("/healthz")).status_code == 200


async def test_ready_reports_503_when_the_store_does_not_answer(world, http, monkeypatch) -> None:
    """A store that hangs (rather than fails) used to keep /readyz waiting, then say ready."""
    import threading

    import keygrants.api.app as app_module

    release = threading.Event()

    def hung(name: str) -> bytes | None:
        release.wait(30)  # bounded: the test ends it below
        return b"x"

    monkeypatch.setattr(app_module, "READY_TIMEOUT", 0.05)
    monkeypatch.setattr(world.store, "get_meta", hung)
    try:
        r = await http.get("/readyz")
        assert (r.status_code, r.json()) == (503, {"status": "unavailable"})
    finally:
        release.set()


async def test_an_unexpected_exception_is_an_opaque_500_in_the_error_shape(world, http,
                                                                           monkeypatch) -> None:
    def boom(ctx: Any, n: int) -> Any:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(world.kms, "random", boom)
    r = await http.post("/v1/random", json={"bytes": 8}, headers=world.auth)
    err = assert_error(r, 500, "internal_error")
    assert "secret" not in r.text
    assert err["message"] == "internal error"


# -- request ids --------------------------------------------------------------------------------

@pytest.mark.parametrize("given", ["abc-123", "trace.id:42_x", "A" * 64])
async def test_a_valid_request_id_is_echoed(world, http, given: str) -> None:
    ok = await http.get("/v1/keys/enc", headers=world.auth | {"X-Request-Id": given})
    assert ok.status_code == 200
    assert ok.headers["x-request-id"] == given
    err = assert_error(await http.get("/v1/keys/nope", headers=world.auth | {"X-Request-Id": given}),
                       404, "key_not_found")
    assert err["request_id"] == given
    err = assert_error(await http.get("/v1/keys/enc", headers={"X-Request-Id": given}),
                       401, "unauthenticated")
    assert err["request_id"] == given


@pytest.mark.parametrize("given", ["has space", "semi;colon", "A" * 65, "ünï".encode("latin-1"),
                                   "a/b", "<script>"])
async def test_an_invalid_request_id_is_replaced(world, http, given: str | bytes) -> None:
    r = await http.get("/v1/keys/nope", headers=world.auth | {"X-Request-Id": given})
    err = assert_error(r, 404, "key_not_found")
    text = given.decode("latin-1") if isinstance(given, bytes) else given
    assert err["request_id"] != text
    ok = await http.get("/healthz", headers={"X-Request-Id": given})
    assert ok.headers["x-request-id"] != text
    assert REQUEST_ID_RE.match(ok.headers["x-request-id"])


async def test_generated_request_ids_are_unique(http) -> None:
    ids = {(await http.get("/healthz")).headers["x-request-id"] for _ in range(20)}
    assert len(ids) == 20


# -- routing ------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/", "/nope", "/v1", "/v2/keys", "/v1/keys/enc/explode",
                                  "/v1/keys/enc/encrypt/more", "/v1/decrypt/x", "/openapi.yaml"])
async def test_unknown_routes_are_404_not_found(world, http, path: str) -> None:
    for headers in (world.auth, {}):
        assert_error(await http.post(path, headers=headers), 404, "not_found")
        assert_error(await http.get(path, headers=headers), 404, "not_found")


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=ENDPOINT_IDS)
async def test_other_methods_on_a_known_path_are_405(world, http, endpoint: Endpoint) -> None:
    allowed = {e.method for e in ENDPOINTS if e.path == endpoint.path}
    url, _ = request_for(endpoint, world)
    before = world.snapshot()
    for method in sorted({"GET", "POST", "PUT", "PATCH", "DELETE"} - allowed):
        r = await http.request(method, url, headers=world.auth)
        assert_error(r, 405, "method_not_allowed")
    assert world.snapshot() == before


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=ENDPOINT_IDS)
async def test_a_path_finds_the_route_the_table_order_gives(world, endpoint: Endpoint) -> None:
    """A path without parameters is found by one lookup: the same route as matching every
    route of its length in the table's order (which a parameter could shadow)."""
    app = world.app
    url, _ = request_for(endpoint, world)
    path = url.split("?")[0]
    fast = app._find(endpoint.method, path, path.encode())
    static, app._static = app._static, {}
    try:
        slow = app._find(endpoint.method, path, path.encode())
    finally:
        app._static = static
    assert fast[0] is slow[0] and fast[1] == slow[1]
    assert fast[0].endpoint.operation_id == endpoint.operation_id
    if "{" not in endpoint.path:
        assert (endpoint.method, endpoint.path) in app._static


# -- OpenAPI ------------------------------------------------------------------------------------

async def test_openapi_document_describes_every_endpoint(http) -> None:
    r = await http.get("/openapi.json")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    doc = json.loads(r.content)
    assert doc["openapi"] == "3.1.0"
    schemas = doc["components"]["schemas"]
    assert "Error" in schemas
    for e in ENDPOINTS:
        op = doc["paths"][e.path][e.method.lower()]
        assert op["operationId"] == e.operation_id
        assert str(e.status) in op["responses"]
        assert ("security" in op) == e.auth
        assert ("requestBody" in op) == (e.request is not None)
    refs = re.findall(r'"\$ref":\s*"#/components/schemas/([^"]+)"', r.text)
    assert refs
    assert set(refs) <= set(schemas)
    operations = [op["operationId"] for methods in doc["paths"].values() for op in methods.values()]
    assert sorted(operations) == sorted(e.operation_id for e in ENDPOINTS)


# -- unknown keys -------------------------------------------------------------------------------

@pytest.mark.parametrize("endpoint", WITH_KEY, ids=lambda e: e.operation_id)
@pytest.mark.parametrize("ref", ["no-such-key", str(uuid.UUID(int=1)), "x" * 200])
async def test_unknown_key_is_404_key_not_found(world, http, endpoint: Endpoint, ref: str) -> None:
    url, body = case_for(endpoint, world)
    key = re.match(r"^/v1/keys/([^/?]+)", url)
    assert key is not None
    url = url.replace(f"/v1/keys/{key.group(1)}", f"/v1/keys/{ref}", 1)
    before = world.snapshot()
    assert_error(await send(http, endpoint, url, body, world.auth), 404, "key_not_found")
    assert world.snapshot() == before


async def test_unknown_keys_in_bodies_and_queries_are_404(world, http) -> None:
    assert_error(await http.post("/v1/aliases", json={"alias": "a1", "key": "nope"},
                                 headers=world.auth), 404, "key_not_found")
    assert_error(await http.get("/v1/aliases?key=nope", headers=world.auth), 404, "key_not_found")
    assert_error(await http.post("/v1/re-encrypt", json={"ciphertext": b64(world.ciphertext),
                                                         "context": world.CONTEXT,
                                                         "destination_key": "nope"},
                                 headers=world.auth), 404, "key_not_found")
    assert_error(await http.delete("/v1/aliases/nope", headers=world.auth), 404, "alias_not_found")


# -- malformed bodies, generated from the request structs ---------------------------------------

def _type_kinds(t: Any) -> set[str]:
    """The msgspec type-info class names a field accepts (unions flattened)."""
    if isinstance(t, msgspec.inspect.UnionType):
        return {k for sub in t.types for k in _type_kinds(sub)}
    return {type(t).__name__}


def _mutations(struct: type, valid: dict[str, Any], where: str = "$") -> list[tuple[str, Any]]:
    """(description, body) pairs that no request decoder may accept: a missing required
    field, a wrong type or bad base64 in each field, an unknown field (at every level)."""
    info = msgspec.inspect.type_info(struct)
    assert isinstance(info, msgspec.inspect.StructType)
    out: list[tuple[str, Any]] = [(f"{where}.unknown", {**valid, "unexpected_field": 1})]
    for f in info.fields:
        kinds = _type_kinds(f.type)
        if f.required:
            out.append((f"{where}.{f.name} missing", {k: v for k, v in valid.items() if k != f.name}))
        wrong = "not-a-list" if "ListType" in kinds else [1]
        out.append((f"{where}.{f.name} wrong type", {**valid, f.name: wrong}))
        if "BytesType" in kinds:
            out.append((f"{where}.{f.name} bad base64", {**valid, f.name: "!!not*base64!!"}))
            out.append((f"{where}.{f.name} unpadded base64", {**valid, f.name: "QUJD="}))
        if "DictType" in kinds:
            out.append((f"{where}.{f.name} non-string value", {**valid, f.name: {"k": 1}}))
            out.append((f"{where}.{f.name} nested value", {**valid, f.name: {"k": {"x": "y"}}}))
        if "LiteralType" in kinds:
            out.append((f"{where}.{f.name} not a choice", {**valid, f.name: "neither"}))
        if "IntType" in kinds:
            out.append((f"{where}.{f.name} float", {**valid, f.name: 1.5}))
            out.append((f"{where}.{f.name} bool", {**valid, f.name: True}))
        if "ListType" in kinds:
            list_type = (f.type if isinstance(f.type, msgspec.inspect.ListType) else next(
                t for t in f.type.types if isinstance(t, msgspec.inspect.ListType)))
            item_type = list_type.item_type
            if isinstance(item_type, msgspec.inspect.StructType):
                first = valid[f.name][0]
                for desc, item in _mutations(item_type.cls, first, f"{where}.{f.name}[0]"):
                    out.append((desc, {**valid, f.name: [item, *valid[f.name][1:]]}))
            out.append((f"{where}.{f.name} scalar items", {**valid, f.name: [1]}))
    return out


@pytest.mark.parametrize("endpoint", WITH_BODY, ids=lambda e: e.operation_id)
@pytest.mark.parametrize("raw", [b"[]", b'"a string"', b"1", b"null", b"true", b"{", b"{}}",
                                 b'{"a": }', b"\xff\xfe{}", b"{'single': 'quotes'}",
                                 b'{"plaintext": "AA==",}', b'{"\xff": 1}',
                                 b'{"\xed\xa0\x80": "a surrogate"}'],
                         ids=["array", "string", "number", "null", "bool", "truncated", "trailing",
                              "no-value", "not-utf8", "single-quotes", "trailing-comma",
                              "not-utf8-name", "surrogate-name"])
async def test_bodies_that_are_not_a_json_object_are_400_malformed_body(world, http, endpoint,
                                                                         raw: bytes) -> None:
    url, _ = case_for(endpoint, world)
    before = world.snapshot()
    r = await http.request(endpoint.method, url, content=raw,
                           headers=world.auth | {"Content-Type": "application/json"})
    assert_error(r, 400, "malformed_body")
    assert world.snapshot() == before


@pytest.mark.parametrize("endpoint", WITH_BODY, ids=lambda e: e.operation_id)
async def test_every_field_refuses_wrong_input_with_400_malformed_body(world, http,
                                                                       endpoint: Endpoint) -> None:
    url, valid = case_for(endpoint, world)
    assert endpoint.request is not None
    mutations = _mutations(endpoint.request, valid)
    assert mutations
    before = world.snapshot()
    for desc, body in mutations:
        r = await http.request(endpoint.method, url, json=body, headers=world.auth)
        assert r.status_code == 400, f"{desc}: {r.status_code} {r.text}"
        assert_error(r, 400, "malformed_body")
    assert world.snapshot() == before


async def test_an_empty_body_means_all_defaults(world, http) -> None:
    r = await http.post("/v1/random", content=b"", headers=world.auth)
    assert r.status_code == 200
    assert len(base64.b64decode(r.json()["random"])) == 32
    assert_error(await http.post("/v1/keys/enc/encrypt", content=b"", headers=world.auth),
                 400, "malformed_body")


async def test_a_non_numeric_content_length_is_400(world, http) -> None:
    r = await http.post("/v1/random", content=b"{}",
                        headers=world.auth | {"Content-Length": "12abc"})
    assert_error(r, 400, "invalid_request")


# -- body size limits ---------------------------------------------------------------------------

def _max_body(world: Any) -> int:
    return HttpLimits.for_plaintext(world.kms.limits.max_plaintext).max_body


async def test_oversize_body_with_content_length_is_413(world, http) -> None:
    limit = _max_body(world)
    body = b'{"plaintext": "' + b"A" * limit + b'"}'
    before = world.snapshot()
    r = await http.post("/v1/keys/enc/encrypt", content=body, headers=world.auth)
    assert r.request.headers["content-length"] == str(len(body))
    assert_error(r, 413, "payload_too_large")
    r = await http.post("/v1/keys", content=b'{"name": "' + b"a" * limit + b'"}', headers=world.auth)
    assert_error(r, 413, "payload_too_large")
    assert world.snapshot() == before


async def _chunks(data: bytes, size: int = 4096) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


async def test_oversize_streamed_body_without_content_length_is_413(world, http) -> None:
    limit = _max_body(world)
    body = b'{"name": "' + b"a" * limit + b'"}'
    before = world.snapshot()
    request = http.build_request("POST", "/v1/keys", content=_chunks(body), headers=world.auth)
    assert "content-length" not in request.headers
    assert request.headers["transfer-encoding"] == "chunked"
    assert_error(await http.send(request), 413, "payload_too_large")
    assert world.snapshot() == before


async def test_a_streamed_body_under_the_limit_is_accepted(world, http) -> None:
    body = json.dumps({"plaintext": b64(b"x" * 30_000)}).encode()
    request = http.build_request("POST", "/v1/keys/enc/encrypt", content=_chunks(body, 1000),
                                 headers=world.auth)
    assert "content-length" not in request.headers
    r = await http.send(request)
    assert r.status_code == 200, r.text


async def test_batch_endpoints_have_their_own_larger_body_limit(make_world) -> None:
    w = make_world(limits=HttpLimits(max_body=2048, max_batch_body=8192))
    items = [{"plaintext": b64(b"x" * 100)} for _ in range(20)]  # about 3.4 kB
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=w.app),
                                 base_url="http://test", headers=w.auth) as http:
        r = await http.post("/v1/keys/enc/encrypt-batch", json={"items": items})
        assert r.status_code == 200, r.text
        assert_error(await http.post("/v1/keys/enc/encrypt-batch", json={"items": items * 3}),
                     413, "payload_too_large")
        assert_error(await http.post("/v1/keys/enc/encrypt",
                                     json={"plaintext": b64(b"x" * 2000)}), 413, "payload_too_large")
        request = http.build_request("POST", "/v1/decrypt-batch",
                                     content=_chunks(json.dumps({"items": items * 3}).encode(), 512))
        assert_error(await http.send(request), 413, "payload_too_large")


@pytest.mark.parametrize(("url", "field"), [("/v1/keys/enc/encrypt", "plaintext"),
                                            ("/v1/keys/sig/sign", "message"),
                                            ("/v1/keys/mac/mac", "message")])
async def test_data_over_the_service_limit_is_413(world, http, url: str, field: str) -> None:
    limit = world.kms.limits.max_plaintext
    assert len(json.dumps({field: b64(b"x" * (limit + 1))})) < _max_body(world)
    r = await http.post(url, json={field: b64(b"x" * (limit + 1))}, headers=world.auth)
    assert_error(r, 413, "payload_too_large")
    r = await http.post(url, json={field: b64(b"x" * limit)}, headers=world.auth)
    assert r.status_code == 200, r.text


# -- contexts -----------------------------------------------------------------------------------

TOO_MANY = {f"k{i}": "v" for i in range(MAX_CONTEXT_ENTRIES + 1)}
BAD_CONTEXTS = [
    pytest.param({"k": 1}, "malformed_body", id="int-value"),
    pytest.param({"k": None}, "malformed_body", id="null-value"),
    pytest.param({"k": ["v"]}, "malformed_body", id="list-value"),
    pytest.param(["k", "v"], "malformed_body", id="list"),
    pytest.param("k=v", "malformed_body", id="string"),
    pytest.param(TOO_MANY, "invalid_request", id="too-many-entries"),
    pytest.param({"": "v"}, "invalid_request", id="empty-key"),
    pytest.param({"k": "v" * (MAX_CONTEXT_VALUE_LENGTH + 1)}, "invalid_request", id="long-value"),
    pytest.param({"k" * 257: "v"}, "invalid_request", id="long-key"),
    pytest.param({f"k{i}": "v" * 1000 for i in range(20)}, "invalid_request", id="too-large"),
]


def _context_requests(w: Any, context: Any) -> list[tuple[str, dict[str, Any]]]:
    return [
        ("/v1/keys/enc/encrypt", {"plaintext": b64(b"x"), "context": context}),
        ("/v1/decrypt", {"ciphertext": b64(w.ciphertext), "context": context}),
        ("/v1/re-encrypt", {"ciphertext": b64(w.ciphertext), "context": context}),
        ("/v1/re-encrypt", {"ciphertext": b64(w.ciphertext), "context": w.CONTEXT,
                            "destination_context": context}),
        ("/v1/keys/enc/data-key", {"context": context}),
        ("/v1/keys/der/derive", {"context": context}),
    ]


@pytest.mark.parametrize(("context", "code"), BAD_CONTEXTS)
async def test_bad_contexts_are_400_never_invalid_ciphertext(world, http, context, code) -> None:
    for url, body in _context_requests(world, context):
        r = await http.post(url, json=body, headers=world.auth)
        assert_error(r, 400, code)


@pytest.mark.parametrize(("context", "code"), [p for p in BAD_CONTEXTS if p.values[1] != "malformed_body"])
async def test_bad_contexts_in_batches_fail_per_item(world, http, context, code) -> None:
    r = await http.post("/v1/keys/enc/encrypt-batch", headers=world.auth, json={
        "items": [{"plaintext": b64(b"ok")}, {"plaintext": b64(b"bad"), "context": context}]})
    assert r.status_code == 200
    results = r.json()["results"]
    assert "ciphertext" in results[0]
    assert results[1] == {"error": {"code": code, "message": results[1]["error"]["message"]}}
    r = await http.post("/v1/decrypt-batch", headers=world.auth, json={
        "items": [{"ciphertext": b64(world.ciphertext), "context": context}]})
    assert r.json()["results"][0]["error"]["code"] == code


async def test_context_order_does_not_matter(world, http) -> None:
    reordered = dict(reversed(list(world.CONTEXT.items())))
    r = await http.post("/v1/decrypt", json={"ciphertext": b64(world.ciphertext),
                                             "context": reordered}, headers=world.auth)
    assert r.status_code == 200
    assert base64.b64decode(r.json()["plaintext"]) == world.PLAINTEXT


# -- names --------------------------------------------------------------------------------------

BAD_NAMES = ["has space", "a/b", "a\\b", "-leading-dash", ".leading-dot", "_x", "", "a" * 129,
             "a" * 200, "ключ", "a\x00b", "a%2Fb", "tab\there", str(uuid.uuid4()),
             str(uuid.uuid4()).upper(), uuid.uuid4().hex]


@pytest.mark.parametrize("name", BAD_NAMES)
async def test_invalid_key_and_alias_names_are_400(world, http, name: str) -> None:
    before = world.snapshot()
    assert_error(await http.post("/v1/keys", json={"name": name}, headers=world.auth),
                 400, "invalid_request")
    assert_error(await http.post("/v1/aliases", json={"alias": name, "key": "enc"},
                                 headers=world.auth), 400, "invalid_request")
    assert world.snapshot() == before


@pytest.mark.parametrize("name", ["trailing-newline\n", "a" * 128 + "\n"])
async def test_a_trailing_newline_does_not_slip_past_name_validation(world, http, name) -> None:
    before = world.snapshot()
    assert_error(await http.post("/v1/keys", json={"name": name}, headers=world.auth),
                 400, "invalid_request")
    assert_error(await http.post("/v1/aliases", json={"alias": name, "key": "enc"},
                                 headers=world.auth), 400, "invalid_request")
    assert world.snapshot() == before


@pytest.mark.parametrize("name", ["a", "A1", "key.v2_x-y", "9" * 128])
async def test_valid_names_are_accepted(world, http, name: str) -> None:
    r = await http.post("/v1/keys", json={"name": name}, headers=world.auth)
    assert r.status_code == 201, r.text
    r = await http.get(f"/v1/keys/{name}", headers=world.auth)
    assert r.json()["name"] == name


async def test_a_taken_name_is_409_and_writes_nothing(world, http) -> None:
    before = world.snapshot()
    for body, url in [({"name": "enc"}, "/v1/keys"), ({"name": "enc-alias"}, "/v1/keys"),
                      ({"alias": "sig", "key": "enc"}, "/v1/aliases"),
                      ({"alias": "enc-alias", "key": "sig"}, "/v1/aliases")]:
        assert_error(await http.post(url, json=body, headers=world.auth), 409, "already_exists")
    assert world.snapshot() == before


@pytest.mark.parametrize("body", [
    {"name": "k", "spec": "des"}, {"name": "k", "spec": "AES-256-GCM"},
    {"name": "k", "rotation_period": 59}, {"name": "k", "rotation_period": 0},
    {"name": "k", "rotation_period": -60}, {"name": "k", "rotation_period": 10**12},
    {"name": "k", "description": "d" * 1025}, {"name": "k", "spec": "ed25519", "derivable": True},
    {"name": "k", "spec": "rsa-pss-3072", "derivable": True},
])
async def test_invalid_create_options_are_400_and_create_nothing(world, http, body) -> None:
    before = world.snapshot()
    assert_error(await http.post("/v1/keys", json=body, headers=world.auth), 400, "invalid_request")
    assert world.snapshot() == before


@pytest.mark.parametrize(("body", "status", "code"), [
    ({"rotation_period": 30}, 400, "invalid_request"),
    ({"description": "d" * 1025}, 400, "invalid_request"),
    ({"min_decryption_version": 2}, 409, "key_version"),
    ({"min_decryption_version": 0}, 409, "key_version"),
])
async def test_invalid_updates_change_nothing(world, http, body, status, code) -> None:
    before = world.snapshot()
    assert_error(await http.patch("/v1/keys/enc", json=body, headers=world.auth), status, code)
    assert world.snapshot() == before


@pytest.mark.parametrize("query", ["limit=0", "limit=1001", "limit=abc", "limit=-1", "limit=1e3",
                                   "limit=" + "9" * 11])
async def test_bad_list_queries_are_400(world, http, query: str) -> None:
    assert_error(await http.get(f"/v1/keys?{query}", headers=world.auth), 400, "invalid_request")


async def test_an_oversized_query_string_is_400(world, http) -> None:
    assert_error(await http.get("/v1/keys?after=" + "a" * 5000, headers=world.auth),
                 400, "invalid_request")


# -- key purpose and state ----------------------------------------------------------------------

WRONG_USAGE = [
    ("/v1/keys/enc/sign", {"message": b64(b"m")}),
    ("/v1/keys/enc/verify", {"message": b64(b"m"), "signature": b64(b"s")}),
    ("/v1/keys/enc/mac", {"message": b64(b"m")}),
    ("/v1/keys/enc/verify-mac", {"message": b64(b"m"), "mac": b64(b"t")}),
    ("/v1/keys/enc/derive", {"context": {}}),
    ("/v1/keys/sig/encrypt", {"plaintext": b64(b"p")}),
    ("/v1/keys/sig/encrypt-batch", {"items": [{"plaintext": b64(b"p")}]}),
    ("/v1/keys/sig/data-key", {}),
    ("/v1/keys/sig/mac", {"message": b64(b"m")}),
    ("/v1/keys/sig/derive", {"context": {}}),
    ("/v1/keys/mac/sign", {"message": b64(b"m")}),
    ("/v1/keys/mac/encrypt", {"plaintext": b64(b"p")}),
    ("/v1/keys/mac/data-key", {}),
]


@pytest.mark.parametrize(("url", "body"), WRONG_USAGE, ids=[u for u, _ in WRONG_USAGE])
async def test_operations_outside_the_key_purpose_are_400_invalid_key_usage(world, http, url,
                                                                             body) -> None:
    assert_error(await http.post(url, json=body, headers=world.auth), 400, "invalid_key_usage")


async def test_public_key_of_a_symmetric_key_and_re_encrypt_to_a_signing_key(world, http) -> None:
    assert_error(await http.get("/v1/keys/enc/public-key", headers=world.auth),
                 400, "invalid_key_usage")
    assert_error(await http.post("/v1/re-encrypt", headers=world.auth, json={
        "ciphertext": b64(world.ciphertext), "context": world.CONTEXT, "destination_key": "sig"}),
        400, "invalid_key_usage")


def _state_requests(w: Any, key: str) -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"/v1/keys/{key}/encrypt", {"plaintext": b64(b"p")}),
        (f"/v1/keys/{key}/encrypt-batch", {"items": [{"plaintext": b64(b"p")}]}),
        (f"/v1/keys/{key}/data-key", {}),
        ("/v1/decrypt", {"ciphertext": b64(w.sealed[key])}),
        ("/v1/re-encrypt", {"ciphertext": b64(w.ciphertext), "context": w.CONTEXT,
                            "destination_key": key}),
    ]


@pytest.mark.parametrize(("key", "code"), [("off", "key_disabled"),
                                           ("doomed", "key_pending_deletion")])
async def test_keys_that_are_not_enabled_refuse_cryptographic_operations(world, http, key,
                                                                          code) -> None:
    before = world.snapshot()
    for url, body in _state_requests(world, key):
        assert_error(await http.post(url, json=body, headers=world.auth), 409, code)
    r = await http.post("/v1/decrypt-batch", headers=world.auth,
                        json={"items": [{"ciphertext": b64(world.sealed[key])}]})
    assert r.status_code == 200
    assert r.json()["results"][0]["error"]["code"] == code
    assert world.snapshot() == before


async def test_decrypting_under_a_disabled_key_is_409_until_enabled(world, http) -> None:
    decrypt = {"ciphertext": b64(world.ciphertext), "context": world.CONTEXT}
    assert (await http.post("/v1/keys/enc/disable", headers=world.auth)).status_code == 200
    assert_error(await http.post("/v1/decrypt", json=decrypt, headers=world.auth), 409,
                 "key_disabled")
    assert (await http.post("/v1/keys/enc/schedule-deletion", json={"days": 30},
                            headers=world.auth)).status_code == 200
    assert_error(await http.post("/v1/decrypt", json=decrypt, headers=world.auth), 409,
                 "key_pending_deletion")
    r = await http.post("/v1/keys/enc/cancel-deletion", headers=world.auth)
    assert r.json()["state"] == "disabled"  # the state before the deletion was scheduled
    assert (await http.post("/v1/keys/enc/enable", headers=world.auth)).status_code == 200
    assert (await http.post("/v1/decrypt", json=decrypt, headers=world.auth)).status_code == 200


@pytest.mark.parametrize(("url", "body"), [
    ("/v1/keys/doomed/rotate", None), ("/v1/keys/doomed/disable", None),
    ("/v1/keys/doomed/enable", None), ("/v1/keys/doomed/schedule-deletion", {"days": 7}),
    ("/v1/keys/enc/cancel-deletion", None),
])
async def test_state_transitions_that_do_not_apply_are_409_key_state(world, http, url, body) -> None:
    before = world.snapshot()
    assert_error(await http.post(url, json=body, headers=world.auth), 409, "key_state")
    assert world.snapshot() == before


@pytest.mark.parametrize("days", [0, 6, 31, -7])
async def test_deletion_days_out_of_range_are_400(world, http, days: int) -> None:
    before = world.snapshot()
    assert_error(await http.post("/v1/keys/enc/schedule-deletion", json={"days": days},
                                 headers=world.auth), 400, "invalid_request")
    assert world.snapshot() == before


# -- sizes and batches --------------------------------------------------------------------------

@pytest.mark.parametrize("size", [0, 1, 15, 17, 31, 33, 48, 63, 65, 128, -16, 10**20])
async def test_data_key_sizes_other_than_16_32_64_are_400(world, http, size: int) -> None:
    assert_error(await http.post("/v1/keys/enc/data-key", json={"bytes": size}, headers=world.auth),
                 400, "invalid_request")


@pytest.mark.parametrize("size", [16, 32, 64])
async def test_data_key_sizes(world, http, size: int) -> None:
    r = await http.post("/v1/keys/enc/data-key", json={"bytes": size, "context": {"a": "b"}},
                        headers=world.auth)
    data_key = base64.b64decode(r.json()["plaintext"])
    assert len(data_key) == size
    r = await http.post("/v1/decrypt", headers=world.auth,
                        json={"ciphertext": r.json()["ciphertext"], "context": {"a": "b"}})
    assert base64.b64decode(r.json()["plaintext"]) == data_key


async def test_data_key_without_plaintext(world, http) -> None:
    r = await http.post("/v1/keys/enc/data-key", json={"include_plaintext": False},
                        headers=world.auth)
    assert r.status_code == 200
    assert r.json()["plaintext"] is None


@pytest.mark.parametrize("n", [0, -1, 1025, 100_000, 10**30])
async def test_random_sizes_out_of_range_are_400(world, http, n: int) -> None:
    assert_error(await http.post("/v1/random", json={"bytes": n}, headers=world.auth),
                 400, "invalid_request")


@pytest.mark.parametrize("n", [1, 1024])
async def test_random_size_bounds(world, http, n: int) -> None:
    r = await http.post("/v1/random", json={"bytes": n}, headers=world.auth)
    assert len(base64.b64decode(r.json()["random"])) == n


@pytest.mark.parametrize("length", [0, -1, 1025])
async def test_derive_length_out_of_range_is_400(world, http, length: int) -> None:
    assert_error(await http.post("/v1/keys/der/derive", json={"context": {}, "length": length},
                                 headers=world.auth), 400, "invalid_request")


async def test_derive_salt_over_1024_bytes_is_400(world, http) -> None:
    assert_error(await http.post("/v1/keys/der/derive", headers=world.auth,
                                 json={"context": {}, "salt": b64(b"s" * 1025)}),
                 400, "invalid_request")


@pytest.mark.parametrize(("url", "item"), [("/v1/keys/enc/encrypt-batch", "plaintext"),
                                           ("/v1/decrypt-batch", "ciphertext")])
async def test_batch_of_1001_items_is_413_and_empty_batch_is_400(world, http, url, item) -> None:
    value = b64(world.ciphertext)
    items = [{item: value, "context": world.CONTEXT}] * 1001
    assert_error(await http.post(url, json={"items": items}, headers=world.auth),
                 413, "payload_too_large")
    r = await http.post(url, json={"items": items[:1000]}, headers=world.auth)
    assert r.status_code == 200
    assert len(r.json()["results"]) == 1000
    assert_error(await http.post(url, json={"items": []}, headers=world.auth), 400,
                 "invalid_request")


async def test_batch_decrypt_reports_failures_per_item(world, http) -> None:
    tampered = bytearray(world.ciphertext)
    tampered[-1] ^= 1
    other = world.kms.encrypt(ADMIN, "enc2", b"second").ciphertext
    r = await http.post("/v1/decrypt-batch", headers=world.auth, json={"items": [
        {"ciphertext": b64(world.ciphertext), "context": world.CONTEXT},
        {"ciphertext": b64(bytes(tampered)), "context": world.CONTEXT},
        {"ciphertext": b64(other)},
        {"ciphertext": b64(world.ciphertext)},
    ]})
    assert r.status_code == 200
    results = r.json()["results"]
    assert base64.b64decode(results[0]["plaintext"]) == world.PLAINTEXT
    assert results[0]["key_id"] == world.ids["enc"]
    opaque = {"error": {"code": "invalid_ciphertext", "message": "invalid ciphertext"}}
    assert results[1] == opaque
    assert base64.b64decode(results[2]["plaintext"]) == b"second"
    assert results[3] == opaque


async def test_batch_encrypt_reports_failures_per_item(world, http) -> None:
    limit = world.kms.limits.max_plaintext
    r = await http.post("/v1/keys/enc/encrypt-batch", headers=world.auth, json={"items": [
        {"plaintext": b64(b"fine")}, {"plaintext": b64(b"x" * (limit + 1))}]})
    assert r.status_code == 200
    results = r.json()["results"]
    assert set(results[0]) == {"ciphertext", "key_id", "key_version"}
    assert results[1]["error"]["code"] == "payload_too_large"
    r = await http.post("/v1/decrypt", headers=world.auth, json={"ciphertext": results[0]["ciphertext"]})
    assert base64.b64decode(r.json()["plaintext"]) == b"fine"


# -- tampered ciphertext: one opaque answer -----------------------------------------------------

def _flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


def _tampered(w: Any) -> dict[str, tuple[bytes, Any]]:
    ct, ctx = w.ciphertext, w.CONTEXT
    other = w.kms.encrypt(ADMIN, "enc2", w.PLAINTEXT, ctx).ciphertext
    same_spec = w.kms.encrypt(ADMIN, "der", w.PLAINTEXT, ctx).ciphertext
    return {
        "flip-format": (_flip(ct, 0), ctx),
        "flip-key-id": (_flip(ct, 5), ctx),
        "flip-version": (_flip(ct, 20), ctx),
        "version-2": (ct[:17] + (2).to_bytes(4, "big") + ct[21:], ctx),
        "version-0": (ct[:17] + (0).to_bytes(4, "big") + ct[21:], ctx),
        "flip-nonce": (_flip(ct, 25), ctx),
        "flip-body": (_flip(ct, HEADER_SIZE), ctx),
        "flip-tag": (_flip(ct, len(ct) - 1), ctx),
        "wrong-context": (ct, {"tenant": "t2", "purpose": "test"}),
        "extra-context": (ct, ctx | {"x": "y"}),
        "missing-context": (ct, None),
        "empty-context": (ct, {}),
        "truncated-empty": (b"", ctx),
        "truncated-1": (ct[:1], ctx),
        "truncated-header": (ct[:HEADER_SIZE], ctx),
        "truncated-tag": (ct[:-1], ctx),
        "extended": (ct + b"\x00", ctx),
        "other-key-header": (ct[:1] + uuid.UUID(w.ids["enc2"]).bytes + ct[17:], ctx),
        "same-spec-key-header": (ct[:1] + uuid.UUID(w.ids["der"]).bytes + ct[17:], ctx),
        "other-key-body": (ct[:HEADER_SIZE] + other[HEADER_SIZE:], ctx),
        "spliced-header": (same_spec[:HEADER_SIZE] + ct[HEADER_SIZE:], ctx),
        "unknown-key-id": (ct[:1] + uuid.uuid4().bytes + ct[17:], ctx),
        "random-bytes": (bytes(range(80)), ctx),
    }


async def test_every_tampered_ciphertext_gets_the_same_opaque_answer(world, http) -> None:
    bodies = {}
    for name, (ct, ctx) in _tampered(world).items():
        for url in ("/v1/decrypt", "/v1/re-encrypt"):
            body: dict[str, Any] = {"ciphertext": b64(ct)}
            if ctx is not None:
                body["context"] = ctx
            r = await http.post(url, json=body, headers=world.auth)
            err = assert_error(r, 400, "invalid_ciphertext")
            assert err["message"] == "invalid ciphertext", name
            del err["request_id"]
            bodies[(name, url)] = (r.headers.get("content-type"), json.dumps(err, sort_keys=True))
    assert len(set(bodies.values())) == 1, bodies
    ok = await http.post("/v1/decrypt", headers=world.auth,
                         json={"ciphertext": b64(world.ciphertext), "context": world.CONTEXT})
    assert base64.b64decode(ok.json()["plaintext"]) == world.PLAINTEXT


async def test_every_byte_flip_of_a_ciphertext_is_invalid(world, http) -> None:
    ct = world.ciphertext
    for i in range(len(ct)):
        r = await http.post("/v1/decrypt", headers=world.auth,
                            json={"ciphertext": b64(_flip(ct, i)), "context": world.CONTEXT})
        assert r.json() == {"error": {"code": "invalid_ciphertext", "message": "invalid ciphertext",
                                      "request_id": r.headers["x-request-id"]}}, i


@pytest.mark.parametrize("key", ["sig", "mac"])
async def test_a_header_naming_a_non_encryption_key_is_opaque(world, http, key: str) -> None:
    ct = world.ciphertext[:1] + uuid.UUID(world.ids[key]).bytes + world.ciphertext[17:]
    r = await http.post("/v1/decrypt", headers=world.auth,
                        json={"ciphertext": b64(ct), "context": world.CONTEXT})
    err = assert_error(r, 400, "invalid_ciphertext")
    assert err["message"] == "invalid ciphertext"


async def test_a_ciphertext_from_another_server_is_invalid(world, http, make_world) -> None:
    stranger = make_world()
    ct = stranger.kms.encrypt(ADMIN, "enc", world.PLAINTEXT).ciphertext
    err = assert_error(await http.post("/v1/decrypt", json={"ciphertext": b64(ct)},
                                       headers=world.auth), 400, "invalid_ciphertext")
    assert err["message"] == "invalid ciphertext"


# -- signatures, tags, rotation over HTTP -------------------------------------------------------

async def test_rotation_keeps_old_ciphertext_decryptable_until_the_minimum_version(world,
                                                                                   http) -> None:
    decrypt = {"ciphertext": b64(world.ciphertext), "context": world.CONTEXT}
    assert (await http.post("/v1/keys/enc/rotate", headers=world.auth)).json()["latest_version"] == 2
    r = await http.post("/v1/keys/enc/encrypt", json={"plaintext": b64(b"new")}, headers=world.auth)
    assert r.json()["key_version"] == 2
    r = await http.post("/v1/decrypt", json=decrypt, headers=world.auth)
    assert r.json()["key_version"] == 1
    r = await http.post("/v1/re-encrypt", json=decrypt, headers=world.auth)
    assert (r.json()["key_version"], r.json()["source_key_version"]) == (2, 1)
    r = await http.patch("/v1/keys/enc", json={"min_decryption_version": 2}, headers=world.auth)
    assert r.json()["min_decryption_version"] == 2
    assert_error(await http.post("/v1/decrypt", json=decrypt, headers=world.auth), 400,
                 "invalid_ciphertext")


async def test_bad_signatures_and_tags_are_valid_false_not_errors(world, http) -> None:
    for url, body in [
        ("/v1/keys/sig/verify", {"message": b64(b"other"), "signature": b64(world.signature)}),
        ("/v1/keys/sig/verify", {"message": b64(world.MESSAGE), "signature": b64(b"")}),
        ("/v1/keys/sig/verify", {"message": b64(world.MESSAGE), "signature": b64(b"\x00" * 64)}),
        ("/v1/keys/mac/verify-mac", {"message": b64(b"other"), "mac": b64(world.tag)}),
        ("/v1/keys/mac/verify-mac", {"message": b64(world.MESSAGE), "mac": b64(world.tag[:-1])}),
    ]:
        r = await http.post(url, json=body, headers=world.auth)
        assert r.status_code == 200, r.text
        assert r.json()["valid"] is False
        assert r.json()["key_version"] is None


@pytest.mark.parametrize("url", ["/v1/keys/sig/verify", "/v1/keys/mac/verify-mac",
                                 "/v1/keys/der/derive", "/v1/keys/sig/public-key"])
async def test_an_unknown_key_version_is_409(world, http, url: str) -> None:
    body = {"verify": {"message": b64(world.MESSAGE), "signature": b64(world.signature),
                       "key_version": 7},
            "verify-mac": {"message": b64(world.MESSAGE), "mac": b64(world.tag), "key_version": 7},
            "derive": {"context": {}, "key_version": 7}}.get(url.rsplit("/", 1)[1])
    if body is None:
        r = await http.get(url + "?version=7", headers=world.auth)
    else:
        r = await http.post(url, json=body, headers=world.auth)
    assert_error(r, 409, "key_version")


async def test_ed25519_refuses_digest_mode(world, http) -> None:
    digest = hashlib.sha256(world.MESSAGE).digest()
    assert_error(await http.post("/v1/keys/sig/sign", headers=world.auth,
                                 json={"message": b64(digest), "message_type": "digest"}),
                 400, "invalid_request")


# -- authorization: every endpoint refuses a principal without the right policy ---------------

# the policy action each endpoint needs (whoami needs none: anyone may ask who they are)
ACTIONS_NEEDED: dict[str, str] = {
    "createKey": "create_key", "listKeys": "list_keys", "describeKey": "describe_key",
    "updateKey": "update_key", "rotateKey": "rotate_key", "disableKey": "disable_key",
    "enableKey": "enable_key", "scheduleKeyDeletion": "schedule_key_deletion",
    "cancelKeyDeletion": "cancel_key_deletion", "getPublicKey": "get_public_key",
    "encrypt": "encrypt", "batchEncrypt": "encrypt", "decrypt": "decrypt",
    "batchDecrypt": "decrypt", "reEncrypt": "re_encrypt", "generateDataKey": "generate_data_key",
    "sign": "sign", "verify": "verify", "mac": "mac", "verifyMac": "verify_mac",
    "derive": "derive", "generateRandom": "generate_random", "createAlias": "create_alias",
    "listAliases": "list_aliases", "deleteAlias": "delete_alias",
    "auditCheckpoint": "read_audit", "auditCheckpointNow": "checkpoint_audit",
    "auditSearch": "read_audit", "auditInclusionProof": "read_audit",
    "auditConsistencyProof": "read_audit", "auditExport": "read_audit", "auditHash": "read_audit",
    "auditKey": "read_audit", "createPrincipal": "create_principal",
    "listPrincipals": "list_principals", "describePrincipal": "describe_principal",
    "updatePrincipal": "update_principal", "disablePrincipal": "update_principal",
    "enablePrincipal": "update_principal", "deletePrincipal": "delete_principal",
    "listCredentials": "describe_principal", "addPublicKey": "manage_credentials",
    "createApiKey": "manage_credentials", "addCertificate": "manage_credentials",
    "createSharedSecret": "manage_credentials",
    "revokeCredential": "manage_credentials", "listPolicies": "list_policies",
    "testPolicy": "test_policy", "getPolicy": "get_policy", "putPolicy": "put_policy",
    "deletePolicy": "delete_policy", "createGrant": "create_grant", "listGrants": "list_grants",
    "revokeAllGrants": "revoke_grant", "describeGrant": "list_grants",
    "revokeGrant": "revoke_grant", "approveGrant": "approve_grant", "rejectGrant": "approve_grant",
    "rotateIssuerKey": "rotate_issuer_key", "metrics": "read_metrics",
}
# decided by who the caller is, not by policy: whoami (anyone), and the grant's own parties:
# a grant token for its grantee or creator, retiring by the grantee or retiring principal,
# exchanging the caller's own grant token (tests/api/test_grants_http.py covers them)
NOT_POLICY = frozenset({"whoami", "grantToken", "retireGrant", "exchangeGrant"})
NEEDS_POLICY = [e for e in AUTHENTICATED if e.operation_id not in NOT_POLICY]


def test_every_authenticated_endpoint_names_its_action() -> None:
    from keygrants.policy import ACTIONS

    assert set(ACTIONS_NEEDED) == {e.operation_id for e in NEEDS_POLICY}
    assert set(ACTIONS_NEEDED.values()) <= set(ACTIONS)


def _principal_with_api_key(world: Any, name: str) -> str:
    from keygrants.models import CreateApiKeyRequest, CreatePrincipalRequest

    world.access.service.create_principal(ADMIN, CreatePrincipalRequest(id=name))
    return world.access.service.create_api_key(ADMIN, name, CreateApiKeyRequest()).api_key


@pytest.mark.parametrize("endpoint", NEEDS_POLICY, ids=lambda e: e.operation_id)
async def test_every_endpoint_refuses_a_principal_without_the_right_policy(
        world, http, endpoint: Endpoint) -> None:
    api_key = _principal_with_api_key(world, "nobody")
    # a policy for some other action must not help
    other = "mac" if ACTIONS_NEEDED[endpoint.operation_id] != "mac" else "sign"
    world.access.service.put_policy(ADMIN, "other", _put(
        f'permit(principal == Keygrants::Principal::"nobody", '
        f'action == Keygrants::Action::"{other}", resource);'))
    url, body = case_for(endpoint, world)
    before = world.snapshot()
    r = await send(http, endpoint, url, body, {"Authorization": f"Bearer {api_key}"})
    assert_error(r, 403, "forbidden")
    assert world.snapshot() == before
    event = decode_event(world.audit.log.event_data(int(r.headers["x-audit-index"])) or b"")
    assert (event.result, event.principal, event.reason) == ("denied", "nobody", "forbidden")
    assert event.detail["policy"].startswith("deny")


@pytest.mark.parametrize("endpoint", NEEDS_POLICY, ids=lambda e: e.operation_id)
async def test_every_endpoint_accepts_a_principal_with_the_right_policy(
        world, http, endpoint: Endpoint) -> None:
    api_key = _principal_with_api_key(world, "somebody")
    action = ACTIONS_NEEDED[endpoint.operation_id]
    world.access.service.put_policy(ADMIN, "just-this", _put(
        f'permit(principal == Keygrants::Principal::"somebody", '
        f'action == Keygrants::Action::"{action}", resource);'))
    url, body = case_for(endpoint, world)
    r = await send(http, endpoint, url, body, {"Authorization": f"Bearer {api_key}"})
    assert r.status_code == endpoint.status, r.text
    if endpoint.operation_id != "auditExport" and endpoint.status != 204:
        event_index = r.headers.get("x-audit-index")
        assert event_index is not None
        event = decode_event(world.audit.log.event_data(int(event_index)) or b"")
        from keygrants.auth.credentials import parse_api_key

        parsed = parse_api_key(api_key)
        assert parsed is not None
        assert (event.principal, event.credential) == ("somebody", parsed.credential_id)
        assert event.detail["policy"] == "just-this#1", event.detail


def _put(text: str) -> Any:
    from keygrants.models import PutPolicyRequest

    return PutPolicyRequest(text=text)
