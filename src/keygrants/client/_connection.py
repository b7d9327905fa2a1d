"""Where the SDK connects, and how: server addresses and TLS settings.

Shared by :class:`~keygrants.client.Client`, :class:`~keygrants.client.AsyncClient` and the
verifiers. An address is checked when the object is built, never on the first request:

- it names its scheme, ``https://`` or ``http://`` (a bare ``HOST:PORT`` used to mean plain
  HTTP, which sent the credentials in clear to a server that may well speak TLS);
- it parses (host, port 1-65535, IPv6 brackets): a malformed one is a ``ValueError``, never an
  ``httpx.InvalidURL``;
- ``http://`` is allowed only to a loopback host (``127.0.0.0/8``, ``::1``, ``localhost``)
  unless the caller opts in: on any other path the credentials, plaintexts and data keys (or,
  for a verifier, the issuer keys it trusts) can be read and changed. With a transport that
  puts nothing on the network (``httpx.MockTransport``, ``httpx.ASGITransport``,
  ``httpx.WSGITransport``: in-process) this rule does not apply; any other transport (an
  ``httpx.HTTPTransport`` with retries, say) is held to it.

Messages quote an address with its userinfo (``user:password@``) replaced by ``***``.
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
from typing import Final

import httpx

__all__ = ["INSECURE_HTTP_ENV", "insecure_http_allowed", "is_loopback_host", "off_network",
           "redact_address", "server_url", "tls_verify"]

INSECURE_HTTP_ENV: Final = "KEYGRANTS_ALLOW_INSECURE_HTTP"
_SCHEMES: Final = ("http", "https")
_HOST_NAME: Final = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?\.?")
_AUTHORITY: Final = re.compile(r"^(?P<head>(?:[^:/?#]*://)?)(?P<userinfo>[^/?#]*@)")


def redact_address(addr: str) -> str:
    """``addr`` with any userinfo (``user:password@``) replaced by ``***@``, for messages;
    works on malformed addresses too."""
    return _AUTHORITY.sub(r"\g<head>***@", addr, count=1)


def insecure_http_allowed(allow_insecure_http: bool) -> bool:
    """The clients' opt-in: the argument, or ``KEYGRANTS_ALLOW_INSECURE_HTTP=1``."""
    return allow_insecure_http or os.environ.get(INSECURE_HTTP_ENV, "").strip() == "1"


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (a name or an address without brackets) is this machine: ``localhost``,
    127.0.0.0/8 or ::1."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_url(addr: str, *, allow_insecure_http: bool, own_transport: bool,
               what: str = "server address", opt_in: str = "") -> str:
    """The base URL for ``addr`` (stripped, without a trailing ``/``), checked as the module
    docstring says.

    Args:
        addr: ``https://HOST:PORT`` (``http://`` for a loopback host), with an optional path.
        allow_insecure_http: allow ``http://`` to a host that is not loopback.
        own_transport: the caller's transport puts nothing on the network (see
            :func:`off_network`): the scheme is not checked against the host.
        what: how messages name the address (``"server address"``, ``"base_url"``).
        opt_in: how messages tell the caller to opt in to plain HTTP.

    Raises:
        ValueError: no scheme, another scheme, a malformed address, or ``http://`` to a host
            that is not loopback without the opt-in.
    """
    addr = addr.strip()
    shown = redact_address(addr)
    scheme, sep, _ = addr.partition("://")
    if not sep or not scheme:
        raise ValueError(f"{what} {shown!r} has no scheme: write https://HOST:PORT (or "
                         "http://127.0.0.1:PORT for a local server)")
    if scheme.lower() not in _SCHEMES:
        raise ValueError(f"{what} {shown!r} has the scheme {scheme!r}: write https://HOST:PORT "
                         "(or http://127.0.0.1:PORT for a local server)")
    try:
        url = httpx.URL(addr)
    except httpx.InvalidURL as exc:
        raise ValueError(f"invalid {what} {shown!r}: {exc}") from None
    host = url.raw_host.decode("ascii")  # IDNA-encoded, IPv6 without brackets
    if not host:
        raise ValueError(f"invalid {what} {shown!r}: it names no host")
    if not (_HOST_NAME.fullmatch(host) or (":" in host and _is_ip(host))):
        raise ValueError(f"invalid {what} {shown!r}: {url.host!r} is not a host name or address")
    if url.port is not None and not 1 <= url.port <= 65535:
        raise ValueError(f"invalid {what} {shown!r}: the port must be 1 to 65535")
    if url.query or url.fragment:
        raise ValueError(f"invalid {what} {shown!r}: it must not have a query or fragment")
    if (url.scheme == "http" and not own_transport and not allow_insecure_http
            and not is_loopback_host(host)):
        raise ValueError(
            f"refusing plain http:// to {shown}, which is not a loopback address: anyone on "
            "the network path could read and change what is sent and received; use https://"
            + (f", or {opt_in} if the path is trusted" if opt_in else ""))
    return addr.rstrip("/")


def off_network(transport: object) -> bool:
    """Whether ``transport`` answers in-process (a mock, or an ASGI/WSGI app called
    directly), so that nothing of a request crosses a network whatever its URL says."""
    return isinstance(transport, (httpx.MockTransport, httpx.ASGITransport, httpx.WSGITransport))


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.replace("%25", "%"))  # an IPv6 zone id is percent-encoded
    except ValueError:
        return False
    return True


def tls_verify(verify: bool | str | os.PathLike[str],
               cert: tuple[str, str] | None = None) -> bool | ssl.SSLContext:
    """httpx's ``verify``: an SSL context for a CA bundle path (``str`` or ``os.PathLike``)
    and for the client certificate of mTLS (httpx deprecates both as plain arguments).

    ``""`` verifies against the system's CA store (it never turns verification off).
    """
    if cert is None and isinstance(verify, bool):
        return verify
    if isinstance(verify, bool):
        context = ssl.create_default_context()
    else:
        context = ssl.create_default_context(cafile=os.fspath(verify) or None)
    if verify is False:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if cert is not None:
        context.load_cert_chain(cert[0], cert[1])
    return context
