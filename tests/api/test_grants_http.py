"""Grants over HTTP: presenting a grant token, its checks and codes, delegation, exchange,
break-glass, revocation and the feed, proof of possession, fail-closed."""

from __future__ import annotations

import base64
import json
import time
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest

from keygrants.audit.events import decode_event
from keygrants.audit.log import EventQuery
from keygrants.auth import RequestContext
from keygrants.crypto.signing import SigningKey
from keygrants.errors import StoreError
from keygrants.grants.dpop import make_proof, proof_key_thumbprint
from keygrants.models import CreateApiKeyRequest, CreatePrincipalRequest, PutPolicyRequest

from .conftest import ADMIN, World

pytestmark = pytest.mark.anyio


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def code_of(r: httpx.Response) -> str:
    return str(r.json()["error"]["code"])


def principal(world: World, name: str, *, tags: tuple[str, ...] = ()) -> dict[str, str]:
    """A new principal with an API key; its Authorization header."""
    world.access.service.create_principal(ADMIN, CreatePrincipalRequest(id=name, tags=list(tags)))
    key = world.access.service.create_api_key(ADMIN, name, CreateApiKeyRequest()).api_key
    return {"Authorization": f"Bearer {key}"}


def svc(world: World, token: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {world.api_key}"}
    if token is not None:
        headers["Keygrants-Grant"] = token
    return headers


async def create(http: httpx.AsyncClient, world: World, headers: dict[str, str] | None = None,
                 **body: Any) -> httpx.Response:
    body = {"key": "enc", "grantee": "svc", "operations": ["decrypt"], **body}
    return await http.post("/v1/grants", json=body, headers=headers or world.auth)


async def decrypt(http: httpx.AsyncClient, world: World, headers: dict[str, str],
                  context: dict[str, str] | None = None) -> httpx.Response:
    return await http.post("/v1/decrypt", headers=headers, json={
        "ciphertext": b64(world.ciphertext),
        "context": world.CONTEXT if context is None else context})


def grant_id_of(token: str) -> str:
    claims = token.split(".")[1]
    return str(json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))["jti"])


def event_at(world: World, r: httpx.Response) -> Any:
    return decode_event(world.audit.log.event_data(int(r.headers["x-audit-index"])) or b"")


# -- using a grant ------------------------------------------------------------------------------

async def test_a_grant_lets_its_grantee_do_what_its_own_policy_does_not(world, http) -> None:
    assert code_of(await decrypt(http, world, svc(world))) == "forbidden"  # svc may only encrypt
    r = await decrypt(http, world, svc(world, world.grant_token))
    assert r.status_code == 200, r.text
    assert base64.b64decode(r.json()["plaintext"]) == world.PLAINTEXT
    event = event_at(world, r)
    assert (event.type, event.result, event.grant_id, event.detail["policy"]) == (
        "crypto.decrypt", "ok", world.grant_id, f"grant:{world.grant_id}")
    grant = world.store.get_grant(world.grant_id)
    assert grant is not None and grant.uses == 1


async def test_each_mismatch_is_refused_with_its_code(world, http) -> None:
    other = principal(world, "other")
    r = await decrypt(http, world, {**other, "Keygrants-Grant": world.grant_token})
    assert (r.status_code, code_of(r)) == (403, "wrong_grantee")
    denial = event_at(world, r)
    assert (denial.type, denial.reason, denial.principal) == ("grant.deny", "wrong_grantee", "other")
    assert world.grant_token not in str(denial.detail) and denial.detail["token"].startswith("hmac")
    r = await http.post("/v1/keys/sig/sign", headers=svc(world, world.grant_token),
                        json={"message": b64(b"m")})
    assert code_of(r) == "operation_not_granted"
    r = await http.post("/v1/keys/enc2/encrypt", headers=svc(world, world.grant_token),
                        json={"plaintext": b64(b"m")})
    assert code_of(r) == "key_not_granted"
    r = await http.post("/v1/keys/nope/encrypt", headers=svc(world, world.grant_token),
                        json={"plaintext": b64(b"m")})
    assert code_of(r) == "key_not_granted"  # a missing key reveals nothing either
    r = await http.get("/v1/keys", headers=svc(world, world.grant_token))
    assert (r.status_code, code_of(r)) == (400, "invalid_request")  # no grant there
    garbage = await decrypt(http, world, svc(world, "not.a.token"))
    assert code_of(garbage) == "grant_malformed"
    grant = world.store.get_grant(world.grant_id)
    assert grant is not None and grant.uses == 0  # no refused request counted a use


async def test_encryption_context_constraints_follow_aws_semantics(world, http) -> None:
    subset = (await create(http, world, context_subset={"tenant": "t1"})).json()["token"]
    equals = (await create(http, world, context_equals={"tenant": "t1"})).json()["token"]
    exact = (await create(http, world, context_equals=world.CONTEXT)).json()["token"]
    assert (await decrypt(http, world, svc(world, subset))).status_code == 200
    assert code_of(await decrypt(http, world, svc(world, equals))) == "context_mismatch"
    assert (await decrypt(http, world, svc(world, exact))).status_code == 200
    r = await http.post("/v1/decrypt", headers=svc(world, subset),
                        json={"ciphertext": b64(world.ciphertext), "context": {"tenant": "t2"}})
    assert code_of(r) == "context_mismatch"
    r = await create(http, world, operations=["sign"], key="sig", context_subset={"a": "b"})
    assert (r.status_code, code_of(r)) == (400, "invalid_request")
    # both constraints: the context must equal one map and hold every pair of the other
    both = (await create(http, world, context_equals=world.CONTEXT,
                         context_subset={"tenant": "t1"})).json()["token"]
    assert (await decrypt(http, world, svc(world, both))).status_code == 200
    before = world.snapshot()
    for subset in ({"tenant": "t2"}, {"other": "x"}):  # no context could satisfy both
        r = await create(http, world, context_equals={"tenant": "t1"}, context_subset=subset)
        assert (r.status_code, code_of(r)) == (400, "invalid_request"), r.text
        assert "contradict" in r.json()["error"]["message"]
    assert world.snapshot() == before


async def test_uses_are_exact_and_exhaustion_has_its_code(world, http) -> None:
    token = (await create(http, world, max_uses=2)).json()["token"]
    assert [(await decrypt(http, world, svc(world, token))).status_code for _ in range(2)] == [200, 200]
    third = await decrypt(http, world, svc(world, token))
    assert (third.status_code, code_of(third)) == (403, "grant_exhausted")
    listed = (await http.get("/v1/grants?key=enc&state=exhausted", headers=world.auth)).json()
    assert [g["uses"] for g in listed["grants"]] == [2]


async def test_batches_count_one_use_per_request(world, http) -> None:
    token = (await create(http, world, max_uses=1, operations=["encrypt"])).json()["token"]
    r = await http.post("/v1/keys/enc/encrypt-batch", headers=svc(world, token), json={
        "items": [{"plaintext": b64(b"a"), "context": {"x": "1"}},
                  {"plaintext": b64(b"b"), "context": {"x": "2"}}]})
    assert r.status_code == 200 and all("error" not in i for i in r.json()["results"])


async def test_expired_and_not_yet_valid_grants(world, http) -> None:
    token = (await create(http, world, ttl=60)).json()["token"]
    world.grants._clock = lambda: time.time() + 60 + 31  # past exp + the 30 s leeway
    assert code_of(await decrypt(http, world, svc(world, token))) == "grant_expired"
    world.grants._clock = time.time
    start = time.time() + 600
    later = await create(http, world, not_before=time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                               time.gmtime(start)))
    assert code_of(await decrypt(http, world, svc(world, later.json()["token"]))) == "grant_not_yet_valid"
    # a time without its offset (read in the server's zone before), or out of range (a 500)
    for bad in ("0001-01-01T00:00:00", "2026-11-22T10:00:00", "0001-01-01T00:00:00+14:00"):
        r = await create(http, world, not_before=bad)
        assert (r.status_code, code_of(r)) == (400, "invalid_request"), (bad, r.text)


async def test_grant_token_header_attacks_over_http(world, http) -> None:
    header, claims, signature = world.grant_token.split(".")

    def enc(obj: bytes) -> str:
        return base64.urlsafe_b64encode(obj).rstrip(b"=").decode()

    none = enc(b'{"alg":"none","kid":"x","typ":"kg+jwt"}') + "." + claims + "."
    assert code_of(await decrypt(http, world, svc(world, none))) == "grant_algorithm_rejected"
    jku = (enc(base64.urlsafe_b64decode(header + "==")[:-1] + b',"jku":"https://evil"}')
           + "." + claims + "." + signature)
    assert code_of(await decrypt(http, world, svc(world, jku))) == "grant_header_rejected"
    tampered = header + "." + claims[:-2] + ("A" if claims[-2] != "A" else "B") + claims[-1] + "." \
        + signature
    assert code_of(await decrypt(http, world, svc(world, tampered))) in (
        "grant_signature_invalid", "grant_malformed")


# -- revocation and the feed --------------------------------------------------------------------

async def test_the_feed_says_where_to_ask_next_even_after_its_newest_entries_expired(
        world, http) -> None:
    """A reader at the feed's end used to be told nothing past its last entry once the newest
    entries were dropped, so every heartbeat naming the newest number sent it to ask again."""
    ids = []
    for _ in range(3):
        created = await http.post("/v1/grants", headers=world.auth, json={
            "key": "enc", "grantee": "svc", "operations": ["decrypt"]})
        ids.append(created.json()["grant"]["id"])
        assert (await http.post(f"/v1/grants/{ids[-1]}/revoke",
                                headers=world.auth)).status_code == 200
    page = (await http.get("/v1/revocations", params={"since": 0, "limit": 2})).json()
    assert page["more"] and page["next_since"] == page["entries"][-1]["seq"]
    rest = (await http.get("/v1/revocations", params={"since": page["next_since"]})).json()
    assert not rest["more"] and [e["id"] for e in rest["entries"]] == ids[2:]
    assert rest["next_since"] == rest["latest"] == rest["entries"][-1]["seq"]
    latest = rest["latest"]
    assert world.store.prune_revocations(2**40) >= 3  # every token they covered has expired
    pruned = (await http.get("/v1/revocations", params={"since": 0})).json()
    assert pruned["entries"] == [] and not pruned["more"]
    assert pruned["next_since"] == pruned["latest"] == latest


async def test_revoke_takes_effect_on_the_next_request_and_enters_the_feed(world, http) -> None:
    assert (await decrypt(http, world, svc(world, world.grant_token))).status_code == 200
    r = await http.post(f"/v1/grants/{world.grant_id}/revoke", headers=world.auth)
    assert r.json()["state"] == "revoked"
    assert code_of(await decrypt(http, world, svc(world, world.grant_token))) == "grant_revoked"
    feed = (await http.get("/v1/revocations?since=0")).json()
    assert [(e["kind"], e["id"], e["reason"]) for e in feed["entries"]] == [
        ("grant", world.grant_id, "revoked")]
    assert (await http.get(f"/v1/revocations?since={feed['latest']}")).json()["entries"] == []
    again = await http.post(f"/v1/grants/{world.grant_id}/revoke", headers=world.auth)
    assert (again.status_code, code_of(again)) == (409, "grant_state")


async def test_only_the_grantee_or_retiring_principal_retires(world, http) -> None:
    other = principal(world, "other")
    token = (await create(http, world, retiring_principal="other")).json()
    assert (await http.post(f"/v1/grants/{world.grant_id}/retire",
                            headers=other)).status_code == 403
    r = await http.post(f"/v1/grants/{token['grant']['id']}/retire", headers=other)
    assert r.json()["state"] == "retired"
    assert code_of(await decrypt(http, world, svc(world, token["token"]))) == "grant_retired"
    r = await http.post(f"/v1/grants/{world.grant_id}/retire", headers=svc(world))
    assert r.json()["state"] == "retired"


async def test_revoke_all_for_a_principal_covers_every_earlier_grant_only(world, http) -> None:
    second = (await create(http, world)).json()["token"]
    r = await http.post("/v1/revoke-all", json={"principal": "svc"}, headers=world.auth)
    assert r.json()["revoked"] == 3  # the fixture's grant, its pending request, this one
    for token in (world.grant_token, second):
        assert code_of(await decrypt(http, world, svc(world, token))) == "grant_revoked"
    feed = (await http.get("/v1/revocations")).json()["entries"]
    assert (feed[0]["kind"], feed[0]["id"]) == ("principal", "svc")
    assert {e["id"] for e in feed[1:]} == {world.grant_id, world.pending_grant_id,
                                           grant_id_of(second)}
    # a grant issued after the revocation works, even within the same second
    fixed = time.time()
    world.grants._clock = lambda: fixed
    await http.post("/v1/revoke-all", json={"principal": "svc"}, headers=world.auth)
    fresh = (await create(http, world)).json()["token"]
    assert (await decrypt(http, world, svc(world, fresh))).status_code == 200


async def test_revoke_all_for_a_key(world, http) -> None:
    r = await http.post("/v1/revoke-all", json={"key": "enc-alias"}, headers=world.auth)
    assert r.status_code == 200
    assert code_of(await decrypt(http, world, svc(world, world.grant_token))) == "grant_revoked"
    assert code_of(await http.post("/v1/revoke-all", json={}, headers=world.auth)) == "invalid_request"


# -- who may create what ------------------------------------------------------------------------

async def test_a_grant_never_exceeds_its_creators_rights(world, http) -> None:
    world.access.service.put_policy(ADMIN, "svc-grants", PutPolicyRequest(text=(
        'permit(principal == Keygrants::Principal::"svc", '
        'action == Keygrants::Action::"create_grant", resource) when { resource.name == "enc" '
        '&& context has grant && context.grant.ttl <= 120 && context.grant.uses > 0 };')))
    principal(world, "worker")
    decrypt_grant = await create(http, world, svc(world), grantee="worker", max_uses=5)
    assert (decrypt_grant.status_code, code_of(decrypt_grant)) == (403, "forbidden")
    ok = await create(http, world, svc(world), grantee="worker", operations=["encrypt"],
                      ttl=120, max_uses=5)
    assert ok.status_code == 201, ok.text
    too_long = await create(http, world, svc(world), grantee="worker", operations=["encrypt"],
                            ttl=121, max_uses=5)
    assert code_of(too_long) == "forbidden"  # the policy's maximum TTL
    unlimited = await create(http, world, svc(world), grantee="worker", operations=["encrypt"],
                             ttl=60)
    assert code_of(unlimited) == "forbidden"  # the policy demands limited uses
    missing_key = await create(http, world, svc(world), key="no-such-key", operations=["encrypt"])
    assert code_of(missing_key) == "forbidden"  # not key_not_found: nothing to probe


async def test_bad_create_requests_are_400(world, http) -> None:
    for body in ({"operations": []}, {"operations": ["fly"]}, {"operations": ["decrypt"] * 2},
                 {"ttl": 0}, {"ttl": 10**9}, {"max_uses": 0}, {"grantee": "bad name"},
                 {"dpop_jkt": "short"}, {"audiences": [f"a{i}" for i in range(17)]},
                 {"operations": ["sign"], "key": "enc"}, {"context_subset": {"": "x"}}):
        r = await create(http, world, **body)
        assert r.status_code == 400, (body, r.text)
    before = world.snapshot()
    assert code_of(await create(http, world, grantee="ghost")) == "principal_not_found"
    assert world.snapshot() == before


# -- delegation and exchange --------------------------------------------------------------------

async def test_delegation_attenuates_and_revoking_the_parent_revokes_children(world, http) -> None:
    worker = principal(world, "worker")
    parent = (await create(http, world, operations=["create_grant", "decrypt"], max_uses=10,
                           context_subset={"tenant": "t1"})).json()
    parent_token = parent["token"]
    child = await create(http, world, svc(world, parent_token), grantee="worker", max_uses=2,
                         context_subset={"tenant": "t1", "purpose": "test"}, ttl=60)
    assert child.status_code == 201, child.text
    child_body = child.json()
    assert (child_body["grant"]["parent_id"], child_body["grant"]["depth"]) == (
        parent["grant"]["id"], 1)
    assert (await decrypt(http, world, {**worker,
                                        "Keygrants-Grant": child_body["token"]})).status_code == 200
    for widening in ({"operations": ["decrypt", "encrypt"]}, {"max_uses": 11},
                     {"context_subset": {"purpose": "test"}}, {"ttl": 10**5}):
        r = await create(http, world, svc(world, parent_token), grantee="worker",
                         **{"max_uses": 2, "context_subset": {"tenant": "t1"}, **widening})
        assert code_of(r) in ("attenuation_violated", "invalid_request"), (widening, r.text)
    await http.post(f"/v1/grants/{parent['grant']['id']}/revoke", headers=world.auth)
    denied = await decrypt(http, world, {**worker, "Keygrants-Grant": child_body["token"]})
    assert code_of(denied) == "grant_revoked"
    child_now = (await http.get(f"/v1/grants/{child_body['grant']['id']}",
                                headers=world.auth)).json()
    assert child_now["state"] == "revoked"


async def test_a_sub_grant_without_a_ttl_fits_in_a_parent_with_less_than_the_default_left(
        world, http) -> None:
    # the default (300 s) was taken as asked for, then refused as outliving the parent
    principal(world, "worker")
    parent = (await create(http, world, operations=["create_grant", "decrypt"], ttl=120)).json()
    child = await http.post("/v1/grants", headers=svc(world, parent["token"]), json={
        "key": "enc", "grantee": "worker", "operations": ["decrypt"]})
    assert child.status_code == 201, child.text
    assert child.json()["grant"]["expires_at"] == parent["grant"]["expires_at"]
    longer = await http.post("/v1/grants", headers=svc(world, parent["token"]), json={
        "key": "enc", "grantee": "worker", "operations": ["decrypt"], "ttl": 300})
    assert code_of(longer) == "attenuation_violated"  # asked for: still refused
    later = await http.post("/v1/grants", headers=svc(world, parent["token"]), json={
        "key": "enc", "grantee": "worker", "operations": ["decrypt"],
        "not_before": (datetime.fromisoformat(parent["grant"]["expires_at"])
                       - timedelta(seconds=60)).isoformat()})  # the default fits from there
    assert later.status_code == 201, later.text
    assert later.json()["grant"]["expires_at"] == parent["grant"]["expires_at"]


async def test_a_sub_grant_asking_for_an_operation_its_parent_lacks_is_told_so(world, http) -> None:
    # the parent's context constraint is inherited: "constraints apply only to grants whose
    # operations take a context" hid the real refusal
    principal(world, "worker")
    parent = (await create(http, world, operations=["create_grant", "decrypt"],
                           context_subset={"tenant": "t1"})).json()
    exchanged = await http.post("/v1/token-exchange", headers=svc(world), json={
        "subject_token": parent["token"], "scope": "mac"})
    delegated = await http.post("/v1/grants", headers=svc(world, parent["token"]), json={
        "key": "enc", "grantee": "worker", "operations": ["decrypt", "mac"],
        "context_subset": {"tenant": "t1"}})
    for r in (exchanged, delegated):
        assert (code_of(r), r.json()["error"]["message"]) == (
            "attenuation_violated", "a sub-grant cannot add operations"), r.text
    # a typo is still named as one, not taken for an operation the parent lacks
    typo = await http.post("/v1/token-exchange", headers=svc(world), json={
        "subject_token": parent["token"], "scope": "decrpyt"})
    assert (typo.status_code, code_of(typo)) == (400, "invalid_request"), typo.text
    assert "unknown operations: decrpyt" in typo.json()["error"]["message"]


async def test_a_grant_no_one_accepts_any_more_cannot_be_revoked_or_retired(world, http) -> None:
    # Past exp + 300 s (the most leeway the KMS or a verifier gives) it ended by itself.
    # Before that it can be revoked: a verifier whose leeway exceeds the KMS's 30 s still
    # accepts its token (refusing the revoke there left it accepted).
    created = (await create(http, world, ttl=60)).json()
    other = (await create(http, world, ttl=60)).json()
    gid = created["grant"]["id"]
    world.grants._clock = lambda: time.time() + 60 + 45  # past the KMS's leeway, not 300 s
    try:
        r = await http.post(f"/v1/grants/{gid}/revoke", headers=world.auth)
        assert r.status_code == 200 and r.json()["state"] == "revoked", r.text
        world.grants._clock = lambda: time.time() + 60 + 301
        for action, who in (("revoke", world.auth), ("retire", svc(world))):
            r = await http.post(f"/v1/grants/{other['grant']['id']}/{action}", headers=who)
            assert (r.status_code, code_of(r)) == (409, "grant_state"), (action, r.text)
            assert "expired" in r.json()["error"]["message"]
    finally:
        world.grants._clock = time.time


async def test_revoking_a_grant_within_the_leeway_revokes_its_whole_tree(world, http) -> None:
    """Root, child and grandchild all past their expiry but within the 30 s leeway (so still
    accepted): revoking the root revokes the grandchild too. It was looked up among unexpired
    grants only and stayed usable until the leeway ran out."""
    worker = principal(world, "worker-l")
    root = (await create(http, world, grantee="svc", operations=["create_grant", "decrypt"],
                         ttl=60)).json()
    child = (await create(http, world, svc(world, root["token"]), grantee="svc",
                          operations=["create_grant", "decrypt"], ttl=60)).json()
    grand = (await create(http, world, svc(world, child["token"]), grantee="worker-l",
                          ttl=60)).json()
    world.grants._clock = lambda: time.time() + 65  # past exp, within the leeway
    try:
        ok = await decrypt(http, world, {**worker, "Keygrants-Grant": grand["token"]})
        assert ok.status_code == 200, ok.text
        r = await http.post(f"/v1/grants/{root['grant']['id']}/revoke", headers=world.auth)
        assert r.status_code == 200, r.text
        assert [world.store.get_grant(g["grant"]["id"]).state  # type: ignore[union-attr]
                for g in (root, child, grand)] == ["revoked"] * 3
        denied = await decrypt(http, world, {**worker, "Keygrants-Grant": grand["token"]})
        assert code_of(denied) == "grant_revoked"
    finally:
        world.grants._clock = time.time


async def test_deleting_a_principal_revokes_its_grants_for_whoever_takes_its_id_later(
        world, http) -> None:
    """A principal created later with a deleted one's id used to inherit its live grants: it
    could list them, fetch fresh tokens and use the old ones."""
    alice = principal(world, "alice-d")
    created = (await create(http, world, grantee="alice-d")).json()
    token, grant_id = created["token"], created["grant"]["id"]
    assert (await decrypt(http, world, {**alice, "Keygrants-Grant": token})).status_code == 200
    before = (await http.get("/v1/revocations", params={"since": 0},
                             headers=world.auth)).json()["entries"]
    r = await http.delete("/v1/principals/alice-d", headers=world.auth)
    assert r.status_code == 204, r.text
    assert world.store.get_grant(grant_id).state == "revoked"  # type: ignore[union-attr]
    feed = (await http.get("/v1/revocations", params={"since": 0},
                           headers=world.auth)).json()["entries"]
    added = {(e["kind"], e["id"]) for e in feed} - {(e["kind"], e["id"]) for e in before}
    assert {("principal", "alice-d"), ("grant", grant_id)} <= added
    again = principal(world, "alice-d")  # the id is taken again
    assert code_of(await decrypt(http, world, {**again, "Keygrants-Grant": token})) == "grant_revoked"
    fresh = await http.post(f"/v1/grants/{grant_id}/token", headers=again)
    assert fresh.status_code >= 400, fresh.text


def test_deleting_a_principal_revokes_its_grants_without_holding_up_other_principals(
        world) -> None:
    """The revocation of a deleted principal's grants (which takes a while for many grants)
    used to run under the lock every principal change takes."""
    import threading

    world.access.service.create_principal(ADMIN, CreatePrincipalRequest(id="many-grants"))
    meanwhile: list[str] = []

    def create_another(ctx: RequestContext, principal_id: str) -> None:
        if meanwhile:
            return
        worker = threading.Thread(target=lambda: meanwhile.append(
            world.access.service.create_principal(ADMIN, CreatePrincipalRequest(id="other")).id))
        worker.start()
        worker.join(timeout=30)  # a deadlock guard, not a timing: it finishes or hangs
        assert meanwhile == ["other"], "another principal could not be created meanwhile"

    world.access.service.on_delete.insert(0, create_another)
    world.access.service.delete_principal(ADMIN, "many-grants")
    assert world.store.get_principal("many-grants") is None
    assert world.store.get_principal("other") is not None


async def test_delegation_depth_is_limited(world, http) -> None:
    token = (await create(http, world, grantee="admin",
                          operations=["create_grant", "decrypt"])).json()["token"]
    depth = 0
    while True:
        r = await create(http, world, {**world.auth, "Keygrants-Grant": token}, grantee="admin",
                         operations=["create_grant", "decrypt"], ttl=60)
        if r.status_code != 201:
            assert code_of(r) == "attenuation_violated"
            break
        depth += 1
        token = r.json()["token"]
    assert depth == world.grants.settings.max_depth


async def test_a_grant_without_create_grant_cannot_delegate(world, http) -> None:
    r = await create(http, world, svc(world, world.grant_token), grantee="svc")
    assert code_of(r) == "operation_not_granted"


async def test_token_exchange_narrows_a_grant(world, http) -> None:
    r = await http.post("/v1/token-exchange", headers=svc(world), json={
        "subject_token": world.grant_token, "scope": "decrypt", "ttl": 60, "max_uses": 5,
        "context_subset": {"tenant": "t1"}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["issued_token_type"], body["scope"]) == (
        "urn:keygrants:params:oauth:token-type:grant", "decrypt")
    narrowed = body["access_token"]
    assert (await decrypt(http, world, svc(world, narrowed))).status_code == 200
    enc = await http.post("/v1/keys/enc/encrypt", headers=svc(world, narrowed),
                          json={"plaintext": b64(b"x")})
    assert code_of(enc) == "operation_not_granted"
    wider = await http.post("/v1/token-exchange", headers=svc(world), json={
        "subject_token": world.grant_token, "scope": "decrypt sign"})
    assert code_of(wider) in ("attenuation_violated", "invalid_request")
    other = principal(world, "other")
    stolen = await http.post("/v1/token-exchange", headers=other,
                             json={"subject_token": world.grant_token})
    assert code_of(stolen) == "wrong_grantee"
    # the attempt is findable by the token's digest and by the grant (it had neither)
    event = event_at(world, stolen)
    assert (event.type, event.result, event.grant_id) == (
        "grant.exchange", "denied", grant_id_of(world.grant_token))
    assert event.detail["token"] == world.kms.audit.digest(world.grant_token)


async def test_a_refused_presentation_of_a_genuine_token_names_its_grant(world, http) -> None:
    """``grant.deny`` for a token whose signature verified (someone else's, a revoked one)
    names the grant: a search by grant listed only its creation."""
    other = principal(world, "other-user")
    r = await decrypt(http, world, {**other, "Keygrants-Grant": world.grant_token})
    assert code_of(r) == "wrong_grantee"
    event = event_at(world, r)
    assert (event.type, event.grant_id, event.detail["token"]) == (
        "grant.deny", grant_id_of(world.grant_token), world.kms.audit.digest(world.grant_token))
    forged = world.grant_token[:-4] + ("AAAA" if not world.grant_token.endswith("AAAA") else "BBBB")
    r = await decrypt(http, world, svc(world, forged))
    assert code_of(r) in ("grant_signature_invalid", "grant_malformed"), r.text
    assert event_at(world, r).grant_id is None  # an unverified token names nothing


# -- break-glass --------------------------------------------------------------------------------

async def test_break_glass_needs_another_principal_and_is_short_lived(world, http) -> None:
    pending = world.pending_grant_id
    info = (await http.get(f"/v1/grants/{pending}", headers=svc(world))).json()
    assert (info["state"], info["requires_approval"], info["justification"]) == (
        "pending", True, "incident 42")
    self_approve = await http.post(f"/v1/grants/{pending}/approve", headers=svc(world), json={})
    assert (self_approve.status_code, code_of(self_approve)) == (403, "self_approval")
    no_token = await http.post(f"/v1/grants/{pending}/token", headers=svc(world))
    assert code_of(no_token) == "grant_pending"
    approved = await http.post(f"/v1/grants/{pending}/approve", headers=world.auth, json={})
    body = approved.json()
    assert body["state"] == "active" and body["decided_by"] == "admin"
    approve_event = event_at(world, approved)
    assert approve_event.detail["severity"] == "high"
    token = (await http.post(f"/v1/grants/{pending}/token", headers=svc(world))).json()["token"]
    r = await http.post("/v1/keys/enc/encrypt", headers=svc(world, token),
                        json={"plaintext": b64(b"x")})
    assert r.status_code == 200
    twice = await http.post(f"/v1/grants/{pending}/approve", headers=world.auth, json={})
    assert code_of(twice) == "grant_state"


async def test_break_glass_policy_creates_pending_grants(world, http) -> None:
    world.access.service.put_policy(ADMIN, "bg", PutPolicyRequest(text=(
        '@approval("required")\npermit(principal == Keygrants::Principal::"svc", '
        'action == Keygrants::Action::"create_grant", resource);')))
    r = await create(http, world, svc(world), operations=["encrypt"], justification="outage")
    assert r.status_code == 202 and r.json()["token"] is None
    assert r.json()["grant"]["state"] == "pending"
    rejected = await http.post(f"/v1/grants/{r.json()['grant']['id']}/reject", headers=world.auth,
                               json={"note": "no"})
    assert rejected.json()["state"] == "rejected"


# -- proof of possession ------------------------------------------------------------------------

async def test_dpop_bound_grants_need_a_fresh_proof_from_the_bound_key(world, http) -> None:
    key, other_key = SigningKey.generate("ed25519"), SigningKey.generate("ecdsa-p256-sha256")
    token = (await create(http, world, dpop_jkt=proof_key_thumbprint(key))).json()["token"]
    url = "http://test/v1/decrypt"
    assert code_of(await decrypt(http, world, svc(world, token))) == "pop_required"
    proof = make_proof(key, method="POST", url=url, access_token=token)
    ok = await decrypt(http, world, {**svc(world, token), "DPoP": proof})
    assert ok.status_code == 200, ok.text
    replay = await decrypt(http, world, {**svc(world, token), "DPoP": proof})
    assert code_of(replay) == "pop_replayed"
    cases = {
        "wrong htm": make_proof(key, method="GET", url=url, access_token=token),
        "wrong htu": make_proof(key, method="POST", url="http://test/v1/keys/enc/encrypt",
                                access_token=token),
        "wrong ath": make_proof(key, method="POST", url=url, access_token=world.grant_token),
        "too old": make_proof(key, method="POST", url=url, access_token=token,
                              iat=int(time.time()) - 3600),
        "other key": make_proof(other_key, method="POST", url=url, access_token=token),
    }
    for name, bad in cases.items():
        r = await decrypt(http, world, {**svc(world, token), "DPoP": bad})
        assert code_of(r) == "pop_invalid", name
    # a proof for encrypt, with the encrypt path smuggled into Host in front of /v1/decrypt:
    # the URL rebuilt for htu used to end in a fragment, and the proof was accepted
    smuggled = make_proof(key, method="POST", url="http://test/v1/keys/enc/encrypt",
                          access_token=token)
    r = await decrypt(http, world, {**svc(world, token), "DPoP": smuggled,
                                    "Host": "test/v1/keys/enc/encrypt#"})
    assert r.status_code == 400 and code_of(r) == "invalid_request", r.text


async def test_a_dpop_proof_is_accepted_within_60_s_and_5_s_of_skew_as_verifiers_do(
        world, http) -> None:
    # The KMS used the grant leeway (30 s) as the proof's clock skew: proofs up to 30 s in the
    # future or 90 s old passed here and were refused by a service's Verifier (5 s).
    key = SigningKey.generate("ed25519")
    token = (await create(http, world, dpop_jkt=proof_key_thumbprint(key))).json()["token"]
    now = int(time.time())
    for n, (offset, expected) in enumerate([(-40, None), (3, None), (20, "pop_invalid"),
                                            (-80, "pop_invalid")]):
        proof = make_proof(key, method="POST", url="http://test/v1/decrypt", access_token=token,
                           iat=now + offset, jti=f"skew-{n}")
        r = await decrypt(http, world, {**svc(world, token), "DPoP": proof})
        if expected is None:
            assert r.status_code == 200, (offset, r.text)
        else:
            assert code_of(r) == expected, (offset, r.text)


async def test_certificate_bound_grants_need_the_certificate(world) -> None:
    cert = b"\x30\x82fake-der-certificate"
    import hashlib

    thumb = base64.urlsafe_b64encode(hashlib.sha256(cert).digest()).rstrip(b"=").decode()
    from keygrants.errors import PopInvalid, PopRequired
    from keygrants.models import CreateGrantRequest

    created = world.grants.create(ADMIN, CreateGrantRequest(key="enc", grantee="svc",
                                                            operations=["decrypt"], x5t_s256=thumb))
    assert created.token is not None
    ctx = RequestContext(principal="svc", request_id="t")
    with pytest.raises(PopRequired):
        world.grants.verify_presented(ctx, created.token)
    with pytest.raises(PopInvalid):
        world.grants.verify_presented(ctx, created.token, client_cert=b"another")
    claims = world.grants.verify_presented(ctx, created.token, client_cert=cert)
    assert claims.cnf_x5t == thumb


# -- issuer keys and JWKS -----------------------------------------------------------------------

async def test_jwks_is_public_with_a_refresh_hint_and_rotation_is_staged(world, http) -> None:
    r = await http.get("/.well-known/jwks.json")
    assert r.headers["cache-control"] == "public, max-age=300"
    first = r.json()
    assert first["seq"] == 1 and [k["kid"] for k in first["keys"]] == [
        world.grants.keyring.keys[0].kid]
    rotated = (await http.post("/v1/issuer/rotate", headers=world.auth)).json()
    published = (await http.get("/.well-known/jwks.json")).json()
    assert published["seq"] == 2 and len(published["keys"]) == 2
    # still signed by the old key until one refresh interval has passed
    before = (await create(http, world)).json()["token"]
    assert rotated["kid"] not in base64.urlsafe_b64decode(before.split(".")[0] + "==").decode()
    world.grants._clock = lambda: time.time() + 301
    after = (await create(http, world)).json()["token"]
    assert rotated["kid"] in base64.urlsafe_b64decode(after.split(".")[0] + "==").decode()
    assert (await decrypt(http, world, svc(world, before))).status_code == 200  # both keys verify
    # the old key retires once its last token has expired: then its tokens are unknown
    world.grants._clock = lambda: time.time() + 301 + 86400 + 31
    world.grants.run_due()
    assert [k["kid"] for k in world.grants.jwks()["keys"]] == [rotated["kid"]]
    for token in (world.grant_token, before):  # `before` was verified (and cached) earlier
        assert code_of(await decrypt(http, world, svc(world, token))) == "grant_unknown_kid"


# -- fail-closed --------------------------------------------------------------------------------

async def test_no_grant_and_no_use_without_a_durable_audit_event(world, http) -> None:
    token = (await create(http, world, max_uses=1)).json()["token"]
    world.audit.log.failing = True
    before = world.snapshot()
    r = await create(http, world)
    assert (r.status_code, code_of(r)) == (503, "audit_unavailable")
    used = await decrypt(http, world, svc(world, token))
    assert used.status_code == 503 and world.PLAINTEXT not in used.content
    assert world.snapshot() == before  # no grant created, no use counted
    world.audit.log.failing = False
    assert (await decrypt(http, world, svc(world, token))).status_code == 200


async def test_grant_events_carry_the_grant_id(world, http) -> None:
    r = await create(http, world)
    grant_id = r.json()["grant"]["id"]
    events = [decode_event(e) for e in world.audit.log.search(EventQuery(grant_id=grant_id))]
    assert [(e.type, e.result) for e in events] == [("grant.create", "ok")]
    assert (events[0].detail["grantee"], events[0].detail["operations"]) == ("svc", "decrypt")


async def test_the_scheduler_rotates_the_issuer_key_and_prunes_the_feed(world, http) -> None:
    await http.post(f"/v1/grants/{world.grant_id}/revoke", headers=world.auth)
    world.grants.run_due()  # nothing due yet
    assert world.grants.jwks()["seq"] == 1 and len(world.store.revocations_since(0, limit=9)) == 1
    period = world.grants.settings.issuer_rotation_period
    world.grants._clock = lambda: time.time() + period + 1
    world.grants.run_due()
    jwks = world.grants.jwks()
    assert jwks["seq"] == 2 and len(jwks["keys"]) == 2  # staged: published, not yet signing
    assert world.grants.keyring.pending(int(world.grants._clock())) is not None
    # the revoked grant (1 hour) has long expired: its feed entry is gone, its number is not
    assert world.store.revocations_since(0, limit=9) == []
    assert len(world.grants.revocations) == 0
    feed = (await http.get("/v1/revocations?since=0")).json()
    assert (feed["entries"], feed["latest"]) == ([], 1)


async def test_a_grant_whose_creation_was_never_audited_gets_no_token(world, http) -> None:
    """What a crash between the insert and its audit event would leave: a stored grant with
    no creation event. It is listed, but never usable."""
    from keygrants.grants.model import Grant, new_grant_id

    now = int(time.time())
    orphan = Grant(id=new_grant_id(), key_id=world.ids["enc"], grantee="svc",
                   operations=("decrypt",), issuer="admin", created_at=now, not_before=now,
                   expires_at=now + 300)
    world.store.create_grant(orphan)
    r = await http.post(f"/v1/grants/{orphan.id}/token", headers=svc(world))
    assert (r.status_code, code_of(r)) == (403, "grant_revoked")
    created = (await create(http, world)).json()["grant"]["id"]
    assert (await http.post(f"/v1/grants/{created}/token", headers=svc(world))).status_code == 200


# -- regressions from review --------------------------------------------------------------------

async def test_exchanges_and_delegations_cannot_multiply_a_limited_grants_uses(world, http) -> None:
    parent = (await create(http, world, operations=["decrypt", "create_grant"],
                           max_uses=1)).json()
    outcomes = []
    for _ in range(3):
        r = await http.post("/v1/token-exchange", headers=svc(world),
                            json={"subject_token": parent["token"], "scope": "decrypt"})
        outcomes.append(r.status_code if r.status_code == 200 else code_of(r))
        if r.status_code == 200:
            assert (await decrypt(http, world, svc(world, r.json()["access_token"]))).status_code == 200
    assert outcomes[0] == 200 and set(outcomes[1:]) <= {"attenuation_violated", "grant_exhausted"}
    assert code_of(await decrypt(http, world, svc(world, parent["token"]))) == "grant_exhausted"
    principal(world, "worker")
    delegating = (await create(http, world, operations=["decrypt", "create_grant"],
                               max_uses=2)).json()["token"]
    made = [await create(http, world, svc(world, delegating), grantee="worker", max_uses=1,
                         ttl=60) for _ in range(3)]
    assert [r.status_code for r in made][:2] == [201, 201] and made[2].status_code == 403
    unlimited_child = await create(http, world, svc(world, delegating), grantee="worker", ttl=60)
    assert code_of(unlimited_child) in ("attenuation_violated", "grant_exhausted")


async def test_a_second_revoke_all_in_the_same_second_stops_a_grant_made_between(world,
                                                                                  http) -> None:
    fixed = time.time()
    world.grants._clock = lambda: fixed
    await http.post("/v1/revoke-all", json={"principal": "svc"}, headers=world.auth)
    between = (await create(http, world)).json()["token"]  # dated after the first revoke-all
    assert (await decrypt(http, world, svc(world, between))).status_code == 200
    again = await http.post("/v1/revoke-all", json={"principal": "svc"}, headers=world.auth)
    assert again.json()["revoked"] == 1
    assert code_of(await decrypt(http, world, svc(world, between))) == "grant_revoked"


async def test_a_revoke_all_takes_effect_before_its_grants_are_ended(world, http,
                                                                      monkeypatch) -> None:
    fixed = time.time()  # the revoke-all in the second the fixture's grants were made
    world.grants._clock = lambda: fixed
    end_grants = world.store.end_grants

    def grants_cannot_be_ended(grant_ids: Any, **kw: Any) -> Any:
        if grant_ids:  # the wholesale entry goes through, ending the grants fails
            raise StoreError("simulated: the store stopped answering")
        return end_grants(grant_ids, **kw)

    monkeypatch.setattr(world.store, "end_grants", grants_cannot_be_ended)
    r = await http.post("/v1/revoke-all", json={"principal": "svc"}, headers=world.auth)
    assert (r.status_code, code_of(r)) == (503, "store_unavailable")
    feed = (await http.get("/v1/revocations")).json()["entries"]
    assert [(e["kind"], e["id"]) for e in feed] == [("principal", "svc")]
    # every token issued so far is refused, and none can be minted for the earlier grants
    assert code_of(await decrypt(http, world, svc(world, world.grant_token))) == "grant_revoked"
    minted = await http.post(f"/v1/grants/{world.grant_id}/token", headers=svc(world))
    assert (minted.status_code, code_of(minted)) == (403, "grant_revoked")
    still = world.store.get_grant(world.grant_id)
    assert still is not None and still.state == "active"
    monkeypatch.setattr(world.store, "end_grants", end_grants)
    r = await http.post("/v1/revoke-all", json={"principal": "svc"}, headers=world.auth)
    assert r.json()["revoked"] == 2  # the retry ends what is still live


async def test_revoke_all_ends_grants_in_batches_with_entries_kept_until_each_expires(
        world, http, monkeypatch) -> None:
    monkeypatch.setattr("keygrants.grant_service._END_BATCH", 2)
    short = (await create(http, world, ttl=60)).json()["grant"]["id"]
    principal(world, "worker")
    delegating = (await create(http, world, operations=["decrypt", "create_grant"])).json()
    child = (await create(http, world, svc(world, delegating["token"]), grantee="worker",
                          ttl=60)).json()["grant"]["id"]
    calls: list[tuple[int, dict[str, Any]]] = []
    end_grants, live_grant_ids = world.store.end_grants, world.store.live_grant_ids
    monkeypatch.setattr(world.store, "end_grants", lambda ids, **kw: (
        calls.append((len(ids), kw)), end_grants(ids, **kw))[1])
    lookups: list[dict[str, Any]] = []
    monkeypatch.setattr(world.store, "live_grant_ids", lambda **kw: (
        lookups.append(kw), live_grant_ids(**kw))[1])
    r = await http.post("/v1/revoke-all", json={"principal": "svc"}, headers=world.auth)
    # the fixture's grant and pending request, the short grant, the delegating one, its child
    assert r.json()["revoked"] == 5
    assert [n for n, _ in calls] == [0, 2, 2, 1]  # the wholesale entry alone, then batches
    assert all("parent_id" not in kw for kw in lookups)  # sub-grants: one lookup per level
    feed = {e["id"]: e for e in (await http.get("/v1/revocations")).json()["entries"]}
    leeway, max_ttl = world.grants.settings.leeway, world.grants.settings.max_ttl
    wholesale = feed["svc"]
    assert wholesale["expires_at"] - wholesale["revoked_at"] == max_ttl + leeway
    for gid in (short, child):
        g = world.store.get_grant(gid)
        assert g is not None and g.state == "revoked"
        assert feed[gid]["expires_at"] == g.expires_at + leeway


async def test_a_batch_whose_every_item_failed_counts_no_use(world, http) -> None:
    """Every item refused by the grant (another key) or failing (a damaged ciphertext) used to
    answer 200 and spend a use: a limited grant could be used up with nothing decrypted."""
    created = (await create(http, world, max_uses=2)).json()
    grant_id, token = created["grant"]["id"], created["token"]
    for items in ([{"ciphertext": b64(world.sealed["off"])}],  # under key "off": not granted
                  [{"ciphertext": b64(world.ciphertext[:-1] + b"x"), "context": world.CONTEXT}]):
        r = await http.post("/v1/decrypt-batch", headers=svc(world, token), json={"items": items})
        assert r.status_code == 200, r.text
        assert [i["error"]["code"] for i in r.json()["results"]] in (
            ["key_not_granted"], ["invalid_ciphertext"])
    grant = world.store.get_grant(grant_id)
    assert grant is not None and grant.uses == 0
    good = {"ciphertext": b64(world.ciphertext), "context": world.CONTEXT}
    r = await http.post("/v1/decrypt-batch", headers=svc(world, token),
                        json={"items": [good, {"ciphertext": b64(world.sealed["off"])}]})
    assert r.json()["results"][0]["plaintext"] == b64(world.PLAINTEXT)
    grant = world.store.get_grant(grant_id)
    assert grant is not None and grant.uses == 1  # one item done: the request counts


async def test_refused_or_failed_requests_count_no_use(world, http) -> None:
    token = (await create(http, world, operations=["re_encrypt", "decrypt"], max_uses=2)).json()
    grant_id, token = token["grant"]["id"], token["token"]
    other_key = await http.post("/v1/re-encrypt", headers=svc(world, token), json={
        "ciphertext": b64(world.ciphertext), "context": world.CONTEXT, "destination_key": "enc2"})
    assert code_of(other_key) == "key_not_granted"
    bad = await http.post("/v1/decrypt", headers=svc(world, token),
                          json={"ciphertext": b64(world.ciphertext[:-1] + b"x"),
                                "context": world.CONTEXT})
    assert code_of(bad) == "invalid_ciphertext"
    await http.post("/v1/keys/enc/disable", headers=world.auth)
    disabled = await decrypt(http, world, svc(world, token))
    assert code_of(disabled) == "key_disabled"
    await http.post("/v1/keys/enc/enable", headers=world.auth)
    grant = world.store.get_grant(grant_id)
    assert grant is not None and grant.uses == 0
    assert [(await decrypt(http, world, svc(world, token))).status_code for _ in range(3)] == [
        200, 200, 403]


async def test_a_pending_request_expires_and_cannot_be_approved_later(world, http) -> None:
    world.grants._clock = lambda: time.time() + 301  # the request's 5-minute window is over
    r = await http.post(f"/v1/grants/{world.pending_grant_id}/approve", headers=world.auth, json={})
    assert (r.status_code, code_of(r)) == (409, "grant_state")
    assert "expired" in r.json()["error"]["message"]


async def test_revoke_all_for_a_principal_reveals_nothing_to_the_unauthorized(world, http) -> None:
    nobody = principal(world, "nobody")
    for target in ("svc", "no-such-principal"):
        r = await http.post("/v1/revoke-all", json={"principal": target}, headers=nobody)
        assert (r.status_code, code_of(r)) == (403, "forbidden")


async def test_approval_notes_are_audited(world, http) -> None:
    r = await http.post(f"/v1/grants/{world.pending_grant_id}/approve", headers=world.auth,
                        json={"note": "incident 42, paged by ops"})
    events = [decode_event(e) for e in world.audit.log.search(
        EventQuery(grant_id=world.pending_grant_id, type="grant.approve"))]
    assert r.status_code == 200 and events[0].detail["note"] == "incident 42, paged by ops"


def test_revocations_written_by_another_node_are_applied(tmp_path) -> None:
    import os

    from keygrants.errors import GrantRevoked
    from keygrants.grant_service import GrantService
    from keygrants.models import CreateGrantRequest, CreateKeyRequest
    from keygrants.service import KMS
    from keygrants.store.sqlite import SQLiteStore

    root = os.urandom(32)
    stores = [SQLiteStore(tmp_path / "shared.db") for _ in range(2)]
    kms_a, kms_b = (KMS(s, root) for s in stores)
    kms_a.create_key(ADMIN, CreateKeyRequest(name="k"))
    from keygrants.auth.model import Principal

    stores[0].create_principal(Principal(id="admin", builtin=True, created_at=0, updated_at=0))
    node_a = GrantService(kms_a, None, root_key=root)
    node_b = GrantService(kms_b, None, root_key=root)
    x, y = (node_a.create(ADMIN, CreateGrantRequest(key="k", grantee="admin",
                                                    operations=["encrypt"])) for _ in range(2))
    node_b.revoke(ADMIN, x.grant.id)  # feed entry 1, written by B
    node_a.revoke(ADMIN, y.grant.id)  # feed entry 2, written by A
    node_a.run_due()
    with pytest.raises(GrantRevoked):
        assert x.token is not None
        node_a.verify_presented(ADMIN, x.token)
    for s in stores:
        s.close()


def test_a_node_learns_an_issuer_key_another_node_published_when_a_token_names_it(
        tmp_path) -> None:
    import os

    from keygrants.auth.model import Principal
    from keygrants.crypto.signing import b64url
    from keygrants.errors import GrantUnknownKey
    from keygrants.grant_service import GrantService, GrantSettings
    from keygrants.models import CreateGrantRequest, CreateKeyRequest
    from keygrants.service import KMS
    from keygrants.store.sqlite import SQLiteStore

    clock = [1_800_000_000.0]
    root = os.urandom(32)
    stores = [SQLiteStore(tmp_path / "shared.db") for _ in range(2)]
    kms_a, kms_b = (KMS(s, root) for s in stores)
    kms_a.create_key(ADMIN, CreateKeyRequest(name="k"))
    stores[0].create_principal(Principal(id="admin", builtin=True, created_at=0, updated_at=0))
    settings = GrantSettings(jwks_max_age=10)
    node_a, node_b = (GrantService(k, None, root_key=root, settings=settings,
                                   clock=lambda: clock[0]) for k in (kms_a, kms_b))
    request = CreateGrantRequest(key="k", grantee="admin", operations=["encrypt"])
    first = node_a.create(ADMIN, request).token
    assert first is not None
    node_b.verify_presented(ADMIN, first)  # both nodes read the same first key

    staged = node_a.rotate_issuer(ADMIN)
    clock[0] = staged.activate_at + 5  # B has not read the issuer keys since the rotation
    made = node_a.create(ADMIN, request).token
    assert made is not None
    assert node_b.verify_presented(ADMIN, made).kid == staged.kid

    # a token naming a kid nobody published reloads at most once a second
    forged = node_a.create(ADMIN, request).token
    assert forged is not None
    reads = []
    real = node_b.reload_issuer_keys
    node_b.reload_issuer_keys = lambda: (reads.append(1), real())  # type: ignore[method-assign]
    clock[0] += 2  # past the reload the token above caused
    header = b'{"alg":"EdDSA","kid":"no-such-key","typ":"kg+jwt"}'
    unknown = b64url(header) + forged[forged.index("."):]
    for _ in range(3):
        with pytest.raises(GrantUnknownKey):
            node_b.verify_presented(ADMIN, unknown)
    assert reads == [1]
    clock[0] += 1.5
    with pytest.raises(GrantUnknownKey):
        node_b.verify_presented(ADMIN, unknown)
    assert reads == [1, 1]
    for s in stores:
        s.close()


async def test_a_grant_that_does_not_exist_is_told_apart_only_to_the_admin(
        world, http) -> None:
    """A caller with no right on a grant got 403 for an existing id and 404 for an unknown
    one: which ids exist (or still do) was told to anyone."""
    from keygrants.grants.model import new_grant_id

    existing = grant_id_of(world.grant_token)
    unknown = new_grant_id()
    outsider = principal(world, "outsider")
    for method, suffix in (("GET", ""), ("POST", "/revoke"), ("POST", "/retire"),
                           ("POST", "/token"), ("POST", "/approve"), ("POST", "/reject")):
        codes = []
        for grant_id in (existing, unknown):
            r = await http.request(method, f"/v1/grants/{grant_id}{suffix}", headers=outsider,
                                   json={} if method == "POST" else None)
            codes.append((r.status_code, code_of(r)))
        assert codes[0] == codes[1] == (403, "forbidden"), (suffix, codes)
        r = await http.request(method, f"/v1/grants/{unknown}{suffix}", headers=world.auth,
                               json={} if method == "POST" else None)
        assert (r.status_code, code_of(r)) == (404, "grant_not_found"), suffix
    # nor to a caller allowed grants on some keys and not on others (a stand-in key for the
    # unknown grant told it which ids exist on the others)
    auditor = principal(world, "auditor")
    world.access.service.put_policy(ADMIN, "auditor", PutPolicyRequest(text='''
        permit(principal == Keygrants::Principal::"auditor",
               action == Keygrants::Action::"list_grants", resource);
        forbid(principal == Keygrants::Principal::"auditor",
               action == Keygrants::Action::"list_grants", resource)
            when { resource.name == "enc" };'''))
    seen = [(await http.get(f"/v1/grants/{grant_id}", headers=auditor)).status_code
            for grant_id in (existing, unknown)]
    assert seen == [403, 403]
