"""Per-principal rate limiting: one token bucket per principal.

Each principal may make ``rate`` requests per second on average, in bursts of up to ``burst``.
A request over the limit is refused with :class:`~keygrants.errors.RateLimited` (HTTP 429 and
``Retry-After``). The built-in ``admin`` principal is exempt by default, so no other principal's
traffic or misconfiguration can lock the operator out. Buckets of principals that have not been
seen for a while are dropped, so memory stays bounded by the active principals.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Final

from keygrants.auth import ADMIN_PRINCIPAL
from keygrants.errors import RateLimited

__all__ = ["RateLimiter"]

_MAX_BUCKETS: Final = 100_000


class RateLimiter:
    """Token buckets by principal id.

    Args:
        rate: tokens added per second (must be positive).
        burst: bucket size (at least 1).
        exempt: principals never limited (default: the built-in admin).
        clock: a monotonic clock (injected in tests).

    Raises:
        ValueError: for a non-positive rate or a burst below 1.
    """

    def __init__(self, rate: float, burst: int, *, exempt: Iterable[str] = (ADMIN_PRINCIPAL,),
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not rate > 0:
            raise ValueError("rate must be positive")
        if burst < 1:
            raise ValueError("burst must be at least 1")
        self.rate = float(rate)
        self.burst = float(burst)
        self.exempt = frozenset(exempt)
        self._clock = clock
        self._buckets: dict[str, list[float]] = {}  # principal -> [tokens, last refill]
        self.refused = 0

    def take(self, principal: str) -> None:
        """Spend one token of ``principal``'s bucket.

        Raises:
            RateLimited: when the bucket is empty; ``retry_after`` says when one token is back.
        """
        if principal in self.exempt:
            return
        now = self._clock()
        bucket = self._buckets.get(principal)
        if bucket is None:
            if len(self._buckets) >= _MAX_BUCKETS:
                self._prune(now)
            bucket = self._buckets[principal] = [self.burst, now]
        tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            self.refused += 1
            raise RateLimited(f"rate limit of {self.rate:g} requests/s exceeded",
                              retry_after=(1.0 - tokens) / self.rate, principal=principal)
        bucket[0] = tokens - 1.0

    def _prune(self, now: float) -> None:
        """Forget buckets that have refilled completely (they hold no state worth keeping)."""
        full_after = self.burst / self.rate
        for key in [k for k, (_, last) in self._buckets.items() if now - last >= full_after]:
            del self._buckets[key]
        if len(self._buckets) >= _MAX_BUCKETS:  # all active: drop the oldest half
            for key in sorted(self._buckets, key=lambda k: self._buckets[k][1])[:_MAX_BUCKETS // 2]:
                del self._buckets[key]
