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


class _Pool:
    __slots__ = ("buf", "lock", "pos")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.buf = b""
        self.pos = 0

    def take(self, n: int) -> bytes:
        with self.lock:
            pos = self.pos
            if pos + n > len(self.buf):
                self.buf, pos = os.urandom(_POOL_BYTES), 0
            self.pos = pos + n
            return self.buf[pos:pos + n]

    def forget(self) -> None:
        """In a forked child: a new lock (the parent's may have been held) and no bytes."""
        self.lock = threading.Lock()
        self.buf = b""
        self.pos = 0


_pool: Final = _Pool()
os.register_at_fork(after_in_child=_pool.forget)


def nonce_bytes(n: int) -> bytes:
    """``n`` (at most 64) fresh bytes from the OS CSPRNG for a nonce or an identifier, never
    handed out twice; for keys use :func:`random_bytes`."""
    if not 0 <= n <= MAX_NONCE_BYTES:
        raise ValueError(f"n must be 0..{MAX_NONCE_BYTES}")
    return _pool.take(n)
