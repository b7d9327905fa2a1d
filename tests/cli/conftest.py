"""Fixtures for CLI tests that need no keygrants server: a CliRunner with a controlled environment
and a stub HTTP server that records what the CLI sends."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import pytest
from click.testing import CliRunner, Result

from keygrants.cli import main

Invoke = Callable[..., Result]


@pytest.fixture
def closed_addr() -> str:
    """``http://127.0.0.1:PORT`` where nothing listens (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def invoke(tmp_path: Path, closed_addr: str) -> Invoke:
    """Run the CLI in-process with an environment that points at a closed port and an empty
    data dir, whatever the developer's shell exports."""

    def run(args: list[str], *, input: bytes | str | None = None,
            env: dict[str, str | None] | None = None) -> Result:
        base: dict[str, str | None] = {
            "KEYGRANTS_ADDR": closed_addr,
            "KEYGRANTS_TOKEN": None,
            "KEYGRANTS_TOKEN_FILE": None,
            "KEYGRANTS_PRINCIPAL": None,
            "KEYGRANTS_KEY_FILE": None,
            "KEYGRANTS_CA_FILE": None,
            "KEYGRANTS_CLIENT_CERT": None,
            "KEYGRANTS_CLIENT_KEY": None,
            "KEYGRANTS_ALLOW_INSECURE_HTTP": None,
            "KEYGRANTS_DATA_DIR": str(tmp_path / "no-data-dir"),
            "KEYGRANTS_LISTEN": None,
            "KEYGRANTS_PASSPHRASE": None,
            "KEYGRANTS_GRANT": None,
            "KEYGRANTS_DPOP_KEY_FILE": None,
        }
        return CliRunner().invoke(main, args, input=input, env=base | (env or {}))

    return run


@dataclass
class Stub:
    """A loopback HTTP server standing in for keygrants: records requests, answers by path
    (a path in ``drop``: the connection is closed after the request, with no answer)."""

    addr: str
    requests: list[dict[str, Any]] = field(default_factory=list)
    answers: dict[str, tuple[int, Any]] = field(default_factory=dict)
    drop: set[str] = field(default_factory=set)

    @property
    def tokens(self) -> list[str | None]:
        return [r["headers"].get("authorization") for r in self.requests]


@pytest.fixture
def stub() -> Iterator[Stub]:
    state = Stub(addr="")

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length) if length else b""
            path, _, query = self.path.partition("?")
            state.requests.append({"method": self.command, "path": path,
                                   "query": dict(parse_qsl(query)),
                                   "headers": {k.lower(): v for k, v in self.headers.items()},
                                   "body": json.loads(body) if body else None})
            if path in state.drop:
                self.close_connection = True
                return
            status, payload = state.answers.get(path, (404, {"error": {
                "code": "not_found", "message": "stub has no answer", "request_id": "stub"}}))
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PATCH = do_DELETE = _answer

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.addr = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
