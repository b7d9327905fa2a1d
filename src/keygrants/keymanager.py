"""The application-side KMS: envelope encryption over key providers, with a cached data key.

Modelled on the FraiseQL KMS ``KeyManager`` so its users feel at home. Two paths:

1. **Hot path, no provider call.** :meth:`KeyManager.initialize` asks the default provider for
   one data key (``generate_data_key``: the key in clear plus its wrapped form) and caches it.
   :meth:`~KeyManager.local_encrypt` / :meth:`~KeyManager.local_decrypt` then run AES-256-GCM
   in process, in about a microsecond. Every local ciphertext names its data key by a 16-byte
   id (a hash of the wrapped key), so ciphertext made before :meth:`~KeyManager.rotate_data_key`
   keeps decrypting.
2. **Per-request path, one provider call.** :meth:`~KeyManager.encrypt` makes a fresh data key
   per call (the provider wraps it, bound to the encryption context), encrypts locally and
   stores the wrapped key inside the ciphertext; :meth:`~KeyManager.decrypt` unwraps it (one
   provider call) and decrypts. Data of any size up to 64 MiB, and the provider never sees it.

Field encryption (:meth:`~KeyManager.encrypt_field`) uses the cached data key of the key it is
asked for, so a column value costs no provider call either.

What a second process needs to decrypt local ciphertext: the *wrapped* data key it names (not
secret: only the provider key opens it) and permission to decrypt with the provider key. Give
it the wrapped keys with :meth:`~KeyManager.export_data_keys` /
:meth:`~KeyManager.import_data_keys`, or share a :class:`DataKeyStore` (every new data key is
published there before its first use); :meth:`~KeyManager.local_decrypt_fetching` then unwraps an
unknown data key on demand (one provider call, then cached). :meth:`~KeyManager.local_decrypt`
itself never calls a provider.

The formats are documented in :class:`LocalCiphertext` and :class:`EnvelopeCiphertext`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal, Protocol, TypeVar, runtime_checkable

from keygrants.crypto import KEY_SIZE, NONCE_SIZE, TAG_SIZE, Aead, nonce_bytes
from keygrants.errors import (
    DecryptionError,
    EncryptionError,
    InvalidCiphertext,
    InvalidRequest,
    KeygrantsError,
    KeyNotFoundError,
    KeyRotationError,
    KMSError,
    PayloadTooLarge,
    ProviderConnectionError,
)
from keygrants.keys.context import canonical_context
from keygrants.providers.base import KeyProvider
from keygrants.providers.models import DataKeyPair, EncryptedData, KeyReference, RotationPolicy

__all__ = [
    "DATA_KEY_CONTEXT",
    "DATA_KEY_ID_SIZE",
    "DEFAULT_DATA_KEY_MAX_USES",
    "ENVELOPE_ALGORITHM",
    "ENVELOPE_V1",
    "FIELD_V1",
    "LOCAL_OVERHEAD",
    "LOCAL_V1",
    "MAX_CACHED_DATA_KEYS",
    "MAX_ENVELOPE_PLAINTEXT",
    "MAX_KEY_ID_LENGTH",
    "MAX_LOCAL_PLAINTEXT",
    "MAX_WRAPPED_KEY_SIZE",
    "DataKeyStore",
    "EnvelopeCiphertext",
    "FieldType",
    "KeyManager",
    "LocalCiphertext",
    "MemoryDataKeyStore",
    "SyncKeyManager",
    "data_key_id",
]

log = logging.getLogger("keygrants.keymanager")

T = TypeVar("T")
FieldType = Literal["text", "bytes", "json"]

LOCAL_V1: Final = 0x01
"""First byte of a local ciphertext (:meth:`KeyManager.local_encrypt`)."""
FIELD_V1: Final = 0x02
"""First byte of a field ciphertext (:meth:`KeyManager.encrypt_field`)."""
ENVELOPE_V1: Final = 0x01
"""First byte of a per-request envelope (:meth:`KeyManager.encrypt`)."""
ENVELOPE_ALGORITHM: Final = "KEYGRANTS_ENVELOPE_V1_AES_256_GCM"
"""``EncryptedData.algorithm`` of a per-request envelope."""

DATA_KEY_ID_SIZE: Final = 16
_LOCAL_HEADER: Final = 1 + DATA_KEY_ID_SIZE
_LOCAL_BODY: Final = _LOCAL_HEADER + NONCE_SIZE
LOCAL_OVERHEAD: Final = _LOCAL_BODY + TAG_SIZE  # 45 bytes
MAX_LOCAL_PLAINTEXT: Final = 64 * 1024 * 1024
_LOCAL_MAX: Final = LOCAL_OVERHEAD + MAX_LOCAL_PLAINTEXT
MAX_ENVELOPE_PLAINTEXT: Final = 64 * 1024 * 1024
MAX_WRAPPED_KEY_SIZE: Final = 8192
_MAX_ALGORITHM_NAME: Final = 64
_ENVELOPE_MIN: Final = 1 + 1 + 1 + 2 + 1 + NONCE_SIZE + TAG_SIZE
MAX_KEY_ID_LENGTH: Final = 2048
MAX_CACHED_DATA_KEYS: Final = 256
DEFAULT_DATA_KEY_MAX_USES: Final = 2**32
"""NIST SP 800-38D: at most 2**32 AES-GCM encryptions with random 96-bit nonces per key."""
_MAX_WRAPPED_KNOWN_FACTOR: Final = 16
DATA_KEY_CONTEXT: Final[Mapping[str, str]] = {"purpose": "keygrants-data-key"}
"""Encryption context every cached data key is wrapped under (visible in provider audit logs)."""
_DATA_KEY_ID_LABEL: Final = b"keygrants data key id v1\x00"
_SEAL_CONTEXT_KEY: Final = "keygrants-seal"  # a server root key wrapped by ProviderSeal


def _reserved(context: Mapping[str, str]) -> bool:
    """Whether ``context`` is one the provider's secrets of this project are wrapped under: a
    cached data key, or a server root key. :meth:`KeyManager.decrypt` must never open those
    (a wrapped data key is not secret: copied into a record, it would come back in clear)."""
    return context.get("purpose") == DATA_KEY_CONTEXT["purpose"] or _SEAL_CONTEXT_KEY in context

_FIELD_TAGS: Final[dict[str, int]] = {"text": 0x01, "bytes": 0x02, "json": 0x03}
_FIELD_NAMES: Final[dict[int, str]] = {v: k for k, v in _FIELD_TAGS.items()}
_NOT_INITIALIZED: Final = "the KeyManager has no data key yet; await initialize() at start-up"


# -- formats ------------------------------------------------------------------------------------

def data_key_id(wrapped: EncryptedData) -> bytes:
    """The 16-byte id of a wrapped data key: a truncated SHA-256 of its stable parts.

    ``SHA-256("keygrants data key id v1" 0x00 || lp(provider) || lp(key id) || lp(algorithm)
    || lp(canonical context) || lp(wrapped ciphertext))[:16]``, where ``lp(x)`` is ``x``
    prefixed by its length as uint32 BE. Timestamps are left out, so the id survives any
    serialization of the wrapped key. Anyone holding the wrapped key can recompute it, so an
    imported key is checked against the id it claims.
    """
    h = hashlib.sha256(_DATA_KEY_ID_LABEL)
    ref = wrapped.key_reference
    for part in (ref.provider.encode(), ref.key_id.encode(), wrapped.algorithm.encode(),
                 canonical_context(wrapped.context), wrapped.ciphertext):
        h.update(len(part).to_bytes(4, "big"))
        h.update(part)
    return h.digest()[:DATA_KEY_ID_SIZE]


@dataclass(frozen=True, slots=True)
class LocalCiphertext:
    """A parsed local (or field) ciphertext; nothing is verified by parsing.

    Byte layout (``local_encrypt``: first byte 0x01; ``encrypt_field``: 0x02)::

        offset  size  field
        0       1     format: 0x01 local v1, 0x02 field v1
        1       16    data key id (see :func:`data_key_id`)
        17      12    AES-GCM nonce (96 bits, random)
        29      n+16  AES-256-GCM ciphertext || tag

        AAD (local) = RFC 8785 canonical context (empty context = no AAD)
        AAD (field) = 0x02 || RFC 8785 canonical context

    45 bytes of overhead. The data key id names the wrapped data key, which
    :class:`KeyManager` caches, exports and fetches on demand. The header is bound without
    being copied into the AAD (that copy would cost the hot path ~10%): the id *selects* the
    key, and ids are 128-bit hashes of distinct wrapped keys, so a changed id selects no key
    or another one and the tag check fails; a changed format byte is refused, or (0x01 <->
    0x02) meets the other AAD, which starts with 0x02 on one side only (a canonical context
    starts with ``{``), and fails. A field
    plaintext starts with one type byte (0x01 text as UTF-8, 0x02 bytes, 0x03 JSON), hidden
    under the encryption. Every failure to decrypt raises one
    :class:`~keygrants.errors.DecryptionError`.
    """

    format: int
    data_key_id: bytes
    nonce: bytes
    body: bytes

    @classmethod
    def from_bytes(cls, data: bytes) -> LocalCiphertext:
        """Parse; anything that cannot be a local or field ciphertext raises DecryptionError."""
        if (not isinstance(data, bytes) or len(data) < LOCAL_OVERHEAD
                or len(data) > _LOCAL_MAX
                or data[0] not in (LOCAL_V1, FIELD_V1)):
            raise DecryptionError()
        return cls(data[0], data[1:_LOCAL_HEADER], data[_LOCAL_HEADER:_LOCAL_BODY],
                   data[_LOCAL_BODY:])

    @property
    def header(self) -> bytes:
        """The 17 bytes before the nonce: format byte and data key id."""
        return bytes([self.format]) + self.data_key_id


    def to_bytes(self) -> bytes:
        """Serialize."""
        return self.header + self.nonce + self.body


@dataclass(frozen=True, slots=True)
class EnvelopeCiphertext:
    """A parsed per-request envelope (``EncryptedData.ciphertext`` of :meth:`KeyManager.encrypt`).

    Byte layout::

        offset   size  field
        0        1     format version, 0x01
        1        1     A: length of the provider's algorithm name (1..64)
        2        A     the provider's algorithm name for the wrapped key (ASCII)
        2+A      2     W: length of the wrapped data key (uint16 BE, 1..8192)
        4+A      W     the wrapped data key: the provider's ciphertext of a fresh 32-byte key
        4+A+W    12    AES-GCM nonce
        16+A+W   n+16  AES-256-GCM ciphertext || tag under the data key

        header = bytes [0, 4+A+W); AAD = header || RFC 8785 canonical context

    The provider wrapped the data key under the same encryption context, so the context is
    checked twice: by the provider on unwrap and by the AEAD. ``EncryptedData.key_reference``
    names the provider key and ``EncryptedData.context`` records the context.
    """

    algorithm: str
    wrapped_key: bytes
    header: bytes
    nonce: bytes
    body: bytes

    @classmethod
    def from_bytes(cls, data: bytes) -> EnvelopeCiphertext:
        """Parse; anything that cannot be an envelope raises DecryptionError."""
        if (not isinstance(data, bytes) or len(data) < _ENVELOPE_MIN or data[0] != ENVELOPE_V1
                or len(data) > _ENVELOPE_MIN + _MAX_ALGORITHM_NAME + MAX_WRAPPED_KEY_SIZE
                + MAX_ENVELOPE_PLAINTEXT):
            raise DecryptionError()
        alen = data[1]
        if not 1 <= alen <= _MAX_ALGORITHM_NAME:
            raise DecryptionError()
        try:
            algorithm = data[2:2 + alen].decode("ascii")
        except UnicodeDecodeError:
            raise DecryptionError() from None
        off = 2 + alen
        wlen = int.from_bytes(data[off:off + 2], "big")
        off += 2
        if not 1 <= wlen <= MAX_WRAPPED_KEY_SIZE or len(data) < off + wlen + NONCE_SIZE + TAG_SIZE:
            raise DecryptionError()
        wrapped = data[off:off + wlen]
        off += wlen
        return cls(algorithm, wrapped, data[:off], data[off:off + NONCE_SIZE],
                   data[off + NONCE_SIZE:])

    @staticmethod
    def build_header(algorithm: str, wrapped_key: bytes) -> bytes:
        """The header bytes for a wrapped key.

        Raises:
            EncryptionError: if the provider's algorithm name or wrapped key is out of bounds.
        """
        try:
            alg = algorithm.encode("ascii")
        except UnicodeEncodeError:
            raise EncryptionError("the provider returned a non-ASCII algorithm name") from None
        if not 1 <= len(alg) <= _MAX_ALGORITHM_NAME:
            raise EncryptionError("the provider's algorithm name is too long")
        if not 1 <= len(wrapped_key) <= MAX_WRAPPED_KEY_SIZE:
            raise EncryptionError(f"the wrapped data key exceeds {MAX_WRAPPED_KEY_SIZE} bytes")
        return (bytes([ENVELOPE_V1, len(alg)]) + alg + len(wrapped_key).to_bytes(2, "big")
                + wrapped_key)


# -- wrapped data key sharing -------------------------------------------------------------------

@runtime_checkable
class DataKeyStore(Protocol):
    """Where wrapped data keys are published so other processes can decrypt (a DB table, a
    Redis hash, ...). Values are wrapped keys only: no secret is ever stored."""

    async def put(self, data_key_id: str, wrapped: EncryptedData) -> None:
        """Store ``wrapped`` under its hex id (idempotent)."""

    async def get(self, data_key_id: str) -> EncryptedData | None:
        """The wrapped key with this hex id, or ``None``."""


class MemoryDataKeyStore:
    """An in-process :class:`DataKeyStore` (tests, or several KeyManagers in one process)."""

    def __init__(self) -> None:
        self._items: dict[str, EncryptedData] = {}

    async def put(self, data_key_id: str, wrapped: EncryptedData) -> None:
        """Store ``wrapped``."""
        self._items[data_key_id] = wrapped

    async def get(self, data_key_id: str) -> EncryptedData | None:
        """Look up a wrapped key."""
        return self._items.get(data_key_id)

    def __len__(self) -> int:
        return len(self._items)


# -- the manager --------------------------------------------------------------------------------

class _DataKey:
    """A data key in memory: its AEAD, id, wrapped form and usage count."""

    __slots__ = ("aead", "created_at", "hard_limit", "id", "local_header", "open_raw", "seal_raw",
                 "slot", "soft_limit", "uses", "wrapped")

    def __init__(self, plaintext_key: bytes, wrapped: EncryptedData, created_at: datetime,
                 max_uses: int, slot: tuple[str, str | None] | None) -> None:
        if len(plaintext_key) != KEY_SIZE:
            raise KMSError("the provider returned a data key of the wrong size")
        self.aead = Aead("aes-256-gcm", plaintext_key)
        # The hot path skips the wrapper's own argument checks (local_encrypt/local_decrypt
        # make the nonce and check lengths themselves): ~150 ns of a ~1 µs call. Everything
        # else goes through self.aead.
        self.seal_raw, self.open_raw = self.aead.unchecked()
        self.wrapped = wrapped
        self.id = data_key_id(wrapped)
        self.local_header = bytes([LOCAL_V1]) + self.id
        self.created_at = created_at
        self.uses = 0
        self.hard_limit = max_uses
        self.soft_limit = max(1, max_uses // 2)
        self.slot = slot


if (_LOCAL_HEADER, _LOCAL_BODY, _LOCAL_MAX) != (17, 29, 67108909):  # pragma: no cover
    raise RuntimeError("KeyManager.local_decrypt spells these sizes as literals: update it")

_CONTEXT_CACHE_SIZE: Final = 4096
_context_cache: dict[tuple[tuple[str, str], ...], bytes] = {}


def _canonical(context: Mapping[str, str]) -> bytes:
    """canonical_context with a bounded memo: RFC 8785 costs ~7 µs, a lookup ~0.3 µs."""
    try:
        key = tuple(context.items())
        return _context_cache[key]
    except KeyError:
        pass
    except (TypeError, AttributeError):  # unhashable values or not a mapping: let it explain
        return canonical_context(context)
    data = canonical_context(context)
    if len(_context_cache) >= _CONTEXT_CACHE_SIZE:
        _context_cache.clear()
    _context_cache[key] = data
    return data


def _aad(fmt: int, context: Mapping[str, str] | None) -> bytes:
    """The AAD of a local (0x01) or field (0x02) ciphertext."""
    if fmt == LOCAL_V1:
        return _canonical(context) if context else b""
    return bytes([fmt]) + (_canonical(context) if context else b"")


def _check_key_id(key_id: str | None) -> None:
    if key_id is not None and (not isinstance(key_id, str) or not 1 <= len(key_id) <= MAX_KEY_ID_LENGTH):
        raise ValueError(f"key_id must be a string of 1..{MAX_KEY_ID_LENGTH} characters")


def _encode_field(value: Any, field_type: str) -> bytes:
    tag = _FIELD_TAGS.get(field_type)
    if tag is None:
        raise ValueError(f"field_type must be one of {', '.join(_FIELD_TAGS)}, got {field_type!r}")
    if field_type == "text":
        if not isinstance(value, str):
            raise TypeError("a text field takes a str")
        data = value.encode("utf-8")
    elif field_type == "bytes":
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise TypeError("a bytes field takes bytes")
        data = bytes(value)
    else:
        try:
            data = json.dumps(value, ensure_ascii=False, allow_nan=False,
                              separators=(",", ":")).encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise TypeError(f"a json field takes a JSON-serializable value: {exc}") from None
    if len(data) >= MAX_LOCAL_PLAINTEXT:
        raise PayloadTooLarge(f"a field is at most {MAX_LOCAL_PLAINTEXT - 1} bytes")
    return bytes([tag]) + data


def _decode_field(payload: bytes, field_type: str | None) -> Any:
    if not payload:
        raise DecryptionError()
    name = _FIELD_NAMES.get(payload[0])
    if name is None or (field_type is not None and field_type != name):
        raise DecryptionError()
    data = payload[1:]
    try:
        if name == "text":
            return data.decode("utf-8")
        if name == "bytes":
            return data
        return json.loads(data)
    except ValueError:
        raise DecryptionError() from None


class KeyManager:
    """Envelope encryption over key providers, with a cached data key for the hot path.

    Args:
        providers: ``{name: KeyProvider}``; ``name`` is how callers pick one (``provider=``).
        default_provider: the provider used when none is named (may be omitted with exactly
            one provider).
        default_key_id: the provider key used when none is named (``None``: the key in the
            default provider's URI).
        initialization_timeout: seconds :meth:`initialize` may take (provider start-up and
            the data key); beyond it, :class:`~keygrants.errors.ProviderConnectionError`.
        operation_timeout: seconds any later provider call may take (``None``: no limit).
        rotation_period: how long a cached data key is used before :meth:`rotate_if_due`
            rotates it (``None``: only on demand or at the usage limit).
        data_key_store: where new wrapped data keys are published and unknown ones looked up.
        max_cached_data_keys: unwrapped data keys kept in memory (current keys always are).
        data_key_max_uses: local encryptions per data key; at half of it a rotation starts in
            the background, at the limit :meth:`local_encrypt` refuses. The count is exact
            under asyncio and approximate (never more than a few off) across threads.
        clock: returns the current time (UTC); for tests.
        rng: returns ``n`` random bytes (nonces); for tests. Never pass a non-random source
            in production: a repeated nonce breaks AES-GCM.

    Raises:
        ValueError: for an invalid configuration.
        TypeError: if a provider is not a :class:`~keygrants.providers.KeyProvider`.
    """

    def __init__(
        self,
        providers: Mapping[str, KeyProvider],
        default_provider: str | None = None,
        default_key_id: str | None = None,
        *,
        initialization_timeout: float = 10.0,
        operation_timeout: float | None = 30.0,
        rotation_period: timedelta | None = None,
        data_key_store: DataKeyStore | None = None,
        max_cached_data_keys: int = MAX_CACHED_DATA_KEYS,
        data_key_max_uses: int = DEFAULT_DATA_KEY_MAX_USES,
        clock: Callable[[], datetime] | None = None,
        rng: Callable[[int], bytes] | None = None,
    ) -> None:
        if not providers:
            raise ValueError("KeyManager needs at least one provider")
        for name, prov in providers.items():
            if not isinstance(name, str) or not name:
                raise ValueError("provider names must be non-empty strings")
            if not isinstance(prov, KeyProvider):
                raise TypeError(f"provider {name!r} is not a KeyProvider")
        if default_provider is None:
            if len(providers) != 1:
                raise ValueError("default_provider is required with several providers")
            default_provider = next(iter(providers))
        if default_provider not in providers:
            raise ValueError(f"default provider {default_provider!r} is not among the providers "
                             f"({', '.join(sorted(providers))})")
        _check_key_id(default_key_id)
        for label, value in (("initialization_timeout", initialization_timeout),
                             ("operation_timeout", operation_timeout)):
            if value is not None and (not math.isfinite(value) or value <= 0):
                raise ValueError(f"{label} must be a positive number of seconds")
        if rotation_period is not None and rotation_period <= timedelta(0):
            raise ValueError("rotation_period must be positive")
        if not 1 <= max_cached_data_keys <= 1_000_000:
            raise ValueError("max_cached_data_keys must be 1..1000000")
        if not 2 <= data_key_max_uses <= DEFAULT_DATA_KEY_MAX_USES:
            raise ValueError(f"data_key_max_uses must be 2..{DEFAULT_DATA_KEY_MAX_USES}")
        self._providers = dict(providers)
        self._default_provider = default_provider
        self._default_key_id = default_key_id
        self._init_timeout = initialization_timeout
        self._op_timeout = operation_timeout
        self._rotation_period = rotation_period
        self._store = data_key_store
        self._max_cached = max_cached_data_keys
        self._max_uses = data_key_max_uses
        self._clock = clock or (lambda: datetime.now(UTC))
        self._rng = rng or nonce_bytes
        # The hot path reads self._current once; rotation swaps it in one assignment.
        self._current: _DataKey | None = None
        self._slots: dict[tuple[str, str | None], _DataKey] = {}
        self._cache: dict[bytes, _DataKey] = {}
        self._wrapped_known: dict[bytes, EncryptedData] = {}
        # Guards every write to _slots, _cache and _wrapped_known, and export's snapshot of
        # them: SyncKeyManager runs export/import in application threads while its loop thread
        # unwraps and rotates. Single reads (the hot path's .get) need no lock.
        self._maps_lock = threading.Lock()
        self._unwrapping: dict[bytes, asyncio.Future[_DataKey]] = {}
        self._lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rotation_task: asyncio.Task[None] | None = None

    @classmethod
    def from_uri(cls, uri: str, *, key_id: str | None = None,
                 provider_options: Mapping[str, Any] | None = None, **options: Any) -> KeyManager:
        """A KeyManager over one provider opened with :func:`~keygrants.providers.open_provider`.

        Args:
            uri: the provider URI (``local:///etc/app/kek``, ``aws-kms://...``).
            key_id: the default key id (``None``: the URI's).
            provider_options: keyword options for the provider.
            **options: the KeyManager's keyword options.
        """
        from keygrants.providers import open_provider

        provider = open_provider(uri, **dict(provider_options or {}))
        return cls({provider.name: provider}, provider.name, key_id, **options)

    def __repr__(self) -> str:
        return (f"KeyManager(default_provider={self._default_provider!r}, "
                f"providers={sorted(self._providers)!r}, initialized={self.is_initialized}, "
                f"cached_data_keys={len(self._cache)})")

    # -- state ---------------------------------------------------------------------------------

    @property
    def is_initialized(self) -> bool:
        """Whether a data key is cached for the hot path."""
        return self._current is not None

    @property
    def current_data_key_id(self) -> str | None:
        """Hex id of the data key new local ciphertext is made with."""
        return None if self._current is None else self._current.id.hex()

    @property
    def providers(self) -> Mapping[str, KeyProvider]:
        """The providers by name."""
        return dict(self._providers)

    def get_provider(self, name: str | None = None) -> KeyProvider:
        """A provider by name (``None``: the default).

        Raises:
            KeyNotFoundError: for an unknown name.
        """
        return self._provider(name)[1]

    def _provider(self, name: str | None) -> tuple[str, KeyProvider]:
        name = name or self._default_provider
        prov = self._providers.get(name)
        if prov is None:
            raise KeyNotFoundError(f"no provider named {name!r} in this KeyManager")
        return name, prov

    def _provider_for(self, ref: KeyReference) -> KeyProvider:
        """The provider that made ``ref``, asked of each provider of the record's kind.

        A provider that holds the referenced key (:meth:`KeyProvider.holds_key`: the key of its
        URI, as it records it) wins over one that merely could (a key of its kind named per
        call); one that certainly cannot (another region, another key file) is never used.
        A tie goes to the default provider. A provider registered under the record's
        provider name is used for a kind that no provider has.

        Raises:
            KeyNotFoundError: when no provider of this manager can hold the key, or several
                can and none of them is the default.
        """
        candidates = {n: p for n, p in self._providers.items() if p.name == ref.provider}
        if not candidates and ref.provider in self._providers:
            return self._providers[ref.provider]
        if not candidates:
            raise KeyNotFoundError(f"no {ref.provider!r} provider in this KeyManager holds key "
                                   f"{ref.key_id!r}")
        verdicts = {n: p.holds_key(ref) for n, p in candidates.items()}
        for verdict in (True, None):
            names = [n for n, v in verdicts.items() if v is verdict]
            if len(names) == 1:
                return candidates[names[0]]
            if self._default_provider in names:
                return candidates[self._default_provider]
            if names:
                raise KeyNotFoundError(
                    f"providers {', '.join(sorted(names))} could each hold {ref.provider!r} key "
                    f"{ref.key_id!r}; make the one that made it the default provider")
        raise KeyNotFoundError(
            f"no provider in this KeyManager holds {ref.provider!r} key {ref.key_id!r} (its "
            f"{ref.provider!r} providers, {', '.join(sorted(candidates))}, hold other keys or "
            "regions)")

    def _key_for(self, name: str, key_id: str | None) -> str | None:
        _check_key_id(key_id)
        if key_id is None and name == self._default_provider:
            return self._default_key_id
        return key_id

    async def _call(self, aw: Awaitable[T], timeout: float | None = None) -> T:
        """Await a provider call under the operation timeout."""
        limit = self._op_timeout if timeout is None else timeout
        try:
            return await asyncio.wait_for(aw, limit)
        except TimeoutError:
            raise ProviderConnectionError(f"the key provider did not answer within {limit:g} s") from None
        except (KeygrantsError, ValueError, TypeError):
            raise
        except OSError as exc:
            raise ProviderConnectionError(f"key provider unreachable: {type(exc).__name__}") from exc

    # -- start-up and rotation -------------------------------------------------------------------

    async def initialize(self) -> None:
        """Start the providers and cache a data key from the default provider.

        Calls each provider's ``initialize()`` hook (connect; a no-op for some) and then makes
        exactly one key operation, ``generate_data_key`` on the default provider key. Calling
        it again does nothing. The whole start-up is bounded by ``initialization_timeout``.

        Raises:
            ProviderConnectionError: if the providers do not start in time or are unreachable.
            KMSError: any other provider failure (e.g. ``KeyNotFoundError``).
        """
        if self._current is not None:
            return
        async with self._lock:
            if self._current is not None:
                return
            try:
                await asyncio.wait_for(self._start(), self._init_timeout)
            except TimeoutError:
                raise ProviderConnectionError(
                    f"key providers did not initialize within {self._init_timeout:g} s") from None

    async def _start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await asyncio.gather(*(self._call(p.initialize(), self._init_timeout)
                               for p in self._providers.values()))
        key_id = self._key_for(self._default_provider, None)
        dk = await self._new_data_key(self._default_provider, key_id, self._init_timeout)
        self._install(dk)

    async def _new_data_key(self, name: str, key_id: str | None,
                            timeout: float | None = None) -> _DataKey:
        prov = self._providers[name]
        pair = await self._call(prov.generate_data_key(key_id=key_id, key_spec="AES_256",
                                                       context=dict(DATA_KEY_CONTEXT)), timeout)
        dk = _DataKey(pair.plaintext_key, pair.encrypted_key, self._clock(), self._max_uses,
                      (name, key_id))
        if self._store is not None:
            # Published before first use: any ciphertext that exists names a findable key.
            try:
                await self._call(self._store.put(dk.id.hex(), dk.wrapped), timeout)
            except KeygrantsError:
                raise
            except Exception as exc:
                raise KMSError("could not publish the wrapped data key to the data key "
                               f"store ({type(exc).__name__})") from exc
        return dk

    def _install(self, dk: _DataKey) -> None:
        """Make ``dk`` current for its slot (cached first, so decrypt never misses it)."""
        self._remember(dk)
        assert dk.slot is not None
        with self._maps_lock:
            self._slots[dk.slot] = dk
        if dk.slot == (self._default_provider, self._key_for(self._default_provider, None)):
            self._current = dk

    def _remember(self, dk: _DataKey) -> None:
        with self._maps_lock:
            self._cache[dk.id] = dk
            self._wrapped_known.pop(dk.id, None)
            if len(self._cache) > self._max_cached:
                pinned = {s.id for s in self._slots.values()} | {dk.id}
                for old in list(self._cache):
                    if len(self._cache) <= self._max_cached:
                        break
                    if old not in pinned:
                        # Keep the wrapped form: the key can be unwrapped again on demand.
                        self._note_wrapped(old, self._cache.pop(old).wrapped)

    def _note_wrapped(self, dk_id: bytes, wrapped: EncryptedData) -> None:
        """Remember a wrapped key, dropping the oldest beyond the limit (``_maps_lock`` held)."""
        self._wrapped_known[dk_id] = wrapped
        limit = self._max_cached * _MAX_WRAPPED_KNOWN_FACTOR
        while len(self._wrapped_known) > limit:
            del self._wrapped_known[next(iter(self._wrapped_known))]

    async def rotate_data_key(self) -> str:
        """Replace every cached current data key with a fresh one (one provider call each).

        Safe to call from a scheduler and concurrently with encryptions: the new key is
        obtained (and published to the data key store) first, then swapped in with one
        assignment. Earlier keys stay cached, so earlier ciphertext keeps decrypting.
        Concurrent calls are serialized. Without a data key yet, this initializes.

        Returns:
            The hex id of the new default data key.

        Raises:
            KeyRotationError: if a new data key cannot be obtained (the old ones stay current).
        """
        if self._current is None:
            await self.initialize()
            assert self._current is not None
            return self._current.id.hex()
        async with self._lock:
            try:
                fresh = [await self._new_data_key(name, key_id) for name, key_id in list(self._slots)]
            except KeygrantsError as exc:
                raise KeyRotationError(f"data key rotation failed: {exc.message} ({exc.code})") from exc
            for dk in fresh:
                self._install(dk)
            log.info("data key rotated: now %s", self.current_data_key_id)
            assert self._current is not None
            return self._current.id.hex()

    async def rotate_if_due(self) -> bool:
        """Rotate when the rotation period has passed or half the usage limit is spent.

        For schedulers: ``while True: await km.rotate_if_due(); await asyncio.sleep(60)``.

        Returns:
            Whether a rotation happened.
        """
        dk = self._current
        if dk is None:
            return False
        due = dk.uses >= dk.soft_limit
        if self._rotation_period is not None:
            due |= self._clock() >= dk.created_at + self._rotation_period
        if due:
            await self.rotate_data_key()
        return due

    def get_rotation_policy(self) -> RotationPolicy:
        """How the cached data key rotates.

        ``rotation_period_days`` is the configured period rounded up to whole days (the model
        counts days); ``next_rotation`` is exact.
        """
        period = self._rotation_period
        dk = self._current
        last = dk.created_at if dk is not None else None
        return RotationPolicy(
            enabled=period is not None,
            rotation_period_days=None if period is None else max(1, math.ceil(period / timedelta(days=1))),
            last_rotation=last,
            next_rotation=None if period is None or last is None else last + period)

    async def get_provider_rotation_policy(self, key_id: str | None = None, *,
                                           provider: str | None = None) -> RotationPolicy:
        """The provider key's own rotation policy, as the provider reports it."""
        name, prov = self._provider(provider)
        return await self._call(prov.get_rotation_policy(self._key_for(name, key_id)))

    def _usage_limit(self, dk: _DataKey) -> None:
        """Called on the hot path once half of a data key's uses are spent."""
        if dk.uses > dk.hard_limit:
            raise EncryptionError("the data key reached its usage limit; await rotate_data_key()")
        self._schedule_rotation()

    def _schedule_rotation(self) -> None:
        if self._rotation_task is not None and not self._rotation_task.done():
            return
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._spawn_rotation()
        else:
            loop.call_soon_threadsafe(self._spawn_rotation)

    def _spawn_rotation(self) -> None:
        if self._rotation_task is None or self._rotation_task.done():
            self._rotation_task = asyncio.get_running_loop().create_task(self._background_rotation())

    async def _background_rotation(self) -> None:
        try:
            await self.rotate_data_key()
        except KMSError as exc:
            log.warning("background data key rotation failed (%s); will retry on next use",
                        exc.code)

    # -- hot path ----------------------------------------------------------------------------------

    def local_encrypt(self, plaintext: bytes, *, context: Mapping[str, str] | None = None) -> bytes:
        """Encrypt with the cached data key; no provider call (see :class:`LocalCiphertext`).

        Args:
            plaintext: at most 64 MiB.
            context: bound as AAD; decrypt needs the same map.

        Raises:
            EncryptionError: before :meth:`initialize`, or at the data key's usage limit.
            PayloadTooLarge: above 64 MiB.
            InvalidRequest: for an invalid context.
        """
        dk = self._current
        if dk is None:
            raise EncryptionError(_NOT_INITIALIZED)
        if len(plaintext) > MAX_LOCAL_PLAINTEXT:
            raise PayloadTooLarge(f"local_encrypt takes at most {MAX_LOCAL_PLAINTEXT} bytes")
        dk.uses += 1
        if dk.uses >= dk.soft_limit:
            self._usage_limit(dk)
        nonce = self._rng(NONCE_SIZE)
        return dk.local_header + nonce + dk.seal_raw(
            nonce, plaintext, _canonical(context) if context else None)

    def local_decrypt(self, ciphertext: bytes, *, context: Mapping[str, str] | None = None) -> bytes:
        """Decrypt a :meth:`local_encrypt` ciphertext with a cached data key; no provider call.

        A ciphertext whose data key is not in memory fails like any other bad ciphertext; use
        :meth:`local_decrypt_fetching` to fetch it on demand.

        Raises:
            DecryptionError: for every failure (opaque).
        """
        dk = self._current
        try:
            # The common case (the current data key) costs one prefix check; too short an
            # input fails in the AEAD (no tag), too long one is refused on the slow path.
            # literals (_LOCAL_HEADER = 17, _LOCAL_BODY = 29, _LOCAL_MAX = 67108909, pinned
            # below the class): five global lookups are a tenth of this call
            if dk is None or ciphertext[:17] != dk.local_header or len(ciphertext) > 67108909:
                dk = self._local_key(ciphertext)
            return dk.open_raw(ciphertext[17:29], ciphertext[29:],
                               None if not context else _canonical(context))
        except Exception:  # InvalidTag, a malformed input, an unknown key: one opaque failure
            raise DecryptionError() from None

    def _local_key(self, ciphertext: bytes) -> _DataKey:
        """The cached data key a local ciphertext names (the slow path of local_decrypt)."""
        if not LOCAL_OVERHEAD <= len(ciphertext) <= _LOCAL_MAX or ciphertext[0] != LOCAL_V1:
            raise DecryptionError()
        dk = self._cache.get(bytes(ciphertext[1:_LOCAL_HEADER]))
        if dk is None:
            raise DecryptionError()
        return dk

    @staticmethod
    def _seal(dk: _DataKey, fmt: int, plaintext: bytes, context: Mapping[str, str] | None,
              nonce: bytes) -> bytes:
        return bytes([fmt]) + dk.id + nonce + dk.aead.seal(nonce, plaintext, _aad(fmt, context))

    def _open(self, ct: LocalCiphertext, context: Mapping[str, str] | None) -> bytes:
        dk = self._cache.get(ct.data_key_id)
        if dk is None:
            raise DecryptionError()
        try:
            return dk.aead.open(ct.nonce, ct.body, _aad(ct.format, context))
        except InvalidCiphertext:
            raise DecryptionError() from None

    # -- data keys across processes -------------------------------------------------------------

    @staticmethod
    def data_key_id_of(ciphertext: bytes) -> str:
        """The hex id of the data key a local or field ciphertext names (not verified).

        Raises:
            DecryptionError: if it is not a local or field ciphertext.
        """
        return LocalCiphertext.from_bytes(ciphertext).data_key_id.hex()

    def has_data_key(self, data_key_id: str) -> bool:
        """Whether the data key with this hex id is unwrapped in memory."""
        try:
            return bytes.fromhex(data_key_id) in self._cache
        except ValueError:
            return False

    def export_data_keys(self) -> list[dict[str, Any]]:
        """Every wrapped data key this manager knows, current ones first, JSON-safe.

        Holds no secret: a wrapped key opens only through its provider key. Give the list to
        :meth:`import_data_keys` in another process so it can decrypt this one's ciphertext.
        """
        with self._maps_lock:
            current = {dk.id: dk.wrapped for dk in self._slots.values()}
            cached = [(i, dk.wrapped) for i, dk in self._cache.items() if i not in current]
            known = list(self._wrapped_known.items())
        return [{"id": i.hex(), "wrapped_key": w.to_dict()}
                for i, w in [*current.items(), *cached, *known]]

    def import_data_keys(self, entries: Iterable[Mapping[str, Any]]) -> int:
        """Learn wrapped data keys (from :meth:`export_data_keys`); no provider call.

        They are unwrapped on demand by :meth:`local_decrypt_fetching` and :meth:`decrypt_field`,
        or at once by :meth:`load_data_key`.

        Returns:
            How many were new.

        Raises:
            ValueError: for a malformed entry or one whose id does not match its wrapped key.
        """
        new = 0
        limit = self._max_cached * _MAX_WRAPPED_KNOWN_FACTOR
        for n, entry in enumerate(entries):
            if n >= limit:
                raise ValueError(f"at most {limit} data keys can be imported")
            try:
                wrapped = EncryptedData.from_dict(dict(entry["wrapped_key"]))
            except (KeyError, TypeError) as exc:
                raise ValueError(f"not an exported data key: {exc!r}") from None
            if len(wrapped.ciphertext) > MAX_WRAPPED_KEY_SIZE:
                raise ValueError("wrapped data key too large")
            dk_id = data_key_id(wrapped)
            claimed = entry.get("id")
            if claimed is not None and claimed != dk_id.hex():
                raise ValueError("data key id does not match its wrapped key")
            with self._maps_lock:
                if dk_id not in self._cache and dk_id not in self._wrapped_known:
                    self._note_wrapped(dk_id, wrapped)
                    new += 1
        return new

    async def load_data_key(self, wrapped: EncryptedData) -> str:
        """Unwrap a data key now (one provider call unless cached) and cache it.

        Returns:
            Its hex id.

        Raises:
            DecryptionError: if the provider does not open it as a KeyManager data key.
        """
        if len(wrapped.ciphertext) > MAX_WRAPPED_KEY_SIZE:
            raise DecryptionError()
        dk_id = data_key_id(wrapped)
        await self._unwrap(dk_id, wrapped)
        return dk_id.hex()

    async def _ensure(self, dk_id: bytes) -> _DataKey | None:
        dk = self._cache.get(dk_id)
        if dk is not None:
            return dk
        wrapped = self._wrapped_known.get(dk_id)
        if wrapped is None and self._store is not None:
            wrapped = await self._call(self._store.get(dk_id.hex()))
            if wrapped is not None and data_key_id(wrapped) != dk_id:
                log.warning("data key store returned a wrapped key under another id; ignored")
                wrapped = None
        if wrapped is None:
            return None
        return await self._unwrap(dk_id, wrapped)

    async def _unwrap(self, dk_id: bytes, wrapped: EncryptedData) -> _DataKey:
        dk = self._cache.get(dk_id)
        if dk is not None:
            return dk
        pending = self._unwrapping.get(dk_id)
        if pending is not None:  # another task is unwrapping this key: share its result
            return await asyncio.shield(pending)
        fut: asyncio.Future[_DataKey] = asyncio.get_running_loop().create_future()
        self._unwrapping[dk_id] = fut
        try:
            prov = self._provider_for(wrapped.key_reference)
            # The purpose context is imposed, not read from the record: only keys wrapped as
            # KeyManager data keys open here, never another secret under the same provider key.
            plaintext = await self._call(prov.decrypt(wrapped, context=dict(DATA_KEY_CONTEXT)))
            if len(plaintext) != KEY_SIZE:
                raise DecryptionError()
            dk = _DataKey(plaintext, wrapped, self._clock(), self._max_uses, None)
            self._remember(dk)
            fut.set_result(dk)
            return dk
        except asyncio.CancelledError:
            fut.cancel()
            raise
        except Exception as exc:
            fut.set_exception(exc)
            fut.exception()  # mark retrieved: waiters re-raise it, nobody else needs to
            raise
        finally:
            del self._unwrapping[dk_id]

    async def local_decrypt_fetching(self, ciphertext: bytes, *,
                                  context: Mapping[str, str] | None = None) -> bytes:
        """:meth:`local_decrypt`, fetching an unknown data key on demand.

        An unknown data key is looked up among imported wrapped keys, then in the data key
        store, and unwrapped through its provider (one call; then cached).

        Raises:
            DecryptionError: for every failure to decrypt, including an unknown data key.
            KeyNotFoundError: if a known data key was wrapped by a key no provider of this
                manager holds.
            ProviderConnectionError: if the provider cannot be reached to unwrap it.
        """
        ct = LocalCiphertext.from_bytes(ciphertext)
        if ct.format != LOCAL_V1:
            raise DecryptionError()
        await self._ensure(ct.data_key_id)
        return self._open(ct, context)

    # -- per-request path ------------------------------------------------------------------------

    async def encrypt(self, plaintext: bytes, *, key_id: str | None = None,
                      provider: str | None = None,
                      context: Mapping[str, str] | None = None) -> EncryptedData:
        """Envelope-encrypt with a fresh data key from the provider (one provider call).

        The provider wraps the data key under ``context``; the data is encrypted here and
        never reaches the provider (see :class:`EnvelopeCiphertext`).

        Args:
            plaintext: at most 64 MiB.
            key_id: the provider key (default: the manager's default key for the default
                provider, the URI's key for another).
            provider: the provider name (default: the default provider).
            context: the encryption context, bound by the provider and as AAD.

        Raises:
            PayloadTooLarge: above 64 MiB.
            KMSError: a provider failure (``KeyNotFoundError``, ``ProviderConnectionError``...).
        """
        if not isinstance(plaintext, bytes):
            raise TypeError("plaintext must be bytes")
        if len(plaintext) > MAX_ENVELOPE_PLAINTEXT:
            raise PayloadTooLarge(f"encrypt takes at most {MAX_ENVELOPE_PLAINTEXT} bytes")
        name, prov = self._provider(provider)
        ctx = canonical_context(context)
        ctx_map = dict(context or {})
        if _reserved(ctx_map):
            raise InvalidRequest("that encryption context is reserved for keygrants' own keys")
        pair = await self._call(prov.generate_data_key(key_id=self._key_for(name, key_id),
                                                       key_spec="AES_256", context=ctx_map))
        if len(pair.plaintext_key) != KEY_SIZE:
            raise EncryptionError("the provider returned a data key of the wrong size")
        wrapped = pair.encrypted_key
        header = EnvelopeCiphertext.build_header(wrapped.algorithm, wrapped.ciphertext)
        nonce = self._rng(NONCE_SIZE)
        body = Aead("aes-256-gcm", pair.plaintext_key).seal(nonce, plaintext, header + ctx)
        return EncryptedData(ciphertext=header + nonce + body, key_reference=wrapped.key_reference,
                             algorithm=ENVELOPE_ALGORITHM, encrypted_at=self._clock(),
                             context=ctx_map)

    async def decrypt(self, encrypted: EncryptedData, *,
                      context: Mapping[str, str] | None = None) -> bytes:
        """Decrypt what :meth:`encrypt` made (or a provider's own ``EncryptedData``).

        The provider is found from ``encrypted.key_reference`` (see
        :meth:`KeyProvider.holds_key <keygrants.providers.KeyProvider.holds_key>`: of several
        providers of one kind, the one whose key the record names); ``context`` defaults to
        the one recorded in ``encrypted``.

        Raises:
            DecryptionError: for every failure to decrypt (opaque).
            KeyNotFoundError: if no provider of this manager holds the record's key (or
                several could and none is the default).
            ProviderConnectionError: if the provider cannot be reached.
        """
        prov = self._provider_for(encrypted.key_reference)
        if _reserved(encrypted.context if context is None else context):
            raise DecryptionError()  # a data key or root key copied into a record stays wrapped
        if encrypted.algorithm != ENVELOPE_ALGORITHM:
            # A provider's own record wraps at most 4 KiB; a larger one is refused here rather
            # than sent to a KMS, held under an HSM session lock or checksummed on the loop.
            if len(encrypted.ciphertext) > MAX_WRAPPED_KEY_SIZE:
                raise DecryptionError()
            return await self._call(prov.decrypt(encrypted, context=context))
        env = EnvelopeCiphertext.from_bytes(encrypted.ciphertext)
        ctx_map = dict(encrypted.context if context is None else context)
        try:
            ctx = canonical_context(ctx_map)
        except InvalidRequest:
            if context is not None:
                raise
            raise DecryptionError() from None
        wrapped = EncryptedData(ciphertext=env.wrapped_key, key_reference=encrypted.key_reference,
                                algorithm=env.algorithm, encrypted_at=encrypted.encrypted_at,
                                context=ctx_map)
        key = await self._call(prov.decrypt(wrapped, context=ctx_map))
        if len(key) != KEY_SIZE:
            raise DecryptionError()
        try:
            return Aead("aes-256-gcm", key).open(env.nonce, env.body, env.header + ctx)
        except InvalidCiphertext:
            raise DecryptionError() from None

    async def generate_data_key(self, key_id: str | None = None, key_spec: str = "AES_256", *,
                                provider: str | None = None,
                                context: Mapping[str, str] | None = None) -> DataKeyPair:
        """A fresh data key in clear and wrapped by the provider, for your own envelope scheme.

        Raises:
            ValueError: for a key spec other than ``AES_256``.
        """
        if key_spec != "AES_256":
            raise ValueError("only AES_256 data keys are supported")
        name, prov = self._provider(provider)
        canonical_context(context)
        if context is not None and _reserved(context):  # a key the manager would load as its own
            raise InvalidRequest("that encryption context is reserved for keygrants' own keys")
        return await self._call(prov.generate_data_key(key_id=self._key_for(name, key_id),
                                                       key_spec=key_spec,
                                                       context=dict(context or {})))

    # -- fields -----------------------------------------------------------------------------------

    def _cached_slot(self, key_id: str | None, provider: str | None) -> _DataKey | None:
        name, _ = self._provider(provider)
        return self._slots.get((name, self._key_for(name, key_id)))

    async def _slot(self, key_id: str | None, provider: str | None) -> _DataKey:
        dk = self._cached_slot(key_id, provider)
        if dk is not None:
            return dk
        name, _ = self._provider(provider)
        slot = (name, self._key_for(name, key_id))
        if slot == (self._default_provider, self._key_for(self._default_provider, None)):
            raise EncryptionError(_NOT_INITIALIZED)
        async with self._lock:
            dk = self._slots.get(slot)
            if dk is None:
                dk = await self._new_data_key(*slot)
                self._install(dk)
            return dk

    def _field_seal(self, dk: _DataKey, value: Any, field_type: str,
                    context: Mapping[str, str] | None) -> bytes:
        payload = _encode_field(value, field_type)
        dk.uses += 1
        if dk.uses >= dk.soft_limit:
            self._usage_limit(dk)
        return self._seal(dk, FIELD_V1, payload, context, self._rng(NONCE_SIZE))

    async def encrypt_field(self, value: str | bytes | Any, *, key_id: str | None = None,
                            field_type: FieldType = "text", provider: str | None = None,
                            context: Mapping[str, str] | None = None) -> bytes:
        """Encrypt a column value with the cached data key of ``key_id``.

        Async, like FraiseQL's, but the default key's field costs no provider call: it uses
        the data key from :meth:`initialize`. Another ``key_id`` (or provider) gets its own
        data key on first use (one provider call), cached and rotated with the others. The
        value's type is stored inside the encryption, so :meth:`decrypt_field` returns a
        ``str``, ``bytes`` or JSON value as given. Bind the row and column in ``context``
        (``{"table": "users", "column": "email", "id": "42"}``) so a value cannot be moved.

        Args:
            value: ``str`` for ``"text"``, bytes for ``"bytes"``, a JSON value for ``"json"``.
            key_id: the provider key (default: the manager's default key).
            field_type: ``"text"``, ``"bytes"`` or ``"json"``.
            provider: the provider name (default: the default provider).
            context: bound as AAD.

        Returns:
            A field ciphertext (see :class:`LocalCiphertext`; first byte 0x02).

        Raises:
            TypeError: if ``value`` does not match ``field_type``.
            EncryptionError: for the default key before :meth:`initialize`.
        """
        dk = await self._slot(key_id, provider)
        return self._field_seal(dk, value, field_type, context)

    async def decrypt_field(self, ciphertext: bytes, *, field_type: FieldType | None = None,
                            context: Mapping[str, str] | None = None) -> Any:
        """Decrypt an :meth:`encrypt_field` value; its data key is fetched on demand.

        Args:
            ciphertext: the field ciphertext.
            field_type: if given, the value must have been encrypted as this type.
            context: the context it was encrypted with.

        Returns:
            The ``str``, ``bytes`` or JSON value.

        Raises:
            DecryptionError: for every failure (opaque), including a type mismatch.
            KeyNotFoundError: if a known data key was wrapped by a key no provider of this
                manager holds.
        """
        ct = LocalCiphertext.from_bytes(ciphertext)
        if ct.format != FIELD_V1:
            raise DecryptionError()
        await self._ensure(ct.data_key_id)
        return _decode_field(self._open(ct, context), field_type)

    # -- lifecycle --------------------------------------------------------------------------------

    async def close(self) -> None:
        """Forget every data key and close the providers."""
        task, self._rotation_task = self._rotation_task, None
        if task is not None and not task.done():
            task.cancel()
        self._current = None
        with self._maps_lock:
            self._slots.clear()
            self._cache.clear()
            self._wrapped_known.clear()
        results = await asyncio.gather(*(p.close() for p in self._providers.values()),
                                       return_exceptions=True)
        for r in results:
            if isinstance(r, Exception):
                log.warning("closing a key provider failed: %s", type(r).__name__)

    async def __aenter__(self) -> KeyManager:
        await self.initialize()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class SyncKeyManager:
    """A blocking facade over :class:`KeyManager` for applications without an event loop.

    The hot path (``local_encrypt``/``local_decrypt``, and field operations whose data key is
    cached) runs in the calling thread. Everything that may call a provider runs on a private
    event loop in a daemon thread, which keeps loop-bound provider clients on one loop. Do not
    use the wrapped KeyManager from another event loop at the same time.

    Args:
        manager: the KeyManager to drive.
    """

    def __init__(self, manager: KeyManager) -> None:
        if not isinstance(manager, KeyManager):
            raise TypeError("SyncKeyManager wraps a KeyManager")
        self.manager = manager
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    @classmethod
    def from_uri(cls, uri: str, **options: Any) -> SyncKeyManager:
        """``SyncKeyManager(KeyManager.from_uri(uri, **options))``."""
        return cls(KeyManager.from_uri(uri, **options))

    def __repr__(self) -> str:
        return f"SyncKeyManager({self.manager!r})"

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        with self._start_lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="keygrants-keymanager",
                                          daemon=True)
                thread.start()
                self._loop, self._thread = loop, thread
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("SyncKeyManager called from its own event loop thread")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    @property
    def is_initialized(self) -> bool:
        """Whether a data key is cached."""
        return self.manager.is_initialized

    @property
    def current_data_key_id(self) -> str | None:
        """See :attr:`KeyManager.current_data_key_id`."""
        return self.manager.current_data_key_id

    @property
    def providers(self) -> Mapping[str, KeyProvider]:
        """See :attr:`KeyManager.providers`."""
        return self.manager.providers

    def get_provider(self, name: str | None = None) -> KeyProvider:
        """See :meth:`KeyManager.get_provider` (the provider's own methods are async)."""
        return self.manager.get_provider(name)

    def initialize(self) -> None:
        """See :meth:`KeyManager.initialize`."""
        self._run(self.manager.initialize())

    def local_encrypt(self, plaintext: bytes, *, context: Mapping[str, str] | None = None) -> bytes:
        """See :meth:`KeyManager.local_encrypt` (runs in the calling thread)."""
        return self.manager.local_encrypt(plaintext, context=context)

    def local_decrypt(self, ciphertext: bytes, *, context: Mapping[str, str] | None = None) -> bytes:
        """See :meth:`KeyManager.local_decrypt` (runs in the calling thread)."""
        return self.manager.local_decrypt(ciphertext, context=context)

    def local_decrypt_fetching(self, ciphertext: bytes, *,
                               context: Mapping[str, str] | None = None) -> bytes:
        """See :meth:`KeyManager.local_decrypt_fetching`."""
        try:
            return self.manager.local_decrypt(ciphertext, context=context)
        except DecryptionError:
            return self._run(self.manager.local_decrypt_fetching(ciphertext, context=context))

    def encrypt(self, plaintext: bytes, *, key_id: str | None = None, provider: str | None = None,
                context: Mapping[str, str] | None = None) -> EncryptedData:
        """See :meth:`KeyManager.encrypt`."""
        return self._run(self.manager.encrypt(plaintext, key_id=key_id, provider=provider,
                                              context=context))

    def decrypt(self, encrypted: EncryptedData, *,
                context: Mapping[str, str] | None = None) -> bytes:
        """See :meth:`KeyManager.decrypt`."""
        return self._run(self.manager.decrypt(encrypted, context=context))

    def generate_data_key(self, key_id: str | None = None, key_spec: str = "AES_256", *,
                          provider: str | None = None,
                          context: Mapping[str, str] | None = None) -> DataKeyPair:
        """See :meth:`KeyManager.generate_data_key`."""
        return self._run(self.manager.generate_data_key(key_id, key_spec, provider=provider,
                                                        context=context))

    def encrypt_field(self, value: str | bytes | Any, *, key_id: str | None = None,
                      field_type: FieldType = "text", provider: str | None = None,
                      context: Mapping[str, str] | None = None) -> bytes:
        """See :meth:`KeyManager.encrypt_field` (no thread hop when the data key is cached)."""
        km = self.manager
        dk = km._cached_slot(key_id, provider)
        if dk is not None:
            return km._field_seal(dk, value, field_type, context)
        return self._run(km.encrypt_field(value, key_id=key_id, field_type=field_type,
                                          provider=provider, context=context))

    def decrypt_field(self, ciphertext: bytes, *, field_type: FieldType | None = None,
                      context: Mapping[str, str] | None = None) -> Any:
        """See :meth:`KeyManager.decrypt_field` (no thread hop when the data key is cached)."""
        km = self.manager
        ct = LocalCiphertext.from_bytes(ciphertext)
        if ct.format == FIELD_V1 and ct.data_key_id in km._cache:
            return _decode_field(km._open(ct, context), field_type)
        return self._run(km.decrypt_field(ciphertext, field_type=field_type, context=context))

    def rotate_data_key(self) -> str:
        """See :meth:`KeyManager.rotate_data_key`."""
        return self._run(self.manager.rotate_data_key())

    def rotate_if_due(self) -> bool:
        """See :meth:`KeyManager.rotate_if_due`."""
        return self._run(self.manager.rotate_if_due())

    def get_rotation_policy(self) -> RotationPolicy:
        """See :meth:`KeyManager.get_rotation_policy`."""
        return self.manager.get_rotation_policy()

    def get_provider_rotation_policy(self, key_id: str | None = None, *,
                                     provider: str | None = None) -> RotationPolicy:
        """See :meth:`KeyManager.get_provider_rotation_policy`."""
        return self._run(self.manager.get_provider_rotation_policy(key_id, provider=provider))

    @staticmethod
    def data_key_id_of(ciphertext: bytes) -> str:
        """See :meth:`KeyManager.data_key_id_of`."""
        return KeyManager.data_key_id_of(ciphertext)

    def has_data_key(self, data_key_id: str) -> bool:
        """See :meth:`KeyManager.has_data_key`."""
        return self.manager.has_data_key(data_key_id)

    def load_data_key(self, wrapped: EncryptedData) -> str:
        """See :meth:`KeyManager.load_data_key`."""
        return self._run(self.manager.load_data_key(wrapped))

    def export_data_keys(self) -> list[dict[str, Any]]:
        """See :meth:`KeyManager.export_data_keys`."""
        return self.manager.export_data_keys()

    def import_data_keys(self, entries: Iterable[Mapping[str, Any]]) -> int:
        """See :meth:`KeyManager.import_data_keys`."""
        return self.manager.import_data_keys(entries)

    def close(self) -> None:
        """Close the manager and stop the private event loop."""
        try:
            self._run(self.manager.close())
        finally:
            with self._start_lock:
                loop, thread = self._loop, self._thread
                self._loop = self._thread = None
            if loop is not None and thread is not None:
                loop.call_soon_threadsafe(loop.stop)
                thread.join(timeout=10)
                loop.close()

    def __enter__(self) -> SyncKeyManager:
        self.initialize()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
