"""TLS for the server: mutual TLS with the client certificate handed to the app.

uvicorn verifies client certificates (``ssl_ca_certs`` + ``ssl_cert_reqs``) but does not pass
the verified certificate to the application. :func:`protocol_class` returns uvicorn's HTTP
protocol with the ASGI TLS extension added to each request's scope
(``scope["extensions"]["tls"]["client_cert_chain"]``, PEM strings, as the ASGI spec defines
it), read once per connection from the TLS session.
"""

from __future__ import annotations

import ssl
from typing import Any

__all__ = ["protocol_class", "server_ssl_options"]


def protocol_class() -> type:
    """uvicorn's fastest available HTTP/1.1 protocol, exposing the client certificate."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError as exc:  # the h11 protocol builds its scope elsewhere: fail loudly
        raise RuntimeError("TLS client certificates need httptools "
                           "(pip install 'uvicorn[standard]')") from exc

    class TlsExtensionProtocol(Base):
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
