"""`condaproxy stats`, `gc` and `invalidate`: on a stopped proxy's cache they work on the catalog
directly (SQLite's locking keeps it whole); while a proxy serves the cache (it holds
serve.lock), changes go through its admin API, so its in-memory state stays true."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from condaproxy.cache.catalog.catalog import Catalog
from condaproxy.cache.evict import Evictor
from condaproxy.cache.inflight import InflightTable
from condaproxy.cache.ownership import served
from condaproxy.cache.pins import RuntimePins
from condaproxy.cache.removal import remove_unit
from condaproxy.conda.paths import Rejection, parse_path
from condaproxy.config.model import Config
from condaproxy.http.admin import split_target
from condaproxy.http.pages import ratio, size
from condaproxy.ops.client import CommandError, admin_post, admin_token, fetch_status
from condaproxy.store.filesystem import FilesystemStore


@asynccontextmanager
async def _catalog(config: Config) -> AsyncIterator[Catalog]:
    path = config.cache.directory / "catalog.sqlite3"
    if not await asyncio.get_running_loop().run_in_executor(None, path.is_file):
        raise CommandError(f"no cache at {config.cache.directory} (no catalog.sqlite3)")
    catalog = await Catalog.open(path)
    try:
        yield catalog
    finally:
        await catalog.close()


async def _served(config: Config) -> bool:
    return await asyncio.get_running_loop().run_in_executor(None, served, config.cache.directory)


async def stats(config: Config, url: str, *, as_json: bool) -> int:
    """Units, bytes and hit ratios per channel."""
    async with _catalog(config) as catalog:
        channels = await catalog.channel_summaries()
        total = await catalog.stored_size() + await catalog.catalog_size()
        units = await catalog.unit_count()
    live = await fetch_status(url) if await _served(config) else None
    by_name = {c["name"]: c for c in (live or {}).get("channels", [])}
    rows: list[dict[str, Any]] = []
    for c in channels:
        traffic = by_name.get(c.channel, {}).get("traffic")
        rows.append(
            {
                "channel": c.channel,
                "units": c.units,
                "bytes": c.bytes,
                "stored_hits": c.hits,
                "traffic": traffic,
            }
        )
    report = {
        "directory": str(config.cache.directory),
        "units": units,
        "size": total,
        "max_size": config.cache.max_size,
        "running": live is not None,
        "traffic": live["traffic"] if live else None,
        "channels": rows,
    }
    if as_json:
        print(json.dumps(report, indent=2))
        return 0
    limit = f" of {size(config.cache.max_size)} (max_size)" if config.cache.max_size else ""
    print(f"cache {config.cache.directory}: {units} units, {size(total)}{limit}")
    if live:
        since = live["traffic"]["since_start"]
        print(
            f"running proxy, since start: {since['requests']} requests, "
            f"hit ratio {ratio(since['hit_ratio'])}, byte hit ratio {ratio(since['byte_hit_ratio'])}, "
            f"{size(since['bytes_from_upstream'])} from upstream"
        )
    else:
        print("no running proxy answered: hit ratios are the running proxy's, since its start")
    print(f"{'channel':<32} {'units':>8} {'stored':>11} {'hits':>8} {'requests':>9} {'hit ratio':>9}")
    for row in rows:
        since = (row["traffic"] or {}).get("since_start", {})
        print(
            f"{row['channel']:<32} {row['units']:>8} {size(row['bytes']):>11} {row['stored_hits']:>8} "
            f"{since.get('requests', '-'):>9} {ratio(since.get('hit_ratio')):>9}"
        )
    return 0


async def gc(config: Config, url: str, *, dry_run: bool, token_file: str | None) -> int:
    """Evict down to max_size now (dry_run: only say what would go)."""
    if not config.cache.max_size:
        print("nothing to do: [cache] max_size is not set, so nothing is ever evicted")
        return 0
    verb = "would evict" if dry_run else "evicted"
    if await _served(config):
        answer = await admin_post(url, admin_token(config, token_file), "gc", {"dry_run": dry_run})
        units, freed, now = answer["units"], answer["freed"], answer["size"] + answer["catalog"]
    else:
        directory = config.cache.directory
        async with _catalog(config) as catalog:
            store = FilesystemStore(directory / "blobs")
            evictor = Evictor(config.cache, catalog, store, InflightTable(directory / "tmp"))
            await RuntimePins(directory, evictor).load()
            result = await evictor.run_once(dry_run=dry_run)
            await store.close()
        units, freed, now = result.units, result.freed, result.size + result.catalog
    print(f"{verb} {units} units, {size(freed)}; cache {'would be' if dry_run else 'is'} {size(now)}")
    print(f"(max_size {size(config.cache.max_size)})")
    return 0


async def invalidate(config: Config, url: str, target: str, *, token_file: str | None) -> int:
    """Mark CHANNEL[/SUBDIR] repodata stale now, or drop CHANNEL/SUBDIR/FILE from the cache."""
    split = split_target(target)
    if isinstance(split, str):
        raise CommandError(f"{target!r}: {split}")
    channel, subdir, file = split
    if await _served(config):
        answer = await admin_post(url, admin_token(config, token_file), "invalidate", {"target": target})
        count, dropped = answer.get("invalidated"), answer.get("dropped")
    else:
        async with _catalog(config) as catalog:
            count = dropped = None
            if file is None:
                count = await catalog.invalidate(channel, subdir)
            else:
                parsed = parse_path("/" + target.strip("/"))
                assert not isinstance(parsed, Rejection)
                unit = await catalog.get(parsed.key)
                store = FilesystemStore(config.cache.directory / "blobs")
                dropped = unit is not None and await remove_unit(catalog, store, parsed.key, unit.blob_key)
    if count is not None:
        print(f"{target}: {count} cached files marked stale; each is revalidated at its next request")
    else:
        print(f"{target}: dropped from the cache" if dropped else f"{target}: was not cached")
    return 0
