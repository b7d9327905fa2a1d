"""The ``local:`` key provider: URI forms, key file handling, its ciphertext pinned, negatives."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

import keygrants.providers.local as local_mod
from keygrants.errors import (
    DecryptionError,
    InvalidCiphertext,
    KeyNotFoundError,
    PayloadTooLarge,
    ProviderConnectionError,
    UnsealFailed,
)
from keygrants.providers import (
    ProviderSeal,
    open_provider,
    open_root_provider,
    registered_schemes,
)
from keygrants.providers.local import NEW_SALTS_PER_MINUTE, KeyFileProvider, LocalKeyProvider
from keygrants.providers.models import EncryptedData

pytestmark = pytest.mark.anyio

PASS = "correct horse battery staple"
FILE_KEY = bytes(range(32))
NONCE = bytes.fromhex("b0b1b2b3b4b5b6b7b8b9babb")
CONTEXT = {"tenant": "42", "app": "billing"}
CANONICAL = b'{"app":"billing","tenant":"42"}'
# Computed once with the independent reference below; a format or derivation change fails here.
PINNED_KEY_FILE = bytes.fromhex(
    "01"  # format: key file v1
    "b0b1b2b3b4b5b6b7b8b9babb"  # nonce
    "6c50f5d43c533e"  # AES-256-GCM("payload")
    "92499f0aaf0b98494d6af7e05e566586"  # tag
)


def _hkdf(secret: bytes, info: bytes, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(secret)


def _write_key(path: Path, key: bytes = FILE_KEY) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    return path


def _fixed_nonce(monkeypatch: pytest.MonkeyPatch, nonce: bytes = NONCE) -> None:
    real = local_mod.nonce_bytes

    def fake(n: int) -> bytes:
        return nonce if n == len(nonce) else real(n)

    monkeypatch.setattr(local_mod, "nonce_bytes", fake)


# -- URI forms and key files ------------------------------------------------------------------

def test_local_is_registered_for_both_ports(tmp_path: Path) -> None:
    assert "local" in registered_schemes()
    p = open_provider(f"local://{tmp_path / 'k'}")
    assert isinstance(p, LocalKeyProvider) and p.name == "local"
    assert p.uri == f"local://{(tmp_path / 'k').resolve()}"
    # The seal keeps its dedicated implementation.
    assert isinstance(open_root_provider(f"local://{tmp_path / 'k'}"), KeyFileProvider)


async def test_key_file_created_0600_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "kek"
    p = LocalKeyProvider(path)
    assert path.stat().st_mode & 0o777 == 0o600 and len(path.read_bytes()) == 32
    enc = await p.encrypt(b"secret", context=CONTEXT)
    again = open_provider(f"local://{path}")
    assert await again.decrypt(enc) == b"secret"
    assert again.default_key_id == p.default_key_id
    assert p.default_key_id is not None and p.default_key_id.startswith("key-file:")


def test_key_file_refusals(tmp_path: Path) -> None:
    path = tmp_path / "kek"
    path.write_bytes(os.urandom(32))
    path.chmod(0o640)
    with pytest.raises(ProviderConnectionError, match="chmod 600"):
        LocalKeyProvider(path)
    path.chmod(0o600)
    path.write_bytes(b"short")
    with pytest.raises(ProviderConnectionError, match="32-byte"):
        LocalKeyProvider(path)
    with pytest.raises(ProviderConnectionError, match="cannot create"):
        LocalKeyProvider(tmp_path / "missing-dir" / "kek")


def test_uri_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    rel = open_provider("local:rel.key")
    assert isinstance(rel, LocalKeyProvider) and (tmp_path / "rel.key").exists()
    monkeypatch.delenv("KEYGRANTS_PASSPHRASE", raising=False)
    # configuration the constructor can judge: ValueError, like every provider's
    with pytest.raises(ValueError, match="KEYGRANTS_PASSPHRASE"):
        open_provider("local:passphrase")
    with pytest.raises(ValueError, match="at least 12"):
        open_provider("local:passphrase", passphrase="short")
    p = open_provider("local:passphrase", passphrase=PASS)
    assert p.uri == "local:passphrase" and p.default_key_id == "passphrase"
    monkeypatch.setenv("KEYGRANTS_PASSPHRASE", PASS)
    assert open_provider("local:passphrase").uri == "local:passphrase"
    with pytest.raises(ValueError, match="key file path"):
        open_provider("local:")
    with pytest.raises(ValueError, match="only applies"):
        open_provider(f"local://{tmp_path / 'k'}", passphrase=PASS)
    with pytest.raises(ValueError):
        LocalKeyProvider(tmp_path / "k", passphrase=PASS)
    assert PASS not in repr(p) and "passphrase" in repr(p)


@pytest.mark.parametrize("suffix", ["?foo=1", "?timeout=5", "?", "#k", "?passphrase=x"])
def test_a_query_or_fragment_is_refused_not_taken_as_the_file_name(
        tmp_path: Path, suffix: str) -> None:
    with pytest.raises(ValueError, match="takes no URI options") as info:
        open_provider(f"local://{tmp_path / 'kek'}{suffix}")
    assert "passphrase=x" not in str(info.value)
    with pytest.raises(ValueError, match="takes no URI options"):
        open_provider(f"local:passphrase{suffix}", passphrase=PASS)
    assert list(tmp_path.iterdir()) == []  # no key file made, under any name


# -- the ciphertext, byte for byte ---------------------------------------------------------------

def _reference_key_file_ciphertext(file_key: bytes, nonce: bytes, plaintext: bytes,
                                   canonical: bytes) -> bytes:
    key = _hkdf(file_key, b"keygrants local provider v1\x00key-file")
    return b"\x01" + nonce + AESGCM(key).encrypt(nonce, plaintext, b"\x01" + canonical)


async def test_key_file_ciphertext_is_pinned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = LocalKeyProvider(_write_key(tmp_path / "kek"))
    _fixed_nonce(monkeypatch)
    enc = await p.encrypt(b"payload", context=CONTEXT)
    assert enc.ciphertext == _reference_key_file_ciphertext(FILE_KEY, NONCE, b"payload", CANONICAL)
    assert enc.ciphertext == PINNED_KEY_FILE
    assert enc.algorithm == "AES_256_GCM" and enc.context == CONTEXT
    fingerprint = _hkdf(FILE_KEY, b"keygrants local provider v1\x00key id", 8).hex()
    assert enc.key_reference.provider == "local"
    assert enc.key_reference.key_id == f"key-file:{fingerprint}"


async def test_provider_key_is_separated_from_the_file_key(tmp_path: Path) -> None:
    """The same file serves as seal and provider without the two sharing a key."""
    path = _write_key(tmp_path / "kek")
    p = LocalKeyProvider(path)
    enc = await p.encrypt(b"x")
    with pytest.raises(InvalidTag):  # the raw file key must not open it
        AESGCM(FILE_KEY).decrypt(enc.ciphertext[1:13], enc.ciphertext[13:], b"\x01")
    seal_blob = KeyFileProvider(path).wrap(b"root key material 32 bytes long!", aad=b"")
    forged = EncryptedData(ciphertext=seal_blob, key_reference=enc.key_reference,
                           algorithm="AES_256_GCM")
    with pytest.raises(DecryptionError):
        await p.decrypt(forged, context={})


async def test_every_flipped_bit_and_truncation_fails(tmp_path: Path) -> None:
    p = LocalKeyProvider(tmp_path / "kek")
    enc = await p.encrypt(b"payload!", context=CONTEXT)
    ct = enc.ciphertext
    for i in range(len(ct)):
        for bit in (0x01, 0x80):
            bad = ct[:i] + bytes([ct[i] ^ bit]) + ct[i + 1:]
            with pytest.raises(DecryptionError):
                await p.decrypt(EncryptedData(bad, enc.key_reference, enc.algorithm,
                                              context=CONTEXT))
    for n in range(len(ct)):
        with pytest.raises(DecryptionError):
            await p.decrypt(EncryptedData(ct[:n], enc.key_reference, enc.algorithm, context=CONTEXT))


async def test_context_is_bound(tmp_path: Path) -> None:
    p = LocalKeyProvider(tmp_path / "kek")
    enc = await p.encrypt(b"v", context=CONTEXT)
    assert await p.decrypt(enc) == b"v"  # the recorded context by default
    assert await p.decrypt(enc, context={"app": "billing", "tenant": "42"}) == b"v"
    for ctx in ({}, {"tenant": "43", "app": "billing"}, {**CONTEXT, "x": "y"}):
        with pytest.raises(DecryptionError):
            await p.decrypt(enc, context=ctx)
    # A record whose context was edited fails the same way.
    edited = EncryptedData(enc.ciphertext, enc.key_reference, enc.algorithm, context={"tenant": "43"})
    with pytest.raises(DecryptionError):
        await p.decrypt(edited)


async def test_metadata_mismatches_and_another_key_fail_opaquely(tmp_path: Path) -> None:
    p = LocalKeyProvider(tmp_path / "a")
    other = LocalKeyProvider(tmp_path / "b")
    enc = await p.encrypt(b"v")
    with pytest.raises(DecryptionError):
        await other.decrypt(enc)
    # Same bytes, key reference pointing at the other key: still only the right key opens it.
    moved = EncryptedData(enc.ciphertext, other.reference(None), enc.algorithm)
    with pytest.raises(DecryptionError):
        await other.decrypt(moved)
    for alg in ("AES_128_GCM", ""):
        with pytest.raises(DecryptionError):
            await p.decrypt(EncryptedData(enc.ciphertext, enc.key_reference, alg))
    errors: set[str] = set()
    for bad in (b"", b"\x01", b"\x09" + enc.ciphertext[1:], enc.ciphertext + b"\x00"):
        try:
            await p.decrypt(EncryptedData(bad, enc.key_reference, enc.algorithm))
        except DecryptionError as exc:
            assert isinstance(exc, InvalidCiphertext)
            errors.add(str(exc))
    assert len(errors) == 1


async def test_limits_and_key_ids(tmp_path: Path) -> None:
    p = LocalKeyProvider(tmp_path / "kek")
    assert await p.decrypt(await p.encrypt(b"x" * 4096)) == b"x" * 4096
    with pytest.raises(PayloadTooLarge):
        await p.encrypt(b"x" * 4097)
    with pytest.raises(KeyNotFoundError):
        await p.encrypt(b"x", key_id="another")
    assert (await p.encrypt(b"x", key_id=p.default_key_id)).key_reference.key_id == p.default_key_id
    with pytest.raises(TypeError):
        await p.encrypt("text")  # type: ignore[arg-type]


async def test_data_keys(tmp_path: Path) -> None:
    p = LocalKeyProvider(tmp_path / "kek")
    pair = await p.generate_data_key(context={"purpose": "x"})
    assert len(pair.plaintext_key) == 32 and pair.plaintext_key.hex() not in repr(pair)
    assert str(pair.plaintext_key) not in repr(pair)
    assert await p.decrypt(pair.encrypted_key) == pair.plaintext_key


def test_usable_as_a_seal(tmp_path: Path) -> None:
    """Synchronous: ProviderSeal runs the provider on its own event loop."""
    p = LocalKeyProvider(tmp_path / "kek")
    seal = ProviderSeal(p)
    blob = seal.wrap(b"root", aad=b"aad")
    assert seal.unwrap(blob, aad=b"aad") == b"root"
    with pytest.raises(UnsealFailed):
        seal.unwrap(blob, aad=b"other")


# -- passphrase mode -----------------------------------------------------------------------------

async def test_passphrase_round_trip_across_instances() -> None:
    """Real scrypt (N=2**17): each instance derives once per salt, then caches."""
    a = LocalKeyProvider(passphrase=PASS)
    await a.initialize()
    enc = await a.encrypt(b"secret", context=CONTEXT)
    ct = enc.ciphertext
    assert ct[0] == 0x02 and ct[17:20] == bytes([17, 8, 1])  # salt, then log2 N, r, p
    b = LocalKeyProvider(passphrase=PASS)  # its own salt: derives a's key on first sight
    assert await b.decrypt(enc) == b"secret"
    with pytest.raises(DecryptionError):
        await LocalKeyProvider(passphrase=PASS + "!").decrypt(enc)


async def test_passphrase_header_is_checked_before_any_derivation(
        monkeypatch: pytest.MonkeyPatch) -> None:
    derivations: list[bytes] = []

    def cheap_scrypt(passphrase: bytes, *, salt: bytes, **_: Any) -> bytes:
        derivations.append(salt)
        return _hkdf(passphrase + salt, b"test")

    monkeypatch.setattr(local_mod, "scrypt_derive", cheap_scrypt)
    p = LocalKeyProvider(passphrase=PASS)
    enc = await p.encrypt(b"v")
    await p.encrypt(b"w")
    assert len(derivations) == 1  # cached for the instance's salt
    ct = enc.ciphertext
    for params in (bytes([22, 8, 1]), bytes([17, 9, 1]), bytes([17, 8, 2])):
        costly = ct[:17] + params + ct[20:]
        with pytest.raises(DecryptionError):
            await p.decrypt(EncryptedData(costly, enc.key_reference, enc.algorithm))
    assert len(derivations) == 1
    # Every salt flip costs one derivation, then fails; none enters the main cache.
    for i in range(NEW_SALTS_PER_MINUTE):
        salted = ct[:1] + bytes([i]) * 16 + ct[17:]
        with pytest.raises(DecryptionError):
            await p.decrypt(EncryptedData(salted, enc.key_reference, enc.algorithm))
    assert len(derivations) == 1 + NEW_SALTS_PER_MINUTE
    assert list(p._derived) == [ct[:20]]
    assert await p.decrypt(enc) == b"v"  # the current salt is never evicted


def _cheap_scrypt(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Replace scrypt with a cheap derivation of the same shape; returns the salts derived."""
    derivations: list[bytes] = []

    def cheap_scrypt(passphrase: bytes, *, salt: bytes, **_: Any) -> bytes:
        derivations.append(salt)
        return _hkdf(passphrase + salt, b"test")

    monkeypatch.setattr(local_mod, "scrypt_derive", cheap_scrypt)
    return derivations


def _resalted(enc: EncryptedData, salt: bytes) -> EncryptedData:
    ct = enc.ciphertext
    return EncryptedData(ct[:1] + salt + ct[17:], enc.key_reference, enc.algorithm)


async def test_junk_salts_never_evict_a_salt_in_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """A foreign salt that opened a record stays cached however many junk salts follow."""
    derivations = _cheap_scrypt(monkeypatch)
    p = LocalKeyProvider(passphrase=PASS)
    await p.initialize()
    other = await LocalKeyProvider(passphrase=PASS).encrypt(b"from another process")
    assert await p.decrypt(other) == b"from another process"
    junk = NEW_SALTS_PER_MINUTE - 1  # all the new-salt limit leaves after `other`
    derived = len(derivations)
    for i in range(junk):
        with pytest.raises(DecryptionError):
            await p.decrypt(_resalted(other, bytes([i]) * 16))
    assert len(derivations) == derived + junk
    assert await p.decrypt(other) == b"from another process"
    assert len(derivations) == derived + junk  # no second derivation
    # A recent junk salt again: remembered as unproven, not derived again.
    with pytest.raises(DecryptionError):
        await p.decrypt(_resalted(other, bytes([junk - 1]) * 16))
    assert len(derivations) == derived + junk


async def test_the_salt_cache_is_least_recently_used(monkeypatch: pytest.MonkeyPatch) -> None:
    derivations = _cheap_scrypt(monkeypatch)
    monkeypatch.setattr(local_mod, "_MAX_DERIVED_KEYS", 3)  # own salt + two foreign ones
    p = LocalKeyProvider(passphrase=PASS)
    await p.initialize()
    first, second, third = [await LocalKeyProvider(passphrase=PASS).encrypt(b"x")
                            for _ in range(3)]
    for enc in (first, second, first):  # `first` is used again after `second`
        assert await p.decrypt(enc) == b"x"
    assert await p.decrypt(third) == b"x"  # evicts `second`, the least recently used
    before = len(derivations)
    assert await p.decrypt(first) == b"x"
    assert len(derivations) == before
    assert await p.decrypt(second) == b"x"
    assert len(derivations) == before + 1


async def test_new_salts_are_limited_per_minute(monkeypatch: pytest.MonkeyPatch) -> None:
    """Beyond NEW_SALTS_PER_MINUTE uncached salts, decrypt refuses before running scrypt."""
    derivations = _cheap_scrypt(monkeypatch)
    now = [1000.0]
    p = LocalKeyProvider(passphrase=PASS, clock=lambda: now[0])
    own = await p.encrypt(b"own")
    other = await LocalKeyProvider(passphrase=PASS).encrypt(b"other")
    derivations.clear()
    # Concurrent first sight of one foreign salt: one derivation, one unit of the limit.
    assert await asyncio.gather(*(p.decrypt(other) for _ in range(10))) == [b"other"] * 10
    for i in range(NEW_SALTS_PER_MINUTE - 1):
        with pytest.raises(DecryptionError):
            await p.decrypt(_resalted(own, bytes([i]) * 16))
    derived = len(derivations)
    assert derived == NEW_SALTS_PER_MINUTE  # `other` once, then the junk
    with pytest.raises(ProviderConnectionError, match="retry later"):
        await p.decrypt(_resalted(own, b"\xee" * 16))
    assert len(derivations) == derived
    # Cached salts are never limited.
    assert await p.decrypt(own) == b"own"
    assert await p.decrypt(other) == b"other"
    assert await p.encrypt(b"more")
    now[0] += 59.0
    with pytest.raises(ProviderConnectionError):
        await p.decrypt(_resalted(own, b"\xee" * 16))
    now[0] += 1.0  # a minute after the first derivations
    with pytest.raises(DecryptionError):
        await p.decrypt(_resalted(own, b"\xee" * 16))
    assert len(derivations) == derived + 1
