"""``keygrants:`` — another keygrants server, through the SDK's :class:`~keygrants.client.AsyncClient`.

URI form::

    keygrants://kms.internal:8650/payments                 (HTTPS, the default)
    keygrants://127.0.0.1:8650/payments?tls=false          (plain HTTP: loopback/development)
    keygrants://kms.internal:8650/payments?ca=/etc/kg/ca.pem&timeout=5

Options (URI query or keyword): ``tls`` (default ``true``), ``ca`` (a CA bundle; verification
is always on with TLS), ``timeout`` (seconds per request, default 10), ``token_env`` (the name
of the environment variable holding the token, default ``KEYGRANTS_TOKEN``; useful when this
process also talks to its own server), ``principal`` and ``key_file`` (authenticate as that
principal by signing every request with its private key or shared secret file, RFC 9421,
instead of a bearer token; see docs/auth.md). The bearer token (a principal's API key or a
grant token) is the keyword-only option ``token``, refused in the URI.

    keygrants://kms.internal:8650/payments?principal=svc-billing&key_file=/etc/kg/svc.pem

A **grant** (docs/grants.md) scopes what the provider may do to what the grant allows: the
keyword-only option ``grant`` (the token; refused in the URI), or ``grant_env`` (the name of
an environment variable holding it), presented on every operation besides the
authentication above; ``dpop_key_file`` is the proof-of-possession key of a DPoP-bound
grant. Without these options no grant is sent, even if ``KEYGRANTS_GRANT`` is set.

    keygrants://kms.internal:8650/payments?principal=svc-billing&key_file=/etc/kg/svc.pem&grant_env=PAYMENTS_GRANT

Mapping: the server's native ``encrypt``/``decrypt``/``data-key``/``sign`` with the context
passed as the server's encryption context (bound as AAD by the server). References name the
key by the server's key id (the name or alias used is kept in ``key_alias``); decryption
checks that the server reports the same key id, so a ciphertext of another key presented as
this one fails.
"""

from __future__ import annotations

import asyncio
import math
import os
import ssl
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Final, TypeVar
from urllib.parse import urlencode, urlsplit

from keygrants.client import AsyncClient, load_dpop_key
from keygrants.errors import (
    DecryptionError,
    EncryptionError,
    Forbidden,
    InvalidCiphertext,
    InvalidKeyUsage,
    InvalidRequest,
    KeygrantsError,
    KeyNotFound,
    KeyNotFoundError,
    KeyStateError,
    KMSError,
    NotFound,
    ProviderConnectionError,
    ServerUnreachable,
    Unauthenticated,
    UnsupportedOperation,
)
from keygrants.keys.context import canonical_context
from keygrants.providers._options import (
    DEFAULT_TIMEOUT,
    as_timeout,
    check_plaintext,
    decrypt_context,
    parse_http_uri,
)
from keygrants.providers.base import KeyProvider
from keygrants.providers.models import DataKeyPair, EncryptedData, KeyReference, RotationPolicy

__all__ = ["KeygrantsProvider"]

# OpenSSL's reason when the first bytes back are not a TLS record, e.g. "HTTP/1.1 400": the
# peer is up and speaks something else (a plain-HTTP server), not a failed or refused TLS.
_NOT_TLS_REASONS: Final = frozenset({"WRONG_VERSION_NUMBER"})

T = TypeVar("T")

SCHEME: Final = "keygrants"
TOKEN_ENV: Final = "KEYGRANTS_TOKEN"
ALGORITHM: Final = "keygrants-native-v1"
_OPTIONS: Final = ("tls", "ca", "timeout", "token_env", "principal", "key_file", "grant_env",
                   "dpop_key_file")
_SECRETS: Final = ("token", "grant")
_DATA_KEY_SIZES: Final = {"AES_256": 32, "AES_128": 16}


def _answered_without_tls(exc: BaseException) -> bool:
    """Whether the TLS handshake behind ``exc`` failed because the peer answered in clear."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ssl.SSLError):
            return cause.reason in _NOT_TLS_REASONS
        cause = cause.__cause__ or cause.__context__
    return False


class KeygrantsProvider(KeyProvider):
    """Key provider backed by a keygrants server.

    Args:
        addr: ``https://host:port`` (or ``http://``).
        key: default key name, alias or id.
        token: bearer token (default: the ``token_env`` variable, ``KEYGRANTS_TOKEN``).
        token_env: the environment variable to read the token from.
        principal: sign requests as this principal (with ``key_file``) instead of a token.
        key_file: the principal's PEM private key or shared secret file.
        ca: CA bundle path for TLS.
        timeout: seconds per request.
        grant: a grant token to present on every operation.
        grant_env: the environment variable to read the grant token from.
        dpop_key_file: the PEM private key a DPoP-bound grant is bound to.

    Raises:
        ValueError: for a bad option, no token at all, or a grant variable that is unset.
    """

    name = SCHEME

    def __init__(self, addr: str, key: str | None = None, *, token: str | None = None,
                 token_env: str = TOKEN_ENV, ca: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, principal: str | None = None,
                 key_file: str | None = None, grant: str | None = None,
                 grant_env: str | None = None, dpop_key_file: str | None = None) -> None:
        parts = urlsplit(addr)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ValueError(f"keygrants: address must be https://HOST:PORT, got {addr!r}")
        if (principal is None) != (key_file is None):
            raise ValueError("keygrants: principal and key_file go together")
        if principal is None:
            token = token or os.environ.get(token_env)
            if not token:
                raise ValueError(f"keygrants: no token: pass token=... or set {token_env}, "
                                 "or principal=... and key_file=...")
        elif token:
            raise ValueError("keygrants: give a token or principal and key_file, not both")
        if grant is None and grant_env is not None:
            grant = os.environ.get(grant_env)
            if not grant:
                raise ValueError(f"keygrants: grant_env names {grant_env}, which is not set")
        if grant is not None and grant_env is not None and grant != os.environ.get(grant_env):
            raise ValueError("keygrants: give grant or grant_env, not both")
        self._grant = grant or ""  # "": never fall back to KEYGRANTS_GRANT
        self._dpop_key = load_dpop_key(dpop_key_file) if dpop_key_file else None
        self._addr = addr.rstrip("/")
        self._token = token
        self._principal = principal
        self._key_file = key_file
        self._verify: bool | str = ca if ca else True
        self._timeout = as_timeout(timeout)
        self.default_key_id = key or None
        self._client: AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        query: dict[str, str] = {}
        if parts.scheme == "http":
            query["tls"] = "false"
        if ca:
            query["ca"] = ca
        if token_env != TOKEN_ENV:
            query["token_env"] = token_env
        if principal is not None and key_file is not None:
            query["principal"], query["key_file"] = principal, key_file
        if grant_env is not None:
            query["grant_env"] = grant_env
        if dpop_key_file is not None:
            query["dpop_key_file"] = dpop_key_file
        self.uri = (f"{SCHEME}://{parts.netloc}/{key or ''}"
                    + (f"?{urlencode(query)}" if query else ""))

    @classmethod
    def from_uri(cls, uri: str, **options: Any) -> KeygrantsProvider:
        """Open ``keygrants://HOST:PORT/KEY?options`` (see the module docstring).

        Raises:
            ValueError: for a malformed URI, a bad option, or a token in the URI.
        """
        base, key, opts = parse_http_uri(uri, SCHEME, options, allowed=_OPTIONS,
                                         secrets=_SECRETS)
        return cls(base, key, **opts)

    def __repr__(self) -> str:
        return f"KeygrantsProvider({self.uri!r})"

    # -- plumbing ------------------------------------------------------------------------
    def _http(self) -> AsyncClient:
        """The client of the running event loop (httpx connections belong to one loop;
        :class:`~keygrants.providers.ProviderSeal` runs each call on a fresh loop)."""
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            self._client = AsyncClient(self._addr, token=self._token, timeout=self._timeout,
                                       verify=self._verify, principal=self._principal,
                                       key_file=self._key_file, grant=self._grant,
                                       dpop_key=self._dpop_key,
                                       # ?tls=false is the URI's explicit choice of plain HTTP
                                       allow_insecure_http=self._addr.startswith("http://"))
            self._loop = loop
        return self._client

    def _translate(self, exc: KeygrantsError, op: str) -> KeygrantsError:
        if isinstance(exc, ServerUnreachable):
            if self._addr.startswith("https://") and _answered_without_tls(exc):
                return ProviderConnectionError(
                    f"keygrants: the server at {self._addr} does not speak TLS (it answered "
                    "the TLS handshake in plain text); for a plain-HTTP server add ?tls=false "
                    "to the URI")
            return ProviderConnectionError(f"keygrants: cannot reach {self._addr}")
        if op == "decrypt" and isinstance(exc, InvalidCiphertext | InvalidRequest | NotFound):
            return DecryptionError()
        if isinstance(exc, KMSError):  # already in the provider tree (a provider upstream)
            return type(exc)(f"keygrants: {exc.message}")
        if isinstance(exc, KeyNotFound):
            return KeyNotFoundError(f"keygrants: key not found ({op})")
        if isinstance(exc, InvalidKeyUsage):
            return UnsupportedOperation(f"keygrants: the key's purpose does not allow {op}")
        if isinstance(exc, Unauthenticated | Forbidden):
            return KMSError(f"keygrants: {op} denied ({exc.code})")
        if isinstance(exc, KeyStateError):
            return KMSError(f"keygrants: the key is not usable in its current state ({exc.code})")
        if op in ("encrypt", "generate_data_key"):
            return EncryptionError(f"keygrants: {op} failed ({exc.code})")
        return KMSError(f"keygrants: {op} failed ({exc.code})")

    async def _call(self, op: str, fn: Callable[[AsyncClient], Awaitable[T]]) -> T:
        try:
            return await fn(self._http())
        except KeygrantsError as exc:
            raise self._translate(exc, op) from exc

    def _ref(self, requested: str, key_id: str) -> KeyReference:
        if requested == self.default_key_id:
            self._resolved_key_id = key_id  # the server's id for the URI's name or alias
        return KeyReference(provider=self.name, key_id=key_id,
                            key_alias=requested if requested != key_id else None)

    # -- KeyProvider ---------------------------------------------------------------------
    async def initialize(self) -> None:
        """Check that the URI's key exists, is enabled and encrypts.

        Raises:
            KeyNotFoundError: when it does not exist.
            UnsupportedOperation: when it is not an encryption key.
            KMSError: when it is not enabled or the token is refused.
            ProviderConnectionError: when the server cannot be reached.
        """
        key = self.default_key_id
        if key is None:
            return
        info = await self._call("initialize", lambda c: c.describe_key(key))
        self._resolved_key_id = info.id
        if info.purpose != "encrypt-decrypt":
            raise UnsupportedOperation(f"keygrants: key {key!r} is a {info.purpose} key")
        if info.state != "enabled":
            raise KMSError(f"keygrants: key {key!r} is {info.state}")

    async def encrypt(self, plaintext: bytes, *, key_id: str | None = None,
                      context: Mapping[str, str] | None = None) -> EncryptedData:
        """The server's encrypt, bound to ``context``.

        Raises:
            KeyNotFoundError: for an unknown key.
            ProviderConnectionError: when the server cannot be reached in time.
            EncryptionError: for other failures.
        """
        check_plaintext(plaintext)
        canonical_context(context)
        key = self.reference(key_id).key_id
        ctx = dict(context or {})
        result = await self._call("encrypt", lambda c: c.encrypt(key, bytes(plaintext),
                                                                 context=ctx or None))
        return EncryptedData(ciphertext=result.ciphertext,
                             key_reference=self._ref(key, result.key_id),
                             algorithm=ALGORITHM, context=ctx)

    async def decrypt(self, encrypted: EncryptedData, *,
                      context: Mapping[str, str] | None = None) -> bytes:
        """The server's decrypt; the key that opened it must be the referenced key.

        Raises:
            DecryptionError: for every cryptographic failure (opaque).
            ProviderConnectionError: when the server cannot be reached in time.
        """
        ref = encrypted.key_reference
        if ref.provider != self.name:
            raise DecryptionError()
        ctx, _ = decrypt_context(encrypted.context, context)
        result = await self._call("decrypt", lambda c: c.decrypt(encrypted.ciphertext,
                                                                 context=ctx or None))
        if result.key_id != ref.key_id:
            raise DecryptionError()
        return result.plaintext

    async def generate_data_key(self, *, key_id: str | None = None, key_spec: str = "AES_256",
                                context: Mapping[str, str] | None = None) -> DataKeyPair:
        """A data key from the server (``AES_256`` or ``AES_128``).

        Raises:
            ValueError: for another key spec.
            KeyNotFoundError: for an unknown key.
            ProviderConnectionError: when the server cannot be reached in time.
            EncryptionError: for other failures.
        """
        size = _DATA_KEY_SIZES.get(key_spec)
        if size is None:
            raise ValueError(f"keygrants: key_spec must be one of {sorted(_DATA_KEY_SIZES)}")
        canonical_context(context)
        key = self.reference(key_id).key_id
        ctx = dict(context or {})
        result = await self._call("generate_data_key", lambda c: c.generate_data_key(
            key, size=size, context=ctx or None))
        if result.plaintext is None:
            raise EncryptionError("keygrants: the server returned no plaintext data key")
        ref = self._ref(key, result.key_id)
        encrypted = EncryptedData(ciphertext=result.ciphertext, key_reference=ref,
                                  algorithm=ALGORITHM, context=ctx)
        return DataKeyPair(plaintext_key=result.plaintext, encrypted_key=encrypted,
                           key_reference=ref)

    async def sign(self, message: bytes, *, key_id: str | None = None) -> bytes:
        """The server's sign (raw message) with a signing key.

        Raises:
            UnsupportedOperation: when the key is not a signing key.
            KeyNotFoundError: for an unknown key.
            ProviderConnectionError: when the server cannot be reached in time.
        """
        key = self.reference(key_id).key_id
        result = await self._call("sign", lambda c: c.sign(key, bytes(message)))
        return result.signature

    async def get_rotation_policy(self, key_id: str | None = None) -> RotationPolicy:
        """The key's rotation period and next scheduled rotation.

        Raises:
            KeyNotFoundError: for an unknown key.
            ProviderConnectionError: when the server cannot be reached in time.
        """
        key = self.reference(key_id).key_id
        info = await self._call("get_rotation_policy", lambda c: c.describe_key(key))
        period = info.rotation_period or 0
        next_at = info.next_rotation_at
        last = (next_at - timedelta(seconds=period)) if next_at and period else None
        return RotationPolicy(enabled=period > 0,
                              # whole days, rounded up as KeyManager.get_rotation_policy does
                              rotation_period_days=math.ceil(period / 86400) if period else None,
                              last_rotation=last.astimezone(UTC) if isinstance(last, datetime)
                              else None,
                              next_rotation=next_at)

    async def release_loop(self) -> None:
        """Close the client of the running event loop (before that loop ends)."""
        await self.close()

    async def close(self) -> None:
        """Close the HTTP connections of the current event loop's client."""
        client, self._client = self._client, None
        if client is not None and self._loop is asyncio.get_running_loop():
            await client.aclose()
