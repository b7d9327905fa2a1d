"""``GET /metrics``: what the node counts, in the Prometheus text format, for whom."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from keygrants.api.metrics import CONTENT_TYPE, DURATION_BUCKETS, Metrics, render
from keygrants.audit.events import decode_event
from keygrants.audit.log import EventQuery
from keygrants.models import CreateApiKeyRequest, CreatePrincipalRequest, PutPolicyRequest

from .conftest import ADMIN

pytestmark = pytest.mark.anyio


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, by name and sorted labels."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


async def scrape(http: Any, world: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = await http.get("/metrics", headers=world.auth)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == CONTENT_TYPE
    return samples(r.text)


def requests(operation: str, status: int) -> tuple[str, tuple[tuple[str, str], ...]]:
    return ("keygrants_http_requests_total", (("operation", operation), ("status", str(status))))


async def encrypt(http: Any, headers: dict[str, str]) -> int:
    body = {"plaintext": base64.b64encode(b"x").decode()}
    return (await http.post("/v1/keys/enc/encrypt", json=body, headers=headers)).status_code


async def test_requests_are_counted_by_operation_and_status(world, http) -> None:
    assert [await encrypt(http, world.auth) for _ in range(2)] == [200, 200]
    assert await encrypt(http, {}) == 401
    assert await encrypt(http, {"Authorization": "Bearer kg_ak_nope"}) == 401
    assert (await http.get("/v1/keys/enc", headers=world.auth)).status_code == 200
    got = await scrape(http, world)
    assert got[requests("encrypt", 200)] == 2
    assert got[requests("encrypt", 401)] == 2
    assert got[requests("describeKey", 200)] == 1
    failures = {labels: v for (name, labels), v in got.items()
                if name == "keygrants_auth_failures_total"}
    assert failures == {(("code", "unauthenticated"),): 1, (("code", "unknown_key"),): 1}
    # the histogram counts every answered request of the operation, each in one bucket
    count = ("keygrants_http_request_duration_seconds_count", (("operation", "encrypt"),))
    inf = ("keygrants_http_request_duration_seconds_bucket", (("le", "+Inf"), ("operation", "encrypt")))
    assert got[count] == got[inf] == 4
    # the scrape itself is counted by the next one
    assert (await scrape(http, world))[requests("metrics", 200)] == 1


async def test_a_path_never_becomes_a_label(world, http) -> None:
    assert (await http.get("/v1/no-such-route-zz9", headers=world.auth)).status_code == 404
    r = await http.get("/metrics", headers=world.auth)
    assert "zz9" not in r.text
    assert samples(r.text)[requests("unmatched", 404)] == 1


async def test_refused_grant_tokens_are_counted_by_code(world, http) -> None:
    svc = {"Authorization": f"Bearer {world.api_key}"}
    assert await encrypt(http, {**svc, "Keygrants-Grant": "not-a-token"}) == 403
    assert await encrypt(http, {**svc, "Keygrants-Grant": world.grant_token}) == 200
    got = await scrape(http, world)
    assert got[("keygrants_grant_denials_total", (("code", "grant_malformed"),))] == 1


async def test_answers_refused_for_the_audit_log_are_counted(world, http) -> None:
    world.audit.log.failing = True
    try:
        assert await encrypt(http, world.auth) == 503
    finally:
        world.audit.log.failing = False
    got = await scrape(http, world)
    assert got[("keygrants_audit_unavailable_total", ())] == 1
    assert got[requests("encrypt", 503)] == 1


async def test_gauges_read_the_node_when_scraped(world, http) -> None:
    before = world.audit.log.size
    got = await scrape(http, world)
    assert before <= got[("keygrants_audit_log_size", ())] <= world.audit.log.size
    nonces = world.app.authenticator.nonces
    assert got[("keygrants_signature_replay_cache_capacity", ())] == nonces.capacity
    assert got[("keygrants_signature_replay_cache_entries", ())] == len(nonces) == 0


async def test_the_read_group_may_read_metrics_and_each_scrape_is_audited(world, http) -> None:
    world.access.service.create_principal(ADMIN, CreatePrincipalRequest(id="prometheus"))
    key = world.access.service.create_api_key(ADMIN, "prometheus", CreateApiKeyRequest()).api_key
    scraper = {"Authorization": f"Bearer {key}"}
    assert (await http.get("/metrics", headers=scraper)).status_code == 403
    world.access.service.put_policy(ADMIN, "scrape", PutPolicyRequest(text=(
        'permit(principal == Keygrants::Principal::"prometheus", '
        'action in Keygrants::Action::"read", resource);')))
    r = await http.get("/metrics", headers=scraper)
    assert r.status_code == 200
    events = [decode_event(d) for d in world.audit.log.search(EventQuery(type="metrics.read"))]
    assert [(e.principal, e.result) for e in events] == [("prometheus", "denied"),
                                                         ("prometheus", "ok")]


def test_durations_fall_in_the_first_bucket_that_holds_them() -> None:
    metrics = Metrics()
    for seconds in (0.0005, DURATION_BUCKETS[0], 0.003, 99.0):
        metrics.request("encrypt", 200, seconds)
    got = samples(render(metrics).decode())
    bucket = {dict(labels)["le"]: v for (name, labels), v in got.items()
              if name == "keygrants_http_request_duration_seconds_bucket"}
    # cumulative: le=0.001 holds 0.0005 and 0.001 itself; 0.003 first fits le=0.005
    assert (bucket["0.001"], bucket["0.0025"], bucket["0.005"], bucket["10.0"], bucket["+Inf"]) \
        == (2, 2, 3, 3, 4)
    total = got[("keygrants_http_request_duration_seconds_sum", (("operation", "encrypt"),))]
    assert total == pytest.approx(0.0005 + 0.001 + 0.003 + 99.0)
