"""Root key providers, registered by URI scheme.

Built-ins (``local:``) register through :func:`register_provider`, the same path an external
plugin takes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from keygrants.providers.base import RootKeyProvider

__all__ = ["RootKeyProvider", "open_root_provider", "register_provider"]

_FACTORIES: dict[str, Callable[..., RootKeyProvider]] = {}


def register_provider(scheme: str, factory: Callable[..., RootKeyProvider]) -> None:
    """Register a factory ``factory(uri, **options)`` for a URI scheme."""
    _FACTORIES[scheme] = factory


def open_root_provider(uri: str, **options: Any) -> RootKeyProvider:
    """Open a root key provider by URI.

    Raises:
        ValueError: for an unknown scheme or a malformed URI.
        SealError: when the provider cannot be initialized.
    """
    scheme = uri.split(":", 1)[0]
    factory = _FACTORIES.get(scheme)
    if factory is None:
        raise ValueError(f"unknown seal provider {scheme!r}; known: {', '.join(sorted(_FACTORIES))}")
    return factory(uri, **options)


def _open_local(uri: str, **options: Any) -> RootKeyProvider:
    from keygrants.providers.local import open_local_provider

    return open_local_provider(uri, **options)


register_provider("local", _open_local)
