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


def _no_userinfo(uri: str) -> None:
    """Provider URIs are logged and recorded; credentials in them would leak."""
    rest = uri.partition(":")[2]
    if rest.startswith("//") and "@" in rest[2:].split("/", 1)[0]:
        raise ValueError("credentials do not belong in a provider URI (it is logged); pass "
                         "them as options or through the provider's environment variables")


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
    _no_userinfo(uri)
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


def _open_local(uri: str, **options: Any) -> KeyProvider:
    from keygrants.providers.local import open_local_key_provider

    return open_local_key_provider(uri, **options)


register_provider("local", _open_local)
register_root_provider("local", _open_local_root)


# -- external providers: each module (and its client library) is imported on first open ------

def _lazy_provider(scheme: str, module: str, factory: str, extra: str | None = None,
                   drivers: tuple[str, ...] = ()) -> Callable[..., KeyProvider]:
    """A factory that imports ``module`` when the scheme is first opened; a missing client
    library (one of ``drivers``) becomes a ProviderConnectionError naming the extra."""

    def open_(uri: str, **options: Any) -> KeyProvider:
        import importlib

        from keygrants.errors import ProviderConnectionError

        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            if extra is None or (exc.name or "").split(".")[0] not in drivers:
                raise
            raise ProviderConnectionError(
                f"the {scheme}: provider needs {exc.name}: pip install 'keygrants[{extra}]'"
            ) from exc
        provider: KeyProvider = getattr(mod, factory).from_uri(uri, **options)
        return provider

    return open_


register_provider("aws-kms", _lazy_provider("aws-kms", "keygrants.providers.aws", "AwsKmsProvider",
                                            "aws", ("boto3", "botocore")))
register_provider("vault", _lazy_provider("vault", "keygrants.providers.vault",
                                          "VaultTransitProvider", "vault", ("hvac", "requests")))
register_provider("pkcs11", _lazy_provider("pkcs11", "keygrants.providers.pkcs11", "Pkcs11Provider",
                                           "pkcs11", ("pkcs11",)))
register_provider("gcp-kms", _lazy_provider("gcp-kms", "keygrants.providers.gcp", "GcpKmsProvider",
                                            "gcp", ("google", "grpc", "proto")))
register_provider("keygrants", _lazy_provider("keygrants", "keygrants.providers.keygrants_provider",
                                              "KeygrantsProvider"))
