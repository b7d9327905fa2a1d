"""The local root key provider: a key file (0600) or a passphrase stretched with scrypt.

URI forms:

- ``local:///abs/path/seal.key`` (or ``local:relative/seal.key``): a 32-byte key file, created
  with mode 0600 on first use; a file readable by group or others is refused.
- ``local:passphrase``: a passphrase from the ``KEYGRANTS_PASSPHRASE`` environment variable
  (or the ``passphrase=`` option), stretched with scrypt (N=2**17, r=8, p=1, 16-byte salt).

Wrapped blob layouts::

    key file:   0x01 | nonce (12) | AES-256-GCM(ciphertext || tag)
    passphrase: 0x02 | salt (16) | log2(N) (1) | r (1) | p (1) | nonce (12) | AES-256-GCM(...)

The AAD of every wrap is the caller's AAD; the passphrase header is authenticated too.

The same module holds :class:`LocalKeyProvider`, the ``local:`` application key provider for
:class:`~keygrants.KeyManager` (same URI forms, its own ciphertext layout and HKDF-separated
keys; see its docstring).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

from keygrants._files import exposed_mode
from keygrants.crypto import (
    KEY_SIZE,
    NONCE_SIZE,
    TAG_SIZE,
    Aead,
    hkdf_sha256,
    nonce_bytes,
    random_bytes,
    scrypt_derive,
)
from keygrants.crypto.kdf import SCRYPT_N, SCRYPT_P, SCRYPT_R
from keygrants.errors import (
    DecryptionError,
    InvalidCiphertext,
    InvalidRequest,
    KeyNotFoundError,
    PayloadTooLarge,
    ProviderConnectionError,
    SealError,
    UnsealFailed,
)
from keygrants.keys.context import canonical_context
from keygrants.providers.base import KeyProvider
from keygrants.providers.models import EncryptedData, KeyReference

__all__ = [
    "MAX_PROVIDER_PLAINTEXT",
    "NEW_SALTS_PER_MINUTE",
    "PASSPHRASE_ENV",
    "KeyFileProvider",
    "LocalKeyProvider",
    "PassphraseProvider",
    "open_local_key_provider",
    "open_local_provider",
]

PASSPHRASE_ENV: Final = "KEYGRANTS_PASSPHRASE"
MIN_PASSPHRASE_LENGTH: Final = 12
_KEYFILE_V1: Final = 0x01
_PASSPHRASE_V1: Final = 0x02
_SALT_SIZE: Final = 16


def _load_or_create_key_file(path: Path, what: str, error: type[Exception], *,
                             create: bool = True) -> bytes:
    """Read a 32-byte key file, or create it with mode 0600 (never readable by others).

    With ``create=False`` a missing file is an error, not a new key: a restart whose key
    file was lost must not leave a different key in its place (a backup job could copy it
    over the good one).
    """
    if create:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # a key made before: read below
        except OSError as exc:
            raise error(f"cannot create {what} {path}: {exc.strerror}") from exc
        else:
            key = random_bytes(KEY_SIZE)
            with os.fdopen(fd, "wb") as f:
                f.write(key)
                f.flush()
                os.fsync(f.fileno())
            return key
    mode = exposed_mode(path)
    if mode is not None:
        raise error(f"{what} {path} is accessible by group or others (mode {mode:o}); run: "
                    f"chmod 600 {path}")
    try:
        with open(path, "rb") as f:
            data = f.read(KEY_SIZE + 1)
    except FileNotFoundError:
        if create:
            raise error(f"cannot read {what} {path}: it was removed while being opened") from None
        raise error(f"{what} {path} is missing: restore it from your backup (a new key would "
                    "not open what the old one sealed)") from None
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror}") from exc
    if len(data) != KEY_SIZE:
        raise error(f"{what} {path} is not a {KEY_SIZE}-byte key")
    return data


class KeyFileProvider:
    """Wraps under a 32-byte key kept in a file with mode 0600."""

    def __init__(self, path: str | os.PathLike[str], *, create: bool = True) -> None:
        self.path = Path(path)
        self._aead = Aead("aes-256-gcm", _load_or_create_key_file(
            self.path, "seal key file", SealError, create=create))

    @property
    def uri(self) -> str:
        return f"local://{self.path.resolve()}"

    def wrap(self, plaintext: bytes, *, aad: bytes) -> bytes:
        nonce = nonce_bytes(NONCE_SIZE)
        prefix = bytes([_KEYFILE_V1])
        return prefix + nonce + self._aead.seal(nonce, plaintext, prefix + aad)

    def unwrap(self, blob: bytes, *, aad: bytes) -> bytes:
        if len(blob) < 1 + NONCE_SIZE or blob[0] != _KEYFILE_V1:
            raise UnsealFailed("the root key was not sealed with a local key file")
        try:
            return self._aead.open(blob[1 : 1 + NONCE_SIZE], blob[1 + NONCE_SIZE :],
                                   blob[:1] + aad)
        except InvalidCiphertext:
            raise UnsealFailed(f"the seal key file {self.path} does not open the root key") from None


class PassphraseProvider:
    """Wraps under a key stretched from a passphrase with scrypt."""

    def __init__(self, passphrase: str | None = None) -> None:
        if passphrase is None:
            passphrase = os.environ.get(PASSPHRASE_ENV)
        if not passphrase:
            raise SealError(f"the passphrase seal needs {PASSPHRASE_ENV} to be set")
        if len(passphrase) < MIN_PASSPHRASE_LENGTH:
            raise SealError(f"the passphrase must be at least {MIN_PASSPHRASE_LENGTH} characters")
        self._passphrase = passphrase.encode("utf-8")
        self._cache: dict[bytes, Aead] = {}

    @property
    def uri(self) -> str:
        return "local:passphrase"

    def _aead(self, header: bytes) -> Aead:
        aead = self._cache.get(header)
        if aead is None:
            salt = header[1 : 1 + _SALT_SIZE]
            n_log2, r, p = header[1 + _SALT_SIZE :]
            if not 14 <= n_log2 <= 22 or not 1 <= r <= 32 or not 1 <= p <= 16:
                raise UnsealFailed("unsupported scrypt parameters in the sealed root key")
            key = scrypt_derive(self._passphrase, salt=salt, n=2**n_log2, r=r, p=p)
            aead = self._cache[header] = Aead("aes-256-gcm", key)
        return aead

    def wrap(self, plaintext: bytes, *, aad: bytes) -> bytes:
        header = (bytes([_PASSPHRASE_V1]) + random_bytes(_SALT_SIZE)
                  + bytes([SCRYPT_N.bit_length() - 1, SCRYPT_R, SCRYPT_P]))
        nonce = nonce_bytes(NONCE_SIZE)
        return header + nonce + self._aead(header).seal(nonce, plaintext, header + aad)

    def unwrap(self, blob: bytes, *, aad: bytes) -> bytes:
        hlen = 1 + _SALT_SIZE + 3
        if len(blob) < hlen + NONCE_SIZE or blob[0] != _PASSPHRASE_V1:
            raise UnsealFailed("the root key was not sealed with a passphrase")
        header = blob[:hlen]
        try:
            return self._aead(header).open(blob[hlen : hlen + NONCE_SIZE], blob[hlen + NONCE_SIZE :],
                                           header + aad)
        except InvalidCiphertext:
            raise UnsealFailed("wrong passphrase: the root key does not open") from None


def open_local_provider(uri: str, *, passphrase: str | None = None,
                        create: bool = True) -> KeyFileProvider | PassphraseProvider:
    """Open ``local:passphrase`` or ``local:PATH`` / ``local:///abs/path``; ``create=False``
    refuses a missing key file instead of making a new key (a restart)."""
    rest = uri.removeprefix("local:")
    if rest == "passphrase":
        return PassphraseProvider(passphrase)
    if rest.startswith("//"):
        rest = rest[2:]
    if not rest:
        raise ValueError("local: provider URI needs a key file path or 'passphrase'")
    return KeyFileProvider(rest, create=create)


# -- the local: application key provider --------------------------------------------------------

MAX_PROVIDER_PLAINTEXT: Final = 4096
_LOCAL_FILE_V1: Final = 0x01
_LOCAL_PASSPHRASE_V1: Final = 0x02
_PASSPHRASE_HEADER_SIZE: Final = 1 + _SALT_SIZE + 3
_SCRYPT_PARAMS: Final = bytes([SCRYPT_N.bit_length() - 1, SCRYPT_R, SCRYPT_P])
_MAX_DERIVED_KEYS: Final = 64
"""Proven passphrase keys kept (LRU): the instance's own plus salts that opened a record."""
_MAX_UNPROVEN_KEYS: Final = 4
"""Keys derived for a salt that has not opened anything yet (a junk salt is derived once)."""
NEW_SALTS_PER_MINUTE: Final = 32
"""scrypt runs for salts not in the caches, per rolling minute; beyond, decrypt is refused."""
_NEW_SALT_WINDOW: Final = 60.0
_HKDF_LABEL: Final = b"keygrants local provider v1\x00"
_ALGORITHM: Final = "AES_256_GCM"


class LocalKeyProvider(KeyProvider):
    """The ``local:`` key provider: AES-256-GCM under a key file or a passphrase.

    For development, tests, single-machine deployments and as a fallback; the key lives on the
    machine, so prefer an HSM or a cloud KMS in production.

    URI forms:

    - ``local:///abs/path/key-file`` (or ``local:relative/path``): a 32-byte key file, created
      with mode 0600 if absent; a file readable by group or others is refused. The file may be
      the server's seal key file: the provider key is HKDF-derived from it with its own label,
      so the two uses never share a key.
    - ``local:passphrase``: a passphrase from ``KEYGRANTS_PASSPHRASE`` (or the ``passphrase=``
      option, at least 12 characters), stretched with scrypt (N=2**17, r=8, p=1) under a salt
      drawn once per provider instance and carried in every ciphertext. The derivation
      (~0.5 s, 128 MiB) runs in a worker thread at :meth:`initialize` or first use; a
      ciphertext made under another instance's salt costs one more derivation, then the key
      is cached. Only those exact scrypt parameters are accepted on decrypt, so a crafted
      header cannot ask for a costlier derivation; a crafted *salt* can, so (nothing cheap
      tells a foreign instance's salt from a random one):

      - a salt's key enters the main cache (LRU, 64 salts, the instance's own pinned) only
        once it has opened a record; a salt that has not stays in a 4-entry side cache, so
        junk salts never evict keys in use and a repeated junk salt costs one derivation;
      - at most :data:`NEW_SALTS_PER_MINUTE` derivations for uncached salts run per rolling
        minute; beyond that, decrypting under an uncached salt raises
        :class:`~keygrants.errors.ProviderConnectionError` (retry later) without running
        scrypt. Cached salts and the instance's own are never limited.

    Ciphertext layout (:attr:`EncryptedData.ciphertext`)::

        key file:    0x01 | nonce (12) | AES-256-GCM ciphertext || tag (16)
        passphrase:  0x02 | salt (16) | log2(N) (1) | r (1) | p (1) | nonce (12) | ciphertext || tag
        AAD = the bytes before the nonce || RFC 8785 canonical context (empty context = no bytes)

    Provider key = HKDF-SHA256(file key or scrypt output, salt=none,
    info = "keygrants local provider v1" 0x00 || "key-file" | "passphrase").

    The key id is ``key-file:<16 hex digits>`` (a fingerprint derived from the key with its own
    HKDF label, so it reveals nothing about the key) or ``passphrase``. Every failed decryption
    raises :class:`~keygrants.errors.DecryptionError`.

    Args:
        path: the key file (key-file mode).
        passphrase: the passphrase (passphrase mode); ``None`` with ``path=None`` reads
            ``KEYGRANTS_PASSPHRASE``.
        clock: monotonic seconds, for the new-salt limit (default :func:`time.monotonic`).

    Raises:
        ValueError: when given both a path and a passphrase, or in passphrase mode when the
            passphrase is missing (no option, ``KEYGRANTS_PASSPHRASE`` unset) or shorter than
            12 characters.
        ProviderConnectionError: when the key file cannot be read or created, is not 32 bytes
            or is readable by others.
    """

    name = "local"

    def __init__(self, path: str | os.PathLike[str] | None = None, *,
                 passphrase: str | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        # _derived, _unproven, _deriving and _new_salt_times change on the event loop and in
        # the worker thread: always under _cache_lock (held briefly, never across scrypt).
        self._derived: OrderedDict[bytes, Aead] = OrderedDict()
        self._unproven: OrderedDict[bytes, Aead] = OrderedDict()
        self._deriving: set[bytes] = set()
        self._new_salt_times: deque[float] = deque()
        self._clock = clock
        self._cache_lock = threading.Lock()
        self._derive_lock = threading.Lock()
        self._passphrase: bytes | None = None
        self._file_aead: Aead | None = None
        self._current_header = b""
        if path is not None:
            if passphrase is not None:
                raise ValueError("give either a key file path or a passphrase, not both")
            self.path: Path | None = Path(path)
            secret = _load_or_create_key_file(self.path, "local provider key file",
                                              ProviderConnectionError)
            self._file_aead = Aead("aes-256-gcm", self._subkey(secret, b"key-file"))
            fingerprint = hkdf_sha256(secret, salt=None, info=_HKDF_LABEL + b"key id", length=8)
            self.default_key_id = f"key-file:{fingerprint.hex()}"
            self.uri = f"local://{self.path.resolve()}"
            self._current_header = bytes([_LOCAL_FILE_V1])
            return
        self.path = None
        if passphrase is None:
            passphrase = os.environ.get(PASSPHRASE_ENV)
        if not passphrase:
            raise ValueError(f"local:passphrase needs {PASSPHRASE_ENV} to be set (or the "
                             "passphrase= option)")
        if len(passphrase) < MIN_PASSPHRASE_LENGTH:
            raise ValueError(f"the passphrase must be at least {MIN_PASSPHRASE_LENGTH} characters")
        self._passphrase = passphrase.encode("utf-8")
        self.default_key_id = "passphrase"
        self.uri = "local:passphrase"
        self._current_header = bytes([_LOCAL_PASSPHRASE_V1]) + random_bytes(_SALT_SIZE) + _SCRYPT_PARAMS

    @classmethod
    def from_uri(cls, uri: str, *, passphrase: str | None = None) -> LocalKeyProvider:
        """Open ``local:passphrase`` or ``local:///abs/path`` / ``local:relative/path``.

        The URI takes no options: a query or fragment (``?...``, ``#...``) is refused rather
        than taken as part of the file name, which would silently make a new key.

        Raises:
            ValueError: for a URI that is not ``local:``, names no key file, or carries a
                query or fragment; for ``local:passphrase`` without a usable passphrase.
        """
        if not uri.startswith("local:"):
            raise ValueError(f"not a local: provider URI: {uri!r}")
        rest = uri.removeprefix("local:")
        if "?" in rest or "#" in rest:
            raise ValueError("local: takes no URI options (the passphrase is the keyword "
                             "option passphrase=); a key file name cannot contain ? or #")
        if rest == "passphrase":
            return cls(passphrase=passphrase)
        if rest.startswith("//"):
            rest = rest[2:]
        if not rest:
            raise ValueError("local: provider URI needs a key file path or 'passphrase'")
        if passphrase is not None:
            raise ValueError("the passphrase option only applies to local:passphrase")
        return cls(rest)

    def __repr__(self) -> str:
        return f"LocalKeyProvider({self.uri!r})"

    @staticmethod
    def _subkey(secret: bytes, mode: bytes) -> bytes:
        return hkdf_sha256(secret, salt=None, info=_HKDF_LABEL + mode, length=KEY_SIZE)

    def _cached(self, header: bytes) -> Aead | None:
        """The AEAD of an already derived salt, refreshing its place in the LRU."""
        with self._cache_lock:
            aead = self._derived.get(header)
            if aead is not None:
                self._derived.move_to_end(header)
                return aead
            return self._unproven.get(header)

    def _admit(self, header: bytes, aead: Aead) -> None:
        """Put a key in the main cache, evicting the least recently used (never our own salt).

        Call with ``_cache_lock`` held.
        """
        self._unproven.pop(header, None)
        self._derived[header] = aead
        self._derived.move_to_end(header)
        while len(self._derived) > _MAX_DERIVED_KEYS:
            oldest = next(iter(self._derived))
            if oldest == self._current_header:
                self._derived.move_to_end(oldest)
                continue
            del self._derived[oldest]

    def _prove(self, header: bytes) -> None:
        """``header``'s key opened a record: the salt is genuine, keep it in the main cache."""
        with self._cache_lock:
            aead = self._unproven.get(header)
            if aead is not None:
                self._admit(header, aead)

    def _reserve_derivation(self, header: bytes) -> bool:
        """Count a derivation for an uncached salt against the per-minute limit.

        Returns:
            Whether this call reserved it (and must release ``header`` from ``_deriving``).

        Raises:
            ProviderConnectionError: when the limit is reached.
        """
        with self._cache_lock:
            # Our own salt is free, and so is a salt already being derived: its waiters find
            # the key in the cache once the first derivation ends.
            if header == self._current_header or header in self._deriving:
                return False
            now = self._clock()
            while self._new_salt_times and now - self._new_salt_times[0] >= _NEW_SALT_WINDOW:
                self._new_salt_times.popleft()
            if len(self._new_salt_times) >= NEW_SALTS_PER_MINUTE:
                raise ProviderConnectionError(
                    f"local:passphrase: more than {NEW_SALTS_PER_MINUTE} ciphertexts under new "
                    "salts in the last minute; retry later")
            self._new_salt_times.append(now)
            self._deriving.add(header)
            return True

    def _derive(self, header: bytes) -> Aead:
        """The AEAD for a passphrase header (scrypt, cached; blocking: call in a thread)."""
        assert self._passphrase is not None
        with self._derive_lock:  # one derivation per salt even under concurrent first use
            aead = self._cached(header)
            if aead is None:
                stretched = scrypt_derive(self._passphrase, salt=header[1:1 + _SALT_SIZE])
                aead = Aead("aes-256-gcm", self._subkey(stretched, b"passphrase"))
                with self._cache_lock:
                    if header == self._current_header:
                        self._admit(header, aead)
                    else:
                        self._unproven[header] = aead
                        while len(self._unproven) > _MAX_UNPROVEN_KEYS:
                            del self._unproven[next(iter(self._unproven))]
            return aead

    async def _aead_for(self, header: bytes) -> Aead:
        if self._file_aead is not None:
            return self._file_aead
        aead = self._cached(header)
        if aead is None:
            reserved = self._reserve_derivation(header)  # before the thread: a refusal is free
            try:
                aead = await asyncio.to_thread(self._derive, header)
            finally:
                if reserved:
                    with self._cache_lock:
                        self._deriving.discard(header)
        return aead

    async def initialize(self) -> None:
        """Derive the passphrase key now (in a worker thread) rather than on first use."""
        await self._aead_for(self._current_header)

    def holds_key(self, ref: KeyReference) -> bool | None:
        """Whether ``ref`` names this provider's key: it holds exactly one, so any other key
        id is certainly not its own (two key files are told apart by fingerprint)."""
        return ref.provider == self.name and ref.key_id == self.default_key_id

    def _check_key_id(self, key_id: str | None) -> None:
        if key_id is not None and key_id != self.default_key_id:
            raise KeyNotFoundError(f"the local provider holds key {self.default_key_id!r}, "
                                   f"not {key_id!r}")

    async def encrypt(self, plaintext: bytes, *, key_id: str | None = None,
                      context: Mapping[str, str] | None = None) -> EncryptedData:
        """Encrypt a small secret (at most 4 KiB) bound to ``context``.

        Raises:
            KeyNotFoundError: if ``key_id`` names another key.
            PayloadTooLarge: above 4 KiB.
        """
        self._check_key_id(key_id)
        if not isinstance(plaintext, bytes):
            raise TypeError("plaintext must be bytes")
        if len(plaintext) > MAX_PROVIDER_PLAINTEXT:
            raise PayloadTooLarge(f"the local provider encrypts at most {MAX_PROVIDER_PLAINTEXT} bytes")
        ctx = canonical_context(context)
        header = self._current_header
        aead = await self._aead_for(header)
        nonce = nonce_bytes(NONCE_SIZE)
        return EncryptedData(
            ciphertext=header + nonce + aead.seal(nonce, plaintext, header + ctx),
            key_reference=KeyReference(provider=self.name, key_id=self.default_key_id or ""),
            algorithm=_ALGORITHM, context=dict(context or {}))

    async def decrypt(self, encrypted: EncryptedData, *,
                      context: Mapping[str, str] | None = None) -> bytes:
        """Decrypt; ``context`` defaults to the one recorded in ``encrypted``.

        Raises:
            DecryptionError: for every failure.
            ProviderConnectionError: in passphrase mode, for a salt not seen before once
                :data:`NEW_SALTS_PER_MINUTE` new salts have been derived in the last minute.
        """
        data = encrypted.ciphertext
        ref = encrypted.key_reference
        if (ref.provider != self.name or ref.key_id != self.default_key_id
                or encrypted.algorithm != _ALGORITHM or not isinstance(data, bytes)
                or len(data) > _PASSPHRASE_HEADER_SIZE + NONCE_SIZE + MAX_PROVIDER_PLAINTEXT + TAG_SIZE):
            raise DecryptionError()
        if self._file_aead is not None:
            hlen = 1
            if not data or data[0] != _LOCAL_FILE_V1:
                raise DecryptionError()
        else:
            hlen = _PASSPHRASE_HEADER_SIZE
            if (len(data) < hlen or data[0] != _LOCAL_PASSPHRASE_V1
                    or data[1 + _SALT_SIZE:hlen] != _SCRYPT_PARAMS):
                raise DecryptionError()
        if len(data) < hlen + NONCE_SIZE + TAG_SIZE:
            raise DecryptionError()
        if context is not None:
            ctx = canonical_context(context)
        else:
            try:
                ctx = canonical_context(encrypted.context)
            except InvalidRequest:  # a malformed record is a bad ciphertext, not a bad call
                raise DecryptionError() from None
        header = data[:hlen]
        aead = await self._aead_for(header)
        try:
            plaintext = aead.open(data[hlen:hlen + NONCE_SIZE], data[hlen + NONCE_SIZE:],
                                  header + ctx)
        except InvalidCiphertext:
            raise DecryptionError() from None
        if self._file_aead is None:
            self._prove(header)
        return plaintext


def open_local_key_provider(uri: str, **options: Any) -> LocalKeyProvider:
    """Factory registered for the ``local`` scheme (see :class:`LocalKeyProvider`)."""
    return LocalKeyProvider.from_uri(uri, **options)
