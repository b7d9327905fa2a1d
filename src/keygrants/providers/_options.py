"""Plumbing shared by the remote key providers: options, limits, blocking calls.

Every provider reads its options from two places, the URI query and keyword arguments to
:func:`~keygrants.providers.open_provider`; a keyword wins over the query. Names are matched
with ``-`` and ``_`` treated alike (``approle-mount`` = ``approle_mount``). An unknown name is
a configuration error raised at construction, and secrets (tokens, PINs, secret ids, access
keys) are refused in the URI, because URIs end up in logs, shell history and the root key
record: they come from keyword options or the environment only.
"""

from __future__ import annotations

import asyncio
import functools
import math
from collections.abc import Callable, Collection, Mapping
from typing import Any, Final, TypeVar
from urllib.parse import parse_qsl, urlsplit

from keygrants.errors import (
    DecryptionError,
    InvalidRequest,
    PayloadTooLarge,
    ProviderConnectionError,
)
from keygrants.keys.context import canonical_context

__all__ = [
    "DEFAULT_TIMEOUT",
    "MAX_PLAINTEXT",
    "as_bool",
    "as_timeout",
    "check_plaintext",
    "collect_options",
    "decrypt_context",
    "run_blocking",
]

T = TypeVar("T")

DEFAULT_TIMEOUT: Final = 10.0
"""Seconds a provider call may take, connect and answer included, unless told otherwise."""
MAX_TIMEOUT: Final = 600.0
MAX_PLAINTEXT: Final = 4096
"""Largest secret a provider encrypts (AWS KMS's limit; providers wrap data keys, not data)."""

_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})


def _norm(name: str) -> str:
    return name.replace("-", "_")


def collect_options(provider: str, query: str, options: Mapping[str, Any], *,
                    allowed: Collection[str], secrets: Collection[str] = ()) -> dict[str, Any]:
    """Merge the URI query and keyword options into one dict keyed by normalized name.

    Args:
        provider: the scheme, for error messages.
        query: the URI's query string (without ``?``).
        options: keyword options; ``None`` values are ignored.
        allowed: every accepted option name (normalized, with ``_``).
        secrets: names that may be given as keyword options but never in the URI.

    Raises:
        ValueError: for an unknown or repeated name, or a secret in the URI.
    """
    allowed_set = {_norm(a) for a in allowed}
    secret_set = {_norm(s) for s in secrets}
    out: dict[str, Any] = {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise ValueError(f"{provider}: malformed URI query") from None
    for raw_name, value in pairs:
        name = _norm(raw_name)
        if name in secret_set:
            raise ValueError(f"{provider}: {raw_name} must not appear in the URI; pass it as an "
                             "option or through the environment")
        if name not in allowed_set:
            raise ValueError(f"{provider}: unknown URI option {raw_name!r}; known: "
                             f"{', '.join(sorted(allowed_set))}")
        if name in out:
            raise ValueError(f"{provider}: URI option {raw_name!r} given twice")
        out[name] = value
    for raw_name, value in options.items():
        name = _norm(raw_name)
        if name not in allowed_set and name not in secret_set:
            raise ValueError(f"{provider}: unknown option {raw_name!r}")
        if value is not None:
            out[name] = value
    return out


def parse_http_uri(uri: str, scheme: str, options: Mapping[str, Any], *,
                   allowed: Collection[str], secrets: Collection[str]
                   ) -> tuple[str, str | None, dict[str, Any]]:
    """``SCHEME://HOST:PORT/KEY?options`` for providers spoken to over HTTP(S).

    Returns:
        ``(base_url, key or None, options)``: the base URL is ``https://`` unless the
        ``tls=false`` option says otherwise, and a ``timeout`` option is validated.

    Raises:
        ValueError: for a malformed URI, a bad option, or a secret in the URI.
    """
    parts = urlsplit(uri)
    if parts.scheme != scheme or not parts.netloc or parts.fragment:
        raise ValueError(f"{scheme}: URI must be {scheme}://HOST:PORT/KEY?options")
    opts = collect_options(scheme, parts.query, options, allowed=allowed, secrets=secrets)
    tls = as_bool(opts.pop("tls", True), "tls")
    if "timeout" in opts:
        opts["timeout"] = as_timeout(opts["timeout"])
    return f"{'https' if tls else 'http'}://{parts.netloc}", parts.path.strip("/") or None, opts


def as_bool(value: object, name: str) -> bool:
    """``True``/``False`` from a bool or a string such as ``true``, ``0``, ``off``.

    Raises:
        ValueError: for anything else.
    """
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"option {name} must be true or false, got {value!r}")


def as_timeout(value: object, name: str = "timeout") -> float:
    """A positive number of seconds, at most :data:`MAX_TIMEOUT`.

    Raises:
        ValueError: for anything else.
    """
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"option {name} must be a number of seconds, got {value!r}") from None
    if not math.isfinite(seconds) or not 0 < seconds <= MAX_TIMEOUT:
        raise ValueError(f"option {name} must be in (0, {MAX_TIMEOUT:g}] seconds")
    return seconds


def check_plaintext(plaintext: bytes) -> None:
    """Refuse what providers do not encrypt: non-bytes, empty, or over :data:`MAX_PLAINTEXT`.

    Raises:
        TypeError: when ``plaintext`` is not bytes.
        ValueError: when it is empty.
        PayloadTooLarge: when it is over :data:`MAX_PLAINTEXT` (as the ``local:`` provider and
            the KeyManager raise for their limits).
    """
    if not isinstance(plaintext, (bytes, bytearray, memoryview)):
        raise TypeError("plaintext must be bytes")
    if not plaintext:
        raise ValueError(f"plaintext must be 1..{MAX_PLAINTEXT} bytes, got none")
    if len(plaintext) > MAX_PLAINTEXT:
        raise PayloadTooLarge(f"a provider encrypts at most {MAX_PLAINTEXT} bytes; providers wrap "
                              "keys and small secrets (use the KeyManager for data)")


def decrypt_context(recorded: Mapping[str, str], given: Mapping[str, str] | None
                    ) -> tuple[dict[str, str], bytes]:
    """The context to decrypt with (``given``, else the one recorded with the ciphertext) as a
    dict and as canonical bytes.

    Raises:
        InvalidRequest: when the caller's context is malformed (caller misuse).
        DecryptionError: when the recorded context is malformed (a bad record, opaque).
    """
    if given is not None:
        return dict(given), canonical_context(given)
    try:
        return dict(recorded), canonical_context(recorded)
    except (InvalidRequest, TypeError, ValueError):
        raise DecryptionError() from None


async def run_blocking(fn: Callable[..., T], /, *args: Any, timeout: float, what: str,
                       **kwargs: Any) -> T:
    """Run a blocking client call in a worker thread, bounded by ``timeout`` seconds.

    The client's own socket timeouts are set to the same bound, so an abandoned call ends soon
    after; this bound makes sure the caller never waits longer, retries included.

    Raises:
        ProviderConnectionError: when the call does not finish in time.
    """
    call = functools.partial(fn, *args, **kwargs) if args or kwargs else fn
    # run_in_executor gives a plain Future: wait_for then needs no Task around it (cheaper
    # than wait_for(to_thread(...)) on the per-request path). No context is copied: the
    # client calls made here do not read context variables.
    future = asyncio.get_running_loop().run_in_executor(None, call)
    try:
        return await asyncio.wait_for(future, timeout)
    except TimeoutError as exc:
        raise ProviderConnectionError(f"{what}: no answer within {timeout:g} s") from exc
