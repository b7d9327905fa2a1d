"""keygrants: a self-hosted key management service built around key grants.

The public facade: the SDK clients, the local grant verifiers, the application KeyManager,
the result models and the error tree.
"""

from __future__ import annotations

from keygrants._version import __version__
from keygrants.client import AsyncClient, Client
from keygrants.client.verifier import AsyncVerifier, Verifier
from keygrants.errors import (
    DecryptionError,
    InvalidCiphertext,
    InvalidKeyUsage,
    InvalidRequest,
    KeyDestroyed,
    KeyDisabled,
    KeygrantsError,
    KeyNotFound,
    KeyPendingDeletion,
    KeyStateError,
    KMSError,
    ServerUnreachable,
    Unauthenticated,
)
from keygrants.keymanager import KeyManager, SyncKeyManager

__all__ = [
    "AsyncClient",
    "AsyncVerifier",
    "Client",
    "DecryptionError",
    "InvalidCiphertext",
    "InvalidKeyUsage",
    "InvalidRequest",
    "KMSError",
    "KeyDestroyed",
    "KeyDisabled",
    "KeyManager",
    "KeyNotFound",
    "KeyPendingDeletion",
    "KeyStateError",
    "KeygrantsError",
    "ServerUnreachable",
    "SyncKeyManager",
    "Unauthenticated",
    "Verifier",
    "__version__",
]
