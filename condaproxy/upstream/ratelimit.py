"""Token buckets bounding how often clients may make the proxy check a token upstream.

Every token the proxy has not seen costs an upstream request, so without a bound the proxy is a
free token-guessing oracle, and the upstream may ban its address for the flood. One bucket per
client address (an IPv6 client by its /64, which one host usually holds whole) and one for all
clients together; a check needs a token from both. Pure: the clock is passed in.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections.abc import Callable

from cachetools import TTLCache

# Clients remembered at once; past that, the least recently seen start afresh (the overall
# bucket still bounds what they can do together).
MAX_CLIENTS = 65536


class TokenBucket:
    """Up to capacity tokens, refilled continuously at capacity per period seconds."""

    __slots__ = ("_rate", "_stamp", "_tokens", "capacity")

    def __init__(self, capacity: int, period: float, now: float) -> None:
        self.capacity = capacity
        self._rate = capacity / period
        self._tokens = float(capacity)
        self._stamp = now

    def __repr__(self) -> str:
        return f"<TokenBucket {self._tokens:.2f}/{self.capacity}>"

    def _refill(self, now: float) -> None:
        if now > self._stamp:
            self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self._rate)
            self._stamp = now

    def wait(self, now: float) -> float:
        """Seconds until a token is there (0: there is one now)."""
        self._refill(now)
        return 0.0 if self._tokens >= 1 else (1 - self._tokens) / self._rate

    def take(self, now: float) -> None:
        """Spend a token; the caller checked wait() is 0."""
        self._refill(now)
        if self._tokens < 1:
            raise RuntimeError(f"{self!r}: no token to take")
        self._tokens -= 1


def client_key(address: str | None) -> str:
    """What a client is counted as: its IPv4 address, or its IPv6 /64."""
    if not address:
        return ""  # a UNIX socket, say: all such clients share one bucket
    try:
        addr = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


class ProbeLimiter:
    """Decides whether a client may have a token checked upstream now, per minute budgets."""

    PERIOD = 60.0

    def __init__(self, per_client: int, overall: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._per_client = per_client
        self._clock = clock
        self._overall = TokenBucket(overall, self.PERIOD, clock())
        # A bucket untouched for a whole period is full again: forgetting it changes nothing.
        self._clients: TTLCache[str, TokenBucket] = TTLCache(MAX_CLIENTS, self.PERIOD, timer=clock)

    def acquire(self, client: str | None) -> int:
        """0 if the client may have one check now (and it is counted); else seconds to wait."""
        now = self._clock()
        key = client_key(client)
        bucket = self._clients.get(key)
        if bucket is None:
            bucket = TokenBucket(self._per_client, self.PERIOD, now)
        wait = max(bucket.wait(now), self._overall.wait(now))
        if wait > 0:
            return max(1, math.ceil(wait))
        bucket.take(now)
        self._overall.take(now)
        self._clients[key] = bucket  # (re)inserted: remembered for a period from now
        return 0
