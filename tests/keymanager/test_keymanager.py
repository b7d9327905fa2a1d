"""KeyManager behaviour: start-up, the hot path, rotation, sharing data keys, per-request
envelopes, fields, the sync facade, limits and errors. Providers are real ``local:`` ones,
wrapped to count calls or to be made slow or failing."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import threading
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import keygrants
import keygrants.keymanager as km_mod
from keygrants.errors import (
    DecryptionError,
    EncryptionError,
    InvalidRequest,
    KeyNotFoundError,
    KeyRotationError,
    KMSError,
    PayloadTooLarge,
    ProviderConnectionError,
)
from keygrants.keymanager import (
    DATA_KEY_CONTEXT,
    KeyManager,
    MemoryDataKeyStore,
    SyncKeyManager,
)
from keygrants.providers.base import KeyProvider
from keygrants.providers.local import LocalKeyProvider
from keygrants.providers.models import EncryptedData, KeyReference, RotationPolicy

pytestmark = pytest.mark.anyio

CTX = {"tenant": "42"}


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2030, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


# -- configuration ------------------------------------------------------------------------------

def test_bad_configuration_fails_in_the_constructor(local: LocalKeyProvider, tmp_path: Path) -> None:
    other = LocalKeyProvider(tmp_path / "other")
    with pytest.raises(ValueError, match="at least one"):
        KeyManager({})
    with pytest.raises(ValueError, match="not among"):
        KeyManager({"a": local}, "b")
    with pytest.raises(ValueError, match="required"):
        KeyManager({"a": local, "b": other})
    with pytest.raises(TypeError):
        KeyManager({"a": object()})  # type: ignore[dict-item]
    for kwargs in ({"initialization_timeout": 0}, {"initialization_timeout": float("nan")},
                   {"operation_timeout": -1}, {"rotation_period": timedelta(0)},
                   {"max_cached_data_keys": 0}, {"data_key_max_uses": 2**33}):
        with pytest.raises(ValueError):
            KeyManager({"a": local}, **kwargs)
    with pytest.raises(ValueError):
        KeyManager({"a": local}, default_key_id="x" * 5000)
    assert KeyManager({"a": local, "b": other}, "b").get_provider() is other


def test_facade_and_from_uri(key_file: Path) -> None:
    assert keygrants.KeyManager is KeyManager and keygrants.SyncKeyManager is SyncKeyManager
    km = KeyManager.from_uri(f"local://{key_file}")
    assert isinstance(km.get_provider("local"), LocalKeyProvider)
    assert "initialized=False" in repr(km)
    with pytest.raises(KeyNotFoundError):
        km.get_provider("vault")


# -- initialize -----------------------------------------------------------------------------------

async def test_initialize_makes_exactly_one_key_operation(counting: Any) -> None:
    km = KeyManager({"local": counting})
    assert not km.is_initialized
    with pytest.raises(EncryptionError, match="initialize"):
        km.local_encrypt(b"x")
    await asyncio.gather(km.initialize(), km.initialize(), km.initialize())
    assert km.is_initialized
    assert counting.calls["generate_data_key"] == 1 and counting.key_operations == 1
    assert counting.calls["initialize"] == 1
    await km.initialize()
    assert counting.key_operations == 1


async def test_hot_path_never_calls_the_provider(counting: Any) -> None:
    km = KeyManager({"local": counting})
    await km.initialize()
    before = counting.key_operations
    for i in range(200):
        data = bytes([i]) * i
        assert km.local_decrypt(km.local_encrypt(data, context=CTX), context=CTX) == data
    assert counting.key_operations == before


async def test_initialization_timeout(counting: Any) -> None:
    counting.delay["generate_data_key"] = 5
    km = KeyManager({"local": counting}, initialization_timeout=0.05)
    with pytest.raises(ProviderConnectionError, match=r"within 0\.05 s"):
        await km.initialize()
    assert not km.is_initialized
    counting.delay.clear()
    counting.delay["initialize"] = 5
    with pytest.raises(ProviderConnectionError):
        await KeyManager({"local": counting}, initialization_timeout=0.05).initialize()


async def test_provider_failures_are_translated(counting: Any) -> None:
    counting.fail["generate_data_key"] = ConnectionRefusedError("refused")
    with pytest.raises(ProviderConnectionError):
        await KeyManager({"local": counting}).initialize()
    counting.fail["generate_data_key"] = KeyNotFoundError("no such key")
    with pytest.raises(KeyNotFoundError):
        await KeyManager({"local": counting}).initialize()


async def test_operation_timeout(counting: Any) -> None:
    km = KeyManager({"local": counting}, operation_timeout=0.05)
    counting.delay["generate_data_key"] = 5
    with pytest.raises(ProviderConnectionError):
        await km.encrypt(b"x")


# -- rotation ------------------------------------------------------------------------------------

async def test_rotation_keeps_old_ciphertext_decrypting(counting: Any) -> None:
    km = KeyManager({"local": counting})
    await km.initialize()
    first = km.current_data_key_id
    old = [km.local_encrypt(b"old %d" % i, context=CTX) for i in range(3)]
    new_id = await km.rotate_data_key()
    assert new_id == km.current_data_key_id != first
    assert KeyManager.data_key_id_of(km.local_encrypt(b"new")) == new_id
    assert KeyManager.data_key_id_of(old[0]) == first
    assert [km.local_decrypt(c, context=CTX) for c in old] == [b"old 0", b"old 1", b"old 2"]
    assert counting.calls["generate_data_key"] == 2 and counting.calls["decrypt"] == 0


async def test_rotation_concurrent_with_encryptions(counting: Any) -> None:
    km = KeyManager({"local": counting})
    await km.initialize()
    counting.delay["generate_data_key"] = 0.01
    made: list[tuple[bytes, bytes]] = []

    rotations = asyncio.gather(km.rotate_data_key(), km.rotate_data_key())

    async def writer(n: int) -> None:
        i = 0
        while not rotations.done() or i < 20:
            data = b"%d-%d" % (n, i)
            made.append((data, km.local_encrypt(data)))
            i += 1
            await asyncio.sleep(0.001)

    await asyncio.gather(*(writer(n) for n in range(4)), rotations)
    assert counting.calls["generate_data_key"] == 3
    ids = [KeyManager.data_key_id_of(c) for _, c in made]
    # The writers always see the first and the last data key; whether one of them ran while
    # the middle key was current depends on scheduling, so that one is not required.
    assert ids[0] != ids[-1] and len(set(ids)) in (2, 3)
    assert all(km.local_decrypt(c) == d for d, c in made)


async def test_rotation_from_threads_while_encrypting(local: LocalKeyProvider) -> None:
    """The sync facade rotates on its loop thread while other threads encrypt."""
    sync = SyncKeyManager(KeyManager({"local": local}))
    sync.initialize()
    out: list[tuple[bytes, bytes]] = []
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set() or i < 50:
            data = b"%d" % i
            out.append((data, sync.local_encrypt(data)))
            i += 1

    threads = [threading.Thread(target=writer) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for _ in range(3):
            sync.rotate_data_key()
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert all(sync.local_decrypt(c) == d for d, c in out)
    sync.close()


async def test_failed_rotation_keeps_the_current_key(counting: Any) -> None:
    km = KeyManager({"local": counting})
    await km.initialize()
    current = km.current_data_key_id
    counting.fail["generate_data_key"] = ProviderConnectionError("down")
    with pytest.raises(KeyRotationError, match="provider_unavailable"):
        await km.rotate_data_key()
    assert km.current_data_key_id == current
    assert km.local_decrypt(km.local_encrypt(b"still fine")) == b"still fine"


async def test_usage_limit_rotates_in_the_background_then_refuses(counting: Any) -> None:
    km = KeyManager({"local": counting}, data_key_max_uses=8)
    await km.initialize()
    first = km.current_data_key_id
    for _ in range(4):  # half the limit: a rotation is scheduled on the loop
        km.local_encrypt(b"x")
    for _ in range(20):
        await asyncio.sleep(0)
    assert km.current_data_key_id != first
    assert counting.calls["generate_data_key"] == 2
    # If rotation keeps failing, the key is refused past its limit.
    counting.fail["generate_data_key"] = ProviderConnectionError("down")
    with pytest.raises(EncryptionError, match="usage limit"):
        for _ in range(9):
            km.local_encrypt(b"x")
            await asyncio.sleep(0)


async def test_rotate_if_due_and_policy(counting: Any) -> None:
    clock = Clock()
    km = KeyManager({"local": counting}, rotation_period=timedelta(hours=6), clock=clock)
    assert km.get_rotation_policy().last_rotation is None
    await km.initialize()
    policy = km.get_rotation_policy()
    assert policy.enabled and policy.rotation_period_days == 1
    assert policy.last_rotation == clock.now and policy.next_rotation == clock.now + timedelta(hours=6)
    assert not await km.rotate_if_due()
    clock.now += timedelta(hours=6)
    assert await km.rotate_if_due()
    assert km.get_rotation_policy().last_rotation == clock.now
    assert not KeyManager({"local": counting}).get_rotation_policy().enabled
    provider_policy = await km.get_provider_rotation_policy()
    assert provider_policy.rotation_period_days == 90


# -- sharing data keys ---------------------------------------------------------------------------

async def test_evicted_keys_are_unwrapped_again_on_demand(counting: Any) -> None:
    km = KeyManager({"local": counting}, max_cached_data_keys=2)
    await km.initialize()
    oldest = km.local_encrypt(b"oldest")
    for _ in range(3):
        await km.rotate_data_key()
    with pytest.raises(DecryptionError):
        km.local_decrypt(oldest)  # evicted: the sync path never calls the provider
    assert counting.calls["decrypt"] == 0
    assert await km.local_decrypt_fetching(oldest) == b"oldest"
    assert counting.calls["decrypt"] == 1
    assert km.local_decrypt(oldest) == b"oldest"  # cached again


async def test_a_second_process_imports_the_wrapped_keys(key_file: Path, counting_cls: Any) -> None:
    a = KeyManager({"local": LocalKeyProvider(key_file)})
    await a.initialize()
    ct = a.local_encrypt(b"shared", context=CTX)
    field = await a.encrypt_field("field")
    exported = json.loads(json.dumps(a.export_data_keys()))  # e.g. through a config store
    b_provider = counting_cls(LocalKeyProvider(key_file))  # same provider key, another process
    b = KeyManager({"local": b_provider})
    with pytest.raises(DecryptionError):
        await b.local_decrypt_fetching(ct, context=CTX)  # not known yet
    assert b.import_data_keys(exported) == 1
    assert b.import_data_keys(exported) == 0
    assert not b.has_data_key(exported[0]["id"])
    results = await asyncio.gather(*(b.local_decrypt_fetching(ct, context=CTX) for _ in range(5)))
    assert results == [b"shared"] * 5
    assert b_provider.calls["decrypt"] == 1  # concurrent first uses share one unwrap
    assert b.has_data_key(exported[0]["id"])
    assert b.local_decrypt(ct, context=CTX) == b"shared"
    assert await b.decrypt_field(field) == "field"


async def test_export_holds_no_plaintext_key(fixed_cls: Any) -> None:
    key = bytes(range(32))
    km = KeyManager({"fixed": fixed_cls(key, b"wrapped")})
    await km.initialize()
    text = json.dumps(km.export_data_keys())
    import base64

    for form in (key.hex(), base64.b64encode(key).decode(), str(key)):
        assert form not in text
    assert key.hex() not in repr(km) and key.hex() not in repr(km._current)


async def test_import_checks_ids_and_shapes(local: LocalKeyProvider) -> None:
    km = KeyManager({"local": local})
    await km.initialize()
    entry = km.export_data_keys()[0]
    other = KeyManager({"local": local})
    with pytest.raises(ValueError, match="does not match"):
        other.import_data_keys([{**entry, "id": "00" * 16}])
    with pytest.raises(ValueError):
        other.import_data_keys([{"id": entry["id"]}])
    with pytest.raises(ValueError):
        other.import_data_keys([{"wrapped_key": {"ciphertext": "!!"}}])


def _fake_wrapped(km: KeyManager, n: int) -> dict[str, Any]:
    """An exported entry for a data key that was never made (import makes no provider call)."""
    ref = KeyReference("local", km.get_provider().default_key_id or "")
    wrapped = EncryptedData(ciphertext=n.to_bytes(8, "big") * 6, key_reference=ref,
                            algorithm="AES_256_GCM", encrypted_at=datetime(2030, 1, 1, tzinfo=UTC))
    return {"wrapped_key": wrapped.to_dict()}


async def test_export_is_a_snapshot(local: LocalKeyProvider, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever runs while the export is built (another thread importing, the loop thread
    unwrapping or evicting) changes the manager, never the export being built."""
    km = KeyManager({"local": local}, max_cached_data_keys=1)
    await km.initialize()
    first, second = _fake_wrapped(km, 1), _fake_wrapped(km, 2)
    km.import_data_keys([first, second])
    real_to_dict = EncryptedData.to_dict
    meddled: list[int] = []

    def meddling_to_dict(self: EncryptedData) -> dict[str, Any]:
        if not meddled and real_to_dict(self) == first["wrapped_key"]:
            # Mid-export: a new key is imported and an imported one is unwrapped.
            meddled.append(1)
            km.import_data_keys([_fake_wrapped(km, 3), _fake_wrapped(km, 4)])
            unwrapped = EncryptedData.from_dict(second["wrapped_key"])
            km._remember(km_mod._DataKey(bytes(32), unwrapped, datetime.now(UTC), 2, None))
        return real_to_dict(self)

    monkeypatch.setattr(EncryptedData, "to_dict", meddling_to_dict)
    exported = km.export_data_keys()
    assert meddled
    monkeypatch.undo()
    assert len(exported) == 3  # the current key and the two imported ones, as they were
    assert len({e["id"] for e in exported}) == 3
    assert len(km.export_data_keys()) == 5


def test_export_while_other_threads_import(local: LocalKeyProvider) -> None:
    """The reviewer's reproduction: exports in this thread, imports in another."""
    with SyncKeyManager(KeyManager({"local": local}, max_cached_data_keys=4)) as km:
        errors: list[BaseException] = []
        done = threading.Event()

        def importer() -> None:
            try:
                for n in range(3000):
                    km.import_data_keys([_fake_wrapped(km.manager, n)])
            except BaseException as exc:
                errors.append(exc)
            finally:
                done.set()

        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)
        try:
            thread = threading.Thread(target=importer)
            thread.start()
            while not done.is_set():
                km.export_data_keys()
            thread.join()
        finally:
            sys.setswitchinterval(interval)
        assert errors == []
        assert len(km.export_data_keys()) == 1 + 4 * 16  # the current key + the wrapped limit


async def test_a_shared_store_needs_no_import(key_file: Path) -> None:
    store = MemoryDataKeyStore()
    a = KeyManager({"local": LocalKeyProvider(key_file)}, data_key_store=store)
    b = KeyManager({"local": LocalKeyProvider(key_file)}, data_key_store=store)
    await a.initialize()
    assert len(store) == 1  # published before first use
    ct = a.local_encrypt(b"via store")
    await a.rotate_data_key()
    ct2 = a.local_encrypt(b"after rotation")
    assert len(store) == 2
    assert await b.local_decrypt_fetching(ct) == b"via store"
    assert await b.local_decrypt_fetching(ct2) == b"after rotation"


async def test_a_store_returning_a_foreign_key_is_ignored(local: LocalKeyProvider) -> None:
    store = MemoryDataKeyStore()
    a = KeyManager({"local": local}, data_key_store=store)
    await a.initialize()
    ct = a.local_encrypt(b"x")
    dk_id = KeyManager.data_key_id_of(ct)
    impostor = await local.encrypt(b"k" * 32, context=dict(DATA_KEY_CONTEXT))
    await store.put(dk_id, impostor)  # an attacker rewrites the store entry
    b = KeyManager({"local": local}, data_key_store=store)
    with pytest.raises(DecryptionError):
        await b.local_decrypt_fetching(ct)


async def test_only_keys_wrapped_as_data_keys_load(local: LocalKeyProvider) -> None:
    """Another 32-byte secret under the same provider key cannot pose as a data key."""
    km = KeyManager({"local": local})
    secret = await local.encrypt(b"s" * 32, context={"purpose": "api-token"})
    with pytest.raises(DecryptionError):
        await km.load_data_key(secret)
    short = await local.encrypt(b"s" * 16, context=dict(DATA_KEY_CONTEXT))
    with pytest.raises(DecryptionError):
        await km.load_data_key(short)
    good = await local.generate_data_key(context=dict(DATA_KEY_CONTEXT))
    dk_id = await km.load_data_key(good.encrypted_key)
    assert km.has_data_key(dk_id) and not km.has_data_key("zz")


async def test_decrypt_never_opens_a_wrapped_data_key_or_root_key(local: LocalKeyProvider) -> None:
    """A wrapped data key is not secret (exported, kept in a shared store): copied into a
    record that the application decrypts, it used to come back in clear, and with it every
    local and field ciphertext. So did a server root key wrapped by the seal."""
    km = KeyManager({"local": local})
    await km.initialize()
    ciphertext = km.local_encrypt(b"session secret", context={"tenant": "42"})
    wrapped = EncryptedData.from_dict(km.export_data_keys()[0]["wrapped_key"])
    with pytest.raises(DecryptionError):
        await km.decrypt(wrapped)
    with pytest.raises(DecryptionError):
        await km.decrypt(wrapped, context=dict(DATA_KEY_CONTEXT))
    root = await local.encrypt(b"r" * 32, context={"keygrants-seal": "00"})
    with pytest.raises(DecryptionError):
        await km.decrypt(root)
    for reserved in (dict(DATA_KEY_CONTEXT), {"keygrants-seal": "00", "a": "b"}):
        with pytest.raises(InvalidRequest, match="reserved"):
            await km.encrypt(b"x", context=reserved)
        with pytest.raises(InvalidRequest, match="reserved"):
            await km.generate_data_key(context=reserved)
    assert km.local_decrypt(ciphertext, context={"tenant": "42"}) == b"session secret"
    other = await local.encrypt(b"other", context={"purpose": "api-token"})
    assert await km.decrypt(other) == b"other"  # a provider's own records still open


# -- per-request path ------------------------------------------------------------------------------

async def test_encrypt_decrypt_one_provider_call_each(counting: Any) -> None:
    km = KeyManager({"local": counting})
    enc = await km.encrypt(b"card 4111", context=CTX)
    assert counting.calls["generate_data_key"] == 1 and counting.key_operations == 1
    assert enc.context == CTX and enc.algorithm == km_mod.ENVELOPE_ALGORITHM
    assert b"card 4111" not in enc.ciphertext
    again = EncryptedData.from_dict(json.loads(json.dumps(enc.to_dict())))
    assert await km.decrypt(again) == b"card 4111"
    assert counting.calls["decrypt"] == 1 and counting.key_operations == 2
    with pytest.raises(DecryptionError):
        await km.decrypt(enc, context={"tenant": "43"})
    big = bytes(range(256)) * 4096
    assert await km.decrypt(await km.encrypt(big)) == big  # larger than any provider accepts


async def test_encrypt_limits(local: LocalKeyProvider, monkeypatch: pytest.MonkeyPatch) -> None:
    km = KeyManager({"local": local})
    monkeypatch.setattr(km_mod, "MAX_ENVELOPE_PLAINTEXT", 16)
    with pytest.raises(PayloadTooLarge):
        await km.encrypt(b"x" * 17)
    with pytest.raises(TypeError):
        await km.encrypt("text")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest):
        await km.encrypt(b"x", context={"k": 1})  # type: ignore[dict-item]
    with pytest.raises(KeyNotFoundError):
        await km.encrypt(b"x", provider="nope")
    with pytest.raises(KeyNotFoundError):
        await km.encrypt(b"x", key_id="another-key")


async def test_decrypt_routes_to_the_provider_that_made_it(tmp_path: Path) -> None:
    a, b = LocalKeyProvider(tmp_path / "a"), LocalKeyProvider(tmp_path / "b")
    km = KeyManager({"a": a, "b": b}, "a")
    from_b = await km.encrypt(b"from b", provider="b")
    assert from_b.key_reference.key_id == b.default_key_id
    assert await km.decrypt(from_b) == b"from b"
    direct = await b.encrypt(b"direct", context=CTX)  # a provider's own EncryptedData
    assert await km.decrypt(direct) == b"direct"
    alone = KeyManager({"a": a})
    # the only local provider holds another key: said plainly, not tried and failed
    with pytest.raises(KeyNotFoundError, match="no provider in this KeyManager holds 'local' key"):
        await alone.decrypt(from_b)


class RegionalProvider(KeyProvider):
    """A provider kind shaped like AWS KMS: opened by alias, it records the key's own id
    (``regional:REGION:key/1``) with the alias in ``key_alias``, and its backend does not know
    another region's keys (KeyNotFoundError). The key is a local key file per region."""

    name = "regional"

    def __init__(self, directory: Path, region: str, alias: str) -> None:
        self.inner = LocalKeyProvider(directory / f"{region}.key")
        self.default_key_id = alias
        self.key_arn = f"regional:{region}:key/1"
        self.uri = f"regional://{alias}?region={region}"
        self.decrypted = 0

    async def encrypt(self, plaintext: bytes, *, key_id: str | None = None,
                      context: Mapping[str, str] | None = None) -> EncryptedData:
        assert key_id in (None, self.default_key_id, self.key_arn)
        enc = await self.inner.encrypt(plaintext, context=context)
        if key_id in (None, self.default_key_id):
            self._resolved_key_id = self.key_arn
        ref = KeyReference(provider=self.name, key_id=self.key_arn,
                           key_alias=key_id or self.default_key_id)
        return dataclasses.replace(enc, key_reference=ref)

    async def decrypt(self, encrypted: EncryptedData, *,
                      context: Mapping[str, str] | None = None) -> bytes:
        if encrypted.key_reference.key_id != self.key_arn:
            raise KeyNotFoundError("regional: key not found (decrypt)")
        self.decrypted += 1
        inner = KeyReference(provider="local", key_id=self.inner.default_key_id or "")
        return await self.inner.decrypt(dataclasses.replace(encrypted, key_reference=inner),
                                        context=context)


async def test_providers_of_one_kind_opened_by_alias_each_get_their_own_records(
        tmp_path: Path) -> None:
    us = RegionalProvider(tmp_path, "us", "alias/app-us")
    eu = RegionalProvider(tmp_path, "eu", "alias/app-eu")
    km = KeyManager({"us": us, "eu": eu}, "us")
    await km.initialize()
    enc = await km.encrypt(b"eu data", provider="eu", context=CTX)
    assert (enc.key_reference.key_id, enc.key_reference.key_alias) == (eu.key_arn, "alias/app-eu")
    assert await km.decrypt(enc) == b"eu data"
    field = await km.encrypt_field("eu field", provider="eu", context=CTX)
    assert await km.decrypt_field(field, context=CTX) == "eu field"
    # another process: providers that have made no call yet know only their alias
    us2 = RegionalProvider(tmp_path, "us", "alias/app-us")
    eu2 = RegionalProvider(tmp_path, "eu", "alias/app-eu")
    other = KeyManager({"us": us2, "eu": eu2}, "us")
    other.import_data_keys(km.export_data_keys())
    assert await other.decrypt(enc) == b"eu data"
    assert await other.decrypt_field(field, context=CTX) == "eu field"
    assert (us2.decrypted, eu2.decrypted) == (0, 2)


async def test_a_record_several_providers_could_hold_goes_to_the_default_or_is_refused(
        tmp_path: Path) -> None:
    # Same alias, different backends, no call made yet: nothing in the record tells them apart.
    r1 = RegionalProvider(tmp_path, "r1", "alias/same")
    r2 = RegionalProvider(tmp_path, "r2", "alias/same")
    enc = await RegionalProvider(tmp_path, "r2", "alias/same").encrypt(b"x")
    first = LocalKeyProvider(tmp_path / "first")
    with pytest.raises(KeyNotFoundError, match="r1, r2 could each hold"):
        await KeyManager({"first": first, "r1": r1, "r2": r2}, "first").decrypt(enc)
    assert await KeyManager({"r1": r1, "r2": r2}, "r2").decrypt(enc) == b"x"


async def test_decrypt_caps_a_provider_native_record(counting: Any) -> None:
    """A provider's own EncryptedData over MAX_WRAPPED_KEY_SIZE never reaches the provider."""
    km = KeyManager({"local": counting})
    direct = await counting.inner.encrypt(b"direct")
    huge = EncryptedData(ciphertext=direct.ciphertext + bytes(km_mod.MAX_WRAPPED_KEY_SIZE),
                         key_reference=direct.key_reference, algorithm=direct.algorithm)
    with pytest.raises(DecryptionError):
        await km.decrypt(huge)
    assert counting.calls["decrypt"] == 0
    at_limit = EncryptedData(ciphertext=bytes(km_mod.MAX_WRAPPED_KEY_SIZE),
                             key_reference=direct.key_reference, algorithm=direct.algorithm)
    with pytest.raises(DecryptionError):
        await km.decrypt(at_limit)  # sent: the provider finds it invalid
    assert counting.calls["decrypt"] == 1
    assert await km.decrypt(direct) == b"direct"


async def test_generate_data_key(local: LocalKeyProvider) -> None:
    km = KeyManager({"local": local})
    pair = await km.generate_data_key(None, context=CTX)
    assert len(pair.plaintext_key) == 32 and pair.plaintext_key.hex() not in repr(pair)
    assert await local.decrypt(pair.encrypted_key) == pair.plaintext_key
    with pytest.raises(ValueError):
        await km.generate_data_key(None, "AES_128")


# -- fields -------------------------------------------------------------------------------------------

async def test_fields_round_trip_with_their_types(counting: Any) -> None:
    km = KeyManager({"local": counting})
    await km.initialize()
    ctx = {"table": "users", "column": "email", "id": "7"}
    for value, ftype in (("ada@example.org", "text"), (b"\x00\x01", "bytes"),
                         ({"a": [1, 2.5, None, True, "é"]}, "json"), ("", "text")):
        ct = await km.encrypt_field(value, field_type=ftype, context=ctx)
        assert await km.decrypt_field(ct, context=ctx) == value
        assert await km.decrypt_field(ct, context=ctx, field_type=ftype) == value
        with pytest.raises(DecryptionError):
            await km.decrypt_field(ct, context={**ctx, "id": "8"})  # moved to another row
    assert counting.key_operations == 1  # only initialize's data key


async def test_field_misuse(local: LocalKeyProvider) -> None:
    km = KeyManager({"local": local})
    with pytest.raises(EncryptionError, match="initialize"):
        await km.encrypt_field("x")
    await km.initialize()
    with pytest.raises(TypeError):
        await km.encrypt_field(b"x", field_type="text")
    with pytest.raises(TypeError):
        await km.encrypt_field("x", field_type="bytes")
    with pytest.raises(TypeError):
        await km.encrypt_field({"n": float("nan")}, field_type="json")
    with pytest.raises(ValueError):
        await km.encrypt_field("x", field_type="xml")  # type: ignore[arg-type]
    ct = await km.encrypt_field("x")
    with pytest.raises(DecryptionError):
        await km.decrypt_field(ct, field_type="json")


async def test_fields_under_another_provider_get_their_own_data_key(tmp_path: Path,
                                                                    counting_cls: Any) -> None:
    a = counting_cls(LocalKeyProvider(tmp_path / "a"))
    b = counting_cls(LocalKeyProvider(tmp_path / "b"))
    km = KeyManager({"a": a, "b": b}, "a")
    await km.initialize()
    cts = await asyncio.gather(*(km.encrypt_field("v", provider="b") for _ in range(5)))
    assert b.calls["generate_data_key"] == 1  # created once, then cached
    assert KeyManager.data_key_id_of(cts[0]) != km.current_data_key_id
    await km.rotate_data_key()  # rotates every data key in use
    assert a.calls["generate_data_key"] == 2 and b.calls["generate_data_key"] == 2
    assert all([await km.decrypt_field(c) == "v" for c in cts])


# -- lifecycle and sync facade ----------------------------------------------------------------------

async def test_close_forgets_keys_and_closes_providers(counting: Any) -> None:
    async with KeyManager({"local": counting}) as km:
        ct = km.local_encrypt(b"x")
        assert km.is_initialized
    assert not km.is_initialized and counting.calls["close"] == 1
    with pytest.raises(DecryptionError):
        km.local_decrypt(ct)


def test_sync_facade(local: LocalKeyProvider) -> None:
    with SyncKeyManager(KeyManager({"local": local})) as km:
        assert km.is_initialized
        ct = km.local_encrypt(b"sync", context=CTX)
        assert km.local_decrypt(ct, context=CTX) == b"sync"
        enc = km.encrypt(b"per request", context=CTX)
        assert km.decrypt(enc) == b"per request"
        field = km.encrypt_field({"k": "v"}, field_type="json")
        assert km.decrypt_field(field) == {"k": "v"}
        assert km.decrypt_field(field, field_type="json") == {"k": "v"}
        with pytest.raises(DecryptionError):
            km.decrypt_field(field, field_type="text")
        assert len(km.generate_data_key().plaintext_key) == 32
        first = km.export_data_keys()
        km.rotate_data_key()
        assert km.local_decrypt(ct, context=CTX) == b"sync"
        assert not km.rotate_if_due() and not km.get_rotation_policy().enabled
        other = SyncKeyManager(KeyManager({"local": local}))
        assert other.import_data_keys(first) == 1
        assert other.local_decrypt_fetching(ct, context=CTX) == b"sync"
        assert other.load_data_key(EncryptedData.from_dict(first[0]["wrapped_key"]))
        other.close()
    with pytest.raises(TypeError):
        SyncKeyManager(object())  # type: ignore[arg-type]


def test_sync_facade_offers_every_operation(counting: Any) -> None:
    def public(cls: type) -> set[str]:
        return {n for n in dir(cls) if not n.startswith("_")}

    assert public(SyncKeyManager) == public(KeyManager)
    with SyncKeyManager(KeyManager({"local": counting})) as km:
        assert km.providers == {"local": counting} and km.get_provider() is counting
        assert km.get_provider("local") is counting
        with pytest.raises(KeyNotFoundError):
            km.get_provider("nope")
        ct = km.local_encrypt(b"x")
        assert km.current_data_key_id is not None
        assert km.data_key_id_of(ct) == SyncKeyManager.data_key_id_of(ct) == km.current_data_key_id
        assert km.has_data_key(km.current_data_key_id) and not km.has_data_key("00" * 16)
        policy = km.get_provider_rotation_policy()
        assert policy == RotationPolicy(enabled=True, rotation_period_days=90)
        assert counting.calls["get_rotation_policy"] == 1


def test_sync_facade_without_initialize_is_refused(local: LocalKeyProvider) -> None:
    km = SyncKeyManager(KeyManager({"local": local}))
    with pytest.raises(EncryptionError):
        km.local_encrypt(b"x")
    with pytest.raises(EncryptionError):
        km.encrypt_field("x")
    km.close()
    km.close()  # idempotent


def test_errors_belong_to_the_kms_family() -> None:
    for cls in (DecryptionError, EncryptionError, KeyRotationError, ProviderConnectionError,
                KeyNotFoundError):
        assert issubclass(cls, KMSError)
    # as docs/keymanager.md says: bad input is not a KMSError, but still a KeygrantsError
    for cls in (PayloadTooLarge, InvalidRequest):
        assert issubclass(cls, keygrants.errors.KeygrantsError) and not issubclass(cls, KMSError)
