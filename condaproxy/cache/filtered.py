"""Policy and view documents: repodata (every encoding) and shard indexes, filtered, made as units.

A filtered document is a derived unit (`repodata.json.zst@policy-<digest>`,
`repodata.json@view-<ms>-<digest>`): made once however many clients ask, off the event loop,
persisted, and made again when its source changes or when a held record comes of age. A shard
index is filtered by filtering the shards that hold affected records: those become new shards,
named by their own sha256 and stored before the index that points at them.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from condaproxy.cache.catalog.catalog import Catalog
from condaproxy.cache.inflight import Download, Head
from condaproxy.cache.persist import PersistQueue
from condaproxy.cache.policies import PolicyBook
from condaproxy.cache.shardstore import SHARD_HEADERS, keep_shard, shard_key
from condaproxy.cache.unit import Unit
from condaproxy.conda import derived, variants
from condaproxy.conda.decoding import open_decoded
from condaproxy.conda.filtering import Judge, filter_repodata, filter_shard, pack_shard, shard_records
from condaproxy.conda.paths import SHARD_INDEX_NAME, Kind, UnitKey
from condaproxy.conda.policy import Policy
from condaproxy.conda.shards import MAX_INDEX_BYTES, unpack_zst_msgpack
from condaproxy.config.model import ChannelConfig
from condaproxy.errors import UpstreamUnavailable
from condaproxy.store.files import hash_file

log = logging.getLogger(__name__)

BlobFile = Callable[[Unit], AbstractAsyncContextManager[Path]]
Ensure = Callable[[UnitKey, ChannelConfig], Awaitable[Unit | None]]
RELEASE = "X-Condaproxy-Release"  # when the next held record comes of age (Unix time)
VIEW = "X-Condaproxy-View"
SHARD_FETCHES = 8  # shards fetched and filtered at once while an index is made
_MSGPACK_TYPES = SHARD_HEADERS


def release_of(unit: Unit) -> float | None:
    """When a made document must be made again because a held record came of age."""
    value = unit.headers.get(RELEASE)
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _filter_document(src: Path, src_name: str, dst: Path, dst_name: str, judge: Judge) -> int:
    with open_decoded(src, src_name) as reader, variants.encoder(dst, dst_name) as writer:
        return filter_repodata(reader, writer, judge)


@dataclass(frozen=True)
class _Made:
    path: Path
    size: int
    sha: str


class Filtered:
    """Makes policy and view documents for the download task (Fetcher.filtered)."""

    def __init__(
        self,
        book: PolicyBook,
        catalog: Catalog,
        persist: PersistQueue,
        ensure: Ensure,
        blob_file: BlobFile,
        ttl: Callable[[], int],
        missing: Callable[[UnitKey], bool],
    ) -> None:
        self._book = book
        self._catalog = catalog
        self._persist = persist
        self._ensure = ensure
        self._blob_file = blob_file
        self._ttl = ttl
        self._missing = missing  # whether upstream said 404 for a unit, lately

    async def __call__(self, dl: Download, channel: ChannelConfig, cached: Unit | None) -> bool:
        """Fill dl with the document its internal name asks for; False when it names none of ours."""
        spec = derived.parse(dl.key.filename)
        if spec is None or spec.form is derived.Form.REV:
            return False
        key = dl.key
        source_key = UnitKey(key.channel, key.subdir, spec.base, key.kind)
        source = await self._ensure(source_key, channel)
        if source is None:
            if self._missing(source_key):
                return False  # a 404 stays a 404 (clients fall back to another form)
            # Upstream trouble is never a 404: conda would remember "no shards" for days.
            dl.fail(UpstreamUnavailable(f"{spec.base} is not available from upstream now"))
            return True
        policy = self._book.policy(channel)
        now = self._book.clock()
        release = release_of(cached) if cached is not None else None
        in_step = (
            cached is not None and cached.source == source.blob_key and (release is None or release > now)
        )
        if in_step and cached is not None and await self._catalog.revalidated(cached, {}, now) is not None:
            dl.not_modified()
            return True
        judge = await self._judge(key, policy, spec, now)
        if spec.base == SHARD_INDEX_NAME:
            made = await self._index(dl, channel, source, judge)
        else:
            made = await self._document(dl, source, spec.base, judge)
        if made is None:
            return False
        if spec.form is derived.Form.POLICY:
            self._book.record(key.channel, key.subdir, judge)
        headers = {
            "Content-Type": variants.content_type(spec.base)
            if spec.base != SHARD_INDEX_NAME
            else _MSGPACK_TYPES["Content-Type"],
            "ETag": f'"{made.sha[:32]}"',
            "Last-Modified": email.utils.formatdate(now, usegmt=True),
            "Cache-Control": f"public, max-age={self._max_age(judge, now)}",
        }
        if judge.next_release is not None:
            headers[RELEASE] = f"{judge.next_release:.3f}"
        if spec.form is derived.Form.VIEW:
            headers[VIEW] = "filtered"
        dl.start_body(Head(headers, made.size))
        dl.finish(made.size, made.sha)
        wall = time.time()
        unit = Unit(
            key,
            source.upstream_url,
            made.sha,
            made.sha,
            made.size,
            headers,
            None,
            None,
            wall,
            wall,
            source=source.blob_key,
        )
        log.info(
            "made %s from %s (%s)",
            key,
            spec.base,
            ", ".join(f"{k} {v}" for k, v in judge.counts.items()) or "nothing left out",
        )
        with contextlib.suppress(Exception):  # counted and logged by the queue; readers have the bytes
            await self._persist.persist(unit, dl.temp_path)
        return True

    def _max_age(self, judge: Judge, now: float) -> int:
        ttl = self._ttl()
        if judge.next_release is None:
            return ttl
        # Clients must ask again when the next held record comes of age, not a TTL later.
        return max(0, min(ttl, int(judge.next_release - now)))

    async def _judge(self, key: UnitKey, policy: Policy, spec: derived.Derived, now: float) -> Judge:
        since = await self._catalog.ledger_since(key.channel, key.subdir)
        first_seen = (
            await self._catalog.sightings_after(key.channel, key.subdir, since) if since is not None else {}
        )
        return Judge(
            # A name made for a policy a reload just replaced: the policy in force decides.
            policy,
            now,
            cutoff=spec.cutoff,
            since=since,
            first_seen=first_seen,
            subdir=key.subdir,
        )

    async def _document(self, dl: Download, source: Unit, base: str, judge: Judge) -> _Made | None:
        loop = asyncio.get_running_loop()
        try:
            async with self._blob_file(source) as path:
                await loop.run_in_executor(
                    None, _filter_document, path, source.key.filename, dl.temp_path, base, judge
                )
            size, sha = await loop.run_in_executor(None, hash_file, dl.temp_path)
        except Exception as exc:  # an undecodable source: a clean 404 from the caller, never a crash
            log.warning("cannot filter %s: %s", source.key, exc)
            await loop.run_in_executor(None, lambda: dl.temp_path.unlink(missing_ok=True))
            return None
        return _Made(dl.temp_path, size, sha)

    # -- shard indexes -------------------------------------------------------------------------

    async def _index(self, dl: Download, channel: ChannelConfig, source: Unit, judge: Judge) -> _Made | None:
        key = dl.key
        policy = judge.policy
        loop = asyncio.get_running_loop()
        try:
            async with self._blob_file(source) as path:
                index = await loop.run_in_executor(None, unpack_zst_msgpack, path, MAX_INDEX_BYTES)
        except Exception as exc:
            log.warning("cannot filter %s: %s", source.key, exc)
            return None
        shards: dict[str, Any] = dict(index.get("shards") or {})
        affected = await self._affected(key, channel, shards, judge)
        limit = asyncio.Semaphore(SHARD_FETCHES)

        async def one(name: str) -> tuple[str, str | None]:
            async with limit:
                return name, await self._shard(key, channel, shards[name], judge, dl.temp_path, name)

        try:
            results = await asyncio.gather(*(one(n) for n in sorted(affected)))
        except Exception as exc:  # a shard we cannot read or store: no index pointing nowhere
            log.warning("cannot filter %s: %s", key, exc)
            return None
        for name, new in results:
            if new is None:
                del shards[name]  # every record of the package is kept out
            else:
                shards[name] = bytes.fromhex(new)
        index["shards"] = shards
        data = pack_shard(index)
        await loop.run_in_executor(None, dl.temp_path.write_bytes, data)
        size, sha = await loop.run_in_executor(None, hash_file, dl.temp_path)
        log.debug("%s: %d shards filtered for %s", key, len(affected), policy)
        return _Made(dl.temp_path, size, sha)

    async def _affected(
        self, key: UnitKey, channel: ChannelConfig, shards: dict[str, Any], judge: Judge
    ) -> set[str]:
        """Package names whose shards may hold records to leave out."""
        policy = judge.policy
        names: set[str] = set()
        if policy is not None:
            for rule in policy.rules:
                if rule.action.value == "hide":
                    names.update(n for n in shards if rule.may_match_name(n))
        moments = []
        if policy is not None and policy.min_age:
            moments.append(judge.now - policy.min_age)
        if judge.cutoff is not None:
            moments.append(judge.cutoff)
        if moments:
            # The ledger knows every record of the subdir once its whole repodata was read.
            for name in ("repodata.json.zst", "repodata.json"):
                if (
                    await self._ensure(UnitKey(key.channel, key.subdir, name, Kind.REPODATA), channel)
                    is not None
                ):
                    break
            if judge.since is None:
                judge.since = await self._catalog.ledger_since(key.channel, key.subdir)
                if judge.since is not None:
                    judge.first_seen = await self._catalog.sightings_after(
                        key.channel, key.subdir, judge.since
                    )
            unknown = policy is not None and policy.unknown_hold and bool(policy.min_age)
            for seen in await self._catalog.newer_than(key.channel, key.subdir, min(moments), unknown):
                if seen.name in shards:
                    names.add(seen.name)
        return names

    async def _shard(
        self, key: UnitKey, channel: ChannelConfig, digest: Any, judge: Judge, temp: Path, name: str
    ) -> str | None:
        """The sha256 of the package's shard as filtered (stored first); None when nothing is left."""
        sha = digest.hex() if isinstance(digest, bytes) else str(digest)
        old_key = shard_key(key.channel, key.subdir, sha)
        unit = await self._ensure(old_key, channel)
        if unit is None:
            raise LookupError(f"{old_key} is not available")  # an index must never point nowhere
        loop = asyncio.get_running_loop()
        async with self._blob_file(unit) as path:
            shard = await loop.run_in_executor(None, unpack_zst_msgpack, path)
        filtered, dropped = await loop.run_in_executor(None, filter_shard, shard, judge)
        if not dropped:
            return sha
        if not shard_records(filtered):
            return None
        data = pack_shard(filtered)
        out = temp.with_name(f"{temp.name}.{name}.shard")
        await loop.run_in_executor(None, out.write_bytes, data)
        try:
            size, new = await loop.run_in_executor(None, hash_file, out)
            await keep_shard(
                self._catalog,
                self._persist,
                shard_key(key.channel, key.subdir, new),
                out,
                size,
                unit.upstream_url,
                unit.blob_key,
            )
        finally:
            await loop.run_in_executor(None, lambda: out.unlink(missing_ok=True))
        return new
