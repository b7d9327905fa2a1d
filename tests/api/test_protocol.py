"""The server's HTTP protocol: a response's writes leave in one send, over a real socket."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from keygrants.api.tls import _CoalescingTransport, protocol_class


class FakeTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False
        self.aborted = False
        self.eof = False

    def write(self, data: bytes) -> None:
        assert not self.closed
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = self.closed = True

    def write_eof(self) -> None:
        self.eof = True

    def get_write_buffer_size(self) -> int:
        return 7

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 1)}.get(name, default)


async def _next_iteration() -> None:
    await asyncio.sleep(0)


def test_writes_of_one_iteration_leave_in_one_send() -> None:
    async def main() -> FakeTransport:
        real = FakeTransport()
        t = _CoalescingTransport(real, asyncio.get_running_loop())  # type: ignore[arg-type]
        t.write(b"HTTP/1.1 200 OK\r\n\r\n")
        t.write(memoryview(b"body"))
        t.writelines([b"-", bytearray(b"more")])
        assert real.writes == [] and t.get_write_buffer_size() == 7 + 19 + 4 + 1 + 4
        await _next_iteration()
        assert real.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody-more"]
        t.write(b"next")
        await _next_iteration()
        assert real.writes[1:] == [b"next"]
        assert t.get_extra_info("peername") == ("127.0.0.1", 1)  # everything else passes
        return real

    asyncio.run(main())


def test_close_sends_what_is_pending_first_and_abort_drops_it() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        real = FakeTransport()
        t = _CoalescingTransport(real, loop)  # type: ignore[arg-type]
        t.write(b"last words")
        t.close()
        assert real.writes == [b"last words"] and real.closed
        await _next_iteration()  # the scheduled flush finds nothing more to send
        assert real.writes == [b"last words"]

        real = FakeTransport()
        t = _CoalescingTransport(real, loop)  # type: ignore[arg-type]
        t.write(b"never sent")
        t.abort()
        await _next_iteration()
        assert real.writes == [] and real.aborted

        real = FakeTransport()
        t = _CoalescingTransport(real, loop)  # type: ignore[arg-type]
        t.write(b"before eof")
        t.write_eof()
        assert real.writes == [b"before eof"] and real.eof

        real = FakeTransport()
        t = _CoalescingTransport(real, loop)  # type: ignore[arg-type]
        t.write(b"to a closing transport")
        real.closed = True  # the peer went away meanwhile
        await _next_iteration()
        assert real.writes == []

    asyncio.run(main())


@pytest.mark.parametrize("size", [0, 10, 300_000])
def test_a_real_server_answers_each_response_whole(size: int) -> None:
    """uvicorn with the protocol class, over a loopback socket: keep-alive responses arrive
    complete and in order, each in one send made as soon as it is complete."""
    import uvicorn

    body = b"x" * size

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    sends: list[int] = []
    sent_at_completion: list[int] = []
    cls = protocol_class(tls=False)

    class Counting(cls):  # type: ignore[valid-type,misc]
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            real_write = transport.write

            def write(data: bytes) -> None:
                sends.append(len(data))
                real_write(data)

            transport.write = write  # type: ignore[method-assign]
            super().connection_made(transport)

        def on_response_complete(self) -> None:
            before = len(sends)
            super().on_response_complete()
            sent_at_completion.append(len(sends) - before)

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, http=Counting, lifespan="off", log_level="warning")
    server = uvicorn.Server(config)

    async def main() -> list[bytes]:
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        try:
            for _ in range(1000):
                if server.started:
                    break
                await asyncio.sleep(0.01)
            assert server.started, "uvicorn did not start within 10 s"
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            answers = []
            for _ in range(3):
                writer.write(b"GET / HTTP/1.1\r\nhost: t\r\n\r\n")
                head = await reader.readuntil(b"\r\n\r\n")
                answers.append(head + await reader.readexactly(size))
            writer.close()
            return answers
        finally:
            server.should_exit = True
            await serving

    answers = asyncio.run(asyncio.wait_for(main(), 30))
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\n" + body)
    assert len(sends) == 3  # head and body of each response in one write
    assert sent_at_completion == [1, 1, 1]  # sent when complete, not at the iteration's end
