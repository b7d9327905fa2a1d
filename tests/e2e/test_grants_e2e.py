"""End to end: grants against a real server process on SQLite: a single-use grant raced by
50 concurrent requests succeeds exactly once, and grants survive a restart."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.e2e

RACERS = 50


def admin_headers(server) -> dict[str, str]:
    token = (server.data_dir / "admin.token").read_text().strip()
    return {"Authorization": f"Bearer {token}"}


def setup_grantee(server) -> dict[str, str]:
    admin = admin_headers(server)
    with httpx.Client(base_url=server.url, headers=admin, timeout=10) as c:
        assert c.post("/v1/keys", json={"name": "payments"}).status_code == 201
        assert c.post("/v1/principals", json={"id": "svc"}).status_code == 201
        api_key = c.post("/v1/principals/svc/api-keys", json={}).json()["api_key"]
    return {"Authorization": f"Bearer {api_key}"}


async def race(url: str, headers: dict[str, str], n: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=30) as c:
        start = asyncio.Event()

        async def one() -> httpx.Response:
            await start.wait()
            return await c.post("/v1/keys/payments/encrypt",
                                json={"plaintext": base64.b64encode(b"x").decode()})

        tasks = [asyncio.create_task(one()) for _ in range(n)]
        await asyncio.sleep(0.2)  # every task is waiting on the event
        start.set()
        return await asyncio.gather(*tasks)


@pytest.mark.parametrize("uses", [1, 3])
def test_limited_grants_are_used_exactly_max_uses_times_under_a_race(start_server, tmp_path: Path,
                                                                     uses: int) -> None:
    server = start_server(tmp_path / "data", args=("--rate-limit", "0"))
    svc = setup_grantee(server)
    with httpx.Client(base_url=server.url, headers=admin_headers(server), timeout=10) as c:
        created = c.post("/v1/grants", json={"key": "payments", "grantee": "svc",
                                             "operations": ["encrypt"], "max_uses": uses})
        assert created.status_code == 201, created.text
        token, grant_id = created.json()["token"], created.json()["grant"]["id"]
    responses = asyncio.run(race(server.url, {**svc, "Keygrants-Grant": token}, RACERS))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * uses + [403] * (RACERS - uses)
    assert {r.json()["error"]["code"] for r in responses if r.status_code == 403} == {
        "grant_exhausted"}
    with httpx.Client(base_url=server.url, headers=admin_headers(server), timeout=10) as c:
        assert c.get(f"/v1/grants/{grant_id}").json()["uses"] == uses
    # the count is durable: a restarted server still refuses the exhausted grant
    assert server.stop() == 0
    again = start_server(server.data_dir, args=("--rate-limit", "0"))
    with httpx.Client(base_url=again.url, headers={**svc, "Keygrants-Grant": token},
                      timeout=10) as c:
        r = c.post("/v1/keys/payments/encrypt", json={"plaintext": "eA=="})
        assert (r.status_code, r.json()["error"]["code"]) == (403, "grant_exhausted")


def test_grants_revocations_and_issuer_keys_survive_a_restart(start_server, tmp_path: Path) -> None:
    server = start_server(tmp_path / "data")
    svc = setup_grantee(server)
    admin = admin_headers(server)
    with httpx.Client(base_url=server.url, headers=admin, timeout=10) as c:
        kept = c.post("/v1/grants", json={"key": "payments", "grantee": "svc",
                                          "operations": ["encrypt"]}).json()
        revoked = c.post("/v1/grants", json={"key": "payments", "grantee": "svc",
                                             "operations": ["encrypt"]}).json()
        assert c.post(f"/v1/grants/{revoked['grant']['id']}/revoke").status_code == 200
        jwks = c.get("/.well-known/jwks.json").json()
    assert server.stop() == 0
    again = start_server(server.data_dir)
    with httpx.Client(base_url=again.url, timeout=10) as c:
        assert c.get("/.well-known/jwks.json").json() == jwks
        feed = c.get("/v1/revocations").json()
        assert [e["id"] for e in feed["entries"]] == [revoked["grant"]["id"]]
        body = {"plaintext": "eA=="}
        ok = c.post("/v1/keys/payments/encrypt", json=body,
                    headers={**svc, "Keygrants-Grant": kept["token"]})
        assert ok.status_code == 200, ok.text
        refused = c.post("/v1/keys/payments/encrypt", json=body,
                         headers={**svc, "Keygrants-Grant": revoked["token"]})
        assert refused.json()["error"]["code"] == "grant_revoked"


def test_server_grant_options(start_server, tmp_path: Path) -> None:
    server = start_server(tmp_path / "data", args=("--issuer", "urn:example:kms",
                                                   "--grant-max-ttl", "10m",
                                                   "--grant-default-ttl", "2m"))
    setup_grantee(server)
    with httpx.Client(base_url=server.url, headers=admin_headers(server), timeout=10) as c:
        body = {"key": "payments", "grantee": "svc", "operations": ["encrypt"]}
        created = c.post("/v1/grants", json=body).json()
        claims = created["token"].split(".")[1]
        decoded = base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4))
        assert b'"iss":"urn:example:kms"' in decoded
        grant = created["grant"]
        assert grant["expires_at"] > grant["not_before"]
        too_long = c.post("/v1/grants", json={**body, "ttl": 11 * 60})
        assert (too_long.status_code, too_long.json()["error"]["code"]) == (400, "invalid_request")
    bad = start_server(tmp_path / "other", args=("--grant-leeway", "soon"), ready=False)
    assert bad.wait_exit() == 2 and "--grant-leeway: invalid duration" in bad.output()
