"""keygrants: a self-hosted key management service built around key grants.

The public facade: the SDK clients, the application KeyManager, the result models and the
error tree.
"""

from __future__ import annotations

from keygrants._version import __version__
from keygrants.client import AsyncClient, Client
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
    "__version__",
]
