"""``vault:`` — HashiCorp Vault or OpenBao Transit: hvac for authentication and key
metadata, and aiohttp for the per-request Transit calls (encrypt, decrypt, datakey, sign), so
they run on the event loop instead of waiting for a worker thread (measured: a worker-thread
hop around hvac added ~25% to a call; aiohttp on the loop takes half of hvac's time).

URI form::

    vault://HOST:PORT/KEY?mount=transit&namespace=team-a&ca=/etc/ssl/vault-ca.pem
    vault://vault.internal:8200/payments?auth=approle&role_id=...&approle_mount=approle
    vault://127.0.0.1:8200/payments?tls=false          (plain HTTP: development only)

Options (URI query or keyword):

- ``mount``: the Transit mount path (default ``transit``);
- ``namespace``: a Vault Enterprise / OpenBao namespace (sent as ``X-Vault-Namespace``);
- ``tls``: ``true`` (default, HTTPS) or ``false`` (HTTP);
- ``ca``: a CA bundle to verify the server's certificate (default ``VAULT_CACERT``, else the
  bundle ``requests`` uses, certifi's). Verification cannot be turned off;
- ``timeout``: seconds per call, default 10;
- ``auth``: ``token`` or ``approle`` (default: ``approle`` when a role id is given);
- ``role_id``, ``approle_mount`` (default ``approle``) for AppRole.

Secrets are keyword options or environment variables only, never in the URI: ``token``
(default ``VAULT_TOKEN``, then ``BAO_TOKEN``) and ``secret_id`` (default ``VAULT_SECRET_ID``);
``role_id`` also defaults to ``VAULT_ROLE_ID``. With AppRole the provider logs in on first use
and logs in again once when Vault answers 403 (an expired token).

**How the encryption context is bound.** Transit offers two mechanisms: ``context`` and
``associated_data``. ``context`` is a key-*derivation* input: it only works on keys created
with ``derived=true``, requires a non-empty context on every call, and selects a different
derived key per context. ``associated_data`` is AEAD additional data, authenticated but not
encrypted, on ordinary ``aes128-gcm96``/``aes256-gcm96``/``chacha20-poly1305`` keys. Binding
a ciphertext to its context is exactly what AAD is for, so this provider sends the canonical
context (RFC 8785 JSON, :func:`~keygrants.keys.context.canonical_context`) base64-encoded as
``associated_data``, on encrypt, decrypt and ``datakey``, and omits it for an empty context.
Derived keys are refused with :class:`~keygrants.errors.UnsupportedOperation`.

Transit's encrypt endpoint creates a missing key when the token's policy allows it. To make
an unknown key a :class:`~keygrants.errors.KeyNotFoundError` rather than a new key, the
provider reads each key's metadata (``GET <mount>/keys/<name>``) once and caches it; with a
policy that does not grant that read, it relies on the policy not granting ``create`` either.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import os
import re
import ssl
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, TypeVar
from urllib.parse import urlencode, urlsplit

import aiohttp
import hvac  # type: ignore[import-untyped]  # no stubs ship with hvac
import hvac.exceptions as hexc  # type: ignore[import-untyped]
import requests

from keygrants.errors import (
    DecryptionError,
    EncryptionError,
    KeyNotFoundError,
    KMSError,
    ProviderConnectionError,
    UnsupportedOperation,
)
from keygrants.keys.context import canonical_context
from keygrants.providers._aio import LoopSessions, caused_by_tls, tls_context
from keygrants.providers._options import (
    DEFAULT_TIMEOUT,
    as_timeout,
    check_plaintext,
    decrypt_context,
    parse_http_uri,
    run_blocking,
)
from keygrants.providers.base import KeyProvider
from keygrants.providers.models import DataKeyPair, EncryptedData, KeyReference, RotationPolicy

__all__ = ["VaultTransitProvider"]

T = TypeVar("T")

SCHEME: Final = "vault"
TOKEN_ENVS: Final = ("VAULT_TOKEN", "BAO_TOKEN")
ROLE_ID_ENV: Final = "VAULT_ROLE_ID"
SECRET_ID_ENV: Final = "VAULT_SECRET_ID"
CA_ENV: Final = "VAULT_CACERT"
_OPTIONS: Final = ("mount", "namespace", "tls", "ca", "timeout", "auth", "role_id",
                   "approle_mount")
_SECRETS: Final = ("token", "secret_id")
_AEAD_TYPES: Final = frozenset({"aes128-gcm96", "aes256-gcm96", "chacha20-poly1305",
                                "xchacha20-poly1305"})
_SIGNING_TYPES: Final = frozenset({"ed25519", "ecdsa-p256", "ecdsa-p384", "ecdsa-p521",
                                   "rsa-2048", "rsa-3072", "rsa-4096"})
_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
_SEGMENT: Final = r"(?!\.{1,2}(?:/|$))[A-Za-z0-9_.\-]+"  # no "." or ".." segments
_PATH: Final = re.compile(rf"{_SEGMENT}(/{_SEGMENT})*")
_DATA_KEY_BITS: Final = {"AES_256": 256, "AES_128": 128}


@dataclass(frozen=True, slots=True)
class _TransitKey:
    type: str
    derived: bool
    data: dict[str, Any]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _key_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ValueError(f"vault: invalid Transit key name {name!r}")
    return name


def _parse_time(value: object) -> datetime | None:
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, UTC)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
    return None


_REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})


class _Redirected(Exception):
    def __init__(self, status: int, location: str | None) -> None:
        super().__init__(status)
        self.status = status
        self.location = location


class _NoRedirectAdapter(hvac.adapters.JSONAdapter):  # type: ignore[misc]
    """hvac's adapter, refusing a redirect answer (hvac would hand the response back as if
    it were a result, since ``requests`` counts a 3xx as ok)."""

    def request(self, *args: Any, **kwargs: Any) -> Any:
        response = super().request(*args, **kwargs)
        if isinstance(response, requests.Response) and response.status_code in _REDIRECTS:
            raise _Redirected(response.status_code, response.headers.get("Location"))
        return response


class VaultTransitProvider(KeyProvider):
    """Key provider backed by Vault/OpenBao Transit.

    Args:
        addr: ``https://host:port`` (or ``http://`` for development).
        key: default Transit key name.
        mount: Transit mount path.
        namespace: namespace path, if any.
        ca: CA bundle path (default ``VAULT_CACERT``); TLS is always verified.
        timeout: seconds per call.
        token: a Vault token (default ``VAULT_TOKEN``, ``BAO_TOKEN``).
        auth: ``"token"`` or ``"approle"`` (default: AppRole when a role id is known).
        role_id: AppRole role id (default ``VAULT_ROLE_ID``).
        secret_id: AppRole secret id (default ``VAULT_SECRET_ID``).
        approle_mount: the AppRole auth mount path.

    Raises:
        ValueError: for a bad option or no credentials at all.
    """

    name = SCHEME

    def __init__(self, addr: str, key: str | None = None, *, mount: str = "transit",
                 namespace: str | None = None, ca: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, token: str | None = None,
                 auth: str | None = None, role_id: str | None = None,
                 secret_id: str | None = None, approle_mount: str = "approle") -> None:
        parts = urlsplit(addr)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ValueError(f"vault: address must be https://HOST[:PORT], got {addr!r}")
        for label, path in (("mount", mount), ("approle_mount", approle_mount)):
            if not _PATH.fullmatch(path.strip("/")):
                raise ValueError(f"vault: invalid {label} path {path!r}")
        if namespace is not None and not _PATH.fullmatch(namespace.strip("/")):
            raise ValueError(f"vault: invalid namespace {namespace!r}")
        self.default_key_id = _key_name(key) if key else None
        self._addr = addr.rstrip("/")
        self._mount = mount.strip("/")
        self._namespace = namespace.strip("/") if namespace else None
        self._timeout = as_timeout(timeout)
        self._approle_mount = approle_mount.strip("/")
        role_id_given = role_id
        role_id = role_id or os.environ.get(ROLE_ID_ENV)
        auth = auth or ("approle" if role_id else "token")
        if auth == "approle":
            secret_id = secret_id or os.environ.get(SECRET_ID_ENV)
            if not role_id or not secret_id:
                raise ValueError(f"vault: AppRole needs role_id and secret_id (options or "
                                 f"{ROLE_ID_ENV}/{SECRET_ID_ENV})")
            token = None
        elif auth == "token":
            token = token or next((os.environ[e] for e in TOKEN_ENVS if os.environ.get(e)), None)
            if not token:
                raise ValueError("vault: no token: pass token=... or set VAULT_TOKEN")
        else:
            raise ValueError(f"vault: auth must be token or approle, got {auth!r}")
        self._auth = auth
        self._role_id = role_id
        self._secret_id = secret_id
        ca = ca or os.environ.get(CA_ENV) or None
        self._verify: bool | str = ca if ca else True
        # Redirects are refused on both paths: the token header would go wherever one points
        # (a standby in client-redirect mode sends clients to the active node).
        self._client = hvac.Client(url=self._addr, token=token, verify=self._verify,
                                   timeout=self._timeout, namespace=self._namespace,
                                   allow_redirects=False, adapter=_NoRedirectAdapter)
        self._login_lock = threading.Lock()
        self._logged_in = auth == "token"
        self._keys: dict[str, _TransitKey | None] = {}
        self._tls: ssl.SSLContext | bool = (tls_context(ca) if parts.scheme == "https"
                                            else False)
        headers = {"X-Vault-Request": "true"}
        if self._namespace:
            headers["X-Vault-Namespace"] = self._namespace
        self._sessions = LoopSessions(self._addr, timeout=self._timeout, tls=self._tls,
                                      headers=headers, base_url=True)
        query = {"mount": self._mount}
        if self._namespace:
            query["namespace"] = self._namespace
        if parts.scheme == "http":
            query["tls"] = "false"
        if ca:
            query["ca"] = ca
        if auth == "approle":
            query["auth"] = "approle"
            if role_id_given:  # an identifier, not a secret; from the environment it stays there
                query["role_id"] = role_id_given
            if self._approle_mount != "approle":
                query["approle_mount"] = self._approle_mount
        self.uri = (f"{SCHEME}://{parts.netloc}/{self.default_key_id or ''}?"
                    f"{urlencode(query)}")

    @classmethod
    def from_uri(cls, uri: str, **options: Any) -> VaultTransitProvider:
        """Open ``vault://HOST:PORT/KEY?options`` (see the module docstring).

        Raises:
            ValueError: for a malformed URI, a bad option, or a secret in the URI.
        """
        base, key, opts = parse_http_uri(uri, SCHEME, options, allowed=_OPTIONS,
                                         secrets=_SECRETS)
        return cls(base, key, **opts)

    def __repr__(self) -> str:
        return f"VaultTransitProvider({self.uri!r})"

    # -- plumbing ------------------------------------------------------------------------
    def _translate(self, exc: Exception, op: str) -> KMSError:
        """Map hvac/requests errors to the KMSError tree (never echoing request bodies)."""
        if isinstance(exc, _Redirected):
            return self._redirect_error(exc.status, exc.location)
        if isinstance(exc, requests.exceptions.SSLError):
            return ProviderConnectionError(
                f"vault: TLS verification of {self._addr} failed (pass ca=... for a private CA)")
        if isinstance(exc, requests.exceptions.RequestException):
            return ProviderConnectionError(f"vault: cannot reach {self._addr} "
                                           f"({type(exc).__name__})")
        if isinstance(exc, hexc.VaultDown | hexc.VaultNotInitialized):
            return ProviderConnectionError(f"vault: {self._addr} is sealed or unavailable")
        if isinstance(exc, hexc.InvalidPath):
            return KeyNotFoundError(f"vault: key not found under {self._mount}/ ({op})")
        if op == "decrypt" and isinstance(exc, hexc.InvalidRequest):
            return DecryptionError()
        if isinstance(exc, hexc.Unauthorized | hexc.Forbidden):
            return KMSError(f"vault: {op} denied (check the token's policy)")
        if isinstance(exc, hexc.RateLimitExceeded):
            return KMSError(f"vault: {op} rate-limited")
        if op in ("encrypt", "generate_data_key"):
            return EncryptionError(f"vault: {op} failed ({type(exc).__name__})")
        return KMSError(f"vault: {op} failed ({type(exc).__name__})")

    def _login(self) -> None:
        with self._login_lock:
            if self._logged_in:
                return
            self._client.auth.approle.login(role_id=self._role_id, secret_id=self._secret_id,
                                            mount_point=self._approle_mount)
            self._logged_in = True

    def _with_auth(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if self._auth == "approle":
            self._login()
        try:
            return fn(*args, **kwargs)
        except hexc.Forbidden:
            if self._auth != "approle":
                raise
            with self._login_lock:  # maybe the token expired: log in again, once
                self._logged_in = False
            self._login()
            return fn(*args, **kwargs)

    async def _call(self, op: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            return await run_blocking(self._with_auth, fn, *args, timeout=self._timeout,
                                      what=f"vault {op}", **kwargs)
        except (hexc.VaultError, requests.exceptions.RequestException, _Redirected) as exc:
            raise self._translate(exc, op) from exc

    def _redirect_error(self, status: int, location: str | None) -> ProviderConnectionError:
        where = ""
        if location:  # host and port only: no userinfo, path or query from the answer
            with contextlib.suppress(ValueError):
                target = urlsplit(location[:2048])
                if target.hostname:
                    where = target.hostname + (f":{target.port}" if target.port else "")
        return ProviderConnectionError(
            f"vault: {self._addr} answered with a redirect (HTTP {status}"
            f"{f' to {where}' if where else ''}); redirects are not followed, since the token "
            "would go with them: point the provider at the active node or at a load balancer "
            "that forwards")

    def _status_error(self, status: int, op: str) -> KMSError:
        """An error answer of the async path, mapped as the hvac path maps it: hvac's
        exception for the status, then :meth:`_translate`."""
        return self._translate(hexc.VaultError.from_status(status), op)

    def _relogin(self, failed_token: str | None) -> None:
        """In a worker thread: log in again unless another call already replaced the token
        that Vault refused (concurrent 403s cost one login, not one each)."""
        with self._login_lock:
            if self._client.token == failed_token:
                self._logged_in = False
        self._login()

    async def _post(self, op: str, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """POST a Transit call on the event loop, within ``timeout`` in all; with AppRole, log
        in first and once more when Vault answers 403 (an expired token), as
        :meth:`_with_auth` does for hvac."""
        try:
            async with asyncio.timeout(self._timeout):
                return await self._post_once_or_twice(op, path, body)
        except TimeoutError as exc:
            raise ProviderConnectionError(
                f"vault {op}: no answer within {self._timeout:g} s") from exc

    async def _post_once_or_twice(self, op: str, path: str,
                                  body: Mapping[str, Any]) -> dict[str, Any]:
        if self._auth == "approle" and not self._logged_in:
            await self._call("login", lambda: None)
        http = self._sessions.get()
        for attempt in (1, 2):
            token = self._client.token
            try:
                # Redirects are not followed: the token header would go wherever a redirect
                # points (HA standbys forward requests to the active node by default).
                async with http.post(path, json=body, allow_redirects=False,
                                     headers={"X-Vault-Token": token} if token else None) as r:
                    status = r.status
                    try:
                        data = await r.json(content_type=None) if status == 200 else None
                    except ValueError:
                        data = None
            except aiohttp.ClientError as exc:
                if caused_by_tls(exc):
                    raise ProviderConnectionError(
                        f"vault: TLS verification of {self._addr} failed (pass ca=... for a "
                        "private CA)") from exc
                raise ProviderConnectionError(
                    f"vault: cannot reach {self._addr} ({type(exc).__name__})") from exc
            if status in _REDIRECTS:
                raise self._redirect_error(status, r.headers.get("Location"))
            if status == 403 and self._auth == "approle" and attempt == 1:
                await self._call("login", self._relogin, token)
                continue
            if status != 200:
                raise self._status_error(status, op)
            if not isinstance(data, dict) or not isinstance(data.get("data"), dict):
                raise self._status_error(502, op)
            return data
        raise AssertionError("unreachable")  # pragma: no cover

    async def _key(self, name: str, *, refresh: bool = False) -> _TransitKey | None:
        """The key's metadata (cached), ``None`` when the policy does not allow reading it."""
        if not refresh and name in self._keys:
            return self._keys[name]
        try:
            resp = await self._call("read_key", self._client.secrets.transit.read_key, name,
                                    mount_point=self._mount)
        except KMSError as exc:
            if not isinstance(exc.__cause__, hexc.Forbidden):
                raise
            info: _TransitKey | None = None
        else:
            data = dict(resp["data"])
            info = _TransitKey(type=str(data.get("type")), derived=bool(data.get("derived")),
                               data=data)
        self._keys[name] = info
        return info

    async def _encryption_key(self, key_id: str | None) -> str:
        name = _key_name(self.reference(key_id).key_id)
        info = await self._key(name)
        if info is not None:
            if info.derived:
                raise UnsupportedOperation(
                    "vault: derived Transit keys are not supported (the context is bound as "
                    "associated_data); use a non-derived AEAD key")
            if info.type not in _AEAD_TYPES:
                raise UnsupportedOperation(f"vault: a {info.type} key cannot encrypt")
        return name

    def _path(self, action: str, name: str) -> str:
        return f"/v1/{self._mount}/{action}/{name}"

    # -- KeyProvider ---------------------------------------------------------------------
    async def initialize(self) -> None:
        """Log in (AppRole) and check that the URI's key exists.

        Raises:
            KeyNotFoundError: when it does not exist.
            ProviderConnectionError: when Vault cannot be reached.
            KMSError: when the credentials are refused.
        """
        if self.default_key_id is not None:
            await self._key(self.default_key_id, refresh=True)
        elif self._auth == "approle":
            await self._call("login", lambda: None)

    async def encrypt(self, plaintext: bytes, *, key_id: str | None = None,
                      context: Mapping[str, str] | None = None) -> EncryptedData:
        """Encrypt with ``transit/encrypt``; the context is bound as ``associated_data``.

        Raises:
            KeyNotFoundError: for an unknown key.
            UnsupportedOperation: for a derived or non-AEAD key.
            ProviderConnectionError: when Vault cannot be reached in time.
            EncryptionError: for other failures.
        """
        check_plaintext(plaintext)
        aad = canonical_context(context)
        name = await self._encryption_key(key_id)
        body: dict[str, Any] = {"plaintext": _b64(bytes(plaintext))}
        if aad:
            body["associated_data"] = _b64(aad)
        resp = await self._post("encrypt", self._path("encrypt", name), body)
        ciphertext = str(resp["data"]["ciphertext"]).encode("ascii")
        info = self._keys.get(name)
        return EncryptedData(ciphertext=ciphertext,
                             key_reference=KeyReference(provider=self.name, key_id=name),
                             algorithm=f"transit:{info.type}" if info else "transit",
                             context=dict(context or {}))

    async def decrypt(self, encrypted: EncryptedData, *,
                      context: Mapping[str, str] | None = None) -> bytes:
        """Decrypt with ``transit/decrypt``.

        Raises:
            DecryptionError: for every cryptographic failure (opaque).
            KeyNotFoundError: when the referenced key does not exist.
            ProviderConnectionError: when Vault cannot be reached in time.
        """
        ref = encrypted.key_reference
        if ref.provider != self.name or not _NAME.fullmatch(ref.key_id):
            raise DecryptionError()
        _, aad = decrypt_context(encrypted.context, context)
        try:
            ciphertext = encrypted.ciphertext.decode("ascii")
        except UnicodeDecodeError:
            raise DecryptionError() from None
        name = await self._encryption_key(ref.key_id)
        body: dict[str, Any] = {"ciphertext": ciphertext}
        if aad:
            body["associated_data"] = _b64(aad)
        resp = await self._post("decrypt", self._path("decrypt", name), body)
        try:
            return base64.b64decode(resp["data"]["plaintext"], validate=True)
        except (KeyError, TypeError, binascii.Error):
            raise DecryptionError() from None

    async def generate_data_key(self, *, key_id: str | None = None, key_spec: str = "AES_256",
                                context: Mapping[str, str] | None = None) -> DataKeyPair:
        """A data key from ``transit/datakey/plaintext`` (context as ``associated_data``).

        Raises:
            ValueError: for a key spec other than ``AES_256``/``AES_128``.
            KeyNotFoundError: for an unknown key.
            ProviderConnectionError: when Vault cannot be reached in time.
            EncryptionError: for other failures.
        """
        bits = _DATA_KEY_BITS.get(key_spec)
        if bits is None:
            raise ValueError(f"vault: key_spec must be one of {sorted(_DATA_KEY_BITS)}")
        aad = canonical_context(context)
        name = await self._encryption_key(key_id)
        body: dict[str, Any] = {"bits": bits}
        if aad:
            body["associated_data"] = _b64(aad)
        resp = await self._post("generate_data_key", self._path("datakey/plaintext", name), body)
        ref = KeyReference(provider=self.name, key_id=name)
        info = self._keys.get(name)
        encrypted = EncryptedData(ciphertext=str(resp["data"]["ciphertext"]).encode("ascii"),
                                  key_reference=ref,
                                  algorithm=f"transit:{info.type}" if info else "transit",
                                  context=dict(context or {}))
        return DataKeyPair(plaintext_key=base64.b64decode(resp["data"]["plaintext"]),
                           encrypted_key=encrypted, key_reference=ref)

    async def sign(self, message: bytes, *, key_id: str | None = None) -> bytes:
        """Sign with ``transit/sign`` (SHA-256; ECDSA DER-encoded, RSA with PSS, Ed25519 raw).

        Returns the signature bytes without Transit's ``vault:vN:`` prefix, so any verifier
        holding the public key (``<mount>/keys/<name>``) can check them.

        Raises:
            UnsupportedOperation: for a key type that cannot sign.
            KeyNotFoundError: for an unknown key.
            ProviderConnectionError: when Vault cannot be reached in time.
        """
        name = _key_name(self.reference(key_id).key_id)
        info = await self._key(name)
        if info is not None and info.type not in _SIGNING_TYPES:
            raise UnsupportedOperation(f"vault: a {info.type} key cannot sign")
        body: dict[str, Any] = {"input": _b64(bytes(message)), "hash_algorithm": "sha2-256",
                                "marshaling_algorithm": "asn1"}
        if info is not None and info.type.startswith("rsa-"):
            body["signature_algorithm"] = "pss"
        resp = await self._post("sign", self._path("sign", name), body)
        signature = str(resp["data"]["signature"])
        prefix, _, encoded = signature.rpartition(":")
        if not prefix.startswith("vault:v"):
            raise KMSError("vault: unexpected signature format")
        return base64.b64decode(encoded)

    async def get_rotation_policy(self, key_id: str | None = None) -> RotationPolicy:
        """The key's ``auto_rotate_period`` and its latest version's creation time.

        Raises:
            KeyNotFoundError: for an unknown key.
            ProviderConnectionError: when Vault cannot be reached in time.
        """
        name = _key_name(self.reference(key_id).key_id)
        info = await self._key(name, refresh=True)
        if info is None:
            return RotationPolicy(enabled=False)
        period = int(info.data.get("auto_rotate_period") or 0)
        latest = str(info.data.get("latest_version", ""))
        created = (info.data.get("keys") or {}).get(latest)
        if isinstance(created, dict):
            created = created.get("creation_time")
        last = _parse_time(created)
        next_rotation = None
        if period and last is not None:
            next_rotation = datetime.fromtimestamp(last.timestamp() + period, UTC)
        return RotationPolicy(enabled=period > 0,
                              rotation_period_days=period // 86400 if period else None,
                              last_rotation=last, next_rotation=next_rotation)

    async def release_loop(self) -> None:
        """Close the HTTP session of the running event loop (before that loop ends)."""
        await self._sessions.release()

    async def close(self) -> None:
        """Close the HTTP sessions (the running loop's; others with :meth:`release_loop` on
        their loops)."""
        await self.release_loop()
        self._client.adapter.close()
