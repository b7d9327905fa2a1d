"""TLS for the server: mutual TLS with the client certificate handed to the app.

uvicorn verifies client certificates (``ssl_ca_certs`` + ``ssl_cert_reqs``) but does not pass
the verified certificate to the application. :func:`protocol_class` returns uvicorn's HTTP
protocol with the ASGI TLS extension added to each request's scope
(``scope["extensions"]["tls"]["client_cert_chain"]``, PEM strings, as the ASGI spec defines
it), read once per connection from the TLS session.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterable
from typing import Any

__all__ = ["protocol_class", "server_ssl_options"]


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


def protocol_class(*, tls: bool = True) -> type:
    """uvicorn's fastest available HTTP/1.1 protocol, with each response sent in one write
    and, with ``tls``, the client certificate exposed to the app."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError as exc:  # the h11 protocol builds its scope elsewhere: fail loudly
        raise RuntimeError("the keygrants server needs httptools "
                           "(pip install 'uvicorn[standard]')") from exc

    class CoalescingProtocol(Base):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(
                _CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]

        def on_response_complete(self) -> None:
            self.transport.flush()  # type: ignore[attr-defined]
            super().on_response_complete()

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
