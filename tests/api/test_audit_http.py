"""The edge answers only after the request's audit events are durable (fail-closed)."""

from __future__ import annotations

import base64

import pytest

from keygrants.audit.events import decode_event
from keygrants.audit.log import EventQuery

from .conftest import ADMIN

pytestmark = pytest.mark.anyio


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def test_responses_name_their_audit_event(world, http) -> None:
    r = await http.post("/v1/keys/enc/encrypt", json={"plaintext": b64(b"x")}, headers=world.auth)
    assert r.status_code == 200
    seq = int(r.headers["x-audit-index"])
    event = decode_event(world.audit.log.event_data(seq) or b"")
    assert (event.type, event.result, event.principal, event.key_id, event.key_version,
            event.request_id) == ("crypto.encrypt", "ok", "admin", world.ids["enc"], 1,
                                  r.headers["x-request-id"])


async def test_failures_and_denials_are_audited(world, http) -> None:
    bad = await http.post("/v1/decrypt", json={"ciphertext": b64(b"\x01" * 60)}, headers=world.auth)
    assert bad.status_code == 400
    event = decode_event(world.audit.log.event_data(int(bad.headers["x-audit-index"])) or b"")
    assert (event.type, event.result, event.reason) == ("crypto.decrypt", "error",
                                                        "invalid_ciphertext")
    anon = await http.get("/v1/keys", headers={"Authorization": "Bearer kg_admin_nope"})
    assert anon.status_code == 401
    event = decode_event(world.audit.log.event_data(int(anon.headers["x-audit-index"])) or b"")
    assert (event.type, event.result, event.principal, event.reason) == (
        "auth.failure", "denied", None, "unknown_key")


async def test_state_changes_record_intent_before_effect(world, http) -> None:
    r = await http.post("/v1/keys", json={"name": "audited"}, headers=world.auth)
    assert r.status_code == 201
    events = [decode_event(e) for e in world.audit.log.search(EventQuery(type="key.create",
                                                                         key_id=r.json()["id"]))]
    assert [e.result for e in events] == ["requested", "ok"]
    assert events[0].detail == {"name": "audited", "spec": "aes-256-gcm", "auth": "admin_token",
                                "policy": "builtin:admin"}


async def test_no_answer_and_no_effect_when_the_audit_log_fails(world, http) -> None:
    world.audit.log.failing = True
    before = world.snapshot()
    created = await http.post("/v1/keys", json={"name": "never"}, headers=world.auth)
    assert created.status_code == 503 and created.json()["error"]["code"] == "audit_unavailable"
    rotated = await http.post("/v1/keys/enc/rotate", headers=world.auth)
    assert rotated.status_code == 503
    assert world.snapshot() == before  # nothing created, nothing rotated
    encrypted = await http.post("/v1/keys/enc/encrypt", json={"plaintext": b64(b"secret")},
                                headers=world.auth)
    assert encrypted.status_code == 503 and b"ciphertext" not in encrypted.content
    decrypted = await http.post("/v1/decrypt", json={"ciphertext": b64(world.ciphertext),
                                                     "context": world.CONTEXT}, headers=world.auth)
    assert decrypted.status_code == 503 and world.PLAINTEXT not in decrypted.content
    world.audit.log.failing = False
    again = await http.post("/v1/keys", json={"name": "never"}, headers=world.auth)
    assert again.status_code == 201


async def test_secrets_never_reach_the_audit_log(world, http) -> None:
    secret = b"the plaintext that must not be logged"
    r = await http.post("/v1/keys/enc/encrypt", json={"plaintext": b64(secret)}, headers=world.auth)
    ct = base64.b64decode(r.json()["ciphertext"])
    await http.post("/v1/decrypt", json={"ciphertext": b64(ct)}, headers=world.auth)
    await http.get("/v1/keys", headers={"Authorization": "Bearer kg_admin_leakedtoken"})
    everything = b"".join(data for _, data, _ in world.audit.log.iter_events())
    for forbidden in (secret, b64(secret).encode(), b64(ct).encode(), world.token.encode(),
                      b"kg_admin_leakedtoken"):
        assert forbidden not in everything


async def test_batch_events_name_the_keys_they_used(world, http) -> None:
    """A batch's event named no key (the result has none of its own): a search by key did
    not find batch decrypts of that key."""
    r = await http.post("/v1/decrypt-batch", headers=world.auth, json={"items": [
        {"ciphertext": b64(world.ciphertext), "context": world.CONTEXT}] * 2})
    event = decode_event(world.audit.log.event_data(int(r.headers["x-audit-index"])) or b"")
    assert (event.type, event.key_id, event.key_version) == ("crypto.decrypt_batch",
                                                             world.ids["enc"], 1)
    other = world.kms.encrypt(ADMIN, "enc2", b"second").ciphertext
    r = await http.post("/v1/decrypt-batch", headers=world.auth, json={"items": [
        {"ciphertext": b64(world.ciphertext), "context": world.CONTEXT},
        {"ciphertext": b64(other)}]})
    event = decode_event(world.audit.log.event_data(int(r.headers["x-audit-index"])) or b"")
    assert event.key_id is None
    assert event.detail["keys"] == ",".join(sorted([world.ids["enc"], world.ids["enc2"]]))
    r = await http.post("/v1/keys/enc/encrypt-batch", headers=world.auth,
                        json={"items": [{"plaintext": b64(b"x")}]})
    event = decode_event(world.audit.log.event_data(int(r.headers["x-audit-index"])) or b"")
    assert (event.type, event.key_id) == ("crypto.encrypt_batch", world.ids["enc"])
    found = world.audit.log.search(EventQuery(key_id=world.ids["enc"], type="crypto.decrypt_batch"))
    assert found


async def test_an_internal_error_after_authentication_is_audited(world, http, monkeypatch) -> None:
    """A 500 left no event: whoever could trigger one probed without a trace."""
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(world.kms, "encrypt", broken)
    before = world.audit.log.size
    r = await http.post("/v1/keys/enc/encrypt", json={"plaintext": b64(b"x")}, headers=world.auth)
    assert r.status_code == 500
    events = [decode_event(world.audit.log.event_data(i) or b"")
              for i in range(before, world.audit.log.size)]
    assert [(e.type, e.result, e.principal, e.reason) for e in events] == [
        ("request.rejected", "error", "admin", r.json()["error"]["code"])]
    assert "a bug" not in str(events[0].detail)


async def test_an_export_is_signed_to_its_end(world, http) -> None:
    """The export's own read event came after the newest checkpoint, so `audit verify` of a
    fresh export reported it UNSIGNED. The server checkpoints before it streams and exports
    up to that checkpoint."""
    from keygrants.audit.verify import verify_export

    for i in range(3):
        await http.post("/v1/keys/enc/encrypt", json={"plaintext": b64(bytes([i]))},
                        headers=world.auth)
    r = await http.get("/v1/audit/export", headers=world.auth)
    assert r.status_code == 200
    lines = r.content.splitlines(keepends=True)
    report = verify_export(lines, vkey=world.audit.vkey)
    assert report.ok and report.unsigned == 0, (report.problems, report.unsigned)
    exported = [line for line in lines if line.startswith(b'{"kind":"event"')]
    assert b'"type":"audit.export"' in exported[-1]


# -- reads of the audit log are recorded under the types docs/audit.md lists --------------------

AUDIT_READS = [  # (method, path, body, the event type and operation it records)
    ("GET", "/v1/audit/checkpoint", None, "audit.checkpoint", "read_audit"),
    ("POST", "/v1/audit/checkpoint", None, "audit.checkpoint", "checkpoint_audit"),
    ("GET", "/v1/audit/events?limit=1", None, "audit.read", "read_audit"),
    ("GET", "/v1/audit/proof/inclusion?index=1&size=4", None, "audit.read", "read_audit"),
    ("GET", "/v1/audit/proof/consistency?old=1&new=4", None, "audit.read", "read_audit"),
    ("GET", "/v1/audit/export", None, "audit.export", "read_audit"),
    ("POST", "/v1/audit/hash", {"value": "kg_admin_leaked"}, "audit.hash", "read_audit"),
    ("GET", "/v1/audit/key", None, "audit.read", "read_audit"),
]


def _request_events(world, request_id: str) -> list:
    return [e for e in (decode_event(data) for _, data, _ in world.audit.log.iter_events())
            if e.request_id == request_id]


@pytest.mark.parametrize(("method", "path", "body", "event_type", "operation"), AUDIT_READS,
                         ids=[f"{r[0]} {r[1]}" for r in AUDIT_READS])
async def test_audit_reads_are_recorded_under_their_documented_type(
        world, http, method, path, body, event_type, operation) -> None:
    """Every audit read was recorded as `audit.read_audit` (`audit checkpoint --now`:
    `audit.checkpoint_audit`), types docs/audit.md does not know: a search for
    `--type audit.export` or `audit.hash` found nothing."""
    r = await http.request(method, path, json=body, headers=world.auth)
    assert r.status_code == 200, r.text
    events = _request_events(world, r.headers["x-request-id"])
    assert [(e.type, e.result, e.operation, e.principal) for e in events] == [
        (event_type, "ok", operation, "admin")]
    assert world.audit.log.search(EventQuery(type=event_type))


@pytest.mark.parametrize(("method", "path", "body", "event_type", "operation"), AUDIT_READS,
                         ids=[f"{r[0]} {r[1]}" for r in AUDIT_READS])
async def test_a_refused_audit_read_is_recorded_denied_under_its_type(
        world, http, method, path, body, event_type, operation) -> None:
    """A policy refusal of an audit read left only `request.rejected`, unlike any other
    refused use case."""
    r = await http.request(method, path, json=body,
                           headers={"Authorization": f"Bearer {world.api_key}"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    events = _request_events(world, r.headers["x-request-id"])
    assert [(e.type, e.result, e.operation, e.principal, e.reason) for e in events] == [
        (event_type, "denied", operation, "svc", "forbidden")]
    assert events[0].seq == int(r.headers["x-audit-index"])
    assert events[0].detail["policy"].startswith("deny")
