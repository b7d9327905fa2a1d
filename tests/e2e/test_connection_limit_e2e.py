"""``--max-connections``: a client cannot make the server hold connections without bound;
beyond the limit a request is answered 503 at once, and served again once others close."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def _get(port: int, path: str = "/healthz") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n".encode())
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def test_connections_beyond_the_limit_get_503_until_others_close(start_server,
                                                                 tmp_path: Path) -> None:
    server = start_server(tmp_path / "data", args=("--max-connections", "3"))
    assert _get(server.port).startswith(b"HTTP/1.1 200 ")
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in range(3)]
    try:
        # the server counts a connection once it has accepted it: ask until it has (bounded)
        answer = b""
        for _ in range(200):
            answer = _get(server.port)
            if answer.startswith(b"HTTP/1.1 503 "):
                break
        assert answer.startswith(b"HTTP/1.1 503 "), answer[:100]
    finally:
        for s in idle:
            s.close()
    for _ in range(200):
        answer = _get(server.port)
        if answer.startswith(b"HTTP/1.1 200 "):
            break
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:100]
    bad = start_server(tmp_path / "other", args=("--max-connections", "0"), ready=False)
    assert bad.wait_exit() == 2 and "--max-connections" in bad.output()
