"""Randomness from the operating system's CSPRNG.

:func:`random_bytes` reads the OS directly (keys, secrets). :func:`nonce_bytes` serves the
small values made on every request (AEAD nonces, grant ids, proof ids) from 4 KiB read from
the OS at a time. The reason is CPython, not the kernel: ``os.urandom`` releases the GIL
around each ``getrandom(2)``, and on a server whose other threads (commit threads) are
runnable the event loop then waits to get it back. Measured on grant issuance: 18% of the
loop's samples were in ``os.urandom(16)``, and issuance ran 14% faster once ids came from the
pool. Every byte still comes from the OS CSPRNG and is handed out once; the pool is guarded
by a lock and emptied in a forked child, so parent and child never share bytes.
"""

from __future__ import annotations

import os
import secrets
import threading
from typing import Final

__all__ = ["nonce_bytes", "random_bytes"]

_POOL_BYTES: Final = 4096
MAX_NONCE_BYTES: Final = 64


def random_bytes(n: int) -> bytes:
    """Return ``n`` bytes from the OS CSPRNG."""
    if n < 0:
        raise ValueError("n must be non-negative")
    return secrets.token_bytes(n)


_lock = threading.Lock()
_pool: list[bytes | int] = [b"", _POOL_BYTES]  # [buffer, position]: empty, so the first call fills it


def _forget_in_child() -> None:
    """In a forked child: a new lock (the parent's may have been held) and no bytes."""
    global _lock
    _lock = threading.Lock()
    _pool[0], _pool[1] = b"", _POOL_BYTES


os.register_at_fork(after_in_child=_forget_in_child)


def nonce_bytes(n: int) -> bytes:
    """``n`` (at most 64) fresh bytes from the OS CSPRNG for a nonce or an identifier, never
    handed out twice; for keys use :func:`random_bytes`."""
    if not 0 <= n <= MAX_NONCE_BYTES:
        raise ValueError(f"n must be 0..{MAX_NONCE_BYTES}")
    with _lock:
        buf, pos = _pool
        end = pos + n  # type: ignore[operator]
        if end > _POOL_BYTES:
            buf = _pool[0] = os.urandom(_POOL_BYTES)
            pos, end = 0, n
        _pool[1] = end
        return buf[pos:end]  # type: ignore[index]
