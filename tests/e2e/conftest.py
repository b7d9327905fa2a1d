"""Real ``python -m keygrants server`` processes on free loopback ports, driven by the CLI.

Every process gets a timeout; every server still running when a test ends (pass or fail) is
killed in the fixture teardown.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
CLI_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """The parent environment without any KEYGRANTS_* setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYGRANTS_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    port: int
    data_dir: Path
    log_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    scheme: str = "http"
    verify: str | bool = True  # the CA bundle that checks an https server

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.addr}"

    def output(self) -> str:
        return ((self.log_dir / "stdout").read_text(errors="replace")
                + (self.log_dir / "stderr").read_text(errors="replace"))

    def stdout(self) -> str:
        return (self.log_dir / "stdout").read_text(errors="replace")

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                verify = (ssl.create_default_context(cafile=self.verify)
                          if isinstance(self.verify, str) else self.verify)
                if httpx.get(f"{self.url}/readyz", timeout=2, verify=verify).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        pytest.fail(f"server not ready after {START_TIMEOUT}s:\n{self.output()}")

    def wait_exit(self, timeout: float = START_TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"server still running after {timeout}s:\n{self.output()}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Send ``sig`` and wait (bounded) for the process to exit; return its status."""
        self.proc.send_signal(sig)
        return self.wait_exit(STOP_TIMEOUT)

    def cli(self, *args: str, input: bytes | None = None, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[bytes]:
        """``python -m keygrants ARGS`` with KEYGRANTS_ADDR and KEYGRANTS_DATA_DIR set, so the
        token comes from <data-dir>/admin.token."""
        full_env = clean_env(KEYGRANTS_ADDR=self.url, KEYGRANTS_DATA_DIR=str(self.data_dir))
        full_env.update(env or {})
        return subprocess.run([sys.executable, "-m", "keygrants", *args], input=input,
                              capture_output=True, env=full_env, timeout=CLI_TIMEOUT, check=False)


StartServer = Callable[..., ServerProcess]


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[StartServer]:
    """Start ``keygrants server`` on a free port: ``start_server(data_dir, env=..., ready=True)``."""
    started: list[ServerProcess] = []

    def start(data_dir: Path, *, env: dict[str, str] | None = None, ready: bool = True,
              args: tuple[str, ...] = (), verify: str | None = None) -> ServerProcess:
        port = free_port()
        log_dir = tmp_path / f"server-{len(started)}"
        log_dir.mkdir()
        full_env = clean_env(**(env or {}))
        with open(log_dir / "stdout", "wb") as out, open(log_dir / "stderr", "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "keygrants", "server", "--listen", f"127.0.0.1:{port}",
                 "--data-dir", str(data_dir), *args],
                stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=full_env)
        server = ServerProcess(proc, port, data_dir, log_dir, full_env)
        if "--tls-cert" in args:
            server.scheme, server.verify = "https", verify or True
        started.append(server)
        if ready:
            server.wait_ready()
        return server

    yield start
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(timeout=STOP_TIMEOUT)
