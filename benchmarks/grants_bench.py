#!/usr/bin/env python3
"""Grants over HTTP: issuance rate, and encrypt with a grant token vs a direct policy permit.

One command, one server (SQLite in a temp data dir, ``--rate-limit 0``), every variant
measured in the same rounds under the same load::

    python benchmarks/grants_bench.py                         # 3 rounds of 5 s per variant
    python benchmarks/grants_bench.py --duration 3 --rounds 1 # quick check

Variants (load: ``wrk -t1 -c16 --latency``; POSTs through ``benchmarks/post_headers.lua``):
  healthz        ``GET /healthz``: no authentication, no audit -- this server's HTTP floor
  encrypt-admin  ``POST /v1/keys/bench/encrypt`` (1 KiB) with the admin bearer token: the
                 reference for issuance (one audited request of the same server)
  issue          ``POST /v1/grants`` by ``bench-issuer`` (API key; policy: ``create_grant``
                 and ``encrypt`` on ``bench``), encrypt for ``bench-svc``, ttl 300,
                 max_uses 10: per request, policy decisions, a durable grant row, durable
                 audit events (``requested`` and ``ok``) and an Ed25519-signed token
  grant          (A) encrypt by ``bench-svc`` (API key, no policy of its own) presenting
                 ``Keygrants-Grant:`` an unlimited grant for encrypt on ``bench``
  direct         (B) encrypt by ``bench-direct`` (API key; policy: encrypt on ``bench``)
  grant-limited  (C) as A with a limited grant (max_uses 1,000,000, the server's maximum; a
                 fresh grant for every run): each use is a durable, counted store write.
                 Informational.

The rounds rotate the order of the variants, so drift on the shared machine hits every variant
alike. The table shows medians over the quiet rounds (see ``http_encrypt.py``) and the
server's CPU time per request; every ratio is the median of the ratios measured within each
round. The server is pinned to one CPU and wrk to another when there are two.

Targets (issue): issuance >= 3,000 grants/s with p99 < 10 ms; a grant costs at most 1.5x a
direct permit, i.e. throughput grant/direct >= 0.667. Printed as PASS/MISS.

Exit status: 0 when every run answered only 2xx, 1 when one did not or setup failed (a missed
target is reported, not an error), 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import http_encrypt as h  # noqa: E402  (the shared process/wrk harness)

POST_HEADERS_LUA = HERE / "post_headers.lua"
KEY = "bench"
ENCRYPT_PATH = f"/v1/keys/{KEY}/encrypt"
ISSUE_TTL = 300
ISSUE_MAX_USES = 10
LIMITED_MAX_USES = 1_000_000  # GrantSettings.max_uses, the most the server accepts
TARGET_ISSUE_RPS = 3000.0
TARGET_ISSUE_P99_MS = 10.0
TARGET_GRANT_OVER_DIRECT = 1 / 1.5  # a grant costs at most 1.5x a direct permit


def _permit(principal: str, actions: tuple[str, ...]) -> str:
    acts = ", ".join(f'Keygrants::Action::"{a}"' for a in actions)
    return (f'permit(principal == Keygrants::Principal::"{principal}", action in [{acts}], '
            f'resource) when {{ resource.name == "{KEY}" }};')


POLICIES = {
    "bench-issuer": _permit("bench-issuer", ("create_grant", "encrypt")),
    "bench-direct": _permit("bench-direct", ("encrypt",)),
}
PRINCIPALS = ("bench-issuer", "bench-svc", "bench-direct")


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    method: str
    path: str


VARIANTS = (
    Variant("healthz", "GET /healthz (no auth, no audit): floor", "GET", "/healthz"),
    Variant("encrypt-admin", "encrypt, admin bearer", "POST", ENCRYPT_PATH),
    Variant("issue", "POST /v1/grants by bench-issuer", "POST", "/v1/grants"),
    Variant("grant", "(A) encrypt, API key + unlimited grant", "POST", ENCRYPT_PATH),
    Variant("direct", "(B) encrypt, API key + policy permit", "POST", ENCRYPT_PATH),
    Variant("grant-limited", "(C) encrypt, API key + limited grant", "POST", ENCRYPT_PATH),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=int, default=5, help="seconds per run (default 5)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per variant (default 3)")
    p.add_argument("--warmup", type=int, default=1,
                   help="seconds of warm-up per variant before round 1, 0 = none (default 1)")
    p.add_argument("--connections", type=int, default=16, help="concurrent connections (16)")
    p.add_argument("--size", type=int, default=1024, help="plaintext bytes (default 1024)")
    p.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                   help="before each round, wait up to SECONDS for the machine to be idle")
    p.add_argument("--no-pin", action="store_true",
                   help="do not pin the server and wrk to separate CPUs")
    p.add_argument("--json", metavar="OUT", type=Path, help="also write the results as JSON")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (server log)")
    args = p.parse_args(argv)
    if min(args.duration, args.rounds, args.connections, args.size) < 1 or args.warmup < 0:
        p.error("--duration, --rounds, --connections and --size must be >= 1, --warmup >= 0")
    if args.duration * 20_000 > LIMITED_MAX_USES:  # far above any rate seen for variant C
        p.error(f"--duration above {LIMITED_MAX_USES // 20_000} s could exhaust the limited "
                f"grant ({LIMITED_MAX_USES:,} uses)")
    return args


# --------------------------------------------------------------------------------------------
# Setup: principals, credentials, policies, grants -- all through the REST API
# --------------------------------------------------------------------------------------------

class Bench:
    """The server, its credentials, and one request (body + headers) per variant."""

    def __init__(self, work: Path, port: int, admin_token: str, grant_ttl: int) -> None:
        self.work = work
        self.port = port
        self.admin = {"Authorization": f"Bearer {admin_token}"}
        self.grant_ttl = grant_ttl
        self.api_keys: dict[str, str] = {}
        self.files: dict[str, tuple[Path | None, Path | None]] = {}

    def call(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
             expect: tuple[int, ...] = (200, 201, 204), what: str = "") -> Any:
        status, resp = h.http_call(self.port, method, path, body, headers)
        if status not in expect:
            raise h.TargetError(f"{what or f'{method} {path}'}: HTTP {status} {str(resp)[:300]}")
        return resp

    def as_(self, principal: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_keys[principal]}"}

    def setup(self) -> None:
        self.call("POST", "/v1/keys", {"name": KEY, "spec": "aes-256-gcm"}, self.admin)
        for principal in PRINCIPALS:
            self.call("POST", "/v1/principals", {"id": principal}, self.admin)
            resp = self.call("POST", f"/v1/principals/{principal}/api-keys", {}, self.admin)
            self.api_keys[principal] = resp["api_key"]
        for principal, text in POLICIES.items():
            self.call("PUT", f"/v1/policies/{principal}", {"text": text}, self.admin)

    def create_grant(self, *, max_uses: int | None, ttl: int) -> dict[str, Any]:
        body: dict[str, Any] = {"key": KEY, "grantee": "bench-svc", "operations": ["encrypt"],
                                "ttl": ttl}
        if max_uses is not None:
            body["max_uses"] = max_uses
        resp = self.call("POST", "/v1/grants", body, self.as_("bench-issuer"), expect=(201,),
                         what="create grant as bench-issuer")
        if not isinstance(resp, dict) or not resp.get("token"):
            raise h.TargetError(f"create grant: no token in {str(resp)[:300]}")
        return resp

    def _write(self, name: str, body: bytes | None, headers: dict[str, str]) -> None:
        body_file = None
        if body is not None:
            body_file = self.work / f"{name}.body.json"
            body_file.write_bytes(body)
        header_file = self.work / f"{name}.headers"
        fd = os.open(header_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.writelines(f"{k}: {v}\n" for k, v in headers.items())
        self.files[name] = (body_file, header_file)

    def prepare(self, plaintext: bytes) -> None:
        """Write each variant's request, and check each answers as it should once."""
        enc = json.dumps({"plaintext": base64.b64encode(plaintext).decode()},
                         separators=(",", ":")).encode()
        issue = json.dumps({"key": KEY, "grantee": "bench-svc", "operations": ["encrypt"],
                            "ttl": ISSUE_TTL, "max_uses": ISSUE_MAX_USES},
                           separators=(",", ":")).encode()
        self._enc = enc
        # (A) must be decided by the grant: bench-svc alone may not encrypt
        self.call("POST", ENCRYPT_PATH, enc, self.as_("bench-svc"), expect=(403,),
                  what="bench-svc without a grant (must be refused)")
        unlimited = self.create_grant(max_uses=None, ttl=self.grant_ttl)
        grant_headers = {**self.as_("bench-svc"), "Keygrants-Grant": unlimited["token"]}
        checks: dict[str, tuple[bytes | None, dict[str, str], int]] = {
            "healthz": (None, {}, 200),
            "encrypt-admin": (enc, self.admin, 200),
            "issue": (issue, self.as_("bench-issuer"), 201),
            "grant": (enc, grant_headers, 200),
            "direct": (enc, self.as_("bench-direct"), 200),
        }
        for v in VARIANTS:
            if v.name not in checks:
                continue
            body, headers, expect = checks[v.name]
            resp = self.call(v.method, v.path, body, headers, expect=(expect,),
                             what=f"check {v.name}")
            if v.path == ENCRYPT_PATH and not (isinstance(resp, dict) and resp.get("ciphertext")):
                raise h.TargetError(f"check {v.name}: no ciphertext in {str(resp)[:300]}")
            if v.name == "issue" and (resp["grant"]["max_uses"] != ISSUE_MAX_USES
                                      or not resp.get("token")):
                raise h.TargetError(f"check issue: unexpected grant {str(resp)[:300]}")
            self._write(v.name, body, headers)
        self.refresh_limited()
        grant_id = self._limited_id
        self.call("POST", ENCRYPT_PATH, enc, self.limited_headers, expect=(200,),
                  what="check grant-limited")
        info = self.call("GET", f"/v1/grants/{grant_id}", None, self.as_("bench-svc"))
        if info.get("uses") != 1:
            raise h.TargetError(f"limited grant: expected 1 counted use, got {info}")

    def refresh_limited(self) -> None:
        """A fresh limited grant for variant C (each run may use up to a million)."""
        created = self.create_grant(max_uses=LIMITED_MAX_USES, ttl=self.grant_ttl)
        self._limited_id = created["grant"]["id"]
        self.limited_headers = {**self.as_("bench-svc"), "Keygrants-Grant": created["token"]}
        self._write("grant-limited", self._enc, self.limited_headers)


def run_variant(bench: Bench, v: Variant, *, duration: int, args: argparse.Namespace,
                cpu: int | None, server_pid: int) -> tuple[h.WrkResult, float | None]:
    """One wrk run; returns the result and the server's CPU seconds during it."""
    if v.name == "grant-limited":
        bench.refresh_limited()
    env: dict[str, str] = {}
    script: Path | None = None
    if v.method == "POST":
        body_file, header_file = bench.files[v.name]
        assert body_file is not None and header_file is not None
        env = {"BENCH_BODY_FILE": str(body_file), "BENCH_HEADERS_FILE": str(header_file)}
        script = POST_HEADERS_LUA
    cpu0 = h.server_cpu_seconds(server_pid)
    res = h.run_wrk_script(v.name, f"http://127.0.0.1:{bench.port}{v.path}", script=script,
                           env=env, duration=duration, connections=args.connections,
                           threads=1, cpu=cpu, server_pid=server_pid)
    cpu1 = h.server_cpu_seconds(server_pid)
    return res, None if cpu0 is None or cpu1 is None else cpu1 - cpu0


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def _server_cost(runs: list[h.WrkResult], cpu_seconds: list[float | None]) -> dict[str, Any]:
    """Medians, over the rounds ``h.summarize`` uses, of the server's share of its core and
    of its CPU time per request."""
    pairs = [(r, c) for r, c in zip(runs, cpu_seconds, strict=True) if c is not None]
    quiet = [(r, c) for r, c in pairs if h._quiet(r)] or pairs
    used = [(r, c) for r, c in quiet if r.requests and r.seconds]
    if not used:
        return {"server_cpu": None, "server_us_per_request": None}
    return {"server_cpu": statistics.median(c / r.seconds for r, c in used),
            "server_us_per_request": statistics.median(c / r.requests * 1e6 for r, c in used)}


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def report(summaries: dict[str, dict[str, Any]], results: dict[str, list[h.WrkResult]],
           cpu_seconds: dict[str, list[float | None]]) -> dict[str, Any]:
    print()
    header = (f"{'variant':<14} {'what':<42} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} "
              f"{'server CPU':>10} {'us/req':>6} {'other CPU':>9} {'non-2xx':>7} {'rounds':>6}")
    print(header)
    print("-" * len(header))
    for v in VARIANTS:
        s = summaries[v.name]
        flag = "" if s["ok"] else "  <-- ERRORS"
        other = s["other_cpu"]
        if other is not None and other > h.NOISY_OTHER_CPU:
            flag += "  <-- noisy"
        srv, us = s["server_cpu"], s["server_us_per_request"]
        print(f"{v.name:<14} {v.label:<42} {s['rps']:>8,.0f} {_ms(s['p50_ms']):>7} "
              f"{_ms(s['p99_ms']):>7} {'-' if srv is None else f'{srv:.0%}':>10} "
              f"{'-' if us is None else f'{us:.0f}':>6} "
              f"{'-' if other is None else f'{other:.0%}':>9} {s['non_2xx']:>7} "
              f"{s['quiet_rounds']}/{s['rounds']:<4}{flag}")
    print("(medians over the quiet rounds, or all rounds if none was quiet; server CPU: the\n"
          " server's CPU time over the run in % of one core (it is pinned to one); well below\n"
          " 100% on a quiet machine, it waited (fsync, locks) rather than computed; us/req: the\n"
          " server's CPU time (user + system, all threads) per request;\n"
          " other CPU: processes other than the server and wrk, worst round; rounds: quiet/total)")

    def per_round(a: str, b: str, *, cpu: bool = False) -> list[float]:
        """a / b in each round (measured minutes apart at most): throughput, or CPU time
        per request."""
        out = []
        for i, (ra, rb) in enumerate(zip(results[a], results[b], strict=True)):
            if cpu:
                ca, cb = cpu_seconds[a][i], cpu_seconds[b][i]
                if ca and cb and ra.requests and rb.requests:
                    out.append((ca / ra.requests) / (cb / rb.requests))
            elif rb.rps:
                out.append(ra.rps / rb.rps)
        return out

    def show(label: str, values: list[float], suffix: str = "") -> float:
        median = statistics.median(values)
        rounds = ", ".join(f"{x:.2f}" for x in values)
        print(f"{label}: {median:.2f}x{suffix}  (per round: {rounds})")
        return median

    print("\nratios: the median of the per-round ratios (both sides measured in the same round)")
    ratios = {
        "issue_over_encrypt_admin": show("  grant issuance / encrypt (admin), same server",
                                         per_round("issue", "encrypt-admin")),
        "issue_over_healthz": show("  grant issuance / healthz floor",
                                   per_round("issue", "healthz")),
        "grant_over_direct": show("  encrypt with an unlimited grant (A) / direct permit (B)",
                                  per_round("grant", "direct"), " throughput"),
    }
    if cpu_ratio := per_round("grant", "direct", cpu=True):
        ratios["grant_over_direct_server_cpu"] = show(
            "  server CPU per request, grant (A) / direct (B)", cpu_ratio)
    ratios["limited_over_direct"] = show("  encrypt with a limited grant (C) / direct (B)",
                                         per_round("grant-limited", "direct"),
                                         " throughput (informational)")
    issue = summaries["issue"]
    best_rps = max(r.rps for r in results["issue"])
    best_p99 = min((r.p99_ms for r in results["issue"] if r.p99_ms is not None), default=None)
    verdicts = {
        "issue_rps": issue["rps"] >= TARGET_ISSUE_RPS,
        "issue_p99": issue["p99_ms"] is not None and issue["p99_ms"] < TARGET_ISSUE_P99_MS,
        "grant_over_direct": ratios["grant_over_direct"] >= TARGET_GRANT_OVER_DIRECT,
    }
    print()
    print(f"target: issuance >= {TARGET_ISSUE_RPS:,.0f} grants/s         "
          f"{_verdict(verdicts['issue_rps'])}  (median {issue['rps']:,.0f}, best round "
          f"{best_rps:,.0f})")
    print(f"target: issuance p99 < {TARGET_ISSUE_P99_MS:.0f} ms              "
          f"{_verdict(verdicts['issue_p99'])}  (median {_ms(issue['p99_ms'])} ms, best round "
          f"{_ms(best_p99)} ms)")
    print(f"target: grant / direct >= {TARGET_GRANT_OVER_DIRECT:.3f} (<= 1.5x)  "
          f"{_verdict(verdicts['grant_over_direct'])}  ({ratios['grant_over_direct']:.3f}: a "
          f"grant costs {1 / ratios['grant_over_direct']:.2f}x a direct permit)")
    if any(s["other_cpu"] is not None and s["other_cpu"] > h.NOISY_OTHER_CPU
           for s in summaries.values()):
        print("note: some runs shared the machine with other processes (noisy); re-run with "
              "--wait-idle 300 before quoting")
    return {"ratios": ratios, "targets_met": verdicts}


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        print("error: wrk not found on PATH (apt-get install wrk)", file=sys.stderr)
        return 1
    cmd = h.keygrants_command()
    if cmd is None:
        print("error: the keygrants command is not installed", file=sys.stderr)
        return 1
    cpus = sorted(os.sched_getaffinity(0))
    pin = None if args.no_pin or len(cpus) < 2 else (cpus[0], cpus[1])
    server_cpu, wrk_cpu = pin if pin else (None, None)
    planned = len(VARIANTS) * (args.warmup + args.rounds * (args.duration + 1))
    grant_ttl = min(86400, 600 + 2 * planned)  # the use grants outlive the whole run

    old_handlers = {s: signal.signal(s, h._on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    atexit.register(h.stop_all)
    work = Path(tempfile.mkdtemp(prefix="keygrants-grants-bench-"))
    data_dir = work / "data"
    data_dir.mkdir()
    port = h.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYGRANTS_")}
    results: dict[str, list[h.WrkResult]] = {v.name: [] for v in VARIANTS}
    cpu_seconds: dict[str, list[float | None]] = {v.name: [] for v in VARIANTS}
    failed = False
    busy = h.cpu_busy()
    print(f"machine: {len(cpus)} CPUs, Python {sys.version.split()[0]}, keygrants "
          f"{h._dist('keygrants')}, {h._version(['wrk', '-v'])}; server pinned to CPU "
          f"{server_cpu}, wrk to {wrk_cpu}; machine {busy:.0%} busy before start")
    print(f"load: wrk -t1 -c{args.connections} -d{args.duration}s --latency, {args.rounds} "
          f"round(s), {args.warmup}s warm-up per variant; encrypt {args.size} B; SQLite store "
          f"in {data_dir}; --rate-limit 0", flush=True)
    if busy > 0.15:
        print(f"WARNING: the machine was {busy:.0%} busy before the benchmark started (other "
              "processes); results will be noisy (--wait-idle S waits for quiet)", flush=True)
    server: h.Proc | None = None
    try:
        server = h.spawn("keygrants", [*cmd, "server", "--listen", f"127.0.0.1:{port}",
                                       "--data-dir", str(data_dir), "--rate-limit", "0"],
                         log_path=work / "server.log", cpu=server_cpu, env=env)
        h.wait_ready(server, port, "/readyz")
        token = (data_dir / "admin.token").read_text().strip()
        bench = Bench(work, port, token, grant_ttl)
        bench.setup()
        bench.prepare(os.urandom(args.size))
        if args.warmup:
            for v in VARIANTS:
                res, _ = run_variant(bench, v, duration=args.warmup, args=args, cpu=wrk_cpu,
                                     server_pid=server.pid)
                if not res.ok:
                    print(f"  warm-up {v.name}: WARNING {res.non_2xx} non-2xx, "
                          f"socket errors {res.socket_errors}", flush=True)
        for rnd in range(args.rounds):
            if args.wait_idle > 0:
                h.wait_idle(args.wait_idle, f"[round {rnd + 1}]")
            order = VARIANTS[rnd % len(VARIANTS):] + VARIANTS[:rnd % len(VARIANTS)]
            for v in order:
                res, srv = run_variant(bench, v, duration=args.duration, args=args, cpu=wrk_cpu,
                                       server_pid=server.pid)
                results[v.name].append(res)
                cpu_seconds[v.name].append(srv)
                other = "" if res.other_cpu is None else f", other CPU {res.other_cpu:.0%}"
                print(f"  round {rnd + 1} {v.name:<14} {res.rps:9,.0f} req/s  p50 "
                      f"{_ms(res.p50_ms):>6} ms  p99 {_ms(res.p99_ms):>6} ms{other}", flush=True)
                if not res.ok:
                    failed = True
                    print(f"  !!!!! {v.name}: {res.non_2xx} non-2xx, socket errors "
                          f"{res.socket_errors or 'none'} -- these numbers are NOT valid",
                          flush=True)
    except h.TargetError as exc:
        print(f"error: {exc}\n{server.log_tail() if server else ''}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; stopping the server", file=sys.stderr)
        return 130
    finally:
        if server is not None:
            h.stop(server)
        h.stop_all()
        for s, handler in old_handlers.items():
            signal.signal(s, handler)
        if args.keep:
            print(f"kept temp dir {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    summaries = {}
    for v in VARIANTS:
        s = h.summarize(v.name, results[v.name])
        s.update(_server_cost(results[v.name], cpu_seconds[v.name]))
        summaries[v.name] = s
    outcome = report(summaries, results, cpu_seconds)
    if failed:
        print("\n!!!!! at least one run had errors; see above !!!!!")
    if args.json:
        out = {"config": {k: (str(x) if isinstance(x, Path) else x) for k, x in vars(args).items()},
               "results": summaries, **outcome,
               "runs": {n: [asdict(r) for r in rs] for n, rs in results.items()}}
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
