"""Package requests under a policy: may this file go out now? (403 otherwise, said by http/).

Rules are judged from the file name alone (name-version-build); the cooldown needs the record's
effective time, from the ledger. A package asked for before its subdir's metadata passed through
the proxy (a lock file on a cold cache) has it read first, so the ledger knows the record.
"""

from __future__ import annotations

from condaproxy.cache.catalog.catalog import Catalog
from condaproxy.cache.integrity import ExpectedLookup
from condaproxy.conda.effective import effective_time
from condaproxy.conda.paths import UnitKey, package_parts
from condaproxy.conda.policy import Decision, Policy
from condaproxy.config.model import ChannelConfig


async def check(
    catalog: Catalog,
    expected: ExpectedLookup | None,
    key: UnitKey,
    channel: ChannelConfig,
    policy: Policy,
    now: float,
) -> Decision:
    """The policy's verdict on one package file."""
    name, version, build = package_parts(key.filename)
    appeared = None
    if policy.min_age:
        seen = await catalog.sighting(key.channel, key.subdir, key.filename)
        if seen is None and expected is not None:
            await expected(key, channel)  # reads the shard or repodata naming it: the ledger learns it
            seen = await catalog.sighting(key.channel, key.subdir, key.filename)
        if seen is not None:
            since = await catalog.ledger_since(key.channel, key.subdir)
            record = {"timestamp": seen.timestamp, "indexed_timestamp": seen.indexed_timestamp}
            appeared = effective_time(record, seen.first_seen, since)
    return policy.decide(name, version, build, appeared, now, subdir=key.subdir or "noarch")
