"""Nodes on one PostgreSQL store catch up with each other's changes on their own schedule, not
only through bus messages: a message lost to a bus outage (or a node run without a bus) used
to leave a disabled key usable and a revoked API key accepted on the other node for good."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.e2e

CATCH_UP_WAIT = 30.0  # an upper bound for the test to fail on, not a timing assertion


def test_a_node_without_the_message_catches_up_within_its_scheduler_interval(
        start_server, tmp_path: Path, postgres_url: str) -> None:
    seal = f"local://{tmp_path / 'shared-seal.key'}"
    common = ("--store", postgres_url, "--seal", seal, "--rate-limit", "0",
              "--scheduler-interval", "0.5")  # no --bus: no change is ever pushed
    node_a = start_server(tmp_path / "a", args=common)
    admin = {"Authorization":
             f"Bearer {(tmp_path / 'a' / 'admin.token').read_text().strip()}"}
    with httpx.Client(base_url=node_a.url, headers=admin, timeout=10) as a:
        assert a.post("/v1/keys", json={"name": "k2"}).status_code == 201
        assert a.post("/v1/principals", json={"id": "svc"}).status_code == 201
        api_key = a.post("/v1/principals/svc/api-keys", json={}).json()
    node_b = start_server(tmp_path / "b", args=common)
    svc = {"Authorization": f"Bearer {api_key['api_key']}"}
    body = {"plaintext": "eA=="}
    with httpx.Client(base_url=node_a.url, headers=admin, timeout=10) as a, \
            httpx.Client(base_url=node_b.url, headers=admin, timeout=10) as b:
        assert b.post("/v1/keys/k2/encrypt", json=body).status_code == 200  # cached on B
        assert b.get("/v1/whoami", headers=svc).status_code == 200
        assert a.post("/v1/keys/k2/disable").status_code == 200
        credential = api_key["credential"]["id"]
        assert a.post(f"/v1/principals/svc/credentials/{credential}/revoke").status_code == 200
        deadline = time.monotonic() + CATCH_UP_WAIT
        while True:
            key_state = b.post("/v1/keys/k2/encrypt", json=body)
            who = b.get("/v1/whoami", headers=svc)
            if key_state.status_code != 200 and who.status_code != 200:
                break
            assert time.monotonic() < deadline, (
                f"node B still serves the change made on A: {key_state.status_code} "
                f"{who.status_code}")
            time.sleep(0.2)
        assert key_state.json()["error"]["code"] == "key_disabled"
        assert who.json()["error"]["code"] == "credential_revoked"
