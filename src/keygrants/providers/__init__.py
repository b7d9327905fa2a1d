"""Key providers, registered by URI scheme.

Two registries, one per port:

- :func:`open_provider` opens a :class:`KeyProvider` (``local:``, ``pkcs11:``, ``aws-kms:``,
  ``vault:``, ``gcp-kms:``, ``keygrants:``) for the :class:`~keygrants.KeyManager`;
- :func:`open_root_provider` opens the server's seal. ``local:`` has a dedicated seal
  implementation; any other registered key provider serves as a seal through
  :class:`ProviderSeal`.

Built-ins register through :func:`register_provider` / :func:`register_root_provider`, the same
path an external plugin takes. Each built-in provider module is imported only when its scheme
is opened, so a missing optional extra (``pip install 'keygrants[aws]'``) costs nothing until
it is used.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from keygrants.providers.base import KeyProvider, ProviderSeal, RootKeyProvider

__all__ = [
    "KeyProvider",
    "ProviderSeal",
    "RootKeyProvider",
    "open_provider",
    "open_root_provider",
    "register_provider",
    "register_root_provider",
    "registered_schemes",
]

_KEY_PROVIDERS: dict[str, Callable[..., KeyProvider]] = {}
_ROOT_PROVIDERS: dict[str, Callable[..., RootKeyProvider]] = {}


def _scheme(uri: str) -> str:
    scheme, sep, _ = uri.partition(":")
    if not sep or not scheme:
        raise ValueError(f"provider URI must start with a scheme, e.g. local:..., got {uri!r}")
    return scheme


def register_provider(scheme: str, factory: Callable[..., KeyProvider]) -> None:
    """Register ``factory(uri, **options) -> KeyProvider`` for a URI scheme."""
    _KEY_PROVIDERS[scheme] = factory


def register_root_provider(scheme: str, factory: Callable[..., RootKeyProvider]) -> None:
    """Register a dedicated seal implementation ``factory(uri, **options)`` for a scheme."""
    _ROOT_PROVIDERS[scheme] = factory


def registered_schemes() -> list[str]:
    """Every scheme a provider is registered for."""
    return sorted(set(_KEY_PROVIDERS) | set(_ROOT_PROVIDERS))


def open_provider(uri: str, **options: Any) -> KeyProvider:
    """Open a key provider by URI (see each provider module for its URI form).

    Raises:
        ValueError: for an unknown scheme or a malformed URI.
        ProviderConnectionError: when the provider's optional extra is not installed.
    """
    scheme = _scheme(uri)
    factory = _KEY_PROVIDERS.get(scheme)
    if factory is None:
        raise ValueError(f"unknown key provider {scheme!r}; known: {', '.join(sorted(_KEY_PROVIDERS))}")
    return factory(uri, **options)


def open_root_provider(uri: str, **options: Any) -> RootKeyProvider:
    """Open the server's seal by URI.

    Raises:
        ValueError: for an unknown scheme or a malformed URI.
        SealError: when the provider cannot be initialized.
    """
    scheme = _scheme(uri)
    factory = _ROOT_PROVIDERS.get(scheme)
    if factory is not None:
        return factory(uri, **options)
    if scheme in _KEY_PROVIDERS:
        return ProviderSeal(open_provider(uri, **options))
    raise ValueError(f"unknown seal provider {scheme!r}; known: {', '.join(registered_schemes())}")


def _open_local_root(uri: str, **options: Any) -> RootKeyProvider:
    from keygrants.providers.local import open_local_provider

    return open_local_provider(uri, **options)


register_root_provider("local", _open_local_root)
