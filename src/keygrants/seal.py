"""The root key: generated on first start, kept at rest only wrapped by a provider.

The store's ``root_key`` metadata record is JSON ``{"provider": URI, "blob": base64}``; the
provider URI is informational (it never holds a secret) and lets a restart say which seal
to configure when the wrong one is given.
"""

from __future__ import annotations

from typing import Final

import msgspec

from keygrants.crypto import KEY_SIZE, random_bytes
from keygrants.errors import UnsealFailed
from keygrants.providers.base import RootKeyProvider
from keygrants.store.base import Store

__all__ = ["ROOT_KEY_AAD", "ROOT_KEY_META", "open_root_key", "sealed_with"]

ROOT_KEY_META: Final = "root_key"
ROOT_KEY_AAD: Final = b"keygrants root key v1"


class _RootKeyRecord(msgspec.Struct):
    provider: str
    blob: bytes


def sealed_with(store: Store) -> str | None:
    """The seal provider URI a store's root key was wrapped with (``None`` before first
    start): a restart without ``--seal`` uses the same seal instead of guessing."""
    raw = store.get_meta(ROOT_KEY_META)
    if raw is None:
        return None
    return msgspec.json.decode(raw, type=_RootKeyRecord).provider


def open_root_key(store: Store, provider: RootKeyProvider) -> tuple[bytes, bool]:
    """Return ``(root_key, created)``: unwrap the stored root key, or make one on first start.

    Raises:
        UnsealFailed: if the stored root key does not open with ``provider``.
    """
    raw = store.get_meta(ROOT_KEY_META)
    if raw is None:
        root = random_bytes(KEY_SIZE)
        record = _RootKeyRecord(provider=provider.uri, blob=provider.wrap(root, aad=ROOT_KEY_AAD))
        if store.set_meta_if_absent(ROOT_KEY_META, msgspec.json.encode(record)):
            return root, True
        raw = store.get_meta(ROOT_KEY_META)  # another process won the first start
        assert raw is not None
    record = msgspec.json.decode(raw, type=_RootKeyRecord)
    try:
        root = provider.unwrap(record.blob, aad=ROOT_KEY_AAD)
    except UnsealFailed as exc:
        if record.provider.split(":", 1)[0:1] != provider.uri.split(":", 1)[0:1] or (
            (record.provider == "local:passphrase") != (provider.uri == "local:passphrase")
        ):
            raise UnsealFailed(
                f"{exc.message}; this data directory was sealed with {record.provider}"
            ) from exc
        raise
    if len(root) != KEY_SIZE:
        raise UnsealFailed("the unsealed root key has the wrong size")
    return root, False
