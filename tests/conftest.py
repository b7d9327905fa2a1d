"""Fixtures shared across the test suite."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from keygrants.auth import RequestContext
from keygrants.service import KMS
from keygrants.store.base import Store
from keygrants.store.memory import MemoryStore
from keygrants.store.sqlite import SQLiteStore


class FakeClock:
    """A settable clock for the service (Unix seconds)."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """Every implementation of the Store port (the contract suite runs against each)."""
    s: Store = MemoryStore() if request.param == "memory" else SQLiteStore(tmp_path / "kg.db")
    yield s
    s.close()


@pytest.fixture
def admin() -> RequestContext:
    return RequestContext(principal="admin", request_id="test")


@pytest.fixture
def kms(store: Store, clock: FakeClock) -> KMS:
    return KMS(store, os.urandom(32), clock=clock)
