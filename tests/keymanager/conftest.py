"""Fixtures for the KeyManager and the local provider: counting and scriptable providers."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import pytest

from keygrants.errors import DecryptionError
from keygrants.providers.base import KeyProvider
from keygrants.providers.local import LocalKeyProvider
from keygrants.providers.models import DataKeyPair, EncryptedData, KeyReference, RotationPolicy


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class CountingProvider(KeyProvider):
    """Delegates to a real provider and counts every call; can be made slow or failing."""

    def __init__(self, inner: KeyProvider) -> None:
        self.inner = inner
        self.name = inner.name
        self.uri = inner.uri
        self.default_key_id = inner.default_key_id
        self.calls: Counter[str] = Counter()
        self.delay: dict[str, float] = {}
        self.fail: dict[str, BaseException] = {}

    async def _hook(self, op: str) -> None:
        self.calls[op] += 1
        if op in self.delay:
            await asyncio.sleep(self.delay[op])
        if op in self.fail:
            raise self.fail[op]

    async def initialize(self) -> None:
        await self._hook("initialize")
        await self.inner.initialize()

    def holds_key(self, ref: KeyReference) -> bool | None:
        return self.inner.holds_key(ref)

    async def encrypt(self, plaintext: bytes, *, key_id: str | None = None,
                      context: Mapping[str, str] | None = None) -> EncryptedData:
        await self._hook("encrypt")
        return await self.inner.encrypt(plaintext, key_id=key_id, context=context)

    async def decrypt(self, encrypted: EncryptedData, *,
                      context: Mapping[str, str] | None = None) -> bytes:
        await self._hook("decrypt")
        return await self.inner.decrypt(encrypted, context=context)

    async def generate_data_key(self, *, key_id: str | None = None, key_spec: str = "AES_256",
                                context: Mapping[str, str] | None = None) -> DataKeyPair:
        await self._hook("generate_data_key")
        return await self.inner.generate_data_key(key_id=key_id, key_spec=key_spec,
                                                  context=context)

    async def get_rotation_policy(self, key_id: str | None = None) -> RotationPolicy:
        await self._hook("get_rotation_policy")
        return RotationPolicy(enabled=True, rotation_period_days=90)

    async def close(self) -> None:
        await self._hook("close")

    @property
    def key_operations(self) -> int:
        return sum(n for op, n in self.calls.items() if op not in ("initialize", "close"))


class FixedProvider(KeyProvider):
    """Deterministic: every data key is ``key`` wrapped as ``wrapped`` (for byte-level pins).

    ``decrypt`` returns the key only for exactly that wrapped blob and context, so a tampered
    wrapped key or context fails as it would at a real provider.
    """

    name = "fixed"
    uri = "fixed:"
    default_key_id = "k1"

    def __init__(self, key: bytes, wrapped: bytes, algorithm: str = "TEST_WRAP") -> None:
        self.key = key
        self.wrapped = wrapped
        self.algorithm = algorithm

    async def encrypt(self, plaintext: bytes, *, key_id: str | None = None,
                      context: Mapping[str, str] | None = None) -> EncryptedData:
        raise NotImplementedError

    async def generate_data_key(self, *, key_id: str | None = None, key_spec: str = "AES_256",
                                context: Mapping[str, str] | None = None) -> DataKeyPair:
        from datetime import UTC, datetime

        ref = KeyReference(provider=self.name, key_id=key_id or "k1",
                           created_at=datetime(2030, 1, 1, tzinfo=UTC))
        enc = EncryptedData(ciphertext=self.wrapped, key_reference=ref, algorithm=self.algorithm,
                            encrypted_at=datetime(2030, 1, 1, tzinfo=UTC),
                            context=dict(context or {}))
        return DataKeyPair(plaintext_key=self.key, encrypted_key=enc, key_reference=ref)

    async def decrypt(self, encrypted: EncryptedData, *,
                      context: Mapping[str, str] | None = None) -> bytes:
        ctx = encrypted.context if context is None else context
        if (encrypted.ciphertext != self.wrapped or encrypted.algorithm != self.algorithm
                or dict(ctx) != self.expected_context):
            raise DecryptionError()
        return self.key

    expected_context: dict[str, str] = {"purpose": "keygrants-data-key"}


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    return tmp_path / "kek"


@pytest.fixture
def local(key_file: Path) -> LocalKeyProvider:
    return LocalKeyProvider(key_file)


@pytest.fixture
def counting(local: LocalKeyProvider) -> CountingProvider:
    return CountingProvider(local)


@pytest.fixture
def counting_cls() -> type[CountingProvider]:
    """The class, for tests that wrap several providers (importlib mode: no conftest imports)."""
    return CountingProvider


@pytest.fixture
def fixed_cls() -> type[FixedProvider]:
    return FixedProvider
