#!/usr/bin/env python3
"""Revocation propagation: from the moment the revoke call returns to the moment a verifier
in another process refuses the token, via NATS and via Redis (issue #6).

    python benchmarks/revocation_bench.py [--revocations 200] [--buses nats,redis]

For each bus: one ``keygrants server --bus URL`` process (SQLite, loopback), one verifier
process (``keygrants.Verifier(bus_url=URL, poll_interval=600)``: only the push can deliver a
revocation in time) and this driver. Per round the driver creates a grant, hands the token to
the verifier (which verifies it once, then re-verifies it every 0.2 ms), revokes it, and reads
back the moment the verifier was refused; both timestamps are ``time.monotonic()`` on the same
machine. Reports p50 / p99 / max. Target: p99 < 100 ms. NATS on 127.0.0.1:4222 and Redis on
127.0.0.1:6379 must be running.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

BUSES = {"nats": "nats://127.0.0.1:4222", "redis": "redis://127.0.0.1:6379"}

VERIFIER = r"""
import sys, time
from keygrants import Verifier, errors
v = Verifier(sys.argv[1], bus_url=sys.argv[2], poll_interval=600, max_staleness=900)
for line in sys.stdin:
    token = line.strip()
    if not token:
        break
    v.verify(token)
    print("ok", flush=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            v.verify(token)
        except errors.GrantRevoked:
            print(repr(time.monotonic()), flush=True)
            break
        time.sleep(0.0002)
    else:
        print("timeout", flush=True)
v.close()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(bus: str, url_of_bus: str, rounds: int, work: Path,
        from_sent: list[float]) -> list[float]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYGRANTS_")}
    data = work / f"data-{bus}"
    with open(work / f"server-{bus}.log", "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "keygrants", "server", "--listen", f"127.0.0.1:{port}",
             "--data-dir", str(data), "--bus", url_of_bus, "--rate-limit", "0"],
            stdout=subprocess.DEVNULL, stderr=log, env=env)
    base = f"http://127.0.0.1:{port}"
    verifier: subprocess.Popen[str] | None = None
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start; see {work}/server-{bus}.log")
            time.sleep(0.05)
        token = (data / "admin.token").read_text().strip()
        admin = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"},
                             timeout=10)
        assert admin.post("/v1/keys", json={"name": "bench"}).status_code == 201
        assert admin.post("/v1/principals", json={"id": "svc"}).status_code == 201
        verifier = subprocess.Popen([sys.executable, "-c", VERIFIER, base, url_of_bus],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                    env=env)
        assert verifier.stdin is not None and verifier.stdout is not None
        latencies: list[float] = []
        for _ in range(rounds):
            created = admin.post("/v1/grants", json={"key": "bench", "grantee": "svc",
                                                     "operations": ["encrypt"]}).json()
            verifier.stdin.write(created["token"] + "\n")
            verifier.stdin.flush()
            assert verifier.stdout.readline().strip() == "ok"
            sent = time.monotonic()
            r = admin.post(f"/v1/grants/{created['grant']['id']}/revoke")
            returned = time.monotonic()
            assert r.status_code == 200, r.text
            answer = verifier.stdout.readline().strip()
            if answer == "timeout":
                raise SystemExit(f"{bus}: a revocation never reached the verifier")
            latencies.append((float(answer) - returned) * 1000)
            from_sent.append((float(answer) - sent) * 1000)
        verifier.stdin.write("\n")
        verifier.stdin.flush()
        admin.close()
        return latencies
    finally:
        if verifier is not None:
            verifier.kill()
        server.terminate()
        server.wait(timeout=15)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--revocations", type=int, default=200)
    p.add_argument("--buses", default="nats,redis")
    args = p.parse_args()
    ok = True
    with tempfile.TemporaryDirectory(prefix="kg-revocation-bench-") as tmp:
        for bus in args.buses.split(","):
            sent: list[float] = []
            ms = run(bus, BUSES[bus], args.revocations, Path(tmp), sent)
            ms.sort()
            sent.sort()
            p50 = statistics.median(ms)
            p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
            ok &= p99 < 100
            print(f"{bus:6} {len(ms)} revocations: p50 {p50:6.2f} ms  p99 {p99:6.2f} ms  "
                  f"max {ms[-1]:6.2f} ms  (min {ms[0]:.2f} ms; negative = the push arrived "
                  f"before the revoke call's response)  target p99 < 100 ms: "
                  f"{'PASS' if p99 < 100 else 'MISS'}")
            print(f"{'':6} from the revoke request being sent (the whole round trip): p50 "
                  f"{statistics.median(sent):6.2f} ms  p99 "
                  f"{sent[min(len(sent) - 1, round(0.99 * (len(sent) - 1)))]:6.2f} ms")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
