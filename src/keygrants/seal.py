"""The root key: generated on first start, kept at rest only wrapped by a provider.

The store's ``root_key`` metadata record is JSON ``{"provider": URI, "blob": base64}``; the
provider URI is informational (it never holds a secret) and lets a restart say which seal
to configure when the wrong one is given.
"""

from __future__ import annotations

import hmac
from typing import Final

import msgspec

from keygrants.crypto import KEY_SIZE, random_bytes
from keygrants.errors import KeygrantsError, SealError, UnsealFailed
from keygrants.providers.base import RootKeyProvider
from keygrants.store.base import Store

__all__ = ["ROOT_KEY_AAD", "ROOT_KEY_META", "open_root_key", "reseal_root_key", "sealed_with"]

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


def reseal_root_key(store: Store, old: RootKeyProvider, new: RootKeyProvider) -> str:
    """Move the root key from the ``old`` seal to the ``new`` one; return the previous URI.

    The root key itself does not change, so every key version sealed under it stays valid and
    a running server (which holds the root key in memory) keeps working; the next start needs
    the new seal. The record is replaced only after the new blob has been unwrapped again by
    ``new`` and found equal to the root key, and only if nobody changed the record meanwhile:
    on any failure the old record, and so the old seal, stays in force.

    Raises:
        SealError: when the store holds no root key yet, the record changed during the
            reseal, or the new seal cannot open what it wrapped.
        UnsealFailed: when ``old`` does not open the stored root key.
        KeygrantsError: whatever ``new`` raises while wrapping (e.g. ProviderConnectionError);
            nothing is written then.
    """
    raw = store.get_meta(ROOT_KEY_META)
    if raw is None:
        raise SealError("this store has no root key yet; start the server once first")
    try:
        record = msgspec.json.decode(raw, type=_RootKeyRecord)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise SealError("the stored root key record is unreadable") from exc
    root = old.unwrap(record.blob, aad=ROOT_KEY_AAD)
    if len(root) != KEY_SIZE:
        raise UnsealFailed("the unsealed root key has the wrong size")
    blob = new.wrap(root, aad=ROOT_KEY_AAD)
    try:
        check = new.unwrap(blob, aad=ROOT_KEY_AAD)
    except KeygrantsError as exc:
        raise SealError(f"{new.uri} cannot open the blob it just wrapped; the seal is "
                        "unchanged") from exc
    if not hmac.compare_digest(check, root):
        raise SealError(f"{new.uri} returned a different root key; the seal is unchanged")
    if store.get_meta(ROOT_KEY_META) != raw:
        raise SealError("the root key record changed during the reseal; the seal is unchanged "
                        "(run the reseal again)")
    store.set_meta(ROOT_KEY_META, msgspec.json.encode(_RootKeyRecord(provider=new.uri, blob=blob)))
    return record.provider
