"""Fixtures of the store suites."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from keygrants.store.base import Store
from keygrants.store.memory import MemoryStore
from keygrants.store.sqlite import SQLiteStore


@pytest.fixture
def second_node(store: Store, request: pytest.FixtureRequest) -> Iterator[Store]:
    """Another store object on the database of ``store``, as a second server node opens it:
    a second connection to the SQLite file, a second pool on the PostgreSQL database (the
    memory store, which lives in one process, is its own second node)."""
    if isinstance(store, MemoryStore):
        yield store
        return
    other: Store
    if isinstance(store, SQLiteStore):
        other = SQLiteStore(store.path)
    else:
        from keygrants.store.postgres import PostgresStore

        other = PostgresStore(request.getfixturevalue("postgres_url"))
    yield other
    other.close()
