"""Audit log benchmarks, side by side in one run.

    python benchmarks/audit_bench.py [--events 50000] [--verify-events 200000] [--duration 10]
                                     [--connections 16,64,128] [--http-only]
                                     [--postgres postgresql://postgres@127.0.0.1:5432/kg_bench]

1. Durable append throughput with group commit on SQLite (WAL, synchronous=FULL): N
   concurrent request coroutines on one event loop (as in the server) each append an event and
   wait for it to be durable; reports events/s and the p50/p99 latency an append adds (submit
   to durable).
2. ``audit verify`` speed: export a log of ``--verify-events`` events and verify the export;
   reports events/s.
3. Encrypt 1 KiB over HTTP (wrk) against the real server (auditing on) and the same server
   built with a no-op audit recorder, turn about at 16, 64 and 128 connections; reports req/s,
   p50/p99 and the ratio at each, and the throughput cost: each build's best rate of the sweep
   (a server's throughput is what it sustains when saturated; with few connections an
   audited server is bounded by its clients waiting for commits, not by its CPU).

Targets (issue 5): >= 20,000 events/s; verify >= 200,000 events/s; audit cost <= 25% of
throughput. The machine is 2 shared cores: read the ratios, not the absolute figures.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from http_encrypt import (
    Target,
    free_port,
    http_call,
    run_wrk,
    spawn,
    stop,
    wait_ready,
)

from keygrants.audit.log import AuditLog
from keygrants.audit.note import NoteSigner
from keygrants.audit.verify import export_lines, verify_export
from keygrants.crypto import SigningKey

FIELDS = {"type": "crypto.encrypt", "result": "ok", "principal": "svc-billing",
          "credential": "cred-1", "key_id": "7944ce7f-035b-44dc-9b55-3d27d4ae4082",
          "key_version": 3, "operation": "encrypt", "request_id": "5f0c3c2e9b1a",
          "source": "127.0.0.1", "node": "bench"}


def bench_append(work: Path, events: int, concurrency: int,
                 postgres: str | None = None) -> tuple[float, float, float]:
    """``concurrency`` request-like coroutines on one event loop (as in the server), each
    awaiting its event's durability before sending the next; on SQLite, or on the
    PostgreSQL database ``postgres`` (its audit schema is dropped first and after)."""
    import asyncio

    signer = NoteSigner("bench.audit", SigningKey.generate("ed25519"))
    log: AuditLog
    if postgres is not None:
        from keygrants.audit.pglog import PostgresAuditLog

        _drop_pg_audit(postgres)
        log = PostgresAuditLog(postgres, signer=signer, origin="bench.audit")
    else:
        log = AuditLog(work / f"append-{concurrency}.db", signer=signer, origin="bench.audit")
    latencies: list[float] = []

    async def client(n: int) -> None:
        for _ in range(n):
            t0 = time.perf_counter()
            await log.submit(dict(FIELDS))  # type: ignore[misc]
            latencies.append(time.perf_counter() - t0)

    async def run() -> float:
        start = time.perf_counter()
        await asyncio.gather(*(client(events // concurrency) for _ in range(concurrency)))
        return time.perf_counter() - start

    elapsed = asyncio.run(run())
    log.close()
    if postgres is not None:
        _drop_pg_audit(postgres)
    latencies.sort()
    return (len(latencies) / elapsed, statistics.median(latencies) * 1000,
            latencies[int(len(latencies) * 0.99)] * 1000)


def _drop_pg_audit(url: str) -> None:
    import psycopg

    from keygrants.audit.pglog import SCHEMA

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")


def bench_verify(work: Path, events: int) -> float:
    signer = NoteSigner("bench.verify", SigningKey.generate("ed25519"))
    log = AuditLog(work / "verify.db", signer=signer, origin="bench.verify", max_batch=4096)
    for chunk in range(0, events, 50_000):  # stay under the writer's queue limit
        futures = [log.submit(dict(FIELDS)) for _ in range(min(50_000, events - chunk))]
        for f in futures:
            f.result()  # type: ignore[union-attr]
    log.checkpoint_now()
    export = work / "export.jsonl"
    with export.open("wb") as out:
        for line in export_lines(log, vkey=signer.verifier().vkey()):
            out.write(line)
    log.close()
    start = time.perf_counter()
    with export.open("rb") as f:
        report = verify_export(f, vkey=signer.verifier().vkey())
    elapsed = time.perf_counter() - start
    assert report.ok and report.events == events, report.problems[:3]
    return events / elapsed


NOAUDIT_RUNNER = """
import sys
from pathlib import Path
import uvicorn
from keygrants.audit.recorder import NoAudit
from keygrants.server import ServerConfig, build_server
built = build_server(ServerConfig(data_dir=Path(sys.argv[1]), listen="127.0.0.1:" + sys.argv[2]))
built.kms.audit = NoAudit()   # the no-op sink: nothing recorded, nothing awaited
uvicorn.run(built.app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning",
            access_log=False, lifespan="on")
"""


def bench_http(work: Path, duration: int, sweep: list[int]) -> dict[int, dict[str, object]]:
    """Both builds up at once, measured turn about at every connection count of ``sweep``
    (so drifts in the shared machine's speed hit both alike)."""
    import base64
    import json

    body = json.dumps({"plaintext": base64.b64encode(os.urandom(1024)).decode()}).encode()
    body_file = work / "body.json"
    body_file.write_bytes(body)
    runner = work / "noaudit_runner.py"
    runner.write_text(NOAUDIT_RUNNER)
    targets: dict[str, Target] = {}
    procs = []
    try:
        for label in ("audit on", "no-op audit"):
            data_dir = work / label.replace(" ", "-")
            port = free_port()
            argv = ([sys.executable, "-m", "keygrants", "server", "--data-dir", str(data_dir),
                     "--listen", f"127.0.0.1:{port}"] if label == "audit on"
                    else [sys.executable, str(runner), str(data_dir), str(port)])
            proc = spawn(label, argv, log_path=work / f"{label}.log", cpu=0)
            procs.append(proc)
            wait_ready(proc, port, "/readyz")
            token = (data_dir / "admin.token").read_text().strip()
            auth = {"Authorization": f"Bearer {token}"}
            status, resp = http_call(port, "POST", "/v1/keys", {"name": "bench"}, auth)
            assert status == 201, resp
            targets[label] = Target(label, port, "/v1/keys/bench/encrypt",
                                    ("Authorization", f"Bearer {token}"), proc.pid)
            run_wrk(targets[label], body_file, duration=2, connections=16, threads=1,
                    cpu=1)  # warm-up
        results: dict[int, dict[str, object]] = {}
        for connections in sweep:
            results[connections] = {
                label: run_wrk(target, body_file, duration=duration, connections=connections,
                               threads=1, cpu=1)
                for label, target in targets.items()}
        return results
    finally:
        for proc in procs:
            stop(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--concurrency", type=int, default=64,
                        help="concurrent requests awaiting durability (append benchmark)")
    parser.add_argument("--verify-events", type=int, default=200_000)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", default="16,64,128",
                        help="wrk connection counts to sweep, comma-separated (HTTP)")
    parser.add_argument("--skip-http", action="store_true")
    parser.add_argument("--http-only", action="store_true", help="run only the HTTP comparison")
    parser.add_argument("--postgres", metavar="URL", default=None,
                        help="also measure the append on this PostgreSQL database (a scratch "
                             "database: its keygrants_audit schema is dropped)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kg-audit-bench-"))
    try:
        print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}")
        if not args.http_only:
            print("1. durable append (group commit on one event loop), by concurrent requests:")
            for concurrency in sorted({16, args.concurrency, 256}):
                rate, p50, p99 = bench_append(work, args.events, concurrency)
                print(f"   {concurrency:4d} concurrent: {rate:8,.0f} events/s "
                      f"(target >= 20,000: {'OK' if rate >= 20_000 else 'BELOW'}); "
                      f"added latency p50 {p50:.2f} ms, p99 {p99:.2f} ms")
            if args.postgres:
                print("   the same on PostgreSQL (one transaction per batch, synchronous_commit on):")
                for concurrency in sorted({16, args.concurrency, 256}):
                    rate, p50, p99 = bench_append(work, args.events, concurrency, args.postgres)
                    print(f"   {concurrency:4d} concurrent: {rate:8,.0f} events/s; added latency "
                          f"p50 {p50:.2f} ms, p99 {p99:.2f} ms")
            vrate = bench_verify(work, args.verify_events)
            print(f"2. verify an export of {args.verify_events:,} events: {vrate:,.0f} events/s "
                  f"(target >= 200,000: {'OK' if vrate >= 200_000 else 'BELOW'})")
        if not args.skip_http:
            sweep = [int(c) for c in args.connections.split(",")]
            res = bench_http(work, args.duration, sweep)
            print("3. encrypt 1 KiB over HTTP (servers on CPU 0, wrk on CPU 1, turn about):")
            best: dict[str, float] = {}
            for connections, runs in res.items():
                on, off = runs["audit on"], runs["no-op audit"]
                for label, r in runs.items():
                    print(f"   {connections:4d} conn  {label:12s} {r.rps:9,.0f} req/s   "  # type: ignore[attr-defined]
                          f"p50 {r.p50_ms:.2f} ms   p99 {r.p99_ms:.2f} ms   "  # type: ignore[attr-defined]
                          f"errors {r.error_count}")  # type: ignore[attr-defined]
                    best[label] = max(best.get(label, 0.0), r.rps)  # type: ignore[attr-defined]
                print(f"   {connections:4d} conn  audit on / no-op = "
                      f"{on.rps / off.rps:.2f}x")  # type: ignore[attr-defined]
            ratio = best["audit on"] / best["no-op audit"]
            print(f"   throughput (best of the sweep): audit on {best['audit on']:,.0f} vs no-op "
                  f"{best['no-op audit']:,.0f} req/s = {ratio:.2f}x (cost {1 - ratio:.0%}; "
                  f"target <= 25%: {'OK' if 1 - ratio <= 0.25 else 'ABOVE'})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
