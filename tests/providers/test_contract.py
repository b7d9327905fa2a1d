"""The KeyProvider contract, run against every provider and its real backend (or the closest
thing that runs here: moto, OpenBao, SoftHSM2, the fake Cloud KMS, a keygrants server, and
the local key file)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import pytest

from keygrants.errors import (
    DecryptionError,
    KeyNotFoundError,
    PayloadTooLarge,
    ProviderConnectionError,
    UnsealFailed,
    UnsupportedOperation,
)
from keygrants.providers import open_root_provider
from keygrants.providers.base import KeyProvider
from keygrants.providers.models import EncryptedData, KeyReference

if TYPE_CHECKING:
    from conftest import ProviderCase

pytestmark = pytest.mark.anyio

CASES = ["aws-kms", "vault", "pkcs11", "gcp-kms", "keygrants", "local"]
MULTI_KEY = [c for c in CASES if c != "local"]  # local holds a single key
REMOTE = [c for c in CASES if c != "local"]  # a backend that can be missing or unreachable
NETWORK = [c for c in REMOTE if c != "pkcs11"]  # a backend behind a socket
CONTEXT = {"tenant": "42", "purpose": "contract"}
SECRET = b"a 32-byte data key, or a token."


@pytest.fixture(params=CASES)
def case(request: pytest.FixtureRequest) -> ProviderCase:
    """Every provider; tests that only apply to some narrow the list with ``indirect``."""
    name = request.param.replace("-kms", "")
    c: ProviderCase = request.getfixturevalue(f"{name}_case")
    return c


@pytest.fixture
async def provider(case: ProviderCase) -> AsyncIterator[KeyProvider]:
    p = case.open()
    try:
        yield p
    finally:
        await p.close()


def _with(enc: EncryptedData, **changes: object) -> EncryptedData:
    return dataclasses.replace(enc, **changes)  # type: ignore[arg-type]


async def test_round_trip_with_and_without_context(case: ProviderCase,
                                                   provider: KeyProvider) -> None:
    await provider.initialize()
    enc = await provider.encrypt(SECRET, context=CONTEXT)
    assert enc.key_reference.provider == provider.name == case.name
    assert enc.context == CONTEXT and SECRET not in enc.ciphertext
    assert await provider.decrypt(enc) == SECRET
    assert await provider.decrypt(enc, context=dict(reversed(CONTEXT.items()))) == SECRET
    bare = await provider.encrypt(SECRET)
    assert bare.context == {} and await provider.decrypt(bare) == SECRET
    assert bare.ciphertext != enc.ciphertext


async def test_encrypted_data_survives_serialization(provider: KeyProvider) -> None:
    enc = await provider.encrypt(SECRET, context=CONTEXT)
    again = EncryptedData.from_dict(enc.to_dict())
    assert again == enc
    assert await provider.decrypt(again) == SECRET


@pytest.mark.parametrize("wrong", [{"tenant": "43", "purpose": "contract"}, {"tenant": "42"},
                                   {**CONTEXT, "extra": "x"}, {}])
async def test_a_wrong_context_fails(provider: KeyProvider, wrong: dict[str, str]) -> None:
    enc = await provider.encrypt(SECRET, context=CONTEXT)
    with pytest.raises(DecryptionError):
        await provider.decrypt(enc, context=wrong)
    with pytest.raises(DecryptionError):  # the recorded context is what binds, when not given
        await provider.decrypt(_with(enc, context=wrong))


async def test_a_context_is_required_once_bound(provider: KeyProvider) -> None:
    enc = await provider.encrypt(SECRET)
    with pytest.raises(DecryptionError):
        await provider.decrypt(enc, context=CONTEXT)


@pytest.mark.parametrize("where", ["first", "middle", "last", "truncated", "extended"])
async def test_tampered_ciphertext_fails(provider: KeyProvider, where: str) -> None:
    enc = await provider.encrypt(SECRET, context=CONTEXT)
    ct = bytearray(enc.ciphertext)
    if where == "truncated":
        bad = bytes(ct[:-1])
    elif where == "extended":
        bad = bytes(ct) + b"\x00"
    else:
        i = {"first": 0, "middle": len(ct) // 2, "last": len(ct) - 1}[where]
        ct[i] ^= 0x01
        bad = bytes(ct)
    with pytest.raises(DecryptionError):
        await provider.decrypt(_with(enc, ciphertext=bad))


@pytest.mark.parametrize("case", MULTI_KEY, indirect=True)
async def test_a_ciphertext_presented_as_another_key_fails(case: ProviderCase,
                                                           provider: KeyProvider) -> None:
    assert case.other_key is not None
    enc = await provider.encrypt(SECRET, context=CONTEXT)
    other = await provider.encrypt(SECRET, key_id=case.other_key, context=CONTEXT)
    assert other.key_reference.key_id != enc.key_reference.key_id
    assert await provider.decrypt(other) == SECRET
    with pytest.raises(DecryptionError):
        await provider.decrypt(_with(enc, key_reference=other.key_reference))


async def test_a_reference_to_another_provider_fails(provider: KeyProvider) -> None:
    enc = await provider.encrypt(SECRET)
    foreign = KeyReference(provider="not-" + provider.name, key_id=enc.key_reference.key_id)
    with pytest.raises(DecryptionError):
        await provider.decrypt(_with(enc, key_reference=foreign))


async def test_a_provider_holds_the_records_of_its_own_key(case: ProviderCase,
                                                          provider: KeyProvider) -> None:
    """What the KeyManager routes records by (two providers of one kind in one manager)."""
    enc = await provider.encrypt(SECRET)
    assert provider.holds_key(enc.key_reference) is True
    foreign = KeyReference(provider="not-" + provider.name, key_id=enc.key_reference.key_id)
    assert provider.holds_key(foreign) is False
    if case.other_key is not None:
        other = await provider.encrypt(SECRET, key_id=case.other_key)
        assert provider.holds_key(other.key_reference) is None  # reachable, not its own
    if case.name == "local":  # one key per provider: another key file's key is not its own
        other_file = KeyReference(provider="local", key_id="key-file:0000000000000000")
        assert provider.holds_key(other_file) is False


async def test_a_plaintext_over_4_kib_is_payload_too_large(provider: KeyProvider) -> None:
    """One error for the provider limit, the one the KeyManager documents (not ValueError)."""
    assert await provider.decrypt(await provider.encrypt(b"k" * 4096)) == b"k" * 4096
    with pytest.raises(PayloadTooLarge):
        await provider.encrypt(b"k" * 4097)


async def test_an_unknown_key_is_key_not_found(case: ProviderCase) -> None:
    if case.name == "local":
        p = case.open()
        with pytest.raises(KeyNotFoundError):
            await p.encrypt(SECRET, key_id="key-file:0000000000000000")
        return
    p = case.open(case.unknown_key_uri)
    try:
        with pytest.raises(KeyNotFoundError):
            await p.initialize()
        with pytest.raises(KeyNotFoundError):
            await p.encrypt(SECRET, context=CONTEXT)
    finally:
        await p.close()


@pytest.mark.parametrize("case", REMOTE, indirect=True)
async def test_an_unreachable_backend_is_a_connection_error(case: ProviderCase) -> None:
    assert case.unreachable_uri is not None
    p = case.open(case.unreachable_uri)
    try:
        with pytest.raises(ProviderConnectionError):
            await p.initialize()
        with pytest.raises(ProviderConnectionError):
            await p.encrypt(SECRET)
    finally:
        await p.close()


@pytest.mark.parametrize("case", NETWORK, indirect=True)
async def test_a_backend_that_never_answers_times_out(case: ProviderCase) -> None:
    """A listening socket that never answers: without the provider's timeout this test would
    hang until pytest-timeout fails it."""
    assert case.blackhole_uri is not None
    p = case.open(case.blackhole_uri)
    try:
        with pytest.raises(ProviderConnectionError):
            await p.encrypt(SECRET)
    finally:
        await p.close()


async def test_generate_data_key(provider: KeyProvider) -> None:
    pair = await provider.generate_data_key(context=CONTEXT)
    assert len(pair.plaintext_key) == 32
    assert pair.key_reference == pair.encrypted_key.key_reference
    assert pair.plaintext_key not in pair.encrypted_key.ciphertext
    assert "plaintext_key" not in repr(pair) and pair.plaintext_key.hex() not in repr(pair)
    assert await provider.decrypt(pair.encrypted_key) == pair.plaintext_key
    with pytest.raises(DecryptionError):
        await provider.decrypt(pair.encrypted_key, context={"tenant": "other"})
    second = await provider.generate_data_key(context=CONTEXT)
    assert second.plaintext_key != pair.plaintext_key


async def test_sign(case: ProviderCase, provider: KeyProvider) -> None:
    if case.signing_key is None:
        with pytest.raises(UnsupportedOperation):
            await provider.sign(b"message")
        return
    assert case.verify is not None
    signature = await provider.sign(b"a message to sign", key_id=case.signing_key)
    assert case.verify(b"a message to sign", signature)
    assert not case.verify(b"another message", signature)


async def test_signing_with_an_encryption_key_is_unsupported(provider: KeyProvider) -> None:
    with pytest.raises(UnsupportedOperation):
        await provider.sign(b"message")


async def test_concurrent_calls(provider: KeyProvider) -> None:
    secrets = [bytes([i]) * 32 for i in range(16)]
    encs = await asyncio.gather(*(provider.encrypt(s, context={"i": str(i)})
                                  for i, s in enumerate(secrets)))
    assert await asyncio.gather(*(provider.decrypt(e) for e in encs)) == secrets


async def test_no_secret_in_uri_repr_or_errors(case: ProviderCase, provider: KeyProvider) -> None:
    texts = [provider.uri, repr(provider)]
    enc = await provider.encrypt(SECRET)
    try:
        await provider.decrypt(_with(enc, ciphertext=enc.ciphertext[:-1]))
    except DecryptionError as exc:
        texts.append(str(exc))
    for secret in case.secrets:
        assert all(secret not in t for t in texts), case.name
    assert all(SECRET.decode() not in t for t in texts)


def test_usable_as_the_server_seal(case: ProviderCase) -> None:
    """Through the same registry and adapter ``keygrants server --seal URI`` uses."""
    seal = open_root_provider(case.uri, **case.options)
    assert all(secret not in seal.uri for secret in case.secrets)
    blob = seal.wrap(b"\x07" * 32, aad=b"root key aad")
    assert seal.unwrap(blob, aad=b"root key aad") == b"\x07" * 32
    with pytest.raises(UnsealFailed):
        seal.unwrap(blob, aad=b"another aad")
