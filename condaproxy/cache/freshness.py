"""Pure freshness decisions: serve from the store, revalidate, or fetch (RFC 9111 in miniature)."""

from __future__ import annotations

import enum

from condaproxy.cache.unit import Unit
from condaproxy.conda.paths import Kind
from condaproxy.config.model import Config


class Verdict(enum.Enum):
    """What to do with a request, given what the catalog holds."""

    HIT = "hit"  # complete and fresh: serve from the store
    REVALIDATE = "revalidate"  # complete but past its TTL: conditional request upstream
    STALE_WHILE_REVALIDATE = "swr"  # past its TTL, within the grace: serve now, revalidate behind
    FETCH = "fetch"  # nothing usable cached


def ttl(kind: Kind, config: Config) -> int | None:
    """Seconds a stored unit stays fresh; None for immutable units (forever)."""
    return None if kind.immutable else config.cache.repodata_ttl


def verdict(unit: Unit | None, now: float, config: Config) -> Verdict:
    """Decide from the catalog row alone."""
    if unit is None:
        return Verdict.FETCH
    limit = ttl(unit.key.kind, config)
    age = now - unit.validated_at
    if limit is None or age < limit:
        return Verdict.HIT
    if age < limit + config.cache.repodata_stale_while_revalidate:
        return Verdict.STALE_WHILE_REVALIDATE
    return Verdict.REVALIDATE


def may_serve_stale(unit: Unit | None, now: float, config: Config) -> bool:
    """A mutable unit whose upstream failed may be served for max_stale past its TTL."""
    if unit is None or unit.key.kind.immutable:
        return False
    return now - unit.validated_at <= config.cache.repodata_ttl + config.cache.max_stale


def stored_freshness(unit: Unit, now: float, config: Config) -> dict[str, str]:
    """Cache-Control (and Age when stale) for a mutable unit served from the store (RFC 9111 5.2.2.1).

    max-age is what is left of the TTL, not a fresh TTL: a front cache (nginx, Squid) or a
    client that keeps the answer must not keep it past the moment the proxy itself revalidates.
    """
    limit = ttl(unit.key.kind, config)
    if limit is None:
        return {}
    age = max(0, int(now - unit.validated_at))
    headers = {"Cache-Control": f"public, max-age={max(0, limit - age)}"}
    if age >= limit:
        # Served stale: say how stale. A fresh answer carries no Age, since max-age already
        # counts it down, and a cache that honours Age (Squid) would otherwise count it twice.
        headers["Age"] = str(age)
    return headers


def cache_control(kind: Kind, config: Config) -> str:
    """The Cache-Control the proxy sends for a unit of this kind."""
    limit = ttl(kind, config)
    if limit is None:
        return f"public, max-age={config.lazy.streamer_cache_timeout}"
    return f"public, max-age={limit}"
