"""``keygrants server``'s start: announced only once it succeeded."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from keygrants.server import ServerConfig, _server_class, serve


@pytest.mark.parametrize("fails", [False, True])
@pytest.mark.parametrize("uvicorn_before_0_50", [False, True])
def test_a_server_is_announced_once_its_start_succeeded(monkeypatch: pytest.MonkeyPatch,
                                                        uvicorn_before_0_50: bool,
                                                        fails: bool) -> None:
    # uvicorn before 0.50 returns from a failed start (should_exit set) where later ones exit:
    # "listening" was printed after "Application startup failed" there
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "lifespan"
        await receive()  # lifespan.startup
        if fails:
            raise RuntimeError("the bus cannot be reached")
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        await send({"type": "lifespan.shutdown.complete"})

    if uvicorn_before_0_50:
        async def old_startup(self: uvicorn.Server, sockets: object = None) -> None:
            await self.lifespan.startup()
            if self.lifespan.should_exit:
                self.should_exit = True

        monkeypatch.setattr(uvicorn.Server, "startup", old_startup)
    announced: list[str] = []
    server = _server_class()(uvicorn.Config(app, lifespan="on", log_level="critical"),
                             on_started=lambda: announced.append("listening"))

    async def start() -> None:
        server.config.load()
        server.lifespan = server.config.lifespan_class(server.config)
        await server.startup(sockets=[])
        if not fails:
            await server.lifespan.shutdown()

    with contextlib.suppress(SystemExit):  # how uvicorn >= 0.50 ends a failed start
        asyncio.run(start())
    assert announced == ([] if fails else ["listening"])


def test_a_start_the_bus_stops_exits_3_without_announcing(monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:
    # with uvicorn before 0.50 (emulated) a failed start returned: exit status 0, after
    # "keygrants listening" and "keygrants stopped"
    async def old_startup(self: uvicorn.Server, sockets: object = None) -> None:
        await self.lifespan.startup()
        if self.lifespan.should_exit:
            self.should_exit = True

    monkeypatch.setattr(uvicorn.Server, "startup", old_startup)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    said: list[str] = []
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    config = ServerConfig(data_dir=tmp_path / "data", listen=f"127.0.0.1:{free}",
                          bus=f"nats://127.0.0.1:{closed}")
    with pytest.raises(SystemExit) as exited:
        serve(config, announce=said.append)
    assert exited.value.code == 3
    assert not any("listening" in line or "stopped" in line for line in said), said


def test_tls_files_that_cannot_be_used_are_refused_before_the_data_directory(
        tmp_path: Path) -> None:
    """A key that did not match its certificate, or a client CA with no certificate in it,
    was found after a new data directory (root key, admin token, audit key) had been made,
    and reported as "cannot listen"."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from tests.certs import certificate

    key, other = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    cert = tmp_path / "server.crt"
    cert.write_bytes(certificate("localhost", key, "localhost", key).public_bytes(
        serialization.Encoding.PEM))
    pem = serialization.Encoding.PEM
    for name, k in (("server.key", key), ("other.key", other)):
        (tmp_path / name).write_bytes(k.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
        (tmp_path / name).chmod(0o600)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cases = ((tmp_path / "other.key", None, "--tls-cert/--tls-key"),
             (tmp_path / "server.key", tmp_path / "server.key", "--client-ca"))
    for i, (tls_key, client_ca, option) in enumerate(cases):
        data = tmp_path / f"data{i}"
        config = ServerConfig(data_dir=data, listen=f"127.0.0.1:{port}", tls_cert=cert,
                              tls_key=tls_key, client_ca=client_ca)
        with pytest.raises(ValueError, match=option):
            serve(config, announce=lambda line: None)
        assert not data.exists() or not any(data.iterdir())
