"""aiohttp sessions for the providers whose per-request calls run on the event loop (``vault:``,
``aws-kms:``): one session per event loop that used the provider, since connections belong
to a loop. A caller that runs a provider on a short-lived loop releases that loop's session
before the loop ends (:meth:`KeyProvider.release_loop`; ``ProviderSeal`` does)."""

from __future__ import annotations

import asyncio
import os
import ssl
import weakref
from collections.abc import Mapping
from urllib.parse import urlsplit
from urllib.request import getproxies, proxy_bypass

import aiohttp

__all__ = ["LoopSessions", "caused_by_tls", "env_proxy", "tls_context"]


class LoopSessions:
    """The aiohttp session of each event loop, made on first use with these settings."""

    def __init__(self, url: str, *, timeout: float, tls: ssl.SSLContext | bool,
                 headers: Mapping[str, str] | None = None, base_url: bool = False) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._tls = tls
        self._headers = dict(headers or {})
        self._base_url = url if base_url else None
        self._proxy = env_proxy(url)
        self._sessions: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop,
                                                  aiohttp.ClientSession] = weakref.WeakKeyDictionary()

    def get(self) -> aiohttp.ClientSession:
        """The running loop's session."""
        loop = asyncio.get_running_loop()
        session = self._sessions.get(loop)
        if session is None or session.closed:
            session = aiohttp.ClientSession(
                base_url=self._base_url, headers=self._headers, timeout=self._timeout,
                connector=aiohttp.TCPConnector(ssl=self._tls), raise_for_status=False,
                proxy=self._proxy)
            self._sessions[loop] = session
        return session

    async def release(self) -> None:
        """Close the running loop's session, if it has one."""
        session = self._sessions.pop(asyncio.get_running_loop(), None)
        if session is not None:
            await session.close()


def tls_context(ca: str | None) -> ssl.SSLContext:
    """Certificate verification as boto3 and hvac do it: against ``ca`` (a bundle file or a
    directory of hashed certificates), else certifi's bundle (what requests and botocore
    ship with), else the system's."""
    if ca:
        return (ssl.create_default_context(capath=ca) if os.path.isdir(ca)
                else ssl.create_default_context(cafile=ca))
    try:
        import certifi
    except ImportError:
        return ssl.create_default_context()
    return ssl.create_default_context(cafile=certifi.where())


def env_proxy(url: str) -> str | None:
    """The proxy ``HTTP(S)_PROXY``/``NO_PROXY`` name for ``url`` (as boto3 and hvac would use),
    looked up once: aiohttp's ``trust_env`` reads the environment and ``~/.netrc`` again on
    every request, which measured ~0.5 ms per call here."""
    parts = urlsplit(url)
    if not parts.hostname or proxy_bypass(parts.hostname):
        return None
    return getproxies().get(parts.scheme)


def caused_by_tls(exc: BaseException) -> bool:
    """Whether an HTTP error comes from a TLS failure (certificate verification, handshake)."""
    if isinstance(exc, aiohttp.ClientSSLError):
        return True
    seen: BaseException | None = exc
    for _ in range(8):  # the chain is short; bounded in case it loops
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
