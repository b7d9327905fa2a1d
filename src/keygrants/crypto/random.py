"""Randomness from the operating system's CSPRNG."""

from __future__ import annotations

import secrets

__all__ = ["random_bytes"]


def random_bytes(n: int) -> bytes:
    """Return ``n`` bytes from the OS CSPRNG."""
    if n < 0:
        raise ValueError("n must be non-negative")
    return secrets.token_bytes(n)
