"""The root key provider port: wraps and unwraps the root key (KEK) that seals key material.

Like Vault's seal: the server keeps its root key only in memory; at rest it exists only as a
blob wrapped by the provider (a local key file, a passphrase, and in later releases an HSM or
a cloud KMS).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

__all__ = ["RootKeyProvider"]


@runtime_checkable
class RootKeyProvider(Protocol):
    """Wraps small secrets (the root key) under a key the provider holds."""

    @property
    def uri(self) -> str:
        """The provider URI without secrets, as recorded next to the wrapped blob."""

    def wrap(self, plaintext: bytes, *, aad: bytes) -> bytes:
        """Encrypt and authenticate ``plaintext`` bound to ``aad``."""

    def unwrap(self, blob: bytes, *, aad: bytes) -> bytes:
        """Reverse :meth:`wrap`.

        Raises:
            UnsealFailed: if the blob does not open under this provider's key.
        """
