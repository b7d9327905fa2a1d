#!/usr/bin/env python3
"""Grant issuance with two nodes on PostgreSQL vs one node on PostgreSQL (issue #6), the same
load generator, side by side in one run:

    python benchmarks/nodes_bench.py [--duration 8] [--rounds 2]

Each round: one ``keygrants server`` on a fresh PostgreSQL database (127.0.0.1:5432, trust
auth) takes ``POST /v1/grants`` from ``wrk -c16``; then two servers on another fresh database
(same ``--seal``) take the same total load, ``wrk -c8`` against each at the same time. Reported:
grants/s of one node, of two nodes (sum), and the ratio. wrk runs unpinned: on a 2-core
machine the servers, wrk and PostgreSQL share both cores, which is what limits the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
LUA = HERE / "post_headers.lua"
ADMIN_PG = "postgresql://postgres@127.0.0.1:5432/postgres"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def create_db() -> str:
    import psycopg

    name = f"kg_bench_{secrets.token_hex(6)}"
    with psycopg.connect(ADMIN_PG, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    return name


def drop_db(name: str) -> None:
    import psycopg

    with psycopg.connect(ADMIN_PG, autocommit=True) as c:
        c.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                  (name,))
        c.execute(f'DROP DATABASE IF EXISTS "{name}"')


def start(work: Path, name: str, db: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYGRANTS_")}
    with open(work / f"{name}.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "keygrants", "server", "--listen", f"127.0.0.1:{port}",
             "--data-dir", str(work / name), "--store", f"postgresql://postgres@127.0.0.1:5432/{db}",
             "--seal", f"local://{work / 'seal.key'}", "--rate-limit", "0"],
            stdout=subprocess.DEVNULL, stderr=log, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"server {name} did not start; see {work / name}.log")
        time.sleep(0.05)


def setup(url: str, admin_token: str, work: Path) -> Path:
    """Key, issuer principal with API key and policy; returns the wrk headers file."""
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin_token}"},
                      timeout=10) as c:
        assert c.post("/v1/keys", json={"name": "bench"}).status_code == 201
        for p in ("bench-issuer", "bench-svc"):
            assert c.post("/v1/principals", json={"id": p}).status_code == 201
        api_key = c.post("/v1/principals/bench-issuer/api-keys", json={}).json()["api_key"]
        policy = ('permit(principal == Keygrants::Principal::"bench-issuer", action in '
                  '[Keygrants::Action::"create_grant", Keygrants::Action::"encrypt"], resource);')
        assert c.put("/v1/policies/bench", json={"text": policy}).status_code == 200
    headers = work / "headers.txt"
    headers.write_text(f"Authorization: Bearer {api_key}\n")
    headers.chmod(0o600)
    return headers


def wrk(url: str, connections: int, duration: int, body: Path, headers: Path) -> subprocess.Popen[str]:
    env = dict(os.environ, BENCH_BODY_FILE=str(body), BENCH_HEADERS_FILE=str(headers))
    return subprocess.Popen(["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "-s", str(LUA),
                             f"{url}/v1/grants"], stdout=subprocess.PIPE, text=True, env=env)


def rate(proc: subprocess.Popen[str]) -> float:
    out, _ = proc.communicate(timeout=300)
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if proc.returncode != 0 or m is None or "Non-2xx" in out:
        raise SystemExit(f"wrk failed or saw errors:\n{out}")
    return float(m.group(1))


def one_round(work: Path, duration: int) -> tuple[float, float]:
    body = work / "body.json"
    body.write_text(json.dumps({"key": "bench", "grantee": "bench-svc",
                                "operations": ["encrypt"], "ttl": 300, "max_uses": 10}))
    results = []
    for nodes in (1, 2):
        db = create_db()
        procs = []
        try:
            node_dir = work / f"round-{nodes}-{secrets.token_hex(3)}"
            node_dir.mkdir()
            first, url_a = start(node_dir, "a", db)
            procs.append(first)
            token = (node_dir / "a" / "admin.token").read_text().strip()
            headers = setup(url_a, token, node_dir)
            urls = [url_a]
            if nodes == 2:
                second, url_b = start(node_dir, "b", db)  # after the setup: it loads it all
                procs.append(second)
                urls.append(url_b)
            loads = [wrk(u, 16 // nodes, duration, body, headers) for u in urls]
            results.append(sum(rate(p) for p in loads))
        finally:
            for p in procs:
                p.terminate()
                p.wait(timeout=15)
            drop_db(db)
    return results[0], results[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    ones, twos = [], []
    with tempfile.TemporaryDirectory(prefix="kg-nodes-bench-") as tmp:
        for r in range(args.rounds):
            one, two = one_round(Path(tmp), args.duration)
            ones.append(one)
            twos.append(two)
            print(f"round {r + 1}: one node {one:,.0f} grants/s, two nodes {two:,.0f} grants/s, "
                  f"ratio {two / one:.2f}x")
    one, two = statistics.median(ones), statistics.median(twos)
    print(f"median: one node {one:,.0f}/s, two nodes {two:,.0f}/s, two/one {two / one:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
