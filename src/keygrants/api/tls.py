"""TLS for the server: mutual TLS with the client certificate handed to the app.

uvicorn verifies client certificates (``ssl_ca_certs`` + ``ssl_cert_reqs``) but does not pass
the verified certificate to the application. :func:`protocol_class` returns uvicorn's HTTP
protocol with the ASGI TLS extension added to each request's scope
(``scope["extensions"]["tls"]["client_cert_chain"]``, PEM strings, as the ASGI spec defines
it), read once per connection from the TLS session.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Iterable
from typing import Any, Final

__all__ = ["HEAD_TIMEOUT", "MAX_HEAD_BYTES", "protocol_class", "server_ssl_options"]

MAX_HEAD_BYTES: Final = 64 * 1024
"""The most bytes a request line and its headers may take (else 431 and the connection
closes): httptools buffers a header line whole, so without this one endless line grew the
server's memory without bound."""
HEAD_TIMEOUT: Final = 30.0
"""Seconds a connection may take to send a whole request head, from its first byte or from
its opening (else 408, or a plain close before any byte): a client sending its head a byte at
a time, or nothing at all, held a connection for good."""


class _CoalescingTransport:
    """A transport whose writes within one event-loop iteration leave in one ``send``.

    uvicorn writes a response's head and its body separately, and an asyncio socket
    transport sends each at once: two system calls and two TCP segments per response (the
    head's send alone was 7% of the event loop's time under grant issuance). Here the first
    write of an iteration schedules a flush at the end of the iteration and later ones join
    it; the protocol flushes as soon as a response is complete, so a whole response leaves
    at once without waiting for the iteration to end. Everything else goes to the real
    transport; ``close`` and ``abort`` flush or drop what is pending first.
    """

    __slots__ = ("_loop", "_pending", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        pending = self._pending
        if pending is None:
            self._pending = [bytes(data)]
            self._loop.call_soon(self._flush)
        else:
            pending.append(bytes(data))

    def writelines(self, chunks: Iterable[bytes | bytearray | memoryview]) -> None:
        for chunk in chunks:
            self.write(chunk)

    def flush(self) -> None:
        """Send what is pending now."""
        self._flush()

    def _flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending and not self._transport.is_closing():
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending = None
        self._transport.abort()

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def get_write_buffer_size(self) -> int:
        pending = self._pending
        return self._transport.get_write_buffer_size() + (
            sum(map(len, pending)) if pending else 0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


_SILENT: Final = logging.getLogger("keygrants.api.refused-connection")
_SILENT.disabled = True


class _HeadRefused(Exception):
    """Raised from a parser callback to stop parsing a head that was refused."""


def protocol_class(*, tls: bool = True) -> type:
    """uvicorn's fastest available HTTP/1.1 protocol, with each response sent in one write
    and, with ``tls``, the client certificate exposed to the app."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError as exc:  # the h11 protocol builds its scope elsewhere: fail loudly
        raise RuntimeError("the keygrants server needs httptools "
                           "(pip install 'uvicorn[standard]')") from exc

    class CoalescingProtocol(Base):
        # Between one request's end and the next one's headers (and before the first) a head
        # is being read: its bytes are counted and a timer runs until its headers are complete.
        # A body still arriving after an early response is not head (its request is not over).
        _head_bytes = 0
        _head_size = 0
        _head_refused = False
        _in_head = True
        _head_started = False
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(
                _CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]
            self._arm_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_head_timer()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._in_head:
                self._head_bytes += len(data)
            super().data_received(data)
            if self._in_head:
                if self._head_bytes > MAX_HEAD_BYTES:
                    self._refuse_head(431, "header_too_large", "request head larger than "
                                      f"{MAX_HEAD_BYTES} bytes")
                elif self._head_started and self._head_timer is None:
                    # a head begun and not complete in these bytes (nearly every head arrives
                    # whole: no timer is armed and cancelled for it)
                    self._arm_head_timer()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._head_started = True
            self._head_size = 0

        # The head's own size, from what the parser hands over: a head that completes within
        # the bytes read at once is parsed before data_received can look at their count (a
        # head of up to twice the limit got through).
        def on_url(self, url: bytes) -> None:
            self._count_head(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            if self._in_head:  # not a chunked body's trailer: its request is with the app
                self._count_head(len(name) + len(value) + 4)  # ": " and CRLF
            super().on_header(name, value)

        def _count_head(self, n: int) -> None:
            self._head_size += n
            if self._head_size > MAX_HEAD_BYTES:
                self._refuse_head(431, "header_too_large", "request head larger than "
                                  f"{MAX_HEAD_BYTES} bytes")
                raise _HeadRefused  # stops the parser: the request never reaches the app

        def send_400_response(self, msg: str) -> None:
            if self._head_refused:
                return  # answered already (the parser reports the stop as a bad request)
            super().send_400_response(msg)

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._disarm_head_timer()
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._in_head, self._head_bytes, self._head_started = True, 0, False
            super().on_message_complete()

        def on_response_complete(self) -> None:
            self.transport.flush()  # type: ignore[attr-defined]
            super().on_response_complete()  # arms uvicorn's keep-alive timer for the next one

        def _arm_head_timer(self) -> None:
            self._disarm_head_timer()
            self._head_timer = self.loop.call_later(HEAD_TIMEOUT, self._head_timed_out)

        def _disarm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if not self._in_head or self.transport.is_closing():
                return
            if self._head_started:
                self._refuse_head(408, "request_timeout",
                                  f"request head not received within {HEAD_TIMEOUT:g} s")
            else:
                self.transport.close()

        def _refuse_head(self, status: int, code: str, message: str) -> None:
            """Answer in the KMS's error shape and close (the head never reached the app)."""
            self._in_head = False
            self._head_refused = True
            # the parser, stopped by a callback raising, is reported by uvicorn as "Invalid
            # HTTP request received." at WARNING: this connection, answered and closing, says
            # nothing more
            self.logger = _SILENT
            self._disarm_head_timer()
            if self.transport.is_closing():
                return
            reason = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}[status]
            body = b'{"error":{"code":"%s","message":"%s"}}' % (code.encode(), message.encode())
            self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\n"
                                 b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                                 % (status, reason, len(body), body))
            self.transport.close()

    if not tls:
        return CoalescingProtocol

    class TlsExtensionProtocol(CoalescingProtocol):
        _tls_extension: dict[str, Any] | None = None

        def _tls(self) -> dict[str, Any]:
            if self._tls_extension is None:
                chain: list[str] = []
                ssl_object = self.transport.get_extra_info("ssl_object")
                if ssl_object is not None:
                    der = ssl_object.getpeercert(binary_form=True)
                    if der:
                        chain.append(ssl.DER_cert_to_PEM_cert(der))
                self._tls_extension = {"client_cert_chain": chain, "server_cert": None,
                                       "client_cert_error": None}
            return self._tls_extension

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self.scope["extensions"] = {"tls": self._tls()}  # type: ignore[dict-item]

    return TlsExtensionProtocol


def server_ssl_options(cert: str, key: str, client_ca: str | None) -> dict[str, Any]:
    """uvicorn ``Config`` options for TLS; with a client CA, client certificates are verified
    when presented (optional, so signature and bearer authentication keep working)."""
    options: dict[str, Any] = {"ssl_certfile": cert, "ssl_keyfile": key}
    if client_ca is not None:
        options["ssl_ca_certs"] = client_ca
        options["ssl_cert_reqs"] = ssl.CERT_OPTIONAL
    return options
