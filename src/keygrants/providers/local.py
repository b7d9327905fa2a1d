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
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Final

from keygrants.crypto import KEY_SIZE, NONCE_SIZE, Aead, random_bytes, scrypt_derive
from keygrants.crypto.kdf import SCRYPT_N, SCRYPT_P, SCRYPT_R
from keygrants.errors import InvalidCiphertext, SealError, UnsealFailed

__all__ = ["PASSPHRASE_ENV", "KeyFileProvider", "PassphraseProvider", "open_local_provider"]

PASSPHRASE_ENV: Final = "KEYGRANTS_PASSPHRASE"
MIN_PASSPHRASE_LENGTH: Final = 12
_KEYFILE_V1: Final = 0x01
_PASSPHRASE_V1: Final = 0x02
_SALT_SIZE: Final = 16


class KeyFileProvider:
    """Wraps under a 32-byte key kept in a file with mode 0600."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._aead = Aead("aes-256-gcm", self._load_or_create())

    @property
    def uri(self) -> str:
        return f"local://{self.path.resolve()}"

    def _load_or_create(self) -> bytes:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            mode = self.path.stat().st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise SealError(
                    f"seal key file {self.path} is accessible by group or others "
                    f"(mode {stat.S_IMODE(mode):o}); run: chmod 600 {self.path}"
                ) from None
            data = self.path.read_bytes()
            if len(data) != KEY_SIZE:
                raise SealError(f"seal key file {self.path} is not a {KEY_SIZE}-byte key") from None
            return data
        except OSError as exc:
            raise SealError(f"cannot create seal key file {self.path}: {exc.strerror}") from exc
        key = random_bytes(KEY_SIZE)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
            f.flush()
            os.fsync(f.fileno())
        return key

    def wrap(self, plaintext: bytes, *, aad: bytes) -> bytes:
        nonce = random_bytes(NONCE_SIZE)
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
        nonce = random_bytes(NONCE_SIZE)
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


def open_local_provider(uri: str, *, passphrase: str | None = None) -> KeyFileProvider | PassphraseProvider:
    """Open ``local:passphrase`` or ``local:PATH`` / ``local:///abs/path``."""
    rest = uri.removeprefix("local:")
    if rest == "passphrase":
        return PassphraseProvider(passphrase)
    if rest.startswith("//"):
        rest = rest[2:]
    if not rest:
        raise ValueError("local: provider URI needs a key file path or 'passphrase'")
    return KeyFileProvider(rest)
