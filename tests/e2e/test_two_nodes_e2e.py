"""Two `keygrants server` processes on one PostgreSQL database and one bus (NATS, or Redis)
behave as one service: a grant made on one node works on the other, a revocation on one is
refused on the other at once (pushed), a single-use grant raced across both nodes is used
exactly once, changes and issuer-key rotations reach the other node, and a node killed and
restarted loses nothing it acknowledged."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sqlite3
import time
from pathlib import Path

import httpx
import pytest

from keygrants import errors
from keygrants.client.verifier import Verifier

pytestmark = pytest.mark.e2e

NATS = ("127.0.0.1", 4222)
BUSES = {"nats": NATS, "redis": ("127.0.0.1", 6379)}
PUSH_WAIT = 10.0  # an upper bound for the test to fail on, not a timing assertion


def bus_or_skip(kind: str = "nats") -> str:
    host, port = BUSES[kind]
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{kind} is not reachable on {host}:{port} (CI must run this test)")
        pytest.skip(f"{kind} is not reachable on {host}:{port}")
    return f"{kind}://{host}:{port}"


def node_args(tmp_path: Path, postgres_url: str, bus: str, *extra: str) -> tuple[str, ...]:
    """The options every node of one service shares: store, seal, bus."""
    seal = f"local://{tmp_path / 'shared-seal.key'}"
    return ("--store", postgres_url, "--seal", seal, "--bus", bus, "--rate-limit", "0", *extra)


def admin_of(tmp_path: Path) -> dict[str, str]:
    """The admin token written by the first node (in ``tmp_path/a``), as a header."""
    return {"Authorization": f"Bearer {(tmp_path / 'a' / 'admin.token').read_text().strip()}"}


@pytest.mark.parametrize("kind", ["nats", "redis"])
def test_two_nodes_share_grants_and_revocations(start_server, tmp_path: Path,
                                                postgres_url: str, kind: str) -> None:
    bus = bus_or_skip(kind)
    common = node_args(tmp_path, postgres_url, bus, "--bus-heartbeat", "0.2")
    node_a = start_server(tmp_path / "a", args=common)
    admin = admin_of(tmp_path)
    with httpx.Client(base_url=node_a.url, headers=admin, timeout=10) as a:
        # made before node B starts: B reads them at start (changes made later are pushed,
        # see test_key_and_principal_changes_reach_the_other_node)
        assert a.post("/v1/principals", json={"id": "svc"}).status_code == 201
        api_key = a.post("/v1/principals/svc/api-keys", json={}).json()["api_key"]
    node_b = start_server(tmp_path / "b", args=common)
    with httpx.Client(base_url=node_a.url, headers=admin, timeout=10) as a, \
            httpx.Client(base_url=node_b.url, headers=admin, timeout=10) as b:
        assert a.post("/v1/keys", json={"name": "shared"}).status_code == 201
        assert b.get("/.well-known/jwks.json").json() == a.get("/.well-known/jwks.json").json()

        made_on_a = a.post("/v1/grants", json={"key": "shared", "grantee": "svc",
                                               "operations": ["encrypt"]}).json()
        svc = {"Authorization": f"Bearer {api_key}", "Keygrants-Grant": made_on_a["token"]}
        body = {"plaintext": "eA=="}
        used_on_b = b.post("/v1/keys/shared/encrypt", json=body, headers=svc)
        assert used_on_b.status_code == 200, used_on_b.text

        # a remote verifier that fetches keys and the feed from node A, subscribed to the bus
        with Verifier(node_a.url, bus_url=bus, poll_interval=600, max_staleness=900) as remote:
            assert remote.verify(made_on_a["token"], operation="encrypt").grantee == "svc"
            assert b.post(f"/v1/grants/{made_on_a['grant']['id']}/revoke").status_code == 200
            deadline = time.monotonic() + PUSH_WAIT
            while True:
                r = a.post("/v1/keys/shared/encrypt", json=body, headers=svc)
                if r.status_code == 403:
                    assert r.json()["error"]["code"] == "grant_revoked"
                    break
                assert time.monotonic() < deadline, "node A never learnt of node B's revocation"
                time.sleep(0.01)
            while True:  # poll_interval 600 s: only the push can tell it in time
                try:
                    remote.verify(made_on_a["token"], operation="encrypt")
                except errors.GrantRevoked:
                    break
                assert time.monotonic() < deadline, "the remote verifier never learnt of it"
                time.sleep(0.01)

        single = a.post("/v1/grants", json={"key": "shared", "grantee": "svc",
                                            "operations": ["encrypt"], "max_uses": 1}).json()
        racer = {"Authorization": f"Bearer {api_key}", "Keygrants-Grant": single["token"]}

    async def race() -> list[int]:
        async with httpx.AsyncClient(timeout=30) as client:
            start = asyncio.Event()

            async def one(url: str) -> int:
                await start.wait()
                r = await client.post(f"{url}/v1/keys/shared/encrypt", json=body, headers=racer)
                return r.status_code

            tasks = [asyncio.create_task(one(node.url)) for node in (node_a, node_b) * 25]
            await asyncio.sleep(0.2)
            start.set()
            return await asyncio.gather(*tasks)

    statuses = asyncio.run(race())
    assert sorted(statuses) == [200] + [403] * 49


def eventually(check, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + PUSH_WAIT
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_key_and_principal_changes_reach_the_other_node(start_server, tmp_path: Path,
                                                        postgres_url: str) -> None:
    common = node_args(tmp_path, postgres_url, bus_or_skip())
    node_a = start_server(tmp_path / "a", args=common)
    node_b = start_server(tmp_path / "b", args=common)
    # B has no admin.token of its own: it says to copy A's (it advised --reset-admin-token,
    # which would revoke the token every node and script uses)
    assert "copy admin.token from the node that made it" in node_b.output()
    admin = admin_of(tmp_path)
    with httpx.Client(base_url=node_a.url, headers=admin, timeout=10) as a, \
            httpx.Client(base_url=node_b.url, headers=admin, timeout=10) as b:
        # a principal, its API key and its policy made on A after B started work on B
        assert a.post("/v1/keys", json={"name": "k"}).status_code == 201
        assert a.post("/v1/principals", json={"id": "late"}).status_code == 201
        created = a.post("/v1/principals/late/api-keys", json={}).json()
        late = {"Authorization": f"Bearer {created['api_key']}"}
        policy = ('permit(principal == Keygrants::Principal::"late", action in '
                  '[Keygrants::Action::"encrypt", Keygrants::Action::"decrypt"], resource);')
        assert a.put("/v1/policies/late", json={"text": policy}).status_code == 200
        body = {"plaintext": "eA=="}
        eventually(lambda: b.post("/v1/keys/k/encrypt", json=body, headers=late).status_code == 200,
                   "node B never accepted the principal made on node A")
        # a key B has cached is rotated on A: B decrypts A's new ciphertexts
        assert b.post("/v1/keys/k/encrypt", json=body).status_code == 200  # cached on B
        assert a.post("/v1/keys/k/rotate").json()["latest_version"] == 2
        fresh = a.post("/v1/keys/k/encrypt", json=body).json()
        assert fresh["key_version"] == 2
        eventually(lambda: b.post("/v1/decrypt", json={"ciphertext": fresh["ciphertext"]})
                   .status_code == 200, "node B never learnt of the rotation on node A")
        # a credential revoked on A stops working on B
        revoked = a.post(f"/v1/principals/late/credentials/{created['credential']['id']}/revoke")
        assert revoked.status_code == 200
        eventually(lambda: b.post("/v1/keys/k/encrypt", json=body, headers=late).status_code == 401,
                   "node B still accepts a credential revoked on node A")


def _kid(token: str) -> str:
    import base64
    import json

    header = token.split(".", 1)[0]
    return str(json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))["kid"])


def test_an_issuer_key_rotation_on_one_node_reaches_the_other(start_server, tmp_path: Path,
                                                              postgres_url: str) -> None:
    """One shared signer: the staged key published on A appears in B's JWKS before it signs
    (pushed), and once active both nodes sign with it and accept each other's tokens."""
    common = node_args(tmp_path, postgres_url, bus_or_skip(), "--jwks-max-age", "2s")
    node_a = start_server(tmp_path / "a", args=common)
    node_b = start_server(tmp_path / "b", args=common)
    admin = admin_of(tmp_path)
    grant = {"key": "k", "grantee": "admin", "operations": ["encrypt"]}
    body = {"plaintext": "eA=="}
    with httpx.Client(base_url=node_a.url, headers=admin, timeout=10) as a, \
            httpx.Client(base_url=node_b.url, headers=admin, timeout=10) as b:
        assert a.post("/v1/keys", json={"name": "k"}).status_code == 201
        old_kid = _kid(b.post("/v1/grants", json=grant).json()["token"])
        staged = a.post("/v1/issuer/rotate").json()
        assert staged["kid"] != old_kid
        eventually(lambda: staged["kid"] in {k["kid"] for k in
                                             b.get("/.well-known/jwks.json").json()["keys"]},
                   "node B never published the issuer key staged on node A")
        assert _kid(b.post("/v1/grants", json=grant).json()["token"]) == old_kid  # not yet
        time.sleep(max(0.0, staged["activate_at"] + 1 - time.time()))
        for signer, user in ((a, b), (b, a)):
            made = signer.post("/v1/grants", json=grant).json()["token"]
            assert _kid(made) == staged["kid"]
            used = user.post("/v1/keys/k/encrypt", json=body,
                             headers={**admin, "Keygrants-Grant": made})
            assert used.status_code == 200, used.text


def test_a_killed_node_loses_nothing_it_acknowledged(start_server, tmp_path: Path,
                                                     postgres_url: str) -> None:
    import signal

    common = node_args(tmp_path, postgres_url, bus_or_skip())
    node_a = start_server(tmp_path / "a", args=common)
    node_b = start_server(tmp_path / "b", args=common)
    admin = admin_of(tmp_path)
    with httpx.Client(base_url=node_a.url, headers=admin, timeout=10) as a:
        assert a.post("/v1/keys", json={"name": "k"}).status_code == 201
        sealed = a.post("/v1/keys/k/encrypt", json={"plaintext": "c2VjcmV0"}).json()
        granted = a.post("/v1/grants", json={"key": "k", "grantee": "admin",
                                             "operations": ["decrypt"], "max_uses": 3}).json()
        used = a.post("/v1/decrypt", json={"ciphertext": sealed["ciphertext"]},
                      headers={**admin, "Keygrants-Grant": granted["token"]})
        assert used.status_code == 200
        revoked = a.post("/v1/grants", json={"key": "k", "grantee": "admin",
                                             "operations": ["decrypt"]}).json()
        assert a.post(f"/v1/grants/{revoked['grant']['id']}/revoke").status_code == 200
    node_a.proc.send_signal(signal.SIGKILL)  # no clean shutdown
    node_a.wait_exit()
    again = start_server(tmp_path / "a", args=common)
    for node in (again, node_b):
        with httpx.Client(base_url=node.url, headers=admin, timeout=10) as c:
            grant = c.get(f"/v1/grants/{granted['grant']['id']}").json()
            assert (grant["state"], grant["uses"]) == ("active", 1)
            r = c.post("/v1/decrypt", json={"ciphertext": sealed["ciphertext"]},
                       headers={**admin, "Keygrants-Grant": revoked["token"]})
            assert r.json()["error"]["code"] == "grant_revoked"
            ok = c.post("/v1/decrypt", json={"ciphertext": sealed["ciphertext"]})
            assert ok.status_code == 200 and ok.json()["plaintext"] == "c2VjcmV0"
    # one audit log for both nodes, intact after the kill: every node's events in one tree
    again.stop()
    node_b.stop()
    verified = again.cli("audit", "verify", "--store", postgres_url, "--json")
    assert verified.returncode == 0, (verified.stdout + verified.stderr).decode()
    report = json.loads(verified.stdout)
    assert report["ok"] and report["events"] > 10


def test_a_bus_that_cannot_be_reached_stops_the_start(start_server, tmp_path: Path) -> None:
    from tests.e2e.conftest import free_port

    node = start_server(tmp_path / "a", ready=False,
                        args=("--bus", f"nats://127.0.0.1:{free_port()}"))
    assert node.wait_exit() != 0
    assert "cannot connect to nats://127.0.0.1:" in node.output()
    # neither announced nor audited as started (it said "listening" and left a server.start
    # with no server.stop)
    assert "listening" not in node.output()
    with contextlib.closing(sqlite3.connect(node.data_dir / "audit.db")) as db:
        assert db.execute("SELECT count(*) FROM events WHERE type = 'server.start'"
                          ).fetchone() == (0,)
