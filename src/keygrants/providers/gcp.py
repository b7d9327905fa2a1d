"""``gcp-kms:`` — Google Cloud KMS through google-cloud-kms (gRPC).

URI form::

    gcp-kms://projects/P/locations/L/keyRings/R/cryptoKeys/K
    gcp-kms://projects/P/locations/L/keyRings/R/cryptoKeys/K?credentials_file=/etc/kg/sa.json
    gcp-kms://projects/P/locations/L/keyRings/R/cryptoKeys/K?endpoint=127.0.0.1:9443&insecure=true

Options (URI query or keyword): ``endpoint`` (``host:port``, default
``cloudkms.googleapis.com``), ``credentials_file`` (a service account key file; default:
Application Default Credentials), ``insecure`` (``true``: plaintext gRPC without credentials,
**for a local fake or emulator only**), ``timeout`` (seconds per call, default 10).

Mapping: the canonical encryption context
(:func:`~keygrants.keys.context.canonical_context`) is sent as
``additional_authenticated_data``. Every request and response is checked with CRC32C as
Google recommends: the provider sends ``plaintext_crc32c``/``ciphertext_crc32c``/
``additional_authenticated_data_crc32c``/``digest_crc32c``, requires the server's
``verified_*`` flags, checks the CRC32C of what comes back and that the response names the
requested key. A ciphertext over :data:`MAX_CIPHERTEXT` (64 KiB, Cloud KMS's own limit) is
refused before any of that work. Data keys are drawn locally and wrapped with ``Encrypt``
(Cloud KMS has no data-key call). Signing uses ``AsymmetricSign`` on a
``cryptoKeyVersions/N`` name.

**Testing caveat:** there is no Cloud KMS emulator. This provider is tested against an
in-repository fake gRPC server (``tests/providers/fake_gcp_kms.py``) built from the client
library's own message types, not against Google.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Final, TypeVar
from urllib.parse import urlencode

from google.api_core import exceptions as gexc
from google.auth import exceptions as auth_exc
from google.cloud import kms_v1

from keygrants.errors import (
    DecryptionError,
    EncryptionError,
    KeyNotFoundError,
    KMSError,
    ProviderConnectionError,
    UnsupportedOperation,
)
from keygrants.keys.context import canonical_context
from keygrants.providers._options import (
    DEFAULT_TIMEOUT,
    as_bool,
    as_timeout,
    check_plaintext,
    collect_options,
    decrypt_context,
    run_blocking,
)
from keygrants.providers.base import KeyProvider
from keygrants.providers.models import EncryptedData, KeyReference, RotationPolicy

__all__ = ["GcpKmsProvider", "crc32c"]

T = TypeVar("T")

SCHEME: Final = "gcp-kms"
ALGORITHM: Final = "GOOGLE_SYMMETRIC_ENCRYPTION"
DEFAULT_ENDPOINT: Final = "cloudkms.googleapis.com"
_OPTIONS: Final = ("endpoint", "credentials_file", "insecure", "timeout")
_KEY: Final = re.compile(r"projects/[^/]+/locations/[^/]+/keyRings/[^/]+/cryptoKeys/[^/]+")
_VERSION: Final = re.compile(_KEY.pattern + r"/cryptoKeyVersions/[^/]+")
_UNREACHABLE: Final = (gexc.ServiceUnavailable, gexc.DeadlineExceeded, gexc.RetryError)
MAX_CIPHERTEXT: Final = 64 * 1024
"""Largest ciphertext sent to ``Decrypt``: Cloud KMS refuses larger requests, and the CRC32C
here is pure Python (about 0.25 s per MiB), so an unbounded record would stall the event loop.
This provider's own ciphertexts wrap at most 4 KiB."""


def _crc_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE: Final = _crc_table()


def crc32c(data: bytes) -> int:
    """CRC32C (Castagnoli), as Cloud KMS uses for its integrity fields."""
    crc = 0xFFFFFFFF
    table = _CRC_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _key_of(name: str) -> str:
    return name.split("/cryptoKeyVersions/", 1)[0]


class GcpKmsProvider(KeyProvider):
    """Key provider backed by Google Cloud KMS.

    Args:
        key_name: default ``projects/.../cryptoKeys/K``.
        endpoint: ``host:port`` of the API.
        credentials_file: a service account key file (default: Application Default
            Credentials).
        insecure: plaintext gRPC without credentials, for a local fake only.
        timeout: seconds per call.

    Raises:
        ValueError: for a malformed key name or option.
    """

    name = SCHEME

    def __init__(self, key_name: str | None = None, *, endpoint: str | None = None,
                 credentials_file: str | None = None, insecure: bool = False,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        if key_name is not None and not _KEY.fullmatch(key_name):
            raise ValueError("gcp-kms: the key must be projects/P/locations/L/keyRings/R/"
                             f"cryptoKeys/K, got {key_name!r}")
        self.default_key_id = key_name
        self._endpoint = endpoint or DEFAULT_ENDPOINT
        self._credentials_file = credentials_file
        self._insecure = insecure
        self._timeout = as_timeout(timeout)
        self._client: kms_v1.KeyManagementServiceClient | None = None
        self._client_lock = threading.Lock()
        self._algorithms: dict[str, str] = {}
        query: dict[str, str] = {}
        if endpoint:
            query["endpoint"] = endpoint
        if credentials_file:
            query["credentials_file"] = credentials_file
        if insecure:
            query["insecure"] = "true"
        self.uri = f"{SCHEME}://{key_name or ''}" + (f"?{urlencode(query)}" if query else "")

    @classmethod
    def from_uri(cls, uri: str, **options: Any) -> GcpKmsProvider:
        """Open ``gcp-kms://projects/.../cryptoKeys/K?options`` (see the module docstring).

        Raises:
            ValueError: for a malformed URI or option.
        """
        if not uri.startswith(f"{SCHEME}://"):
            raise ValueError("gcp-kms: URI must be gcp-kms://projects/.../cryptoKeys/K")
        key, _, query = uri[len(SCHEME) + 3:].partition("?")
        opts = collect_options(SCHEME, query, options, allowed=_OPTIONS)
        if "insecure" in opts:
            opts["insecure"] = as_bool(opts["insecure"], "insecure")
        if "timeout" in opts:
            opts["timeout"] = as_timeout(opts["timeout"])
        return cls(key.strip("/") or None, **opts)

    def __repr__(self) -> str:
        return f"GcpKmsProvider({self.uri!r})"

    # -- plumbing ------------------------------------------------------------------------
    def _kms(self) -> kms_v1.KeyManagementServiceClient:
        """The client, made on first use (in a worker thread: finding credentials may do I/O)."""
        with self._client_lock:
            if self._client is None:
                if self._insecure:
                    import grpc  # type: ignore[import-untyped]
                    from google.cloud.kms_v1.services.key_management_service.transports.grpc import (
                        KeyManagementServiceGrpcTransport,
                    )

                    channel = grpc.insecure_channel(self._endpoint)
                    transport = KeyManagementServiceGrpcTransport(host=self._endpoint,
                                                                  channel=channel)
                    self._client = kms_v1.KeyManagementServiceClient(transport=transport)
                else:
                    options: dict[str, Any] = {"api_endpoint": self._endpoint}
                    if self._credentials_file:
                        options["credentials_file"] = self._credentials_file
                    self._client = kms_v1.KeyManagementServiceClient(client_options=options)
            return self._client

    def _translate(self, exc: Exception, op: str) -> KMSError:
        if isinstance(exc, _UNREACHABLE):
            return ProviderConnectionError(f"gcp-kms: cannot reach {self._endpoint} "
                                           f"({type(exc).__name__})")
        if isinstance(exc, auth_exc.GoogleAuthError):
            return ProviderConnectionError("gcp-kms: no usable Google credentials (set "
                                           "GOOGLE_APPLICATION_CREDENTIALS or credentials_file)")
        if isinstance(exc, gexc.NotFound):
            return KeyNotFoundError(f"gcp-kms: key not found ({op})")
        if op == "decrypt" and isinstance(exc, gexc.InvalidArgument | gexc.FailedPrecondition):
            return DecryptionError()
        if op == "sign" and isinstance(exc, gexc.FailedPrecondition):
            return UnsupportedOperation("gcp-kms: the key version cannot sign")
        if isinstance(exc, gexc.PermissionDenied | gexc.Unauthenticated):
            return KMSError(f"gcp-kms: {op} denied (check the IAM bindings)")
        if isinstance(exc, gexc.FailedPrecondition):
            return KMSError(f"gcp-kms: the key is not usable in its current state ({op})")
        if op == "decrypt":
            return DecryptionError()
        if op == "encrypt":
            return EncryptionError(f"gcp-kms: encrypt failed ({type(exc).__name__})")
        return KMSError(f"gcp-kms: {op} failed ({type(exc).__name__})")

    async def _call(self, op: str, method: str, request: Mapping[str, Any]) -> Any:
        def call() -> Any:
            fn: Callable[..., Any] = getattr(self._kms(), method)
            # No library retries: one attempt bounded by the timeout, errors translated here.
            return fn(request=dict(request), timeout=self._timeout, retry=None)

        try:
            return await run_blocking(call, timeout=self._timeout, what=f"gcp-kms {op}")
        except (gexc.GoogleAPIError, auth_exc.GoogleAuthError) as exc:
            raise self._translate(exc, op) from exc

    def _key(self, key_id: str | None) -> str:
        key = self.reference(key_id).key_id
        if not _KEY.fullmatch(key):
            raise ValueError(f"gcp-kms: not a cryptoKey name: {key!r}")
        return key

    # -- KeyProvider ---------------------------------------------------------------------
    async def initialize(self) -> None:
        """Check that the URI's key exists and is an ``ENCRYPT_DECRYPT`` key.

        Raises:
            KeyNotFoundError: when it does not exist.
            UnsupportedOperation: when it is not an encryption key.
            ProviderConnectionError: when Cloud KMS cannot be reached.
        """
        if self.default_key_id is None:
            return
        key = await self._call("initialize", "get_crypto_key", {"name": self.default_key_id})
        if key.purpose != kms_v1.CryptoKey.CryptoKeyPurpose.ENCRYPT_DECRYPT:
            raise UnsupportedOperation("gcp-kms: the key is not an ENCRYPT_DECRYPT key")

    async def encrypt(self, plaintext: bytes, *, key_id: str | None = None,
                      context: Mapping[str, str] | None = None) -> EncryptedData:
        """``Encrypt`` with the context as AAD and CRC32C checks both ways.

        Raises:
            KeyNotFoundError: for an unknown key.
            ProviderConnectionError: when Cloud KMS cannot be reached in time.
            EncryptionError: for other failures, including a failed integrity check.
        """
        check_plaintext(plaintext)
        aad = canonical_context(context)
        key = self._key(key_id)
        request: dict[str, Any] = {"name": key, "plaintext": bytes(plaintext),
                                   "plaintext_crc32c": crc32c(plaintext)}
        if aad:
            request["additional_authenticated_data"] = aad
            request["additional_authenticated_data_crc32c"] = crc32c(aad)
        resp = await self._call("encrypt", "encrypt", request)
        if (not resp.verified_plaintext_crc32c
                or (aad and not resp.verified_additional_authenticated_data_crc32c)
                or resp.ciphertext_crc32c != crc32c(resp.ciphertext)
                or _key_of(resp.name) != key):
            raise EncryptionError("gcp-kms: the encrypt request or response was corrupted in "
                                  "transit; retry")
        return EncryptedData(ciphertext=bytes(resp.ciphertext),
                             key_reference=KeyReference(provider=self.name, key_id=key),
                             algorithm=ALGORITHM, context=dict(context or {}))

    async def decrypt(self, encrypted: EncryptedData, *,
                      context: Mapping[str, str] | None = None) -> bytes:
        """``Decrypt`` with the context as AAD and CRC32C checks both ways.

        Raises:
            DecryptionError: for every cryptographic failure (opaque), including a failed
                integrity check and a ciphertext over :data:`MAX_CIPHERTEXT`.
            KeyNotFoundError: when the referenced key does not exist.
            ProviderConnectionError: when Cloud KMS cannot be reached in time.
        """
        ref = encrypted.key_reference
        if (ref.provider != self.name or not _KEY.fullmatch(ref.key_id)
                or len(encrypted.ciphertext) > MAX_CIPHERTEXT):
            raise DecryptionError()
        _, aad = decrypt_context(encrypted.context, context)
        request: dict[str, Any] = {"name": ref.key_id, "ciphertext": encrypted.ciphertext,
                                   "ciphertext_crc32c": crc32c(encrypted.ciphertext)}
        if aad:
            request["additional_authenticated_data"] = aad
            request["additional_authenticated_data_crc32c"] = crc32c(aad)
        resp = await self._call("decrypt", "decrypt", request)
        if resp.plaintext_crc32c != crc32c(resp.plaintext):
            raise DecryptionError()
        return bytes(resp.plaintext)

    async def _algorithm(self, version: str) -> str:
        if version not in self._algorithms:
            resp = await self._call("sign", "get_crypto_key_version", {"name": version})
            self._algorithms[version] = kms_v1.CryptoKeyVersion.CryptoKeyVersionAlgorithm(
                resp.algorithm).name
        return self._algorithms[version]

    async def sign(self, message: bytes, *, key_id: str | None = None) -> bytes:
        """``AsymmetricSign`` with a ``.../cryptoKeyVersions/N`` of an ``ASYMMETRIC_SIGN`` key.

        The digest (SHA-256/384/512, as the version's algorithm requires) is computed here;
        Ed25519 versions get the message itself. CRC32C is checked both ways.

        Raises:
            UnsupportedOperation: when the key cannot sign.
            ValueError: when ``key_id`` names a signing cryptoKey but no version.
            KeyNotFoundError: for an unknown key.
            ProviderConnectionError: when Cloud KMS cannot be reached in time.
        """
        name = self.reference(key_id).key_id
        if not _VERSION.fullmatch(name):
            if not _KEY.fullmatch(name):
                raise ValueError(f"gcp-kms: not a key name: {name!r}")
            key = await self._call("sign", "get_crypto_key", {"name": name})
            if key.purpose != kms_v1.CryptoKey.CryptoKeyPurpose.ASYMMETRIC_SIGN:
                raise UnsupportedOperation("gcp-kms: the key is not an ASYMMETRIC_SIGN key")
            raise ValueError("gcp-kms: signing needs a .../cryptoKeyVersions/N name")
        algorithm = await self._algorithm(name)
        if "_SIGN_" not in algorithm:
            raise UnsupportedOperation(f"gcp-kms: a {algorithm} key version cannot sign")
        hash_name = next((h for h in ("sha256", "sha384", "sha512") if h.upper() in algorithm),
                         None)
        request: dict[str, Any] = {"name": name}
        if hash_name is None:
            request |= {"data": bytes(message), "data_crc32c": crc32c(message)}
        else:
            digest = hashlib.new(hash_name, message).digest()
            request |= {"digest": {hash_name: digest}, "digest_crc32c": crc32c(digest)}
        resp = await self._call("sign", "asymmetric_sign", request)
        verified = resp.verified_data_crc32c if hash_name is None else resp.verified_digest_crc32c
        if (not verified or resp.signature_crc32c != crc32c(resp.signature)
                or resp.name != name):
            raise KMSError("gcp-kms: the sign request or response was corrupted in transit; "
                           "retry")
        return bytes(resp.signature)

    async def get_rotation_policy(self, key_id: str | None = None) -> RotationPolicy:
        """The cryptoKey's ``rotation_period`` and ``next_rotation_time``.

        Raises:
            KeyNotFoundError: for an unknown key.
            ProviderConnectionError: when Cloud KMS cannot be reached in time.
        """
        key = await self._call("get_rotation_policy", "get_crypto_key",
                               {"name": self._key(key_id)})
        period = key.rotation_period.total_seconds() if key.rotation_period else 0
        next_time = key.next_rotation_time if "next_rotation_time" in key else None
        last = key.primary.create_time if "primary" in key else None
        return RotationPolicy(enabled=period > 0,
                              rotation_period_days=int(period // 86400) if period else None,
                              last_rotation=_utc(last), next_rotation=_utc(next_time))

    async def close(self) -> None:
        """Close the gRPC channel."""
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            client.transport.close()  # type: ignore[no-untyped-call]


def _utc(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return None
