"""Upstream metadata naming foreign bases, rewritten so clients come back to the proxy.

Two cases, both part of a download: a repodata document is held back until its head shows
whether `info.base_url` names another host (CEP-15; held whole when its head has no `info`),
and a shard index naming an absolute `shards_base_url` or `base_url` (CEP-16) is rewritten
whole. The pure transforms live in `conda.baseurl`, `conda.lateinfo` and `conda.shards`; here
they are driven and the bases recorded.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import replace
from pathlib import Path

from condaproxy.cache.catalog.catalog import Catalog
from condaproxy.cache.cpu import CpuPool
from condaproxy.cache.inflight import Download, Head
from condaproxy.cache.unit import Unit
from condaproxy.conda import shards, variants
from condaproxy.conda.baseurl import Sniffer, Verdict, rewrite
from condaproxy.conda.lateinfo import rewrite_late
from condaproxy.conda.paths import Kind, UnitKey
from condaproxy.conda.urls import redacted_url, unit_url
from condaproxy.config.model import ChannelConfig
from condaproxy.store.files import hash_file

log = logging.getLogger(__name__)


class Holdback:
    """A repodata download's bytes, held back until its head says whether it must be rewritten."""

    def __init__(self, key: UnitKey, location: str, catalog: Catalog, cpu: CpuPool) -> None:
        self._key = key
        self._location = location
        self._catalog = catalog
        self._cpu = cpu
        self._sniffer = Sniffer(key.filename, location)

    @classmethod
    def of(
        cls, key: UnitKey, channel: ChannelConfig, headers: dict[str, str], catalog: Catalog, cpu: CpuPool
    ) -> Holdback | None:
        """A holdback for a repodata document from upstream; None when there is nothing to read."""
        parts = variants.split(key.filename)
        if key.kind is not Kind.REPODATA or parts is None or parts[2] is not None:
            return None
        if headers.get("Content-Encoding", "identity").strip().lower() != "identity":
            return None  # not the document's own bytes: never guessed at, passed through
        # Relative bases resolve against the file's place on the channel, not a redirect target.
        location = redacted_url(unit_url(channel.url, key.path, channel.token))
        return cls(key, location, catalog, cpu)

    @property
    def pending(self) -> bool:
        """No verdict yet: no byte may go out."""
        return self._sniffer.verdict is Verdict.PENDING

    async def feed(self, dl: Download, chunk: bytes | None, head: Head, body: Path) -> tuple[bool, Path]:
        """Read on in the head (None: the body ended): (still held back, the file the body goes to).

        Released, the download's readers get head and every byte so far; held for good, the
        body is rewritten whole once it is in (see prepare).
        """
        loop = asyncio.get_running_loop()
        # Bounded (HEAD_LIMIT decoded bytes, MAX_DEPTH) and on the body's path: not a CPU pool job.
        verdict = await loop.run_in_executor(None, self._sniffer.feed, chunk or b"", chunk is None)
        if verdict is Verdict.PENDING:
            return True, body
        if verdict in (Verdict.FOREIGN, Verdict.LATE):
            # Nobody reads it: the open file goes on growing under its raw name, and our copy
            # is written where readers will look.
            raw = body.with_name(body.name + ".raw")
            await loop.run_in_executor(None, os.replace, body, raw)
            return True, raw
        if verdict is Verdict.PLAIN:
            # Before any byte goes out: this document's clients ask for packages beside it.
            await self._catalog.set_package_base(self._key.channel, self._key.subdir, None)
        dl.start_body(head)
        return False, body

    async def prepare(self, unit: Unit, raw: Path, out: Path) -> Unit:
        """Write our copy of a held body to out, record the upstream base, and describe the copy."""
        if self._sniffer.verdict is Verdict.LATE:
            # info was not in the head: read it from the whole body, in bounded memory.
            value, base = await self._cpu.run(rewrite_late, raw, out, unit.key.filename, self._location)
            if base is None:
                if value is not None:  # an info naming no foreign base: any mapping forgotten
                    await self._catalog.set_package_base(unit.key.channel, unit.key.subdir, None)
                await asyncio.get_running_loop().run_in_executor(None, os.replace, raw, out)
                return unit  # the upstream's bytes, as they are
        else:
            base = self._sniffer.base
            assert base is not None, "prepare() is for documents naming a foreign base"
            await self._cpu.run(rewrite, raw, out, unit.key.filename)
        size, sha = await self._cpu.run(hash_file, out)
        # Recorded before any reader gets the copy: its clients ask for packages at once.
        await self._catalog.set_package_base(unit.key.channel, unit.key.subdir, base)
        log.info('%s: packages live at %s; base_url rewritten to ""', unit.key, base)
        # Our bytes, our client-facing ETag; unit.etag stays the upstream's, for revalidation.
        headers = {k: v for k, v in unit.headers.items() if k != "Content-Md5"}
        headers["ETag"] = f'"{sha[:32]}"'
        return replace(unit, blob_key=sha, sha256=sha, size=size, headers=headers, source=unit.sha256)


async def prepare_index(catalog: Catalog, cpu: CpuPool, unit: Unit, raw: Path, out: Path) -> Unit:
    """Rewrite an index naming foreign shard or package bases so clients come back to us."""
    loop = asyncio.get_running_loop()
    key = unit.key
    # Bases come back redacted: open() puts a mirror's token back, nothing stores it.
    base, packages = await cpu.run(shards.rewrite_index, raw, out, unit.upstream_url)
    await catalog.set_shard_base(key.channel, key.subdir, base)
    if packages is not None:
        # A shard-only client learns package locations from the index alone (CEP-16 + 15).
        await catalog.set_package_base(key.channel, key.subdir, packages)
    if base is None and packages is None:
        await loop.run_in_executor(None, os.replace, raw, out)
        return unit
    size, sha = await cpu.run(hash_file, out)
    log.info("%s: index rewritten (shards at %s, packages at %s)", key, base, packages)
    # Our bytes, our client-facing ETag; unit.etag stays the upstream's, for revalidation.
    headers = {**unit.headers, "ETag": f'"{sha[:32]}"'}
    return replace(unit, blob_key=sha, sha256=sha, size=size, headers=headers, source=unit.sha256)
