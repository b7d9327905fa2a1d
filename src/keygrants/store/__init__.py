"""Store backends, registered by URL scheme (``memory:``, ``sqlite:``, ``postgresql:``).

Built-in backends register through :func:`register_store`, the same path a plugin uses.
"""

from __future__ import annotations

from collections.abc import Callable

from keygrants.store.base import Alias, Store

__all__ = ["Alias", "Store", "open_store", "register_store"]

_FACTORIES: dict[str, Callable[[str], Store]] = {}


def register_store(scheme: str, factory: Callable[[str], Store]) -> None:
    """Register a store factory for a URL scheme; the factory gets the whole URL."""
    _FACTORIES[scheme] = factory


def open_store(url: str) -> Store:
    """Open a store by URL: ``sqlite:///abs/path.db``, ``sqlite:relative.db``, ``memory:``,
    ``postgresql://user:password@host:5432/database`` (or ``postgres://``).

    Raises:
        ValueError: for an unknown scheme or a malformed URL.
        StoreError: when the backend cannot be opened.
    """
    scheme = url.split(":", 1)[0]
    factory = _FACTORIES.get(scheme)
    if factory is None:
        raise ValueError(f"unknown store URL scheme {scheme!r}; known: {', '.join(sorted(_FACTORIES))}")
    return factory(url)


def _open_sqlite(url: str) -> Store:
    from keygrants.store.sqlite import SQLiteStore

    path = url.removeprefix("sqlite:")
    if path.startswith("//"):
        path = path[2:]
    if not path:
        raise ValueError("sqlite: URL needs a path, e.g. sqlite:///var/lib/keygrants/keygrants.db")
    return SQLiteStore(path)


def _open_postgres(url: str) -> Store:
    try:
        from keygrants.store.postgres import PostgresStore
    except ImportError as exc:
        if (exc.name or "").split(".")[0] not in ("psycopg", "psycopg_pool"):
            raise
        from keygrants.errors import StoreError

        raise StoreError(f"the postgresql: store needs {exc.name}: "
                         "pip install 'keygrants[postgres]'") from exc
    return PostgresStore(url)


def _open_memory(url: str) -> Store:
    from keygrants.store.memory import MemoryStore

    return MemoryStore()


register_store("sqlite", _open_sqlite)
register_store("postgresql", _open_postgres)
register_store("postgres", _open_postgres)
register_store("memory", _open_memory)
