"""keygrants: a self-hosted key management service built around key grants.

The public facade: the SDK clients, the result models and the error tree.
"""

from __future__ import annotations

from keygrants._version import __version__
from keygrants.client import AsyncClient, Client
from keygrants.errors import (
    InvalidCiphertext,
    InvalidKeyUsage,
    InvalidRequest,
    KeyDestroyed,
    KeyDisabled,
    KeygrantsError,
    KeyNotFound,
    KeyPendingDeletion,
    KeyStateError,
    ServerUnreachable,
    Unauthenticated,
)

__all__ = [
    "AsyncClient",
    "Client",
    "InvalidCiphertext",
    "InvalidKeyUsage",
    "InvalidRequest",
    "KeyDestroyed",
    "KeyDisabled",
    "KeyNotFound",
    "KeyPendingDeletion",
    "KeyStateError",
    "KeygrantsError",
    "ServerUnreachable",
    "Unauthenticated",
    "__version__",
]
