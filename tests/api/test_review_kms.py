"""Review fixes in the KMS core, over HTTP: encrypt-batch items decided whatever their
position, re-encrypt's destination, precise usage and state errors, no key-existence oracle in
decrypt, and refusals inside a batch audited as denials."""

from __future__ import annotations

import base64
import uuid
from typing import Any

import httpx
import pytest

from keygrants.audit.events import AuditEvent, decode_event
from keygrants.audit.log import EventQuery
from keygrants.models import (
    CreateApiKeyRequest,
    CreateKeyRequest,
    CreatePrincipalRequest,
    PutPolicyRequest,
)

from .conftest import ADMIN, World

pytestmark = pytest.mark.anyio

# t42 may encrypt and decrypt under "enc" only with tenant=42 in the context
TENANT_POLICY = """permit(principal == Keygrants::Principal::"t42",
       action in [Keygrants::Action::"encrypt", Keygrants::Action::"decrypt"], resource)
when { resource.name == "enc" && context.encryption_context.contains("tenant=42") };"""

# narrow may use "enc" only (the hostile review's svc-narrow)
NARROW_POLICY = """permit(principal == Keygrants::Principal::"narrow",
       action in [Keygrants::Action::"encrypt", Keygrants::Action::"decrypt",
                  Keygrants::Action::"re_encrypt"], resource)
when { resource.name == "enc" };"""

# broad may decrypt with any key except those tagged secret: it may decrypt with keys that do
# not exist, so it is answered invalid_ciphertext for an unknown key
BROAD_POLICY = """permit(principal == Keygrants::Principal::"broad",
       action in [Keygrants::Action::"decrypt", Keygrants::Action::"re_encrypt"], resource);
forbid(principal == Keygrants::Principal::"broad", action, resource is Keygrants::Key)
when { resource.tags.contains("secret") };"""


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def caller(world: World, principal: str, policy: str) -> dict[str, str]:
    """A principal with an API key and its one policy; its Authorization header."""
    world.access.service.create_principal(ADMIN, CreatePrincipalRequest(id=principal))
    created = world.access.service.create_api_key(ADMIN, principal, CreateApiKeyRequest())
    world.access.service.put_policy(ADMIN, f"{principal}-policy", PutPolicyRequest(text=policy))
    return {"Authorization": f"Bearer {created.api_key}"}


def event_of(world: World, r: httpx.Response) -> AuditEvent:
    return decode_event(world.audit.log.event_data(int(r.headers["x-audit-index"])) or b"")


def error_of(r: httpx.Response) -> tuple[int, str, str]:
    err = r.json()["error"]
    return r.status_code, err["code"], err["message"]


def item_errors(r: httpx.Response) -> list[str | None]:
    assert r.status_code == 200, r.text
    return [i["error"]["code"] if "error" in i else None for i in r.json()["results"]]


def forged(ciphertext: bytes) -> bytes:
    """The ciphertext with its key id replaced by one that names no key."""
    return ciphertext[:1] + uuid.uuid4().bytes + ciphertext[17:]


# -- keys #1: encrypt-batch decides every item on its own ----------------------------------------

async def test_a_malformed_context_fails_only_its_item_wherever_it_is(world, http) -> None:
    """Item 0's context was checked with the key: malformed there, it failed the whole batch."""
    good = {"plaintext": b64(b"b")}
    bad = {"plaintext": b64(b"a"), "context": {"": "x"}}
    for items, expected in (([good, bad], [None, "invalid_request"]),
                            ([bad, good], ["invalid_request", None])):
        r = await http.post("/v1/keys/enc/encrypt-batch", headers=world.auth, json={"items": items})
        assert item_errors(r) == expected
        assert r.json()["results"][expected.index(None)]["key_id"] == world.ids["enc"]
    r = await http.post("/v1/keys/enc/encrypt-batch", headers=world.auth,
                        json={"items": [bad, bad]})
    assert item_errors(r) == ["invalid_request", "invalid_request"]


async def test_a_refused_context_fails_only_its_item_wherever_it_is(world, http) -> None:
    """Item 0's context was decided with the key: refused there, the whole batch was 403."""
    t42 = caller(world, "t42", TENANT_POLICY)
    allowed = {"plaintext": b64(b"a"), "context": {"tenant": "42"}}
    refused = {"plaintext": b64(b"b"), "context": {"tenant": "43"}}
    for items, expected in (([allowed, refused], [None, "forbidden"]),
                            ([refused, allowed], ["forbidden", None])):
        r = await http.post("/v1/keys/enc/encrypt-batch", headers=t42, json={"items": items})
        assert item_errors(r) == expected
        event = event_of(world, r)
        assert (event.type, event.result, event.reason, event.key_id) == (
            "crypto.encrypt_batch", "denied", "forbidden", world.ids["enc"])
        assert event.detail["denied"] == "1" and event.detail["policy"].startswith("deny")
        ciphertext = r.json()["results"][expected.index(None)]["ciphertext"]
        r = await http.post("/v1/decrypt", headers=t42,
                            json={"ciphertext": ciphertext, "context": {"tenant": "42"}})
        assert r.json()["plaintext"] == b64(b"a")


async def test_a_batch_fails_whole_only_for_the_key(world, http) -> None:
    t42 = caller(world, "t42", TENANT_POLICY)
    refused = [{"plaintext": b64(b"x"), "context": {"tenant": t}} for t in ("43", "44")]
    r = await http.post("/v1/keys/enc/encrypt-batch", headers=t42, json={"items": refused})
    assert error_of(r)[:2] == (403, "forbidden")  # nothing in it is the caller's to encrypt
    event = event_of(world, r)
    assert (event.result, event.key_id) == ("denied", world.ids["enc"])
    # an unknown key: 404 only to a caller who could encrypt with a key of that name
    allowed = [{"plaintext": b64(b"x"), "context": {"tenant": "42"}}]
    r = await http.post("/v1/keys/nope/encrypt-batch", headers=t42, json={"items": allowed})
    assert error_of(r)[:2] == (403, "forbidden")
    r = await http.post("/v1/keys/nope/encrypt-batch", headers=world.auth, json={"items": allowed})
    assert error_of(r)[:2] == (404, "key_not_found")
    # a key state error is the whole batch's, for a caller allowed some item
    r = await http.post("/v1/keys/off/encrypt-batch", headers=world.auth,
                        json={"items": [{"plaintext": b64(b"x"), "context": {"": "x"}},
                                        {"plaintext": b64(b"y")}]})
    assert error_of(r)[:2] == (409, "key_disabled")


# -- keys #3 and #8: re-encrypt's destination ----------------------------------------------------

async def test_an_empty_destination_key_is_refused(world, http) -> None:
    """`destination_key: ""` re-encrypted under the source key."""
    body = {"ciphertext": b64(world.ciphertext), "context": world.CONTEXT}
    r = await http.post("/v1/re-encrypt", headers=world.auth, json={**body, "destination_key": ""})
    status, code, message = error_of(r)
    assert (status, code) == (400, "invalid_request") and "destination_key is empty" in message
    for absent in ({}, {"destination_key": None}):
        r = await http.post("/v1/re-encrypt", headers=world.auth, json={**body, **absent})
        assert r.status_code == 200 and r.json()["key_id"] == world.ids["enc"]


@pytest.mark.parametrize("destination", ["mac", "sig", "der"])
async def test_a_destination_that_does_not_encrypt_is_named_as_such(world, http,
                                                                    destination) -> None:
    """The documented message was dead code: the generic usage message came first."""
    r = await http.post("/v1/re-encrypt", headers=world.auth, json={
        "ciphertext": b64(world.ciphertext), "context": world.CONTEXT,
        "destination_key": destination})
    if destination == "der":  # a derivable AES key is an encryption key
        assert r.status_code == 200
        return
    assert error_of(r) == (400, "invalid_key_usage", "the destination key is not an encryption key")


# -- keys #5 and #7: state and usage messages ----------------------------------------------------

async def test_enabling_a_destroyed_key_says_it_is_destroyed(world, http) -> None:
    """It said 'cancel the deletion first', which cancel-deletion then refused."""
    r = await http.post("/v1/keys/doomed/enable", headers=world.auth)
    assert error_of(r) == (409, "key_state", "key 'doomed' is pending deletion; cancel the "
                                             "deletion first")
    world.store.destroy_key(world.ids["doomed"], now=2**40)
    world.kms.forget_cached()
    r = await http.post("/v1/keys/doomed/enable", headers=world.auth)
    assert error_of(r) == (409, "key_destroyed", "key 'doomed' has been destroyed")
    r = await http.patch("/v1/keys/doomed", headers=world.auth, json={"description": "x"})
    assert error_of(r)[:2] == (409, "key_destroyed")  # the same answer as update


@pytest.mark.parametrize("key", ["enc", "mac"])
async def test_derive_with_a_key_not_created_derivable_says_so(world, http, key) -> None:
    r = await http.post(f"/v1/keys/{key}/derive", headers=world.auth, json={"context": {"a": "b"}})
    status, code, message = error_of(r)
    assert (status, code) == (400, "invalid_key_usage")
    assert message.startswith(f"key '{key}' was not created derivable")
    assert "--derivable" in message and '"derivable": true' in message


async def test_derive_with_an_asymmetric_key_keeps_the_usage_message(world, http) -> None:
    r = await http.post("/v1/keys/sig/derive", headers=world.auth, json={"context": {"a": "b"}})
    assert error_of(r) == (400, "invalid_key_usage", "derive is not allowed for key 'sig' (spec "
                                                     "ed25519, purpose sign-verify)")


# -- hostile #1: no key-existence oracle in decrypt ----------------------------------------------

async def _answers(http: httpx.AsyncClient, headers: dict[str, str], ciphertext: bytes,
                   good: bytes) -> list[Any]:
    """What a caller learns about ``ciphertext`` from decrypt, decrypt-batch and re-encrypt."""
    single = await http.post("/v1/decrypt", headers=headers, json={"ciphertext": b64(ciphertext)})
    batch = await http.post("/v1/decrypt-batch", headers=headers, json={"items": [
        {"ciphertext": b64(good)}, {"ciphertext": b64(ciphertext)}]})
    moved = await http.post("/v1/re-encrypt", headers=headers,
                            json={"ciphertext": b64(ciphertext), "destination_key": "enc"})
    return [error_of(single), item_errors(batch), error_of(moved)]


async def test_a_refused_caller_cannot_tell_a_key_from_no_key(world, http) -> None:
    """A ciphertext naming a key the caller may not use was 403, one naming no key 400."""
    narrow = caller(world, "narrow", NARROW_POLICY)
    good = world.kms.encrypt(ADMIN, "enc", b"mine").ciphertext
    other = world.kms.encrypt(ADMIN, "enc2", b"not mine").ciphertext
    tampered = other[:-1] + bytes([other[-1] ^ 1])
    refused = [(403, "forbidden", "forbidden"), [None, "forbidden"], (403, "forbidden", "forbidden")]
    for ciphertext in (other, tampered, forged(other), forged(good)):
        assert await _answers(http, narrow, ciphertext, good) == refused
    # a caller the policy allows any key still gets invalid_ciphertext for an unknown one
    opaque = (400, "invalid_ciphertext", "invalid ciphertext")
    assert await _answers(http, world.auth, forged(other), good) == [
        opaque, [None, "invalid_ciphertext"], opaque]
    r = await http.post("/v1/decrypt", headers=narrow, json={"ciphertext": b64(good)})
    assert r.json()["plaintext"] == b64(b"mine")


async def test_a_caller_allowed_unknown_keys_gets_the_same_answer_for_a_refused_one(world,
                                                                                   http) -> None:
    """A policy that allows a key with nothing known about it (any key but the tagged ones)
    gets invalid_ciphertext for an unknown key: so for a key it is refused too."""
    broad = caller(world, "broad", BROAD_POLICY)
    world.kms.create_key(ADMIN, CreateKeyRequest(name="vault", tags=["secret"]))
    vault = world.kms.encrypt(ADMIN, "vault", b"secret").ciphertext
    good = world.kms.encrypt(ADMIN, "enc", b"mine").ciphertext
    opaque = (400, "invalid_ciphertext", "invalid ciphertext")
    expected = [opaque, [None, "invalid_ciphertext"], opaque]
    assert await _answers(http, broad, vault, good) == expected
    assert await _answers(http, broad, forged(vault), good) == expected
    # the refusal is audited as one, with the key
    r = await http.post("/v1/decrypt", headers=broad, json={"ciphertext": b64(vault)})
    event = event_of(world, r)
    assert (event.type, event.result, event.reason, event.key_id) == (
        "crypto.decrypt", "denied", "invalid_ciphertext", world.kms.describe_key(ADMIN, "vault").id)
    assert event.detail["policy"].startswith("deny")
    r = await http.post("/v1/decrypt", headers=broad, json={"ciphertext": b64(good)})
    assert r.json()["plaintext"] == b64(b"mine")


# -- hostile #2: refusals are audited as denials, with the key -----------------------------------

async def test_a_refusal_inside_a_decrypt_batch_is_audited_as_a_denial(world, http) -> None:
    """One throw-away bad item turned a refused probe into an `ok` event naming no key."""
    narrow = caller(world, "narrow", NARROW_POLICY)
    other = world.kms.encrypt(ADMIN, "enc2", b"not mine").ciphertext
    r = await http.post("/v1/decrypt-batch", headers=narrow, json={"items": [
        {"ciphertext": b64(other)}, {"ciphertext": "AAAA"}]})
    assert item_errors(r) == ["forbidden", "invalid_ciphertext"]
    event = event_of(world, r)
    assert (event.type, event.result, event.reason, event.key_id, event.key_version) == (
        "crypto.decrypt_batch", "denied", "forbidden", world.ids["enc2"], None)
    assert event.detail["denied"] == "1" and event.detail["policy"].startswith("deny")
    assert "keys" not in event.detail
    found = world.audit.log.search(EventQuery(key_id=world.ids["enc2"], type="crypto.decrypt_batch"))
    assert [decode_event(e).seq for e in found] == [event.seq]
    # with an item decrypted: still a denial; the key it used is listed
    good = world.kms.encrypt(ADMIN, "enc", b"mine").ciphertext
    r = await http.post("/v1/decrypt-batch", headers=narrow, json={"items": [
        {"ciphertext": b64(good)}, {"ciphertext": b64(other)}, {"ciphertext": b64(other)}]})
    assert item_errors(r) == [None, "forbidden", "forbidden"]
    event = event_of(world, r)
    assert (event.result, event.key_id) == ("denied", world.ids["enc2"])
    assert (event.detail["denied"], event.detail["keys"]) == ("2", world.ids["enc"])
    # nothing refused: ok, as before
    r = await http.post("/v1/decrypt-batch", headers=narrow,
                        json={"items": [{"ciphertext": b64(good)}, {"ciphertext": "AAAA"}]})
    event = event_of(world, r)
    assert (event.result, event.reason, event.key_id) == ("ok", None, world.ids["enc"])
    assert "denied" not in event.detail


async def test_a_batch_refused_on_several_keys_lists_them(world, http) -> None:
    narrow = caller(world, "narrow", NARROW_POLICY)
    items = [{"ciphertext": b64(world.kms.encrypt(ADMIN, k, b"x").ciphertext)}
             for k in ("enc", "enc2", "der")]
    r = await http.post("/v1/decrypt-batch", headers=narrow, json={"items": items})
    assert item_errors(r) == [None, "forbidden", "forbidden"]
    event = event_of(world, r)
    assert (event.result, event.key_id) == ("denied", None)
    assert event.detail["denied_keys"] == ",".join(sorted([world.ids["enc2"], world.ids["der"]]))
    assert event.detail["keys"] == world.ids["enc"]
    r = await http.post("/v1/decrypt-batch", headers=narrow, json={"items": items[1:]})
    assert error_of(r)[:2] == (403, "forbidden")  # every item refused: the whole request
    event = event_of(world, r)
    assert (event.result, event.key_id) == ("denied", None)
    assert event.detail["denied_keys"] == ",".join(sorted([world.ids["enc2"], world.ids["der"]]))


async def test_a_refused_request_names_the_key_in_its_event(world, http) -> None:
    """A single request's denial had no key: the audit could not say what was tried."""
    narrow = caller(world, "narrow", NARROW_POLICY)
    other = world.kms.encrypt(ADMIN, "enc2", b"not mine").ciphertext
    requests: list[tuple[str, dict[str, Any], str | None]] = [
        ("/v1/decrypt", {"ciphertext": b64(other)}, world.ids["enc2"]),
        ("/v1/keys/enc2/encrypt", {"plaintext": b64(b"x")}, world.ids["enc2"]),
        ("/v1/re-encrypt", {"ciphertext": b64(world.ciphertext), "context": world.CONTEXT,
                            "destination_key": "enc2"}, world.ids["enc2"]),
        # a key that does not exist is named by nothing (the event has no key to name)
        ("/v1/keys/nope/encrypt", {"plaintext": b64(b"x")}, None),
        ("/v1/decrypt", {"ciphertext": b64(forged(other))}, None),
    ]
    for url, body, key_id in requests:
        r = await http.post(url, headers=narrow, json=body)
        assert error_of(r)[:2] == (403, "forbidden"), url
        event = event_of(world, r)
        assert (event.result, event.reason, event.key_id) == ("denied", "forbidden", key_id), url
