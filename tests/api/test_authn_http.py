"""Authentication at the HTTP edge: RFC 9421 signatures, API keys, credential lifecycle, rate
limits, authorize-before-revealing and the lockout-free admin."""

from __future__ import annotations

import base64
import time
from typing import Any

import httpx
import pytest

from keygrants.api.app import create_app
from keygrants.audit.events import decode_event
from keygrants.auth import ADMIN_PRINCIPAL, RequestContext
from keygrants.auth.credentials import jwk_thumbprint
from keygrants.auth.httpsig import Message, check_authority, sign_message
from keygrants.auth.ratelimit import RateLimiter
from keygrants.client._signing import SignatureAuth
from keygrants.crypto.signing import SigningKey
from keygrants.models import (
    AddCertificateRequest,
    AddPublicKeyRequest,
    CreateApiKeyRequest,
    CreatePrincipalRequest,
    PutPolicyRequest,
)

pytestmark = pytest.mark.anyio

ADMIN = RequestContext(principal=ADMIN_PRINCIPAL, request_id="fixture")
ENCRYPT_BODY = {"plaintext": base64.b64encode(b"hello").decode(), "context": {"tenant": "42"}}


def register_key(world: Any, principal: str, algorithm: str = "ed25519",
                 **window: int) -> tuple[SigningKey, str]:
    key = SigningKey.generate(algorithm)  # type: ignore[arg-type]
    if world.store.get_principal(principal) is None:
        world.access.service.create_principal(ADMIN, CreatePrincipalRequest(id=principal))
    cred = world.access.service.add_public_key(
        ADMIN, principal, AddPublicKeyRequest(public_key=key.public_key().public_pem(), **window))
    assert cred.id == jwk_thumbprint(key.public_key().jwk())
    return key, f"{principal}/{cred.id}"


def allow_encrypt(world: Any, principal: str) -> None:
    world.access.service.put_policy(ADMIN, f"{principal}-enc", PutPolicyRequest(text=f'''
        permit(principal == Keygrants::Principal::"{principal}",
               action in [Keygrants::Action::"encrypt", Keygrants::Action::"describe_key"],
               resource) when {{ resource.name == "enc" }};'''))


def signed(world: Any, key: SigningKey | bytes, keyid: str, **kw: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=world.app), base_url="http://test",
                             auth=SignatureAuth(keyid, key, **kw))


def sign_request(key: SigningKey, keyid: str, method: str, url: str, *, json: Any = None,
                 clock: Any = time.time) -> httpx.Request:
    request = httpx.Request(method, "http://test" + url, json=json)
    SignatureAuth(keyid, key, clock=clock).sign(request)
    return request


async def send_raw(world: Any, request: httpx.Request) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=world.app)) as client:
        return await client.send(request)


def audited(world: Any, r: httpx.Response) -> Any:
    return decode_event(world.audit.log.event_data(int(r.headers["x-audit-index"])) or b"")


@pytest.mark.parametrize("algorithm", ["ed25519", "ecdsa-p256-sha256"])
async def test_a_signed_request_authenticates_its_principal(world, algorithm: str) -> None:
    key, keyid = register_key(world, "svc-a", algorithm)
    allow_encrypt(world, "svc-a")
    async with signed(world, key, keyid) as client:
        me = await client.get("/v1/whoami")
        assert me.status_code == 200, me.text
        assert me.json()["principal"] == "svc-a" and me.json()["auth_method"] == "signature"
        asked = audited(world, me)  # like every authenticated request (it was not audited)
        assert (asked.type, asked.result, asked.principal) == ("principal.whoami", "ok", "svc-a")
        r = await client.post("/v1/keys/enc/encrypt", json=ENCRYPT_BODY)
        assert r.status_code == 200, r.text
        event = audited(world, r)
        assert (event.principal, event.credential, event.detail["auth"], event.detail["policy"]) \
            == ("svc-a", keyid.split("/")[1], "signature", "svc-a-enc#1")
        denied = await client.post("/v1/keys/enc2/encrypt", json=ENCRYPT_BODY)
        assert denied.status_code == 403 and denied.json()["error"]["code"] == "forbidden"


async def test_every_signature_failure_has_its_code_and_no_effect(world) -> None:
    key, keyid = register_key(world, "svc-b")
    allow_encrypt(world, "svc-b")
    url = "/v1/keys/enc/encrypt"

    def fresh(**kw: Any) -> httpx.Request:
        return sign_request(key, keyid, "POST", url, json=ENCRYPT_BODY, **kw)

    cases: list[tuple[str, httpx.Request, int, str]] = []
    r = fresh()
    r.headers["Signature"] = r.headers["Signature"][:-6] + "AAAA=:"
    cases.append(("tampered signature", r, 401, "signature_invalid"))
    r = fresh()
    r = httpx.Request("POST", r.url, headers=r.headers, content=r.content.replace(b"42", b"43"))
    cases.append(("body changed after signing", r, 401, "digest_mismatch"))
    r = fresh()
    del r.headers["Content-Digest"]
    cases.append(("digest removed", r, 401, "digest_mismatch"))
    cases.append(("expired created", fresh(clock=lambda: time.time() - 3600), 401,
                  "signature_expired"))
    cases.append(("future created", fresh(clock=lambda: time.time() + 600), 401,
                  "signature_expired"))
    r = fresh()
    r.headers["Signature-Input"] = r.headers["Signature-Input"].replace(keyid, "svc-b/nope")
    cases.append(("unknown keyid", r, 401, "unknown_key"))
    for bad in ['sig1=("@method"', "sig1=oops", 'sig1=("@method");created="x"', "", "(((("]:
        r = fresh()
        r.headers["Signature-Input"] = bad
        cases.append((f"malformed Signature-Input {bad!r}", r, 401, "signature_invalid"))
    r = fresh()
    r.headers["Signature-Input"] = 'sig1=("@method" ' + '"x-a" ' * 3000 + ")"
    cases.append(("oversize header", r, 431, "header_too_large"))
    before = world.snapshot()
    for name, request, status, code in cases:
        response = await send_raw(world, request)
        assert (response.status_code, response.json()["error"]["code"]) == (status, code), name
        event = audited(world, response)
        assert (event.type, event.result, event.reason) == ("auth.failure", "denied", code), name
    assert world.snapshot() == before
    assert world.app.auth_failures["signature_invalid"] >= 6


async def test_a_replayed_request_is_refused(world) -> None:
    key, keyid = register_key(world, "svc-c")
    allow_encrypt(world, "svc-c")
    request = sign_request(key, keyid, "POST", "/v1/keys/enc/encrypt", json=ENCRYPT_BODY)
    first = await send_raw(world, request)
    assert first.status_code == 200, first.text
    again = await send_raw(world, request)
    assert (again.status_code, again.json()["error"]["code"]) == (401, "nonce_replayed")


async def test_revoking_a_key_or_disabling_a_principal_takes_effect_on_the_next_request(world) -> None:
    old, old_keyid = register_key(world, "svc-d")
    new, new_keyid = register_key(world, "svc-d")  # rotation without downtime: two live keys
    async with signed(world, old, old_keyid) as c_old, signed(world, new, new_keyid) as c_new:
        assert (await c_old.get("/v1/whoami")).status_code == 200
        assert (await c_new.get("/v1/whoami")).status_code == 200
        world.access.service.revoke_credential(ADMIN, "svc-d", old_keyid.split("/")[1])
        r = await c_old.get("/v1/whoami")
        assert (r.status_code, r.json()["error"]["code"]) == (401, "credential_revoked")
        assert (await c_new.get("/v1/whoami")).status_code == 200
        world.access.service.disable_principal(ADMIN, "svc-d")
        r = await c_new.get("/v1/whoami")
        assert (r.status_code, r.json()["error"]["code"]) == (401, "principal_disabled")
        world.access.service.enable_principal(ADMIN, "svc-d")
        assert (await c_new.get("/v1/whoami")).status_code == 200


async def test_credential_validity_windows(world, http) -> None:
    now = int(time.time())
    key, keyid = register_key(world, "svc-e", not_before=now + 3600)
    async with signed(world, key, keyid) as client:
        r = await client.get("/v1/whoami")
        assert (r.status_code, r.json()["error"]["code"]) == (401, "credential_expired")
    created = world.access.service.create_api_key(ADMIN, "svc-e",
                                                  CreateApiKeyRequest(expires_in=3600))
    ok = await http.get("/v1/whoami", headers={"Authorization": f"Bearer {created.api_key}"})
    assert ok.status_code == 200 and ok.json()["auth_method"] == "api_key"
    world.access.service.revoke_credential(ADMIN, "svc-e", created.credential.id)
    r = await http.get("/v1/whoami", headers={"Authorization": f"Bearer {created.api_key}"})
    assert (r.status_code, r.json()["error"]["code"]) == (401, "credential_revoked")


async def test_api_keys_are_stored_only_as_keyed_hashes(world) -> None:
    created = world.access.service.create_api_key(ADMIN, "svc", CreateApiKeyRequest())
    stored = world.store.get_credential(created.credential.id)
    assert stored is not None and stored.secret_digest is not None
    assert created.api_key.encode() not in repr(stored).encode()
    # the 43-character secret after kg_ak_<16 hex>_ (split("_") would cut it where its base64url
    # has an underscore, and a one-character piece turns up in a 32-byte digest by chance)
    secret = created.api_key[len("kg_ak_") + 17:]
    assert len(secret) == 43
    assert secret.encode() not in stored.secret_digest
    assert base64.urlsafe_b64decode(secret + "=") != stored.secret_digest
    assert "api_key=<redacted>" in repr(created)


async def test_hmac_signatures_are_not_accepted_for_public_key_credentials(world) -> None:
    _, keyid = register_key(world, "svc-f")
    async with signed(world, b"a shared secret of 32 bytes, at least", keyid) as client:
        r = await client.get("/v1/whoami")
    assert r.status_code == 401 and r.json()["error"]["code"] == "signature_invalid"


async def test_unknown_keys_are_forbidden_not_revealed_to_principals_without_rights(world, http) -> None:
    created = world.access.service.create_api_key(ADMIN, "svc", CreateApiKeyRequest())
    headers = {"Authorization": f"Bearer {created.api_key}"}
    # svc may encrypt with "enc" only: a missing key and an existing one look the same to it
    for ref in ("no-such-key", "enc2"):
        r = await http.post(f"/v1/keys/{ref}/encrypt", json=ENCRYPT_BODY, headers=headers)
        assert (r.status_code, r.json()["error"]["code"]) == (403, "forbidden"), ref
    world.access.service.put_policy(ADMIN, "all-encrypt", PutPolicyRequest(
        text='permit(principal == Keygrants::Principal::"svc", '
             'action == Keygrants::Action::"encrypt", resource);'))
    r = await http.post("/v1/keys/no-such-key/encrypt", json=ENCRYPT_BODY, headers=headers)
    assert (r.status_code, r.json()["error"]["code"]) == (404, "key_not_found")


async def test_no_policy_can_lock_out_the_admin(world, http) -> None:
    world.access.service.put_policy(ADMIN, "deny-all", PutPolicyRequest(
        text="forbid(principal, action, resource);"))
    assert (await http.get("/v1/keys", headers=world.auth)).status_code == 200
    for path in ("/v1/principals/admin/disable",):
        r = await http.post(path, headers=world.auth)
        assert (r.status_code, r.json()["error"]["code"]) == (403, "forbidden")
    r = await http.delete("/v1/principals/admin", headers=world.auth)
    assert r.status_code == 403
    assert (await http.get("/v1/whoami", headers=world.auth)).json()["principal"] == "admin"


async def test_the_rate_limit_answers_429_with_retry_after(world) -> None:
    now = [1000.0]
    limiter = RateLimiter(2, 3, clock=lambda: now[0])
    app = create_app(world.kms, world.access.authenticator, access=world.access.service,
                     rate_limiter=limiter)
    created = world.access.service.create_api_key(ADMIN, "svc", CreateApiKeyRequest())
    headers = {"Authorization": f"Bearer {created.api_key}"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://test") as client:
        codes = [(await client.get("/v1/whoami", headers=headers)).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        r = await client.get("/v1/whoami", headers=headers)
        assert r.json()["error"]["code"] == "rate_limited" and r.headers["retry-after"] == "1"
        event = audited(world, r)  # which of the principal's credentials was refused
        assert (event.type, event.principal, event.credential) == (
            "request.rate_limited", "svc", created.credential.id)
        # the admin is never limited by another principal's traffic, nor by its own
        for _ in range(10):
            assert (await client.get("/v1/whoami", headers=world.auth)).status_code == 200
        now[0] += 1.0  # two tokens back
        assert (await client.get("/v1/whoami", headers=headers)).status_code == 200


async def test_policy_test_explains_the_decision(world, http) -> None:
    r = await http.post("/v1/policy-test", headers=world.auth, json={
        "principal": "svc", "action": "encrypt", "key": "enc2"})
    body = r.json()
    assert (body["allowed"], body["reasons"]) == (False, [])
    assert "default deny" in body["explanation"]
    r = await http.post("/v1/policy-test", headers=world.auth, json={
        "principal": "svc", "action": "encrypt", "key": "enc"})
    assert r.json()["allowed"] and "svc-encrypt#1" in r.json()["explanation"]


async def test_an_invalid_policy_is_refused_and_the_old_one_stays(world, http) -> None:
    bad = await http.put("/v1/policies/svc-encrypt", headers=world.auth,
                         json={"text": "permit(principal, action, resource) when { oops"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "policy_invalid"
    schema = await http.put("/v1/policies/svc-encrypt", headers=world.auth,
                            json={"text": "permit(principal, action, resource) when "
                                          "{ resource.no_such_attribute == 1 };"})
    assert schema.status_code == 400 and schema.json()["error"]["code"] == "policy_invalid"
    kept = await http.get("/v1/policies/svc-encrypt", headers=world.auth)
    assert 'resource.name == "enc"' in kept.json()["text"]
    created = world.access.service.create_api_key(ADMIN, "svc", CreateApiKeyRequest())
    ok = await http.post("/v1/keys/enc/encrypt", json=ENCRYPT_BODY,
                         headers={"Authorization": f"Bearer {created.api_key}"})
    assert ok.status_code == 200


async def test_a_shared_secret_signs_with_hmac_sha256(world) -> None:
    from keygrants.auth.credentials import parse_shared_secret

    created = world.access.service.create_shared_secret(ADMIN, "svc", CreateApiKeyRequest())
    stored = world.store.get_credential(created.credential.id)
    parsed = parse_shared_secret(created.shared_secret)
    assert stored is not None and stored.sealed_secret is not None and parsed is not None
    assert parsed[1] not in stored.sealed_secret  # sealed, not in clear
    async with signed(world, parsed[1], created.credential.keyid) as client:
        me = await client.get("/v1/whoami")
        assert (me.status_code, me.json()["credential"]) == (200, created.credential.id)
        r = await client.post("/v1/keys/enc/encrypt", json=ENCRYPT_BODY)
        assert r.status_code == 200, r.text
    async with signed(world, b"\x00" * 32, created.credential.keyid) as client:
        r = await client.get("/v1/whoami")
        assert (r.status_code, r.json()["error"]["code"]) == (401, "signature_invalid")
    world.access.service.revoke_credential(ADMIN, "svc", created.credential.id)
    async with signed(world, parsed[1], created.credential.keyid) as client:
        r = await client.get("/v1/whoami")
        assert (r.status_code, r.json()["error"]["code"]) == (401, "credential_revoked")


async def test_policies_match_key_tags_and_see_tag_changes_at_once(world, http) -> None:
    created = world.access.service.create_api_key(ADMIN, "svc", CreateApiKeyRequest())
    headers = {"Authorization": f"Bearer {created.api_key}"}
    r = await http.post("/v1/keys", headers=world.auth, json={"name": "card-data", "tags": ["pci"]})
    assert r.status_code == 201 and r.json()["tags"] == ["pci"]
    world.access.service.put_policy(ADMIN, "pci", PutPolicyRequest(text='''
        permit(principal in Keygrants::Group::"payments", action == Keygrants::Action::"encrypt",
               resource) when { resource.tags.contains("pci") };'''))
    ok = await http.post("/v1/keys/card-data/encrypt", json=ENCRYPT_BODY, headers=headers)
    assert ok.status_code == 200, ok.text
    r = await http.patch("/v1/keys/card-data", headers=world.auth, json={"tags": ["public"]})
    assert r.json()["tags"] == ["public"]
    denied = await http.post("/v1/keys/card-data/encrypt", json=ENCRYPT_BODY, headers=headers)
    assert denied.status_code == 403
    bad = await http.patch("/v1/keys/card-data", headers=world.auth, json={"tags": ["no spaces"]})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_request"


async def test_listing_every_alias_needs_list_keys(world, http) -> None:
    created = world.access.service.create_api_key(ADMIN, "svc", CreateApiKeyRequest())
    headers = {"Authorization": f"Bearer {created.api_key}"}
    r = await http.get("/v1/aliases", headers=headers)
    assert (r.status_code, r.json()["error"]["code"]) == (403, "forbidden")
    world.access.service.put_policy(ADMIN, "lister", PutPolicyRequest(
        text='permit(principal == Keygrants::Principal::"svc", '
             'action == Keygrants::Action::"list_keys", resource);'))
    r = await http.get("/v1/aliases", headers=headers)
    assert r.status_code == 200 and [a["alias"] for a in r.json()] == ["enc-alias"]


async def test_principal_admins_cannot_reach_the_builtin_admin(world, http) -> None:
    world.access.service.create_principal(ADMIN, CreatePrincipalRequest(id="helpdesk"))
    key = world.access.service.create_api_key(ADMIN, "helpdesk", CreateApiKeyRequest()).api_key
    world.access.service.put_policy(ADMIN, "helpdesk", PutPolicyRequest(text='''
        permit(principal == Keygrants::Principal::"helpdesk",
               action in [Keygrants::Action::"manage_credentials",
                          Keygrants::Action::"update_principal"], resource);'''))
    headers = {"Authorization": f"Bearer {key}"}
    for method, path, body in (("POST", "/v1/principals/admin/api-keys", {}),
                               ("POST", "/v1/principals/admin/keys",
                                {"public_key": SigningKey.generate("ed25519").public_key()
                                 .public_pem()}),
                               ("PATCH", "/v1/principals/admin", {"tags": ["x"]}),
                               ("POST", "/v1/principals/admin/disable", None)):
        r = await http.request(method, path, json=body, headers=headers)
        assert (r.status_code, r.json()["error"]["code"]) == (403, "forbidden"), path
    # ... while other principals stay within its (powerful, documented) rights
    r = await http.post("/v1/principals/svc/api-keys", json={}, headers=headers)
    assert r.status_code == 201
    r = await http.post("/v1/principals/admin/api-keys", json={}, headers=world.auth)
    assert r.status_code == 201  # the admin may manage itself


async def test_a_deleted_principals_certificate_rule_goes_with_it(world, http, monkeypatch) -> None:
    from keygrants.auth.authenticator import AuthRequest, AuthSettings

    monkeypatch.setattr(world.access.authenticator, "settings",
                        AuthSettings(methods=frozenset({"mtls", "admin_token"})))
    world.access.service.create_principal(ADMIN, CreatePrincipalRequest(id="billing"))
    cred = world.access.service.add_certificate(ADMIN, "billing", AddCertificateRequest(
        match="subject:CN=billing"))
    directory = world.access.directory
    directory.touch("billing", cred.id, int(time.time()))
    directory.flush_usage()  # replaces the credential record in the directory
    assert directory.credential_for_match("subject:CN=billing").last_used_at is not None
    world.access.service.delete_principal(ADMIN, "billing")
    assert directory.credential_for_match("subject:CN=billing") is None
    world.access.service.create_principal(ADMIN, CreatePrincipalRequest(id="billing"))
    with pytest.raises(Exception) as info:
        world.access.authenticator.authenticate(AuthRequest(
            method="GET", target_uri="", client_cert=_self_signed_der("billing")))
    assert getattr(info.value, "code", None) == "unknown_key"
    # a revoked rule may be given again
    again = world.access.service.add_certificate(ADMIN, "billing", AddCertificateRequest(
        match="subject:CN=billing"))
    world.access.service.revoke_credential(ADMIN, "billing", again.id)
    world.access.service.add_certificate(ADMIN, "billing", AddCertificateRequest(
        match="subject:CN=billing"))


def _self_signed_der(cn: str) -> bytes:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(hours=1)).sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.DER)


async def test_rate_limited_signatures_spend_no_nonce(world) -> None:
    from keygrants.auth.authenticator import AuthRequest
    from keygrants.errors import RateLimited

    key, keyid = register_key(world, "svc-r")
    limiter = RateLimiter(0.001, 1)
    authn = world.access.authenticator
    before = len(authn.nonces)
    for i in range(3):
        request = sign_request(key, keyid, "GET", "/v1/whoami")
        headers = {k.lower(): v for k, v in request.headers.items()}
        auth = AuthRequest(method="GET", target_uri=str(request.url),
                           signature_input=headers["signature-input"],
                           signature=headers["signature"], headers=lambda h=headers: h)
        if i == 0:
            assert authn.authenticate(auth, rate_limiter=limiter).principal == "svc-r"
        else:
            with pytest.raises(RateLimited):
                authn.authenticate(auth, rate_limiter=limiter)
    assert len(authn.nonces) == before + 1


async def test_replaying_a_captured_request_spends_none_of_the_signers_rate_limit(world) -> None:
    """A replay used to pass the signature check and take one of the signer's rate-limit
    tokens before its nonce was refused: anyone who saw one request could starve its signer."""
    from keygrants.auth.authenticator import AuthRequest
    from keygrants.errors import NonceReplayed

    key, keyid = register_key(world, "svc-replayed")
    limiter = RateLimiter(0.001, 2)
    authn = world.access.authenticator

    def auth_request(request: httpx.Request) -> AuthRequest:
        headers = {k.lower(): v for k, v in request.headers.items()}
        return AuthRequest(method="GET", target_uri=str(request.url),
                           signature_input=headers["signature-input"],
                           signature=headers["signature"], headers=lambda: headers)

    captured = sign_request(key, keyid, "GET", "/v1/whoami")
    assert authn.authenticate(auth_request(captured), rate_limiter=limiter).principal == "svc-replayed"
    for _ in range(3):
        with pytest.raises(NonceReplayed):
            authn.authenticate(auth_request(captured), rate_limiter=limiter)
    fresh = sign_request(key, keyid, "GET", "/v1/whoami")  # the second token is still there
    assert authn.authenticate(auth_request(fresh), rate_limiter=limiter).principal == "svc-replayed"


def test_a_principals_keys_share_one_quota_of_the_replay_cache(world) -> None:
    """Each key used to get a quarter of the cache: four keys of one principal filled it and
    every other signer was refused."""
    from keygrants.auth.authenticator import Authenticator, AuthRequest, AuthSettings
    from keygrants.errors import NonceReplayed

    old = world.access.authenticator
    authn = Authenticator(old.directory, old._admin_digest, old._api_key_hmac_key,
                          settings=AuthSettings(nonce_cache_size=8))  # 2 per principal
    keys = [register_key(world, "svc-many") for _ in range(4)]
    victim = register_key(world, "svc-victim")

    def attempt(key: SigningKey, keyid: str) -> None:
        request = sign_request(key, keyid, "GET", "/v1/whoami")
        headers = {k.lower(): v for k, v in request.headers.items()}
        authn.authenticate(AuthRequest(method="GET", target_uri=str(request.url),
                                       signature_input=headers["signature-input"],
                                       signature=headers["signature"], headers=lambda: headers))

    attempt(*keys[0])
    attempt(*keys[1])
    for key in keys[2:]:
        with pytest.raises(NonceReplayed, match="this signer"):
            attempt(*key)
    attempt(*victim)
    attempt(*victim)


async def test_odd_inputs_are_4xx_not_500(world, http) -> None:
    key, keyid = register_key(world, "svc-o")
    signed_request = sign_request(key, keyid, "POST", "/v1/keys/enc/encrypt", json=ENCRYPT_BODY)
    raw = [(k.encode(), v.encode()) for k, v in signed_request.headers.items()
           if k.lower() != "content-digest"] + [(b"content-digest", b"sha-256=:" + b"\xe9" * 44 + b":")]
    request = httpx.Request("POST", signed_request.url, headers=raw, content=signed_request.content)
    r = await send_raw(world, request)
    assert (r.status_code, r.json()["error"]["code"]) == (401, "digest_mismatch")
    r = await http.post("/v1/principals/svc/api-keys", headers=world.auth,
                        json={"expires_at": 10**12})
    assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_request")
    assert (await http.get("/v1/principals/svc", headers=world.auth)).status_code == 200
    for body in ({"principal": "svc", "action": "encrypt", "key": "enc", "time": -1},
                 {"principal": "svc", "action": "create_grant", "key": "enc",
                  "grant": {"ttl": -5}}):
        r = await http.post("/v1/policy-test", headers=world.auth, json=body)
        assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_request"), body
    # digits that are not ASCII ("²", "①") passed isdigit() and failed int(): a 500, also on
    # the public revocation feed
    for path in ("/v1/keys?limit=%C2%B2", "/v1/revocations?since=%C2%B3",
                 "/v1/grants?limit=%E2%91%A0", "/v1/keys/sig/public-key?version=%C2%B2"):
        r = await http.get(path, headers=world.auth)
        assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_request"), path


async def test_retagging_a_key_needs_the_right_to_update_it_as_it_will_be(world, http) -> None:
    created = world.access.service.create_api_key(ADMIN, "svc", CreateApiKeyRequest())
    headers = {"Authorization": f"Bearer {created.api_key}"}
    world.access.service.put_policy(ADMIN, "keyadmin", PutPolicyRequest(text='''
        permit(principal == Keygrants::Principal::"svc", action == Keygrants::Action::"update_key",
               resource) when { !resource.tags.contains("pci") };'''))
    ok = await http.patch("/v1/keys/enc2", headers=headers, json={"description": "fine"})
    assert ok.status_code == 200, ok.text
    r = await http.patch("/v1/keys/enc2", headers=headers, json={"tags": ["pci"]})
    assert (r.status_code, r.json()["error"]["code"]) == (403, "forbidden")


def test_the_decision_memo_never_outlives_a_policy_change(world) -> None:
    from keygrants.policy import PolicyEngine

    authorizer = world.access.authorizer
    ctx = RequestContext(principal="svc", auth_method="api_key")
    key, aliases = world.kms.key_with_aliases("enc")
    authorizer.authorize(ctx, "encrypt", key, aliases=aliases)  # allowed by svc-encrypt
    authorizer.engine = PolicyEngine({})
    with pytest.raises(Exception) as info:
        authorizer.authorize(ctx, "encrypt", key, aliases=aliases)
    assert getattr(info.value, "code", None) == "forbidden"


async def test_deleting_an_alias_is_decided_on_the_key_it_names(world, http) -> None:
    created = world.access.service.create_api_key(ADMIN, "svc", CreateApiKeyRequest())
    headers = {"Authorization": f"Bearer {created.api_key}"}
    world.access.service.put_policy(ADMIN, "aliases", PutPolicyRequest(text='''
        permit(principal == Keygrants::Principal::"svc", action == Keygrants::Action::"delete_alias",
               resource) when { resource.name == "enc2" };'''))
    r = await http.delete("/v1/aliases/enc-alias", headers=headers)  # names "enc"
    assert (r.status_code, r.json()["error"]["code"]) == (403, "forbidden")
    r = await http.delete("/v1/aliases/no-such-alias", headers=headers)
    assert (r.status_code, r.json()["error"]["code"]) == (403, "forbidden")
    world.kms.create_alias(ADMIN, "enc2-alias", "enc2")
    assert (await http.delete("/v1/aliases/enc2-alias", headers=headers)).status_code == 204
    r = await http.delete("/v1/aliases/no-such-alias", headers=world.auth)
    assert (r.status_code, r.json()["error"]["code"]) == (404, "alias_not_found")


# ---- principal-scoped administration ---------------------------------------------------------

HELPDESK_POLICY = '''
    permit(principal in Keygrants::Group::"helpdesk",
           action in [Keygrants::Action::"manage_credentials",
                      Keygrants::Action::"describe_principal",
                      Keygrants::Action::"update_principal"],
           resource in Keygrants::Group::"team-a");'''


def principal_with_api_key(world: Any, principal: str, tags: list[str]) -> dict[str, str]:
    world.access.service.create_principal(ADMIN, CreatePrincipalRequest(id=principal, tags=tags))
    created = world.access.service.create_api_key(ADMIN, principal, CreateApiKeyRequest())
    return {"Authorization": f"Bearer {created.api_key}"}


async def test_a_helpdesk_manages_credentials_of_its_team_only(world, http) -> None:
    headers = principal_with_api_key(world, "helpdesk-1", ["helpdesk"])
    world.access.service.create_principal(ADMIN, CreatePrincipalRequest(id="alice", tags=["team-a"]))
    world.access.service.create_principal(ADMIN, CreatePrincipalRequest(id="bob", tags=["team-b"]))
    world.access.service.put_policy(ADMIN, "helpdesk", PutPolicyRequest(text=HELPDESK_POLICY))
    r = await http.post("/v1/principals/alice/api-keys", json={}, headers=headers)
    assert r.status_code == 201, r.text
    assert audited(world, r).detail["policy"] == "helpdesk#1"
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=world.app),
                                 base_url="http://test") as as_alice:
        me = await as_alice.get("/v1/whoami",
                                headers={"Authorization": f"Bearer {r.json()['api_key']}"})
        assert me.json()["principal"] == "alice"
    before = world.snapshot()
    for method, path, body in (("POST", "/v1/principals/bob/api-keys", {}),
                               ("POST", "/v1/principals/bob/shared-secrets", {}),
                               ("POST", "/v1/principals/bob/certificates",
                                {"match": "san-dns:bob.internal"}),
                               ("GET", "/v1/principals/bob/credentials", None),
                               ("GET", "/v1/principals/bob", None),
                               ("PATCH", "/v1/principals/bob", {"display_name": "Bob"}),
                               ("POST", "/v1/principals/svc/api-keys", {}),
                               ("POST", "/v1/principals/helpdesk-1/api-keys", {})):
        r = await http.request(method, path, json=body, headers=headers)
        assert (r.status_code, r.json()["error"]["code"]) == (403, "forbidden"), path
    assert world.snapshot() == before
    cred = world.store.list_credentials("alice")[0].id
    r = await http.post(f"/v1/principals/alice/credentials/{cred}/revoke", headers=headers)
    assert r.status_code == 200 and r.json()["state"] == "revoked"


async def test_self_service_lets_a_principal_rotate_only_its_own_keys(world, http) -> None:
    headers = principal_with_api_key(world, "alice", ["team-a"])
    world.access.service.put_policy(ADMIN, "self", PutPolicyRequest(text='''
        permit(principal, action == Keygrants::Action::"manage_credentials", resource)
          when { resource == principal };'''))
    old = world.store.list_credentials("alice")[0].id
    r = await http.post("/v1/principals/alice/api-keys", json={"label": "next"}, headers=headers)
    assert r.status_code == 201, r.text
    fresh = {"Authorization": f"Bearer {r.json()['api_key']}"}
    r = await http.post(f"/v1/principals/alice/credentials/{old}/revoke", headers=fresh)
    assert r.status_code == 200 and r.json()["state"] == "revoked"
    assert (await http.get("/v1/whoami", headers=headers)).status_code == 401
    for path in ("/v1/principals/svc/api-keys", "/v1/principals/admin/api-keys"):
        r = await http.post(path, json={}, headers=fresh)
        assert (r.status_code, r.json()["error"]["code"]) == (403, "forbidden"), path
    r = await http.patch("/v1/principals/alice", json={"display_name": "A"}, headers=fresh)
    assert r.status_code == 403  # manage_credentials only


async def test_retagging_a_principal_needs_the_right_to_update_it_as_it_will_be(world, http) -> None:
    headers = principal_with_api_key(world, "helpdesk-1", ["helpdesk", "team-a"])
    world.access.service.create_principal(ADMIN, CreatePrincipalRequest(id="alice", tags=["team-a"]))
    world.access.service.put_policy(ADMIN, "helpdesk", PutPolicyRequest(text=HELPDESK_POLICY))
    ok = await http.patch("/v1/principals/alice", json={"display_name": "Alice"}, headers=headers)
    assert ok.status_code == 200, ok.text
    before = world.snapshot()
    for tags in (["team-b"], ["admins"], []):
        r = await http.patch("/v1/principals/alice", json={"tags": tags}, headers=headers)
        assert (r.status_code, r.json()["error"]["code"]) == (403, "forbidden"), tags
    # nor re-tag itself, even within the groups it administers
    r = await http.patch("/v1/principals/helpdesk-1", json={"tags": ["team-a"]}, headers=headers)
    assert (r.status_code, r.json()["error"]["code"]) == (403, "forbidden")
    assert world.snapshot() == before
    r = await http.patch("/v1/principals/alice", json={"tags": ["team-a", "x"]}, headers=headers)
    assert r.status_code == 200 and r.json()["tags"] == ["team-a", "x"]
    r = await http.patch("/v1/principals/helpdesk-1", json={"tags": ["team-a"]}, headers=world.auth)
    assert r.status_code == 200  # the admin may


async def test_creating_a_principal_is_decided_on_the_requested_id_and_tags(world, http) -> None:
    headers = principal_with_api_key(world, "helpdesk-1", ["helpdesk"])
    world.access.service.put_policy(ADMIN, "create", PutPolicyRequest(text='''
        permit(principal in Keygrants::Group::"helpdesk",
               action == Keygrants::Action::"create_principal", resource)
          when { resource.id like "team-a-*" && ["team-a"].containsAll(resource.tags) };'''))
    r = await http.post("/v1/principals", json={"id": "team-a-bot", "tags": ["team-a"]},
                        headers=headers)
    assert r.status_code == 201, r.text
    for body in ({"id": "team-b-bot", "tags": ["team-a"]},
                 {"id": "team-a-bot2", "tags": ["team-a", "admins"]}):
        r = await http.post("/v1/principals", json=body, headers=headers)
        assert (r.status_code, r.json()["error"]["code"]) == (403, "forbidden"), body
    r = await http.post("/v1/principals", json={"id": "team-a-bot", "tags": []}, headers=headers)
    assert (r.status_code, r.json()["error"]["code"]) == (409, "already_exists")


async def test_a_missing_principal_is_revealed_only_to_who_could_act_on_it(world, http) -> None:
    headers = principal_with_api_key(world, "helpdesk-1", ["helpdesk"])
    world.access.service.put_policy(ADMIN, "helpdesk", PutPolicyRequest(text=HELPDESK_POLICY))
    for method, path, body in (("POST", "/v1/principals/nobody/api-keys", {}),
                               ("GET", "/v1/principals/nobody", None),
                               ("GET", "/v1/principals/nobody/credentials", None),
                               ("DELETE", "/v1/principals/nobody", None)):
        r = await http.request(method, path, json=body, headers=headers)
        assert (r.status_code, r.json()["error"]["code"]) == (403, "forbidden"), path
    world.access.service.put_policy(ADMIN, "by-name", PutPolicyRequest(text='''
        permit(principal in Keygrants::Group::"helpdesk",
               action in Keygrants::Action::"principal_admin", resource)
          when { resource is Keygrants::Principal && resource.id like "nobody*" };'''))
    for method, path, body in (("POST", "/v1/principals/nobody/api-keys", {}),
                               ("GET", "/v1/principals/nobody", None),
                               ("GET", "/v1/principals/nobody/credentials", None),
                               ("PATCH", "/v1/principals/nobody", {"display_name": "x"}),
                               ("POST", "/v1/principals/nobody/disable", None),
                               ("DELETE", "/v1/principals/nobody", None)):
        r = await http.request(method, path, json=body, headers=headers)
        assert (r.status_code, r.json()["error"]["code"]) == (404, "principal_not_found"), path


async def test_policy_test_takes_a_target_principal(world, http) -> None:
    world.access.service.create_principal(ADMIN, CreatePrincipalRequest(id="helpdesk-1",
                                                                        tags=["helpdesk"]))
    world.access.service.create_principal(ADMIN, CreatePrincipalRequest(id="alice", tags=["team-a"]))
    world.access.service.put_policy(ADMIN, "helpdesk", PutPolicyRequest(text=HELPDESK_POLICY))
    for target, ok in (("alice", True), ("svc", False), ("nobody", False), ("helpdesk-1", False)):
        r = await http.post("/v1/policy-test", headers=world.auth, json={
            "principal": "helpdesk-1", "action": "manage_credentials", "target": target})
        assert r.status_code == 200 and r.json()["allowed"] is ok, (target, r.text)
    r = await http.post("/v1/policy-test", headers=world.auth, json={
        "principal": "helpdesk-1", "action": "manage_credentials"})
    assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_request")


async def test_a_host_header_cannot_move_the_real_path_out_of_the_signed_one(world) -> None:
    """A signature over @authority, @path and @query (a form RFC 9421 signers use) for
    ``rotate enc``, sent to ``disable enc2`` with the signed path smuggled into the Host
    header: the rebuilt URI used to read ``/v1/keys/enc/rotate`` as @path and the rest as a
    fragment, so the signature verified and enc2 was disabled. Such a Host is refused."""
    key, keyid = register_key(world, "ops-host")
    world.access.service.put_policy(ADMIN, "ops-host", PutPolicyRequest(text='''
        permit(principal == Keygrants::Principal::"ops-host",
               action in Keygrants::Action::"key_admin", resource);'''))
    now = int(time.time())
    message = Message(method="POST", target_uri="http://kms.example/v1/keys/enc/rotate",
                      headers={})
    for i, host in enumerate(["kms.example/v1/keys/enc/rotate#", "kms.example/v1/keys/enc/rotate?",
                              "user@kms.example", "kms.example /x", ""]):
        sig_input, sig = sign_message(message, key=key, alg="ed25519", keyid=keyid, created=now,
                                      expires=now + 60, nonce=f"host-{i}",
                                      components=["@method", "@authority", "@path", "@query"])
        r = await send_raw(world, httpx.Request(
            "POST", "http://kms.example/v1/keys/enc2/disable",
            headers={"Host": host, "Signature-Input": sig_input, "Signature": sig}))
        assert r.status_code == 400, (host, r.text)
        assert r.json()["error"]["code"] == "invalid_request"
    assert world.store.get_key(world.ids["enc2"]).state == "enabled"
    # the same signature form with an honest Host works
    sig_input, sig = sign_message(message, key=key, alg="ed25519", keyid=keyid, created=now,
                                  expires=now + 60, nonce="host-ok",
                                  components=["@method", "@authority", "@path", "@query"])
    r = await send_raw(world, httpx.Request(
        "POST", "http://kms.example/v1/keys/enc/rotate",
        headers={"Host": "kms.example", "Signature-Input": sig_input, "Signature": sig}))
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("authority", ["kms.example", "KMS.example:8650", "127.0.0.1:8650",
                                       "[::1]:8650", "[fe80::1]", "a-b_c~d.example",
                                       "kms.example.", "[fe80::1%25eth0]:8080",
                                       "[::ffff:1.2.3.4]"])
def test_check_authority_accepts_host_and_port(authority: str) -> None:
    assert check_authority(authority) == authority


@pytest.mark.parametrize("authority", ["", "kms.example/", "kms.example?", "kms.example#",
                                       "u@kms.example", "kms example", "kms.example:80/x",
                                       "kms.example\r\nX: y", "[::1", "kms.example:123456",
                                       "[fe80::1%eth0]", "[fe80::1%25]"])
def test_check_authority_refuses_anything_else(authority: str) -> None:
    with pytest.raises(ValueError):
        check_authority(authority)


async def test_a_derive_is_decided_with_its_context(world, http) -> None:
    """The derive context names what is derived for (a tenant's key): the policy sees it, as
    for encrypt. It was left out, so a forbid on a tenant did not stop deriving that tenant's
    key, and a permit for one tenant refused every derive."""
    from keygrants.models import CreateKeyRequest

    world.kms.create_key(ADMIN, CreateKeyRequest(name="der-t", spec="hmac-sha256", derivable=True))
    headers = principal_with_api_key(world, "svc-der", [])
    world.access.service.put_policy(ADMIN, "svc-der", PutPolicyRequest(text='''
        permit(principal == Keygrants::Principal::"svc-der", action == Keygrants::Action::"derive",
               resource) when { context.encryption_context.contains("tenant=42") };'''))

    async def derive(tenant: str) -> httpx.Response:
        return await http.post("/v1/keys/der-t/derive", headers=headers,
                               json={"context": {"tenant": tenant}})

    assert (await derive("42")).status_code == 200
    r = await derive("43")
    assert (r.status_code, r.json()["error"]["code"]) == (403, "forbidden")


async def test_a_credential_header_sent_twice_is_refused_and_audited(world, http) -> None:
    """With two ``Authorization`` fields the last one was used: a proxy checking the first
    and this server would disagree about who calls."""
    world.access.service.create_principal(ADMIN, CreatePrincipalRequest(id="svc-twice"))
    created = world.access.service.create_api_key(ADMIN, "svc-twice", CreateApiKeyRequest())
    admin = world.auth["Authorization"]
    for pair in ([admin, f"Bearer {created.api_key}"], [f"Bearer {created.api_key}", admin],
                 [admin, admin]):
        r = await http.get("/v1/whoami", headers=[("Authorization", v) for v in pair])
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "invalid_request"
        assert "more than one Authorization header" in r.json()["error"]["message"]
        event = audited(world, r)
        assert (event.type, event.result, event.reason) == ("auth.failure", "denied",
                                                            "invalid_request")
    r = await http.get("/v1/whoami", headers=[("Authorization", admin),
                                              ("Keygrants-Grant", "a"), ("Keygrants-Grant", "b")])
    assert r.status_code == 400 and "Keygrants-Grant" in r.json()["error"]["message"]
    key, keyid = register_key(world, "svc-twice-sig")
    request = sign_request(key, keyid, "GET", "/v1/whoami")
    request.headers = httpx.Headers([*request.headers.multi_items(),
                                     ("Signature-Input", request.headers["signature-input"])])
    r = await send_raw(world, request)
    assert r.status_code == 400 and "Signature-Input" in r.json()["error"]["message"]
    assert (await http.get("/v1/whoami", headers=world.auth)).status_code == 200  # once is fine


async def test_bad_values_are_named_as_the_request_names_them(world, http) -> None:
    """Messages named internals: ``RequestFacts.now``, ``GrantFacts.ttl``, and the ASN.1
    parser's debug output for a certificate that is not one."""
    world.access.service.create_principal(ADMIN, CreatePrincipalRequest(id="svc-named"))
    for body, said in (({"time": -1}, "time must be a Unix time"),
                       ({"time": 2**63}, "time must be a Unix time"),
                       ({"action": "create_grant", "grant": {"ttl": -1}}, "grant.ttl"),
                       ({"action": "create_grant", "grant": {"ttl": 2**63}}, "2**63-1"),
                       ({"action": "create_grant", "grant": {"uses": -5}}, "grant.uses")):
        r = await http.post("/v1/policy-test", headers=world.auth,
                            json={"principal": "svc-named", "action": "encrypt", "key": "enc",
                                  **body})
        assert r.status_code == 400, r.text
        message = r.json()["error"]["message"]
        assert said in message and "Facts" not in message, message
    r = await http.post("/v1/principals/svc-named/certificates", headers=world.auth, json={
        "certificate": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"})
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert "not a PEM X.509 certificate" in message and "ParseError" not in message, message
